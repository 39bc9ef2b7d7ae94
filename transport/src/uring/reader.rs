//! `std::io::Read` for one TCP socket through io_uring.
//!
//! Small reads are served from a staging buffer (registered as fixed
//! buffer 0 and filled with `READ_FIXED`, or with `RECV` when registration
//! failed), like a `BufReader`; a read at least as large as the staging
//! buffer, with nothing staged, is one `RECV` straight into the caller's
//! slice. Every read is reaped whole, including its linked timeout, before
//! `read` returns, so no buffer is referenced by the kernel between calls.

use std::fmt;
use std::io::{self, Read};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use io_uring::types::Timespec;
use io_uring::{opcode, squeue, types, IoUring};

use super::arena::Mapping;
use super::ring::{self, Cqe};
use super::{probe, UringError};

/// A staging buffer size that suits frame headers and control frames.
#[cfg(test)]
pub const DEFAULT_STAGING: usize = 64 << 10;

/// Largest staging buffer (one registered buffer is at most 1 GiB).
pub const MAX_STAGING: usize = 1 << 30;

/// Longest single receive asked of the kernel.
const MAX_RECV: usize = 1 << 30;

const READ: u64 = 1;
const TIMEOUT: u64 = 2;

/// How long a read that cannot be waited for normally is polled for after
/// shutting the socket for reading (1 ms steps).
const ABANDON_POLLS: u32 = 10_000;

/// Where a receive lands.
#[derive(Clone, Copy)]
enum Dest {
    Staging,
    Caller(*mut u8, u32),
}

/// Reads one TCP socket through io_uring.
///
/// Small reads are served from a staging buffer, registered as a fixed
/// buffer and filled with `READ_FIXED` (with `RECV` when registration
/// failed), like a `BufReader`; a read at least as large as the staging
/// buffer, with nothing staged, is one `RECV` straight into the caller's
/// slice, so a `FrameReader` over it needs no buffering of its own.
///
/// With a read timeout set (initially the socket's own `SO_RCVTIMEO`), a
/// read that gets no byte within it fails with `WouldBlock`, as a socket
/// with `SO_RCVTIMEO` does; a 0-byte read is end of stream.
pub struct UringReader {
    // Dropped before `staging`, which it may have registered.
    ring: IoUring,
    staging: Mapping,
    fixed: bool,
    pos: usize,
    filled: usize,
    timeout: Option<Duration>,
    cqes: Vec<Cqe>,
    /// A read may still be in flight into the staging buffer after a
    /// failure to reap it: the reader refuses to read and leaks the buffer.
    broken: bool,
    sock: Arc<TcpStream>,
}

impl fmt::Debug for UringReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UringReader")
            .field("staging", &self.staging.len())
            .field("fixed", &self.fixed)
            .field("buffered", &(self.filled - self.pos))
            .field("timeout", &self.timeout)
            .field("broken", &self.broken)
            .finish()
    }
}

impl UringReader {
    /// A reader of `sock` with a staging buffer of `staging` bytes
    /// (1..=[`MAX_STAGING`]; 64 KiB suits frames), registered
    /// as a fixed buffer when that works.
    pub fn new(sock: Arc<TcpStream>, staging: usize) -> Result<Self, UringError> {
        Self::build(sock, staging, true)
    }

    /// [`Self::new`], registering the staging buffer only when `register`.
    pub(super) fn build(sock: Arc<TcpStream>, staging: usize, register: bool) -> Result<Self, UringError> {
        let support = probe()?;
        if staging == 0 || staging > MAX_STAGING {
            return Err(UringError::Staging { bytes: staging, max: MAX_STAGING });
        }
        let timeout =
            sock.read_timeout().map_err(|source| UringError::Socket { what: "reading SO_RCVTIMEO", source })?;
        let ring = IoUring::builder().dontfork().build(4).map_err(|source| UringError::Setup { entries: 4, source })?;
        let map = Mapping::new(staging).map_err(|source| UringError::Map { bytes: staging, source })?;
        // SAFETY: the iovec covers `map`, which the reader keeps mapped
        // while the ring lives: `staging` is dropped after `ring`, or leaked.
        let fixed =
            register && support.fixed_buffers && unsafe { ring.submitter().register_buffers(&[map.iovec()]) }.is_ok();
        Ok(Self { ring, staging: map, fixed, pos: 0, filled: 0, timeout, cqes: Vec::new(), broken: false, sock })
    }

