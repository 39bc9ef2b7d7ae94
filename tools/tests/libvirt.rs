//! A real libvirt migration through `pmigrate proxy`: two libvirt daemons
//! on this machine (`tests/support/libvirt.sh`: each in its own mount, UTS
//! and PID namespace, with its own host UUID), and
//!
//! ```text
//! virsh -c SRC migrate --live --p2p --migrateuri unix:///run/libvirt/pmigrate/NAME.sock NAME DST
//! ```
//!
//! where the source QEMU's `unix:` path is the proxy entry's socket and the
//! proxy exit connects each carried connection to the destination QEMU's.
//! Once with one connection, once with `--parallel --parallel-connections 4`
//! (QEMU multifd: the main channel and four more, which the proxy must open
//! at the destination in the order the source made them). The guest checks
//! its own memory; the test checks that it runs on at the destination with
//! no damage. It skips, saying why, without QEMU or when libvirt cannot be
//! installed.

#[path = "../../tests/support/migration.rs"]
mod migration;
#[path = "../../tests/support/qemu.rs"]
mod qemu;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use migration::{ProxyPair, EXIT_TIMEOUT};
use qemu::{is_corruption_line, parse_heartbeat, Heartbeat};

/// The binary under test.
const PMIGRATE: &str = env!("CARGO_BIN_EXE_pmigrate");

