//! One stream's connection: a TCP stream, or a TLS stream over one
//! ([`crate::tls`]). Read and written through `&Conn` from several threads,
//! like a `TcpStream`.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use crate::frame::{FrameHdr, FrameKind};
use crate::hello::{ErrorCode, ErrorMsg};
use crate::net::write_frame;
use crate::payload::build_control;
use crate::tls::TlsStream;

/// A stream's connection.
#[derive(Debug)]
pub enum Conn {
    /// Plain TCP.
    Tcp(TcpStream),
    /// TLS over TCP.
    Tls(Arc<TlsStream>),
}

impl Conn {
    /// The TCP stream (underneath, for TLS).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Tcp(s) => s,
            Conn::Tls(t) => t.tcp(),
        }
    }

    /// The plain TCP stream, if the connection is one.
    pub fn into_tcp(self) -> Result<TcpStream, Conn> {
        match self {
            Conn::Tcp(s) => Ok(s),
            tls => Err(tls),
        }
    }

    /// Whether the connection is under TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, Conn::Tls(_))
    }

    /// Another handle on the same connection.
    pub fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
            Conn::Tls(t) => Conn::Tls(t.clone()),
        })
    }

    /// Shuts the connection down (the write side after TLS's
    /// `close_notify`).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.shutdown(how),
            Conn::Tls(t) => t.shutdown(how),
        }
    }

    /// Tells the peer why the session fails, best effort and bounded: an
    /// `Error` frame that cannot go out within a second (a peer that stopped
    /// reading) is given up, and a TLS stream whose writer is in the middle
    /// of a record is left alone.
    pub fn send_error(&self, code: ErrorCode, message: impl Into<String>) {
        let _ = self.tcp().set_write_timeout(Some(Duration::from_secs(1)));
        match self {
            Conn::Tcp(s) => send_error(s, code, message),
            Conn::Tls(t) => {
                let mut f = Vec::new();
                let msg = ErrorMsg { code, message: message.into() };
                build_control(&mut f, FrameHdr::new(FrameKind::Error), &msg.encode());
                let _ = t.try_write_all(&f);
            }
        }
    }

    /// The read timeout of the socket: a read that gets nothing for this
    /// long returns `WouldBlock`.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.tcp().set_read_timeout(t)
    }
}

impl From<TcpStream> for Conn {
    fn from(s: TcpStream) -> Self {
        Conn::Tcp(s)
    }
}

impl Read for &Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => (&*s).read(buf),
            Conn::Tls(t) => (&**t).read(buf),
        }
    }
}

impl Write for &Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => (&*s).write(buf),
            Conn::Tls(t) => (&**t).write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Sends an `Error` frame, best effort (the peer may be gone already).
pub fn send_error(mut s: impl std::io::Write, code: ErrorCode, message: impl Into<String>) {
    let mut f = Vec::new();
    build_control(&mut f, FrameHdr::new(FrameKind::Error), &ErrorMsg { code, message: message.into() }.encode());
    let _ = write_frame(&mut s, &f, "error");
}
