//! Setting up a session: N streams, one handshake each.
//!
//! The source opens every stream, sends `Hello` and waits for `Welcome`.
//! The destination accepts connections on one or more listeners until it
//! holds every stream of exactly one session: the first valid `Hello` fixes
//! the session (its id, stream count, mode and region table, which the
//! embedder checks); any other connection — garbage, another session, a
//! stream index already taken — gets an `Error` frame and is closed, and
//! the acceptor keeps waiting for the real streams.

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::conn::Conn;
use crate::frame::{FrameHdr, FrameKind};
use crate::hello::{ErrorCode, ErrorMsg, Hello, Mode, Welcome};
use crate::net::{connect, listen, tune_accepted, write_frame, FrameReader, TransportError, Via};
use crate::payload::build_control;
use crate::tls::{TlsConfig, TlsStream};

/// How long an accepted connection may take to send its `Hello`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the source's streams go and how they leave.
#[derive(Clone, Debug)]
pub struct StreamPlan {
    /// Destination addresses; stream `i` goes to `dests[i % dests.len()]`.
    pub dests: Vec<SocketAddr>,
    /// Local addresses or interfaces; stream `i` leaves by `via[i % via.len()]`.
    pub via: Vec<Via>,
    /// Number of streams.
    pub streams: u16,
    /// Timeout for each connect and for the handshake.
    pub connect_timeout: Duration,
    /// Mutual TLS over every stream (byte-stream sessions).
    pub tls: Option<Arc<TlsConfig>>,
}

impl StreamPlan {
    /// `streams` streams spread over `dests`, leaving by the default route.
    pub fn new(dests: Vec<SocketAddr>, streams: u16) -> Self {
        Self { dests, via: Vec::new(), streams, connect_timeout: Duration::from_secs(10), tls: None }
    }

    /// Destination of stream `i`.
    pub fn dest(&self, i: usize) -> SocketAddr {
        self.dests[i % self.dests.len()]
    }

    /// Local side of stream `i`, if any.
    pub fn via(&self, i: usize) -> Option<&Via> {
        (!self.via.is_empty()).then(|| &self.via[i % self.via.len()])
    }
}

/// A fresh random session id.
pub fn new_session_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    // getrandom(2) never fails for 16 bytes once the pool is initialised;
    // fall back to time and pid bits if it somehow does.
    // SAFETY: the buffer is valid for 16 bytes of writes.
    let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    if n != 16 {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        id[..8].copy_from_slice(&(t.as_nanos() as u64).to_le_bytes());
        id[8..12].copy_from_slice(&std::process::id().to_le_bytes());
    }
    id
}

/// Sends an `Error` frame, best effort (the peer may be gone already).
pub fn send_error(mut s: impl std::io::Write, code: ErrorCode, message: impl Into<String>) {
    let mut f = Vec::new();
    build_control(&mut f, FrameHdr::new(FrameKind::Error), &ErrorMsg { code, message: message.into() }.encode());
    let _ = write_frame(&mut s, &f, "error");
}

/// Opens every stream of a session: connect (and TLS, when the plan has
/// it), `Hello`, `Welcome`. `hello` is the template; its stream numbering
/// is filled in per stream.
pub fn connect_session(plan: &StreamPlan, hello: &Hello) -> Result<(Vec<Conn>, Welcome), TransportError> {
    if plan.dests.is_empty() || plan.streams == 0 {
        return Err(TransportError::Setup("a session needs at least one destination and one stream".into()));
    }
    let mut streams = Vec::with_capacity(plan.streams as usize);
    let mut welcome = None;
    for i in 0..plan.streams {
        let name = format!("stream {i}");
        let dest = plan.dest(i.into());
        let tcp = connect(dest, plan.via(i.into()), plan.connect_timeout)?;
        let s = match &plan.tls {
            None => Conn::Tcp(tcp),
            Some(tls) => {
                // The handshake is bounded like the pmigrate one.
                tcp.set_read_timeout(Some(plan.connect_timeout)).map_err(|e| TransportError::io(&name, e))?;
                let host = dest.ip().to_string();
                let t = TlsStream::connect(tcp, tls, &host)
                    .map_err(|e| TransportError::Setup(format!("{name} to {dest}: {e}")))?;
                Conn::Tls(Arc::new(t))
            }
        };
        s.set_read_timeout(Some(HANDSHAKE_TICK)).map_err(|e| TransportError::io(&name, e))?;
        let mut h = hello.clone();
        h.stream_index = i;
        h.stream_count = plan.streams;
        let mut f = Vec::new();
        build_control(&mut f, FrameHdr::new(FrameKind::Hello), &h.encode());
        write_frame(&mut &s, &f, &name)?;
        let mut r = FrameReader::new(&s, name.clone());
        r.set_idle_limit(plan.connect_timeout);
        r.set_stall_limit(plan.connect_timeout);
        let (hdr, payload) = r.expect(FrameKind::Welcome)?;
        hdr.verify(payload).map_err(|source| TransportError::Wire { what: name.clone(), source })?;
        let w = Welcome::decode(payload).map_err(|source| TransportError::Wire { what: name.clone(), source })?;
        if w.session != hello.session {
            return Err(TransportError::Setup(format!("{name}: welcomed into another session")));
        }
        if w.caps & !hello.caps != 0 {
            return Err(TransportError::Setup(format!(
                "{name}: the destination granted capabilities {:#x} that were not offered",
                w.caps & !hello.caps
            )));
        }
        welcome = Some(w);
        s.set_read_timeout(None).map_err(|e| TransportError::io(&name, e))?;
        streams.push(s);
    }
    Ok((streams, welcome.expect("at least one stream")))
}

