//! `pmigrate qemu`: drives a whole QEMU migration over QMP on both sides, the
//! way an operator would, with `pmigrate send`/`recv` as the `exec:` pipe.
//!
//! Guest RAM that both QEMUs map from the same memory (a shared
//! `memory-backend-file` on one host, a DAX or CXL device) is handed over
//! instead of copied: QEMU's `x-ignore-shared` capability leaves shared RAM
//! blocks out of the stream, and the destination simply uses the memory the
//! source left. Configuration cannot be trusted to say the memory is the
//! same, so, as the engine does (see `pmigrate::nonce_proof`), it is
//! proved: with the source stopped, nonces are written through a mapping of
//! the source's `mem-path` and read back through a mapping of the
//! destination's. Only the same memory shows them.
//!
//! Limit: the proof maps both paths from the host this command runs on, so
//! it only passes when that host sees both QEMUs' files (one machine, or
//! memory shared between hosts and mounted at the same place here). When it
//! cannot, the backend is copied like any other RAM.
//!
//! After a zero-copy migration the source QEMU (in `postmigrate`) still maps
//! the memory the destination now runs on: quit it, never `cont` it.
//!
//! Before it changes anything it checks what would make the migration fail
//! anyway: both QEMUs' memory backends must match (ids and sizes; QEMU only
//! finds a mismatch at the destination, in the middle of the stream), and
//! `recv`'s port must be free where this host can tell. `recv`'s stderr
//! goes to a file this command reads, so a helper that dies says why here.
//!
//! Whatever ends a migration short — `--timeout`, SIGINT or SIGTERM, a
//! failure — the migration is cancelled, the capabilities and parameters
//! this command set are put back on both QEMUs (the destination's only if it
//! still runs: a cancelled incoming migration ends it), the source is left
//! running, and one line says so; the exit status is non-zero (128 + the
//! signal's number for a signal). A signal is acted on between steps, so
//! one that comes while the source is stopped for the proof waits for the
//! proof to end; a second signal ends the command at once.

use std::io::IsTerminal;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use pmigrate::{Compression, Gpa, GuestRegion, HostPageSize, Via};
use serde_json::{json, Value};

use crate::qmp::Qmp;
use crate::signals::{self, Caught, Interrupted};

/// Longest wait for a cancelled migration to settle at the source.
const CANCEL_WAIT: Duration = Duration::from_secs(30);
/// Longest wait for `recv` to listen after `migrate-incoming`.
const LISTEN_WAIT: Duration = Duration::from_secs(10);
/// How long `recv` may still fail after a listener showed up on its port.
const LISTEN_SETTLE: Duration = Duration::from_millis(300);
/// Longest wait for a destination QEMU to end its failed incoming migration.
const DEST_EXIT_WAIT: Duration = Duration::from_secs(5);

#[derive(Args)]
pub struct QemuArgs {
    /// QMP unix socket of the source QEMU.
    #[arg(long)]
    src_qmp: PathBuf,
    /// QMP unix socket of the destination QEMU (started with `-incoming defer`).
    #[arg(long)]
    dst_qmp: PathBuf,
    /// Destination addresses (host:port) `send` connects to.
    #[arg(required = true)]
    dest: Vec<String>,
    /// Number of TCP streams (spread over the destinations).
    #[arg(long, default_value_t = 4)]
    streams: u16,
    /// Local address or interface for each stream, comma-separated.
    #[arg(long, value_delimiter = ',')]
    via: Vec<String>,
    /// Addresses `recv` listens on at the destination (default: the DEST addresses).
    #[arg(long, num_args = 1..)]
    listen: Vec<String>,
    /// lz4: auto (while it pays), lz4 (always) or none.
    #[arg(long)]
    compress: Option<String>,
    /// QEMU's migration bandwidth limit in bytes/s.
    #[arg(long, default_value_t = 10 << 30)]
    max_bandwidth: u64,
    /// Copy all RAM, even memory both sides share.
    #[arg(long)]
    no_zero_copy: bool,
    /// Give up (and cancel) after this many seconds.
    #[arg(long, default_value_t = 3600)]
    timeout: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// How the helpers authenticate each other (passed to both).
    #[command(flatten)]
    auth: crate::auth::AuthArgs,
}

