//! Source streams: one writer per stream draining its bounded queue to the
//! socket, and one listener per stream for what the destination says.
//!
//! With `CAP_RESUME` every frame a writer sends is recorded in its stream's
//! [`Ledger`] until the destination counts it; after a lost connection the
//! writer waits for the destination's count on the new one and sends
//! again, in order, what the old one swallowed (`super::log`), before
//! anything new.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use hdrhistogram::Histogram;
use pmigrate_ranges::PageRange;
use pmigrate_transport::backend::{Backend, FrameWriter};
use pmigrate_transport::backend::{FramePool, Outgoing};
use pmigrate_transport::message::{Control, Digest, Message, Round};
use pmigrate_transport::net::{keepalive_frame, write_frame, FrameReader, KEEPALIVE_INTERVAL};
use pmigrate_transport::{Conn, Link, TransportError};

use super::log::{LogError, Sent, SentLog};
use super::rules::{Heard, RoundCounter};
use super::session::{self, SourceSession};
use super::Progress;
use crate::MigrateError;

/// What a stream's queue carries.
pub(super) enum Msg {
    /// A sealed `Pages` frame (in the zero-copy arena or on the heap), the
    /// pages and round it carries, and when it was sealed.
    Frame {
        frame: Outgoing,
        pages: PageRange,
        round: u64,
        sealed: Instant,
    },
    /// A control frame built by the coordinator (probes).
    Control(Vec<u8>),
    RoundEnd {
        round: u64,
        last: bool,
    },
    Done {
        digest: Digest,
    },
}

#[derive(Default)]
pub(super) struct StreamStats {
    pub(super) bytes: AtomicU64,
    pub(super) frames: AtomicU64,
    /// Frames written again after a lost connection.
    pub(super) resent: AtomicU64,
    /// The stream's writer sends arena frames zero-copy (the kernel took
    /// the registration).
    pub(super) zero_copy: AtomicBool,
}

/// Reconnects a stream whose connection of the given generation failed
/// with the given error, when the session allows; else returns the error.
pub(super) type Redial<'a> = dyn Fn(u64, TransportError) -> Result<(Arc<Conn>, u64), TransportError> + Sync + 'a;

/// Writes whole frames to a link, reconnecting (and writing the frame
/// again, whole) when its connection breaks and `redial` allows.
pub(super) struct Writer<'a> {
    pub(super) link: &'a Link,
    pub(super) cur: (Arc<Conn>, u64),
    pub(super) redial: &'a Redial<'a>,
    pub(super) name: String,
    /// The session: once settled, what is left to write is moot.
    pub(super) state: &'a Mutex<SourceSession>,
}

/// Whether the session settled (its verdict is in, or it failed).
fn settled(state: &Mutex<SourceSession>) -> bool {
    session::lock(state).settled()
}

impl Writer<'_> {
    /// Writes one frame with a blocking write (the listener's answers:
    /// one at a time, at once).
    pub(super) fn write(&mut self, frame: &[u8]) -> Result<(), TransportError> {
        loop {
            if settled(self.state) {
                return Ok(());
            }
            let res = {
                let _one = self.link.lock_writes();
                write_frame(&mut &*self.cur.0, frame, &self.name)
            };
            match res {
                Ok(()) => return Ok(()),
                Err(e) => self.cur = (self.redial)(self.cur.1, e)?,
            }
        }
    }
}

/// A stream's [`SentLog`], shared by its sender, which records what it
/// writes and sends again what a lost connection swallowed, and its
/// listener, which trims it on each of the destination's counts.
#[derive(Debug, Default)]
pub(super) struct Ledger {
    state: Mutex<LedgerState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct LedgerState {
    log: SentLog,
    /// The connection generation the latest count came on.
    counted_on: Option<u64>,
    /// Another thread wrote on the stream too (the priority stream's
    /// listener, answering page requests after the switchover): the
    /// destination's count no longer matches the log, which is dropped.
    /// Frames lost from then on are post-copy's to recover (requests).
    untracked: bool,
}

impl Ledger {
    fn state(&self) -> std::sync::MutexGuard<'_, LedgerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The sender handed this frame to the connection.
    fn record(&self, s: Sent) -> Result<(), LogError> {
        let mut st = self.state();
        if st.untracked {
            return Ok(());
        }
        st.log.push(s)
    }

