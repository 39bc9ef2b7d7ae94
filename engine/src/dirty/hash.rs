//! Dirty tracking by comparing page hashes: no kernel help needed.

use pmigrate_ranges::{AtomicBitmap, GuestMemory, PageIdx, PAGE_SIZE};
use xxhash_rust::xxh3::xxh3_64;

use super::{check_shape, DirtyError, DirtyTracker};

/// Pages read per copy when hashing.
const CHUNK_PAGES: usize = 64;

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

    fn scan(&mut self, mem: &GuestMemory, out: Option<&[AtomicBitmap]>) -> Result<(), DirtyError> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        for (r, (idx, region)) in mem.iter().enumerate() {
            let hashes = &mut self.hashes[r];
            let per = hashes.len().div_ceil(threads).next_multiple_of(CHUNK_PAGES).max(CHUNK_PAGES);
            let out = out.map(|o| &o[idx.as_usize()]);
            std::thread::scope(|s| -> Result<(), DirtyError> {
                let mut handles = Vec::new();
                for (c, part) in hashes.chunks_mut(per).enumerate() {
                    handles.push(s.spawn(move || -> Result<(), DirtyError> {
                        let mut buf = vec![0u8; CHUNK_PAGES * PAGE_SIZE];
                        let base = (c * per) as u64;
                        for (k, block) in part.chunks_mut(CHUNK_PAGES).enumerate() {
                            let first = base + (k * CHUNK_PAGES) as u64;
                            let bytes = &mut buf[..block.len() * PAGE_SIZE];
                            region.read_pages(PageIdx(first), bytes)?;
                            for (i, (h, page)) in block.iter_mut().zip(bytes.chunks(PAGE_SIZE)).enumerate() {
                                let new = xxh3_64(page);
                                if *h != new {
                                    *h = new;
                                    if let Some(o) = out {
                                        o.set(first + i as u64);
                                    }
                                }
                            }
                        }
                        Ok(())
                    }));
                }
                handles.into_iter().try_for_each(|h| h.join().expect("hash worker panicked"))
            })?;
        }
        Ok(())
    }
}

impl DirtyTracker for HashTracker {
    fn name(&self) -> &'static str {
        "hash"
    }

    fn start(&mut self, mem: &GuestMemory) -> Result<(), DirtyError> {
        self.hashes = mem.regions().iter().map(|r| vec![0u64; r.pages() as usize]).collect();
        self.unread = None;
        self.scan(mem, None)
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
        self.scan(mem, Some(out))
    }

    fn stop(&mut self, _mem: &GuestMemory) {
        self.hashes = Vec::new();
    }
}
