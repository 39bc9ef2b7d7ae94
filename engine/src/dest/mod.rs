//! The destination side: receive, verify and place pages, then confirm.
//!
//! One thread per stream reads frames and hands each, typed, to the
//! session ([`session::DestSession`]), which checks it against the region table
//! and the stream's round before anything else looks at it; the page
//! frames they accept are opened (decoded and verified) and placed in
//! guest memory (`place`). After every stream ended the final round,
//! stream 0 brings the source's digest; the destination answers `Verified`
//! only if its own digest — from the hashes of the pages it placed —
//! matches, and only once the guest may run here.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use pmigrate_ranges::GuestMemory;
use pmigrate_transport::backend::{frame_reader, Backend, StreamIn};
use pmigrate_transport::hello::{ErrorCode, CAP_LZ4, CAP_POSTCOPY, CAP_RESUME};
use pmigrate_transport::message::{Control, Digest, Message};
use pmigrate_transport::net::{keepalive_frame, write_frame, FrameReader, KEEPALIVE_INTERVAL};
use pmigrate_transport::payload::Opener;
use pmigrate_transport::{Accepted, Acceptor, BackendChoice, Conn, Link, Resumes, TransportError};

use crate::postcopy::{self, DestPost, PostcopyError};
use crate::report::Report;
use crate::shared;
use crate::{HookError, MigrateError};

mod accept;
#[cfg(test)]
mod pair;
pub(crate) mod place;
mod post;
mod report;
pub(crate) mod session;

pub use accept::LayoutMismatch;
pub use accept::{layout_matches, Grant, Offered};
use place::Placer;
pub use session::Unreturned;
use session::{Confirm, ConfirmStep, DestSession, Read, Shape, Step};

/// A migration session whose streams have all arrived, not yet received.
#[derive(Debug)]
pub struct Incoming {
    accepted: Accepted,
    t0: Instant,
    /// The listeners again, to take back streams lost in post-copy.
    acceptor: Option<Acceptor>,
}

/// Options of the receiving side.
#[derive(Clone, Debug)]
pub struct ReceiveOptions {
    /// After the final round, rehash all of guest memory and compare it
    /// with the hashes of the pages written, before confirming.
    pub verify_memory: bool,
    /// A source that sends nothing on any stream for this long — no
    /// frame, not even a keepalive — or stalls inside a frame for as long,
    /// fails the migration: it is frozen, or gone with its links. At least
    /// [`pmigrate_transport::net::MIN_PROGRESS_TIMEOUT`].
    pub progress_timeout: Duration,
    /// The I/O backend of the streams.
    pub io: BackendChoice,
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        Self {
            verify_memory: false,
            progress_timeout: pmigrate_transport::net::PROGRESS_TIMEOUT,
            io: BackendChoice::Auto,
        }
    }
}

/// With `CAP_RESUME`, a stream's count of frames received (`Received`) goes
/// back to the source after at most this many frames: the source keeps
/// what it sent until it is counted, so this bounds its log under load.
pub const ACK_EVERY: u64 = 256;

/// … and at most this long after a frame arrived: a lull leaves the log
/// short too. An acknowledgement is a header, 40 bytes a tenth of a second.
pub const ACK_INTERVAL: Duration = Duration::from_millis(100);

/// The polling tick of receivers: how often a blocked read wakes up to
/// account for a stall.
const READ_TICK: Duration = Duration::from_millis(500);

impl Incoming {
    /// Receives the whole migration into `mem`, which must have the
    /// session's layout and be all zero (fresh anonymous memory, or a file
    /// region created with `truncate`): pages the source never sends are
    /// zero there. The guest may run once this returns.
    pub fn receive(self, mem: &GuestMemory, opts: &ReceiveOptions) -> Result<Report, MigrateError> {
        self.receive_and_run(mem, opts, || Ok(()))
    }

