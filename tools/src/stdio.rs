//! The standard descriptors of the `exec:` helpers `send` and `recv`: QEMU's
//! migration channel is the helper's stdin and stdout.
//!
//! QEMU ends an `exec:` migration — completed, failed or cancelled — by
//! closing both pipes and then waiting for the helper (`waitpid`) with its
//! main loop stopped, so the helper must end promptly once they are closed.
//! At the source, [`ReturnPath`] tells the relay that nothing reads the way
//! back once stdin has ended (see `pmigrate::relay`); at the
//! destination, [`take_stdout`] makes the relay's copy of stdout the
//! process's only one, so the pipe closes the moment the relay drops it and
//! the destination QEMU reads the end of its stream then.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd};

use anyhow::{Context, Result};
use pmigrate::relay::Output;

/// `send`'s stdout: QEMU's return path (post-copy page requests, its
/// acknowledgements), read by QEMU only while its channel is open.
pub struct ReturnPath(pub File);

impl Write for ReturnPath {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl Output for ReturnPath {
    fn finish(&mut self) -> io::Result<()> {
        self.0.flush()
    }

    /// Asked once stdin has ended, i.e. QEMU closed its channel: it closes
    /// both pipes together, so nothing reads the return path any more.
    /// (Polling the pipe cannot tell: QEMU 7.2's return-path thread stays
    /// blocked in a read on it until this helper exits, and counts as a
    /// reader until then.)
    fn reader_gone(&self) -> bool {
        true
    }
}

/// A duplicate of stdin: raw and unbuffered.
pub fn stdin() -> Result<File> {
    Ok(File::from(io::stdin().as_fd().try_clone_to_owned().context("duplicate stdin")?))
}

/// A duplicate of stdout (raw and unbuffered: std's stdout is line-buffered,
/// wrong for a binary stream), the process's only descriptor of it: fd 1
/// itself then points at `/dev/null`. Anything printed to stdout by mistake
/// goes nowhere instead of into the migration stream.
pub fn take_stdout() -> Result<File> {
    let out = File::from(io::stdout().as_fd().try_clone_to_owned().context("duplicate stdout")?);
    let null = File::options().write(true).open("/dev/null").context("open /dev/null")?;
    io::stdout().flush().context("flush stdout")?;
    // SAFETY: both descriptors are open for the call (`null` is owned here,
    // 1 is the process's stdout); dup2 only replaces what fd 1 refers to,
    // and std's stdout keeps writing to fd 1, now /dev/null.
    if unsafe { libc::dup2(null.as_raw_fd(), 1) } < 0 {
        return Err(io::Error::last_os_error()).context("point stdout at /dev/null");
    }
    Ok(out)
}

/// Grows a pipe to 1 MiB, so the producer can run ahead by a chunk or four;
/// anything but a pipe is left as it is.
pub fn grow_pipe(f: &File) {
    // SAFETY: F_SETPIPE_SZ takes an int argument and only resizes the pipe
    // behind a valid descriptor; on anything but a pipe it fails harmlessly.
    let _ = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
}
