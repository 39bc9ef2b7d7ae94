//! Source workers: take shards, copy dirty pages out of guest memory, skip
//! what the destination already holds, and seal frames for the streams.

use std::sync::atomic::Ordering;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use pmigrate_ranges::{AtomicBitmap, PageIdx, PageRange, RegionIdx, ShardWorker, PAGE_SIZE};
use pmigrate_transport::backend::Outgoing;
use pmigrate_transport::frame::{Encoding, HEADER_LEN};
use pmigrate_transport::payload::{
    build_pages, build_zero_pages, is_zero_page, seal_raw_pages_in_place, zero_page_hash, PagesAt, Scratch,
};
use xxhash_rust::xxh3::xxh3_64;

use super::{Msg, Run};
use crate::MigrateError;

#[derive(Default)]
pub(super) struct Counts {
    pub(super) scanned: u64,
    pub(super) raw: u64,
    pub(super) compressed: u64,
    pub(super) zero: u64,
    pub(super) unchanged: u64,
    pub(super) wire: u64,
    pub(super) payload: u64,
}

impl Counts {
    pub(super) fn add(&mut self, o: &Counts) {
        self.scanned += o.scanned;
        self.raw += o.raw;
        self.compressed += o.compressed;
        self.zero += o.zero;
        self.unchanged += o.unchanged;
        self.wire += o.wire;
        self.payload += o.payload;
    }
}

pub(super) struct Worker<'w> {
    pub(super) run: &'w Run<'w>,
    pub(super) queues: &'w [Sender<Msg>],
    pub(super) home: usize,
    pub(super) round: u64,
    /// The batch being read: room for a header, then the pages. A whole
    /// raw batch is sealed and sent in place (in the zero-copy arena when
    /// there is one).
    pub(super) pages: Outgoing,
    pub(super) hashes: Vec<u64>,
    pub(super) scratch: Scratch,
    pub(super) counts: Counts,
    pub(super) pool: &'w Receiver<Vec<u8>>,
}

