//! Runs one (cell, seed, size) with the real `pmigrate` binary and records
//! what happened, for the judge: exit statuses and stderr of both ends,
//! the VM's hook markers, the files and streams as they ended up, and
//! whether the fault fired.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::bed::{free_port, marks, Ended, Proc, Scratch, Tmpfs};
use crate::cells::{content, Fault, Path, Plan, Run, PROGRESS_TIMEOUT};
use crate::cutter::{Cutter, Trigger};
use crate::keys::psk_args;
use crate::netem::{self, NetemBed, NetemConfig, Side};
use crate::pki;

const BIN: &str = env!("CARGO_BIN_EXE_pmigrate");

/// Longest a run's source end may take, failed or not.
const RUN_DEADLINE: Duration = Duration::from_secs(150);
/// After the source end ended: longest the destination end may take to end
/// or to settle waiting for another session.
const SETTLE: Duration = Duration::from_secs(25);
/// The port the destination listens on inside the netem bed.
const NETEM_PORT: u16 = 7000;

/// Whether the fault struck, and how.
#[derive(Clone, Debug, Default)]
pub struct Fired {
    pub fired: bool,
    pub what: String,
}

/// What a memory migration left.
#[derive(Debug)]
pub struct MemoryObs {
    pub src: Ended,
    pub dst: Ended,
    /// `--pause-cmd`, `--cont-cmd`, `--resume-cmd` runs.
    pub paused: usize,
    pub conts: usize,
    pub resumes: usize,
    /// Resume runs that found the destination's memory file in place and
    /// equal to the source's.
    pub resumed_verified: usize,
    /// The source's memory file is as it was.
    pub src_unchanged: bool,
    /// The destination's memory file: `None` absent, else whether it
    /// equals the source's memory.
    pub dst_file: Option<bool>,
    /// Pages a dirtying guest wrote before it stopped (`None`: an idle
    /// guest).
    pub guest_writes: Option<usize>,
    /// A `.partial` file was left.
    pub partial_left: bool,
    /// Reconnects the source reported (pre-copy or post-copy).
    pub reconnects: Option<u64>,
}

/// What a byte-stream run (exec relay or proxy) left.
#[derive(Debug)]
pub struct StreamObs {
    /// The source end (`send`, `proxy entry`) and destination end (`recv`,
    /// `proxy exit`).
    pub src: Ended,
    pub dst: Ended,
    /// Forward: what was fed in, what came out, whether the output ended
    /// with a clean end of stream (not an error).
    pub fwd_len: usize,
    pub fwd_prefix: bool,
    pub fwd_whole: bool,
    pub fwd_clean_end: bool,
    /// Backward (the way back, or the reply).
    pub back_prefix: bool,
    pub back_whole: bool,
    pub back_clean_end: bool,
    /// Proxy: the daemons' lines about the connection (opened, done,
    /// failed) and whether each still ran at the end (they serve on after
    /// a failure).
    pub src_lines: (usize, usize, usize),
    pub dst_lines: (usize, usize, usize),
    pub src_alive: bool,
    pub dst_alive: bool,
    /// The local peers' sockets did not end by the deadline.
    pub hung: bool,
}

/// What a run left.
#[derive(Debug)]
pub enum Observed {
    Memory(MemoryObs),
    Stream(StreamObs),
}

/// The two ends of a run, filled once spawned, for the fault's hook.
#[derive(Default)]
struct Victims {
    src: Mutex<Option<Arc<Proc>>>,
    dst: Mutex<Option<Arc<Proc>>>,
    /// The threads that send SIGCONT after a stop.
    conts: Mutex<Vec<JoinHandle<()>>>,
    fired: Mutex<Option<String>>,
}

impl Victims {
    fn set(&self, src: Option<&Arc<Proc>>, dst: Option<&Arc<Proc>>) {
        if let Some(s) = src {
            *self.src.lock().unwrap_or_else(|p| p.into_inner()) = Some(s.clone());
        }
        if let Some(d) = dst {
            *self.dst.lock().unwrap_or_else(|p| p.into_inner()) = Some(d.clone());
        }
    }

