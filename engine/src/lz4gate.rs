//! When to spend CPU on lz4: the `auto` compression policy.
//!
//! Compression pays only when it moves page data faster: when the links,
//! not the CPUs, are the bottleneck and the pages shrink. Neither is known
//! in advance, and on one host both ends share the CPUs, so a stream queue
//! that backs up says little. So `auto` measures: it hands out page data
//! raw for [`RAW_WINDOWS`] window and with lz4 for one (two when the
//! first comes within [`CLOSE`] of raw), and keeps
//! whichever moved more page data per second (lz4 must win by
//! [`MARGIN`]). It holds that choice for [`HOLD`], twice as long after
//! every probe that confirms it (up to [`HOLD_MAX`]), then probes the
//! other: content and links change during a long migration, and a short
//! one pays for one probe only.
//!
//! A window is [`WINDOW_BYTES`] of page data and at least [`WINDOW_MIN`]
//! long. After the start and after every change of mode,
//! [`SETTLE_PER_STREAM`] a stream go unmeasured: the queues and socket buffers take them at once,
//! whatever the links do. Where the host's CPUs were busy through a raw
//! window (under [`IDLE_FOR_LZ4`] idle), lz4 is not tried: it can only
//! take CPU from the pipeline.
//!
//! The measure is the rate at which workers hand page data to the stream
//! queues, which block when the links are full: it counts reading, hashing,
//! compressing and the links' drain together, as a user sees them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::Compression;

/// Page data per measuring window.
pub const WINDOW_BYTES: u64 = 16 << 20;
/// The shortest window: shorter ones measure the scheduler more than the
/// links.
pub const WINDOW_MIN: Duration = Duration::from_millis(50);
/// The share of the host's CPU time that must have been idle during a raw
/// window for lz4 to be tried: compressing takes CPU, so when the CPUs are
/// the limit (both ends on one host, or a busy host) it cannot help.
pub const IDLE_FOR_LZ4: f64 = 0.2;
/// How much faster lz4 must be to be chosen: compression costs both ends
/// CPU that a tie does not repay.
pub const MARGIN: f64 = 1.05;
/// How close the first lz4 window's rate must be to the raw one's (either
/// way) for a second lz4 window to be measured before the choice.
pub const CLOSE: f64 = 0.2;
/// How long a choice is held before the first probe of the other; every
/// probe that confirms it doubles the hold, up to [`HOLD_MAX`].
pub const HOLD: Duration = Duration::from_secs(4);
/// Raw windows measured at the start, the last counting. One: the settle
/// before it ([`SETTLE_PER_STREAM`]) already lets the queues and socket
/// buffers fill, and on a slow link where lz4 wins every raw window costs
/// its 16 MiB at the raw rate (a second one made `auto` 1.07× `lz4` over
/// one 1 Gbit/s link with text, against 1.05× with one).
pub const RAW_WINDOWS: u32 = 1;
/// The longest hold.
pub const HOLD_MAX: Duration = Duration::from_secs(32);
/// Page data not measured after the start and after every change of mode,
/// per stream (at least [`SETTLE_BYTES`] in all): what a stream's queue
/// and both ends' socket buffers (4 MiB asked each, which the kernel
/// doubles) absorb at once, which would flatter the first window of a
/// mode.
pub const SETTLE_PER_STREAM: u64 = 16 << 20;
/// The least page data not measured after the start and every change.
pub const SETTLE_BYTES: u64 = 16 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// The first windows: raw, `left` more of them; the last counts.
    MeasureRaw { left: u32 },
    /// Then one with lz4, and the faster is chosen; when the two are
    /// close (within [`CLOSE`]), a second lz4 window first, the better of
    /// the two counting: one window can lose by noise.
    MeasureLz4 { second: bool },
    /// Sending with the choice until `until` (since the policy began);
    /// then one window of the other kind, and the faster is chosen again.
    Hold { lz4: bool, until: Duration },
    /// One window of the other kind than `lz4`, the choice.
    Probe { lz4: bool },
}

#[derive(Debug)]
struct Explore {
    phase: Phase,
    /// Bytes per second of the last window of each kind.
    raw_rate: f64,
    lz4_rate: f64,
    /// The hold after the next decision.
    hold: Duration,
}

/// The `auto` policy of one session, shared by its workers.
#[derive(Debug)]
pub struct Lz4Policy {
    mode: Compression,
    /// What workers do now.
    lz4: AtomicBool,
    /// Page data handed out in this window.
    bytes: AtomicU64,
    /// Page data still to hand out before this window counts.
    settle: AtomicU64,
    /// When this window started, in nanoseconds since `t0`.
    start: AtomicU64,
    t0: Instant,
    explore: Mutex<Explore>,
    /// The host's CPU counters at the start of this window.
    cpu: Mutex<Option<CpuTimes>>,
    /// Page data left unmeasured after a change of mode.
    settle_bytes: u64,
}

