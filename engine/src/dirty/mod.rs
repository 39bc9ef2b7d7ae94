//! Dirty-page tracking: which pages the guest wrote since we last looked.
//!
//! One trait, [`DirtyTracker`], three implementations:
//! - [`VmmBitmapTracker`]: the embedding VMM owns the truth (its KVM dirty
//!   log) and sets bits in bitmaps it shares with us.
//! - [`UffdWpTracker`]: userfaultfd write-protect in
//!   asynchronous mode, read and re-armed with the `PAGEMAP_SCAN` ioctl
//!   (Linux 6.7+, probed at run time). For memory this process maps.
//! - [`HashTracker`]: no kernel help at all; compares an xxh3 of every page
//!   with the one taken last time. Works on any mapping, including a shared
//!   file another process writes, at the cost of reading all memory a round.
//!
//! The contract that makes pre-copy correct: `collect` hands out every page
//! written before it returns, and a write that lands after a page's bit was
//! handed out is reported by a later `collect`. The engine reads a page only
//! after `collect` handed it out, so the last write before the pause is
//! always sent.

use pmigrate_ranges::{AtomicBitmap, GuestMemory};

mod hash;
pub mod uffd_wp;
mod vmm;

pub use hash::HashTracker;
pub use uffd_wp::UffdWpTracker;
pub use uffd_wp::UffdWpUnsupported;
pub use vmm::VmmBitmapTracker;

/// Errors from dirty tracking.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// The kernel, or the memory, lacks a feature the tracker needs.
    #[error("{tracker} dirty tracking is not available: {why}")]
    Unsupported {
        /// Tracker name.
        tracker: &'static str,
        /// What is missing.
        #[source]
        why: UffdWpUnsupported,
    },
    /// A system call failed.
    #[error("{what} failed")]
    Sys {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The tracker was given bitmaps that do not match the memory.
    #[error("dirty bitmaps do not match guest memory: {0}")]
    Shape(String),
    /// Reading guest memory failed.
    #[error(transparent)]
    Memory(#[from] pmigrate_ranges::MemoryError),
}

/// Records which guest pages were written between two calls of `collect`.
pub trait DirtyTracker: Send {
    /// Short name for reports (`"uffd-wp"`, `"hash"`, `"vmm-bitmap"`).
    fn name(&self) -> &'static str;

    /// Begins tracking writes to `mem`; called once, before round 0 reads
    /// any page. Writes before `start` are not reported (round 0 sends
    /// everything anyway).
    fn start(&mut self, mem: &GuestMemory) -> Result<(), DirtyError>;

    /// Sets in `out[r]` (one bitmap per region of `mem`, in order) every page
    /// written since the previous `collect` (or `start`), and re-arms
    /// tracking so that writes from now on show up in the next call. Bits
    /// already set in `out` stay set.
    fn collect(&mut self, mem: &GuestMemory, out: &[AtomicBitmap]) -> Result<(), DirtyError>;

    /// Stops tracking and releases kernel resources. Also done on drop.
    fn stop(&mut self, mem: &GuestMemory);

    /// Like [`DirtyTracker::start`], for an engine that will hand over,
    /// once round 0 is out, the hash of the copy it read of every page but
    /// those set in `unread` ([`DirtyTracker::seed`]). A tracker that keeps
    /// page hashes takes those as its baseline instead of reading all
    /// memory before round 0, and reads only the `unread` pages now; it
    /// returns true. Others start as ever and return false.
    #[doc(hidden)]
    fn start_seeded(&mut self, mem: &GuestMemory, unread: &[AtomicBitmap]) -> Result<bool, DirtyError> {
        let _ = unread;
        self.start(mem).map(|()| false)
    }

    /// The hashes (xxh3 of each page, per region) of the copies round 0
    /// read, for a tracker whose [`DirtyTracker::start_seeded`] returned
    /// true; called once, after round 0 and before the first `collect`.
    #[doc(hidden)]
    fn seed(&mut self, sent: &[&[std::sync::atomic::AtomicU64]]) {
        let _ = sent;
    }

    /// An estimate of the bytes written since the last `collect` (or the
    /// start), for a tracker whose `collect` must read all memory: it
    /// looks at a sample only and leaves the state `collect` reports from
    /// untouched, so the next `collect` still reports every page. `None`:
    /// no cheaper way than collecting.
    #[doc(hidden)]
    fn sample(&mut self, mem: &GuestMemory) -> Result<Option<u64>, DirtyError> {
        let _ = mem;
        Ok(None)
    }
}

/// Checks that `out` has one bitmap per region, each one bit a page.
pub(crate) fn check_shape(mem: &GuestMemory, out: &[AtomicBitmap]) -> Result<(), DirtyError> {
    if out.len() != mem.regions().len() {
        return Err(DirtyError::Shape(format!("{} bitmaps for {} regions", out.len(), mem.regions().len())));
    }
    for ((i, r), b) in mem.iter().zip(out) {
        if b.len() != r.pages() {
            return Err(DirtyError::Shape(format!("{i}: {} bits for {} pages", b.len(), r.pages())));
        }
    }
    Ok(())
}

/// Which tracker to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrackerKind {
    /// userfaultfd write-protect when the kernel has it, else hash compare.
    Auto,
    /// userfaultfd write-protect (async) + PAGEMAP_SCAN.
    UffdWp,
    /// Page hash comparison.
    Hash,
}

