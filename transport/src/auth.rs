//! Who may take part in a session, and how every connection proves it.
//!
//! Every connection of every session kind — memory, byte stream, proxy,
//! post-copy's priority stream, a stream coming back after a lost link —
//! opens with the same exchange, before the peer can make this end
//! allocate, open, map, connect or write anything for it (protocol §6.0):
//!
//! ```text
//!  source                                              destination
//!    |-- Auth Offer{method, purpose, session, stream, Nc} -->|  fixed size, read into a stack buffer
//!    |<------------------------- Auth Challenge{method, Nd} -|
//!    |-- Auth Proof{P_src, P_stream} ----------------------->|  P_src checked in constant time
//!    |<--------------------------------- Auth Confirm{P_dst} -|  the source checks P_dst
//! ```
//!
//! - **Pre-shared key** ([`Auth::Psk`]): `P_src = HMAC(K, "source" ‖ offer ‖
//!   challenge)`, `P_dst` the same with `"destination"`, HMAC-SHA256 over the
//!   exact bytes of both messages, so each proof is bound to both ends' fresh
//!   nonces, the session id, the stream index and the purpose. A stranger
//!   without the key can neither pass nor replay a proof.
//! - **Mutual TLS** ([`Auth::Tls`]): the certificates, checked by the TLS
//!   handshake that runs before the offer, prove the peers; the proofs are
//!   then computed with an all-zero key and prove nothing more.
//! - **Insecure** ([`Auth::Insecure`]): no proof at all (all-zero key). Only
//!   when the operator asked for it.
//!
//! Each end checks that the other uses its own method: a source with a key
//! does not talk to a destination that asks for none.
//!
//! **The session's secret.** Stream 0's exchange also derives a secret only
//! the two ends know ([`SessionKey`]): from the key (PSK), from the TLS
//! connection's exporter (TLS), or from nothing (insecure). Every later
//! stream of the session, and every stream that comes back after a lost
//! link, proves it (`P_stream`), so knowing a session's id — which crosses
//! in clear without TLS — is never enough to join or take over a stream.
//!
//! Secrets never reach a log, are compared in constant time, and a key file
//! that other users can read is refused, as OpenSSH refuses a private key.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ring::hmac;

use crate::frame::WireError;
use crate::hello::{Cursor, Mode, MAGIC, PROTOCOL_VERSION};
use crate::tls::TlsConfig;

/// Shortest pre-shared key accepted: 32 bytes (256 bits).
pub const MIN_KEY_LEN: usize = 32;
/// Longest key file read: anything longer is not a key.
pub const MAX_KEY_LEN: usize = 4096;
/// Length of each end's fresh nonce.
pub const NONCE_LEN: usize = 32;
/// Length of a proof (HMAC-SHA256).
pub const PROOF_LEN: usize = 32;

/// Why a key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Users other than the owner can read or write the key file.
    #[error(
        "{path}: permissions {mode:04o} are too open: a pre-shared key must not be accessible by group or others \
         (chmod 600 it)"
    )]
    TooOpen {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key is too short or too long.
    #[error("{what}: {len} bytes; a pre-shared key is {MIN_KEY_LEN} to {MAX_KEY_LEN} bytes of secret")]
    Length {
        /// Where it came from.
        what: String,
        /// Its length.
        len: usize,
    },
    /// The system's random source failed.
    #[error("no randomness from the system")]
    Random,
}

/// A pre-shared key. Its bytes never appear in `Debug` output or logs.
#[derive(Clone)]
pub struct Psk(Arc<[u8]>);

impl fmt::Debug for Psk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Psk({} bytes)", self.0.len())
    }
}

