//! Links that survive a lost connection: a stream slot whose connection
//! can be replaced while the session goes on (`CAP_RESUME`: post-copy, and
//! the byte-stream relay).
//!
//! The source reconnects a broken stream with [`reconnect`]: a new
//! connection whose authentication offer says it comes back
//! (`Purpose::Resume`) and proves the session's secret, not merely its id;
//! the destination takes it with [`Resumes`] (or, serving many sessions,
//! [`crate::serve`] does) and answers `Welcome`. Both ends then swap the
//! connection in the stream's [`Link`]; threads blocked on the old one see
//! it fail and pick up the new one. Frames lost with the old connection are
//! the session's to recover (post-copy asks for missing pages again, the
//! relay sends what was not acknowledged again).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::accept::Acceptor;
use crate::auth::{Purpose, SessionKey};
use crate::conn::Conn;
use crate::handshake::{read_welcome, send_welcome, Refusal};
use crate::hello::{ErrorCode, Hello};
use crate::net::TransportError;
use crate::session::{open_stream, StreamPlan};

/// One stream's connection, replaceable.
#[derive(Debug)]
pub struct Link {
    cur: Mutex<(Arc<Conn>, u64)>,
    changed: Condvar,
    /// Held while one thread reconnects, so two do not race.
    repairing: Mutex<()>,
    /// Connections replaced so far.
    replaced: AtomicU64,
    /// Held while a thread writes one whole frame.
    writes: Mutex<()>,
    /// The route the connection takes, counted from the stream's own (0).
    route: AtomicUsize,
    /// The route found down, whose connection was given up: a reconnect
    /// tries the others first (`usize::MAX`: none).
    down: AtomicUsize,
    /// What happened to the link, and since when it has no connection.
    history: Mutex<History>,
    /// The current connection's ends (`local -> peer`), taken while it was
    /// up: a connection the kernel killed no longer knows its peer.
    ends: Mutex<String>,
}

#[derive(Debug, Default)]
struct History {
    events: Vec<LinkEvent>,
    /// The loss not yet followed by a new connection, and its generation.
    lost: Option<(Instant, u64)>,
}

/// Something that happened to a stream's link.
#[derive(Clone, Debug, PartialEq)]
pub struct LinkEvent {
    /// When.
    pub at: Instant,
    /// What.
    pub change: LinkChange,
    /// The connection concerned, as `local -> peer` addresses: the one lost
    /// for [`LinkChange::Down`] and [`LinkChange::Lost`], the new one
    /// otherwise.
    pub route: String,
}

/// What happened to a link.
#[derive(Clone, Debug, PartialEq)]
pub enum LinkChange {
    /// Its path stopped acknowledging what was sent for this long: the
    /// connection was given up and the stream moved to another route.
    Down {
        /// How long nothing in flight was acknowledged.
        silent: Duration,
    },
    /// Its connection failed (reset, closed where it may not be).
    Lost,
    /// A new connection took the lost one's place.
    Resumed {
        /// Time without a connection, from the loss to this one.
        after: Duration,
        /// Frames or chunks sent again on it.
        resent: u64,
    },
    /// Its own route answered again and the stream went back to it.
    Returned {
        /// Frames or chunks sent again on it.
        resent: u64,
    },
}

impl Link {
    /// A link over `s`.
    pub fn new(s: Conn) -> Self {
        let route = ends(&s);
        Self {
            cur: Mutex::new((Arc::new(s), 0)),
            changed: Condvar::new(),
            repairing: Mutex::new(()),
            replaced: AtomicU64::new(0),
            writes: Mutex::new(()),
            route: AtomicUsize::new(0),
            down: AtomicUsize::new(usize::MAX),
            history: Mutex::new(History::default()),
            ends: Mutex::new(route),
        }
    }

    /// The connection now, and its generation (0 for the first).
    pub fn current(&self) -> (Arc<Conn>, u64) {
        let c = self.cur.lock().expect("link lock");
        (c.0.clone(), c.1)
    }

