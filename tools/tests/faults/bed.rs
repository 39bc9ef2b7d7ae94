//! What a run stands on: its scratch directory, the pmigrate processes it
//! starts (stderr collected, signals sent only to a process still running,
//! killed when dropped), a size-limited tmpfs (unmounted when dropped).

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A scratch directory of one run, removed when dropped (kept with
/// `PMIGRATE_KEEP_FAULT_LOGS`).
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let d = std::env::temp_dir().join(format!("pmfaults-{}-{n}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch dir");
        Scratch(d)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("PMIGRATE_KEEP_FAULT_LOGS").is_some() {
            eprintln!("kept {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A tmpfs of a given size mounted on a directory; unmounted when dropped.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, kib: u64) -> std::io::Result<Tmpfs> {
        std::fs::create_dir_all(dir)?;
        let st =
            Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs"]).arg(dir).status()?;
        if !st.success() {
            return Err(std::io::Error::other(format!("mount tmpfs on {}: {st}", dir.display())));
        }
        Ok(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// How a process ended.
#[derive(Clone, Debug)]
pub struct Ended {
    /// Its exit status; `None` if it had to be killed at the deadline.
    pub status: Option<ExitStatus>,
    /// Its stderr.
    pub log: String,
    /// SIGKILL sent by the fault.
    pub killed: bool,
    /// SIGSTOP sent by the fault (and SIGCONT after).
    pub stopped: bool,
    /// SIGTERM sent by the run (a server left waiting for another session).
    pub terminated: bool,
}

impl Ended {
    /// The exit code, if it exited.
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    /// The signal that ended it, if one did.
    pub fn signal(&self) -> Option<i32> {
        self.status.and_then(|s| s.signal())
    }

    pub fn success(&self) -> bool {
        self.code() == Some(0)
    }

    /// It exited with a non-zero code on its own.
    pub fn failed(&self) -> bool {
        self.code().is_some_and(|c| c != 0) && !self.terminated
    }

    /// Lines of its stderr that are errors.
    pub fn error_lines(&self) -> Vec<&str> {
        self.log.lines().filter(|l| l.starts_with("pmigrate: error: ")).collect()
    }
}

/// A pmigrate process of a run.
pub struct Proc {
    pub name: &'static str,
    child: Mutex<Child>,
    status: Mutex<Option<ExitStatus>>,
    log: Arc<Mutex<String>>,
    reader: Mutex<Option<JoinHandle<()>>>,
    killed: AtomicBool,
    stopped: AtomicBool,
    terminated: AtomicBool,
}

impl Proc {
    /// Spawns `cmd` (its stdin and stdout as the caller set them) with its
    /// stderr collected; returns its stdin and stdout if piped.
    pub fn spawn(name: &'static str, cmd: &mut Command) -> (Arc<Proc>, Option<ChildStdin>, Option<ChildStdout>) {
        let mut child = cmd.stderr(Stdio::piped()).spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let err = child.stderr.take().expect("stderr piped");
        let (stdin, stdout) = (child.stdin.take(), child.stdout.take());
        let log = Arc::new(Mutex::new(String::new()));
        let l = log.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut g = l.lock().unwrap_or_else(|p| p.into_inner());
                g.push_str(&line);
                g.push('\n');
            }
        });
        let p = Proc {
            name,
            child: Mutex::new(child),
            status: Mutex::new(None),
            log,
            reader: Mutex::new(Some(reader)),
            killed: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            terminated: AtomicBool::new(false),
        };
        (Arc::new(p), stdin, stdout)
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Its exit status, if it ended (reaped here, under the lock that
    /// guards signals, so a signal never reaches a recycled pid).
    pub fn status(&self) -> Option<ExitStatus> {
        let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        if st.is_none() {
            let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
            *st = child.try_wait().ok().flatten();
        }
        *st
    }

    /// Sends `sig` if the process still runs; whether it was sent.
    pub fn signal(&self, sig: i32) -> bool {
        let st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        if st.is_some() {
            return false;
        }
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        if !matches!(child.try_wait(), Ok(None)) {
            return false;
        }
        match sig {
            libc::SIGKILL => self.killed.store(true, Ordering::Relaxed),
            libc::SIGSTOP => self.stopped.store(true, Ordering::Relaxed),
            libc::SIGTERM => self.terminated.store(true, Ordering::Relaxed),
            _ => {}
        }
        let pid = i32::try_from(child.id()).expect("pid");
        // SAFETY: kill(2) on the pid of our child, which has not been reaped
        // (checked under the lock that reaping takes), so it is still ours.
        unsafe { libc::kill(pid, sig) == 0 }
    }

    /// Waits until it ended or `deadline`.
    pub fn wait_until(&self, deadline: Instant) -> Option<ExitStatus> {
        loop {
            if let Some(s) = self.status() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until its stderr has a line containing `what`, it ended, or
    /// `within` passed; whether the line came.
    pub fn wait_log(&self, what: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if self.log().contains(what) {
                return true;
            }
            if self.status().is_some() || Instant::now() >= deadline {
                std::thread::sleep(Duration::from_millis(50));
                return self.log().contains(what);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// How it ended: waits until `deadline`, then kills it (a hang).
    pub fn ended(&self, deadline: Instant) -> Ended {
        let status = self.wait_until(deadline);
        if status.is_none() {
            let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
            let _ = child.kill();
            let _ = child.wait();
        }
        // Its stderr closes when it (and any hook it started) ended.
        if let Some(r) = self.reader.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let until = Instant::now() + Duration::from_secs(3);
            while !r.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
            }
            if r.is_finished() {
                let _ = r.join();
            }
        }
        Ended {
            status,
            log: self.log(),
            killed: self.killed.load(Ordering::Relaxed),
            stopped: self.stopped.load(Ordering::Relaxed),
            terminated: self.terminated.load(Ordering::Relaxed),
        }
    }

    /// The port of the first `listening on [addr:port…` in its stderr.
    pub fn listening_port(&self) -> Option<u16> {
        let log = self.log();
        let at = log.find("listening on [")? + "listening on [".len();
        let rest = &log[at..];
        let end = rest.find([']', ','])?;
        rest[..end].rsplit(':').next()?.parse().ok()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|p| p.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A free loopback port (for a listener that cannot take port 0).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Whether `got` is a prefix of `whole`.
pub fn is_prefix(got: &[u8], whole: &[u8]) -> bool {
    got.len() <= whole.len() && whole[..got.len()] == *got
}

/// Counts the lines of a marker file (one per hook run).
pub fn marks(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |s| s.lines().count())
}