impl Psk {
    /// A key from its bytes (at least [`MIN_KEY_LEN`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        if !(MIN_KEY_LEN..=MAX_KEY_LEN).contains(&bytes.len()) {
            return Err(KeyError::Length { what: "the key".into(), len: bytes.len() });
        }
        Ok(Psk(bytes.into()))
    }

    /// Reads a key file: its bytes, whatever they are, are the key. The
    /// file must not be readable or writable by group or others.
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        use std::os::unix::fs::PermissionsExt;
        let read = |source| KeyError::Read { path: path.to_path_buf(), source };
        let f = std::fs::File::open(path).map_err(read)?;
        // The permissions of the file opened, not of whatever the path
        // names a moment later.
        let mode = f.metadata().map_err(read)?.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::TooOpen { path: path.to_path_buf(), mode });
        }
        let mut bytes = Vec::with_capacity(64);
        f.take(MAX_KEY_LEN as u64 + 1).read_to_end(&mut bytes).map_err(read)?;
        let key = Psk::from_bytes(&bytes).map_err(|e| match e {
            KeyError::Length { len, .. } => KeyError::Length { what: path.display().to_string(), len },
            e => e,
        });
        bytes.iter_mut().for_each(|b| *b = 0);
        key
    }

    /// A fresh random key of [`MIN_KEY_LEN`] bytes.
    pub fn generate() -> Result<Self, KeyError> {
        let mut b = [0u8; MIN_KEY_LEN];
        fill_random(&mut b)?;
        let k = Psk::from_bytes(&b);
        b.iter_mut().for_each(|x| *x = 0);
        k
    }

    /// Writes a fresh key to a new file `path`, readable by its owner only
    /// (mode 0600; a missing directory is made, mode 0700); an existing
    /// file is left alone and refused.
    pub fn write_new_file(path: &Path) -> Result<(), KeyError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let key = Psk::generate()?;
        let write = |source| KeyError::Read { path: path.to_path_buf(), source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(write)?;
        }
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(write)?;
        f.write_all(&key.0).map_err(write)?;
        f.sync_all().map_err(write)
    }

    fn hmac_key(&self) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, &self.0)
    }
}

/// Fills `buf` from the system's random source.
pub fn fill_random(buf: &mut [u8]) -> Result<(), KeyError> {
    use ring::rand::SecureRandom;
    ring::rand::SystemRandom::new().fill(buf).map_err(|_| KeyError::Random)
}

/// How the two ends of every connection prove who they are. There is no
/// default: an embedder chooses, and [`Auth::Insecure`] says so plainly.
#[derive(Clone, Debug)]
pub enum Auth {
    /// No authentication: anyone who reaches the port may take part. For a
    /// network nobody else can reach, or tests.
    Insecure,
    /// A pre-shared key both ends hold.
    Psk(Psk),
    /// Mutual TLS 1.3 over every stream; the certificates prove the peers.
    Tls(Arc<TlsConfig>),
}

impl Auth {
    /// The method the handshake names.
    pub fn method(&self) -> Method {
        match self {
            Auth::Insecure => Method::Insecure,
            Auth::Psk(_) => Method::Psk,
            Auth::Tls(_) => Method::Tls,
        }
    }

    /// The TLS settings, under TLS.
    pub fn tls(&self) -> Option<&Arc<TlsConfig>> {
        match self {
            Auth::Tls(t) => Some(t),
            _ => None,
        }
    }

    /// The key connection proofs are made with: the PSK, or all zero.
    fn connection_key(&self) -> hmac::Key {
        match self {
            Auth::Psk(k) => k.hmac_key(),
            Auth::Insecure | Auth::Tls(_) => hmac::Key::new(hmac::HMAC_SHA256, &[0u8; 32]),
        }
    }
}

/// How a connection is authenticated, as the handshake names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Method {
    /// No authentication (`--insecure`).
    Insecure = 0,
    /// Pre-shared key (`--psk-file`).
    Psk = 1,
    /// Mutual TLS (`--tls-cert/--tls-key/--tls-ca`).
    Tls = 2,
}

impl Method {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Method::Insecure,
            1 => Method::Psk,
            2 => Method::Tls,
            _ => return None,
        })
    }

    /// What an operator calls it.
    pub fn describe(self) -> &'static str {
        match self {
            Method::Insecure => "no authentication (--insecure)",
            Method::Psk => "a pre-shared key (--psk-file)",
            Method::Tls => "mutual TLS (--tls-*)",
        }
    }
}

/// Why a connection is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Purpose {
    /// A stream of a new session; a `Hello` follows the exchange.
    Join = 1,
    /// A stream of a running session coming back after a lost connection
    /// (post-copy); `Welcome` follows at once.
    Resume = 2,
}