/// Quotes a word for `/bin/sh` (QEMU runs `exec:` URIs with `sh -c`).
fn sh(word: &str) -> String {
    if !word.is_empty() && word.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-:,=".contains(&b)) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// One memory backend and the way it travels.
struct Backend {
    id: String,
    size: u64,
    src_path: Option<String>,
    /// `share=on` at the source (QEMU skips it under `x-ignore-shared`).
    shared_at_src: bool,
    shared_at_dst: bool,
    zero_copy: bool,
    why: String,
}

/// A memory backend as one QEMU reports it.
struct Memdev {
    id: String,
    size: u64,
    share: bool,
    /// The file behind it (file backends only).
    path: Option<String>,
}

fn memdevs(q: &mut Qmp) -> Result<Vec<Memdev>> {
    let list = q.execute("query-memdev", Value::Null)?;
    let mut out = Vec::new();
    for m in list.as_array().context("query-memdev: not a list")? {
        let id = m["id"].as_str().context("query-memdev: backend without id")?.to_string();
        let size = m["size"].as_u64().context("query-memdev: backend without size")?;
        let share = m["share"].as_bool().unwrap_or(false);
        // Backends created with -object id=X live at /objects/X; only file
        // backends have a mem-path.
        let path = q
            .execute("qom-get", json!({ "path": format!("/objects/{id}"), "property": "mem-path" }))
            .ok()
            .and_then(|v| v.as_str().map(str::to_string));
        out.push(Memdev { id, size, share, path });
    }
    Ok(out)
}

/// Refuses memory layouts QEMU cannot migrate between: every backend must
/// exist on both sides with the same size (QEMU itself only finds out at the
/// destination, in the middle of the stream).
fn check_layouts(s: &[Memdev], d: &[Memdev]) -> Result<()> {
    let bytes = |b: u64| format!("{b} bytes ({:.1} MiB)", mib(b));
    let mut wrong = Vec::new();
    for m in s {
        match d.iter().find(|x| x.id == m.id) {
            None => wrong.push(format!("{} ({}) is missing at the destination", m.id, bytes(m.size))),
            Some(p) if p.size != m.size => wrong.push(format!(
                "{} is {} at the source but {} at the destination",
                m.id,
                bytes(m.size),
                bytes(p.size)
            )),
            Some(_) => {}
        }
    }
    for m in d.iter().filter(|m| !s.iter().any(|x| x.id == m.id)) {
        wrong.push(format!("{} ({}) exists only at the destination", m.id, bytes(m.size)));
    }
    if !wrong.is_empty() {
        bail!(
            "the destination's memory does not match the source's: {}; nothing was changed on either QEMU",
            wrong.join("; ")
        );
    }
    Ok(())
}

/// Refuses a `recv` address that something on this host already listens
/// on; one this host does not have (a destination elsewhere) passes.
fn check_port_free(addr: SocketAddr) -> Result<()> {
    match TcpListener::bind(addr) {
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            bail!("{addr} is already in use on this host: recv could not listen there; nothing was changed on either QEMU")
        }
        _ => Ok(()),
    }
}

/// What each backend could take, before the proof.
fn classify(s: Vec<Memdev>, d: &[Memdev], no_zero_copy: bool) -> Vec<Backend> {
    let mut out = Vec::new();
    for Memdev { id, size, share, path } in s {
        let peer = d.iter().find(|x| x.id == id);
        let mut b = Backend {
            id: id.clone(),
            size,
            src_path: path.clone(),
            shared_at_src: share,
            shared_at_dst: peer.is_some_and(|p| p.share),
            zero_copy: false,
            why: String::new(),
        };
        b.why = match peer {
            _ if no_zero_copy => "zero-copy disabled (--no-zero-copy)".into(),
            None => format!("no backend {id:?} at the destination"),
            Some(_) if !share => "not shared (share=off at the source)".into(),
            Some(p) if !p.share => "not shared (share=off at the destination)".into(),
            Some(p) if p.size != size => format!("different sizes ({size} and {} bytes)", p.size),
            Some(p) => match (&path, &p.path) {
                (Some(a), Some(b)) if a == b => String::new(), // candidate
                (Some(a), Some(b)) => format!("different files ({a} and {b})"),
                _ => "not a file backend".into(),
            },
        };
        out.push(b);
    }
    for m in d {
        if !out.iter().any(|b| b.id == m.id) {
            out.push(Backend {
                id: m.id.clone(),
                size: 0,
                src_path: None,
                shared_at_src: false,
                shared_at_dst: m.share,
                zero_copy: false,
                why: "only at the destination".into(),
            });
        }
    }
    out
}

