//! Streams that survive a lost connection (`CAP_RESUME`, protocol.md
//! §7.4.1).
//!
//! Every stream of a relay is a [`Lane`]: its connection, in a [`Link`]
//! that a resumable session can replace, and what the stream's reader and
//! writer tell each other. The reader notes each chunk it took off the
//! stream (verified into the reorder window, or delivered); the writer
//! acknowledges them to the other end with `Ack` on the same stream — every
//! [`ACK_EVERY`] chunks, and within [`ACK_TICK`] of the last one — and
//! keeps, in an [`Unacked`] buffer, every frame the other end may still
//! need: `Data` until acknowledged, `End` and `Verified` until the session
//! is over. A full buffer ([`RESEND_LIMIT`]) stops the writer taking new
//! frames, which backs up its queue and the sequencer like a slow link.
//!
//! A read or write that fails, or a stream that ends before its duties are
//! done, loses the stream, not the session ([`lost`]). The session's source
//! dials it again — its own route first — and the accepting end waits for
//! it to come back, both within the relay's progress timeout
//! ([`Shared::recover`]). On the new connection the writer first sends
//! again, in order, everything its buffer kept, and the reader drops what
//! it had taken already (`Reassembly::replayed`); a full-duplex session
//! resumes both directions on the one connection. The other end's `Error`,
//! a frame that fails its check, a stall or silence past the progress
//! timeout, and an interrupt are not lost streams: they fail the relay as
//! they do without `CAP_RESUME`. So does a stream that does not come back
//! in time.
//!
//! **The end.** A resumable end half-closes its streams only once it is
//! complete (its outbound flow confirmed, its inbound flow ended and
//! confirmed), so the other end's clean end of stream says it is complete
//! too — once that end's confirmation of this end's outbound flow arrived:
//! a clean end before it is the network's, a lost connection. Until both
//! ends are known complete a lost stream is taken back:
//! the other end may still need a frame this end sent (its `Verified`). An
//! end that is complete and waited in vain for a stream to come back ends
//! well, saying so: its local peer has everything.

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use pmigrate_transport::accept::HANDSHAKE_TIMEOUT;
use pmigrate_transport::backend::Outgoing;
use pmigrate_transport::frame::{FrameHdr, FrameKind, HEADER_LEN};
use pmigrate_transport::{Conn, Hello, Link, Rejoin, SessionKey, StreamPlan, TransportError};

use super::ends::{not_back, Ends, Unreturned};
use super::inbound::WHY_GRACE;
use super::Shared;
use crate::MigrateError;

/// Chunks a reader takes off its stream before its writer acknowledges
/// them at once: 8 chunks are 2 MiB at full size, so a sender keeps a few
/// milliseconds of a fast link, not a window's worth.
pub(crate) const ACK_EVERY: u64 = 8;

/// How long a chunk taken may wait for its acknowledgement when fewer than
/// [`ACK_EVERY`] follow it (a trickle, a return path).
pub(crate) const ACK_TICK: Duration = Duration::from_millis(100);

/// Bytes of `Data` frames a writer keeps unacknowledged at most: 32 MiB.
/// Frames wait for their `Ack` while they are in both ends' socket buffers
/// (4 MiB asked each, which the kernel may double) and while the ack comes
/// back; a receiver acknowledges what it verified into its reorder window
/// (16 MiB), not only what it delivered, so the buffer fills only when the
/// other end stops taking this stream, or this end stops reading its acks.
/// The unit tests keep 2 MiB, so that the few MiB they carry fill it.
pub(crate) const RESEND_LIMIT: usize = if cfg!(test) { 2 << 20 } else { 32 << 20 };

/// How often waits look whether the relay failed or ended meanwhile.
const TICK: Duration = Duration::from_millis(100);

/// How a lost stream of a resumable session (`CAP_RESUME`) comes back.
#[derive(Debug)]
pub enum Comeback {
    /// This end opened the session: it dials the stream again, proving the
    /// session's secret.
    Redial(Box<Redial>),
    /// This end accepted the session: its streams come back through these,
    /// already proven and welcomed.
    Await(pmigrate_transport::Resumes),
}

/// What the session's source needs to dial a lost stream again.
#[derive(Debug)]
pub struct Redial {
    /// Where the streams go and how they leave.
    pub plan: StreamPlan,
    /// The session's `Hello`.
    pub hello: Hello,
    /// The session's secret.
    pub key: SessionKey,
    /// A stream whose path acknowledges nothing for this long moves to
    /// another route ([`RelaySendConfig::link_timeout`](super::RelaySendConfig::link_timeout)).
    pub link_timeout: Duration,
}

