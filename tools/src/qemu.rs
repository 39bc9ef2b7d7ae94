//! `pmigrate qemu`: drives a whole QEMU migration over QMP on both sides, the
//! way an operator would, with `pmigrate send`/`recv` as the `exec:` pipe.
//!
//! Guest RAM that both QEMUs map from the same memory (a shared
//! `memory-backend-file` on one host, a DAX or CXL device) is handed over
//! instead of copied: QEMU's `x-ignore-shared` capability leaves shared RAM
//! blocks out of the stream, and the destination simply uses the memory the
//! source left. Configuration cannot be trusted to say the memory is the
//! same, so, as the engine does (see `pmigrate::engine::shared`), it is
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

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use pmigrate::engine::shared::{read_words, Nonces, Picker};
use pmigrate::{Compression, Gpa, GuestRegion, HostPageSize, Via};
use serde_json::{json, Value};

use crate::qmp::Qmp;

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

/// What each backend could take, before the proof.
fn classify(src: &mut Qmp, dst: &mut Qmp, no_zero_copy: bool) -> Result<Vec<Backend>> {
    let s = memdevs(src)?;
    let d = memdevs(dst)?;
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
    for m in &d {
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
    Ok(out)
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
    let mut pick = Picker::new(seed);
    let nonces = match Nonces::plant(&src, &mut pick) {
        Ok(n) => n,
        Err(e) => return Ok(Err(e.into())),
    };
    let seen = read_words(&dst, &nonces.offsets);
    let values = nonces.values.clone();
    nonces.restore(&src).with_context(|| format!("put back the words the proof overwrote in {path}"))?;
    Ok(seen.map(|w| w == values).map_err(Into::into))
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

/// Waits (bounded) until something on this host listens on `port`; a
/// destination on another host is simply given a moment.
fn wait_listening(port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let needle = format!(":{port:04X} ");
    while Instant::now() < deadline {
        let listening = ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
            std::fs::read_to_string(f).is_ok_and(|t| {
                t.lines().skip(1).any(|l| {
                    let cols: Vec<&str> = l.split_whitespace().collect();
                    cols.len() > 3 && format!("{} ", cols[1]).ends_with(&needle) && cols[3] == "0A"
                })
            })
        });
        if listening {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

/// Polls the source's `query-migrate` until the migration ends; returns the
/// final reply.
fn watch(src: &mut Qmp, timeout: Duration) -> Result<Value> {
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
        if matches!(st.as_str(), "completed" | "failed" | "cancelled") {
            if let Some(bar) = &bar {
                bar.finish_and_clear();
            }
            return Ok(info);
        }
        if Instant::now() >= deadline {
            let _ = src.execute("migrate_cancel", Value::Null);
            bail!("migration not finished after {} s (cancelled); last status {st}", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(150));
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
    let auth: String = a.auth.to_args()?.iter().map(|w| format!(" {}", sh(w))).collect();
    let listen = if a.listen.is_empty() { a.dest.clone() } else { a.listen.clone() };
    let exe = std::env::current_exe().context("locate the pmigrate binary")?;
    let exe = sh(&exe.to_string_lossy());

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

    // 1. Which RAM can stay where it is.
    let mut backends = classify(&mut src, &mut dst, a.no_zero_copy)?;
    prove(&mut src, &mut backends)?;
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
    for q in [&mut src, &mut dst] {
        q.execute(
            "migrate-set-capabilities",
            json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": zero_copy }] }),
        )?;
    }
    src.execute("migrate-set-parameters", json!({ "max-bandwidth": a.max_bandwidth }))?;

    // 2. The destination listens, then the source sends.
    let recv_uri =
        format!("exec:{exe} recv{auth} --listen {}", listen.iter().map(|l| sh(l)).collect::<Vec<_>>().join(" "));
    dst.execute("migrate-incoming", json!({ "uri": recv_uri }))?;
    if let Some(port) = listen.first().and_then(|l| l.rsplit(':').next()).and_then(|p| p.parse().ok()) {
        wait_listening(port, Duration::from_secs(5));
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
    let started = Instant::now();
    src.execute("migrate", json!({ "uri": send }))?;

    // 3. Watch it.
    let info = watch(&mut src, Duration::from_secs(a.timeout))?;
    match info["status"].as_str() {
        Some("completed") => {}
        st => {
            let why = info["error-desc"].as_str().unwrap_or("no reason given");
            bail!("migration {} ({why}); the guest keeps running at the source", st.unwrap_or("ended"));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = status(&mut dst)?;
        if st == "running" {
            break;
        }
        if Instant::now() >= deadline {
            bail!("migration completed but the destination is {st:?}, not running, after 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
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
        println!("{report}");
    } else {
        println!(
            "migrated in {} ms (downtime {} ms, setup {} ms), {:.1} MiB of RAM stream sent{}",
            info["total-time"],
            info["downtime"],
            info["setup-time"],
            mib(ram["transferred"].as_u64().unwrap_or(0)),
            if zero_copy { ", shared RAM handed over (x-ignore-shared)" } else { "" }
        );
        for b in &backends {
            println!(
                "  {:<12} {:>8.1} MiB  {:<9}  {}",
                b.id,
                mib(b.size),
                if b.zero_copy { "zero-copy" } else { "copy" },
                b.why
            );
        }
        if zero_copy {
            println!("the source QEMU still maps the handed-over memory: quit it, do not cont it");
        }
    }
    Ok(())
}