/// What the embedder says about a session's first `Hello`.
pub type HelloCheck<'a> = dyn FnMut(&Hello) -> Result<u64, ErrorMsg> + 'a;

/// Listens for the streams of one session.
#[derive(Debug)]
pub struct Acceptor {
    listeners: Vec<TcpListener>,
    /// How long the remaining streams may take once the first arrived.
    pub gather_timeout: Duration,
    /// Mutual TLS on every accepted stream, before its `Hello`.
    pub tls: Option<Arc<TlsConfig>>,
}

/// An accepted session: its `Hello` and its streams ordered by index.
#[derive(Debug)]
pub struct Accepted {
    /// The first stream's `Hello` (its index field is that stream's).
    pub hello: Hello,
    /// Capabilities in force.
    pub caps: u64,
    /// Streams, index `i` at position `i`.
    pub streams: Vec<Conn>,
    /// Connections refused while gathering, with the reason.
    pub refused: Vec<(SocketAddr, String)>,
}

/// Read timeout used as the polling tick of handshake reads.
const HANDSHAKE_TICK: Duration = Duration::from_millis(200);

/// Handshakes in progress at most; further connections are refused at once
/// until some finish, so idle connections cannot pile up threads.
pub const MAX_PENDING_HANDSHAKES: usize = 64;

/// An accepted connection's handshake: tuning, TLS when configured, its
/// `Hello`. On failure the connection comes back to be told why — except
/// after a failed TLS handshake, when nothing can reach the peer.
pub(crate) fn accept_handshake(s: TcpStream, tls: Option<&TlsConfig>) -> (Option<Conn>, Result<Hello, TransportError>) {
    let _ = s.set_nonblocking(false);
    if let Err(e) = tune_accepted(&s) {
        return (Some(Conn::Tcp(s)), Err(e));
    }
    let conn = match tls {
        None => Conn::Tcp(s),
        Some(cfg) => {
            if let Err(e) = s.set_read_timeout(Some(HELLO_TIMEOUT)) {
                return (Some(Conn::Tcp(s)), Err(TransportError::io("tls", e)));
            }
            match TlsStream::accept(s, cfg) {
                Ok(t) => Conn::Tls(Arc::new(t)),
                Err(e) => return (None, Err(TransportError::Setup(e.to_string()))),
            }
        }
    };
    let res = read_hello(&conn);
    (Some(conn), res)
}

pub(crate) fn read_hello(s: &Conn) -> Result<Hello, TransportError> {
    s.set_read_timeout(Some(HANDSHAKE_TICK)).map_err(|e| TransportError::io("hello", e))?;
    let mut r = FrameReader::new(s, "handshake");
    r.set_idle_limit(HELLO_TIMEOUT);
    r.set_stall_limit(HELLO_TIMEOUT);
    let (hdr, payload) = r.expect(FrameKind::Hello)?;
    hdr.verify(payload).map_err(|source| TransportError::Wire { what: "hello".into(), source })?;
    Hello::decode(payload).map_err(|source| TransportError::Wire { what: "hello".into(), source })
}

