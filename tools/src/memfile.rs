//! `pmigrate serve` and `pmigrate migrate`: a VM's memory file (a shared
//! `memory-backend-file`, a snapshot) migrated between hosts.
//!
//! The destination fills only the memory it was given (`--memory F`):
//!
//! - If the source offers its memory for handover and `F` exists at the
//!   same size, `F` is mapped in place and the source proves whether it is
//!   the very same memory (zero-copy); if not, every page is copied into it.
//! - Otherwise the pages go into `F.partial`, created at the source's size,
//!   which becomes `F` (a rename) only once the migration is verified and
//!   the guest may start: a failed or interrupted migration never leaves a
//!   file that looks complete, and `F` keeps what it held.
//!
//! Both ends exit 0 only when the VM changed hands: the source after the
//! destination confirmed it holds the whole, verified memory and started
//! the guest (`--resume-cmd`); the destination after that confirmation went
//! out. SIGINT and SIGTERM cancel, leave the VM with its owner, and say so.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use pmigrate::{
    Acceptor, Gpa, Grant, GuestMemory, GuestRegion, HostPageSize, Incoming, MigrateError, Progress, ReceiveOptions,
    Source, SourceConfig, TrackerKind,
};

use crate::auth::AuthArgs;
use crate::signals;
use crate::{resolve, StreamArgs};

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on (repeat for several NICs).
    #[arg(long, required = true, num_args = 1..)]
    listen: Vec<String>,
    /// The memory file to fill: created at the source's size, or, if it
    /// exists, of exactly the source's size.
    #[arg(long)]
    memory: PathBuf,
    /// Rehash all memory at the end against what was received.
    #[arg(long)]
    verify_memory: bool,
    /// Give up if no session arrives within this many seconds.
    #[arg(long, default_value_t = 3600)]
    wait: u64,
    /// Never let the source hand over the memory file in place; copy every
    /// page.
    #[arg(long)]
    no_zero_copy: bool,
    /// Largest memory accepted from a source into a new file, in MiB
    /// (default: this host's physical memory).
    #[arg(long)]
    max_memory_mib: Option<u64>,
    /// Shell command that starts the guest here (run once, must exit 0):
    /// in post-copy at the switchover, while pages still arrive; otherwise
    /// once memory is verified and the memory file is in place, before the
    /// source lets go of the guest (if it fails, the source keeps it).
    #[arg(long)]
    resume_cmd: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// I/O backend of the streams: auto (io_uring where the kernel allows
    /// it), uring, or portable (blocking reads and writes).
    #[arg(long, default_value = "auto")]
    io: pmigrate::BackendChoice,
    /// Seconds the source may go without sending anything (frozen,
    /// vanished with its links) before the migration fails; at least 3.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(3..))]
    progress_timeout: u64,
    #[command(flatten)]
    auth: AuthArgs,
}

#[derive(Args)]
pub(crate) struct MigrateArgs {
    /// Memory file to migrate (mapped shared, read in place).
    #[arg(long)]
    memory: PathBuf,
    /// Destination addresses (host:port).
    #[arg(required = true)]
    dest: Vec<String>,
    #[command(flatten)]
    streams: StreamArgs,
    /// Dirty tracker: hash (sees writes by any process), uffd-wp (writes by
    /// this process only) or auto.
    #[arg(long, default_value = "hash")]
    tracker: String,
    /// Copy the memory file even when the destination can map it.
    #[arg(long)]
    no_zero_copy: bool,
    /// With io_uring: send whole raw page batches with SEND_ZC from a
    /// registered arena (pays on a real NIC; see docs/benchmarks.md).
    #[arg(long)]
    zero_copy_send: bool,
    /// Downtime target in milliseconds.
    #[arg(long, default_value_t = 300)]
    downtime_ms: u64,
    /// Most live rounds before pausing anyway.
    #[arg(long, default_value_t = 30)]
    max_rounds: u32,
    /// The guest's free-page list (`GPA LENGTH` per line): those pages are
    /// not sent unless written after this hint.
    #[arg(long)]
    free_pages: Option<PathBuf>,
    /// The guest's working set (same format): sent last in every round.
    #[arg(long)]
    working_set: Option<PathBuf>,
    /// Shell command that pauses the VM (run once, must exit 0).
    #[arg(long)]
    pause_cmd: Option<String>,
    /// Shell command that resumes the VM here if the migration fails or is
    /// cancelled after --pause-cmd ran, while the VM is still this host's.
    #[arg(long)]
    cont_cmd: Option<String>,
    /// Post-copy after this many pre-copy rounds (0: at once): the
    /// destination starts the guest at the switchover and fetches the rest
    /// as it touches it, while everything left is pushed.
    #[arg(long)]
    postcopy: Option<u32>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    auth: AuthArgs,
}

