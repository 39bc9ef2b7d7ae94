//! The source's builder: its tunables ([`SourceConfig`]), the live
//! counters a caller may watch ([`Progress`]), and [`Source`], which
//! connects the streams, agrees the session with the destination and runs
//! it (`super::Run`).

use std::sync::atomic::AtomicU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use pmigrate_ranges::{GuestMemory, PageRange};
use pmigrate_transport::hello::{
    encode_shared_regions, Hello, Mode, RegionDesc, CAP_LZ4, CAP_POSTCOPY, CAP_RESUME, CAP_SHARED, EXT_SHARED_REGIONS,
    PROTOCOL_VERSION, REGION_HUGE,
};
use pmigrate_transport::payload::zero_page_hash;
use pmigrate_transport::session::{connect_session, new_session_id, StreamPlan};
use pmigrate_transport::{Auth, BackendChoice, Connected};

use super::session::SourceSession;
use super::{AbortHook, PauseHook, Run, DEFAULT_BATCH_PAGES};
use crate::dirty::{tracker_for, DirtyTracker, TrackerKind};
use crate::lz4gate::Lz4Policy;
use crate::report::Report;
use crate::shared;
use crate::{Compression, HookError, MigrateError};

/// Tunables of the source side. Build with [`Source::new`].
#[derive(Clone, Debug)]
pub struct SourceConfig {
    /// Worker threads scanning and encoding pages.
    pub threads: usize,
    /// Pages per shard (the unit of work stealing).
    pub shard_pages: u64,
    /// Pages per frame at most.
    pub batch_pages: usize,
    /// lz4 policy.
    pub compression: Compression,
    /// Stop iterating when the rest would take less than this.
    pub downtime_target: Duration,
    /// At most this many live rounds before pausing anyway.
    pub max_rounds: u32,
    /// Dirty tracker to use when the embedder supplies none.
    pub tracker: TrackerKind,
    /// Offer shared file regions for handover instead of copying them
    /// (docs/design.md, "Zero-copy regions").
    pub zero_copy: bool,
    /// Post-copy: switch after this many pre-copy rounds (0: at once;
    /// fewer if pre-copy converges first), see docs/design.md, "Post-copy and hybrid". `None`:
    /// pre-copy to the end.
    pub postcopy: Option<u32>,
    /// The I/O backend of the streams.
    pub io: BackendChoice,
    /// With io_uring: build whole raw batches in one registered arena and
    /// send them with `SEND_ZC` from it, no copy into the kernel. Pays on a
    /// real NIC; over loopback and veth the receiving side copies anyway
    /// (see docs/benchmarks.md). Off by default.
    pub zero_copy_send: bool,
    /// A destination that takes nothing this end sends for this long (it
    /// stopped reading, froze, or vanished with its links) fails the
    /// migration, with the guest still here.
    pub progress_timeout: Duration,
    /// A stream whose path acknowledges nothing it sent for this long (a
    /// NIC or link down) is moved to another route, when the session can
    /// take streams back and has one; it goes back once its own answers.
    pub link_timeout: Duration,
}

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            threads: 4,
            shard_pages: pmigrate_ranges::DEFAULT_SHARD_PAGES,
            batch_pages: DEFAULT_BATCH_PAGES,
            compression: Compression::Auto,
            downtime_target: Duration::from_millis(300),
            max_rounds: 30,
            tracker: TrackerKind::Auto,
            zero_copy: true,
            postcopy: None,
            io: BackendChoice::Auto,
            zero_copy_send: false,
            progress_timeout: pmigrate_transport::net::PROGRESS_TIMEOUT,
            link_timeout: pmigrate_transport::net::LINK_TIMEOUT,
        }
    }
}

/// Live counters a caller may watch while a migration runs (progress bars).
#[derive(Debug, Default)]
pub struct Progress {
    /// Current round.
    pub round: AtomicU64,
    /// Dirty pages in the current round.
    pub round_pages: AtomicU64,
    /// Pages of the current round done.
    pub done_pages: AtomicU64,
    /// Bytes written to the streams so far.
    pub wire_bytes: AtomicU64,
    /// Whether the guest has been paused.
    pub paused: AtomicBool,
    /// Post-copy: the switchover went out; the guest may run at the
    /// destination from now on and must never resume here.
    pub handed_over: AtomicBool,
}

