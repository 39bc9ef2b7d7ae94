//! A memory migration over four links survives what links do: a
//! connection the kernel kills mid-round, every connection killed at once,
//! a link down for five seconds and back, a link that never comes back.
//! `pmigrate serve` and `pmigrate migrate` run in the two namespaces of
//! the netns testbed (tools/testbed.sh), one stream per link, each link
//! shaped to 100 Mbit/s so the transfer lasts long enough to be hit
//! midway. Every such run ends byte for byte with both ends exiting 0 and
//! the source's report naming what happened to each link; a destination
//! that stays out of reach past the deadline fails cleanly, the source's
//! memory untouched. Over each I/O backend.

#[path = "../../tests/support/keys.rs"]
mod keys;
#[path = "../../tests/support/listening.rs"]
mod listening;
#[path = "../../tests/support/testbed.rs"]
mod testbed;

use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use listening::start_listening;
use rand::{RngCore, SeedableRng};
use serde_json::Value;
use testbed::Testbed;

const BIN: &str = env!("CARGO_BIN_EXE_pmigrate");
const PORT: u16 = 7000;
const LINKS: usize = 4;
/// 100 Mbit/s a link: 512 MiB take about 11 s over all four.
const RATE: &str = "100mbit";
const MIB: usize = 512;

/// A scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("pmigrate-links-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `mib` MiB of incompressible memory, seeded.
fn memory(path: &Path, mib: usize) -> Vec<u8> {
    let mut data = vec![0u8; mib << 20];
    rand::rngs::SmallRng::seed_from_u64(mib as u64).fill_bytes(&mut data);
    std::fs::write(path, &data).unwrap();
    data
}

/// Waits for `child` up to `limit`, killing it past that.
fn wait_for(child: &mut Child, limit: Duration, what: &str) -> ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            panic!("{what} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How one migration over the testbed ended.
struct Outcome {
    migrate: ExitStatus,
    /// The source's JSON report (when it printed one) and its stderr.
    report: Option<Value>,
    migrate_err: String,
    serve: ExitStatus,
    serve_log: String,
    /// The destination's file equals the source's memory.
    exact: bool,
    secs: f64,
}

/// What to migrate, how, and when the fault strikes.
struct Plan<'a> {
    io: &'a str,
    progress_timeout: u64,
    mib: usize,
    fault_after: Duration,
}

impl<'a> Plan<'a> {
    /// `MIB` MiB on `io`, the fault a second in.
    fn on(io: &'a str) -> Self {
        Plan { io, progress_timeout: 30, mib: MIB, fault_after: Duration::from_secs(1) }
    }
}

/// Migrates `plan.mib` MiB from the source side to the destination side
/// over every link, one stream each, while `fault` acts on the testbed
/// (called `plan.fault_after` into the migration).
fn migrate(bed: &Testbed, plan: &Plan<'_>, fault: impl FnOnce(&Testbed) + Send) -> Outcome {
    let Plan { io, progress_timeout, mib, fault_after } = *plan;
    let dir = Scratch::new(&bed.src);
    let (src, dst) = (dir.0.join("src.mem"), dir.0.join("dst.mem"));
    let data = memory(&src, mib);
    let timeout = progress_timeout.to_string();
    let mut serve = bed.dst_command(BIN);
    serve
        .args(["serve", "--memory"])
        .arg(&dst)
        .args(["--json", "--wait", "120", "--io", io, "--progress-timeout", &timeout, "--listen"])
        .args(bed.dst_endpoints(PORT))
        .args(keys::psk_args())
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let (mut serve, serve_log) = start_listening(&mut serve);
    let mut mig = bed.src_command(BIN);
    mig.args(["migrate", "--memory"])
        .arg(&src)
        .args(["--no-zero-copy", "--compress", "none", "--json", "--streams", "4", "--io", io])
        .args(["--progress-timeout", &timeout, "--via", &bed.via()])
        .args(bed.dst_endpoints(PORT))
        .args(keys::psk_args())
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t0 = Instant::now();
    let mig = mig.spawn().unwrap();
    let (out, secs) = std::thread::scope(|s| {
        let out = s.spawn(|| (mig.wait_with_output().unwrap(), t0.elapsed().as_secs_f64()));
        std::thread::sleep(fault_after);
        fault(bed);
        out.join().unwrap()
    });
    let migrate_err = String::from_utf8_lossy(&out.stderr).into_owned();
    let report = serde_json::from_slice::<Value>(&out.stdout).ok();
    let serve_status = if out.status.success() {
        wait_for(&mut serve, Duration::from_secs(60), "serve")
    } else {
        // A failed migration leaves the server waiting for another.
        std::thread::sleep(Duration::from_secs(1));
        let _ = serve.kill();
        serve.wait().unwrap()
    };
    let serve_log = serve_log.join().unwrap();
    let exact = std::fs::read(&dst).is_ok_and(|got| got == data);
    assert_eq!(std::fs::read(&src).unwrap(), data, "the source's memory is untouched");
    Outcome { migrate: out.status, report, migrate_err, serve: serve_status, serve_log, exact, secs }
}

