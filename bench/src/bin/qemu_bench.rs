//! `qemu-bench`: QEMU live migration over the multi-NIC testbed, through
//! QEMU's own `tcp:`, QEMU's `multifd`, pmigrate's `exec:` helpers, and
//! QEMU's `multifd` over a `unix:` URI through `pmigrate proxy`.
//!
//! For each link count K it builds the testbed (`tools/testbed.sh up --links K
//! --rate R`), measures the raw TCP ceiling, then for each dirty rate and
//! transport boots the self-checking test guest (`tests/guest/`) under TCG in
//! `pm-src`, a destination in `pm-dst`, migrates, and records QEMU's
//! `query-migrate` figures, the bytes that crossed the links, the CPU use of
//! every QEMU thread and helper, and whether the guest that runs afterwards is
//! intact. See `docs/qemu-bench.md`.
//!
//! ```sh
//! cargo build --release -p pmigrate-tools
//! cargo run --release -p pmigrate-bench --bin qemu-bench -- --links 1,4 --dirty-mib-s 0,200
//! ```
//!
//! Needs root (namespaces), QEMU and the test guest. It is a benchmark, not a
//! test: `cargo test` does not run it.

#[path = "../../../tests/support/qemu.rs"]
mod qemu;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, ValueEnum};
use qemu::{Heartbeat, Qemu, VmConfig};
use serde::Serialize;
use serde_json::{json, Value};

/// Longest wait for the destination to run and show heartbeats after a migration.
const LAND_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for a cancelled migration to settle.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(150);
/// Longest a testbed command (`up`, `down`, `env`) may take.
const TESTBED_TIMEOUT: Duration = Duration::from_secs(120);
/// First TCP port of the migrations (one port per run).
const BASE_PORT: u16 = 7100;

// ------------------------------------------------------------------- CLI

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Transport {
    /// QEMU's own `tcp:` migration: one connection, link 0.
    Tcp,
    /// QEMU's `multifd` capability over `tcp:` (one address, so link 0).
    Multifd,
    /// `exec:pmigrate send` / `exec:pmigrate recv` over all links.
    Pmigrate,
    /// QEMU's `multifd` over `unix:` sockets, each connection carried by
    /// `pmigrate proxy` over all links (how libvirt would use it).
    Proxy,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Multifd => "multifd",
            Transport::Pmigrate => "pmigrate",
            Transport::Proxy => "proxy",
        }
    }
}

/// QEMU live migration over the multi-NIC testbed (see docs/qemu-bench.md).
#[derive(Parser, Debug, Clone, Serialize)]
#[command(name = "qemu-bench", version)]
struct Cli {
    /// Link counts to test (one testbed per count).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    links: Vec<u32>,
    /// Rate of each link, in tc syntax.
    #[arg(long, default_value = "1gbit")]
    rate: String,
    /// Guest RAM (`-m`); must not be a multiple of 256 KiB (QEMU 7.2 TCG bug).
    #[arg(long, default_value = "2097280K")]
    mem: String,
    /// Workload working set in MiB (`pmw.mb`).
    #[arg(long, default_value_t = 1024)]
    ws_mib: u64,
    /// Workload rewrite rates in MiB/s to test (`pmw.rate`; 0 = idle).
    #[arg(long, value_delimiter = ',', default_value = "0,200")]
    dirty_mib_s: Vec<u64>,
    /// Transports to compare.
    #[arg(long, value_delimiter = ',', default_value = "tcp,multifd,pmigrate")]
    transports: Vec<Transport>,
    /// Runs of each configuration.
    #[arg(long, default_value_t = 1)]
    runs: u32,
    /// A migration still running after this many seconds counts as not
    /// converged and is cancelled.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// Print the results as JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// Also write the results as JSON to this file, after every run.
    #[arg(long)]
    save: Option<PathBuf>,
    /// multifd: `multifd-channels`.
    #[arg(long, default_value_t = 4)]
    multifd_channels: u32,
    /// pmigrate: `send --streams` (spread round robin over the K links).
    #[arg(long, default_value_t = 4)]
    streams: u32,
    /// pmigrate: extra arguments for `pmigrate send` (e.g. "--compress none").
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    send_args: String,
    /// pmigrate: a command both helpers run under inside the `exec:` URI,
    /// e.g. a wrapper that resizes the pipes before it execs pmigrate (a
    /// diagnostic; see docs/qemu-bench.md).
    #[arg(long, default_value = "")]
    helper_prefix: String,
    /// The pmigrate binary (default: `pmigrate` next to this binary, i.e.
    /// target/release/pmigrate from `cargo build --release -p pmigrate-tools`).
    #[arg(long)]
    pmigrate: Option<PathBuf>,
    /// QEMU `max-bandwidth` in bytes/s for every transport (QEMU's default,
    /// 128 MiB/s, would cap every transport below the links).
    #[arg(long, default_value_t = 10 << 30)]
    max_bandwidth: u64,
    /// Seconds per iperf3 run of `testbed.sh ceiling` (0: skip the ceiling).
    #[arg(long, default_value_t = 3)]
    ceiling_secs: u64,
    /// Heartbeats to wait for on a busy source before migrating (its dirty
    /// rate is measured over them).
    #[arg(long, default_value_t = 5)]
    warmup_beats: usize,
    /// Leave the testbed up at the end.
    #[arg(long)]
    keep_testbed: bool,
    /// Before each run, wait up to this many seconds for the host to be
    /// quiet (other jobs share the cores); 0: do not wait.
    #[arg(long, default_value_t = 0)]
    idle_wait_secs: u64,
    /// "Quiet" for --idle-wait-secs: host CPU busy below this many cores over 1 s.
    #[arg(long, default_value_t = 0.3)]
    idle_below: f64,
}

// --------------------------------------------------------------- results

#[derive(Clone, Debug, Default, Serialize)]
struct Ceiling {
    links: u32,
    rate: String,
    /// Gbit/s of each link measured alone.
    alone_gbit: Vec<f64>,
    /// Gbit/s of each link with all links loaded at once (K > 1).
    together_gbit: Vec<f64>,
    /// Sum over links when all run at once (or link 0 alone when K = 1).
    aggregate_gbit: Option<f64>,
    error: Option<String>,
    text: String,
}

