//! The command's log: the libraries' `tracing` events on stderr.
//!
//! Servers (`serve`, `recv`, `proxy`) log each session opened, ended,
//! refused or failed as one line with its peer and reason: their level is
//! `info` by default. One-shot commands (`migrate`, `send`, `qemu`, `bench`)
//! end with one line saying how it went, so they log errors only by default.
//! Each `-v` is one level more (warn, info, debug, trace), `-q` errors
//! only; `RUST_LOG` (an `EnvFilter` directive, e.g.
//! `RUST_LOG=pmigrate_transport=debug`) overrides both. `--log-format
//! json` writes one JSON object a line for log shippers.
//!
//! What a command says to its user (where it listens, its report, the line
//! an error or a signal ends it with) is not a log event: it is printed
//! as is, whatever the level.

use std::io::IsTerminal;

use clap::{Args, ValueEnum};
use tracing_subscriber::EnvFilter;

/// The log options every subcommand takes.
#[derive(Args, Clone, Debug)]
pub struct LogArgs {
    /// More log detail: -v debug, -vv trace.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Less log: errors only.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// Log lines as text or as JSON objects.
    #[arg(long, global = true, default_value = "text")]
    log_format: LogFormat,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable, one event a line.
    Text,
    /// One JSON object a line.
    Json,
}

impl LogArgs {
    /// The level directive the flags ask for, from the command's own
    /// default: `info` for a server, `error` for a one-shot command whose
    /// last line says how it ended.
    fn level(&self, server: bool) -> &'static str {
        const LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];
        if self.quiet {
            return "error";
        }
        let base = if server { 2 } else { 0 };
        LEVELS[(base + usize::from(self.verbose)).min(LEVELS.len() - 1)]
    }
}

/// Installs the process's log subscriber; `server` says whether the
/// command is a long-running server. `RUST_LOG`, when set and valid, wins
/// over `-v`/`-q`.
pub fn init(a: &LogArgs, server: bool) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| EnvFilter::new(a.level(server)));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Each event is formatted whole, then written in one call.
        .with_writer(std::io::stderr)
        .with_target(false)
        // A log reader that went away is no reason to complain (or to
        // stop): a server keeps serving with its stderr closed.
        .log_internal_errors(false);
    let _ = match a.log_format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        log: LogArgs,
    }

    fn level(args: &[&str], server: bool) -> &'static str {
        Cli::try_parse_from([&["pmigrate"], args].concat()).unwrap().log.level(server)
    }

    #[test]
    fn servers_log_info_and_one_shot_commands_errors_by_default() {
        assert_eq!(level(&[], true), "info");
        assert_eq!(level(&[], false), "error");
        assert_eq!(level(&["-v"], true), "debug");
        assert_eq!(level(&["-vv"], true), "trace");
        assert_eq!(level(&["-vvvv"], true), "trace");
        assert_eq!(level(&["-v"], false), "warn");
        assert_eq!(level(&["-q"], true), "error");
        assert!(Cli::try_parse_from(["pmigrate", "-q", "-v"]).is_err(), "-q and -v conflict");
        assert!(Cli::try_parse_from(["pmigrate", "--log-format", "xml"]).is_err());
    }
}
