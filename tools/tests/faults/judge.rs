//! The judge: every run ends byte-exact or as a clean failure, and where a
//! fault disabled an end after the VM left the source (or in doubt), both
//! ends say so truthfully. Anything else is wrong, with the reasons.
//!
//! Memory sessions model the VM with hooks: `--pause-cmd` and
//! `--cont-cmd` at the source, `--resume-cmd` at the destination, each
//! appending a line to a marker file. The VM runs at the source when it was
//! never paused or was continued, at the destination when it was resumed
//! there; never both, and never neither unless the fault disabled an end or
//! the source says the outcome is unknown.

use crate::bed::Ended;
use crate::cells::{Fault, Path, Plan, Run};
use crate::runs::{MemoryObs, Observed, StreamObs};

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Both ends succeeded and the data arrived whole.
    Exact,
    /// Both ends failed (or were killed), said why in one line, and the VM
    /// (the stream) stayed with the source; nothing incomplete looks whole.
    Clean,
    /// The fault disabled an end (or cut the verdict on its way) around the
    /// handover, and every end that ran told the truth about the VM: it
    /// runs at the destination (complete, the source gone), or there
    /// incomplete, or the outcome is unknown and said to be.
    Honest,
    /// Anything else.
    Wrong(Vec<String>),
}

impl Verdict {
    pub fn name(&self) -> &'static str {
        match self {
            Verdict::Exact => "exact",
            Verdict::Clean => "clean failure",
            Verdict::Honest => "honest",
            Verdict::Wrong(_) => "WRONG",
        }
    }
}

/// Judges one run.
pub fn judge(run: &Run, plan: &Plan, o: &Observed) -> Verdict {
    match o {
        Observed::Memory(m) => memory(run, plan, m),
        Observed::Stream(s) if run.cell.path == Path::Exec => exec(s),
        Observed::Stream(s) => proxy(s),
    }
}

/// What every process must show: it ended (no hang), by itself or by our
/// signal only, without a panic, and blames no local pipe (the test's
/// readers never stop reading).
fn process(name: &str, e: &Ended, bad: &mut Vec<String>) {
    match (e.status, e.signal()) {
        (None, _) => bad.push(format!("{name} hung: still running at the deadline")),
        (_, Some(libc::SIGKILL)) if e.killed => {}
        (_, Some(sig)) => bad.push(format!("{name} died of signal {sig}")),
        _ => {}
    }
    if e.log.contains("panicked") || e.log.contains("RUST_BACKTRACE") {
        bad.push(format!("{name} panicked"));
    }
    if e.log.contains("stopped reading") {
        bad.push(format!("{name} blames a local reader that never stopped reading"));
    }
}

/// A process that failed by itself says why in exactly one error line.
fn one_error_line<'a>(name: &str, e: &'a Ended, bad: &mut Vec<String>) -> Option<&'a str> {
    if !e.failed() {
        return None;
    }
    let lines = e.error_lines();
    match lines.as_slice() {
        [one] if one.len() > "pmigrate: error: ".len() + 10 => Some(one),
        [one] => {
            bad.push(format!("{name}'s error line says nothing: {one:?}"));
            Some(one)
        }
        _ => {
            bad.push(format!("{name} failed with {} error lines, not one", lines.len()));
            lines.first().copied()
        }
    }
}

