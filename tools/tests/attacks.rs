//! Hostile peers against the `pmigrate` servers as an operator runs them
//! (`serve`, `recv`, `proxy exit`), and peers that freeze: one test per
//! attack, each asserting its outcome — nothing written for a stranger,
//! the server still serving, the real session landing next, a frozen peer
//! failing the other end within its progress timeout.

#[path = "../../tests/support/keys.rs"]
mod keys;
#[path = "../../tests/support/paced.rs"]
mod paced;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keys::psk_args;

const BIN: &str = env!("CARGO_BIN_EXE_pmigrate");

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pmigrate-attacks-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn other_key(dir: &Path) -> [String; 2] {
    use std::os::unix::fs::OpenOptionsExt;
    let p = dir.join("other.key");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&p).unwrap();
    f.write_all(b"a key nobody else in the test has").unwrap();
    ["--psk-file".into(), p.to_string_lossy().into_owned()]
}

/// A memory file of incompressible bytes: what travels is what the links
/// carry, so a paced link holds a migration back as long as it should.
fn write_file(path: &Path, mib: usize, seed: u8) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(seed);
    let data: Vec<u8> = (0..(mib << 20) / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    std::fs::write(path, &data).unwrap();
    data
}

/// A server process whose stderr is collected; killed when dropped.
struct Server {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Server {
    /// Starts `cmd` and waits until its stderr says `ready`.
    fn start(cmd: &mut Command, ready: &str) -> Server {
        let mut child = cmd.stdin(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let err = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut g = l.lock().unwrap();
                g.push_str(&line);
                g.push('\n');
            }
        });
        let s = Server { child, log };
        s.wait_log(ready, Duration::from_secs(60));
        s
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn wait_log(&self, what: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.log().contains(what) {
            assert!(Instant::now() < deadline, "never logged {what:?}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits (bounded) for the exit; returns the status and the log.
    fn wait(mut self, within: Duration) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100)); // the last log lines
                return (st, self.log());
            }
            assert!(Instant::now() < deadline, "the process did not end:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the pid of a child this test spawned and owns.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = status.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1));
    kb.and_then(|k| k.parse::<u64>().ok()).unwrap_or(0) * 1024
}

fn err_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn migrate(src: &Path, to: &str, auth: &[String], extra: &[&str]) -> Output {
    Command::new(BIN).args(["migrate", "--memory"]).arg(src).arg(to).args(auth).args(extra).output().unwrap()
}

/// Strangers (a wrong key, no authentication, protocol 1, a 256 GiB
/// claim) at a `serve`: each refused, nothing created, the server up; the
/// real migration lands next.
#[test]
fn serve_refuses_strangers_and_huge_claims_and_serves_the_real_migration() {
    let dir = scratch("serve");
    let (src, dst) = (dir.join("src.mem"), dir.join("dst.mem"));
    let data = write_file(&src, 8, 1);
    let addr = format!("127.0.0.1:{}", free_port());
    let mut serve = Server::start(
        Command::new(BIN).args(["serve", "--listen", &addr, "--memory"]).arg(&dst).args(psk_args()),
        "listening on",
    );
    let out = migrate(&src, &addr, &other_key(&dir), &[]);
    assert!(!out.status.success() && err_of(&out).contains("did not prove the key"), "{}", err_of(&out));
    let out = migrate(&src, &addr, &["--insecure".into()], &[]);
    assert!(!out.status.success() && err_of(&out).contains("uses a pre-shared key"), "{}", err_of(&out));
    // Protocol 1's first frame: a Hello, straight away.
    let mut v1 = TcpStream::connect(&addr).unwrap();
    let mut f = vec![1u8];
    f.resize(40, 0);
    v1.write_all(&f).unwrap();
    v1.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = v1.read_to_end(&mut Vec::new());
    // A keyed source claiming 256 GiB: refused before anything is made.
    let huge = dir.join("huge.mem");
    std::fs::File::create(&huge).unwrap().set_len(256 << 30).unwrap();
    let out = migrate(&huge, &addr, &psk_args(), &[]);
    assert!(!out.status.success() && err_of(&out).contains("exceeds this destination's limit"), "{}", err_of(&out));
    assert!(rss_of(serve.child.id()) < 128 << 20, "serve grew to {} bytes", rss_of(serve.child.id()));
    assert!(!dst.exists() && !dir.join("dst.mem.partial").exists(), "nothing was created");
    assert!(serve.alive(), "serve kept serving:\n{}", serve.log());
    let out = migrate(&src, &addr, &psk_args(), &[]);
    assert!(out.status.success(), "{}", err_of(&out));
    let (st, log) = serve.wait(Duration::from_secs(60));
    assert!(st.success(), "{log}");
    assert!(std::fs::read(&dst).unwrap() == data);
    assert!(log.matches("refused").count() >= 4, "every refusal is one log line:\n{log}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A stranger's byte stream never reaches what `recv` hands QEMU.
#[test]
fn a_strangers_byte_stream_never_reaches_recv_stdout() {
    let dir = scratch("recv");
    let addr = format!("127.0.0.1:{}", free_port());
    let mut recv = Command::new(BIN)
        .args(["recv", "--listen", &addr, "--report"])
        .args(psk_args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = recv.stdout.take().unwrap();
    let drain = std::thread::spawn(move || {
        let mut v = Vec::new();
        stdout.read_to_end(&mut v).unwrap();
        v
    });
    let send = |auth: &[String], bytes: &[u8]| {
        let mut c = Command::new(BIN)
            .args(["send", &addr])
            .args(auth)
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let _ = c.stdin.take().unwrap().write_all(bytes);
        c.wait_with_output().unwrap()
    };
    // Wait until recv listens: a refused connect means not yet.
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = send(&other_key(&dir), b"a stranger's migration stream");
    assert!(!out.status.success(), "{}", err_of(&out));
    let real: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let out = send(&psk_args(), &real);
    assert!(out.status.success(), "{}", err_of(&out));
    let got = drain.join().unwrap();
    assert!(recv.wait().unwrap().success());
    assert!(got == real, "stdout is exactly the real stream");
    std::fs::remove_dir_all(dir).unwrap();
}

fn each_backend(case: impl Fn(&str)) {
    case("portable");
    match pmigrate_transport::backend::probe_uring() {
        Ok(_) => case("uring"),
        Err(why) => eprintln!("skipping the io_uring case: {why}"),
    }
}

/// `serve` stopped (SIGSTOP) in the middle of a migration: `migrate` fails
/// within its progress timeout, says the VM keeps running, never paused
/// it, and its memory file is as it was.
#[test]
fn a_stopped_destination_fails_migrate_within_its_deadline() {
    each_backend(|io| {
        let dir = scratch(&format!("stopped-dst-{io}"));
        let (src, dst, paused) = (dir.join("src.mem"), dir.join("dst.mem"), dir.join("paused"));
        // More than every buffer on the way holds: round 0 cannot finish.
        let data = write_file(&src, 256, 2);
        let addr = format!("127.0.0.1:{}", free_port());
        let serve = Server::start(
            Command::new(BIN).args(["serve", "--listen", &addr, "--io", io, "--memory"]).arg(&dst).args(psk_args()),
            "listening on",
        );
        // At 8 MiB/s round 0 surely runs when the destination stops.
        let link = paced::Paced::start(addr.parse().unwrap(), 8 << 20);
        let pause = format!("touch {}", paused.display());
        let migrate = Command::new(BIN)
            .args(["migrate", "--io", io, "--progress-timeout", "5", "--pause-cmd", &pause, "--memory"])
            .arg(&src)
            .arg(link.addr.to_string())
            .args(psk_args())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        link.wait_forwarded(4 << 20, Duration::from_secs(60));
        serve.signal(libc::SIGSTOP);
        let t = Instant::now();
        let out = migrate.wait_with_output().unwrap();
        let err = err_of(&out);
        assert!(!out.status.success(), "{io}: {err}");
        assert!(t.elapsed() < Duration::from_secs(40), "{io}: failed after {:?}", t.elapsed());
        assert!(err.contains("the VM keeps running here"), "{io}: {err}");
        assert!(!paused.exists(), "{io}: the VM was never paused");
        assert!(std::fs::read(&src).unwrap() == data, "{io}: the source's memory is as it was");
        serve.signal(libc::SIGKILL);
        drop(serve);
        std::fs::remove_dir_all(dir).unwrap();
    });
}

/// `migrate` stopped (SIGSTOP) after the post-copy switchover, while the
/// guest runs at the destination: `serve` fails within its progress
/// timeout, says its guest is incomplete, exits non-zero and leaves no
/// memory file that looks complete.
#[test]
fn a_source_stopped_mid_post_copy_fails_the_destination_cleanly() {
    if let Err(why) = pmigrate::probe_postcopy() {
        eprintln!("skipping: no post-copy here: {why}");
        return;
    }
    each_backend(|io| {
        let dir = scratch(&format!("stopped-src-{io}"));
        let (src, dst, started) = (dir.join("src.mem"), dir.join("dst.mem"), dir.join("started"));
        write_file(&src, 128, 3);
        let addr = format!("127.0.0.1:{}", free_port());
        let serve = Server::start(
            Command::new(BIN)
                .args(["serve", "--listen", &addr, "--io", io, "--progress-timeout", "5", "--memory"])
                .arg(&dst)
                .arg("--resume-cmd")
                .arg(format!("touch {}", started.display()))
                .args(psk_args()),
            "listening on",
        );
        let link = paced::Paced::start(addr.parse().unwrap(), 8 << 20);
        let migrate = Server {
            child: Command::new(BIN)
                .args(["migrate", "--io", io, "--postcopy", "0", "--memory"])
                .arg(&src)
                .arg(link.addr.to_string())
                .args(psk_args())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
            log: Arc::default(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !started.exists() {
            assert!(Instant::now() < deadline, "{io}: the guest never started at the destination");
            std::thread::sleep(Duration::from_millis(10));
        }
        migrate.signal(libc::SIGSTOP);
        let t = Instant::now();
        let (st, log) = serve.wait(Duration::from_secs(60));
        assert!(!st.success(), "{io}: {log}");
        assert!(t.elapsed() < Duration::from_secs(40), "{io}: failed after {:?}", t.elapsed());
        assert!(log.contains("frozen or gone") && log.contains("lacks"), "{io}: {log}");
        assert!(log.contains("the guest started here and its memory is incomplete"), "{io}: {log}");
        assert!(!dst.exists() && !dir.join("dst.mem.partial").exists(), "{io}: no memory file looks complete");
        migrate.signal(libc::SIGKILL);
        drop(migrate);
        std::fs::remove_dir_all(dir).unwrap();
    });
}

/// The exit side of a proxy: a unix target that echoes what it gets.
fn echo_target(path: &Path) {
    let l = std::os::unix::net::UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            std::thread::spawn(move || {
                let mut w = c.try_clone().unwrap();
                let _ = std::io::copy(&mut c, &mut w);
                let _ = w.shutdown(std::net::Shutdown::Write);
            });
        }
    });
}

/// One connection through `entry_sock`: what goes in comes back.
fn round_trip(entry_sock: &Path) {
    let mut c = std::os::unix::net::UnixStream::connect(entry_sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    c.write_all(b"through the proxy").unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"through the proxy");
}

/// A `proxy exit` that may open only a few dozen descriptors, flooded with
/// idle connections: accept fails for a while (logged, backed off), the
/// strangers' handshakes time out, and a real connection goes through.
#[test]
fn proxy_exit_keeps_serving_under_a_low_descriptor_limit() {
    use std::os::unix::process::CommandExt;
    let dir = scratch("nofile");
    let (target, entry_sock) = (dir.join("target.sock"), dir.join("entry.sock"));
    echo_target(&target);
    let exit_addr = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(BIN);
    cmd.args(["proxy", "exit", "--listen", &exit_addr, "--target"])
        .arg(format!("unix:{}", target.display()))
        .args(psk_args());
    // SAFETY: setrlimit is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit { rlim_cur: 48, rlim_max: 48 };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut exit = Server::start(&mut cmd, "listening on");
    let flood: Vec<TcpStream> = (0..80).filter_map(|_| TcpStream::connect(&exit_addr).ok()).collect();
    let _entry = Server::start(
        Command::new(BIN)
            .args(["proxy", "entry", "--streams", "2", "--accept"])
            .arg(format!("unix:{}", entry_sock.display()))
            .arg(&exit_addr)
            .args(psk_args()),
        "accepting on",
    );
    exit.wait_log("accept failed", Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(6)); // the flood's handshakes time out
    drop(flood);
    round_trip(&entry_sock);
    assert!(exit.alive(), "the exit kept serving:\n{}", exit.log());
    std::fs::remove_dir_all(dir).unwrap();
}

/// 300 sessions opened by a peer holding the key that then carry nothing:
/// the exit admits what it can (256), refuses the rest, cuts the idle ones
/// after its idle timeout, and serves a real connection.
#[test]
fn idle_proxy_sessions_time_out_and_a_real_connection_is_served() {
    use pmigrate::relay::{self, RelaySendConfig};
    use pmigrate::StreamPlan;
    let dir = scratch("idle");
    let (target, entry_sock) = (dir.join("target.sock"), dir.join("entry.sock"));
    echo_target(&target);
    let exit_addr = format!("127.0.0.1:{}", free_port());
    let exit = Server::start(
        Command::new(BIN)
            .args(["proxy", "exit", "--listen", &exit_addr, "--idle-timeout", "4", "--target"])
            .arg(format!("unix:{}", target.display()))
            .args(psk_args()),
        "listening on",
    );
    let key = pmigrate::Auth::Psk(pmigrate::Psk::from_file(&keys::psk_file()).unwrap());
    let mut cfg = RelaySendConfig::new(StreamPlan::new(vec![exit_addr.parse().unwrap()], 1, key));
    cfg.target = Some(0);
    let mut idle = Vec::new();
    let mut refused = 0;
    for _ in 0..300 {
        match relay::connect(&cfg) {
            Ok(s) => idle.push(s),
            Err(e) => {
                assert!(e.to_string().contains("sessions are open already"), "{e}");
                refused += 1;
            }
        }
    }
    assert_eq!((idle.len(), refused), (256, 44), "the exit admits 256 sessions at once");
    let _entry = Server::start(
        Command::new(BIN)
            .args(["proxy", "entry", "--accept"])
            .arg(format!("unix:{}", entry_sock.display()))
            .arg(&exit_addr)
            .args(psk_args()),
        "accepting on",
    );
    exit.wait_log("idle timeout", Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(2));
    round_trip(&entry_sock);
    drop(idle);
    std::fs::remove_dir_all(dir).unwrap();
}