/// The source report's link events, as `(stream, event, route)`.
fn events(o: &Outcome) -> Vec<(u64, String, String)> {
    let r = o.report.as_ref().expect("the source's JSON report");
    r["links"]
        .as_array()
        .expect("links in the report")
        .iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap_or_default().to_string();
            (e["stream"].as_u64().unwrap(), s("event"), s("route"))
        })
        .collect()
}

/// A run that must have ended byte for byte, both ends exiting 0.
fn check_exact(name: &str, o: &Outcome) {
    eprintln!("{name}: {:.1} s, link events {:?}", o.secs, o.report.as_ref().map(|_| events(o)));
    assert!(o.migrate.success(), "{name}: migrate failed: {}\nserve: {}", o.migrate_err, o.serve_log);
    assert!(o.serve.success(), "{name}: serve failed: {}", o.serve_log);
    assert!(o.exact, "{name}: the destination's memory differs from the source's");
}

/// Whether a route (`local -> peer`) leaves by link `i`.
fn on_link(route: &str, i: usize) -> bool {
    route.starts_with(&format!("10.77.{i}.1:"))
}

fn io_or_skip(io: &str) -> bool {
    if io == "uring" {
        if let Err(why) = pmigrate_transport::backend::probe_uring() {
            eprintln!("skipping over io_uring: {why}");
            return false;
        }
    }
    true
}

fn a_killed_connection(io: &str, tag: &str) {
    let Some(bed) = Testbed::up(&format!("lk{tag}"), LINKS, RATE) else { return };
    if !io_or_skip(io) {
        return;
    }
    let o =
        migrate(&bed, &Plan::on(io), |bed| assert_eq!(bed.kill_connections(Some(2), PORT), 1, "one connection killed"));
    check_exact("killed connection", &o);
    let ev = events(&o);
    assert!(ev.iter().any(|(s, e, _)| *s == 2 && e == "lost"), "stream 2 lost: {ev:?}");
    assert!(ev.iter().any(|(s, e, r)| *s == 2 && e == "resumed" && on_link(r, 2)), "back on its own link: {ev:?}");
}

fn every_connection_killed(io: &str, tag: &str) {
    let Some(bed) = Testbed::up(&format!("la{tag}"), LINKS, RATE) else { return };
    if !io_or_skip(io) {
        return;
    }
    let o = migrate(&bed, &Plan::on(io), |bed| assert_eq!(bed.kill_connections(None, PORT), LINKS, "all killed"));
    check_exact("every connection killed", &o);
    let ev = events(&o);
    for i in 0..LINKS as u64 {
        assert!(ev.iter().any(|(s, e, _)| *s == i && e == "resumed"), "stream {i} resumed: {ev:?}");
    }
}

fn a_link_down_for_five_seconds(io: &str, tag: &str) {
    let Some(bed) = Testbed::up(&format!("ld{tag}"), LINKS, RATE) else { return };
    if !io_or_skip(io) {
        return;
    }
    let o = migrate(&bed, &Plan::on(io), |bed| {
        bed.set_link(2, false);
        std::thread::sleep(Duration::from_secs(5));
        bed.set_link(2, true);
    });
    check_exact("a link down for 5 s", &o);
    let ev = events(&o);
    // Given up as down, carried on by another link, back on its own.
    let down = ev.iter().position(|(s, e, r)| *s == 2 && e == "down" && on_link(r, 2));
    let moved = ev.iter().position(|(s, e, r)| *s == 2 && e == "resumed" && !on_link(r, 2));
    let home = ev.iter().position(|(s, e, r)| *s == 2 && e == "returned" && on_link(r, 2));
    assert!(down < moved && moved < home && down.is_some(), "down, moved, back on its own link: {ev:?}");
    assert!(ev.iter().all(|(s, _, _)| *s == 2), "only stream 2's link had trouble: {ev:?}");
}

