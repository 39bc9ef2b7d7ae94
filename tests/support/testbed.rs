//! The multi-NIC testbed of `tools/testbed.sh` for tests: two network
//! namespaces joined by K shaped veth links (link i: the source side
//! 10.77.i.1, the destination side 10.77.i.2), named after the test so
//! tests can run side by side; torn down when dropped. Links can be set
//! down and up, and connections killed by the kernel (`ss -K`), as a
//! flapping NIC or a middlebox would.
//!
//! ```ignore
//! #[path = "../../tests/support/testbed.rs"]
//! mod testbed;
//! let Some(bed) = testbed::Testbed::up("lk-down", 4, "100mbit") else { return };
//! let mut serve = bed.dst_command(BIN);
//! ```
#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// A testbed that is up, and goes down when dropped.
#[derive(Debug)]
pub struct Testbed {
    /// The source side's namespace.
    pub src: String,
    /// The destination side's namespace.
    pub dst: String,
    /// Links.
    pub links: usize,
}

/// `tools/testbed.sh`, found from the crate that runs the test.
fn script() -> PathBuf {
    let mut dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    loop {
        let s = dir.join("tools/testbed.sh");
        if s.exists() {
            return s;
        }
        assert!(dir.pop(), "tools/testbed.sh not found above {}", env!("CARGO_MANIFEST_DIR"));
    }
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.stdin(Stdio::null()).output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("{cmd:?}: {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Testbed {
    /// Brings up `links` links of `rate` each (tc syntax) in namespaces
    /// named after `name` (a few characters). `None`, after saying why,
    /// where the machine cannot (not root, no `ip`): the test is skipped.
    /// Any other failure panics.
    pub fn up(name: &str, links: usize, rate: &str) -> Option<Testbed> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping: the netns testbed needs root");
            return None;
        }
        if Command::new("ip").arg("-V").output().is_err() {
            eprintln!("skipping: the netns testbed needs iproute2 (ip, tc)");
            return None;
        }
        let bed = Testbed { src: format!("{name}-s"), dst: format!("{name}-d"), links };
        let mut up = Command::new("bash");
        up.arg(script()).args(["up", "--links", &links.to_string(), "--rate", rate]);
        up.env("PM_NS_SRC", &bed.src).env("PM_NS_DST", &bed.dst);
        if let Err(e) = run(&mut up) {
            panic!("testbed up: {e}");
        }
        Some(bed)
    }

    /// The source side's address on link `i`.
    pub fn src_addr(&self, i: usize) -> String {
        format!("10.77.{i}.1")
    }

    /// The destination side's address on link `i`.
    pub fn dst_addr(&self, i: usize) -> String {
        format!("10.77.{i}.2")
    }

    /// `host:port` on every link's destination side.
    pub fn dst_endpoints(&self, port: u16) -> Vec<String> {
        (0..self.links).map(|i| format!("{}:{port}", self.dst_addr(i))).collect()
    }

    /// Every link's source-side address, comma-separated (a `--via`).
    pub fn via(&self) -> String {
        (0..self.links).map(|i| self.src_addr(i)).collect::<Vec<_>>().join(",")
    }

    fn command_in(ns: &str, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c
    }

    /// `program`, to run on the source side.
    pub fn src_command(&self, program: impl AsRef<OsStr>) -> Command {
        Self::command_in(&self.src, program)
    }

    /// `program`, to run on the destination side.
    pub fn dst_command(&self, program: impl AsRef<OsStr>) -> Command {
        Self::command_in(&self.dst, program)
    }

    /// Sets link `i` down (its destination side: the source side loses
    /// carrier, and what it sends is dropped) or up again.
    pub fn set_link(&self, i: usize, up: bool) {
        let state = if up { "up" } else { "down" };
        run(Command::new("ip").args(["-n", &self.dst, "link", "set", &format!("pmv{i}d"), state]))
            .unwrap_or_else(|e| panic!("link {i} {state}: {e}"));
    }

    /// Has the source side's kernel kill its TCP connections to port
    /// `port` on link `i`'s destination address, or on every link's with
    /// `None` (`ss -K`: both ends see the connection fail); returns how
    /// many it killed.
    pub fn kill_connections(&self, link: Option<usize>, port: u16) -> usize {
        let mut filter = vec!["state".to_string(), "established".into(), "dport".into(), format!("= :{port}")];
        if let Some(i) = link {
            filter.extend(["dst".into(), self.dst_addr(i)]);
        }
        let mut ss = Self::command_in(&self.src, "ss");
        ss.args(["-K", "-H", "-t", "-n"]).args(&filter);
        // ss says "Invalid argument" about the sockets it could not kill
        // (listeners), and still kills the others: count what it printed.
        let out = ss.stdin(Stdio::null()).output().expect("ss -K");
        String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.trim().is_empty()).count()
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let mut down = Command::new("bash");
        down.arg(script()).arg("down").env("PM_NS_SRC", &self.src).env("PM_NS_DST", &self.dst);
        if let Err(e) = run(&mut down) {
            eprintln!("testbed down: {e}");
        }
    }
}
