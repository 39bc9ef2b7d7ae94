//! Submitting to and waiting on a ring: what the writer and the reader
//! share.

use std::io;
use std::time::Duration;

use io_uring::types::{SubmitArgs, Timespec};
use io_uring::{EnterFlags, IoUring};

/// How many times a refused submission (EAGAIN, EBUSY: the kernel is short
/// of memory or completion space) is tried again, a millisecond apart.
const SUBMIT_TRIES: u32 = 1000;

/// One completion, copied out of the completion queue.
#[derive(Clone, Copy, Debug)]
pub(super) struct Cqe {
    pub(super) user_data: u64,
    pub(super) res: i32,
    pub(super) flags: u32,
}

/// Moves every completion now posted into `out`.
pub(super) fn reap(ring: &mut IoUring, out: &mut Vec<Cqe>) {
    out.extend(ring.completion().map(|c| Cqe { user_data: c.user_data(), res: c.result(), flags: c.flags() }));
}

/// Hands every queued SQE to the kernel and returns how many it took,
/// which can be fewer (the rest stay queued) when it ran short of memory.
/// An error means it took none.
pub(super) fn submit(ring: &IoUring) -> io::Result<usize> {
    retried(|| ring.submit())
}

/// Like [`submit`], and waits in the same `io_uring_enter` until `want`
/// completions are posted (a signal may cut the wait short: the caller
/// waits again for what is missing).
pub(super) fn submit_and_wait(ring: &IoUring, want: usize) -> io::Result<usize> {
    retried(|| ring.submit_and_wait(want))
}

/// Runs a submission again after EINTR, and after a refusal for want of
/// memory or completion space (EAGAIN, EBUSY) a millisecond later, at most
/// [`SUBMIT_TRIES`] times.
fn retried(mut enter: impl FnMut() -> io::Result<usize>) -> io::Result<usize> {
    let mut tries = 0;
    loop {
        match enter() {
            Ok(n) => return Ok(n),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY)) && tries < SUBMIT_TRIES => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Waits until at least `want` completions are posted, or `timeout`
/// passed, or a signal came: `Ok(false)` only for the timeout. Submits
/// nothing, whatever sits in the submission queue.
///
/// Resource shortages (EAGAIN, EBUSY) are waited out a millisecond and
/// reported as `Ok(true)`: the caller reaps and asks again. An error is a
/// ring that cannot wait at all.
pub(super) fn wait(ring: &IoUring, want: u32, timeout: Option<Duration>) -> io::Result<bool> {
    let get = EnterFlags::GETEVENTS.bits();
    let res = match timeout {
        // SAFETY: `to_submit` 0 makes the kernel take no SQE; no argument.
        None => unsafe { ring.submitter().enter::<libc::sigset_t>(0, want, get, None) },
        Some(t) => {
            let ts = Timespec::from(t);
            let args = SubmitArgs::new().timespec(&ts);
            // SAFETY: `to_submit` 0 makes the kernel take no SQE. With
            // EXT_ARG the argument is a `struct io_uring_getevents_arg`,
            // which `SubmitArgs` is (`repr(transparent)`, and what
            // `Submitter::submit_with_args` passes the same way); it and the
            // timespec it points at live across the call.
            unsafe { ring.submitter().enter(0, want, get | EnterFlags::EXT_ARG.bits(), Some(&args)) }
        }
    };
    match res {
        Ok(_) => Ok(true),
        Err(e) => match e.raw_os_error() {
            Some(libc::ETIME) => Ok(false),
            Some(libc::EINTR) => Ok(true),
            Some(libc::EAGAIN | libc::EBUSY) => {
                std::thread::sleep(Duration::from_millis(1));
                Ok(true)
            }
            _ => Err(e),
        },
    }
}
