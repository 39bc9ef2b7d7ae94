//! The outbound flow: local input → chunks → frames → streams, then `End`
//! on every stream and the other end's `Verified` — or, when the other
//! end's local peer closed (`Verified` flagged `FLAG_CLOSED`), nothing
//! more from where it was.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::Scope;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Select, Sender};
use pmigrate_transport::backend::Outgoing;
use pmigrate_transport::backend::{Backend, FrameWriter, WriteFailure};
use pmigrate_transport::frame::{Encoding, HEADER_LEN};
use pmigrate_transport::message::Control;
use pmigrate_transport::payload::{build_data, seal_raw_data_in_place};
use pmigrate_transport::{Conn, TransportError};

use super::ends::{confirmed, Confirmed};
use super::resume::{write_lost, Recovered};
use super::writer::{Do, Facts, Failed, WriterLane};
use super::{Carry, FlowReport, Shared, CHUNK, INLINE_CHUNK};
use crate::MigrateError;

/// How often blocked threads look whether the relay failed meanwhile.
const TICK: Duration = Duration::from_millis(100);

/// How long the other end may take to confirm the flow after its `End`.
const VERDICT_WAIT: Duration = Duration::from_secs(120);

struct Built {
    seq: u64,
    frame: Vec<u8>,
    lz4: bool,
    /// Bytes of the stream it carries.
    len: usize,
}

/// Hands sealed frames to the streams in sequence order, whichever thread
/// sealed them: the input reader (every chunk while lz4 is off, so a chunk
/// crosses no thread between the input and its stream's writer) or the
/// sequencer, for the workers' frames. Shared with the input reader, which
/// outlives the relay's scope.
struct Dispatch {
    state: Mutex<Lanes>,
    /// Frames handed out (the next sequence number), their chunks' bytes,
    /// how many were lz4, and bytes on the wire.
    chunks: AtomicU64,
    bytes: AtomicU64,
    compressed: AtomicU64,
    wire: AtomicU64,
    lz4: Arc<crate::lz4gate::Lz4Policy>,
    /// The relay's sign of life ([`Shared::touch`]).
    activity: (Arc<AtomicU64>, Instant),
}

/// The streams' queues (until the flow ends) and the frames sealed ahead
/// of their turn.
struct Lanes {
    queues: Vec<Sender<Vec<u8>>>,
    pending: BTreeMap<u64, Built>,
}

