//! Dirty tracking by comparing page hashes: no kernel help needed.

use pmigrate_ranges::{AtomicBitmap, GuestMemory, PageIdx, PAGE_SIZE};
use xxhash_rust::xxh3::xxh3_64;

use super::{check_shape, DirtyError, DirtyTracker};

/// Pages read per copy when hashing.
const CHUNK_PAGES: usize = 64;

/// [`DirtyTracker::sample`] reads one chunk in this many: a written area
/// of more than `SAMPLE_STRIDE` chunks (4 MiB) is always seen.
const SAMPLE_STRIDE: usize = 16;

/// Keeps an xxh3 of every page; `collect` rehashes all memory (on all
/// cores) and reports the pages whose hash changed. A write that leaves a
/// page as it was is not reported, which is harmless: the page need not be
/// sent again.
///
/// Driven by the engine, it does not read all memory before round 0: round
/// 0 hashes every page it reads anyway, and those hashes, taken as each
/// page was read, become the baseline ([`DirtyTracker::start_seeded`]).
#[derive(Debug, Default)]
pub struct HashTracker {
    hashes: Vec<Vec<u64>>,
    /// Per region: the pages whose baseline was read at the start (the
    /// rest wait for round 0's hashes), while seeding is pending.
    unread: Option<Vec<Vec<u64>>>,
}

impl HashTracker {
    /// A tracker with no state yet; `start` takes the first hashes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rehashes memory on all cores and returns how many pages changed.
    /// `out`: records the changes (the new hashes replace the old, the
    /// pages are set in `out`, if any); `None` with `stride` > 1: a sample
    /// of one chunk in `stride`, nothing recorded.
    fn scan(&mut self, mem: &GuestMemory, out: Option<&[AtomicBitmap]>, stride: usize) -> Result<u64, DirtyError> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let record = out.is_some() || stride == 1;
        let mut changed = 0;
        for (r, (idx, region)) in mem.iter().enumerate() {
            let hashes = &mut self.hashes[r];
            // Whole strides per thread, so the sample is the same whatever
            // the thread count.
            let per = hashes.len().div_ceil(threads).next_multiple_of(CHUNK_PAGES * stride).max(CHUNK_PAGES * stride);
            let out = out.map(|o| &o[idx.as_usize()]);
            changed += std::thread::scope(|s| -> Result<u64, DirtyError> {
                let mut handles = Vec::new();
                for (c, part) in hashes.chunks_mut(per).enumerate() {
                    handles.push(s.spawn(move || -> Result<u64, DirtyError> {
                        let mut buf = vec![0u8; CHUNK_PAGES * PAGE_SIZE];
                        let base = (c * per) as u64;
                        let mut changed = 0;
                        for (k, block) in part.chunks_mut(CHUNK_PAGES).enumerate().step_by(stride) {
                            let first = base + (k * CHUNK_PAGES) as u64;
                            let bytes = &mut buf[..block.len() * PAGE_SIZE];
                            region.read_pages(PageIdx(first), bytes)?;
                            for (i, (h, page)) in block.iter_mut().zip(bytes.chunks(PAGE_SIZE)).enumerate() {
                                let new = xxh3_64(page);
                                if *h != new {
                                    changed += 1;
                                    if record {
                                        *h = new;
                                    }
                                    if let Some(o) = out {
                                        o.set(first + i as u64);
                                    }
                                }
                            }
                        }
                        Ok(changed)
                    }));
                }
                handles.into_iter().map(|h| h.join().expect("hash worker panicked")).sum()
            })?;
        }
        Ok(changed)
    }
}

impl DirtyTracker for HashTracker {
    fn name(&self) -> &'static str {
        "hash"
    }

    fn start(&mut self, mem: &GuestMemory) -> Result<(), DirtyError> {
        self.hashes = mem.regions().iter().map(|r| vec![0u64; r.pages() as usize]).collect();
        self.unread = None;
        self.scan(mem, None, 1).map(drop)
    }

    fn start_seeded(&mut self, mem: &GuestMemory, unread: &[AtomicBitmap]) -> Result<bool, DirtyError> {
        check_shape(mem, unread)?;
        self.hashes = mem.regions().iter().map(|r| vec![0u64; r.pages() as usize]).collect();
        // Round 0 will not read these (free-page hints): their baseline is
        // now, as with `start`.
        let mut buf = vec![0u8; PAGE_SIZE];
        let mut kept = Vec::with_capacity(unread.len());
        for (r, (_, region)) in mem.iter().enumerate() {
            let mut pages = Vec::new();
            for (first, n) in unread[r].runs(0, region.pages()) {
                for p in first..first + n {
                    region.read_pages(PageIdx(p), &mut buf)?;
                    self.hashes[r][p as usize] = xxh3_64(&buf);
                    pages.push(p);
                }
            }
            kept.push(pages);
        }
        self.unread = Some(kept);
        Ok(true)
    }

    fn seed(&mut self, sent: &[&[std::sync::atomic::AtomicU64]]) {
        let Some(unread) = self.unread.take() else { return };
        for (r, (hashes, sent)) in self.hashes.iter_mut().zip(sent).enumerate() {
            let keep: Vec<u64> = unread[r].iter().map(|&p| hashes[p as usize]).collect();
            for (h, s) in hashes.iter_mut().zip(sent.iter()) {
                *h = s.load(std::sync::atomic::Ordering::Relaxed);
            }
            for (&p, h) in unread[r].iter().zip(keep) {
                hashes[p as usize] = h;
            }
        }
    }

    fn collect(&mut self, mem: &GuestMemory, out: &[AtomicBitmap]) -> Result<(), DirtyError> {
        check_shape(mem, out)?;
        if self.hashes.len() != out.len() {
            return Err(DirtyError::Shape("collect before start".into()));
        }
        self.scan(mem, Some(out), 1).map(drop)
    }

    fn sample(&mut self, mem: &GuestMemory) -> Result<Option<u64>, DirtyError> {
        if self.hashes.len() != mem.regions().len() || self.unread.is_some() {
            return Ok(None); // not started, or round 0's hashes not in yet
        }
        let changed = self.scan(mem, None, SAMPLE_STRIDE)?;
        Ok(Some(changed * (SAMPLE_STRIDE * PAGE_SIZE) as u64))
    }

    fn stop(&mut self, _mem: &GuestMemory) {
        self.hashes = Vec::new();
    }
}
