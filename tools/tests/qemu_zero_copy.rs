//! `pmigrate qemu` drives a whole QEMU migration over QMP, handing over guest
//! RAM both QEMUs map from the same file instead of copying it.
//!
//! Both tests boot the self-checking guest of `tests/guest/` with its RAM in
//! a shared `memory-backend-file` in `/dev/shm`, and a destination with
//! `-incoming defer`:
//!
//! - same file at the destination: the nonce proof passes, `x-ignore-shared`
//!   goes on, and only device state and non-RAM blocks travel;
//! - another file (same size) at the destination: the backend is copied
//!   through the `send`/`recv` helpers like any RAM.
//!
//! Either way the destination must run the guest on, with no corruption.
//! The tests run one at a time and skip, saying why, when QEMU is missing.

#[path = "../../tests/support/keys.rs"]
mod keys;
#[path = "../../tests/support/qemu.rs"]
mod qemu;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use qemu::{Qemu, VmConfig, BOOT_TIMEOUT, DEFAULT_MEM};
use serde_json::Value;

/// The binary under test.
const PMIGRATE: &str = env!("CARGO_BIN_EXE_pmigrate");
/// Longest wait for a handful of workload heartbeats.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(120);
/// The zero-copy migration sends device state and non-RAM blocks only.
const ZERO_COPY_MAX_BYTES: u64 = 16 << 20;

/// The tests share two cores with their guests: one at a time.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A guest RAM file in /dev/shm, removed at the end.
struct ShmFile(PathBuf);

impl ShmFile {
    fn new(tag: &str) -> ShmFile {
        let p = PathBuf::from(format!("/dev/shm/pmzc-{}-{tag}.mem", std::process::id()));
        let _ = std::fs::remove_file(&p);
        ShmFile(p)
    }
}

