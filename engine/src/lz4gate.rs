//! When to spend CPU on lz4: the `auto` compression policy.
//!
//! Compression pays only when it moves page data faster: when the links,
//! not the CPUs, are the bottleneck and the pages shrink. Neither is known
//! in advance, and on one host both ends share the CPUs, so a stream queue
//! that backs up says little. So `auto` measures: it hands out page data
//! raw for a window and with lz4 for a window, and keeps whichever moved
//! more bytes of page data per second (lz4 must win by
//! [`MARGIN`]). It then holds that choice for [`HOLD`], twice as long after
//! every probe that confirms it (up to [`HOLD_MAX`]), and probes the other
//! again: content and links change during a long migration, and a short
//! one pays for one probe only. A window is
//! [`WINDOW_BYTES`] of page data and at least [`WINDOW_MIN`] long; a probe
//! of lz4 is half a window, so a wrong guess costs little. After the start
//! and after every change of mode, [`SETTLE_BYTES`] go unmeasured: the
//! queues and socket buffers take them at once, whatever the links do.
//!
//! The measure is the rate at which workers hand page data to the stream
//! queues, which block when the links are full: it counts reading, hashing,
//! compressing and the links' drain together, as a user sees them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::Compression;

/// Page data per measuring window.
pub const WINDOW_BYTES: u64 = 32 << 20;
/// The shortest window: shorter ones measure the scheduler more than the
/// links.
pub const WINDOW_MIN: Duration = Duration::from_millis(20);
/// How much faster lz4 must be to be chosen: compression costs both ends
/// CPU that a tie does not repay.
pub const MARGIN: f64 = 1.05;
/// How long a choice is held before the first probe of the other; every
/// probe that confirms it doubles the hold, up to [`HOLD_MAX`].
pub const HOLD: Duration = Duration::from_secs(2);
/// The longest hold.
pub const HOLD_MAX: Duration = Duration::from_secs(32);
/// Page data not measured after the start and after every change of mode:
/// what the stream queues and socket buffers of the links absorb at
/// once, which would flatter the first window of a mode.
pub const SETTLE_BYTES: u64 = 24 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// The first window: raw.
    MeasureRaw,
    /// The second: lz4; then the faster is chosen.
    MeasureLz4,
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
}

impl Lz4Policy {
    /// A policy for `mode`; `Off` and `On` are fixed.
    pub fn new(mode: Compression) -> Self {
        Self {
            mode,
            lz4: AtomicBool::new(mode == Compression::On),
            bytes: AtomicU64::new(0),
            settle: AtomicU64::new(SETTLE_BYTES),
            start: AtomicU64::new(0),
            t0: Instant::now(),
            explore: Mutex::new(Explore { phase: Phase::MeasureRaw, raw_rate: 0.0, lz4_rate: 0.0, hold: HOLD }),
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
        let window = if lz4 { WINDOW_BYTES / 2 } else { WINDOW_BYTES };
        let bytes = self.bytes.fetch_add(raw, Ordering::Relaxed) + raw;
        if bytes < window {
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
        if bytes < window {
            return; // closed by another worker meanwhile
        }
        self.start.store(now, Ordering::Relaxed);
        let rate = bytes as f64 / secs.as_secs_f64();
        let next = ex.step(lz4, rate, Duration::from_nanos(now));
        if next != lz4 {
            self.settle.store(SETTLE_BYTES, Ordering::Relaxed);
        }
        self.lz4.store(next, Ordering::Relaxed);
    }

    /// A pause in the flow (between rounds): the next window starts now,
    /// so idle time is not counted against whichever mode was measured.
    pub fn restart_window(&self) {
        self.bytes.store(0, Ordering::Relaxed);
        self.start.store(self.t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
}

impl Explore {
    /// A window sent with `lz4` moved `rate` bytes per second, ending at
    /// `now`; returns what to send with next.
    fn step(&mut self, lz4: bool, rate: f64, now: Duration) -> bool {
        if lz4 {
            self.lz4_rate = rate;
        } else {
            self.raw_rate = rate;
        }
        let faster = self.lz4_rate > self.raw_rate * MARGIN;
        let (phase, next) = match self.phase {
            Phase::MeasureRaw => (Phase::MeasureLz4, true),
            Phase::MeasureLz4 => (Phase::Hold { lz4: faster, until: now + self.hold }, faster),
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
        let mut ex = Explore { phase: Phase::MeasureRaw, raw_rate: 0.0, lz4_rate: 0.0, hold: HOLD };
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
        // probe; the probes come at 2 s, then 4 s later.
        let m = run(1000.0, 600.0, 100);
        assert_eq!(&m[..3], &[false, true, false]);
        assert_eq!(m.iter().filter(|&&l| l).count(), 3, "{m:?}");
        // A slow link and pages that shrink: lz4, after one raw window.
        let m = run(110.0, 200.0, 100);
        assert_eq!(&m[..3], &[false, true, true]);
        assert_eq!(m.iter().filter(|&&l| !l).count(), 3, "{m:?}");
        // A tie goes to raw: lz4 must win by the margin.
        let m = run(100.0, 103.0, 100);
        assert!(!m[2]);
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
            let p = Lz4Policy::new(mode);
            p.handed(1 << 30);
            assert_eq!(p.compress(), want);
        }
        let p = Lz4Policy::new(Compression::Auto);
        assert!(!p.compress(), "auto measures raw first");
    }
}
