//! The accepting side: listeners, admission of connections into their
//! handshakes, and gathering the streams of one session.
//!
//! Every accepted connection runs its handshake (the private `handshake` module) on a
//! thread of its own, at most [`MAX_PENDING_HANDSHAKES`] at once; when the
//! table is full the oldest handshake is cut to make room, so a crowd of
//! slow strangers can delay a real peer by one handshake at most, never
//! lock it out. A handshake has [`HANDSHAKE_TIMEOUT`] in all.
//!
//! Only a connection that proved itself reaches the session rules: the
//! first stream 0 whose `Hello` the embedder accepts claims the session,
//! later streams must prove the session's secret and agree with stream 0.
//! A claim whose streams do not all arrive within the gather timeout is
//! dropped and the acceptor goes on waiting. Nothing a peer does ends the
//! wait early: refusals are sent to the peer and logged, failing `accept`
//! calls (a host out of descriptors) slow the loop down and are logged.

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use crate::auth::{Auth, Purpose, SessionKey};
use crate::conn::Conn;
pub use crate::handshake::HANDSHAKE_TIMEOUT;
use crate::handshake::{answer, send_welcome, Arrival, Refusal};
use crate::hello::{ErrorCode, ErrorMsg, Hello, Mode};
use crate::link::Resumes;
use crate::net::{listen, TransportError};

/// Handshakes in progress at most. Each holds a thread and a few KiB until
/// its deadline; past this, the oldest is cut for the newest.
pub const MAX_PENDING_HANDSHAKES: usize = 64;

/// How long the remaining streams of a claimed session may take to arrive:
/// the source opens them one after the other, each a few round trips.
pub const GATHER_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the accept loop rests after `accept` failed for lack of a
/// resource (descriptors, memory), so it does not spin while the host is
/// short.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How long a listener thread waits in `accept` before it looks whether to
/// stop, and how often serving loops look at their deadlines.
const ACCEPT_TICK: Duration = Duration::from_millis(100);

/// Wakes threads waiting for a listener to have a connection: an eventfd
/// that, once written, stays readable.
struct Wake(Option<std::os::fd::OwnedFd>);

impl Wake {
    /// A waker; without one (no eventfd), waits end at their timeout.
    fn new() -> Self {
        use std::os::fd::FromRawFd;
        // SAFETY: eventfd takes no pointers.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        // SAFETY: a non-negative result is a new descriptor nothing else owns.
        Wake((fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }))
    }

    /// Wakes every waiter, now and later.
    fn wake(&self) {
        use std::os::fd::AsRawFd;
        if let Some(fd) = &self.0 {
            let one: u64 = 1;
            // SAFETY: writes the 8 bytes of `one`, which lives on this frame.
            unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }

    /// Waits up to `timeout` for `l` to have a connection to accept (true)
    /// or for the wake-up (false).
    fn wait_for(&self, l: &TcpListener, timeout: Duration) -> bool {
        use std::os::fd::AsRawFd;
        let mut fds = [libc::pollfd { fd: l.as_raw_fd(), events: libc::POLLIN, revents: 0 }; 2];
        let n = match &self.0 {
            Some(w) => {
                fds[1] = libc::pollfd { fd: w.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                2
            }
            None => 1,
        };
        // SAFETY: `fds` holds `n` initialised pollfds and outlives the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), n as libc::nfds_t, timeout.as_millis() as libc::c_int) };
        rc > 0 && fds[1].revents == 0 && fds[0].revents != 0
    }
}

/// Listens for sessions on one or more addresses.
#[derive(Debug)]
pub struct Acceptor {
    listeners: Vec<TcpListener>,
    /// How every connection must prove itself.
    pub auth: Auth,
    /// How long the remaining streams may take once the first arrived.
    pub gather_timeout: Duration,
    /// How long one connection's handshake may take in all.
    pub handshake_timeout: Duration,
    /// When `accept` last failed, to log such failures once a while.
    trouble: Arc<Mutex<Option<Instant>>>,
    /// Handshakes in flight and their outcomes. They belong to the
    /// acceptor, not to one call: a handshake still running when one
    /// session was accepted is judged by the next call.
    pipeline: Mutex<Pipeline>,
}

/// The handshake threads' table and their channel.
pub(crate) struct Pipeline {
    pub(crate) tx: mpsc::Sender<Handshaken>,
    pub(crate) rx: mpsc::Receiver<Handshaken>,
    pub(crate) admission: Arc<Admission>,
}

impl Default for Pipeline {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel();
        Pipeline { tx, rx, admission: Arc::default() }
    }
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline").finish_non_exhaustive()
    }
}