    /// Strikes: stops or kills the end the fault names.
    fn strike(self: &Arc<Self>, fault: Fault, stop_for: Duration) {
        let who = match fault {
            Fault::StopSrc | Fault::KillSrc => &self.src,
            Fault::StopDst | Fault::KillDst => &self.dst,
            _ => return,
        };
        let Some(p) = who.lock().unwrap_or_else(|p| p.into_inner()).clone() else { return };
        let what = match fault {
            Fault::KillSrc | Fault::KillDst => {
                if !p.signal(libc::SIGKILL) {
                    return;
                }
                format!("SIGKILL {}", p.name)
            }
            _ => {
                if !p.signal(libc::SIGSTOP) {
                    return;
                }
                let h = std::thread::spawn(move || {
                    std::thread::sleep(stop_for);
                    p.signal(libc::SIGCONT);
                });
                self.conts.lock().unwrap_or_else(|p| p.into_inner()).push(h);
                format!("SIGSTOP for {:.1} s", stop_for.as_secs_f64())
            }
        };
        *self.fired.lock().unwrap_or_else(|p| p.into_inner()) = Some(what);
    }

    /// Waits until every stopped end was continued.
    fn join_conts(&self) {
        let hs: Vec<_> = self.conts.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect();
        for h in hs {
            let _ = h.join();
        }
    }
}

/// The network of a run: loopback through a cutter (cuts, stops, kills,
/// full disks), or the netem bed.
enum Net {
    Loop(Option<Cutter>),
    Netem(NetemBed),
}

impl Net {
    fn new(run: &Run, plan: &Plan) -> Net {
        if run.cell.fault == Fault::Netem {
            Net::Netem(NetemBed::up(NetemConfig::lossy(plan.netem_seed)).expect("the netem bed (root, /dev/net/tun)"))
        } else {
            Net::Loop(None)
        }
    }

    fn command(&self, side: Side) -> Command {
        match self {
            Net::Netem(bed) => bed.command(side, BIN),
            Net::Loop(_) => Command::new(BIN),
        }
    }

    /// Where the destination end listens.
    fn listen(&self) -> String {
        match self {
            Net::Netem(_) => format!("{}:{NETEM_PORT}", netem::DST_ADDR),
            Net::Loop(_) => "127.0.0.1:0".into(),
        }
    }

    /// Puts the cutter in front of the destination (loopback) and returns
    /// the address the source connects to.
    fn link(&mut self, dst: &Proc, run: &Run, plan: &Plan, victims: &Arc<Victims>) -> String {
        match self {
            Net::Netem(_) => format!("{}:{NETEM_PORT}", netem::DST_ADDR),
            Net::Loop(cutter) => {
                let port = dst.listening_port().expect("the destination said where it listens");
                let upstream = SocketAddr::from(([127, 0, 0, 1], port));
                let fault = run.cell.fault;
                let trigger = match fault {
                    Fault::Cut => Trigger::Cut,
                    Fault::StopSrc | Fault::StopDst | Fault::KillSrc | Fault::KillDst => {
                        let (v, stop_for) = (victims.clone(), plan.stop_for);
                        Trigger::Call(Arc::new(move || v.strike(fault, stop_for)))
                    }
                    _ => Trigger::Pass,
                };
                let c = Cutter::start(upstream, plan.offset, trigger).expect("the cutter");
                let addr = c.addr.to_string();
                *cutter = Some(c);
                addr
            }
        }
    }

