//! A small QMP client: one command at a time over a unix socket.
//!
//! QMP speaks one JSON object per line. After the greeting, the client sends
//! `qmp_capabilities`; then every command gets exactly one reply (`return`
//! or `error`), possibly preceded by asynchronous events, which are skipped.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

/// Longest wait for one reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest wait for the greeting.
const GREETING_TIMEOUT: Duration = Duration::from_secs(10);

/// A QMP connection.
pub struct Qmp {
    path: PathBuf,
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    next_id: u64,
}

impl Qmp {
    /// Connects to the QMP socket at `path`, reads the greeting and
    /// negotiates capabilities.
    pub fn connect(path: &Path) -> Result<Qmp> {
        let stream = UnixStream::connect(path).with_context(|| format!("connect to QMP {}", path.display()))?;
        // A QMP socket serves one client at a time: the others wait for
        // their greeting until it leaves.
        stream.set_read_timeout(Some(GREETING_TIMEOUT))?;
        stream.set_write_timeout(Some(REPLY_TIMEOUT))?;
        let reader = BufReader::new(stream.try_clone()?);
        let mut q = Qmp { path: path.into(), writer: stream, reader, next_id: 1 };
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
    /// `return` value; a QMP `error` is an `Err`. Events are skipped.
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
            if r.get("event").is_some() || r.get("id").and_then(Value::as_u64) != Some(id) {
                continue;
            }
            if let Some(e) = r.get("error") {
                let desc = e.get("desc").and_then(Value::as_str).unwrap_or("unknown error");
                return Err(anyhow!("{desc}")).with_context(ctx);
            }
            return Ok(r.get("return").cloned().unwrap_or(Value::Null));
        }
    }
}
