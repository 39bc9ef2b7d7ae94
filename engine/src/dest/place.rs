//! Placing pages in guest memory, and what the destination knows of every
//! page it placed.
//!
//! Streams are independent, so a page sent in round 3 on stream 1 may
//! arrive before the same page's round-2 copy on stream 0; every copy
//! therefore carries a stamp (its round + 1), and a copy older than what
//! the page holds is dropped. An exclusive range lock makes check-and-write
//! atomic per batch. Each placed page's xxh3 is kept: the digest of those
//! hashes is what the destination confirms.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;

use pmigrate_ranges::{GuestMemory, PageIdx, PageRange, RangeLock, PAGE_SIZE};
use pmigrate_transport::message::Digest;
use pmigrate_transport::payload::{zero_page_hash, OpenedPages};
use xxhash_rust::xxh3::xxh3_64;

use crate::digest::digest_handing_over;
use crate::postcopy::DestPost;
use crate::MigrateError;

/// What the destination knows of each page of a region.
struct PageTables {
    /// Per page: 1 + the round of the copy it holds (0: never written).
    stamps: Box<[AtomicU32]>,
    /// Per page: xxh3 of the copy it holds.
    hashes: Box<[AtomicU64]>,
}

/// Guest memory as pages arrive: the memory, a range lock per region, and
/// per page the stamp and hash of the copy it holds.
pub struct Placer<'m> {
    mem: &'m GuestMemory,
    locks: Vec<RangeLock>,
    /// Per region, made on first use. A region offered for handover gets
    /// them only if a page of it arrives, so a huge handed-over region
    /// costs nothing.
    tables: Vec<OnceLock<PageTables>>,
    /// Per region: offered for handover, so its memory is not known to be
    /// zero (it may be the source's own memory, or another file).
    offered: Vec<bool>,
    /// Per region: some page of it was received.
    written: Vec<AtomicBool>,
}

impl<'m> Placer<'m> {
    /// A placer for `mem`, all zero but for the regions `offered` for
    /// handover. Regions that will be copied get their tables now, off
    /// the path of the first frames.
    pub fn new(mem: &'m GuestMemory, offered: Vec<bool>) -> Self {
        let p = Self {
            mem,
            locks: mem.regions().iter().map(|_| RangeLock::new()).collect(),
            tables: mem.regions().iter().map(|_| OnceLock::new()).collect(),
            written: mem.regions().iter().map(|_| AtomicBool::new(false)).collect(),
            offered,
        };
        for (r, offered) in p.offered.iter().enumerate() {
            if !offered {
                p.tables(r);
            }
        }
        p
    }

