//! Serving many sessions at once: the destination side of a long-running
//! service (the socket proxy), where [`Acceptor::accept_session`] serves
//! exactly one.
//!
//! Each accepted connection reads its `Hello` on a handshake thread (at most
//! [`MAX_PENDING_HANDSHAKES`] at once). A session starts with its stream 0 —
//! the source connects its streams one after the other, each after the
//! previous one's `Welcome` — and [`SessionHandler::open`] judges it on that
//! handshake thread, so opening may block (the proxy connects to its target
//! there) without holding up other sessions. Stream 0 is welcomed only once
//! `open` succeeded: a source that waits for its last `Welcome` before it
//! goes on knows the session is established end to end. Later streams must
//! agree with stream 0's `Hello`. When every stream has joined,
//! [`SessionHandler::run`] gets the session on a thread of its own.
//!
//! A session whose streams do not all arrive within the acceptor's gather
//! timeout is dropped (its streams closed, its context dropped); at most
//! [`MAX_SESSIONS`] run at once and further sessions are refused.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::conn::Conn;
use crate::frame::{FrameHdr, FrameKind};
use crate::hello::{ErrorCode, ErrorMsg, Hello, Mode, Welcome};
use crate::net::{write_frame, TransportError};
use crate::payload::build_control;
use crate::session::{accept_handshake, agrees, send_error, Accepted, Acceptor, MAX_PENDING_HANDSHAKES};

/// Sessions gathering or running at once at most.
pub const MAX_SESSIONS: usize = 256;

/// What a server does with its sessions.
pub trait SessionHandler: Sync {
    /// State made when a session opens and handed to [`SessionHandler::run`].
    type Context: Send;

    /// Judges a session's stream 0 `Hello` (of the served mode) and returns
    /// the capabilities granted and the session's context. Runs on the
    /// handshake thread and may block; a refusal is sent to the peer.
    fn open(&self, hello: &Hello, peer: SocketAddr) -> Result<(u64, Self::Context), ErrorMsg>;

    /// Runs a session whose streams all joined, on a thread of its own.
    fn run(&self, session: Accepted, context: Self::Context);

    /// A connection refused, and why (for the server's log).
    fn refused(&self, _peer: SocketAddr, _why: &str) {}
}

struct Gathering<C> {
    hello: Hello,
    caps: u64,
    context: C,
    slots: Vec<Option<Conn>>,
    since: Instant,
}

enum Handshake<C> {
    /// Stream 0 of a new session, opened.
    Opened(Hello, u64, C),
    /// A later stream.
    Joins(Hello),
}

fn welcome(s: &mut Conn, session: [u8; 16], caps: u64) -> Result<(), TransportError> {
    let mut f = Vec::new();
    build_control(&mut f, FrameHdr::new(FrameKind::Welcome), &Welcome { session, caps }.encode());
    write_frame(s, &f, "welcome")?;
    s.set_read_timeout(None).map_err(|e| TransportError::io("welcome", e))
}