impl Worker<'_> {
    fn send(&mut self, frame: Outgoing, region: u32, first: u64, n: u64) -> Result<(), MigrateError> {
        self.counts.wire += frame.len() as u64;
        let pages = PageRange { region: RegionIdx(region), start: PageIdx(first), end: PageIdx(first + n) };
        let mut msg = Msg::Frame { frame, pages, round: self.round, sealed: Instant::now() };
        let n = self.queues.len();
        for k in 0..n {
            match self.queues[(self.home + k) % n].try_send(msg) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Full(m)) | Err(TrySendError::Disconnected(m)) => msg = m,
            }
        }
        // Every queue is full: the links are the bottleneck. Wait on our
        // own stream (backpressure).
        self.queues[self.home].send(msg).map_err(|_| MigrateError::Aborted)
    }

    fn buffer(&self) -> Vec<u8> {
        self.pool.try_recv().unwrap_or_default()
    }

    /// A batch buffer of `len` bytes: a free arena slot when the session
    /// sends zero-copy (its bytes are overwritten before they are sent),
    /// else a pooled vector.
    pub(super) fn batch_buffer(&self, len: usize) -> Outgoing {
        if let Some(mut b) = self.run.zero_copy.as_ref().and_then(|a| a.try_take()) {
            if b.resize_keeping(len).is_ok() {
                return Outgoing::Buf(b);
            }
        }
        let mut v = self.buffer();
        v.resize(len, 0);
        Outgoing::Vec(v)
    }

    /// Sends pages `[a, b)` of the batch in `self.pages` (already hashed);
    /// `whole` says they are the whole batch.
    fn emit_data(&mut self, region: u32, first: u64, a: usize, b: usize, whole: bool) -> Result<(), MigrateError> {
        if a == b {
            return Ok(());
        }
        let lz4 = self.run.lz4.compress();
        let at = PagesAt { region, first, round: self.round };
        let n = (b - a) as u64;
        self.run.note_sent(region, first, &self.hashes[a..b], self.round);
        self.counts.payload += n * PAGE_SIZE as u64;
        let frame = if whole && !lz4 {
            // The pages already sit behind room for a header: seal the batch
            // buffer itself and send it, no copy.
            let end = HEADER_LEN + b * PAGE_SIZE;
            seal_raw_pages_in_place(&mut self.pages[..end], &mut self.scratch, at, &self.hashes[a..b]);
            let next = self.batch_buffer(self.pages.len());
            let mut frame = std::mem::replace(&mut self.pages, next);
            frame.truncate(end);
            self.counts.raw += n;
            frame
        } else {
            let bytes = &self.pages[HEADER_LEN + a * PAGE_SIZE..HEADER_LEN + b * PAGE_SIZE];
            let mut frame = self.buffer();
            let enc = build_pages(&mut frame, &mut self.scratch, at, bytes, &self.hashes[a..b], lz4);
            if enc == Encoding::Lz4 {
                self.counts.compressed += n;
            } else {
                self.counts.raw += n;
            }
            Outgoing::Vec(frame)
        };
        self.send(frame, region, first, n)?;
        self.run.lz4.handed((b - a) * PAGE_SIZE);
        Ok(())
    }

    fn emit_zero(&mut self, region: u32, first: u64, n: u64) -> Result<(), MigrateError> {
        if n == 0 {
            return Ok(());
        }
        let mut frame = self.buffer();
        build_zero_pages(&mut frame, region, first, n as u32, self.round);
        let zeros = vec![zero_page_hash(); n as usize];
        self.run.note_sent(region, first, &zeros, self.round);
        self.send(Outgoing::Vec(frame), region, first, n)
    }

    /// Processes a run of dirty pages `[start, start + len)` of a region.
    fn run_pages(&mut self, region: u32, start: u64, len: u64) -> Result<(), MigrateError> {
        let mem_region = &self.run.mem.regions()[region as usize];
        let sent = &self.run.sent[region as usize];
        let zero_hash = zero_page_hash();
        let force = self.run.force[region as usize].load(Ordering::Relaxed);
        let batch = self.cfg_batch();
        let mut pos = start;
        while pos < start + len {
            if self.run.abort.load(Ordering::Relaxed) {
                return Err(MigrateError::Aborted);
            }
            let n = (start + len - pos).min(batch as u64) as usize;
            mem_region.read_pages(PageIdx(pos), &mut self.pages[HEADER_LEN..HEADER_LEN + n * PAGE_SIZE])?;
            // Classify each page; data pages are compacted to the front of
            // the hashes/pages buffers in runs, flushed when a run breaks.
            self.hashes.clear();
            let mut data_from: Option<usize> = None; // start of current data run (index in batch)
            let mut zero_from: Option<usize> = None;
            for i in 0..n {
                let page = &self.pages[HEADER_LEN + i * PAGE_SIZE..HEADER_LEN + (i + 1) * PAGE_SIZE];
                let zero = is_zero_page(page);
                let h = if zero { zero_hash } else { xxh3_64(page) };
                self.hashes.push(h);
                let unchanged = !force && sent[(pos + i as u64) as usize].load(Ordering::Relaxed) == h;
                let kind = if unchanged {
                    0
                } else if zero {
                    1
                } else {
                    2
                };
                if unchanged {
                    if zero {
                        self.counts.zero += 1;
                    } else {
                        self.counts.unchanged += 1;
                    }
                } else if zero {
                    self.counts.zero += 1;
                }
                if kind != 2 {
                    if let Some(a) = data_from.take() {
                        self.emit_data(region, pos + a as u64, a, i, false)?;
                    }
                }
                if kind != 1 {
                    if let Some(a) = zero_from.take() {
                        self.emit_zero(region, pos + a as u64, (i - a) as u64)?;
                    }
                }
                match kind {
                    2 if data_from.is_none() => data_from = Some(i),
                    1 if zero_from.is_none() => zero_from = Some(i),
                    _ => {}
                }
            }
            if let Some(a) = data_from {
                self.emit_data(region, pos + a as u64, a, n, a == 0)?;
            }
            if let Some(a) = zero_from {
                self.emit_zero(region, pos + a as u64, (n - a) as u64)?;
            }
            self.counts.scanned += n as u64;
            self.run.progress.done_pages.fetch_add(n as u64, Ordering::Relaxed);
            pos += n as u64;
        }
        Ok(())
    }

    fn cfg_batch(&self) -> usize {
        self.run.cfg.batch_pages.clamp(1, pmigrate_transport::frame::MAX_FRAME_PAGES as usize)
    }

    pub(super) fn work(&mut self, shards: ShardWorker, dirty: &[AtomicBitmap]) -> Result<(), MigrateError> {
        while let Some(shard) = shards.next_shard() {
            let map = &dirty[shard.region.as_usize()];
            // Shards are whole bitmap words (shard_pages is a multiple of 64).
            let (w0, w1) = ((shard.start.0 / 64) as usize, shard.end.0.div_ceil(64) as usize);
            let mut run: Option<(u64, u64)> = None;
            for w in w0..w1 {
                let mut bits = map.take_word(w);
                let base = w as u64 * 64;
                // Walk the word's set bits as runs.
                let mut off = 0u64;
                while bits != 0 {
                    let skip = u64::from(bits.trailing_zeros());
                    bits >>= skip;
                    off += skip;
                    let ones = u64::from(bits.trailing_ones());
                    let (s, n) = (base + off, ones);
                    run = match run {
                        Some((rs, rn)) if rs + rn == s => Some((rs, rn + n)),
                        Some((rs, rn)) => {
                            self.run_pages(shard.region.0, rs, rn)?;
                            Some((s, n))
                        }
                        None => Some((s, n)),
                    };
                    bits = if ones == 64 { 0 } else { bits >> ones };
                    off += ones;
                }
            }
            if let Some((rs, rn)) = run {
                self.run_pages(shard.region.0, rs, rn)?;
            }
        }
        Ok(())
    }
}
