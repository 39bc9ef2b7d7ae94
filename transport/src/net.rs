//! TCP streams through socket2: tuned sockets, NIC binding, framed reads.

use std::io::{self, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::str::FromStr;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};

use crate::frame::{FrameHdr, FrameKind, WireError, HEADER_LEN};
use crate::hello::ErrorMsg;

/// Socket buffer size asked for on every stream. Large enough to keep a
/// 10 Gbit/s link with a millisecond of RTT full; the kernel caps it at
/// `net.core.{r,w}mem_max`.
pub const SOCKET_BUFFER: usize = 4 << 20;

/// Read buffer in front of each stream: small control frames cost one
/// syscall for many, and large page frames bypass it.
const READ_BUFFER: usize = 256 << 10;

/// How long a peer may leave data this end sent unacknowledged — because
/// it vanished, its link is down, or it stopped reading (a stopped process:
/// its kernel advertises a zero window) — before the kernel gives up on the
/// connection (`TCP_USER_TIMEOUT`, which Linux also applies to zero-window
/// probing). Blocked writes then fail, whatever backend issued them. The
/// sessions' own progress deadlines default to the same value.
pub const PROGRESS_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a sender with nothing to send says `Keepalive` on a stream: a
/// receiver may fail a stream that carried nothing for three of these, so
/// progress timeouts below that are refused.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);

/// How long a stream's path may acknowledge nothing of what was sent
/// before a session that can take streams back moves the stream to
/// another route ([`crate::link::watch`]). A live peer acknowledges every
/// segment within a round trip, even with no room for it (a zero window),
/// and every stream sends at least a keepalive a second: a second of
/// silence with data in flight, confirmed over two round trips, is a path
/// that lost everything, not a slow peer. A false alarm costs a resend.
pub const LINK_TIMEOUT: Duration = Duration::from_secs(1);

/// The shortest progress timeout that keepalives can satisfy.
pub const MIN_PROGRESS_TIMEOUT: Duration = Duration::from_secs(3);

/// A keepalive frame, built once.
pub fn keepalive_frame() -> &'static [u8] {
    static F: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    F.get_or_init(|| {
        let mut f = Vec::with_capacity(HEADER_LEN);
        crate::payload::build_control(&mut f, FrameHdr::new(FrameKind::Keepalive), &[]);
        f
    })
}

/// Errors of the transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The peer sent bytes that break the protocol.
    #[error("{what}: {source}")]
    Wire {
        /// Where.
        what: String,
        /// The protocol violation.
        #[source]
        source: WireError,
    },
    /// The peer reported an error and closed.
    #[error("peer reported {:?}: {}", .0.code, .0.message)]
    Peer(ErrorMsg),
    /// The peer closed the connection where a frame was expected.
    #[error("{0}: connection closed by peer")]
    Closed(String),
    /// A frame that is valid but not expected here.
    #[error("{what}: unexpected {kind:?} frame")]
    Unexpected {
        /// Where.
        what: String,
        /// What arrived.
        kind: FrameKind,
    },
    /// The session could not be set up.
    #[error("{0}")]
    Setup(String),
    /// The peer did not prove what it must (the key, the certificate, the
    /// session's secret), or authenticates another way than this end.
    #[error("{0}")]
    Auth(String),
    /// No frame started within the reader's idle limit: the peer sent
    /// nothing, not even a keepalive.
    #[error("{0}: nothing from the peer for {1:?}")]
    Idle(String, Duration),
}

impl TransportError {
    /// Wraps an I/O error with context; timeouts and resets keep their kind.
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        TransportError::Io { what: what.into(), source }
    }
}

/// Which way a stream leaves this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Via {
    /// Bind to this local address (and so its NIC, by routing).
    Addr(IpAddr),
    /// Bind to this interface (`SO_BINDTODEVICE`; needs CAP_NET_RAW).
    Iface(String),
}

/// A text that names no [`Via`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is neither an IP address nor an interface name")]
pub struct ParseViaError {
    /// The text.
    pub input: String,
}

impl FromStr for Via {
    type Err = ParseViaError;

    fn from_str(s: &str) -> Result<Self, ParseViaError> {
        if let Ok(ip) = s.parse() {
            return Ok(Via::Addr(ip));
        }
        if s.is_empty() || s.len() >= 16 || s.contains(['/', ' ', ':']) {
            return Err(ParseViaError { input: s.to_string() });
        }
        Ok(Via::Iface(s.to_string()))
    }
}

impl std::fmt::Display for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Via::Addr(a) => write!(f, "{a}"),
            Via::Iface(i) => write!(f, "{i}"),
        }
    }
}

