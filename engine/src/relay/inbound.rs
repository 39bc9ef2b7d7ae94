//! The inbound flow: stream readers verify chunks into a bounded reorder
//! window, and the reader that brings the chunk the output needs next
//! writes it (and any that follow in order) to the local output itself;
//! the deliverer thread writes what no reader took, half-closes the output
//! at the end and confirms with `Verified` — or, at the session's source,
//! finds the local peer gone and confirms what it took with `Verified`
//! flagged `FLAG_CLOSED` — and handles a failed write. A chunk thus costs
//! no thread hop between its reader and the output (with QEMU's small
//! writes the hops were a fifth of the receiver's CPU).

use std::io::ErrorKind;
use std::sync::atomic::Ordering;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crossbeam_channel::Sender;
use pmigrate_transport::backend::{frame_reader, StreamIn};
use pmigrate_transport::frame::{Encoding, HEADER_LEN};
use pmigrate_transport::message::{Control, Message};
use pmigrate_transport::payload::Opener;
use pmigrate_transport::{Conn, FrameReader, TransportError};

use super::ends::{stream_ended, Facts, Step};
use super::reader::{Heard, ReaderLane, Refused};
use super::reassembly::{Next, Reassembly};
use super::resume::Recovered;
use super::{Carry, FlowReport, Output, Shared};
use crate::MigrateError;

/// How often a deliverer that may close looks whether its local peer left.
const LEFT_TICK: Duration = Duration::from_millis(50);

/// How long a stream cut before its end waits for another stream to bring
/// the other end's reason (an `Error` frame) before it is the error.
pub(super) const WHY_GRACE: Duration = Duration::from_millis(250);

/// How long a broken pipe on the output may come before the end of the
/// input and still be the local peer closing: QEMU closes the reading end
/// of its channel a moment before the writing end.
const CLOSE_RACE: Duration = Duration::from_secs(1);

/// A reader holding a chunk beyond the window waits until it would fit
/// this many chunks further on, so that once woken it takes a few chunks
/// in a row instead of waiting again after each: with the output the
/// slower end (QEMU loading its stream), the window stays full and a wake-up
/// for every chunk delivered cost the receiver a thread switch per chunk
/// and per stream, on the loading QEMU's core.
const WAKE_SLACK: u64 = super::REORDER_WINDOW / 4;

struct State {
    /// The flow's chunks on their way back into order.
    flow: Reassembly,
    failed: bool,
    /// The local peer closed: chunks are dropped, no `End` is awaited.
    closed: bool,
    /// For each stream, the chunk its reader holds beyond the window while
    /// it waits for room.
    held_back: Vec<Option<u64>>,
}

/// The local output and what went through it, shared by the deliverer
/// and the stream readers: whoever holds it writes.
#[derive(Default)]
struct Out {
    /// Put here by the deliverer when it starts; taken at the end.
    output: Option<Box<dyn Output>>,
    report: FlowReport,
    /// A write that failed on a reader's thread, for the deliverer to
    /// judge (a local peer that closed, or a failure).
    broken: Option<std::io::Error>,
}

impl Out {
    /// Writes chunk `c` to the output (there must be one) and counts it;
    /// its buffer goes back to the readers.
    fn put(&mut self, shared: &Shared<'_>, c: Vec<u8>) -> std::io::Result<()> {
        let o = self.output.as_mut().expect("an output to write to");
        o.write_all(&c)?;
        shared.touch();
        self.report.bytes += c.len() as u64;
        self.report.chunks += 1;
        shared.recycle_in(c);
        Ok(())
    }
}

/// The reorder window between the stream readers and the output.
pub(crate) struct Window {
    state: Mutex<State>,
    /// Room in the window: a reader holding a chunk beyond it waits on its
    /// stream's, woken once its chunk fits with [`WAKE_SLACK`] to spare.
    changed: Vec<Condvar>,
    /// Something for the deliverer: an `End`, the flow complete, a failed
    /// write, the relay failed or closed.
    wake: Condvar,
    out: Mutex<Out>,
}

