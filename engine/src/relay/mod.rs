//! Byte-stream mode: an ordered byte stream (QEMU's migration stream, or
//! any connection the socket proxy carries) striped over many TCP streams
//! and reassembled in order — in both directions at once when the session
//! is full duplex (`CAP_DUPLEX`).
//!
//! ```text
//!            ┌ input ─ reader ─┬──────────────────────── dispatch ─┬─ writer 0 ──┐
//!            │                 └─ workers (lz4) ─ sequencer ─┘     └─ writer N ──┤ TCP streams
//!  local  ───┤                                                                   │ (both ways)
//!  peer      └ output ─ reorder window ─┬─ reader 0 (writes the output in turn) ─┤
//!                                       └─ reader N ─────────────────────────────┘
//! ```
//!
//! Each end runs the same machinery: an *outbound* flow from its local
//! input (`outbound.rs`) and an *inbound* flow to its local output
//! (`inbound.rs`), over one set of TCP streams; every stream has one writer
//! thread and one reader thread. Without `CAP_DUPLEX` only the session's
//! source has an outbound flow and only the destination an inbound one.
//!
//! Outbound, the reader cuts a chunk from whatever one `read` returns (at
//! most [`CHUNK`] bytes): under load a read returns a full chunk, and when
//! the producer writes a few bytes and waits — QEMU's last pages and device
//! state after the guest paused, a page request on a return path — they
//! leave at once, never held back for a full chunk or a timer. Chunks of at
//! most [`INLINE_CHUNK`] bytes are sealed by the reader itself, so a small
//! message costs no thread hop; larger ones go through worker threads when
//! lz4 is on (lz4, check) and are sealed by the reader too while it is off
//! (a hop per chunk cost more CPU than its check: with QEMU feeding 32 KiB
//! writes, chunks are tens of KiB, and hops were most of the sender's
//! time). Frames are handed to streams in sequence order, each to a stream
//! with room, so every stream carries increasing sequence numbers: by the
//! reader for what it sealed, by the sequencer thread for the workers'
//! frames, under one lock. When the input ends, every stream gets `End`.
//!
//! Inbound, each chunk is verified before it enters a bounded reorder
//! window; a stream reader holding a chunk beyond the window stops reading
//! its stream until the output catches up, which pushes back through TCP to
//! the other end's writers, its bounded queues and its input, so the
//! producer sees the real rate of the links. Because each stream's chunks
//! are in order, the chunk the output needs is always at the head of some
//! stream: the window cannot deadlock. Only verified bytes reach the output,
//! in order, written by the stream reader that brought the chunk whose turn
//! it is (a deliverer thread writes what no reader took). After the last one
//! the output is half-closed (the local peer reads its end of stream) and
//! the other end is told with `Verified`.
//!
//! A relay succeeds only when its outbound flow was confirmed and its
//! inbound flow ended whole — or, at the session's source, was closed by
//! the local peer (below). Any failure — a stream lost or corrupted, the
//! local peer gone mid-stream, an [`Interrupt`] — sends `Error` on the
//! streams, closes them, and aborts the local side ([`Local::abort`]), so
//! the local peers on both ends see the failure instead of a clean end of
//! stream.
//!
//! **The local peer closing.** QEMU ends an `exec:` migration — completed
//! or cancelled alike — by closing both of its pipes to `send` and then
//! waiting for the helper to exit, with its main loop stopped. So once the
//! session source's input has ended and its output has no reader left
//! ([`Output::reader_gone`], or a write fails with a broken pipe), the way
//! back can never be delivered: that end drops the rest of its inbound
//! flow and confirms what it delivered with `Verified` flagged
//! `FLAG_CLOSED`, while its outbound flow still ends as always (`End`, the
//! other end's `Verified`): the input arrives whole. The destination end
//! stops its outbound flow where it is and ends too, closing its output —
//! a destination QEMU whose stream was cut short by a cancel reads the end
//! of it and fails its incoming migration, one that has the whole stream
//! finishes loading it. Only the session's source may close a direction
//! this way; at the destination, a local peer that stops reading before
//! the end is a failure.
//!
//! **Lost streams** (`CAP_RESUME`, `resume.rs`). A stream whose connection
//! is lost — a reset, a failed read or write, an end of stream before its
//! end — is taken back instead of failing the relay: the session's source
//! dials it again and the accepting end waits for it, within the progress
//! timeout. Each receiver acknowledges the chunks it took off a stream
//! (`Ack`, on the same stream); each writer keeps what it wrote until then
//! and sends it again, first, on the new connection, where replayed chunks
//! are dropped by number. Both directions of a full-duplex session resume
//! on the one connection. A stream that does not come back in time fails
//! the relay as above.