    fn fired(&self, run: &Run, plan: &Plan, victims: &Victims) -> Fired {
        match self {
            Net::Netem(bed) => {
                let c = bed.counts();
                Fired {
                    fired: c.any(),
                    what: format!(
                        "{} packets: {} lost, {} reordered, {} duplicated, {} corrupted ({} dropped by TCP's checksum)",
                        c.packets, c.lost, c.reordered, c.duplicated, c.corrupted, c.csum_errors
                    ),
                }
            }
            Net::Loop(cutter) => {
                let carried = cutter.as_ref().map_or(0, |c| c.carried());
                match run.cell.fault {
                    Fault::Cut => Fired {
                        fired: cutter.as_ref().is_some_and(|c| c.fired()),
                        what: format!("cut at byte {} of {carried}", plan.offset),
                    },
                    Fault::DiskFull => Fired {
                        fired: true,
                        what: format!("{} KiB of disk for {} KiB of memory", plan.disk_kib, run.mib << 10),
                    },
                    _ => match victims.fired.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                        Some(w) => Fired { fired: true, what: format!("{w} at byte {} of {carried}", plan.offset) },
                        None => {
                            Fired { fired: false, what: format!("offset {} never reached ({carried})", plan.offset) }
                        }
                    },
                }
            }
        }
    }
}

/// Runs one run and reports what happened.
pub fn run(run: &Run) -> (Observed, Fired) {
    let plan = run.plan();
    match run.cell.path {
        Path::Pre | Path::Post | Path::Hybrid | Path::HybridDirty => memory(run, &plan),
        Path::Exec => exec(run, &plan),
        Path::Proxy => proxy(run, &plan),
    }
}

fn progress_args() -> [String; 2] {
    ["--progress-timeout".into(), PROGRESS_TIMEOUT.as_secs().to_string()]
}

/// How an end authenticates and which I/O backend it runs, as the run's
/// flavour says (`Plan::tls`, `Plan::portable`). `connects`: the end that
/// dials (the source side), which names the certificate it expects.
fn end_args(plan: &Plan, connects: bool) -> Vec<String> {
    let mut v: Vec<String> = if plan.tls {
        let dir = pki::dir();
        let who = if connects { "a" } else { "b" };
        let file = |f: String| dir.join(f).to_string_lossy().into_owned();
        let mut v = vec![
            "--tls-cert".into(),
            file(format!("{who}.pem")),
            "--tls-key".into(),
            file(format!("{who}.key")),
            "--tls-ca".into(),
            file("ca.pem".into()),
        ];
        if connects {
            // The netem bed's addresses are not in the test certificates.
            v.extend(["--tls-name".into(), "localhost".into()]);
        }
        v
    } else {
        psk_args().into()
    };
    if plan.portable {
        v.extend(["--io".into(), "portable".into()]);
    }
    v
}