fn tune(s: &SockRef<'_>) -> io::Result<()> {
    s.set_nodelay(true)?;
    // Best effort: the kernel clamps these; a smaller buffer is not fatal.
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let ka =
        TcpKeepalive::new().with_time(Duration::from_secs(10)).with_interval(Duration::from_secs(2)).with_retries(5);
    s.set_tcp_keepalive(&ka)?;
    s.set_tcp_user_timeout(Some(PROGRESS_TIMEOUT))
}

/// Sets how long sent data may stay unacknowledged before the connection
/// is given up (see [`PROGRESS_TIMEOUT`], the default every stream gets).
pub fn set_progress_timeout(s: &TcpStream, t: Duration) -> io::Result<()> {
    SockRef::from(s).set_tcp_user_timeout(Some(t))
}

/// Bytes written to `s` that the kernel has not yet sent, or sent and not
/// yet seen acknowledged (`SIOCOUTQ`): what still has to cross the link.
pub fn unsent_bytes(s: &TcpStream) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int through the pointer, which
    // points to `n`; the descriptor is the stream's own, open while `s` lives.
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

/// A socket whose every read and write is bounded by one deadline for the
/// whole exchange, not per call: a peer dripping one byte at a time cannot
/// stretch it (handshakes, TLS included).
pub(crate) struct DeadlineIo<'a> {
    pub(crate) sock: &'a TcpStream,
    pub(crate) deadline: std::time::Instant,
}

/// Time left before `deadline`, or a `TimedOut` error once it passed.
pub(crate) fn left(deadline: std::time::Instant) -> io::Result<Duration> {
    match deadline.checked_duration_since(std::time::Instant::now()) {
        Some(d) if d >= Duration::from_millis(1) => Ok(d),
        _ => Err(io::Error::new(io::ErrorKind::TimedOut, "handshake deadline passed")),
    }
}

impl Read for DeadlineIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.sock.set_read_timeout(Some(left(self.deadline)?))?;
        (&*self.sock).read(buf)
    }
}

impl Write for DeadlineIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sock.set_write_timeout(Some(left(self.deadline)?))?;
        (&*self.sock).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Connects to `dest`, leaving by `via` when given.
pub fn connect(dest: SocketAddr, via: Option<&Via>, timeout: Duration) -> Result<TcpStream, TransportError> {
    let what = || match via {
        Some(v) => format!("connect to {dest} via {v}"),
        None => format!("connect to {dest}"),
    };
    let sock = Socket::new(Domain::for_address(dest), Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| TransportError::io(what(), e))?;
    match via {
        Some(Via::Addr(ip)) => sock.bind(&SocketAddr::new(*ip, 0).into()),
        Some(Via::Iface(name)) => sock.bind_device(Some(name.as_bytes())),
        None => Ok(()),
    }
    .map_err(|e| TransportError::io(what(), e))?;
    tune(&SockRef::from(&sock)).map_err(|e| TransportError::io(what(), e))?;
    sock.connect_timeout(&dest.into(), timeout).map_err(|e| TransportError::io(what(), e))?;
    Ok(sock.into())
}

/// A listening socket on `addr`, address reuse on.
pub fn listen(addr: SocketAddr) -> Result<TcpListener, TransportError> {
    let what = || format!("listen on {addr}");
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| TransportError::io(what(), e))?;
    sock.set_reuse_address(true).map_err(|e| TransportError::io(what(), e))?;
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
    sock.bind(&addr.into()).map_err(|e| TransportError::io(what(), e))?;
    sock.listen(128).map_err(|e| TransportError::io(what(), e))?;
    Ok(sock.into())
}

/// Makes the close of `s` send a reset instead of a clean end of stream
/// (linger 0), so its peer sees a failure, not an end.
pub fn reset_on_close(s: &TcpStream) {
    let _ = SockRef::from(s).set_linger(Some(Duration::ZERO));
}

/// Ends `s` with a reset now, whoever else holds it: its peer sees a
/// failure, not an end of stream (a FIN from `shutdown` would arrive
/// first), and this end's blocked reads and writes return.
pub fn reset_now(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    reset_on_close(s);
    // connect(2) to AF_UNSPEC disconnects a TCP socket: the kernel sends a
    // reset on an established connection and wakes its waiters.
    // SAFETY: a zeroed sockaddr of family AF_UNSPEC, of the size given,
    // that lives on this frame for the call; `s` is an open socket.
    unsafe {
        let mut sa: libc::sockaddr = std::mem::zeroed();
        sa.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
        libc::connect(s.as_raw_fd(), &sa, std::mem::size_of::<libc::sockaddr>() as libc::socklen_t);
    }
}

