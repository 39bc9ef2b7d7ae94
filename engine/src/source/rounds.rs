//! The rounds of a migration: round 0 sends every page, later rounds the
//! pages dirtied meanwhile, until what is left fits the downtime target or
//! the round cap is hit; then the guest pauses and the final round goes
//! (or, in post-copy, the switchover and the push of what is left).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use pmigrate_ranges::{distribute_late, plan_shards, AtomicBitmap, PageRange, PAGE_SIZE};
use pmigrate_transport::backend::Outgoing;
use pmigrate_transport::frame::HEADER_LEN;
use pmigrate_transport::message::Digest;
use pmigrate_transport::payload::Scratch;

use super::streams::Msg;
use super::worker::{Counts, Worker};
use super::{PauseHook, Run};
use crate::dirty::DirtyTracker;
use crate::report::{Report, RoundReport};
use crate::MigrateError;

/// How long the streams may take to write out the last round before the
/// pause ([`Run::drain`]).
const DRAIN_LIMIT: Duration = Duration::from_secs(2);

/// Bytes a stream's socket may still hold and count as drained: a few
/// segments in flight on any path.
const DRAINED: usize = 256 << 10;

impl Run<'_> {
    /// Sends the pages marked in `dirty` as round `round` over `txs`; the
    /// guest's working set goes last, or first with `ws_first`.
    fn one_round(
        &self,
        round: u64,
        dirty: &[AtomicBitmap],
        txs: &[Sender<Msg>],
        pool: &Receiver<Vec<u8>>,
        ws_first: bool,
    ) -> Result<Counts, MigrateError> {
        let shards = plan_shards(dirty, self.cfg.shard_pages);
        self.lz4.restart_window();
        self.progress.round.store(round, Ordering::Relaxed);
        self.progress.round_pages.store(dirty.iter().map(|d| d.count()).sum(), Ordering::Relaxed);
        self.progress.done_pages.store(0, Ordering::Relaxed);
        let (ws, rest): (Vec<PageRange>, Vec<PageRange>) =
            shards.into_iter().partition(|s| self.working_set.iter().any(|w| overlaps(w, s)));
        let workers = if ws_first {
            distribute_late(ws, rest, self.cfg.threads)
        } else {
            distribute_late(rest, ws, self.cfg.threads)
        };
        let batch = self.cfg.batch_pages.clamp(1, pmigrate_transport::frame::MAX_FRAME_PAGES as usize);
        let results: Vec<Result<Counts, MigrateError>> = std::thread::scope(|s| {
            let handles: Vec<_> = workers
                .into_iter()
                .enumerate()
                .map(|(i, shards)| {
                    s.spawn(move || {
                        let mut w = Worker {
                            run: self,
                            queues: txs,
                            home: i % txs.len(),
                            round,
                            pages: Outgoing::Vec(Vec::new()),
                            hashes: Vec::with_capacity(batch),
                            kinds: Vec::with_capacity(batch),
                            scratch: Scratch::default(),
                            counts: Counts::default(),
                            pool,
                        };
                        w.pages = w.batch_buffer(HEADER_LEN + batch * PAGE_SIZE);
                        let r = w.work(shards, dirty);
                        if r.is_err() {
                            self.abort.store(true, Ordering::Relaxed);
                        }
                        r.map(|()| w.counts)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("worker panicked")).collect()
        });
        let mut total = Counts::default();
        for r in results {
            total.add(&r?);
        }
        Ok(total)
    }

    fn end_round(&self, txs: &[Sender<Msg>], round: u64, last: bool) -> Result<(), MigrateError> {
        for tx in txs {
            tx.send(Msg::RoundEnd { round, last }).map_err(|_| MigrateError::Aborted)?;
        }
        Ok(())
    }

    /// Before the pause, while the guest still runs, lets the streams
    /// write out what the last round handed them: their queues and their
    /// sockets' buffers (up to 8 MiB a stream, which the kernel may hold
    /// whole on a fast path) would otherwise cross the link during the
    /// downtime. Pages the guest writes meanwhile go in the final round, as
    /// any would. At most [`DRAIN_LIMIT`]; a stream that does not drain
    /// (a slow or lost link) costs downtime, as before, not a failure.
    fn drain(&self, txs: &[Sender<Msg>], unsent: &dyn Fn() -> usize) {
        let t = Instant::now();
        while t.elapsed() < DRAIN_LIMIT && !self.abort.load(Ordering::Relaxed) {
            if txs.iter().all(Sender::is_empty) && unsent() <= DRAINED * txs.len() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        tracing::debug!(secs = t.elapsed().as_secs_f64(), "streams drained before the pause");
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn rounds(
        &self,
        txs: &[Sender<Msg>],
        bulk: usize,
        pool: &Receiver<Vec<u8>>,
        probes: &Receiver<Vec<u64>>,
        verdict: &Receiver<Result<Digest, MigrateError>>,
        tracker: &mut dyn DirtyTracker,
        mut pause: Option<PauseHook<'_>>,
        unsent: &dyn Fn() -> usize,
        report: &mut Report,
    ) -> Result<(Instant, Vec<bool>), MigrateError> {
        let mut shared = self.prove_content(txs, probes, verdict, report)?;
        let dirty: Vec<AtomicBitmap> = self.mem.regions().iter().map(|r| AtomicBitmap::new_full(r.pages())).collect();
        let mask = |dirty: &[AtomicBitmap], shared: &[bool]| {
            for (d, _) in dirty.iter().zip(shared).filter(|(_, s)| **s) {
                d.clear_all();
            }
        };
        mask(&dirty, &shared);
        // Pages round 0 will not read: those the guest reported free.
        let unread: Vec<AtomicBitmap> = self.mem.regions().iter().map(|r| AtomicBitmap::new(r.pages())).collect();
        let mut hinted = 0u64;
        for r in &self.free {
            let map = &dirty[r.region.as_usize()];
            for (first, n) in map.runs(r.start.0, r.end.0) {
                hinted += n;
                unread[r.region.as_usize()].set_range(first, n);
            }
            map.clear_range(r.start.0, r.len());
        }
        // A tracker that keeps hashes takes round 0's as its baseline
        // (`seed`, below) rather than reading all memory first.
        let mut seed = tracker.start_seeded(self.mem, &unread)?;
        // Bytes of page data per second through the whole pipeline, from
        // the rounds that moved enough to measure.
        let mut rate: Option<f64> = None;
        let mut round = 0u64;
        let mut converged = false;
        let precopy_rounds = self.cfg.postcopy.map_or(u64::MAX, u64::from);
        while round < precopy_rounds {
            let t = Instant::now();
            let c = self.one_round(round, &dirty, &txs[..bulk], pool, false)?;
            self.force.iter().for_each(|f| f.store(false, Ordering::Relaxed));
            self.end_round(txs, round, false)?;
            let secs = t.elapsed().as_secs_f64();
            report.rounds.push(round_report(round, false, &c, secs));
            round += 1;
            let moved = c.scanned * PAGE_SIZE as u64;
            if moved >= 4 << 20 && secs > 0.0 {
                let r = moved as f64 / secs;
                rate = Some(rate.map_or(r, |old| 0.5 * old + 0.5 * r));
            }
            let scan = Instant::now();
            if std::mem::take(&mut seed) {
                tracker.seed(&self.sent.iter().map(|t| &t[..]).collect::<Vec<_>>());
            }
            // A tracker that reads all memory to collect can first look at
            // a sample. If even a generous reading of it (twice the
            // estimate) fits the downtime target, this is the last round:
            // the final collect, the guest paused, finds every page written
            // whatever the sample saw, and a full pass is saved. A sample
            // that misses a scattered working set costs downtime, never a
            // page.
            if let (Some(r), Some(sampled)) = (rate, tracker.sample(self.mem)?) {
                let estimate = sampled as f64 / r;
                if 2.0 * estimate <= self.cfg.downtime_target.as_secs_f64() {
                    tracing::debug!(
                        round = round - 1,
                        secs,
                        scan_secs = scan.elapsed().as_secs_f64(),
                        sampled_mib = sampled >> 20,
                        estimate_secs = estimate,
                        "round handed to the streams; a sample of memory says the rest fits the downtime"
                    );
                    converged = true;
                    break;
                }
            }
            tracker.collect(self.mem, &dirty)?;
            mask(&dirty, &shared);
            let left: u64 = dirty.iter().map(|d| d.count()).sum::<u64>() * PAGE_SIZE as u64;
            let estimate = rate.map_or(if left == 0 { 0.0 } else { f64::INFINITY }, |r| left as f64 / r);
            tracing::debug!(
                round = round - 1,
                secs,
                scan_secs = scan.elapsed().as_secs_f64(),
                dirty_mib = left >> 20,
                estimate_secs = estimate,
                "round handed to the streams; dirty pages collected"
            );
            if estimate <= self.cfg.downtime_target.as_secs_f64() {
                converged = true;
                break;
            }
            if round >= u64::from(self.cfg.max_rounds.max(1)) {
                break;
            }
        }
        report.converged = converged;
        self.drain(&txs[..bulk], unsent);
        if let Some(p) = pause.as_mut() {
            p().map_err(MigrateError::Pause)?;
        }
        let t_pause = Instant::now();
        self.progress.paused.store(true, Ordering::Relaxed);
        tracker.collect(self.mem, &dirty)?;
        mask(&dirty, &shared);
        self.prove_identity(txs, probes, verdict, &mut shared, &dirty, report)?;
        let _ = self.shared.set(shared.clone());
        if self.cfg.postcopy.is_some() {
            self.switch_over(txs, round, &dirty)?;
            report.postcopy = Some(crate::postcopy::PostcopyReport {
                precopy_rounds: round as u32,
                needed_pages: dirty.iter().map(|d| d.count()).sum(),
                ..Default::default()
            });
            // Every page the destination lacks goes, whatever it held before.
            self.force.iter().for_each(|f| f.store(true, Ordering::Relaxed));
        }
        let c = self.one_round(round, &dirty, &txs[..bulk], pool, self.cfg.postcopy.is_some())?;
        self.end_round(&txs[..bulk], round, true)?;
        report.rounds.push(round_report(round, true, &c, t_pause.elapsed().as_secs_f64()));
        tracing::debug!(round, secs = t_pause.elapsed().as_secs_f64(), "final round handed to the streams");
        report.rounds[0].hinted_free = hinted;
        if let Some(p) = report.postcopy.as_mut() {
            p.pushed_pages = c.scanned;
        }
        Ok((t_pause, shared))
    }
}

fn overlaps(a: &PageRange, b: &PageRange) -> bool {
    a.region == b.region && a.start < b.end && b.start < a.end
}

fn round_report(round: u64, paused: bool, c: &Counts, secs: f64) -> RoundReport {
    RoundReport {
        round: round as u32,
        paused,
        scanned: c.scanned,
        raw: c.raw,
        compressed: c.compressed,
        zero: c.zero,
        unchanged: c.unchanged,
        wire_bytes: c.wire,
        payload_bytes: c.payload,
        secs,
        hinted_free: 0,
    }
}