fn a_link_that_never_returns(io: &str, tag: &str) {
    let Some(bed) = Testbed::up(&format!("ln{tag}"), LINKS, RATE) else { return };
    if !io_or_skip(io) {
        return;
    }
    let o = migrate(&bed, &Plan::on(io), |bed| bed.set_link(2, false));
    check_exact("a link that never returns", &o);
    let ev = events(&o);
    assert!(ev.iter().any(|(s, e, r)| *s == 2 && e == "down" && on_link(r, 2)), "link 2 given up: {ev:?}");
    assert!(ev.iter().any(|(s, e, r)| *s == 2 && e == "resumed" && !on_link(r, 2)), "moved off it: {ev:?}");
    assert!(!ev.iter().any(|(_, e, _)| e == "returned"), "nothing went back to a dead link: {ev:?}");
}

fn an_unreachable_destination(io: &str, tag: &str) {
    let Some(bed) = Testbed::up(&format!("lu{tag}"), LINKS, RATE) else { return };
    if !io_or_skip(io) {
        return;
    }
    // Every link down for good: the source tries every route for its
    // progress timeout (5 s here), then gives up.
    let o = migrate(&bed, &Plan { progress_timeout: 5, ..Plan::on(io) }, |bed| {
        (0..LINKS).for_each(|i| bed.set_link(i, false))
    });
    eprintln!("unreachable: {:.1} s\n{}", o.secs, o.migrate_err);
    assert!(!o.migrate.success(), "the migration cannot have succeeded");
    assert!(!o.exact, "the destination cannot have every page");
    let last = o.migrate_err.lines().last().unwrap_or_default();
    assert!(
        last.contains("migration failed") && last.contains("keeps running here"),
        "one line says the source keeps the VM: {}",
        o.migrate_err
    );
    assert!(o.secs < 60.0, "gave up within its deadlines, not after {:.1} s", o.secs);
}

#[test]
fn precopy_survives_a_killed_connection_portable() {
    a_killed_connection("portable", "p");
}

#[test]
fn precopy_survives_a_killed_connection_io_uring() {
    a_killed_connection("uring", "u");
}

#[test]
fn precopy_survives_every_connection_killed_once_portable() {
    every_connection_killed("portable", "p");
}

#[test]
fn precopy_survives_every_connection_killed_once_io_uring() {
    every_connection_killed("uring", "u");
}

#[test]
fn precopy_survives_a_link_down_for_five_seconds_portable() {
    a_link_down_for_five_seconds("portable", "p");
}

#[test]
fn precopy_survives_a_link_down_for_five_seconds_io_uring() {
    a_link_down_for_five_seconds("uring", "u");
}

#[test]
fn precopy_completes_over_the_other_links_when_one_never_returns_portable() {
    a_link_that_never_returns("portable", "p");
}

#[test]
fn precopy_completes_over_the_other_links_when_one_never_returns_io_uring() {
    a_link_that_never_returns("uring", "u");
}

#[test]
fn an_unreachable_destination_fails_cleanly_and_the_source_keeps_its_memory_portable() {
    an_unreachable_destination("portable", "p");
}

#[test]
fn an_unreachable_destination_fails_cleanly_and_the_source_keeps_its_memory_io_uring() {
    an_unreachable_destination("uring", "u");
}

/// The benchmark of docs/benchmarks.md ("A link lost"): 1 GiB over four
/// links of 1 Gbit/s, unfaulted and then with link 2 set down for good at
/// half the unfaulted time, same command; prints both and their ratio.
/// `cargo test --release -p pmigrate-tools --test links -- --ignored --nocapture`
#[test]
#[ignore = "a benchmark: run it by hand"]
fn bench_one_of_four_links_lost_midway() {
    let Some(bed) = Testbed::up("lkb", LINKS, "1gbit") else { return };
    for round in 0..3 {
        let plan = Plan { mib: 1024, ..Plan::on("uring") };
        let whole = migrate(&bed, &plan, |_| {});
        check_exact("unfaulted", &whole);
        let half = Duration::from_secs_f64(whole.secs / 2.0);
        let lost = migrate(&bed, &Plan { fault_after: half, ..plan }, |bed| bed.set_link(2, false));
        bed.set_link(2, true);
        check_exact("link 2 lost midway", &lost);
        eprintln!(
            "run {round}: unfaulted {:.2} s, link 2 lost at {:.2} s: {:.2} s = {:.2}x",
            whole.secs,
            half.as_secs_f64(),
            lost.secs,
            lost.secs / whole.secs
        );
    }
}