/// Step numbers of `Auth` frames (first payload byte after the offer's
/// magic and version).
const STEP_OFFER: u8 = 1;
const STEP_CHALLENGE: u8 = 2;
const STEP_PROOF: u8 = 3;
const STEP_CONFIRM: u8 = 4;

/// The first frame of every connection, source → destination.
///
/// ```text
///  0  magic         [u8; 8]  b"PMIGRATE"
///  8  version       u16      PROTOCOL_VERSION
/// 10  step          u8       1
/// 11  method        u8       Method
/// 12  purpose       u8       Purpose
/// 13  mode          u8       Mode
/// 14  stream_index  u16
/// 16  stream_count  u16      1..=MAX_STREAMS
/// 18  reserved      [u8; 6]  0
/// 24  session       [u8; 16]
/// 40  nonce         [u8; 32]
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offer {
    /// How the source authenticates.
    pub method: Method,
    /// New stream or comeback.
    pub purpose: Purpose,
    /// The session's mode.
    pub mode: Mode,
    /// Which stream this connection is.
    pub stream_index: u16,
    /// How many the session has.
    pub stream_count: u16,
    /// The session id.
    pub session: [u8; 16],
    /// The source's fresh nonce.
    pub nonce: [u8; NONCE_LEN],
}

/// Payload length of an [`Offer`].
pub const OFFER_LEN: usize = 72;
/// Payload length of a [`Challenge`].
pub const CHALLENGE_LEN: usize = 40;
/// Payload length of a [`Proof`].
pub const PROOF_MSG_LEN: usize = 72;
/// Payload length of a [`Confirm`].
pub const CONFIRM_LEN: usize = 40;
/// The largest `Auth` payload.
pub const MAX_AUTH_LEN: usize = 72;

const _: () = assert!(OFFER_LEN <= MAX_AUTH_LEN && PROOF_MSG_LEN <= MAX_AUTH_LEN);

fn bad(what: &'static str, why: impl Into<String>) -> WireError {
    WireError::BadPayload { what, why: why.into() }
}

impl Offer {
    /// Encodes the payload.
    pub fn encode(&self) -> [u8; OFFER_LEN] {
        let mut b = [0u8; OFFER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        b[10] = STEP_OFFER;
        b[11] = self.method as u8;
        b[12] = self.purpose as u8;
        b[13] = self.mode as u8;
        b[14..16].copy_from_slice(&self.stream_index.to_le_bytes());
        b[16..18].copy_from_slice(&self.stream_count.to_le_bytes());
        b[24..40].copy_from_slice(&self.session);
        b[40..72].copy_from_slice(&self.nonce);
        b
    }

    /// Decodes and checks a payload.
    pub fn decode(p: &[u8]) -> Result<Self, WireError> {
        let mut c = Cursor::new(p, "auth offer");
        if c.bytes(8)? != MAGIC {
            return Err(bad("auth offer", "not a pmigrate peer (bad magic)"));
        }
        let version = c.u16()?;
        if version != PROTOCOL_VERSION {
            return Err(bad("auth offer", format!("protocol version {version}, this end speaks {PROTOCOL_VERSION}")));
        }
        if c.u8()? != STEP_OFFER {
            return Err(bad("auth offer", "not an offer"));
        }
        let m = c.u8()?;
        let method = Method::from_u8(m).ok_or_else(|| bad("auth offer", format!("unknown method {m}")))?;
        let purpose = match c.u8()? {
            1 => Purpose::Join,
            2 => Purpose::Resume,
            x => return Err(bad("auth offer", format!("unknown purpose {x}"))),
        };
        let mode = match c.u8()? {
            1 => Mode::Memory,
            2 => Mode::Stream,
            x => return Err(bad("auth offer", format!("unknown mode {x}"))),
        };
        let stream_index = c.u16()?;
        let stream_count = c.u16()?;
        if stream_count == 0 || stream_count > crate::hello::MAX_STREAMS || stream_index >= stream_count {
            return Err(bad("auth offer", format!("stream {stream_index} of {stream_count}")));
        }
        if c.bytes(6)?.iter().any(|&b| b != 0) {
            return Err(bad("auth offer", "reserved bytes set"));
        }
        let mut session = [0u8; 16];
        session.copy_from_slice(c.bytes(16)?);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(c.bytes(NONCE_LEN)?);
        c.finish()?;
        Ok(Offer { method, purpose, mode, stream_index, stream_count, session, nonce })
    }
}

/// The destination's answer to an [`Offer`]: its method and fresh nonce.
///
/// ```text
///  0  step      u8       2
///  1  method    u8       Method
///  2  reserved  [u8; 6]  0
///  8  nonce     [u8; 32]
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    /// How the destination authenticates.
    pub method: Method,
    /// Its fresh nonce.
    pub nonce: [u8; NONCE_LEN],
}

