//! TLS for sessions over networks nobody vouches for: mutual TLS 1.3 with
//! rustls, over every TCP stream of every session kind (memory migrations,
//! byte streams, the proxy), set up before pmigrate's own handshake.
//!
//! Both ends present a certificate and check the other's against one CA
//! (as a cluster's node agents do); the connecting end also checks that the
//! accepting end's certificate names the host it dialled (or the name it
//! was told to expect). Without TLS the protocol's xxh3 checks catch
//! accidents only (see `docs/protocol.md`, §12): with it, a peer without a
//! certificate of the CA cannot join a session, and nobody on the path can
//! read or alter what crosses.
//!
//! A [`TlsStream`] is read by one thread and written by another at the same
//! time, as the relay does with its streams: the rustls state sits behind a
//! lock held only to feed it received bytes, take plaintext out, or seal
//! records; the socket reads and writes themselves happen outside it.
//! Records leave in the order they were sealed because sealing and sending
//! happen under one more lock, the writers'. Shutting the write side sends
//! `close_notify` first, so the other end tells a finished stream from a
//! cut one. Servers issue no session tickets, so nothing but application
//! data follows the handshake.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig, ServerConnection};

use crate::net::DeadlineIo;

/// Size of the buffer ciphertext is read into before rustls takes it.
const RAW_READ: usize = 64 << 10;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {why}")]
    Pem {
        /// The file.
        path: String,
        /// What was wrong.
        why: String,
    },
    /// rustls refused the configuration (a key that does not fit its
    /// certificate, an unusable CA).
    #[error("TLS configuration: {0}")]
    Config(String),
    /// The name the peer's certificate must carry is not a DNS name or an
    /// IP address.
    #[error("{0:?} is not a DNS name or an IP address")]
    Name(String),
    /// The handshake failed (a certificate refused, the peer gone).
    #[error("TLS handshake: {0}")]
    Handshake(#[source] io::Error),
}

/// Mutual TLS settings of one end: its certificate and key, and the CA
/// its peers' certificates must chain to.
#[derive(Clone)]
pub struct TlsConfig {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    /// The name the accepting end's certificate must carry, when not the
    /// host dialled.
    pub peer_name: Option<String>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig").field("peer_name", &self.peer_name).finish_non_exhaustive()
    }
}

fn pem_err(path: &Path, why: impl std::fmt::Display) -> TlsError {
    TlsError::Pem { path: path.display().to_string(), why: why.to_string() }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(path, e))?;
    if certs.is_empty() {
        return Err(pem_err(path, "no certificate in the file"));
    }
    Ok(certs)
}

impl TlsConfig {
    /// Mutual TLS from PEM files: `cert` (this end's chain, leaf first),
    /// `key` (its private key) and `ca` (the certificates peers must chain
    /// to).
    pub fn from_pem_files(cert: &Path, key: &Path, ca: &Path) -> Result<Self, TlsError> {
        let chain = certs(cert)?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_err(key, e))?;
        let mut roots = RootCertStore::empty();
        for c in certs(ca)? {
            roots.add(c).map_err(|e| pem_err(ca, e))?;
        }
        Self::new(chain, key, roots)
    }

    /// Mutual TLS from parsed certificates.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: RootCertStore,
    ) -> Result<Self, TlsError> {
        let cfg = |e: rustls::Error| TlsError::Config(e.to_string());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = Arc::new(roots);
        let tls13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
        let client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(tls13)
            .map_err(cfg)?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(cfg)?;
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(tls13)
            .map_err(cfg)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(cfg)?;
        // Nothing but application data after the handshake.
        server.send_tls13_tickets = 0;
        Ok(TlsConfig { client: Arc::new(client), server: Arc::new(server), peer_name: None })
    }
}

/// One TCP stream under TLS, readable and writable from two threads at once.
pub struct TlsStream {
    sock: TcpStream,
    state: Mutex<Connection>,
    /// Held while records are sealed and sent, so they leave in order.
    writing: Mutex<()>,
    /// Ciphertext read from the socket before rustls takes it.
    raw: Mutex<RawBuf>,
    /// A deadline for reads as a whole (handshakes).
    read_deadline: Mutex<Option<Instant>>,
}

