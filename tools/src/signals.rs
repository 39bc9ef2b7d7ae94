//! SIGINT and SIGTERM for the commands that move a VM: the first signal
//! asks the command what the interruption leaves behind; the command either
//! answers with the one line to print (then the process exits with 128 +
//! the signal's number) or declines, having said why (a VM that already
//! runs elsewhere needs this end to finish), and the next signal asks again.

use anyhow::Result;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

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
