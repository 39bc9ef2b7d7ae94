//! QEMU migrates a live test guest through the `exec:` helpers `pmigrate send`
//! (source) and `pmigrate recv` (destination).
//!
//! Every test boots the self-checking guest of `tests/guest/` under TCG, so a
//! lost, torn or misplaced page shows up as `PMW CORRUPT` on the console.
//! The tests check that:
//!
//! - an idle and a busy guest land intact, the busy one also through QEMU's own
//!   `tcp:` for comparison (both query-migrate summaries are printed);
//! - a corrupted byte or cut connections between `send` and `recv` fail the
//!   migration: the source guest keeps running, the destination QEMU never runs
//!   the guest, and each helper prints one `pmigrate: error:` line;
//! - streams spread over two destination addresses leave by the local address
//!   `--via` names (this destination waits with `-incoming defer` and gets
//!   `migrate-incoming`);
//! - the helpers' `--report` lines match;
//! - QMP `migrate_cancel` in the middle of a migration (pre-copy, and with
//!   the return path): within 2 s the source is `cancelled` and running,
//!   both helpers are gone, and the destination QEMU gives up; the source's
//!   workload goes on. (QEMU closes the helper's pipes, then waits for it
//!   with its main loop stopped: a helper that lingers freezes the source.)
//!
//! The tests run one at a time (they share two loaded cores) and skip, saying
//! why, when QEMU is missing. `PMIGRATE_KEEP_VM_LOGS=1` keeps the consoles and
//! helper logs; they are kept anyway when a test fails.

#[path = "../../tests/support/migration.rs"]
mod migration;
#[path = "../../tests/support/qemu.rs"]
mod qemu;

use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use migration::{
    boot_source, check_destination_gave_up, check_landed, check_source_runs_on, guest, helper_report, is_report,
    localhost, migrate, one_at_a_time, recv_uri, send_uri, wait_helper_log, wait_log, Fault, FaultyLink, Scratch,
    HEARTBEAT_TIMEOUT, MIGRATION_TIMEOUT,
};
use qemu::{migration_summary, Qemu};
use serde_json::Value;

/// The binary under test.
const PMIGRATE: &str = env!("CARGO_BIN_EXE_pmigrate");
/// How far into the first stream the faulty link strikes. The 64 MiB
/// guest's stream is split over four streams, each carrying a few MiB: at
/// 8 MiB the first stream once ended before the fault could strike.
const FAULT_AT: u64 = 2 << 20;

/// A cancel must settle (source `cancelled` and running, helpers gone)
/// within this.
const CANCEL_LIMIT: Duration = Duration::from_secs(2);
/// The source's bandwidth in the cancel tests: below the guest's dirtying
/// rate, so the migration is surely still running when it is cancelled.
const CANCEL_BANDWIDTH: u64 = 8 << 20;

/// The busy guest: working set and dirtying rate (MiB, MiB/s).
const BUSY_WORKING_SET_MIB: u64 = 128;
const BUSY_RATE_MIBPS: u64 = 150;

// ---------------------------------------------------------------- helpers

/// Waits until `recv` (run with `--report`) says it listens. QEMU starts
/// an `exec:` helper in the background: `migrate-incoming` returns before
/// `recv` has bound its port, and a `send` started at once may find nothing
/// there (connection refused).
fn wait_recv_listening(scratch: &Scratch) {
    wait_log(&scratch.path("recv.err"), "pmigrate recv: listening on");
}

/// The processes whose command line names the pmigrate binary and `needle`
/// (a helper's port): the helpers, and the `sh -c` QEMU runs each under.
fn helpers_alive(needle: &str) -> Vec<String> {
    let Ok(dir) = fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|e| {
            let cmd = fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            (cmd.contains(PMIGRATE) && cmd.contains(needle))
                .then(|| format!("{} {}", e.file_name().to_string_lossy(), cmd.trim()))
        })
        .collect()
}

/// Stream bytes, chunks and wire bytes of a `--report` line.
fn report_numbers(line: &str) -> (u64, u64, u64) {
    let words: Vec<&str> = line.split_whitespace().collect();
    let number_before = |at: Option<usize>| -> u64 {
        at.and_then(|i| words.get(i.wrapping_sub(1)))
            .and_then(|w| w.parse().ok())
            .unwrap_or_else(|| panic!("cannot read the report line {line:?}"))
    };
    let bytes = number_before(words.iter().position(|w| *w == "bytes"));
    let chunks = number_before(words.iter().position(|w| *w == "chunks"));
    let wire = number_before(words.windows(3).position(|w| w == ["bytes", "on", "the"]));
    (bytes, chunks, wire)
}