impl Window {
    pub(super) fn new(streams: usize) -> Self {
        Window {
            state: Mutex::new(State {
                flow: Reassembly::new(streams),
                failed: false,
                closed: false,
                held_back: vec![None; streams],
            }),
            changed: (0..streams).map(|_| Condvar::new()).collect(),
            wake: Condvar::new(),
            out: Mutex::new(Out::default()),
        }
    }

    /// Wakes every waiter for good: the relay failed.
    pub(super) fn abort(&self) {
        self.state.lock().expect("window lock").failed = true;
        self.changed.iter().for_each(Condvar::notify_all);
        self.wake.notify_all();
    }

    /// The output took chunks: wakes the readers whose chunk held back
    /// now fits with room to spare.
    fn made_room(&self, w: &State) {
        for (i, held) in w.held_back.iter().enumerate() {
            if held.is_some_and(|seq| w.flow.fits(seq.saturating_add(WAKE_SLACK))) {
                self.changed[i].notify_one();
            }
        }
    }

    /// Writes the chunks the output needs next, in order, on the calling
    /// stream reader's thread, unless another thread holds the output (it
    /// looks again after it lets go, so no chunk is left behind).
    fn deliver_ready(&self, shared: &Shared<'_>) {
        loop {
            let Ok(mut out) = self.out.try_lock() else { return };
            if out.output.is_none() || out.broken.is_some() {
                return; // the deliverer's: not started, or judging a failed write
            }
            loop {
                let chunk = {
                    let mut w = self.state.lock().expect("window lock");
                    if w.failed || w.closed {
                        return;
                    }
                    let c = w.flow.take_chunk();
                    if c.is_none() && w.flow.complete() {
                        self.wake.notify_all();
                    }
                    if c.is_some() {
                        self.made_room(&w);
                    }
                    c
                };
                let Some(c) = chunk else { break };
                if let Err(e) = out.put(shared, c) {
                    out.broken = Some(e);
                    self.wake.notify_all();
                    return;
                }
            }
            drop(out);
            if !self.state.lock().expect("window lock").flow.chunk_ready() {
                return;
            }
        }
    }
}

