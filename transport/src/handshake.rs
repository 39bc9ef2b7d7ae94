//! One connection's handshake, both ends: TLS when configured, the
//! authentication exchange ([`crate::auth`]), then the `Hello` of a joining
//! stream. The session-level rules (which session a stream joins, the
//! embedder's verdict on a `Hello`, `Welcome`) are the callers'.
//!
//! On the accepting end everything a peer sends before it has proved itself
//! is read into fixed buffers of a few dozen bytes, and the whole exchange
//! runs against one deadline ([`HANDSHAKE_TIMEOUT`] by default), not a
//! timeout per read: a peer dripping one byte a second holds a handshake
//! slot for that long and no longer.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::{
    fill_random, Auth, Challenge, Confirm, Offer, Proof, Purpose, SessionKey, Transcript, MAX_AUTH_LEN, NONCE_LEN,
    PROOF_LEN, TLS_EXPORTER_LABEL,
};
use crate::conn::Conn;
use crate::frame::{FrameHdr, FrameKind, HEADER_LEN};
use crate::hello::{ErrorCode, ErrorMsg, Hello, Welcome};
use crate::net::{left, tune_accepted, TransportError};
use crate::payload::build_control;
use crate::tls::TlsStream;

/// How long an accepted connection has, from accept to its last handshake
/// byte (TLS, authentication and `Hello`): a few round trips and a few KiB
/// on any network a migration runs over, with room for a loaded host.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why an accepted connection was refused, and the connection to tell
/// (none once TLS failed: nothing can reach the peer).
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) conn: Option<Conn>,
    /// Who was refused (known even when the connection is gone).
    pub(crate) peer: SocketAddr,
    pub(crate) code: ErrorCode,
    pub(crate) why: String,
}

impl Refusal {
    fn new(conn: Option<Conn>, peer: SocketAddr, code: ErrorCode, why: impl Into<String>) -> Self {
        Refusal { conn, peer, code, why: why.into() }
    }