impl Dispatch {
    /// Takes `b` and hands every frame whose turn it is to a stream; may
    /// wait for room on the streams.
    fn offer(&self, b: Built) -> Result<(), MigrateError> {
        let mut st = self.state.lock().expect("dispatch lock");
        let n = st.queues.len();
        if n == 0 {
            return Err(MigrateError::Aborted); // the flow is over
        }
        st.pending.insert(b.seq, b);
        loop {
            let next = self.chunks.load(Ordering::Relaxed);
            let Some(b) = st.pending.remove(&next) else { break };
            self.compressed.fetch_add(u64::from(b.lz4), Ordering::Relaxed);
            self.bytes.fetch_add(b.len as u64, Ordering::Relaxed);
            self.wire.fetch_add(b.frame.len() as u64, Ordering::Relaxed);
            dispatch(&st.queues, b.frame, next as usize % n)?;
            self.lz4.handed(b.len);
            self.chunks.store(next + 1, Ordering::Release);
        }
        let (last, t0) = &self.activity;
        last.store(t0.elapsed().as_millis() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Ends the flow: the streams' queues, for the `End`s (dropping them
    /// lets the writers finish, whatever the reader, which may outlive the
    /// relay, still holds), and how many frames were left out of turn.
    fn close(&self) -> (Vec<Sender<Vec<u8>>>, usize) {
        let mut st = self.state.lock().expect("dispatch lock");
        (std::mem::take(&mut st.queues), st.pending.len())
    }
}

/// Writes one stream's queue to its socket with the session's backend, as
/// its [`WriterLane`] decides (acknowledgements, keepalives, the replay
/// after a comeback, the half-close; `super::writer`): this moves the
/// frames, reads the clock and tells the lane what happened. A write error
/// fails the relay, unless the session takes the lost connection back.
pub(super) fn stream_writer(shared: &Shared<'_>, i: usize, rx: Receiver<Vec<u8>>, backend: Backend) {
    let lane = &shared.lanes[i];
    let resumable = shared.resumable();
    let (mut conn, gen) = lane.link.current();
    let mut w = match writer_on(&conn, i, backend) {
        Ok(w) => w,
        Err(e) => return shared.fail(i, e.into()),
    };
    let mut m = WriterLane::new(resumable, gen, Instant::now());
    loop {
        let (now_conn, generation) = lane.link.current();
        let facts = Facts {
            failed: shared.failed(),
            generation,
            acknowledged: lane.acknowledged(),
            taken: lane.taken(),
            taken_since_ack: lane.taken_since_ack(),
            complete: shared.complete.load(Ordering::Acquire),
            finished: lane.finished(),
            closing: shared.closing.load(Ordering::Acquire),
        };
        let step = m.step(&facts, Instant::now());
        m.freed().for_each(|f| shared.recycle(f));
        match step {
            Do::Stop => return,
            Do::Switch => {
                // Another thread took the stream back.
                let done = w.take_done();
                match writer_on(&now_conn, i, backend) {
                    Ok(nw) => w = nw,
                    Err(e) => return shared.fail(i, e.into()),
                }
                conn = now_conn;
                let chunks = m.switched(generation, done);
                shared.resent.fetch_add(chunks, Ordering::Relaxed);
                lane.link.note_resent(chunks);
            }
            Do::Write { frames, ack } => {
                if ack {
                    lane.ack_written();
                }
                match write_all(shared, &mut w, frames) {
                    Ok(()) => m.written(w.take_done(), Instant::now()),
                    Err(f) => {
                        let lost = write_lost(&f.error);
                        let why = TransportError::io(format!("stream {i}: write"), f.error);
                        match m.write_failed(w.take_done(), f.unsent, lost) {
                            // The next step switches to it.
                            Failed::Recover(seen) => match shared.recover(i, seen, why) {
                                Ok(Recovered::Back(..)) => {}
                                Ok(Recovered::Over) => return,
                                Err(e) => return shared.fail(i, e),
                            },
                            Failed::Fail => return shared.fail(i, why.into()),
                        }
                    }
                }
            }
            Do::HalfClose => {
                let _ = conn.shutdown(Shutdown::Write);
            }
            Do::Wait { take, until } => {
                let mut sel = Select::new();
                let queue = take.then(|| sel.recv(&rx));
                sel.recv(lane.woken());
                match sel.select_deadline(until) {
                    Ok(op) if Some(op.index()) == queue => match op.recv(&rx) {
                        Ok(f) => {
                            m.queued(f);
                            while m.takes_more() {
                                let Ok(f) = rx.try_recv() else { break };
                                m.queued(f);
                            }
                        }
                        Err(_) => m.queue_ended(),
                    },
                    Ok(op) => {
                        let _ = op.recv(lane.woken());
                    }
                    Err(_) => {}
                }
            }
        }
    }
}

/// A frame writer on a stream's connection.
fn writer_on(conn: &Conn, i: usize, backend: Backend) -> Result<FrameWriter, TransportError> {
    let sock = conn.try_clone().map_err(|e| TransportError::io(format!("stream {i}"), e))?;
    FrameWriter::new(sock, backend, None)
}

/// Writes `frames` in order and waits until all are out, unless the relay
/// failed meanwhile. On failure every frame not wholly written comes back.
fn write_all(shared: &Shared<'_>, w: &mut FrameWriter, frames: Vec<Outgoing>) -> Result<(), WriteFailure> {
    let mut frames = frames.into_iter();
    while let Some(f) = frames.next() {
        if shared.failed() {
            return Ok(());
        }
        if let Err(mut e) = w.send(f) {
            e.unsent.extend(frames);
            return Err(e);
        }
    }
    w.flush()
}

/// Runs the outbound flow on the calling thread (the sequencer), with the
/// input reader on a thread of its own and the workers in `scope`.
pub(super) fn run<'s, 'a: 's>(
    scope: &'s Scope<'s, '_>,
    shared: &'a Shared<'a>,
    input: Option<Box<dyn Read + Send>>,
    queues: Vec<Sender<Vec<u8>>>,
    how: &Carry,
) -> Result<FlowReport, MigrateError> {
    let threads = how.threads.max(1);
    let (chunk_tx, chunk_rx) = bounded::<(u64, Vec<u8>)>(threads * 2);
    let (built_tx, built_rx) = bounded::<Built>(threads * 2);
    let (done_tx, done_rx) = bounded::<Result<(u64, u64), MigrateError>>(1);
    let order = Arc::new(Dispatch {
        state: Mutex::new(Lanes { queues, pending: BTreeMap::new() }),
        chunks: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
        compressed: AtomicU64::new(0),
        wire: AtomicU64::new(0),
        lz4: shared.lz4.clone(),
        activity: (shared.last_activity.clone(), shared.t0),
    });
    // However the flow ends, the queues go with it (see `Dispatch::close`).
    struct Closing<'d>(&'d Dispatch);
    impl Drop for Closing<'_> {
        fn drop(&mut self) {
            drop(self.0.close());
        }
    }
    let _closing = Closing(&order);
    match input {
        Some(input) => {
            let (alive, ended, spare) = (built_tx.clone(), shared.input_ended.clone(), shared.spare.1.clone());
            let order = order.clone();
            std::thread::spawn(move || read_input(input, chunk_tx, alive, done_tx, &ended, spare, &order));
        }
        None => {
            drop(chunk_tx);
            let _ = done_tx.send(Ok((0, 0)));
        }
    }
    for _ in 0..threads {
        let (rx, tx) = (chunk_rx.clone(), built_tx.clone());
        scope.spawn(move || build_frames(shared, rx, tx));
    }
    drop((chunk_rx, built_tx));

    // Sequencer: hands the workers' frames to the streams in sequence
    // order, with the reader's own.
    let mut report = FlowReport::default();
    let counted = |report: &mut FlowReport| {
        report.chunks = order.chunks.load(Ordering::Acquire);
        report.bytes = order.bytes.load(Ordering::Relaxed);
        report.compressed_chunks = order.compressed.load(Ordering::Relaxed);
        shared.out_wire.fetch_add(order.wire.swap(0, Ordering::Relaxed), Ordering::Relaxed);
    };
    loop {
        if shared.out_closed.load(Ordering::Acquire) {
            // The other end's local peer closed: what is left of the input
            // has nowhere to go (its reader is left to the process's end).
            counted(&mut report);
            drop(order.close());
            report.closed_early = true;
            return Ok(report);
        }
        match built_rx.recv_timeout(TICK) {
            Ok(b) => order.offer(b)?,
            Err(RecvTimeoutError::Timeout) if shared.failed() => return Err(MigrateError::Aborted),
            Err(RecvTimeoutError::Timeout) => {}
            // The reader and every worker are done.
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    let done = done_rx.recv().unwrap_or(Err(MigrateError::Aborted));
    counted(&mut report);
    let (queues, pending) = order.close();
    let (chunks, bytes) = done?;
    // An end of input that the relay's own failure caused (its abort
    // disconnects a local socket, whose reader then sees an end) is no end
    // of the stream: the other end must not close its peer cleanly.
    if shared.failed() {
        return Err(MigrateError::Aborted);
    }
    if chunks != report.chunks || bytes != report.bytes || pending != 0 {
        return Err(MigrateError::Aborted); // a worker gave up: the relay failed
    }
    let end = Control::End { chunks }.encode();
    for q in &queues {
        q.send(end.clone()).map_err(|_| MigrateError::Aborted)?;
        shared.out_wire.fetch_add(end.len() as u64, Ordering::Relaxed);
    }
    drop(queues);
    // The other end confirms on stream 0.
    let deadline = Instant::now() + VERDICT_WAIT;
    let mut v = shared.verified.lock().expect("verdict lock");
    loop {
        if shared.failed() {
            return Err(MigrateError::Aborted);
        }
        match *v {
            Some((got, closed)) => {
                return match confirmed(got, closed, chunks) {
                    Confirmed::Whole => Ok(report),
                    Confirmed::ClosedEarly => {
                        report.closed_early = true;
                        Ok(report)
                    }
                    Confirmed::Wrong(why) => Err(MigrateError::Protocol { stream: 0, why }),
                }
            }
            None if Instant::now() > deadline => {
                let why = "the other end did not confirm the end of stream".to_string();
                return Err(TransportError::Setup(why).into());
            }
            None => v = shared.verified_cv.wait_timeout(v, TICK).expect("verdict lock").0,
        }
    }
}

/// The input reader: one read, one chunk, read straight into a frame
/// behind room for its header (`frame[HEADER_LEN..]`). Small chunks are
/// sealed here, and every chunk while lz4 is off; the workers get the
/// rest. A chunk under half a buffer goes in a frame of its own size (what
/// the resend buffer keeps is bounded by bytes, so a frame's spare
/// capacity would be held unaccounted), the buffer reused.
fn read_input(
    mut input: Box<dyn Read + Send>,
    chunks: Sender<(u64, Vec<u8>)>,
    alive: Sender<Built>,
    done: Sender<Result<(u64, u64), MigrateError>>,
    ended: &AtomicBool,
    spare: Receiver<Vec<u8>>,
    order: &Dispatch,
) {
    let mut seq = 0u64;
    let mut bytes = 0u64;
    let mut buf = Vec::new();
    let res = loop {
        if buf.len() != HEADER_LEN + CHUNK {
            // A written frame's buffer when one is back (only the bytes
            // past its old length are zeroed), a new one otherwise.
            buf = spare.try_recv().unwrap_or_default();
            buf.resize(HEADER_LEN + CHUNK, 0);
        }
        let k = match input.read(&mut buf[HEADER_LEN..]) {
            Ok(0) => {
                // The local peer ended its input: the inbound flow may now
                // find that peer gone altogether.
                ended.store(true, Ordering::Release);
                break Ok((seq, bytes));
            }
            Ok(k) => k,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => break Err(TransportError::io("read input", e).into()),
        };
        bytes += k as u64;
        let sent = if k <= INLINE_CHUNK {
            let mut frame = Vec::with_capacity(HEADER_LEN + k);
            build_data(&mut frame, seq, &buf[HEADER_LEN..HEADER_LEN + k], false);
            order.offer(Built { seq, frame, lz4: false, len: k }).is_ok()
        } else {
            let frame = if k < CHUNK / 2 {
                buf[..HEADER_LEN + k].to_vec()
            } else {
                let mut frame = std::mem::take(&mut buf);
                frame.truncate(HEADER_LEN + k);
                frame
            };
            if order.lz4.compress() {
                chunks.send((seq, frame)).is_ok()
            } else {
                let mut frame = frame;
                seal_raw_data_in_place(&mut frame, seq);
                order.offer(Built { seq, frame, lz4: false, len: k }).is_ok()
            }
        };
        if !sent {
            break Err(MigrateError::Aborted);
        }
        seq += 1;
    };
    // Dropping `alive` with the workers' senders tells the sequencer that
    // nothing more comes.
    drop((chunks, alive));
    let _ = done.send(res);
}

/// A worker: seals frames whose chunk the reader put behind their header,
/// in place, or builds an lz4 frame from it when the session's policy says
/// that moves the data faster.
fn build_frames(shared: &Shared<'_>, rx: Receiver<(u64, Vec<u8>)>, tx: Sender<Built>) {
    loop {
        let (seq, mut frame) = match rx.recv_timeout(TICK) {
            Ok(c) => c,
            Err(RecvTimeoutError::Timeout) if shared.out_stopped() => return,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let len = frame.len() - HEADER_LEN;
        let mut lz4 = false;
        if shared.lz4.compress() {
            let mut packed = Vec::with_capacity(HEADER_LEN + len);
            if build_data(&mut packed, seq, &frame[HEADER_LEN..], true) == Encoding::Lz4 {
                (frame, lz4) = (packed, true);
            }
        }
        if !lz4 {
            seal_raw_data_in_place(&mut frame, seq);
        }
        if tx.send(Built { seq, frame, lz4, len }).is_err() {
            return;
        }
    }
}

/// Puts `frame` on a stream with room, preferring `home`; waits for the
/// first stream that frees room when all are full.
fn dispatch(txs: &[Sender<Vec<u8>>], frame: Vec<u8>, home: usize) -> Result<(), MigrateError> {
    let n = txs.len();
    let mut frame = frame;
    for k in 0..n {
        match txs[(home + k) % n].try_send(frame) {
            Ok(()) => return Ok(()),
            Err(e) => frame = e.into_inner(),
        }
    }
    let mut sel = Select::new();
    for tx in txs {
        sel.send(tx);
    }
    let op = sel.select();
    let i = op.index();
    op.send(&txs[i], frame).map_err(|_| MigrateError::Aborted)
}
