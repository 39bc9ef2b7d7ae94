//! The I/O backend of a stream: how its bytes move between this process and
//! the kernel. Both backends move the same bytes; only the system calls
//! differ.
//!
//! - [`Backend::Portable`]: blocking `write`/`read` on the socket, one
//!   system call per frame written (or more for a short write).
//! - [`Backend::Uring`]: io_uring (the private `uring` module). A writer queues whole
//!   frames and submits them as one linked chain per `io_uring_enter`, so a
//!   sender with frames waiting makes one system call for several; the
//!   kernel keeps the chain going (a send that finds the socket full is
//!   parked on a poll, no thread blocks on it). A reader serves small reads
//!   from a registered staging buffer and large ones straight into the
//!   frame.
//!
//! [`BackendChoice::resolve`] picks one at run time: io_uring where the
//! probe says it works, the portable backend otherwise (with the reason);
//! either can be forced. A TLS connection always takes the portable
//! backend: its bytes are sealed and opened in this process.

use std::io::{self, Read, Write};
use std::sync::Arc;

use crate::conn::Conn;
use crate::net::{FrameReader, TransportError};
use crate::uring::{self, UringReader, UringWriter, WriterOptions};

// The frame buffers a backend sends from (registered with io_uring where it
// runs), and the probe that says whether it does.
pub use crate::uring::{
    probe as probe_uring, CapacityError, FrameBuf, FramePool, Outgoing, PoolError, Support as UringSupport,
    Unavailable as UringUnavailable,
};

/// Frames in one io_uring chain at most: enough that a sender with a full
/// queue (4 frames of 256 KiB) submits them all at once.
pub const URING_DEPTH: usize = 8;

/// Size of the io_uring reader's registered staging buffer: headers and
/// small control frames come through it; payloads of at least this size are
/// read straight into the frame.
pub const URING_STAGING: usize = 64 << 10;

/// The I/O backend in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Blocking reads and writes.
    Portable,
    /// io_uring.
    Uring,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Portable => "portable",
            Backend::Uring => "io_uring",
        })
    }
}

/// Which backend to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendChoice {
    /// io_uring when the kernel allows it, else the portable backend.
    #[default]
    Auto,
    /// Always the portable backend.
    Portable,
    /// io_uring, or fail.
    Uring,
}

/// A text that names no [`BackendChoice`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the I/O backend is auto, uring or portable, not {input:?}")]
pub struct ParseBackendError {
    /// The text.
    pub input: String,
}

impl std::str::FromStr for BackendChoice {
    type Err = ParseBackendError;

    fn from_str(s: &str) -> Result<Self, ParseBackendError> {
        match s {
            "auto" => Ok(BackendChoice::Auto),
            "portable" => Ok(BackendChoice::Portable),
            "uring" | "io_uring" | "io-uring" => Ok(BackendChoice::Uring),
            _ => Err(ParseBackendError { input: s.to_string() }),
        }
    }
}

/// A resolved choice: the backend, and why not io_uring when it was not
/// forced and the probe said no.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// The backend to use.
    pub backend: Backend,
    /// Why `Auto` fell back to the portable backend.
    pub fallback: Option<String>,
}

impl Resolved {
    /// What a report says: the backend, and why not io_uring when `Auto`
    /// fell back (`portable (io_uring unavailable: …)`).
    pub fn describe(&self) -> String {
        match &self.fallback {
            None => self.backend.to_string(),
            Some(why) => format!("{} (io_uring unavailable: {why})", self.backend),
        }
    }
}

impl BackendChoice {
    /// Probes (once per process) and picks the backend.
    pub fn resolve(self) -> Result<Resolved, TransportError> {
        match self {
            BackendChoice::Portable => Ok(Resolved { backend: Backend::Portable, fallback: None }),
            BackendChoice::Uring => match uring::probe() {
                Ok(_) => Ok(Resolved { backend: Backend::Uring, fallback: None }),
                Err(why) => Err(TransportError::Setup(format!("io_uring was asked for: {why}"))),
            },
            BackendChoice::Auto => Ok(match uring::probe() {
                Ok(_) => Resolved { backend: Backend::Uring, fallback: None },
                Err(why) => Resolved { backend: Backend::Portable, fallback: Some(why.to_string()) },
            }),
        }
    }
}

/// Writes whole frames to one connection with either backend.
pub enum FrameWriter {
    /// Blocking `write_all`; the buffers written, for reuse.
    Portable(Conn, Vec<Outgoing>),
    /// io_uring chains.
    Uring(Box<UringWriter>),
}