/// The best tracker this kernel offers for `kind` and `mem`. `Auto` takes
/// userfaultfd write-protect unless a region is a shared file mapping,
/// which other processes may write behind our page tables' back.
pub fn tracker_for(kind: TrackerKind, mem: &GuestMemory) -> Result<Box<dyn DirtyTracker>, DirtyError> {
    let shared = mem.regions().iter().any(|r| matches!(r.backing(), pmigrate_ranges::Backing::SharedFile(_)));
    match kind {
        TrackerKind::Hash => Ok(Box::new(HashTracker::new())),
        TrackerKind::UffdWp => {
            uffd_wp::probe()?;
            Ok(Box::new(UffdWpTracker::new()))
        }
        TrackerKind::Auto => match uffd_wp::probe() {
            Ok(()) if !shared => Ok(Box::new(UffdWpTracker::new())),
            _ => Ok(Box::new(HashTracker::new())),
        },
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! One suite, run over every tracker the kernel supports.
    use super::*;
    use pmigrate_ranges::{Gpa, GuestRegion, HostPageSize, PAGE_SIZE, PAGE_SIZE_U64};

    fn bitmaps(mem: &GuestMemory) -> Vec<AtomicBitmap> {
        mem.regions().iter().map(|r| AtomicBitmap::new(r.pages())).collect()
    }

    fn set_bits(b: &[AtomicBitmap]) -> Vec<(usize, u64)> {
        let mut v = Vec::new();
        for (i, m) in b.iter().enumerate() {
            for (s, n) in m.runs(0, m.len()) {
                v.extend((s..s + n).map(|p| (i, p)));
            }
        }
        v
    }

    /// Runs the shared suite over `t`. Trackers may over-report (a page
    /// counts as dirty if its bit is set) but never miss a write.
    pub(crate) fn suite(mut t: Box<dyn DirtyTracker>, exact: bool) {
        let mem = GuestMemory::new(vec![
            GuestRegion::anonymous(Gpa(0), 64 * PAGE_SIZE_U64, HostPageSize::Small).unwrap(),
            GuestRegion::anonymous(Gpa(1 << 30), 130 * PAGE_SIZE_U64, HostPageSize::Small).unwrap(),
        ])
        .unwrap();
        // Some pages populated before tracking starts, some not.
        mem.regions()[0].write_u64(5 * 4096, 1).unwrap();
        t.start(&mem).unwrap();
        let out = bitmaps(&mem);
        t.collect(&mem, &out).unwrap();
        if exact {
            assert_eq!(set_bits(&out), vec![], "{}: nothing written yet", t.name());
        }
        for b in &out {
            b.clear_all();
        }
        mem.regions()[0].write_u64(5 * 4096 + 8, 2).unwrap();
        mem.regions()[0].write_u64(63 * 4096, 3).unwrap();
        mem.regions()[1].write_u64(129 * 4096 + 4088, 4).unwrap();
        mem.regions()[1].write_u64(0, 5).unwrap();
        t.collect(&mem, &out).unwrap();
        let got = set_bits(&out);
        for want in [(0, 5), (0, 63), (1, 0), (1, 129)] {
            assert!(got.contains(&want), "{}: missed {want:?} in {got:?}", t.name());
        }
        if exact {
            assert_eq!(got.len(), 4, "{}: {got:?}", t.name());
        }
        // Re-armed: a second collect with no writes reports nothing new.
        let again = bitmaps(&mem);
        t.collect(&mem, &again).unwrap();
        if exact {
            assert_eq!(set_bits(&again), vec![], "{}: re-armed", t.name());
        }
        // A page written again after being collected is reported again.
        mem.regions()[0].write_u64(63 * 4096, 33).unwrap();
        t.collect(&mem, &again).unwrap();
        assert!(set_bits(&again).contains(&(0, 63)), "{}: rewrite missed", t.name());
        // A mismatched bitmap table is refused.
        assert!(t.collect(&mem, &again[..1]).is_err());
        t.stop(&mem);
    }

    #[test]
    fn hash_tracker_passes_the_suite() {
        suite(Box::new(HashTracker::new()), true);
    }

    /// Seeded by round 0: the baseline of a page is the hash of the copy
    /// round 0 read, so a write after that read is reported and one before
    /// it is not; a page round 0 did not read (a free-page hint) has its
    /// baseline from the start. Before the seed, nothing is missed.
    #[test]
    fn a_hash_tracker_seeded_by_round_0_misses_no_write() {
        use std::sync::atomic::AtomicU64;
        use xxhash_rust::xxh3::xxh3_64;
        let mem =
            GuestMemory::new(vec![GuestRegion::anonymous(Gpa(0), 8 * PAGE_SIZE_U64, HostPageSize::Small).unwrap()])
                .unwrap();
        let region = &mem.regions()[0];
        let hash_of = |p: u64| {
            let mut b = vec![0u8; PAGE_SIZE];
            region.read_pages(pmigrate_ranges::PageIdx(p), &mut b).unwrap();
            xxh3_64(&b)
        };
        let mut t = HashTracker::new();
        let unread = bitmaps(&mem);
        unread[0].set(7); // reported free: round 0 will not read it
        region.write_u64(6 * 4096, 60).unwrap();
        assert!(t.start_seeded(&mem, &unread).unwrap(), "the hash tracker takes round 0's hashes");
        // Before the seed, a collect over-reports but misses nothing.
        let early = bitmaps(&mem);
        t.collect(&mem, &early).unwrap();
        assert!(set_bits(&early).contains(&(0, 6)));
        let mut t = HashTracker::new();
        assert!(t.start_seeded(&mem, &unread).unwrap());
        // Round 0: page 1 written before it is read, page 2 after.
        region.write_u64(4096, 10).unwrap();
        let sent: Vec<AtomicU64> = (0..8).map(|p| AtomicU64::new(hash_of(p))).collect();
        region.write_u64(2 * 4096, 20).unwrap();
        region.write_u64(7 * 4096, 70).unwrap(); // the free page, written after the hint
        t.seed(&[&sent[..]]);
        let out = bitmaps(&mem);
        t.collect(&mem, &out).unwrap();
        assert_eq!(set_bits(&out), vec![(0, 2), (0, 7)]);
        // Re-armed as ever.
        let again = bitmaps(&mem);
        t.collect(&mem, &again).unwrap();
        assert_eq!(set_bits(&again), vec![]);
    }

    /// A sample estimates from one 64-page chunk in 16 and changes
    /// nothing: a write it saw, and one it did not, are both still
    /// reported by the next collect. A written area wider than 16 chunks
    /// (4 MiB) is always seen.
    #[test]
    fn a_hash_trackers_sample_estimates_and_leaves_every_write_to_collect() {
        let pages = 4096u64; // 16 MiB: 64 chunks, 4 sampled
        let mem =
            GuestMemory::new(vec![GuestRegion::anonymous(Gpa(0), pages * PAGE_SIZE_U64, HostPageSize::Small).unwrap()])
                .unwrap();
        let region = &mem.regions()[0];
        let mut t = HashTracker::new();
        assert_eq!(t.sample(&mem).unwrap(), None, "nothing to compare with before start");
        t.start(&mem).unwrap();
        assert_eq!(t.sample(&mem).unwrap(), Some(0));
        // One page in a chunk the sample skips (chunk 1), one in a chunk
        // it reads (chunk 0).
        region.write_u64(64 * 4096, 1).unwrap();
        assert_eq!(t.sample(&mem).unwrap(), Some(0), "chunk 1 is not in the sample");
        region.write_u64(3 * 4096, 1).unwrap();
        assert_eq!(t.sample(&mem).unwrap(), Some(16 * 4096), "one page seen, counted for its 16");
        // A 5 MiB area anywhere is seen.
        for p in 1500..1500 + 1280 {
            region.write_u64(p * 4096, 7).unwrap();
        }
        assert!(t.sample(&mem).unwrap().unwrap() >= 4 << 20);
        let out = bitmaps(&mem);
        t.collect(&mem, &out).unwrap();
        let got = set_bits(&out);
        assert_eq!(got.len(), 2 + 1280, "every write, sampled or not");
        assert!(got.contains(&(0, 64)) && got.contains(&(0, 3)));
        assert_eq!(t.sample(&mem).unwrap(), Some(0), "collect re-armed what the sample compares with");
        // Trackers that cannot sample say so.
        struct Plain;
        impl DirtyTracker for Plain {
            fn name(&self) -> &'static str {
                "plain"
            }
            fn start(&mut self, _: &GuestMemory) -> Result<(), DirtyError> {
                Ok(())
            }
            fn collect(&mut self, _: &GuestMemory, _: &[AtomicBitmap]) -> Result<(), DirtyError> {
                Ok(())
            }
            fn stop(&mut self, _: &GuestMemory) {}
        }
        assert_eq!(Plain.sample(&mem).unwrap(), None);
    }

    #[test]
    fn uffd_wp_tracker_passes_the_suite() {
        match uffd_wp::probe() {
            Ok(()) => suite(Box::new(UffdWpTracker::new()), true),
            Err(e) => eprintln!("skipping uffd-wp suite: {e}"),
        }
    }
}