/// Prints both helpers' reports and checks that they agree.
fn check_reports(scratch: &Scratch) {
    let send = helper_report(&scratch.path("send.err"), "send");
    let recv = helper_report(&scratch.path("recv.err"), "recv");
    eprintln!("  {send}\n  {recv}");
    assert_eq!(report_numbers(&send), report_numbers(&recv), "send and recv disagree:\n{send}\n{recv}");
    assert!(report_numbers(&send).0 > 0, "no bytes moved: {send}");
}

/// What is wrong with the stderr of a helper that should have failed with
/// one clear `pmigrate: error:` line (nothing when all is well).
fn helper_error_problems(path: &Path, role: &str) -> Vec<String> {
    let text = wait_helper_log(path, role);
    eprintln!("  {role} stderr: {}", text.trim());
    let mut problems = Vec::new();
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("pmigrate: error:")).collect();
    if errors.len() != 1 {
        problems.push(format!("{role}: {} `pmigrate: error:` lines, not one: {text:?}", errors.len()));
    }
    if text.lines().any(|l| is_report(l, role)) {
        problems.push(format!("{role} failed yet printed a report: {text:?}"));
    }
    for line in errors {
        // The line must say what went wrong, not only that the helper gave up...
        let why = line.trim_start_matches("pmigrate: error:").trim();
        if why.len() < 6 || why == "migration aborted" {
            problems.push(format!("{role}: the error line names no cause: {line:?}"));
        }
        // ... and say it once.
        let clauses: Vec<&str> = why.split(": ").collect();
        if let Some((_, c)) = clauses.iter().enumerate().find(|(i, c)| clauses[..*i].contains(c)) {
            problems.push(format!("{role}: the error line repeats {c:?}: {line:?}"));
        }
    }
    problems
}

// ------------------------------------------------------------------ tests

#[test]
fn exec_helper_migrates_an_idle_guest() {
    let _serial = one_at_a_time();
    if qemu::skip_without_qemu("exec_helper_migrates_an_idle_guest") {
        return;
    }
    let scratch = Scratch::new("idle");
    let port = qemu::free_port().expect("free port");
    let cfg = guest("idle", 32, 0);
    let mut dst = Qemu::spawn(cfg.clone().incoming(&recv_uri(&[localhost(port)], &scratch.path("recv.err"))))
        .expect("spawning the destination QEMU");
    let mut src = boot_source(cfg);
    let (info, wall) = migrate(&mut src, &send_uri("--streams 4", &[localhost(port)], &scratch.path("send.err")));
    eprintln!("idle guest, exec:pmigrate: {} wall={:.1}s", migration_summary(&info), wall.as_secs_f64());
    check_landed(&mut src, &mut dst, &info, false);
    check_reports(&scratch);
}

/// One busy-guest migration, through `exec:pmigrate` or QEMU's own `tcp:`;
/// returns the final query-migrate and the wall time.
fn busy_migration(scratch: &Scratch, exec: bool) -> (Value, Duration) {
    let label = if exec { "exec:pmigrate" } else { "tcp:" };
    let port = qemu::free_port().expect("free port");
    let cfg = guest(if exec { "busy-exec" } else { "busy-tcp" }, BUSY_WORKING_SET_MIB, BUSY_RATE_MIBPS);
    let incoming =
        if exec { recv_uri(&[localhost(port)], &scratch.path("recv.err")) } else { format!("tcp:{}", localhost(port)) };
    let mut dst = Qemu::spawn(cfg.clone().incoming(&incoming)).expect("spawning the destination QEMU");
    let mut src = boot_source(cfg);
    // Let the workload dirty at full rate for a few seconds first.
    src.wait_heartbeats_after(src.console_offset(), 3, HEARTBEAT_TIMEOUT).expect("source heartbeats");
    // QEMU's defaults for both runs (max-bandwidth 128 MiB/s, downtime-limit 300 ms).
    let params = src.qmp().query_migrate_parameters().expect("query-migrate-parameters");
    let src_beats = src.heartbeats_after(0);
    let (a, b) = (&src_beats[0], &src_beats[src_beats.len() - 1]);
    eprintln!(
        "busy guest via {label} dirtying {:.0} MiB/s, max-bandwidth {} MiB/s, downtime-limit {} ms",
        (b.gen - a.gen) as f64 / 256.0 / (b.t - a.t),
        params["max-bandwidth"].as_u64().unwrap_or(0) >> 20,
        params["downtime-limit"]
    );
    let uri = if exec {
        send_uri("--streams 4", &[localhost(port)], &scratch.path("send.err"))
    } else {
        format!("tcp:{}", localhost(port))
    };
    let (info, wall) = migrate(&mut src, &uri);
    eprintln!("busy guest via {label} {} wall={:.1}s", migration_summary(&info), wall.as_secs_f64());
    check_landed(&mut src, &mut dst, &info, true);
    if exec {
        check_reports(scratch);
    }
    (info, wall)
}

