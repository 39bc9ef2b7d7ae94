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
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use pmigrate::engine::relay::{self, Local, RelayRecvOptions, RelaySendConfig};
use pmigrate::transport::session::StreamPlan;
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

mod auth;
mod bench;
mod memfile;
mod proxy;
mod qemu;
mod qmp;
mod signals;

use auth::AuthArgs;

#[derive(Parser)]
#[command(name = "pmigrate", version, about = "Parallel live-migration data plane for virtual machines")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
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
    let res = match cli.cmd {
        Cmd::Serve(a) => memfile::serve(a),
        Cmd::Migrate(a) => memfile::migrate(a),
        Cmd::Send(a) => send(a),
        Cmd::Recv(a) => recv(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Qemu(a) => qemu::run(a),
        Cmd::Proxy(a) => proxy::run(a),
        Cmd::Keygen(a) => auth::keygen(a),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
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
        ..RelaySendConfig::new(plan)
    })
}

fn send(a: SendArgs) -> Result<()> {
    let cfg = relay_config(&a.dest, &a.streams, a.auth.auth("send")?)?;
    let stdin = std::fs::File::from(std::io::stdin().as_fd_owned()?);
    // A larger pipe lets the producer run ahead by a chunk or four.
    grow_pipe(&stdin);
    // What comes back (QEMU's return path: page requests, acknowledgements)
    // goes to stdout.
    let stdout = std::fs::File::from(std::io::stdout().as_fd_owned()?);
    let report = relay::send(Local::pipes(Some(stdin), Some(stdout)), &cfg)?;
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
    let stdout = std::fs::File::from(std::io::stdout().as_fd_owned()?);
    // A larger pipe lets recv run ahead of QEMU's loader by a few chunks.
    grow_pipe(&stdout);
    let opts = RelayRecvOptions {
        accept_deadline: Some(Instant::now() + Duration::from_secs(a.wait)),
        backend: a.io,
        progress_timeout: Duration::from_secs(a.progress_timeout),
        ..RelayRecvOptions::default()
    };
    // What QEMU writes to stdin (its return path) goes back to the sender;
    // a terminal on stdin is not a return path.
    let stdin = std::io::stdin();
    let back = if stdin.is_terminal() { None } else { Some(std::fs::File::from(stdin.as_fd_owned()?)) };
    let report = relay::receive(&acceptor, Local::pipes(back, Some(stdout)), &opts)?;
    if a.report {
        say!("{report}");
    }
    Ok(())
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

fn grow_pipe(f: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: F_SETPIPE_SZ takes an int argument and only resizes the pipe
    // behind a valid descriptor; on anything but a pipe it fails harmlessly.
    let _ = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
}
