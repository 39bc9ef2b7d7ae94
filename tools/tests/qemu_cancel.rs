//! `pmigrate qemu` cut short, and refusing what would fail anyway.
//!
//! Every test boots the self-checking guest of `tests/guest/` as the source
//! and a destination QEMU with `-incoming defer`, each with a second QMP
//! socket for `pmigrate qemu` (a QMP socket serves one client at a time).
//! The tests check that:
//!
//! - `--timeout`, SIGINT and SIGTERM in the middle of a migration cancel
//!   it: the source is `cancelled` and runs on (its workload too), the
//!   capabilities and parameters `pmigrate qemu` set are put back, the
//!   destination QEMU gives up without running the guest, one line says
//!   so, and the exit status is non-zero (128 + the signal's number);
//! - a destination whose RAM differs in size is refused before either QEMU
//!   is touched, both sizes named;
//! - a `recv` port already in use is named at once, nothing touched.
//!
//! The migrations run at a bandwidth below the guest's dirtying rate, so
//! they are surely still running when cut short. The tests run one at a
//! time and skip, saying why, when QEMU is missing.

#[path = "../../tests/support/migration.rs"]
mod migration;
#[path = "../../tests/support/qemu.rs"]
mod qemu;

use std::fs;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use migration::{
    boot_source, check_destination_gave_up, check_source_runs_on, guest, one_at_a_time, Scratch, MIGRATION_TIMEOUT,
};
use qemu::{migration_summary, parse_mem_size, Qemu, VmConfig, DEFAULT_MEM};
use serde_json::Value;

/// The binary under test.
const PMIGRATE: &str = env!("CARGO_BIN_EXE_pmigrate");
/// The source's bandwidth: below the guest's dirtying rate (20 MiB/s), so
/// the migration never converges on its own.
const SLOW_BANDWIDTH: u64 = 8 << 20;
/// The `--timeout` of the timeout test, in seconds.
const TIMEOUT_S: u64 = 3;
/// How long `pmigrate qemu` may take to end after a signal.
const STOP_LIMIT: Duration = Duration::from_secs(10);
/// How long a refusal may take.
const REFUSAL_LIMIT: Duration = Duration::from_secs(2);

/// The test guest with a second QMP socket at `qmp`.
fn with_operator(cfg: VmConfig, qmp: &Path) -> VmConfig {
    cfg.args(["-qmp".to_string(), format!("unix:{},server=on,wait=off", qmp.display())])
}

/// `x-ignore-shared` and `max-bandwidth` as a QEMU has them now.
fn settings(vm: &mut Qemu) -> (bool, u64) {
    let caps = vm.qmp().execute("query-migrate-capabilities", Value::Null).expect("query-migrate-capabilities");
    let ignore_shared =
        caps.as_array().into_iter().flatten().any(|c| c["capability"] == "x-ignore-shared" && c["state"] == true);
    let params = vm.qmp().query_migrate_parameters().expect("query-migrate-parameters");
    (ignore_shared, params["max-bandwidth"].as_u64().expect("max-bandwidth"))
}

/// A source (booted, its workload running unless `boot` is false) and a
/// waiting destination of `dst_mem` RAM, each with an operator QMP socket.
fn pair(scratch: &Scratch, test: &str, dst_mem: &str, boot: bool) -> (Qemu, Qemu) {
    let cfg = guest(test, 64, 20);
    let dst_cfg = with_operator(cfg.clone().mem(dst_mem), &scratch.path("dst.qmp")).incoming("defer");
    let dst = Qemu::spawn(dst_cfg).expect("spawning the destination QEMU");
    let src_cfg = with_operator(cfg, &scratch.path("src.qmp"));
    let src = if boot { boot_source(src_cfg) } else { Qemu::spawn(src_cfg).expect("spawning the source QEMU") };
    (src, dst)
}