    /// Like [`Incoming::receive`], calling `resume` the moment the guest
    /// may run here: in pre-copy once memory is verified, before the source
    /// is told (`Verified`), so the source lets go of the guest only once it
    /// runs here; in post-copy (docs/design.md, "Post-copy and hybrid") at the switchover,
    /// while pages are still arriving. From then on the guest's touches of
    /// missing pages wait for them. An error from `resume` ends the
    /// migration: the source is told and keeps the guest, and the error is
    /// the source of the [`MigrateError::Resume`] returned.
    ///
    /// In post-copy, guest memory must be private anonymous. An error
    /// returned after `resume` was called means pages never arrived: the
    /// guest here is incomplete and must be stopped — its threads waiting
    /// on a missing page are released when this returns and find zeros.
    pub fn receive_and_run(
        mut self,
        mem: &GuestMemory,
        opts: &ReceiveOptions,
        resume: impl FnOnce() -> Result<(), HookError> + Send,
    ) -> Result<Report, MigrateError> {
        let handover = self.handover_regions();
        let streams: Vec<Link> = std::mem::take(&mut self.accepted.streams).into_iter().map(Link::new).collect();
        let (session, caps) = (self.accepted.hello.session, self.accepted.caps);
        if let Err(e) = layout_matches(mem, &self.accepted.hello.regions) {
            for s in &streams {
                s.current().0.send_error(ErrorCode::Layout, e.to_string());
            }
            return Err(MigrateError::Layout(e));
        }
        let post = if self.accepted.caps & CAP_POSTCOPY != 0 {
            match DestPost::new(mem) {
                Ok(p) => Some(p),
                Err(e) => {
                    let e = MigrateError::from(PostcopyError::Open(e));
                    for s in &streams {
                        s.current().0.send_error(ErrorCode::Unsupported, e.to_string());
                    }
                    return Err(e);
                }
            }
        } else {
            None
        };
        if opts.progress_timeout < pmigrate_transport::net::MIN_PROGRESS_TIMEOUT {
            return Err(TransportError::Setup(format!(
                "a progress timeout of {:?} is below {:?}, which keepalives need",
                opts.progress_timeout,
                pmigrate_transport::net::MIN_PROGRESS_TIMEOUT
            ))
            .into());
        }
        for l in &streams {
            let _ = pmigrate_transport::net::set_progress_timeout(l.current().0.tcp(), opts.progress_timeout);
        }
        let resolved = opts.io.resolve()?;
        let io = resolved.backend;
        let resume: ResumeHook<'_> = Box::new(resume);
        let mut offered = vec![false; mem.regions().len()];
        for r in &handover {
            offered[*r as usize] = true;
        }
        let shape = Shape {
            pages: mem.regions().iter().map(|r| r.pages()).collect(),
            offered: offered.clone(),
            lz4: caps & CAP_LZ4 != 0,
            postcopy: post.is_some(),
            streams: streams.len(),
        };
        let state = State {
            io,
            // TLS streams are sealed in this process: the portable backend.
            io_report: if streams.iter().any(|l| l.current().0.is_tls()) {
                "TLS, portable".into()
            } else {
                resolved.describe()
            },
            prio: shape.prio().unwrap_or(usize::MAX),
            rules: Mutex::new(DestSession::new(shape)),
            placer: Placer::new(mem, offered),
            post,
            resume: Mutex::new(Some(resume)),
            resumable: caps & CAP_RESUME != 0,
            tallies: streams.iter().map(|_| Tally::default()).collect(),
            streams_done: AtomicBool::new(false),
            post_digest: OnceLock::new(),
            complete: AtomicBool::new(false),
            started: Mutex::new(false),
            abort: AtomicBool::new(false),
            first_error: Mutex::new(None),
            last_progress: AtomicU64::new(0),
            latest_round: Mutex::new((0, Instant::now())),
            t0: Instant::now(),
        };
        // Lost streams come back through these, each proving the session's
        // secret: while the receivers run, and after the verdict, until the
        // source heard it (`confirm`).
        let comebacks = match (state.resumable, self.acceptor.take()) {
            (true, Some(acceptor)) => {
                let log = Arc::new(|peer: std::net::SocketAddr, why: String| {
                    tracing::info!(%peer, why, "connection refused while a session runs");
                });
                let key = self.accepted.key.clone();
                Some(Mutex::new(Resumes::start(acceptor, session, streams.len() as u16, caps, key, log)))
            }
            _ => None,
        };
        let results: Vec<Result<StreamOutcome, ()>> = std::thread::scope(|s| {
            let state = &state;
            let streams = &streams;
            let comebacks = comebacks.as_ref();
            if let Some(post) = &state.post {
                s.spawn(move || {
                    let res = post.handle_faults(mem, state.placer.locks(), |r, p, n| state.request(streams, r, p, n));
                    if let Err(e) = res {
                        state.fail(streams, state.prio, e.into());
                    }
                });
            }
            if let Some(r) = comebacks {
                s.spawn(move || {
                    // Lost streams come back here until every receiver is done.
                    let r = r.lock().expect("comebacks lock");
                    while !state.streams_done.load(Ordering::Acquire) && !state.abort.load(Ordering::Relaxed) {
                        // A short wait: the scope, and so the verdict,
                        // waits for this loop to see the receivers done.
                        if let Some((i, conn)) = r.next(END_TICK) {
                            if let Some(link) = streams.get(usize::from(i)) {
                                link.replace(conn);
                            }
                        }
                    }
                });
            }
            if let Some(post) = &state.post {
                s.spawn(move || {
                    if let Err(e) = state.complete_postcopy(streams, post) {
                        state.fail(streams, state.prio, e);
                    }
                });
            }
            // Keepalives, so the source can tell a destination that is busy
            // (verifying, placing) from one that is frozen or gone; and the
            // counts of frames received that a lull left untold. Never on a
            // connection that came back before its receiver told the count
            // there: that comes first.
            s.spawn(move || {
                let mut last = Instant::now();
                let mut looked = Instant::now();
                while !state.streams_done.load(Ordering::Acquire) && !state.abort.load(Ordering::Relaxed) {
                    // Every 50 ms, looking in between whether the receivers
                    // are done, which the verdict waits for.
                    std::thread::sleep(END_TICK);
                    if looked.elapsed() < Duration::from_millis(50) {
                        continue;
                    }
                    looked = Instant::now();
                    let keepalive = last.elapsed() >= KEEPALIVE_INTERVAL;
                    if keepalive {
                        last = Instant::now();
                    }
                    for (l, tally) in streams.iter().zip(&state.tallies) {
                        let Some(_w) = l.try_lock_writes() else { continue };
                        let (conn, gen) = l.current();
                        if gen != tally.told_on.load(Ordering::Acquire) && !tally.over.load(Ordering::Acquire) {
                            continue;
                        }
                        if state.resumable && tally.untold_for(state.t0) >= Some(ACK_INTERVAL) {
                            let _ = tally.tell(&conn, state.t0);
                        }
                        if keepalive {
                            let _ = write_frame(&mut &*conn, keepalive_frame(), "keepalive");
                        }
                    }
                }
            });
            let handles: Vec<_> = streams
                .iter()
                .enumerate()
                .map(|(i, st)| {
                    s.spawn(move || {
                        let res = state.receive_stream(streams, st, i, opts);
                        state.tallies[i].over.store(true, Ordering::Release);
                        res.map_err(|e| state.fail(streams, i, e))
                    })
                })
                .collect();
            let results = handles.into_iter().map(|h| h.join().expect("receiver panicked")).collect();
            tracing::debug!(secs = state.t0.elapsed().as_secs_f64(), "every stream's part received");
            state.streams_done.store(true, Ordering::Release);
            if let Some(post) = &state.post {
                post.end();
            }
            results
        });
        if let Some(e) = state.first_error.lock().expect("error lock").take() {
            return Err(e);
        }
        let outcomes: Vec<StreamOutcome> = results.into_iter().map(|r| r.expect("no error recorded")).collect();
        if let Some(post) = &state.post {
            return self.postcopy_report(&state, post, &streams, &outcomes);
        }
        let s0 = streams[0].current().0;
        let rules = state.rules();
        let digest = match rules.verdict(state.placer.digest()) {
            Ok(d) => d,
            Err((code, e)) => {
                s0.send_error(code, e.to_string());
                return Err(e);
            }
        };
        drop(rules);
        if opts.verify_memory {
            if let Err(e) = state.placer.verify_memory() {
                s0.send_error(ErrorCode::Digest, e.to_string());
                return Err(e);
            }
        }
        // The ownership rule (design.md): the guest starts here first, and
        // only then does the source hear `Verified` and let go of it. If it
        // cannot start here, the source is told and keeps it.
        let resume = state.resume.lock().expect("resume lock").take();
        if let Some(resume) = resume {
            if let Err(hook) = resume() {
                let why = crate::describe(&*hook);
                s0.send_error(ErrorCode::Aborted, format!("the guest could not start at the destination: {why}"));
                return Err(MigrateError::Resume(hook));
            }
        }
        tracing::debug!(secs = state.t0.elapsed().as_secs_f64(), "memory verified; telling the source");
        let f = Control::Verified { value: digest.0, closed: false }.encode();
        // The report is of the migration, which ends here: the wait for
        // the source to hear the verdict is not downtime.
        let mut report = self.report(&state, &streams, &outcomes, digest);
        state.confirm(&streams, comebacks.as_ref(), &f, opts.progress_timeout).map_err(MigrateError::Untold)?;
        report.reconnects = streams.iter().map(Link::replaced).sum();
        report.links = crate::report::LinkReport::of(&streams.iter().collect::<Vec<_>>(), self.t0);
        report::close_streams(&streams);
        Ok(report)
    }
}