/// Ciphertext read, `buf[start..end]` not yet handed to rustls.
struct RawBuf {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream").field("sock", &self.sock).finish_non_exhaustive()
    }
}

impl TlsStream {
    /// The connecting end's handshake on `sock`, expecting the peer's
    /// certificate to carry `host` (unless `cfg.peer_name` says otherwise),
    /// all of it done by `deadline`.
    pub fn connect(sock: TcpStream, cfg: &TlsConfig, host: &str, deadline: Instant) -> Result<Self, TlsError> {
        let name = cfg.peer_name.as_deref().unwrap_or(host).to_string();
        let server_name = ServerName::try_from(name.clone()).map_err(|_| TlsError::Name(name))?;
        let conn = ClientConnection::new(cfg.client.clone(), server_name)
            .map_err(|e| TlsError::Handshake(io::Error::other(e)))?;
        Self::handshake(sock, conn.into(), deadline)
    }

    /// The accepting end's handshake on `sock`, done by `deadline`.
    pub fn accept(sock: TcpStream, cfg: &TlsConfig, deadline: Instant) -> Result<Self, TlsError> {
        let conn = ServerConnection::new(cfg.server.clone()).map_err(|e| TlsError::Handshake(io::Error::other(e)))?;
        Self::handshake(sock, conn.into(), deadline)
    }

    fn handshake(sock: TcpStream, mut conn: Connection, deadline: Instant) -> Result<Self, TlsError> {
        {
            // One deadline for the whole handshake, however the peer
            // spreads its bytes.
            let mut io = DeadlineIo { sock: &sock, deadline };
            while conn.is_handshaking() {
                conn.complete_io(&mut io).map_err(TlsError::Handshake)?;
            }
            // A client's last flight (its certificate and Finished) may
            // still be buffered.
            while conn.wants_write() {
                conn.write_tls(&mut io).map_err(TlsError::Handshake)?;
            }
        }
        sock.set_write_timeout(None).map_err(TlsError::Handshake)?;
        // Frames are sealed whole; rustls need not hold back plaintext.
        conn.set_buffer_limit(None);
        Ok(TlsStream {
            sock,
            state: Mutex::new(conn),
            writing: Mutex::new(()),
            raw: Mutex::new(RawBuf { buf: vec![0u8; RAW_READ].into_boxed_slice(), start: 0, end: 0 }),
            read_deadline: Mutex::new(None),
        })
    }

    /// Bounds every read from now on by `deadline` as a whole (`None`: the
    /// socket's read timeout alone), however the peer spreads its records.
    pub fn set_read_deadline(&self, deadline: Option<Instant>) {
        *self.read_deadline.lock().unwrap_or_else(|p| p.into_inner()) = deadline;
    }

    /// 32 bytes only the two ends of this connection can compute: the TLS
    /// exporter (RFC 8446 §7.5) for `label` and `context`.
    pub fn export(&self, label: &[u8], context: &[u8]) -> Result<[u8; 32], TlsError> {
        self.state()
            .export_keying_material([0u8; 32], label, Some(context))
            .map_err(|e| TlsError::Config(format!("TLS exporter: {e}")))
    }