fn memory(run: &Run, plan: &Plan, o: &MemoryObs) -> Verdict {
    let mut bad = Vec::new();
    let (path, fault) = (run.cell.path, run.cell.fault);
    let post = path.is_postcopy();
    let link = fault.is_link();
    let src_disabled = o.src.killed || (o.src.stopped && plan.long_stop());
    let dst_disabled = o.dst.killed || (o.dst.stopped && plan.long_stop());
    process("migrate", &o.src, &mut bad);
    process("serve", &o.dst, &mut bad);

    // The VM's hooks.
    if !o.src_unchanged {
        bad.push("the source's memory file changed".into());
    }
    if o.paused > 1 || o.conts > 1 || o.resumes > 1 {
        bad.push(format!("a hook ran twice: pause {}, cont {}, resume {}", o.paused, o.conts, o.resumes));
    }
    if o.conts > o.paused {
        bad.push("--cont-cmd ran without --pause-cmd".into());
    }
    if o.resumes >= 1 && (o.paused == 0 || o.conts > 0) {
        bad.push(format!(
            "split brain: the destination resumed the VM while the source ran it (pause {}, cont {})",
            o.paused, o.conts
        ));
    }
    if path == Path::Pre && o.resumes >= 1 && o.resumed_verified == 0 {
        bad.push("the destination resumed the VM before its memory file was in place and whole".into());
    }
    if o.dst_file == Some(false) {
        bad.push("the destination's memory file exists and is not the source's memory".into());
    }
    if o.partial_left && !o.dst.killed {
        bad.push("a .partial file was left".into());
    }

    // What success claims.
    if o.src.success() {
        if o.resumes != 1 || o.paused != 1 || o.conts != 0 {
            bad.push("the source exited 0 but the VM did not move (hooks)".into());
        }
        if !o.dst.success() && !o.dst.killed {
            bad.push("the source exited 0 but the destination failed".into());
        }
    }
    if o.dst.success() && (o.dst_file != Some(true) || o.resumes != 1) {
        bad.push("the destination exited 0 without the whole memory and a started VM".into());
    }
    if o.guest_writes == Some(0) {
        bad.push("the dirtying guest never wrote: the run proves nothing about dirtied pages".into());
    }

    // What the source's failure claims.
    let mut in_doubt = false;
    if let Some(line) = one_error_line("migrate", &o.src, &mut bad) {
        if line.contains("the VM keeps running here") {
            if o.paused != 0 || o.resumes != 0 {
                bad.push("the source says the VM kept running there, but it was paused or resumed elsewhere".into());
            }
        } else if line.contains("the VM was resumed here (--cont-cmd)") {
            if o.paused != 1 || o.conts != 1 || o.resumes != 0 {
                bad.push("the source says it resumed the VM, the hooks disagree".into());
            }
        } else if line.contains("has left this host, or may have") {
            if o.paused != 1 || o.conts != 0 {
                bad.push("the source says the VM left, the hooks disagree".into());
            }
            if line.contains("handed over at the post-copy switchover") {
                if !post {
                    bad.push("a pre-copy source says it handed over at a post-copy switchover".into());
                }
                if link {
                    bad.push("post-copy did not recover from a link fault (the source gave the VM up)".into());
                }
                if o.resumes == 0 && !dst_disabled {
                    bad.push(
                        "the source says the VM was handed over, the destination never started it: it runs nowhere"
                            .into(),
                    );
                }
                if !dst_disabled && !src_disabled && !link {
                    bad.push("the source gave up a handed-over VM although both ends ran".into());
                }
            } else if line.contains("no verdict from the destination") {
                in_doubt = true;
                if post && link {
                    bad.push("post-copy did not recover from a link fault (the source says unconfirmed)".into());
                } else if !(dst_disabled || src_disabled || link) {
                    bad.push("the source says the verdict was lost, but neither the link nor an end failed".into());
                }
            } else {
                bad.push(format!("the source's error line does not say why the VM left: {line:?}"));
            }
        } else {
            bad.push(format!("the source's error line does not say where the VM is: {line:?}"));
        }
    }
    if o.src.terminated {
        bad.push("migrate had to be stopped".into());
    }

    // What the destination's failure claims.
    let dst_log = &o.dst.log;
    if let Some(line) = one_error_line("serve", &o.dst, &mut bad) {
        if line.contains("the guest runs here with") {
            if o.resumes != 1 || o.dst_file != Some(true) {
                bad.push("the destination says the guest runs there whole, the hooks or the file disagree".into());
            }
            in_doubt = true;
        } else if line.contains("its memory is incomplete") {
            if o.resumes != 1 {
                bad.push("the destination says its incomplete guest started, but it never resumed it".into());
            }
            if link || fault == Fault::DiskFull || !(src_disabled || dst_disabled) {
                bad.push("post-copy left an incomplete guest although both ends ran".into());
            }
        } else if line.contains("the source keeps the VM") {
            if o.resumes != 0 {
                bad.push("the destination says the source keeps the VM, but it resumed it".into());
            }
        } else {
            bad.push(format!("the destination's error line does not say where the VM is: {line:?}"));
        }
    }
    if o.dst.terminated {
        // Left waiting for another session: only once this one failed with
        // the VM at the source, and SIGTERM then stops it at once.
        if o.dst.code() != Some(143) || !dst_log.contains("stopped; no migration received") {
            bad.push("serve did not end, nor wait idle for another session (a hang)".into());
        }
        if o.resumes != 0 {
            bad.push("serve waits for another session after it resumed the VM".into());
        }
    }
    if dst_log.contains("the source keeps the VM") && o.resumes != 0 {
        bad.push("serve says the source keeps the VM, but it resumed it".into());
    }

    // Exactly one owner.
    let src_owns = !o.src.killed && (o.paused == 0 || o.conts == 1);
    let dst_owns = o.resumes == 1 && !o.dst.killed;
    let excused = src_disabled || dst_disabled || in_doubt;
    if !src_owns && !dst_owns && !excused {
        bad.push("the VM runs nowhere, and no fault disabled an end".into());
    }

    let exact = o.src.success() && o.dst.success() && o.dst_file == Some(true) && o.resumes == 1;
    let clean = !o.src.success() && !o.dst.success() && o.resumes == 0 && (src_owns || o.src.killed);
    if fault == Fault::ResumeFails && !clean {
        // Nothing disabled an end: the source must know its guest did not
        // start there, and run it again.
        bad.push("the guest could not start at the destination, and the source did not keep it".into());
    }
    if !exact && !clean && bad.is_empty() {
        // Honest is right only where the fault could cause it: an
        // end disabled, or (pre-copy) the verdict lost on a broken link.
        if !(src_disabled || dst_disabled || (link && !post)) {
            bad.push("neither exact nor a clean failure, and no end was disabled".into());
        }
        if post && link {
            bad.push("post-copy did not recover from a link fault".into());
        }
    }
    if !bad.is_empty() {
        return Verdict::Wrong(bad);
    }
    if exact {
        Verdict::Exact
    } else if clean {
        Verdict::Clean
    } else {
        Verdict::Honest
    }
}

