//! The fault-injection matrix: the real `pmigrate` binary on
//! every path — pre-copy, post-copy and hybrid memory migration
//! (`serve`/`migrate`; hybrid also with a guest dirtying its memory until
//! the pause), the exec relay (`send`/`recv`) and the proxy
//! (`proxy entry`/`proxy exit`) — under link faults (a userspace netem:
//! delay and jitter, 1 % loss, reordering, duplication, 0.1 % corruption),
//! a connection reset at a seeded byte offset, SIGSTOP and SIGKILL of
//! either end at a seeded point, a full disk at the destination, and a
//! destination whose guest cannot start (its resume command fails).
//!
//! Every run is judged (see `faults/judge.rs`): byte-exact, or a clean
//! failure with the VM (the stream) left at the source and one clear line,
//! or — only where the fault disabled an end (or cut the verdict) around
//! the handover — honest: every end that ran told the truth about where
//! the VM is. Anything else is WRONG, printed with its
//! cell, seed, size, reasons, both ends' stderr and a repro line.
//!
//! - `reduced_fault_matrix` (default run): a few seeded cells per path.
//! - `stress_fault_matrix` (`--ignored`): every cell, at least
//!   `PMIGRATE_FAULT_FAULTS` (500) faults that fired, or
//!   `PMIGRATE_FAULT_RUNS` runs; `PMIGRATE_FAULT_JOBS` at once (2).
//! - `PMIGRATE_FAULT_REPRO=<cell>:<seed>:<MiB>` (e.g. `post/cut:7:32`)
//!   makes either test run that one run alone.
//!
//! Needs root (network namespaces, `/dev/net/tun`, tmpfs mounts); skips
//! with a reason otherwise.

#[path = "../../tests/support/cutter.rs"]
mod cutter;
#[path = "../../tests/support/keys.rs"]
mod keys;
#[path = "../../tests/support/netem.rs"]
mod netem;

/// The test certificates of TLS runs, written once per test process.
mod pki {
    use std::path::PathBuf;
    use std::sync::OnceLock;

    pub fn dir() -> PathBuf {
        static DIR: OnceLock<PathBuf> = OnceLock::new();
        DIR.get_or_init(|| pmigrate_transport::tls::test_pki::pki_dir("faults")).clone()
    }
}

#[path = "faults/bed.rs"]
mod bed;
#[path = "faults/cells.rs"]
mod cells;
#[path = "faults/judge.rs"]
mod judge;
#[path = "faults/runs.rs"]
mod runs;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use cells::{Cell, Fault, Path, Run};
use judge::Verdict;

/// Why the matrix cannot run here, if it cannot.
fn missing_privileges() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (network namespaces, TUN devices and tmpfs mounts need it)".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun".into());
    }
    match std::process::Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("no `ip` (iproute2)".into()),
    }
}

/// The outcomes of a set of runs.
#[derive(Default)]
struct Tally {
    /// Per cell: runs, exact, clean, honest, wrong, faults fired.
    cells: BTreeMap<Cell, [usize; 6]>,
    wrong: Vec<String>,
}

impl Tally {
    fn add(&mut self, run: &Run, verdict: &Verdict, fired: bool) {
        let row = self.cells.entry(run.cell).or_default();
        row[0] += 1;
        row[match verdict {
            Verdict::Exact => 1,
            Verdict::Clean => 2,
            Verdict::Honest => 3,
            Verdict::Wrong(_) => 4,
        }] += 1;
        row[5] += usize::from(fired);
    }

    fn fired(&self) -> usize {
        self.cells.values().map(|r| r[5]).sum()
    }

    fn runs(&self) -> usize {
        self.cells.values().map(|r| r[0]).sum()
    }

    fn table(&self) -> String {
        let mut t = format!(
            "{:<18} {:>5} {:>6} {:>6} {:>14} {:>12} {:>6}\n",
            "cell", "runs", "fired", "exact", "clean failure", "honest", "WRONG"
        );
        let mut total = [0usize; 6];
        for (cell, r) in &self.cells {
            t.push_str(&format!(
                "{:<18} {:>5} {:>6} {:>6} {:>14} {:>12} {:>6}\n",
                cell.to_string(),
                r[0],
                r[5],
                r[1],
                r[2],
                r[3],
                r[4]
            ));
            for (a, b) in total.iter_mut().zip(r) {
                *a += b;
            }
        }
        t.push_str(&format!(
            "{:<18} {:>5} {:>6} {:>6} {:>14} {:>12} {:>6}\n",
            "total", total[0], total[5], total[1], total[2], total[3], total[4]
        ));
        t
    }
}

