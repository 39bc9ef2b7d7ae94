//! Shared steps of the tests that migrate a QEMU guest through pmigrate:
//! scratch dirs, booting the source, migrating, checking that the guest
//! landed whole, and a faulty link to put between two pmigrate ends.
//!
//! Include it after `qemu.rs`:
//!
//! ```ignore
//! #[path = "../../tests/support/qemu.rs"]
//! mod qemu;
//! #[path = "../../tests/support/migration.rs"]
//! mod migration;
//! ```
#![allow(dead_code)]

use std::fs;
use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::qemu::{migration_summary, Qemu, VmConfig, BOOT_TIMEOUT};

/// The pre-shared key the pmigrate processes of a test share.
#[path = "keys.rs"]
pub mod keys;

/// Longest a migration may take, failed or not.
pub const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest wait for a handful of workload heartbeats.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest wait for a helper or a failed destination QEMU to exit.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(90);

/// The tests share two cores with their guests: one at a time.
pub fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A temp dir for the helpers' stderr; kept when the test fails.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(test: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("pmx-{}-{test}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("creating the scratch dir");
        Scratch(dir)
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("PMIGRATE_KEEP_VM_LOGS").is_some() {
            eprintln!("helper logs kept in {}", self.0.display());
        } else {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// Quotes a word for `/bin/sh`.
pub fn sh(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

pub fn localhost(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

pub fn guest(name: &str, working_set_mib: u64, rate_mibps: u64) -> VmConfig {
    VmConfig::new(name).working_set_mib(working_set_mib).dirty_rate_mibps(rate_mibps)
}

/// Spawns the source and waits until its workload is running cleanly.
pub fn boot_source(cfg: VmConfig) -> Qemu {
    let mut src = Qemu::spawn(cfg).expect("spawning the source QEMU");
    src.wait_ready(BOOT_TIMEOUT).expect("source guest boot");
    src.wait_heartbeats_after(0, 3, HEARTBEAT_TIMEOUT).expect("source heartbeats before migrating");
    src.check_healthy_after(0).expect("source guest before migrating");
    src
}

/// Starts a migration and waits for its end; returns the final
/// query-migrate and the wall time.
pub fn migrate(src: &mut Qemu, uri: &str) -> (Value, Duration) {
    let t0 = Instant::now();
    src.qmp().migrate(uri).expect("QMP migrate");
    let info = src.qmp().wait_migration(MIGRATION_TIMEOUT).expect("waiting for the migration to end");
    (info, t0.elapsed())
}

/// Checks that a completed migration landed: the destination runs the
/// guest the source paused, and its workload goes on without damage.
pub fn check_landed(src: &mut Qemu, dst: &mut Qemu, info: &Value, busy: bool) {
    assert_eq!(info["status"], "completed", "migration did not complete: {}", migration_summary(info));
    dst.qmp().wait_status("running", Duration::from_secs(60)).expect("destination run state");
    assert_eq!(src.qmp().query_status().expect("source run state"), "postmigrate");
    let last_src = src.heartbeats_after(0).last().cloned().expect("source heartbeats");
    let beats = dst.wait_heartbeats_after(0, 5, HEARTBEAT_TIMEOUT).expect("destination heartbeats");
    dst.check_healthy_after(0).expect("destination guest after migrating");
    let console = dst.console_log();
    assert!(!console.contains("PMW boot"), "the destination booted a new guest:\n{}", dst.console_tail(20));
    let (first, last) = (&beats[0], &beats[beats.len() - 1]);
    // The workload's counters go on from where the source left them.
    assert!(
        first.t >= last_src.t && first.verified >= last_src.verified && first.gen >= last_src.gen,
        "destination workload did not continue the source's: source {last_src:?}, destination {first:?}"
    );
    assert!(last.verified > first.verified, "destination workload stopped verifying: {first:?} .. {last:?}");
    if busy {
        assert!(last.gen > first.gen, "destination workload stopped writing: {first:?} .. {last:?}");
    }
}

/// After a failed migration: the source guest runs on, its workload going
/// on undamaged.
pub fn check_source_runs_on(src: &mut Qemu) {
    src.qmp().wait_status("running", Duration::from_secs(60)).expect("source run state after the failure");
    let off = src.console_offset();
    let beats = src.wait_heartbeats_after(off, 5, HEARTBEAT_TIMEOUT).expect("source heartbeats after the failure");
    src.check_healthy_after(0).expect("source guest after the failure");
    let (first, last) = (&beats[0], &beats[beats.len() - 1]);
    assert!(last.gen > first.gen && last.verified > first.verified, "source workload stalled: {first:?} .. {last:?}");
}

/// After a failed or cancelled migration: the destination QEMU gives up —
/// exits with status 1 saying `load of migration failed` — and never ran
/// the guest.
///
/// Which error QEMU names depends on where its stream ends, not on what it
/// got: pmigrate passes on only verified bytes, in order, so the stream is
/// always a true prefix of the source's. Cut between two reads, QEMU 7.2
/// sees `Input/output error`; cut inside a section, it may read the end of
/// file as zeros first and fail with `Unknown combination of migration
/// flags: 0x0` or `Read section footer failed` and `Invalid argument`.
pub fn check_destination_gave_up(dst: &mut Qemu) {
    let status = wait_exit(dst, EXIT_TIMEOUT);
    eprintln!("  destination QEMU: {status:?}, stderr: {}", dst.stderr().trim());
    let status = status.expect("the destination QEMU did not exit after the failed incoming migration");
    assert_eq!(status.code(), Some(1), "destination QEMU exit status");
    assert!(dst.stderr().contains("load of migration failed"), "destination QEMU stderr: {}", dst.stderr());
    assert!(
        dst.heartbeats_after(0).is_empty() && !dst.console_log().contains("PMW"),
        "the destination ran the guest:\n{}",
        dst.console_tail(20)
    );
}

/// Waits for a QEMU to exit and returns its status.
pub fn wait_exit(vm: &mut Qemu, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = vm.exited() {
            return Some(st);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ------------------------------------------------------------------ proxy

/// What the faulty link does to the traffic.
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// Nothing: forward and count.
    None,
    /// Flip one byte at this offset of the first connection's forward direction.
    FlipByteAt(u64),
    /// Once any connection forwarded this many bytes, shut down every
    /// connection, both sides, and refuse new ones. (Any: a proxy entry
    /// may open and close a connection to try the way before the first
    /// that carries data.)
    CloseAllAt(u64),
}

#[derive(Default)]
pub struct FaultyLinkState {
    stop: AtomicBool,
    fired: AtomicBool,
    /// Both sockets of every connection, to shut them down.
    sockets: Mutex<Vec<TcpStream>>,
    /// Per accepted connection, in order: the client's address and the bytes forwarded.
    conns: Mutex<Vec<(SocketAddr, Arc<AtomicU64>)>>,
}

impl FaultyLinkState {
    fn cut_everything(&self) {
        for s in self.sockets.lock().expect("link lock").drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// A TCP relay on threads standing for the network between two pmigrate
/// ends, which can corrupt or cut what it carries.
pub struct FaultyLink {
    pub addr: SocketAddr,
    state: Arc<FaultyLinkState>,
    acceptor: Option<JoinHandle<()>>,
}

impl FaultyLink {
    pub fn start(listen: IpAddr, upstream: SocketAddr, fault: Fault) -> FaultyLink {
        let listener = TcpListener::bind((listen, 0)).expect("binding the faulty link");
        listener.set_nonblocking(true).expect("faulty link non-blocking");
        let addr = listener.local_addr().expect("faulty link address");
        let state = Arc::new(FaultyLinkState::default());
        let st = state.clone();
        let acceptor = std::thread::spawn(move || {
            while !st.stop.load(Ordering::Relaxed) {
                let (client, peer) = match listener.accept() {
                    Ok(c) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                if matches!(fault, Fault::CloseAllAt(_)) && st.fired.load(Ordering::Relaxed) {
                    continue; // dropped: closed at once
                }
                let Ok(server) = TcpStream::connect(upstream) else { continue };
                let _ = client.set_nonblocking(false);
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let first = {
                    let mut conns = st.conns.lock().expect("link lock");
                    conns.push((peer, Arc::new(AtomicU64::new(0))));
                    conns.len() == 1
                };
                let counter = st.conns.lock().expect("link lock").last().expect("just pushed").1.clone();
                let clones = (client.try_clone(), server.try_clone(), client.try_clone(), server.try_clone());
                let (Ok(c1), Ok(s1), Ok(c2), Ok(s2)) = clones else { continue };
                st.sockets.lock().expect("link lock").extend([c2, s2]);
                let fwd_fault = match fault {
                    Fault::CloseAllAt(_) => fault,
                    _ if first => fault,
                    _ => Fault::None,
                };
                let (st1, st2) = (st.clone(), st.clone());
                std::thread::spawn(move || pump(client, server, fwd_fault, &st1, Some(&counter)));
                std::thread::spawn(move || pump(s1, c1, Fault::None, &st2, None));
            }
        });
        FaultyLink { addr, state, acceptor: Some(acceptor) }
    }

    /// Whether the fault happened.
    pub fn fired(&self) -> bool {
        self.state.fired.load(Ordering::Relaxed)
    }

    /// Client address and forwarded bytes of every connection so far.
    pub fn connections(&self) -> Vec<(SocketAddr, u64)> {
        self.state.conns.lock().expect("link lock").iter().map(|(a, n)| (*a, n.load(Ordering::Relaxed))).collect()
    }
}

impl Drop for FaultyLink {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        self.state.cut_everything();
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}

/// Copies `from` to `to` until EOF or an error, applying `fault`.
pub fn pump(mut from: TcpStream, mut to: TcpStream, fault: Fault, st: &FaultyLinkState, counter: Option<&AtomicU64>) {
    let mut buf = vec![0u8; 64 << 10];
    let mut done = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &mut buf[..n];
        let end = done + n as u64;
        match fault {
            Fault::FlipByteAt(at) if (done..end).contains(&at) => {
                chunk[(at - done) as usize] ^= 0x5a;
                st.fired.store(true, Ordering::Relaxed);
            }
            Fault::CloseAllAt(at) if end >= at => {
                let _ = to.write_all(&chunk[..(at - done) as usize]);
                st.fired.store(true, Ordering::Relaxed);
                st.cut_everything();
                break;
            }
            _ => {}
        }
        if to.write_all(chunk).is_err() {
            break;
        }
        done = end;
        if let Some(c) = counter {
            c.store(done, Ordering::Relaxed);
        }
    }
    // Pass the end on; a cut or failed connection ends both ways.
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

// ------------------------------------------------------------ pmigrate proxy

/// A `pmigrate proxy` entry and exit, run as processes with their stderr in
/// files; killed when dropped.
pub struct ProxyPair {
    entry: std::process::Child,
    exit: std::process::Child,
    /// The entry's log.
    pub entry_log: PathBuf,
    /// The exit's log.
    pub exit_log: PathBuf,
    /// Where the exit listens.
    pub exit_addr: SocketAddr,
}

impl ProxyPair {
    /// Starts an exit on a free local port with `targets`, and an entry
    /// accepting on `accept` and carrying to `via_link` (a faulty link in
    /// front of the exit) or straight to the exit; `entry_opts` go to the
    /// entry (streams, threads, …). Waits until both listen.
    pub fn start(
        bin: &str,
        dir: &std::path::Path,
        accept: &[String],
        targets: &[String],
        entry_opts: &[&str],
        via_link: Option<&dyn Fn(SocketAddr) -> SocketAddr>,
    ) -> ProxyPair {
        use std::process::{Command, Stdio};
        let exit_addr = localhost(crate::qemu::free_port().expect("free port"));
        let (entry_log, exit_log) = (dir.join("proxy-entry.log"), dir.join("proxy-exit.log"));
        let log = |p: &PathBuf| Stdio::from(fs::File::create(p).expect("creating a proxy log"));
        let mut exit = Command::new(bin);
        exit.args(["proxy", "exit", "--listen", &exit_addr.to_string()]).args(keys::psk_args());
        for t in targets {
            exit.args(["--target", t]);
        }
        let exit = exit.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log(&exit_log)).spawn().expect("proxy exit");
        wait_log(&exit_log, "listening on");
        let to = via_link.map_or(exit_addr, |f| f(exit_addr));
        let mut entry = Command::new(bin);
        entry.args(["proxy", "entry"]).args(keys::psk_args()).args(entry_opts);
        for a in accept {
            entry.args(["--accept", a]);
        }
        entry.arg(to.to_string());
        let entry =
            entry.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log(&entry_log)).spawn().expect("proxy entry");
        wait_log(&entry_log, "accepting on");
        ProxyPair { entry, exit, entry_log, exit_log, exit_addr }
    }

    /// Both logs.
    pub fn logs(&self) -> String {
        let read = |p: &PathBuf| fs::read_to_string(p).unwrap_or_default();
        format!("entry:\n{}exit:\n{}", read(&self.entry_log), read(&self.exit_log))
    }

    /// Connections each side logged as done and as failed:
    /// `((entry done, entry failed), (exit done, exit failed))`.
    pub fn outcomes(&self) -> ((usize, usize), (usize, usize)) {
        let count = |p: &PathBuf| {
            let t = fs::read_to_string(p).unwrap_or_default();
            (
                t.lines().filter(|l| l.contains("connection done")).count(),
                t.lines().filter(|l| l.contains("connection failed")).count(),
            )
        };
        (count(&self.entry_log), count(&self.exit_log))
    }

    /// Waits until both sides logged the end (done or failed) of `n`
    /// connections each; returns the outcomes.
    pub fn wait_ended(&self, n: usize, timeout: Duration) -> ((usize, usize), (usize, usize)) {
        let deadline = Instant::now() + timeout;
        loop {
            let o = self.outcomes();
            if (o.0 .0 + o.0 .1 >= n && o.1 .0 + o.1 .1 >= n) || Instant::now() > deadline {
                return o;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for ProxyPair {
    fn drop(&mut self) {
        for c in [&mut self.entry, &mut self.exit] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits until the log at `path` has a line containing `what`.
pub fn wait_log(path: &std::path::Path, what: &str) {
    let deadline = Instant::now() + EXIT_TIMEOUT;
    while !fs::read_to_string(path).unwrap_or_default().contains(what) {
        assert!(
            Instant::now() < deadline,
            "{} never said {what:?} within {EXIT_TIMEOUT:?}: {:?}",
            path.display(),
            fs::read_to_string(path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ------------------------------------------------------- the exec: helpers

/// The binary under test.
const PMIGRATE: &str = env!("CARGO_BIN_EXE_pmigrate");

/// The destination's `-incoming` URI: `recv` on `listen`, stderr to `err`.
pub fn recv_uri(listen: &[impl ToString], err: &std::path::Path) -> String {
    let listen: Vec<String> = listen.iter().map(ToString::to_string).collect();
    format!(
        "exec:{} recv {} --listen {} --wait 300 --report 2>{}",
        sh(PMIGRATE),
        keys::psk_shell(),
        listen.join(" "),
        sh(&err.to_string_lossy())
    )
}

/// The source's `migrate` URI: `send` with `opts` to `dests`, stderr to `err`.
pub fn send_uri(opts: &str, dests: &[impl ToString], err: &std::path::Path) -> String {
    let dests: Vec<String> = dests.iter().map(ToString::to_string).collect();
    format!(
        "exec:{} send {} {opts} --report {} 2>{}",
        sh(PMIGRATE),
        keys::psk_shell(),
        dests.join(" "),
        sh(&err.to_string_lossy())
    )
}

/// Whether `line` is the `--report` line of `role` (`send` or `recv`).
pub fn is_report(line: &str, role: &str) -> bool {
    line.starts_with(&format!("pmigrate {role}: ")) && line.contains(" bytes in ")
}

/// Waits until a helper's stderr shows its report or an error; returns the text.
pub fn wait_helper_log(path: &std::path::Path, role: &str) -> String {
    let deadline = Instant::now() + EXIT_TIMEOUT;
    loop {
        let text = fs::read_to_string(path).unwrap_or_default();
        if text.lines().any(|l| is_report(l, role) || l.starts_with("pmigrate: error:")) {
            return text;
        }
        assert!(Instant::now() < deadline, "{role}: no report in {} after {EXIT_TIMEOUT:?}: {text:?}", path.display());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The report line of a helper that succeeded.
pub fn helper_report(path: &std::path::Path, role: &str) -> String {
    let text = wait_helper_log(path, role);
    assert!(!text.contains("pmigrate: error:"), "{role} failed: {text}");
    text.lines().find(|l| is_report(l, role)).unwrap_or_default().to_string()
}
