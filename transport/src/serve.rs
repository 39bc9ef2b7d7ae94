//! Serving many sessions at once: the destination side of a long-running
//! service (the socket proxy), where [`Acceptor::accept_session`] serves
//! exactly one.
//!
//! Connections are admitted and authenticated as in [`crate::accept`]. A
//! session starts with its stream 0 — the source connects its streams one
//! after the other, each after the previous one's `Welcome` — and only once
//! that stream proved itself, and a session slot is free (at most
//! [`MAX_SESSIONS`] gather or run at once), does [`SessionHandler::open`]
//! judge it, on a thread of its own, so opening may block (the proxy
//! connects to its target there) without holding up other sessions. Stream
//! 0 is welcomed only once `open` succeeded: a source that waits for its
//! last `Welcome` before it goes on knows the session is established end
//! to end. Later streams must prove the session's secret and agree with
//! stream 0's `Hello`. When every stream has joined, [`SessionHandler::run`]
//! gets the session on a thread of its own.
//!
//! A session whose streams do not all arrive within the acceptor's gather
//! timeout is dropped (its streams closed, its context dropped). Nothing a
//! peer does ends the server; only `stop` does.
//!
//! A running session granted `CAP_RESUME` takes back its streams whose
//! connection was lost: a connection whose offer says it comes back
//! (`Purpose::Resume`), names the session, its stream count and one of its
//! streams, and proves the session's secret is welcomed here and handed to
//! the session ([`Accepted::resumes`]); any other comeback is refused.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::accept::{agrees, refusal_logged, Accepted, Acceptor, Handshaken};
use crate::auth::SessionKey;
use crate::conn::Conn;
use crate::handshake::{send_welcome, Arrival, Refusal};
use crate::hello::{ErrorCode, ErrorMsg, Hello, Mode, CAP_RESUME};
use crate::link::Resumes;
use crate::net::TransportError;

/// Sessions gathering or running at once at most: each holds a thread per
/// stream direction and a target connection.
pub const MAX_SESSIONS: usize = 256;

/// How often the serving loop looks for opened sessions while handlers'
/// `open`s are in flight.
const OPEN_POLL: Duration = Duration::from_millis(1);

/// How long the serving loop waits for a handshake when nothing else is
/// pending (it then looks at `stop` and the gather timeouts).
const ACCEPT_TICK: Duration = Duration::from_millis(100);

/// What a server does with its sessions.
pub trait SessionHandler: Sync {
    /// State made when a session opens and handed to [`SessionHandler::run`].
    type Context: Send;

    /// Judges an authenticated session's stream 0 `Hello` (of the served
    /// mode) and returns the capabilities granted and the session's
    /// context. Runs on a thread of its own and may block; a refusal is
    /// sent to the peer.
    fn open(&self, hello: &Hello, peer: SocketAddr) -> Result<(u64, Self::Context), ErrorMsg>;

    /// Runs a session whose streams all joined, on a thread of its own.
    fn run(&self, session: Accepted, context: Self::Context);

    /// A session that opened never ran (its other streams did not all
    /// arrive, or one broke in its handshake): its context, and why.
    fn abandoned(&self, _context: Self::Context, _why: &str) {}
}

struct Gathering<C> {
    hello: Hello,
    caps: u64,
    key: SessionKey,
    context: C,
    slots: Vec<Option<Conn>>,
    since: Instant,
}

/// A running session that takes its lost streams back (`CAP_RESUME`).
struct Running {
    caps: u64,
    streams: u16,
    key: SessionKey,
    /// Where its comebacks go ([`Accepted::resumes`]).
    comebacks: mpsc::Sender<(u16, Conn)>,
}

/// What arrives at the serving loop.
enum Event<C> {
    Handshake(Box<Handshaken>),
    /// A session's stream 0 after its handler's `open`.
    Opened(Box<Arrival>, Result<(u64, C), ErrorMsg>),
    /// A running session's handler returned: no stream of it comes back.
    Ended([u8; 16]),
}