fn sh_quote(p: &std::path::Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

/// The destination's end after the source's ended: it exits, or settles
/// waiting for another session (then SIGTERM stops it).
fn settle(dst: &Proc, idle_marks: &[&str]) -> Ended {
    let deadline = Instant::now() + SETTLE;
    loop {
        if dst.status().is_some() {
            break;
        }
        let log = dst.log();
        if idle_marks.iter().any(|m| log.contains(m)) {
            // Give it a moment to exit by itself, if it would.
            std::thread::sleep(Duration::from_millis(500));
            break;
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if dst.status().is_none() {
        dst.signal(libc::SIGTERM);
    }
    dst.ended(Instant::now() + Duration::from_secs(20))
}

fn memory(run: &Run, plan: &Plan) -> (Observed, Fired) {
    let s = Scratch::new(&run.cell.to_string().replace('/', "-"));
    let data = content(plan.content_seed, run.mib);
    let src = s.path("src.mem");
    std::fs::write(&src, &data).expect("source memory");
    let dst_dir = s.path("dst");
    let _disk = match run.cell.fault {
        Fault::DiskFull => Some(Tmpfs::mount(&dst_dir, plan.disk_kib).expect("a small tmpfs (root)")),
        _ => {
            std::fs::create_dir_all(&dst_dir).expect("dst dir");
            None
        }
    };
    let dst = dst_dir.join("vm.mem");
    let (paused, conts, resumed, verified) =
        (s.path("paused"), s.path("continued"), s.path("resumed"), s.path("resumed-verified"));
    let mut net = Net::new(run, plan);
    let victims = Arc::new(Victims::default());

    let failed_resume = s.path("resume-failed");
    let resume_cmd = match run.cell.fault {
        // The guest cannot start here: the hook says so and starts nothing.
        Fault::ResumeFails => format!("echo f >> {}; exit 1", sh_quote(&failed_resume)),
        _ => format!(
            "echo r >> {}; if cmp -s {} {}; then echo ok >> {}; fi",
            sh_quote(&resumed),
            sh_quote(&dst),
            sh_quote(&src),
            sh_quote(&verified)
        ),
    };
    let mut cmd = net.command(Side::Dst);
    cmd.args(["serve", "--listen", &net.listen(), "--memory"])
        .arg(&dst)
        .args(["--resume-cmd", &resume_cmd, "--json"])
        .args(progress_args())
        .args(end_args(plan, false))
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::fs::File::create(s.path("serve.json")).expect("serve.json")));
    let (serve, ..) = Proc::spawn("serve", &mut cmd);
    assert!(serve.wait_log("listening on", Duration::from_secs(60)), "serve never listened: {}", serve.log());
    let addr = net.link(&serve, run, plan, &victims);

    // A dirtying guest stops writing before the pause hook returns.
    let stopped = s.path("guest-stopped");
    let dirtier = (run.cell.path == Path::HybridDirty).then(|| Dirtier::start(&src, &data, &paused, &stopped, plan));
    let pause_cmd = match &dirtier {
        Some(_) => {
            format!("echo p >> {}; while [ ! -e {} ]; do sleep 0.005; done", sh_quote(&paused), sh_quote(&stopped))
        }
        None => format!("echo p >> {}", sh_quote(&paused)),
    };
    let mut cmd = net.command(Side::Src);
    cmd.args(["migrate", "--memory"])
        .arg(&src)
        .args(["--pause-cmd", &pause_cmd])
        .args(["--cont-cmd", &format!("echo c >> {}", sh_quote(&conts))])
        .args(["--streams", "4", "--json"])
        .args(progress_args())
        .args(end_args(plan, true));
    match run.cell.path {
        Path::Post => drop(cmd.args(["--postcopy", "0"])),
        Path::Hybrid | Path::HybridDirty => drop(cmd.args(["--postcopy", "1"])),
        _ => {}
    }
    cmd.arg(&addr)
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::fs::File::create(s.path("migrate.json")).expect("migrate.json")));
    let (migrate, ..) = Proc::spawn("migrate", &mut cmd);
    victims.set(Some(&migrate), Some(&serve));

    let src_end = migrate.ended(Instant::now() + RUN_DEADLINE);
    // The guest's memory as it left it: at the pause, or (no pause) now.
    let (data, guest_writes) = match dirtier.map(Dirtier::stop) {
        Some((mem, writes)) => (mem, Some(writes)),
        None => (data, None),
    };
    victims.join_conts();
    let dst_end = settle(&serve, &["waiting for another", "refused"]);
    victims.join_conts();
    let fired = match run.cell.fault {
        Fault::ResumeFails => {
            let tries = marks(&failed_resume);
            Fired { fired: tries > 0, what: format!("the resume command failed {tries} times") }
        }
        _ => net.fired(run, plan, &victims),
    };
    drop(net);

    let json = std::fs::read_to_string(s.path("migrate.json")).unwrap_or_default();
    let reconnects = json
        .lines()
        .find_map(|l| l.trim().strip_prefix("\"reconnects\": "))
        .and_then(|v| v.trim_end_matches(',').parse().ok());
    let obs = MemoryObs {
        src: src_end,
        dst: dst_end,
        paused: marks(&paused),
        conts: marks(&conts),
        resumes: marks(&resumed),
        resumed_verified: marks(&verified),
        src_unchanged: std::fs::read(&src).is_ok_and(|d| d == data),
        dst_file: std::fs::read(&dst).ok().map(|d| d == data),
        partial_left: dst_dir.join("vm.mem.partial").exists(),
        reconnects,
        guest_writes,
    };
    (Observed::Memory(obs), fired)
}

