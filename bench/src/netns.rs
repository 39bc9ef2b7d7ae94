//! Running a thread inside a network namespace of the multi-NIC testbed
//! (`tools/testbed.sh`), so one process can hold the source in one
//! namespace and the destination in another.

use std::fs::File;
use std::os::fd::AsRawFd;

/// Moves the calling thread into the network namespace `name` (as made by
/// `ip netns add`). Only this thread moves: sockets it creates afterwards
/// live in that namespace; threads it spawns afterwards start there too.
pub fn enter(name: &str) -> anyhow::Result<()> {
    let path = format!("/var/run/netns/{name}");
    let f = File::open(&path).map_err(|e| anyhow::anyhow!("open {path}: {e} (is the testbed up?)"))?;
    // SAFETY: setns only reads the descriptor, which `f` keeps open for the
    // call; CLONE_NEWNET restricts it to a network namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        anyhow::bail!("setns {name}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}