impl Acceptor {
    /// Listens on every address.
    pub fn bind(addrs: &[SocketAddr]) -> Result<Self, TransportError> {
        if addrs.is_empty() {
            return Err(TransportError::Setup("no address to listen on".into()));
        }
        let listeners = addrs.iter().map(|a| listen(*a)).collect::<Result<Vec<_>, _>>()?;
        for l in &listeners {
            l.set_nonblocking(true).map_err(|e| TransportError::io("listener", e))?;
        }
        Ok(Self { listeners, gather_timeout: Duration::from_secs(30), tls: None })
    }

    /// The listening sockets.
    pub(crate) fn listeners(&self) -> &[TcpListener] {
        &self.listeners
    }

    /// Another handle on the same listening sockets.
    pub fn try_clone(&self) -> Result<Self, TransportError> {
        let listeners = self
            .listeners
            .iter()
            .map(|l| l.try_clone())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TransportError::io("listener", e))?;
        Ok(Self { listeners, gather_timeout: self.gather_timeout, tls: self.tls.clone() })
    }

    /// The bound addresses (with the ports the kernel chose for port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().filter_map(|l| l.local_addr().ok()).collect()
    }

    /// Accepts the streams of one session of `mode`. `check` judges the
    /// first valid `Hello` (region table, capabilities) and returns the
    /// capabilities to use; a refusal is sent to that peer and the acceptor
    /// keeps waiting. `deadline` bounds the whole wait.
    pub fn accept_session(
        &self,
        mode: Mode,
        check: &mut HelloCheck<'_>,
        deadline: Option<Instant>,
    ) -> Result<Accepted, TransportError> {
        let (tx, rx) = mpsc::channel::<(Option<Conn>, SocketAddr, Result<Hello, TransportError>)>();
        let mut session: Option<(Hello, u64, Instant)> = None;
        let mut slots: Vec<Option<Conn>> = Vec::new();
        let mut refused = Vec::new();
        let pending = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        loop {
            if let Some((h, _, first_at)) = &session {
                if slots.iter().all(Option::is_some) {
                    let (hello, caps, _) = session.expect("session set");
                    let streams = slots.into_iter().map(|s| s.expect("every slot filled")).collect();
                    return Ok(Accepted { hello, caps, streams, refused });
                }
                if first_at.elapsed() > self.gather_timeout {
                    let got = slots.iter().filter(|s| s.is_some()).count();
                    return Err(TransportError::Setup(format!(
                        "only {got} of {} streams of the session arrived within {:?}",
                        h.stream_count, self.gather_timeout
                    )));
                }
            }
            if deadline.is_some_and(|d| Instant::now() > d) {
                return Err(TransportError::Setup("no migration session arrived in time".into()));
            }
            let mut idle = true;
            for l in &self.listeners {
                match l.accept() {
                    Ok((mut s, peer)) => {
                        idle = false;
                        if pending.load(std::sync::atomic::Ordering::Acquire) >= MAX_PENDING_HANDSHAKES {
                            let _ = s.set_nonblocking(false);
                            send_error(&mut s, ErrorCode::Aborted, "too many handshakes in progress");
                            refused.push((peer, "too many handshakes in progress".to_string()));
                            continue;
                        }
                        pending.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                        let (tx, pending, tls) = (tx.clone(), pending.clone(), self.tls.clone());
                        std::thread::spawn(move || {
                            let (s, res) = accept_handshake(s, tls.as_deref());
                            pending.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                            let _ = tx.send((s, peer, res));
                        });
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(TransportError::io("accept", e)),
                }
            }
            match rx.recv_timeout(Duration::from_millis(if idle { 5 } else { 0 })) {
                Ok((None, peer, res)) => {
                    let why = res.err().map(|e| e.to_string()).unwrap_or_default();
                    refused.push((peer, why));
                }
                Ok((Some(mut s), peer, res)) => {
                    let verdict = match res {
                        Err(e) => Err((ErrorCode::Protocol, e.to_string())),
                        Ok(h) => self.judge(&h, mode, &mut session, &mut slots, check).map(|()| h),
                    };
                    match verdict {
                        Ok(h) => {
                            let (_, caps, _) = session.as_ref().expect("judge fixed the session");
                            let mut f = Vec::new();
                            let w = Welcome { session: h.session, caps: *caps };
                            build_control(&mut f, FrameHdr::new(FrameKind::Welcome), &w.encode());
                            // A stream that breaks during its handshake dooms the session.
                            write_frame(&mut s, &f, "welcome")?;
                            s.set_read_timeout(None).map_err(|e| TransportError::io("welcome", e))?;
                            slots[h.stream_index as usize] = Some(s);
                        }
                        Err((code, why)) => {
                            send_error(&s, code, why.clone());
                            let _ = s.shutdown(std::net::Shutdown::Both);
                            refused.push((peer, why));
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => unreachable!("we hold a sender"),
            }
        }
    }

    fn judge(
        &self,
        h: &Hello,
        mode: Mode,
        session: &mut Option<(Hello, u64, Instant)>,
        slots: &mut Vec<Option<Conn>>,
        check: &mut HelloCheck<'_>,
    ) -> Result<(), (ErrorCode, String)> {
        if h.mode != mode {
            return Err((ErrorCode::NotInSession, format!("this end serves {mode:?} sessions, not {:?}", h.mode)));
        }
        match session {
            None => {
                let caps = check(h).map_err(|e| (e.code, e.message))?;
                *slots = (0..h.stream_count).map(|_| None).collect();
                *session = Some((h.clone(), caps, Instant::now()));
                Ok(())
            }
            Some((first, _, _)) => {
                if h.session != first.session {
                    return Err((ErrorCode::NotInSession, "another session is being served".into()));
                }
                agrees(first, h)?;
                if slots[h.stream_index as usize].is_some() {
                    return Err((ErrorCode::NotInSession, format!("stream {} already connected", h.stream_index)));
                }
                Ok(())
            }
        }
    }
}

/// Whether a later stream's `Hello` agrees with its session's first one.
pub(crate) fn agrees(first: &Hello, h: &Hello) -> Result<(), (ErrorCode, String)> {
    if h.stream_count != first.stream_count
        || h.regions != first.regions
        || h.caps != first.caps
        || h.extensions != first.extensions
    {
        return Err((ErrorCode::Protocol, "stream disagrees with its session's handshake".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hello::CAP_LZ4;

    fn hello(count: u16) -> Hello {
        Hello {
            version: crate::hello::PROTOCOL_VERSION,
            mode: Mode::Stream,
            stream_index: 0,
            stream_count: count,
            session: new_session_id(),
            caps: CAP_LZ4,
            regions: vec![],
            extensions: vec![],
        }
    }

    #[test]
    fn streams_leave_by_the_address_or_interface_asked_for() {
        let acc = Acceptor::bind(&["127.0.0.1:0".parse().unwrap()]).unwrap();
        let addr = acc.local_addrs()[0];
        let server = std::thread::spawn(move || acc.accept_session(Mode::Stream, &mut |_| Ok(CAP_LZ4), None));
        let mut plan = StreamPlan::new(vec![addr], 3);
        plan.via = vec!["127.0.0.2".parse().unwrap(), "lo".parse().unwrap()];
        let (streams, welcome) = connect_session(&plan, &hello(3)).unwrap();
        assert_eq!(welcome.caps, CAP_LZ4);
        let locals: Vec<_> = streams.iter().map(|s| s.tcp().local_addr().unwrap().ip().to_string()).collect();
        assert_eq!(locals[0], "127.0.0.2", "stream 0 bound to its address");
        assert_eq!(locals[2], "127.0.0.2", "vias cycle");
        let accepted = server.join().unwrap().unwrap();
        assert_eq!(accepted.streams.len(), 3);
        let peers: Vec<_> = accepted.streams.iter().map(|s| s.tcp().peer_addr().unwrap()).collect();
        for (s, p) in streams.iter().zip(&peers) {
            assert_eq!(s.tcp().local_addr().unwrap(), *p, "streams are ordered by index at the destination");
        }
    }

    #[test]
    fn a_missing_interface_is_a_clear_error() {
        let mut plan = StreamPlan::new(vec!["127.0.0.1:9".parse().unwrap()], 1);
        plan.via = vec!["nosuchif0".parse().unwrap()];
        let err = connect_session(&plan, &hello(1)).unwrap_err();
        assert!(err.to_string().contains("via nosuchif0"), "{err}");
    }

    #[test]
    fn a_silent_peer_cannot_hold_the_handshake() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let _hold = std::thread::spawn(move || {
            let conn = l.accept();
            std::thread::sleep(Duration::from_secs(5));
            drop(conn);
        });
        let mut plan = StreamPlan::new(vec![addr], 1);
        plan.connect_timeout = Duration::from_millis(500);
        let t = std::time::Instant::now();
        let err = connect_session(&plan, &hello(1)).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(4), "gave up on a silent peer: {err}");
    }
}