#[test]
fn exec_helper_migrates_a_busy_guest_like_qemu_tcp() {
    let _serial = one_at_a_time();
    if qemu::skip_without_qemu("exec_helper_migrates_a_busy_guest_like_qemu_tcp") {
        return;
    }
    let scratch = Scratch::new("busy");
    let (tcp, tcp_wall) = busy_migration(&scratch, false);
    let (exec, exec_wall) = busy_migration(&scratch, true);
    eprintln!(
        "busy guest ({BUSY_WORKING_SET_MIB} MiB at {BUSY_RATE_MIBPS} MiB/s), QEMU's default parameters:\n  \
         tcp:           {} wall={:.1}s\n  exec:pmigrate: {} wall={:.1}s",
        migration_summary(&tcp),
        tcp_wall.as_secs_f64(),
        migration_summary(&exec),
        exec_wall.as_secs_f64()
    );
}

/// A migration through a faulty link must fail cleanly on both sides. (A
/// link that cuts its connections lets none through again: no stream can
/// come back, and the helpers give up after their progress timeout.)
fn failed_migration(test: &str, fault: Fault) {
    let scratch = Scratch::new(test);
    let port = qemu::free_port().expect("free port");
    let proxy = FaultyLink::start(IpAddr::from([127, 0, 0, 1]), localhost(port), fault);
    let cfg = guest(test, 64, 20);
    let mut dst = Qemu::spawn(cfg.clone().incoming(&recv_uri(&[localhost(port)], &scratch.path("recv.err"))))
        .expect("spawning the destination QEMU");
    let mut src = boot_source(cfg);
    let (info, wall) = migrate(&mut src, &send_uri("--streams 4", &[proxy.addr], &scratch.path("send.err")));
    eprintln!("{test}: {} wall={:.1}s", migration_summary(&info), wall.as_secs_f64());
    assert!(proxy.fired(), "the faulty link never struck ({fault:?}); connections {:?}", proxy.connections());
    assert_eq!(info["status"], "failed", "the migration did not fail: {}", migration_summary(&info));

    check_source_runs_on(&mut src);
    check_destination_gave_up(&mut dst);

    // Each helper says why, once.
    let mut problems = helper_error_problems(&scratch.path("recv.err"), "recv");
    problems.extend(helper_error_problems(&scratch.path("send.err"), "send"));
    assert!(problems.is_empty(), "the helpers' error reports:\n{}", problems.join("\n"));
}

#[test]
fn corrupted_stream_fails_cleanly_and_the_source_keeps_running() {
    let _serial = one_at_a_time();
    if qemu::skip_without_qemu("corrupted_stream_fails_cleanly_and_the_source_keeps_running") {
        return;
    }
    failed_migration("corrupt", Fault::FlipByteAt(FAULT_AT));
}

#[test]
fn killed_connection_fails_cleanly_and_the_source_keeps_running() {
    let _serial = one_at_a_time();
    if qemu::skip_without_qemu("killed_connection_fails_cleanly_and_the_source_keeps_running") {
        return;
    }
    failed_migration("killed", Fault::CloseAllAt(FAULT_AT));
}