/// Runs `cmd` with /bin/sh; it must exit 0.
pub(crate) fn run_hook(cmd: &str) -> Result<(), String> {
    let st =
        std::process::Command::new("/bin/sh").arg("-c").arg(cmd).status().map_err(|e| format!("run {cmd:?}: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} exited with {st}"))
    }
}

/// This host's physical memory in bytes.
fn physical_memory() -> u64 {
    // SAFETY: sysconf only reads system configuration.
    let (pages, size) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGE_SIZE)) };
    u64::try_from(pages).unwrap_or(0).saturating_mul(u64::try_from(size).unwrap_or(0))
}

/// Bytes free for this user in the filesystem of `dir`.
fn room_in(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: statvfs fills the struct it is given from a NUL-terminated
    // path; on success every field is initialised.
    let st = unsafe {
        if libc::statvfs(c.as_ptr(), st.as_mut_ptr()) != 0 {
            return None;
        }
        st.assume_init()
    };
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Where the pages of a copied migration go until it is verified.
fn partial_path(memory: &Path) -> PathBuf {
    let mut name = memory.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".partial");
    memory.with_file_name(name)
}

/// Checks at start-up, before anyone connects, that `--memory` can be
/// filled: its directory exists and takes a new file, and an existing file
/// is a writable regular file. Returns the existing file's size.
fn preflight(memory: &Path) -> Result<Option<u64>> {
    let dir = match memory.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let meta = std::fs::metadata(&dir)
        .with_context(|| format!("--memory {}: directory {}", memory.display(), dir.display()))?;
    if !meta.is_dir() {
        bail!("--memory {}: {} is not a directory", memory.display(), dir.display());
    }
    let probe = partial_path(memory);
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&probe)
        .with_context(|| format!("--memory {}: cannot create files in {}", memory.display(), dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    match std::fs::metadata(memory) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("--memory {}", memory.display())),
        Ok(m) if !m.is_file() => bail!("--memory {} exists and is not a regular file", memory.display()),
        Ok(m) => {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(memory)
                .with_context(|| format!("--memory {} exists but cannot be written", memory.display()))?;
            Ok(Some(m.len()))
        }
    }
}

/// Where `serve` is, for what an interruption leaves behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ServeStage {
    /// No session yet.
    Listening,
    /// Receiving into `F.partial`.
    Copying,
    /// Receiving into `F` in place (handover offered).
    InPlace,
    /// The guest started here (post-copy switchover, or the end).
    GuestHere,
    /// `F` holds the verified memory, but `--resume-cmd` failed: the
    /// guest did not start here and the source keeps it.
    NotStarted,
}

