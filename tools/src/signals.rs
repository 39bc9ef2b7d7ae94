//! SIGINT and SIGTERM at the commands that carry a migration: the
//! migration is cancelled cleanly, one line says what was left behind, and
//! the exit status is 128 + the signal's number.
//!
//! - `send`, `recv` ([`watch_relay`]) interrupt their relay; `qemu`
//!   ([`Caught`]) looks between its steps; a second signal ends them at once.
//! - `serve`, `migrate` ([`on_signal`]) ask the command what the
//!   interruption leaves behind: it answers with the line to print, or
//!   declines, having said why (a VM that already runs elsewhere needs this
//!   end to finish), and the next signal asks again.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use pmigrate::relay::Interrupt;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// How long a relay may take to end after its interrupt before the helper
/// ends anyway (it normally takes a few milliseconds).
const RELAY_STOP_WAIT: Duration = Duration::from_secs(5);

/// A command stopped by a signal: the line to print instead of an error.
#[derive(Debug)]
pub struct Interrupted {
    /// The signal's number.
    pub signal: i32,
    /// What was left behind, on one line.
    pub line: String,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.line)
    }
}

impl std::error::Error for Interrupted {}

impl Interrupted {
    /// The exit status: 128 + the signal's number, as a shell reports it.
    pub fn status(&self) -> u8 {
        u8::try_from(128 + self.signal).unwrap_or(1)
    }
}

/// The signal's name.
pub fn name(signal: i32) -> &'static str {
    match signal {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

/// Whether this process may still say its last line: true once.
pub fn say_once() -> bool {
    static SAID: AtomicBool = AtomicBool::new(false);
    !SAID.swap(true, Ordering::AcqRel)
}

/// The first SIGINT or SIGTERM caught, for a command that looks between
/// its steps (`pmigrate qemu`); a second one ends the process at once.
#[derive(Clone)]
pub struct Caught(Arc<AtomicUsize>);

impl Caught {
    /// Catches SIGINT and SIGTERM from now on.
    pub fn install() -> Result<Caught> {
        let caught = Arc::new(AtomicUsize::new(0));
        let again = Arc::new(AtomicBool::new(false));
        for sig in [SIGINT, SIGTERM] {
            signal_hook::flag::register_conditional_shutdown(sig, 1, again.clone())?;
            signal_hook::flag::register(sig, again.clone())?;
            signal_hook::flag::register_usize(sig, caught.clone(), usize::try_from(sig).unwrap_or(1))?;
        }
        Ok(Caught(caught))
    }

    /// The first signal caught, if any.
    pub fn signal(&self) -> Option<i32> {
        match self.0.load(Ordering::Acquire) {
            0 => None,
            n => i32::try_from(n).ok(),
        }
    }
}

/// Watches SIGINT and SIGTERM for an `exec:` helper. While its relay
/// carries bytes, a signal raises `interrupt`: the relay ends, and the main
/// thread says `line(signal, true)` ([`Interrupted`]). Before the relay
/// carries there is nothing to cancel: the helper says `line(signal,
/// false)` and exits at once. Once `done` is set the relay is over and the
/// signal is left alone.
pub fn guard_relay(
    interrupt: Interrupt,
    done: Arc<AtomicBool>,
    line: impl Fn(&str, bool) -> String + Send + 'static,
) -> Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    std::thread::spawn(move || {
        let mut first = true;
        for sig in signals.forever() {
            let status = 128 + sig;
            if !first {
                // A second signal: at once.
                std::process::exit(status);
            }
            first = false;
            if done.load(Ordering::Acquire) {
                continue;
            }
            interrupt.raise(format!("interrupted by {}", name(sig)));
            if !interrupt.carrying() {
                if say_once() {
                    say!("{}", line(name(sig), false));
                }
                std::process::exit(status);
            }
            // The relay ends and the main thread says so; should it not,
            // end anyway.
            let until = Instant::now() + RELAY_STOP_WAIT;
            while !done.load(Ordering::Acquire) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
            if !done.load(Ordering::Acquire) {
                if say_once() {
                    say!("{} (the relay did not stop within {RELAY_STOP_WAIT:?})", line(name(sig), true));
                }
                std::process::exit(status);
            }
        }
    });
    Ok(())
}

/// Watches SIGINT and SIGTERM on a thread of its own for the rest of the
/// process; `decide` gets the signal's name.
pub(crate) fn on_signal(decide: impl Fn(&'static str) -> Option<String> + Send + 'static) -> Result<()> {
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    std::thread::Builder::new().name("pm-signals".into()).spawn(move || {
        for sig in signals.forever() {
            let name = if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
            if let Some(line) = decide(name) {
                say!("{line}");
                std::process::exit(128 + sig);
            }
        }
    })?;
    Ok(())
}
