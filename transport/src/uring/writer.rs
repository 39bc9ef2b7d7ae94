//! Whole frames, in order, several in flight, on one TCP socket.
//!
//! The writer owns every frame from [`UringWriter::send`] until it gives
//! it back (through [`UringWriter::take_done`] or in a [`SendFailure`]):
//! all of them sit in one slab keyed by the SQE's `user_data`, and an entry
//! leaves it only after its last CQE. `pending` lists, in stream order, the
//! frames not yet wholly written; the first `in_chain` of them are the
//! chain in flight.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::arena::{FrameBuf, FramePool};
use super::ring::{self, Cqe};
use super::{probe, UringError};

/// Largest [`WriterOptions::depth`].
pub const MAX_DEPTH: usize = 1024;

/// Longest single send asked of the kernel; a longer frame goes out in
/// several (the kernel caps one send near 2 GiB anyway).
const MAX_SEND: usize = 1 << 30;

/// MSG_WAITALL: the kernel retries partial sends itself. MSG_NOSIGNAL: a
/// closed peer is EPIPE, not SIGPIPE.
const SEND_FLAGS: i32 = libc::MSG_WAITALL | libc::MSG_NOSIGNAL;

/// `user_data` of cancellation requests (never a slab key).
const CANCEL: u64 = u64::MAX;

/// How long `Drop` waits at each step: cancelled sends to complete, then
/// again after shutting the socket for writing, then zero-copy
/// notifications. What is still held after that is leaked.
const DROP_GRACE: Duration = Duration::from_secs(2);

/// Least completion queue size. A chain is submitted only when the queue
/// has room for all the CQEs that can come (so none overflows), and
/// zero-copy notifications pile up while sent data waits for its ACK: a
/// roomy queue (16 bytes an entry) keeps them from throttling sends.
const MIN_CQ: u32 = 1024;

/// Chains in a row that wrote nothing (EINTR, EAGAIN, 0) before giving up.
const MAX_STALLS: u32 = 64;

/// A frame handed to the writer, which owns its bytes until it gives them
/// back.
pub enum Outgoing {
    /// A frame buffer: sent zero-copy when it is a slot of the registered
    /// arena, else with a plain send.
    Buf(FrameBuf),
    /// A plain vector, sent with a plain send.
    Vec(Vec<u8>),
}

impl Outgoing {
    /// The frame's bytes.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Outgoing::Buf(b) => b,
            Outgoing::Vec(v) => v,
        }
    }

    /// Length of the frame.
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// Whether the frame is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Shortens the frame to `len` bytes.
    pub fn truncate(&mut self, len: usize) {
        match self {
            Outgoing::Buf(b) => b.truncate(len),
            Outgoing::Vec(v) => v.truncate(len),
        }
    }
}

impl std::ops::Deref for Outgoing {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::ops::DerefMut for Outgoing {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            Outgoing::Buf(b) => b,
            Outgoing::Vec(v) => v,
        }
    }
}

impl From<FrameBuf> for Outgoing {
    fn from(b: FrameBuf) -> Self {
        Outgoing::Buf(b)
    }
}

impl From<Vec<u8>> for Outgoing {
    fn from(v: Vec<u8>) -> Self {
        Outgoing::Vec(v)
    }
}

impl fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outgoing::Buf(b) => f.debug_tuple("Buf").field(b).finish(),
            Outgoing::Vec(v) => write!(f, "Vec(len {})", v.len()),
        }
    }
}

/// How a [`UringWriter`] works.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriterOptions {
    /// Most frames in one chain, submitted by one `io_uring_enter`
    /// (1..=[`MAX_DEPTH`]); as many more are queued while a chain is in
    /// flight, so at most `2 * depth` frames wait for the kernel.
    pub depth: usize,
    /// Send slots of the arena with `SEND_ZC` from the registered buffer,
    /// when the kernel has `SEND_ZC` and the arena registers.
    pub zero_copy: bool,
}

impl Default for WriterOptions {
    fn default() -> Self {
        Self { depth: 8, zero_copy: true }
    }
}