    /// The destination counts `frames` frames of the stream, said on the
    /// connection of generation `gen`.
    pub(super) fn counted(&self, frames: u64, gen: u64) -> Result<(), LogError> {
        let mut st = self.state();
        if !st.untracked {
            st.log.ack(frames)?;
        }
        st.counted_on = Some(st.counted_on.map_or(gen, |g| g.max(gen)));
        self.changed.notify_all();
        Ok(())
    }

    /// Another writer takes a share of the stream: the log stops.
    pub(super) fn untrack(&self) {
        let mut st = self.state();
        st.untracked = true;
        st.log = SentLog::default();
        self.changed.notify_all();
    }

    fn tracked(&self) -> bool {
        !self.state().untracked
    }

    /// What to send again on the connection of generation `gen`, once the
    /// destination's count came on it: `None` if the log stopped meanwhile
    /// or `stop` says so; an error after `limit` without the count.
    fn after_count_on(&self, gen: u64, limit: Duration, stop: &dyn Fn() -> bool) -> Result<Option<Vec<Sent>>, ()> {
        let t = Instant::now();
        let mut st = self.state();
        loop {
            if st.untracked || stop() {
                return Ok(None);
            }
            if st.counted_on.is_some_and(|g| g >= gen) {
                return Ok(Some(st.log.unacked().cloned().collect()));
            }
            if t.elapsed() >= limit {
                return Err(());
            }
            st = self.changed.wait_timeout(st, TICK).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Waits up to a tick for a change; whether everything sent was
    /// counted (or the log stopped), and the count so far.
    fn settled_after_tick(&self) -> (bool, u64) {
        let st = self.state();
        let st = if st.untracked || st.log.is_empty() {
            st
        } else {
            self.changed.wait_timeout(st, TICK).unwrap_or_else(|p| p.into_inner()).0
        };
        (st.untracked || st.log.is_empty(), st.log.acked())
    }
}

/// How often an idle sender looks for a replaced connection.
const TICK: Duration = Duration::from_millis(100);

/// Builds a `Pages` frame of these pages and round again from guest memory.
pub(super) type Rebuild<'a> = dyn Fn(PageRange, u64) -> Result<Vec<u8>, MigrateError> + Sync + 'a;

/// A stream's sender: frames from the queue to the link through the I/O
/// backend, as many at once as are waiting. After a broken connection
/// the frames the destination did not count go again, in order, on the
/// new one (without the ledger: every frame not wholly written).
struct BatchWriter<'a> {
    out: Writer<'a>,
    backend: Backend,
    /// The arena whose frames go out zero-copy.
    zero_copy: Option<&'a FramePool>,
    /// The backend's writer on connection generation `out.cur.1`.
    w: FrameWriter,
    index: usize,
    ledger: &'a Ledger,
    rebuild: &'a Rebuild<'a>,
    stats: &'a StreamStats,
    abort: &'a AtomicBool,
    /// How long the destination may take to say what it counted on a
    /// connection that came back.
    patience: Duration,
}

impl<'a> BatchWriter<'a> {
    /// The backend's writer on a connection of the link.
    fn writer(conn: &Conn, backend: Backend, zc: Option<&FramePool>) -> Result<FrameWriter, TransportError> {
        let conn = conn.try_clone().map_err(|e| TransportError::io("stream", e))?;
        FrameWriter::new(conn, backend, zc)
    }

    fn settled(&self) -> bool {
        settled(self.out.state)
    }

    /// Goes on over connection `next` of the link.
    fn switch_to(&mut self, next: (Arc<Conn>, u64)) -> Result<(), TransportError> {
        self.out.cur = next;
        self.w = Self::writer(&self.out.cur.0, self.backend, self.zero_copy)?;
        Ok(())
    }

    /// Before anything new: if the link's connection was replaced (by the
    /// listener, or after a failed write), sends again what the old one
    /// swallowed.
    fn catch_up(&mut self) -> Result<(), MigrateError> {
        let now = self.out.link.current();
        if now.1 > self.out.cur.1 {
            self.switch_to(now)?;
            if self.ledger.tracked() {
                self.resync()?;
            }
        }
        Ok(())
    }