/// Maps `path` (which must exist and hold `size` bytes) shared, never
/// creating or growing it.
fn map(path: &str, size: u64) -> Result<GuestRegion> {
    let len = std::fs::metadata(path).with_context(|| format!("cannot see {path} from this host"))?.len();
    if len < size {
        bail!("{path} holds {len} bytes, less than the backend's {size}");
    }
    Ok(GuestRegion::file(Gpa(0), size, HostPageSize::Small, Path::new(path), true, false)?)
}

/// Plants nonces through the source's mapping and reads them through the
/// destination's. The source guest must be stopped. The outer error means
/// the guest's words could not be put back (fatal); the inner one that the
/// proof could not be run.
fn nonce_proof(path: &str, size: u64, seed: &[u8]) -> Result<Result<bool>> {
    // Both QEMUs name the same path; each mapping is what that path means
    // on this host, so the proof says this host sees one memory behind it.
    let maps = map(path, size).and_then(|s| Ok((s, map(path, size)?)));
    let (src, dst) = match maps {
        Ok(m) => m,
        Err(e) => return Ok(Err(e)),
    };
    match pmigrate::nonce_proof(&src, &dst, seed) {
        Ok(outcome) => Ok(outcome.map_err(Into::into)),
        Err(e) => Err(anyhow::Error::new(e).context(format!("put back the words the proof overwrote in {path}"))),
    }
}

fn random_seed() -> Vec<u8> {
    let mut seed = vec![0u8; 32];
    if std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed)).is_err() {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        seed = format!("{}-{}", t.as_nanos(), std::process::id()).into_bytes();
    }
    seed
}

/// Runs the proof on every candidate backend, with the source stopped
/// (and always resumed if it was running).
fn prove(src: &mut Qmp, backends: &mut [Backend]) -> Result<()> {
    if !backends.iter().any(|b| b.why.is_empty()) {
        return Ok(());
    }
    let was_running = status(src)? == "running";
    if was_running {
        src.execute("stop", Value::Null)?;
    }
    let seed = random_seed();
    let mut res = Ok(());
    for b in backends.iter_mut().filter(|b| b.why.is_empty()) {
        let path = b.src_path.clone().expect("candidates have a path");
        match nonce_proof(&path, b.size, &[seed.as_slice(), b.id.as_bytes()].concat()) {
            Ok(Ok(true)) => {
                b.zero_copy = true;
                b.why = "same file, nonce proof passed".into();
            }
            Ok(Ok(false)) => b.why = "nonce proof failed".into(),
            Ok(Err(e)) => b.why = format!("nonce proof failed: {}", crate::one_line(&e)),
            // The guest's memory could not be put back: stop here.
            Err(e) => {
                res = Err(e);
                break;
            }
        }
    }
    if was_running {
        let cont = src.execute("cont", Value::Null).context("resume the source after the proof");
        res = res.and(cont.map(|_| ()));
    }
    res
}

fn status(q: &mut Qmp) -> Result<String> {
    let r = q.execute("query-status", Value::Null)?;
    Ok(r["status"].as_str().context("query-status: no status")?.to_string())
}

/// Whether something on this host listens on `port`.
fn listening(port: u16) -> bool {
    let needle = format!(":{port:04X} ");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        std::fs::read_to_string(f).is_ok_and(|t| {
            t.lines().skip(1).any(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.len() > 3 && format!("{} ", cols[1]).ends_with(&needle) && cols[3] == "0A"
            })
        })
    })
}