/// Sending failed; the connection is no good any more.
///
/// `unsent` holds, in order, every frame that was not wholly written (the
/// one that failed, possibly partly written, and all queued after it), for
/// writing again whole on a new connection. A frame whose zero-copy
/// notification had not come yet is returned as a heap copy; the writer
/// keeps the original until the kernel lets go of it.
#[derive(Debug, thiserror::Error)]
#[error("{} frame(s) not wholly written: {error}", .unsent.len())]
pub struct SendFailure {
    /// What failed.
    #[source]
    pub error: io::Error,
    /// The frames not wholly written, in order.
    pub unsent: Vec<Outgoing>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Listed in `pending`: not yet wholly written.
    Pending,
    /// Wholly written; goes to `done` after its last CQE.
    Done,
    /// Given back as a copy in a `SendFailure`; dropped after its last CQE.
    Orphan,
}

struct Entry {
    frame: Outgoing,
    /// Bytes the kernel reported written.
    sent: usize,
    /// Result of the last send CQE.
    last_res: i32,
    /// A send SQE was pushed and its CQE has not come.
    in_flight: bool,
    /// Zero-copy notifications announced (F_MORE) less those seen (F_NOTIF):
    /// signed, so that the order of the two CQEs does not matter.
    notifs: i32,
    stage: Stage,
}

impl Entry {
    /// The kernel may still read the frame's bytes.
    fn busy(&self) -> bool {
        self.in_flight || self.notifs != 0
    }

    fn whole(&self) -> bool {
        self.sent >= self.frame.len()
    }
}

/// Entries by key; keys are reused after removal.
#[derive(Default)]
struct Slab {
    entries: Vec<Option<Entry>>,
    free: Vec<usize>,
    len: usize,
}

impl Slab {
    fn insert(&mut self, e: Entry) -> usize {
        self.len += 1;
        match self.free.pop() {
            Some(k) => {
                self.entries[k] = Some(e);
                k
            }
            None => {
                self.entries.push(Some(e));
                self.entries.len() - 1
            }
        }
    }

    fn get(&self, k: usize) -> Option<&Entry> {
        self.entries.get(k)?.as_ref()
    }

    fn get_mut(&mut self, k: usize) -> Option<&mut Entry> {
        self.entries.get_mut(k)?.as_mut()
    }

    fn remove(&mut self, k: usize) -> Option<Entry> {
        let e = self.entries.get_mut(k)?.take()?;
        self.len -= 1;
        self.free.push(k);
        Some(e)
    }

    fn any(&self, pred: impl Fn(&Entry) -> bool) -> bool {
        self.entries.iter().flatten().any(pred)
    }
}

/// Sends whole frames on one connected TCP socket through io_uring, in
/// order, up to `depth` per system call.
///
/// [`send`](Self::send) queues a frame and returns; a chain of queued
/// frames is submitted when none is in flight, or, when `depth` frames are
/// queued, as soon as the one in flight completed (`send` waits for that).
/// [`flush`](Self::flush) waits until every frame was wholly handed to the
/// kernel; call it when there is nothing more to send for now, or call
/// [`progress`](Self::progress) from time to time, else queued frames wait
/// for the next `send`. Buffers come back through
/// [`take_done`](Self::take_done).
///
/// The socket must be in blocking mode (io_uring then waits for buffer
/// space instead of failing with EAGAIN); like a blocking `write_all`,
/// `send` and `flush` wait as long as the peer's window stays shut. Operations in flight belong to
/// the thread that submitted them and the kernel cancels them when it
/// exits: move the writer to another thread only after a `flush` and do not
/// let a thread that used it exit while it still has frames in flight (a
/// cancelled send fails the writer rather than corrupt the stream). See the
/// [module docs](super) for the kernel behaviour relied on.
pub struct UringWriter {
    // Dropped first, before the arena it registered and the socket.
    ring: IoUring,
    slab: Slab,
    pending: VecDeque<usize>,
    /// Frames at the front of `pending` that form the chain in flight.
    in_chain: usize,
    /// Send CQEs still to come for that chain.
    chain_left: usize,
    /// Completion queue size: never more CQEs than that are owed.
    cq_room: usize,
    done: VecDeque<Outgoing>,
    cqes: Vec<Cqe>,
    depth: usize,
    stalls: u32,
    /// A submission was refused partway: the SQEs left in the queue must
    /// never run, so nothing is submitted on this ring again.
    sq_dirty: bool,
    failed: Option<(io::ErrorKind, String)>,
    registration_error: Option<io::Error>,
    /// The arena registered as fixed buffer 0, when zero-copy is on.
    zc_arena: Option<FramePool>,
    sock: Arc<TcpStream>,
}

