//! Links that survive a lost connection: a stream slot whose TCP connection
//! can be replaced while the session goes on (post-copy, `CAP_RESUME`).
//!
//! The source reconnects a broken stream with [`reconnect`]: a new
//! connection whose first frame is `Resume`, carrying the session's `Hello`
//! with the stream's index; the destination takes it with
//! [`Acceptor::accept_resume`] and answers `Welcome`. Both ends then swap
//! the connection in the stream's [`Link`]; threads blocked on the old one
//! see it fail and pick up the new one. Frames lost with the old connection
//! are the session's to recover (post-copy asks for missing pages again).

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::frame::{FrameHdr, FrameKind};
use crate::hello::{ErrorCode, Hello, Welcome};
use crate::net::{connect, tune_accepted, write_frame, FrameReader, TransportError};
use crate::payload::build_control;
use crate::session::{send_error, Acceptor, StreamPlan};

/// One stream's connection, replaceable.
#[derive(Debug)]
pub struct Link {
    cur: Mutex<(Arc<TcpStream>, u64)>,
    changed: Condvar,
    /// Held while one thread reconnects, so two do not race.
    repairing: Mutex<()>,
    /// Connections replaced so far.
    replaced: AtomicU64,
    /// Held while a thread writes one whole frame.
    writes: Mutex<()>,
}

impl Link {
    /// A link over `s`.
    pub fn new(s: TcpStream) -> Self {
        Self {
            cur: Mutex::new((Arc::new(s), 0)),
            changed: Condvar::new(),
            repairing: Mutex::new(()),
            replaced: AtomicU64::new(0),
            writes: Mutex::new(()),
        }
    }

    /// The connection now, and its generation (0 for the first).
    pub fn current(&self) -> (Arc<TcpStream>, u64) {
        let c = self.cur.lock().expect("link lock");
        (c.0.clone(), c.1)
    }

    /// Puts `s` in place of the current connection, which is shut down.
    pub fn replace(&self, s: TcpStream) {
        let mut c = self.cur.lock().expect("link lock");
        let _ = c.0.shutdown(std::net::Shutdown::Both);
        *c = (Arc::new(s), c.1 + 1);
        self.replaced.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_all();
    }

    /// Waits up to `timeout` for a connection newer than generation `seen`.
    pub fn wait_newer(&self, seen: u64, timeout: Duration) -> Option<(Arc<TcpStream>, u64)> {
        let deadline = Instant::now() + timeout;
        let mut c = self.cur.lock().expect("link lock");
        while c.1 <= seen {
            let left = deadline.checked_duration_since(Instant::now())?;
            c = self.changed.wait_timeout(c, left.min(Duration::from_millis(100))).expect("link lock").0;
        }
        Some((c.0.clone(), c.1))
    }

    /// After generation `seen` failed: reconnects with `dial` unless another
    /// thread already did, and returns the connection to use.
    pub fn repair(
        &self,
        seen: u64,
        dial: impl FnOnce() -> Result<TcpStream, TransportError>,
    ) -> Result<(Arc<TcpStream>, u64), TransportError> {
        let _one = self.repairing.lock().expect("repair lock");
        let (s, g) = self.current();
        if g > seen {
            return Ok((s, g));
        }
        self.replace(dial()?);
        Ok(self.current())
    }

    /// Serialises writers: hold the guard while writing one whole frame.
    pub fn lock_writes(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writes.lock().expect("write lock")
    }

    /// How many times the connection was replaced.
    pub fn replaced(&self) -> u64 {
        self.replaced.load(Ordering::Relaxed)
    }

    /// Shuts the current connection down both ways.
    pub fn shutdown(&self) {
        let _ = self.current().0.shutdown(std::net::Shutdown::Both);
    }
}

