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
/// A server that exits first fails the test with its stderr.
pub fn start_listening(cmd: &mut Command) -> (Child, JoinHandle<String>) {
    let (child, log, _) = start_listening_line(cmd);
    (child, log)
}

/// [`start_listening`] for a server told to listen on port 0: returns the
/// first address its announcement names (`listening on [127.0.0.1:40123]`),
/// so no port is picked before the server binds it (a port freed for it
/// may be taken meanwhile by any connection's local end).
pub fn start_listening_any(cmd: &mut Command) -> (Child, JoinHandle<String>, std::net::SocketAddr) {
    let (child, log, line) = start_listening_line(cmd);
    let addr = line
        .split(|c: char| c == '[' || c == ']' || c == ',' || c.is_whitespace())
        .find_map(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no address in the announcement {line:?}"));
    (child, log, addr)
}

fn start_listening_line(cmd: &mut Command) -> (Child, JoinHandle<String>, String) {
    let mut child = cmd.stderr(Stdio::piped()).spawn().unwrap();
    let err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let log = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if line.contains("listening on") || line.contains("accepting on") {
                let _ = tx.send(line.clone());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(line) => (child, log, line),
        Err(e) => {
            let _ = child.kill();
            let status = child.wait();
            let stderr = log.join().unwrap_or_default();
            panic!("the server never said it listens ({e}; {status:?}); its stderr:\n{stderr}");
        }
    }
}
