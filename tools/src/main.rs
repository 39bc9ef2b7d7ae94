//! `pmigrate`: the command-line face of the pmigrate data plane.
//!
//! - `serve` / `migrate`: migrate a memory file (a VM's shared
//!   `memory-backend-file`, a snapshot) between hosts over N streams.
//! - `send` / `recv`: QEMU `exec:` migration helpers that stripe QEMU's
//!   migration stream over N streams and NICs.
//! - `bench`: a loopback migration of a synthetic guest, side by side with
//!   the classic single-stream data plane and raw TCP.

use std::io::IsTerminal;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use pmigrate::engine::relay::{self, Local, RelayRecvOptions, RelaySendConfig};
use pmigrate::transport::session::StreamPlan;
use pmigrate::transport::tls::TlsConfig;
use pmigrate::{
    Acceptor, BackendChoice, Compression, Gpa, GuestMemory, GuestRegion, HostPageSize, Incoming, Progress,
    ReceiveOptions, Source, SourceConfig, TrackerKind, Via,
};

mod bench;
mod proxy;
mod qemu;
mod qmp;
mod signals;
mod stdio;

#[derive(Parser)]
#[command(name = "pmigrate", version, about = "Parallel live-migration data plane for virtual machines")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Destination: receive one migration into a memory file.
    Serve(ServeArgs),
    /// Source: migrate a memory file to a `serve` destination.
    Migrate(MigrateArgs),
    /// QEMU exec: helper, source side: stripe stdin over N streams.
    Send(SendArgs),
    /// QEMU exec: helper, destination side: reassemble the stream on stdout.
    Recv(RecvArgs),
    /// Benchmark: migrate a synthetic guest over loopback, against the
    /// classic single-stream data plane and raw TCP.
    Bench(bench::BenchArgs),
    /// Socket proxy: carry QEMU's (and libvirt's) migration connections
    /// between hosts over striped, checked streams.
    Proxy(proxy::ProxyArgs),
    /// Drive a whole QEMU migration over QMP on both sides through
    /// `send`/`recv`, handing over shared guest RAM instead of copying it.
    Qemu(qemu::QemuArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on (repeat for several NICs).
    #[arg(long, required = true, num_args = 1..)]
    listen: Vec<String>,
    /// Memory file to create (truncated) and fill.
    #[arg(long)]
    memory: PathBuf,
    /// Rehash all memory at the end against what was received.
    #[arg(long)]
    verify_memory: bool,
    /// Give up if no session arrives within this many seconds.
    #[arg(long, default_value_t = 3600)]
    wait: u64,
    /// Never map a region the source offers to hand over; copy everything.
    #[arg(long)]
    no_zero_copy: bool,
    /// Largest memory accepted from a source, in MiB.
    #[arg(long, default_value_t = 1 << 22)]
    max_memory_mib: u64,
    /// Shell command that starts the guest here (run once, must exit 0):
    /// in post-copy at the switchover, while pages still arrive; otherwise
    /// once memory is verified.
    #[arg(long)]
    resume_cmd: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// I/O backend of the streams: auto (io_uring where the kernel allows
    /// it), uring, or portable (blocking reads and writes).
    #[arg(long, default_value = "auto")]
    pub(crate) io: BackendChoice,
}

#[derive(Args)]
pub(crate) struct StreamArgs {
    /// Number of TCP streams (spread over the destinations).
    #[arg(long, default_value_t = 4)]
    streams: u16,
    /// Local address or interface for each stream, comma-separated; stream
    /// i leaves by the i-th (cycling).
    #[arg(long, value_delimiter = ',')]
    via: Vec<Via>,
    /// Worker threads.
    #[arg(long, default_value_t = default_threads())]
    threads: usize,
    /// lz4: auto (while it pays), lz4 (always) or none.
    #[arg(long, default_value = "auto")]
    compress: Compression,
    /// I/O backend of the streams: auto (io_uring where the kernel allows
    /// it), uring, or portable (blocking reads and writes).
    #[arg(long, default_value = "auto")]
    pub(crate) io: BackendChoice,
}

/// Mutual TLS over every stream (byte-stream sessions: `send`/`recv`,
/// `proxy`): all three files, or none.
#[derive(Args)]
pub(crate) struct TlsArgs {
    /// This end's certificate chain (PEM), leaf first.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// This end's private key (PEM).
    #[arg(long, requires_all = ["tls_cert", "tls_ca"])]
    tls_key: Option<PathBuf>,
    /// The CA (PEM) the other end's certificate must chain to.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    /// The name the other end's certificate must carry (connecting ends;
    /// default: the address dialled).
    #[arg(long, requires = "tls_cert")]
    tls_name: Option<String>,
}