/// An accepted session: its `Hello`, its streams ordered by index, and the
/// secret its streams prove.
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
    /// The session's secret: a stream coming back must prove it.
    pub key: SessionKey,
    /// A served session granted `CAP_RESUME` ([`Acceptor::serve`]): its
    /// streams that come back after a lost connection, proven and
    /// welcomed. `None` from [`Acceptor::accept_session`], whose caller
    /// holds the listeners and takes comebacks with [`Resumes::start`].
    pub resumes: Option<Resumes>,
}

/// What the embedder says about a session's first `Hello`: the capabilities
/// it grants, or why not.
pub type HelloCheck<'a> = dyn FnMut(&Hello) -> Result<u64, ErrorMsg> + 'a;

/// Connections in their handshake, oldest first.
#[derive(Default)]
pub(crate) struct Admission {
    inner: Mutex<AdmissionInner>,
}

#[derive(Default)]
struct AdmissionInner {
    next: u64,
    pending: VecDeque<(u64, TcpStream, SocketAddr)>,
}

impl Admission {
    /// Takes `s` in and returns its ticket. A full table evicts its oldest
    /// handshake first — its socket is shut down, so that handshake fails
    /// at once — and returns that peer.
    pub(crate) fn admit(&self, s: &TcpStream, peer: SocketAddr) -> (u64, Option<SocketAddr>) {
        let mut a = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut evicted = None;
        if a.pending.len() >= MAX_PENDING_HANDSHAKES {
            if let Some((_, old, who)) = a.pending.pop_front() {
                let _ = old.shutdown(std::net::Shutdown::Both);
                evicted = Some(who);
            }
        }
        let id = a.next;
        a.next += 1;
        // Without a second descriptor the handshake cannot be evicted; it
        // still ends by its deadline.
        if let Ok(c) = s.try_clone() {
            a.pending.push_back((id, c, peer));
        }
        (id, evicted)
    }

    /// The handshake of `ticket` ended.
    pub(crate) fn done(&self, ticket: u64) {
        let mut a = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        a.pending.retain(|(id, _, _)| *id != ticket);
    }

    /// Handshakes running.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).pending.len()
    }
}

/// What a handshake thread reports.
pub(crate) type Handshaken = Result<Arrival, Refusal>;

impl Acceptor {
    /// Listens on every address; every connection must prove itself as
    /// `auth` says.
    pub fn bind(addrs: &[SocketAddr], auth: Auth) -> Result<Self, TransportError> {
        if addrs.is_empty() {
            return Err(TransportError::Setup("no address to listen on".into()));
        }
        let listeners = addrs.iter().map(|a| listen(*a)).collect::<Result<Vec<_>, _>>()?;
        for l in &listeners {
            // Listener threads wait in accept a tick at a time, so they see
            // when to stop (SO_RCVTIMEO bounds accept(2) too).
            socket2::SockRef::from(l)
                .set_read_timeout(Some(ACCEPT_TICK))
                .map_err(|e| TransportError::io("listener", e))?;
        }
        Ok(Self {
            listeners,
            auth,
            gather_timeout: GATHER_TIMEOUT,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            trouble: Arc::default(),
            pipeline: Mutex::default(),
        })
    }