    /// Writes `frames` (and records what they are) wholly, in order; hands
    /// back the buffers.
    fn write(&mut self, frames: Vec<(Outgoing, Option<Sent>)>) -> Result<Vec<Outgoing>, MigrateError> {
        if self.settled() {
            return Ok(Vec::new());
        }
        self.catch_up()?;
        let mut todo = Vec::with_capacity(frames.len());
        for (f, what) in frames {
            if let Some(s) = what {
                let stream = self.index;
                self.ledger.record(s).map_err(|e| MigrateError::Protocol { stream, why: e.to_string() })?;
            }
            todo.push(f);
        }
        loop {
            if self.settled() {
                return Ok(Vec::new());
            }
            let res = {
                // One batch at a time on the link: the listener answers
                // page requests on the same connection between batches.
                let _one = self.out.link.lock_writes();
                let mut it = todo.into_iter();
                let mut res = it.by_ref().try_for_each(|f| self.w.send(f));
                if res.is_ok() {
                    res = self.w.flush();
                }
                res.map_err(|mut f| {
                    f.unsent.extend(it);
                    f
                })
            };
            match res {
                Ok(()) => return Ok(self.w.take_done()),
                Err(f) => {
                    let e = TransportError::io(format!("{}: write", self.out.name), f.error);
                    let next = (self.out.redial)(self.out.cur.1, e)?;
                    self.switch_to(next)?;
                    if self.ledger.tracked() {
                        // The ledger holds this batch too.
                        self.resync()?;
                        return Ok(Vec::new());
                    }
                    todo = f.unsent;
                }
            }
        }
    }

    /// On a connection that came back: waits for the destination's count
    /// on it, then sends every frame past it again, in order — page frames
    /// rebuilt from guest memory now, the rest as they were.
    fn resync(&mut self) -> Result<(), MigrateError> {
        loop {
            let gen = self.out.cur.1;
            let stop = || self.abort.load(Ordering::Relaxed) || settled(self.out.state);
            let todo = match self.ledger.after_count_on(gen, self.patience, &stop) {
                Ok(Some(todo)) => todo,
                Ok(None) if self.abort.load(Ordering::Relaxed) => return Err(MigrateError::Aborted),
                Ok(None) => return Ok(()),
                Err(()) => {
                    return Err(MigrateError::Protocol {
                        stream: self.index,
                        why: format!(
                            "came back, but the destination did not say within {:?} what it received",
                            self.patience
                        ),
                    })
                }
            };
            tracing::info!(stream = self.index, frames = todo.len(), "stream came back; sending again what was lost");
            let mut failed = None;
            for chunk in todo.chunks(BATCH) {
                let mut frames = Vec::with_capacity(chunk.len());
                for s in chunk {
                    frames.push(self.rebuilt(s)?);
                }
                let n = frames.len() as u64;
                let bytes: u64 = frames.iter().map(|f| f.len() as u64).sum();
                let res = {
                    let _one = self.out.link.lock_writes();
                    let mut res = frames.into_iter().try_for_each(|f| self.w.send(f));
                    if res.is_ok() {
                        res = self.w.flush();
                    }
                    res
                };
                if let Err(f) = res {
                    failed = Some(f.error);
                    break;
                }
                drop(self.w.take_done());
                self.stats.resent.fetch_add(n, Ordering::Relaxed);
                self.stats.bytes.fetch_add(bytes, Ordering::Relaxed);
                self.out.link.note_resent(n);
            }
            let Some(error) = failed else { return Ok(()) };
            // Lost again: another comeback, another count.
            let e = TransportError::io(format!("{}: write", self.out.name), error);
            let next = (self.out.redial)(self.out.cur.1, e)?;
            self.switch_to(next)?;
        }
    }

    /// A logged frame, built again.
    fn rebuilt(&self, s: &Sent) -> Result<Outgoing, MigrateError> {
        Ok(match s {
            Sent::Pages { range, round } => (self.rebuild)(*range, *round)?.into(),
            Sent::RoundEnd { round, frames, last } => {
                Control::RoundEnd { round: Round(*round), frames: *frames, last: *last }.encode().into()
            }
            Sent::Control(f) => f.clone().into(),
        })
    }