/// The host's CPU time, busy and idle, in clock ticks since boot.
#[derive(Clone, Copy, Debug)]
struct CpuTimes {
    busy: u64,
    idle: u64,
}

impl CpuTimes {
    /// From the first line of /proc/stat; `None` where there is none.
    fn now() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let v: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
        // user nice system idle iowait irq softirq steal
        let idle = v.get(3)? + v.get(4).unwrap_or(&0);
        let busy = v.iter().take(8).sum::<u64>() - idle;
        Some(CpuTimes { busy, idle })
    }

    /// The share of CPU time idle since `then`.
    fn idle_since(self, then: CpuTimes) -> Option<f64> {
        let (busy, idle) = (self.busy.checked_sub(then.busy)?, self.idle.checked_sub(then.idle)?);
        (busy + idle > 0).then(|| idle as f64 / (busy + idle) as f64)
    }
}

impl Lz4Policy {
    /// A policy for `mode` over `streams` streams; `Off` and `On` are
    /// fixed.
    pub fn for_streams(mode: Compression, streams: usize) -> Self {
        let settle_bytes = SETTLE_BYTES.max(SETTLE_PER_STREAM * streams as u64);
        Self {
            settle_bytes,
            mode,
            lz4: AtomicBool::new(mode == Compression::On),
            bytes: AtomicU64::new(0),
            settle: AtomicU64::new(settle_bytes),
            start: AtomicU64::new(0),
            t0: Instant::now(),
            explore: Mutex::new(Explore {
                phase: Phase::MeasureRaw { left: RAW_WINDOWS },
                raw_rate: 0.0,
                lz4_rate: 0.0,
                hold: HOLD,
            }),
            cpu: Mutex::new(None),
        }
    }

    /// Whether to compress the next batch.
    pub fn compress(&self) -> bool {
        self.lz4.load(Ordering::Relaxed)
    }

    /// `raw` bytes of page data were handed to a stream queue.
    pub fn handed(&self, raw: usize) {
        if self.mode != Compression::Auto {
            return;
        }
        let lz4 = self.compress();
        let raw = raw as u64;
        let settling =
            self.settle.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| (s > 0).then(|| s.saturating_sub(raw)));
        match settling {
            Ok(left) if left > raw => return,
            // Settled: the window starts now.
            Ok(_) => return self.restart_window(),
            Err(_) => {}
        }
        let bytes = self.bytes.fetch_add(raw, Ordering::Relaxed) + raw;
        if bytes < WINDOW_BYTES {
            return;
        }
        let now = self.t0.elapsed().as_nanos() as u64;
        let secs = Duration::from_nanos(now.saturating_sub(self.start.load(Ordering::Relaxed)));
        if secs < WINDOW_MIN {
            return;
        }
        // One worker closes the window; the others go on counting into
        // the next.
        let Ok(mut ex) = self.explore.try_lock() else { return };
        let bytes = self.bytes.swap(0, Ordering::Relaxed);
        if bytes < WINDOW_BYTES {
            return; // closed by another worker meanwhile
        }
        self.start.store(now, Ordering::Relaxed);
        let rate = bytes as f64 / secs.as_secs_f64();
        let idle = self.window_idle();
        let cpu_bound = !lz4 && idle.is_some_and(|i| i < IDLE_FOR_LZ4);
        let next = if cpu_bound {
            // The CPUs are the limit: lz4 would only slow things down.
            ex.cpu_bound(Duration::from_nanos(now))
        } else {
            ex.step(lz4, rate, Duration::from_nanos(now))
        };
        tracing::debug!(
            window = if lz4 { "lz4" } else { "raw" },
            mib_per_s = (rate / f64::from(1 << 20)).round(),
            idle = idle.map(|i| (i * 100.0).round()),
            cpu_bound,
            next = if next { "lz4" } else { "raw" },
            "lz4 auto: window measured"
        );
        if next != lz4 {
            self.settle.store(self.settle_bytes, Ordering::Relaxed);
        }
        self.lz4.store(next, Ordering::Relaxed);
    }

    /// A pause in the flow (between rounds): the next window starts now,
    /// so idle time is not counted against whichever mode was measured.
    pub fn restart_window(&self) {
        self.bytes.store(0, Ordering::Relaxed);
        self.start.store(self.t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if self.mode == Compression::Auto {
            *self.cpu.lock().expect("cpu lock") = CpuTimes::now();
        }
    }

    /// The share of the host's CPU time idle during the window that just
    /// ended; the next one starts counting.
    fn window_idle(&self) -> Option<f64> {
        let now = CpuTimes::now()?;
        let then = self.cpu.lock().expect("cpu lock").replace(now)?;
        now.idle_since(then)
    }
}