pub(crate) fn serve(a: ServeArgs) -> Result<()> {
    let auth = a.auth.auth("serve")?;
    let existing = preflight(&a.memory)?;
    let max = a.max_memory_mib.map_or_else(physical_memory, |m| m << 20);
    let acceptor = Acceptor::bind(&resolve(&a.listen)?, auth)?;
    say!("pmigrate serve: listening on {:?}", acceptor.local_addrs());
    let memory = a.memory.clone();
    let partial = partial_path(&a.memory);
    let stage = Arc::new(Mutex::new(ServeStage::Listening));
    {
        let (stage, memory, partial) = (stage.clone(), memory.clone(), partial.clone());
        let warned = std::sync::atomic::AtomicBool::new(false);
        signals::on_signal(move |sig| {
            let s = *stage.lock().unwrap_or_else(|p| p.into_inner());
            let m = memory.display();
            Some(match s {
                ServeStage::Listening => format!("pmigrate serve: {sig}: stopped; no migration received, {m} untouched"),
                ServeStage::Copying => {
                    let _ = std::fs::remove_file(&partial);
                    format!("pmigrate serve: {sig}: migration cancelled, the source keeps the VM; {m} untouched")
                }
                ServeStage::InPlace => format!(
                    "pmigrate serve: {sig}: migration cancelled, the source keeps the VM; {m} was being filled in place \
                     and may be incomplete"
                ),
                ServeStage::GuestHere if !warned.swap(true, Ordering::AcqRel) => {
                    say!(
                        "pmigrate serve: {sig}: the guest already runs here and the migration is finishing; \
                         send it again to abort anyway (the guest here would be incomplete)"
                    );
                    return None;
                }
                ServeStage::GuestHere => {
                    format!("pmigrate serve: {sig}: aborted after the guest started here; its memory is incomplete")
                }
                ServeStage::NotStarted => format!(
                    "pmigrate serve: {sig}: stopped; the guest did not start here, the source keeps the VM; {m} holds                      its memory as of the pause"
                ),
            })
        })?;
    }
    let no_zero_copy = a.no_zero_copy;
    let dir = match a.memory.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let deadline = Instant::now() + Duration::from_secs(a.wait);
    let set_stage = |s| *stage.lock().unwrap_or_else(|p| p.into_inner()) = s;
    // Sessions until one lands: one that fails before anything of it
    // remains here (the copy path, before the guest started here) leaves
    // the memory file untouched, and the next is served.
    loop {
        let incoming = Incoming::accept(
            &acceptor,
            |o| {
                if o.regions.len() != 1 {
                    return Err(format!("memory files hold one region; the source has {}", o.regions.len()));
                }
                let len = o.regions[0].len;
                match existing {
                    Some(have) if have != len => {
                        return Err(format!("{} holds {have} bytes, the source's memory {len} bytes", memory.display()))
                    }
                    None if len > max => {
                        return Err(format!(
                            "the source's memory of {len} bytes exceeds this destination's limit of {max} bytes \
                             (--max-memory-mib)"
                        ))
                    }
                    None if room_in(&dir).is_some_and(|room| room < len) => {
                        return Err(format!(
                            "{} has room for {} bytes, the source's memory is {len} bytes",
                            dir.display(),
                            room_in(&dir).unwrap_or(0)
                        ))
                    }
                    _ => {}
                }
                // Handover only into a file that exists (it may be the
                // source's own memory) and never in post-copy, which serves
                // faults from private memory.
                Ok(Grant { handover: existing.is_some() && !no_zero_copy && !o.postcopy })
            },
            Some(deadline),
        )?;
        let peer = incoming.peer_addr().map_or_else(|| "?".to_string(), |p| p.to_string());
        let r = incoming.regions()[0];
        let in_place = !incoming.handover_regions().is_empty();
        set_stage(if in_place { ServeStage::InPlace } else { ServeStage::Copying });
        let res = if in_place {
            say!(
                "pmigrate serve: the source offers its memory for handover: proving whether {} is it",
                a.memory.display()
            );
            receive_in_place(&a, incoming, r, &set_stage)?
        } else {
            match receive_copy(&a, incoming, r, &partial, &set_stage) {
                Ok(res) => res,
                Err(e) => {
                    let _ = std::fs::remove_file(&partial);
                    return Err(e);
                }
            }
        };
        let e = match res {
            Ok(report) => {
                if a.json {
                    outln!("{}", report.to_json());
                } else {
                    outln!("{report}");
                }
                return Ok(());
            }
            Err(e) => e,
        };
        let _ = std::fs::remove_file(&partial);
        let now = *stage.lock().unwrap_or_else(|p| p.into_inner());
        let guest_here = now == ServeStage::GuestHere;
        let state = match (&e, guest_here, in_place) {
            (MigrateError::Untold(_), ..) => format!("the guest runs here with {} complete", a.memory.display()),
            _ if now == ServeStage::NotStarted => format!(
                "the guest did not start here, the source keeps the VM; {} holds its memory as of the pause",
                a.memory.display()
            ),
            (_, true, _) => "the guest started here and its memory is incomplete: stop it".to_string(),
            (_, false, true) => {
                format!("the source keeps the VM; {} was filled in place and may be incomplete", a.memory.display())
            }
            (_, false, false) => {
                tracing::warn!(
                    peer = %peer,
                    reason = crate::one_line(&anyhow::Error::new(e)),
                    "migration failed; the source keeps the VM, {} untouched; waiting for another",
                    a.memory.display()
                );
                set_stage(ServeStage::Listening);
                continue;
            }
        };
        return Err(anyhow::Error::new(e).context(format!("migration failed ({state})")));
    }
}