    /// Puts `s` in place of the current connection, which is shut down:
    /// the stream came back on `s`.
    pub fn replace(&self, s: Conn) {
        let mut h = self.history.lock().expect("link history");
        let after = h.lost.take().map_or(Duration::ZERO, |(t, _)| t.elapsed());
        h.events.push(LinkEvent {
            at: Instant::now(),
            change: LinkChange::Resumed { after, resent: 0 },
            route: ends(&s),
        });
        drop(h);
        self.replaced.fetch_add(1, Ordering::Relaxed);
        self.put(s);
    }

    fn put(&self, s: Conn) {
        *self.ends.lock().expect("link ends") = ends(&s);
        let mut c = self.cur.lock().expect("link lock");
        let _ = c.0.shutdown(std::net::Shutdown::Both);
        *c = (Arc::new(s), c.1 + 1);
        self.changed.notify_all();
    }

    /// Notes that generation `seen` of the connection failed, once per
    /// generation (a loss the watchdog found is noted already).
    pub fn note_lost(&self, seen: u64) {
        if self.current().1 != seen {
            return;
        }
        let route = self.ends.lock().expect("link ends").clone();
        let mut h = self.history.lock().expect("link history");
        if h.lost.is_none_or(|(_, lg)| lg != seen) {
            h.lost = Some((Instant::now(), seen));
            h.events.push(LinkEvent { at: Instant::now(), change: LinkChange::Lost, route });
        }
    }

    /// Adds `n` frames sent again to the latest comeback.
    pub fn note_resent(&self, n: u64) {
        let mut h = self.history.lock().expect("link history");
        if let Some(LinkEvent {
            change: LinkChange::Resumed { resent, .. } | LinkChange::Returned { resent }, ..
        }) = h.events.last_mut()
        {
            *resent += n;
        }
    }

    /// What happened to the link so far, oldest first.
    pub fn events(&self) -> Vec<LinkEvent> {
        self.history.lock().expect("link history").events.clone()
    }

    /// The route of the connection now, counted from the stream's own (0).
    pub fn route(&self) -> usize {
        self.route.load(Ordering::Relaxed)
    }

    /// Waits up to `timeout` for a connection newer than generation `seen`.
    pub fn wait_newer(&self, seen: u64, timeout: Duration) -> Option<(Arc<Conn>, u64)> {
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
        dial: impl FnOnce() -> Result<Conn, TransportError>,
    ) -> Result<(Arc<Conn>, u64), TransportError> {
        let _one = self.repairing.lock().expect("repair lock");
        let (s, g) = self.current();
        if g > seen {
            return Ok((s, g));
        }
        self.note_lost(seen);
        self.replace(dial()?);
        Ok(self.current())
    }

    /// After generation `seen` of stream `index` failed: dials it again as
    /// `how` says unless another thread already did, within `within` or
    /// until `give_up` says so, and returns the connection to use. The
    /// stream's own route is tried first, unless the watchdog found it
    /// down ([`watch`]): then the routes after it.
    pub fn rejoin(
        &self,
        seen: u64,
        how: &Rejoin<'_>,
        index: u16,
        within: Duration,
        give_up: &dyn Fn() -> bool,
    ) -> Result<(Arc<Conn>, u64), TransportError> {
        self.repair(seen, || {
            let down = self.down.load(Ordering::Relaxed);
            let first = if down == usize::MAX { 0 } else { down + 1 };
            let (conn, route) = reconnect_from(how.plan, how.hello, how.key, index, first, within, give_up)?;
            if let Some(ready) = how.ready {
                ready(&conn).map_err(|e| TransportError::io(format!("stream {index}"), e))?;
            }
            self.route.store(route, Ordering::Relaxed);
            self.down.store(usize::MAX, Ordering::Relaxed);
            Ok(conn)
        })
    }

    /// Whether the watchdog gave the current connection up ([`watch`]).
    pub fn given_up(&self) -> bool {
        self.down.load(Ordering::Relaxed) != usize::MAX
    }

    /// Serialises writers: hold the guard while writing one whole frame.
    pub fn lock_writes(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writes.lock().expect("write lock")
    }