impl fmt::Debug for UringWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UringWriter")
            .field("depth", &self.depth)
            .field("zero_copy", &self.zero_copy())
            .field("unsent", &self.pending.len())
            .field("held", &self.slab.len)
            .field("failed", &self.failed)
            .finish()
    }
}

impl UringWriter {
    /// A writer on `sock`. With `arena`, `opts.zero_copy` and a kernel
    /// with `SEND_ZC`, the arena is registered as fixed buffer 0 (pinning
    /// all of it) and its slots go out zero-copy; when registration fails
    /// (`RLIMIT_MEMLOCK`, an arena over 1 GiB) every frame goes out with a
    /// plain send and [`registration_error`](Self::registration_error) says
    /// why.
    pub fn new(sock: Arc<TcpStream>, opts: WriterOptions, arena: Option<&FramePool>) -> Result<Self, UringError> {
        let support = probe()?;
        let depth = opts.depth;
        if depth == 0 || depth > MAX_DEPTH {
            return Err(UringError::Depth { depth, max: MAX_DEPTH });
        }
        if socket2::SockRef::from(&*sock)
            .nonblocking()
            .map_err(|source| UringError::Socket { what: "reading O_NONBLOCK", source })?
        {
            return Err(UringError::NonBlocking);
        }
        // Fits: depth <= MAX_DEPTH.
        let sq = u32::try_from(depth.next_power_of_two()).unwrap_or(u32::MAX);
        let ring = IoUring::builder()
            .dontfork()
            .setup_cqsize(sq.saturating_mul(4).max(MIN_CQ))
            .build(sq)
            .map_err(|source| UringError::Setup { entries: sq, source })?;
        let cq_room = usize::try_from(ring.params().cq_entries()).unwrap_or(usize::MAX);
        let mut registration_error = None;
        let mut zc_arena = None;
        if let Some(pool) = arena.filter(|_| opts.zero_copy && support.send_zc) {
            // SAFETY: the iovec covers the pool's whole mapping, which
            // `zc_arena` (a clone of the pool: an `Arc` to the mapping)
            // keeps mapped for as long as the ring exists: the field is
            // dropped after `ring`.
            match unsafe { ring.submitter().register_buffers(&[pool.iovec()]) } {
                Ok(()) => zc_arena = Some(pool.clone()),
                Err(e) => registration_error = Some(e),
            }
        }
        Ok(Self {
            ring,
            slab: Slab::default(),
            pending: VecDeque::new(),
            in_chain: 0,
            chain_left: 0,
            cq_room,
            done: VecDeque::new(),
            cqes: Vec::new(),
            depth,
            stalls: 0,
            sq_dirty: false,
            failed: None,
            registration_error,
            zc_arena,
            sock,
        })
    }

    /// Whether arena slots go out with `SEND_ZC` from the registered buffer.
    pub fn zero_copy(&self) -> bool {
        self.zc_arena.is_some()
    }

    /// Why the arena could not be registered, if that was tried and failed.
    pub fn registration_error(&self) -> Option<&io::Error> {
        self.registration_error.as_ref()
    }

    /// Frames not yet wholly handed to the kernel.
    pub fn unsent(&self) -> usize {
        self.pending.len()
    }

    /// Frames the writer holds: unsent, or sent and waiting for their
    /// zero-copy notification.
    pub fn held(&self) -> usize {
        self.slab.len
    }

    /// The socket.
    pub fn get_ref(&self) -> &TcpStream {
        &self.sock
    }

    /// Queues `frame`, submitting a chain when none is in flight, or, when
    /// `depth` frames are queued, after waiting for the one in flight.
    ///
    /// On failure, the writer is done for: this and every later call fail,
    /// `unsent` holding the frames not wholly written, this one last.
    pub fn send(&mut self, frame: impl Into<Outgoing>) -> Result<(), SendFailure> {
        self.queue(frame)?;
        self.progress()?;
        if self.pending.len() - self.in_chain >= self.depth {
            self.finish_chain()?;
            self.start_chain()?;
        }
        Ok(())
    }