/// Runs one run, judges it, prints a line (and, when wrong, everything
/// needed to look into it).
fn one(run: &Run, tally: &Mutex<Tally>) {
    let t = Instant::now();
    let plan = run.plan();
    let (observed, fired) = runs::run(run);
    let verdict = judge::judge(run, &plan, &observed);
    let line = format!(
        "{:<19} seed {:>4} {:>3} MiB {:<12}  {:<13} {:>5.1} s  fault {}: {}",
        run.cell.to_string(),
        run.seed,
        run.mib,
        plan.to_string(),
        verdict.name(),
        t.elapsed().as_secs_f64(),
        if fired.fired { "fired" } else { "did not fire" },
        fired.what
    );
    let (src, dst) = match &observed {
        runs::Observed::Memory(m) => (&m.src, &m.dst),
        runs::Observed::Stream(s) => (&s.src, &s.dst),
    };
    let mut line = line;
    if let runs::Observed::Memory(m) = &observed {
        if let Some(n) = m.reconnects.filter(|&n| n > 0) {
            line.push_str(&format!(", {n} reconnects"));
        }
    }
    if verdict != Verdict::Exact {
        // What each end said, for the record.
        for e in [src, dst] {
            if let Some(l) = e.error_lines().first() {
                line.push_str(&format!("\n      {l}"));
            }
        }
    }
    eprintln!("{line}");
    let mut g = tally.lock().unwrap_or_else(|p| p.into_inner());
    g.add(run, &verdict, fired.fired);
    if let Verdict::Wrong(reasons) = &verdict {
        let report = format!(
            "WRONG {} seed {} {} MiB {plan}\n  why: {}\n  observed: {}\n  source end ({:?}):\n{}  destination end ({:?}):\n{}  \
             repro: {}\n",
            run.cell,
            run.seed,
            run.mib,
            reasons.join("; "),
            summary(&observed),
            src.status,
            indent(&src.log),
            dst.status,
            indent(&dst.log),
            run.repro()
        );
        eprintln!("{report}");
        g.wrong.push(report);
    }
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}\n")).collect()
}

fn summary(o: &runs::Observed) -> String {
    match o {
        runs::Observed::Memory(m) => format!(
            "pause {} cont {} resume {} (verified {}), source memory unchanged {}, destination file {:?}, partial \
             left {}, reconnects {:?}, killed src/dst {}/{}, stopped src/dst {}/{}",
            m.paused,
            m.conts,
            m.resumes,
            m.resumed_verified,
            m.src_unchanged,
            m.dst_file,
            m.partial_left,
            m.reconnects,
            m.src.killed,
            m.dst.killed,
            m.src.stopped,
            m.dst.stopped
        ),
        runs::Observed::Stream(s) => format!(
            "forward {} bytes (prefix {}, whole {}, clean end {}), back (prefix {}, whole {}, clean end {}), entry \
             lines {:?} alive {}, exit lines {:?} alive {}, hung {}, killed src/dst {}/{}",
            s.fwd_len,
            s.fwd_prefix,
            s.fwd_whole,
            s.fwd_clean_end,
            s.back_prefix,
            s.back_whole,
            s.back_clean_end,
            s.src_lines,
            s.src_alive,
            s.dst_lines,
            s.dst_alive,
            s.hung,
            s.src.killed,
            s.dst.killed
        ),
    }
}

/// Runs `list` with `jobs` runs at once; returns the tally.
fn run_all(list: &[Run], jobs: usize) -> Tally {
    let tally = Mutex::new(Tally::default());
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(run) = list.get(i) else { return };
                one(run, &tally);
            });
        }
    });
    tally.into_inner().unwrap_or_else(|p| p.into_inner())
}

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// The one run `PMIGRATE_FAULT_REPRO` names, if set.
fn repro() -> Option<Run> {
    let v = std::env::var("PMIGRATE_FAULT_REPRO").ok()?;
    Some(Run::parse(&v).unwrap_or_else(|| panic!("PMIGRATE_FAULT_REPRO={v:?}: want <path>/<fault>:<seed>:<MiB>")))
}

fn finish(name: &str, tally: &Tally, started: Instant) {
    eprintln!(
        "\n{name}: {} runs, {} faults fired, {:.0} s\n{}",
        tally.runs(),
        tally.fired(),
        started.elapsed().as_secs_f64(),
        tally.table()
    );
    assert!(tally.wrong.is_empty(), "{} wrong outcomes:\n{}", tally.wrong.len(), tally.wrong.join("\n"));
}