/// How often threads that end with the receivers look whether they did:
/// the verdict waits for them.
const END_TICK: Duration = Duration::from_millis(5);

type ResumeHook<'a> = Box<dyn FnOnce() -> Result<(), HookError> + Send + 'a>;

struct State<'m> {
    /// The I/O backend of the streams.
    io: Backend,
    /// What the report says of it.
    io_report: String,
    /// The protocol's rules, asked about every message.
    rules: Mutex<DestSession>,
    /// Guest memory and what is known of each page.
    placer: Placer<'m>,
    /// Post-copy: the fault handling state, and the index of the priority
    /// stream (the last).
    post: Option<DestPost>,
    prio: usize,
    /// The embedder's hook that starts the guest here.
    resume: Mutex<Option<ResumeHook<'m>>>,
    /// Post-copy: the guest started here (its resume hook ran), so a
    /// failure from now on leaves it here ([`ErrorCode::Started`]).
    started: Mutex<bool>,
    /// Post-copy: every needed page arrived.
    complete: AtomicBool,
    /// With `CAP_RESUME`: lost streams may reconnect, and each stream's
    /// frames are counted back to the source.
    resumable: bool,
    /// Per stream: frames received and what the source was told.
    tallies: Vec<Tally>,
    /// Every stream receiver returned.
    streams_done: AtomicBool,
    /// Post-copy: the digest of the memory received, once complete.
    post_digest: OnceLock<Digest>,
    abort: AtomicBool,
    first_error: Mutex<Option<MigrateError>>,
    /// When any stream last delivered a frame, in milliseconds since
    /// `t0`: the session's sign of life.
    last_progress: AtomicU64,
    /// The latest round a page arrived from (its stamp), and when its
    /// first page arrived: the final round's start, for the downtime.
    latest_round: Mutex<(u32, Instant)>,
    t0: Instant,
}