/// Where `recv`'s stderr goes, read back when it has something to say.
/// (On a destination on another host the file is there, not here: then it
/// reads as empty.)
struct RecvLog(PathBuf);

impl RecvLog {
    fn new() -> RecvLog {
        RecvLog(std::env::temp_dir().join(format!("pmigrate-qemu-{}-recv.log", std::process::id())))
    }

    /// `recv`'s error lines, without its `pmigrate: error:` prefix.
    fn errors(&self) -> Option<String> {
        let text = std::fs::read_to_string(&self.0).ok()?;
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("pmigrate: error:") || l.starts_with("pmigrate recv: interrupted"))
            .map(|l| l.trim_start_matches("pmigrate: error:").trim())
            .collect();
        (!lines.is_empty()).then(|| lines.join("; "))
    }
}

impl Drop for RecvLog {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Waits (bounded) until `recv` listens on `port` on this host, failing at
/// once with `recv`'s own error if it gave up; a destination on another
/// host is simply given a moment. A listener is trusted only once `recv`
/// had [`LISTEN_SETTLE`] to complain (it might be another program's).
fn wait_listening(port: u16, log: &RecvLog, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut seen: Option<Instant> = None;
    while Instant::now() < deadline {
        if let Some(why) = log.errors() {
            bail!("the destination's recv helper failed: {why}");
        }
        if seen.is_some_and(|t| t.elapsed() >= LISTEN_SETTLE) {
            return Ok(());
        }
        if seen.is_none() && listening(port) {
            seen = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Ok(())
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

/// Why a migration was cut short by this command.
enum Stop {
    /// SIGINT or SIGTERM.
    Signal(i32),
    /// `--timeout` seconds passed.
    Timeout(u64),
}

/// How the watch ended.
enum Watched {
    /// QEMU's final `query-migrate` (completed, failed or cancelled).
    Ended(Value),
    /// This command stopped it: the migration must be cancelled. The last
    /// `query-migrate` before.
    Stopped(Stop, Value),
}

/// Polls the source's `query-migrate` until the migration ends, a signal
/// comes or `timeout` passes.
fn watch(src: &mut Qmp, timeout: Duration, caught: &Caught) -> Result<Watched> {
    let deadline = Instant::now() + timeout;
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(1);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes}")
                .expect("template")
                .progress_chars("=> "),
        );
        bar
    });
    let mut last_line = Instant::now() - Duration::from_secs(10);
    let mut last_status = String::new();
    loop {
        let info = src.execute("query-migrate", Value::Null)?;
        let st = info["status"].as_str().unwrap_or("none").to_string();
        let ram = &info["ram"];
        let (done, total) = (ram["transferred"].as_u64().unwrap_or(0), ram["total"].as_u64().unwrap_or(0));
        let dirty = ram["dirty-pages-rate"].as_u64().unwrap_or(0) * ram["page-size"].as_u64().unwrap_or(4096);
        match &bar {
            Some(bar) => {
                bar.set_length(total.max(done).max(1));
                bar.set_position(done);
                bar.set_message(format!("{st}, dirty {:.1} MiB/s", mib(dirty)));
            }
            None if st != last_status || last_line.elapsed() >= Duration::from_secs(1) => {
                say!(
                    "pmigrate qemu: {st}: {:.1} MiB of {:.1} MiB sent, dirty {:.1} MiB/s",
                    mib(done),
                    mib(total),
                    mib(dirty)
                );
                last_line = Instant::now();
            }
            None => {}
        }
        last_status.clone_from(&st);
        let stop = match caught.signal() {
            Some(sig) => Some(Stop::Signal(sig)),
            None if Instant::now() >= deadline => Some(Stop::Timeout(timeout.as_secs())),
            None => None,
        };
        let ended = matches!(st.as_str(), "completed" | "failed" | "cancelled");
        if ended || stop.is_some() {
            if let Some(bar) = &bar {
                bar.finish_and_clear();
            }
            return Ok(match stop {
                Some(stop) if !ended => Watched::Stopped(stop, info),
                _ => Watched::Ended(info),
            });
        }
        std::thread::sleep(Duration::from_millis(150));
    }
}