    /// Everything queued went out: stays until the destination counted it
    /// all, to send again what a connection lost meanwhile swallowed; gives
    /// up waiting (the listener and the verdict decide then) when the
    /// count does not move for `limit`.
    fn linger(&mut self, limit: Duration) -> Result<(), MigrateError> {
        let mut last = (Instant::now(), u64::MAX);
        loop {
            if self.settled() || self.abort.load(Ordering::Relaxed) {
                return Ok(());
            }
            self.catch_up()?;
            let (done, counted) = self.ledger.settled_after_tick();
            if done {
                return Ok(());
            }
            if counted != last.1 {
                last = (Instant::now(), counted);
            } else if last.0.elapsed() >= limit {
                return Ok(());
            }
        }
    }
}

/// Frames in one batch at most (io_uring submits them as one chain).
const BATCH: usize = pmigrate_transport::backend::URING_DEPTH;

/// The run's flags a sender reads and sets.
#[derive(Clone, Copy)]
pub(super) struct Flags<'a> {
    /// Set on failure; read by everyone.
    pub(super) abort: &'a AtomicBool,
    /// The session: settled once the verdict is in; told when `Done` was
    /// written.
    pub(super) state: &'a Mutex<SourceSession>,
}

/// What a sender writes on: its stream's link, how it comes back, and its
/// ledger.
pub(super) struct Out<'a> {
    pub(super) link: &'a Link,
    pub(super) index: usize,
    pub(super) redial: &'a Redial<'a>,
    pub(super) ledger: &'a Ledger,
    pub(super) rebuild: &'a Rebuild<'a>,
    /// The progress timeout: how long the destination may take to count.
    pub(super) patience: Duration,
}

#[allow(clippy::too_many_arguments)]
pub(super) fn sender(
    to: Out<'_>,
    rx: Receiver<Msg>,
    pool: Sender<Vec<u8>>,
    stats: &StreamStats,
    progress: &Progress,
    flags: Flags<'_>,
    backend: Backend,
    zero_copy: Option<&FramePool>,
) -> Result<Histogram<u64>, MigrateError> {
    let Out { link, index, redial, ledger, rebuild, patience } = to;
    let name = format!("stream {index}");
    let mut counter = RoundCounter::default();
    // Microseconds from a frame sealed to its last byte handed to the kernel.
    let mut latency = crate::report::LatencySummary::histogram();
    let Flags { abort, state } = flags;
    let res = (|| {
        let out = Writer { link, cur: link.current(), redial, name, state };
        let w = BatchWriter::writer(&out.cur.0, backend, zero_copy)?;
        let mut out = BatchWriter { out, backend, zero_copy, w, index, ledger, rebuild, stats, abort, patience };
        stats.zero_copy.store(out.w.zero_copy(), Ordering::Relaxed);
        let mut batch = Vec::with_capacity(BATCH);
        let mut sealed = Vec::with_capacity(BATCH);
        let mut has_done = false;
        let mut wrote = Instant::now();
        loop {
            let first = match rx.recv_timeout(TICK) {
                Ok(m) => m,
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    // A connection that came back gets what it lacks now,
                    // not with the next frame.
                    out.catch_up()?;
                    // Nothing to send for a while: say we are still here
                    // (not recorded: the destination does not count it).
                    if wrote.elapsed() >= KEEPALIVE_INTERVAL {
                        out.write(vec![(keepalive_frame().to_vec().into(), None)])?;
                        wrote = Instant::now();
                    }
                    continue;
                }
            };
            // Whatever else is queued goes in the same batch.
            let more = std::iter::from_fn(|| rx.try_recv().ok()).take(BATCH - 1);
            for msg in std::iter::once(first).chain(more) {
                let (frame, what) = match msg {
                    Msg::Frame { frame, pages, round, sealed: at } => {
                        sealed.push(at);
                        counter.sent_pages();
                        stats.frames.fetch_add(1, Ordering::Relaxed);
                        progress.wire_bytes.fetch_add(frame.len() as u64, Ordering::Relaxed);
                        (frame, Sent::Pages { range: pages, round })
                    }
                    Msg::RoundEnd { round, last } => {
                        let c = counter.end(round, last);
                        let Control::RoundEnd { frames, .. } = c else { unreachable!("a round end") };
                        (c.encode().into(), Sent::RoundEnd { round, frames, last })
                    }
                    Msg::Control(f) => (f.clone().into(), Sent::Control(f)),
                    Msg::Done { digest } => {
                        has_done = true;
                        let f = Control::Done(digest).encode();
                        (f.clone().into(), Sent::Control(f))
                    }
                };
                stats.bytes.fetch_add(frame.len() as u64, Ordering::Relaxed);
                batch.push((frame, Some(what)));
            }
            // Heap buffers go back to the workers' pool; arena slots return
            // to the arena when dropped.
            for buf in out.write(std::mem::take(&mut batch))? {
                if let Outgoing::Vec(v) = buf {
                    let _ = pool.try_send(v);
                }
            }
            wrote = Instant::now();
            if has_done {
                session::lock(state).done_written();
            }
            for at in sealed.drain(..) {
                latency.saturating_record(at.elapsed().as_micros() as u64);
            }
        }
        out.linger(patience)?;
        Ok::<(), MigrateError>(())
    })();
    if res.is_err() {
        abort.store(true, Ordering::Relaxed);
    }
    res.map(|()| latency)
}