fn script() -> PathBuf {
    qemu::repo_root().join("tests/support/libvirt.sh")
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Two libvirt daemons, stopped (with their guests) when dropped.
struct Pair {
    dir: PathBuf,
    env: HashMap<String, String>,
}

impl Pair {
    /// Installs what libvirt needs (once per machine) and starts a pair;
    /// `Err` is the reason to skip.
    fn up() -> Result<Pair, String> {
        let install = run(Command::new("bash").arg(script()).arg("install"));
        if !install.status.success() {
            return Err(format!("libvirt could not be installed here: {}", text(&install).trim()));
        }
        // Short: the unix socket paths under it must fit in 107 bytes.
        let dir = PathBuf::from(format!("/tmp/pmlv-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let up = run(Command::new("bash")
            .arg(script())
            .arg("up")
            .arg(&dir)
            .args(["--owner", &std::process::id().to_string()]));
        assert!(up.status.success(), "libvirt.sh up: {}", text(&up));
        let env = std::fs::read_to_string(dir.join("env")).expect("DIR/env");
        let env = env.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Ok(Pair { dir, env })
    }

    fn var(&self, key: &str) -> &str {
        self.env.get(key).unwrap_or_else(|| panic!("{key} missing from {}/env", self.dir.display()))
    }

    fn virsh(&self, side: &str, args: &[&str]) -> Output {
        let uri = self.var(&format!("PMIGRATE_LV_{}_URI", side.to_uppercase()));
        run(Command::new("virsh").args(["-c", uri]).args(args))
    }

    /// Starts the test guest `name` on the source; waits for its workload.
    fn start_guest(&self, name: &str) -> Vec<Heartbeat> {
        let st = run(Command::new("bash")
            .arg(script())
            .arg("start-guest")
            .arg(&self.dir)
            .arg(name)
            .args(["--mb", "64", "--rate", "20"]));
        assert!(st.status.success(), "start-guest {name}: {}", text(&st));
        self.wait_beats("src", name, 3)
    }

    fn console(&self, side: &str, name: &str) -> String {
        let dir = self.var(&format!("PMIGRATE_LV_{}_LOG_DIR", side.to_uppercase()));
        std::fs::read_to_string(Path::new(dir).join(format!("{name}-console.log"))).unwrap_or_default()
    }

    /// Waits for `n` heartbeats on `side`'s console (the destination's holds
    /// only what came after the switchover); fails on damage.
    fn wait_beats(&self, side: &str, name: &str, n: usize) -> Vec<Heartbeat> {
        let deadline = Instant::now() + qemu::BOOT_TIMEOUT;
        loop {
            let console = self.console(side, name);
            let damage: Vec<&str> = console.lines().filter(|l| is_corruption_line(l)).collect();
            assert!(damage.is_empty(), "{name} on {side}: damage: {damage:?}");
            let beats: Vec<Heartbeat> = console.lines().filter_map(parse_heartbeat).collect();
            if beats.len() >= n {
                return beats;
            }
            assert!(Instant::now() < deadline, "{name} on {side}: {} heartbeats:\n{console}", beats.len());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Migrates `name` with `virsh migrate --live --p2p` over a `unix:` URI
    /// through a fresh proxy pair; returns the proxy's outcomes.
    fn migrate_through_proxy(&self, name: &str, extra: &[&str]) -> ((usize, usize), (usize, usize)) {
        let sock = |side: &str| {
            let d = self.var(&format!("PMIGRATE_LV_{side}_MIG_DIR"));
            format!("unix:{d}/{name}.sock")
        };
        let logs = self.dir.join(format!("proxy-{name}"));
        std::fs::create_dir_all(&logs).expect("proxy log dir");
        let proxy = ProxyPair::start(PMIGRATE, &logs, &[sock("SRC")], &[sock("DST")], &["--streams", "4"], None);
        let uri = format!("unix://{}/{name}.sock", self.var("PMIGRATE_LV_MIG_DIR"));
        let t0 = Instant::now();
        let mut args = vec!["migrate", "--live", "--p2p", "--migrateuri", &uri];
        args.extend_from_slice(extra);
        let dst_uri = self.var("PMIGRATE_LV_DST_URI").to_string();
        args.extend_from_slice(&[name, &dst_uri]);
        let mig = self.virsh("src", &args);
        eprintln!("virsh migrate {extra:?}: {:.1} s, {}", t0.elapsed().as_secs_f64(), text(&mig).trim());
        assert!(mig.status.success(), "virsh migrate failed: {}\n{}", text(&mig), proxy.logs());
        // One connection per channel: main, and the multifd ones.
        let conns = if extra.contains(&"--parallel") { 5 } else { 1 };
        let outcomes = proxy.wait_ended(conns, EXIT_TIMEOUT);
        eprintln!("{}", proxy.logs());
        outcomes
    }

    /// The guest runs at the destination, its workload going on from where
    /// the source left it, undamaged.
    fn check_landed(&self, name: &str, src_beats: &[Heartbeat]) {
        let state = self.virsh("dst", &["domstate", name]);
        assert_eq!(String::from_utf8_lossy(&state.stdout).trim(), "running", "destination: {}", text(&state));
        let gone = self.virsh("src", &["domstate", name]);
        assert!(!gone.status.success(), "the source still has {name}: {}", text(&gone));
        let beats = self.wait_beats("dst", name, 5);
        let (last_src, first, last) = (&src_beats[src_beats.len() - 1], &beats[0], &beats[beats.len() - 1]);
        assert!(
            first.t >= last_src.t && first.gen >= last_src.gen && first.verified >= last_src.verified,
            "the destination's workload did not go on from the source's: {last_src:?} then {first:?}"
        );
        assert!(last.verified > first.verified && last.gen > first.gen, "stalled: {first:?} .. {last:?}");
        assert!(beats.iter().all(|b| b.ok && b.errors == 0), "{beats:?}");
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let down = run(Command::new("bash").arg(script()).arg("down").arg(&self.dir));
        if !down.status.success() {
            eprintln!("libvirt.sh down: {}", text(&down));
        }
        if std::thread::panicking() || std::env::var_os("PMIGRATE_KEEP_VM_LOGS").is_some() {
            eprintln!("libvirt logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[test]
fn virsh_migrate_over_a_unix_uri_through_the_proxy_plain_and_multifd() {
    if qemu::skip_without_qemu("virsh_migrate_over_a_unix_uri_through_the_proxy_plain_and_multifd") {
        return;
    }
    if let Err(e) = qemu::guest_image() {
        panic!("the test guest: {e}");
    }
    let pair = match Pair::up() {
        Ok(p) => p,
        Err(why) => {
            eprintln!("SKIPPED virsh_migrate_over_a_unix_uri_through_the_proxy_plain_and_multifd: {why}");
            return;
        }
    };
    // One connection: libvirt's plain live migration.
    let before = pair.start_guest("plain");
    let outcomes = pair.migrate_through_proxy("plain", &[]);
    assert_eq!(outcomes, ((1, 0), (1, 0)), "connections done and failed per side");
    pair.check_landed("plain", &before);
    // multifd with four channels: five connections, the main one first.
    let before = pair.start_guest("multifd");
    let outcomes = pair.migrate_through_proxy("multifd", &["--parallel", "--parallel-connections", "4"]);
    assert_eq!(outcomes, ((5, 0), (5, 0)), "connections done and failed per side");
    pair.check_landed("multifd", &before);
}
