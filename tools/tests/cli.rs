//! The `pmigrate` binary as an operator runs it: serve/migrate between
//! memory files, send/recv through pipes — ending at once when QEMU closes
//! them, and on SIGINT/SIGTERM with one line saying what was left — and
//! errors as one clear line.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};

#[path = "../../tests/support/keys.rs"]
mod keys;
#[path = "../../tests/support/listening.rs"]
mod listening;

use keys::psk_args;
use listening::start_listening;

const BIN: &str = env!("CARGO_BIN_EXE_pmigrate");

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pmigrate-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_output(mut child: Child, log: std::thread::JoinHandle<String>) -> (Output, String) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the process ended in bounded time");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (out, log.join().unwrap())
}

fn write_guest_file(path: &Path, mib: usize) -> Vec<u8> {
    let mut data = vec![0u8; mib << 20];
    let mut rng = rand::rngs::SmallRng::seed_from_u64(42);
    for (i, page) in data.chunks_mut(4096).enumerate() {
        match i % 4 {
            0 => rng.fill_bytes(page),
            1 => page.iter_mut().enumerate().for_each(|(k, b)| *b = b"kernel log line "[k % 16]),
            _ => {} // zero pages
        }
    }
    std::fs::write(path, &data).unwrap();
    data
}

fn assert_one_error_line(out: &Output) {
    assert!(!out.status.success(), "exit status non-zero");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<_> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line on stderr: {err:?}");
    assert!(lines[0].starts_with("pmigrate: error: "), "{err:?}");
}

