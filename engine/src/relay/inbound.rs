//! The inbound flow: stream readers verify chunks into a bounded reorder
//! window; the deliverer writes them to the local output in order, then
//! half-closes it and confirms with `Verified` — or, at the session's
//! source, finds the local peer gone and confirms what it took with
//! `Verified` flagged `FLAG_CLOSED`.

use std::io::ErrorKind;
use std::sync::atomic::Ordering;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crossbeam_channel::Sender;
use pmigrate_transport::backend::frame_reader;
use pmigrate_transport::frame::{Encoding, HEADER_LEN};
use pmigrate_transport::message::{Control, Message};
use pmigrate_transport::payload::Opener;
use pmigrate_transport::TransportError;

use super::reassembly::{Next, Reassembly};
use super::{Carry, FlowReport, Output, Shared, CHUNK};
use crate::MigrateError;

/// How often a deliverer that may close looks whether its local peer left.
const LEFT_TICK: Duration = Duration::from_millis(50);

/// How long a stream cut before its end waits for another stream to bring
/// the other end's reason (an `Error` frame) before it is the error.
const WHY_GRACE: Duration = Duration::from_millis(250);

/// How long a broken pipe on the output may come before the end of the
/// input and still be the local peer closing: QEMU closes the reading end
/// of its channel a moment before the writing end.
const CLOSE_RACE: Duration = Duration::from_secs(1);

struct State {
    /// The flow's chunks on their way back into order.
    flow: Reassembly,
    failed: bool,
    /// The local peer closed: chunks are dropped, no `End` is awaited.
    closed: bool,
}

/// The reorder window between the stream readers and the output.
pub(crate) struct Window {
    state: Mutex<State>,
    changed: Condvar,
}

impl Window {
    pub(super) fn new(streams: usize) -> Self {
        Window {
            state: Mutex::new(State { flow: Reassembly::new(streams), failed: false, closed: false }),
            changed: Condvar::new(),
        }
    }

    /// Wakes every waiter for good: the relay failed.
    pub(super) fn abort(&self) {
        self.state.lock().expect("window lock").failed = true;
        self.changed.notify_all();
    }
}

/// Reads one stream: the other end's chunks and `End` (inbound flow), and
/// on stream 0 its `Verified` for this end's outbound flow. A close is
/// clean only once the stream has done both duties.
pub(super) fn stream_reader(shared: &Shared<'_>, i: usize, has_in: bool, expects_verified: bool, how: &Carry) {
    let name = format!("stream {i}");
    let sock = shared.streams[i].try_clone().map_err(|e| TransportError::io(&name, e));
    let mut reader = match sock.and_then(|s| frame_reader(s, how.io.backend, name.clone())) {
        Ok(r) => r,
        Err(e) => return shared.fail(i, e.into()),
    };
    reader.set_stall_limit(how.progress_timeout);
    // The other end's writers say `Keepalive` while they have nothing to
    // send: a stream silent for this long belongs to a frozen or vanished
    // peer.
    reader.set_idle_limit(how.progress_timeout);
    let mut opener = Opener::default();
    let (mut in_done, mut verified) = (!has_in, !expects_verified);
    let protocol = |why: String| MigrateError::Protocol { stream: i, why };
    // Read after the read returned: the flow may have closed meanwhile.
    let done = |in_done: bool, verified: bool| (in_done || shared.in_closed.load(Ordering::Acquire)) && verified;
    let res = loop {
        let (hdr, payload) = match reader.next_frame() {
            Ok(Some(f)) => f,
            Ok(None) if done(in_done, verified) || shared.failed() => break Ok(()),
            Err(e @ TransportError::Peer(_)) => break Err(e.into()),
            Err(_) if done(in_done, verified) || shared.failed() => break Ok(()),
            // Cut before the end. A failing end tells why on stream 0 (and
            // the failing stream) as it closes them all: give another
            // reader a moment to bring that word, which says more.
            cut if shared.failed_within(WHY_GRACE) => {
                drop(cut);
                break Ok(());
            }
            Ok(None) => break Err(TransportError::Closed(format!("{name}: before the end of the stream")).into()),
            Err(e) => break Err(e.into()),
        };
        let wire = (HEADER_LEN + payload.len()) as u64;
        let msg = match Message::decode(hdr, payload) {
            Ok(m) => m,
            Err(source) => break Err(TransportError::Wire { what: name.clone(), source }.into()),
        };
        match msg {
            Message::Control(Control::Keepalive) => {}
            Message::Data(chunk) if !in_done => {
                if chunk.decoded_len() as usize > CHUNK {
                    break Err(protocol(format!("chunk of {} bytes", chunk.decoded_len())));
                }
                if chunk.encoding() == Encoding::Lz4 && !how.lz4_in {
                    break Err(protocol("lz4 chunk without the capability".into()));
                }
                let window = &shared.window;
                let seq = chunk.seq();
                let announced = window.state.lock().expect("window lock").flow.announce(i, seq);
                window.changed.notify_all();
                if let Err(why) = announced {
                    break Err(protocol(why.to_string()));
                }
                shared.in_wire.fetch_add(wire, Ordering::Relaxed);
                if shared.in_closed.load(Ordering::Acquire) {
                    continue; // the local peer left: nowhere to put it
                }
                let data = match chunk.open(&mut opener) {
                    Ok(d) => d.to_vec(),
                    Err(source) => break Err(TransportError::Wire { what: name.clone(), source }.into()),
                };
                let mut w = window.state.lock().expect("window lock");
                // Hold a chunk beyond the window until the output catches up.
                while !w.failed && !w.closed && !w.flow.fits(seq) {
                    w = window.changed.wait(w).expect("window lock");
                }
                if w.failed {
                    break Err(MigrateError::Aborted);
                }
                if w.closed {
                    continue;
                }
                if let Err(why) = w.flow.insert(seq, data) {
                    break Err(protocol(why.to_string()));
                }
                window.changed.notify_all();
            }
            Message::Control(Control::End { chunks }) if !in_done => {
                shared.in_wire.fetch_add(wire, Ordering::Relaxed);
                let window = &shared.window;
                let ended = window.state.lock().expect("window lock").flow.end(i, chunks);
                window.changed.notify_all();
                if let Err(why) = ended {
                    break Err(protocol(why.to_string()));
                }
                in_done = true;
            }
            Message::Control(Control::Verified { value, closed }) if !verified => {
                if closed && how.source {
                    break Err(protocol("the destination closed the session's forward direction".into()));
                }
                *shared.verified.lock().expect("verdict lock") = Some((value, closed));
                if closed {
                    shared.out_closed.store(true, Ordering::Release);
                }
                shared.verified_cv.notify_all();
                verified = true;
            }
            m => break Err(TransportError::Unexpected { what: name.clone(), kind: m.kind() }.into()),
        }
    };
    if let Err(e) = res {
        shared.fail(i, e);
    }
}

