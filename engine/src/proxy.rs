//! The socket proxy: carries whole connections — QEMU's migration
//! channels, libvirt's RPC, NBD — between two hosts over pmigrate's
//! streams.
//!
//! ```text
//!  source host                                              destination host
//!  QEMU ── unix:/P ──► entry ══ N TCP streams a connection ══► exit ── unix:/P ──► QEMU
//!        (connects)   (listens)     (striped, checked, lz4)   (connects to target)   (listens)
//! ```
//!
//! The **entry** ([`run_entry`]) listens on local endpoints (unix paths or
//! TCP addresses). Each connection it accepts becomes one full-duplex
//! byte-stream session (`CAP_DUPLEX`) to the exit, naming the index of the
//! listener it came by (`EXT_TARGET`). The **exit** ([`run_exit`]) serves
//! sessions and connects each to its configured target of that index —
//! the peer names an index, never an address.
//!
//! **Order.** Connections are opened one at a time in the order they were
//! accepted: the entry opens the next session only once the exit welcomed
//! the previous one, which it does only after its connect to the target
//! returned. QEMU 7.2 takes the first connection it accepts as the main
//! migration channel and later ones as multifd channels; the kernel queues
//! connections to a listener in order, so QEMU at the destination accepts
//! them in the order QEMU at the source made them.
//!
//! **Half-close and failure.** Each direction ends on its own: when one
//! side's peer shuts down its writing, the other side's peer reads the end
//! of stream after the last byte, and may still answer. Any failure of a
//! session — a stream cut, a corrupted chunk, a peer gone — shuts down the
//! local connections at both ends (a TCP one with a reset), so both QEMUs
//! see the migration fail rather than a clean end.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pmigrate_transport::hello::{
    decode_target, ErrorCode, ErrorMsg, Hello, Mode, CAP_DUPLEX, CAP_LZ4, CAP_RESUME, EXT_TARGET,
};
use pmigrate_transport::net::tune_accepted;
use pmigrate_transport::{Accepted, Acceptor, SessionHandler, TransportError};

use crate::relay::{self, Carry, Comeback, Local, RelayRecvOptions, RelaySendConfig};
use crate::MigrateError;

/// A local endpoint: `unix:/path` (or a bare absolute path) or
/// `tcp:host:port` (or a bare `host:port`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix stream socket.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(SocketAddr),
}

/// Why a text does not name an [`Endpoint`].
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// A unix socket path that is not absolute.
    #[error("{input:?}: a unix socket path must be absolute")]
    Relative {
        /// The text.
        input: String,
    },
    /// The address did not resolve.
    #[error("{input:?}: {source}")]
    Resolve {
        /// The text.
        input: String,
        /// The resolver's error.
        source: std::io::Error,
    },
    /// The address resolved to nothing.
    #[error("{input:?} names no address")]
    NoAddress {
        /// The text.
        input: String,
    },
}

impl std::str::FromStr for Endpoint {
    type Err = EndpointError;