/// The reduced matrix: a few seeded cells per path, every outcome right.
#[test]
fn reduced_fault_matrix() {
    if let Some(why) = missing_privileges() {
        eprintln!("skipping reduced_fault_matrix: {why}");
        return;
    }
    let started = Instant::now();
    let list = match repro() {
        Some(r) => vec![r],
        None => reduced_runs(),
    };
    let tally = run_all(&list, env_usize("PMIGRATE_FAULT_JOBS").unwrap_or(2));
    finish("reduced fault matrix", &tally, started);
}

/// The reduced matrix's runs: each path under the link faults and the
/// faults of an end, small memories, fixed seeds.
fn reduced_runs() -> Vec<Run> {
    use Fault::*;
    use Path::*;
    let r = |path, fault, seed, mib| Run { cell: Cell { path, fault }, seed, mib };
    vec![
        r(Pre, Netem, 1, 16),
        r(Pre, Cut, 2, 32),
        r(Pre, KillDst, 3, 32),
        r(Pre, StopSrc, 4, 32),
        r(Pre, DiskFull, 5, 32),
        r(Pre, ResumeFails, 6, 32),
        r(Post, Netem, 1, 16),
        r(Post, Cut, 2, 32),
        r(Post, Cut, 3, 32),
        r(Post, KillSrc, 4, 32),
        r(Post, StopDst, 5, 32),
        r(Post, DiskFull, 6, 32),
        r(Hybrid, Netem, 1, 16),
        r(Hybrid, Cut, 2, 32),
        r(Hybrid, KillDst, 3, 32),
        r(Hybrid, ResumeFails, 4, 32),
        r(HybridDirty, Netem, 1, 16),
        r(HybridDirty, Cut, 2, 32),
        r(HybridDirty, KillSrc, 3, 32),
        r(Exec, Netem, 1, 16),
        r(Exec, Cut, 2, 32),
        r(Exec, KillSrc, 3, 32),
        r(Exec, StopDst, 4, 32),
        r(Proxy, Netem, 1, 16),
        r(Proxy, Cut, 2, 32),
        r(Proxy, KillDst, 3, 32),
        r(Proxy, StopSrc, 4, 32),
    ]
}

/// The full matrix: every cell in turn, seeds counting up, sizes 16 to 64
/// MiB, until enough faults fired (or the runs asked for were made).
#[test]
#[ignore = "stress: tens of minutes; run with --ignored"]
fn stress_fault_matrix() {
    if let Some(why) = missing_privileges() {
        eprintln!("skipping stress_fault_matrix: {why}");
        return;
    }
    let started = Instant::now();
    let jobs = env_usize("PMIGRATE_FAULT_JOBS").unwrap_or(2);
    if let Some(r) = repro() {
        let tally = run_all(&[r], 1);
        finish("repro", &tally, started);
        return;
    }
    // `PMIGRATE_FAULT_PATHS=hybrid-dirty,exec`: only those paths' cells.
    let paths = std::env::var("PMIGRATE_FAULT_PATHS").ok();
    let cells: Vec<Cell> = Cell::all()
        .into_iter()
        .filter(|c| paths.as_deref().is_none_or(|p| p.split(',').any(|n| n.trim() == c.path.name())))
        .collect();
    assert!(!cells.is_empty(), "PMIGRATE_FAULT_PATHS={paths:?} names no path");
    let sizes = [16, 32, 48, 64];
    let first_seed = env_usize("PMIGRATE_FAULT_SEED").unwrap_or(1000) as u64;
    let runs_asked = env_usize("PMIGRATE_FAULT_RUNS");
    let faults_asked = env_usize("PMIGRATE_FAULT_FAULTS").unwrap_or(500);
    let mut tally = Tally::default();
    let mut seed = first_seed;
    // Batches of one run per cell until the goal is met.
    loop {
        let done = match runs_asked {
            Some(n) => tally.runs() >= n,
            None => tally.fired() >= faults_asked,
        };
        if done {
            break;
        }
        let mut batch: Vec<Run> = cells
            .iter()
            .enumerate()
            .map(|(i, &cell)| Run { cell, seed, mib: sizes[(seed as usize + i) % sizes.len()] })
            .collect();
        if let Some(n) = runs_asked {
            batch.truncate(n - tally.runs());
        }
        let t = run_all(&batch, jobs);
        for (cell, row) in t.cells {
            let mine = tally.cells.entry(cell).or_default();
            for (a, b) in mine.iter_mut().zip(row) {
                *a += b;
            }
        }
        tally.wrong.extend(t.wrong);
        seed += 1;
        eprintln!("-- {} runs, {} faults fired, {} wrong so far", tally.runs(), tally.fired(), tally.wrong.len());
    }
    finish("stress fault matrix", &tally, started);
}
