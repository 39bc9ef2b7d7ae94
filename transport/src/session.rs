//! Opening a session, the source's side: N streams, each connected (TLS
//! when configured), authenticated ([`crate::auth`]) and introduced with
//! its `Hello`, in order; the destination answers each with `Welcome`. The
//! accepting side is [`crate::accept`].

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::auth::{Auth, Method, Offer, Purpose, SessionKey};
pub use crate::conn::send_error;
use crate::conn::Conn;
use crate::handshake::{dial, read_welcome, send_hello, Dial};
use crate::hello::{Hello, Welcome};
use crate::net::{connect, TransportError, Via};

/// Where the source's streams go and how they leave.
#[derive(Clone, Debug)]
pub struct StreamPlan {
    /// Destination addresses; stream `i` goes to `dests[i % dests.len()]`.
    pub dests: Vec<SocketAddr>,
    /// Local addresses or interfaces; stream `i` leaves by `via[i % via.len()]`.
    pub via: Vec<Via>,
    /// Number of streams.
    pub streams: u16,
    /// Timeout for each stream's connect and handshake, as a whole.
    pub connect_timeout: Duration,
    /// How every stream proves itself, and checks the destination.
    pub auth: Auth,
}

impl StreamPlan {
    /// `streams` streams spread over `dests`, leaving by the default route,
    /// authenticated as `auth` says.
    pub fn new(dests: Vec<SocketAddr>, streams: u16, auth: Auth) -> Self {
        Self { dests, via: Vec::new(), streams, connect_timeout: Duration::from_secs(10), auth }
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

/// An opened session: its streams in order, the destination's `Welcome`,
/// and the secret every later stream of the session proves.
#[derive(Debug)]
pub struct Connected {
    /// Streams, index `i` at position `i`.
    pub streams: Vec<Conn>,
    /// The destination's answer (the same on every stream).
    pub welcome: Welcome,
    /// The session's secret, for streams that come back after a lost link.
    pub key: SessionKey,
}

/// Opens one authenticated connection for stream `index` of the session
/// `hello` describes, by the plan's route of stream `route` (its
/// destination address and way out; a stream's own is `route = index`).
pub(crate) fn open_stream(
    plan: &StreamPlan,
    hello: &Hello,
    index: u16,
    route: usize,
    purpose: Purpose,
    key: Option<&SessionKey>,
) -> Result<(Conn, crate::auth::Transcript, Option<[u8; 32]>), TransportError> {
    let name = match purpose {
        Purpose::Join => format!("stream {index}"),
        Purpose::Resume => format!("stream {index} (reconnecting)"),
    };
    let dest = plan.dest(route);
    let deadline = Instant::now() + plan.connect_timeout;
    let tcp = connect(dest, plan.via(route), plan.connect_timeout)?;
    let offer = Offer {
        method: Method::Insecure,
        purpose,
        mode: hello.mode,
        stream_index: index,
        stream_count: hello.stream_count,
        session: hello.session,
        nonce: [0; 32],
    };
    let d = dial(tcp, Dial { auth: &plan.auth, host: dest.ip().to_string(), offer, key, deadline, name })?;
    Ok((d.conn, d.transcript, d.tls_export))
}

/// Opens one stream of a session, numbered as `hello` says: connect (TLS
/// when the plan has it), authenticate — proving the session's secret `key`
/// on every stream but a session's first — then `Hello` and `Welcome`.
/// Returns the stream, the destination's `Welcome` and the session's secret
/// (derived here on stream 0). [`connect_session`] opens every stream with
/// it; on its own it is for tools and tests that drive a session by hand.
pub fn connect_stream(
    plan: &StreamPlan,
    hello: &Hello,
    key: Option<&SessionKey>,
) -> Result<(Conn, Welcome, SessionKey), TransportError> {
    let i = hello.stream_index;
    let name = format!("stream {i}");
    let (conn, transcript, export) = open_stream(plan, hello, i, i.into(), Purpose::Join, key)?;
    let key = match key {
        Some(k) => k.clone(),
        None => SessionKey::derive(&plan.auth, &transcript, export.as_ref()),
    };
    let deadline = Instant::now() + plan.connect_timeout;
    send_hello(&conn, hello, deadline, &name)?;
    let welcome = read_welcome(&conn, hello.session, hello.caps, deadline, &name)?;
    Ok((conn, welcome, key))
}

/// Opens every stream of a session: connect (and TLS, when the plan has
/// it), authentication, `Hello`, `Welcome`. `hello` is the template; its
/// stream numbering is filled in per stream.
pub fn connect_session(plan: &StreamPlan, hello: &Hello) -> Result<Connected, TransportError> {
    if plan.dests.is_empty() || plan.streams == 0 {
        return Err(TransportError::Setup("a session needs at least one destination and one stream".into()));
    }
    let mut streams = Vec::with_capacity(plan.streams as usize);
    let mut welcome = None;
    let mut key: Option<SessionKey> = None;
    for i in 0..plan.streams {
        let mut h = hello.clone();
        h.stream_index = i;
        h.stream_count = plan.streams;
        let (conn, w, k) = connect_stream(plan, &h, key.as_ref())?;
        key = Some(k);
        welcome = Some(w);
        streams.push(conn);
    }
    Ok(Connected { streams, welcome: welcome.expect("at least one stream"), key: key.expect("at least one stream") })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accept::Acceptor;
    use crate::hello::{Mode, CAP_LZ4};

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
        let acc = Acceptor::bind(&["127.0.0.1:0".parse().unwrap()], Auth::Insecure).unwrap();
        let addr = acc.local_addrs()[0];
        let server = std::thread::spawn(move || acc.accept_session(Mode::Stream, &mut |_| Ok(CAP_LZ4), None));
        let mut plan = StreamPlan::new(vec![addr], 3, Auth::Insecure);
        plan.via = vec!["127.0.0.2".parse().unwrap(), "lo".parse().unwrap()];
        let Connected { streams, welcome, .. } = connect_session(&plan, &hello(3)).unwrap();
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
        let mut plan = StreamPlan::new(vec!["127.0.0.1:9".parse().unwrap()], 1, Auth::Insecure);
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
        let mut plan = StreamPlan::new(vec![addr], 1, Auth::Insecure);
        plan.connect_timeout = Duration::from_millis(500);
        let t = std::time::Instant::now();
        let err = connect_session(&plan, &hello(1)).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(4), "gave up on a silent peer: {err}");
    }
}