    /// The writers' lock, unless another writer holds it now (for frames
    /// that may be skipped, such as keepalives).
    pub fn try_lock_writes(&self) -> Option<std::sync::MutexGuard<'_, ()>> {
        self.writes.try_lock().ok()
    }

    /// How many times a lost connection was replaced (a stream going back
    /// to its own route, [`watch`], is not counted: nothing was lost).
    pub fn replaced(&self) -> u64 {
        self.replaced.load(Ordering::Relaxed)
    }

    /// Shuts the current connection down both ways.
    pub fn shutdown(&self) {
        let _ = self.current().0.shutdown(std::net::Shutdown::Both);
    }

    /// Gives up generation `g`, whose path stopped answering for `silent`:
    /// notes it, marks its route down and shuts it down, so the threads
    /// using it fail over. False if `g` is no longer current.
    fn give_up_route(&self, g: u64, silent: Duration) -> bool {
        let (conn, now) = self.current();
        if now != g {
            return false;
        }
        let route = self.ends.lock().expect("link ends").clone();
        let mut h = self.history.lock().expect("link history");
        h.lost = Some((Instant::now().checked_sub(silent).unwrap_or_else(Instant::now), g));
        h.events.push(LinkEvent { at: Instant::now(), change: LinkChange::Down { silent }, route });
        drop(h);
        self.down.store(self.route(), Ordering::Relaxed);
        let _ = conn.shutdown(std::net::Shutdown::Both);
        true
    }

    /// Moves a stream that took another route back to its own, if that
    /// answers now: dials it while holding off every other reconnect of
    /// the link, and puts the new connection in place of the current one
    /// (generation `g`, still working: what it had in flight is the
    /// session's to send again, as after any loss).
    fn go_home(&self, g: u64, how: &Rejoin<'_>, index: u16) -> bool {
        let _one = self.repairing.lock().expect("repair lock");
        if self.current().1 != g || self.route() == 0 {
            return false;
        }
        let mut p = how.plan.clone();
        p.connect_timeout = p.connect_timeout.min(HOME_DIAL);
        let Ok(conn) = reconnect_once(&p, how.hello, how.key, index, usize::from(index)) else { return false };
        if let Some(ready) = how.ready {
            if ready(&conn).is_err() {
                return false;
            }
        }
        let mut h = self.history.lock().expect("link history");
        h.events.push(LinkEvent { at: Instant::now(), change: LinkChange::Returned { resent: 0 }, route: ends(&conn) });
        drop(h);
        self.route.store(0, Ordering::Relaxed);
        self.put(conn);
        true
    }
}

/// A connection's ends, `local -> peer`.
fn ends(c: &Conn) -> String {
    let name = |a: std::io::Result<SocketAddr>| a.map_or_else(|_| "?".into(), |a| a.to_string());
    format!("{} -> {}", name(c.tcp().local_addr()), name(c.tcp().peer_addr()))
}

/// Readies a new connection before any thread uses it.
pub type Ready<'a> = dyn Fn(&Conn) -> std::io::Result<()> + Sync + 'a;

/// How the end that opened a session dials its streams again.
#[derive(Clone, Copy)]
pub struct Rejoin<'a> {
    /// Where the streams go and how they leave.
    pub plan: &'a StreamPlan,
    /// The session's `Hello`.
    pub hello: &'a Hello,
    /// The session's secret, which a stream that comes back proves.
    pub key: &'a SessionKey,
    /// Readies a new connection before any thread uses it (timeouts).
    pub ready: Option<&'a Ready<'a>>,
}

impl std::fmt::Debug for Rejoin<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rejoin").field("plan", self.plan).finish_non_exhaustive()
    }
}

/// How often [`watch`] looks at the links.
const WATCH_TICK: Duration = Duration::from_millis(200);

/// How often a stream away from its own route tries it again.
const HOME_EVERY: Duration = Duration::from_secs(2);

/// The longest a try of the own route may wait for the connection.
const HOME_DIAL: Duration = Duration::from_secs(1);