impl Challenge {
    /// Encodes the payload.
    pub fn encode(&self) -> [u8; CHALLENGE_LEN] {
        let mut b = [0u8; CHALLENGE_LEN];
        b[0] = STEP_CHALLENGE;
        b[1] = self.method as u8;
        b[8..40].copy_from_slice(&self.nonce);
        b
    }

    /// Decodes and checks a payload.
    pub fn decode(p: &[u8]) -> Result<Self, WireError> {
        let mut c = Cursor::new(p, "auth challenge");
        if c.u8()? != STEP_CHALLENGE {
            return Err(bad("auth challenge", "not a challenge"));
        }
        let m = c.u8()?;
        let method = Method::from_u8(m).ok_or_else(|| bad("auth challenge", format!("unknown method {m}")))?;
        if c.bytes(6)?.iter().any(|&b| b != 0) {
            return Err(bad("auth challenge", "reserved bytes set"));
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(c.bytes(NONCE_LEN)?);
        c.finish()?;
        Ok(Challenge { method, nonce })
    }
}

/// The source's proofs.
///
/// ```text
///  0  step        u8       3
///  1  reserved    [u8; 7]  0
///  8  connection  [u8; 32] P_src: the source holds the key
/// 40  stream      [u8; 32] P_stream: the source holds the session's
///                          secret (zero on a session's first stream)
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proof {
    /// `P_src`.
    pub connection: [u8; PROOF_LEN],
    /// `P_stream`.
    pub stream: [u8; PROOF_LEN],
}

impl Proof {
    /// Encodes the payload.
    pub fn encode(&self) -> [u8; PROOF_MSG_LEN] {
        let mut b = [0u8; PROOF_MSG_LEN];
        b[0] = STEP_PROOF;
        b[8..40].copy_from_slice(&self.connection);
        b[40..72].copy_from_slice(&self.stream);
        b
    }

    /// Decodes and checks a payload.
    pub fn decode(p: &[u8]) -> Result<Self, WireError> {
        let mut c = Cursor::new(p, "auth proof");
        if c.u8()? != STEP_PROOF {
            return Err(bad("auth proof", "not a proof"));
        }
        if c.bytes(7)?.iter().any(|&b| b != 0) {
            return Err(bad("auth proof", "reserved bytes set"));
        }
        let mut connection = [0u8; PROOF_LEN];
        connection.copy_from_slice(c.bytes(PROOF_LEN)?);
        let mut stream = [0u8; PROOF_LEN];
        stream.copy_from_slice(c.bytes(PROOF_LEN)?);
        c.finish()?;
        Ok(Proof { connection, stream })
    }
}

/// The destination's proof, `P_dst`.
///
/// ```text
///  0  step      u8       4
///  1  reserved  [u8; 7]  0
///  8  proof     [u8; 32]
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Confirm {
    /// `P_dst`.
    pub proof: [u8; PROOF_LEN],
}

impl Confirm {
    /// Encodes the payload.
    pub fn encode(&self) -> [u8; CONFIRM_LEN] {
        let mut b = [0u8; CONFIRM_LEN];
        b[0] = STEP_CONFIRM;
        b[8..40].copy_from_slice(&self.proof);
        b
    }

    /// Decodes and checks a payload.
    pub fn decode(p: &[u8]) -> Result<Self, WireError> {
        let mut c = Cursor::new(p, "auth confirm");
        if c.u8()? != STEP_CONFIRM {
            return Err(bad("auth confirm", "not a confirmation"));
        }
        if c.bytes(7)?.iter().any(|&b| b != 0) {
            return Err(bad("auth confirm", "reserved bytes set"));
        }
        let mut proof = [0u8; PROOF_LEN];
        proof.copy_from_slice(c.bytes(PROOF_LEN)?);
        c.finish()?;
        Ok(Confirm { proof })
    }
}

/// The exact bytes both ends exchanged on one connection: what every proof
/// of that connection is bound to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transcript {
    /// The offer's payload.
    pub offer: [u8; OFFER_LEN],
    /// The challenge's payload.
    pub challenge: [u8; CHALLENGE_LEN],
}