impl Drop for ShmFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A second QMP socket for `pmigrate qemu` (a QMP socket serves one client
/// at a time, and the test's `Qemu` holds the first).
fn operator_qmp(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("pmzc-{}-{name}.qmp", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

/// The test guest, busy, with its RAM in a shared file backend and a
/// second QMP socket at `qmp`.
fn guest(name: &str, mem: &ShmFile, qmp: &Path) -> VmConfig {
    VmConfig::new(name).mem(DEFAULT_MEM).working_set_mib(64).dirty_rate_mibps(50).args([
        "-object".to_string(),
        format!("memory-backend-file,id=pc.ram,size={DEFAULT_MEM},mem-path={},share=on", mem.0.display()),
        "-machine".to_string(),
        "memory-backend=pc.ram".to_string(),
        "-qmp".to_string(),
        format!("unix:{},server=on,wait=off", qmp.display()),
    ])
}

/// Boots the source and the destination (`-incoming defer`) and runs
/// `pmigrate qemu` between them; returns its JSON report.
fn migrate(test: &str, src_mem: &ShmFile, dst_mem: &ShmFile) -> Option<(Value, Qemu, Qemu)> {
    if qemu::skip_without_qemu(test) {
        return None;
    }
    let (src_qmp, dst_qmp) = (operator_qmp(&format!("{test}-src")), operator_qmp(&format!("{test}-dst")));
    let mut src = Qemu::spawn(guest(&format!("{test}-src"), src_mem, &src_qmp)).expect("spawning the source QEMU");
    src.wait_ready(BOOT_TIMEOUT).expect("source guest boot");
    src.wait_heartbeats_after(0, 3, HEARTBEAT_TIMEOUT).expect("source heartbeats before migrating");
    src.check_healthy_after(0).expect("source guest before migrating");
    let dst = Qemu::spawn(guest(&format!("{test}-dst"), dst_mem, &dst_qmp).incoming("defer"))
        .expect("spawning the destination QEMU");
    let port = qemu::free_port().expect("free port");
    let out = Command::new(PMIGRATE)
        .arg("qemu")
        .arg("--src-qmp")
        .arg(&src_qmp)
        .arg("--dst-qmp")
        .arg(&dst_qmp)
        .args(["--streams", "2", "--timeout", "600", "--json", &format!("127.0.0.1:{port}")])
        .args(keys::psk_args())
        .output()
        .expect("running pmigrate qemu");
    let _ = std::fs::remove_file(&src_qmp);
    let _ = std::fs::remove_file(&dst_qmp);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{test}: pmigrate qemu stderr:\n{stderr}");
    assert!(out.status.success(), "pmigrate qemu failed ({}):\n{stdout}\n{stderr}", out.status);
    let report: Value = serde_json::from_str(stdout.trim()).expect("a JSON report on stdout");
    eprintln!("{test}: report {report}");
    Some((report, src, dst))
}

/// The destination runs the guest on from where the source left it, intact.
fn check_landed(src: &mut Qemu, dst: &mut Qemu) {
    assert_eq!(dst.qmp().query_status().expect("destination run state"), "running");
    assert_eq!(src.qmp().query_status().expect("source run state"), "postmigrate");
    let last_src = src.heartbeats_after(0).last().cloned().expect("source heartbeats");
    let beats = dst.wait_heartbeats_after(0, 5, HEARTBEAT_TIMEOUT).expect("destination heartbeats");
    dst.check_healthy_after(0).expect("destination guest after migrating");
    assert!(!dst.console_log().contains("PMW boot"), "the destination booted a new guest");
    let (first, last) = (&beats[0], &beats[beats.len() - 1]);
    assert!(
        first.t >= last_src.t && first.gen >= last_src.gen,
        "destination workload did not continue the source's: source {last_src:?}, destination {first:?}"
    );
    assert!(last.gen > first.gen, "destination workload stopped writing: {first:?} .. {last:?}");
    assert!(last.verified > first.verified, "destination workload stopped verifying: {first:?} .. {last:?}");
}

fn backend(report: &Value) -> &Value {
    let b = report["backends"].as_array().expect("backends in the report");
    b.iter().find(|b| b["id"] == "pc.ram").expect("backend pc.ram in the report")
}

#[test]
fn shared_ram_is_handed_over() {
    let _one = one_at_a_time();
    let mem = ShmFile::new("same");
    let Some((report, mut src, mut dst)) = migrate("zc-same", &mem, &mem) else { return };
    let b = backend(&report);
    assert_eq!(b["path"], "zero-copy", "{report}");
    assert_eq!(report["x-ignore-shared"], true, "{report}");
    let sent = report["ram"]["transferred"].as_u64().expect("ram.transferred");
    eprintln!(
        "zero-copy: ram.transferred={:.2} MiB total={} ms downtime={} ms setup={} ms",
        sent as f64 / (1 << 20) as f64,
        report["total-time-ms"],
        report["downtime-ms"],
        report["setup-time-ms"]
    );
    assert!(sent < ZERO_COPY_MAX_BYTES, "{sent} bytes of RAM sent for a zero-copy migration");
    check_landed(&mut src, &mut dst);
}

#[test]
fn different_files_are_copied() {
    let _one = one_at_a_time();
    let (src_mem, dst_mem) = (ShmFile::new("src"), ShmFile::new("dst"));
    let Some((report, mut src, mut dst)) = migrate("zc-copy", &src_mem, &dst_mem) else { return };
    let b = backend(&report);
    assert_eq!(b["path"], "copy", "{report}");
    assert!(b["why"].as_str().unwrap_or("").contains("different files"), "{report}");
    assert_eq!(report["x-ignore-shared"], false, "{report}");
    let sent = report["ram"]["transferred"].as_u64().expect("ram.transferred");
    eprintln!(
        "copy: ram.transferred={:.2} MiB total={} ms downtime={} ms setup={} ms",
        sent as f64 / (1 << 20) as f64,
        report["total-time-ms"],
        report["downtime-ms"],
        report["setup-time-ms"]
    );
    // The 64 MiB working set travelled.
    assert!(sent > 64 << 20, "only {sent} bytes of RAM sent for a copy migration");
    check_landed(&mut src, &mut dst);
}
