//! Source streams: one writer per stream draining its bounded queue to the
//! socket, and one listener per stream for what the destination says.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use hdrhistogram::Histogram;
use pmigrate_transport::backend::{Backend, FrameWriter};
use pmigrate_transport::backend::{FramePool, Outgoing};
use pmigrate_transport::message::{Control, Digest, Message};
use pmigrate_transport::net::{keepalive_frame, write_frame, FrameReader, KEEPALIVE_INTERVAL};
use pmigrate_transport::{Conn, Link, TransportError};

use super::rules::{heard, Heard, RoundCounter};
use super::Progress;
use crate::MigrateError;

/// What a stream's queue carries.
pub(super) enum Msg {
    /// A sealed frame (in the zero-copy arena or on the heap) and when it
    /// was sealed.
    Frame(Outgoing, Instant),
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
    /// The destination's verdict is in: what is left to write is moot.
    pub(super) settled: &'a AtomicBool,
}

impl Writer<'_> {
    /// Writes one frame with a blocking write (the listener's answers:
    /// one at a time, at once).
    pub(super) fn write(&mut self, frame: &[u8]) -> Result<(), TransportError> {
        loop {
            if self.settled.load(Ordering::Acquire) {
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

/// A stream's sender: frames from the queue to the link through the I/O
/// backend, as many at once as are waiting; after a broken connection,
/// every frame not wholly written goes again, whole and in order, on the
/// new one.
struct BatchWriter<'a> {
    out: Writer<'a>,
    backend: Backend,
    /// The arena whose frames go out zero-copy.
    zero_copy: Option<&'a FramePool>,
    /// The backend's writer on connection generation `out.cur.1`.
    w: FrameWriter,
}

impl<'a> BatchWriter<'a> {
    fn new(out: Writer<'a>, backend: Backend, zero_copy: Option<&'a FramePool>) -> Result<Self, TransportError> {
        let w = Self::writer(&out.cur.0, backend, zero_copy)?;
        Ok(Self { out, backend, zero_copy, w })
    }

    /// The backend's writer on a connection of the link.
    fn writer(conn: &Conn, backend: Backend, zc: Option<&FramePool>) -> Result<FrameWriter, TransportError> {
        let conn = conn.try_clone().map_err(|e| TransportError::io("stream", e))?;
        FrameWriter::new(conn, backend, zc)
    }

    /// Writes `frames` wholly, in order; hands back the buffers.
    fn write(&mut self, frames: Vec<Outgoing>) -> Result<Vec<Outgoing>, TransportError> {
        let mut todo = frames;
        loop {
            if self.out.settled.load(Ordering::Acquire) {
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
                    self.out.cur = (self.out.redial)(self.out.cur.1, e)?;
                    self.w = Self::writer(&self.out.cur.0, self.backend, self.zero_copy)?;
                    todo = f.unsent;
                }
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
    /// The destination's verdict is in.
    pub(super) settled: &'a AtomicBool,
    /// Set once `Done` was written.
    pub(super) done: &'a AtomicBool,
}

#[allow(clippy::too_many_arguments)]
pub(super) fn sender(
    link: &Link,
    index: usize,
    rx: Receiver<Msg>,
    pool: Sender<Vec<u8>>,
    stats: &StreamStats,
    progress: &Progress,
    flags: Flags<'_>,
    redial: &Redial<'_>,
    backend: Backend,
    zero_copy: Option<&FramePool>,
) -> Result<Histogram<u64>, MigrateError> {
    let name = format!("stream {index}");
    let mut counter = RoundCounter::default();
    // Microseconds from a frame sealed to its last byte handed to the kernel.
    let mut latency = crate::report::LatencySummary::histogram();
    let Flags { abort, settled, done } = flags;
    let res = (|| {
        let out = Writer { link, cur: link.current(), redial, name, settled };
        let mut out = BatchWriter::new(out, backend, zero_copy)?;
        stats.zero_copy.store(out.w.zero_copy(), Ordering::Relaxed);
        let mut batch = Vec::with_capacity(BATCH);
        let mut sealed = Vec::with_capacity(BATCH);
        let mut has_done = false;
        loop {
            let first = match rx.recv_timeout(KEEPALIVE_INTERVAL) {
                Ok(m) => m,
                Err(RecvTimeoutError::Disconnected) => break,
                // Nothing to send for a while: say we are still here.
                Err(RecvTimeoutError::Timeout) => {
                    out.write(vec![keepalive_frame().to_vec().into()])?;
                    continue;
                }
            };
            // Whatever else is queued goes in the same batch.
            let more = std::iter::from_fn(|| rx.try_recv().ok()).take(BATCH - 1);
            for msg in std::iter::once(first).chain(more) {
                let frame = match msg {
                    Msg::Frame(f, at) => {
                        sealed.push(at);
                        counter.sent_pages();
                        stats.frames.fetch_add(1, Ordering::Relaxed);
                        progress.wire_bytes.fetch_add(f.len() as u64, Ordering::Relaxed);
                        f
                    }
                    Msg::RoundEnd { round, last } => counter.end(round, last).encode().into(),
                    Msg::Control(f) => f.into(),
                    Msg::Done { digest } => {
                        has_done = true;
                        Control::Done(digest).encode().into()
                    }
                };
                stats.bytes.fetch_add(frame.len() as u64, Ordering::Relaxed);
                batch.push(frame);
            }
            // Heap buffers go back to the workers' pool; arena slots return
            // to the arena when dropped.
            for buf in out.write(std::mem::take(&mut batch))? {
                if let Outgoing::Vec(v) = buf {
                    let _ = pool.try_send(v);
                }
            }
            if has_done {
                done.store(true, Ordering::Release);
            }
            for at in sealed.drain(..) {
                latency.saturating_record(at.elapsed().as_micros() as u64);
            }
        }
        Ok::<(), TransportError>(())
    })();
    if res.is_err() {
        abort.store(true, Ordering::Relaxed);
    }
    res.map(|()| latency).map_err(MigrateError::from)
}

/// Where a stream's listener passes what the destination says.
pub(super) struct Listen<'a> {
    /// The outcome: `Verified`'s digest, or the error.
    pub(super) verdict: Sender<Result<Digest, MigrateError>>,
    /// Probe replies (stream 0).
    pub(super) probes: Sender<Vec<u64>>,
    /// Post-copy: answers page requests (the priority stream only).
    pub(super) answer: Option<super::requests::Answerer<'a>>,
    /// Set when the destination says the guest runs there.
    pub(super) running: &'a OnceLock<Instant>,
    /// Set when the verdict arrives.
    pub(super) settled: &'a AtomicBool,
    /// The post-copy round once the switchover went out (`u64::MAX`
    /// before): from then on a lost stream that cannot come back is fatal.
    pub(super) post_round: &'a AtomicU64,
}

/// Reads what the destination says on a stream: probe replies (stream 0),
/// page requests and the switchover's answer (priority stream), then
/// `Verified` on stream 0 at the end, or an `Error` at any time; reports
/// the outcome on `verdict`.
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
    let mut reply = Writer { link, cur: cur.clone(), redial, name: format!("stream {index}"), settled: to.settled };
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
                    .and_then(|m| heard(index, prio, to.post_round.load(Ordering::Acquire) != u64::MAX, m)),
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
                    Err(_) if to.settled.load(Ordering::Acquire) => return,
                    Err(_) if to.post_round.load(Ordering::Acquire) == u64::MAX => return,
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
                Ok(Heard::ProbeReply(v)) => {
                    let _ = to.probes.send(v);
                }
                Ok(Heard::Request(range)) => {
                    let ans = to.answer.as_mut().expect("requests come on the priority stream");
                    let sent = ans.answer(range).and_then(|f| {
                        reply.cur = link.current();
                        reply.write(f).map_err(MigrateError::from)
                    });
                    if let Err(e) = sent {
                        break Err(e);
                    }
                }
                Ok(Heard::Running) => {
                    let _ = to.running.set(Instant::now());
                }
                Ok(Heard::Verified(d)) => {
                    to.settled.store(true, Ordering::Release);
                    break Ok(d);
                }
                Err(e) => break Err(e),
            }
        };
    };
    if outcome.is_err() {
        abort.store(true, Ordering::Relaxed);
    }
    let _ = to.verdict.send(outcome);
}