    /// The guest memory pages are placed in.
    pub fn mem(&self) -> &'m GuestMemory {
        self.mem
    }

    /// Its range locks, one per region.
    pub fn locks(&self) -> &[RangeLock] {
        &self.locks
    }

    /// Per region: offered for handover.
    pub fn offered(&self) -> &[bool] {
        &self.offered
    }

    /// Region `r`'s page tables, made on first use.
    fn tables(&self, r: usize) -> &PageTables {
        self.tables[r].get_or_init(|| {
            let pages = self.mem.regions()[r].pages();
            PageTables {
                stamps: (0..pages).map(|_| AtomicU32::new(0)).collect(),
                hashes: (0..pages).map(|_| AtomicU64::new(zero_page_hash())).collect(),
            }
        })
    }

    /// Regions handed over: offered, and not one page of theirs received.
    pub fn handed_over(&self) -> Vec<bool> {
        self.offered.iter().zip(&self.written).map(|(o, w)| *o && !w.load(Ordering::Relaxed)).collect()
    }

    /// The digest of the memory placed (protocol.md §7.3).
    pub fn digest(&self) -> Digest {
        let handed_over = self.handed_over();
        let tables: Vec<&[AtomicU64]> = (0..self.mem.regions().len())
            .map(|r| if handed_over[r] { &[][..] } else { &self.tables(r).hashes[..] })
            .collect();
        Digest(digest_handing_over(&tables, &handed_over))
    }

    /// Places a batch of `range` (checked against the layout by the rules)
    /// whose copies are `stamp`: each page unless it holds a newer copy.
    pub fn apply(&self, range: PageRange, opened: OpenedPages<'_>, stamp: u32) -> Result<(), MigrateError> {
        let r = range.region.as_usize();
        let (first, count) = (range.start.0, range.len());
        let region = &self.mem.regions()[r];
        let PageTables { stamps, hashes } = self.tables(r);
        let _guard = self.locks[r].write(first, first + count);
        self.written[r].store(true, Ordering::Relaxed);
        let newer = |p: u64| stamps[p as usize].load(Ordering::Relaxed) <= stamp;
        match opened {
            OpenedPages::Zero => {
                let z = zero_page_hash();
                for p in first..first + count {
                    let old = stamps[p as usize].load(Ordering::Relaxed);
                    if old > stamp {
                        continue;
                    }
                    // A page never written is still the zero it started as.
                    if old != 0 || self.offered[r] {
                        region.zero_pages(PageIdx(p), 1)?;
                    }
                    stamps[p as usize].store(stamp, Ordering::Relaxed);
                    hashes[p as usize].store(z, Ordering::Relaxed);
                }
            }
            OpenedPages::Data { pages, hashes: page_hashes } => {
                // A zero page riding in a data frame is not written where
                // the memory is known zero (never written, not offered):
                // the page stays untouched, as with a `Zero` frame.
                let z = zero_page_hash();
                let known_zero =
                    |p: u64, h: u64| h == z && !self.offered[r] && stamps[p as usize].load(Ordering::Relaxed) == 0;
                let mut write_from: Option<u64> = None;
                for (i, h) in page_hashes.iter().enumerate() {
                    let p = first + i as u64;
                    let place = newer(p);
                    let write = place && !known_zero(p, *h);
                    if place {
                        stamps[p as usize].store(stamp, Ordering::Relaxed);
                        hashes[p as usize].store(*h, Ordering::Relaxed);
                    }
                    match (write, write_from) {
                        (true, None) => write_from = Some(p),
                        (false, Some(a)) => {
                            write_from = None;
                            write_run(region, first, a, p, pages)?;
                        }
                        _ => {}
                    }
                }
                if let Some(a) = write_from {
                    write_run(region, first, a, first + count, pages)?;
                }
            }
        }
        Ok(())
    }

    /// Places a post-copy batch: only its pages still needed, each once.
    pub(crate) fn apply_post(
        &self,
        post: &DestPost,
        range: PageRange,
        opened: OpenedPages<'_>,
        stamp: u32,
    ) -> Result<(), MigrateError> {
        let r = range.region.as_usize();
        let (first, count) = (range.start.0, range.len());
        let PageTables { stamps, hashes } = self.tables(r);
        let _guard = self.locks[r].write(first, first + count);
        self.written[r].store(true, Ordering::Relaxed);
        let res = match opened {
            OpenedPages::Zero => post.place(r, first, count, None, |p| {
                stamps[p as usize].store(stamp, Ordering::Relaxed);
                hashes[p as usize].store(zero_page_hash(), Ordering::Relaxed);
            }),
            OpenedPages::Data { pages, hashes: page_hashes } => post.place(r, first, count, Some(pages), |p| {
                stamps[p as usize].store(stamp, Ordering::Relaxed);
                hashes[p as usize].store(page_hashes[(p - first) as usize], Ordering::Relaxed);
            }),
        };
        res.map(drop).map_err(MigrateError::from)
    }

    /// Rehashes every page of guest memory against the table of hashes of
    /// the pages written.
    pub fn verify_memory(&self) -> Result<(), MigrateError> {
        let mut buf = vec![0u8; 64 * PAGE_SIZE];
        let handed_over = self.handed_over();
        for (i, region) in self.mem.iter() {
            if handed_over[i.as_usize()] {
                continue; // its bytes are the source's own, never received
            }
            let table = &self.tables(i.as_usize()).hashes;
            let mut p = 0u64;
            while p < region.pages() {
                let n = (region.pages() - p).min(64);
                let bytes = &mut buf[..n as usize * PAGE_SIZE];
                region.read_pages(PageIdx(p), bytes)?;
                for (k, page) in bytes.chunks_exact(PAGE_SIZE).enumerate() {
                    if xxh3_64(page) != table[(p + k as u64) as usize].load(Ordering::Relaxed) {
                        return Err(MigrateError::Differs { region: i, page: PageIdx(p + k as u64) });
                    }
                }
                p += n;
            }
        }
        Ok(())
    }
}