impl FrameWriter {
    /// A writer on `conn`. With `zero_copy`, frames built in that arena go
    /// out with `SEND_ZC` from its registered memory (io_uring, when the
    /// kernel has it; see the private `uring` module).
    pub fn new(conn: Conn, backend: Backend, zero_copy: Option<&FramePool>) -> Result<Self, TransportError> {
        Ok(match (backend, conn) {
            (Backend::Portable, conn) | (Backend::Uring, conn @ Conn::Tls(_)) => {
                FrameWriter::Portable(conn, Vec::new())
            }
            (Backend::Uring, Conn::Tcp(sock)) => {
                let opts = WriterOptions { depth: URING_DEPTH, zero_copy: zero_copy.is_some() };
                let w = UringWriter::new(Arc::new(sock), opts, zero_copy)
                    .map_err(|e| TransportError::Setup(format!("io_uring writer: {e}")))?;
                FrameWriter::Uring(Box::new(w))
            }
        })
    }

    /// Whether frames of the arena go out zero-copy.
    pub fn zero_copy(&self) -> bool {
        matches!(self, FrameWriter::Uring(w) if w.zero_copy())
    }

    /// Hands `frame` over: the portable writer writes it now, the io_uring
    /// writer queues it for [`FrameWriter::flush`], which submits what is
    /// queued and waits for it in one system call per chain. On failure
    /// every frame not wholly written comes back, in order, this one
    /// included, for writing again whole on a new connection.
    pub fn send(&mut self, frame: impl Into<Outgoing>) -> Result<(), WriteFailure> {
        let frame = frame.into();
        match self {
            FrameWriter::Portable(s, done) => match (&*s).write_all(&frame) {
                Ok(()) => {
                    done.push(frame);
                    Ok(())
                }
                Err(error) => Err(WriteFailure { error, unsent: vec![frame] }),
            },
            FrameWriter::Uring(w) => w.queue(frame).map_err(WriteFailure::from),
        }
    }

    /// Waits until every frame handed over was wholly written.
    pub fn flush(&mut self) -> Result<(), WriteFailure> {
        match self {
            FrameWriter::Portable(..) => Ok(()),
            FrameWriter::Uring(w) => w.flush().map_err(WriteFailure::from),
        }
    }

    /// Buffers whose frames were written (and, zero-copy, let go of by the
    /// kernel), for reuse.
    pub fn take_done(&mut self) -> Vec<Outgoing> {
        match self {
            FrameWriter::Portable(_, done) => std::mem::take(done),
            FrameWriter::Uring(w) => w.take_done().collect(),
        }
    }
}

/// A write failed; the connection is no good any more.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct WriteFailure {
    /// What failed.
    #[source]
    pub error: io::Error,
    /// Every frame not wholly written, in order.
    pub unsent: Vec<Outgoing>,
}

impl From<uring::SendFailure> for WriteFailure {
    fn from(f: uring::SendFailure) -> Self {
        WriteFailure { error: f.error, unsent: f.unsent }
    }
}

/// The reading side of one connection with either backend.
pub enum StreamIn {
    /// Blocking reads.
    Portable(Conn),
    /// io_uring reads.
    Uring(Box<UringReader>),
}

impl Read for StreamIn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            StreamIn::Portable(s) => (&*s).read(buf),
            StreamIn::Uring(r) => r.read(buf),
        }
    }
}

/// A frame reader on `conn` with `backend`. Set the socket's read timeout
/// first: the io_uring reader takes it over when it is made.
pub fn frame_reader(
    conn: Conn,
    backend: Backend,
    name: impl Into<String>,
) -> Result<FrameReader<StreamIn>, TransportError> {
    Ok(match (backend, conn) {
        (Backend::Portable, conn) | (Backend::Uring, conn @ Conn::Tls(_)) => {
            FrameReader::new(StreamIn::Portable(conn), name)
        }
        (Backend::Uring, Conn::Tcp(sock)) => {
            let r = UringReader::new(Arc::new(sock), URING_STAGING)
                .map_err(|e| TransportError::Setup(format!("io_uring reader: {e}")))?;
            // The reader stages small reads itself: no second buffer.
            FrameReader::unbuffered(StreamIn::Uring(Box::new(r)), name)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_and_resolve() {
        assert_eq!("auto".parse::<BackendChoice>().unwrap(), BackendChoice::Auto);
        assert_eq!("io_uring".parse::<BackendChoice>().unwrap(), BackendChoice::Uring);
        assert!("epoll".parse::<BackendChoice>().is_err());
        let portable = BackendChoice::Portable.resolve().unwrap();
        assert_eq!(portable, Resolved { backend: Backend::Portable, fallback: None });
        // Auto is io_uring exactly when the probe says so, else says why not.
        let auto = BackendChoice::Auto.resolve().unwrap();
        match uring::probe() {
            Ok(_) => assert_eq!(auto.backend, Backend::Uring),
            Err(why) => assert_eq!(auto.fallback, Some(why.to_string())),
        }
        assert_eq!(BackendChoice::Uring.resolve().is_ok(), uring::probe().is_ok());
        // A report says why Auto did not take io_uring.
        let fell = Resolved { backend: Backend::Portable, fallback: Some("disabled".into()) };
        assert_eq!(fell.describe(), "portable (io_uring unavailable: disabled)");
        assert_eq!(portable.describe(), "portable");
    }
}