    /// Queues `frame` without submitting anything: the next [`flush`]
    /// submits the queue and waits for it in one `io_uring_enter` per
    /// chain, so a caller that queues what it has and then flushes makes
    /// one system call for up to `depth` frames.
    ///
    /// [`flush`]: UringWriter::flush
    pub fn queue(&mut self, frame: impl Into<Outgoing>) -> Result<(), SendFailure> {
        let frame = frame.into();
        if let Some(error) = self.failed_error() {
            return Err(SendFailure { error, unsent: vec![frame] });
        }
        if frame.is_empty() {
            self.done.push_back(frame);
            return Ok(());
        }
        let key =
            self.slab.insert(Entry { frame, sent: 0, last_res: 0, in_flight: false, notifs: 0, stage: Stage::Pending });
        self.pending.push_back(key);
        Ok(())
    }

    /// Without blocking (except to wait for completion-queue room): takes
    /// the completions posted and, when no chain is in flight, submits the
    /// next one.
    pub fn progress(&mut self) -> Result<(), SendFailure> {
        if let Some(error) = self.failed_error() {
            return Err(SendFailure { error, unsent: Vec::new() });
        }
        self.reap();
        if self.in_chain > 0 && self.chain_left == 0 {
            self.settle()?;
        }
        if self.in_chain == 0 {
            self.start_chain()?;
        }
        Ok(())
    }

    /// Submits everything queued and waits until every frame was wholly
    /// handed to the kernel (zero-copy buffers may still be held).
    pub fn flush(&mut self) -> Result<(), SendFailure> {
        if let Some(error) = self.failed_error() {
            return Err(SendFailure { error, unsent: Vec::new() });
        }
        loop {
            self.finish_chain()?;
            if self.pending.is_empty() {
                return Ok(());
            }
            self.start_chain_with(true)?;
        }
    }