/// CPU seconds during the migration window.
#[derive(Clone, Debug, Default, Serialize)]
struct CpuUse {
    /// Window length in seconds (migrate command to final status).
    window_s: f64,
    /// Source QEMU, by thread kind (main, vcpu, migration, multifd-send, other).
    src_threads: BTreeMap<String, f64>,
    /// Destination QEMU, by thread kind (main, vcpu, multifd-recv, other).
    dst_threads: BTreeMap<String, f64>,
    /// `pmigrate send` (and its shell), whole life.
    src_helper_s: f64,
    /// `pmigrate recv` (and its shell), whole life.
    dst_helper_s: f64,
    /// All CPUs of the host, busy time (user+nice+system+irq+softirq+steal).
    host_busy_s: f64,
    /// Host busy time not accounted to the two QEMUs or the helpers: other
    /// load on the machine, and softirq work charged to no process.
    other_s: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
struct RunResult {
    transport: String,
    links: u32,
    dirty_target_mibps: u64,
    run: u32,
    /// pmigrate streams or multifd channels (1 for tcp).
    parallelism: u32,
    uri: String,
    status: String,
    converged: bool,
    error: Option<String>,
    total_ms: Option<u64>,
    setup_ms: Option<u64>,
    /// total − setup, seconds.
    transfer_s: Option<f64>,
    downtime_ms: Option<u64>,
    /// Wall time from `migrate` to the final status (cancellation included).
    elapsed_s: f64,
    ram_transferred: u64,
    ram_total: u64,
    ram_remaining_last: u64,
    mbps: f64,
    dirty_sync_count: u64,
    /// Highest `dirty-pages-rate` query-migrate reported (pages/s).
    dirty_pages_rate_max: u64,
    /// Bytes sent on the source side of the links (IP headers included).
    wire_bytes: u64,
    wire_bytes_per_link: Vec<u64>,
    /// `pmigrate send --report`: bytes on the wire and seconds.
    helper_report: Option<String>,
    /// The workload's rewrite rate measured from heartbeats before migrating.
    dirty_mibps_before: Option<f64>,
    /// ... and while migrating (TCG dirty tracking slows the guest).
    dirty_mibps_during: Option<f64>,
    /// Whether the guest that runs afterwards (destination if converged,
    /// source if not) shows heartbeats and no damage.
    intact: Option<bool>,
    runs_on: String,
    intact_note: String,
    max_bandwidth: u64,
    downtime_limit_ms: u64,
    /// Host CPU busy (cores) over the second before the run started.
    host_busy_before_cores: f64,
    cpu: CpuUse,
    /// transfer_s / QEMU tcp: on the fewest links, same dirty rate.
    transfer_ratio: Option<f64>,
    /// downtime / QEMU tcp: on the fewest links, same dirty rate.
    downtime_ratio: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
struct Report {
    config: Cli,
    host: Value,
    ceilings: Vec<Ceiling>,
    runs: Vec<RunResult>,
    baseline: String,
}

// ------------------------------------------------------------ processes

/// Runs a command with a time limit (its whole process group is killed on
/// timeout); returns stdout, and stderr for errors.
fn run_cmd(cmd: &mut Command, timeout: Duration) -> Result<(String, String)> {
    use std::os::unix::process::CommandExt;
    let what = format!("{cmd:?}");
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    let mut child = cmd.spawn().with_context(|| format!("spawning {what}"))?;
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        if Instant::now() >= deadline {
            kill_group(child.id());
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // A leftover grandchild may hold the pipes: give them 2 s, then kill the
    // group (the leader is reaped, but its group lives while members do).
    let grace = Instant::now() + Duration::from_secs(2);
    while !(t_out.is_finished() && t_err.is_finished()) && Instant::now() < grace {
        std::thread::sleep(Duration::from_millis(20));
    }
    if !(t_out.is_finished() && t_err.is_finished()) {
        kill_group(child.id());
    }
    let stdout = t_out.join().unwrap_or_default();
    let stderr = t_err.join().unwrap_or_default();
    match status {
        None => bail!("{what} timed out after {:.0} s\n{stdout}{stderr}", timeout.as_secs_f64()),
        Some(st) if !st.success() => bail!("{what} failed ({st}):\n{stdout}{stderr}"),
        Some(_) => Ok((stdout, stderr)),
    }
}

fn kill_group(pgid: u32) {
    // SAFETY: kill(2) with a negative pid signals a process group; it takes
    // no pointers. The group is the one this program created for the child.
    unsafe {
        libc::kill(-(pgid as libc::pid_t), libc::SIGKILL);
    }
}

// --------------------------------------------------------------- testbed

/// The testbed of `tools/testbed.sh`; taken down on drop unless kept.
struct Testbed {
    script: PathBuf,
    keep: bool,
}

/// What `testbed.sh env` reports.
#[derive(Clone, Debug)]
struct TestbedEnv {
    ns_src: String,
    ns_dst: String,
    src_addrs: Vec<String>,
    dst_addrs: Vec<String>,
    src_ifaces: Vec<String>,
}

impl Testbed {
    fn up(&self, links: u32, rate: &str) -> Result<TestbedEnv> {
        let (out, _) = run_cmd(
            Command::new("bash").arg(&self.script).args(["up", "--links", &links.to_string(), "--rate", rate]),
            TESTBED_TIMEOUT,
        )?;
        eprintln!("qemu-bench: {}", out.trim());
        let (env, _) = run_cmd(Command::new("bash").arg(&self.script).arg("env"), TESTBED_TIMEOUT)?;
        let get = |k: &str| -> Result<String> {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .map(str::to_string)
                .ok_or_else(|| anyhow!("testbed.sh env printed no {k}: {env}"))
        };
        let list = |k: &str| -> Result<Vec<String>> { Ok(get(k)?.split(',').map(str::to_string).collect()) };
        let e = TestbedEnv {
            ns_src: get("PM_NS_SRC")?,
            ns_dst: get("PM_NS_DST")?,
            src_addrs: list("PM_SRC_ADDRS")?,
            dst_addrs: list("PM_DST_ADDRS")?,
            src_ifaces: list("PM_SRC_IFACES")?,
        };
        if e.src_addrs.len() != links as usize || e.dst_addrs.len() != links as usize {
            bail!("testbed has {} links, wanted {links}", e.src_addrs.len());
        }
        Ok(e)
    }

    fn ceiling(&self, links: u32, rate: &str, secs: u64) -> Ceiling {
        let mut c = Ceiling { links, rate: rate.to_string(), ..Default::default() };
        let timeout = Duration::from_secs(60 + secs * (links as u64 + 1) * 3);
        match run_cmd(Command::new("bash").arg(&self.script).args(["ceiling", "--seconds", &secs.to_string()]), timeout)
        {
            Ok((out, _)) => {
                let mut together = false;
                for line in out.lines() {
                    let l = line.trim();
                    if l.starts_with("all ") {
                        together = true;
                    }
                    let gbit = gbit_in(l);
                    if l.starts_with("link ") {
                        if let Some(g) = gbit {
                            if together {
                                c.together_gbit.push(g)
                            } else {
                                c.alone_gbit.push(g)
                            }
                        }
                    } else if l.starts_with("aggregate") {
                        c.aggregate_gbit = gbit;
                    }
                }
                c.text = out;
            }
            Err(e) => c.error = Some(format!("{e:#}")),
        }
        c
    }

    fn down(&self) {
        match run_cmd(Command::new("bash").arg(&self.script).arg("down"), TESTBED_TIMEOUT) {
            Ok((out, err)) => eprintln!("qemu-bench: {}{}", out.trim(), err.trim()),
            Err(e) => eprintln!("qemu-bench: testbed down failed: {e:#}"),
        }
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if !self.keep {
            self.down();
        }
    }
}

/// The number before "Gbit/s" in a line.
fn gbit_in(line: &str) -> Option<f64> {
    let w: Vec<&str> = line.split_whitespace().collect();
    let i = w.iter().position(|x| *x == "Gbit/s")?;
    w.get(i.checked_sub(1)?)?.parse().ok()
}

/// TX bytes of each interface in `ns`, in `ifaces` order.
fn tx_bytes(ns: &str, ifaces: &[String]) -> Result<Vec<u64>> {
    let (out, _) = run_cmd(Command::new("ip").args(["-n", ns, "-j", "-s", "link", "show"]), Duration::from_secs(20))?;
    let v: Value = serde_json::from_str(&out).context("parsing ip -j -s link")?;
    ifaces
        .iter()
        .map(|name| {
            v.as_array()
                .and_then(|a| a.iter().find(|l| l["ifname"] == name.as_str()))
                .and_then(|l| l["stats64"]["tx"]["bytes"].as_u64())
                .ok_or_else(|| anyhow!("no tx counter for {name} in {ns}"))
        })
        .collect()
}

// ------------------------------------------------------------------- CPU

fn clk_tck() -> f64 {
    // SAFETY: sysconf takes no pointers and only reads a constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Parsed `/proc/.../stat`: (comm, ppid, utime+stime, cutime+cstime) in ticks.
fn read_stat(path: &Path) -> Option<(String, u32, u64, u64)> {
    let s = fs::read_to_string(path).ok()?;
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s[open + 1..close].to_string();
    let rest: Vec<&str> = s[close + 1..].split_whitespace().collect();
    // rest[0] is field 3 (state): field n is rest[n - 3].
    let num = |n: usize| rest.get(n - 3).and_then(|x| x.parse::<u64>().ok());
    Some((comm, num(4)? as u32, num(14)? + num(15)?, num(16)? + num(17)?))
}

/// Host CPU ticks: (busy, total).
fn host_ticks() -> (u64, u64) {
    let s = fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> =
        s.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

/// Host CPU busy, in cores, over `window`.
fn host_busy_cores(window: Duration) -> f64 {
    let a = host_ticks();
    std::thread::sleep(window);
    let b = host_ticks();
    let total = b.1.saturating_sub(a.1).max(1) as f64;
    b.0.saturating_sub(a.0) as f64 / total * std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64
}

/// Waits (up to `secs`) until the host is quiet; returns the last load.
fn wait_idle(below: f64, secs: u64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut said = false;
    loop {
        let busy = host_busy_cores(Duration::from_secs(1));
        if secs == 0 || busy < below || Instant::now() >= deadline || SIGNALLED.load(Ordering::SeqCst) != 0 {
            if said {
                eprintln!("qemu-bench:   host busy {busy:.2} cores, going on");
            }
            return busy;
        }
        if !said {
            eprintln!("qemu-bench:   host busy {busy:.2} cores (other jobs): waiting up to {secs} s for it to quieten");
            said = true;
        }
    }
}

fn thread_kind(pid: u32, tid: u32, comm: &str) -> String {
    if tid == pid {
        "main".into()
    } else if comm.starts_with("CPU ") {
        "vcpu".into()
    } else if comm == "live_migration" {
        "migration".into()
    } else if comm.starts_with("multifdsend") {
        "multifd-send".into()
    } else if comm.starts_with("multifdrecv") {
        "multifd-recv".into()
    } else {
        "other".into()
    }
}

/// CPU time of one QEMU's threads and of its helper processes.
struct CpuWatch {
    pid: u32,
    base_threads: HashMap<u32, u64>,
    last_threads: HashMap<u32, (String, u64)>,
    base_reaped: u64,
}

impl CpuWatch {
    fn new(pid: u32) -> CpuWatch {
        let mut w = CpuWatch { pid, base_threads: HashMap::new(), last_threads: HashMap::new(), base_reaped: 0 };
        w.sample_threads();
        w.base_threads = w.last_threads.iter().map(|(t, (_, v))| (*t, *v)).collect();
        w.base_reaped = read_stat(Path::new(&format!("/proc/{pid}/stat"))).map(|s| s.3).unwrap_or(0);
        w
    }

    fn sample_threads(&mut self) {
        let Ok(dir) = fs::read_dir(format!("/proc/{}/task", self.pid)) else { return };
        for e in dir.flatten() {
            let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            if let Some((comm, _, ticks, _)) = read_stat(&e.path().join("stat")) {
                self.last_threads.insert(tid, (comm, ticks));
            }
        }
    }

    /// Seconds per thread kind since the watch began.
    fn thread_secs(&self) -> BTreeMap<String, f64> {
        let tck = clk_tck();
        let mut m = BTreeMap::new();
        for (tid, (comm, ticks)) in &self.last_threads {
            let d = ticks.saturating_sub(self.base_threads.get(tid).copied().unwrap_or(0));
            *m.entry(thread_kind(self.pid, *tid, comm)).or_insert(0.0) += d as f64 / tck;
        }
        m
    }

    /// Seconds of the helpers: children QEMU has reaped since the watch
    /// began, plus descendants still alive.
    fn helper_secs(&self) -> f64 {
        let reaped = read_stat(Path::new(&format!("/proc/{}/stat", self.pid)))
            .map(|s| s.3.saturating_sub(self.base_reaped))
            .unwrap_or(0);
        let alive: u64 = descendants(self.pid).iter().map(|(_, t)| *t).sum();
        (reaped + alive) as f64 / clk_tck()
    }
}

/// Live descendants of `pid`: (pid, utime+stime ticks).
fn descendants(pid: u32) -> Vec<(u32, u64)> {
    let mut procs: Vec<(u32, u32, u64)> = Vec::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            if let Some((_, ppid, ticks, _)) = read_stat(&e.path().join("stat")) {
                procs.push((p, ppid, ticks));
            }
        }
    }
    let mut found = vec![pid];
    let mut out = Vec::new();
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        for (p, pp, t) in &procs {
            if *pp == parent && !found.contains(p) {
                found.push(*p);
                out.push((*p, *t));
            }
        }
        i += 1;
    }
    out
}

// --------------------------------------------------------------- signals

static SIGNALLED: AtomicI32 = AtomicI32::new(0);
/// QEMU pids alive now, killed on a signal before the testbed goes down.
static LIVE_QEMUS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

extern "C" fn on_signal(sig: libc::c_int) {
    SIGNALLED.store(sig, Ordering::SeqCst);
}

/// On SIGINT/SIGTERM/SIGHUP: kill our QEMUs, take the testbed down, exit.
fn install_signal_handlers(script: PathBuf, keep: bool) {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe; the sigaction struct is zeroed and filled in
        // before the call, which only reads it.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    std::thread::spawn(move || loop {
        let sig = SIGNALLED.load(Ordering::SeqCst);
        if sig != 0 {
            eprintln!("qemu-bench: signal {sig}: stopping QEMUs and the testbed");
            for pid in LIVE_QEMUS.lock().map(|v| v.clone()).unwrap_or_default() {
                // SAFETY: kill(2) takes no pointers; the pid is a QEMU we spawned.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGKILL);
                }
            }
            if !keep {
                let tb = Testbed { script: script.clone(), keep: true };
                tb.down();
            }
            std::process::exit(128 + sig);
        }
        std::thread::sleep(Duration::from_millis(100));
    });
}

