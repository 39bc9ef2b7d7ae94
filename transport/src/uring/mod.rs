//! io_uring building blocks for the transport: a run-time probe, a frame
//! arena that rings can register, an ordered multi-frame writer and a
//! reader, each for one connected TCP socket.
//!
//! - [`probe`] says, once per process, whether io_uring is usable here and
//!   what of it ([`Support`]), or why not ([`Unavailable`]). Choose the
//!   backend with it; everything here fails cleanly with
//!   [`UringError::Unavailable`] where it says no.
//! - [`FramePool`] / [`FrameBuf`]: fixed-capacity frame buffers carved from
//!   one anonymous mapping, falling back to the heap when the pool is dry.
//! - [`UringWriter`]: queues whole frames ([`Outgoing`]) and sends them in
//!   order, a chain of up to `depth` per `io_uring_enter`, zero-copy from
//!   the registered arena when asked; on failure a [`SendFailure`] gives
//!   back every frame not wholly written, for a new connection.
//! - [`UringReader`]: `std::io::Read` with a registered staging buffer for
//!   small reads, large reads straight into the caller's slice, and a read
//!   timeout that behaves like `SO_RCVTIMEO`.
//!
//! ```ignore
//! use std::net::TcpStream;
//! use std::sync::Arc;
//! use pmigrate_transport::uring::{probe, FramePool, UringWriter, WriterOptions};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! if let Err(why) = probe() {
//!     eprintln!("using blocking writes: {why}");
//!     return Ok(());
//! }
//! let sock = Arc::new(TcpStream::connect("127.0.0.1:4444")?);
//! let pool = FramePool::new(32, 256 << 10)?;
//! let mut w = UringWriter::new(sock, WriterOptions::default(), Some(&pool))?;
//! let mut frame = pool.take();
//! frame.extend_from_slice(b"a whole frame")?;
//! w.send(frame)?;
//! w.flush()?;
//! let reusable: Vec<_> = w.take_done().collect();
//! # drop(reusable);
//! # Ok(())
//! # }
//! ```
//!
//! # Kernel facts relied on
//!
//! **Enabling.** `kernel.io_uring_disabled` (Linux 6.6) is 0 for everyone,
//! 1 for members of `kernel.io_uring_group` and holders of CAP_SYS_ADMIN
//! only, 2 for no one: `io_uring_setup` then fails with EPERM. Container
//! seccomp profiles commonly refuse the io_uring system calls with EPERM or
//! ENOSYS. The probe reads the sysctl, creates a ring, runs a NOP through
//! `io_uring_enter`, asks `IORING_REGISTER_PROBE` for the opcodes used
//! (SEND, RECV, READ_FIXED, LINK_TIMEOUT, ASYNC_CANCEL; SEND_ZC is
//! optional) and tries to register a small buffer.
//!
//! **Order of sends.** Two SEND SQEs on one stream socket are independent:
//! one that finds the socket buffer full is parked on a poll and retried
//! later, and one submitted after it can go first, interleaving the bytes
//! of two frames. SQEs linked with `IOSQE_IO_LINK` run one after the other,
//! each issued when its predecessor completed; a predecessor that fails, or
//! completes short of the length MSG_WAITALL asked for, breaks the chain:
//! its followers complete with -ECANCELED without running. Nothing can be
//! linked to an SQE already submitted, so the writer never has two chains
//! in flight: it submits one chain (one `io_uring_enter`), queues the next
//! frames meanwhile, and submits them only after the last CQE of the
//! previous chain.
//!
//! **MSG_WAITALL on a stream socket.** io_uring's send takes it (plain
//! `send(2)` ignores it) and then retries a partial send itself until all
//! bytes went (Linux 5.18); a short completion means an error (a reset, a
//! shutdown, an exiting task) cut it short, which the next send reports.
//! The writer sends the rest of a short frame and the cancelled followers
//! again, in order. A send can also complete with -EAGAIN (the kernel caps
//! its poll retries) or -EINTR: sent again too. The probe requires
//! IORING_OP_SOCKET, i.e. Linux 5.19, as the mark of a kernel with this
//! behaviour.
//!
//! **SEND_ZC** (Linux 6.0) posts two CQEs: the send's result, flagged
//! `IORING_CQE_F_MORE` when a notification follows, then the notification
//! (`IORING_CQE_F_NOTIF`) once the network stack dropped its last reference
//! to the pages, which over a real link can be after the peer ACKed them.
//! The writer holds the buffer until the notification. Over loopback the
//! receiving side copies anyway.
//!
//! **Fixed buffers.** `IORING_REGISTER_BUFFERS` pins every page of the
//! buffer (a registered arena is all resident) until it is unregistered or
//! the ring is gone, charging them to `RLIMIT_MEMLOCK` unless the process
//! has CAP_IPC_LOCK (ENOMEM when they do not fit), and the kernel then
//! uses those pages directly rather than through the user mapping. One
//! registered buffer is at most 1 GiB and must be anonymous (or shmem)
//! memory, hence the mmap arena. When registration fails the writer and
//! the reader go on without (plain SEND, RECV). The arenas and the rings are
//! `MADV_DONTFORK`: a fork (to exec a helper) would otherwise copy every
//! pinned private page into the child.
//!
//! **Requests belong to the submitting thread**, and the kernel cancels
//! them when that thread exits. A send cancelled mid-frame does not report
//! how much it wrote; the writer fails rather than guess.
//!
//! # Safety
//!
//! Building an SQE is safe; pushing one promises that the memory and file
//! it names stay valid until its last CQE. The promises kept here:
//!
//! - Writer: every frame lives in one slab keyed by `user_data` from
//!   `send` until its final CQE (the send's, and for SEND_ZC the
//!   notification's); its bytes sit in a heap block or an arena slot, which
//!   do not move when the owning value does, and are not written meanwhile.
//!   A failure hands back copies of frames the kernel still holds. Drop
//!   cancels the sends in flight, waits a bounded time (shutting the socket
//!   for writing if a dead peer holds them) and leaks, never frees, what is
//!   still held.
//! - Reader: every read is reaped, with its linked timeout, before `read`
//!   returns; if the ring cannot wait, the socket is shut for reading and
//!   the CQE polled for, the staging buffer leaked, and for a read into the
//!   caller's slice the process aborted rather than return.
//! - Registered memory (an arena's mapping, the staging buffer) is kept
//!   mapped by a field dropped after the ring.
//! - When the kernel takes only part of a submission, the SQEs left queued
//!   may name memory handed back later: nothing is submitted on that ring
//!   again (waits pass `to_submit` 0) and the writer or reader fails.