    /// The frames wholly written whose buffers the kernel let go of, for
    /// reuse.
    pub fn take_done(&mut self) -> impl Iterator<Item = Outgoing> + '_ {
        self.reap();
        self.done.drain(..)
    }

    fn failed_error(&self) -> Option<io::Error> {
        let (kind, msg) = self.failed.as_ref()?;
        Some(io::Error::new(*kind, format!("writer failed earlier: {msg}")))
    }

    /// Takes every posted completion; settles nothing.
    fn reap(&mut self) {
        let mut cqes = std::mem::take(&mut self.cqes);
        ring::reap(&mut self.ring, &mut cqes);
        for c in cqes.drain(..) {
            self.complete(c);
        }
        self.cqes = cqes;
    }

    fn complete(&mut self, c: Cqe) {
        if c.user_data == CANCEL {
            return;
        }
        let Ok(key) = usize::try_from(c.user_data) else { return };
        // Every other user_data is the key of a busy entry.
        let Some(e) = self.slab.get_mut(key) else { return };
        if cqueue::notif(c.flags) {
            e.notifs -= 1;
        } else if e.in_flight {
            e.in_flight = false;
            self.chain_left = self.chain_left.saturating_sub(1);
            e.last_res = c.res;
            if let Ok(n) = usize::try_from(c.res) {
                e.sent = e.sent.saturating_add(n).min(e.frame.len());
            }
            if cqueue::more(c.flags) {
                e.notifs += 1;
            }
        }
        if e.stage != Stage::Pending && !e.busy() {
            self.release(key);
        }
    }

    fn release(&mut self, key: usize) {
        if let Some(e) = self.slab.remove(key) {
            if e.stage == Stage::Done {
                self.done.push_back(e.frame);
            }
        }
    }

    /// Waits for the chain in flight to complete, then settles it.
    fn finish_chain(&mut self) -> Result<(), SendFailure> {
        while self.in_chain > 0 {
            self.reap();
            if self.chain_left == 0 {
                return self.settle();
            }
            if let Err(e) = ring::wait(&self.ring, 1, None) {
                return Err(self.fail(e));
            }
        }
        Ok(())
    }

    /// The chain in flight has completed: retire its wholly written prefix
    /// and judge the frame that broke it, if one did. Its followers came
    /// back -ECANCELED without running; they and the rest of the broken
    /// frame stay in `pending`, in order, for the next chain.
    fn settle(&mut self) -> Result<(), SendFailure> {
        let chain = std::mem::take(&mut self.in_chain);
        let mut progressed = false;
        let mut breaker = None;
        let mut out_of_order = false;
        for e in self.pending.iter().take(chain).filter_map(|&k| self.slab.get(k)) {
            if breaker.is_some() {
                out_of_order |= e.sent > 0;
                continue;
            }
            progressed |= e.last_res > 0;
            if !e.whole() {
                breaker = Some(e.last_res);
            }
        }
        while let Some(&k) = self.pending.front() {
            let Some(e) = self.slab.get_mut(k) else { break };
            if !e.whole() {
                break;
            }
            self.pending.pop_front();
            e.stage = Stage::Done;
            if !e.busy() {
                self.release(k);
            }
        }
        self.stalls = if progressed { 0 } else { self.stalls + 1 };
        let error = match breaker {
            _ if out_of_order => Some(io::Error::other("linked sends completed out of order")),
            // A partial send (the error that cut it short comes next), an
            // interrupted or refused one: send the rest.
            None => None,
            Some(r) if r > 0 => None,
            Some(r) if (r == 0 || r == -libc::EINTR || r == -libc::EAGAIN) && self.stalls <= MAX_STALLS => None,
            Some(r) if r == 0 || r == -libc::EINTR || r == -libc::EAGAIN => {
                Some(io::Error::new(io::ErrorKind::WriteZero, format!("no byte written in {MAX_STALLS} tries")))
            }
            // Not ours to cancel and not a link follower: the kernel cancelled
            // it (the submitting thread exited?), losing count of the bytes.
            Some(r) if r == -libc::ECANCELED => {
                Some(io::Error::new(io::ErrorKind::Interrupted, "send cancelled by the kernel mid-frame"))
            }
            Some(r) => Some(io::Error::from_raw_os_error(r.saturating_neg())),
        };
        match error {
            Some(e) => Err(self.fail(e)),
            None => Ok(()),
        }
    }

    /// Latches the failure and gives back every frame not wholly written.
    fn fail(&mut self, error: io::Error) -> SendFailure {
        self.failed = Some((error.kind(), error.to_string()));
        self.in_chain = 0;
        let mut unsent = Vec::with_capacity(self.pending.len());
        for k in std::mem::take(&mut self.pending) {
            let Some(e) = self.slab.get_mut(k) else { continue };
            if e.busy() {
                unsent.push(Outgoing::Vec(e.frame.as_slice().to_vec()));
                e.stage = Stage::Orphan;
            } else if let Some(e) = self.slab.remove(k) {
                unsent.push(e.frame);
            }
        }
        SendFailure { error, unsent }
    }

    /// Submits the next chain: up to `depth` frames from the front of
    /// `pending`, linked, in one `io_uring_enter`.
    fn start_chain(&mut self) -> Result<(), SendFailure> {
        self.start_chain_with(false)
    }

    /// [`Self::start_chain`]; with `wait`, the same `io_uring_enter` also
    /// waits for the chain's sends to complete.
    fn start_chain_with(&mut self, wait: bool) -> Result<(), SendFailure> {
        let want = self.pending.len().min(self.depth);
        if want == 0 || self.in_chain > 0 {
            return Ok(());
        }
        // Room for every CQE that can come: two per send, and the
        // notifications still owed.
        while self.owed_notifs() + 2 * want > self.cq_room {
            if let Err(e) = ring::wait(&self.ring, 1, None) {
                return Err(self.fail(e));
            }
            self.reap();
        }
        let fd = types::Fd(self.sock.as_raw_fd());
        let zc_arena = self.zc_arena.as_ref();
        let mut sq = self.ring.submission();
        let want = want.min(sq.capacity() - sq.len());
        let mut pushed = 0;
        for &key in self.pending.iter().take(want) {
            let Some(e) = self.slab.get_mut(key) else { break };
            let rest = &e.frame.as_slice()[e.sent..];
            let len = u32::try_from(rest.len().min(MAX_SEND)).unwrap_or(u32::MAX);
            let sqe = match &e.frame {
                Outgoing::Buf(b) if zc_arena.is_some_and(|a| a.owns(b)) => {
                    opcode::SendZc::new(fd, rest.as_ptr(), len).buf_index(Some(0)).flags(SEND_FLAGS).build()
                }
                _ => opcode::Send::new(fd, rest.as_ptr(), len).flags(SEND_FLAGS).build(),
            };
            let sqe = sqe.user_data(key as u64);
            let sqe = if pushed + 1 < want { sqe.flags(squeue::Flags::IO_LINK) } else { sqe };
            // SAFETY: the SQE names `rest`, inside the storage of
            // `e.frame` (a heap block or an arena slot, which stay put when
            // the owning value moves), and the writer's socket. The frame
            // stays in the slab, unwritten, until its last CQE: `release`
            // removes only entries that are not busy, and `Drop` leaks busy
            // ones. The socket `Arc` lives as long as the writer, and Drop
            // waits for what is in flight (a request also holds its own
            // reference to the file). With `buf_index`, `rest` is inside the
            // registered arena: `owns` checked the frame is a slot of it.
            if unsafe { sq.push(&sqe) }.is_err() {
                break; // cannot happen: `want` fits the free room
            }
            e.in_flight = true;
            pushed += 1;
        }
        drop(sq);
        self.in_chain = pushed;
        self.chain_left = pushed;
        let took = if wait { ring::submit_and_wait(&self.ring, pushed) } else { ring::submit(&self.ring) };
        match took {
            Ok(took) if took >= pushed => Ok(()),
            Ok(took) => {
                self.sq_dirty = true;
                Err(self.fail(io::Error::other(format!("io_uring_enter took {took} of {pushed} linked sends"))))
            }
            Err(e) => {
                self.sq_dirty = true;
                Err(self.fail(e))
            }
        }
    }

    /// Zero-copy notifications still to come.
    fn owed_notifs(&self) -> usize {
        self.slab.entries.iter().flatten().map(|e| usize::try_from(e.notifs).unwrap_or(0)).sum()
    }

    /// Asks the kernel to cancel every send in flight.
    fn cancel_in_flight(&mut self) {
        let mut sq = self.ring.submission();
        for (k, e) in self.slab.entries.iter().enumerate() {
            if e.as_ref().is_some_and(|e| e.in_flight) {
                let sqe = opcode::AsyncCancel::new(k as u64).build().user_data(CANCEL);
                // SAFETY: a cancellation names only the `user_data` to
                // cancel: no memory, no file.
                if unsafe { sq.push(&sqe) }.is_err() {
                    break;
                }
            }
        }
        drop(sq);
        let _ = ring::submit(&self.ring);
    }

    /// Reaps until no entry matches `pred`, for at most `grace`.
    fn drain(&mut self, pred: fn(&Entry) -> bool, grace: Duration) -> bool {
        let deadline = Instant::now() + grace;
        loop {
            self.reap();
            if !self.slab.any(pred) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || ring::wait(&self.ring, 1, Some(left)).is_err() {
                return false;
            }
        }
    }
}

impl Drop for UringWriter {
    /// Abandons what was not flushed: cancels the sends in flight and waits
    /// for them (shutting the socket for writing when a dead peer holds
    /// them), then for zero-copy notifications; whatever the kernel still
    /// holds after that is leaked, never freed.
    fn drop(&mut self) {
        let in_flight = |e: &Entry| e.in_flight;
        self.reap();
        if self.slab.any(in_flight) {
            if !self.sq_dirty {
                self.cancel_in_flight();
            }
            if !self.drain(in_flight, DROP_GRACE) {
                let _ = self.sock.shutdown(Shutdown::Write);
                self.drain(in_flight, DROP_GRACE);
            }
        }
        self.drain(Entry::busy, DROP_GRACE);
        for e in self.slab.entries.drain(..).flatten() {
            if e.busy() {
                std::mem::forget(e.frame);
            }
        }
    }
}