/// A guest writing its memory: random pages of the source's memory file
/// rewritten, about 8 MiB/s, until the pause hook's mark appears (or the
/// test stops it); it then marks `stopped`, which the hook waits for, and
/// hands back the memory the file must hold.
struct Dirtier {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<(Vec<u8>, usize)>,
}

impl Dirtier {
    fn start(
        src: &std::path::Path,
        data: &[u8],
        paused: &std::path::Path,
        stopped: &std::path::Path,
        plan: &Plan,
    ) -> Self {
        use rand::{Rng, RngCore, SeedableRng};
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new().write(true).open(src).expect("the source's memory for writing");
        let (mut mem, paused, stopped) = (data.to_vec(), paused.to_path_buf(), stopped.to_path_buf());
        let stop = Arc::new(AtomicBool::new(false));
        let seed = plan.content_seed ^ 0xd1_27;
        let handle = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
                let pages = mem.len() / 4096;
                let mut writes = 0;
                while !stop.load(Ordering::Acquire) && !paused.exists() {
                    writes += 8;
                    for _ in 0..8 {
                        let p = rng.gen_range(0..pages);
                        let page = &mut mem[p * 4096..(p + 1) * 4096];
                        rng.fill_bytes(page);
                        file.write_all_at(page, (p * 4096) as u64).expect("a guest write");
                    }
                    std::thread::sleep(Duration::from_millis(4));
                }
                std::fs::write(&stopped, b"s").expect("the guest's stop mark");
                (mem, writes)
            }
        });
        Dirtier { stop, handle }
    }

    /// Stops the guest (if the pause did not) and returns its memory and
    /// how many page writes it made.
    fn stop(self) -> (Vec<u8>, usize) {
        self.stop.store(true, Ordering::Release);
        self.handle.join().expect("the dirtying guest")
    }
}

/// Reads `r` to its end; returns the bytes and whether it ended cleanly.
fn drain(mut r: impl Read) -> (Vec<u8>, bool) {
    let (mut all, mut buf) = (Vec::new(), vec![0u8; 1 << 16]);
    loop {
        match r.read(&mut buf) {
            Ok(0) => return (all, true),
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return (all, false),
        }
    }
}