/// Writes pages `[a, b)` of a batch of `pages` that starts at page `first`.
fn write_run(
    region: &pmigrate_ranges::GuestRegion,
    first: u64,
    a: u64,
    b: u64,
    pages: &[u8],
) -> Result<(), MigrateError> {
    let bytes = &pages[(a - first) as usize * PAGE_SIZE..(b - first) as usize * PAGE_SIZE];
    Ok(region.write_pages(PageIdx(a), bytes)?)
}

#[cfg(test)]
mod tests {
    use pmigrate_ranges::{Gpa, GuestRegion, HostPageSize, RegionIdx};

    use super::*;

    /// Pages of `r` resident in this process's mapping, by `mincore`.
    fn resident(r: &GuestRegion) -> Vec<bool> {
        let mut v = vec![0u8; r.pages() as usize];
        // SAFETY: the range is the region's whole mapping, page aligned;
        // `v` has one byte per page, as mincore writes.
        let rc = unsafe {
            libc::mincore(r.host_addr() as *mut libc::c_void, r.pages() as usize * PAGE_SIZE, v.as_mut_ptr())
        };
        assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
        v.iter().map(|b| b & 1 == 1).collect()
    }

    /// Places `kinds` (0 zero, else a page of that byte) at pages `first..`
    /// as one data frame of `stamp`.
    fn place(p: &Placer<'_>, first: u64, kinds: &[u8], stamp: u32) {
        let pages: Vec<u8> = kinds.iter().flat_map(|&k| [k; PAGE_SIZE]).collect();
        let hashes: Vec<u64> = pages.chunks_exact(PAGE_SIZE).map(xxh3_64).collect();
        let range = PageRange { region: RegionIdx(0), start: PageIdx(first), end: PageIdx(first + kinds.len() as u64) };
        p.apply(range, OpenedPages::Data { pages: &pages, hashes: &hashes }, stamp).unwrap();
    }

    /// A zero page that rides in a data frame is not written where the
    /// memory is known zero (its page stays out of memory, as a `Zero`
    /// frame leaves it), but is where the page held data, or where the
    /// region was offered (its memory is not known zero); the hashes
    /// that the digest is made of are the same either way.
    #[test]
    fn zero_pages_in_a_data_frame_leave_known_zero_memory_untouched() {
        let mem =
            GuestMemory::new(vec![GuestRegion::anonymous(Gpa(0), 64 * PAGE_SIZE as u64, HostPageSize::Small).unwrap()])
                .unwrap();
        let p = Placer::new(&mem, vec![false]);
        place(&p, 10, &[1, 0, 0, 2, 0], 1);
        let region = &mem.regions()[0];
        let res = resident(region);
        assert!(res[10] && res[13], "data pages are written");
        assert!(!res[11] && !res[12] && !res[14], "known-zero pages are not: {:?}", &res[10..15]);
        // Page 13 held data: a later zero copy of it is written.
        place(&p, 13, &[0], 2);
        let mut back = vec![1u8; 5 * PAGE_SIZE];
        region.read_pages(PageIdx(10), &mut back).unwrap();
        let want: Vec<u8> = [1u8, 0, 0, 0, 0].iter().flat_map(|&k| [k; PAGE_SIZE]).collect();
        assert!(back == want, "the memory is what the frames carried");
        let z = zero_page_hash();
        let t = p.tables(0);
        assert_eq!(t.hashes[11].load(Ordering::Relaxed), z);
        assert_eq!(t.hashes[13].load(Ordering::Relaxed), z);
        assert_eq!(t.stamps[12].load(Ordering::Relaxed), 1, "an untouched zero page is still placed");

        // An offered region's memory is not known zero: every page is written.
        let mem =
            GuestMemory::new(vec![GuestRegion::anonymous(Gpa(0), 64 * PAGE_SIZE as u64, HostPageSize::Small).unwrap()])
                .unwrap();
        mem.regions()[0].write_pages(PageIdx(21), &[9u8; PAGE_SIZE]).unwrap();
        let p = Placer::new(&mem, vec![true]);
        place(&p, 20, &[1, 0], 1);
        let mut back = vec![1u8; PAGE_SIZE];
        mem.regions()[0].read_pages(PageIdx(21), &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 0), "the offered page is overwritten with the zero copy");
    }
}