    /// Sets the read timeout; `None` waits for ever. Like
    /// `TcpStream::set_read_timeout`, a zero duration is refused. (The
    /// socket's own `SO_RCVTIMEO` is not changed and does not apply.)
    pub fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        if timeout == Some(Duration::ZERO) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "cannot set a 0 duration timeout"));
        }
        self.timeout = timeout;
        Ok(())
    }

    /// The read timeout.
    pub fn read_timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// Whether the staging buffer is a registered fixed buffer.
    pub fn uses_fixed_buffer(&self) -> bool {
        self.fixed
    }

    /// The bytes staged and not yet read.
    pub fn buffer(&self) -> &[u8] {
        &self.staged()[self.pos..]
    }

    /// The socket.
    pub fn get_ref(&self) -> &TcpStream {
        &self.sock
    }

    /// The filled part of the staging buffer.
    fn staged(&self) -> &[u8] {
        // SAFETY: `filled <= staging.len()`, inside the mapping this reader
        // owns. No read is in flight into it (each is reaped before `read`
        // returns; after a failure to reap, `broken` keeps `filled` at 0
        // and the reader from reading), so nothing writes it meanwhile;
        // its bytes are initialised (zeroed mapping, then kernel writes).
        unsafe { std::slice::from_raw_parts(self.staging.ptr(), self.filled) }
    }

    /// Runs one receive into `into`, with the timeout linked, and reaps it.
    fn recv(&mut self, into: Dest) -> io::Result<usize> {
        if self.broken {
            return Err(io::Error::other("io_uring reader unusable after a failure to reap a read"));
        }
        let fd = types::Fd(self.sock.as_raw_fd());
        let staging_len = u32::try_from(self.staging.len()).unwrap_or(u32::MAX);
        let sqe = match into {
            Dest::Staging if self.fixed => {
                opcode::ReadFixed::new(fd, self.staging.ptr(), staging_len, 0).offset(0).build()
            }
            Dest::Staging => opcode::Recv::new(fd, self.staging.ptr(), staging_len).build(),
            Dest::Caller(ptr, len) => opcode::Recv::new(fd, ptr, len).build(),
        }
        .user_data(READ);
        let ts = self.timeout.map(Timespec::from);
        let mut sq = self.ring.submission();
        // SAFETY: the read names the staging mapping (owned by the reader,
        // registered as buffer 0 when `fixed`) or the caller's slice of at
        // least `len` bytes, borrowed mutably for this whole call, and the
        // reader's socket. `reap_read` returns only once the read's CQE
        // (and its timeout's) came; when it cannot, it shuts the socket and
        // polls, and aborts rather than return while the caller's slice is
        // still targeted. The timeout names `ts`, which lives to the end of
        // this call, and the kernel copies it at submission.
        let pushed = unsafe {
            match &ts {
                Some(ts) => {
                    let link = opcode::LinkTimeout::new(ts).build().user_data(TIMEOUT);
                    sq.push(&sqe.flags(squeue::Flags::IO_LINK)).and_then(|()| sq.push(&link))
                }
                None => sq.push(&sqe),
            }
        };
        drop(sq);
        if pushed.is_err() {
            // Only if a failed submission left SQEs queued, which `broken` prevents.
            self.broken = true;
            return Err(io::Error::other("io_uring submission queue full"));
        }
        let want = if ts.is_some() { 2 } else { 1 };
        let took = ring::submit(&self.ring);
        if !matches!(took, Ok(n) if n >= want) {
            // SQEs stay queued that must never run: never submit again.
            self.broken = true;
            if !matches!(took, Ok(n) if n > 0) {
                return Err(took.err().unwrap_or_else(|| io::Error::other("io_uring_enter took no SQE")));
            }
        }
        // A timeout the kernel did not take cannot complete.
        let linked = ts.is_some() && matches!(took, Ok(n) if n >= 2);
        let mut seen = (None, if linked { None } else { Some(0) });
        if let Err(e) = self.reap_read(&mut seen) {
            if seen.0.is_none() {
                self.abandon(into);
            }
            self.broken = true;
            return Err(e);
        }
        let (Some(read), Some(timeout)) = seen else { return Err(io::Error::other("read not reaped")) };
        if self.broken {
            return Err(io::Error::other("io_uring_enter took only part of a read"));
        }
        match read {
            n if n >= 0 => Ok(usize::try_from(n).unwrap_or(0)),
            e if linked && (e == -libc::ECANCELED || (e == -libc::EINTR && timeout == -libc::ETIME)) => {
                Err(io::Error::new(io::ErrorKind::WouldBlock, "no bytes within the read timeout"))
            }
            e => Err(io::Error::from_raw_os_error(e.saturating_neg())),
        }
    }

    /// Waits until `seen` holds the read's result and the timeout's (set
    /// it to `Some` beforehand when no timeout is linked). On an error
    /// `seen` tells what came.
    fn reap_read(&mut self, seen: &mut (Option<i32>, Option<i32>)) -> io::Result<()> {
        loop {
            ring::reap(&mut self.ring, &mut self.cqes);
            for c in self.cqes.drain(..) {
                match c.user_data {
                    READ => seen.0 = Some(c.res),
                    TIMEOUT => seen.1 = Some(c.res),
                    _ => {}
                }
            }
            if seen.0.is_some() && seen.1.is_some() {
                return Ok(());
            }
            ring::wait(&self.ring, 1, None)?;
        }
    }

    /// A read is in flight that cannot be waited for: shut the socket for
    /// reading (the receive then completes at once) and poll for its CQE.
    /// If it never comes, the staging buffer is leaked on drop; a caller's
    /// buffer cannot be, so the process aborts instead of returning (a ring
    /// that cannot wait does not happen with a valid ring). A timeout still
    /// pending names no memory: the kernel copied its timespec.
    fn abandon(&mut self, into: Dest) {
        self.broken = true;
        self.filled = 0;
        self.pos = 0;
        let _ = self.sock.shutdown(Shutdown::Read);
        for _ in 0..ABANDON_POLLS {
            ring::reap(&mut self.ring, &mut self.cqes);
            if self.cqes.drain(..).any(|c| c.user_data == READ) {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if let Dest::Caller(..) = into {
            eprintln!("pmigrate: an io_uring receive into a caller's buffer could not be reaped; aborting");
            std::process::abort();
        }
    }
}

impl Read for UringReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.pos == self.filled && buf.len() >= self.staging.len() {
            let len = u32::try_from(buf.len().min(MAX_RECV)).unwrap_or(u32::MAX);
            let n = self.recv(Dest::Caller(buf.as_mut_ptr(), len))?;
            return Ok(n.min(buf.len()));
        }
        if self.pos == self.filled {
            let n = self.recv(Dest::Staging)?;
            self.pos = 0;
            self.filled = n.min(self.staging.len());
        }
        let staged = &self.staged()[self.pos..];
        let n = staged.len().min(buf.len());
        buf[..n].copy_from_slice(&staged[..n]);
        self.pos += n;
        Ok(n)
    }
}

impl Drop for UringReader {
    fn drop(&mut self) {
        if self.broken {
            // A read may still be landing in it: leave it mapped.
            std::mem::forget(std::mem::replace(&mut self.staging, Mapping::empty()));
        }
    }
}
