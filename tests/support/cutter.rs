//! A TCP relay standing for the network between two ends, which acts at
//! one seeded byte offset of the traffic it carries (both directions, all
//! connections, counted together): it either cuts the connection that
//! crosses the offset (a reset on both sides, no FIN) or calls a hook there
//! (to stop or kill an end at a known point of the migration) and goes on
//! forwarding. Connections made after a cut pass untouched, so an end that
//! reconnects can — unless told to refuse them once it fired. A test may
//! also arm another cut later, or reset every connection at once. A reset
//! or failure on one side is passed on as a reset on the other, an end of
//! stream as an end of stream.
//!
//! ```ignore
//! #[path = "../../tests/support/cutter.rs"]
//! mod cutter;
//! let link = cutter::Cutter::start(dest_addr, offset, cutter::Trigger::Cut)?;
//! // the source connects to link.addr
//! ```
#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// What happens at the offset.
#[derive(Clone)]
pub enum Trigger {
    /// Nothing: forward and count.
    Pass,
    /// Reset the connection that crosses the offset, both sides.
    Cut,
    /// Call this once the offset is crossed, then go on forwarding.
    Call(Arc<dyn Fn() + Send + Sync>),
}

struct State {
    offset: AtomicU64,
    trigger: Trigger,
    carried: AtomicU64,
    fired: AtomicBool,
    /// Once fired, new connections are reset at once.
    refuse_after: AtomicBool,
    stop: AtomicBool,
    accepted: AtomicUsize,
    /// Both sockets of every connection, to reset them at the end.
    sockets: Mutex<Vec<TcpStream>>,
}

/// The relay; every connection it carries is reset when it is dropped.
pub struct Cutter {
    /// Where the near end connects.
    pub addr: SocketAddr,
    state: Arc<State>,
    acceptor: Option<JoinHandle<()>>,
}

/// Aborts a TCP connection: a reset, no FIN, and every thread blocked on
/// the socket wakes up.
pub fn reset(s: &TcpStream) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt with a valid `struct linger` that outlives the
    // call, on a socket descriptor we hold open.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::addr_of!(linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    // connect(2) to AF_UNSPEC disconnects a TCP socket at once: the kernel
    // sends a reset for an established connection and wakes its readers.
    // SAFETY: a zeroed sockaddr with family AF_UNSPEC, of the size given,
    // living on this frame during the call.
    unsafe {
        let mut sa: libc::sockaddr = std::mem::zeroed();
        sa.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
        libc::connect(s.as_raw_fd(), &sa, std::mem::size_of::<libc::sockaddr>() as libc::socklen_t);
    }
}

impl Cutter {
    /// Listens on a free loopback port and forwards each connection to
    /// `upstream`; `trigger` acts when the traffic crosses `offset` bytes.
    pub fn start(upstream: SocketAddr, offset: u64, trigger: Trigger) -> io::Result<Cutter> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            offset: AtomicU64::new(offset),
            trigger,
            carried: AtomicU64::new(0),
            fired: AtomicBool::new(false),
            refuse_after: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            accepted: AtomicUsize::new(0),
            sockets: Mutex::new(Vec::new()),
        });
        let st = state.clone();
        let acceptor = std::thread::spawn(move || {
            while !st.stop.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                let _ = client.set_nonblocking(false);
                if st.refuse_after.load(Ordering::Relaxed) && st.fired.load(Ordering::Acquire) {
                    reset(&client);
                    continue;
                }
                let Ok(server) = TcpStream::connect_timeout(&upstream, Duration::from_secs(10)) else {
                    reset(&client);
                    continue;
                };
                st.accepted.fetch_add(1, Ordering::Relaxed);
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let clones = (client.try_clone(), server.try_clone(), client.try_clone(), server.try_clone());
                let (Ok(c1), Ok(s1), Ok(c2), Ok(s2)) = clones else { continue };
                st.sockets.lock().unwrap_or_else(|p| p.into_inner()).extend([c2, s2]);
                let (st1, st2) = (st.clone(), st.clone());
                std::thread::spawn(move || pump(client, server, &st1));
                std::thread::spawn(move || pump(s1, c1, &st2));
            }
        });
        Ok(Cutter { addr, state, acceptor: Some(acceptor) })
    }

    /// Whether the offset was crossed (the cut made, the hook called).
    pub fn fired(&self) -> bool {
        self.state.fired.load(Ordering::Relaxed)
    }

    /// Bytes carried so far, both ways, all connections.
    pub fn carried(&self) -> u64 {
        self.state.carried.load(Ordering::Relaxed)
    }

    /// Connections carried so far.
    pub fn connections(&self) -> usize {
        self.state.accepted.load(Ordering::Relaxed)
    }

    /// From the moment the offset is crossed, resets every new connection
    /// (an end that comes back finds no way through).
    pub fn refuse_after_firing(&self) {
        self.state.refuse_after.store(true, Ordering::Relaxed);
    }

    /// Acts again, once, when the traffic crosses `offset`.
    pub fn arm(&self, offset: u64) {
        self.state.offset.store(offset, Ordering::Relaxed);
        self.state.fired.store(false, Ordering::Release);
    }

    /// Resets every connection carried so far, both sides, now; returns
    /// how many were still up.
    pub fn cut_all(&self) -> usize {
        let sockets = self.state.sockets.lock().unwrap_or_else(|p| p.into_inner());
        let mut up = 0;
        for pair in sockets.chunks(2) {
            if pair[0].peer_addr().is_ok() {
                up += 1;
            }
            pair.iter().for_each(reset);
        }
        up
    }
}

impl Drop for Cutter {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        for s in self.state.sockets.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            reset(&s);
        }
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}

/// Copies `from` to `to`, counting into the shared total and acting at the
/// offset; passes an end of stream on as one, anything else as a reset.
fn pump(mut from: TcpStream, mut to: TcpStream, st: &State) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let before = st.carried.fetch_add(n as u64, Ordering::Relaxed);
        let offset = st.offset.load(Ordering::Relaxed);
        let crosses = (before..before + n as u64).contains(&offset);
        if crosses && !matches!(st.trigger, Trigger::Pass) && !st.fired.swap(true, Ordering::AcqRel) {
            let head = usize::try_from(offset - before).unwrap_or(0);
            match &st.trigger {
                Trigger::Cut => {
                    let _ = to.write_all(&buf[..head]);
                    break;
                }
                Trigger::Call(hook) => {
                    if to.write_all(&buf[..head]).is_err() {
                        break;
                    }
                    hook();
                    if to.write_all(&buf[head..n]).is_err() {
                        break;
                    }
                    continue;
                }
                Trigger::Pass => {}
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    reset(&from);
    reset(&to);
}
