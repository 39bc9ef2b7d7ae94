//! Test support: build the test guest, run it under QEMU, talk QMP to it and
//! read its serial console.
//!
//! Include it from an integration test with
//! `#[path = "support/qemu.rs"] mod qemu;`.
//!
//! The guest (see `tests/guest/`) is a Debian cloud kernel plus an initramfs
//! whose workload keeps a working set of self-verifying pages and prints
//! `PMW ok t=<s> gen=<writes> verified=<pages> errors=0` heartbeats on the
//! console (ttyS0) once a second, and `PMW CORRUPT page=...` on damage.
//!
//! QEMU is always run with `-accel tcg` (the host's /dev/kvm cannot boot a
//! stock kernel).  Guest RAM sizes must NOT be a multiple of 256 KiB: QEMU 7.2
//! under TCG loses guest writes during live migration in that case (a 2 GiB
//! guest panics on the destination), so [`VmConfig`] refuses such sizes
//! unless told otherwise.  Use e.g. `262272K` (256 MiB + 128 KiB) or
//! `2097280K` (2 GiB + 128 KiB).
#![allow(dead_code)]

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

/// The QEMU binary the tests use.
pub const QEMU_BIN: &str = "qemu-system-x86_64";
/// Default guest RAM: 256 MiB + 128 KiB (not a multiple of 256 KiB, see module docs).
pub const DEFAULT_MEM: &str = "262272K";
/// How long to wait for QEMU's QMP socket to accept connections.
pub const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// Generous default for "guest booted and workload filled its working set"
/// on a loaded 2-core machine under TCG.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

// ------------------------------------------------------------------ image

/// Paths of the built test guest.
#[derive(Clone, Debug)]
pub struct GuestImage {
    /// The kernel (`vmlinuz`).
    pub kernel: PathBuf,
    /// The initramfs (`initramfs.cpio.gz`).
    pub initrd: PathBuf,
}

/// The repository root (the root package's manifest directory).
pub fn repo_root() -> PathBuf {
    // Included from tests of the root package and of workspace members:
    // walk up from the including package to the repository root.
    let start = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    start.ancestors().find(|d| d.join("tests/guest/build.sh").is_file()).map(PathBuf::from).unwrap_or(start)
}

/// Where `tests/guest/build.sh` puts its outputs.
pub fn guest_dir() -> PathBuf {
    match std::env::var_os("PMIGRATE_GUEST_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => repo_root().join("tests/guest/out"),
    }
}

/// Builds the test guest (once per process; `build.sh` itself caches across
/// processes) and returns its paths.
pub fn guest_image() -> Result<GuestImage> {
    static IMAGE: OnceLock<std::result::Result<GuestImage, String>> = OnceLock::new();
    IMAGE
        .get_or_init(|| build_guest_image().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!("building the test guest failed: {e}"))
}

fn build_guest_image() -> Result<GuestImage> {
    let script = repo_root().join("tests/guest/build.sh");
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}):\n{}{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let dir = guest_dir();
    let image = GuestImage { kernel: dir.join("vmlinuz"), initrd: dir.join("initramfs.cpio.gz") };
    for p in [&image.kernel, &image.initrd] {
        if !p.is_file() {
            bail!("{} did not produce {}", script.display(), p.display());
        }
    }
    let took = started.elapsed();
    if took > Duration::from_secs(2) {
        eprintln!("qemu support: built test guest in {:.1} s", took.as_secs_f64());
    }
    Ok(image)
}

/// Whether `qemu-system-x86_64` is on PATH.
pub fn qemu_available() -> bool {
    find_in_path(QEMU_BIN).is_some()
}

/// `None` when QEMU tests can run, else the reason to print when skipping.
pub fn qemu_skip_reason() -> Option<String> {
    if !cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        return Some("QEMU guest tests need an x86_64 Linux host".into());
    }
    if !qemu_available() {
        return Some(format!("{QEMU_BIN} not found on PATH (apt-get install qemu-system-x86 busybox-static cpio)"));
    }
    None
}

/// Prints a skip message and returns `true` when QEMU tests cannot run:
/// `if qemu::skip_without_qemu("my_test") { return; }`.
pub fn skip_without_qemu(test: &str) -> bool {
    match qemu_skip_reason() {
        Some(reason) => {
            eprintln!("SKIPPED {test}: {reason}");
            true
        }
        None => false,
    }
}

fn find_in_path(bin: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(bin))
        .find(|p| fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false))
}