/// The source of a migration: what to send, where, and how.
///
/// ```no_run
/// use pmigrate_engine::{Auth, GuestMemory, Psk, Source};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mem = GuestMemory::anonymous(64 << 20)?;
/// let key = Auth::Psk(Psk::from_file("/etc/pmigrate/migration.key".as_ref())?);
/// let report = Source::new(&mem, vec!["192.0.2.7:7000".parse()?], key)
///     .streams(4)
///     .threads(4)
///     .on_pause(|| { /* stop the vCPUs */ Ok(()) })
///     .run()?;
/// println!("{report}");
/// # Ok(()) }
/// ```
pub struct Source<'a> {
    mem: &'a GuestMemory,
    plan: StreamPlan,
    cfg: SourceConfig,
    tracker: Option<Box<dyn DirtyTracker + 'a>>,
    pause: Option<PauseHook<'a>>,
    cont: Option<AbortHook<'a>>,
    progress: Arc<Progress>,
    free: Vec<PageRange>,
    working_set: Vec<PageRange>,
}

impl<'a> Source<'a> {
    /// A migration of `mem` to the destinations `dests` (streams are spread
    /// over them), with one stream and default settings; every stream
    /// proves itself, and checks the destination, as `auth` says.
    pub fn new(mem: &'a GuestMemory, dests: Vec<std::net::SocketAddr>, auth: Auth) -> Self {
        Self {
            mem,
            plan: StreamPlan::new(dests, 1, auth),
            cfg: SourceConfig::default(),
            tracker: None,
            pause: None,
            cont: None,
            progress: Arc::default(),
            free: Vec::new(),
            working_set: Vec::new(),
        }
    }

    /// Number of TCP streams.
    pub fn streams(mut self, n: u16) -> Self {
        self.plan.streams = n.max(1);
        self
    }

    /// Local address or interface of each stream (stream `i` uses `via[i % len]`).
    pub fn via(mut self, via: Vec<pmigrate_transport::Via>) -> Self {
        self.plan.via = via;
        self
    }

    /// Number of worker threads.
    pub fn threads(mut self, n: usize) -> Self {
        self.cfg.threads = n.max(1);
        self
    }

    /// All tunables at once.
    pub fn config(mut self, cfg: SourceConfig) -> Self {
        self.cfg = cfg;
        self
    }

    /// The dirty tracker to use (otherwise `config().tracker` picks one).
    pub fn tracker(mut self, t: Box<dyn DirtyTracker + 'a>) -> Self {
        self.tracker = Some(t);
        self
    }

    /// Pages the guest reports free (its free-page list, e.g. from a
    /// balloon or an eBPF walker), as of now. They are not sent: round 0
    /// skips them, and only a write after this hint — which the dirty
    /// tracker reports like any other — sends one. The destination keeps
    /// them as it has them (zero): the guest does not care what a free page
    /// holds.
    pub fn free_pages(mut self, ranges: Vec<PageRange>) -> Self {
        self.free = ranges;
        self
    }

    /// The guest's working set (hottest pages), as it reports it: sent last
    /// in every pre-copy round, so the pages most likely to be written
    /// again have the least time to change before the round ends.
    pub fn working_set(mut self, ranges: Vec<PageRange>) -> Self {
        self.working_set = ranges;
        self
    }

    /// Post-copy after `precopy_rounds` pre-copy rounds (0: pure post-copy,
    /// more: hybrid); see docs/design.md, "Post-copy and hybrid". The destination must run
    /// [`crate::Incoming::receive_and_run`] on private anonymous memory.
    pub fn postcopy(mut self, precopy_rounds: u32) -> Self {
        self.cfg.postcopy = Some(precopy_rounds);
        self
    }

    /// Called once, when pre-copy is done, to stop the guest. An error
    /// aborts the migration (the guest keeps running at the source): it is
    /// the source of the [`MigrateError::Pause`] returned.
    pub fn on_pause(mut self, f: impl FnMut() -> Result<(), HookError> + Send + 'a) -> Self {
        self.pause = Some(Box::new(f));
        self
    }

    /// Called once if the migration fails after the pause hook stopped the
    /// guest while the guest is still this end's (see
    /// [`MigrateError::source_keeps_guest`]): it must start the vCPUs
    /// again. An error from it is reported with the migration's
    /// ([`MigrateError::AbortHook`]).
    pub fn on_abort(mut self, f: impl FnOnce() -> Result<(), HookError> + Send + 'a) -> Self {
        self.cont = Some(Box::new(f));
        self
    }