#[test]
fn exec_helper_spreads_streams_over_addresses_and_via_with_deferred_incoming() {
    let _serial = one_at_a_time();
    if qemu::skip_without_qemu("exec_helper_spreads_streams_over_addresses_and_via_with_deferred_incoming") {
        return;
    }
    let scratch = Scratch::new("via");
    let (one, two) = (IpAddr::from([127, 0, 0, 1]), IpAddr::from([127, 0, 0, 2]));
    let ports = (qemu::free_port().expect("free port"), qemu::free_port().expect("free port"));
    let listen = [SocketAddr::new(one, ports.0), SocketAddr::new(two, ports.1)];
    let proxies = [FaultyLink::start(one, listen[0], Fault::None), FaultyLink::start(two, listen[1], Fault::None)];
    let cfg = guest("via", 32, 10);
    // This time the destination waits for `migrate-incoming`.
    let mut dst = Qemu::spawn(cfg.clone().incoming("defer")).expect("spawning the destination QEMU");
    dst.qmp().migrate_incoming(&recv_uri(&listen, &scratch.path("recv.err"))).expect("QMP migrate-incoming");
    wait_recv_listening(&scratch);
    let mut src = boot_source(cfg);
    let uri = send_uri(
        "--streams 4 --via 127.0.0.1,127.0.0.2",
        &[proxies[0].addr, proxies[1].addr],
        &scratch.path("send.err"),
    );
    let (info, wall) = migrate(&mut src, &uri);
    eprintln!("via: {} wall={:.1}s", migration_summary(&info), wall.as_secs_f64());
    check_landed(&mut src, &mut dst, &info, true);
    check_reports(&scratch);
    // Stream i goes to destination i % 2 and leaves by via i % 2.
    for (proxy, ip) in proxies.iter().zip([one, two]) {
        let conns = proxy.connections();
        eprintln!("  {} <- {conns:?}", proxy.addr);
        assert_eq!(conns.len(), 2, "streams reaching {}: {conns:?}", proxy.addr);
        for (peer, bytes) in conns {
            assert_eq!(peer.ip(), ip, "a stream to {} left by {peer}", proxy.addr);
            assert!(bytes > 1 << 20, "a stream to {} carried only {bytes} bytes", proxy.addr);
        }
    }
}

/// QEMU's post-copy through the helpers: the destination's page requests
/// travel back on QEMU's return path, which `recv` reads from its stdin and
/// `send` writes to its stdout.
#[test]
fn postcopy_ram_runs_through_the_exec_helpers_return_path() {
    let _serial = one_at_a_time();
    if qemu::skip_without_qemu("postcopy_ram_runs_through_the_exec_helpers_return_path") {
        return;
    }
    let scratch = Scratch::new("postcopy");
    let port = qemu::free_port().expect("free port");
    let cfg = guest("postcopy", BUSY_WORKING_SET_MIB, BUSY_RATE_MIBPS);
    let mut dst = Qemu::spawn(cfg.clone().incoming("defer")).expect("spawning the destination QEMU");
    let mut src = boot_source(cfg);
    for vm in [&mut src, &mut dst] {
        vm.qmp().migrate_set_capabilities(&[("postcopy-ram", true)]).expect("postcopy-ram capability");
    }
    // Pre-copy below the dirtying rate never converges on its own, so the
    // switch to post-copy always comes while it runs; post-copy itself is
    // not limited.
    src.qmp().migrate_set_parameters(serde_json::json!({ "max-bandwidth": 64u64 << 20 })).expect("max-bandwidth");
    dst.qmp().migrate_incoming(&recv_uri(&[localhost(port)], &scratch.path("recv.err"))).expect("migrate-incoming");
    wait_recv_listening(&scratch);
    let t0 = Instant::now();
    src.qmp().migrate(&send_uri("--streams 4", &[localhost(port)], &scratch.path("send.err"))).expect("QMP migrate");
    // A first pre-copy pass, then post-copy: the rest comes on demand.
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    loop {
        let info = src.qmp().query_migrate().expect("query-migrate");
        let sent = info["ram"]["transferred"].as_u64().unwrap_or(0);
        let status = info["status"].as_str().unwrap_or_default();
        assert!(matches!(status, "setup" | "active"), "before post-copy: {}", migration_summary(&info));
        if sent > (BUSY_WORKING_SET_MIB << 20) / 2 {
            break;
        }
        assert!(Instant::now() < deadline, "pre-copy made no progress: {}", migration_summary(&info));
        std::thread::sleep(Duration::from_millis(200));
    }
    src.qmp().execute("migrate-start-postcopy", serde_json::json!({})).expect("migrate-start-postcopy");
    let info = src.qmp().wait_migration(MIGRATION_TIMEOUT).expect("waiting for the migration to end");
    eprintln!("postcopy via exec:pmigrate: {} wall={:.1}s", migration_summary(&info), t0.elapsed().as_secs_f64());
    let requests = info["ram"]["postcopy-requests"].as_u64().unwrap_or(0);
    assert!(requests > 0, "no page request came back through the helpers: {info}");
    check_landed(&mut src, &mut dst, &info, true);
    check_reports(&scratch);
    let send = helper_report(&scratch.path("send.err"), "send");
    let back = send.split("back: ").nth(1).and_then(|b| b.split_whitespace().next()?.parse::<u64>().ok());
    assert!(back.is_some_and(|b| b > 0), "send relayed nothing back: {send}");
}