/// Starts `pmigrate qemu` between the pair's operator sockets, to `dest`,
/// with `opts`; its stderr goes to `qemu.err`.
fn start(scratch: &Scratch, opts: &[&str], dest: &str) -> Child {
    let err = fs::File::create(scratch.path("qemu.err")).expect("creating qemu.err");
    Command::new(PMIGRATE)
        .arg("qemu")
        .arg("--src-qmp")
        .arg(scratch.path("src.qmp"))
        .arg("--dst-qmp")
        .arg(scratch.path("dst.qmp"))
        .args(migration::keys::psk_args())
        .args(opts)
        .arg(dest)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .expect("running pmigrate qemu")
}

/// Its exit status, waiting at most `limit`.
fn exit_within(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().expect("waiting for pmigrate qemu") {
            return Some(st);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What `pmigrate qemu` said, its once-a-second progress lines left out.
fn said(scratch: &Scratch) -> Vec<String> {
    let text = fs::read_to_string(scratch.path("qemu.err")).unwrap_or_default();
    eprintln!("  pmigrate qemu stderr:\n{}", text.trim_end());
    text.lines().filter(|l| !l.contains(" MiB sent, dirty ")).map(str::to_string).collect()
}

/// How the test stops the migration.
#[derive(Clone, Copy, Debug)]
enum Stop {
    Timeout,
    Signal(i32, &'static str),
}

/// `pmigrate qemu` stopped in the middle of a migration must cancel it and
/// leave both sides as they were, the destination consumed.
fn stopped(test: &str, how: Stop) {
    let scratch = Scratch::new(test);
    let (mut src, mut dst) = pair(&scratch, test, DEFAULT_MEM, true);
    let before = (settings(&mut src), settings(&mut dst));
    let port = qemu::free_port().expect("free port");
    let timeout = match how {
        Stop::Timeout => TIMEOUT_S.to_string(),
        Stop::Signal(..) => "600".to_string(),
    };
    let bandwidth = SLOW_BANDWIDTH.to_string();
    let mut child =
        start(&scratch, &["--max-bandwidth", &bandwidth, "--timeout", &timeout], &format!("127.0.0.1:{port}"));
    // The migration runs, and carries bytes.
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    loop {
        let info = src.qmp().query_migrate().expect("query-migrate");
        if info["status"] == "active" && info["ram"]["transferred"].as_u64().unwrap_or(0) > 4 << 20 {
            break;
        }
        assert!(child.try_wait().expect("pmigrate qemu").is_none(), "pmigrate qemu ended early: {:?}", said(&scratch));
        assert!(Instant::now() < deadline, "the migration made no progress: {}", migration_summary(&info));
        std::thread::sleep(Duration::from_millis(100));
    }
    let t0 = Instant::now();
    let (status, expected) = match how {
        Stop::Timeout => {
            let st = exit_within(&mut child, MIGRATION_TIMEOUT);
            (st, format!("pmigrate: error: no result within --timeout {TIMEOUT_S} s: migration cancelled after"))
        }
        Stop::Signal(sig, name) => {
            // SAFETY: kill(2) with the pid of a child this test spawned and still owns.
            assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
            let st = exit_within(&mut child, STOP_LIMIT);
            (st, format!("pmigrate qemu: interrupted by {name}: migration cancelled after"))
        }
    };
    eprintln!("{test}: pmigrate qemu ended {:.3} s after the stop: {status:?}", t0.elapsed().as_secs_f64());
    let lines = said(&scratch);
    let status = status.expect("pmigrate qemu did not end");
    match how {
        Stop::Timeout => assert_eq!(status.code(), Some(1), "exit status"),
        Stop::Signal(sig, _) => assert_eq!(status.code(), Some(128 + sig), "exit status"),
    }
    assert_eq!(lines.len(), 1, "one line: {lines:?}");
    let line = &lines[0];
    assert!(line.starts_with(&expected), "{line}");
    for part in ["nothing migrated", "put back", "the source VM keeps running", "the destination QEMU exited"] {
        assert!(line.contains(part), "the line does not say {part:?}: {line}");
    }
    // The source: cancelled, running, as it was set before.
    let info = src.qmp().query_migrate().expect("query-migrate");
    assert_eq!(info["status"], "cancelled", "{}", migration_summary(&info));
    assert_eq!(settings(&mut src), before.0, "the source's x-ignore-shared and max-bandwidth");
    check_destination_gave_up(&mut dst);
    check_source_runs_on(&mut src);
}

#[test]
fn pmigrate_qemu_timeout_cancels_and_puts_everything_back() {
    let _serial = one_at_a_time();
    if qemu::skip_without_qemu("pmigrate_qemu_timeout_cancels_and_puts_everything_back") {
        return;
    }
    stopped("timeout", Stop::Timeout);
}

#[test]
fn pmigrate_qemu_sigint_cancels_and_puts_everything_back() {
    let _serial = one_at_a_time();
    if qemu::skip_without_qemu("pmigrate_qemu_sigint_cancels_and_puts_everything_back") {
        return;
    }
    stopped("sigint", Stop::Signal(libc::SIGINT, "SIGINT"));
}

#[test]
fn pmigrate_qemu_sigterm_cancels_and_puts_everything_back() {
    let _serial = one_at_a_time();
    if qemu::skip_without_qemu("pmigrate_qemu_sigterm_cancels_and_puts_everything_back") {
        return;
    }
    stopped("sigterm", Stop::Signal(libc::SIGTERM, "SIGTERM"));
}

/// A refusal: `pmigrate qemu` ends within [`REFUSAL_LIMIT`] with one error
/// line; neither QEMU was touched. Returns the line.
fn refused(scratch: &Scratch, src: &mut Qemu, dst: &mut Qemu, dest: &str) -> String {
    let before = (settings(src), settings(dst));
    let t0 = Instant::now();
    let mut child = start(scratch, &[], dest);
    let status = exit_within(&mut child, REFUSAL_LIMIT);
    eprintln!("  refused after {:.3} s: {status:?}", t0.elapsed().as_secs_f64());
    let lines = said(scratch);
    assert_eq!(status.and_then(|s| s.code()), Some(1), "exit status within {REFUSAL_LIMIT:?}: {lines:?}");
    assert_eq!(lines.len(), 1, "one line: {lines:?}");
    assert!(lines[0].starts_with("pmigrate: error: ") && lines[0].contains("nothing was changed"), "{lines:?}");
    let info = src.qmp().query_migrate().expect("query-migrate");
    assert!(info.get("status").is_none(), "a migration was started: {info}");
    assert_eq!(src.qmp().query_status().expect("source run state"), "running");
    assert_eq!(dst.qmp().query_status().expect("destination run state"), "inmigrate");
    assert_eq!((settings(src), settings(dst)), before, "x-ignore-shared and max-bandwidth on both sides");
    lines[0].clone()
}

#[test]
fn pmigrate_qemu_refuses_a_ram_size_mismatch_before_migrating() {
    let _serial = one_at_a_time();
    if qemu::skip_without_qemu("pmigrate_qemu_refuses_a_ram_size_mismatch_before_migrating") {
        return;
    }
    // 320 MiB + 128 KiB at the destination, 256 MiB + 128 KiB at the source.
    let dst_mem = "327808K";
    let scratch = Scratch::new("ram-mismatch");
    let (mut src, mut dst) = pair(&scratch, "ram-mismatch", dst_mem, false);
    let port = qemu::free_port().expect("free port");
    let line = refused(&scratch, &mut src, &mut dst, &format!("127.0.0.1:{port}"));
    for size in [DEFAULT_MEM, dst_mem] {
        let bytes = parse_mem_size(size).expect("memory size").to_string();
        assert!(line.contains(&bytes), "{size} ({bytes} bytes) not named: {line}");
    }
}

#[test]
fn pmigrate_qemu_names_a_recv_port_in_use_at_once() {
    let _serial = one_at_a_time();
    if qemu::skip_without_qemu("pmigrate_qemu_names_a_recv_port_in_use_at_once") {
        return;
    }
    let scratch = Scratch::new("port-in-use");
    let (mut src, mut dst) = pair(&scratch, "port-in-use", DEFAULT_MEM, false);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("taking a port");
    let addr = taken.local_addr().expect("its address").to_string();
    let line = refused(&scratch, &mut src, &mut dst, &addr);
    assert!(line.contains(&format!("{addr} is already in use")), "{line}");
}