    fn from_str(s: &str) -> Result<Self, EndpointError> {
        use std::net::ToSocketAddrs;
        let input = || s.to_string();
        // libvirt's spelling of a unix URI is `unix:///path`.
        let path = s.strip_prefix("unix://").or_else(|| s.strip_prefix("unix:"));
        if let Some(p) = path.or_else(|| s.starts_with('/').then_some(s)) {
            if !p.starts_with('/') {
                return Err(EndpointError::Relative { input: input() });
            }
            return Ok(Endpoint::Unix(PathBuf::from(p)));
        }
        let a = s.strip_prefix("tcp:").unwrap_or(s);
        let addr = a.to_socket_addrs().map_err(|source| EndpointError::Resolve { input: input(), source })?.next();
        addr.map(Endpoint::Tcp).ok_or_else(|| EndpointError::NoAddress { input: input() })
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// A listening endpoint.
enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

/// Who may connect to the entry's unix sockets: their mode and group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketAccess {
    /// Permission bits (connecting needs write permission).
    pub mode: u32,
    /// Group owning the socket, when not the process's.
    pub group: Option<u32>,
}

impl Default for SocketAccess {
    /// Owner only: local users the operator did not name cannot inject
    /// connections into a migration.
    fn default() -> Self {
        SocketAccess { mode: 0o600, group: None }
    }
}

impl Listener {
    fn bind(e: &Endpoint, access: SocketAccess) -> Result<Self, TransportError> {
        let l = match e {
            Endpoint::Unix(p) => {
                let io = |what: &str, e| TransportError::io(format!("{what} {}", p.display()), e);
                // The directory (libvirt's /run/pmigrate, say) may not exist yet.
                if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| io("create the directory of", e))?;
                }
                // A socket left by an earlier run would make bind fail; a
                // live listener behind it answers, and is left alone.
                if std::fs::symlink_metadata(p).is_ok_and(|m| is_socket(&m)) && UnixStream::connect(p).is_err() {
                    let _ = std::fs::remove_file(p);
                }
                let l = UnixListener::bind(p).map_err(|e| io("listen on", e))?;
                {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(p, std::fs::Permissions::from_mode(access.mode))
                        .map_err(|e| io("set the mode of", e))?;
                    if let Some(gid) = access.group {
                        std::os::unix::fs::chown(p, None, Some(gid)).map_err(|e| io("set the group of", e))?;
                    }
                }
                Listener::Unix(l, p.clone())
            }
            Endpoint::Tcp(a) => Listener::Tcp(pmigrate_transport::net::listen(*a)?),
        };
        match &l {
            Listener::Unix(u, _) => u.set_nonblocking(true),
            Listener::Tcp(t) => t.set_nonblocking(true),
        }
        .map_err(|e| TransportError::io("listener", e))?;
        Ok(l)
    }

    /// A connection waiting to be accepted, as a relay's local side.
    fn accept(&self) -> std::io::Result<Option<Local>> {
        let res = match self {
            Listener::Unix(l, _) => l.accept().map(|(s, _)| s).and_then(|s| {
                s.set_nonblocking(false)?;
                Local::unix(s)
            }),
            Listener::Tcp(l) => l.accept().map(|(s, _)| s).and_then(|s| {
                s.set_nonblocking(false)?;
                let _ = tune_accepted(&s);
                Local::tcp(s)
            }),
        };
        match res {
            Ok(l) => Ok(Some(l)),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn is_socket(m: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::FileTypeExt;
    m.file_type().is_socket()
}

/// The entry side of the proxy.
#[derive(Clone, Debug)]
pub struct EntryConfig {
    /// Local endpoints to listen on; a connection by the `i`-th goes to the
    /// exit's `i`-th target.
    pub listen: Vec<Endpoint>,
    /// Streams, NICs, threads and lz4 of each connection's session.
    pub relay: RelaySendConfig,
    /// Mode and group of the unix sockets listened on.
    pub access: SocketAccess,
}

/// What one side of the proxy carried, counted when it stopped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Connections carried to their end.
    pub done: u64,
    /// Connections opened that failed (cut, refused by the other side,
    /// their target unreachable).
    pub failed: u64,
}

/// The counters behind a [`Tally`], shared by a side's session threads.
#[derive(Default)]
struct Counts {
    done: AtomicU64,
    failed: AtomicU64,
}

impl Counts {
    fn done(&self, name: &str, report: &dyn std::fmt::Display) {
        self.done.fetch_add(1, Ordering::Relaxed);
        tracing::info!(connection = name, %report, "connection done");
    }

    fn failed(&self, name: &str, why: &dyn std::fmt::Display) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(connection = name, reason = %why, "connection failed");
    }

    fn tally(&self) -> Tally {
        Tally { done: self.done.load(Ordering::Relaxed), failed: self.failed.load(Ordering::Relaxed) }
    }
}