/// QMP `migrate_cancel` while QEMU streams through the helpers: QEMU closes
/// both of `send`'s pipes and waits for it with its main loop stopped, so
/// the source settles only once the helpers are gone. Within
/// [`CANCEL_LIMIT`] the source must be `cancelled` and running and both
/// helpers gone (recv although the destination QEMU still waits on it);
/// the destination QEMU then reads the end of its stream and gives up, and
/// the helpers end cleanly, having delivered the stream so far whole.
fn cancelled_migration(test: &str, return_path: bool) {
    let scratch = Scratch::new(test);
    let port = qemu::free_port().expect("free port");
    let cfg = guest(test, 64, 20);
    let mut dst = Qemu::spawn(cfg.clone().incoming("defer")).expect("spawning the destination QEMU");
    let mut src = boot_source(cfg);
    if return_path {
        for vm in [&mut src, &mut dst] {
            vm.qmp().migrate_set_capabilities(&[("return-path", true)]).expect("return-path capability");
        }
    }
    src.qmp().migrate_set_parameters(serde_json::json!({ "max-bandwidth": CANCEL_BANDWIDTH })).expect("max-bandwidth");
    dst.qmp().migrate_incoming(&recv_uri(&[localhost(port)], &scratch.path("recv.err"))).expect("migrate-incoming");
    wait_recv_listening(&scratch);
    src.qmp().migrate(&send_uri("--streams 4", &[localhost(port)], &scratch.path("send.err"))).expect("QMP migrate");
    // Cancel once the stream flows.
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    let before = loop {
        let info = src.qmp().query_migrate().expect("query-migrate");
        let status = info["status"].as_str().unwrap_or_default().to_string();
        assert!(matches!(status.as_str(), "setup" | "active"), "before the cancel: {}", migration_summary(&info));
        if status == "active" && info["ram"]["transferred"].as_u64().unwrap_or(0) > 4 << 20 {
            break info;
        }
        assert!(Instant::now() < deadline, "the migration made no progress: {}", migration_summary(&info));
        std::thread::sleep(Duration::from_millis(100));
    };
    let t0 = Instant::now();
    src.qmp().migrate_cancel().expect("QMP migrate_cancel");
    // A frozen source does not answer at all: each query must come back.
    let info = loop {
        let info = src.qmp().query_migrate().expect("query-migrate after the cancel");
        if info["status"] == "cancelled" {
            break info;
        }
        assert!(t0.elapsed() <= CANCEL_LIMIT, "not cancelled after {:?}: {}", t0.elapsed(), migration_summary(&info));
        std::thread::sleep(Duration::from_millis(20));
    };
    let settled = t0.elapsed();
    assert_eq!(src.qmp().query_status().expect("source run state"), "running");
    let alive = loop {
        let alive = helpers_alive(&port.to_string());
        if alive.is_empty() || t0.elapsed() > CANCEL_LIMIT {
            break alive;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(alive.is_empty(), "helpers still running {:?} after the cancel: {alive:?}", t0.elapsed());
    eprintln!(
        "{test}: cancelled after {} MiB sent; source cancelled and running after {:.3} s, helpers gone after {:.3} s",
        before["ram"]["transferred"].as_u64().unwrap_or(0) >> 20,
        settled.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(info["status"], "cancelled");
    check_destination_gave_up(&mut dst);
    check_source_runs_on(&mut src);
    // Both helpers ended cleanly, and agree on what went through.
    check_reports(&scratch);
}

#[test]
fn migrate_cancel_mid_precopy_leaves_the_source_running_and_the_helpers_gone() {
    let _serial = one_at_a_time();
    if qemu::skip_without_qemu("migrate_cancel_mid_precopy_leaves_the_source_running_and_the_helpers_gone") {
        return;
    }
    cancelled_migration("cancel", false);
}

#[test]
fn migrate_cancel_with_the_return_path_leaves_the_source_running_and_the_helpers_gone() {
    let _serial = one_at_a_time();
    if qemu::skip_without_qemu("migrate_cancel_with_the_return_path_leaves_the_source_running_and_the_helpers_gone") {
        return;
    }
    cancelled_migration("cancel-rp", true);
}