impl Redial {
    /// How to dial a stream again, each new connection readied by `ready`.
    pub(crate) fn rejoin<'a>(&'a self, ready: &'a pmigrate_transport::link::Ready<'a>) -> Rejoin<'a> {
        Rejoin { plan: &self.plan, hello: &self.hello, key: &self.key, ready: Some(ready) }
    }
}

/// One stream of a relay.
pub(crate) struct Lane {
    /// Its connection, replaced when it comes back.
    pub(crate) link: Link,
    /// Inbound: the sequence number after the last chunk taken off this
    /// stream (what an `Ack` says).
    taken: AtomicU64,
    /// Chunks taken since the writer last acknowledged.
    unacked_in: AtomicU64,
    /// Outbound: the other end's latest `Ack` on this stream.
    acked: AtomicU64,
    /// The other end ended this stream cleanly once complete: nothing more
    /// comes on it, nor is needed from this end.
    finished: AtomicBool,
    /// The generation whose loss was logged, and the one whose comeback was.
    lost_logged: AtomicU64,
    back_logged: AtomicU64,
    /// Wakes the writer: acknowledgements to send or received, a new
    /// connection, the end.
    wake: (Sender<()>, Receiver<()>),
}

impl Lane {
    pub(crate) fn new(conn: Conn) -> Self {
        Lane {
            link: Link::new(conn),
            taken: AtomicU64::new(0),
            unacked_in: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            finished: AtomicBool::new(false),
            lost_logged: AtomicU64::new(0),
            back_logged: AtomicU64::new(0),
            wake: bounded(1),
        }
    }

    /// Wakes the writer (never blocks).
    pub(crate) fn wake(&self) {
        let _ = self.wake.0.try_send(());
    }

    /// What the writer waits on besides its queue.
    pub(crate) fn woken(&self) -> &Receiver<()> {
        &self.wake.1
    }

    /// The reader took chunk `seq` off the stream (or dropped it as a
    /// replay, or because the local peer left).
    pub(crate) fn took(&self, seq: u64) {
        self.taken.fetch_max(seq.saturating_add(1), Ordering::AcqRel);
        if self.unacked_in.fetch_add(1, Ordering::AcqRel) + 1 >= ACK_EVERY {
            self.wake();
        }
    }

    /// The reader took every chunk of this stream below this.
    pub(crate) fn taken(&self) -> u64 {
        self.taken.load(Ordering::Acquire)
    }

    /// Chunks the reader took since the writer's last `Ack`.
    pub(crate) fn taken_since_ack(&self) -> u64 {
        self.unacked_in.load(Ordering::Acquire)
    }

    /// The writer is writing an `Ack` of what the reader took: the count
    /// starts again.
    pub(crate) fn ack_written(&self) {
        self.unacked_in.store(0, Ordering::Release);
    }

    /// The other end acknowledged every chunk of this stream below `next`.
    pub(crate) fn acked(&self, next: u64) {
        self.acked.fetch_max(next, Ordering::AcqRel);
        self.wake();
    }

    /// The other end's latest acknowledgement.
    pub(crate) fn acknowledged(&self) -> u64 {
        self.acked.load(Ordering::Acquire)
    }

    /// The other end ended this stream cleanly.
    pub(crate) fn finish(&self) {
        self.finished.store(true, Ordering::Release);
        self.wake();
    }

    pub(crate) fn finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }

    /// Logs the loss of generation `seen` of stream `i`, once.
    fn log_lost(&self, i: usize, seen: u64, why: &dyn std::fmt::Display) {
        self.link.note_lost(seen);
        if self.lost_logged.fetch_max(seen + 1, Ordering::AcqRel) <= seen {
            if self.link.given_up() {
                tracing::warn!(stream = i, "stream's link down (nothing acknowledged); reconnecting by another");
            } else {
                tracing::warn!(stream = i, reason = %why, "stream lost; reconnecting");
            }
        }
    }

    /// Logs that generation `g` of stream `i` is in place, once.
    fn log_back(&self, i: usize, g: u64) {
        if self.back_logged.fetch_max(g, Ordering::AcqRel) < g {
            tracing::info!(stream = i, reconnects = g, "stream resumed");
        }
    }

    /// The accepting end: stream `i` came back on `conn`, which takes the
    /// place of the lost connection (its threads, blocked on the old one,
    /// pick it up).
    pub(crate) fn came_back(&self, i: usize, conn: Conn) {
        let (_, old) = self.link.current();
        // The other end may have seen the loss first.
        self.log_lost(i, old, &"the other end lost it and came back");
        self.link.replace(conn);
        self.log_back(i, self.link.current().1);
        self.wake();
    }
}

