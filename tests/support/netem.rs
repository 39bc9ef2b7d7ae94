//! A userspace netem: two network namespaces joined through two TUN
//! devices, with a thread per direction between them that delays (with
//! jitter), loses, reorders, duplicates and corrupts IP packets, seeded.
//! The kernel's own TCP carries the traffic on both sides; a corrupted
//! packet has one byte of its TCP payload flipped, so the receiving
//! kernel's checksum drops it, as a damaged frame on a real link would be.
//!
//! This kernel has no `sch_netem` (and no modprobe), hence the TUN pair.
//! Root is needed (namespaces, `/dev/net/tun`).
//!
//! ```ignore
//! #[path = "../../tests/support/netem.rs"]
//! mod netem;
//! let bed = netem::NetemBed::up(netem::NetemConfig::lossy(seed))?;
//! let mut serve = bed.command(netem::Side::Dst, BIN);   // runs in the destination namespace
//! serve.args(["serve", "--listen", &format!("{}:7000", netem::DST_ADDR)]);
//! ```
#![allow(dead_code)]

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

/// The source side's address (in its namespace).
pub const SRC_ADDR: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
/// The destination side's address (in its namespace).
pub const DST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);

/// What the link does to each packet, per direction.
#[derive(Clone, Copy, Debug)]
pub struct NetemConfig {
    /// One-way delay.
    pub delay: Duration,
    /// Each packet's delay is `delay` ± up to this (uniform).
    pub jitter: Duration,
    /// Probability a packet is dropped.
    pub loss: f64,
    /// Probability a packet skips the delay and overtakes those queued.
    pub reorder: f64,
    /// Probability a packet is delivered twice.
    pub duplicate: f64,
    /// Probability one byte of a packet's TCP payload is flipped.
    pub corrupt: f64,
    /// Seed of the impairments (each direction derives its own).
    pub seed: u64,
}

impl NetemConfig {
    /// The issue's link: a few ms of delay with jitter, 1 % loss, 1 %
    /// reordering, 0.5 % duplication and 0.1 % corruption.
    pub fn lossy(seed: u64) -> NetemConfig {
        NetemConfig {
            delay: Duration::from_millis(2),
            jitter: Duration::from_micros(500),
            loss: 0.01,
            reorder: 0.01,
            duplicate: 0.005,
            corrupt: 0.001,
            seed,
        }
    }
}

/// Counters of what the link did, both directions together.
#[derive(Debug, Default)]
pub struct NetemStats {
    /// Packets read from either TUN.
    pub packets: AtomicU64,
    /// Packets dropped.
    pub lost: AtomicU64,
    /// Packets sent ahead of the queue.
    pub reordered: AtomicU64,
    /// Packets sent twice.
    pub duplicated: AtomicU64,
    /// Packets whose TCP payload had a byte flipped.
    pub corrupted: AtomicU64,
}

/// A snapshot of [`NetemStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetemCounts {
    pub packets: u64,
    pub lost: u64,
    pub reordered: u64,
    pub duplicated: u64,
    pub corrupted: u64,
    /// TCP segments the two kernels dropped for a bad checksum (the
    /// corrupted ones, seen from the other side).
    pub csum_errors: u64,
}

impl NetemCounts {
    /// Whether any impairment hit a packet.
    pub fn any(&self) -> bool {
        self.lost + self.reordered + self.duplicated + self.corrupted > 0
    }
}

/// Which namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The source's, at [`SRC_ADDR`].
    Src,
    /// The destination's, at [`DST_ADDR`].
    Dst,
}

/// Two namespaces joined by the impaired link; torn down when dropped.
pub struct NetemBed {
    names: [String; 2],
    ns_fds: [File; 2],
    stop: Arc<AtomicBool>,
    stats: Arc<NetemStats>,
    threads: Vec<JoinHandle<()>>,
}

fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())))
    }
}

/// Opens a new TUN device (IFF_TUN, no packet information) named by the
/// kernel; returns its descriptor (non-blocking) and name.
fn open_tun() -> io::Result<(OwnedFd, String)> {
    let f = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun")?;
    let fd = OwnedFd::from(f);
    // struct ifreq: 16 bytes of name, then a union whose first member here
    // is the short flags; 40 bytes in all.
    let mut ifr = [0u8; 40];
    let flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq; `ifr` is a
    // 40-byte buffer laid out as one (name, then flags) and outlives the
    // call; the descriptor is open.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF as _, ifr.as_mut_ptr()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let len = ifr[..16].iter().position(|&b| b == 0).unwrap_or(16);
    let name = String::from_utf8_lossy(&ifr[..len]).into_owned();
    // SAFETY: fcntl on a descriptor we own, with integer arguments only.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((fd, name))
}