mod arena;
mod probe;
mod reader;
mod ring;
mod writer;

#[cfg(test)]
mod tests;

use std::io;

pub use arena::{CapacityError, FrameBuf, FramePool, PoolError};
pub use probe::{probe, Support, Unavailable};
pub use reader::UringReader;
pub use writer::{Outgoing, SendFailure, UringWriter, WriterOptions};

const _: () = {
    const fn send<T: Send>() {}
    send::<UringWriter>();
    send::<UringReader>();
    send::<SendFailure>();
};

/// Why a writer or reader could not be made.
#[derive(Debug, thiserror::Error)]
pub enum UringError {
    /// io_uring cannot be used here.
    #[error("io_uring unavailable: {0}")]
    Unavailable(#[from] Unavailable),
    /// Creating the ring failed.
    #[error("io_uring_setup with {entries} entries: {source}")]
    Setup {
        /// Submission queue size asked for.
        entries: u32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A writer depth outside the allowed range.
    #[error("queue depth {depth} is outside 1..={max}")]
    Depth {
        /// Depth asked for.
        depth: usize,
        /// The largest allowed.
        max: usize,
    },
    /// A staging buffer size outside the allowed range.
    #[error("staging buffer of {bytes} bytes is outside 1..={max}")]
    Staging {
        /// Size asked for.
        bytes: usize,
        /// The largest allowed.
        max: usize,
    },
    /// Mapping the staging buffer failed.
    #[error("mapping a staging buffer of {bytes} bytes: {source}")]
    Map {
        /// Size asked for.
        bytes: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The socket is non-blocking: io_uring would fail sends with EAGAIN
    /// instead of waiting for room.
    #[error("the writer needs a blocking socket (O_NONBLOCK is set)")]
    NonBlocking,
    /// Inspecting the socket failed.
    #[error("{what}: {source}")]
    Socket {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}