    /// Another handle on the same listening sockets.
    pub fn try_clone(&self) -> Result<Self, TransportError> {
        let listeners = self
            .listeners
            .iter()
            .map(|l| l.try_clone())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TransportError::io("listener", e))?;
        Ok(Self {
            listeners,
            auth: self.auth.clone(),
            gather_timeout: self.gather_timeout,
            handshake_timeout: self.handshake_timeout,
            trouble: self.trouble.clone(),
            pipeline: Mutex::default(),
        })
    }

    /// The handshake pipeline, for one serving loop at a time.
    pub(crate) fn pipeline(&self) -> std::sync::MutexGuard<'_, Pipeline> {
        self.pipeline.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The bound addresses (with the ports the kernel chose for port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().filter_map(|l| l.local_addr().ok()).collect()
    }

    /// Accepts one connection on `l`, waiting a tick at most. A failing
    /// `accept` never ends the caller's loop: the host being short of
    /// descriptors or memory is logged (at most every few seconds) and the
    /// loop slowed down; a connection aborted before it was accepted is
    /// skipped.
    fn accept_one(&self, l: &TcpListener) -> Option<(TcpStream, SocketAddr)> {
        match l.accept() {
            Ok(c) => Some(c),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock
                        | ErrorKind::TimedOut
                        | ErrorKind::Interrupted
                        | ErrorKind::ConnectionAborted
                        | ErrorKind::ConnectionReset
                ) =>
            {
                None
            }
            Err(e) => {
                let mut last = self.trouble.lock().unwrap_or_else(|p| p.into_inner());
                if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
                    let local = l.local_addr().ok();
                    tracing::error!(listener = ?local, error = %e, "accept failed; backing off, still serving");
                    *last = Some(Instant::now());
                }
                drop(last);
                std::thread::sleep(ACCEPT_BACKOFF);
                None
            }
        }
    }

    /// Runs `body` while one thread per listener accepts connections and
    /// starts their handshakes into `pipeline`, so a connection is taken the
    /// moment it arrives whatever `body` is doing; the threads stop when
    /// `body` returns.
    pub(crate) fn listening<R>(
        &self,
        pipeline: &Pipeline,
        log: &(dyn Fn(SocketAddr, String) + Sync),
        body: impl FnOnce() -> R,
    ) -> R {
        let stop = std::sync::atomic::AtomicBool::new(false);
        let wake = Wake::new();
        std::thread::scope(|s| {
            for l in &self.listeners {
                let (stop, wake, tx, admission) = (&stop, &wake, pipeline.tx.clone(), &pipeline.admission);
                s.spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        if !wake.wait_for(l, ACCEPT_TICK) {
                            continue;
                        }
                        if let Some((c, peer)) = self.accept_one(l) {
                            let _ = c.set_nonblocking(false);
                            self.start_handshake(c, peer, admission, &tx, log);
                        }
                    }
                });
            }
            let r = body();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            // The listener threads return now, not at their next tick: the
            // caller (a session's accept, its end) waits for them.
            wake.wake();
            r
        })
    }

    /// Starts the handshake of an accepted connection on a thread of its
    /// own; its outcome arrives on `tx`. `log` hears of evictions.
    pub(crate) fn start_handshake(
        &self,
        s: TcpStream,
        peer: SocketAddr,
        admission: &Arc<Admission>,
        tx: &mpsc::Sender<Handshaken>,
        log: &dyn Fn(SocketAddr, String),
    ) {
        let (ticket, evicted) = admission.admit(&s, peer);
        if let Some(old) = evicted {
            log(old, format!("handshake cut: {MAX_PENDING_HANDSHAKES} handshakes were running, this the oldest"));
        }
        let (auth, admission2, tx) = (self.auth.clone(), admission.clone(), tx.clone());
        let deadline = Instant::now() + self.handshake_timeout;
        let spawned = std::thread::Builder::new().name("pm-handshake".into()).spawn(move || {
            let res = answer(s, peer, &auth, deadline);
            admission2.done(ticket);
            let _ = tx.send(res);
        });
        if let Err(e) = spawned {
            admission.done(ticket);
            log(peer, format!("no thread for its handshake ({e})"));
        }
    }

    /// Accepts the streams of one session of `mode`. `check` judges the
    /// first authenticated `Hello` (region table, capabilities) and returns
    /// the capabilities to use; a refusal is sent to that peer and the wait
    /// goes on. `deadline` bounds the whole wait; nothing else ends it.
    pub fn accept_session(
        &self,
        mode: Mode,
        check: &mut HelloCheck<'_>,
        deadline: Option<Instant>,
    ) -> Result<Accepted, TransportError> {
        let pipeline = self.pipeline();
        let mut claim: Option<Claim> = None;
        let refused = Mutex::new(Vec::new());
        let note = |peer: SocketAddr, why: String| {
            refusal_logged(peer, &why);
            refused.lock().unwrap_or_else(|p| p.into_inner()).push((peer, why));
        };
        let res = self.listening(&pipeline, &note, || loop {
            if let Some(c) = claim.take() {
                if c.slots.iter().all(Option::is_some) {
                    let streams = c.slots.into_iter().map(|s| s.expect("every slot filled")).collect();
                    return Ok((c.hello, c.caps, streams, c.key));
                }
                if c.since.elapsed() > self.gather_timeout {
                    let got = c.slots.iter().filter(|s| s.is_some()).count();
                    let why = format!(
                        "only {got} of {} streams of the session arrived within {:?}; waiting for another",
                        c.hello.stream_count, self.gather_timeout
                    );
                    let peer = c.peer;
                    c.drop_with(ErrorCode::Aborted, &why);
                    note(peer, why);
                } else {
                    claim = Some(c);
                }
            }
            if deadline.is_some_and(|d| Instant::now() > d) {
                return Err(TransportError::Setup("no migration session arrived in time".into()));
            }
            let arrival = match pipeline.rx.recv_timeout(ACCEPT_TICK) {
                Ok(Ok(a)) => a,
                Ok(Err(refusal)) => {
                    // Logged first: the peer may act on the refusal at once.
                    note(refusal.peer, refusal.why.clone());
                    refusal.send();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => unreachable!("the pipeline holds a sender"),
            };
            let peer = arrival.peer;
            if let Err(refusal) = self.join(arrival, mode, &mut claim, check) {
                note(peer, refusal.why.clone());
                refusal.send();
            }
        });
        let (hello, caps, streams, key) = res?;
        let refused = refused.into_inner().unwrap_or_else(|p| p.into_inner());
        Ok(Accepted { hello, caps, streams, refused, key, resumes: None })
    }

    /// Applies the session rules to an authenticated connection.
    fn join(
        &self,
        a: Arrival,
        mode: Mode,
        claim: &mut Option<Claim>,
        check: &mut HelloCheck<'_>,
    ) -> Result<(), Refusal> {
        let refuse = |conn, code, why: String| Err(Refusal { conn: Some(conn), peer: a.peer, code, why });
        let Some(h) = a.hello.clone() else {
            let why = "no running session to come back to".to_string();
            return refuse(a.conn, ErrorCode::NotInSession, why);
        };
        debug_assert_eq!(a.offer.purpose, Purpose::Join);
        if h.mode != mode {
            let why = format!("this end serves {mode:?} sessions, not {:?}", h.mode);
            return refuse(a.conn, ErrorCode::NotInSession, why);
        }
        match claim {
            None if h.stream_index == 0 => {
                let caps = match check(&h) {
                    Ok(c) => c,
                    Err(e) => return refuse(a.conn, e.code, e.message),
                };
                let key = a.session_key(&self.auth);
                if send_welcome(&a.conn, h.session, caps).is_err() {
                    // Gone during its handshake: nothing to wait for.
                    return Ok(());
                }
                let mut slots: Vec<Option<Conn>> = (0..h.stream_count).map(|_| None).collect();
                slots[0] = Some(a.conn);
                *claim = Some(Claim { hello: h, caps, key, slots, since: Instant::now(), peer: a.peer });
                Ok(())
            }
            None => refuse(a.conn, ErrorCode::NotInSession, "no such session".into()),
            Some(c) => {
                if h.session != c.hello.session {
                    return refuse(a.conn, ErrorCode::NotInSession, "another session is being served".into());
                }
                let i = h.stream_index as usize;
                if c.slots[i].is_some() {
                    return refuse(a.conn, ErrorCode::NotInSession, format!("stream {i} already connected"));
                }
                if !c.key.stream_proof_ok(&a.transcript, &a.stream_proof) {
                    return refuse(a.conn, ErrorCode::Auth, "the stream did not prove the session's secret".into());
                }
                if let Err((code, why)) = agrees(&c.hello, &h) {
                    return refuse(a.conn, code, why);
                }
                if send_welcome(&a.conn, h.session, c.caps).is_err() {
                    // A stream that breaks in its handshake dooms the session.
                    if let Some(c) = claim.take() {
                        c.drop_with(ErrorCode::Aborted, "a stream of the session broke during its handshake");
                    }
                    return Ok(());
                }
                c.slots[i] = Some(a.conn);
                Ok(())
            }
        }
    }
}