    /// The TCP stream underneath.
    pub fn tcp(&self) -> &TcpStream {
        &self.sock
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends what rustls has sealed; the caller holds `writing`.
    fn send_sealed(&self) -> io::Result<()> {
        let mut out = Vec::new();
        {
            let mut c = self.state();
            while c.wants_write() {
                c.write_tls(&mut out)?;
            }
        }
        (&self.sock).write_all(&out)
    }

    fn read_plain(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut raw = self.raw.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let answer = {
                let mut c = self.state();
                match c.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if raw.start == raw.end {
                    None
                } else {
                    // Feed what rustls takes (a record's worth at most) and
                    // open it; the plaintext is read out above.
                    let RawBuf { buf: rb, start, end } = &mut *raw;
                    let took = c.read_tls(&mut &rb[*start..*end])?;
                    *start += took;
                    c.process_new_packets().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    Some(c.wants_write())
                }
            };
            match answer {
                Some(true) => {
                    // An alert or a key update to answer: sent in order with
                    // whatever the writer seals.
                    let _one = self.writing.lock().unwrap_or_else(|p| p.into_inner());
                    self.send_sealed()?;
                }
                Some(false) => {}
                None => {
                    // Nothing buffered: wait for ciphertext, without the
                    // rustls lock (a read timeout comes back as WouldBlock,
                    // as from the socket). End of stream is fed as such.
                    let deadline = *self.read_deadline.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(d) = deadline {
                        self.sock.set_read_timeout(Some(crate::net::left(d)?))?;
                    }
                    let n = (&self.sock).read(&mut raw.buf)?;
                    (raw.start, raw.end) = (0, n);
                    if n == 0 {
                        let mut c = self.state();
                        c.read_tls(&mut &[][..])?;
                        c.process_new_packets().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                        return c.reader().read(buf);
                    }
                }
            }
        }
    }

    /// Writes `buf` unless another thread is sealing or sending records
    /// right now (`None`: nothing written). For a last word on a stream
    /// being failed, which must not wait behind a blocked writer.
    pub fn try_write_all(&self, buf: &[u8]) -> Option<io::Result<()>> {
        let _one = self.writing.try_lock().ok()?;
        // Two statements: the rustls lock taken to seal must be let go
        // before `send_sealed` takes it again.
        let sealed = self.state().writer().write_all(buf);
        Some(sealed.and_then(|()| self.send_sealed()))
    }

    fn write_plain(&self, buf: &[u8]) -> io::Result<usize> {
        let _one = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        self.state().writer().write_all(buf)?;
        self.send_sealed()?;
        Ok(buf.len())
    }

    /// Shuts the stream down: the write side after `close_notify`, so the
    /// other end reads a clean end; both ways at once for an abort.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        if how == Shutdown::Write {
            let _one = self.writing.lock().unwrap_or_else(|p| p.into_inner());
            self.state().send_close_notify();
            self.send_sealed()?;
        }
        self.sock.shutdown(how)
    }
}

impl Read for &TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_plain(buf)
    }
}