const LABEL_SOURCE: &[u8] = b"pmigrate/2 source proof";
const LABEL_DEST: &[u8] = b"pmigrate/2 destination proof";
const LABEL_SESSION: &[u8] = b"pmigrate/2 session secret";
const LABEL_STREAM: &[u8] = b"pmigrate/2 stream proof";
/// The TLS exporter label of the session secret (RFC 8446 §7.5).
pub const TLS_EXPORTER_LABEL: &[u8] = b"EXPORTER-pmigrate/2 session";

fn tag(key: &hmac::Key, label: &[u8], t: &Transcript) -> [u8; PROOF_LEN] {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(label);
    ctx.update(&t.offer);
    ctx.update(&t.challenge);
    let mut out = [0u8; PROOF_LEN];
    out.copy_from_slice(ctx.sign().as_ref());
    out
}

fn check(key: &hmac::Key, label: &[u8], t: &Transcript, proof: &[u8; PROOF_LEN]) -> bool {
    let mut msg = Vec::with_capacity(label.len() + OFFER_LEN + CHALLENGE_LEN);
    msg.extend_from_slice(label);
    msg.extend_from_slice(&t.offer);
    msg.extend_from_slice(&t.challenge);
    // ring compares the tags in constant time.
    hmac::verify(key, &msg, proof).is_ok()
}

impl Transcript {
    /// `P_src` under `auth`.
    pub fn source_proof(&self, auth: &Auth) -> [u8; PROOF_LEN] {
        tag(&auth.connection_key(), LABEL_SOURCE, self)
    }

    /// `P_dst` under `auth`.
    pub fn dest_proof(&self, auth: &Auth) -> [u8; PROOF_LEN] {
        tag(&auth.connection_key(), LABEL_DEST, self)
    }

    /// Whether `proof` is `P_src` under `auth` (constant time).
    pub fn source_proof_ok(&self, auth: &Auth, proof: &[u8; PROOF_LEN]) -> bool {
        check(&auth.connection_key(), LABEL_SOURCE, self, proof)
    }

    /// Whether `proof` is `P_dst` under `auth` (constant time).
    pub fn dest_proof_ok(&self, auth: &Auth, proof: &[u8; PROOF_LEN]) -> bool {
        check(&auth.connection_key(), LABEL_DEST, self, proof)
    }
}

/// A session's secret, known to its two ends only (see the module docs).
/// Never printed.
#[derive(Clone)]
pub struct SessionKey(hmac::Key);

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionKey(..)")
    }
}

impl SessionKey {
    /// Derives the secret from stream 0's exchange: with the PSK, or under
    /// TLS with `tls_export` (the stream-0 connection's exporter output for
    /// [`TLS_EXPORTER_LABEL`]), or from nothing secret when insecure.
    pub fn derive(auth: &Auth, stream0: &Transcript, tls_export: Option<&[u8; 32]>) -> Self {
        let base = match (auth, tls_export) {
            (Auth::Psk(k), _) => k.hmac_key(),
            (Auth::Tls(_), Some(e)) => hmac::Key::new(hmac::HMAC_SHA256, e),
            _ => hmac::Key::new(hmac::HMAC_SHA256, &[0u8; 32]),
        };
        let secret = tag(&base, LABEL_SESSION, stream0);
        SessionKey(hmac::Key::new(hmac::HMAC_SHA256, &secret))
    }

    /// `P_stream` for a connection of the session.
    pub fn stream_proof(&self, t: &Transcript) -> [u8; PROOF_LEN] {
        tag(&self.0, LABEL_STREAM, t)
    }