/// Writes the inbound chunks to `output` in order; after the last one
/// half-closes it and confirms on stream 0's queue (`confirm`). With
/// `may_close` (the session's source), a local peer that ended its input
/// and stopped reading closes the flow instead (see the module docs of
/// `relay`).
pub(super) fn deliver(
    shared: &Shared<'_>,
    mut output: Option<Box<dyn Output>>,
    confirm: Sender<Vec<u8>>,
    may_close: bool,
) -> Result<FlowReport, MigrateError> {
    let window = &shared.window;
    let mut report = FlowReport::default();
    let left = |output: &Option<Box<dyn Output>>| {
        may_close && shared.input_ended.load(Ordering::Acquire) && output.as_ref().is_some_and(|o| o.reader_gone())
    };
    loop {
        let mut w = window.state.lock().expect("window lock");
        let next = loop {
            if w.failed {
                return Err(MigrateError::Aborted);
            }
            match w.flow.take() {
                Ok(Next::Wait) => {}
                Ok(next) => break next,
                Err(why) => return Err(MigrateError::Protocol { stream: 0, why: why.to_string() }),
            }
            if left(&output) {
                return close(shared, w, &confirm, report);
            }
            w = if may_close {
                window.changed.wait_timeout(w, LEFT_TICK).expect("window lock").0
            } else {
                window.changed.wait(w).expect("window lock")
            };
        };
        window.changed.notify_all();
        drop(w);
        match next {
            Next::Chunk(c) => {
                let Some(out) = output.as_mut() else {
                    let why = "the other end sent bytes this end has nowhere to put".to_string();
                    return Err(MigrateError::Protocol { stream: 0, why });
                };
                match out.write_all(&c) {
                    Ok(()) => shared.touch(),
                    Err(e) if may_close && e.kind() == ErrorKind::BrokenPipe && shared.wait_input_end(CLOSE_RACE) => {
                        return close(shared, window.state.lock().expect("window lock"), &confirm, report);
                    }
                    Err(e) => return Err(TransportError::io("write output", e).into()),
                }
                report.bytes += c.len() as u64;
                report.chunks += 1;
            }
            Next::Complete { chunks } => {
                if let Some(mut out) = output.take() {
                    out.finish().map_err(|e| TransportError::io("close output", e))?;
                }
                confirm
                    .send(Control::Verified { value: chunks, closed: false }.encode())
                    .map_err(|_| MigrateError::Aborted)?;
                return Ok(report);
            }
            Next::Wait => unreachable!("the loop above waits"),
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
    shared.window.changed.notify_all();
    drop(w);
    confirm
        .send(Control::Verified { value: report.chunks, closed: true }.encode())
        .map_err(|_| MigrateError::Aborted)?;
    report.closed_early = true;
    Ok(report)
}
