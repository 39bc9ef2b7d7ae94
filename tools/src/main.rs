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
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand};
use pmigrate::relay::{self, Local, RelayRecvOptions, RelaySendConfig};
use pmigrate::StreamPlan;
use pmigrate::{Acceptor, BackendChoice, Compression, Via};

/// One line on stderr. A stderr nobody reads any more (a closed pipe) is
/// not a reason to stop: a server whose log reader went away keeps serving,
/// and a signal is still handled.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

/// One line on stdout (a report, a table). A reader that went away (a
/// closed pipe) does not undo what was done, so it is no error and no
/// panic: the exit status still says how the command went.
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

mod auth;
mod bench;
mod log;
mod memfile;
mod proxy;
mod qemu;
mod qmp;
mod signals;
mod stdio;

use auth::AuthArgs;

#[derive(Parser)]
#[command(name = "pmigrate", version, about = "Parallel live-migration data plane for virtual machines")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    #[command(flatten)]
    log: log::LogArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Destination: receive one migration into a memory file.
    Serve(memfile::ServeArgs),
    /// Source: migrate a memory file to a `serve` destination.
    Migrate(memfile::MigrateArgs),
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
    /// Write a new pre-shared key file (32 random bytes, mode 0600).
    Keygen(auth::KeygenArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(CompletionsArgs),
    /// Print the manual page (roff), e.g. `pmigrate man | man -l -`.
    Man,
}

#[derive(Args)]
struct CompletionsArgs {
    /// The shell to complete for.
    shell: clap_complete::Shell,
}

#[derive(Args)]
pub(crate) struct StreamArgs {
    /// Number of TCP streams (spread over the destinations), 1 to 64.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
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
    /// Seconds a peer may go without taking or sending anything (frozen,
    /// vanished with its links) before the migration fails; at least 3.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(3..))]
    pub(crate) progress_timeout: u64,
    /// Seconds a stream's link may acknowledge nothing sent on it (a NIC
    /// or link down) before the stream moves to another destination
    /// address or way out; it goes back once its own answers again.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) link_timeout: u64,
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()).min(4)
}

#[derive(Args)]
struct SendArgs {
    /// Destination addresses (host:port).
    #[arg(required = true)]
    dest: Vec<String>,
    #[command(flatten)]
    streams: StreamArgs,
    #[command(flatten)]
    auth: AuthArgs,
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
    auth: AuthArgs,
    /// I/O backend of the streams: auto (io_uring where the kernel allows
    /// it), uring, or portable (blocking reads and writes).
    #[arg(long, default_value = "auto")]
    pub(crate) io: BackendChoice,
    /// Seconds the sender may go without sending or taking anything before
    /// the migration fails; at least 3.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(3..))]
    progress_timeout: u64,
}

pub(crate) fn resolve(addrs: &[String]) -> Result<Vec<SocketAddr>> {
    addrs
        .iter()
        .map(|a| a.to_socket_addrs().with_context(|| format!("bad address {a:?}"))?.next().context("no address"))
        .collect()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    log::init(&cli.log, matches!(cli.cmd, Cmd::Serve(_) | Cmd::Recv(_) | Cmd::Proxy(_)));
    let res = match cli.cmd {
        Cmd::Serve(a) => memfile::serve(a),
        Cmd::Migrate(a) => memfile::migrate(a),
        Cmd::Send(a) => send(a),
        Cmd::Recv(a) => recv(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Qemu(a) => qemu::run(a),
        Cmd::Proxy(a) => proxy::run(a),
        Cmd::Keygen(a) => auth::keygen(a),
        Cmd::Completions(a) => {
            clap_complete::generate(a.shell, &mut Cli::command(), "pmigrate", &mut std::io::stdout());
            Ok(())
        }
        Cmd::Man => clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()).context("writing the page"),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        // Stopped by a signal: the line says what was left behind.
        Err(e) if e.downcast_ref::<signals::Interrupted>().is_some() => {
            let i = e.downcast_ref::<signals::Interrupted>().expect("checked");
            if signals::say_once() {
                say!("{}", i.line);
            }
            ExitCode::from(i.status())
        }
        Err(e) => {
            say!("pmigrate: error: {}", one_line(&e));
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

/// A byte-stream relay to `dest` as the stream and authentication options
/// say.
pub(crate) fn relay_config(dest: &[String], s: &StreamArgs, auth: pmigrate::Auth) -> Result<RelaySendConfig> {
    let mut plan = StreamPlan::new(resolve(dest)?, s.streams.max(1), auth);
    plan.via = s.via.clone();
    Ok(RelaySendConfig {
        threads: s.threads,
        compression: s.compress,
        backend: s.io,
        progress_timeout: Duration::from_secs(s.progress_timeout),
        link_timeout: Duration::from_secs(s.link_timeout),
        ..RelaySendConfig::new(plan)
    })
}

fn send(a: SendArgs) -> Result<()> {
    let mut cfg = relay_config(&a.dest, &a.streams, a.auth.auth("send")?)?;
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
        say!("{report}");
    }
    Ok(())
}

fn recv(a: RecvArgs) -> Result<()> {
    let acceptor = Acceptor::bind(&resolve(&a.listen)?, a.auth.auth("recv")?)?;
    if a.report {
        say!("pmigrate recv: listening on {:?}", acceptor.local_addrs());
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
        progress_timeout: Duration::from_secs(a.progress_timeout),
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
        say!("{report}");
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

/// Whether the local output broke (its reader, the destination QEMU,
/// closed it). A stream to the other end failing with EPIPE is the
/// network's doing, not QEMU's.
fn broken_pipe(e: &anyhow::Error) -> bool {
    use pmigrate::TransportError;
    e.chain().any(|c| {
        let t = match c.downcast_ref::<pmigrate::MigrateError>() {
            Some(pmigrate::MigrateError::Transport(t)) => Some(t),
            _ => c.downcast_ref::<TransportError>(),
        };
        matches!(t, Some(TransportError::Io { what, source })
            if what.ends_with("output") && source.kind() == std::io::ErrorKind::BrokenPipe)
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
