//! The source side: live pre-copy over many workers and many streams.
//!
//! ```text
//!            ┌ worker 0 ┐   per-stream bounded queues   ┌ sender 0 ─ TCP ─┐
//! dirty  →   │ worker 1 │ → [frame][frame]…  (stream 0) │ sender 1 ─ TCP ─┤→ destination
//! shards     └ worker N ┘   [frame]…         (stream 1) └ sender M ─ TCP ─┘
//! ```
//!
//! A round cuts the dirty bitmap into shards ([`pmigrate_ranges::shard`]);
//! workers take shards (stealing when idle), copy each dirty page out of guest
//! memory, skip it when the destination already has it (zero, or the same
//! xxh3 as last sent), compress batches with lz4 when that pays, seal each
//! frame with its check and hand it to a stream. A worker offers a frame to
//! its own stream first and to any stream with room otherwise, so a slow
//! stream (a slower NIC) carries less. Queues are bounded, so memory use is
//! `streams × QUEUE_DEPTH × frame size` whatever the guest size.
//!
//! Rounds repeat over the pages dirtied meanwhile until the time to send
//! what is left, at the bandwidth measured, fits the downtime target, or the
//! round cap is hit. Then the embedder's pause hook stops the guest, the last
//! dirty pages go, every stream ends its final round, and stream 0 carries
//! the digest of all memory; the destination answers `Verified` only when
//! its own digest matches.
//!
//! A stream whose connection is lost mid-migration (before the verdict and,
//! in post-copy, also after the switchover) is reconnected within the
//! progress timeout, and what the old connection swallowed goes again
//! (`source/log.rs`, `source/resync.rs`); past it, the migration fails and
//! the guest stays here.
//!
//! The workers are in `source/worker.rs`, the stream writers and listeners in
//! `source/streams.rs`; this module holds the builder and the rounds.

pub(crate) mod log;
mod proof;
mod requests;
mod resync;
pub(crate) mod rules;
pub(crate) mod session;
mod streams;
mod switchover;
#[cfg(test)]
mod tests;
mod worker;

use std::sync::atomic::AtomicU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use pmigrate_ranges::{distribute_late, plan_shards, AtomicBitmap, GuestMemory, PageRange, PAGE_SIZE};
use pmigrate_transport::backend::URING_DEPTH;
use pmigrate_transport::backend::{FramePool, Outgoing};
use pmigrate_transport::frame::HEADER_LEN;
use pmigrate_transport::hello::{
    encode_shared_regions, ErrorCode, Hello, Mode, RegionDesc, CAP_LZ4, CAP_POSTCOPY, CAP_RESUME, CAP_SHARED,
    EXT_SHARED_REGIONS, PROTOCOL_VERSION, REGION_HUGE,
};
use pmigrate_transport::message::Digest;
use pmigrate_transport::payload::{zero_page_hash, Scratch};
use pmigrate_transport::session::{connect_session, new_session_id, StreamPlan};
use pmigrate_transport::{Auth, Backend, BackendChoice, Conn, Connected, Link, Rejoin, SessionKey, TransportError};

use crate::digest::digest_handing_over;
use crate::dirty::{tracker_for, DirtyTracker, TrackerKind};
use crate::lz4gate::Lz4Policy;
use crate::report::{LatencySummary, LinkReport, Report, RoundReport, StreamReport};
use crate::shared::{self};
use crate::{Compression, HookError, MigrateError};
use session::{Comeback, SourceSession};
use streams::{listener, sender, Ledger, Listen, Msg, Out, StreamStats};
use worker::{Counts, Worker};

/// Frames queued per stream. Four frames of up to 256 KiB keep a stream's
/// socket buffer fed while a worker builds the next one, and bound the
/// memory held in queues to about 1 MiB a stream.
pub const QUEUE_DEPTH: usize = 4;

/// Default pages per frame: 64 pages (256 KiB), large enough that headers
/// and syscalls are noise, small enough to spread over streams evenly.
pub const DEFAULT_BATCH_PAGES: usize = 64;

/// How many times sampled pages that differ are asked again before a
/// region is judged not the destination's (see `prove_content`).
const CONTENT_PROBE_TRIES: usize = 3;

/// How long the source waits for the answer to a probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

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

type PauseHook<'a> = Box<dyn FnMut() -> Result<(), HookError> + Send + 'a>;
type AbortHook<'a> = Box<dyn FnOnce() -> Result<(), HookError> + Send + 'a>;

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