/// How long the path of `s` has acknowledged nothing while data is in
/// flight on it, and the connection's smoothed round trip (`TCP_INFO`);
/// `None` when nothing is in flight or the socket cannot say. A live peer
/// acknowledges every segment, even one it has no room for, so a slow or
/// stopped reader never stays silent long; a link that is down or a host
/// that vanished does.
pub fn unanswered(s: &TcpStream) -> Option<(Duration, Duration)> {
    use std::os::fd::AsRawFd;
    // SAFETY: a zeroed `tcp_info` (plain integers) and its size, both on
    // this frame for the call; the kernel writes at most `len` bytes.
    let info = unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        );
        if rc != 0 {
            return None;
        }
        info
    };
    (info.tcpi_unacked > 0)
        .then(|| (Duration::from_millis(info.tcpi_last_ack_recv.into()), Duration::from_micros(info.tcpi_rtt.into())))
}

/// Tunes an accepted stream like a connected one.
pub fn tune_accepted(s: &TcpStream) -> Result<(), TransportError> {
    tune(&SockRef::from(s)).map_err(|e| TransportError::io("tune accepted stream", e))
}

/// Reads whole frames from a stream, reusing one payload buffer.
///
/// Between frames the reader waits at most its idle limit, when one is set
/// (senders send `Keepalive` frames while they have nothing else to say),
/// else as long as it takes. Inside a frame it tolerates a stall
/// of at most [`FrameReader::set_stall_limit`] when the socket has a read
/// timeout set (the timeout is then only the polling tick): a peer that
/// starts a frame and stops sending fails instead of holding a receiver
/// forever.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: BufReader<R>,
    payload: Vec<u8>,
    name: String,
    stall_limit: Option<Duration>,
    idle_limit: Option<Duration>,
}

impl<R: Read> FrameReader<R> {
    /// A reader over `inner`; `name` prefixes its errors ("stream 2").
    pub fn new(inner: R, name: impl Into<String>) -> Self {
        Self {
            inner: BufReader::with_capacity(READ_BUFFER, inner),
            payload: Vec::new(),
            name: name.into(),
            stall_limit: None,
            idle_limit: None,
        }
    }

    /// A reader over `inner` that does no buffering of its own: for an
    /// `inner` that buffers small reads itself (the io_uring reader).
    pub fn unbuffered(inner: R, name: impl Into<String>) -> Self {
        Self {
            inner: BufReader::with_capacity(0, inner),
            payload: Vec::new(),
            name: name.into(),
            stall_limit: None,
            idle_limit: None,
        }
    }

    /// Fails a frame whose bytes stop arriving for longer than `limit`.
    pub fn set_stall_limit(&mut self, limit: Duration) {
        self.stall_limit = Some(limit);
    }

    /// Fails with [`TransportError::Idle`] when no frame starts within
    /// `limit` (counted from each call; the socket's read timeout is the
    /// polling tick).
    pub fn set_idle_limit(&mut self, limit: Duration) {
        self.idle_limit = Some(limit);
    }

    /// The name used in errors.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The underlying reader.
    pub fn get_ref(&self) -> &R {
        self.inner.get_ref()
    }

    /// Fills `buf` completely. `Ok(false)` only when the stream ended
    /// before the first byte and `at_boundary` says that is clean.
    fn fill(
        &mut self,
        buf_len: usize,
        header: &mut [u8; HEADER_LEN],
        at_boundary: bool,
    ) -> Result<bool, TransportError> {
        let mut got = 0;
        let mut stalled_since: Option<std::time::Instant> = None;
        let idle_since = std::time::Instant::now();
        while got < buf_len {
            let dst = if at_boundary { &mut header[got..] } else { &mut self.payload[got..] };
            match self.inner.read(dst) {
                Ok(0) if got == 0 && at_boundary => return Ok(false),
                Ok(0) => {
                    let what = if at_boundary { "inside a frame header" } else { "inside a frame payload" };
                    return Err(TransportError::Closed(format!("{}: {what}", self.name)));
                }
                Ok(n) => {
                    got += n;
                    stalled_since = None;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    if got == 0 && at_boundary {
                        if self.idle_limit.is_some_and(|l| idle_since.elapsed() >= l) {
                            return Err(TransportError::Idle(self.name.clone(), idle_since.elapsed()));
                        }
                        continue; // idle between frames: keep waiting
                    }
                    let since = *stalled_since.get_or_insert_with(std::time::Instant::now);
                    if self.stall_limit.is_some_and(|l| since.elapsed() >= l) {
                        return Err(TransportError::io(
                            format!("{}: peer stalled inside a frame for {:?}", self.name, since.elapsed()),
                            e,
                        ));
                    }
                }
                Err(e) => return Err(TransportError::io(format!("{}: read", self.name), e)),
            }
        }
        Ok(true)
    }