    /// Counters to watch from another thread while [`Source::run`] runs.
    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    /// Runs the migration to the end: pre-copy rounds, pause, final round,
    /// verification by the destination.
    pub fn run(mut self) -> Result<Report, MigrateError> {
        let cont = self.cont.take();
        let progress = self.progress.clone();
        let res = self.run_inner();
        match (res, cont) {
            (Err(e), Some(cont)) if progress.paused.load(Ordering::Acquire) && e.source_keeps_guest() => {
                Err(match cont() {
                    Ok(()) => e,
                    Err(hook) => MigrateError::AbortHook { hook, after: Box::new(e) },
                })
            }
            (res, _) => res,
        }
    }

    fn run_inner(self) -> Result<Report, MigrateError> {
        let t0 = Instant::now();
        for r in self.free.iter().chain(&self.working_set) {
            self.mem.check(*r).map_err(|source| MigrateError::Hint { range: *r, source })?;
        }
        let mut tracker = match self.tracker {
            Some(t) => t,
            None => tracker_for(self.cfg.tracker, self.mem)?,
        };
        let mut caps = if self.cfg.compression == Compression::Off { 0 } else { CAP_LZ4 };
        let candidates = if self.cfg.zero_copy { shared::candidates(self.mem) } else { Vec::new() };
        let mut extensions = Vec::new();
        if !candidates.is_empty() {
            caps |= CAP_SHARED;
            let offered: Vec<u32> = candidates.iter().map(|(r, _)| *r).collect();
            extensions.push((EXT_SHARED_REGIONS, encode_shared_regions(&offered)));
        }
        // A lost stream may come back, in pre-copy as in post-copy.
        caps |= CAP_RESUME;
        let mut plan = self.plan.clone();
        if self.cfg.postcopy.is_some() {
            caps |= CAP_POSTCOPY;
            // The priority stream, last, over the first path.
            plan.streams += 1;
        }
        let hello = Hello {
            version: PROTOCOL_VERSION,
            mode: Mode::Memory,
            stream_index: 0,
            stream_count: plan.streams,
            session: new_session_id(),
            caps,
            regions: self
                .mem
                .regions()
                .iter()
                .map(|r| RegionDesc {
                    gpa: r.gpa(),
                    len: r.len(),
                    flags: if r.host_page_size() == pmigrate_ranges::HostPageSize::Huge2M { REGION_HUGE } else { 0 },
                })
                .collect(),
            extensions,
        };
        let Connected { streams, welcome, key } = connect_session(&plan, &hello)?;
        if self.cfg.postcopy.is_some() && welcome.caps & CAP_POSTCOPY == 0 {
            return Err(crate::postcopy::PostcopyError::Declined.into());
        }
        let candidates = if welcome.caps & CAP_SHARED != 0 { candidates } else { Vec::new() };
        let setup_secs = t0.elapsed().as_secs_f64();
        let lz4_allowed = welcome.caps & CAP_LZ4 != 0 && self.cfg.compression != Compression::Off;
        let mut run = Run {
            mem: self.mem,
            cfg: &self.cfg,
            lz4_allowed,
            lz4: Lz4Policy::for_streams(
                if lz4_allowed { self.cfg.compression } else { Compression::Off },
                streams.len(),
            ),
            sent: self
                .mem
                .regions()
                .iter()
                .map(|r| (0..r.pages()).map(|_| AtomicU64::new(zero_page_hash())).collect())
                .collect(),
            sent_round: self
                .mem
                .regions()
                .iter()
                .map(|r| (0..r.pages()).map(|_| AtomicU32::new(0)).collect())
                .collect(),
            sent_lock: RwLock::new(()),
            progress: &self.progress,
            abort: AtomicBool::new(false),
            candidates,
            force: self.mem.regions().iter().map(|_| AtomicBool::new(false)).collect(),
            session: hello.session,
            free: self.free,
            working_set: self.working_set,
            shared: OnceLock::new(),
            resume: (welcome.caps & CAP_RESUME != 0).then(|| (plan.clone(), hello.clone(), key)),
            state: Mutex::new(SourceSession::new(welcome.caps & CAP_RESUME != 0)),
            requested_pages: AtomicU64::new(0),
            zero_copy: None,
        };
        let result = run.drive(streams, tracker.as_mut(), self.pause);
        tracker.stop(self.mem);
        let mut report = result?;
        if let Some(p) = report.postcopy.as_mut() {
            p.requested_pages = run.requested_pages.load(Ordering::Relaxed);
            p.runnable_secs = run.state().running_at().map_or(0.0, |t| t.duration_since(t0).as_secs_f64());
        }
        report.setup_secs = setup_secs;
        report.total_secs = t0.elapsed().as_secs_f64();
        for s in &mut report.streams {
            s.bytes_per_sec = s.bytes as f64 / report.total_secs.max(1e-9);
        }
        Ok(report)
    }
}