impl Explore {
    /// A raw window during which the CPUs were busy: raw it stays, and
    /// lz4 is measured again only once there is room for it.
    fn cpu_bound(&mut self, now: Duration) -> bool {
        self.phase = match self.phase {
            Phase::Hold { lz4: false, until } => Phase::Hold { lz4: false, until },
            _ => Phase::Hold { lz4: false, until: now },
        };
        false
    }

    /// A window sent with `lz4` moved `rate` bytes per second, ending at
    /// `now`; returns what to send with next.
    fn step(&mut self, lz4: bool, rate: f64, now: Duration) -> bool {
        // The latest window of each kind counts: an earlier one may still
        // have filled buffers (flattering) or met a cold start (not).
        if lz4 && matches!(self.phase, Phase::MeasureLz4 { second: true }) {
            self.lz4_rate = self.lz4_rate.max(rate);
        } else if lz4 {
            self.lz4_rate = rate;
        } else {
            self.raw_rate = rate;
        }
        let faster = self.lz4_rate > self.raw_rate * MARGIN;
        let close = (self.lz4_rate / self.raw_rate.max(f64::MIN_POSITIVE) - 1.0).abs() < CLOSE;
        let (phase, next) = match self.phase {
            Phase::MeasureRaw { left } if left > 1 => (Phase::MeasureRaw { left: left - 1 }, false),
            Phase::MeasureRaw { .. } => (Phase::MeasureLz4 { second: false }, true),
            Phase::MeasureLz4 { second: false } if close => (Phase::MeasureLz4 { second: true }, true),
            Phase::MeasureLz4 { .. } => (Phase::Hold { lz4: faster, until: now + self.hold }, faster),
            Phase::Hold { lz4: held, until } if now < until => (Phase::Hold { lz4: held, until }, held),
            Phase::Hold { lz4: held, .. } => (Phase::Probe { lz4: held }, !held),
            Phase::Probe { lz4: held } => {
                // A confirmed choice is probed half as often from now on.
                self.hold = if faster == held { (self.hold * 2).min(HOLD_MAX) } else { HOLD };
                (Phase::Hold { lz4: faster, until: now + self.hold }, faster)
            }
        };
        self.phase = phase;
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives the exploration with a fixed rate per mode, a window every
    /// 100 ms; returns the modes of `n` windows.
    fn run(raw: f64, lz4: f64, n: usize) -> Vec<bool> {
        let mut ex =
            Explore { phase: Phase::MeasureRaw { left: RAW_WINDOWS }, raw_rate: 0.0, lz4_rate: 0.0, hold: HOLD };
        let mut now = false;
        let mut modes = Vec::new();
        for i in 0..n {
            modes.push(now);
            now = ex.step(now, if now { lz4 } else { raw }, Duration::from_millis(100 * (i as u64 + 1)));
        }
        modes
    }

    #[test]
    fn auto_keeps_whichever_moves_page_data_faster() {
        // The CPU is the limit (both ends on one host): raw, after one
        // probe; over 10 s one more probe, after the 4 s hold (the next
        // would come 8 s later).
        let m = run(1000.0, 600.0, 100);
        assert_eq!(&m[..4], &[false, true, false, false]);
        assert_eq!(m.iter().filter(|&&l| l).count(), 2, "{m:?}");
        // A slow link and pages that shrink: lz4, after one raw window;
        // over 10 s one raw probe.
        let m = run(110.0, 200.0, 100);
        assert_eq!(&m[..4], &[false, true, true, true]);
        assert_eq!(m.iter().filter(|&&l| !l).count(), 2, "{m:?}");
        // A tie goes to raw: lz4 must win by the margin, over two lz4
        // windows since the first was close.
        let m = run(100.0, 103.0, 100);
        assert_eq!(&m[..5], &[false, true, true, false, false]);
    }

    #[test]
    fn a_probe_that_wins_changes_the_choice() {
        let mut ex = Explore {
            phase: Phase::Hold { lz4: false, until: Duration::from_secs(1) },
            raw_rate: 100.0,
            lz4_rate: 0.0,
            hold: HOLD * 4,
        };
        assert!(!ex.step(false, 100.0, Duration::from_millis(900)), "held");
        assert!(ex.step(false, 100.0, Duration::from_secs(1)), "the hold ends: probe lz4");
        assert!(ex.step(true, 300.0, Duration::from_millis(1100)), "lz4 won the probe");
        let until = Duration::from_millis(1100) + HOLD;
        assert_eq!(ex.phase, Phase::Hold { lz4: true, until }, "a new choice: the first hold again");
    }

    #[test]
    fn fixed_modes_never_change() {
        for (mode, want) in [(Compression::On, true), (Compression::Off, false)] {
            let p = Lz4Policy::for_streams(mode, 1);
            p.handed(1 << 30);
            assert_eq!(p.compress(), want);
        }
        let p = Lz4Policy::for_streams(Compression::Auto, 4);
        assert!(!p.compress(), "auto measures raw first");
    }
}
