//! QEMU migrates a live test guest over the multi-NIC testbed
//! (`tools/testbed.sh`: two network namespaces joined by four shaped veth
//! links) while one of the links fails, and the migration goes on:
//!
//! - through the `exec:` helpers (`pmigrate send` in the source's
//!   namespace, `pmigrate recv` in the destination's), one stream a link:
//!   the kernel kills one stream's TCP connection (`ss -K`) in the middle of
//!   the migration; `send` dials it again and the stream resumes;
//! - through `pmigrate proxy` (entry in the source's namespace, exit in the
//!   destination's) carrying QEMU's multifd channels, each over four
//!   streams, one a link: one link goes down for five seconds in the
//!   middle of the migration; the streams on it move to the other links,
//!   and come back once it is up again.
//!
//! Either way the migration completes and the guest, which checks its own
//! memory (see `tests/guest/`), runs on at the destination undamaged. The
//! tests run one at a time and skip, saying why, without QEMU or root.
//! `PMIGRATE_KEEP_VM_LOGS=1` keeps the consoles and helper logs; they are
//! kept anyway when a test fails.

#[path = "../../tests/support/migration.rs"]
mod migration;
#[path = "../../tests/support/qemu.rs"]
mod qemu;
#[path = "../../tests/support/testbed.rs"]
mod testbed;

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use migration::{
    boot_source, check_landed, guest, helper_report, one_at_a_time, recv_uri, send_uri, wait_log, Scratch,
    EXIT_TIMEOUT, MIGRATION_TIMEOUT,
};
use qemu::{migration_summary, Qemu};
use serde_json::{json, Value};
use testbed::Testbed;

/// The binary under test.
const PMIGRATE: &str = env!("CARGO_BIN_EXE_pmigrate");

/// Links of the testbed, and the rate of each (each way).
const LINKS: usize = 4;
const LINK_RATE: &str = "100mbit";

/// The guest: working set and dirtying rate (MiB, MiB/s).
const WORKING_SET_MIB: u64 = 128;
const EXEC_RATE_MIBPS: u64 = 8;
const PROXY_RATE_MIBPS: u64 = 4;

/// QEMU's `max-bandwidth` (bytes/s): slow enough that the fault falls well
/// inside the migration (about 7 s through the exec helpers, about 15 s
/// through the proxy, where the link is up again some 6 s before the end),
/// while the dirtying above stays far enough below it for pre-copy to
/// converge.
const EXEC_BANDWIDTH: u64 = 32 << 20;
const PROXY_BANDWIDTH: u64 = 12 << 20;

/// The fault strikes once QEMU has sent this much RAM: about a third of
/// what the first pass carries (the working set, the kernel and the
/// workload's other pages, about 190 MiB).
const FAULT_AFTER: u64 = 64 << 20;

/// How long the proxy test keeps its link down.
const LINK_DOWN: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------- helpers

/// The testbed, or `None` (after saying why) when this machine cannot run
/// the test.
fn testbed(test: &str, name: &str) -> Option<Testbed> {
    if qemu::skip_without_qemu(test) {
        return None;
    }
    let bed = Testbed::up(name, LINKS, LINK_RATE);
    if bed.is_none() {
        eprintln!("SKIPPED {test}: no testbed");
    }
    bed
}

/// The number before the first `word` in a report line.
fn number_before(line: &str, word: &str) -> u64 {
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .iter()
        .position(|w| *w == word)
        .and_then(|i| words.get(i.checked_sub(1)?))
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no number before {word:?} in {line:?}"))
}