/// [`drain`], counting what arrived as it comes.
fn drain_counted(mut r: impl Read, count: &AtomicUsize) -> (Vec<u8>, bool) {
    let (mut all, mut buf) = (Vec::new(), vec![0u8; 1 << 16]);
    loop {
        match r.read(&mut buf) {
            Ok(0) => return (all, true),
            Ok(n) => {
                all.extend_from_slice(&buf[..n]);
                count.store(all.len(), Ordering::Relaxed);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return (all, false),
        }
    }
}

/// Writes `data` in uneven pieces, as QEMU would; stops at an error, and
/// returns it.
fn feed(mut w: impl Write, data: &[u8]) -> std::io::Result<()> {
    let (mut off, mut k) = (0usize, 1usize);
    while off < data.len() {
        k = (k * 31 + 7) % 70_000 + 1;
        let end = (off + k).min(data.len());
        w.write_all(&data[off..end])?;
        off = end;
    }
    Ok(())
}

/// Whether a TCP socket that one thread read to an end of stream (`eof`)
/// while another wrote to it (`fed`) ended cleanly: by a FIN, not a reset.
///
/// Linux reports a reset once: it sets the socket's error, and the first
/// call on the socket takes it (`sock_error` clears it); every read after
/// that returns 0, as at a FIN. So when the writer's call takes the
/// reset's `ECONNRESET`, the reader reads an end of stream, and only the
/// writer knows the connection was reset. The writer's `ECONNRESET` also
/// proves no FIN came first: a reset after a FIN (state `CLOSE_WAIT`)
/// fails the writer with `EPIPE` instead (`tcp_reset`).
fn ended_cleanly(eof: bool, fed: &std::io::Result<()>) -> bool {
    eof && !matches!(fed, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
}

fn exec(run: &Run, plan: &Plan) -> (Observed, Fired) {
    let input = Arc::new(content(plan.content_seed, run.mib));
    let back = Arc::new(content(plan.content_seed ^ 1, 1)[..64 << 10].to_vec());
    let mut net = Net::new(run, plan);
    let victims = Arc::new(Victims::default());

    let mut cmd = net.command(Side::Dst);
    cmd.args(["recv", "--listen", &net.listen(), "--report", "--wait", "60"])
        .args(progress_args())
        .args(end_args(plan, false))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let (recv, recv_in, recv_out) = Proc::spawn("recv", &mut cmd);
    let out = std::thread::spawn(move || drain(recv_out.expect("recv stdout")));
    let b = back.clone();
    let back_in = std::thread::spawn(move || {
        let _ = feed(recv_in.expect("recv stdin"), &b);
    });
    assert!(recv.wait_log("listening on", Duration::from_secs(60)), "recv never listened: {}", recv.log());
    let addr = net.link(&recv, run, plan, &victims);

    let mut cmd = net.command(Side::Src);
    cmd.args(["send", "--streams", "4", "--report"])
        .args(progress_args())
        .args(end_args(plan, true))
        .arg(&addr)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let (send, send_in, send_out) = Proc::spawn("send", &mut cmd);
    victims.set(Some(&send), Some(&recv));
    // As QEMU does: the return path (recv's stdin to send's stdout) is
    // read while the migration runs, and send's stdin closes at the end —
    // here once the way back arrived (or send ended, or the deadline).
    let back_got = Arc::new(AtomicUsize::new(0));
    let (i, got, want, s2) = (input.clone(), back_got.clone(), back.len(), send.clone());
    let fwd_in = std::thread::spawn(move || {
        let mut w = send_in.expect("send stdin");
        let _ = feed(&mut w, &i);
        let until = Instant::now() + RUN_DEADLINE;
        while got.load(Ordering::Relaxed) < want && s2.status().is_none() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let counted = back_got.clone();
    let back_out = std::thread::spawn(move || drain_counted(send_out.expect("send stdout"), &counted));

    let src_end = send.ended(Instant::now() + RUN_DEADLINE);
    victims.join_conts();
    let dst_end = settle(&recv, &[]);
    victims.join_conts();
    let fired = net.fired(run, plan, &victims);
    drop(net);
    let _ = (fwd_in.join(), back_in.join());
    let (got, fwd_clean) = out.join().unwrap_or_default();
    let (got_back, back_clean) = back_out.join().unwrap_or_default();
    let obs = StreamObs {
        src: src_end,
        dst: dst_end,
        fwd_len: got.len(),
        fwd_prefix: crate::bed::is_prefix(&got, &input),
        fwd_whole: got == *input,
        fwd_clean_end: fwd_clean,
        back_prefix: crate::bed::is_prefix(&got_back, &back),
        back_whole: got_back == *back,
        back_clean_end: back_clean,
        src_lines: (0, 0, 0),
        dst_lines: (0, 0, 0),
        src_alive: false,
        dst_alive: false,
        hung: false,
    };
    (Observed::Stream(obs), fired)
}

/// What the target behind the proxy exit saw: the stream, whether it ended
/// cleanly, and whether its reply went out.
type TargetSaw = Option<(Vec<u8>, bool)>;

fn proxy(run: &Run, plan: &Plan) -> (Observed, Fired) {
    let input = Arc::new(content(plan.content_seed, run.mib));
    let reply = Arc::new(content(plan.content_seed ^ 1, 1)[..256 << 10].to_vec());
    let mut net = Net::new(run, plan);
    let victims = Arc::new(Victims::default());
    let (entry_port, target_port) = match &net {
        Net::Netem(_) => (7001, 7002),
        Net::Loop(_) => (free_port(), 0),
    };
    // The target QEMU stands for: reads the stream to its end, answers.
    let deadline = Instant::now() + RUN_DEADLINE;
    let (tx, rx) = std::sync::mpsc::channel();
    let r = reply.clone();
    // Set when the exit connected to the target; and to tell a target
    // that was never connected to stop waiting.
    let (connected, give_up) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let (c, g) = (connected.clone(), give_up.clone());
    let target_fn = move || -> TargetSaw {
        let l = TcpListener::bind(("127.0.0.1", target_port)).expect("bind the target");
        tx.send(l.local_addr().expect("target addr").port()).expect("port");
        l.set_nonblocking(true).expect("nonblocking");
        let s = loop {
            match l.accept() {
                Ok((s, _)) => break s,
                Err(_) if Instant::now() < deadline && !g.load(Ordering::Acquire) => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(_) => return None,
            }
        };
        c.store(true, Ordering::Release);
        s.set_nonblocking(false).expect("blocking");
        let (got, clean) = drain(&s);
        if clean {
            let mut w = &s;
            if w.write_all(&r).is_ok() {
                let _ = s.shutdown(Shutdown::Write);
                let _ = drain(&s);
            }
        }
        Some((got, clean))
    };
    let target = match &net {
        Net::Netem(bed) => netem::spawn_in(bed, Side::Dst, target_fn).expect("target thread"),
        Net::Loop(_) => std::thread::spawn(target_fn),
    };
    let target_port = rx.recv_timeout(Duration::from_secs(30)).expect("the target listens");

    let mut cmd = net.command(Side::Dst);
    cmd.args(["proxy", "exit", "--listen", &net.listen(), "--target", &format!("tcp:127.0.0.1:{target_port}")])
        .args(progress_args())
        .args(end_args(plan, false))
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let (exit, ..) = Proc::spawn("proxy exit", &mut cmd);
    assert!(exit.wait_log("listening on", Duration::from_secs(60)), "the exit never listened: {}", exit.log());
    let addr = net.link(&exit, run, plan, &victims);
    let mut cmd = net.command(Side::Src);
    cmd.args(["proxy", "entry", "--streams", "4", "--accept", &format!("tcp:127.0.0.1:{entry_port}")])
        .args(progress_args())
        .args(end_args(plan, true))
        .arg(&addr)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let (entry, ..) = Proc::spawn("proxy entry", &mut cmd);
    assert!(entry.wait_log("accepting on", Duration::from_secs(60)), "the entry never accepted: {}", entry.log());
    victims.set(Some(&entry), Some(&exit));

    // The source QEMU stands for: writes the stream, half-closes, reads
    // the answer. Like QEMU (its migration thread writes, its return path
    // reads), it knows the connection was reset when either of its calls
    // says so (see `ended_cleanly`).
    let i = input.clone();
    let client_fn = move || -> Option<(Vec<u8>, bool)> {
        let c = TcpStream::connect(("127.0.0.1", entry_port)).ok()?;
        let w = c.try_clone().ok()?;
        let writer = std::thread::spawn(move || {
            let fed = feed(&w, &i);
            let _ = w.shutdown(Shutdown::Write);
            fed
        });
        let (got, eof) = drain(&c);
        let fed = writer.join().unwrap_or(Ok(()));
        Some((got, ended_cleanly(eof, &fed)))
    };
    let client = match &net {
        Net::Netem(bed) => netem::spawn_in(bed, Side::Src, client_fn).expect("client thread"),
        Net::Loop(_) => std::thread::spawn(client_fn),
    };
    // Both local peers are done when their sockets ended; bounded by the
    // deadline (a proxy end that never ends them is a hang).
    while !(client.is_finished() && target.is_finished()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        // A client whose connection ended before the exit connected to the
        // target (an end killed in the handshake): the target may never be
        // connected, and that is no hang; it is given the settling time.
        if client.is_finished() && !connected.load(Ordering::Acquire) {
            let until = Instant::now() + SETTLE;
            while !connected.load(Ordering::Acquire) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(50));
            }
            give_up.store(true, Ordering::Release);
        }
    }
    let hung = !(client.is_finished() && target.is_finished());
    victims.join_conts();
    // Each end that still runs logs the connection's end.
    let ended = |p: &Proc| {
        let until = Instant::now() + SETTLE;
        loop {
            let log = p.log();
            if log.contains("connection done") || log.contains("connection failed") || p.status().is_some() {
                break;
            }
            if Instant::now() >= until {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    ended(&entry);
    ended(&exit);
    let (src_alive, dst_alive) = (entry.status().is_none(), exit.status().is_none());
    // A connection's lines: opened, done, and failed (or, at the entry,
    // refused while its session was set up).
    let lines = |log: &str| {
        let conn = |l: &&str| l.contains("connection 0 (");
        (
            log.lines().filter(conn).filter(|l| l.contains("connection open")).count(),
            log.lines().filter(conn).filter(|l| l.contains("connection done")).count(),
            log.lines().filter(conn).filter(|l| l.contains("connection failed")).count(),
        )
    };
    let fired = net.fired(run, plan, &victims);
    // The daemons serve on; stop them for the record.
    let src_end = {
        entry.signal(libc::SIGTERM);
        entry.ended(Instant::now() + Duration::from_secs(20))
    };
    let dst_end = {
        exit.signal(libc::SIGTERM);
        exit.ended(Instant::now() + Duration::from_secs(20))
    };
    drop(net);
    // The daemons are gone: both local sockets ended.
    let (got_back, back_clean) = client.join().ok().flatten().unwrap_or_default();
    let (got, fwd_clean) = target.join().ok().flatten().unwrap_or_default();
    let obs = StreamObs {
        src_lines: lines(&src_end.log),
        dst_lines: lines(&dst_end.log),
        src: src_end,
        dst: dst_end,
        fwd_len: got.len(),
        fwd_prefix: crate::bed::is_prefix(&got, &input),
        fwd_whole: got == *input && !hung,
        fwd_clean_end: fwd_clean,
        back_prefix: crate::bed::is_prefix(&got_back, &reply),
        back_whole: got_back == *reply && !hung,
        back_clean_end: back_clean,
        src_alive,
        dst_alive,
        hung,
    };
    (Observed::Stream(obs), fired)
}

/// The proxy's client once judged a reset connection as cleanly ended:
/// its writer took the reset, and its reader then read an end of stream.
#[test]
fn a_reset_taken_by_the_writer_is_no_clean_end() {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    let (peer, _) = l.accept().expect("accept");
    // The peer reads nothing: the writer fills the socket buffers and
    // blocks, as the client's does while the proxy's pipeline is full.
    let w = c.try_clone().expect("clone");
    let data = vec![7u8; 64 << 20];
    let writer = std::thread::spawn(move || feed(&w, &data));
    std::thread::sleep(Duration::from_millis(200));
    crate::cutter::reset(&peer);
    let fed = writer.join().expect("writer");
    assert_eq!(fed.as_ref().map_err(|e| e.kind()), Err(std::io::ErrorKind::ConnectionReset), "{fed:?}");
    // The kernel's view: the reset was reported once, to the writer; a
    // read now sees an end of stream, as after a FIN.
    let (got, eof) = drain(&c);
    assert!(got.is_empty() && eof, "a read after the writer took the reset: {} bytes, eof {eof}", got.len());
    assert!(!ended_cleanly(eof, &fed), "a reset connection counted as cleanly ended");
    // A FIN is still a clean end, whatever the writer met after it.
    let c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    let (peer, _) = l.accept().expect("accept");
    peer.shutdown(Shutdown::Write).expect("FIN");
    let (got, eof) = drain(&c);
    drop(peer);
    std::thread::sleep(Duration::from_millis(50));
    let fed = feed(&c, &[1u8; 1 << 20]).and_then(|()| feed(&c, &[1u8; 1 << 20]));
    assert!(got.is_empty() && eof);
    assert!(ended_cleanly(eof, &fed), "a FIN, then {fed:?}");
}