/// Listens on `cfg.listen` and carries every accepted connection to the
/// exit, until `stop` is set; returns once every carried connection ended,
/// with their count. Logs (`tracing`) once each endpoint listens and for
/// each connection opened and ended.
pub fn run_entry(cfg: &EntryConfig, stop: &AtomicBool) -> Result<Tally, MigrateError> {
    let listeners = cfg.listen.iter().map(|e| Listener::bind(e, cfg.access)).collect::<Result<Vec<_>, _>>()?;
    for (i, l) in cfg.listen.iter().enumerate() {
        tracing::info!(endpoint = %l, target = i, "accepting on");
    }
    let next_id = AtomicU64::new(0);
    let counts = &Counts::default();
    std::thread::scope(|s| {
        while !stop.load(Ordering::Relaxed) {
            let mut idle = true;
            for (index, l) in listeners.iter().enumerate() {
                let local = match l.accept() {
                    Ok(Some(local)) => local,
                    Ok(None) => continue,
                    Err(e) => return Err(TransportError::io(format!("accept on {}", cfg.listen[index]), e).into()),
                };
                idle = false;
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                let name = format!("connection {id} ({} → target {index})", cfg.listen[index]);
                // Opened here, in accept order; carried on a thread of its own.
                let mut rc = cfg.relay.clone();
                rc.target = Some(index as u32);
                match relay::connect(&rc) {
                    Ok(session) => {
                        tracing::info!(connection = name, streams = session.streams.len(), "connection open");
                        let t0 = Instant::now();
                        s.spawn(move || match session.carry(local) {
                            Ok(mut r) => {
                                r.role = "proxy".into();
                                r.secs = t0.elapsed().as_secs_f64();
                                counts.done(&name, &r);
                            }
                            Err(e) => counts.failed(&name, &e),
                        });
                    }
                    Err(e) => {
                        (local.abort)();
                        counts.failed(&name, &format_args!("the exit refused it: {e}"));
                    }
                }
            }
            if idle {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        Ok::<(), MigrateError>(())
    })?;
    Ok(counts.tally())
}

/// The exit side of the proxy.
#[derive(Clone, Debug)]
pub struct ExitConfig {
    /// Where the sessions naming target `i` connect to.
    pub targets: Vec<Endpoint>,
    /// Stall limit and threads of each relay.
    pub relay: RelayRecvOptions,
    /// How long a connect to a target may take.
    pub connect_timeout: Duration,
}

struct Exit<'a> {
    cfg: &'a ExitConfig,
    io: pmigrate_transport::backend::Resolved,
    counts: Counts,
    next_id: AtomicU64,
}

impl SessionHandler for Exit<'_> {
    type Context = (Local, String);

    fn open(&self, h: &Hello, peer: SocketAddr) -> Result<(u64, Self::Context), ErrorMsg> {
        let refuse = |code, message: String| ErrorMsg { code, message };
        if h.caps & CAP_DUPLEX == 0 {
            return Err(refuse(ErrorCode::Unsupported, "a proxied connection needs a full-duplex session".into()));
        }
        let ext = h.extension(EXT_TARGET).ok_or_else(|| refuse(ErrorCode::Protocol, "no target named".into()))?;
        let index = decode_target(ext).map_err(|e| refuse(ErrorCode::Protocol, e.to_string()))?;
        let target = self.cfg.targets.get(index as usize).ok_or_else(|| {
            refuse(ErrorCode::Unsupported, format!("no target {index} here ({} configured)", self.cfg.targets.len()))
        })?;
        let unreachable = |e: std::io::Error| refuse(ErrorCode::Io, format!("cannot reach {target}: {e}"));
        let local = match target {
            Endpoint::Unix(p) => UnixStream::connect(p).and_then(Local::unix).map_err(unreachable)?,
            Endpoint::Tcp(a) => TcpStream::connect_timeout(a, self.cfg.connect_timeout)
                .and_then(|s| {
                    let _ = tune_accepted(&s);
                    Local::tcp(s)
                })
                .map_err(unreachable)?,
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let name = format!("connection {id} (from {peer} → {target})");
        tracing::info!(connection = name, streams = h.stream_count, "connection open");
        let resume = if self.cfg.relay.resume { CAP_RESUME } else { 0 };
        Ok((h.caps & (CAP_LZ4 | CAP_DUPLEX | resume), (local, name)))
    }

    fn run(&self, session: Accepted, (local, name): Self::Context) {
        let t0 = Instant::now();
        let how = Carry::accepted(session.caps, &self.cfg.relay, self.io.clone());
        let resume = session.resumes.map(Comeback::Await);
        match (relay::Session { streams: session.streams, how, resume }).carry(local) {
            Ok(mut r) => {
                r.role = "proxy".into();
                r.secs = t0.elapsed().as_secs_f64();
                self.counts.done(&name, &r);
            }
            Err(e) => self.counts.failed(&name, &e),
        }
    }

    fn abandoned(&self, (local, name): Self::Context, why: &str) {
        // The target was connected for a session that never ran: it must
        // see a failure, not an empty stream that ended well.
        (local.abort)();
        self.counts.failed(&name, &why);
    }
}

/// Serves proxy sessions from `acceptor`, connecting each to its target,
/// until `stop` is set; returns once every session ended, with their
/// count. Logs (`tracing`) each session opened and ended and each
/// connection refused.
pub fn run_exit(acceptor: &Acceptor, cfg: &ExitConfig, stop: &AtomicBool) -> Result<Tally, TransportError> {
    let io = cfg.relay.backend.resolve()?;
    let exit = Exit { cfg, io, counts: Counts::default(), next_id: AtomicU64::new(0) };
    acceptor.serve(Mode::Stream, &exit, stop)?;
    Ok(exit.counts.tally())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pmigrate_transport::session::StreamPlan;
    use pmigrate_transport::Auth;
    use std::io::{Read, Write};

    #[test]
    fn endpoints_parse_as_libvirt_and_qemu_spell_them() {
        assert_eq!("unix:///run/m.sock".parse::<Endpoint>().unwrap(), Endpoint::Unix("/run/m.sock".into()));
        assert_eq!("unix:/run/m.sock".parse::<Endpoint>().unwrap(), Endpoint::Unix("/run/m.sock".into()));
        assert_eq!("/run/m.sock".parse::<Endpoint>().unwrap(), Endpoint::Unix("/run/m.sock".into()));
        assert_eq!("tcp:127.0.0.1:7".parse::<Endpoint>().unwrap(), Endpoint::Tcp("127.0.0.1:7".parse().unwrap()));
        assert_eq!("127.0.0.1:7".parse::<Endpoint>().unwrap(), Endpoint::Tcp("127.0.0.1:7".parse().unwrap()));
        assert!("unix:relative".parse::<Endpoint>().is_err());
        assert!("nonsense".parse::<Endpoint>().is_err());
    }

    /// Both sides in one process: connections to the entry's unix socket
    /// reach a server behind the exit in the order they were made, whole,
    /// both ways, with half-close.
    #[test]
    fn connections_arrive_in_order_whole_and_half_closed() {
        let dir = std::env::temp_dir().join(format!("pm-proxy-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let (entry_path, target_path) = (dir.join("entry.sock"), dir.join("target.sock"));
        let target = UnixListener::bind(&target_path).unwrap();
        let acceptor = Acceptor::bind(&["127.0.0.1:0".parse().unwrap()], Auth::Insecure).unwrap();
        let exit_cfg = ExitConfig {
            targets: vec![Endpoint::Unix(target_path.clone())],
            relay: RelayRecvOptions::default(),
            connect_timeout: Duration::from_secs(5),
        };
        let mut relay = RelaySendConfig::new(StreamPlan::new(acceptor.local_addrs(), 2, Auth::Insecure));
        relay.threads = 2;
        let entry_cfg =
            EntryConfig { listen: vec![Endpoint::Unix(entry_path.clone())], relay, access: SocketAccess::default() };
        let stop = AtomicBool::new(false);
        let (exit, entry) = std::thread::scope(|s| {
            let exit = s.spawn(|| run_exit(&acceptor, &exit_cfg, &stop).unwrap());
            let entry = s.spawn(|| run_entry(&entry_cfg, &stop).unwrap());
            while UnixStream::connect(&entry_path).is_err() {
                std::thread::sleep(Duration::from_millis(10));
            }
            // The probe connect above is carried too: the target sees it first.
            let (mut probe, _) = target.accept().unwrap();
            let mut b = Vec::new();
            probe.read_to_end(&mut b).unwrap();
            assert!(b.is_empty());
            drop(probe);
            // Five clients connect before the target accepts any: the target
            // must see them in that order. Each says its number and half-closes.
            let mut clients: Vec<UnixStream> = (0..5u8)
                .map(|i| {
                    let mut c = UnixStream::connect(&entry_path).unwrap();
                    let big: Vec<u8> = (0..(1u32 << 20) + u32::from(i)).map(|k| (k as u8) ^ i).collect();
                    c.write_all(&[i]).unwrap();
                    let writer = c.try_clone().unwrap();
                    std::thread::spawn(move || {
                        let mut w = writer;
                        w.write_all(&big).unwrap();
                        w.shutdown(std::net::Shutdown::Write).unwrap();
                    });
                    c
                })
                .collect();
            for i in 0..5u8 {
                let (mut conn, _) = target.accept().unwrap();
                let mut got = Vec::new();
                conn.read_to_end(&mut got).unwrap();
                assert_eq!(got[0], i, "connections reached the target out of order");
                let want: Vec<u8> = (0..(1u32 << 20) + u32::from(i)).map(|k| (k as u8) ^ i).collect();
                assert!(got[1..] == want[..], "connection {i}: bytes differ");
                // The answer comes after the request ended: half-close held.
                conn.write_all(format!("answer {i}").as_bytes()).unwrap();
            }
            for (i, c) in clients.iter_mut().enumerate() {
                let mut got = String::new();
                c.read_to_string(&mut got).unwrap();
                assert_eq!(got, format!("answer {i}"));
            }
            // Both sides finish what they carry, then return their counts.
            stop.store(true, Ordering::Relaxed);
            (exit.join().unwrap(), entry.join().unwrap())
        });
        // The probe and the five clients, each counted by both sides.
        assert_eq!(exit, Tally { done: 6, failed: 0 });
        assert_eq!(entry, Tally { done: 6, failed: 0 });
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A stream between entry and exit is reset mid-transfer: it comes
    /// back to the session the exit serves, and the carried connection
    /// arrives whole both ways, counted done by both sides.
    #[test]
    fn a_carried_connection_survives_a_lost_stream() {
        use crate::relay::cutter;
        let dir = std::env::temp_dir().join(format!("pm-proxy-cut-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let (entry_path, target_path) = (dir.join("entry.sock"), dir.join("target.sock"));
        let target = UnixListener::bind(&target_path).unwrap();
        let acceptor = Acceptor::bind(&["127.0.0.1:0".parse().unwrap()], Auth::Insecure).unwrap();
        // The network between the hosts resets the connection carrying the
        // 3 MiB-th byte.
        let link = cutter::Cutter::start(acceptor.local_addrs()[0], 3 << 20, cutter::Trigger::Cut).unwrap();
        let exit_cfg = ExitConfig {
            targets: vec![Endpoint::Unix(target_path.clone())],
            relay: RelayRecvOptions::default(),
            connect_timeout: Duration::from_secs(5),
        };
        let entry_cfg = EntryConfig {
            listen: vec![Endpoint::Unix(entry_path.clone())],
            relay: RelaySendConfig::new(StreamPlan::new(vec![link.addr], 4, Auth::Insecure)),
            access: SocketAccess::default(),
        };
        let request: Vec<u8> = (0..8u32 << 20).map(|k| (k ^ (k >> 11)) as u8).collect();
        let answer: Vec<u8> = (0..4u32 << 20).map(|k| (k ^ (k >> 7)) as u8).collect();
        let stop = AtomicBool::new(false);
        let (outcome, exit, entry) = std::thread::scope(|s| {
            let exit = s.spawn(|| run_exit(&acceptor, &exit_cfg, &stop).unwrap());
            let entry = s.spawn(|| run_entry(&entry_cfg, &stop).unwrap());
            // The client and the target, each reading to the end; a failed
            // relay reaches them as an error, which ends the test.
            let outcome = (|| -> std::io::Result<(Vec<u8>, Vec<u8>)> {
                let t = std::time::Instant::now();
                while !entry_path.exists() && t.elapsed() < Duration::from_secs(10) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let mut client = UnixStream::connect(&entry_path)?;
                client.set_read_timeout(Some(Duration::from_secs(30)))?;
                let mut w = client.try_clone()?;
                let req = request.clone();
                let sending = s.spawn(move || w.write_all(&req).and_then(|()| w.shutdown(std::net::Shutdown::Write)));
                let (mut conn, _) = target.accept()?;
                conn.set_read_timeout(Some(Duration::from_secs(30)))?;
                let mut got = Vec::new();
                conn.read_to_end(&mut got)?;
                conn.write_all(&answer)?;
                drop(conn);
                let mut back = Vec::new();
                client.read_to_end(&mut back)?;
                sending.join().expect("the client's writer")?;
                Ok((got, back))
            })();
            stop.store(true, Ordering::Relaxed);
            (outcome, exit.join().unwrap(), entry.join().unwrap())
        });
        let (got, back) = outcome.expect("the carried connection failed");
        assert!(got == request, "the target got {} bytes, not the request", got.len());
        assert!(back == answer, "the client got {} bytes, not the answer", back.len());
        assert!(link.fired() && link.connections() > 4, "a stream was cut and came back");
        assert_eq!((exit, entry), (Tally { done: 1, failed: 0 }, Tally { done: 1, failed: 0 }));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_exit_connects_only_to_its_targets() {
        let acceptor = Acceptor::bind(&["127.0.0.1:0".parse().unwrap()], Auth::Insecure).unwrap();
        let cfg = ExitConfig {
            targets: vec![Endpoint::Tcp("127.0.0.1:9".parse().unwrap())],
            relay: RelayRecvOptions::default(),
            connect_timeout: Duration::from_secs(2),
        };
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| run_exit(&acceptor, &cfg, &stop).unwrap());
            let plan = StreamPlan::new(acceptor.local_addrs(), 1, Auth::Insecure);
            let err =
                relay::connect(&RelaySendConfig { target: Some(1), ..RelaySendConfig::new(plan.clone()) }).unwrap_err();
            assert!(err.to_string().contains("no target 1"), "{err}");
            let err =
                relay::connect(&RelaySendConfig { target: None, ..RelaySendConfig::new(plan.clone()) }).unwrap_err();
            assert!(err.to_string().contains("no target named"), "{err}");
            let err = relay::connect(&RelaySendConfig { duplex: false, target: Some(0), ..RelaySendConfig::new(plan) })
                .unwrap_err();
            assert!(err.to_string().contains("full-duplex"), "{err}");
            stop.store(true, Ordering::Relaxed);
        });
    }
}