/// State shared by the threads of one migration.
struct Run<'r> {
    mem: &'r GuestMemory,
    cfg: &'r SourceConfig,
    lz4_allowed: bool,
    /// When to compress (the `auto` policy measures, across rounds).
    lz4: Lz4Policy,
    /// xxh3 of each page as last sent (zero-page hash until then): what the
    /// destination holds, used to skip unchanged pages and for the digest.
    sent: Vec<Box<[AtomicU64]>>,
    /// The round of each page's copy in `sent` (see `resync`).
    sent_round: Vec<Box<[AtomicU32]>>,
    /// Taken shared to update `sent` and `sent_round`, alone to rebuild
    /// a lost frame's hashes into them.
    sent_lock: RwLock<()>,
    progress: &'r Progress,
    abort: AtomicBool,
    /// Regions offered for handover, accepted by the destination for
    /// proving.
    candidates: Vec<(u32, String)>,
    /// Per region: send every page this round, whatever the destination
    /// was thought to hold (a region that fell back to the copy path).
    force: Vec<AtomicBool>,
    session: [u8; 16],
    /// Free-page hints, honoured in round 0.
    free: Vec<PageRange>,
    /// The guest's working set, sent last in each pre-copy round and first
    /// in the post-copy push.
    working_set: Vec<PageRange>,
    /// The regions handed over without a copy (zero-copy), once proven at
    /// the pause.
    shared: OnceLock<Vec<bool>>,
    /// Post-copy: pages sent to answer requests.
    requested_pages: AtomicU64,
    /// With `CAP_RESUME`: how to reconnect a lost stream, and the session's
    /// secret it must prove.
    resume: Option<(StreamPlan, Hello, SessionKey)>,
    /// The session's state and rules (`session.rs`), fed by every thread.
    state: Mutex<SourceSession>,
    /// With io_uring and `zero_copy_send`: the arena whole raw batches are
    /// built in, registered with every stream's ring and sent from it.
    zero_copy: Option<FramePool>,
}