/// Receives into `F` mapped in place: the source proves whether it is its
/// own memory, and copies every page into it otherwise.
fn receive_in_place(
    a: &ServeArgs,
    incoming: Incoming,
    r: pmigrate::RegionDesc,
    set_stage: &(dyn Fn(ServeStage) + Sync),
) -> Result<Result<pmigrate::Report, MigrateError>> {
    // No blocks are reserved up front (that cost 0.13 s a 512 MiB on
    // tmpfs, with the source already sending): the room was checked when
    // the session was accepted, and pages are written with pwrite, so a
    // file system that fills up meanwhile is a clean failure, not SIGBUS.
    let region = GuestRegion::file(r.gpa, r.len, HostPageSize::Small, &a.memory, true, false);
    let mem = match region.and_then(|r| GuestMemory::new(vec![r])) {
        Ok(m) => m,
        Err(e) => return Ok(Err(e.into())),
    };
    let opts = receive_options(a);
    Ok(incoming.receive_and_run(&mem, &opts, || {
        mem.regions().iter().try_for_each(|r| r.flush())?;
        Ok(start_guest(a, set_stage, ServeStage::InPlace)?)
    }))
}

/// Receives into `F.partial` (post-copy: into private memory, written to
/// `F.partial` at the end) and renames it to `F` once verified, before the
/// guest starts (pre-copy) or at the end (post-copy). The outer error is
/// the post-copy end's: the guest runs here, but `F` could not be written.
fn receive_copy(
    a: &ServeArgs,
    incoming: Incoming,
    r: pmigrate::RegionDesc,
    partial: &Path,
    set_stage: &(dyn Fn(ServeStage) + Sync),
) -> Result<Result<pmigrate::Report, MigrateError>> {
    let region = GuestRegion::file(r.gpa, r.len, HostPageSize::Small, partial, true, true);
    let file = match region.and_then(|r| GuestMemory::new(vec![r])) {
        Ok(f) => f,
        Err(e) => return Ok(Err(e.into())),
    };
    let opts = receive_options(a);
    let install = |file: &GuestMemory| -> Result<(), String> {
        file.regions().iter().try_for_each(|r| r.flush()).map_err(|e| e.to_string())?;
        std::fs::rename(partial, &a.memory)
            .map_err(|e| format!("rename {} to {}: {e}", partial.display(), a.memory.display()))
    };
    if !incoming.is_postcopy() {
        return Ok(incoming.receive_and_run(&file, &opts, || {
            install(&file)?;
            Ok(start_guest(a, set_stage, ServeStage::NotStarted)?)
        }));
    }
    // Post-copy places pages into private anonymous memory (that is what
    // userfaultfd's missing-page mode serves); the file gets them at the
    // end. The guest runs here from the switchover.
    let anon = GuestRegion::anonymous(r.gpa, r.len, HostPageSize::Small).and_then(|r| GuestMemory::new(vec![r]));
    let mem = match anon {
        Ok(m) => m,
        Err(e) => return Ok(Err(e.into())),
    };
    let report = match incoming.receive_and_run(&mem, &opts, || Ok(start_guest(a, set_stage, ServeStage::Copying)?)) {
        Ok(r) => r,
        Err(e) => return Ok(Err(e)),
    };
    let written = copy_memory(&mem, &file).map_err(|e| e.to_string()).and_then(|()| install(&file));
    written.map_err(|e| {
        anyhow::anyhow!(
            "the migration completed and the guest runs here, but its memory could not be written to {}: {e}",
            a.memory.display()
        )
    })?;
    Ok(Ok(report))
}