/// A free TCP port on 127.0.0.1 (for `tcp:` migration URIs).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Parses a QEMU `-m` size (`262272K`, `256M`, `2G`, bare number = MiB) into bytes.
pub fn parse_mem_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'B' => 1,
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => bail!("bad memory size suffix in {s:?}"),
            };
            (&s[..i], m)
        }
        _ => (s, 1u64 << 20),
    };
    let n: u64 = num.parse().with_context(|| format!("bad memory size {s:?}"))?;
    n.checked_mul(mult).ok_or_else(|| anyhow!("memory size {s:?} overflows"))
}

// ----------------------------------------------------------------- config

/// How to run one test VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Name (QEMU `-name`, temp dir and log prefixes).
    pub name: String,
    /// Guest RAM as given to `-m`, e.g. `262272K`.
    pub mem: String,
    /// Allow a RAM size that is a multiple of 256 KiB (known-broken migration
    /// under QEMU 7.2 TCG; only for tests that want to see that breakage).
    pub allow_aligned_mem: bool,
    /// Workload working set in MiB (`pmw.mb`).
    pub working_set_mib: u64,
    /// Workload dirtying rate in MiB/s (`pmw.rate`); 0 = idle (verify only).
    pub dirty_rate_mibps: u64,
    /// Percentage of writes going to the hot 20 % of pages (`pmw.hot`).
    pub hot_percent: Option<u64>,
    /// Speed of the background verification sweep in MiB/s (`pmw.verify`).
    pub verify_mibps: Option<u64>,
    /// Self-test: damage 3 pages this many seconds after the workload starts
    /// (`pmw.inject`); the console must then show exactly 3 `PMW CORRUPT`.
    pub inject_after_s: Option<u64>,
    /// Extra kernel command-line words.
    pub extra_append: Vec<String>,
    /// Extra QEMU arguments, e.g. `["-incoming", "defer"]`.
    pub extra_args: Vec<String>,
    /// A command QEMU is started under, e.g. `["ip", "netns", "exec", "pm-src"]`
    /// (empty: QEMU is started directly).  The prefix must `exec` QEMU (as
    /// `ip netns exec`, `nice`, `taskset` do), so that the spawned process
    /// is QEMU itself: [`Qemu::pid`], kill on drop and `PR_SET_PDEATHSIG`
    /// then apply to QEMU.
    pub command_prefix: Vec<String>,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            name: "vm".into(),
            mem: DEFAULT_MEM.into(),
            allow_aligned_mem: false,
            working_set_mib: 64,
            dirty_rate_mibps: 0,
            hot_percent: None,
            verify_mibps: None,
            inject_after_s: None,
            extra_append: Vec::new(),
            extra_args: Vec::new(),
            command_prefix: Vec::new(),
        }
    }
}

