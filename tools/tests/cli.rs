//! The `pmigrate` binary as an operator runs it: serve/migrate between
//! memory files, send/recv through pipes, and errors as one clear line.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};

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

/// Starts a command whose stderr announces it is listening, and waits for that.
fn start_listening(cmd: &mut Command) -> (Child, std::thread::JoinHandle<String>) {
    let mut child = cmd.stderr(Stdio::piped()).spawn().unwrap();
    let err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let log = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if line.contains("listening on") {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    rx.recv_timeout(Duration::from_secs(60)).expect("the server announced it is listening");
    (child, log)
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
        .output()
        .unwrap();
    assert!(migrate.status.success(), "migrate: {}", String::from_utf8_lossy(&migrate.stderr));
    let (served, log) = wait_output(serve, log);
    assert!(served.status.success(), "serve: {log}");
    assert!(log.contains("refused"), "serve logged the refusal: {log}");
    let src_json = String::from_utf8(migrate.stdout).unwrap();
    let dst_json = String::from_utf8(served.stdout).unwrap();
    assert!(src_json.contains("\"role\": \"source\"") && src_json.contains("\"converged\": true"), "{src_json}");
    let digest = |j: &str| j.lines().find(|l| l.contains("\"digest\"")).map(str::to_owned);
    assert_eq!(digest(&src_json), digest(&dst_json));
    assert!(std::fs::read(&dst).unwrap() == data, "destination file equals the source file");
    // Each end says which I/O backend ran: the one forced, or io_uring
    // exactly where the kernel allows it.
    assert!(dst_json.contains("\"io\": \"portable\""), "{dst_json}");
    let auto = if pmigrate::transport::uring::probe().is_ok() { "io_uring" } else { "portable" };
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
            .stdout(Stdio::piped()),
    );
    let migrate = Command::new(BIN)
        .args(["migrate", "--postcopy", "0", "--no-zero-copy", "--memory"])
        .arg(&src)
        .args(["--streams", "2", "--json", &addr])
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

#[test]
fn a_memory_file_both_hosts_map_is_handed_over_not_copied() {
    let dir = PathBuf::from(format!("/dev/shm/pmigrate-cli-{}-zc", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("vm.mem");
    write_guest_file(&src, 16);
    let addr = format!("127.0.0.1:{}", free_port());
    let (serve, log) = start_listening(
        Command::new(BIN)
            .args(["serve", "--listen", &addr, "--json", "--memory"])
            .arg(dir.join("unused.mem"))
            .stdout(Stdio::piped()),
    );
    let migrate = Command::new(BIN).args(["migrate", "--memory"]).arg(&src).args(["--json", &addr]).output().unwrap();
    assert!(migrate.status.success(), "migrate: {}", String::from_utf8_lossy(&migrate.stderr));
    let (served, log) = wait_output(serve, log);
    assert!(served.status.success(), "serve: {log}");
    let json = String::from_utf8(migrate.stdout).unwrap();
    assert!(json.contains("\"path\": \"zero-copy\""), "{json}");
    assert!(!dir.join("unused.mem").exists(), "nothing was copied into a memory file");
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
    let out = Command::new(BIN).args(["migrate", "--memory"]).arg(&src).arg(&nobody).output().unwrap();
    assert_one_error_line(&out);
    let out = Command::new(BIN).args(["migrate", "--memory"]).arg(dir.join("missing")).arg(&nobody).output().unwrap();
    assert_one_error_line(&out);
    let out = Command::new(BIN).args(["send", &nobody]).stdin(Stdio::null()).output().unwrap();
    assert_one_error_line(&out);
    let out = Command::new(BIN).args(["recv", "--listen", &nobody, "--wait", "1"]).output().unwrap();
    assert_one_error_line(&out);
    std::fs::remove_dir_all(dir).unwrap();
}