    /// Sends the `Error` frame (bounded: the peer may not read) and closes.
    pub(crate) fn send(&self) {
        if let Some(c) = &self.conn {
            c.send_error(self.code, self.why.clone());
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A connection that proved itself (or belongs to an insecure end).
#[derive(Debug)]
pub(crate) struct Arrival {
    pub(crate) conn: Conn,
    pub(crate) peer: SocketAddr,
    pub(crate) offer: Offer,
    pub(crate) transcript: Transcript,
    /// `P_stream`, not yet checked: which session's secret it must match is
    /// the caller's to know.
    pub(crate) stream_proof: [u8; PROOF_LEN],
    /// Under TLS, the connection's exporter output (the session secret's
    /// base when this is a session's stream 0).
    pub(crate) tls_export: Option<[u8; 32]>,
    /// The joining stream's `Hello` (`Purpose::Join`), checked against the
    /// offer.
    pub(crate) hello: Option<Hello>,
}

impl Arrival {
    /// The session secret this connection founds (stream 0 of a session).
    pub(crate) fn session_key(&self, auth: &Auth) -> SessionKey {
        SessionKey::derive(auth, &self.transcript, self.tls_export.as_ref())
    }
}

fn frame(kind: FrameKind, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(HEADER_LEN + payload.len());
    build_control(&mut f, FrameHdr::new(kind), payload);
    f
}

/// Writes `bytes` whole by `deadline`.
fn write_by(conn: &Conn, bytes: &[u8], deadline: Instant, what: &str) -> Result<(), TransportError> {
    let io = |e| TransportError::io(format!("{what}: write"), e);
    conn.tcp().set_write_timeout(Some(left(deadline).map_err(io)?)).map_err(io)?;
    (&*conn).write_all(bytes).map_err(io)?;
    conn.tcp().set_write_timeout(None).map_err(io)
}

/// Fills `buf` by `deadline`; a close before it is full is an error.
fn read_by(conn: &Conn, buf: &mut [u8], deadline: Instant, what: &str) -> Result<(), TransportError> {
    let mut got = 0;
    while got < buf.len() {
        let t = left(deadline).map_err(|e| TransportError::io(format!("{what}: no answer in time"), e))?;
        conn.set_read_timeout(Some(t)).map_err(|e| TransportError::io(what.to_string(), e))?;
        match (&*conn).read(&mut buf[got..]) {
            Ok(0) => return Err(TransportError::Closed(format!("{what}: during the handshake"))),
            Ok(n) => got += n,
            Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock) => {}
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
            Err(e) => return Err(TransportError::io(format!("{what}: read"), e)),
        }
    }
    Ok(())
}

/// Reads one frame of `kind` whose payload is at most `buf.len()` bytes,
/// into `buf`; returns the payload's length. An `Error` frame from the peer
/// comes back as [`TransportError::Peer`]. Nothing is sized from the peer's
/// bytes: a longer frame is refused from its header alone.
fn read_frame_into(
    conn: &Conn,
    kind: FrameKind,
    buf: &mut [u8],
    deadline: Instant,
    what: &str,
) -> Result<usize, TransportError> {
    let mut hb = [0u8; HEADER_LEN];
    read_by(conn, &mut hb, deadline, what)?;
    let wire = |source| TransportError::Wire { what: what.to_string(), source };
    let hdr = FrameHdr::decode(&hb).map_err(wire)?;
    if hdr.kind == FrameKind::Error {
        let mut eb = [0u8; 4096];
        let p = &mut eb[..hdr.len as usize];
        read_by(conn, p, deadline, what)?;
        hdr.verify(p).map_err(wire)?;
        return Err(TransportError::Peer(ErrorMsg::decode(p).map_err(wire)?));
    }
    if hdr.kind == FrameKind::Hello && kind == FrameKind::Auth {
        return Err(TransportError::Setup(format!(
            "{what}: the peer speaks protocol 1 (no authentication); this end speaks {}",
            crate::hello::PROTOCOL_VERSION
        )));
    }
    if hdr.kind != kind {
        return Err(TransportError::Unexpected { what: what.to_string(), kind: hdr.kind });
    }
    let len = hdr.len as usize;
    if len > buf.len() {
        return Err(TransportError::Setup(format!("{what}: a {kind:?} frame of {len} bytes")));
    }
    read_by(conn, &mut buf[..len], deadline, what)?;
    hdr.verify(&buf[..len]).map_err(wire)?;
    Ok(len)
}

/// The accepting end of one connection: TLS (when configured), the
/// authentication exchange, and for a joining stream its `Hello`, all by
/// `deadline`.
pub(crate) fn answer(s: TcpStream, peer: SocketAddr, auth: &Auth, deadline: Instant) -> Result<Arrival, Refusal> {
    let _ = s.set_nonblocking(false);
    if let Err(e) = tune_accepted(&s) {
        return Err(Refusal::new(Some(Conn::Tcp(s)), peer, ErrorCode::Io, e.to_string()));
    }
    let conn = match auth.tls() {
        None => Conn::Tcp(s),
        Some(cfg) => match TlsStream::accept(s, cfg, deadline) {
            Ok(t) => {
                t.set_read_deadline(Some(deadline));
                Conn::Tls(Arc::new(t))
            }
            Err(e) => return Err(Refusal::new(None, peer, ErrorCode::Auth, e.to_string())),
        },
    };
    let res = exchange(&conn, auth, deadline);
    if let Conn::Tls(t) = &conn {
        t.set_read_deadline(None);
    }
    let _ = conn.set_read_timeout(None);
    match res {
        Ok((offer, transcript, stream_proof, hello)) => {
            let tls_export = match &conn {
                Conn::Tls(t) => match t.export(TLS_EXPORTER_LABEL, &offer.session) {
                    Ok(e) => Some(e),
                    Err(e) => return Err(Refusal::new(Some(conn), peer, ErrorCode::Io, e.to_string())),
                },
                Conn::Tcp(_) => None,
            };
            Ok(Arrival { conn, peer, offer, transcript, stream_proof, tls_export, hello })
        }
        Err((code, why)) => Err(Refusal::new(Some(conn), peer, code, why)),
    }
}

type Exchanged = (Offer, Transcript, [u8; PROOF_LEN], Option<Hello>);

fn exchange(conn: &Conn, auth: &Auth, deadline: Instant) -> Result<Exchanged, (ErrorCode, String)> {
    let proto = |e: TransportError| (ErrorCode::Protocol, e.to_string());
    let mut buf = [0u8; MAX_AUTH_LEN];
    let n = read_frame_into(conn, FrameKind::Auth, &mut buf, deadline, "handshake").map_err(proto)?;
    let offer = Offer::decode(&buf[..n]).map_err(|e| (ErrorCode::Protocol, e.to_string()))?;
    let mine = auth.method();
    let mut nonce = [0u8; NONCE_LEN];
    fill_random(&mut nonce).map_err(|e| (ErrorCode::Io, e.to_string()))?;
    let challenge = Challenge { method: mine, nonce };
    write_by(conn, &frame(FrameKind::Auth, &challenge.encode()), deadline, "handshake").map_err(proto)?;
    if offer.method != mine {
        return Err((
            ErrorCode::Auth,
            format!("this end requires {}, the peer offers {}", mine.describe(), offer.method.describe()),
        ));
    }
    let transcript = Transcript { offer: offer.encode(), challenge: challenge.encode() };
    let n = read_frame_into(conn, FrameKind::Auth, &mut buf, deadline, "handshake").map_err(proto)?;
    let proof = Proof::decode(&buf[..n]).map_err(|e| (ErrorCode::Protocol, e.to_string()))?;
    if !transcript.source_proof_ok(auth, &proof.connection) {
        return Err((ErrorCode::Auth, "authentication failed: the peer did not prove the key".into()));
    }
    let confirm = Confirm { proof: transcript.dest_proof(auth) };
    write_by(conn, &frame(FrameKind::Auth, &confirm.encode()), deadline, "handshake").map_err(proto)?;
    let hello = match offer.purpose {
        Purpose::Resume => None,
        Purpose::Join => {
            // The peer proved itself: its Hello may be as large as the
            // protocol allows.
            let mut hb = vec![0u8; 64 << 10];
            let n = read_frame_into(conn, FrameKind::Hello, &mut hb, deadline, "hello").map_err(proto)?;
            let h = Hello::decode(&hb[..n]).map_err(|e| (ErrorCode::Protocol, e.to_string()))?;
            if h.session != offer.session
                || h.mode != offer.mode
                || h.stream_index != offer.stream_index
                || h.stream_count != offer.stream_count
            {
                return Err((ErrorCode::Protocol, "the Hello disagrees with the authentication offer".into()));
            }
            Some(h)
        }
    };
    Ok((offer, transcript, proof.stream, hello))
}

/// A connection the source opened and authenticated.
#[derive(Debug)]
pub(crate) struct Dialed {
    pub(crate) conn: Conn,
    pub(crate) transcript: Transcript,
    pub(crate) tls_export: Option<[u8; 32]>,
}

/// What the source says about the connection it opens.
pub(crate) struct Dial<'a> {
    pub(crate) auth: &'a Auth,
    /// Where the TLS certificate's name comes from when no name is set.
    pub(crate) host: String,
    pub(crate) offer: Offer,
    /// The session's secret, for every stream but a session's first.
    pub(crate) key: Option<&'a SessionKey>,
    pub(crate) deadline: Instant,
    pub(crate) name: String,
}

/// The connecting end's exchange on `tcp` (TLS first when configured); the
/// destination must prove the key too.
pub(crate) fn dial(tcp: TcpStream, d: Dial<'_>) -> Result<Dialed, TransportError> {
    let Dial { auth, host, mut offer, key, deadline, name } = d;
    let conn = match auth.tls() {
        None => Conn::Tcp(tcp),
        Some(cfg) => {
            let t = TlsStream::connect(tcp, cfg, &host, deadline)
                .map_err(|e| TransportError::Setup(format!("{name}: {e}")))?;
            t.set_read_deadline(Some(deadline));
            Conn::Tls(Arc::new(t))
        }
    };
    fill_random(&mut offer.nonce).map_err(|e| TransportError::Setup(e.to_string()))?;
    offer.method = auth.method();
    write_by(&conn, &frame(FrameKind::Auth, &offer.encode()), deadline, &name)?;
    let mut buf = [0u8; MAX_AUTH_LEN];
    let n = read_frame_into(&conn, FrameKind::Auth, &mut buf, deadline, &name)?;
    let challenge =
        Challenge::decode(&buf[..n]).map_err(|source| TransportError::Wire { what: name.clone(), source })?;
    if challenge.method != auth.method() {
        return Err(TransportError::Auth(format!(
            "{name}: the destination uses {}, this end {}",
            challenge.method.describe(),
            auth.method().describe()
        )));
    }
    let transcript = Transcript { offer: offer.encode(), challenge: challenge.encode() };
    let proof = Proof {
        connection: transcript.source_proof(auth),
        stream: key.map_or([0u8; PROOF_LEN], |k| k.stream_proof(&transcript)),
    };
    write_by(&conn, &frame(FrameKind::Auth, &proof.encode()), deadline, &name)?;
    let n = read_frame_into(&conn, FrameKind::Auth, &mut buf, deadline, &name)?;
    let confirm = Confirm::decode(&buf[..n]).map_err(|source| TransportError::Wire { what: name.clone(), source })?;
    if !transcript.dest_proof_ok(auth, &confirm.proof) {
        return Err(TransportError::Auth(format!("{name}: the destination did not prove the key")));
    }
    let tls_export = match &conn {
        Conn::Tls(t) => {
            Some(t.export(TLS_EXPORTER_LABEL, &offer.session).map_err(|e| TransportError::Setup(e.to_string()))?)
        }
        Conn::Tcp(_) => None,
    };
    Ok(Dialed { conn, transcript, tls_export })
}

/// Sends a `Hello` on a dialed connection.
pub(crate) fn send_hello(conn: &Conn, hello: &Hello, deadline: Instant, name: &str) -> Result<(), TransportError> {
    write_by(conn, &frame(FrameKind::Hello, &hello.encode()), deadline, name)
}

/// Sends `Welcome` (bounded: the peer may not read).
pub(crate) fn send_welcome(conn: &Conn, session: [u8; 16], caps: u64) -> Result<(), TransportError> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    write_by(conn, &frame(FrameKind::Welcome, &Welcome { session, caps }.encode()), deadline, "welcome")
}

/// Reads the destination's `Welcome` by `deadline` and checks it.
pub(crate) fn read_welcome(
    conn: &Conn,
    session: [u8; 16],
    offered: u64,
    deadline: Instant,
    name: &str,
) -> Result<Welcome, TransportError> {
    let mut buf = [0u8; 64];
    let n = read_frame_into(conn, FrameKind::Welcome, &mut buf, deadline, name)?;
    let w = Welcome::decode(&buf[..n]).map_err(|source| TransportError::Wire { what: name.to_string(), source })?;
    if w.session != session {
        return Err(TransportError::Setup(format!("{name}: welcomed into another session")));
    }
    if w.caps & !offered != 0 {
        return Err(TransportError::Setup(format!(
            "{name}: the destination granted capabilities {:#x} that were not offered",
            w.caps & !offered
        )));
    }
    if let Conn::Tls(t) = conn {
        t.set_read_deadline(None);
    }
    conn.set_read_timeout(None).map_err(|e| TransportError::io(name.to_string(), e))?;
    Ok(w)
}
