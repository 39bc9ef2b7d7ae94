//! Whether io_uring can be used here, and which of its features.

use std::fmt;
use std::io;
use std::sync::OnceLock;

use io_uring::{opcode, IoUring, Probe};

use super::arena::Mapping;

const SYSCTL: &str = "/proc/sys/kernel/io_uring_disabled";

/// Opcodes the backend cannot do without, with their names for messages.
const REQUIRED: [(u8, &str); 6] = [
    (opcode::Send::CODE, "IORING_OP_SEND"),
    (opcode::Recv::CODE, "IORING_OP_RECV"),
    (opcode::ReadFixed::CODE, "IORING_OP_READ_FIXED"),
    (opcode::LinkTimeout::CODE, "IORING_OP_LINK_TIMEOUT"),
    (opcode::AsyncCancel::CODE, "IORING_OP_ASYNC_CANCEL"),
    // Not used: it marks Linux 5.19, whose sends retry a partial send under
    // MSG_WAITALL and fail the link on a short one (see the module docs).
    (opcode::Socket::CODE, "IORING_OP_SOCKET (Linux 5.19)"),
];

/// Size of the buffer the probe tries to register.
const PROBE_BUFFER: usize = 64 << 10;

/// What the running kernel offers the io_uring backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Support {
    /// `IORING_OP_SEND_ZC` exists (Linux 6.0).
    pub send_zc: bool,
    /// A small buffer could be registered as a fixed buffer under this
    /// process's `RLIMIT_MEMLOCK`. (A larger arena may still not fit: the
    /// writer and the reader fall back to unregistered buffers then.)
    pub fixed_buffers: bool,
}

impl fmt::Display for Support {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let yn = |b| if b { "yes" } else { "no" };
        write!(f, "io_uring: send_zc {}, fixed buffers {}", yn(self.send_zc), yn(self.fixed_buffers))
    }
}

/// Why the io_uring backend cannot be used here.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Unavailable {
    reason: String,
}

impl Unavailable {
    fn new(reason: impl Into<String>) -> Self {
        Self { reason: reason.into() }
    }

    /// The reason, for a person ("io_uring disabled by
    /// kernel.io_uring_disabled=2").
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

/// Probes once per process (the answer is cached) whether io_uring works
/// here and what it offers; the error says why not.
pub fn probe() -> Result<Support, Unavailable> {
    static CACHE: OnceLock<Result<Support, Unavailable>> = OnceLock::new();
    CACHE.get_or_init(detect).clone()
}

fn detect() -> Result<Support, Unavailable> {
    let sysctl = std::fs::read_to_string(SYSCTL).ok();
    if let Some(reason) = sysctl.as_deref().and_then(sysctl_refusal) {
        return Err(Unavailable::new(reason));
    }
    let mut ring = IoUring::new(4).map_err(|e| Unavailable::new(setup_refusal(&e, sysctl.as_deref())))?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| Unavailable::new(format!("io_uring_register(PROBE): {} (Linux before 5.6?)", os_text(&e))))?;
    if let Some((_, name)) = REQUIRED.iter().find(|(code, _)| !probe.is_supported(*code)) {
        return Err(Unavailable::new(format!("kernel lacks {name}")));
    }
    if !ring.params().is_feature_ext_arg() {
        return Err(Unavailable::new("kernel lacks IORING_FEAT_EXT_ARG (Linux 5.11)"));
    }
    // A seccomp filter may allow io_uring_setup and refuse io_uring_enter.
    let nop = opcode::Nop::new().build().user_data(7);
    // SAFETY: a NOP names no memory and no file.
    unsafe { ring.submission().push(&nop) }.map_err(|_| Unavailable::new("io_uring: empty ring is full"))?;
    ring.submit_and_wait(1).map_err(|e| Unavailable::new(format!("io_uring_enter: {}", os_text(&e))))?;
    match ring.completion().next() {
        Some(c) if c.user_data() == 7 && c.result() == 0 => {}
        other => return Err(Unavailable::new(format!("io_uring: NOP completed as {other:?}"))),
    }
    let fixed_buffers = can_register(&ring);
    Ok(Support { send_zc: probe.is_supported(opcode::SendZc::CODE), fixed_buffers })
}