impl VmConfig {
    /// Default configuration with the given name.
    pub fn new(name: &str) -> Self {
        VmConfig { name: name.into(), ..Default::default() }
    }
    /// Sets the guest RAM (`-m`), e.g. `"2097280K"`.
    pub fn mem(mut self, mem: &str) -> Self {
        self.mem = mem.into();
        self
    }
    /// Sets the workload working set in MiB.
    pub fn working_set_mib(mut self, mib: u64) -> Self {
        self.working_set_mib = mib;
        self
    }
    /// Sets the workload dirtying rate in MiB/s (0 = idle).
    pub fn dirty_rate_mibps(mut self, mibps: u64) -> Self {
        self.dirty_rate_mibps = mibps;
        self
    }
    /// Sets the share of writes to the hot 20 % of pages.
    pub fn hot_percent(mut self, pct: u64) -> Self {
        self.hot_percent = Some(pct);
        self
    }
    /// Sets the background verification sweep speed.
    pub fn verify_mibps(mut self, mibps: u64) -> Self {
        self.verify_mibps = Some(mibps);
        self
    }
    /// Self-test of the checker: inject damage after `secs`.
    pub fn inject_after_s(mut self, secs: u64) -> Self {
        self.inject_after_s = Some(secs);
        self
    }
    /// Appends one QEMU argument.
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.extra_args.push(a.into());
        self
    }
    /// Appends QEMU arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.extra_args.extend(args.into_iter().map(Into::into));
        self
    }
    /// Makes this VM a migration destination: `-incoming <uri>`
    /// (`defer`, `tcp:127.0.0.1:PORT`, `exec:pmigrate recv ...`).
    pub fn incoming(self, uri: &str) -> Self {
        self.arg("-incoming").arg(uri)
    }
    /// Appends a kernel command-line word.
    pub fn append(mut self, word: impl Into<String>) -> Self {
        self.extra_append.push(word.into());
        self
    }
    /// Starts QEMU under a command prefix that execs it, e.g.
    /// `["taskset", "-c", "1"]` (see [`VmConfig::command_prefix`]).
    pub fn command_prefix<I, S>(mut self, prefix: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.command_prefix = prefix.into_iter().map(Into::into).collect();
        self
    }
    /// Starts QEMU inside the network namespace `ns` (`ip netns exec NS`,
    /// needs root).  Its sockets, and those of the `exec:` helpers it
    /// starts, live in `ns`; its QMP socket and console log are files, so
    /// they stay reachable from outside.
    pub fn netns(self, ns: &str) -> Self {
        self.command_prefix(["ip", "netns", "exec", ns])
    }
    /// Allows a 256 KiB-aligned RAM size (see [`VmConfig::allow_aligned_mem`]).
    pub fn allow_aligned_mem(mut self) -> Self {
        self.allow_aligned_mem = true;
        self
    }

    /// The kernel command line.
    pub fn kernel_cmdline(&self) -> String {
        let mut s =
            format!("console=ttyS0 quiet panic=-1 pmw.mb={} pmw.rate={}", self.working_set_mib, self.dirty_rate_mibps);
        if let Some(h) = self.hot_percent {
            s += &format!(" pmw.hot={h}");
        }
        if let Some(v) = self.verify_mibps {
            s += &format!(" pmw.verify={v}");
        }
        if let Some(i) = self.inject_after_s {
            s += &format!(" pmw.inject={i}");
        }
        for w in &self.extra_append {
            s.push(' ');
            s += w;
        }
        s
    }

    fn check(&self) -> Result<()> {
        let bytes = parse_mem_size(&self.mem)?;
        if bytes % (256 << 10) == 0 && !self.allow_aligned_mem {
            bail!(
                "guest RAM {} is a multiple of 256 KiB: QEMU 7.2 TCG migration loses guest writes \
                 with such sizes; add 128K (e.g. 262272K, 2097280K) or call allow_aligned_mem()",
                self.mem
            );
        }
        let ws = self.working_set_mib << 20;
        if ws + (48 << 20) > bytes {
            bail!(
                "working set {} MiB does not fit in guest RAM {} (leave ~48 MiB for the kernel)",
                self.working_set_mib,
                self.mem
            );
        }
        Ok(())
    }
}

// -------------------------------------------------------------------- VM

/// One parsed workload heartbeat line.
#[derive(Clone, Debug, PartialEq)]
pub struct Heartbeat {
    /// `true` for `PMW ok`, `false` for `PMW err` (errors > 0).
    pub ok: bool,
    /// Seconds since the workload started (guest CLOCK_MONOTONIC).
    pub t: f64,
    /// Total page rewrites so far.
    pub gen: u64,
    /// Total page verifications so far.
    pub verified: u64,
    /// Corruptions detected so far.
    pub errors: u64,
}

/// Parses one console line as a heartbeat.
pub fn parse_heartbeat(line: &str) -> Option<Heartbeat> {
    let line = line.trim_end_matches('\r');
    let pos = line.find("PMW ok ").or_else(|| line.find("PMW err "))?;
    let rest = &line[pos..];
    let ok = rest.starts_with("PMW ok ");
    let (mut t, mut gen, mut verified, mut errors) = (None, None, None, None);
    for field in rest.split_whitespace().skip(2) {
        let (k, v) = field.split_once('=')?;
        match k {
            "t" => t = v.parse().ok(),
            "gen" => gen = v.parse().ok(),
            "verified" => verified = v.parse().ok(),
            "errors" => errors = v.parse().ok(),
            _ => {}
        }
    }
    Some(Heartbeat { ok, t: t?, gen: gen?, verified: verified?, errors: errors? })
}

/// Whether a console line reports guest damage: workload corruption, a
/// workload failure, or a kernel oops/panic.
pub fn is_corruption_line(line: &str) -> bool {
    ["PMW CORRUPT", "PMW err ", "PMW FATAL", "Kernel panic", "BUG:", "Oops:", "general protection fault"]
        .iter()
        .any(|p| line.contains(p))
}

