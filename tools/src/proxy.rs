//! `pmigrate proxy`: carries connections between hosts over pmigrate's
//! streams (see `pmigrate::proxy` and docs/libvirt.md).

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use pmigrate::proxy::{run_entry, run_exit, Endpoint, EntryConfig, ExitConfig, SocketAccess};
use pmigrate::relay::RelayRecvOptions;
use pmigrate::{Acceptor, BackendChoice};

use crate::auth::AuthArgs;
use crate::{relay_config, resolve, StreamArgs};

#[derive(Args)]
pub struct ProxyArgs {
    #[command(subcommand)]
    side: Side,
}

#[derive(Subcommand)]
enum Side {
    /// Source host: accept local connections (QEMU's, libvirt's) and carry
    /// each to the exit.
    Entry(EntryArgs),
    /// Destination host: take the entry's sessions and connect each to its
    /// target.
    Exit(ExitArgs),
}

#[derive(Args)]
struct EntryArgs {
    /// Local endpoint to accept connections on: `unix:/path` (or
    /// `unix:///path`) or `tcp:host:port`. Repeat for several; a connection
    /// by the i-th goes to the exit's i-th `--target`.
    #[arg(long, required = true)]
    accept: Vec<Endpoint>,
    /// The exit's addresses (host:port); streams are spread over them.
    #[arg(required = true)]
    exit: Vec<String>,
    #[command(flatten)]
    streams: StreamArgs,
    #[command(flatten)]
    auth: AuthArgs,
    /// A carried connection that moves no byte either way for this many
    /// seconds is cut (0: never).
    #[arg(long, default_value_t = 600)]
    idle_timeout: u64,
    /// Permission bits of the unix sockets accepted on, in octal: who may
    /// connect (a QEMU run by libvirt as its own user needs group access).
    #[arg(long, default_value = "600", value_parser = parse_mode)]
    socket_mode: u32,
    /// Group of the unix sockets accepted on (a name or a number).
    #[arg(long, value_parser = parse_group)]
    socket_group: Option<u32>,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    let m = u32::from_str_radix(s.trim_start_matches("0o"), 8).map_err(|_| format!("{s:?} is not an octal mode"))?;
    if m > 0o777 {
        return Err(format!("{s:?} is not a permission mode (at most 777)"));
    }
    Ok(m)
}

fn parse_group(s: &str) -> Result<u32, String> {
    if let Ok(gid) = s.parse() {
        return Ok(gid);
    }
    let name = std::ffi::CString::new(s).map_err(|_| format!("{s:?} is not a group name"))?;
    // SAFETY: getgrnam reads the group database and returns a pointer to
    // static storage, or null; the gid is copied out at once.
    let gr = unsafe { libc::getgrnam(name.as_ptr()) };
    if gr.is_null() {
        return Err(format!("no group {s:?} on this host"));
    }
    // SAFETY: non-null: a valid group entry until the next getgr* call.
    Ok(unsafe { (*gr).gr_gid })
}

#[derive(Args)]
struct ExitArgs {
    /// Address to listen on for the entry's streams (repeat for several NICs).
    #[arg(long, required = true)]
    listen: Vec<String>,
    /// Where connections go: `unix:/path` or `tcp:host:port`, in the order
    /// of the entry's `--accept`s.
    #[arg(long, required = true)]
    target: Vec<Endpoint>,
    /// Worker threads per connection (lz4 of the way back).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[command(flatten)]
    auth: AuthArgs,
    /// A carried connection that moves no byte either way for this many
    /// seconds is cut (0: never).
    #[arg(long, default_value_t = 600)]
    idle_timeout: u64,
    /// Seconds an entry may go without sending or taking anything before its
    /// connection fails; at least 3.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(3..))]
    progress_timeout: u64,
    /// I/O backend of the streams: auto (io_uring where the kernel allows
    /// it), uring, or portable (blocking reads and writes).
    #[arg(long, default_value = "auto")]
    io: BackendChoice,
}

pub fn run(a: ProxyArgs) -> Result<()> {
    // Runs until SIGTERM or SIGINT: then it accepts nothing new, lets the
    // connections it carries end, says so and exits with 128 + the signal.
    // A second signal ends it at once; the connections it carried then fail
    // at both ends, like a cut link.
    let stop = Arc::new(AtomicBool::new(false));
    let got = Arc::new(AtomicI32::new(0));
    {
        let (stop, got) = (stop.clone(), got.clone());
        let mut signals = Signals::new([SIGTERM, SIGINT])?;
        std::thread::spawn(move || {
            for sig in signals.forever() {
                let name = if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
                if got.swap(sig, Ordering::AcqRel) == 0 {
                    say!(
                        "pmigrate proxy: {name}: accepting nothing new; the connections carried now finish first \
                         (send it again to cut them)"
                    );
                    stop.store(true, Ordering::Release);
                } else {
                    say!("pmigrate proxy: {name} again: stopped, the connections in progress were cut");
                    std::process::exit(128 + sig);
                }
            }
        });
    }
    let log = |line: String| say!("pmigrate proxy: {line}");
    match a.side {
        Side::Entry(e) => {
            if e.accept.len() > u32::MAX as usize {
                bail!("too many --accept endpoints");
            }
            let mut relay = relay_config(&e.exit, &e.streams, e.auth.auth("proxy entry")?)?;
            relay.idle_timeout = (e.idle_timeout > 0).then(|| Duration::from_secs(e.idle_timeout));
            let tls = match &relay.plan.auth {
                pmigrate::Auth::Tls(_) => " over TLS",
                pmigrate::Auth::Psk(_) => " (pre-shared key)",
                pmigrate::Auth::Insecure => " (no authentication)",
            };
            // Say now if the exit does not answer: connections would fail.
            for a in &relay.plan.dests {
                if let Err(err) = std::net::TcpStream::connect_timeout(a, Duration::from_secs(2)) {
                    log(format!(
                        "warning: the exit at {a} does not answer now ({err}); connections fail until it does"
                    ));
                }
            }
            let access = SocketAccess { mode: e.socket_mode, group: e.socket_group };
            let cfg = EntryConfig { listen: e.accept, relay, access };
            log(format!("carrying connections to {:?}{tls}", e.exit));
            run_entry(&cfg, &stop)?;
        }
        Side::Exit(x) => {
            let acceptor = Acceptor::bind(&resolve(&x.listen)?, x.auth.auth("proxy exit")?)?;
            let cfg = ExitConfig {
                targets: x.target,
                relay: RelayRecvOptions {
                    threads: x.threads.max(1),
                    backend: x.io,
                    idle_timeout: (x.idle_timeout > 0).then(|| Duration::from_secs(x.idle_timeout)),
                    progress_timeout: Duration::from_secs(x.progress_timeout),
                    ..RelayRecvOptions::default()
                },
                connect_timeout: Duration::from_secs(10),
            };
            let tls = match &acceptor.auth {
                pmigrate::Auth::Tls(_) => " (TLS)",
                pmigrate::Auth::Psk(_) => " (pre-shared key)",
                pmigrate::Auth::Insecure => " (no authentication)",
            };
            log(format!("listening on {:?}{tls}, targets {:?}", acceptor.local_addrs(), cfg.targets));
            run_exit(&acceptor, &cfg, &stop)?;
        }
    }
    let sig = got.load(Ordering::Acquire);
    let name = if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
    log(format!("stopped by {name}: every connection it carried had ended"));
    std::process::exit(128 + sig);
}