/// Reconnects stream `index` of the session `hello` describes, trying
/// until `within` has passed or `give_up` says so: a new connection,
/// `Resume` with the session's `Hello`, and the destination's `Welcome`.
pub fn reconnect(
    plan: &StreamPlan,
    hello: &Hello,
    index: u16,
    within: Duration,
    give_up: &dyn Fn() -> bool,
) -> Result<TcpStream, TransportError> {
    let deadline = Instant::now() + within;
    loop {
        match reconnect_once(plan, hello, index) {
            Ok(s) => return Ok(s),
            Err(TransportError::Peer(m)) => return Err(TransportError::Peer(m)),
            Err(e) if Instant::now() >= deadline || give_up() => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn reconnect_once(plan: &StreamPlan, hello: &Hello, index: u16) -> Result<TcpStream, TransportError> {
    let name = format!("stream {index} (reconnecting)");
    let mut s = connect(plan.dest(index.into()), plan.via(index.into()), plan.connect_timeout)?;
    s.set_read_timeout(Some(Duration::from_millis(200))).map_err(|e| TransportError::io(&name, e))?;
    let mut h = hello.clone();
    h.stream_index = index;
    let mut f = Vec::new();
    build_control(&mut f, FrameHdr::new(FrameKind::Resume), &h.encode());
    write_frame(&mut s, &f, &name)?;
    let mut r = FrameReader::new(&s, name.clone());
    // A live destination answers at once; one that is gone may still
    // accept the connection in its backlog and never answer.
    r.set_idle_limit(Duration::from_secs(2));
    r.set_stall_limit(Duration::from_secs(2));
    let (hdr, payload) = r.expect(FrameKind::Welcome)?;
    hdr.verify(payload).map_err(|source| TransportError::Wire { what: name.clone(), source })?;
    let w = Welcome::decode(payload).map_err(|source| TransportError::Wire { what: name.clone(), source })?;
    if w.session != hello.session {
        return Err(TransportError::Setup(format!("{name}: welcomed into another session")));
    }
    s.set_read_timeout(None).map_err(|e| TransportError::io(&name, e))?;
    Ok(s)
}

impl Acceptor {
    /// Waits up to `timeout` for one stream of session `session` (of
    /// `streams` streams) to reconnect; returns its index and connection,
    /// or `None` when none came. Any other connection is refused with an
    /// error frame.
    pub fn accept_resume(
        &self,
        session: [u8; 16],
        streams: u16,
        timeout: Duration,
    ) -> Result<Option<(u16, TcpStream)>, TransportError> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut got = None;
            for l in self.listeners() {
                match l.accept() {
                    Ok((s, peer)) => {
                        got = Some((s, peer));
                        break;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(TransportError::io("accept", e)),
                }
            }
            if let Some((s, peer)) = got {
                if let Some(done) = Self::resume_handshake(s, peer, session, streams) {
                    return Ok(Some(done));
                }
                continue;
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn resume_handshake(
        mut s: TcpStream,
        _peer: SocketAddr,
        session: [u8; 16],
        streams: u16,
    ) -> Option<(u16, TcpStream)> {
        let _ = s.set_nonblocking(false);
        tune_accepted(&s).ok()?;
        s.set_read_timeout(Some(Duration::from_millis(200))).ok()?;
        let res = (|| {
            let mut r = FrameReader::new(&s, "resume");
            r.set_idle_limit(Duration::from_secs(10));
            r.set_stall_limit(Duration::from_secs(10));
            let (hdr, payload) = r.expect(FrameKind::Resume)?;
            hdr.verify(payload).map_err(|source| TransportError::Wire { what: "resume".into(), source })?;
            Hello::decode(payload).map_err(|source| TransportError::Wire { what: "resume".into(), source })
        })();
        let h = match res {
            Ok(h) if h.session == session && h.stream_index < streams => h,
            Ok(_) => {
                send_error(&mut s, ErrorCode::NotInSession, "not a stream of the session being served");
                return None;
            }
            Err(e) => {
                send_error(&mut s, ErrorCode::Protocol, e.to_string());
                return None;
            }
        };
        let mut f = Vec::new();
        build_control(&mut f, FrameHdr::new(FrameKind::Welcome), &Welcome { session, caps: h.caps }.encode());
        write_frame(&mut s, &f, "welcome").ok()?;
        s.set_read_timeout(None).ok()?;
        Some((h.stream_index, s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hello::{Mode, PROTOCOL_VERSION};
    use crate::session::new_session_id;

    fn hello(session: [u8; 16]) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            mode: Mode::Memory,
            stream_index: 0,
            stream_count: 2,
            session,
            caps: 0,
            regions: vec![],
            extensions: vec![],
        }
    }

    #[test]
    fn only_a_stream_of_the_session_comes_back() {
        let acc = Acceptor::bind(&["127.0.0.1:0".parse().unwrap()]).unwrap();
        let plan = StreamPlan::new(acc.local_addrs(), 2);
        let session = new_session_id();
        let never = || false;
        std::thread::scope(|s| {
            let server = s.spawn(|| {
                let mut got = Vec::new();
                while got.is_empty() {
                    if let Some(r) = acc.accept_resume(session, 2, Duration::from_secs(30)).unwrap() {
                        got.push(r);
                    }
                }
                got
            });
            let other = reconnect(&plan, &hello(new_session_id()), 1, Duration::from_secs(5), &never);
            assert!(matches!(other, Err(TransportError::Peer(_))), "another session's stream is refused: {other:?}");
            let beyond = reconnect(&plan, &hello(session), 2, Duration::from_secs(5), &never);
            assert!(matches!(beyond, Err(TransportError::Peer(_))), "an index past the session's is refused");
            let ok = reconnect(&plan, &hello(session), 1, Duration::from_secs(5), &never).unwrap();
            let got = server.join().unwrap();
            assert_eq!(got[0].0, 1);
            assert_eq!(got[0].1.peer_addr().unwrap(), ok.local_addr().unwrap());
        });
    }

    #[test]
    fn a_link_is_repaired_once_per_failure() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let link = Link::new(TcpStream::connect(addr).unwrap());
        let (_, g0) = link.current();
        let dials = AtomicU64::new(0);
        let dial = || {
            dials.fetch_add(1, Ordering::Relaxed);
            TcpStream::connect(addr).map_err(|e| TransportError::io("dial", e))
        };
        let (_, g1) = link.repair(g0, dial).unwrap();
        // A second thread that saw the same failure gets the new connection.
        let (_, g2) = link.repair(g0, dial).unwrap();
        assert_eq!((g1, g2, dials.load(Ordering::Relaxed), link.replaced()), (1, 1, 1, 1));
        assert!(link.wait_newer(g1, Duration::from_millis(10)).is_none());
    }
}