/// Cancels the migration and waits (bounded) until it settled; returns the
/// final `query-migrate`.
fn cancel(src: &mut Qmp) -> Result<Value> {
    src.execute("migrate_cancel", Value::Null).context("cancel the migration")?;
    let deadline = Instant::now() + CANCEL_WAIT;
    loop {
        let info = src.execute("query-migrate", Value::Null)?;
        if matches!(info["status"].as_str(), Some("completed" | "failed" | "cancelled")) {
            return Ok(info);
        }
        if Instant::now() >= deadline {
            bail!("the migration did not settle within {CANCEL_WAIT:?} of migrate_cancel: {}", info["status"]);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The capabilities and parameters this command sets, as they were.
struct Saved {
    /// `x-ignore-shared` at the source and at the destination.
    ignore_shared: (bool, bool),
    /// The source's `max-bandwidth`.
    max_bandwidth: Option<u64>,
}

fn capability(q: &mut Qmp, name: &str) -> Result<bool> {
    let caps = q.execute("query-migrate-capabilities", Value::Null)?;
    Ok(caps.as_array().into_iter().flatten().any(|c| c["capability"] == name && c["state"] == true))
}

impl Saved {
    fn take(src: &mut Qmp, dst: &mut Qmp) -> Result<Saved> {
        let params = src.execute("query-migrate-parameters", Value::Null)?;
        Ok(Saved {
            ignore_shared: (capability(src, "x-ignore-shared")?, capability(dst, "x-ignore-shared")?),
            max_bandwidth: params["max-bandwidth"].as_u64(),
        })
    }

    /// Puts everything back where it can; says what it did.
    fn restore(&self, src: &mut Qmp, dst: &mut Qmp) -> String {
        let set_cap = |q: &mut Qmp, state: bool| {
            q.execute(
                "migrate-set-capabilities",
                json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": state }] }),
            )
        };
        let mut src_ok = set_cap(src, self.ignore_shared.0).is_ok();
        if let Some(b) = self.max_bandwidth {
            src_ok &= src.execute("migrate-set-parameters", json!({ "max-bandwidth": b })).is_ok();
        }
        let dst_ok = set_cap(dst, self.ignore_shared.1).is_ok();
        match (src_ok, dst_ok) {
            (true, true) => "x-ignore-shared and max-bandwidth put back on both QEMUs".into(),
            (true, false) => "x-ignore-shared and max-bandwidth put back at the source".into(),
            (false, true) => "x-ignore-shared put back at the destination; the source refused its settings".into(),
            (false, false) => "the settings could not be put back on either QEMU".into(),
        }
    }
}

/// What became of the destination QEMU after a migration that did not
/// complete: it ends a failed incoming migration by exiting. `incoming`:
/// its incoming migration was started.
fn destination_fate(dst: &mut Qmp, incoming: bool) -> String {
    let deadline = Instant::now() + DEST_EXIT_WAIT;
    loop {
        match status(dst) {
            Err(_) => return "the destination QEMU exited (its incoming migration failed)".into(),
            Ok(st) if st == "inmigrate" && !incoming => {
                return "the destination QEMU still waits for a migration".into();
            }
            Ok(st) if st != "inmigrate" || Instant::now() >= deadline => {
                // Its own word on the incoming migration, where it has one.
                let own = dst.execute("query-migrate", Value::Null).ok().and_then(|i| {
                    let why = i["error-desc"].as_str().map(|d| format!(": {d}")).unwrap_or_default();
                    i["status"].as_str().map(|s| format!(", its incoming migration {s}{why}"))
                });
                return format!("the destination QEMU is {st:?}{}", own.unwrap_or_default());
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Leaves the source as it was before (running, if it was) and says how it is.
fn source_fate(src: &mut Qmp, was_running: bool) -> String {
    match status(src) {
        Ok(st) if st == "running" => "the source VM keeps running".into(),
        Ok(st) if was_running && src.execute("cont", Value::Null).is_ok() => {
            format!("the source VM, left {st:?}, was resumed")
        }
        Ok(st) => format!("the source VM is {st:?}"),
        Err(e) => format!("the source QEMU does not answer ({})", crate::one_line(&e)),
    }
}

/// How a migration this command started ended short.
enum Ended {
    /// This command cancelled it; QEMU's final `query-migrate`.
    Stopped(Stop, Value),
    /// QEMU says it failed, and why (with the destination's side of it).
    Failed(String),
    /// Driving it failed.
    Error(anyhow::Error),
}

impl From<anyhow::Error> for Ended {
    fn from(e: anyhow::Error) -> Self {
        Ended::Error(e)
    }
}

/// What a cancel left: how long it ran and how much it sent.
fn cancelled(info: &Value, started: Instant) -> String {
    let sent = info["ram"]["transferred"].as_u64().unwrap_or(0);
    match info["status"].as_str() {
        Some("cancelled") => format!(
            "migration cancelled after {:.1} s ({:.1} MiB sent), nothing migrated",
            started.elapsed().as_secs_f64(),
            mib(sent)
        ),
        Some("not started") => "stopped before the migration started".into(),
        Some(st) => format!("migration cancelled; QEMU says {st:?}"),
        None => "migration cancelled".into(),
    }
}

/// Sets the capabilities and parameters, starts `recv` at the destination
/// and `send` at the source, and watches; returns the final `query-migrate`
/// of a completed migration.
#[allow(clippy::too_many_arguments)]
fn migrate(
    src: &mut Qmp,
    dst: &mut Qmp,
    a: &QemuArgs,
    exe: &str,
    listen: &[String],
    zero_copy: bool,
    log: &RecvLog,
    caught: &Caught,
    incoming: &mut bool,
) -> Result<Value, Ended> {
    for q in [&mut *src, &mut *dst] {
        q.execute(
            "migrate-set-capabilities",
            json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": zero_copy }] }),
        )?;
    }
    src.execute("migrate-set-parameters", json!({ "max-bandwidth": a.max_bandwidth }))?;
    if let Some(signal) = caught.signal() {
        return Err(Ended::Stopped(Stop::Signal(signal), json!({ "status": "not started" })));
    }

    // The destination listens, then the source sends. Once the destination
    // waits there is no way back for it but a failed migration: a signal
    // that comes now is acted on by cancelling what the source started.
    let listen_words = listen.iter().map(|l| sh(l)).collect::<Vec<_>>().join(" ");
    // Both helpers authenticate each other with the flags this command got.
    let auth: String = a.auth.to_args()?.iter().map(|w| format!(" {}", sh(w))).collect();
    let recv_uri = format!("exec:{exe} recv{auth} --listen {listen_words} 2>>{}", sh(&log.0.to_string_lossy()));
    dst.execute("migrate-incoming", json!({ "uri": recv_uri }))?;
    *incoming = true;
    if let Some(port) = listen.first().and_then(|l| l.rsplit(':').next()).and_then(|p| p.parse().ok()) {
        wait_listening(port, log, LISTEN_WAIT)?;
    }
    let mut send = format!("exec:{exe} send{auth} --streams {}", a.streams.max(1));
    if !a.via.is_empty() {
        send += &format!(" --via {}", sh(&a.via.join(",")));
    }
    if let Some(c) = &a.compress {
        send += &format!(" --compress {}", sh(c));
    }
    for d in &a.dest {
        send += &format!(" {}", sh(d));
    }
    src.execute("migrate", json!({ "uri": send }))?;

    let info = match watch(src, Duration::from_secs(a.timeout), caught)? {
        Watched::Stopped(stop, last) => {
            let mut info = cancel(src)?;
            // A cancelled migration's query-migrate has no RAM figures.
            if info.get("ram").is_none() {
                info["ram"] = last["ram"].clone();
            }
            if info["status"] != "completed" {
                return Err(Ended::Stopped(stop, info));
            }
            let why = match stop {
                Stop::Signal(sig) => format!("interrupted by {}", signals::name(sig)),
                Stop::Timeout(secs) => format!("--timeout {secs} s reached"),
            };
            say!("pmigrate qemu: {why}, but the migration completed before the cancel took");
            info
        }
        Watched::Ended(info) => info,
    };
    match info["status"].as_str() {
        Some("completed") => {}
        st => {
            let why = info["error-desc"].as_str().unwrap_or("no reason given");
            let mut line = format!("migration {} ({why})", st.unwrap_or("ended"));
            if let Some(recv) = log.errors() {
                line += &format!("; the destination's recv helper: {recv}");
            }
            return Err(Ended::Failed(line));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = status(dst)?;
        if st == "running" {
            return Ok(info);
        }
        if Instant::now() >= deadline {
            return Err(
                anyhow::anyhow!("migration completed but the destination is {st:?}, not running, after 60 s").into()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn run(a: QemuArgs) -> Result<()> {
    // Check the helper options here, not in a helper QEMU spawned.
    for v in &a.via {
        v.parse::<Via>().map_err(|e| anyhow::anyhow!("bad --via {v:?}: {e}"))?;
    }
    if let Some(c) = &a.compress {
        c.parse::<Compression>().map_err(anyhow::Error::msg)?;
    }
    // The helpers authenticate each other with these flags; check them here.
    a.auth.auth("qemu")?;
    let listen = if a.listen.is_empty() { a.dest.clone() } else { a.listen.clone() };
    let exe = std::env::current_exe().context("locate the pmigrate binary")?;
    let exe = sh(&exe.to_string_lossy());
    let caught = Caught::install()?;
    // Before anything changes, a signal only stops the command.
    let untouched = |what: &str| -> Result<()> {
        match caught.signal() {
            Some(signal) => Err(Interrupted {
                signal,
                line: format!(
                    "pmigrate qemu: interrupted by {} {what}: nothing was changed on either QEMU; the source VM keeps \
                     running",
                    signals::name(signal)
                ),
            }
            .into()),
            None => Ok(()),
        }
    };

    let mut src = Qmp::connect(&a.src_qmp)?;
    let mut dst = Qmp::connect(&a.dst_qmp)?;
    let dst_status = status(&mut dst)?;
    if dst_status != "inmigrate" {
        bail!("the destination QEMU is {dst_status:?}, not waiting for a migration (start it with -incoming defer)");
    }
    let src_status = status(&mut src)?;
    if !matches!(src_status.as_str(), "running" | "paused") {
        bail!("the source QEMU is {src_status:?}, not running");
    }
    let was_running = src_status == "running";

    // 1. What would fail anyway, before touching either VM.
    let (s, d) = (memdevs(&mut src)?, memdevs(&mut dst)?);
    check_layouts(&s, &d)?;
    let listen_addrs = crate::resolve(&listen)?;
    for addr in &listen_addrs {
        check_port_free(*addr)?;
    }
    untouched("before the migration")?;

    // 2. Which RAM can stay where it is.
    let mut backends = classify(s, &d, a.no_zero_copy);
    prove(&mut src, &mut backends)?;
    untouched("before the migration (after the memory proof)")?;
    // Under x-ignore-shared QEMU leaves out every shared RAM block, so it
    // may only be on when every shared backend is proven to be one memory.
    let zero_copy = backends.iter().any(|b| b.zero_copy)
        && backends.iter().all(|b| b.zero_copy || (!b.shared_at_src && !b.shared_at_dst));
    if !zero_copy {
        for b in backends.iter_mut().filter(|b| b.zero_copy) {
            b.zero_copy = false;
            b.why = format!("{}, but another shared backend is not: copying all RAM", b.why);
        }
    }

    // 3. From here on, whatever ends the migration short puts back what
    // was set, on both QEMUs.
    let saved = Saved::take(&mut src, &mut dst)?;
    let log = RecvLog::new();
    let started = Instant::now();
    let mut incoming = false;
    let res = migrate(&mut src, &mut dst, &a, &exe, &listen, zero_copy, &log, &caught, &mut incoming);
    let info = match res {
        Ok(info) => info,
        Err(end) => {
            let restored = saved.restore(&mut src, &mut dst);
            let dest = destination_fate(&mut dst, incoming);
            let source = source_fate(&mut src, was_running);
            let after = format!("{restored}; {source}; {dest}");
            return Err(match end {
                Ended::Stopped(Stop::Signal(signal), info) => Interrupted {
                    signal,
                    line: format!(
                        "pmigrate qemu: interrupted by {}: {}; {after}",
                        signals::name(signal),
                        cancelled(&info, started)
                    ),
                }
                .into(),
                Ended::Stopped(Stop::Timeout(secs), info) => {
                    anyhow::anyhow!("no result within --timeout {secs} s: {}; {after}", cancelled(&info, started))
                }
                Ended::Failed(why) => anyhow::anyhow!("{why}; {after}"),
                Ended::Error(e) => anyhow::anyhow!("{}; {after}", crate::one_line(&e)),
            });
        }
    };
    let wall = started.elapsed();

    // 4. Report.
    let ram = &info["ram"];
    let report = json!({
        "status": "completed",
        "x-ignore-shared": zero_copy,
        "total-time-ms": info["total-time"],
        "downtime-ms": info["downtime"],
        "setup-time-ms": info["setup-time"],
        "wall-time-ms": wall.as_millis() as u64,
        "ram": { "transferred": ram["transferred"], "total": ram["total"], "mbps": ram["mbps"] },
        "backends": backends.iter().map(|b| json!({
            "id": b.id, "bytes": b.size, "mem-path": b.src_path,
            "path": if b.zero_copy { "zero-copy" } else { "copy" }, "why": b.why,
        })).collect::<Vec<_>>(),
    });
    if a.json {
        outln!("{report}");
    } else {
        outln!(
            "migrated in {} ms (downtime {} ms, setup {} ms), {:.1} MiB of RAM stream sent{}",
            info["total-time"],
            info["downtime"],
            info["setup-time"],
            mib(ram["transferred"].as_u64().unwrap_or(0)),
            if zero_copy { ", shared RAM handed over (x-ignore-shared)" } else { "" }
        );
        for b in &backends {
            outln!(
                "  {:<12} {:>8.1} MiB  {:<9}  {}",
                b.id,
                mib(b.size),
                if b.zero_copy { "zero-copy" } else { "copy" },
                b.why
            );
        }
        if zero_copy {
            outln!("the source QEMU still maps the handed-over memory: quit it, do not cont it");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memdev(id: &str, size: u64) -> Memdev {
        Memdev { id: id.into(), size, share: false, path: None }
    }

    #[test]
    fn layouts_must_match_backend_for_backend() {
        let src = [memdev("pc.ram", 268_566_528), memdev("extra", 1 << 20)];
        assert!(check_layouts(&src, &[memdev("extra", 1 << 20), memdev("pc.ram", 268_566_528)]).is_ok());
        let e = check_layouts(&src, &[memdev("pc.ram", 335_675_392), memdev("extra", 1 << 20)]).unwrap_err();
        let e = e.to_string();
        assert!(e.contains("pc.ram is 268566528 bytes (256.1 MiB) at the source but 335675392 bytes"), "{e}");
        assert!(e.ends_with("nothing was changed on either QEMU"), "{e}");
        let e = check_layouts(&src, &[memdev("pc.ram", 268_566_528), memdev("other", 4096)]).unwrap_err().to_string();
        assert!(e.contains("extra (1048576 bytes (1.0 MiB)) is missing at the destination"), "{e}");
        assert!(e.contains("other (4096 bytes (0.0 MiB)) exists only at the destination"), "{e}");
    }

    #[test]
    fn a_port_in_use_here_is_refused_and_an_address_elsewhere_passes() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let e = check_port_free(addr).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{addr} is already in use on this host")), "{e}");
        drop(taken);
        assert!(check_port_free(addr).is_ok());
        // An address this host does not have: a destination elsewhere.
        assert!(check_port_free("192.0.2.1:7000".parse().unwrap()).is_ok());
    }
}