/// Moves the calling thread into the network namespace behind `fd`.
pub fn enter(fd: RawFd) -> io::Result<()> {
    // SAFETY: setns with a descriptor of a namespace file and a namespace
    // type; it only changes this thread's network namespace.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl NetemBed {
    /// Builds the two namespaces and starts the link.
    pub fn up(cfg: NetemConfig) -> io::Result<NetemBed> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let base = format!("pmnetem-{}-{n}", std::process::id());
        let names = [format!("{base}-src"), format!("{base}-dst")];
        for name in &names {
            let _ = ip(&["netns", "del", name]);
            ip(&["netns", "add", name])?;
        }
        let mut bed = NetemBed {
            ns_fds: [File::open(format!("/run/netns/{}", names[0]))?, File::open(format!("/run/netns/{}", names[1]))?],
            names,
            stop: Arc::new(AtomicBool::new(false)),
            stats: Arc::new(NetemStats::default()),
            threads: Vec::new(),
        };
        let (src_fd, src_tun) = open_tun()?;
        let (dst_fd, dst_tun) = open_tun()?;
        for (ns, tun, me, peer) in
            [(&bed.names[0], &src_tun, SRC_ADDR, DST_ADDR), (&bed.names[1], &dst_tun, DST_ADDR, SRC_ADDR)]
        {
            ip(&["link", "set", tun, "netns", ns])?;
            let (me, peer) = (format!("{me}/32"), format!("{peer}/32"));
            ip(&["-n", ns, "addr", "add", &me, "peer", &peer, "dev", tun])?;
            ip(&["-n", ns, "link", "set", tun, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        let (src_fd, dst_fd) = (Arc::new(src_fd), Arc::new(dst_fd));
        for (dir, from, to) in [(0u64, src_fd.clone(), dst_fd.clone()), (1, dst_fd, src_fd)] {
            let (stop, stats) = (bed.stop.clone(), bed.stats.clone());
            let seed = cfg.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(dir);
            bed.threads.push(std::thread::spawn(move || forward(&from, &to, cfg, seed, &stats, &stop)));
        }
        Ok(bed)
    }

    /// A command that runs `program` in `side`'s namespace.
    pub fn command(&self, side: Side, program: &str) -> Command {
        let fd = self.ns_fd(side);
        let mut cmd = Command::new(program);
        // SAFETY: the closure runs in the child between fork and exec and
        // calls only setns(2), which is async-signal-safe; `fd` stays open
        // in the parent (the bed owns it) until the spawn returned.
        unsafe {
            cmd.pre_exec(move || enter(fd));
        }
        cmd
    }

    /// The descriptor of `side`'s namespace (for [`enter`] on a thread).
    pub fn ns_fd(&self, side: Side) -> RawFd {
        self.ns_fds[match side {
            Side::Src => 0,
            Side::Dst => 1,
        }]
        .as_raw_fd()
    }

    /// What the link did so far.
    pub fn counts(&self) -> NetemCounts {
        let s = &self.stats;
        NetemCounts {
            packets: s.packets.load(Ordering::Relaxed),
            lost: s.lost.load(Ordering::Relaxed),
            reordered: s.reordered.load(Ordering::Relaxed),
            duplicated: s.duplicated.load(Ordering::Relaxed),
            corrupted: s.corrupted.load(Ordering::Relaxed),
            csum_errors: [Side::Src, Side::Dst].into_iter().filter_map(|side| self.tcp_csum_errors(side)).sum(),
        }
    }

    /// `Tcp: InCsumErrors` of `side`'s namespace.
    fn tcp_csum_errors(&self, side: Side) -> Option<u64> {
        // /proc/thread-self/net is the namespace of the reading thread.
        let snmp =
            spawn_in(self, side, || std::fs::read_to_string("/proc/thread-self/net/snmp")).ok()?.join().ok()?.ok()?;
        let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
        let (names, values) = (tcp.next()?, tcp.next()?);
        let at = names.split_whitespace().position(|n| n == "InCsumErrors")?;
        values.split_whitespace().nth(at)?.parse().ok()
    }
}

impl Drop for NetemBed {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for name in &self.names {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

/// Flips one byte of the TCP payload of an IPv4 packet; false if it has
/// none.
fn corrupt_tcp_payload(pkt: &mut [u8], rng: &mut impl Rng) -> bool {
    if pkt.len() < 20 || pkt[0] >> 4 != 4 || pkt[9] != 6 {
        return false;
    }
    let ihl = usize::from(pkt[0] & 0x0f) * 4;
    if pkt.len() < ihl + 20 {
        return false;
    }
    let start = ihl + usize::from(pkt[ihl + 12] >> 4) * 4;
    if start >= pkt.len() {
        return false;
    }
    let at = rng.gen_range(start..pkt.len());
    pkt[at] ^= rng.gen_range(1..=255u8);
    true
}

/// Moves packets from one TUN to the other until `stop`, impaired.
fn forward(from: &OwnedFd, to: &OwnedFd, cfg: NetemConfig, seed: u64, stats: &NetemStats, stop: &AtomicBool) {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut queue: BinaryHeap<Reverse<(Instant, u64, Vec<u8>)>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        while queue.peek().is_some_and(|Reverse((t, ..))| *t <= now) {
            let Some(Reverse((_, _, pkt))) = queue.pop() else { break };
            // SAFETY: write(2) from a live buffer of pkt.len() bytes to a
            // descriptor we hold open.
            let _ = unsafe { libc::write(to.as_raw_fd(), pkt.as_ptr().cast(), pkt.len()) };
        }
        let wait = queue.peek().map_or(Duration::from_millis(20), |Reverse((t, ..))| t.saturating_duration_since(now));
        let mut pfd = libc::pollfd { fd: from.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::c_long::try_from(wait.min(Duration::from_millis(20)).as_nanos()).unwrap_or(20_000_000),
        };
        // SAFETY: ppoll on one pollfd that lives on this stack frame, a
        // valid timespec and no signal mask.
        let r = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
        if r <= 0 {
            continue;
        }
        loop {
            // SAFETY: read(2) into a live buffer of buf.len() bytes from a
            // descriptor we hold open (non-blocking).
            let n = unsafe { libc::read(from.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            let Ok(n) = usize::try_from(n) else { break };
            if n == 0 {
                break;
            }
            stats.packets.fetch_add(1, Ordering::Relaxed);
            if rng.gen_bool(cfg.loss) {
                stats.lost.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let mut pkt = buf[..n].to_vec();
            if rng.gen_bool(cfg.corrupt) && corrupt_tcp_payload(&mut pkt, &mut rng) {
                stats.corrupted.fetch_add(1, Ordering::Relaxed);
            }
            let now = Instant::now();
            let jitter = cfg.jitter.as_secs_f64() * rng.gen_range(-1.0..=1.0);
            let mut due = now + Duration::from_secs_f64((cfg.delay.as_secs_f64() + jitter).max(0.0));
            if rng.gen_bool(cfg.reorder) {
                stats.reordered.fetch_add(1, Ordering::Relaxed);
                due = now;
            }
            if rng.gen_bool(cfg.duplicate) {
                stats.duplicated.fetch_add(1, Ordering::Relaxed);
                seq += 1;
                queue.push(Reverse((due + Duration::from_micros(100), seq, pkt.clone())));
            }
            seq += 1;
            queue.push(Reverse((due, seq, pkt)));
        }
    }
}

/// Runs `f` on a new thread inside `side`'s namespace of `bed` (sockets it
/// makes live there) and returns its handle.
pub fn spawn_in<T: Send + 'static>(
    bed: &NetemBed,
    side: Side,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<JoinHandle<T>> {
    // A duplicate the thread owns, so the bed may go first.
    // SAFETY: dup(2) of a descriptor the bed holds open.
    let fd = unsafe { libc::dup(bed.ns_fd(side)) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by dup and is owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        let entered = enter(owned.as_raw_fd());
        drop(owned);
        let ok = entered.is_ok();
        let _ = tx.send(entered);
        if !ok {
            panic!("setns failed");
        }
        f()
    });
    rx.recv().map_err(|_| io::Error::other("namespace thread died"))??;
    Ok(h)
}