fn receive_options(a: &ServeArgs) -> ReceiveOptions {
    ReceiveOptions {
        verify_memory: a.verify_memory,
        io: a.io,
        progress_timeout: Duration::from_secs(a.progress_timeout),
    }
}

/// The guest may start here: runs `--resume-cmd`. If it fails, the guest
/// did not start, and the stage becomes `failed`.
fn start_guest(a: &ServeArgs, set_stage: &(dyn Fn(ServeStage) + Sync), failed: ServeStage) -> Result<(), String> {
    set_stage(ServeStage::GuestHere);
    let started = match &a.resume_cmd {
        None => Ok(()),
        Some(cmd) => run_hook(cmd),
    };
    if started.is_err() {
        set_stage(failed);
    }
    started
}

/// Copies every page of `from` into `to` (same layout).
fn copy_memory(from: &GuestMemory, to: &GuestMemory) -> Result<(), pmigrate::MemoryError> {
    let mut buf = vec![0u8; 256 * pmigrate::PAGE_SIZE];
    for (a, b) in from.regions().iter().zip(to.regions()) {
        let mut p = 0;
        while p < a.pages() {
            let n = (a.pages() - p).min(256);
            let bytes = &mut buf[..n as usize * pmigrate::PAGE_SIZE];
            a.read_pages(pmigrate::PageIdx(p), bytes)?;
            b.write_pages(pmigrate::PageIdx(p), bytes)?;
            p += n;
        }
    }
    Ok(())
}

