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
#[derive(Debug, Default)]
pub struct HashTracker {
    hashes: Vec<Vec<u64>>,
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
        self.scan(mem, None)
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