/// Readies a stream's connection for the relay: the read timeout is the
/// readers' polling tick, unacknowledged data fails after the progress
/// timeout.
pub(crate) fn prepare(conn: &Conn, progress_timeout: Duration) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_millis(500)))?;
    pmigrate_transport::net::set_progress_timeout(conn.tcp(), progress_timeout)
}

/// Whether a stream's failure is the loss of its connection, which a
/// resumable session survives: a reset or any other socket error, an end
/// of stream where none may be. A stall or silence past the progress
/// timeout (the peer frozen), the peer's `Error`, and frames that break the
/// protocol are not.
pub(crate) fn lost(e: &TransportError) -> bool {
    match e {
        TransportError::Closed(_) => true,
        TransportError::Io { source, .. } => write_lost(source),
        _ => false,
    }
}

/// [`lost`], for a failed write. `WouldBlock` is a read timing out inside
/// a frame (the reader's stall limit), never a lost connection.
pub(crate) fn write_lost(e: &std::io::Error) -> bool {
    e.kind() != ErrorKind::WouldBlock
}

/// What a frame a writer wrote is to its [`Unacked`] buffer: a chunk's
/// sequence number, or the kind of a word kept until the session is over.
fn kept(frame: &[u8]) -> Option<Result<u64, FrameKind>> {
    let hdr = FrameHdr::decode(frame.get(..HEADER_LEN)?.try_into().ok()?).ok()?;
    match hdr.kind {
        FrameKind::Data => Some(Ok(hdr.aux)),
        FrameKind::End | FrameKind::Verified => Some(Err(hdr.kind)),
        _ => None,
    }
}

/// The frames a writer may have to send again on a new connection: its
/// chunks not yet acknowledged, in order, and its `End` (after them) and
/// `Verified` of the other flow (independent of them).
#[derive(Default)]
pub(crate) struct Unacked {
    chunks: VecDeque<(u64, Outgoing)>,
    words: Vec<(FrameKind, Outgoing)>,
    /// Bytes of `Data` frames handed to the writer and not acknowledged,
    /// those the writer still holds included.
    bytes: usize,
}

impl Unacked {
    /// A frame goes to the writer.
    pub(crate) fn handed(&mut self, frame: &[u8]) {
        if matches!(kept(frame), Some(Ok(_))) {
            self.bytes += frame.len();
        }
    }

    /// Frames back from the writer, in order: written, or not wholly
    /// written when it failed. Those the other end may need are kept.
    pub(crate) fn keep(&mut self, frames: impl IntoIterator<Item = Outgoing>) {
        for f in frames {
            match kept(f.as_slice()) {
                Some(Ok(seq)) => self.chunks.push_back((seq, f)),
                Some(Err(kind)) => self.words.push((kind, f)),
                None => {}
            }
        }
    }

    /// Forgets the chunks the other end acknowledged (below `next`),
    /// handing each to `done`.
    pub(crate) fn release(&mut self, next: u64, mut done: impl FnMut(Outgoing)) {
        while self.chunks.front().is_some_and(|(seq, _)| *seq < next) {
            let (_, f) = self.chunks.pop_front().expect("just looked");
            self.bytes = self.bytes.saturating_sub(f.len());
            done(f);
        }
    }

    /// Whether the writer may take another frame.
    pub(crate) fn room(&self) -> bool {
        self.bytes < RESEND_LIMIT
    }

    /// Everything kept, to send again (and keep again as it goes out):
    /// `Verified`, the chunks in order, `End`; and how many chunks.
    pub(crate) fn replay(&mut self) -> (Vec<Outgoing>, u64) {
        let chunks = self.chunks.len() as u64;
        let (end, verified): (Vec<_>, Vec<_>) = self.words.drain(..).partition(|(k, _)| *k == FrameKind::End);
        let mut out: Vec<Outgoing> = verified.into_iter().map(|(_, f)| f).collect();
        out.extend(self.chunks.drain(..).map(|(_, f)| f));
        out.extend(end.into_iter().map(|(_, f)| f));
        (out, chunks)
    }
}