impl Acceptor {
    /// Serves sessions of `mode` until `stop` is set (checked every few
    /// milliseconds); returns once every running session has ended. Peers
    /// never end it.
    pub fn serve<H: SessionHandler>(&self, mode: Mode, handler: &H, stop: &AtomicBool) -> Result<(), TransportError> {
        let (tx, rx) = mpsc::channel::<Event<H::Context>>();
        let pipeline = self.pipeline();
        let hrx = &pipeline.rx;
        // Sessions opening, gathering or running: a slot is taken before
        // `open` is called and given back when the session ends.
        let slots_used = AtomicUsize::new(0);
        let mut gathering: HashMap<[u8; 16], Gathering<H::Context>> = HashMap::new();
        let mut running: HashMap<[u8; 16], Running> = HashMap::new();
        let refuse = |r: Refusal, peer: SocketAddr| {
            // Logged first: the peer may act on the refusal at once.
            refusal_logged(peer, &r.why);
            r.send();
        };
        let note = |peer: SocketAddr, why: String| refusal_logged(peer, &why);
        // A gathering session that will never run: its streams are told
        // why and closed, its slot given back, its handler told.
        let abandon = |g: Gathering<H::Context>, why: &str| {
            slots_used.fetch_sub(1, Ordering::AcqRel);
            for c in g.slots.iter().flatten() {
                c.send_error(ErrorCode::Aborted, why);
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
            handler.abandoned(g.context, why);
        };
        // Handlers' `open`s in flight: their outcomes come on `rx`.
        let opening = AtomicUsize::new(0);
        self.listening(&pipeline, &note, || {
            std::thread::scope(|scope| {
                while !stop.load(Ordering::Relaxed) {
                    let late: Vec<[u8; 16]> = gathering
                        .iter()
                        .filter(|(_, g)| g.since.elapsed() > self.gather_timeout)
                        .map(|(id, _)| *id)
                        .collect();
                    for id in late {
                        let g = gathering.remove(&id).expect("just listed");
                        abandon(g, "the session's other streams did not arrive in time");
                    }
                    // Opened sessions first (they wait on nothing else), then
                    // handshakes, waiting briefly while opens are in flight.
                    let event = match rx.try_recv() {
                        Ok(e) => e,
                        Err(_) => {
                            let wait = if opening.load(Ordering::Acquire) > 0 { OPEN_POLL } else { ACCEPT_TICK };
                            match hrx.recv_timeout(wait) {
                                Ok(h) => Event::Handshake(Box::new(h)),
                                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                                Err(mpsc::RecvTimeoutError::Disconnected) => {
                                    unreachable!("the pipeline holds a sender")
                                }
                            }
                        }
                    };
                    let joined = match event {
                        Event::Handshake(h) => match *h {
                            Err(r) => {
                                let peer = r.peer;
                                refuse(r, peer);
                                continue;
                            }
                            Ok(a) => {
                                let peer = a.peer;
                                let refusal = |a: Arrival, code, why: String| Refusal {
                                    conn: Some(a.conn),
                                    peer: a.peer,
                                    code,
                                    why,
                                };
                                let Some(h) = a.hello.clone() else {
                                    if let Err(r) = come_back(a, mode, &mut running) {
                                        refuse(r, peer);
                                    }
                                    continue;
                                };
                                if h.mode != mode {
                                    let why = format!("this end serves {mode:?} sessions, not {:?}", h.mode);
                                    refuse(refusal(a, ErrorCode::NotInSession, why), peer);
                                    continue;
                                }
                                if h.stream_index == 0 {
                                    if gathering.contains_key(&h.session) {
                                        refuse(
                                            refusal(a, ErrorCode::NotInSession, "the session is open already".into()),
                                            peer,
                                        );
                                        continue;
                                    }
                                    // Admit the session before anything is spent on it.
                                    if slots_used.fetch_add(1, Ordering::AcqRel) >= MAX_SESSIONS {
                                        slots_used.fetch_sub(1, Ordering::AcqRel);
                                        let why = format!("{MAX_SESSIONS} sessions are open already");
                                        refuse(refusal(a, ErrorCode::Aborted, why), peer);
                                        continue;
                                    }
                                    let (tx, opening) = (tx.clone(), &opening);
                                    opening.fetch_add(1, Ordering::AcqRel);
                                    scope.spawn(move || {
                                        let res = handler.open(&h, peer);
                                        let _ = tx.send(Event::Opened(Box::new(a), res));
                                        opening.fetch_sub(1, Ordering::AcqRel);
                                    });
                                    continue;
                                }
                                let Some(g) = gathering.get_mut(&h.session) else {
                                    refuse(refusal(a, ErrorCode::NotInSession, "no such session".into()), peer);
                                    continue;
                                };
                                if !g.key.stream_proof_ok(&a.transcript, &a.stream_proof) {
                                    let why = "the stream did not prove the session's secret".to_string();
                                    refuse(refusal(a, ErrorCode::Auth, why), peer);
                                    continue;
                                }
                                if let Err((code, why)) = agrees(&g.hello, &h) {
                                    refuse(refusal(a, code, why), peer);
                                    continue;
                                }
                                let i = h.stream_index as usize;
                                if g.slots[i].is_some() {
                                    refuse(
                                        refusal(a, ErrorCode::NotInSession, format!("stream {i} already connected")),
                                        peer,
                                    );
                                    continue;
                                }
                                if send_welcome(&a.conn, h.session, g.caps).is_err() {
                                    // A stream that breaks in its handshake dooms the session.
                                    if let Some(g) = gathering.remove(&h.session) {
                                        abandon(g, "a stream of the session broke");
                                    }
                                    continue;
                                }
                                g.slots[i] = Some(a.conn);
                                h.session
                            }
                        },
                        Event::Ended(id) => {
                            running.remove(&id);
                            continue;
                        }
                        Event::Opened(a, res) => {
                            let (peer, h) = (a.peer, a.hello.clone().expect("stream 0 of a join"));
                            let (caps, context) = match res {
                                Ok(x) => x,
                                Err(e) => {
                                    slots_used.fetch_sub(1, Ordering::AcqRel);
                                    refuse(Refusal { conn: Some(a.conn), peer, code: e.code, why: e.message }, peer);
                                    continue;
                                }
                            };
                            if gathering.contains_key(&h.session) {
                                // Opened twice at once: the first is served.
                                slots_used.fetch_sub(1, Ordering::AcqRel);
                                handler.abandoned(context, "the same session opened twice");
                                continue;
                            }
                            if send_welcome(&a.conn, h.session, caps).is_err() {
                                slots_used.fetch_sub(1, Ordering::AcqRel);
                                handler.abandoned(context, "its first stream broke before it was welcomed");
                                continue;
                            }
                            let key = a.session_key(&self.auth);
                            let mut slots: Vec<Option<Conn>> = (0..h.stream_count).map(|_| None).collect();
                            slots[0] = Some(a.conn);
                            let id = h.session;
                            gathering
                                .insert(id, Gathering { hello: h, caps, key, context, slots, since: Instant::now() });
                            id
                        }
                    };
                    if gathering[&joined].slots.iter().all(Option::is_some) {
                        let g = gathering.remove(&joined).expect("just looked up");
                        let streams = g.slots.into_iter().map(|s| s.expect("every slot filled")).collect();
                        // Its lost streams come back through the loop.
                        let resumes = (g.caps & CAP_RESUME != 0).then(|| {
                            let (comebacks, resumes) = Resumes::fed();
                            let r =
                                Running { caps: g.caps, streams: g.hello.stream_count, key: g.key.clone(), comebacks };
                            running.insert(joined, r);
                            resumes
                        });
                        let session = Accepted {
                            hello: g.hello,
                            caps: g.caps,
                            streams,
                            refused: Vec::new(),
                            key: g.key,
                            resumes,
                        };
                        let (slots_used, context, tx) = (&slots_used, g.context, tx.clone());
                        scope.spawn(move || {
                            handler.run(session, context);
                            let _ = tx.send(Event::Ended(joined));
                            slots_used.fetch_sub(1, Ordering::AcqRel);
                        });
                    }
                }
                Ok(())
            })
        })
    }
}

/// A connection that comes back to a running session (`Purpose::Resume`):
/// handed to the session once it proved the session's secret and was
/// welcomed, or refused.
fn come_back(a: Arrival, mode: Mode, running: &mut HashMap<[u8; 16], Running>) -> Result<(), Refusal> {
    let refuse = |a: Arrival, code, why: &str| Err(Refusal { conn: Some(a.conn), peer: a.peer, code, why: why.into() });
    let o = &a.offer;
    let Some(r) = running.get(&o.session) else {
        return refuse(a, ErrorCode::NotInSession, "no running session to come back to");
    };
    if o.mode != mode || o.stream_count != r.streams || o.stream_index >= r.streams {
        return refuse(a, ErrorCode::NotInSession, "not a stream of the session named");
    }
    if !r.key.stream_proof_ok(&a.transcript, &a.stream_proof) {
        return refuse(a, ErrorCode::Auth, "the stream did not prove the session's secret");
    }
    let (index, session) = (o.stream_index, o.session);
    if send_welcome(&a.conn, session, r.caps).is_ok() && r.comebacks.send((index, a.conn)).is_err() {
        // The session ended meanwhile; its connection closes here.
        running.remove(&session);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Auth, Purpose};
    use crate::hello::{CAP_LZ4, PROTOCOL_VERSION};
    use crate::session::{connect_session, new_session_id, open_stream, StreamPlan};
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
        let acc = Acceptor::bind(&["127.0.0.1:0".parse().unwrap()], Auth::Insecure).unwrap();
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
            let plan = |n| StreamPlan::new(vec![addr], n, Auth::Insecure);
            let a = connect_session(&plan(3), &hello(3, 1)).unwrap();
            let (mut a, wa) = (a.streams, a.welcome);
            let mut b = connect_session(&plan(1), &hello(1, 1)).unwrap().streams;
            assert_eq!(wa.caps, CAP_LZ4);
            for (i, st) in a.iter_mut().chain(b.iter_mut()).enumerate() {
                st.write_all(&[i as u8]).unwrap();
                let mut r = [0u8];
                st.read_exact(&mut r).unwrap();
                assert_eq!(r[0], i as u8 + 1);
            }
            let err = connect_session(&plan(1), &hello(1, 0xff)).unwrap_err();
            assert!(err.to_string().contains("refused by the handler"), "{err}");
            let mut m = hello(1, 1);
            m.mode = Mode::Memory;
            let err = connect_session(&plan(1), &m).unwrap_err();
            assert!(err.to_string().contains("serves Stream"), "{err}");
        });
        assert_eq!(opened, vec![3, 1]);
    }

    #[test]
    fn a_stream_of_no_session_is_refused() {
        let opened = with_server(|addr| {
            let mut h = hello(2, 1);
            h.stream_index = 1;
            // connect_session numbers streams itself: open stream 1 by hand.
            let plan = StreamPlan::new(vec![addr], 2, Auth::Insecure);
            let (conn, _, _) = open_stream(&plan, &h, 1, 1, Purpose::Join, None).unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            crate::handshake::send_hello(&conn, &h, deadline, "t").unwrap();
            let err = crate::handshake::read_welcome(&conn, h.session, h.caps, deadline, "t").unwrap_err();
            assert!(err.to_string().contains("no such session"), "{err}");
        });
        assert!(opened.is_empty());
    }

    /// Grants `CAP_RESUME` to every session; each waits for one of its
    /// streams to come back and echoes a byte on it, plus its index.
    struct TakesBack;

    impl SessionHandler for TakesBack {
        type Context = ();

        fn open(&self, hello: &Hello, _peer: SocketAddr) -> Result<(u64, ()), ErrorMsg> {
            Ok((hello.caps & CAP_RESUME, ()))
        }

        fn run(&self, session: Accepted, _: ()) {
            let Some(resumes) = session.resumes else { return };
            if let Some((i, mut conn)) = resumes.next(Duration::from_secs(10)) {
                let mut b = [0u8];
                if conn.read_exact(&mut b).is_ok() {
                    let _ = conn.write_all(&[b[0] + i as u8]);
                }
            }
        }
    }

    /// A running session granted `CAP_RESUME` takes back a stream that
    /// proves its secret; a comeback with another secret, to a session not
    /// granted it, or to one that ended, is refused.
    #[test]
    fn only_a_stream_proving_its_running_session_comes_back() {
        use crate::link::reconnect;
        let acc = Acceptor::bind(&["127.0.0.1:0".parse().unwrap()], Auth::Insecure).unwrap();
        let plan = StreamPlan::new(acc.local_addrs(), 2, Auth::Insecure);
        let stop = AtomicBool::new(false);
        let never = || false;
        let within = Duration::from_secs(5);
        std::thread::scope(|s| {
            let server = s.spawn(|| acc.serve(Mode::Stream, &TakesBack, &stop));
            let mut h = hello(2, 1);
            h.caps = CAP_RESUME;
            let session = connect_session(&plan, &h).unwrap();
            assert_eq!(session.welcome.caps, CAP_RESUME);
            let other = connect_session(&plan, &hello(2, 1)).unwrap();
            let e = reconnect(&plan, &h, &other.key, 1, within, &never).unwrap_err();
            assert!(e.to_string().contains("secret"), "{e}");
            let mut not_granted = hello(2, 1);
            not_granted.session = new_session_id();
            let plain = connect_session(&plan, &not_granted).unwrap();
            let e = reconnect(&plan, &not_granted, &plain.key, 1, within, &never).unwrap_err();
            assert!(e.to_string().contains("no running session"), "{e}");
            // The real comeback reaches the session.
            let mut back = reconnect(&plan, &h, &session.key, 1, within, &never).unwrap();
            back.write_all(&[40]).unwrap();
            let mut b = [0u8];
            back.read_exact(&mut b).unwrap();
            assert_eq!(b[0], 41);
            // The session has ended: nothing comes back to it any more.
            let t = Instant::now();
            let e = loop {
                match reconnect(&plan, &h, &session.key, 0, within, &never) {
                    Err(e) => break e,
                    Ok(_) if t.elapsed() < Duration::from_secs(10) => std::thread::sleep(Duration::from_millis(50)),
                    Ok(_) => panic!("a stream came back to a session that ended"),
                }
            };
            assert!(e.to_string().contains("no running session"), "{e}");
            drop((session, other, plain));
            stop.store(true, Ordering::Relaxed);
            server.join().unwrap().unwrap();
        });
    }
}
