//! The matrix's coordinates: a cell is a path (how the VM or the stream
//! travels) and a fault; a run is a cell, a seed and a memory size; a plan
//! is what the seed makes of the fault (where it strikes, for how long).

use std::fmt;
use std::time::Duration;

use rand::{Rng, SeedableRng};

/// How the data travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Path {
    /// `serve` / `migrate`, pre-copy.
    Pre,
    /// `serve` / `migrate --postcopy 0`.
    Post,
    /// `serve` / `migrate --postcopy 1`: one pre-copy round, then post-copy.
    Hybrid,
    /// [`Path::Hybrid`] with a guest that writes its memory until the
    /// pause: pages dirtied after the pre-copy round must arrive by
    /// post-copy.
    HybridDirty,
    /// `send` / `recv` carrying a byte stream (QEMU's `exec:`).
    Exec,
    /// `proxy entry` / `proxy exit` carrying a TCP connection.
    Proxy,
}

/// What goes wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    /// The userspace netem link: delay, jitter, loss, reordering,
    /// duplication, corruption.
    Netem,
    /// The connection crossing a seeded byte offset is reset.
    Cut,
    /// SIGSTOP of the source end at a seeded offset, SIGCONT later.
    StopSrc,
    /// SIGSTOP of the destination end, SIGCONT later.
    StopDst,
    /// SIGKILL of the source end at a seeded offset.
    KillSrc,
    /// SIGKILL of the destination end at a seeded offset.
    KillDst,
    /// The destination's memory file on a tmpfs smaller than the memory.
    DiskFull,
    /// The destination's `--resume-cmd` fails: its guest cannot start.
    ResumeFails,
}

impl Path {
    pub const ALL: [Path; 6] = [Path::Pre, Path::Post, Path::Hybrid, Path::HybridDirty, Path::Exec, Path::Proxy];

    pub fn name(self) -> &'static str {
        match self {
            Path::Pre => "pre",
            Path::Post => "post",
            Path::Hybrid => "hybrid",
            Path::HybridDirty => "hybrid-dirty",
            Path::Exec => "exec",
            Path::Proxy => "proxy",
        }
    }

    /// Whether a memory file migrates (with a VM modelled by hooks).
    pub fn is_memory(self) -> bool {
        matches!(self, Path::Pre | Path::Post | Path::Hybrid | Path::HybridDirty)
    }

    /// Whether the guest is handed over before all memory arrived.
    pub fn is_postcopy(self) -> bool {
        matches!(self, Path::Post | Path::Hybrid | Path::HybridDirty)
    }
}

impl Fault {
    pub const ALL: [Fault; 8] = [
        Fault::Netem,
        Fault::Cut,
        Fault::StopSrc,
        Fault::StopDst,
        Fault::KillSrc,
        Fault::KillDst,
        Fault::DiskFull,
        Fault::ResumeFails,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::Netem => "netem",
            Fault::Cut => "cut",
            Fault::StopSrc => "stop-src",
            Fault::StopDst => "stop-dst",
            Fault::KillSrc => "kill-src",
            Fault::KillDst => "kill-dst",
            Fault::DiskFull => "disk-full",
            Fault::ResumeFails => "resume-fails",
        }
    }

    /// A fault of the link between the ends (not of an end).
    pub fn is_link(self) -> bool {
        matches!(self, Fault::Netem | Fault::Cut)
    }
}

/// A path under a fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cell {
    pub path: Path,
    pub fault: Fault,
}

impl Cell {
    /// Every cell of the matrix (a full disk only where a file is
    /// written, a failing resume only where a guest starts).
    pub fn all() -> Vec<Cell> {
        let mut v = Vec::new();
        for path in Path::ALL {
            for fault in Fault::ALL {
                if !matches!(fault, Fault::DiskFull | Fault::ResumeFails) || path.is_memory() {
                    v.push(Cell { path, fault });
                }
            }
        }
        v
    }

    pub fn parse(s: &str) -> Option<Cell> {
        let (p, f) = s.split_once('/')?;
        let path = Path::ALL.into_iter().find(|x| x.name() == p)?;
        let fault = Fault::ALL.into_iter().find(|x| x.name() == f)?;
        Some(Cell { path, fault })
    }
}

impl fmt::Display for Cell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.path.name(), self.fault.name())
    }
}