/// How a lost stream turned out.
pub(crate) enum Recovered {
    /// It is back: the connection and its generation.
    Back(Arc<Conn>, u64),
    /// Nothing more is needed on it: both ends are complete, or this end is
    /// and waited for it in vain.
    Over,
}

impl Shared<'_> {
    /// Whether a lost stream may come back (`CAP_RESUME`).
    pub(crate) fn resumable(&self) -> bool {
        self.resume.is_some()
    }

    /// Where the two ends stand.
    pub(crate) fn ends(&self) -> Ends {
        Ends {
            failed: self.failed(),
            complete: self.complete.load(Ordering::Acquire),
            peer_complete: self.peer_complete.load(Ordering::Acquire),
        }
    }

    /// Both ends are known complete: no stream is needed any more.
    pub(crate) fn both_complete(&self) -> bool {
        self.complete.load(Ordering::Acquire) && self.peer_complete.load(Ordering::Acquire)
    }

    /// Wakes every writer.
    pub(crate) fn wake_all(&self) {
        self.lanes.iter().for_each(Lane::wake);
    }

    /// Stream `i`'s connection of generation `seen` was lost (`why`):
    /// returns the connection that replaced it once the stream is back,
    /// or what fails the relay. Called by the stream's reader and writer
    /// alike; only one of them dials.
    pub(crate) fn recover(&self, i: usize, seen: u64, why: TransportError) -> Result<Recovered, MigrateError> {
        let lane = &self.lanes[i];
        let Some(resume) = &self.resume else { return Err(why.into()) };
        let newer = || Some(lane.link.current()).filter(|&(_, g)| g > seen);
        if let Some((c, g)) = newer() {
            return Ok(Recovered::Back(c, g));
        }
        if self.both_complete() {
            return Ok(Recovered::Over);
        }
        // A failing end tells why on stream 0 as it closes its streams, and
        // takes none back.
        if self.failed_within(WHY_GRACE) {
            return Err(MigrateError::Aborted);
        }
        if let Some((c, g)) = newer() {
            return Ok(Recovered::Back(c, g));
        }
        lane.log_lost(i, seen, &why);
        let _busy = Busy::new(&self.recovering);
        let within = self.progress_timeout;
        let res = match resume {
            Resume::Redial(r) => {
                let give_up = || self.failed() || self.both_complete();
                let ready = |c: &Conn| prepare(c, within);
                lane.link
                    .rejoin(seen, &r.rejoin(&ready), i as u16, within, &give_up)
                    .map(|(c, g)| Recovered::Back(c, g))
            }
            Resume::Await => {
                // The source dials for its progress timeout from when it
                // saw the loss, each attempt a handshake at most.
                let until = Instant::now() + within + HANDSHAKE_TIMEOUT;
                loop {
                    if self.failed() {
                        return Err(MigrateError::Aborted);
                    }
                    if self.both_complete() {
                        break Ok(Recovered::Over);
                    }
                    if let Some((c, g)) = lane.link.wait_newer(seen, TICK) {
                        break Ok(Recovered::Back(c, g));
                    }
                    if Instant::now() >= until {
                        break Err(TransportError::Closed(format!("stream {i}: the other end did not come back")));
                    }
                }
            }
        };
        match res {
            Ok(Recovered::Back(c, g)) => {
                lane.log_back(i, g);
                lane.wake();
                Ok(Recovered::Back(c, g))
            }
            Ok(Recovered::Over) => Ok(Recovered::Over),
            Err(e) => match not_back(self.ends()) {
                Unreturned::Aborted => Err(MigrateError::Aborted),
                Unreturned::Over => Ok(Recovered::Over),
                Unreturned::OverUnheard => {
                    tracing::warn!(stream = i, reason = %e, "stream lost after the end did not come back");
                    Ok(Recovered::Over)
                }
                Unreturned::Fail => Err(TransportError::Setup(format!(
                    "stream {i} was lost ({why}) and did not come back within {within:?}: {e}"
                ))
                .into()),
            },
        }
    }
}

/// How a resumable relay takes a lost stream back, as its [`Shared`] holds
/// it.
pub(crate) enum Resume {
    /// Dial it again.
    Redial(Box<Redial>),
    /// Wait for it: the comebacks thread puts it in its lane.
    Await,
}

/// Counts a stream being taken back while it lives.
struct Busy<'a>(&'a AtomicU64);

impl<'a> Busy<'a> {
    fn new(c: &'a AtomicU64) -> Self {
        c.fetch_add(1, Ordering::AcqRel);
        Busy(c)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