impl Acceptor {
    /// Serves sessions of `mode` until `stop` is set (checked every few
    /// milliseconds); returns once every running session has ended.
    pub fn serve<H: SessionHandler>(&self, mode: Mode, handler: &H, stop: &AtomicBool) -> Result<(), TransportError> {
        type Result3<C> = (Option<Conn>, SocketAddr, Result<Handshake<C>, ErrorMsg>);
        let (tx, rx) = mpsc::channel::<Result3<H::Context>>();
        let pending = AtomicUsize::new(0);
        let running = AtomicUsize::new(0);
        let mut gathering: HashMap<[u8; 16], Gathering<H::Context>> = HashMap::new();
        std::thread::scope(|scope| {
            let refuse = |s: Option<Conn>, peer: SocketAddr, code: ErrorCode, why: String| {
                if let Some(s) = s {
                    send_error(&s, code, why.clone());
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
                handler.refused(peer, &why);
            };
            while !stop.load(Ordering::Relaxed) {
                let mut idle = true;
                for l in self.listeners() {
                    match l.accept() {
                        Ok((s, peer)) => {
                            idle = false;
                            let _ = s.set_nonblocking(false);
                            if pending.load(Ordering::Acquire) >= MAX_PENDING_HANDSHAKES {
                                let why = "too many handshakes in progress".into();
                                refuse(Some(Conn::Tcp(s)), peer, ErrorCode::Aborted, why);
                                continue;
                            }
                            pending.fetch_add(1, Ordering::AcqRel);
                            let (tx, pending) = (tx.clone(), &pending);
                            scope.spawn(move || {
                                let (s, hello) = accept_handshake(s, self.tls.as_deref());
                                let res = match hello {
                                    Err(e) => Err(ErrorMsg { code: ErrorCode::Protocol, message: e.to_string() }),
                                    Ok(h) if h.mode != mode => Err(ErrorMsg {
                                        code: ErrorCode::NotInSession,
                                        message: format!("this end serves {mode:?} sessions, not {:?}", h.mode),
                                    }),
                                    Ok(h) if h.stream_index == 0 => {
                                        handler.open(&h, peer).map(|(caps, c)| Handshake::Opened(h, caps, c))
                                    }
                                    Ok(h) => Ok(Handshake::Joins(h)),
                                };
                                pending.fetch_sub(1, Ordering::AcqRel);
                                let _ = tx.send((s, peer, res));
                            });
                        }
                        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                        Err(e) => return Err(TransportError::io("accept", e)),
                    }
                }
                gathering.retain(|_, g| g.since.elapsed() <= self.gather_timeout);
                let (s, peer, res) = match rx.recv_timeout(Duration::from_millis(if idle { 5 } else { 0 })) {
                    Ok(x) => x,
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(mpsc::RecvTimeoutError::Disconnected) => unreachable!("the loop holds a sender"),
                };
                let joined = match res {
                    Err(e) => {
                        refuse(s, peer, e.code, e.message);
                        continue;
                    }
                    Ok(Handshake::Opened(h, caps, context)) => {
                        let Some(mut s) = s else { continue };
                        if gathering.contains_key(&h.session) {
                            refuse(Some(s), peer, ErrorCode::NotInSession, "the session is open already".into());
                            continue;
                        }
                        if gathering.len() + running.load(Ordering::Acquire) >= MAX_SESSIONS {
                            refuse(Some(s), peer, ErrorCode::Aborted, "too many sessions".into());
                            continue;
                        }
                        if welcome(&mut s, h.session, caps).is_err() {
                            continue; // broke during its handshake: nothing to serve
                        }
                        let mut slots: Vec<Option<Conn>> = (0..h.stream_count).map(|_| None).collect();
                        slots[0] = Some(s);
                        let id = h.session;
                        gathering.insert(id, Gathering { hello: h, caps, context, slots, since: Instant::now() });
                        id
                    }
                    Ok(Handshake::Joins(h)) => {
                        let Some(mut s) = s else { continue };
                        let Some(g) = gathering.get_mut(&h.session) else {
                            refuse(Some(s), peer, ErrorCode::NotInSession, "no such session".into());
                            continue;
                        };
                        if let Err((code, why)) = agrees(&g.hello, &h) {
                            refuse(Some(s), peer, code, why);
                            continue;
                        }
                        if g.slots[h.stream_index as usize].is_some() {
                            let why = format!("stream {} already connected", h.stream_index);
                            refuse(Some(s), peer, ErrorCode::NotInSession, why);
                            continue;
                        }
                        if welcome(&mut s, h.session, g.caps).is_err() {
                            gathering.remove(&h.session); // a stream that breaks in its handshake dooms the session
                            continue;
                        }
                        g.slots[h.stream_index as usize] = Some(s);
                        h.session
                    }
                };
                if gathering[&joined].slots.iter().all(Option::is_some) {
                    let g = gathering.remove(&joined).expect("just looked up");
                    let streams = g.slots.into_iter().map(|s| s.expect("every slot filled")).collect();
                    let session = Accepted { hello: g.hello, caps: g.caps, streams, refused: Vec::new() };
                    running.fetch_add(1, Ordering::AcqRel);
                    let (running, context) = (&running, g.context);
                    scope.spawn(move || {
                        handler.run(session, context);
                        running.fetch_sub(1, Ordering::AcqRel);
                    });
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hello::{CAP_LZ4, PROTOCOL_VERSION};
    use crate::session::{connect_session, new_session_id, StreamPlan};
    use std::io::{Read, Write};
    use std::sync::Mutex;

    /// Opens sessions whose first extension byte is not 0xff; each session
    /// echoes one byte per stream back, incremented.
    struct Echo {
        opened: Mutex<Vec<u16>>,
    }

    impl SessionHandler for Echo {
        type Context = u16;

        fn open(&self, hello: &Hello, _peer: SocketAddr) -> Result<(u64, u16), ErrorMsg> {
            if hello.extension(9) == Some(&[0xff]) {
                return Err(ErrorMsg { code: ErrorCode::Unsupported, message: "refused by the handler".into() });
            }
            self.opened.lock().unwrap().push(hello.stream_count);
            Ok((hello.caps & CAP_LZ4, hello.stream_count))
        }

        fn run(&self, session: Accepted, context: u16) {
            assert_eq!(session.streams.len(), usize::from(context));
            for mut s in session.streams {
                let mut b = [0u8];
                if s.read_exact(&mut b).is_ok() {
                    let _ = s.write_all(&[b[0] + 1]);
                }
            }
        }
    }

    fn hello(streams: u16, ext: u8) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            mode: Mode::Stream,
            stream_index: 0,
            stream_count: streams,
            session: new_session_id(),
            caps: CAP_LZ4,
            regions: vec![],
            extensions: vec![(9, vec![ext])],
        }
    }

    /// Runs `client` against an [`Echo`] server on a fresh port; returns
    /// the stream counts of the sessions the handler opened.
    fn with_server(client: impl FnOnce(SocketAddr)) -> Vec<u16> {
        let acc = Acceptor::bind(&["127.0.0.1:0".parse().unwrap()]).unwrap();
        let addr = acc.local_addrs()[0];
        let handler = Echo { opened: Mutex::new(Vec::new()) };
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let server = s.spawn(|| acc.serve(Mode::Stream, &handler, &stop));
            client(addr);
            stop.store(true, Ordering::Relaxed);
            server.join().unwrap().unwrap();
        });
        handler.opened.into_inner().unwrap()
    }

    #[test]
    fn sessions_are_served_side_by_side_and_refusals_reach_the_peer() {
        let opened = with_server(|addr| {
            // Two sessions open at the same time, then both are used.
            let (mut a, wa) = connect_session(&StreamPlan::new(vec![addr], 3), &hello(3, 1)).unwrap();
            let (mut b, _) = connect_session(&StreamPlan::new(vec![addr], 1), &hello(1, 1)).unwrap();
            assert_eq!(wa.caps, CAP_LZ4);
            for (i, st) in a.iter_mut().chain(b.iter_mut()).enumerate() {
                st.write_all(&[i as u8]).unwrap();
                let mut r = [0u8];
                st.read_exact(&mut r).unwrap();
                assert_eq!(r[0], i as u8 + 1);
            }
            let err = connect_session(&StreamPlan::new(vec![addr], 1), &hello(1, 0xff)).unwrap_err();
            assert!(err.to_string().contains("refused by the handler"), "{err}");
            let mut m = hello(1, 1);
            m.mode = Mode::Memory;
            let err = connect_session(&StreamPlan::new(vec![addr], 1), &m).unwrap_err();
            assert!(err.to_string().contains("serves Stream"), "{err}");
        });
        assert_eq!(opened, vec![3, 1]);
    }

    #[test]
    fn a_stream_of_no_session_is_refused() {
        let opened = with_server(|addr| {
            let mut h = hello(2, 1);
            h.stream_index = 1;
            // connect_session numbers streams itself: send stream 1 by hand.
            let mut conn = std::net::TcpStream::connect(addr).unwrap();
            let mut f = Vec::new();
            build_control(&mut f, FrameHdr::new(FrameKind::Hello), &h.encode());
            conn.write_all(&f).unwrap();
            let mut r = crate::net::FrameReader::new(&conn, "t");
            let err = r.next_frame().unwrap_err();
            assert!(err.to_string().contains("no such session"), "{err}");
        });
        assert!(opened.is_empty());
    }
}