/// A progress bar on stderr over a running source's counters, when stderr
/// is a terminal; it ends when the source drops its counters.
pub(crate) fn progress_bar(progress: Arc<Progress>) -> Option<std::thread::JoinHandle<()>> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    Some(std::thread::spawn(move || {
        let bar = indicatif::ProgressBar::new(1);
        bar.set_style(
            indicatif::ProgressStyle::with_template("round {msg} [{bar:40}] {pos}/{len} pages ({per_sec})")
                .expect("template")
                .progress_chars("=> "),
        );
        loop {
            let round = progress.round.load(Ordering::Relaxed);
            bar.set_length(progress.round_pages.load(Ordering::Relaxed).max(1));
            bar.set_position(progress.done_pages.load(Ordering::Relaxed));
            bar.set_message(format!(
                "{round}{}, {:.0} MiB sent",
                if progress.paused.load(Ordering::Relaxed) { " (paused)" } else { "" },
                progress.wire_bytes.load(Ordering::Relaxed) as f64 / (1 << 20) as f64
            ));
            if Arc::strong_count(&progress) == 1 {
                bar.finish_and_clear();
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }))
}

/// The source VM as `migrate` sees it: paused by `--pause-cmd`, resumed by
/// `--cont-cmd`. Its lock orders the hooks against a signal.
#[derive(Default)]
struct Vm {
    paused: bool,
}

fn lock(vm: &Mutex<Vm>) -> std::sync::MutexGuard<'_, Vm> {
    vm.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn migrate(a: MigrateArgs) -> Result<()> {
    let auth = a.auth.auth("migrate")?;
    let len = std::fs::metadata(&a.memory).with_context(|| format!("open {}", a.memory.display()))?.len();
    if len == 0 || len % 4096 != 0 {
        bail!("{} is {len} bytes, not a whole number of 4 KiB pages", a.memory.display());
    }
    let mem = GuestMemory::new(vec![GuestRegion::file(Gpa(0), len, HostPageSize::Small, &a.memory, true, false)?])?;
    let tracker = match a.tracker.as_str() {
        "hash" => TrackerKind::Hash,
        "uffd-wp" => TrackerKind::UffdWp,
        "auto" => TrackerKind::Auto,
        t => bail!("unknown tracker {t:?} (hash, uffd-wp, auto)"),
    };
    let cfg = SourceConfig {
        threads: a.streams.threads.max(1),
        compression: a.streams.compress,
        downtime_target: Duration::from_millis(a.downtime_ms),
        max_rounds: a.max_rounds,
        tracker,
        zero_copy: !a.no_zero_copy,
        postcopy: a.postcopy,
        io: a.streams.io,
        zero_copy_send: a.zero_copy_send,
        progress_timeout: Duration::from_secs(a.streams.progress_timeout),
        link_timeout: Duration::from_secs(a.streams.link_timeout),
        ..SourceConfig::default()
    };
    let hints = |file: &Option<PathBuf>| -> Result<Vec<pmigrate::PageRange>> {
        let Some(p) = file else { return Ok(Vec::new()) };
        let text = std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))?;
        pmigrate::parse_free_pages(&text, &mem).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
    };
    let (free, working_set) = (hints(&a.free_pages)?, hints(&a.working_set)?);
    let vm = Arc::new(Mutex::new(Vm::default()));
    let (pause_cmd, cont_cmd) = (a.pause_cmd.clone(), a.cont_cmd.clone());
    let source = Source::new(&mem, resolve(&a.dest)?, auth)
        .free_pages(free)
        .working_set(working_set)
        .streams(a.streams.streams)
        .via(a.streams.via.clone())
        .config(cfg)
        .on_pause({
            let vm = vm.clone();
            move || {
                let mut v = lock(&vm);
                if let Some(cmd) = &pause_cmd {
                    run_hook(cmd)?;
                }
                v.paused = true;
                Ok(())
            }
        })
        .on_abort({
            let (vm, cont) = (vm.clone(), cont_cmd.clone());
            move || {
                let mut v = lock(&vm);
                if let (true, Some(cmd)) = (v.paused, &cont) {
                    run_hook(cmd)?;
                    v.paused = false;
                }
                Ok(())
            }
        });
    let progress = source.progress();
    {
        let (vm, progress, cont) = (vm.clone(), progress.clone(), cont_cmd.clone());
        let warned = std::sync::atomic::AtomicBool::new(false);
        signals::on_signal(move |sig| {
            if progress.handed_over.load(Ordering::Acquire) {
                if !warned.swap(true, Ordering::AcqRel) {
                    say!(
                        "pmigrate migrate: {sig}: the guest was handed over (post-copy) and needs the rest of its \
                         memory from here; finishing (send it again to abort: the guest there would be incomplete)"
                    );
                    return None;
                }
                return Some(format!(
                    "pmigrate migrate: {sig}: aborted after the post-copy switchover; the guest at the destination \
                     is incomplete"
                ));
            }
            let mut v = lock(&vm);
            let state = match (v.paused, &cont) {
                (false, _) => "the VM keeps running here".to_string(),
                (true, Some(cmd)) => match run_hook(cmd) {
                    Ok(()) => {
                        v.paused = false;
                        "the VM was resumed here (--cont-cmd)".to_string()
                    }
                    Err(e) => format!("the VM is paused here and --cont-cmd failed ({e}): resume it"),
                },
                (true, None) => "the VM is paused here (--pause-cmd ran, no --cont-cmd): resume it".to_string(),
            };
            // Hold the lock: no hook may run while the process ends.
            std::mem::forget(v);
            Some(format!("pmigrate migrate: {sig}: migration cancelled, nothing was handed over; {state}"))
        })?;
    }
    let bar = progress_bar(progress.clone());
    let report = source.run();
    if let Some(b) = bar {
        let _ = b.join();
    }
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            let state = if !e.source_keeps_guest() {
                "the VM has left this host, or may have: see why"
            } else if !progress.paused.load(Ordering::Acquire) {
                "the VM keeps running here, nothing was handed over"
            } else if !lock(&vm).paused {
                "the VM was resumed here (--cont-cmd)"
            } else if cont_cmd.is_some() {
                "the VM is paused here and --cont-cmd failed: resume it"
            } else {
                "the VM is paused here (--pause-cmd ran, no --cont-cmd): resume it"
            };
            return Err(anyhow::Error::new(e).context(format!("migration failed ({state})")));
        }
    };
    if a.json {
        outln!("{}", report.to_json());
    } else {
        outln!("{report}");
    }
    Ok(())
}