fn exec(o: &StreamObs) -> Verdict {
    let mut bad = Vec::new();
    process("send", &o.src, &mut bad);
    process("recv", &o.dst, &mut bad);
    if !o.fwd_prefix {
        bad.push("recv's stdout is not a prefix of send's stdin".into());
    }
    if !o.back_prefix {
        bad.push("send's stdout (the way back) is not a prefix of recv's stdin".into());
    }
    if o.src.success() && !o.fwd_whole {
        bad.push(format!("send exited 0 but recv delivered {} bytes, not all", o.fwd_len));
    }
    if o.dst.success() && !o.fwd_whole {
        bad.push(format!("recv exited 0 after delivering {} bytes, not all", o.fwd_len));
    }
    if o.dst.success() && !o.back_whole && !o.src.killed {
        bad.push("recv exited 0 but the way back did not arrive whole".into());
    }
    one_error_line("send", &o.src, &mut bad);
    one_error_line("recv", &o.dst, &mut bad);
    if o.src.terminated {
        bad.push("send had to be stopped".into());
    }
    if o.dst.terminated && !o.dst.log.contains("before the source connected") {
        bad.push("recv did not end after its sender ended (a hang)".into());
    }
    if !bad.is_empty() {
        return Verdict::Wrong(bad);
    }
    if o.src.success() && o.dst.success() && o.fwd_whole && o.back_whole {
        Verdict::Exact
    } else {
        Verdict::Clean
    }
}

fn proxy(o: &StreamObs) -> Verdict {
    let mut bad = Vec::new();
    // The daemons were stopped with SIGTERM at the end (or killed by the
    // fault); anything else ended them wrongly.
    for (name, e, alive) in [("proxy entry", &o.src, o.src_alive), ("proxy exit", &o.dst, o.dst_alive)] {
        process(name, e, &mut bad);
        if !e.killed && !alive {
            bad.push(format!("{name} exited after a connection failed; it should serve on"));
        }
        if !e.killed && alive && e.code() != Some(143) {
            bad.push(format!("{name} did not stop on SIGTERM with 143: {:?}", e.status));
        }
    }
    if o.hung {
        bad.push("the carried connection did not end at either side by the deadline".into());
    }
    if !o.fwd_prefix {
        bad.push("the target got bytes that are not a prefix of the stream".into());
    }
    if !o.back_prefix {
        bad.push("the client got bytes that are not a prefix of the reply".into());
    }
    if !o.fwd_whole && o.fwd_clean_end && !o.dst.killed {
        bad.push(format!("the target saw a clean end after {} bytes of a cut-short stream", o.fwd_len));
    }
    if !o.back_whole && o.back_clean_end && !o.src.killed {
        bad.push("the client saw a clean end of a cut-short reply".into());
    }
    // Each end that still runs says how the connection ended, once: the
    // entry always (it accepted it), the exit once it opened it.
    let (_, sd, sf) = o.src_lines;
    let (dopen, dd, df) = o.dst_lines;
    if !o.src.killed && sd + sf != 1 {
        bad.push(format!("the entry logged {sd} done and {sf} failed lines for one connection"));
    }
    if !o.dst.killed && (dd + df > 1 || (dopen > 0 && dd + df == 0)) {
        bad.push(format!("the exit opened the connection {dopen} times and logged {dd} done and {df} failed lines"));
    }
    if sd == 1 && !(o.fwd_whole && o.back_whole) {
        bad.push("the entry says done, but the stream or the reply did not arrive whole".into());
    }
    if dd == 1 && !o.fwd_whole {
        bad.push("the exit says done, but the target did not get the whole stream".into());
    }
    if !bad.is_empty() {
        return Verdict::Wrong(bad);
    }
    if sd == 1 && dd == 1 && o.fwd_whole && o.back_whole && o.fwd_clean_end && o.back_clean_end {
        Verdict::Exact
    } else {
        Verdict::Clean
    }
}
