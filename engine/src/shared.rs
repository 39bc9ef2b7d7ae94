//! Zero-copy regions: memory both ends map, handed over instead of copied.
//!
//! When a region lives in memory the destination can map too — a file in
//! `/dev/shm` on one machine, a DAX device, CXL or other disaggregated
//! memory — copying it is wasted work: the destination maps the very same
//! bytes. Zero-copy is the copy path with nothing left to copy: such a
//! region is simply never put in a dirty set, and its pages never travel.
//!
//! Configuration cannot be trusted to say which regions are shared (the same
//! path may name a different file on the other host), so it is proved, in
//! two steps, each on stream 0 with `Probe`/`ProbeReply` frames:
//!
//! 1. **At the handshake**, for every region the source offers (a shared
//!    file mapping, named by path in the `Hello`), the destination hashes 16
//!    pages the source picked and the source compares them with its own.
//!    A mismatch sends the region down the copy path from round 0.
//! 2. **After the pause**, with the guest stopped, the source writes a fresh
//!    random nonce into 4 words of the region through its own mapping,
//!    flushes them (`msync`), and asks the destination to read those words
//!    through its mapping. Only the same memory shows the nonces: a copy of
//!    the file with identical content does not. The source then puts the
//!    words back and flushes again. A region that fails this proof is
//!    copied whole in the final round (slow, but correct, and reported).
//!
//! Until the destination confirms the migration, the source still owns the
//! region: any failure before `Verified` leaves the guest at the source,
//! with its memory as it was (the nonces are restored before anything else
//! happens).

use pmigrate_ranges::{Backing, GuestMemory, GuestRegion, PageIdx, RegionIdx, PAGE_SIZE, PAGE_SIZE_U64};
use pmigrate_transport::message::ProbeAsk;
use xxhash_rust::xxh3::xxh3_64;

/// Pages hashed per region at the handshake.
pub const HASH_SAMPLES: usize = 16;
/// Words overwritten with nonces per region at the pause.
pub const NONCE_WORDS: usize = 4;

/// Which way a region travelled, and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RegionPath {
    /// Region index.
    pub region: u32,
    /// Bytes in the region.
    pub bytes: u64,
    /// `"zero-copy"` or `"copy"`.
    pub path: String,
    /// Why.
    pub why: String,
}

/// The regions of `mem` that could be handed over: shared file mappings.
pub fn candidates(mem: &GuestMemory) -> Vec<(u32, String)> {
    mem.iter()
        .filter_map(|(i, r)| match r.backing() {
            Backing::SharedFile(p) => Some((i.0, p.to_string_lossy().into_owned())),
            _ => None,
        })
        .collect()
}

/// A small xorshift generator seeded from the session: picks places the
/// peer cannot predict before the session exists.
pub struct Picker(u64);

impl Picker {
    /// A picker seeded from `seed` bytes.
    pub fn new(seed: &[u8]) -> Self {
        Picker(xxh3_64(seed) | 1)
    }

    /// The next pseudo-random value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// `n` distinct-ish page indices of a region of `pages` pages, the first
/// and last always included.
pub fn sample_pages(pages: u64, n: usize, pick: &mut Picker) -> Vec<u64> {
    let mut v = vec![0, pages - 1];
    while v.len() < n.min(pages as usize) {
        v.push(pick.next_u64() % pages);
    }
    v
}

/// The xxh3 of each listed page of `region`.
pub fn hash_pages(region: &GuestRegion, pages: &[u64]) -> Result<Vec<u64>, pmigrate_ranges::MemoryError> {
    let mut buf = vec![0u8; PAGE_SIZE];
    pages
        .iter()
        .map(|&p| {
            region.read_pages(PageIdx(p), &mut buf)?;
            Ok(xxh3_64(&buf))
        })
        .collect()
}

/// The 8-byte words at the listed byte offsets of `region`.
pub fn read_words(region: &GuestRegion, offsets: &[u64]) -> Result<Vec<u64>, pmigrate_ranges::MemoryError> {
    offsets.iter().map(|&o| region.read_u64(o)).collect()
}

/// Nonces planted in a region, to be checked and taken out again.
pub struct Nonces {
    /// Byte offsets of the words.
    pub offsets: Vec<u64>,
    /// What the words held before.
    originals: Vec<u64>,
    /// What was written.
    pub values: Vec<u64>,
}

impl Nonces {
    /// Overwrites [`NONCE_WORDS`] words of `region` with fresh values and
    /// flushes them. The guest must be stopped.
    pub fn plant(region: &GuestRegion, pick: &mut Picker) -> Result<Self, pmigrate_ranges::MemoryError> {
        let words = region.len() / 8;
        let offsets: Vec<u64> = (0..NONCE_WORDS).map(|_| (pick.next_u64() % words) * 8).collect();
        let originals = read_words(region, &offsets)?;
        let values: Vec<u64> = originals.iter().map(|&o| o ^ pick.next_u64() | 1).collect();
        for (&o, &v) in offsets.iter().zip(&values) {
            region.write_u64(o, v)?;
            region.flush_page_of(o)?;
        }
        Ok(Nonces { offsets, originals, values })
    }