static VM_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A running QEMU with the test guest.  Killed (and its temp dir removed)
/// on drop; the temp dir is kept when the thread is panicking or
/// `PMIGRATE_KEEP_VM_LOGS` is set, and its path printed.
///
/// QEMU gets `PR_SET_PDEATHSIG(SIGKILL)`, so it dies with the *thread* that
/// spawned it: create and drop a `Qemu` on the same thread.
pub struct Qemu {
    /// The configuration it was started with.
    pub config: VmConfig,
    /// Its temp dir (console log, QMP socket, QEMU's stderr).
    pub dir: PathBuf,
    /// Serial console log file.
    pub log_path: PathBuf,
    /// QMP socket path.
    pub qmp_path: PathBuf,
    /// When it was spawned.
    pub started: Instant,
    child: Child,
    qmp: Qmp,
}

impl Qemu {
    /// Spawns QEMU for `config` and connects QMP.  Does not wait for the
    /// guest to boot: see [`Qemu::wait_ready`].
    pub fn spawn(config: VmConfig) -> Result<Qemu> {
        config.check()?;
        let image = guest_image()?;
        let n = VM_COUNTER.fetch_add(1, Ordering::Relaxed);
        let safe_name: String = config
            .name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
            .take(24)
            .collect();
        let dir = std::env::temp_dir().join(format!("pmwq-{}-{}-{}", std::process::id(), n, safe_name));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let log_path = dir.join("console.log");
        let qmp_path = dir.join("qmp.sock");
        if qmp_path.as_os_str().len() >= 100 {
            bail!("QMP socket path too long for a unix socket: {} (set TMPDIR shorter)", qmp_path.display());
        }
        for p in [&dir, &image.kernel, &image.initrd] {
            if p.to_string_lossy().contains(',') {
                bail!("path {} contains ',' which QEMU options cannot take", p.display());
            }
        }

        let mut cmd = match config.command_prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(QEMU_BIN);
                c
            }
            None => Command::new(QEMU_BIN),
        };
        cmd.args(["-name", &config.name])
            .args(["-accel", "tcg"])
            .args(["-nographic", "-nodefaults", "-no-user-config", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", log_path.display()))
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&image.initrd)
            .arg("-append")
            .arg(config.kernel_cmdline())
            .args(["-m", &config.mem])
            .args(["-smp", "1"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .args(&config.extra_args)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(fs::File::create(dir.join("qemu.stdout"))?)
            .stderr(fs::File::create(dir.join("qemu.stderr"))?);
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: the closure runs in the forked child before exec and
            // only calls prctl(2), which is async-signal-safe.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
                    Ok(())
                });
            }
        }
        fs::write(dir.join("cmdline"), format!("{cmd:?}\n"))?;
        let started = Instant::now();
        let mut child = cmd.spawn().with_context(|| match config.command_prefix.first() {
            Some(first) => format!("spawning {QEMU_BIN} under {first}"),
            None => format!("spawning {QEMU_BIN}"),
        })?;

        let qmp = match Qmp::connect_while(&qmp_path, QMP_CONNECT_TIMEOUT, || match child.try_wait() {
            Ok(Some(st)) => Err(anyhow!("QEMU exited ({st}) before QMP came up")),
            _ => Ok(()),
        }) {
            Ok(q) => q,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                let stderr = fs::read_to_string(dir.join("qemu.stderr")).unwrap_or_default();
                return Err(e.context(format!("VM {}: QEMU stderr:\n{stderr}", config.name)));
            }
        };
        Ok(Qemu { config, dir, log_path, qmp_path, started, child, qmp })
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The QMP connection.
    pub fn qmp(&mut self) -> &mut Qmp {
        &mut self.qmp
    }

    /// `Some(status)` if QEMU has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// QEMU's stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(self.dir.join("qemu.stderr")).unwrap_or_default()
    }

    /// The whole serial console log so far (lossy UTF-8).
    pub fn console_log(&self) -> String {
        fs::read(&self.log_path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// Current length in bytes of the console log: an offset for the `*_after` helpers.
    pub fn console_offset(&self) -> usize {
        fs::metadata(&self.log_path).map(|m| m.len() as usize).unwrap_or(0)
    }

    /// The console log from byte `offset` on.
    pub fn console_after(&self, offset: usize) -> String {
        let b = fs::read(&self.log_path).unwrap_or_default();
        String::from_utf8_lossy(b.get(offset..).unwrap_or(&[])).into_owned()
    }

    /// The last `n` console lines, for error messages.
    pub fn console_tail(&self, n: usize) -> String {
        let log = self.console_log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Waits until a console line contains `pattern`; returns that line.
    pub fn wait_console(&mut self, pattern: &str, timeout: Duration) -> Result<String> {
        self.wait_console_after(0, pattern, timeout)
    }

    /// Like [`Qemu::wait_console`], looking only at output after byte `offset`.
    pub fn wait_console_after(&mut self, offset: usize, pattern: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            // Check exit first, then read: output written before exit is seen.
            let exited = self.exited();
            let text = self.console_after(offset);
            // Only whole lines: the last one may still be being written.
            let complete = match text.rfind('\n') {
                Some(i) => &text[..i],
                None => "",
            };
            if let Some(line) = complete.lines().find(|l| l.contains(pattern)) {
                return Ok(line.trim_end_matches('\r').to_string());
            }
            if let Some(st) = exited {
                if let Some(line) = text.lines().find(|l| l.contains(pattern)) {
                    return Ok(line.trim_end_matches('\r').to_string());
                }
                bail!(
                    "VM {}: QEMU exited ({st}) while waiting for {pattern:?} on the console\n\
                     stderr: {}\nconsole tail:\n{}",
                    self.name(),
                    self.stderr(),
                    self.console_tail(40)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "VM {}: no console line containing {pattern:?} within {:.0} s\nconsole tail:\n{}",
                    self.name(),
                    timeout.as_secs_f64(),
                    self.console_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until the workload has filled its working set (`PMW ready`).
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        self.wait_console("PMW ready", timeout).map(|_| ())
    }

    /// All heartbeats printed after byte `offset` of the console log.
    pub fn heartbeats_after(&self, offset: usize) -> Vec<Heartbeat> {
        self.console_after(offset).lines().filter_map(parse_heartbeat).collect()
    }

    /// Waits until at least `n` heartbeats have been printed after `offset`; returns them.
    pub fn wait_heartbeats_after(&mut self, offset: usize, n: usize, timeout: Duration) -> Result<Vec<Heartbeat>> {
        let deadline = Instant::now() + timeout;
        loop {
            let exited = self.exited();
            let beats = self.heartbeats_after(offset);
            if beats.len() >= n {
                return Ok(beats);
            }
            if self.corruption_seen() {
                bail!(
                    "VM {}: corruption while waiting for heartbeats:\n{}",
                    self.name(),
                    self.corruption_lines().join("\n")
                );
            }
            if let Some(st) = exited {
                bail!(
                    "VM {}: QEMU exited ({st}) after {} of {n} heartbeats\nconsole tail:\n{}",
                    self.name(),
                    beats.len(),
                    self.console_tail(40)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "VM {}: only {} of {n} heartbeats within {:.0} s\nconsole tail:\n{}",
                    self.name(),
                    beats.len(),
                    timeout.as_secs_f64(),
                    self.console_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Console lines that report damage (see [`is_corruption_line`]).
    pub fn corruption_lines(&self) -> Vec<String> {
        self.console_log().lines().filter(|l| is_corruption_line(l)).map(|l| l.to_string()).collect()
    }

    /// Whether the console shows any `PMW CORRUPT`/`PMW err`/`PMW FATAL`
    /// line, a kernel panic, `BUG:` or an oops.
    pub fn corruption_seen(&self) -> bool {
        self.console_log().lines().any(is_corruption_line)
    }

    /// Errors unless the console is free of damage reports and every
    /// heartbeat after `offset` has errors=0.
    pub fn check_healthy_after(&self, offset: usize) -> Result<()> {
        let bad = self.corruption_lines();
        if !bad.is_empty() {
            bail!("VM {}: guest reports damage:\n{}", self.name(), bad.join("\n"));
        }
        if let Some(b) = self.heartbeats_after(offset).iter().find(|b| b.errors != 0 || !b.ok) {
            bail!("VM {}: heartbeat with errors: {b:?}", self.name());
        }
        Ok(())
    }

    /// Sends `quit` and waits (up to `timeout`) for QEMU to exit.
    pub fn quit(&mut self, timeout: Duration) -> Result<()> {
        // QEMU may close the socket before answering.
        let _ = self.qmp.execute("quit", Value::Null);
        let deadline = Instant::now() + timeout;
        while self.exited().is_none() {
            if Instant::now() >= deadline {
                bail!("VM {}: QEMU did not exit within {:?} after quit", self.name(), timeout);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() || std::env::var_os("PMIGRATE_KEEP_VM_LOGS").is_some() {
            eprintln!("qemu support: VM {} logs kept in {}", self.config.name, self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

// -------------------------------------------------------------------- QMP

// The one QMP client, shared with the CLI's `pmigrate qemu`; the tests'
// conveniences on top of it follow.
#[path = "../../tools/src/qmp.rs"]
mod qmp;
pub use qmp::Qmp;

impl Qmp {
    /// `query-status`: the run state, e.g. `running`, `inmigrate`, `postmigrate`, `paused`.
    pub fn query_status(&mut self) -> Result<String> {
        let r = self.execute("query-status", Value::Null)?;
        r["status"].as_str().map(str::to_string).ok_or_else(|| anyhow!("bad query-status reply {r}"))
    }

    /// Polls `query-status` until it is `status`.
    pub fn wait_status(&mut self, status: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.query_status()?;
            if s == status {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("run state is {s:?}, not {status:?}, after {:.0} s", timeout.as_secs_f64());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `migrate` to `uri` (returns at once; see [`Qmp::wait_migration`]).
    pub fn migrate(&mut self, uri: &str) -> Result<()> {
        self.execute("migrate", json!({ "uri": uri })).map(|_| ())
    }

    /// `migrate-incoming` on a VM started with `-incoming defer`.
    pub fn migrate_incoming(&mut self, uri: &str) -> Result<()> {
        self.execute("migrate-incoming", json!({ "uri": uri })).map(|_| ())
    }

    /// `migrate_cancel`.
    pub fn migrate_cancel(&mut self) -> Result<()> {
        self.execute("migrate_cancel", Value::Null).map(|_| ())
    }

    /// `query-migrate`, as returned.
    pub fn query_migrate(&mut self) -> Result<Value> {
        self.execute("query-migrate", Value::Null)
    }

    /// Polls `query-migrate` until the status is `completed`, `failed` or
    /// `cancelled`, and returns that final reply (status, total-time,
    /// downtime, setup-time, ram, error-desc...) whichever it is.  Errors
    /// only on timeout.
    pub fn wait_migration(&mut self, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.query_migrate()?;
            if let Some("completed" | "failed" | "cancelled") = info["status"].as_str() {
                return Ok(info);
            }
            if Instant::now() >= deadline {
                bail!("migration not finished after {:.0} s; last query-migrate: {info}", timeout.as_secs_f64());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `migrate-set-capabilities` from `(name, state)` pairs.
    pub fn migrate_set_capabilities(&mut self, caps: &[(&str, bool)]) -> Result<()> {
        let list: Vec<Value> = caps.iter().map(|(c, s)| json!({ "capability": c, "state": s })).collect();
        self.execute("migrate-set-capabilities", json!({ "capabilities": list })).map(|_| ())
    }

    /// `migrate-set-parameters`, e.g. `json!({"max-bandwidth": 1u64 << 30})`.
    pub fn migrate_set_parameters(&mut self, params: Value) -> Result<()> {
        self.execute("migrate-set-parameters", params).map(|_| ())
    }

    /// `query-migrate-parameters`.
    pub fn query_migrate_parameters(&mut self) -> Result<Value> {
        self.execute("query-migrate-parameters", Value::Null)
    }

    /// `cont`: resume the guest.
    pub fn cont(&mut self) -> Result<()> {
        self.execute("cont", Value::Null).map(|_| ())
    }

    /// `stop`: pause the guest.
    pub fn stop(&mut self) -> Result<()> {
        self.execute("stop", Value::Null).map(|_| ())
    }
}

/// A one-line summary of a final `query-migrate` reply for test output.
pub fn migration_summary(info: &Value) -> String {
    let ram = &info["ram"];
    format!(
        "status={} total-time={}ms downtime={}ms setup-time={}ms transferred={}MiB normal-pages={} \
         duplicate={} dirty-sync-count={} mbps={:.0}{}",
        info["status"].as_str().unwrap_or("?"),
        info["total-time"],
        info["downtime"],
        info["setup-time"],
        ram["transferred"].as_u64().unwrap_or(0) >> 20,
        ram["normal"],
        ram["duplicate"],
        ram["dirty-sync-count"],
        ram["mbps"].as_f64().unwrap_or(0.0),
        info.get("error-desc").map(|e| format!(" error-desc={e}")).unwrap_or_default()
    )
}