/// A session whose stream 0 arrived, gathering the rest.
struct Claim {
    hello: Hello,
    caps: u64,
    key: SessionKey,
    slots: Vec<Option<Conn>>,
    since: Instant,
    peer: SocketAddr,
}

impl Claim {
    /// Gives the claim up: its streams hear why and are closed.
    fn drop_with(self, code: ErrorCode, why: &str) {
        for s in self.slots.into_iter().flatten() {
            s.send_error(code, why);
            let _ = s.shutdown(std::net::Shutdown::Both);
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

/// The one log line of a refused connection: the peer and why.
pub(crate) fn refusal_logged(peer: SocketAddr, why: &str) {
    tracing::warn!(%peer, reason = why, "refused");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn a_full_table_cuts_its_oldest_handshake() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let adm = Admission::default();
        let mut held = Vec::new();
        let mut evicted = Vec::new();
        for _ in 0..=MAX_PENDING_HANDSHAKES {
            let c = TcpStream::connect(addr).unwrap();
            let (s, peer) = l.accept().unwrap();
            let (ticket, ev) = adm.admit(&s, peer);
            evicted.extend(ev);
            held.push((ticket, s, c));
        }
        assert_eq!(adm.len(), MAX_PENDING_HANDSHAKES, "the table stays bounded");
        assert_eq!(evicted, vec![held[0].2.local_addr().unwrap()], "the oldest was cut for the newest");
        // The oldest handshake's socket was shut down: its read ends at once.
        let mut b = [0u8; 1];
        assert_eq!((&held[0].1).read(&mut b).unwrap(), 0);
        adm.done(held[1].0);
        assert_eq!(adm.len(), MAX_PENDING_HANDSHAKES - 1);
    }
}
