//! Cutting the pages to send into shards and spreading them over workers.
//!
//! A round's dirty pages are cut into shards: aligned windows of
//! `shard_pages` pages (2 MiB by default, PMigrate's batch size) that hold at
//! least one dirty page. Each worker gets a contiguous block of shards (good
//! locality for the page cache and the range lock) in its own deque and, when
//! its deque runs dry, steals from the others, so one slow shard (a busy
//! stream, a page-faulting region) does not stall the whole round.

use std::sync::Arc;

use crossbeam_deque::{Steal, Stealer, Worker};

use crate::addr::{PageIdx, PageRange, RegionIdx};
use crate::bitmap::AtomicBitmap;

/// Default shard size in 4 KiB pages: 2 MiB.
pub const DEFAULT_SHARD_PAGES: u64 = 512;

/// The shards of `bitmaps` (one per region, in region order): every aligned
/// window of `shard_pages` pages that has a set bit. Reads the bitmaps
/// without clearing them.
pub fn plan_shards(bitmaps: &[AtomicBitmap], shard_pages: u64) -> Vec<PageRange> {
    assert!(shard_pages > 0 && shard_pages % 64 == 0, "shards are whole bitmap words");
    let words_per_shard = (shard_pages / 64) as usize;
    let mut shards = Vec::new();
    for (r, map) in bitmaps.iter().enumerate() {
        let region = RegionIdx(u32::try_from(r).expect("region count fits u32"));
        for (s, first_word) in (0..map.word_count()).step_by(words_per_shard).enumerate() {
            let last_word = (first_word + words_per_shard).min(map.word_count());
            if (first_word..last_word).any(|w| map.load_word(w) != 0) {
                let start = s as u64 * shard_pages;
                let end = (start + shard_pages).min(map.len());
                shards.push(PageRange { region, start: PageIdx(start), end: PageIdx(end) });
            }
        }
    }
    shards
}

/// One worker's handle on a round's shards: its own deque, and the others'
/// to steal from.
pub struct ShardWorker {
    own: Worker<PageRange>,
    others: Arc<[Stealer<PageRange>]>,
    index: usize,
}

impl std::fmt::Debug for ShardWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardWorker").field("index", &self.index).finish()
    }
}

/// Spreads `shards` over `workers` deques in contiguous blocks and returns a
/// handle per worker.
pub fn distribute(shards: Vec<PageRange>, workers: usize) -> Vec<ShardWorker> {
    distribute_late(shards, Vec::new(), workers)
}

/// Like [`distribute`], with the `late` shards dealt round robin at the
/// back of every worker's deque, so each worker takes them after all of its
/// others: the guest's working set goes last in a pre-copy round, when the
/// pages it is about to dirty again have had the least time to change.
pub fn distribute_late(shards: Vec<PageRange>, late: Vec<PageRange>, workers: usize) -> Vec<ShardWorker> {
    let workers = workers.max(1);
    let deques: Vec<Worker<PageRange>> = (0..workers).map(|_| Worker::new_fifo()).collect();
    let per = shards.len().div_ceil(workers).max(1);
    for (i, shard) in shards.into_iter().enumerate() {
        deques[i / per].push(shard);
    }
    for (i, shard) in late.into_iter().enumerate() {
        deques[i % workers].push(shard);
    }
    let stealers: Arc<[Stealer<PageRange>]> = deques.iter().map(|d| d.stealer()).collect();
    deques.into_iter().enumerate().map(|(index, own)| ShardWorker { own, others: stealers.clone(), index }).collect()
}

impl ShardWorker {
    /// The next shard: from this worker's own deque, else stolen from the
    /// others (starting with the next worker, so thieves spread out).
    pub fn next_shard(&self) -> Option<PageRange> {
        if let Some(s) = self.own.pop() {
            return Some(s);
        }
        let n = self.others.len();
        loop {
            let mut retry = false;
            for k in 1..n {
                match self.others[(self.index + k) % n].steal_batch_and_pop(&self.own) {
                    Steal::Success(s) => return Some(s),
                    Steal::Retry => retry = true,
                    Steal::Empty => {}
                }
            }
            if !retry {
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Mutex;

    #[test]
    fn shards_cover_exactly_the_dirty_windows() {
        let a = AtomicBitmap::new(2000);
        let b = AtomicBitmap::new(100);
        a.set(3);
        a.set(1500);
        a.set(1999);
        b.set(99);
        let s = plan_shards(&[a, b], 512);
        let got: Vec<_> = s.iter().map(|r| (r.region.0, r.start.0, r.end.0)).collect();
        assert_eq!(got, vec![(0, 0, 512), (0, 1024, 1536), (0, 1536, 2000), (1, 0, 100)]);
    }

    #[test]
    fn late_shards_come_after_every_other_shard_of_a_worker() {
        let r = |s: u64| PageRange { region: RegionIdx(0), start: PageIdx(s), end: PageIdx(s + 64) };
        let early: Vec<_> = (0..6).map(|i| r(i * 64)).collect();
        let late: Vec<_> = (6..10).map(|i| r(i * 64)).collect();
        for w in distribute_late(early, late, 2) {
            let mut seen_late = false;
            // No stealing: take from the worker's own deque only.
            while let Some(s) = w.own.pop() {
                let is_late = s.start.0 >= 6 * 64;
                assert!(is_late || !seen_late, "an early shard after a late one");
                seen_late |= is_late;
            }
            assert!(seen_late, "every worker got late shards");
        }
    }

    #[test]
    fn every_shard_is_taken_exactly_once_under_stealing() {
        let map = AtomicBitmap::new_full(64 * 1000);
        let shards = plan_shards(std::slice::from_ref(&map), 64);
        let total = shards.len();
        let seen = Mutex::new(HashSet::new());
        let counts = Mutex::new(vec![0usize; 4]);
        std::thread::scope(|s| {
            for (i, w) in distribute(shards, 4).into_iter().enumerate() {
                let (seen, counts) = (&seen, &counts);
                s.spawn(move || {
                    while let Some(r) = w.next_shard() {
                        assert!(seen.lock().unwrap().insert(r.start));
                        counts.lock().unwrap()[i] += 1;
                        if i == 0 {
                            // A slow worker: the others must steal its shards.
                            std::thread::sleep(std::time::Duration::from_millis(2));
                        }
                    }
                });
            }
        });
        assert_eq!(seen.lock().unwrap().len(), total);
        let counts = counts.lock().unwrap();
        assert!(counts[0] < total / 4, "the slow worker's block was stolen: {counts:?}");
    }
}