impl TlsArgs {
    /// The TLS settings, when asked for.
    pub(crate) fn config(&self) -> Result<Option<std::sync::Arc<TlsConfig>>> {
        let (Some(cert), Some(key), Some(ca)) = (&self.tls_cert, &self.tls_key, &self.tls_ca) else {
            return Ok(None);
        };
        let mut cfg = TlsConfig::from_pem_files(cert, key, ca)?;
        cfg.peer_name = self.tls_name.clone();
        Ok(Some(std::sync::Arc::new(cfg)))
    }
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()).min(4)
}

#[derive(Args)]
struct MigrateArgs {
    /// Memory file to migrate (mapped shared, read in place).
    #[arg(long)]
    memory: PathBuf,
    /// Destination addresses (host:port).
    #[arg(required = true)]
    dest: Vec<String>,
    #[command(flatten)]
    streams: StreamArgs,
    /// Dirty tracker: hash (sees writes by any process), uffd-wp (writes by
    /// this process only) or auto.
    #[arg(long, default_value = "hash")]
    tracker: String,
    /// Copy the memory file even when the destination can map it.
    #[arg(long)]
    no_zero_copy: bool,
    /// With io_uring: send whole raw page batches with SEND_ZC from a
    /// registered arena (pays on a real NIC; see docs/benchmarks.md).
    #[arg(long)]
    zero_copy_send: bool,
    /// Downtime target in milliseconds.
    #[arg(long, default_value_t = 300)]
    downtime_ms: u64,
    /// Most live rounds before pausing anyway.
    #[arg(long, default_value_t = 30)]
    max_rounds: u32,
    /// The guest's free-page list (`GPA LENGTH` per line): those pages are
    /// not sent unless written after this hint.
    #[arg(long)]
    free_pages: Option<PathBuf>,
    /// The guest's working set (same format): sent last in every round.
    #[arg(long)]
    working_set: Option<PathBuf>,
    /// Shell command that pauses the VM (run once, must exit 0).
    #[arg(long)]
    pause_cmd: Option<String>,
    /// Post-copy after this many pre-copy rounds (0: at once): the
    /// destination starts the guest at the switchover and fetches the rest
    /// as it touches it, while everything left is pushed.
    #[arg(long)]
    postcopy: Option<u32>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SendArgs {
    /// Destination addresses (host:port).
    #[arg(required = true)]
    dest: Vec<String>,
    #[command(flatten)]
    streams: StreamArgs,
    #[command(flatten)]
    tls: TlsArgs,
    /// Print a one-line report on stderr at the end.
    #[arg(long)]
    report: bool,
}

#[derive(Args)]
struct RecvArgs {
    /// Address to listen on (repeat for several NICs).
    #[arg(long, required = true, num_args = 1..)]
    listen: Vec<String>,
    /// Give up if the sender does not connect within this many seconds.
    #[arg(long, default_value_t = 600)]
    wait: u64,
    /// Print where it listens, and a one-line report at the end, on stderr.
    #[arg(long)]
    report: bool,
    #[command(flatten)]
    tls: TlsArgs,
    /// I/O backend of the streams: auto (io_uring where the kernel allows
    /// it), uring, or portable (blocking reads and writes).
    #[arg(long, default_value = "auto")]
    pub(crate) io: BackendChoice,
}

pub(crate) fn resolve(addrs: &[String]) -> Result<Vec<SocketAddr>> {
    addrs
        .iter()
        .map(|a| a.to_socket_addrs().with_context(|| format!("bad address {a:?}"))?.next().context("no address"))
        .collect()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Serve(a) => serve(a),
        Cmd::Migrate(a) => migrate(a),
        Cmd::Send(a) => send(a),
        Cmd::Recv(a) => recv(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Qemu(a) => qemu::run(a),
        Cmd::Proxy(a) => proxy::run(a),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        // Stopped by a signal: the line says what was left behind.
        Err(e) if e.downcast_ref::<signals::Interrupted>().is_some() => {
            let i = e.downcast_ref::<signals::Interrupted>().expect("checked");
            if signals::say_once() {
                eprintln!("{}", i.line);
            }
            ExitCode::from(i.status())
        }
        Err(e) => {
            eprintln!("pmigrate: error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each cause once: several error
/// types print their cause in their own message already.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line.replace('\n', " ")
}

fn serve(a: ServeArgs) -> Result<()> {
    let acceptor = Acceptor::bind(&resolve(&a.listen)?)?;
    eprintln!("pmigrate serve: listening on {:?}", acceptor.local_addrs());
    let max = a.max_memory_mib << 20;
    let incoming = Incoming::accept(
        &acceptor,
        |regions| {
            let total: u64 = regions.iter().map(|r| r.len).sum();
            if total > max {
                return Err(format!("{total} bytes of memory exceed this destination's limit of {max}"));
            }
            Ok(())
        },
        Some(Instant::now() + Duration::from_secs(a.wait)),
    )?;
    for (peer, why) in incoming.refused() {
        eprintln!("pmigrate serve: refused {peer}: {why}");
    }
    // A region the source offers to hand over is mapped from its path when
    // this host has that file at the same size (the source then proves it
    // is the same memory, and copies it if not); otherwise the memory file
    // holds the region. Memory files hold one region.
    if incoming.regions().len() != 1 {
        bail!("memory files hold one region; the source has {}", incoming.regions().len());
    }
    let r = incoming.regions()[0];
    let shared = incoming
        .shared_paths()
        .into_iter()
        .find(|(i, p)| *i == 0 && !a.no_zero_copy && std::fs::metadata(p).is_ok_and(|m| m.len() == r.len))
        .map(|(_, p)| PathBuf::from(p));
    let region = match &shared {
        Some(p) => {
            eprintln!("pmigrate serve: mapping {} shared, as the source offers", p.display());
            GuestRegion::file(Gpa(r.gpa), r.len, HostPageSize::Small, p, true, false)?
        }
        None => GuestRegion::file(Gpa(r.gpa), r.len, HostPageSize::Small, &a.memory, true, true)
            .with_context(|| format!("create {}", a.memory.display()))?,
    };
    let opts = ReceiveOptions { verify_memory: a.verify_memory, io: a.io, ..Default::default() };
    let resume = || match &a.resume_cmd {
        None => Ok(()),
        Some(cmd) => run_hook(cmd),
    };
    let report = if incoming.is_postcopy() && shared.is_none() {
        // Post-copy places pages into private anonymous memory (that is what
        // userfaultfd's missing-page mode serves); the file gets them at the end.
        let mem = GuestMemory::new(vec![GuestRegion::anonymous(Gpa(r.gpa), r.len, HostPageSize::Small)?])?;
        let report = incoming.receive_and_run(&mem, &opts, resume)?;
        let file = GuestMemory::new(vec![region])?;
        copy_memory(&mem, &file)?;
        file.regions().iter().try_for_each(|r| r.flush())?;
        report
    } else {
        let mem = GuestMemory::new(vec![region])?;
        let report = incoming.receive_and_run(&mem, &opts, resume)?;
        mem.regions().iter().try_for_each(|r| r.flush())?;
        report
    };
    if a.json {
        println!("{}", report.to_json());
    } else {
        println!("{report}");
    }
    Ok(())
}

/// Runs `cmd` with /bin/sh; it must exit 0.
fn run_hook(cmd: &str) -> Result<(), String> {
    let st =
        std::process::Command::new("/bin/sh").arg("-c").arg(cmd).status().map_err(|e| format!("run {cmd:?}: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} exited with {st}"))
    }
}

/// Copies every page of `from` into `to` (same layout).
fn copy_memory(from: &GuestMemory, to: &GuestMemory) -> Result<()> {
    let mut buf = vec![0u8; 256 * pmigrate::PAGE_SIZE];
    for (a, b) in from.regions().iter().zip(to.regions()) {
        let mut p = 0;
        while p < a.pages() {
            let n = (a.pages() - p).min(256);
            let bytes = &mut buf[..n as usize * pmigrate::PAGE_SIZE];
            a.read_pages(pmigrate::PageIdx(p), bytes)?;
            b.write_pages(pmigrate::PageIdx(p), bytes)?;
            p += n;
        }
    }
    Ok(())
}

/// A progress bar on stderr over a running source's counters, when stderr
/// is a terminal; it ends when the source drops its counters.
fn progress_bar(progress: Arc<Progress>) -> Option<std::thread::JoinHandle<()>> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    Some(std::thread::spawn(move || {
        let bar = indicatif::ProgressBar::new(1);
        bar.set_style(
            indicatif::ProgressStyle::with_template("round {msg} [{bar:40}] {pos}/{len} pages ({per_sec})")
                .expect("template")
                .progress_chars("=> "),
        );
        loop {
            let round = progress.round.load(Ordering::Relaxed);
            bar.set_length(progress.round_pages.load(Ordering::Relaxed).max(1));
            bar.set_position(progress.done_pages.load(Ordering::Relaxed));
            bar.set_message(format!(
                "{round}{}, {:.0} MiB sent",
                if progress.paused.load(Ordering::Relaxed) { " (paused)" } else { "" },
                progress.wire_bytes.load(Ordering::Relaxed) as f64 / (1 << 20) as f64
            ));
            if Arc::strong_count(&progress) == 1 {
                bar.finish_and_clear();
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }))
}

fn migrate(a: MigrateArgs) -> Result<()> {
    let len = std::fs::metadata(&a.memory).with_context(|| format!("open {}", a.memory.display()))?.len();
    if len == 0 || len % 4096 != 0 {
        bail!("{} is {len} bytes, not a whole number of 4 KiB pages", a.memory.display());
    }
    let mem = GuestMemory::new(vec![GuestRegion::file(Gpa(0), len, HostPageSize::Small, &a.memory, true, false)?])?;
    let tracker = match a.tracker.as_str() {
        "hash" => TrackerKind::Hash,
        "uffd-wp" => TrackerKind::UffdWp,
        "auto" => TrackerKind::Auto,
        t => bail!("unknown tracker {t:?} (hash, uffd-wp, auto)"),
    };
    let cfg = SourceConfig {
        threads: a.streams.threads.max(1),
        compression: a.streams.compress,
        downtime_target: Duration::from_millis(a.downtime_ms),
        max_rounds: a.max_rounds,
        tracker,
        zero_copy: !a.no_zero_copy,
        postcopy: a.postcopy,
        io: a.streams.io,
        zero_copy_send: a.zero_copy_send,
        ..SourceConfig::default()
    };
    let hints = |file: &Option<PathBuf>| -> Result<Vec<pmigrate::ranges::PageRange>> {
        let Some(p) = file else { return Ok(Vec::new()) };
        let text = std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))?;
        pmigrate::engine::hints::parse_free_pages(&text, &mem).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
    };
    let (free, working_set) = (hints(&a.free_pages)?, hints(&a.working_set)?);
    let pause_cmd = a.pause_cmd.clone();
    let source = Source::new(&mem, resolve(&a.dest)?)
        .free_pages(free)
        .working_set(working_set)
        .streams(a.streams.streams)
        .via(a.streams.via.clone())
        .config(cfg)
        .on_pause(move || match &pause_cmd {
            None => Ok(()),
            Some(cmd) => run_hook(cmd),
        });
    let bar = progress_bar(source.progress());
    let report = source.run();
    if let Some(b) = bar {
        let _ = b.join();
    }
    let report = report?;
    if a.json {
        println!("{}", report.to_json());
    } else {
        println!("{report}");
    }
    Ok(())
}

/// A byte-stream relay to `dest` as the stream and TLS options say.
pub(crate) fn relay_config(dest: &[String], s: &StreamArgs, tls: &TlsArgs) -> Result<RelaySendConfig> {
    let mut plan = StreamPlan::new(resolve(dest)?, s.streams.max(1));
    plan.via = s.via.clone();
    plan.tls = tls.config()?;
    Ok(RelaySendConfig { threads: s.threads, compression: s.compress, backend: s.io, ..RelaySendConfig::new(plan) })
}

fn send(a: SendArgs) -> Result<()> {
    let mut cfg = relay_config(&a.dest, &a.streams, &a.tls)?;
    let stdin = stdio::stdin()?;
    // A larger pipe lets the producer run ahead by a chunk or four.
    stdio::grow_pipe(&stdin);
    // What comes back (QEMU's return path: page requests, acknowledgements)
    // goes to stdout. QEMU closing both pipes (the migration completed or
    // was cancelled) ends the helper once the stream so far is delivered.
    let stdout = stdio::ReturnPath(std::fs::File::from(std::io::stdout().as_fd_owned()?));
    let line = |signal: &str, carrying: bool| {
        let what = if carrying {
            "migration cancelled, the stream cut short"
        } else {
            "migration cancelled before the destination took the streams"
        };
        format!(
            "pmigrate send: interrupted by {signal}: {what}; the source QEMU fails the migration and its VM keeps \
             running (unless it had switched to post-copy)"
        )
    };
    let report = relay_under_signals(line, |interrupt| {
        let local = Local { input: Some(Box::new(stdin)), output: Some(Box::new(stdout)), abort: Box::new(|| {}) };
        cfg.interrupt = Some(interrupt);
        relay::send(local, &cfg)
    })?;
    if a.report {
        eprintln!("{report}");
    }
    Ok(())
}

fn recv(a: RecvArgs) -> Result<()> {
    let mut acceptor = Acceptor::bind(&resolve(&a.listen)?)?;
    acceptor.tls = a.tls.config()?;
    if a.report {
        eprintln!("pmigrate recv: listening on {:?}", acceptor.local_addrs());
    }
    // The stream goes to stdout, which closes as soon as it ended (whole
    // or not): the destination QEMU then reads its end and finishes loading,
    // or fails its incoming migration, without waiting for this helper.
    let stdout = stdio::take_stdout()?;
    // A larger pipe lets recv run ahead of QEMU's loader by a few chunks.
    stdio::grow_pipe(&stdout);
    let mut opts = RelayRecvOptions {
        accept_deadline: Some(Instant::now() + Duration::from_secs(a.wait)),
        backend: a.io,
        ..RelayRecvOptions::default()
    };
    // What QEMU writes to stdin (its return path) goes back to the sender;
    // a terminal on stdin is not a return path.
    let back = if std::io::stdin().is_terminal() { None } else { Some(stdio::stdin()?) };
    let line = |signal: &str, carrying: bool| {
        let what = if carrying {
            "migration cancelled, the stream cut short"
        } else {
            "migration cancelled before the source connected"
        };
        format!(
            "pmigrate recv: interrupted by {signal}: {what}; the destination QEMU fails its incoming migration and \
             the source VM keeps running (unless it had switched to post-copy)"
        )
    };
    let res = relay_under_signals(line, |interrupt| {
        opts.interrupt = Some(interrupt);
        relay::receive(&acceptor, Local::pipes(back, Some(stdout)), &opts)
    });
    let report = res.map_err(|e| match broken_pipe(&e) {
        // The destination QEMU closed its end first: it failed (or quit),
        // and says why on its own stderr.
        true => e.context("the destination QEMU stopped reading the migration stream (see its own error)"),
        false => e,
    })?;
    if a.report {
        eprintln!("{report}");
    }
    Ok(())
}

/// Runs a helper's relay under SIGINT and SIGTERM (see
/// [`signals::guard_relay`]); `line(signal, carrying)` says what a signal
/// left behind.
fn relay_under_signals(
    line: impl Fn(&str, bool) -> String + Send + Clone + 'static,
    run: impl FnOnce(relay::Interrupt) -> Result<relay::RelayReport, pmigrate::MigrateError>,
) -> Result<relay::RelayReport> {
    let interrupt = relay::Interrupt::new();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    signals::guard_relay(interrupt.clone(), done.clone(), line.clone())?;
    let res = run(interrupt.clone());
    done.store(true, Ordering::Release);
    match res {
        Err(pmigrate::MigrateError::Interrupted(_)) => {
            let signal = signal_of(&interrupt);
            Err(signals::Interrupted { signal, line: line(signals::name(signal), true) }.into())
        }
        r => Ok(r?),
    }
}

/// The signal an interrupt was raised for (its reason names it).
fn signal_of(interrupt: &relay::Interrupt) -> i32 {
    let why = interrupt.raised().unwrap_or_default();
    if why.contains("SIGINT") {
        signal_hook::consts::SIGINT
    } else {
        signal_hook::consts::SIGTERM
    }
}

/// Whether a broken pipe is among the causes of `e`.
fn broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            || c.to_string().contains("Broken pipe")
    })
}

/// Owned duplicates of the standard descriptors: raw, unbuffered files
/// (std's stdout is line-buffered, wrong for a binary stream).
trait AsFdOwned {
    fn as_fd_owned(&self) -> Result<std::os::fd::OwnedFd>;
}

impl<T: std::os::fd::AsFd> AsFdOwned for T {
    fn as_fd_owned(&self) -> Result<std::os::fd::OwnedFd> {
        Ok(self.as_fd().try_clone_to_owned()?)
    }
}