#[test]
fn serve_and_migrate_a_memory_file_with_intruders_refused() {
    let dir = scratch("mem");
    let (src, dst) = (dir.join("src.mem"), dir.join("dst.mem"));
    let data = write_guest_file(&src, 32);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let (serve, log) = start_listening(
        Command::new(BIN)
            .args(["serve", "--listen", &addr, "--no-zero-copy", "--io", "portable", "--memory"])
            .arg(&dst)
            .arg("--json")
            .args(psk_args())
            .stdout(Stdio::piped()),
    );
    // Noise on the port first: refused, and serve keeps waiting.
    let mut noise = TcpStream::connect(&addr).unwrap();
    noise.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut reply = Vec::new();
    noise.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = noise.read_to_end(&mut reply);
    assert!(!reply.is_empty(), "the intruder got an error frame before the close");

    let migrate = Command::new(BIN)
        .args(["migrate", "--memory"])
        .arg(&src)
        .args(["--streams", "3", "--threads", "2", "--json", &addr])
        .args(psk_args())
        .output()
        .unwrap();
    assert!(migrate.status.success(), "migrate: {}", String::from_utf8_lossy(&migrate.stderr));
    let (served, log) = wait_output(serve, log);
    assert!(served.status.success(), "serve: {log}");
    // The refusal is one log line naming the stranger and why.
    let refusals: Vec<&str> = log.lines().filter(|l| l.contains("refused")).collect();
    let stranger = noise.local_addr().unwrap();
    assert_eq!(refusals.len(), 1, "one line for the one stranger: {log}");
    assert!(
        refusals[0].contains(" WARN ")
            && refusals[0].contains(&format!("peer={stranger}"))
            && refusals[0].contains("reason=\"handshake: "),
        "the line names the peer and the reason: {log}"
    );
    let src_json = String::from_utf8(migrate.stdout).unwrap();
    let dst_json = String::from_utf8(served.stdout).unwrap();
    assert!(src_json.contains("\"role\": \"source\"") && src_json.contains("\"converged\": true"), "{src_json}");
    let digest = |j: &str| j.lines().find(|l| l.contains("\"digest\"")).map(str::to_owned);
    assert_eq!(digest(&src_json), digest(&dst_json));
    assert!(std::fs::read(&dst).unwrap() == data, "destination file equals the source file");
    // Each end says which I/O backend ran: the one forced, or io_uring
    // exactly where the kernel allows it.
    assert!(dst_json.contains("\"io\": \"portable\""), "{dst_json}");
    let auto = if pmigrate_transport::backend::probe_uring().is_ok() { "io_uring" } else { "portable" };
    assert!(src_json.contains(&format!("\"io\": \"{auto}\"")), "{src_json}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn post_copy_between_memory_files_runs_the_resume_command_first() {
    let dir = scratch("postcopy");
    let (src, dst, mark) = (dir.join("src.mem"), dir.join("dst.mem"), dir.join("resumed"));
    let data = write_guest_file(&src, 32);
    let addr = format!("127.0.0.1:{}", free_port());
    let (serve, log) = start_listening(
        Command::new(BIN)
            .args(["serve", "--listen", &addr, "--no-zero-copy", "--json", "--resume-cmd"])
            .arg(format!("touch {}", mark.display()))
            .arg("--memory")
            .arg(&dst)
            .args(psk_args())
            .stdout(Stdio::piped()),
    );
    let migrate = Command::new(BIN)
        .args(["migrate", "--postcopy", "0", "--no-zero-copy", "--memory"])
        .arg(&src)
        .args(["--streams", "2", "--json", &addr])
        .args(psk_args())
        .output()
        .unwrap();
    assert!(migrate.status.success(), "migrate: {}", String::from_utf8_lossy(&migrate.stderr));
    let (served, log) = wait_output(serve, log);
    assert!(served.status.success(), "serve: {log}");
    let json = String::from_utf8(migrate.stdout).unwrap();
    assert!(json.contains("\"mode\": \"post-copy\""), "{json}");
    assert!(json.contains("\"pushed_pages\": 8192"), "every page pushed: {json}");
    assert!(mark.exists(), "the resume command ran");
    assert!(std::fs::read(&dst).unwrap() == data, "destination file equals the source file");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Same host, same file: `serve --memory F` where F is the very memory the
/// source migrates. The source proves it and hands it over; nothing is
/// copied and F keeps its content.
#[test]
fn a_memory_file_both_hosts_map_is_handed_over_not_copied() {
    let dir = PathBuf::from(format!("/dev/shm/pmigrate-cli-{}-zc", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("vm.mem");
    let data = write_guest_file(&src, 16);
    let addr = format!("127.0.0.1:{}", free_port());
    let (serve, log) = start_listening(
        Command::new(BIN)
            .args(["serve", "--listen", &addr, "--json", "--memory"])
            .arg(&src)
            .args(psk_args())
            .stdout(Stdio::piped()),
    );
    let migrate = Command::new(BIN)
        .args(["migrate", "--memory"])
        .arg(&src)
        .args(["--json", &addr])
        .args(psk_args())
        .output()
        .unwrap();
    assert!(migrate.status.success(), "migrate: {}", String::from_utf8_lossy(&migrate.stderr));
    let (served, log) = wait_output(serve, log);
    assert!(served.status.success(), "serve: {log}");
    let json = String::from_utf8(migrate.stdout).unwrap();
    assert!(json.contains("\"path\": \"zero-copy\""), "{json}");
    assert!(std::fs::read(&src).unwrap() == data, "the memory is as it was");
    assert!(!dir.join("vm.mem.partial").exists(), "nothing was copied into a memory file");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Both ends print their reports to a stdout nobody reads any more (a
/// closed pipe, as `| head` leaves): the migration is done all the same,
/// and both exit 0 without a panic.
#[test]
fn a_report_to_a_closed_stdout_is_no_failure() {
    let dir = scratch("closed-stdout");
    let (src, dst) = (dir.join("src.mem"), dir.join("dst.mem"));
    let data = write_guest_file(&src, 8);
    let addr = format!("127.0.0.1:{}", free_port());
    let closed = |cmd: &mut Command| {
        // A pipe whose read end is gone before the command writes.
        let (r, w) = std::io::pipe().unwrap();
        drop(r);
        cmd.stdout(w);
    };
    let mut serve = Command::new(BIN);
    serve.args(["serve", "--listen", &addr, "--no-zero-copy", "--memory"]).arg(&dst).args(psk_args());
    closed(&mut serve);
    let (serve, log) = start_listening(&mut serve);
    let mut migrate = Command::new(BIN);
    migrate.args(["migrate", "--no-zero-copy", "--memory"]).arg(&src).arg(&addr).args(psk_args());
    closed(&mut migrate);
    let migrated = migrate.stderr(Stdio::piped()).output().unwrap();
    let err = String::from_utf8_lossy(&migrated.stderr);
    assert!(migrated.status.success() && !err.contains("panicked"), "migrate: {:?}: {err}", migrated.status);
    let (served, log) = wait_output(serve, log);
    assert!(served.status.success() && !log.contains("panicked"), "serve: {:?}: {log}", served.status);
    assert!(std::fs::read(&dst).unwrap() == data, "the copy is exact");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A destination fills the memory it was given: with the source's file at
/// the same path on this host, `serve --memory F` fills F, and never opens
/// the source's file (its content and mtime stay as they were).
#[test]
fn serve_fills_its_own_memory_file_even_where_the_sources_path_exists() {
    let dir = PathBuf::from(format!("/dev/shm/pmigrate-cli-{}-own", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("vm.mem");
    let data = write_guest_file(&src, 8);
    let mtime = std::fs::metadata(&src).unwrap().modified().unwrap();
    let dst = dir.join("dst.mem");
    let addr = format!("127.0.0.1:{}", free_port());
    let (serve, log) = start_listening(
        Command::new(BIN)
            .args(["serve", "--listen", &addr, "--json", "--memory"])
            .arg(&dst)
            .args(psk_args())
            .stdout(Stdio::piped()),
    );
    let migrate = Command::new(BIN)
        .args(["migrate", "--memory"])
        .arg(&src)
        .args(["--json", &addr])
        .args(psk_args())
        .output()
        .unwrap();
    assert!(migrate.status.success(), "migrate: {}", String::from_utf8_lossy(&migrate.stderr));
    let (served, log) = wait_output(serve, log);
    assert!(served.status.success(), "serve: {log}");
    assert!(std::fs::read(&dst).unwrap() == data, "F holds the source's memory");
    assert!(std::fs::read(&src).unwrap() == data, "the source's file is as it was");
    assert_eq!(std::fs::metadata(&src).unwrap().modified().unwrap(), mtime, "the source's file was not written");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Secure by default: without a key, certificates or --insecure, every
/// command refuses to start and says what to give; --insecure starts with
/// one warning line.
#[test]
fn commands_refuse_to_start_without_authentication() {
    let dir = scratch("noauth");
    let addr = format!("127.0.0.1:{}", free_port());
    let mem = dir.join("m");
    write_guest_file(&mem, 1);
    let m = mem.to_string_lossy().into_owned();
    for args in [
        vec!["serve", "--listen", &addr, "--memory", &m],
        vec!["migrate", "--memory", &m, &addr],
        vec!["send", &addr],
        vec!["recv", "--listen", &addr],
        vec!["proxy", "entry", "--accept", "unix:/tmp/x.sock", &addr],
        vec!["proxy", "exit", "--listen", &addr, "--target", "unix:/tmp/x.sock"],
    ] {
        let out = Command::new(BIN).args(&args).stdin(Stdio::null()).output().unwrap();
        assert_one_error_line(&out);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--psk-file") && err.contains("--insecure"), "{args:?}: {err}");
    }
    // A key readable by others is refused, naming the file and the fix.
    let key = dir.join("open.key");
    std::fs::write(&key, [7u8; 32]).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out =
        Command::new(BIN).args(["send", "--psk-file"]).arg(&key).arg(&addr).stdin(Stdio::null()).output().unwrap();
    assert_one_error_line(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("too open"), "{}", String::from_utf8_lossy(&out.stderr));
    // keygen writes a usable key, once.
    let fresh = dir.join("fresh.key");
    assert!(Command::new(BIN).arg("keygen").arg(&fresh).status().unwrap().success());
    assert_eq!(std::fs::read(&fresh).unwrap().len(), 32);
    assert!(!Command::new(BIN).arg("keygen").arg(&fresh).status().unwrap().success(), "never overwrites");
    // --insecure: one warning line, then the real error (nobody listens).
    let out = Command::new(BIN).args(["send", "--insecure", &addr]).stdin(Stdio::null()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.lines().next().is_some_and(|l| l.contains("warning: --insecure")), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn send_and_recv_carry_a_pipe_exactly() {
    let dir = scratch("pipe");
    let input = write_guest_file(&dir.join("in"), 24);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let (mut recv, log) = start_listening(
        Command::new(BIN)
            .args(["recv", "--listen", &addr, "--report", "--io", "portable"])
            .args(psk_args())
            .stdout(Stdio::piped())
            .stdin(Stdio::null()),
    );
    // Drain stdout as it comes, as QEMU would: a stalled reader pushes back.
    let mut stdout = recv.stdout.take().unwrap();
    let drain = std::thread::spawn(move || {
        let mut v = Vec::new();
        stdout.read_to_end(&mut v).unwrap();
        v
    });
    let mut send = Command::new(BIN)
        .args(["send", "--streams", "4", "--compress", "auto", &addr])
        .args(psk_args())
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = send.stdin.take().unwrap();
    let feed = std::thread::spawn(move || {
        // Uneven writes, as QEMU's would be.
        let mut off = 0;
        let mut k = 1usize;
        while off < input.len() {
            k = (k * 31 + 7) % 70_000 + 1;
            let end = (off + k).min(input.len());
            stdin.write_all(&input[off..end]).unwrap();
            off = end;
        }
        input
    });
    let input = feed.join().unwrap();
    let sent = send.wait_with_output().unwrap();
    assert!(sent.status.success(), "send: {}", String::from_utf8_lossy(&sent.stderr));
    let (received, log) = wait_output(recv, log);
    assert!(received.status.success(), "recv: {log}");
    assert!(drain.join().unwrap() == input, "stdout carries exactly the stream");
    assert!(log.contains("pmigrate recv:"), "the report went to stderr: {log}");
    assert!(log.contains("portable I/O"), "the report names the backend: {log}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn failures_are_one_line_and_a_nonzero_exit() {
    let dir = scratch("err");
    let nobody = format!("127.0.0.1:{}", free_port());
    let src = dir.join("src.mem");
    write_guest_file(&src, 1);
    let out = Command::new(BIN).args(["migrate", "--memory"]).arg(&src).arg(&nobody).args(psk_args()).output().unwrap();
    assert_one_error_line(&out);
    let out = Command::new(BIN)
        .args(["migrate", "--memory"])
        .arg(dir.join("missing"))
        .arg(&nobody)
        .args(psk_args())
        .output()
        .unwrap();
    assert_one_error_line(&out);
    let out = Command::new(BIN).args(["send", &nobody]).args(psk_args()).stdin(Stdio::null()).output().unwrap();
    assert_one_error_line(&out);
    let out = Command::new(BIN).args(["recv", "--listen", &nobody, "--wait", "1"]).args(psk_args()).output().unwrap();
    assert_one_error_line(&out);
    std::fs::remove_dir_all(dir).unwrap();
}

/// A long-running child (the proxy runs until killed), its stderr in a
/// file; killed when dropped, so a failing test leaves nothing behind.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts `cmd` and waits until its log says `ready`.
    fn start(cmd: &mut Command, log: PathBuf, ready: &str) -> Daemon {
        let file = std::fs::File::create(&log).unwrap();
        let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(file).spawn().unwrap();
        let d = Daemon { child, log };
        d.wait_log(ready);
        d
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (60 s at most) until the log contains `what`.
    fn wait_log(&self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.log().contains(what) {
            assert!(Instant::now() < deadline, "{} never logged {what:?}:\n{}", self.log.display(), self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `pmigrate proxy` as two processes with mutual TLS: a unix connection
/// reaches the target whole, both ways, half-close included; an entry
/// whose certificate the exit's CA did not sign gets nowhere.
#[test]
fn proxy_carries_a_unix_connection_over_tls_and_refuses_strangers() {
    use pmigrate_transport::tls::test_pki::write_pki;
    use std::os::unix::net::{UnixListener, UnixStream};
    let dir = scratch("proxy-tls");
    write_pki(&dir).unwrap();
    let pem = |n: &str| dir.join(n).to_string_lossy().into_owned();
    let tls = |who: &str| {
        let ca = if who == "other" { pem("other.pem") } else { pem("ca.pem") };
        let (cert, key) = (pem(&format!("{who}.pem")), pem(&format!("{who}.key")));
        ["--tls-cert".to_string(), cert, "--tls-key".into(), key, "--tls-ca".into(), ca]
    };
    let target = UnixListener::bind(dir.join("target.sock")).unwrap();
    let exit_addr = format!("127.0.0.1:{}", free_port());
    let exit = Daemon::start(
        Command::new(BIN)
            .args(["proxy", "exit", "--listen", &exit_addr, "--target", &format!("unix:{}", pem("target.sock"))])
            .args(tls("b")),
        dir.join("exit.log"),
        "listening on",
    );
    let entry = |who: &str, sock: &str| {
        Daemon::start(
            Command::new(BIN)
                .args(["proxy", "entry", "--streams", "2", "--accept", &format!("unix:{}", pem(sock))])
                .args(tls(who))
                .arg(&exit_addr),
            dir.join(format!("{sock}.log")),
            "accepting on",
        )
    };
    let good = entry("a", "entry.sock");
    let bad = entry("other", "stranger.sock");
    // The stranger's connection is cut at its entry and never reaches the target.
    let mut c = UnixStream::connect(dir.join("stranger.sock")).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let _ = c.write_all(b"let me in");
    let mut got = Vec::new();
    let _ = c.read_to_end(&mut got);
    assert!(got.is_empty(), "a stranger got an answer");
    bad.wait_log("refused");
    assert!(bad.log().contains("TLS handshake"), "the stranger's entry says why: {}", bad.log());
    exit.wait_log("refused");
    // The real one goes through.
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let mut c = UnixStream::connect(dir.join("entry.sock")).unwrap();
    let mut w = c.try_clone().unwrap();
    let d2 = data.clone();
    let writer = std::thread::spawn(move || {
        w.write_all(&d2).unwrap();
        w.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let (mut t, _) = target.accept().unwrap();
    let mut received = Vec::new();
    t.read_to_end(&mut received).unwrap();
    assert!(received == data, "the target got other bytes");
    t.write_all(b"answer after the end").unwrap();
    drop(t);
    writer.join().unwrap();
    let mut answer = Vec::new();
    c.read_to_end(&mut answer).unwrap();
    assert_eq!(answer, b"answer after the end");
    good.wait_log("connection done");
    assert!(good.log().contains("over TLS") && good.log().contains("TLS, portable I/O"), "entry: {}", good.log());
    drop((good, bad, exit));
    std::fs::remove_dir_all(dir).unwrap();
}

/// SIGTERM stops a proxy cleanly: it accepts nothing new, lets what it
/// carries finish, says so, exits 143 (128 + SIGTERM) and removes its
/// socket.
#[test]
fn a_proxy_stops_on_sigterm_after_its_connections_end() {
    use std::os::unix::net::{UnixListener, UnixStream};
    let dir = scratch("proxy-term");
    let target = UnixListener::bind(dir.join("target.sock")).unwrap();
    let exit_addr = format!("127.0.0.1:{}", free_port());
    let target_arg = format!("unix:{}", dir.join("target.sock").display());
    let exit = Daemon::start(
        Command::new(BIN).args(["proxy", "exit", "--listen", &exit_addr, "--target", &target_arg]).args(psk_args()),
        dir.join("exit.log"),
        "listening on",
    );
    let accept = format!("unix:{}", dir.join("entry.sock").display());
    let mut entry = Daemon::start(
        Command::new(BIN).args(["proxy", "entry", "--accept", &accept, &exit_addr]).args(psk_args()),
        dir.join("entry.log"),
        "accepting on",
    );
    // A connection in progress when the signal comes is carried to its end.
    let mut c = UnixStream::connect(dir.join("entry.sock")).unwrap();
    let (mut t, _) = target.accept().unwrap();
    let term = |d: &Daemon| {
        // SAFETY: kill(2) with a pid of a child this test spawned and still owns.
        unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) }
    };
    assert_eq!(term(&entry), 0);
    c.write_all(b"after the signal").unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = Vec::new();
    t.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"after the signal");
    drop(t);
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = entry.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "the entry did not stop: {}", entry.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(143), "{status}: {}", entry.log());
    assert!(entry.log().contains("connection done") && entry.log().contains("stopped by SIGTERM"), "{}", entry.log());
    assert!(!dir.join("entry.sock").exists(), "the entry removed its socket");
    drop(exit);
    std::fs::remove_dir_all(dir).unwrap();
}

#[path = "../../tests/support/paced.rs"]
mod paced;

/// The README's post-copy example on one host: both ends exit 0, the
/// resume command ran once, and the destination's file is the source's.
#[test]
fn the_readme_post_copy_example_hands_the_vm_over_once() {
    let dir = scratch("readme-postcopy");
    let src = PathBuf::from(format!("/dev/shm/pmigrate-cli-{}-readme.mem", std::process::id()));
    let data = write_guest_file(&src, 16);
    let dst = dir.join("vm.mem");
    let addr = format!("127.0.0.1:{}", free_port());
    let (serve, log) = start_listening(
        Command::new(BIN)
            .args(["serve", "--listen", &addr, "--memory"])
            .arg(&dst)
            .args(["--resume-cmd", "echo running"])
            .args(psk_args())
            .stdout(Stdio::piped()),
    );
    let migrate = Command::new(BIN)
        .args(["migrate", "--memory"])
        .arg(&src)
        .args(["--postcopy", "1", &addr])
        .args(psk_args())
        .output()
        .unwrap();
    let (served, log) = wait_output(serve, log);
    let _ = std::fs::remove_file(&src);
    assert!(migrate.status.success(), "migrate: {}", String::from_utf8_lossy(&migrate.stderr));
    assert!(served.status.success(), "serve: {log}");
    assert_eq!(String::from_utf8_lossy(&served.stdout).matches("running").count(), 1, "the guest started once");
    assert!(std::fs::read(&dst).unwrap() == data, "vm.mem equals the source");
    assert!(!dir.join("vm.mem.partial").exists());
    std::fs::remove_dir_all(dir).unwrap();
}

/// A destination killed after the post-copy switchover: the source exits
/// non-zero and says the guest was handed over and is lost there (or, when
/// the destination died before it could say its guest started, that the
/// outcome is unknown); it does not claim success and does not resume the
/// guest itself.
#[test]
fn a_destination_killed_after_the_switchover_fails_the_source_truthfully() {
    let dir = scratch("killed-dst");
    let src = dir.join("src.mem");
    write_guest_file(&src, 64);
    let (dst, mark) = (dir.join("dst.mem"), dir.join("started"));
    let addr = format!("127.0.0.1:{}", free_port());
    let (mut serve, log) = start_listening(
        Command::new(BIN)
            .args(["serve", "--listen", &addr, "--memory"])
            .arg(&dst)
            .arg("--resume-cmd")
            .arg(format!("touch {}", mark.display()))
            .args(psk_args()),
    );
    // 64 MiB at 8 MiB/s: the push surely runs when the destination dies.
    let link = paced::Paced::start(addr.parse().unwrap(), 8 << 20);
    let migrate = Command::new(BIN)
        .args(["migrate", "--postcopy", "0", "--progress-timeout", "5", "--memory"])
        .arg(&src)
        .arg(link.addr.to_string())
        .args(psk_args())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !mark.exists() {
        assert!(Instant::now() < deadline, "the guest never started at the destination");
        std::thread::sleep(Duration::from_millis(10));
    }
    serve.kill().unwrap();
    let _ = serve.wait();
    let _ = log.join();
    let t = Instant::now();
    let out = migrate.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the source claimed success: {err}");
    assert!(t.elapsed() < Duration::from_secs(45), "the source gave up within its deadline");
    // The destination may die before or after its word that the guest
    // started got out: the source says the guest was handed over, or that
    // it cannot know; never that it keeps the guest.
    assert!(
        err.contains("handed over at the post-copy switchover")
            || (err.contains("no verdict from the destination") && err.contains("do not resume it here")),
        "{err}"
    );
    assert!(!err.contains("keeps running here") && !err.contains("resumed here"), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    eprintln!("the source said: {err}");
    assert!(!dst.exists(), "no half-written memory file looks complete");
    std::fs::remove_dir_all(dir).unwrap();
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on the pid of a child this test spawned and owns.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

/// Incompressible bytes, so a paced link holds a migration back.
fn write_random_file(path: &Path, mib: usize) -> Vec<u8> {
    let mut data = vec![0u8; mib << 20];
    rand::rngs::SmallRng::seed_from_u64(7).fill_bytes(&mut data);
    std::fs::write(path, &data).unwrap();
    data
}

/// SIGINT or SIGTERM on `serve` and `migrate`: each stops, prints one line
/// naming what it leaves behind, and exits 128 + the signal. A migration
/// cancelled at the source leaves the destination file untouched and the
/// destination waiting for another; a cancel after `--pause-cmd` runs
/// `--cont-cmd`.
#[test]
fn signals_cancel_serve_and_migrate_with_one_line_each() {
    let dir = scratch("signals");
    let (src, dst) = (dir.join("src.mem"), dir.join("dst.mem"));
    write_random_file(&src, 64);
    let addr = format!("127.0.0.1:{}", free_port());
    let (serve, log) =
        start_listening(Command::new(BIN).args(["serve", "--listen", &addr, "--memory"]).arg(&dst).args(psk_args()));
    // migrate, interrupted in round 0.
    let link = paced::Paced::start(addr.parse().unwrap(), 8 << 20);
    let migrate = Command::new(BIN)
        .args(["migrate", "--memory"])
        .arg(&src)
        .arg(link.addr.to_string())
        .args(psk_args())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    link.wait_forwarded(2 << 20, Duration::from_secs(60));
    signal(&migrate, libc::SIGINT);
    let out = migrate.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("SIGINT: migration cancelled, nothing was handed over; the VM keeps running here"), "{err}");
    // serve notices, keeps its file untouched and waits for another; then
    // SIGTERM stops it.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !dir.join("dst.mem.partial").exists() && Instant::now() < deadline && !log.is_finished() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while dir.join("dst.mem.partial").exists() {
        assert!(Instant::now() < deadline, "the partial file stayed");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    signal(&serve, libc::SIGTERM);
    let (served, log) = wait_output(serve, log);
    assert_eq!(served.status.code(), Some(143), "{log}");
    assert!(log.contains("waiting for another"), "{log}");
    assert!(log.contains("SIGTERM: stopped; no migration received"), "{log}");
    assert!(!dst.exists(), "no memory file was made");

    // A cancel after the pause: the VM is resumed here.
    let (paused, resumed) = (dir.join("paused"), dir.join("resumed"));
    let addr = format!("127.0.0.1:{}", free_port());
    let (serve, log) =
        start_listening(Command::new(BIN).args(["serve", "--listen", &addr, "--memory"]).arg(&dst).args(psk_args()));
    let migrate = Command::new(BIN)
        .args(["migrate", "--memory"])
        .arg(&src)
        .arg(&addr)
        .arg("--pause-cmd")
        .arg(format!("touch {}; sleep 2", paused.display()))
        .arg("--cont-cmd")
        .arg(format!("touch {}", resumed.display()))
        .args(psk_args())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !paused.exists() {
        assert!(Instant::now() < deadline, "never paused");
        std::thread::sleep(Duration::from_millis(5));
    }
    signal(&migrate, libc::SIGTERM);
    let out = migrate.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "{err}");
    assert!(err.contains("the VM was resumed here (--cont-cmd)"), "{err}");
    assert!(resumed.exists(), "--cont-cmd ran");
    signal(&serve, libc::SIGINT);
    let (served, log) = wait_output(serve, log);
    assert_eq!(served.status.code(), Some(130), "{log}");
    assert!(!dst.exists(), "no memory file was made: {log}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Checks that fail before anyone connects, with the real cause, at once.
#[test]
fn preflight_failures_name_their_cause_at_once() {
    let dir = scratch("preflight");
    let addr = format!("127.0.0.1:{}", free_port());
    let t = Instant::now();
    let out = Command::new(BIN)
        .args(["serve", "--listen", &addr, "--memory"])
        .arg(dir.join("missing/vm.mem"))
        .args(psk_args())
        .output()
        .unwrap();
    assert_one_error_line(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing") && err.contains("No such file"), "{err}");
    let out = Command::new(BIN).args(["send", "--streams", "0", &addr]).args(psk_args()).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--streams"));
    // An entry whose exit does not answer says so at start; its socket's
    // directory is made, and its mode is what was asked for.
    let sock = dir.join("run/pmigrate/m.sock");
    let mut entry = Command::new(BIN)
        .args(["proxy", "entry", "--socket-mode", "660", "--accept"])
        .arg(format!("unix:{}", sock.display()))
        .arg(&addr)
        .args(psk_args())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(entry.stderr.take().unwrap()).lines();
    let entry = Daemon { child: entry, log: dir.join("unused") };
    // Read all it says, so its stderr stays open, until it listens.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || lines.map_while(Result::ok).for_each(|l| drop(tx.send(l))));
    let said: Vec<String> = rx.iter().take_while(|l| !l.contains("accepting on")).collect();
    assert!(said.iter().any(|l| l.contains("does not answer")), "{said:?}");
    assert!(t.elapsed() < Duration::from_secs(10));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o660);
    signal(&entry.child, libc::SIGTERM);
    let mut entry = entry;
    assert_eq!(entry.child.wait().unwrap().code(), Some(143));
    std::fs::remove_dir_all(dir).unwrap();
}

/// `serve` and `migrate` over mutual TLS: the memory lands whole, both
/// reports say TLS, and a source with a certificate of another CA is
/// refused while serve goes on serving.
#[test]
fn serve_and_migrate_over_mutual_tls() {
    use pmigrate_transport::tls::test_pki::write_pki;
    let dir = scratch("mem-tls");
    write_pki(&dir).unwrap();
    let pem = |n: &str| dir.join(n).to_string_lossy().into_owned();
    let tls = |who: &str| {
        let ca = if who == "other" { pem("other.pem") } else { pem("ca.pem") };
        [
            "--tls-cert".to_string(),
            pem(&format!("{who}.pem")),
            "--tls-key".into(),
            pem(&format!("{who}.key")),
            "--tls-ca".into(),
            ca,
        ]
    };
    let (src, dst) = (dir.join("src.mem"), dir.join("dst.mem"));
    let data = write_guest_file(&src, 16);
    let addr = format!("127.0.0.1:{}", free_port());
    let (serve, log) = start_listening(
        Command::new(BIN)
            .args(["serve", "--listen", &addr, "--json", "--memory"])
            .arg(&dst)
            .args(tls("b"))
            .stdout(Stdio::piped()),
    );
    let stranger =
        Command::new(BIN).args(["migrate", "--memory"]).arg(&src).arg(&addr).args(tls("other")).output().unwrap();
    assert_one_error_line(&stranger);
    assert!(String::from_utf8_lossy(&stranger.stderr).contains("TLS handshake"));
    let migrate =
        Command::new(BIN).args(["migrate", "--json", "--memory"]).arg(&src).arg(&addr).args(tls("a")).output().unwrap();
    assert!(migrate.status.success(), "migrate: {}", String::from_utf8_lossy(&migrate.stderr));
    let (served, log) = wait_output(serve, log);
    assert!(served.status.success(), "serve: {log}");
    assert!(std::fs::read(&dst).unwrap() == data);
    for json in [String::from_utf8_lossy(&migrate.stdout), String::from_utf8_lossy(&served.stdout)] {
        assert!(json.contains("\"io\": \"TLS, portable\""), "{json}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// An `exec:` helper as QEMU runs it: the test holds QEMU's ends of its
/// stdin and stdout; its stderr goes to a file. Killed when dropped.
struct Helper {
    child: Child,
    log: PathBuf,
    stdin: Option<std::process::ChildStdin>,
    stdout: Option<std::process::ChildStdout>,
}

impl Helper {
    fn start(args: &[&str], log: PathBuf) -> Helper {
        let file = std::fs::File::create(&log).unwrap();
        let mut child = Command::new(BIN)
            .args(args)
            .args(psk_args())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(file)
            .spawn()
            .unwrap();
        let (stdin, stdout) = (child.stdin.take(), child.stdout.take());
        Helper { child, log, stdin, stdout }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its exit status, waiting at most `limit`.
    fn exit_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) with the pid of a child this test spawned and still owns.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `recv` listening on a free port and a `send` connected to it; recv's
/// stdout is drained (as the destination QEMU reads it) into the returned
/// thread, which also counts the bytes as they come.
fn helper_pair(
    dir: &Path,
) -> (Helper, Helper, std::thread::JoinHandle<Vec<u8>>, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut recv = Helper::start(&["recv", "--listen", &addr, "--report"], dir.join("recv.log"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !recv.log().contains("listening on") {
        assert!(Instant::now() < deadline, "recv never listened: {}", recv.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut out = recv.stdout.take().unwrap();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = count.clone();
    let drain = std::thread::spawn(move || {
        let (mut all, mut buf) = (Vec::new(), vec![0u8; 1 << 16]);
        loop {
            match out.read(&mut buf) {
                Ok(0) | Err(_) => return all,
                Ok(n) => {
                    all.extend_from_slice(&buf[..n]);
                    counted.store(all.len(), std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    });
    let send = Helper::start(&["send", "--streams", "3", "--report", &addr], dir.join("send.log"));
    (recv, send, drain, count)
}

/// What QEMU does when it cancels (or completes) an `exec:` migration: it
/// closes both pipes of `send`, then waits for it with its main loop
/// stopped. Both helpers must end at once — recv although its return path
/// (its stdin) stays open — and the stream so far must arrive whole, with
/// recv's stdout closed after it.
#[test]
fn send_ends_once_its_peer_closed_both_pipes_and_the_stream_arrives_whole() {
    let dir = scratch("closed");
    let (mut recv, mut send, drain, _) = helper_pair(&dir);
    let data = write_guest_file(&dir.join("in"), 3);
    send.stdin.as_mut().unwrap().write_all(&data).unwrap();
    // QEMU closes the reading end first, then the writing end.
    drop(send.stdout.take());
    drop(send.stdin.take());
    let t0 = Instant::now();
    let sent = send.exit_within(Duration::from_secs(2));
    let got = recv.exit_within(Duration::from_secs(2));
    eprintln!("both helpers ended {:.3} s after the pipes closed", t0.elapsed().as_secs_f64());
    assert!(sent.is_some_and(|s| s.success()), "send: {sent:?}: {}", send.log());
    assert!(got.is_some_and(|s| s.success()), "recv: {got:?}: {}", recv.log());
    assert!(drain.join().unwrap() == data, "recv's stdout carries the stream whole, then ends");
    assert!(recv.stdin.is_some(), "the return path stayed open all along");
    assert!(send.log().contains("back: 0 bytes in 0 chunks (its reader closed first)"), "{}", send.log());
    std::fs::remove_dir_all(dir).unwrap();
}

/// SIGTERM or SIGINT at either helper in the middle of a stream: both end
/// within 2 s; the one signalled says in one line what it left behind and
/// exits with 128 + the signal, the other fails naming the signal. Before a
/// sender came, recv says there was nothing to cancel.
#[test]
fn send_and_recv_interrupted_say_what_they_left_and_exit_128_plus_the_signal() {
    for (victim, sig, name) in [("send", libc::SIGTERM, "SIGTERM"), ("recv", libc::SIGINT, "SIGINT")] {
        let dir = scratch(&format!("sig-{victim}"));
        let (mut recv, mut send, drain, count) = helper_pair(&dir);
        let mut stdin = send.stdin.take().unwrap();
        let feed = std::thread::spawn(move || {
            let chunk = vec![7u8; 1 << 16];
            while stdin.write_all(&chunk).is_ok() {
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        while count.load(std::sync::atomic::Ordering::Relaxed) < 1 << 20 {
            assert!(Instant::now() < deadline, "nothing relayed: {}", recv.log());
            std::thread::sleep(Duration::from_millis(10));
        }
        let (hit, other) = if victim == "send" { (&mut send, &mut recv) } else { (&mut recv, &mut send) };
        hit.signal(sig);
        let t0 = Instant::now();
        let hit_status = hit.exit_within(Duration::from_secs(2));
        let other_status = other.exit_within(Duration::from_secs(2));
        eprintln!("{victim} {name}: both ended within {:.3} s", t0.elapsed().as_secs_f64());
        assert_eq!(hit_status.and_then(|s| s.code()), Some(128 + sig), "{victim}: {}", hit.log());
        let said: Vec<String> = hit.log().lines().filter(|l| !l.contains("listening on")).map(str::to_string).collect();
        assert_eq!(said.len(), 1, "{victim} says one line: {said:?}");
        let expected = format!("pmigrate {victim}: interrupted by {name}: migration cancelled");
        assert!(said[0].starts_with(&expected), "{said:?}");
        assert!(other_status.is_some_and(|s| !s.success()), "the other end failed: {other_status:?}");
        let errors: Vec<String> =
            other.log().lines().filter(|l| l.starts_with("pmigrate: error:")).map(str::to_string).collect();
        assert!(errors.len() == 1 && errors[0].contains(&format!("interrupted by {name}")), "{}", other.log());
        drop((recv, send));
        let _ = (feed.join(), drain.join());
        std::fs::remove_dir_all(dir).unwrap();
    }
    // Nothing to cancel yet.
    let dir = scratch("sig-early");
    let addr = format!("127.0.0.1:{}", free_port());
    let mut recv = Helper::start(&["recv", "--listen", &addr, "--report"], dir.join("recv.log"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !recv.log().contains("listening on") {
        assert!(Instant::now() < deadline, "recv never listened: {}", recv.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    recv.signal(libc::SIGINT);
    assert_eq!(recv.exit_within(Duration::from_secs(2)).and_then(|s| s.code()), Some(130), "{}", recv.log());
    assert!(recv
        .log()
        .contains("pmigrate recv: interrupted by SIGINT: migration cancelled before the source connected"));
    std::fs::remove_dir_all(dir).unwrap();
}

/// A destination whose disk cannot hold the source's memory says so to the
/// source before a page moves, and creates nothing.
#[test]
fn serve_refuses_a_source_its_disk_cannot_hold() {
    let dir = scratch("full-disk");
    let small = dir.join("small");
    std::fs::create_dir_all(&small).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(&small)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipping: cannot mount a small tmpfs here (not root?)");
        return;
    }
    let src = dir.join("src.mem");
    write_guest_file(&src, 32);
    let addr = format!("127.0.0.1:{}", free_port());
    let (serve, log) = start_listening(
        Command::new(BIN)
            .args(["serve", "--listen", &addr, "--wait", "3", "--memory"])
            .arg(small.join("vm.mem"))
            .args(psk_args()),
    );
    let out = Command::new(BIN).args(["migrate", "--memory"]).arg(&src).arg(&addr).args(psk_args()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let (_, log) = wait_output(serve, log);
    let listing: Vec<_> = std::fs::read_dir(&small).unwrap().collect();
    let _ = Command::new("umount").arg(&small).status();
    assert_one_error_line(&out);
    assert!(err.contains("has room for") && err.contains("the VM keeps running here"), "{err}");
    assert!(log.contains("refused"), "{log}");
    assert!(listing.is_empty(), "nothing was created on the full disk");
    std::fs::remove_dir_all(dir).unwrap();
}

/// `--log-format json`: a server's refusal is one JSON object with the
/// peer and the reason as fields, for a log shipper — with a pre-shared
/// key, and with TLS, where the stranger fails the TLS handshake itself.
#[test]
fn a_refused_stranger_is_one_json_log_line() {
    use pmigrate_transport::tls::test_pki::write_pki;
    let dir = scratch("json-log");
    write_pki(&dir).unwrap();
    let pem = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let tls: Vec<String> = ["--tls-cert", &pem("b.pem"), "--tls-key", &pem("b.key"), "--tls-ca", &pem("ca.pem")]
        .map(String::from)
        .to_vec();
    for (auth, reason) in [(psk_args().to_vec(), "handshake: "), (tls, "TLS handshake: ")] {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut serve = Command::new(BIN)
            .args(["serve", "--log-format", "json", "--listen", &addr, "--memory"])
            .arg(dir.join("dst.mem"))
            .args(&auth)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = BufReader::new(serve.stderr.take().unwrap()).lines();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || lines.map_while(Result::ok).for_each(|l| drop(tx.send(l))));
        let mut log = String::new();
        let mut until = |what: &str| {
            while let Ok(l) = rx.recv_timeout(Duration::from_secs(60)) {
                log.push_str(&l);
                log.push('\n');
                if l.contains(what) {
                    return;
                }
            }
            panic!("serve never said {what:?}: {log}");
        };
        until("listening on");
        let mut stranger = TcpStream::connect(&addr).unwrap();
        stranger.write_all(&[0xff; 64]).unwrap();
        stranger.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let _ = stranger.read_to_end(&mut Vec::new());
        let peer = stranger.local_addr().unwrap().to_string();
        // The refusal's line (a TLS stranger may see its connection close
        // before the line is written), then stop serve.
        until("refused");
        signal(&serve, libc::SIGTERM);
        let _ = serve.wait();
        log.extend(rx.iter().map(|l| l + "\n"));
        let objects: Vec<serde_json::Value> =
            log.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
        let refused: Vec<_> = objects.iter().filter(|o| o["message"] == "refused").collect();
        assert_eq!(refused.len(), 1, "{log}");
        assert_eq!(refused[0]["level"], "WARN", "{log}");
        assert_eq!(refused[0]["peer"], peer.as_str(), "{log}");
        assert!(refused[0]["reason"].as_str().is_some_and(|r| r.starts_with(reason)), "{log}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The usual conveniences: `--version`, shell completions, a man page.
#[test]
fn version_completions_and_man_page() {
    let run = |args: &[&str]| {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(run(&["--version"]).trim(), format!("pmigrate {}", env!("CARGO_PKG_VERSION")));
    let bash = run(&["completions", "bash"]);
    assert!(bash.contains("_pmigrate()") && bash.contains("migrate") && bash.contains("--psk-file"), "{bash}");
    assert!(run(&["completions", "zsh"]).contains("#compdef pmigrate"));
    let man = run(&["man"]);
    assert!(man.starts_with(".ie") || man.contains(".TH pmigrate"), "{man}");
    assert!(man.contains("serve") && man.contains("proxy"), "{man}");
    let bad = Command::new(BIN).args(["completions", "tcsh"]).output().unwrap();
    assert!(!bad.status.success());
}
