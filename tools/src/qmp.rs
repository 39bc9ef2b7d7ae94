//! The one QMP client of the project (the CLI's `pmigrate qemu` and the
//! QEMU tests, which include this file): one command at a time over a unix
//! socket.
//!
//! QMP speaks one JSON object per line. After the greeting, the client sends
//! `qmp_capabilities`; then every command gets exactly one reply (`return`
//! or `error`), possibly preceded by asynchronous events, which are kept
//! for [`Qmp::take_events`] and [`Qmp::wait_event`].

// The tests include this file for part of what it offers.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

/// Longest wait for one reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest wait for the greeting.
const GREETING_TIMEOUT: Duration = Duration::from_secs(10);

/// A QMP connection.
pub struct Qmp {
    path: PathBuf,
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    /// QEMU's greeting.
    pub greeting: Value,
    /// Asynchronous events received so far (not yet taken).
    pub events: VecDeque<Value>,
    next_id: u64,
}

impl Qmp {
    /// Connects to the QMP socket at `path`, reads the greeting and
    /// negotiates capabilities.
    pub fn connect(path: &Path) -> Result<Qmp> {
        let stream = UnixStream::connect(path).with_context(|| format!("connect to QMP {}", path.display()))?;
        Self::negotiate(path, stream)
    }

    /// Like [`Qmp::connect`], retrying the connect until `timeout` (QEMU
    /// still starting); `alive` is polled between attempts and ends the
    /// wait with its error.
    pub fn connect_while(path: &Path, timeout: Duration, mut alive: impl FnMut() -> Result<()>) -> Result<Qmp> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    alive()?;
                    if Instant::now() >= deadline {
                        return Err(e).with_context(|| {
                            format!("connecting to QMP {} for {:.0} s", path.display(), timeout.as_secs_f64())
                        });
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        };
        Self::negotiate(path, stream)
    }

    fn negotiate(path: &Path, stream: UnixStream) -> Result<Qmp> {
        // A QMP socket serves one client at a time: the others wait for
        // their greeting until it leaves.
        stream.set_read_timeout(Some(GREETING_TIMEOUT))?;
        stream.set_write_timeout(Some(REPLY_TIMEOUT))?;
        let reader = BufReader::new(stream.try_clone()?);
        let mut q = Qmp {
            path: path.into(),
            writer: stream,
            reader,
            greeting: Value::Null,
            events: VecDeque::new(),
            next_id: 1,
        };
        let greeting = q.read_message().with_context(|| {
            format!(
                "QMP {}: no greeting within {} s (is another client connected? give pmigrate its own -qmp socket)",
                path.display(),
                GREETING_TIMEOUT.as_secs()
            )
        })?;
        q.writer.set_read_timeout(Some(REPLY_TIMEOUT))?;
        if greeting.get("QMP").is_none() {
            bail!("QMP {}: unexpected greeting {greeting}", path.display());
        }
        q.greeting = greeting;
        q.execute("qmp_capabilities", Value::Null)?;
        Ok(q)
    }

    fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("QEMU closed the connection");
        }
        serde_json::from_str(&line).with_context(|| format!("bad QMP message {:?}", line.trim_end()))
    }

    /// Runs `cmd` with `args` (`Value::Null` for none) and returns its
    /// `return` value; a QMP `error` is an `Err`. Events are kept.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": cmd, "id": id });
        if !args.is_null() {
            msg["arguments"] = args;
        }
        let mut bytes = serde_json::to_vec(&msg)?;
        bytes.push(b'\n');
        let where_ = format!("QMP {} on {}", cmd, self.path.display());
        let ctx = || where_.clone();
        self.writer.write_all(&bytes).with_context(ctx)?;
        loop {
            let r = self.read_message().with_context(ctx)?;
            if r.get("event").is_some() {
                self.events.push_back(r);
                continue;
            }
            if r.get("id").and_then(Value::as_u64) != Some(id) {
                // A reply to something else (cannot happen with one command in flight).
                continue;
            }
            if let Some(e) = r.get("error") {
                let desc = e.get("desc").and_then(Value::as_str).unwrap_or("unknown error");
                return Err(anyhow!("{desc}")).with_context(ctx);
            }
            return Ok(r.get("return").cloned().unwrap_or(Value::Null));
        }
    }

    /// Takes the recorded events.
    pub fn take_events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }

    /// Waits for an event named `name` (recorded or new); removes and
    /// returns it.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
                return Ok(self.events.remove(i).unwrap_or_default());
            }
            if Instant::now() >= deadline {
                bail!("no QMP event {name} within {:.0} s", timeout.as_secs_f64());
            }
            // Events arrive unsolicited: poke QEMU cheaply to collect them.
            self.execute("query-status", Value::Null)?;
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