    /// Puts the original words back and flushes them.
    pub fn restore(self, region: &GuestRegion) -> Result<(), pmigrate_ranges::MemoryError> {
        // Restored in reverse, so a word planted twice ends as it began.
        for (&o, &v) in self.offsets.iter().zip(&self.originals).rev() {
            region.write_u64(o, v)?;
            region.flush_page_of(o)?;
        }
        Ok(())
    }
}

/// Whether two mappings on this host are the same memory, as the handover
/// proof decides it (step 2 above): nonces planted through `through` must
/// show through `seen_by`. The guest behind `through` must be stopped; its
/// words are put back whatever the outcome.
///
/// `Ok(Ok(same))` is the answer; `Ok(Err(_))` says the proof could not be
/// run (nothing was changed, or everything was put back); `Err(_)` says
/// the planted words could not be put back — the guest's memory is
/// changed, which is fatal.
pub fn nonce_proof(
    through: &GuestRegion,
    seen_by: &GuestRegion,
    seed: &[u8],
) -> Result<Result<bool, pmigrate_ranges::MemoryError>, pmigrate_ranges::MemoryError> {
    let mut pick = Picker::new(seed);
    let nonces = match Nonces::plant(through, &mut pick) {
        Ok(n) => n,
        Err(e) => return Ok(Err(e)),
    };
    let seen = read_words(seen_by, &nonces.offsets);
    let values = nonces.values.clone();
    nonces.restore(through)?;
    Ok(seen.map(|w| w == values))
}

/// Why a probe from the source is not answered.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// It asks about a region that does not exist.
    #[error("probe of region {region}, which does not exist")]
    NoRegion {
        /// The region index asked about.
        region: u32,
    },
    /// It asks for a word that is unaligned or past the region's end.
    #[error("probe of words outside region {region} (offset {offset:#x})")]
    WordOutside {
        /// The region.
        region: u32,
        /// The first offending byte offset.
        offset: u64,
    },
    /// It asks for a page past the region's end.
    #[error("probe of pages outside region {region} (page {page})")]
    PageOutside {
        /// The region.
        region: u32,
        /// The first offending page.
        page: u64,
    },
    /// Reading the places asked for failed.
    #[error(transparent)]
    Memory(#[from] pmigrate_ranges::MemoryError),
}

/// Checks a probe from the source against `mem` and answers it: the hashes
/// of the pages or the words asked for. Every place is bounds-checked.
pub fn answer(mem: &GuestMemory, region: RegionIdx, ask: ProbeAsk, places: &[u64]) -> Result<Vec<u64>, ProbeError> {
    let n = region.0;
    let r = mem.regions().get(region.as_usize()).ok_or(ProbeError::NoRegion { region: n })?;
    Ok(match ask {
        ProbeAsk::Words => {
            let bad = places.iter().find(|&&o| o % 8 != 0 || o.checked_add(8).is_none_or(|e| e > r.len()));
            if let Some(&offset) = bad {
                return Err(ProbeError::WordOutside { region: n, offset });
            }
            read_words(r, places)?
        }
        ProbeAsk::PageHashes => {
            if let Some(&page) = places.iter().find(|&&p| p >= r.len() / PAGE_SIZE_U64) {
                return Err(ProbeError::PageOutside { region: n, page });
            }
            hash_pages(r, places)?
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_outside_memory_names_the_first_bad_place() {
        let mem = GuestMemory::anonymous(4 * PAGE_SIZE_U64).unwrap();
        let r0 = RegionIdx(0);
        assert_eq!(answer(&mem, r0, ProbeAsk::Words, &[0, 8]).unwrap().len(), 2);
        assert!(matches!(
            answer(&mem, r0, ProbeAsk::Words, &[8, 12, 4 * PAGE_SIZE_U64]),
            Err(ProbeError::WordOutside { region: 0, offset: 12 })
        ));
        assert!(matches!(
            answer(&mem, r0, ProbeAsk::PageHashes, &[3, 4, 9]),
            Err(ProbeError::PageOutside { region: 0, page: 4 })
        ));
        assert!(matches!(answer(&mem, RegionIdx(1), ProbeAsk::Words, &[0]), Err(ProbeError::NoRegion { region: 1 })));
    }
}