/// Whether a small anonymous buffer registers (pins) under RLIMIT_MEMLOCK.
fn can_register(ring: &IoUring) -> bool {
    let Ok(map) = Mapping::new(PROBE_BUFFER) else { return false };
    // SAFETY: the iovec covers `map`, which outlives the registration: it
    // is unregistered below, and if that fails `map` is leaked.
    let ok = unsafe { ring.submitter().register_buffers(&[map.iovec()]) }.is_ok();
    if ok && ring.submitter().unregister_buffers().is_err() {
        std::mem::forget(map);
    }
    ok
}

/// The reason `kernel.io_uring_disabled` (the text of its /proc file)
/// refuses io_uring to every process, if it does.
///
/// 0 allows all; 1 allows members of `kernel.io_uring_group` and holders
/// of CAP_SYS_ADMIN, which only creating a ring tells; 2 refuses all.
pub(super) fn sysctl_refusal(text: &str) -> Option<String> {
    match text.trim() {
        "2" => Some("io_uring disabled by kernel.io_uring_disabled=2".to_string()),
        _ => None,
    }
}

/// The reason for a failed `io_uring_setup`, with what it likely means.
pub(super) fn setup_refusal(err: &io::Error, sysctl: Option<&str>) -> String {
    let restricted = sysctl.map(str::trim) == Some("1");
    let hint = match err.raw_os_error() {
        Some(libc::EPERM) if restricted => {
            " (kernel.io_uring_disabled=1: not in kernel.io_uring_group and without CAP_SYS_ADMIN)"
        }
        Some(libc::EPERM) => " (seccomp?)",
        Some(libc::ENOSYS) => " (kernel without io_uring, or seccomp?)",
        Some(libc::ENOMEM) => " (RLIMIT_MEMLOCK too small for the ring?)",
        _ => "",
    };
    format!("io_uring_setup: {}{hint}", os_text(err))
}

/// An OS error's text without std's " (os error N)" suffix.
fn os_text(err: &io::Error) -> String {
    let s = err.to_string();
    match s.rsplit_once(" (os error ") {
        Some((text, _)) => text.to_string(),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_disabling_sysctl() {
        assert_eq!(sysctl_refusal("2\n").as_deref(), Some("io_uring disabled by kernel.io_uring_disabled=2"));
        assert_eq!(sysctl_refusal("0\n"), None);
        assert_eq!(sysctl_refusal("1\n"), None, "1 may still allow this process");
        assert_eq!(sysctl_refusal("garbage"), None, "unknown: let io_uring_setup decide");
    }

    #[test]
    fn explains_setup_failures() {
        let eperm = io::Error::from_raw_os_error(libc::EPERM);
        assert_eq!(setup_refusal(&eperm, Some("0\n")), "io_uring_setup: Operation not permitted (seccomp?)");
        assert_eq!(setup_refusal(&eperm, None), "io_uring_setup: Operation not permitted (seccomp?)");
        let r = setup_refusal(&eperm, Some("1\n"));
        assert!(r.contains("kernel.io_uring_disabled=1") && r.contains("io_uring_group"), "{r}");
        let enosys = io::Error::from_raw_os_error(libc::ENOSYS);
        assert_eq!(
            setup_refusal(&enosys, None),
            "io_uring_setup: Function not implemented (kernel without io_uring, or seccomp?)"
        );
        let enomem = io::Error::from_raw_os_error(libc::ENOMEM);
        assert!(setup_refusal(&enomem, None).contains("RLIMIT_MEMLOCK"));
    }

    #[test]
    fn probe_runs_and_is_cached() {
        let first = probe();
        match &first {
            Ok(s) => println!("{s}"),
            Err(e) => println!("io_uring unavailable: {e}"),
        }
        assert_eq!(first, probe());
        if let Err(e) = &first {
            assert!(!e.reason().is_empty());
        }
    }
}