/// Reads one stream: the other end's chunks and `End` (inbound flow), and
/// on stream 0 its `Verified` for this end's outbound flow. A close is
/// clean only once the stream has done both duties.
///
/// With `CAP_RESUME` (`super::resume`) it also hears the other end's
/// `Ack`s, notes each chunk it took for this end's own, and takes a lost
/// connection back instead of failing: on the new one, what the stream
/// carried before may come again and is dropped.
pub(super) fn stream_reader(shared: &Shared<'_>, i: usize, has_in: bool, expects_verified: bool, how: &Carry) {
    let lane = &shared.lanes[i];
    let resumable = shared.resumable();
    let name = format!("stream {i}");
    let (conn, mut gen) = lane.link.current();
    let mut reader = match reader_on(&conn, &name, how) {
        Ok(r) => r,
        Err(e) => return shared.fail(i, e.into()),
    };
    let mut opener = Opener::default();
    let mut judge = ReaderLane::new(resumable, how.source, how.lz4_in, has_in, expects_verified);
    let protocol = |why: String| MigrateError::Protocol { stream: i, why };
    let res = loop {
        // `None`: a clean end of stream.
        let cut = match reader.next_frame() {
            Ok(Some((hdr, payload))) => {
                let wire = (HEADER_LEN + payload.len()) as u64;
                let msg = match Message::decode(hdr, payload) {
                    Ok(m) => m,
                    Err(source) => break Err(TransportError::Wire { what: name.clone(), source }.into()),
                };
                let heard = match judge.heard(msg) {
                    Ok(h) => h,
                    Err(Refused::Protocol(why)) => break Err(protocol(why)),
                    Err(Refused::Unexpected(kind)) => {
                        break Err(TransportError::Unexpected { what: name.clone(), kind }.into())
                    }
                };
                match heard {
                    Heard::Nothing => {}
                    Heard::Acked(next) => lane.acked(next),
                    Heard::Chunk(chunk) => {
                        let (window, seq) = (&shared.window, chunk.seq());
                        // A replayed chunk is dropped unopened; a new one is announced.
                        let step = {
                            let mut w = window.state.lock().expect("window lock");
                            match w.flow.replayed(i, seq) {
                                Ok(true) => Ok(false),
                                Ok(false) => w.flow.announce(i, seq).map(|()| true),
                                Err(why) => Err(why),
                            }
                        };
                        match step {
                            Err(why) => break Err(protocol(why.to_string())),
                            Ok(false) => {
                                lane.took(seq);
                                continue;
                            }
                            Ok(true) => {}
                        }
                        shared.in_wire.fetch_add(wire, Ordering::Relaxed);
                        if shared.in_closed.load(Ordering::Acquire) {
                            lane.took(seq);
                            continue; // the local peer left: nowhere to put it
                        }
                        let raw = chunk.encoding() == Encoding::Raw;
                        let data = match chunk.open(&mut opener) {
                            // A raw chunk, verified, is the reader's buffer
                            // itself: taken whole, not copied.
                            Ok(_) if raw => reader.swap_payload(shared.in_spare.1.try_recv().unwrap_or_default()),
                            Ok(d) => d.to_vec(),
                            Err(source) => break Err(TransportError::Wire { what: name.clone(), source }.into()),
                        };
                        let mut w = window.state.lock().expect("window lock");
                        // Hold a chunk beyond the window until the output catches up
                        // (and has made room for a few more).
                        if !w.flow.fits(seq) {
                            w.held_back[i] = Some(seq);
                            while !w.failed && !w.closed && !w.flow.fits(seq.saturating_add(WAKE_SLACK)) {
                                w = window.changed[i].wait(w).expect("window lock");
                            }
                            w.held_back[i] = None;
                        }
                        if w.failed {
                            break Err(MigrateError::Aborted);
                        }
                        if !w.closed {
                            if let Err(why) = w.flow.insert(seq, data) {
                                break Err(protocol(why.to_string()));
                            }
                        }
                        drop(w);
                        lane.took(seq);
                        window.deliver_ready(shared);
                    }
                    Heard::End(chunks) => {
                        shared.in_wire.fetch_add(wire, Ordering::Relaxed);
                        let window = &shared.window;
                        let ended = window.state.lock().expect("window lock").flow.end(i, chunks);
                        window.wake.notify_all();
                        if let Err(why) = ended {
                            break Err(protocol(why.to_string()));
                        }
                    }
                    Heard::Verified { value, closed } => {
                        *shared.verified.lock().expect("verdict lock") = Some((value, closed));
                        if closed {
                            shared.out_closed.store(true, Ordering::Release);
                        }
                        shared.verified_cv.notify_all();
                    }
                }
                continue;
            }
            Ok(None) => None,
            Err(e) => Some(e),
        };
        // Read after the read returned: the flow may have closed meanwhile.
        let at_end = judge.at_end(shared.in_closed.load(Ordering::Acquire));
        let facts = Facts { at_end, failed: shared.failed(), resumable };
        let why = match stream_ended(&name, cut, facts) {
            Step::Done => break Ok(()),
            Step::Fail(e) => break Err(e.into()),
            Step::UnlessFailing(_) if shared.failed_within(WHY_GRACE) => break Ok(()),
            Step::UnlessFailing(e) => break Err(e.into()),
            // The other end is complete: it closes its streams only then.
            Step::UnlessConfirmed(_) if shared.confirmed_within(WHY_GRACE) => {
                shared.peer_complete.store(true, Ordering::Release);
                lane.finish();
                break Ok(());
            }
            Step::UnlessConfirmed(e) | Step::Recover(e) => e,
        };
        match shared.recover(i, gen, why) {
            Ok(Recovered::Back(c, g)) => {
                reader = match reader_on(&c, &name, how) {
                    Ok(r) => r,
                    Err(e) => break Err(e.into()),
                };
                gen = g;
                shared.window.state.lock().expect("window lock").flow.resume(i);
                judge.came_back();
            }
            Ok(Recovered::Over) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    if let Err(e) = res {
        shared.fail(i, e);
    }
}

/// A frame reader on a stream's connection, with the relay's limits: a
/// frame may stall, and the stream may carry nothing (the other end's
/// writers say `Keepalive` while they have nothing to send), for the
/// progress timeout; past it the peer is frozen or gone.
fn reader_on(conn: &Conn, name: &str, how: &Carry) -> Result<FrameReader<StreamIn>, TransportError> {
    let sock = conn.try_clone().map_err(|e| TransportError::io(name, e))?;
    let mut reader = frame_reader(sock, how.io.backend, name.to_string())?;
    reader.set_stall_limit(how.progress_timeout);
    reader.set_idle_limit(how.progress_timeout);
    Ok(reader)
}

/// Writes the inbound chunks to `output` in order; after the last one
/// half-closes it and confirms on stream 0's queue (`confirm`). With
/// `may_close` (the session's source), a local peer that ended its input
/// and stopped reading closes the flow instead (see the module docs of
/// `relay`).
pub(super) fn deliver(
    shared: &Shared<'_>,
    output: Option<Box<dyn Output>>,
    confirm: Sender<Vec<u8>>,
    may_close: bool,
) -> Result<FlowReport, MigrateError> {
    let window = &shared.window;
    window.out.lock().expect("output lock").output = output;
    let left = |out: &Out| {
        may_close && shared.input_ended.load(Ordering::Acquire) && out.output.as_ref().is_some_and(|o| o.reader_gone())
    };
    // A failed write, here or on a reader's thread: the local peer closed
    // (the flow ends early), or a failure.
    let broken = |out: &mut Out, e: std::io::Error| {
        if may_close && e.kind() == ErrorKind::BrokenPipe && shared.wait_input_end(CLOSE_RACE) {
            let report = std::mem::take(&mut out.report);
            return close(shared, window.state.lock().expect("window lock"), &confirm, report);
        }
        Err(TransportError::io("write output", e).into())
    };
    loop {
        let mut out = window.out.lock().expect("output lock");
        if let Some(e) = out.broken.take() {
            return broken(&mut out, e);
        }
        let mut w = window.state.lock().expect("window lock");
        if w.failed {
            return Err(MigrateError::Aborted);
        }
        let next = match w.flow.take() {
            Ok(Next::Wait) => {
                if left(&out) {
                    let report = std::mem::take(&mut out.report);
                    return close(shared, w, &confirm, report);
                }
                // The readers write what comes in order; wake for the rest
                // (the end, a failed write, a failure), and look now and
                // then for a peer gone or a flow that cannot complete.
                drop(out);
                let _ = window.wake.wait_timeout(w, LEFT_TICK).expect("window lock");
                continue;
            }
            Ok(next) => next,
            Err(why) => return Err(MigrateError::Protocol { stream: 0, why: why.to_string() }),
        };
        if matches!(next, Next::Chunk(_)) {
            window.made_room(&w);
        }
        drop(w);
        match next {
            Next::Chunk(c) => {
                if out.output.is_none() {
                    let why = "the other end sent bytes this end has nowhere to put".to_string();
                    return Err(MigrateError::Protocol { stream: 0, why });
                }
                if let Err(e) = out.put(shared, c) {
                    return broken(&mut out, e);
                }
            }
            Next::Complete { chunks } => {
                if let Some(mut o) = out.output.take() {
                    o.finish().map_err(|e| TransportError::io("close output", e))?;
                }
                confirm
                    .send(Control::Verified { value: chunks, closed: false }.encode())
                    .map_err(|_| MigrateError::Aborted)?;
                return Ok(std::mem::take(&mut out.report));
            }
            Next::Wait => unreachable!("handled above"),
        }
    }
}

/// The local peer closed: drops the rest of the flow and tells the other
/// end how many chunks reached the peer (`Verified` flagged `FLAG_CLOSED`).
fn close(
    shared: &Shared<'_>,
    mut w: MutexGuard<'_, State>,
    confirm: &Sender<Vec<u8>>,
    mut report: FlowReport,
) -> Result<FlowReport, MigrateError> {
    w.closed = true;
    w.flow.drop_held();
    shared.in_closed.store(true, Ordering::Release);
    shared.window.changed.iter().for_each(Condvar::notify_all);
    shared.window.wake.notify_all();
    drop(w);
    confirm
        .send(Control::Verified { value: report.chunks, closed: true }.encode())
        .map_err(|_| MigrateError::Aborted)?;
    report.closed_early = true;
    Ok(report)
}