    /// Reads the next frame. A clean end of stream between frames is
    /// `Ok(None)`; anywhere else it is an error. An `Error` frame from the
    /// peer is returned as [`TransportError::Peer`].
    pub fn next_frame(&mut self) -> Result<Option<(FrameHdr, &[u8])>, TransportError> {
        let mut hb = [0u8; HEADER_LEN];
        if !self.fill(HEADER_LEN, &mut hb, true)? {
            return Ok(None);
        }
        let hdr = FrameHdr::decode(&hb).map_err(|source| TransportError::Wire { what: self.name.clone(), source })?;
        // `len` was bounded by `decode` for this kind (at most MAX_PAYLOAD).
        self.payload.resize(hdr.len as usize, 0);
        self.fill(hdr.len as usize, &mut hb, false)?;
        if hdr.kind == FrameKind::Error {
            hdr.verify(&self.payload).map_err(|source| TransportError::Wire { what: self.name.clone(), source })?;
            let msg = ErrorMsg::decode(&self.payload)
                .map_err(|source| TransportError::Wire { what: self.name.clone(), source })?;
            return Err(TransportError::Peer(msg));
        }
        Ok(Some((hdr, &self.payload)))
    }

    /// The payload of the frame last read, as an owned buffer (its length
    /// that frame's), with nothing copied; `with` becomes the buffer the
    /// next frames are read into (a buffer of a frame's size is reused as
    /// it is, an empty one grows).
    pub fn swap_payload(&mut self, with: Vec<u8>) -> Vec<u8> {
        std::mem::replace(&mut self.payload, with)
    }

    /// Reads the next frame, which must exist and be of `kind`.
    pub fn expect(&mut self, kind: FrameKind) -> Result<(FrameHdr, &[u8]), TransportError> {
        let name = self.name.clone();
        match self.next_frame()? {
            None => Err(TransportError::Closed(format!("{name}: waiting for {kind:?}"))),
            Some((h, _)) if h.kind != kind => Err(TransportError::Unexpected { what: name, kind: h.kind }),
            Some(f) => Ok(f),
        }
    }
}

/// Writes a whole, already-built frame.
pub fn write_frame(w: &mut impl Write, frame: &[u8], name: &str) -> Result<(), TransportError> {
    w.write_all(frame).map_err(|e| TransportError::io(format!("{name}: write"), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn via_parses_addresses_and_interfaces() {
        assert_eq!("10.0.0.1".parse::<Via>().unwrap(), Via::Addr("10.0.0.1".parse().unwrap()));
        assert_eq!("::1".parse::<Via>().unwrap(), Via::Addr("::1".parse().unwrap()));
        assert_eq!("eth1".parse::<Via>().unwrap(), Via::Iface("eth1".into()));
        assert!("a/b".parse::<Via>().is_err());
        assert!("".parse::<Via>().is_err());
        assert!("averyveryverylongname".parse::<Via>().is_err());
    }

    #[test]
    fn reader_tells_clean_eof_from_truncation() {
        let mut f = Vec::new();
        crate::payload::build_control(&mut f, FrameHdr::new(FrameKind::Done), &[]);
        let mut r = FrameReader::new(&f[..], "t");
        assert_eq!(r.next_frame().unwrap().unwrap().0.kind, FrameKind::Done);
        assert!(r.next_frame().unwrap().is_none());
        let mut r = FrameReader::new(&f[..20], "t");
        assert!(matches!(r.next_frame(), Err(TransportError::Closed(_))));
    }

    #[test]
    fn a_payload_taken_whole_leaves_the_reader_reading() {
        let (mut f, mut g) = (Vec::new(), Vec::new());
        crate::payload::build_data(&mut f, 7, b"first chunk", false);
        crate::payload::build_data(&mut g, 8, b"second", false);
        f.extend_from_slice(&g);
        let mut r = FrameReader::new(&f[..], "t");
        let (h, p) = r.next_frame().unwrap().unwrap();
        assert_eq!((h.aux, p), (7, &b"first chunk"[..]));
        // A recycled buffer, longer than the next frame and not zero.
        let first = r.swap_payload(vec![0xee; 64]);
        assert_eq!(first, b"first chunk");
        let (h, p) = r.next_frame().unwrap().unwrap();
        assert_eq!((h.aux, p), (8, &b"second"[..]));
        assert_eq!(r.swap_payload(Vec::new()), b"second");
        assert!(r.next_frame().unwrap().is_none());
    }
}
