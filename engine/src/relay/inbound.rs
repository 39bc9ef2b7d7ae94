//! The inbound flow: stream readers verify chunks into a bounded reorder
//! window; the deliverer writes them to the local output in order, then
//! half-closes it and confirms with `Verified`.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Condvar, Mutex};

use crossbeam_channel::Sender;
use pmigrate_transport::backend::frame_reader;
use pmigrate_transport::frame::{Encoding, FrameKind, HEADER_LEN};
use pmigrate_transport::payload::Opener;
use pmigrate_transport::TransportError;

use super::{control, Carry, FlowReport, Output, Shared, CHUNK, REORDER_WINDOW};
use crate::MigrateError;

struct State {
    chunks: BTreeMap<u64, Vec<u8>>,
    /// Next sequence number the output needs.
    next: u64,
    /// Total chunks, once an `End` said so.
    total: Option<u64>,
    /// Streams that delivered `End`.
    ended: usize,
    failed: bool,
    /// Per stream: the last sequence number it delivered, and whether it
    /// ended. Each stream's numbers increase, so once every stream is past
    /// `next` (or ended) without delivering it, it can never come.
    heads: Vec<(Option<u64>, bool)>,
}

impl State {
    fn gap(&self) -> bool {
        !self.chunks.contains_key(&self.next)
            && self.heads.iter().all(|&(head, ended)| ended || head.is_some_and(|h| h > self.next))
    }
}

/// The reorder window between the stream readers and the output.
pub(crate) struct Window {
    state: Mutex<State>,
    changed: Condvar,
}

impl Window {
    pub(super) fn new(streams: usize) -> Self {
        Window {
            state: Mutex::new(State {
                chunks: BTreeMap::new(),
                next: 0,
                total: None,
                ended: 0,
                failed: false,
                heads: vec![(None, false); streams],
            }),
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
    let mut last_seq: Option<u64> = None;
    let (mut in_done, mut verified) = (!has_in, !expects_verified);
    let protocol = |why: String| MigrateError::Protocol { stream: i, why };
    let res = loop {
        let done = in_done && verified;
        let (hdr, payload) = match reader.next_frame() {
            Ok(Some(f)) => f,
            Ok(None) if done || shared.failed() => break Ok(()),
            Ok(None) => break Err(TransportError::Closed(format!("{name}: before the end of the stream")).into()),
            Err(e @ TransportError::Peer(_)) => break Err(e.into()),
            Err(_) if done || shared.failed() => break Ok(()),
            Err(e) => break Err(e.into()),
        };
        let wire = (HEADER_LEN + payload.len()) as u64;
        match hdr.kind {
            FrameKind::Keepalive => {
                if let Err(source) = hdr.verify(&[]) {
                    break Err(TransportError::Wire { what: name.clone(), source }.into());
                }
            }
            FrameKind::Data if !in_done => {
                if hdr.count as usize > CHUNK {
                    break Err(protocol(format!("chunk of {} bytes", hdr.count)));
                }
                if hdr.encoding == Encoding::Lz4 && !how.lz4_in {
                    break Err(protocol("lz4 chunk without the capability".into()));
                }
                if last_seq.is_some_and(|l| hdr.aux <= l) {
                    break Err(protocol(format!("chunk {} out of order", hdr.aux)));
                }
                last_seq = Some(hdr.aux);
                let data = match opener.open_data(&hdr, payload) {
                    Ok(d) => d.to_vec(),
                    Err(source) => break Err(TransportError::Wire { what: name.clone(), source }.into()),
                };
                shared.in_wire.fetch_add(wire, Ordering::Relaxed);
                let window = &shared.window;
                let mut w = window.state.lock().expect("window lock");
                w.heads[i].0 = Some(hdr.aux);
                window.changed.notify_all();
                // Hold a chunk beyond the window until the output catches up.
                while !w.failed && hdr.aux >= w.next + REORDER_WINDOW {
                    w = window.changed.wait(w).expect("window lock");
                }
                if w.failed {
                    break Err(MigrateError::Aborted);
                }
                if hdr.aux < w.next || w.total.is_some_and(|t| hdr.aux >= t) || w.chunks.contains_key(&hdr.aux) {
                    break Err(protocol(format!("chunk {} duplicated", hdr.aux)));
                }
                w.chunks.insert(hdr.aux, data);
                window.changed.notify_all();
            }
            FrameKind::End if !in_done => {
                if let Err(source) = hdr.verify(&[]) {
                    break Err(TransportError::Wire { what: name.clone(), source }.into());
                }
                shared.in_wire.fetch_add(wire, Ordering::Relaxed);
                let window = &shared.window;
                let mut w = window.state.lock().expect("window lock");
                if w.total.is_some_and(|t| t != hdr.aux) || last_seq.is_some_and(|l| l >= hdr.aux) {
                    break Err(protocol("inconsistent end of stream".into()));
                }
                w.total = Some(hdr.aux);
                w.ended += 1;
                w.heads[i].1 = true;
                window.changed.notify_all();
                in_done = true;
            }
            FrameKind::Verified if !verified => {
                if let Err(source) = hdr.verify(&[]) {
                    break Err(TransportError::Wire { what: name.clone(), source }.into());
                }
                *shared.verified.lock().expect("verdict lock") = Some(hdr.aux);
                shared.verified_cv.notify_all();
                verified = true;
            }
            kind => break Err(TransportError::Unexpected { what: name.clone(), kind }.into()),
        }
    };
    if let Err(e) = res {
        shared.fail(i, e);
    }
}

/// Writes the inbound chunks to `output` in order; after the last one
/// half-closes it and confirms on stream 0's queue (`confirm`).
pub(super) fn deliver(
    shared: &Shared<'_>,
    mut output: Option<Box<dyn Output>>,
    confirm: Sender<Vec<u8>>,
) -> Result<FlowReport, MigrateError> {
    let window = &shared.window;
    let n = shared.streams.len();
    let mut report = FlowReport::default();
    loop {
        let mut w = window.state.lock().expect("window lock");
        let chunk = loop {
            if w.failed {
                return Err(MigrateError::Aborted);
            }
            let next = w.next;
            if let Some(c) = w.chunks.remove(&next) {
                w.next += 1;
                break Some(c);
            }
            if w.ended == n {
                break None;
            }
            if w.gap() {
                let why = format!("chunk {} was skipped by every stream", w.next);
                return Err(MigrateError::Protocol { stream: 0, why });
            }
            w = window.changed.wait(w).expect("window lock");
        };
        window.changed.notify_all();
        let (total, next) = (w.total, w.next);
        drop(w);
        match chunk {
            Some(c) => {
                let Some(out) = output.as_mut() else {
                    let why = "the other end sent bytes this end has nowhere to put".to_string();
                    return Err(MigrateError::Protocol { stream: 0, why });
                };
                out.write_all(&c).map_err(|e| TransportError::io("write output", e))?;
                shared.touch();
                report.bytes += c.len() as u64;
                report.chunks += 1;
            }
            None => {
                if total != Some(next) {
                    let why = format!("stream ended after {next} chunks, sender announced {total:?}");
                    return Err(MigrateError::Protocol { stream: 0, why });
                }
                if let Some(mut out) = output.take() {
                    out.finish().map_err(|e| TransportError::io("close output", e))?;
                }
                confirm.send(control(FrameKind::Verified, next)).map_err(|_| MigrateError::Aborted)?;
                return Ok(report);
            }
        }
    }
}