mod ends;
mod inbound;
mod outbound;
pub(crate) mod reader;
pub(crate) mod reassembly;
mod resume;
#[cfg(test)]
mod tests;
mod writer;

pub use resume::{Comeback, Redial};

/// The cutting relay of the fault matrix, standing for the network.
#[cfg(test)]
#[path = "../../../tests/support/cutter.rs"]
pub(crate) mod cutter;

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, RecvTimeoutError};
use pmigrate_transport::backend::Resolved;
use pmigrate_transport::hello::{
    encode_target, ErrorCode, ErrorMsg, Hello, Mode, CAP_DUPLEX, CAP_LZ4, CAP_RESUME, EXT_TARGET, PROTOCOL_VERSION,
};
use pmigrate_transport::session::{connect_session, new_session_id, StreamPlan};
use pmigrate_transport::{Acceptor, BackendChoice, Conn, Connected, Resumes, TransportError};
use serde::Serialize;

use resume::{prepare, Lane, Resume};

use crate::{Compression, MigrateError};

/// Largest chunk: 256 KiB. Large enough that per-frame costs vanish at
/// 10 Gbit/s, small enough that one chunk on a 1 Gbit/s link takes 2 ms.
pub const CHUNK: usize = 256 << 10;

/// Chunks up to this size are sealed by the input reader itself, without
/// lz4: small messages (page requests, acknowledgements) leave at once.
/// (While the session's lz4 policy says raw, the reader seals every chunk.)
pub const INLINE_CHUNK: usize = 4 << 10;

/// Frames queued per stream on the sending side.
const QUEUE_DEPTH: usize = 4;

/// Chunks the receiver holds out of order at most: 64 × 256 KiB = 16 MiB.
pub const REORDER_WINDOW: u64 = 64;

/// How long a finished end waits for the other end to close its streams.
const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// How often a relay looks whether its [`Interrupt`] was raised: a signal
/// ends the relay within this.
const INTERRUPT_TICK: Duration = Duration::from_millis(50);

/// One direction of a relay.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FlowReport {
    /// Bytes of the stream itself.
    pub bytes: u64,
    /// Chunks.
    pub chunks: u64,
    /// Chunks sent lz4-compressed (outbound flows only).
    pub compressed_chunks: u64,
    /// Bytes of this flow's `Data` and `End` frames on the wire.
    pub wire_bytes: u64,
    /// The flow stopped before its end because the local peer it went to
    /// closed (see the module docs): `bytes` and `chunks` count what was
    /// delivered (inbound) or sent (outbound) until then.
    pub closed_early: bool,
}

impl FlowReport {
    /// How the flow ended, for a report line.
    fn ending(&self) -> &'static str {
        if self.closed_early {
            " (its reader closed first)"
        } else {
            ""
        }
    }
}

/// What a relay moved.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RelayReport {
    /// `"send"`, `"recv"` or `"proxy"`.
    pub role: String,
    /// The session's source → destination direction.
    pub forward: FlowReport,
    /// The way back (full-duplex sessions only).
    pub back: FlowReport,
    /// Streams.
    pub streams: usize,
    /// Seconds from the first stream connected to the end.
    pub secs: f64,
    /// The I/O backend that ran (`io_uring` or `portable`).
    pub backend: String,
    /// Connections that replaced lost ones (`CAP_RESUME`).
    pub reconnects: u64,
    /// Chunks this end sent again on a new connection, not having seen
    /// them acknowledged on the lost one.
    pub resent_chunks: u64,
    /// What happened to the streams' links, oldest first.
    pub links: Vec<crate::report::LinkReport>,
}

impl std::fmt::Display for RelayReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (fw, bk) = (&self.forward, &self.back);
        write!(
            f,
            "pmigrate {}: {} bytes in {} chunks ({} lz4) over {} streams, {} bytes on the wire{}, {:.3} s; \
             back: {} bytes in {} chunks{}; {} I/O",
            self.role,
            fw.bytes,
            fw.chunks,
            fw.compressed_chunks,
            self.streams,
            fw.wire_bytes,
            fw.ending(),
            self.secs,
            bk.bytes,
            bk.chunks,
            bk.ending(),
            self.backend
        )?;
        if self.reconnects > 0 {
            let s = if self.reconnects == 1 { "" } else { "s" };
            write!(f, "; {} lost stream{s} resumed, {} chunks sent again", self.reconnects, self.resent_chunks)?;
            let lost = crate::report::LinkReport::time_lost(&self.links);
            write!(f, ", {lost:.2} s without a connection")?;
        }
        for e in &self.links {
            write!(f, "; {e}")?;
        }
        Ok(())
    }
}

/// Where the other end's bytes go.
pub trait Output: Write + Send {
    /// No more bytes will come: flush, and half-close where the output is a
    /// socket. (A pipe or file closes when the relay drops it, right after.)
    fn finish(&mut self) -> io::Result<()>;