/// Watches the streams of a session this end opened, until `stop` says so:
/// a stream whose path acknowledges nothing of what it sent for
/// `link_timeout` (a NIC or link down, a cable pulled; a peer that is
/// merely slow still acknowledges) is given up, so its threads reconnect
/// it by another route ([`Link::rejoin`]) and the session goes on over the
/// links that work; a stream away from its own route tries that route
/// again every few seconds and goes back to it once it answers.
pub fn watch(links: &[&Link], how: &Rejoin<'_>, link_timeout: Duration, stop: &(dyn Fn() -> bool + Sync)) {
    let routes = routes(how.plan);
    // Per link: the generation seen silent, when, and how long it had
    // been silent then.
    let mut silent: Vec<Option<(u64, Instant, Duration)>> = vec![None; links.len()];
    let mut tried: Vec<Option<Instant>> = vec![None; links.len()];
    let homing: Vec<AtomicBool> = links.iter().map(|_| AtomicBool::new(false)).collect();
    std::thread::scope(|s| {
        while !stop() {
            for (i, link) in links.iter().enumerate() {
                let (conn, g) = link.current();
                // Silent past a few round trips (and a retransmission
                // timeout's floor) with data in flight: counted from the
                // last acknowledgement, and confirmed by a later look at
                // least two round trips on, so a segment written after a
                // lull is not taken for a lost one before its answer had
                // time to come.
                let quiet = crate::net::unanswered(conn.tcp())
                    .filter(|&(since, rtt)| since >= (rtt * 4).max(Duration::from_millis(200)));
                if let Some((since, rtt)) = quiet {
                    match silent[i] {
                        Some((sg, seen, before)) if sg == g => {
                            let looked = seen.elapsed();
                            let total = before + looked;
                            if looked >= (rtt * 2).max(WATCH_TICK)
                                && total >= link_timeout
                                && link.give_up_route(g, total)
                            {
                                tracing::warn!(stream = i, silent = ?total, route = link.route(),
                                    "link down: nothing acknowledged; the stream moves to another route");
                                silent[i] = None;
                            }
                        }
                        _ => silent[i] = Some((g, Instant::now(), since)),
                    }
                    continue;
                }
                silent[i] = None;
                let due = tried[i].is_none_or(|t| t.elapsed() >= HOME_EVERY);
                if routes > 1 && link.route() != 0 && due && !homing[i].swap(true, Ordering::AcqRel) {
                    tried[i] = Some(Instant::now());
                    let homing = &homing[i];
                    s.spawn(move || {
                        if link.go_home(g, how, i as u16) {
                            tracing::info!(stream = i, "the stream's own link answers again; back on it");
                        }
                        homing.store(false, Ordering::Release);
                    });
                }
            }
            // Sliced, so the session's end is not held up by a tick.
            let tick = Instant::now() + WATCH_TICK;
            while Instant::now() < tick && !stop() {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    });
}

/// Reconnects stream `index` of the session `hello` describes, trying
/// until `within` has passed or `give_up` says so: a new authenticated
/// connection that proves the session's secret `key`, and the
/// destination's `Welcome`. The stream's own route (destination address
/// and way out) is tried first, then the plan's other routes in turn, so a
/// stream whose link stays down comes back over another; no attempt runs
/// past `within`.
pub fn reconnect(
    plan: &StreamPlan,
    hello: &Hello,
    key: &SessionKey,
    index: u16,
    within: Duration,
    give_up: &dyn Fn() -> bool,
) -> Result<Conn, TransportError> {
    reconnect_from(plan, hello, key, index, 0, within, give_up).map(|(c, _)| c)
}

/// [`reconnect`], trying the routes from the `first`-th after the stream's
/// own, in turn; returns the connection and its route.
fn reconnect_from(
    plan: &StreamPlan,
    hello: &Hello,
    key: &SessionKey,
    index: u16,
    first: usize,
    within: Duration,
    give_up: &dyn Fn() -> bool,
) -> Result<(Conn, usize), TransportError> {
    let deadline = Instant::now() + within;
    let routes = routes(plan);
    let mut attempt = first;
    loop {
        let offset = attempt % routes;
        let route = usize::from(index) + offset;
        let mut p = plan.clone();
        let left = deadline.saturating_duration_since(Instant::now());
        p.connect_timeout = plan.connect_timeout.min(left).max(Duration::from_millis(100));
        if routes > 1 {
            // Another route may answer where this one does not.
            p.connect_timeout = p.connect_timeout.min(Duration::from_secs(2));
        }
        match reconnect_once(&p, hello, key, index, route) {
            Ok(s) => return Ok((s, offset)),
            Err(e @ (TransportError::Peer(_) | TransportError::Auth(_))) => return Err(e),
            Err(e) if Instant::now() >= deadline || give_up() => return Err(e),
            Err(e) => {
                tracing::debug!(stream = index, route, error = %e, "reconnect attempt failed");
                if (attempt + 1) % routes == first % routes {
                    // Every route was tried once: not so fast again.
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        attempt += 1;
    }
}

/// How many distinct routes (destination address, way out) a plan's
/// streams take: stream `i` takes `dests[i % d]` and `via[i % v]`.
fn routes(plan: &StreamPlan) -> usize {
    let (d, v) = (plan.dests.len().max(1), plan.via.len().max(1));
    let gcd = |mut a: usize, mut b: usize| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    d / gcd(d, v) * v
}

fn reconnect_once(
    plan: &StreamPlan,
    hello: &Hello,
    key: &SessionKey,
    index: u16,
    route: usize,
) -> Result<Conn, TransportError> {
    let name = format!("stream {index} (reconnecting)");
    let (conn, _, _) = open_stream(plan, hello, index, route, Purpose::Resume, Some(key))?;
    // A live destination answers at once; one that is gone may still
    // accept the connection in its backlog and never answer.
    let deadline = Instant::now() + Duration::from_secs(2).min(plan.connect_timeout);
    read_welcome(&conn, hello.session, hello.caps, deadline, &name)?;
    Ok(conn)
}

/// How often the comebacks thread looks whether to stop: a session's end
/// waits for it (dropping [`Resumes`]).
const STOP_TICK: Duration = Duration::from_millis(10);

/// Takes back the streams of one running session that come back after a
/// lost connection: connections are admitted and authenticated as
/// everywhere else, several at once, each bounded by the handshake
/// timeout, so strangers cannot hold the door against a real comeback; a
/// stream is taken only if it proves the session's secret.
pub struct Resumes {
    rx: mpsc::Receiver<(u16, Conn)>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Resumes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resumes").finish_non_exhaustive()
    }
}

impl Resumes {
    /// Starts taking back streams of session `session` (of `streams`
    /// streams, secret `key`) on `acceptor`'s listeners; `log` hears of
    /// every refusal.
    pub fn start(
        acceptor: Acceptor,
        session: [u8; 16],
        streams: u16,
        caps: u64,
        key: SessionKey,
        log: Arc<dyn Fn(SocketAddr, String) + Send + Sync>,
    ) -> Self {
        let (out, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let pipeline = acceptor.pipeline();
            let note = |peer: SocketAddr, why: String| log(peer, why);
            acceptor.listening(&pipeline, &note, || {
                while !stop2.load(Ordering::Relaxed) {
                    match pipeline.rx.recv_timeout(STOP_TICK) {
                        Ok(Ok(a)) => {
                            let peer = a.peer;
                            let wrong = if a.offer.purpose != Purpose::Resume {
                                Some((ErrorCode::NotInSession, "a session is running here"))
                            } else if a.offer.session != session || a.offer.stream_count != streams {
                                Some((ErrorCode::NotInSession, "not a stream of the session being served"))
                            } else if !key.stream_proof_ok(&a.transcript, &a.stream_proof) {
                                Some((ErrorCode::Auth, "the stream did not prove the session's secret"))
                            } else {
                                None
                            };
                            let verdict = match wrong {
                                None => Ok((a.offer.stream_index, a.conn)),
                                Some((code, why)) => Err(Refusal { conn: Some(a.conn), peer, code, why: why.into() }),
                            };
                            match verdict {
                                Ok((i, conn)) => {
                                    if send_welcome(&conn, session, caps).is_ok() && out.send((i, conn)).is_err() {
                                        return;
                                    }
                                }
                                Err(r) => {
                                    log(peer, r.why.clone());
                                    r.send();
                                }
                            }
                        }
                        Ok(Err(r)) => {
                            log(r.peer, r.why.clone());
                            r.send();
                        }
                        Err(_) => {}
                    }
                }
            });
        });
        Resumes { rx, stop, thread: Some(thread) }
    }

    /// Comebacks another loop takes and welcomes (a server's, which
    /// serves many sessions on its listeners): what it sends on the
    /// returned sender comes out of [`Resumes::next`].
    pub(crate) fn fed() -> (mpsc::Sender<(u16, Conn)>, Self) {
        let (tx, rx) = mpsc::channel();
        (tx, Resumes { rx, stop: Arc::new(AtomicBool::new(false)), thread: None })
    }

    /// Waits up to `timeout` for a stream that came back: its index and
    /// connection, already welcomed.
    pub fn next(&self, timeout: Duration) -> Option<(u16, Conn)> {
        self.rx.recv_timeout(timeout).ok()
    }
}

impl Drop for Resumes {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Auth, Psk};
    use crate::hello::{Mode, PROTOCOL_VERSION};
    use crate::session::{connect_session, new_session_id};

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

    fn psk(b: u8) -> Auth {
        Auth::Psk(Psk::from_bytes(&[b; 32]).unwrap())
    }

    /// A session of two streams, accepted, whose listeners then take
    /// comebacks of it.
    fn resumable_session(acc: &Acceptor, plan: &StreamPlan, h: &Hello) -> (crate::Connected, Resumes) {
        std::thread::scope(|s| {
            let server = s.spawn(|| acc.accept_session(Mode::Memory, &mut |_| Ok(0), None).unwrap());
            let session = connect_session(plan, h).unwrap();
            let accepted = server.join().unwrap();
            let log = Arc::new(|_: SocketAddr, _: String| {});
            (session, Resumes::start(acc.try_clone().unwrap(), h.session, 2, 0, accepted.key.clone(), log))
        })
    }

    /// A session of two streams, accepted; then the listeners take
    /// comebacks of it.
    #[test]
    fn only_a_stream_proving_the_session_comes_back() {
        let acc = Acceptor::bind(&["127.0.0.1:0".parse().unwrap()], psk(1)).unwrap();
        let plan = StreamPlan::new(acc.local_addrs(), 2, psk(1));
        let h = hello(new_session_id());
        let never = || false;
        let (session, resumes) = resumable_session(&acc, &plan, &h);
        // The session id alone, with another session's secret: refused.
        let other = connect_session(&plan, &hello(new_session_id())).err();
        assert!(other.is_some(), "a second session is refused while one runs");
        let mut sniffed = StreamPlan::new(acc.local_addrs(), 2, psk(1));
        sniffed.connect_timeout = Duration::from_secs(5);
        let forged = SessionKey::derive(&psk(1), &crate::auth::Transcript { offer: [0; 72], challenge: [0; 40] }, None);
        let e = reconnect(&sniffed, &h, &forged, 1, Duration::from_secs(5), &never).unwrap_err();
        assert!(e.to_string().contains("secret"), "{e}");
        // A stranger without the key: refused before anything else.
        let stranger = StreamPlan::new(acc.local_addrs(), 2, psk(2));
        let e = reconnect(&stranger, &h, &session.key, 1, Duration::from_secs(5), &never).unwrap_err();
        assert!(matches!(e, TransportError::Peer(_) | TransportError::Auth(_)), "{e}");
        assert!(resumes.next(Duration::from_millis(300)).is_none(), "nothing was taken back");
        // The real source comes back.
        let ok = reconnect(&plan, &h, &session.key, 1, Duration::from_secs(5), &never).unwrap();
        let (i, conn) = resumes.next(Duration::from_secs(10)).expect("the stream came back");
        assert_eq!(i, 1);
        assert_eq!(conn.tcp().peer_addr().unwrap(), ok.tcp().local_addr().unwrap());
    }

    /// A stream whose own destination address no longer answers comes
    /// back by the plan's other one, within the time given.
    #[test]
    fn a_stream_comes_back_by_another_route_when_its_own_is_down() {
        let acc = Acceptor::bind(&["127.0.0.1:0".parse().unwrap()], psk(1)).unwrap();
        let plan = StreamPlan::new(acc.local_addrs(), 2, psk(1));
        let h = hello(new_session_id());
        let never = || false;
        let (session, resumes) = resumable_session(&acc, &plan, &h);
        // Stream 0's own address is a port nobody listens on now.
        let down = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let two = StreamPlan::new(vec![down, acc.local_addrs()[0]], 2, psk(1));
        let back = reconnect(&two, &h, &session.key, 0, Duration::from_secs(5), &never).unwrap();
        assert_eq!(back.tcp().peer_addr().unwrap(), acc.local_addrs()[0]);
        let (i, _) = resumes.next(Duration::from_secs(10)).expect("the stream came back");
        assert_eq!(i, 0);
        // With no route up, it gives up when the time is over.
        let none = StreamPlan::new(vec![down], 2, psk(1));
        let t = Instant::now();
        assert!(reconnect(&none, &h, &session.key, 0, Duration::from_millis(500), &never).is_err());
        assert!(t.elapsed() < Duration::from_secs(3), "took {:?}", t.elapsed());
    }

    /// A stream whose route was found down comes back by the next one,
    /// goes home once its own answers, and its link says so.
    #[test]
    fn a_stream_given_up_as_down_takes_the_next_route_and_goes_home() {
        let addrs = ["127.0.0.1:0".parse().unwrap(), "127.0.0.1:0".parse().unwrap()];
        let acc = Acceptor::bind(&addrs, psk(1)).unwrap();
        let plan = StreamPlan::new(acc.local_addrs(), 2, psk(1));
        let h = hello(new_session_id());
        let never = || false;
        let (session, resumes) = resumable_session(&acc, &plan, &h);
        let link = Link::new(session.streams.into_iter().next().unwrap());
        let how = Rejoin { plan: &plan, hello: &h, key: &session.key, ready: None };
        let (_, g) = link.current();
        assert!(link.give_up_route(g, Duration::from_secs(1)));
        assert!(link.given_up());
        let (conn, g) = link.rejoin(g, &how, 0, Duration::from_secs(5), &never).unwrap();
        // Its own route (the first address) works, but was found down: the
        // next one is tried first.
        assert_eq!(conn.tcp().peer_addr().unwrap(), acc.local_addrs()[1]);
        assert_eq!((link.route(), link.given_up()), (1, false));
        assert_eq!(resumes.next(Duration::from_secs(10)).map(|(i, _)| i), Some(0));
        assert!(link.go_home(g, &how, 0), "its own route answers");
        assert_eq!(link.current().0.tcp().peer_addr().unwrap(), acc.local_addrs()[0]);
        assert_eq!(resumes.next(Duration::from_secs(10)).map(|(i, _)| i), Some(0));
        let changes: Vec<_> = link.events().into_iter().map(|e| e.change).collect();
        assert!(
            matches!(
                changes[..],
                [
                    LinkChange::Down { .. },
                    LinkChange::Resumed { after, resent: 0 },
                    LinkChange::Returned { resent: 0 }
                ] if after >= Duration::from_secs(1)
            ),
            "{changes:?}"
        );
        link.note_resent(3);
        assert!(matches!(link.events().last().unwrap().change, LinkChange::Returned { resent: 3 }));
        // A connection that merely carries data has nothing unanswered.
        assert!(crate::net::unanswered(link.current().0.tcp()).is_none());
    }

    #[test]
    fn a_link_is_repaired_once_per_failure() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let link = Link::new(Conn::Tcp(std::net::TcpStream::connect(addr).unwrap()));
        let (_, g0) = link.current();
        let dials = AtomicU64::new(0);
        let dial = || {
            dials.fetch_add(1, Ordering::Relaxed);
            std::net::TcpStream::connect(addr).map(Conn::Tcp).map_err(|e| TransportError::io("dial", e))
        };
        let (_, g1) = link.repair(g0, dial).unwrap();
        // A second thread that saw the same failure gets the new connection.
        let (_, g2) = link.repair(g0, dial).unwrap();
        assert_eq!((g1, g2, dials.load(Ordering::Relaxed), link.replaced()), (1, 1, 1, 1));
        assert!(link.wait_newer(g1, Duration::from_millis(10)).is_none());
    }
}
