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
//! The builder is `source/builder.rs`, the rounds `source/rounds.rs`, the
//! workers `source/worker.rs`, the stream writers and listeners
//! `source/streams.rs`, the session's state machine `source/session.rs`;
//! this module holds the state the threads share (`Run`) and the driver
//! that starts them and feeds the session its events.

mod builder;
pub(crate) mod log;
mod proof;
mod requests;
mod resync;
mod rounds;
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

use crossbeam_channel::{bounded, RecvTimeoutError};
use pmigrate_ranges::{GuestMemory, PageRange, PAGE_SIZE};
use pmigrate_transport::backend::FramePool;
use pmigrate_transport::backend::URING_DEPTH;
use pmigrate_transport::frame::HEADER_LEN;
use pmigrate_transport::hello::{ErrorCode, Hello};
use pmigrate_transport::message::Digest;
use pmigrate_transport::session::StreamPlan;
use pmigrate_transport::{Backend, Conn, Link, Rejoin, SessionKey, TransportError};

use crate::digest::digest_handing_over;
use crate::dirty::DirtyTracker;
use crate::lz4gate::Lz4Policy;
use crate::report::{LatencySummary, LinkReport, Report, StreamReport};
use crate::{HookError, MigrateError};
use session::{Comeback, SourceSession};
use streams::{listener, sender, Ledger, Listen, Msg, Out, StreamStats};

pub use builder::{Progress, Source, SourceConfig};

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

type PauseHook<'a> = Box<dyn FnMut() -> Result<(), HookError> + Send + 'a>;
type AbortHook<'a> = Box<dyn FnOnce() -> Result<(), HookError> + Send + 'a>;

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
        session::lock(&self.state)
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
            // What the bulk streams' sockets have yet to send.
            let unsent = || {
                let socket = |l: &Link| pmigrate_transport::net::unsent_bytes(l.current().0.tcp()).unwrap_or(0);
                streams[..bulk].iter().map(socket).sum()
            };
            let res = this
                .rounds(&txs, bulk, &pool_rx, &probe_rx, &verdicts, tracker, pause, &unsent, &mut report)
                .and_then(|(t_pause, handed_over)| {
                    let digest = this.sent_digest(&handed_over);
                    report.digest = digest.to_string();
                    this.state().done_queued(digest);
                    txs[0].send(Msg::Done { digest }).map_err(|_| MigrateError::Aborted)?;
                    Ok(t_pause)
                });
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
}

impl Run<'_> {
    /// The digest of what this end sent, the regions in `handed_over`
    /// counting by index only.
    fn sent_digest(&self, handed_over: &[bool]) -> Digest {
        let tables: Vec<&[AtomicU64]> = self.sent.iter().map(|t| &t[..]).collect();
        Digest(digest_handing_over(&tables, handed_over))
    }
}