/// Polls the source until the migration is active and has sent `bytes` of
/// RAM; returns that query-migrate. The migration must not end first.
fn wait_transferred(src: &mut Qemu, bytes: u64) -> Value {
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    loop {
        let info = src.qmp().query_migrate().expect("query-migrate");
        let status = info["status"].as_str().unwrap_or_default();
        assert!(
            matches!(status, "setup" | "active"),
            "the migration ended before the fault could strike: {}",
            migration_summary(&info)
        );
        if status == "active" && info["ram"]["transferred"].as_u64().unwrap_or(0) >= bytes {
            return info;
        }
        assert!(Instant::now() < deadline, "the migration made no progress: {}", migration_summary(&info));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The lines of a log that tell of lost, moved, resumed or returned streams.
fn link_lines(log: &str) -> Vec<&str> {
    const EVENTS: [&str; 6] =
        ["stream lost", "stream resumed", "link down", "answers again", "lost stream", "back on its own link"];
    log.lines().filter(|l| EVENTS.iter().any(|e| l.contains(e))).collect()
}

/// A `pmigrate` process in one of the testbed's namespaces, its stderr in
/// a file; killed when dropped.
struct Helper {
    child: Child,
    log: PathBuf,
}

impl Helper {
    /// Spawns `cmd` with stderr to `log` and waits until it says `ready`.
    fn spawn(mut cmd: Command, log: PathBuf, ready: &str) -> Helper {
        let err = fs::File::create(&log).expect("creating a helper log");
        // `ip netns exec` execs the program: the child is pmigrate itself.
        let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(err).spawn().expect("spawning a helper");
        let helper = Helper { child, log };
        wait_log(&helper.log, ready);
        helper
    }

    fn text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Connections it logged as carried whole, and as failed.
    fn outcomes(&self) -> (usize, usize) {
        let t = self.text();
        (
            t.lines().filter(|l| l.contains("connection done")).count(),
            t.lines().filter(|l| l.contains("connection failed")).count(),
        )
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until both proxies logged the end (done or failed) of `n`
/// connections each; returns `(entry, exit)` outcomes.
fn wait_proxies_ended(entry: &Helper, exit: &Helper, n: usize) -> ((usize, usize), (usize, usize)) {
    let deadline = Instant::now() + EXIT_TIMEOUT;
    loop {
        let (a, b) = (entry.outcomes(), exit.outcomes());
        if (a.0 + a.1 >= n && b.0 + b.1 >= n) || Instant::now() > deadline {
            return (a, b);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ------------------------------------------------------------------ tests

/// `send` and `recv` carry QEMU's stream over four streams, one a link;
/// the kernel kills stream 2's connection a third of the way in. The
/// stream comes back (on its own link, which is up) and the migration
/// completes.
#[test]
fn exec_over_four_links_survives_a_killed_connection() {
    let _serial = one_at_a_time();
    let test = "exec_over_four_links_survives_a_killed_connection";
    // Declared first, dropped last: the namespaces go once the QEMUs did.
    let Some(bed) = testbed(test, "qlx") else { return };
    let scratch = Scratch::new("links-exec");
    let port = qemu::free_port().expect("free port");
    let dests = bed.dst_endpoints(port);
    let cfg = guest("links-exec", WORKING_SET_MIB, EXEC_RATE_MIBPS);
    let mut dst = Qemu::spawn(cfg.clone().netns(&bed.dst).incoming(&recv_uri(&dests, &scratch.path("recv.err"))))
        .expect("spawning the destination QEMU");
    let mut src = boot_source(cfg.netns(&bed.src));
    wait_log(&scratch.path("recv.err"), "pmigrate recv: listening on");
    src.qmp().migrate_set_parameters(json!({ "max-bandwidth": EXEC_BANDWIDTH })).expect("max-bandwidth");

    let t0 = Instant::now();
    let opts = format!("--streams {LINKS} --via {} -vv", bed.via());
    src.qmp().migrate(&send_uri(&opts, &dests, &scratch.path("send.err"))).expect("QMP migrate");
    let before = wait_transferred(&mut src, FAULT_AFTER);
    let killed = bed.kill_connections(Some(2), port);
    let at = t0.elapsed();
    eprintln!(
        "killed {killed} connection(s) on link 2 at {:.1} s, {} MiB sent",
        at.as_secs_f64(),
        before["ram"]["transferred"].as_u64().unwrap_or(0) >> 20
    );
    assert!(killed >= 1, "ss -K killed no connection to 10.77.2.2:{port}");

    let info = src.qmp().wait_migration(MIGRATION_TIMEOUT).expect("waiting for the migration to end");
    let wall = t0.elapsed();
    eprintln!("links-exec: {} wall={:.1}s", migration_summary(&info), wall.as_secs_f64());
    if info["status"] != "completed" {
        eprintln!(
            "send stderr:\n{}\nrecv stderr:\n{}",
            fs::read_to_string(scratch.path("send.err")).unwrap_or_default(),
            fs::read_to_string(scratch.path("recv.err")).unwrap_or_default()
        );
    }
    check_landed(&mut src, &mut dst, &info, true);

    // Both helpers ended well, carried the same stream, and say that one
    // lost stream came back.
    let send = helper_report(&scratch.path("send.err"), "send");
    let recv = helper_report(&scratch.path("recv.err"), "recv");
    let (send_log, recv_log) = (
        fs::read_to_string(scratch.path("send.err")).unwrap_or_default(),
        fs::read_to_string(scratch.path("recv.err")).unwrap_or_default(),
    );
    eprintln!("send stderr:\n{send_log}recv stderr:\n{recv_log}");
    for word in ["bytes", "chunks"] {
        assert_eq!(number_before(&send, word), number_before(&recv, word), "send and recv disagree:\n{send}\n{recv}");
    }
    assert!(number_before(&send, "bytes") > WORKING_SET_MIB << 20, "too few bytes moved: {send}");
    for (role, report) in [("send", &send), ("recv", &recv)] {
        assert!(report.contains("; 1 lost stream resumed"), "{role}'s report does not tell of one comeback: {report}");
    }
    assert!(
        send_log.contains("stream lost; reconnecting") && send_log.contains("stream resumed"),
        "send logs the loss and the comeback: {send_log}"
    );
    assert!(recv_log.contains("stream resumed"), "recv logs the comeback: {recv_log}");
    // The link itself stayed up: the stream came back on it, and no link
    // was given up.
    assert!(
        send.contains("stream 2 at ") && send.contains("resumed over 10.77.2.1:"),
        "stream 2 came back elsewhere: {send}"
    );
    assert!(!send_log.contains("link down"), "send gave a link up: {send_log}");
}

/// `pmigrate proxy` carries QEMU's multifd migration (the main channel and
/// four multifd channels, each a session of four streams, one a link);
/// link 1 goes down for five seconds a third of the way in. The streams
/// on it acknowledge nothing, move to the other links after the link
/// timeout (3 s), and go back once the link answers again; the migration
/// completes.
#[test]
fn proxy_multifd_survives_a_link_down_for_five_seconds() {
    let _serial = one_at_a_time();
    let test = "proxy_multifd_survives_a_link_down_for_five_seconds";
    let Some(bed) = testbed(test, "qlp") else { return };
    let scratch = Scratch::new("links-proxy");
    let (src_sock, dst_sock) = (scratch.path("src.sock"), scratch.path("dst.sock"));
    let channels = 4u64;
    let cfg = guest("links-proxy", WORKING_SET_MIB, PROXY_RATE_MIBPS);
    let mut dst = Qemu::spawn(cfg.clone().netns(&bed.dst).incoming("defer")).expect("spawning the destination QEMU");
    let mut src = boot_source(cfg.netns(&bed.src));
    for vm in [&mut src, &mut dst] {
        vm.qmp().migrate_set_capabilities(&[("multifd", true)]).expect("multifd capability");
        vm.qmp().migrate_set_parameters(json!({ "multifd-channels": channels })).expect("channels");
    }
    src.qmp().migrate_set_parameters(json!({ "max-bandwidth": PROXY_BANDWIDTH })).expect("max-bandwidth");
    dst.qmp().migrate_incoming(&format!("unix:{}", dst_sock.display())).expect("QMP migrate-incoming");

    // The exit listens on every link's destination address; the entry
    // spreads each connection's streams over them, stream i leaving by
    // link i.
    let port = qemu::free_port().expect("free port");
    let mut exit = bed.dst_command(PMIGRATE);
    exit.args(["proxy", "exit"]).args(migration::keys::psk_args());
    for d in bed.dst_endpoints(port) {
        exit.args(["--listen", &d]);
    }
    exit.args(["--target", &format!("unix:{}", dst_sock.display())]);
    let exit = Helper::spawn(exit, scratch.path("proxy-exit.log"), "listening on");
    let mut entry = bed.src_command(PMIGRATE);
    entry
        .args(["proxy", "entry"])
        .args(migration::keys::psk_args())
        .args(["--accept", &format!("unix:{}", src_sock.display())])
        .args(["--streams", &LINKS.to_string(), "--threads", "2", "--via", &bed.via()])
        .args(bed.dst_endpoints(port));
    let entry = Helper::spawn(entry, scratch.path("proxy-entry.log"), "accepting on");

    let t0 = Instant::now();
    src.qmp().migrate(&format!("unix:{}", src_sock.display())).expect("QMP migrate");
    let before = wait_transferred(&mut src, FAULT_AFTER);
    bed.set_link(1, false);
    let down_at = t0.elapsed();
    std::thread::sleep(LINK_DOWN);
    let during = src.qmp().query_migrate().expect("query-migrate");
    bed.set_link(1, true);
    let up_at = t0.elapsed();
    eprintln!(
        "link 1 down at {:.1} s ({} MiB sent), up at {:.1} s ({} MiB sent, {})",
        down_at.as_secs_f64(),
        before["ram"]["transferred"].as_u64().unwrap_or(0) >> 20,
        up_at.as_secs_f64(),
        during["ram"]["transferred"].as_u64().unwrap_or(0) >> 20,
        during["status"].as_str().unwrap_or("?")
    );
    assert_eq!(
        during["status"],
        "active",
        "the migration was not running through the link's down time: {}\n{}\n{}",
        migration_summary(&during),
        entry.text(),
        exit.text()
    );

    let info = src.qmp().wait_migration(MIGRATION_TIMEOUT).expect("waiting for the migration to end");
    let wall = t0.elapsed();
    eprintln!("links-proxy: {} wall={:.1}s", migration_summary(&info), wall.as_secs_f64());
    if info["status"] != "completed" {
        eprintln!("entry:\n{}exit:\n{}", entry.text(), exit.text());
    }
    check_landed(&mut src, &mut dst, &info, true);

    // One connection per channel, each carried whole on both sides.
    let conns = 1 + channels as usize;
    let outcomes = wait_proxies_ended(&entry, &exit, conns);
    let (entry_log, exit_log) = (entry.text(), exit.text());
    eprintln!("entry:\n{entry_log}exit:\n{exit_log}");
    eprintln!("link events, entry:");
    for l in link_lines(&entry_log) {
        eprintln!("  {l}");
    }
    eprintln!("link events, exit:");
    for l in link_lines(&exit_log) {
        eprintln!("  {l}");
    }
    assert_eq!(outcomes, ((conns, 0), (conns, 0)), "connections done and failed per side:\n{entry_log}{exit_log}");
    // The entry, which dials the streams, saw link 1 go silent in every
    // session (each stream sends at least a keepalive a second, so even
    // the main channel's had something unacknowledged), moved stream 1 to
    // another link, and none other: the other links stayed up.
    let reports: Vec<&str> = entry_log.lines().filter(|l| l.contains("connection done")).collect();
    for r in &reports {
        assert!(r.contains("stream 1 at "), "stream 1 never left link 1 in this session: {r}");
        for event in r.split("; stream ").skip(1) {
            if event.contains(": link down (") {
                assert!(
                    event.starts_with("1 at ") && event.contains("link down (10.77.1.1:"),
                    "a link other than link 1 was given up: {event}\n{r}"
                );
            }
        }
        assert!(r.contains(": link down (10.77.1.1:"), "link 1 was never given up in this session: {r}");
        assert!(r.contains("lost stream"), "no stream resumed in this session: {r}");
    }
    // Once link 1 answered again, streams went back to it.
    assert!(
        entry_log.contains("back on its own link (10.77.1.1:"),
        "no stream went back to link 1 once it was up:\n{entry_log}"
    );
}
