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

/// What a page of a batch is to this round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// The destination holds this very copy: nothing to send.
    Unchanged,
    /// The same, and the copy is all zero (as a fresh destination's memory
    /// is): nothing to send, but it may ride along with data.
    UnchangedZero,
    /// All zero: a `Zero` frame names it, whatever the run's length.
    Zero,
    /// Data: sent in a `Pages` frame.
    Data,
}

/// Zero runs of up to this many pages next to data ride in the data's
/// frame when it is compressed (lz4 makes each ~20 bytes), instead of
/// breaking it in two frames with a `Zero` frame between: a guest's
/// scattered free pages would otherwise cut its data into runs of a few
/// pages, each a frame of its own (a typical mix with a quarter of its
/// pages zero made frames of 4 pages on average: four times the frames,
/// and lz4 units too small to find much). The destination does not write
/// such a page where its memory is known zero.
const ZERO_ABSORB: usize = 8;

/// Marks the zero runs of `kinds` (to send or unchanged) that ride in a
/// compressed data frame: those of at most [`ZERO_ABSORB`] pages with
/// data on either side.
pub(super) fn absorb_zero_runs(kinds: &mut [Kind]) {
    let zero = |k: &Kind| matches!(k, Kind::Zero | Kind::UnchangedZero);
    let mut i = 0;
    while i < kinds.len() {
        if !zero(&kinds[i]) {
            i += 1;
            continue;
        }
        let j = kinds[i..].iter().position(|k| !zero(k)).map_or(kinds.len(), |d| i + d);
        let beside_data = (i > 0 && kinds[i - 1] == Kind::Data) || kinds.get(j) == Some(&Kind::Data);
        if j - i <= ZERO_ABSORB && beside_data {
            kinds[i..j].fill(Kind::Data);
        }
        i = j;
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
    /// What each page of the batch is to this round ([`Kind`]).
    pub(super) kinds: Vec<Kind>,
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

    /// Sends pages `[a, b)` of the batch in `self.pages` (already hashed),
    /// lz4-compressed if `lz4`; `whole` says they are the whole batch,
    /// `zeros` how many of them are zero pages riding along.
    fn emit_data(
        &mut self,
        region: u32,
        first: u64,
        (a, b): (usize, usize),
        whole: bool,
        lz4: bool,
        zeros: u64,
    ) -> Result<(), MigrateError> {
        let at = PagesAt { region, first, round: self.round };
        let n = (b - a) as u64;
        self.run.note_sent(region, first, &self.hashes[a..b], self.round);
        // Page data counts the pages that had to travel, not the zeros.
        self.counts.payload += (n - zeros) * PAGE_SIZE as u64;
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
                self.counts.compressed += n - zeros;
            } else {
                self.counts.raw += n - zeros;
            }
            Outgoing::Vec(frame)
        };
        self.send(frame, region, first, n)?;
        self.run.lz4.handed((n - zeros) as usize * PAGE_SIZE);
        Ok(())
    }

    /// Sends pages `[a, b)` of the batch, all zero (already hashed), as a
    /// `Zero` frame.
    fn emit_zero(&mut self, region: u32, first: u64, (a, b): (usize, usize)) -> Result<(), MigrateError> {
        let n = (b - a) as u64;
        let mut frame = self.buffer();
        build_zero_pages(&mut frame, region, first, n as u32, self.round);
        self.run.note_sent(region, first, &self.hashes[a..b], self.round);
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
            // Classify each page, then send each run of one kind as a frame.
            let lz4 = self.run.lz4.compress();
            self.hashes.clear();
            self.kinds.clear();
            for i in 0..n {
                let page = &self.pages[HEADER_LEN + i * PAGE_SIZE..HEADER_LEN + (i + 1) * PAGE_SIZE];
                let zero = is_zero_page(page);
                let h = if zero { zero_hash } else { xxh3_64(page) };
                self.hashes.push(h);
                let unchanged = !force && sent[(pos + i as u64) as usize].load(Ordering::Relaxed) == h;
                if zero {
                    self.counts.zero += 1;
                } else if unchanged {
                    self.counts.unchanged += 1;
                }
                self.kinds.push(match (unchanged, zero) {
                    (true, true) => Kind::UnchangedZero,
                    (true, false) => Kind::Unchanged,
                    (false, true) => Kind::Zero,
                    (false, false) => Kind::Data,
                });
            }
            if lz4 {
                absorb_zero_runs(&mut self.kinds);
            }
            let mut a = 0;
            while a < n {
                let kind = self.kinds[a];
                let b = self.kinds[a..].iter().position(|&k| k != kind).map_or(n, |d| a + d);
                let first = pos + a as u64;
                match kind {
                    Kind::Unchanged | Kind::UnchangedZero => {}
                    Kind::Zero => self.emit_zero(region, first, (a, b))?,
                    Kind::Data => {
                        let zeros = self.hashes[a..b].iter().filter(|&&h| h == zero_hash).count() as u64;
                        self.emit_data(region, first, (a, b), a == 0 && b == n, lz4, zeros)?;
                    }
                }
                a = b;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(s: &str) -> Vec<Kind> {
        s.chars()
            .map(|c| match c {
                'd' => Kind::Data,
                'z' => Kind::Zero,
                '0' => Kind::UnchangedZero,
                _ => Kind::Unchanged,
            })
            .collect()
    }

    fn absorbed(s: &str) -> String {
        let mut k = kinds(s);
        absorb_zero_runs(&mut k);
        k.iter()
            .map(|k| match k {
                Kind::Data => 'd',
                Kind::Zero => 'z',
                Kind::UnchangedZero => '0',
                Kind::Unchanged => 'u',
            })
            .collect()
    }

    /// Short zero runs beside data join it; long ones, and those with no
    /// data beside them, stay `Zero` frames; unchanged pages still break
    /// a run.
    #[test]
    fn short_zero_runs_beside_data_ride_in_its_frame() {
        assert_eq!(absorbed("dzdzzd"), "dddddd");
        assert_eq!(absorbed("zd"), "dd");
        assert_eq!(absorbed("dzzzzzzzz"), "ddddddddd", "eight zero pages at the end");
        assert_eq!(absorbed("dzzzzzzzzzd"), "dzzzzzzzzzd", "nine stay a zero frame");
        assert_eq!(absorbed("zzuzz"), "zzuzz", "no data beside them");
        assert_eq!(absorbed("duzud"), "duzud", "unchanged pages are not data");
        // Zero pages the destination holds already ride along as well.
        assert_eq!(absorbed("d0d00zd"), "ddddddd");
        assert_eq!(absorbed("00u00"), "00u00");
        assert_eq!(absorbed(""), "");
    }
}