impl State<'_> {
    /// Notes that a page of the round stamped `stamp` arrived.
    fn round_seen(&self, stamp: u32) {
        let mut latest = self.latest_round.lock().unwrap_or_else(|p| p.into_inner());
        if stamp > latest.0 {
            *latest = (stamp, Instant::now());
        }
    }

    /// How long no stream delivered anything.
    fn quiet_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_progress.load(Ordering::Relaxed));
        self.t0.elapsed().saturating_sub(last)
    }

    fn rules(&self) -> MutexGuard<'_, DestSession> {
        self.rules.lock().expect("rules lock")
    }
}

/// One stream's count of the frames received and processed (every kind but
/// keepalives, over all its connections), and what the source was told.
#[derive(Debug, Default)]
struct Tally {
    counted: AtomicU64,
    told: AtomicU64,
    /// When the count was last told, in milliseconds since the session's
    /// start.
    told_at: AtomicU64,
    /// The generation of the stream's connection that was told the count
    /// first: on a connection that came back, the count comes before
    /// anything else.
    told_on: AtomicU64,
    /// The stream's receiver returned: nobody will tell the count again.
    over: AtomicBool,
}

impl Tally {
    /// A frame was received and carried out.
    fn count(&self) -> u64 {
        self.counted.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// How long ago the count was last told, if there is news.
    fn untold_for(&self, t0: Instant) -> Option<Duration> {
        let told_at = Duration::from_millis(self.told_at.load(Ordering::Acquire));
        (self.counted.load(Ordering::Acquire) > self.told.load(Ordering::Acquire))
            .then(|| t0.elapsed().saturating_sub(told_at))
    }

    /// Tells the count on `conn` (the caller holds the link's writes).
    fn tell(&self, conn: &Conn, t0: Instant) -> Result<(), TransportError> {
        let frames = self.counted.load(Ordering::Acquire);
        write_frame(&mut &*conn, &Control::Received { frames }.encode(), "received")?;
        self.told.store(frames, Ordering::Release);
        self.told_at.store(t0.elapsed().as_millis() as u64, Ordering::Release);
        Ok(())
    }
}

#[derive(Default)]
struct StreamOutcome {
    bytes: u64,
    frames: u64,
}

impl State<'_> {
    /// Tells the source the verdict (`verified`, a `Verified` frame) on
    /// stream 0, and in a resumable session makes sure it heard it
    /// ([`Confirm`] decides when). A stream that breaks first may come
    /// back, as the source redials until it hears the verdict: it is told
    /// its count (`Received`), as every comeback is, and stream 0 the
    /// verdict again.
    fn confirm(
        &self,
        streams: &[Link],
        comebacks: Option<&Mutex<Resumes>>,
        verified: &[u8],
        patience: Duration,
    ) -> Result<(), TransportError> {
        let s0 = &streams[0];
        let write = |conn: &Conn| write_frame(&mut &*conn, verified, "stream 0");
        let first = {
            let _w = s0.lock_writes();
            write(&s0.current().0)
        };
        let Some(r) = comebacks else { return first };
        let r = r.lock().expect("comebacks lock");
        let mut confirm = Confirm::new(first.is_ok(), Instant::now(), patience);
        let mut buf = [0u8; 4096];
        loop {
            while let Some((i, conn)) = r.next(Duration::ZERO) {
                let Some(link) = streams.get(usize::from(i)) else { continue };
                link.replace(conn);
                let (c, _) = link.current();
                let _w = link.lock_writes();
                let told = self.tallies[usize::from(i)].tell(&c, self.t0);
                if i == 0 {
                    let again = told.and_then(|()| write(&c)).is_ok();
                    if again {
                        tracing::info!("stream 0 came back after the verdict; told it again");
                    }
                    confirm.came_back(again, Instant::now());
                }
            }
            match confirm.next(Instant::now()) {
                ConfirmStep::Lost => return first,
                ConfirmStep::Heard => return Ok(()),
                ConfirmStep::Wait => std::thread::sleep(Duration::from_millis(20)),
                ConfirmStep::Read => {
                    let (c, _) = s0.current();
                    let _ = c.set_read_timeout(Some(Duration::from_millis(50)));
                    let read = match std::io::Read::read(&mut &*c, &mut buf) {
                        // The source closes without a TLS close_notify:
                        // an end of stream all the same.
                        Ok(0) => Read::Closed,
                        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Read::Closed,
                        Ok(_) => Read::Nothing,
                        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                            Read::Nothing
                        }
                        Err(_) => Read::Broken,
                    };
                    confirm.on_read(read, Instant::now());
                }
            }
        }
    }

    /// Records the first error, tells the source why, and closes every
    /// stream so the other receivers stop.
    fn fail(&self, streams: &[Link], index: usize, e: MigrateError) {
        if self.abort.swap(true, Ordering::AcqRel) {
            return; // a consequence of the first failure
        }
        let code = match &e {
            MigrateError::Transport(TransportError::Wire {
                source: pmigrate_transport::WireError::Checksum { .. },
                ..
            }) => ErrorCode::Checksum,
            MigrateError::Transport(TransportError::Wire { .. }) | MigrateError::Protocol { .. } => ErrorCode::Protocol,
            _ => ErrorCode::Aborted,
        };
        // Whatever failed, the source must learn whether the guest started
        // here: then it is this end's, incomplete.
        let code = if *self.started.lock().expect("start lock") { ErrorCode::Started } else { code };
        let msg = crate::describe(&e);
        // The failing stream, stream 0 and the priority stream: the source
        // hears the verdict on the last two.
        let mut told = vec![index, 0];
        told.extend(self.post.as_ref().map(|_| self.prio));
        told.sort_unstable();
        told.dedup();
        for i in told {
            let _w = streams[i].lock_writes();
            streams[i].current().0.send_error(code, msg.clone());
        }
        *self.first_error.lock().expect("error lock") = Some(e);
        for s in streams {
            s.shutdown();
        }
        if let Some(post) = &self.post {
            post.end();
        }
    }

    fn receive_stream(
        &self,
        streams: &[Link],
        link: &Link,
        index: usize,
        opts: &ReceiveOptions,
    ) -> Result<StreamOutcome, MigrateError> {
        let reader_on = |s: &Arc<Conn>| -> Result<FrameReader<StreamIn>, MigrateError> {
            s.set_read_timeout(Some(READ_TICK)).map_err(|e| TransportError::io(format!("stream {index}"), e))?;
            let conn = s.try_clone().map_err(|e| TransportError::io(format!("stream {index}"), e))?;
            let mut r = frame_reader(conn, self.io, format!("stream {index}"))?;
            r.set_stall_limit(opts.progress_timeout);
            r.set_idle_limit(opts.progress_timeout);
            Ok(r)
        };
        let wire = |source| MigrateError::from(TransportError::Wire { what: format!("stream {index}"), source });
        let mut cur = link.current();
        let mut reader = reader_on(&cur.0)?;
        let mut opener = Opener::default();
        let mut out = StreamOutcome::default();
        let tally = &self.tallies[index];
        // Tells the source the count on the current connection.
        let tell = |cur: &Arc<Conn>| {
            let _w = link.lock_writes();
            tally.tell(cur, self.t0)
        };
        loop {
            let switched = self.rules().switched(index);
            let res = match reader.next_frame() {
                Ok(None) if self.complete.load(Ordering::Acquire) => return Ok(out),
                // Streams close only after the end: this one was cut (a
                // source that gives up says so first).
                Ok(None) if self.resumable && !self.abort.load(Ordering::Relaxed) => {
                    Err(TransportError::Closed(format!("stream {index}: before the migration completed")))
                }
                other => other,
            };
            // Before the switchover only a broken connection may come back,
            // not a frame that breaks the protocol.
            let lost =
                |e: &TransportError| switched || matches!(e, TransportError::Io { .. } | TransportError::Closed(_));
            let next = match res {
                Ok(f) => f,
                // After the switchover, a broken connection may come back.
                Err(_) if self.complete.load(Ordering::Acquire) => return Ok(out),
                // A quiet stream is fine while the session shows life
                // elsewhere; a source silent everywhere is frozen or gone.
                Err(TransportError::Idle(..)) if self.quiet_for() < opts.progress_timeout => continue,
                Err(TransportError::Idle(what, _)) => {
                    let quiet = self.quiet_for();
                    return Err(match &self.post {
                        Some(p) if switched => {
                            let missing = p.missing.load(Ordering::Relaxed);
                            PostcopyError::Silent { stream: index, quiet, missing }.into()
                        }
                        _ => TransportError::Setup(format!(
                            "{what}: nothing from the source on any stream for {quiet:?}: it is frozen or gone"
                        ))
                        .into(),
                    });
                }
                Err(e) if lost(&e) && self.rules().may_come_back(index, self.resumable) => {
                    tracing::warn!(stream = index, error = %e, "stream lost; waiting for the source to reconnect it");
                    link.note_lost(cur.1);
                    let Some(next) = self.await_comeback(link, index, cur.1, e, opts)? else {
                        return Ok(out); // every page arrived meanwhile
                    };
                    cur = next;
                    reader = reader_on(&cur.0)?;
                    // The count first: the source sends again what follows
                    // it. (Lost again, the next read says so.)
                    let _ = tell(&cur.0);
                    tally.told_on.store(cur.1, Ordering::Release);
                    self.rules().reconnected(index);
                    tracing::info!(stream = index, "stream reconnected");
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            self.last_progress.store(self.t0.elapsed().as_millis() as u64, Ordering::Relaxed);
            let Some((hdr, payload)) = next else {
                if index == self.prio && self.complete.load(Ordering::Acquire) {
                    return Ok(out);
                }
                return Err(if self.abort.load(Ordering::Relaxed) {
                    MigrateError::Aborted
                } else {
                    TransportError::Closed(format!("stream {index}: before the migration completed")).into()
                });
            };
            out.bytes += (pmigrate_transport::frame::HEADER_LEN + payload.len()) as u64;
            out.frames += 1;
            let msg = Message::decode(hdr, payload).map_err(wire)?;
            let counts = !matches!(msg, Message::Control(Control::Keepalive));
            if let Message::Control(Control::RoundEnd { round, last: true, .. }) = msg {
                // A final round without pages starts, as far as this end
                // can tell, with its end.
                self.round_seen(u32::try_from(round.0 + 1).unwrap_or(u32::MAX));
            }
            let step = self.rules().on_message(index, msg)?;
            // Counted once carried out: a probe whose answer could not be
            // written comes again.
            let done = |ended: bool| {
                if !self.resumable || !counts {
                    return;
                }
                let n = tally.count();
                if ended || n - tally.told.load(Ordering::Acquire) >= ACK_EVERY {
                    let _ = tell(&cur.0);
                }
            };
            match step {
                Step::Nothing => {}
                Step::Place { frame, stamp, post } => {
                    self.round_seen(stamp);
                    let opened = frame.open(&mut opener).map_err(wire)?;
                    match &self.post {
                        Some(p) if post => self.placer.apply_post(p, frame.range(), opened, stamp)?,
                        _ => self.placer.apply(frame.range(), opened, stamp)?,
                    }
                }
                Step::Answer { region, ask, places } => {
                    let answer = shared::answer(self.placer.mem(), region, ask, &places).map_err(|e| match e {
                        shared::ProbeError::Memory(e) => MigrateError::Memory(e),
                        e => session::protocol(index, e.to_string()),
                    })?;
                    let f = Control::ProbeReply(answer).encode();
                    let _w = link.lock_writes();
                    if let Err(e) = write_frame(&mut &*cur.0, &f, &format!("stream {index}")) {
                        // Not counted: if the stream comes back, the probe
                        // comes again.
                        if self.resumable {
                            continue;
                        }
                        return Err(e.into());
                    }
                }
                Step::Need(need) => {
                    let post = self.post.as_ref().expect("the rules allow a switchover in post-copy only");
                    let r = need.range;
                    post.mark_needed(r.region.as_usize(), r.start.0, need.bits, r.len());
                }
                Step::Marker => {
                    let post = self.post.as_ref().expect("the rules allow a switchover in post-copy only");
                    let round = self.rules().switch_round().expect("a marker sets the round");
                    post.round.store(round, Ordering::Release);
                    post.arrive();
                    if index == 0 {
                        self.switch_over(streams, post)?;
                    } else if !post.wait_running(&self.abort) {
                        return Err(MigrateError::Aborted);
                    }
                }
                Step::End => {
                    // The last count, so the source need keep nothing.
                    done(true);
                    return Ok(out);
                }
            }
            done(false);
        }
    }

    /// Waits for stream `index`, lost in pre-copy or after its switchover
    /// marker, to come back on a new connection (newer than `gen`), while
    /// the session shows life and within [`session::RESUME_WINDOW`]; `None` if every
    /// page arrived meanwhile (post-copy).
    fn await_comeback(
        &self,
        link: &Link,
        index: usize,
        gen: u64,
        lost: TransportError,
        opts: &ReceiveOptions,
    ) -> Result<Option<(Arc<Conn>, u64)>, MigrateError> {
        let t = Instant::now();
        loop {
            if self.complete.load(Ordering::Acquire) {
                return Ok(None);
            }
            if self.abort.load(Ordering::Relaxed) {
                return Err(MigrateError::Aborted);
            }
            if let Some(next) = link.wait_newer(gen, postcopy::TICK) {
                return Ok(Some(next));
            }
            let quiet = self.quiet_for();
            let (wait, switched) = {
                let rules = self.rules();
                (
                    rules.comeback_wait(index, self.resumable, t.elapsed(), quiet, opts.progress_timeout),
                    rules.switched(index),
                )
            };
            if let Err(why) = wait {
                if !switched {
                    return Err(MigrateError::Lost { stream: index, lost, why });
                }
                let missing = self.post.as_ref().map_or(0, |p| p.missing.load(Ordering::Relaxed));
                return Err(PostcopyError::NotReconnected { stream: index, lost, quiet, missing }.into());
            }
        }
    }
}