    /// Whether the local peer has stopped reading for good, so nothing
    /// written here can reach it. Asked only at the session's source, once
    /// its input has ended (see the module docs). Outputs that cannot tell
    /// say `false`; a write failing with a broken pipe tells the relay the
    /// same later.
    fn reader_gone(&self) -> bool {
        false
    }
}

impl Output for UnixStream {
    fn finish(&mut self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

impl Output for TcpStream {
    fn finish(&mut self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

impl Output for std::fs::File {
    fn finish(&mut self) -> io::Result<()> {
        self.flush()
    }
}

/// One end's local side of a relayed byte stream.
pub struct Local {
    /// Bytes for the other end, read until end of file; `None`: nothing.
    pub input: Option<Box<dyn Read + Send>>,
    /// Where the other end's bytes go; `None`: the other end must send none.
    pub output: Option<Box<dyn Output>>,
    /// Called once if the relay fails: the local peer must see a failure,
    /// not a clean end, and a read of `input` should return.
    pub abort: Box<dyn Fn() + Send + Sync>,
}

impl Local {
    /// A full-duplex socket: read to its end, written and half-closed,
    /// shut down both ways on failure.
    pub fn unix(s: UnixStream) -> io::Result<Self> {
        let (input, abort) = (s.try_clone()?, s.try_clone()?);
        Ok(Local {
            input: Some(Box::new(input)),
            output: Some(Box::new(s)),
            abort: Box::new(move || {
                let _ = abort.shutdown(Shutdown::Both);
            }),
        })
    }

    /// A TCP connection, like [`Local::unix`]; on failure it is reset, not
    /// closed, so its peer sees an error.
    pub fn tcp(s: TcpStream) -> io::Result<Self> {
        let (input, abort) = (s.try_clone()?, s.try_clone()?);
        Ok(Local {
            input: Some(Box::new(input)),
            output: Some(Box::new(s)),
            abort: Box::new(move || pmigrate_transport::net::reset_now(&abort)),
        })
    }

    /// Separate input and output (an `exec:` helper's stdin and stdout).
    /// A failure cannot reach them: the helper exits instead.
    pub fn pipes(input: Option<std::fs::File>, output: Option<std::fs::File>) -> Self {
        Local {
            input: input.map(|i| Box::new(i) as Box<dyn Read + Send>),
            output: output.map(|o| Box::new(o) as Box<dyn Output>),
            abort: Box::new(|| {}),
        }
    }
}

/// Stops a running relay from another thread (a signal handler's): the
/// relay tells the other end why with an `Error` frame, shuts its streams
/// and local side, and fails with [`MigrateError::Interrupted`].
#[derive(Clone, Debug, Default)]
pub struct Interrupt(Arc<InterruptState>);

#[derive(Debug, Default)]
struct InterruptState {
    why: Mutex<Option<String>>,
    carrying: AtomicBool,
}

impl Interrupt {
    /// An interrupt not raised yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stops the relay carrying under this interrupt (now, or as soon as
    /// it starts) with `why`, e.g. `"interrupted by SIGTERM"`. The first
    /// reason counts.
    pub fn raise(&self, why: impl Into<String>) {
        self.0.why.lock().expect("interrupt lock").get_or_insert_with(|| why.into());
    }

    /// The reason, once raised.
    pub fn raised(&self) -> Option<String> {
        self.0.why.lock().expect("interrupt lock").clone()
    }

    /// Whether a relay is carrying bytes under this interrupt right now
    /// (not before its session is up, not after it returned).
    pub fn carrying(&self) -> bool {
        self.0.carrying.load(Ordering::Acquire)
    }
}

/// Options of the sending side.
#[derive(Clone, Debug)]
pub struct RelaySendConfig {
    /// Where the streams go and how they leave.
    pub plan: StreamPlan,
    /// Worker threads building frames.
    pub threads: usize,
    /// lz4 policy.
    pub compression: Compression,
    /// Ask for a full-duplex session (the destination may refuse it).
    pub duplex: bool,
    /// The destination's target to connect to (the socket proxy).
    pub target: Option<u32>,
    /// A stream that carries nothing from the other end for this long (no
    /// frame, not even a keepalive), or stalls inside a frame as long,
    /// fails the relay; so does a peer that stops reading (its unacknowledged
    /// data, `TCP_USER_TIMEOUT`), and a lost stream that does not come back
    /// within it. At least [`pmigrate_transport::net::MIN_PROGRESS_TIMEOUT`].
    pub progress_timeout: Duration,
    /// Offer `CAP_RESUME`: a stream whose connection is lost comes back
    /// (see the module docs) instead of failing the relay.
    pub resume: bool,
    /// With `CAP_RESUME`: a stream whose path acknowledges nothing it sent
    /// for this long (a NIC or link down) moves to another route of the
    /// plan; it goes back once its own answers again.
    pub link_timeout: Duration,
    /// The I/O backend of the streams.
    pub backend: BackendChoice,
    /// End the relay as failed when no byte of the carried stream moved
    /// either way for this long (the proxy's abandoned connections).
    pub idle_timeout: Option<Duration>,
    /// Stops the relay from outside.
    pub interrupt: Option<Interrupt>,
}

impl RelaySendConfig {
    /// A full-duplex relay over `plan` with one thread and lz4 auto.
    pub fn new(plan: StreamPlan) -> Self {
        Self {
            plan,
            threads: 1,
            compression: Compression::Auto,
            duplex: true,
            target: None,
            progress_timeout: pmigrate_transport::net::PROGRESS_TIMEOUT,
            resume: true,
            link_timeout: pmigrate_transport::net::LINK_TIMEOUT,
            backend: BackendChoice::Auto,
            idle_timeout: None,
            interrupt: None,
        }
    }
}

/// Options of the receiving side.
#[derive(Clone, Debug)]
pub struct RelayRecvOptions {
    /// As [`RelaySendConfig::progress_timeout`].
    pub progress_timeout: Duration,
    /// Grant `CAP_RESUME` when the sender offers it: its lost streams come
    /// back.
    pub resume: bool,
    /// How long to wait for the sender to connect.
    pub accept_deadline: Option<Instant>,
    /// Worker threads building frames of the way back.
    pub threads: usize,
    /// The I/O backend of the streams.
    pub backend: BackendChoice,
    /// As [`RelaySendConfig::idle_timeout`].
    pub idle_timeout: Option<Duration>,
    /// Stops the relay from outside (once its session is up).
    pub interrupt: Option<Interrupt>,
}

impl Default for RelayRecvOptions {
    fn default() -> Self {
        Self {
            progress_timeout: pmigrate_transport::net::PROGRESS_TIMEOUT,
            resume: true,
            accept_deadline: None,
            threads: 1,
            backend: BackendChoice::Auto,
            idle_timeout: None,
            interrupt: None,
        }
    }
}

/// How one end of an established session relays.
#[derive(Clone, Debug)]
pub struct Carry {
    /// This end opened the session (its outbound flow is the forward one).
    pub source: bool,
    /// The session is full duplex.
    pub duplex: bool,
    /// This end may send lz4 chunks, and its policy.
    pub compression: Compression,
    /// The other end may send lz4 chunks.
    pub lz4_in: bool,
    /// Worker threads.
    pub threads: usize,
    /// How long a stream may carry nothing, or stall inside a frame.
    pub progress_timeout: Duration,
    /// How long the carried stream may move no byte either way.
    pub idle_timeout: Option<Duration>,
    /// The I/O backend of the streams, and why not io_uring if it fell back.
    pub io: Resolved,
    /// Stops the relay from outside.
    pub interrupt: Option<Interrupt>,
}

/// An established byte-stream session, ready to carry.
#[derive(Debug)]
pub struct Session {
    /// Its streams, index `i` at position `i`.
    pub streams: Vec<Conn>,
    /// How this end relays.
    pub how: Carry,
    /// With `CAP_RESUME` in force: how a lost stream comes back.
    pub resume: Option<Comeback>,
}

impl Session {
    /// Relays `local` over the session (see [`carry`]).
    pub fn carry(self, local: Local) -> Result<RelayReport, MigrateError> {
        carry(self, local)
    }
}

/// Opens a byte-stream session: every stream connected and welcomed. A
/// proxy session (`cfg.target`) is welcomed only once the destination
/// reached its target.
pub fn connect(cfg: &RelaySendConfig) -> Result<Session, MigrateError> {
    let mut caps = if cfg.compression == Compression::Off { 0 } else { CAP_LZ4 };
    if cfg.duplex {
        caps |= CAP_DUPLEX;
    }
    if cfg.resume {
        caps |= CAP_RESUME;
    }
    let hello = Hello {
        version: PROTOCOL_VERSION,
        mode: Mode::Stream,
        stream_index: 0,
        stream_count: cfg.plan.streams,
        session: new_session_id(),
        caps,
        regions: Vec::new(),
        extensions: cfg.target.map(|t| vec![(EXT_TARGET, encode_target(t))]).unwrap_or_default(),
    };
    let io = cfg.backend.resolve()?;
    let Connected { streams, welcome, key } = connect_session(&cfg.plan, &hello)?;
    let resume = (welcome.caps & CAP_RESUME != 0).then(|| {
        Comeback::Redial(Box::new(Redial { plan: cfg.plan.clone(), hello, key, link_timeout: cfg.link_timeout }))
    });
    let how = Carry {
        io,
        source: true,
        duplex: welcome.caps & CAP_DUPLEX != 0,
        compression: if welcome.caps & CAP_LZ4 != 0 { cfg.compression } else { Compression::Off },
        lz4_in: welcome.caps & CAP_LZ4 != 0,
        threads: cfg.threads,
        progress_timeout: cfg.progress_timeout,
        idle_timeout: cfg.idle_timeout,
        interrupt: cfg.interrupt.clone(),
    };
    Ok(Session { streams, how, resume })
}

impl Carry {
    /// How the accepting end of a session relays, given the capabilities
    /// in force.
    pub fn accepted(caps: u64, opts: &RelayRecvOptions, io: Resolved) -> Self {
        Carry {
            io,
            source: false,
            duplex: caps & CAP_DUPLEX != 0,
            compression: if caps & CAP_LZ4 != 0 { Compression::Auto } else { Compression::Off },
            lz4_in: caps & CAP_LZ4 != 0,
            threads: opts.threads,
            progress_timeout: opts.progress_timeout,
            idle_timeout: opts.idle_timeout,
            interrupt: opts.interrupt.clone(),
        }
    }
}

/// Sends what `local.input` yields until its end, and — in a full-duplex
/// session — writes what comes back to `local.output`; returns once both
/// ways are complete.
///
/// The input is read on a thread of its own that is not waited for when
/// the relay fails: a failed relay returns at once even if the input never
/// yields another byte.
pub fn send(local: Local, cfg: &RelaySendConfig) -> Result<RelayReport, MigrateError> {
    let t0 = Instant::now();
    let mut report = connect(cfg)?.carry(local)?;
    report.role = "send".into();
    report.secs = t0.elapsed().as_secs_f64();
    Ok(report)
}

/// Accepts one byte-stream session from `acceptor`: every stream arrived
/// and welcomed. With `CAP_RESUME` in force, the acceptor's listeners then
/// take back the session's lost streams until the session is carried.
pub fn accept(acceptor: &Acceptor, opts: &RelayRecvOptions) -> Result<Session, MigrateError> {
    let grant = CAP_LZ4 | CAP_DUPLEX | if opts.resume { CAP_RESUME } else { 0 };
    let mut judge = |h: &Hello| {
        if h.extension(EXT_TARGET).is_some() {
            return Err(ErrorMsg {
                code: ErrorCode::Unsupported,
                message: "this end relays one stream and has no targets (is it a proxy?)".into(),
            });
        }
        Ok(h.caps & grant)
    };
    let io = opts.backend.resolve()?;
    let accepted = acceptor.accept_session(Mode::Stream, &mut judge, opts.accept_deadline)?;
    let resume = if accepted.caps & CAP_RESUME != 0 {
        let log = std::sync::Arc::new(|peer: std::net::SocketAddr, why: String| {
            tracing::warn!(%peer, reason = why, "comeback refused");
        });
        let (h, key) = (&accepted.hello, accepted.key.clone());
        let listeners = acceptor.try_clone()?;
        Some(Comeback::Await(Resumes::start(listeners, h.session, h.stream_count, accepted.caps, key, log)))
    } else {
        None
    };
    let how = Carry::accepted(accepted.caps, opts, io);
    Ok(Session { streams: accepted.streams, how, resume })
}

/// Receives one byte-stream session from `acceptor`, writes it to
/// `local.output` in order, verified, and — in a full-duplex session —
/// sends what `local.input` yields back; returns once both ways are
/// complete.
pub fn receive(acceptor: &Acceptor, local: Local, opts: &RelayRecvOptions) -> Result<RelayReport, MigrateError> {
    let session = accept(acceptor, opts)?;
    let t0 = Instant::now();
    let mut report = session.carry(local)?;
    report.role = "recv".into();
    report.secs = t0.elapsed().as_secs_f64();
    Ok(report)
}

/// What the threads of one end share.
pub(crate) struct Shared<'a> {
    lanes: Vec<Lane>,
    /// With `CAP_RESUME`: how a lost stream comes back.
    resume: Option<Resume>,
    /// How long a lost stream may take to come back.
    progress_timeout: Duration,
    /// This end is complete: its outbound flow confirmed (or closed by the
    /// other end's peer), its inbound flow ended and confirmed.
    complete: AtomicBool,
    /// The other end is complete: it ended a stream cleanly (it does only
    /// then), or this end has no inbound flow and is complete.
    peer_complete: AtomicBool,
    /// The relay is over: threads still waiting for a stream return.
    closing: AtomicBool,
    /// Streams being taken back now.
    recovering: AtomicU64,
    /// Chunks the writers sent again on a new connection.
    resent: AtomicU64,
    /// This end has an outbound flow.
    outbound: bool,
    first_error: Mutex<Option<MigrateError>>,
    failed: AtomicBool,
    abort_local: &'a (dyn Fn() + Send + Sync),
    /// The outbound flow's confirmation: `Verified`'s chunk count, and
    /// whether it was flagged `FLAG_CLOSED`.
    verified: Mutex<Option<(u64, bool)>>,
    verified_cv: Condvar,
    /// The local input has ended (its reader read the end of file).
    input_ended: Arc<AtomicBool>,
    /// The inbound flow was closed by the local peer: what still comes is
    /// dropped.
    in_closed: AtomicBool,
    /// The other end's local peer closed: the outbound flow stops.
    out_closed: AtomicBool,
    out_wire: AtomicU64,
    in_wire: AtomicU64,
    /// When the outbound flow compresses.
    lz4: Arc<crate::lz4gate::Lz4Policy>,
    window: inbound::Window,
    /// When a byte of the carried stream last moved either way, in
    /// milliseconds since `t0`.
    last_activity: Arc<AtomicU64>,
    t0: Instant,
    /// Frame buffers written and no longer kept, for the input reader to
    /// read into again (a fresh 256 KiB buffer costs its zeroing and, from
    /// the allocator, page faults: an eighth of the sender's CPU).
    spare: (crossbeam_channel::Sender<Vec<u8>>, crossbeam_channel::Receiver<Vec<u8>>),
    /// Chunks written to the local output, for the stream readers to read
    /// the next frames into (taken whole from a reader, a raw chunk is
    /// not copied; its reader needs a buffer in its place).
    in_spare: (crossbeam_channel::Sender<Vec<u8>>, crossbeam_channel::Receiver<Vec<u8>>),
}

/// Frame buffers [`Shared::recycle`] keeps at most.
const SPARE_FRAMES: usize = 32;

impl Shared<'_> {
    /// Gives a frame that is written and not kept back to the input reader.
    pub(crate) fn recycle(&self, f: pmigrate_transport::backend::Outgoing) {
        if let pmigrate_transport::backend::Outgoing::Vec(v) = f {
            if v.capacity() >= pmigrate_transport::frame::HEADER_LEN + CHUNK {
                let _ = self.spare.0.try_send(v);
            }
        }
    }

    /// Gives a chunk written to the local output back to the readers.
    pub(crate) fn recycle_in(&self, chunk: Vec<u8>) {
        if chunk.capacity() >= CHUNK {
            let _ = self.in_spare.0.try_send(chunk);
        }
    }

    /// Notes that bytes of the carried stream moved.
    pub(crate) fn touch(&self) {
        self.last_activity.store(self.t0.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long no byte moved either way.
    fn idle_for(&self) -> Duration {
        self.t0.elapsed().saturating_sub(Duration::from_millis(self.last_activity.load(Ordering::Relaxed)))
    }

    /// Fails the relay once: the first error is kept (over `Aborted`), the
    /// other end is told on the failing stream and stream 0, every stream
    /// and the local side are shut down so every thread returns.
    pub(crate) fn fail(&self, stream: usize, e: MigrateError) {
        let mut fe = self.first_error.lock().expect("error lock");
        if !self.failed.swap(true, Ordering::AcqRel) {
            let code = match &e {
                MigrateError::Transport(TransportError::Wire {
                    source: pmigrate_transport::WireError::Checksum { .. },
                    ..
                }) => ErrorCode::Checksum,
                MigrateError::Transport(TransportError::Wire { .. }) | MigrateError::Protocol { .. } => {
                    ErrorCode::Protocol
                }
                MigrateError::Transport(TransportError::Peer(_)) | MigrateError::Interrupted(_) => ErrorCode::Aborted,
                _ => ErrorCode::Io,
            };
            let msg = e.to_string();
            if let Some(l) = self.lanes.get(stream) {
                l.link.current().0.send_error(code, msg.clone());
            }
            if stream != 0 {
                self.lanes[0].link.current().0.send_error(code, msg);
            }
            for l in &self.lanes {
                l.link.shutdown();
            }
            (self.abort_local)();
        }
        MigrateError::keep(&mut fe, e);
        drop(fe);
        self.verified_cv.notify_all();
        self.window.abort();
        self.wake_all();
    }

    pub(crate) fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// The outbound flow has nothing more to do: the relay failed, or the
    /// other end's local peer closed.
    pub(crate) fn out_stopped(&self) -> bool {
        self.failed() || self.out_closed.load(Ordering::Acquire)
    }

    /// Waits (at most `limit`) until the relay failed; whether it did.
    pub(crate) fn failed_within(&self, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        while !self.failed() {
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Waits (at most `limit`) until the other end confirmed this end's
    /// outbound flow; whether it did (or there is none).
    pub(crate) fn confirmed_within(&self, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        let mut v = self.verified.lock().expect("verdict lock");
        while self.outbound && v.is_none() {
            let Some(left) = until.checked_duration_since(Instant::now()) else { return false };
            v = self.verified_cv.wait_timeout(v, left).expect("verdict lock").0;
        }
        true
    }

    /// Waits (at most `limit`) until the local input has ended; whether it did.
    pub(crate) fn wait_input_end(&self, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        while !self.input_ended.load(Ordering::Acquire) {
            if self.failed() || Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }
}

/// Relays over the established streams of a session, both ways as the
/// session allows: this end's outbound flow from `local.input`, its inbound
/// flow to `local.output`. Used by [`send`], [`receive`] and the socket
/// proxy.
pub fn carry(session: Session, local: Local) -> Result<RelayReport, MigrateError> {
    let t0 = Instant::now();
    let Session { streams, how, resume } = session;
    let how = &how;
    let n = streams.len();
    let has_out = how.source || how.duplex;
    let has_in = !how.source || how.duplex;
    let Local { input, output, abort } = local;
    if how.progress_timeout < pmigrate_transport::net::MIN_PROGRESS_TIMEOUT {
        return Err(TransportError::Setup(format!(
            "a progress timeout of {:?} is below {:?}, which keepalives need",
            how.progress_timeout,
            pmigrate_transport::net::MIN_PROGRESS_TIMEOUT
        ))
        .into());
    }
    for (i, st) in streams.iter().enumerate() {
        prepare(st, how.progress_timeout).map_err(|e| TransportError::io(format!("stream {i}"), e))?;
    }
    // TLS streams are sealed in this process: always the portable backend.
    let tls = streams.iter().any(Conn::is_tls);
    let (resume, comebacks) = match resume {
        None => (None, None),
        Some(Comeback::Redial(r)) => (Some(Resume::Redial(r)), None),
        Some(Comeback::Await(r)) => (Some(Resume::Await), Some(r)),
    };
    let resumable = resume.is_some();
    let shared = Shared {
        lanes: streams.into_iter().map(Lane::new).collect(),
        resume,
        progress_timeout: how.progress_timeout,
        complete: AtomicBool::new(false),
        peer_complete: AtomicBool::new(false),
        closing: AtomicBool::new(false),
        recovering: AtomicU64::new(0),
        resent: AtomicU64::new(0),
        outbound: has_out,
        first_error: Mutex::new(None),
        failed: AtomicBool::new(false),
        abort_local: &*abort,
        verified: Mutex::new(None),
        verified_cv: Condvar::new(),
        input_ended: Arc::new(AtomicBool::new(false)),
        in_closed: AtomicBool::new(false),
        out_closed: AtomicBool::new(false),
        out_wire: AtomicU64::new(0),
        in_wire: AtomicU64::new(0),
        lz4: Arc::new(crate::lz4gate::Lz4Policy::for_streams(how.compression, n)),
        window: inbound::Window::new(n),
        last_activity: Arc::new(AtomicU64::new(0)),
        t0,
        spare: crossbeam_channel::bounded(SPARE_FRAMES),
        in_spare: crossbeam_channel::bounded(SPARE_FRAMES),
    };
    let shared = &shared;
    let ended = AtomicBool::new(false);
    let interrupt = how.interrupt.as_ref();
    if let Some(i) = interrupt {
        i.0.carrying.store(true, Ordering::Release);
    }
    let (out, inb) = std::thread::scope(|s| {
        if let Some(limit) = how.idle_timeout {
            let ended = &ended;
            s.spawn(move || {
                while !ended.load(Ordering::Acquire) && !shared.failed() {
                    if shared.idle_for() > limit {
                        let why = format!("nothing carried either way for {limit:?} (idle timeout)");
                        shared.fail(0, TransportError::Setup(why).into());
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100).min(limit));
                }
            });
        }
        // The interrupt's watcher, until the relay is over.
        let (live, over) = bounded::<()>(0);
        if let Some(i) = interrupt {
            s.spawn(move || loop {
                if let Some(why) = i.raised() {
                    return shared.fail(0, MigrateError::Interrupted(why));
                }
                if !matches!(over.recv_timeout(INTERRUPT_TICK), Err(RecvTimeoutError::Timeout)) {
                    return;
                }
            });
        }
        // The accepting end of a resumable session: streams that come back
        // take the place of the lost ones, until the relay is over.
        if let Some(comebacks) = comebacks {
            s.spawn(move || {
                while !shared.failed() && !shared.closing.load(Ordering::Acquire) {
                    let Some((i, conn)) = comebacks.next(Duration::from_millis(10)) else { continue };
                    let Some(lane) = shared.lanes.get(usize::from(i)) else { continue };
                    match prepare(&conn, how.progress_timeout) {
                        Ok(()) => lane.came_back(usize::from(i), conn),
                        Err(e) => tracing::warn!(stream = i, error = %e, "a stream that came back is unusable"),
                    }
                }
            });
        }
        // The dialing end of a resumable session: a stream whose link goes
        // down moves to another route, and back once its own answers.
        if let Some(Resume::Redial(r)) = &shared.resume {
            s.spawn(move || {
                let within = how.progress_timeout;
                let ready = |c: &Conn| prepare(c, within);
                let links: Vec<&pmigrate_transport::Link> = shared.lanes.iter().map(|l| &l.link).collect();
                let stop = || shared.failed() || shared.closing.load(Ordering::Acquire);
                pmigrate_transport::link::watch(&links, &r.rejoin(&ready), r.link_timeout, &stop);
            });
        }
        let (queues, rxs): (Vec<_>, Vec<_>) = (0..n).map(|_| bounded::<Vec<u8>>(QUEUE_DEPTH)).unzip();
        let writers: Vec<_> = rxs
            .into_iter()
            .enumerate()
            .map(|(i, rx)| s.spawn(move || outbound::stream_writer(shared, i, rx, how.io.backend)))
            .collect();
        let readers: Vec<_> = (0..n)
            .map(|i| s.spawn(move || inbound::stream_reader(shared, i, has_in, has_out && i == 0, how)))
            .collect();
        // The inbound flow confirms on stream 0's queue.
        let confirm = queues[0].clone();
        // Only the session's source may close its inbound flow (the way back).
        // A failing inbound flow fails the relay at once: the outbound flow
        // may be waiting on a stream reader the stalled window holds.
        let inb = has_in.then(|| {
            s.spawn(move || inbound::deliver(shared, output, confirm, how.source).map_err(|e| shared.fail(0, e)).ok())
        });
        let out = if has_out {
            outbound::run(s, shared, input, queues, how)
        } else {
            drop((queues, input));
            Ok(FlowReport::default())
        };
        let out = out.map_err(|e| shared.fail(0, e)).ok();
        let inb = match inb.map(|h| h.join().expect("inbound deliverer panicked")) {
            None => Some(FlowReport::default()),
            Some(r) => r,
        };
        ended.store(true, Ordering::Release);
        // Both flows have settled: an interrupt no longer changes the outcome.
        drop(live);
        if out.is_some() && inb.is_some() && !shared.failed() {
            // Resumable writers half-close their streams now. An end without
            // an inbound flow knows the other end is complete too: its only
            // duty was to confirm.
            shared.complete.store(true, Ordering::Release);
            if !has_in {
                shared.peer_complete.store(true, Ordering::Release);
            }
            shared.wake_all();
        }
        let mut writers = Some(writers);
        if !resumable {
            for w in writers.take().into_iter().flatten() {
                w.join().expect("stream writer panicked");
            }
        }
        // Done or failed: give the other end a moment to close its side
        // (and a lost stream the time to come back), then close ours so
        // every thread returns.
        let until = Instant::now() + CLOSE_GRACE;
        while !shared.failed()
            && !readers.iter().all(|r| r.is_finished())
            && (Instant::now() < until || shared.recovering.load(Ordering::Acquire) > 0)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        shared.closing.store(true, Ordering::Release);
        shared.wake_all();
        for l in &shared.lanes {
            l.link.shutdown();
        }
        for r in readers {
            r.join().expect("stream reader panicked");
        }
        for w in writers.into_iter().flatten() {
            w.join().expect("stream writer panicked");
        }
        (out, inb)
    });
    if let Some(i) = interrupt {
        i.0.carrying.store(false, Ordering::Release);
    }
    if let Some(e) = shared.first_error.lock().expect("error lock").take() {
        return Err(e);
    }
    let (Some(mut out), Some(mut inb)) = (out, inb) else { return Err(MigrateError::Aborted) };
    out.wire_bytes = shared.out_wire.load(Ordering::Relaxed);
    inb.wire_bytes = shared.in_wire.load(Ordering::Relaxed);
    let (forward, back) = if how.source { (out, inb) } else { (inb, out) };
    let backend = if tls { "TLS, portable".to_string() } else { how.io.describe() };
    Ok(RelayReport {
        role: String::new(),
        forward,
        back,
        streams: n,
        secs: t0.elapsed().as_secs_f64(),
        backend,
        reconnects: shared.lanes.iter().map(|l| l.link.replaced()).sum(),
        resent_chunks: shared.resent.load(Ordering::Relaxed),
        links: crate::report::LinkReport::of(&shared.lanes.iter().map(|l| &l.link).collect::<Vec<_>>(), t0),
    })
}
