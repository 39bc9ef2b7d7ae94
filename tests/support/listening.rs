//! Starting a server (`serve`, `recv`, a proxy end) and waiting until its
//! stderr says it listens, while its whole stderr is kept for the test.
//!
//! ```ignore
//! #[path = "../../tests/support/listening.rs"]
//! mod listening;
//! let (child, log) = listening::start_listening(Command::new(BIN).args(["recv", ...]));
//! let stderr: String = log.join().unwrap();
//! ```
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

/// Spawns `cmd` with its stderr piped and waits (up to a minute) for a
/// line saying it listens (`listening on`, or a proxy entry's `accepting
/// on`); returns the child and a thread that collects all of its stderr.
pub fn start_listening(cmd: &mut Command) -> (Child, JoinHandle<String>) {
    let mut child = cmd.stderr(Stdio::piped()).spawn().unwrap();
    let err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let log = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if line.contains("listening on") || line.contains("accepting on") {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    rx.recv_timeout(Duration::from_secs(60)).expect("the server announced it is listening");
    (child, log)
}