impl Run<'_> {
    /// The session's state and rules.
    pub(super) fn state(&self) -> MutexGuard<'_, SourceSession> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The destination's verdict is in, or the migration failed: what is
    /// left to write is moot and closing connections are not lost.
    pub(super) fn over(&self) -> bool {
        self.abort.load(Ordering::Relaxed) || self.state().settled()
    }

    /// Reconnects stream `index` after its connection of generation `seen`
    /// failed with `e`, when the session allows it ([`SourceSession::on_lost`])
    /// and after the grace it gives the destination's word, unless the
    /// migration failed or settled meanwhile. Within the progress timeout;
    /// past it the error is the session's (before the switchover, the
    /// guest stays here).
    fn redial(
        &self,
        link: &Link,
        index: usize,
        seen: u64,
        e: TransportError,
    ) -> Result<(Arc<Conn>, u64), TransportError> {
        let Some((plan, hello, key)) = &self.resume else { return Err(e) };
        let over = || self.over();
        let (grace, switched) = {
            let state = self.state();
            (state.on_lost(&e, link.given_up()), state.switched())
        };
        let grace = match grace {
            Comeback::After(grace) if !over() => grace,
            _ => return Err(e),
        };
        let t = Instant::now();
        while t.elapsed() < grace {
            if over() {
                return Err(e);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let phase = if switched { "after the switchover" } else { "before the switchover" };
        if link.given_up() {
            tracing::warn!(
                stream = index,
                "stream's link down {phase} (nothing acknowledged); reconnecting by another"
            );
        } else {
            tracing::warn!(stream = index, error = %e, "stream lost {phase}; reconnecting");
        }
        let within = self.cfg.progress_timeout;
        let ready = |c: &Conn| pmigrate_transport::net::set_progress_timeout(c.tcp(), within);
        let how = Rejoin { plan, hello, key, ready: Some(&ready) };
        link.rejoin(seen, &how, index as u16, within, &over).map_err(|e| match e {
            // A comeback refused is not the session's verdict: the
            // destination that refuses it may no longer know whether
            // its guest started (the ownership rule, `rules::settle`).
            TransportError::Peer(m) => TransportError::Setup(format!(
                "stream {index} could not come back: the destination said {:?}: {}",
                m.code, m.message
            )),
            e => TransportError::Setup(format!("stream {index} was lost and did not come back within {within:?}: {e}")),
        })
    }
}

impl<'r> Run<'r> {
    fn drive(
        &mut self,
        streams: Vec<Conn>,
        tracker: &mut dyn DirtyTracker,
        pause: Option<PauseHook<'_>>,
    ) -> Result<Report, MigrateError> {
        let n = streams.len();
        let t0 = Instant::now();
        for s in &streams {
            pmigrate_transport::net::set_progress_timeout(s.tcp(), self.cfg.progress_timeout)
                .map_err(|e| TransportError::io("progress timeout", e))?;
        }
        let resolved = self.cfg.io.resolve()?;
        let io = resolved.backend;
        if io == Backend::Uring
            && self.cfg.zero_copy_send
            && pmigrate_transport::backend::probe_uring().is_ok_and(|s| s.send_zc)
        {
            // Room for every whole batch that can be in flight: queued, in
            // a sender's two chains, and being built by each worker.
            let batch = self.cfg.batch_pages.clamp(1, pmigrate_transport::frame::MAX_FRAME_PAGES as usize);
            let slots = n * (QUEUE_DEPTH + 2 * URING_DEPTH) + 2 * self.cfg.threads;
            let arena = FramePool::new(slots, HEADER_LEN + batch * PAGE_SIZE)
                .map_err(|e| TransportError::Setup(format!("zero-copy arena: {e}")))?;
            self.zero_copy = Some(arena);
        }
        let tls = streams.iter().any(Conn::is_tls);
        let streams: Vec<Link> = streams.into_iter().map(Link::new).collect();
        let ends: Vec<(String, String)> = streams
            .iter()
            .map(|l| {
                let st = l.current().0;
                let name = |a: std::io::Result<std::net::SocketAddr>| a.map(|a| a.to_string()).unwrap_or_default();
                (name(st.tcp().local_addr()), name(st.tcp().peer_addr()))
            })
            .collect();
        let stats: Vec<StreamStats> = (0..n).map(|_| StreamStats::default()).collect();
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..n).map(|_| bounded::<Msg>(QUEUE_DEPTH)).unzip();
        let (pool_tx, pool_rx) = bounded::<Vec<u8>>(n * QUEUE_DEPTH + self.cfg.threads);
        let (verdict_tx, verdicts) = bounded::<Result<Digest, MigrateError>>(n);
        let (probe_tx, probe_rx) = bounded::<Vec<u64>>(4);
        let post = self.cfg.postcopy.is_some();
        // Post-copy: the last stream is the priority stream, whose listener
        // answers page requests.
        let bulk = if post { n - 1 } else { n };
        let this: &Run<'r> = self;
        let mut report = Report {
            role: "source".into(),
            memory_bytes: this.mem.total_bytes(),
            threads: this.cfg.threads,
            tracker: tracker.name().into(),
            compression: if this.lz4_allowed {
                format!("{:?}", this.cfg.compression).to_lowercase()
            } else {
                "off".into()
            },
            // TLS streams are sealed in this process: the portable backend.
            io: if tls { "TLS, portable".into() } else { resolved.describe() },
            mode: match this.cfg.postcopy {
                None => "pre-copy".into(),
                Some(0) => "post-copy".into(),
                Some(_) => "hybrid".into(),
            },
            ..Report::default()
        };
        let mut latency = LatencySummary::histogram();
        let ledgers: Vec<Ledger> = (0..n).map(|_| Ledger::default()).collect();
        let outcome = std::thread::scope(|s| -> Result<(), MigrateError> {
            let mut senders = Vec::new();
            for (i, (stream, rx)) in streams.iter().zip(rxs).enumerate() {
                let (pool, st, ledger) = (pool_tx.clone(), &stats[i], &ledgers[i]);
                let redial = move |seen, e| this.redial(stream, i, seen, e);
                senders.push(s.spawn(move || {
                    let zc = this.zero_copy.as_ref();
                    let flags = streams::Flags { abort: &this.abort, state: &this.state };
                    let rebuild = |range, round| this.rebuild(range, round);
                    let patience = this.cfg.progress_timeout;
                    let to = Out { link: stream, index: i, redial: &redial, ledger, rebuild: &rebuild, patience };
                    sender(to, rx, pool, st, this.progress, flags, io, zc)
                }));
                let listen = Listen {
                    verdict: verdict_tx.clone(),
                    probes: probe_tx.clone(),
                    answer: (post && i == bulk).then(|| requests::Answerer::new(this, i)),
                    state: &this.state,
                    ledger,
                };
                let redial = move |seen, e| this.redial(stream, i, seen, e);
                let progress = this.cfg.progress_timeout;
                s.spawn(move || listener(stream, i, listen, &this.abort, &redial, progress));
            }
            drop((probe_tx, verdict_tx));
            if let Some((plan, hello, key)) = &this.resume {
                let links: Vec<&Link> = streams.iter().collect();
                s.spawn(move || {
                    let within = this.cfg.progress_timeout;
                    let ready = |c: &Conn| pmigrate_transport::net::set_progress_timeout(c.tcp(), within);
                    let how = Rejoin { plan, hello, key, ready: Some(&ready) };
                    let stop = || this.over();
                    pmigrate_transport::link::watch(&links, &how, this.cfg.link_timeout, &stop);
                });
            }
            let res = this.rounds(&txs, bulk, &pool_rx, &probe_rx, &verdicts, tracker, pause, &mut report).and_then(
                |(t_pause, handed_over)| {
                    let digest = this.sent_digest(&handed_over);
                    report.digest = digest.to_string();
                    this.state().done_queued(digest);
                    txs[0].send(Msg::Done { digest }).map_err(|_| MigrateError::Aborted)?;
                    Ok(t_pause)
                },
            );
            drop(txs);
            let (t_pause, mut error) = match res {
                Ok(t) => (Some(t), None),
                Err(e) => (None, Some(e)),
            };
            for h in senders {
                match h.join().expect("sender thread panicked") {
                    Ok(hist) => latency.add(&hist).expect("histograms of equal bounds"),
                    Err(e) => MigrateError::keep(&mut error, e),
                }
            }
            // The destination's verdict: on success within the verdict
            // timeout; on failure its own report gets a moment to arrive
            // ("checksum mismatch at the destination" explains more than
            // "broken pipe"). The session decides how long each wait is.
            this.state().await_verdict(error.is_some(), Instant::now());
            loop {
                // (The guard is dropped before the session is fed.)
                let Some(until) = this.state().verdict_deadline() else { break };
                match verdicts.recv_deadline(until) {
                    Ok(v) => this.state().on_verdict(v, Instant::now()),
                    Err(RecvTimeoutError::Timeout) => this.state().on_timeout(Instant::now()),
                    Err(RecvTimeoutError::Disconnected) => this.state().on_streams_gone(),
                }
            }
            let (switched, digest_known) = {
                let state = this.state();
                (state.switched(), state.digest_known())
            };
            if let (false, true, Some(shared)) = (digest_known, switched, this.shared.get()) {
                // Post-copy whose push failed here while the destination
                // fetched the rest: after the switchover what was sent is
                // final (the guest is paused here), so its digest is known.
                let digest = this.sent_digest(shared);
                report.digest = digest.to_string();
                this.state().done_queued(digest);
            }
            // Settled whatever happened: the listeners stop, so the scope
            // can end.
            let settled = this.state().settle(error);
            if let Some(why) = settled.tell_gave_up {
                // A destination that may wait for lost streams to come back
                // learns that none will: the guest stays here.
                for l in &streams {
                    if let Some(_w) = l.try_lock_writes() {
                        l.current().0.send_error(ErrorCode::Aborted, why.clone());
                    }
                }
            }
            for l in &streams {
                l.shutdown();
            }
            settled.outcome?;
            if let Some(t) = t_pause {
                let running = this.state().running_at();
                report.downtime_secs = match running {
                    Some(run) => run.duration_since(t).as_secs_f64(),
                    None => t.elapsed().as_secs_f64(),
                };
            }
            Ok(())
        });
        outcome?;
        report.reconnects = streams.iter().map(Link::replaced).sum();
        report.links = LinkReport::of(&streams.iter().collect::<Vec<_>>(), t0);
        report.resent_frames = stats.iter().map(|s| s.resent.load(Ordering::Relaxed)).sum();
        if let Some(p) = report.postcopy.as_mut() {
            p.reconnects = report.reconnects;
        }
        report.wire_bytes = stats.iter().map(|s| s.bytes.load(Ordering::Relaxed)).sum();
        // Zero-copy only where the kernel took the arena's registration.
        if stats.iter().any(|s| s.zero_copy.load(Ordering::Relaxed)) {
            report.io.push_str(", zero-copy send");
        }
        report.batch_latency = LatencySummary::of(&latency);
        report.payload_bytes = report.rounds.iter().map(|r| r.payload_bytes).sum();
        report.streams = ends
            .into_iter()
            .zip(&stats)
            .enumerate()
            .map(|(i, ((local, peer), s))| StreamReport {
                index: i as u16,
                local,
                peer,
                bytes: s.bytes.load(Ordering::Relaxed),
                frames: s.frames.load(Ordering::Relaxed),
                bytes_per_sec: 0.0,
            })
            .collect();
        Ok(report)
    }

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

    #[allow(clippy::too_many_arguments)]
    fn rounds(
        &self,
        txs: &[Sender<Msg>],
        bulk: usize,
        pool: &Receiver<Vec<u8>>,
        probes: &Receiver<Vec<u64>>,
        verdict: &Receiver<Result<Digest, MigrateError>>,
        tracker: &mut dyn DirtyTracker,
        mut pause: Option<PauseHook<'_>>,
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

impl Run<'_> {
    /// The digest of what this end sent, the regions in `handed_over`
    /// counting by index only.
    fn sent_digest(&self, handed_over: &[bool]) -> Digest {
        let tables: Vec<&[AtomicU64]> = self.sent.iter().map(|t| &t[..]).collect();
        Digest(digest_handing_over(&tables, handed_over))
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