    /// Whether `proof` is `P_stream` for the connection (constant time).
    pub fn stream_proof_ok(&self, t: &Transcript, proof: &[u8; PROOF_LEN]) -> bool {
        check(&self.0, LABEL_STREAM, t, proof)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn offer() -> Offer {
        Offer {
            method: Method::Psk,
            purpose: Purpose::Join,
            mode: Mode::Memory,
            stream_index: 2,
            stream_count: 4,
            session: [9; 16],
            nonce: [3; NONCE_LEN],
        }
    }

    fn transcript(nonce: u8) -> Transcript {
        Transcript {
            offer: Offer { nonce: [nonce; NONCE_LEN], ..offer() }.encode(),
            challenge: Challenge { method: Method::Psk, nonce: [5; NONCE_LEN] }.encode(),
        }
    }

    fn psk(b: u8) -> Auth {
        Auth::Psk(Psk::from_bytes(&[b; 32]).unwrap())
    }

    #[test]
    fn messages_round_trip() {
        let o = offer();
        assert_eq!(Offer::decode(&o.encode()).unwrap(), o);
        let c = Challenge { method: Method::Tls, nonce: [1; NONCE_LEN] };
        assert_eq!(Challenge::decode(&c.encode()).unwrap(), c);
        let p = Proof { connection: [2; 32], stream: [4; 32] };
        assert_eq!(Proof::decode(&p.encode()).unwrap(), p);
        let f = Confirm { proof: [6; 32] };
        assert_eq!(Confirm::decode(&f.encode()).unwrap(), f);
    }

    #[test]
    fn bad_offers_are_refused() {
        let mut b = offer().encode();
        b[8] = 1;
        assert!(Offer::decode(&b).unwrap_err().to_string().contains("version 1"));
        let mut b = offer().encode();
        b[11] = 9;
        assert!(Offer::decode(&b).is_err(), "method");
        let mut b = offer().encode();
        b[14] = 4;
        assert!(Offer::decode(&b).is_err(), "index beyond count");
        let mut b = offer().encode();
        b[20] = 1;
        assert!(Offer::decode(&b).is_err(), "reserved");
        assert!(Offer::decode(&offer().encode()[..71]).is_err(), "short");
    }

    #[test]
    fn proofs_need_the_key_and_are_bound_to_the_exchange() {
        let (a, b) = (psk(1), psk(2));
        let t = transcript(7);
        let p = t.source_proof(&a);
        assert!(t.source_proof_ok(&a, &p));
        assert!(!t.source_proof_ok(&b, &p), "another key");
        assert!(!t.dest_proof_ok(&a, &p), "a source proof is not a destination proof (no reflection)");
        assert!(!transcript(8).source_proof_ok(&a, &p), "another nonce: no replay");
        let s = SessionKey::derive(&a, &t, None);
        let sp = s.stream_proof(&transcript(11));
        assert!(s.stream_proof_ok(&transcript(11), &sp));
        assert!(!SessionKey::derive(&a, &transcript(8), None).stream_proof_ok(&transcript(11), &sp), "other session");
        assert!(!SessionKey::derive(&b, &t, None).stream_proof_ok(&transcript(11), &sp), "other key");
    }

    #[test]
    fn key_files_are_checked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("pm-psk-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let k = dir.join("k");
        Psk::write_new_file(&k).unwrap();
        assert_eq!(std::fs::metadata(&k).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read(&k).unwrap().len(), MIN_KEY_LEN);
        Psk::from_file(&k).unwrap();
        assert!(Psk::write_new_file(&k).is_err(), "an existing file is never overwritten");
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = Psk::from_file(&k).unwrap_err();
        assert!(matches!(e, KeyError::TooOpen { mode: 0o640, .. }), "{e}");
        let short = dir.join("short");
        std::fs::write(&short, b"too short").unwrap();
        std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(Psk::from_file(&short), Err(KeyError::Length { len: 9, .. })));
        assert!(format!("{:?}", Psk::from_file(&k.with_extension("x"))).contains("No such file"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn secrets_are_not_printed() {
        let k = Psk::from_bytes(b"0123456789abcdef0123456789abcdef").unwrap();
        assert_eq!(format!("{k:?}"), "Psk(32 bytes)");
        assert!(!format!("{:?}", Auth::Psk(k)).contains("0123"));
    }

    proptest! {
        #[test]
        fn random_payloads_never_panic(b in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = Offer::decode(&b);
            let _ = Challenge::decode(&b);
            let _ = Proof::decode(&b);
            let _ = Confirm::decode(&b);
        }
    }
}