/// One run of the matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub cell: Cell,
    pub seed: u64,
    pub mib: u64,
}

impl Run {
    /// `cell:seed:MiB`, as `PMIGRATE_FAULT_REPRO` takes it.
    pub fn parse(s: &str) -> Option<Run> {
        let mut it = s.trim().split(':');
        let cell = Cell::parse(it.next()?)?;
        let seed = it.next()?.parse().ok()?;
        let mib = it.next()?.parse().ok()?;
        (it.next().is_none() && mib > 0).then_some(Run { cell, seed, mib })
    }

    /// The command line that runs this run alone.
    pub fn repro(&self) -> String {
        format!(
            "PMIGRATE_FAULT_REPRO={}:{}:{} cargo test -p pmigrate-tools --test faults reduced_fault_matrix -- --nocapture",
            self.cell, self.seed, self.mib
        )
    }

    /// What the seed makes of the fault.
    pub fn plan(&self) -> Plan {
        let mut h = self.seed ^ 0x51_7c_c1_b7_27_22_0a_95;
        for b in self.cell.to_string().bytes().chain(self.mib.to_le_bytes()) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        let mut rng = rand::rngs::SmallRng::seed_from_u64(h);
        let bytes = self.mib << 20;
        // What crosses the link, roughly: the random pages (see `content`).
        let wire = bytes * 6 / 10;
        let offset = match rng.gen_range(0..10) {
            0 => rng.gen_range(0..4096),               // the handshake, the first frames
            9 => rng.gen_range(wire * 95 / 100..wire), // the end: verification, verdict
            _ => rng.gen_range(4096..wire),            // anywhere in the transfer
        };
        let stop_for = if rng.gen_bool(0.6) {
            Duration::from_millis(rng.gen_range(200..2000))
        } else {
            PROGRESS_TIMEOUT + Duration::from_millis(rng.gen_range(1500..4000))
        };
        let disk_kib = rng.gen_range((bytes >> 10) / 10..(bytes >> 10) - 4);
        // The flavour, from the seed alone: every cell meets mutual TLS
        // and the portable backend as the seeds count up.
        let (tls, portable) = (self.seed % 2 == 1, self.seed % 3 == 0);
        Plan { offset, stop_for, disk_kib, netem_seed: rng.gen(), content_seed: rng.gen(), tls, portable }
    }
}

/// The `--progress-timeout` every pmigrate process of the matrix runs with.
pub const PROGRESS_TIMEOUT: Duration = Duration::from_secs(5);

/// The seeded particulars of a run.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Byte offset of the link's traffic where a cut, stop or kill strikes.
    pub offset: u64,
    /// How long a stopped end stays stopped (beyond the progress timeout:
    /// the other end must give up).
    pub stop_for: Duration,
    /// Size of the destination's tmpfs, KiB (smaller than the memory).
    pub disk_kib: u64,
    /// Seed of the netem link.
    pub netem_seed: u64,
    /// Seed of the memory's (or stream's) content.
    pub content_seed: u64,
    /// Mutual TLS instead of a pre-shared key.
    pub tls: bool,
    /// The portable I/O backend instead of the default (io_uring where
    /// the kernel allows it).
    pub portable: bool,
}

impl fmt::Display for Plan {
    /// The run's flavour, for its row.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let auth = if self.tls { "tls" } else { "psk" };
        let io = if self.portable { "portable" } else { "auto" };
        write!(f, "{auth}/{io}")
    }
}

impl Plan {
    /// Whether a stop lasts past the other end's progress timeout.
    pub fn long_stop(&self) -> bool {
        self.stop_for > PROGRESS_TIMEOUT
    }
}

/// `mib` MiB of guest-like content: 60 % random pages, 15 % text, the rest
/// zero pages.
pub fn content(seed: u64, mib: u64) -> Vec<u8> {
    use rand::RngCore;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut data = vec![0u8; usize::try_from(mib << 20).expect("size")];
    for page in data.chunks_mut(4096) {
        match rng.gen_range(0..20) {
            0..=11 => rng.fill_bytes(page),
            12..=14 => page.iter_mut().enumerate().for_each(|(k, b)| *b = b"kernel log line "[k % 16]),
            _ => {}
        }
    }
    data
}