/// Where a stream's listener passes what the destination says.
pub(super) struct Listen<'a> {
    /// The outcome: `Verified`'s digest, or the error.
    pub(super) verdict: Sender<Result<Digest, MigrateError>>,
    /// Probe replies (stream 0).
    pub(super) probes: Sender<Vec<u64>>,
    /// Post-copy: answers page requests (the priority stream only).
    pub(super) answer: Option<super::requests::Answerer<'a>>,
    /// The session, which judges what the destination says: the
    /// switchover's state, the guest running there, the verdict.
    pub(super) state: &'a Mutex<SourceSession>,
    /// What the stream sent, trimmed on each of the destination's counts.
    pub(super) ledger: &'a Ledger,
}

/// Reads what the destination says on a stream: probe replies (stream 0),
/// page requests and the switchover's answer (priority stream), its counts
/// of frames received (any stream, any time), then `Verified` on stream 0
/// at the end, or an `Error` at any time; reports the outcome on
/// `verdict`.
pub(super) fn listener(
    link: &Link,
    index: usize,
    mut to: Listen<'_>,
    abort: &AtomicBool,
    redial: &Redial<'_>,
    progress_timeout: std::time::Duration,
) {
    let mut cur = link.current();
    let prio = to.answer.is_some();
    // Answers go out from this thread at once, on the same connection.
    let mut reply = Writer { link, cur: cur.clone(), redial, name: format!("stream {index}"), state: to.state };
    let session = || session::lock(to.state);
    let outcome = 'conn: loop {
        let mut r = FrameReader::new(&*cur.0, format!("stream {index}"));
        // The destination says Keepalive while busy: silence this long
        // means it is frozen or gone.
        let _ = cur.0.set_read_timeout(Some(std::time::Duration::from_millis(500)));
        r.set_idle_limit(progress_timeout);
        r.set_stall_limit(progress_timeout);
        break loop {
            let wire = |source| MigrateError::from(TransportError::Wire { what: format!("stream {index}"), source });
            let said = match r.next_frame() {
                Ok(Some((h, p))) => Message::decode(h, p)
                    .map_err(wire)
                    .and_then(|m| session().on_message(index, prio, m, Instant::now())),
                // The destination closes its streams once done; before that, a
                // closed stream was cut and may be reconnected. In pre-copy
                // the verdict comes on stream 0 whatever the others do; after
                // a post-copy switchover a stream that cannot come back ends
                // the session.
                Ok(None) => match redial(cur.1, TransportError::Closed(format!("stream {index}: closed"))) {
                    Ok(next) => {
                        cur = next;
                        continue 'conn;
                    }
                    Err(_) if session().settled() || !session().switched() => return,
                    Err(e) => break Err(e.into()),
                },
                // The destination's own word ends the session, whatever
                // state it is in.
                Err(e @ TransportError::Peer(_)) => break Err(e.into()),
                // A broken connection (not a clean close) may be reconnected.
                Err(e) => match redial(cur.1, e) {
                    Ok(next) => {
                        cur = next;
                        continue 'conn;
                    }
                    Err(e) => break Err(e.into()),
                },
            };
            match said {
                Ok(Heard::Nothing) => {}
                Ok(Heard::Received(n)) => {
                    if let Err(e) = to.ledger.counted(n, cur.1) {
                        break Err(MigrateError::Protocol { stream: index, why: e.to_string() });
                    }
                }
                Ok(Heard::ProbeReply(v)) => {
                    let _ = to.probes.send(v);
                }
                Ok(Heard::Request(range)) => {
                    let ans = to.answer.as_mut().expect("requests come on the priority stream");
                    // From now on this thread writes on the stream too.
                    to.ledger.untrack();
                    let sent = ans.answer(range).and_then(|f| {
                        reply.cur = link.current();
                        reply.write(f).map_err(MigrateError::from)
                    });
                    if let Err(e) = sent {
                        break Err(e);
                    }
                }
                // Noted by the session, as is the verdict, which settles it.
                Ok(Heard::Running) => {}
                Ok(Heard::Verified(d)) => break Ok(d),
                Err(e) => break Err(e),
            }
        };
    };
    if outcome.is_err() {
        abort.store(true, Ordering::Relaxed);
    }
    let _ = to.verdict.send(outcome);
}
