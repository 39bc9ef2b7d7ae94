//! Source streams: one writer per stream draining its bounded queue to the
//! socket, and one listener per stream for what the destination says.

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use hdrhistogram::Histogram;
use pmigrate_transport::frame::{FrameHdr, FrameKind, FLAG_FINAL};
use pmigrate_transport::net::{write_frame, FrameReader};
use pmigrate_transport::payload::build_control;
use pmigrate_transport::{Link, TransportError};

use super::Progress;
use crate::MigrateError;

/// What a stream's queue carries.
pub(super) enum Msg {
    /// A sealed frame and when it was sealed.
    Frame(Vec<u8>, Instant),
    /// A control frame built by the coordinator (probes).
    Control(Vec<u8>),
    RoundEnd {
        round: u64,
        last: bool,
    },
    Done {
        digest: u64,
    },
}

pub(super) struct StreamStats {
    pub(super) bytes: AtomicU64,
    pub(super) frames: AtomicU64,
}

/// Reconnects a stream whose connection of the given generation failed
/// with the given error, when the session allows; else returns the error.
pub(super) type Redial<'a> = dyn Fn(u64, TransportError) -> Result<(Arc<TcpStream>, u64), TransportError> + Sync + 'a;

/// Writes whole frames to a link, reconnecting (and writing the frame
/// again, whole) when its connection breaks and `redial` allows.
pub(super) struct Writer<'a> {
    pub(super) link: &'a Link,
    pub(super) cur: (Arc<TcpStream>, u64),
    pub(super) redial: &'a Redial<'a>,
    pub(super) name: String,
    /// The destination's verdict is in: what is left to write is moot.
    pub(super) settled: &'a AtomicBool,
}

impl Writer<'_> {
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

#[allow(clippy::too_many_arguments)]
pub(super) fn sender(
    link: &Link,
    index: usize,
    rx: Receiver<Msg>,
    pool: Sender<Vec<u8>>,
    stats: &StreamStats,
    progress: &Progress,
    abort: &AtomicBool,
    settled: &AtomicBool,
    redial: &Redial<'_>,
) -> Result<Histogram<u64>, MigrateError> {
    let name = format!("stream {index}");
    let mut out = Writer { link, cur: link.current(), redial, name: name.clone(), settled };
    let mut frames_this_round = 0u64;
    // Microseconds from a frame sealed to its last byte handed to the kernel.
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 2).expect("valid histogram bounds");
    let mut ctl = Vec::with_capacity(64);
    let res = (|| {
        for msg in rx.iter() {
            let buf: &[u8] = match msg {
                Msg::Frame(f, sealed) => {
                    out.write(&f)?;
                    latency.saturating_record(sealed.elapsed().as_micros() as u64);
                    frames_this_round += 1;
                    stats.frames.fetch_add(1, Ordering::Relaxed);
                    stats.bytes.fetch_add(f.len() as u64, Ordering::Relaxed);
                    progress.wire_bytes.fetch_add(f.len() as u64, Ordering::Relaxed);
                    let _ = pool.try_send(f);
                    continue;
                }
                Msg::RoundEnd { round, last } => {
                    let mut h = FrameHdr::new(FrameKind::RoundEnd);
                    h.aux = round;
                    h.first = frames_this_round;
                    h.flags = if last { FLAG_FINAL } else { 0 };
                    frames_this_round = 0;
                    build_control(&mut ctl, h, &[]);
                    &ctl
                }
                Msg::Control(f) => {
                    ctl = f;
                    &ctl
                }
                Msg::Done { digest } => {
                    let mut h = FrameHdr::new(FrameKind::Done);
                    h.aux = digest;
                    build_control(&mut ctl, h, &[]);
                    &ctl
                }
            };
            out.write(buf)?;
            stats.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
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
    pub(super) verdict: Sender<Result<u64, MigrateError>>,
    /// Probe replies (stream 0).
    pub(super) probes: Sender<Vec<u8>>,
    /// Post-copy: answers page requests (the priority stream only).
    pub(super) answer: Option<super::requests::Answerer<'a>>,
    /// Set when the destination says the guest runs there.
    pub(super) running: &'a OnceLock<Instant>,
    /// Set when the verdict arrives.
    pub(super) settled: &'a AtomicBool,
}

/// Reads what the destination says on a stream: probe replies (stream 0),
/// page requests and the switchover's answer (priority stream), then
/// `Verified` on stream 0 at the end, or an `Error` at any time; reports
/// the outcome on `verdict`.
pub(super) fn listener(link: &Link, index: usize, mut to: Listen<'_>, abort: &AtomicBool, redial: &Redial<'_>) {
    let mut cur = link.current();
    let prio = to.answer.is_some();
    // Answers go out from this thread at once, on the same connection.
    let mut reply = Writer { link, cur: cur.clone(), redial, name: format!("stream {index}"), settled: to.settled };
    let outcome = 'conn: loop {
        let mut r = FrameReader::new(&*cur.0, format!("stream {index}"));
        break loop {
            let wire = |source| MigrateError::from(TransportError::Wire { what: format!("stream {index}"), source });
            match r.next_frame() {
                Ok(Some((h, p))) if h.kind == FrameKind::ProbeReply && index == 0 => match h.verify(p) {
                    Ok(()) => {
                        let _ = to.probes.send(p.to_vec());
                    }
                    Err(e) => break Err(wire(e)),
                },
                Ok(Some((h, _))) if h.kind == FrameKind::PageRequest && prio => match h.verify(&[]) {
                    Ok(()) => {
                        let req = super::requests::Request { region: h.region, first: h.first, count: h.count };
                        let ans = to.answer.as_mut().expect("priority stream");
                        let sent = ans.answer(req).and_then(|f| {
                            reply.cur = link.current();
                            reply.write(f).map_err(MigrateError::from)
                        });
                        if let Err(e) = sent {
                            break Err(e);
                        }
                    }
                    Err(e) => break Err(wire(e)),
                },
                Ok(Some((h, _))) if h.kind == FrameKind::Switchover && prio => match h.verify(&[]) {
                    Ok(()) if h.flags & FLAG_FINAL != 0 => {
                        let _ = to.running.set(Instant::now());
                    }
                    Ok(()) => {
                        break Err(TransportError::Unexpected { what: format!("stream {index}"), kind: h.kind }.into())
                    }
                    Err(e) => break Err(wire(e)),
                },
                // Post-copy's verdict comes on the priority stream.
                Ok(Some((h, _))) if h.kind == FrameKind::Verified && (index == 0 || prio) => {
                    let v = h.verify(&[]).map(|()| h.aux).map_err(wire);
                    to.settled.store(true, Ordering::Release);
                    break v;
                }
                Ok(Some((h, _))) => {
                    break Err(TransportError::Unexpected { what: format!("stream {index}"), kind: h.kind }.into())
                }
                // The destination closes its streams once done; before that, a
                // closed stream was cut and may be reconnected.
                Ok(None) => match redial(cur.1, TransportError::Closed(format!("stream {index}: closed"))) {
                    Ok(next) => {
                        cur = next;
                        continue 'conn;
                    }
                    Err(_) => return,
                },
                // A broken connection (not a clean close) may be reconnected.
                Err(e) => match redial(cur.1, e) {
                    Ok(next) => {
                        cur = next;
                        continue 'conn;
                    }
                    Err(e) => break Err(e.into()),
                },
            }
        };
    };
    if outcome.is_err() {
        abort.store(true, Ordering::Relaxed);
    }
    let _ = to.verdict.send(outcome);
}
