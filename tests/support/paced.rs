//! A TCP forwarder between a pmigrate source and its destination that
//! moves the source's bytes at a set pace, so a test can act (stop a
//! process, kill it) while a migration is surely in the middle; the way
//! back is not paced. It counts what went forward.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Forwards every connection made to [`Paced::addr`] to `target`.
pub struct Paced {
    /// Where sources connect.
    pub addr: SocketAddr,
    /// Bytes forwarded source → destination so far, all connections.
    pub forwarded: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Paced {
    /// Forwards to `target` at about `bytes_per_sec` in all.
    pub fn start(target: SocketAddr, bytes_per_sec: u64) -> Paced {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind the forwarder");
        l.set_nonblocking(true).expect("nonblocking listener");
        let addr = l.local_addr().expect("forwarder address");
        let forwarded = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (fw, st) = (forwarded.clone(), stop.clone());
        std::thread::spawn(move || {
            let t0 = Instant::now();
            while !st.load(Ordering::Relaxed) {
                let Ok((src, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let _ = src.set_nonblocking(false);
                let Ok(dst) = TcpStream::connect(target) else {
                    let _ = src.shutdown(Shutdown::Both);
                    continue;
                };
                let (src2, dst2) = (src.try_clone().expect("clone"), dst.try_clone().expect("clone"));
                let fw = fw.clone();
                std::thread::spawn(move || pump(src, dst, Some((fw, bytes_per_sec, t0))));
                std::thread::spawn(move || pump(dst2, src2, None));
            }
        });
        Paced { addr, forwarded, stop }
    }

    /// Waits (up to `within`) until at least `bytes` went forward.
    pub fn wait_forwarded(&self, bytes: u64, within: Duration) {
        let deadline = Instant::now() + within;
        while self.forwarded.load(Ordering::Relaxed) < bytes {
            assert!(Instant::now() < deadline, "only {} bytes went through", self.forwarded.load(Ordering::Relaxed));
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Paced {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Copies `from` to `to` until either ends; with `pace`, keeps the total
/// forwarded at most `rate` bytes a second since `t0`. An end of stream is
/// passed on as a half-close; a failure on either side ends both, as a
/// host that went away would.
fn pump(mut from: TcpStream, mut to: TcpStream, pace: Option<(Arc<AtomicU64>, u64, Instant)>) {
    let mut buf = vec![0u8; 16 << 10];
    let clean = loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => n,
            Err(_) => break false,
        };
        if to.write_all(&buf[..n]).is_err() {
            break false;
        }
        if let Some((fw, rate, t0)) = &pace {
            let total = fw.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
            let due = Duration::from_secs_f64(total as f64 / *rate as f64);
            if let Some(wait) = due.checked_sub(t0.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    };
    if clean {
        let _ = to.shutdown(Shutdown::Write);
    } else {
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    }
}