fn interrupted() -> Result<()> {
    if SIGNALLED.load(Ordering::SeqCst) != 0 {
        bail!("interrupted");
    }
    Ok(())
}

/// Registers a QEMU pid for the signal handler while it lives.
struct Registered(u32);

impl Registered {
    fn new(pid: u32) -> Registered {
        if let Ok(mut v) = LIVE_QEMUS.lock() {
            v.push(pid);
        }
        Registered(pid)
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Ok(mut v) = LIVE_QEMUS.lock() {
            v.retain(|p| *p != self.0);
        }
    }
}

// ------------------------------------------------------------------ runs

/// Quotes a word for `/bin/sh`.
fn sh(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// MiB/s of page rewrites between the first and last heartbeat.
fn dirty_rate(beats: &[Heartbeat]) -> Option<f64> {
    let (a, b) = (beats.first()?, beats.last()?);
    (b.t > a.t).then(|| (b.gen.saturating_sub(a.gen)) as f64 / 256.0 / (b.t - a.t))
}

struct Ctx {
    cli: Cli,
    pmigrate: PathBuf,
    scratch: PathBuf,
    port: u16,
    /// The pre-shared key file both helpers (or proxies) use.
    key: String,
}

/// One migration; fills `r` as far as it gets (so an error still leaves
/// what was measured).
fn run_one(ctx: &mut Ctx, tb: &TestbedEnv, r: &mut RunResult, t: Transport) -> Result<()> {
    let cli = ctx.cli.clone();
    ctx.port = if ctx.port >= BASE_PORT + 2000 { BASE_PORT } else { ctx.port + 1 };
    let port = ctx.port;
    let dir = ctx.scratch.join(format!("{}-k{}-d{}-r{}", t.name(), r.links, r.dirty_target_mibps, r.run));
    fs::create_dir_all(&dir)?;
    let (send_err, recv_err) = (dir.join("send.err"), dir.join("recv.err"));

    let (incoming, uri) = match t {
        Transport::Tcp | Transport::Multifd => {
            let u = format!("tcp:{}:{port}", tb.dst_addrs[0]);
            (u.clone(), u)
        }
        Transport::Pmigrate => {
            let pm = format!("{} {}", cli.helper_prefix, sh(&ctx.pmigrate.to_string_lossy()));
            let pm = pm.trim();
            let listen: Vec<String> = tb.dst_addrs.iter().map(|a| format!("--listen {a}:{port}")).collect();
            let dests: Vec<String> = tb.dst_addrs.iter().map(|a| format!("{a}:{port}")).collect();
            let key = sh(&ctx.key);
            let recv = format!(
                "exec:{pm} recv --psk-file {key} {} --wait 300 --report 2>{}",
                listen.join(" "),
                sh(&recv_err.to_string_lossy())
            );
            let send = format!(
                "exec:{pm} send --psk-file {key} --streams {} --via {} {} --report {} 2>{}",
                cli.streams,
                tb.src_addrs.join(","),
                cli.send_args,
                dests.join(" "),
                sh(&send_err.to_string_lossy())
            );
            (recv, send)
        }
        Transport::Proxy => {
            let u = |end: &str| format!("unix:{}", dir.join(format!("{end}.sock")).display());
            (u("dst"), u("src"))
        }
    };
    r.uri = uri.clone();
    r.parallelism = match t {
        Transport::Tcp => 1,
        Transport::Multifd => cli.multifd_channels,
        Transport::Pmigrate => cli.streams,
        // Streams per carried connection.
        Transport::Proxy => cli.streams,
    };
    let multifd = matches!(t, Transport::Multifd | Transport::Proxy);
    r.host_busy_before_cores = wait_idle(cli.idle_below, cli.idle_wait_secs);
    interrupted()?;
    let base = VmConfig::new("qb").mem(&cli.mem).working_set_mib(cli.ws_mib).dirty_rate_mibps(r.dirty_target_mibps);

    // Destination first: it waits (`defer`), is configured, then listens.
    let mut dst_cfg = base.clone().netns(&tb.ns_dst).args(["-name", "qb-dst,debug-threads=on"]).incoming("defer");
    dst_cfg.name = "qb-dst".into();
    let mut dst = Qemu::spawn(dst_cfg).context("spawning the destination QEMU")?;
    let _dst_reg = Registered::new(dst.pid());
    if multifd {
        dst.qmp().migrate_set_capabilities(&[("multifd", true)])?;
        dst.qmp().migrate_set_parameters(json!({ "multifd-channels": cli.multifd_channels }))?;
    }
    dst.qmp().migrate_incoming(&incoming).context("migrate-incoming")?;
    if t == Transport::Pmigrate {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !fs::read_to_string(&recv_err).unwrap_or_default().contains("listening on") {
            if Instant::now() >= deadline {
                bail!("pmigrate recv did not start listening: {:?}", fs::read_to_string(&recv_err));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    // The proxy's two ends, in their namespaces, around the unix sockets.
    let proxies = if t == Transport::Proxy { Some(ProxyEnds::start(ctx, tb, &dir, port)?) } else { None };

    let mut src_cfg = base.netns(&tb.ns_src).args(["-name", "qb-src,debug-threads=on"]);
    src_cfg.name = "qb-src".into();
    let mut src = Qemu::spawn(src_cfg).context("spawning the source QEMU")?;
    let _src_reg = Registered::new(src.pid());
    src.wait_ready(qemu::BOOT_TIMEOUT).context("source guest boot")?;
    interrupted()?;
    let off = src.console_offset();
    let n = if r.dirty_target_mibps > 0 { cli.warmup_beats.max(2) } else { 2 };
    let beats = src.wait_heartbeats_after(off, n, Duration::from_secs(60 + 2 * n as u64))?;
    r.dirty_mibps_before = dirty_rate(&beats);
    src.check_healthy_after(0).context("source guest before migrating")?;

    // The same parameters for every transport, except what it needs.
    if multifd {
        src.qmp().migrate_set_capabilities(&[("multifd", true)])?;
    }
    let mut params = json!({ "max-bandwidth": cli.max_bandwidth });
    if multifd {
        params["multifd-channels"] = json!(cli.multifd_channels);
    }
    src.qmp().migrate_set_parameters(params)?;
    let p = src.qmp().query_migrate_parameters()?;
    r.max_bandwidth = p["max-bandwidth"].as_u64().unwrap_or(0);
    r.downtime_limit_ms = p["downtime-limit"].as_u64().unwrap_or(0);

    let wire0 = tx_bytes(&tb.ns_src, &tb.src_ifaces)?;
    let mut src_cpu = CpuWatch::new(src.pid());
    let mut dst_cpu = CpuWatch::new(dst.pid());
    let host0 = host_ticks();
    let mig_off = src.console_offset();
    let t0 = Instant::now();
    src.qmp().migrate(&uri).context("QMP migrate")?;
    let deadline = t0 + Duration::from_secs(cli.timeout_secs);
    let mut cancelled = false;
    let info = loop {
        let info = src.qmp().query_migrate()?;
        r.dirty_pages_rate_max = r.dirty_pages_rate_max.max(info["ram"]["dirty-pages-rate"].as_u64().unwrap_or(0));
        src_cpu.sample_threads();
        dst_cpu.sample_threads();
        if let Some("completed" | "failed" | "cancelled") = info["status"].as_str() {
            break info;
        }
        if Instant::now() >= deadline || SIGNALLED.load(Ordering::SeqCst) != 0 {
            eprintln!(
                "qemu-bench:   not done after {:.0} s (status {}, {} MiB remaining, {} syncs): cancelling",
                t0.elapsed().as_secs_f64(),
                info["status"],
                info["ram"]["remaining"].as_u64().unwrap_or(0) >> 20,
                info["ram"]["dirty-sync-count"]
            );
            r.ram_remaining_last = info["ram"]["remaining"].as_u64().unwrap_or(0);
            src.qmp().migrate_cancel()?;
            cancelled = true;
            let mut fin = src.qmp().wait_migration(CANCEL_TIMEOUT)?;
            // The cancelled reply has no ram section: keep the last live one.
            if fin.get("ram").is_none() {
                fin["ram"] = info["ram"].clone();
            }
            break fin;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    r.elapsed_s = t0.elapsed().as_secs_f64();
    let host1 = host_ticks();
    src_cpu.sample_threads();
    dst_cpu.sample_threads();
    let wire1 = tx_bytes(&tb.ns_src, &tb.src_ifaces)?;
    r.wire_bytes_per_link = wire1.iter().zip(&wire0).map(|(a, b)| a.saturating_sub(*b)).collect();
    r.wire_bytes = r.wire_bytes_per_link.iter().sum();

    r.status = info["status"].as_str().unwrap_or("?").to_string();
    r.converged = r.status == "completed" && !cancelled;
    let ram = &info["ram"];
    r.ram_transferred = ram["transferred"].as_u64().unwrap_or(0);
    r.ram_total = ram["total"].as_u64().unwrap_or(0);
    r.mbps = ram["mbps"].as_f64().unwrap_or(0.0);
    r.dirty_sync_count = ram["dirty-sync-count"].as_u64().unwrap_or(0);
    if r.converged {
        // QEMU 7.2 has been seen to answer a completed migration with
        // zero total time and downtime: no figure, not a zero one.
        let reported = info["total-time"].as_u64().filter(|&t| t > 0);
        if reported.is_none() {
            eprintln!("qemu-bench:   QEMU reported no total time for this run; its times are left out");
        }
        r.total_ms = reported;
        r.setup_ms = reported.and(info["setup-time"].as_u64());
        r.downtime_ms = reported.and(info["downtime"].as_u64());
        if let (Some(tt), Some(st)) = (r.total_ms, r.setup_ms) {
            r.transfer_s = Some(tt.saturating_sub(st) as f64 / 1000.0);
        }
    }
    if let Some(e) = info.get("error-desc").and_then(Value::as_str) {
        r.error = Some(e.to_string());
    }
    r.dirty_mibps_during = dirty_rate(&src.heartbeats_after(mig_off));
    eprintln!("qemu-bench:   {} wall={:.1}s", qemu::migration_summary(&info), r.elapsed_s);

    // Does the guest go on, intact, where it should run now?
    let check = if r.converged {
        r.runs_on = "destination".into();
        check_landed(&mut src, &mut dst, r.dirty_target_mibps > 0)
    } else {
        r.runs_on = "source".into();
        check_source_resumed(&mut src)
    };
    match check {
        Ok(note) => {
            r.intact = Some(true);
            r.intact_note = note;
        }
        Err(e) => {
            r.intact = Some(false);
            r.intact_note = format!("{e:#}");
        }
    }
    if t == Transport::Pmigrate {
        r.helper_report = Some(helper_report(&send_err, "send"));
    }
    let (proxy_src_s, proxy_dst_s) = proxies.as_ref().map_or((0.0, 0.0), ProxyEnds::cpu_secs);
    if let Some(p) = &proxies {
        r.helper_report = Some(p.report());
    }

    let tck = clk_tck();
    r.cpu = CpuUse {
        window_s: r.elapsed_s,
        src_threads: src_cpu.thread_secs(),
        dst_threads: dst_cpu.thread_secs(),
        src_helper_s: src_cpu.helper_secs() + proxy_src_s,
        dst_helper_s: dst_cpu.helper_secs() + proxy_dst_s,
        host_busy_s: host1.0.saturating_sub(host0.0) as f64 / tck,
        other_s: 0.0,
    };
    let ours: f64 = r.cpu.src_threads.values().chain(r.cpu.dst_threads.values()).sum::<f64>()
        + r.cpu.src_helper_s
        + r.cpu.dst_helper_s;
    r.cpu.other_s = (r.cpu.host_busy_s - ours).max(0.0);
    drop(dst);
    drop(src);
    Ok(())
}

/// `pmigrate proxy exit` in the destination's namespace and `entry` in the
/// source's, one stream per link and connection; killed when dropped.
struct ProxyEnds {
    entry: std::process::Child,
    exit: std::process::Child,
    logs: (PathBuf, PathBuf),
    cpu0: (u64, u64),
}

impl ProxyEnds {
    fn start(ctx: &Ctx, tb: &TestbedEnv, dir: &Path, port: u16) -> Result<ProxyEnds> {
        let pm = ctx.pmigrate.to_string_lossy().to_string();
        let logs = (dir.join("proxy-entry.log"), dir.join("proxy-exit.log"));
        let mut exit = Command::new("ip");
        exit.args(["netns", "exec", &tb.ns_dst, &pm, "proxy", "exit", "--psk-file", &ctx.key]);
        for a in &tb.dst_addrs {
            exit.args(["--listen", &format!("{a}:{port}")]);
        }
        exit.args(["--target", &format!("unix:{}", dir.join("dst.sock").display())]);
        let exit = exit.stdin(Stdio::null()).stderr(fs::File::create(&logs.1)?).spawn().context("proxy exit")?;
        let mut entry = Command::new("ip");
        entry.args(["netns", "exec", &tb.ns_src, &pm, "proxy", "entry", "--psk-file", &ctx.key]);
        entry.args(["--accept", &format!("unix:{}", dir.join("src.sock").display())]);
        entry.args(["--streams", &ctx.cli.streams.to_string(), "--via", &tb.src_addrs.join(",")]);
        entry.args(ctx.cli.send_args.split_whitespace());
        entry.args(tb.dst_addrs.iter().map(|a| format!("{a}:{port}")));
        let entry = entry.stdin(Stdio::null()).stderr(fs::File::create(&logs.0)?).spawn().context("proxy entry")?;
        let mut ends = ProxyEnds { entry, exit, logs, cpu0: (0, 0) };
        let deadline = Instant::now() + Duration::from_secs(20);
        for (log, what) in [(&ends.logs.1, "listening on"), (&ends.logs.0, "accepting on")] {
            while !fs::read_to_string(log).unwrap_or_default().contains(what) {
                if Instant::now() >= deadline {
                    bail!("pmigrate proxy did not start: {:?}", fs::read_to_string(log));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        ends.cpu0 = ends.ticks();
        Ok(ends)
    }

    /// CPU ticks (user + sys) of the entry and the exit so far.
    fn ticks(&self) -> (u64, u64) {
        // `ip netns exec` execs the command: the child's pid is the proxy's.
        let t = |c: &std::process::Child| read_stat(Path::new(&format!("/proc/{}/stat", c.id()))).map_or(0, |s| s.2);
        (t(&self.entry), t(&self.exit))
    }

    /// CPU seconds of the entry and the exit since they started listening.
    fn cpu_secs(&self) -> (f64, f64) {
        let (now, tck) = (self.ticks(), clk_tck());
        (now.0.saturating_sub(self.cpu0.0) as f64 / tck, now.1.saturating_sub(self.cpu0.1) as f64 / tck)
    }

    /// The entry's log lines about carried connections.
    fn report(&self) -> String {
        let text = fs::read_to_string(&self.logs.0).unwrap_or_default();
        text.lines().filter(|l| l.contains(": done:") || l.contains(": failed:")).collect::<Vec<_>>().join("\n")
    }
}

impl Drop for ProxyEnds {
    fn drop(&mut self) {
        for c in [&mut self.entry, &mut self.exit] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The destination runs the guest the source paused, and its workload goes
/// on from where the source left it without damage.
fn check_landed(src: &mut Qemu, dst: &mut Qemu, busy: bool) -> Result<String> {
    dst.qmp().wait_status("running", LAND_TIMEOUT).context("destination run state")?;
    let src_state = src.qmp().query_status()?;
    src.check_healthy_after(0).context("source guest before the switch-over")?;
    let last_src = src.heartbeats_after(0).last().cloned().ok_or_else(|| anyhow!("no source heartbeats"))?;
    let beats = dst.wait_heartbeats_after(0, 5, LAND_TIMEOUT).context("destination heartbeats")?;
    dst.check_healthy_after(0).context("destination guest after migrating")?;
    if dst.console_log().contains("PMW boot") {
        bail!("the destination booted a new guest");
    }
    let (first, last) = (&beats[0], &beats[beats.len() - 1]);
    if first.gen < last_src.gen || first.verified < last_src.verified {
        bail!("destination workload did not continue the source's: source {last_src:?}, destination {first:?}");
    }
    if last.verified <= first.verified || (busy && last.gen <= first.gen) {
        bail!("destination workload stalled: {first:?} .. {last:?}");
    }
    Ok(format!(
        "source {src_state}; destination ran {} heartbeats, {} pages verified, errors=0",
        beats.len(),
        last.verified - first.verified
    ))
}

/// After a cancelled (or failed) migration the source guest runs on intact.
fn check_source_resumed(src: &mut Qemu) -> Result<String> {
    src.qmp().wait_status("running", LAND_TIMEOUT).context("source run state after cancel")?;
    let off = src.console_offset();
    let beats = src.wait_heartbeats_after(off, 3, LAND_TIMEOUT).context("source heartbeats after cancel")?;
    src.check_healthy_after(0).context("source guest after cancel")?;
    Ok(format!("source resumed: {} heartbeats, errors=0", beats.len()))
}

/// The `--report` line of a helper (or its error), waiting up to 30 s.
fn helper_report(path: &Path, role: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = fs::read_to_string(path).unwrap_or_default();
        let prefix = format!("pmigrate {role}: ");
        if let Some(l) = text
            .lines()
            .find(|l| (l.starts_with(&prefix) && l.contains(" bytes in ")) || l.starts_with("pmigrate: error:"))
        {
            return l.to_string();
        }
        if Instant::now() >= deadline {
            return format!("(no report) {}", text.trim());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Ratios against QEMU `tcp:` on the fewest links, per dirty rate.
fn fill_ratios(runs: &mut [RunResult]) -> String {
    let Some(base_links) = runs.iter().filter(|r| r.transport == "tcp").map(|r| r.links).min() else {
        return "none (no tcp runs)".into();
    };
    let mut base: HashMap<u64, (Option<f64>, Option<f64>)> = HashMap::new();
    let rates: Vec<u64> = runs.iter().map(|r| r.dirty_target_mibps).collect();
    for d in rates {
        let b: Vec<&RunResult> = runs
            .iter()
            .filter(|r| r.transport == "tcp" && r.links == base_links && r.dirty_target_mibps == d)
            .collect();
        let mean = |f: &dyn Fn(&RunResult) -> Option<f64>| -> Option<f64> {
            let v: Vec<f64> = b.iter().filter(|r| r.converged).filter_map(|r| f(r)).collect();
            (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
        };
        base.insert(d, (mean(&|r| r.transfer_s), mean(&|r| r.downtime_ms.map(|x| x as f64))));
    }
    for r in runs.iter_mut() {
        let (bt, bd) = base.get(&r.dirty_target_mibps).copied().unwrap_or((None, None));
        r.transfer_ratio = match (r.transfer_s, bt) {
            (Some(x), Some(b)) if b > 0.0 => Some(x / b),
            _ => None,
        };
        r.downtime_ratio = match (r.downtime_ms, bd) {
            (Some(x), Some(b)) if b > 0.0 => Some(x as f64 / b),
            _ => None,
        };
    }
    format!("QEMU tcp: on {base_links} link(s), same dirty rate, mean of its converged runs")
}

// ---------------------------------------------------------------- output

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map(|x| format!("{x:.prec$}")).unwrap_or_else(|| "-".into())
}

fn yes_no(b: Option<bool>) -> &'static str {
    match b {
        Some(true) => "yes",
        Some(false) => "NO",
        None => "-",
    }
}

fn table(rep: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\nraw TCP ceiling (iperf3, one stream per link):");
    for c in &rep.ceilings {
        let _ = writeln!(
            s,
            "  {} link(s) at {}: aggregate {} Gbit/s; alone {:?}; together {:?}{}",
            c.links,
            c.rate,
            opt(c.aggregate_gbit, 3),
            c.alone_gbit,
            c.together_gbit,
            c.error.as_ref().map(|e| format!(" error: {e}")).unwrap_or_default()
        );
    }
    let _ = writeln!(s, "\nratios against {}", rep.baseline);
    let _ = writeln!(
        s,
        "{:<9} {:>5} {:>11} {:>8} {:>10} {:>9} {:>8} {:>9} {:>7} {:>9} {:>9}",
        "transport",
        "links",
        "dirty MiB/s",
        "total s",
        "transfer s",
        "downtime",
        "GiB wire",
        "converged",
        "intact",
        "xfer/tcp1",
        "down/tcp1"
    );
    for r in &rep.runs {
        let dirty = format!("{}/{}", r.dirty_target_mibps, opt(r.dirty_mibps_before, 0));
        let _ = writeln!(
            s,
            "{:<9} {:>5} {:>11} {:>8} {:>10} {:>9} {:>8.2} {:>9} {:>7} {:>9} {:>9}",
            r.transport,
            r.links,
            dirty,
            r.total_ms.map(|t| format!("{:.2}", t as f64 / 1000.0)).unwrap_or_else(|| format!(">{:.0}", r.elapsed_s)),
            opt(r.transfer_s, 2),
            r.downtime_ms.map(|d| format!("{d} ms")).unwrap_or_else(|| "-".into()),
            r.wire_bytes as f64 / (1u64 << 30) as f64,
            if r.converged { "yes" } else { "no" },
            yes_no(r.intact),
            opt(r.transfer_ratio, 2),
            opt(r.downtime_ratio, 2),
        );
    }
    let _ = writeln!(s, "\nwhere the time went (CPU as % of one core over the migration window):");
    let _ = writeln!(
        s,
        "{:<9} {:>5} {:>5} {:>6} {:>7} {:>6} {:>5} {:>5} {:>7} {:>7} {:>5} {:>6} {:>6} {:>6} {:>6}  per-link GiB",
        "transport",
        "links",
        "dirty",
        "status",
        "MiB/s",
        "syncs",
        "vCPU",
        "mig",
        "s-mfd",
        "s-main",
        "d-main",
        "d-mfd",
        "helpr",
        "host",
        "other"
    );
    for r in &rep.runs {
        let w = r.cpu.window_s.max(1e-3);
        let pct = |v: f64| format!("{:.0}", 100.0 * v / w);
        let th = |m: &BTreeMap<String, f64>, k: &str| pct(m.get(k).copied().unwrap_or(0.0));
        let secs = r.transfer_s.unwrap_or(r.elapsed_s);
        let mibs = if secs > 0.0 { r.wire_bytes as f64 / (1 << 20) as f64 / secs } else { 0.0 };
        let per_link: Vec<String> =
            r.wire_bytes_per_link.iter().map(|b| format!("{:.2}", *b as f64 / (1u64 << 30) as f64)).collect();
        let _ = writeln!(
            s,
            "{:<9} {:>5} {:>5} {:>6} {:>7.0} {:>6} {:>5} {:>5} {:>7} {:>7} {:>5} {:>6} {:>6} {:>6} {:>6}  {}",
            r.transport,
            r.links,
            r.dirty_target_mibps,
            if r.converged { "done" } else { "n/c" },
            mibs,
            r.dirty_sync_count,
            th(&r.cpu.src_threads, "vcpu"),
            th(&r.cpu.src_threads, "migration"),
            th(&r.cpu.src_threads, "multifd-send"),
            th(&r.cpu.src_threads, "main"),
            th(&r.cpu.dst_threads, "main"),
            th(&r.cpu.dst_threads, "multifd-recv"),
            pct(r.cpu.src_helper_s + r.cpu.dst_helper_s),
            pct(r.cpu.host_busy_s),
            pct(r.cpu.other_s),
            per_link.join(" ")
        );
    }
    let _ = writeln!(
        s,
        "(MiB/s: bytes on the links / transfer time, or / wall time if not converged; vCPU, mig, s-mfd, s-main:\n \
         source QEMU's vCPU, migration, multifd and main threads; d-main, d-mfd: destination's; helpr: pmigrate\n \
         send+recv; host: all CPUs busy (200 = both cores); other: host busy time not in the QEMUs or helpers)"
    );
    for r in rep.runs.iter().filter(|r| r.error.is_some() || r.intact == Some(false)) {
        let _ = writeln!(
            s,
            "note {} k={} dirty={} run {}: {} {}",
            r.transport,
            r.links,
            r.dirty_target_mibps,
            r.run,
            r.error.as_deref().unwrap_or(""),
            if r.intact == Some(false) { &r.intact_note } else { "" }
        );
    }
    s
}

fn host_info() -> Value {
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let qemu_version = Command::new(qemu::QEMU_BIN)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").to_string())
        .unwrap_or_default();
    json!({ "cpus": cpus, "loadavg_at_start": load.trim(), "qemu": qemu_version })
}

fn save(rep: &Report, path: Option<&Path>) {
    if let Some(p) = path {
        if let Err(e) = serde_json::to_string_pretty(rep).map_err(anyhow::Error::from).and_then(|t| {
            fs::write(p, t)?;
            Ok(())
        }) {
            eprintln!("qemu-bench: saving {}: {e:#}", p.display());
        }
    }
}

// ------------------------------------------------------------------ main

fn real_main() -> Result<Report> {
    let cli = Cli::parse();
    // SAFETY: geteuid takes no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("qemu-bench must run as root (network namespaces)");
    }
    if let Some(why) = qemu::qemu_skip_reason() {
        bail!("cannot run: {why}");
    }
    if cli.links.is_empty() || cli.dirty_mib_s.is_empty() || cli.transports.is_empty() || cli.runs == 0 {
        bail!("nothing to run");
    }
    let pmigrate = match &cli.pmigrate {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.parent().ok_or_else(|| anyhow!("no exe dir"))?.join("pmigrate"),
    };
    if (cli.transports.contains(&Transport::Pmigrate) || cli.transports.contains(&Transport::Proxy))
        && !pmigrate.is_file()
    {
        bail!("{} not found: run `cargo build --release -p pmigrate-tools` or pass --pmigrate", pmigrate.display());
    }
    let pmigrate = fs::canonicalize(&pmigrate).unwrap_or(pmigrate);
    qemu::guest_image()?;
    let script = qemu::repo_root().join("tools/testbed.sh");
    if !script.is_file() {
        bail!("{} not found", script.display());
    }
    let scratch = std::env::temp_dir().join(format!("qemu-bench-{}", std::process::id()));
    fs::create_dir_all(&scratch)?;
    install_signal_handlers(script.clone(), cli.keep_testbed);
    let testbed = Testbed { script, keep: cli.keep_testbed };

    let total = cli.links.len() * cli.dirty_mib_s.len() * cli.transports.len() * cli.runs as usize;
    eprintln!(
        "qemu-bench: {total} migrations: links {:?} at {}, guest {} with {} MiB working set, dirty {:?} MiB/s, \
         transports {:?}, timeout {} s; helper logs in {}",
        cli.links,
        cli.rate,
        cli.mem,
        cli.ws_mib,
        cli.dirty_mib_s,
        cli.transports,
        cli.timeout_secs,
        scratch.display()
    );
    let mut rep = Report {
        config: cli.clone(),
        host: host_info(),
        ceilings: Vec::new(),
        runs: Vec::new(),
        baseline: String::new(),
    };
    // The helpers authenticate each other, as deployed.
    let key = scratch.join("migration.key");
    pmigrate::Psk::write_new_file(&key)?;
    let key = key.to_string_lossy().into_owned();
    let mut ctx = Ctx { cli: cli.clone(), pmigrate, scratch: scratch.clone(), port: BASE_PORT, key };
    let started = Instant::now();
    let mut i = 0;
    for &k in &cli.links {
        interrupted()?;
        let tb = testbed.up(k, &cli.rate)?;
        if cli.ceiling_secs > 0 {
            let c = testbed.ceiling(k, &cli.rate, cli.ceiling_secs);
            eprintln!("qemu-bench: ceiling over {k} link(s): {} Gbit/s", opt(c.aggregate_gbit, 3));
            if let Some(e) = &c.error {
                eprintln!("qemu-bench: ceiling failed: {e}");
            }
            rep.ceilings.push(c);
        }
        for &d in &cli.dirty_mib_s {
            for &t in &cli.transports {
                for run in 1..=cli.runs {
                    interrupted()?;
                    i += 1;
                    eprintln!(
                        "qemu-bench: [{i}/{total}] {} over {k} link(s), dirty {d} MiB/s, run {run} ({:.0} s so far)",
                        t.name(),
                        started.elapsed().as_secs_f64()
                    );
                    let mut r = RunResult {
                        transport: t.name().into(),
                        links: k,
                        dirty_target_mibps: d,
                        run,
                        ..Default::default()
                    };
                    if let Err(e) = run_one(&mut ctx, &tb, &mut r, t) {
                        eprintln!("qemu-bench:   run failed: {e:#}");
                        r.error = Some(format!("{e:#}"));
                        if r.status.is_empty() {
                            r.status = "error".into();
                        }
                    }
                    eprintln!(
                        "qemu-bench:   converged={} transfer={} s downtime={} ms wire={:.2} GiB intact={} ({})",
                        r.converged,
                        opt(r.transfer_s, 2),
                        r.downtime_ms.map(|d| d.to_string()).unwrap_or_else(|| "-".into()),
                        r.wire_bytes as f64 / (1u64 << 30) as f64,
                        yes_no(r.intact),
                        r.intact_note
                    );
                    rep.runs.push(r);
                    rep.baseline = fill_ratios(&mut rep.runs);
                    save(&rep, cli.save.as_deref());
                }
            }
        }
    }
    eprintln!("qemu-bench: all runs done in {:.0} s", started.elapsed().as_secs_f64());
    drop(testbed);
    if std::env::var_os("PMIGRATE_KEEP_VM_LOGS").is_none() {
        let _ = fs::remove_dir_all(&scratch);
    }
    Ok(rep)
}

fn main() -> ExitCode {
    match real_main() {
        Ok(rep) => {
            if rep.config.json {
                match serde_json::to_string_pretty(&rep) {
                    Ok(t) => println!("{t}"),
                    Err(e) => {
                        eprintln!("qemu-bench: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                print!("{}", table(&rep));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("qemu-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
