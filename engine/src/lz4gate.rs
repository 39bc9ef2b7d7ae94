//! When to spend CPU on lz4: the `auto` compression policy.
//!
//! Compression pays only when the links, not the CPUs, are the bottleneck,
//! and only on pages that shrink. So `auto` compresses while the stream
//! queues are backed up (a worker found every queue full within its last
//! [`PRESSURE_BATCHES`] batches) and the recent batches shrank by at least
//! an eighth; after [`MISSES`] batches in a row that did not shrink, it
//! stops trying for [`SKIP_BATCHES`] batches, then probes again. Over
//! loopback or a fast NIC the queues never fill and no CPU goes to lz4; on
//! a 1 Gbit/s link they fill at once and typical guest memory travels at
//! twice the link rate.

use crate::Compression;

/// Batches compressed after the last time every stream queue was full.
pub const PRESSURE_BATCHES: u32 = 32;
/// Batches in a row that must fail to shrink before lz4 pauses.
pub const MISSES: u32 = 4;
/// Batches sent raw before lz4 is tried again.
pub const SKIP_BATCHES: u32 = 64;

/// One worker's lz4 decision.
#[derive(Debug)]
pub struct Lz4Gate {
    mode: Compression,
    misses: u32,
    skip: u32,
    pressure: u32,
}

impl Lz4Gate {
    /// A gate for `mode`.
    pub fn new(mode: Compression) -> Self {
        Self { mode, misses: 0, skip: 0, pressure: 0 }
    }

    /// Whether to compress the next batch.
    pub fn try_now(&mut self) -> bool {
        match self.mode {
            Compression::Off => false,
            Compression::On => true,
            Compression::Auto => {
                if self.pressure == 0 {
                    return false;
                }
                if self.skip > 0 {
                    self.skip -= 1;
                    return false;
                }
                true
            }
        }
    }

    /// Records how a compressed batch came out.
    pub fn record(&mut self, raw: usize, wire: usize) {
        if self.mode != Compression::Auto {
            return;
        }
        if wire * 8 > raw * 7 {
            self.misses += 1;
            if self.misses >= MISSES {
                self.misses = 0;
                self.skip = SKIP_BATCHES;
            }
        } else {
            self.misses = 0;
        }
    }

    /// Records whether handing out the last batch had to wait for a full
    /// queue.
    pub fn pressure(&mut self, waited: bool) {
        self.pressure = if waited { PRESSURE_BATCHES } else { self.pressure.saturating_sub(1) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_compresses_only_under_pressure_and_while_it_pays() {
        let mut g = Lz4Gate::new(Compression::Auto);
        assert!(!g.try_now(), "idle links: no lz4");
        g.pressure(true);
        assert!(g.try_now());
        for _ in 0..MISSES {
            g.record(100, 99);
        }
        assert!((0..SKIP_BATCHES).all(|_| !g.try_now()), "incompressible: paused");
        assert!(g.try_now(), "probes again");
        for _ in 0..PRESSURE_BATCHES {
            g.pressure(false);
        }
        assert!(!g.try_now(), "pressure gone: no lz4");
        let mut on = Lz4Gate::new(Compression::On);
        assert!(on.try_now());
        let mut off = Lz4Gate::new(Compression::Off);
        off.pressure(true);
        assert!(!off.try_now());
    }
}