impl Write for &TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_plain(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Certificates for tests: a CA, two end certificates it signed (`a`,
/// `b`, for "localhost" and 127.0.0.1) and a stranger's (`other`,
/// self-signed), as PEM files.
#[cfg(any(test, feature = "test-pki"))]
pub mod test_pki {
    use super::TlsConfig;
    use std::path::Path;

    /// Writes `ca.pem`, `a.pem`/`a.key`, `b.pem`/`b.key` and
    /// `other.pem`/`other.key` into `dir`.
    pub fn write_pki(dir: &Path) -> std::io::Result<()> {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        std::fs::create_dir_all(dir)?;
        let ca_key = KeyPair::generate().expect("key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("ca");
        std::fs::write(dir.join("ca.pem"), ca.pem())?;
        for name in ["a", "b"] {
            let key = KeyPair::generate().expect("key");
            let params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).expect("p");
            let cert = params.signed_by(&key, &ca, &ca_key).expect("cert");
            std::fs::write(dir.join(format!("{name}.pem")), cert.pem())?;
            std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem())?;
        }
        let other_key = KeyPair::generate().expect("key");
        let other =
            CertificateParams::new(vec!["localhost".to_string()]).expect("p").self_signed(&other_key).expect("c");
        std::fs::write(dir.join("other.pem"), other.pem())?;
        std::fs::write(dir.join("other.key"), other_key.serialize_pem())?;
        Ok(())
    }

    /// A fresh directory of test certificates for `test`.
    pub fn pki_dir(test: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("pm-tls-{}-{test}", std::process::id()));
        write_pki(&d).expect("writing test certificates");
        d
    }

    /// The settings of `who` (`a`, `b` or `other`) from `dir`.
    pub fn config(dir: &Path, who: &str) -> TlsConfig {
        let ca = if who == "other" { dir.join("other.pem") } else { dir.join("ca.pem") };
        TlsConfig::from_pem_files(&dir.join(format!("{who}.pem")), &dir.join(format!("{who}.key")), &ca).unwrap()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::test_pki::{config, pki_dir};
    use super::*;
    use std::net::TcpListener;

    fn pair(dir: &Path, client: &str, server: &str) -> (Result<TlsStream, TlsError>, Result<TlsStream, TlsError>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let scfg = config(dir, server);
        let srv = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            TlsStream::accept(s, &scfg, Instant::now() + std::time::Duration::from_secs(10))
        });
        let s = TcpStream::connect(addr).unwrap();
        let c = TlsStream::connect(
            s,
            &config(dir, client),
            "127.0.0.1",
            Instant::now() + std::time::Duration::from_secs(10),
        );
        (c, srv.join().unwrap())
    }

    #[test]
    fn both_ways_at_once_whole_and_half_closed() {
        let dir = pki_dir("duplex");
        let (c, s) = pair(&dir, "a", "b");
        let (c, s) = (Arc::new(c.unwrap()), Arc::new(s.unwrap()));
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 4096) as u8).collect();
        let (c2, s2, d2) = (c.clone(), s.clone(), data.clone());
        // Each end writes while it reads the other's bytes.
        let cw = std::thread::spawn(move || {
            for chunk in d2.chunks(262_184) {
                (&*c2).write_all(chunk).unwrap();
            }
            c2.shutdown(Shutdown::Write).unwrap();
        });
        let sw = std::thread::spawn(move || {
            (&*s2).write_all(b"the other way").unwrap();
            s2.shutdown(Shutdown::Write).unwrap();
        });
        let mut got = Vec::new();
        (&*s).read_to_end(&mut got).unwrap();
        let mut back = Vec::new();
        (&*c).read_to_end(&mut back).unwrap();
        cw.join().unwrap();
        sw.join().unwrap();
        assert!(got == data, "bytes differ");
        assert_eq!(back, b"the other way");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_peer_without_a_certificate_of_the_ca_is_refused() {
        let dir = pki_dir("refused");
        // A client of another CA: the server refuses it (and the client the server).
        let (c, s) = pair(&dir, "other", "b");
        assert!(c.is_err() || s.is_err(), "a stranger got through");
        assert!(matches!(s, Err(TlsError::Handshake(_))), "{s:?}");
        // A server of another CA: the client refuses it.
        let (c, _) = pair(&dir, "a", "other");
        assert!(matches!(c, Err(TlsError::Handshake(_))), "{c:?}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_cut_stream_is_not_a_clean_end() {
        let dir = pki_dir("cut");
        let (c, s) = pair(&dir, "a", "b");
        let (c, s) = (c.unwrap(), s.unwrap());
        (&c).write_all(b"partial").unwrap();
        c.tcp().shutdown(Shutdown::Both).unwrap(); // no close_notify
        let mut got = Vec::new();
        let err = (&s).read_to_end(&mut got).expect_err("truncation must be an error");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
        assert_eq!(got, b"partial");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_last_word_is_written_and_read() {
        let dir = pki_dir("lastword");
        let (c, s) = pair(&dir, "a", "b");
        let (c, s) = (c.unwrap(), s.unwrap());
        assert!(c.try_write_all(b"why it failed").expect("no writer busy").is_ok());
        c.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        (&s).read_to_end(&mut got).unwrap();
        assert_eq!(got, b"why it failed");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn bad_pem_files_are_clear_errors() {
        let dir = pki_dir("pem");
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let err = TlsConfig::from_pem_files(&junk, &dir.join("a.key"), &dir.join("ca.pem")).unwrap_err();
        assert!(err.to_string().contains("junk.pem"), "{err}");
        let err = TlsConfig::from_pem_files(&dir.join("a.pem"), &dir.join("b.key"), &dir.join("ca.pem")).unwrap_err();
        assert!(matches!(err, TlsError::Config(_)), "a key that is not the certificate's: {err}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
