//! The userfaultfd kernel interface both users of it share: the write-protect
//! dirty tracker ([`crate::dirty::uffd_wp`]) and post-copy's missing-page
//! handling ([`crate::postcopy`]).
//!
//! # Safety
//!
//! The `unsafe` here is foreign calls: `userfaultfd(2)`, `read(2)` into a
//! buffer we own, and `ioctl(2)`s whose argument is one of our own
//! `#[repr(C)]` structs (layouts and ioctl numbers asserted at compile time).
//! Guest addresses are passed to the kernel as numbers, which it checks
//! against the calling process's mappings; this module never dereferences
//! them. `UFFDIO_COPY` reads `len` bytes at `src`: [`Uffd::copy`] takes the
//! source as a slice, so those bytes are ours and alive for the call.
//!
//! What callers must keep is correctness, not memory safety: a range must
//! stay mapped at the same address while it is registered (the kernel
//! refuses ioctls on ranges that are not, with an error).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The kernel interface, from `include/uapi/linux/userfaultfd.h` and
/// `include/uapi/linux/fs.h` (Linux 6.7), which libc 0.2 does not carry.
pub(crate) mod abi {
    use std::mem::size_of;

    /// Whether this architecture encodes ioctl numbers the generic way
    /// (`_IOC` of `asm-generic/ioctl.h`), which `ioc` implements.
    pub(crate) const GENERIC_IOCTL: bool = cfg!(any(
        target_arch = "x86_64",
        target_arch = "x86",
        target_arch = "aarch64",
        target_arch = "arm",
        target_arch = "riscv64",
        target_arch = "loongarch64",
        target_arch = "s390x"
    ));

    const IOC_NONE: u32 = 0;
    const IOC_WRITE: u32 = 1;
    const IOC_READ: u32 = 2;

    /// `_IOC(dir, ty, nr, size)`. The size field has 14 bits, checked first,
    /// so the cast below is exact.
    const fn ioc(dir: u32, ty: u8, nr: u8, size: usize) -> u32 {
        assert!(size < 1 << 14, "ioctl argument too large to encode");
        (dir << 30) | ((size as u32) << 16) | ((ty as u32) << 8) | nr as u32
    }

    pub(crate) const UFFD_API: u64 = 0xAA;
    /// `userfaultfd(2)` flag: handle only faults raised in user mode, which
    /// unprivileged callers may ask for. Harmless in asynchronous WP mode,
    /// where the kernel resolves every write fault itself.
    pub(crate) const UFFD_USER_MODE_ONLY: libc::c_int = 1;

    pub(crate) const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
    pub(crate) const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
    pub(crate) const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;

    pub(crate) const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
    pub(crate) const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
    /// Bits of `uffdio_register.ioctls` saying `UFFDIO_COPY` and
    /// `UFFDIO_ZEROPAGE` work on the range.
    pub(crate) const UFFDIO_COPY_BIT: u64 = 1 << 0x03;
    pub(crate) const UFFDIO_ZEROPAGE_BIT: u64 = 1 << 0x04;
    /// `uffd_msg.event` of a page fault.
    pub(crate) const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
    pub(crate) const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
    /// Bit of `uffdio_register.ioctls` saying `UFFDIO_WRITEPROTECT` works on
    /// the range (`1 << _UFFDIO_WRITEPROTECT`).
    pub(crate) const UFFDIO_WRITEPROTECT_BIT: u64 = 1 << 0x06;

    pub(crate) const PAGE_IS_WPALLOWED: u64 = 1 << 0;
    pub(crate) const PAGE_IS_WRITTEN: u64 = 1 << 1;
    /// Mapped by a huge page (THP or hugetlbfs); the tests check THP use.
    #[cfg(test)]
    pub(crate) const PAGE_IS_HUGE: u64 = 1 << 6;
    pub(crate) const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
    pub(crate) const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

    /// `struct uffdio_api`.
    #[repr(C)]
    #[derive(Debug, Default)]
    pub(crate) struct UffdioApi {
        pub(crate) api: u64,
        pub(crate) features: u64,
        pub(crate) ioctls: u64,
    }

    /// `struct uffdio_range`.
    #[repr(C)]
    #[derive(Debug, Default)]
    pub(crate) struct UffdioRange {
        pub(crate) start: u64,
        pub(crate) len: u64,
    }

    /// `struct uffdio_register`.
    #[repr(C)]
    #[derive(Debug, Default)]
    pub(crate) struct UffdioRegister {
        pub(crate) range: UffdioRange,
        pub(crate) mode: u64,
        pub(crate) ioctls: u64,
    }

    /// `struct uffdio_writeprotect`.
    #[repr(C)]
    #[derive(Debug, Default)]
    pub(crate) struct UffdioWriteprotect {
        pub(crate) range: UffdioRange,
        pub(crate) mode: u64,
    }

    /// `struct uffdio_copy`.
    #[repr(C)]
    #[derive(Debug, Default)]
    pub(crate) struct UffdioCopy {
        pub(crate) dst: u64,
        pub(crate) src: u64,
        pub(crate) len: u64,
        pub(crate) mode: u64,
        pub(crate) copy: i64,
    }

    /// `struct uffdio_zeropage`.
    #[repr(C)]
    #[derive(Debug, Default)]
    pub(crate) struct UffdioZeropage {
        pub(crate) range: UffdioRange,
        pub(crate) mode: u64,
        pub(crate) zeropage: i64,
    }

    /// `struct uffd_msg` as a page-fault event lays it out: `event`, three
    /// reserved fields, then `arg.pagefault` (`flags`, `address`, `ptid`)
    /// padded to the union's 24 bytes.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default)]
    pub(crate) struct UffdMsg {
        pub(crate) event: u8,
        pub(crate) reserved1: u8,
        pub(crate) reserved2: u16,
        pub(crate) reserved3: u32,
        pub(crate) flags: u64,
        pub(crate) address: u64,
        pub(crate) ptid: u32,
        pub(crate) pad: u32,
    }

    /// `struct page_region`: pages `[start, end)` share `categories`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default)]
    pub(crate) struct PageRegion {
        pub(crate) start: u64,
        pub(crate) end: u64,
        pub(crate) categories: u64,
    }

    /// `struct pm_scan_arg`.
    #[repr(C)]
    #[derive(Debug, Default)]
    pub(crate) struct PmScanArg {
        pub(crate) size: u64,
        pub(crate) flags: u64,
        pub(crate) start: u64,
        pub(crate) end: u64,
        pub(crate) walk_end: u64,
        pub(crate) vec: u64,
        pub(crate) vec_len: u64,
        pub(crate) max_pages: u64,
        pub(crate) category_inverted: u64,
        pub(crate) category_mask: u64,
        pub(crate) category_anyof_mask: u64,
        pub(crate) return_mask: u64,
    }

    pub(crate) const USERFAULTFD_IOC_NEW: u32 = ioc(IOC_NONE, 0xAA, 0x00, 0);
    pub(crate) const UFFDIO_API: u32 = ioc(IOC_READ | IOC_WRITE, 0xAA, 0x3F, size_of::<UffdioApi>());
    pub(crate) const UFFDIO_REGISTER: u32 = ioc(IOC_READ | IOC_WRITE, 0xAA, 0x00, size_of::<UffdioRegister>());
    pub(crate) const UFFDIO_UNREGISTER: u32 = ioc(IOC_READ, 0xAA, 0x01, size_of::<UffdioRange>());
    pub(crate) const UFFDIO_WRITEPROTECT: u32 = ioc(IOC_READ | IOC_WRITE, 0xAA, 0x06, size_of::<UffdioWriteprotect>());
    pub(crate) const UFFDIO_WAKE: u32 = ioc(IOC_READ, 0xAA, 0x02, size_of::<UffdioRange>());
    pub(crate) const UFFDIO_COPY: u32 = ioc(IOC_READ | IOC_WRITE, 0xAA, 0x03, size_of::<UffdioCopy>());
    pub(crate) const UFFDIO_ZEROPAGE: u32 = ioc(IOC_READ | IOC_WRITE, 0xAA, 0x04, size_of::<UffdioZeropage>());
    pub(crate) const PAGEMAP_SCAN: u32 = ioc(IOC_READ | IOC_WRITE, b'f', 16, size_of::<PmScanArg>());

    // Layouts and numbers as the kernel headers define them (x86_64 values).
    const _: () = assert!(size_of::<UffdioApi>() == 24);
    const _: () = assert!(size_of::<UffdioRange>() == 16);
    const _: () = assert!(size_of::<UffdioRegister>() == 32);
    const _: () = assert!(size_of::<UffdioWriteprotect>() == 24);
    const _: () = assert!(size_of::<PageRegion>() == 24);
    const _: () = assert!(size_of::<PmScanArg>() == 96);
    const _: () = assert!(USERFAULTFD_IOC_NEW == 0xAA00);
    const _: () = assert!(UFFDIO_API == 0xC018_AA3F);
    const _: () = assert!(UFFDIO_REGISTER == 0xC020_AA00);
    const _: () = assert!(UFFDIO_UNREGISTER == 0x8010_AA01);
    const _: () = assert!(UFFDIO_WRITEPROTECT == 0xC018_AA06);
    const _: () = assert!(PAGEMAP_SCAN == 0xC060_6610);
    const _: () = assert!(size_of::<UffdioCopy>() == 40);
    const _: () = assert!(size_of::<UffdioZeropage>() == 32);
    const _: () = assert!(size_of::<UffdMsg>() == 32);
    const _: () = assert!(UFFDIO_WAKE == 0x8010_AA02);
    const _: () = assert!(UFFDIO_COPY == 0xC028_AA03);
    const _: () = assert!(UFFDIO_ZEROPAGE == 0xC020_AA04);
}

/// An ioctl request number in the type `libc::ioctl` takes. The numbers are
/// bit patterns: on targets where that type is `c_int` the top bit becomes
/// the sign bit, as it does in C.
pub(crate) fn req(n: u32) -> libc::Ioctl {
    n as libc::Ioctl
}

/// `Ok(rc)` for a non-negative return, else the thread's `errno`.
pub(crate) fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A userfaultfd.
#[derive(Debug)]
pub(crate) struct Uffd(OwnedFd);

impl Uffd {
    /// A new userfaultfd (close-on-exec, non-blocking): from `userfaultfd(2)`;
    /// if that is refused (`EPERM`: `vm.unprivileged_userfaultfd` is 0 and we
    /// lack `CAP_SYS_PTRACE`), from `/dev/userfaultfd`; failing that, from
    /// `userfaultfd(2)` with `UFFD_USER_MODE_ONLY`.
    pub(crate) fn open() -> io::Result<Self> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        let refused = match Self::syscall(flags) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => e,
            done => return done,
        };
        let dev = match Self::from_dev(flags) {
            Ok(u) => return Ok(u),
            Err(e) => e,
        };
        Self::syscall(flags | abi::UFFD_USER_MODE_ONLY).map_err(|user| {
            io::Error::new(
                refused.kind(),
                format!(
                    "userfaultfd(2): {refused}; /dev/userfaultfd: {dev}; \
                     userfaultfd(2) with UFFD_USER_MODE_ONLY: {user}"
                ),
            )
        })
    }

    fn syscall(flags: libc::c_int) -> io::Result<Self> {
        // SAFETY: userfaultfd(2) takes one integer of flags and touches none
        // of our memory.
        let rc = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        Self::own(rc)
    }

    fn from_dev(flags: libc::c_int) -> io::Result<Self> {
        let dev = File::options().read(true).write(true).open("/dev/userfaultfd")?;
        // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value, not a pointer,
        // and touches none of our memory.
        let rc = unsafe { libc::ioctl(dev.as_raw_fd(), req(abi::USERFAULTFD_IOC_NEW), flags) };
        Self::own(rc.into())
    }

    /// Takes ownership of the descriptor a call returned, or its error.
    fn own(rc: libc::c_long) -> io::Result<Self> {
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = RawFd::try_from(rc).map_err(|_| io::Error::other(format!("descriptor {rc} out of range")))?;
        // SAFETY: the kernel just returned `fd` as a new open descriptor, which
        // nothing else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// The `UFFDIO_API` handshake, enabling `features`; returns the features
    /// the kernel offers. Allowed once per userfaultfd.
    pub(crate) fn api(&self, features: u64) -> io::Result<u64> {
        let mut arg = abi::UffdioApi { api: abi::UFFD_API, features, ioctls: 0 };
        // SAFETY: UFFDIO_API reads and writes one `struct uffdio_api`, which
        // `UffdioApi` lays out (size asserted, and encoded in the number);
        // `arg` is a live local.
        cvt(unsafe { libc::ioctl(self.0.as_raw_fd(), req(abi::UFFDIO_API), &raw mut arg) })?;
        Ok(arg.features)
    }

    /// Registers `range` in `mode` (`UFFDIO_REGISTER_MODE_*`); returns the
    /// ioctls the kernel allows on it.
    pub(crate) fn register(&self, range: abi::UffdioRange, mode: u64) -> io::Result<u64> {
        let mut arg = abi::UffdioRegister { range, mode, ioctls: 0 };
        // SAFETY: UFFDIO_REGISTER reads and writes one `struct uffdio_register`,
        // which `UffdioRegister` lays out (size asserted); `arg` is a live local.
        cvt(unsafe { libc::ioctl(self.0.as_raw_fd(), req(abi::UFFDIO_REGISTER), &raw mut arg) })?;
        Ok(arg.ioctls)
    }

    /// Write-protects every page of `range`, populated or not.
    pub(crate) fn write_protect(&self, range: abi::UffdioRange) -> io::Result<()> {
        let mut arg = abi::UffdioWriteprotect { range, mode: abi::UFFDIO_WRITEPROTECT_MODE_WP };
        // SAFETY: UFFDIO_WRITEPROTECT reads and writes one `struct
        // uffdio_writeprotect`, which `UffdioWriteprotect` lays out (size
        // asserted); `arg` is a live local.
        cvt(unsafe { libc::ioctl(self.0.as_raw_fd(), req(abi::UFFDIO_WRITEPROTECT), &raw mut arg) })?;
        Ok(())
    }

    /// Unregisters `range`.
    pub(crate) fn unregister(&self, range: abi::UffdioRange) -> io::Result<()> {
        let mut arg = range;
        // SAFETY: UFFDIO_UNREGISTER reads one `struct uffdio_range`, which
        // `UffdioRange` lays out (size asserted); `arg` is a live local.
        cvt(unsafe { libc::ioctl(self.0.as_raw_fd(), req(abi::UFFDIO_UNREGISTER), &raw mut arg) })?;
        Ok(())
    }

    /// Atomically fills the missing pages at `dst` with `src` (whole pages)
    /// and wakes the threads faulting on them (`UFFDIO_COPY`). Retries the
    /// rest after a partial copy (`EAGAIN`); `EEXIST` (a page of the range
    /// is already there) is returned as such, the pages before it copied.
    pub(crate) fn copy(&self, dst: u64, src: &[u8]) -> io::Result<()> {
        let mut done = 0u64;
        let len = src.len() as u64;
        while done < len {
            let mut arg = abi::UffdioCopy {
                dst: dst + done,
                src: src[done as usize..].as_ptr() as u64,
                len: len - done,
                mode: 0,
                copy: 0,
            };
            // SAFETY: UFFDIO_COPY reads and writes one `struct uffdio_copy`,
            // which `UffdioCopy` lays out (size asserted), and reads `len`
            // bytes at `src`: the rest of the `src` slice, borrowed for the
            // call. `dst` is a number the kernel checks against our mappings.
            let rc = unsafe { libc::ioctl(self.0.as_raw_fd(), req(abi::UFFDIO_COPY), &raw mut arg) };
            if rc == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) if arg.copy > 0 => done += arg.copy as u64,
                Some(libc::EAGAIN) => continue,
                _ => return Err(e),
            }
        }
        Ok(())
    }

    /// Maps the shared zero page at the missing pages `[start, start + len)`
    /// and wakes the threads faulting on them (`UFFDIO_ZEROPAGE`).
    pub(crate) fn zeropage(&self, start: u64, len: u64) -> io::Result<()> {
        let mut arg = abi::UffdioZeropage { range: abi::UffdioRange { start, len }, mode: 0, zeropage: 0 };
        loop {
            // SAFETY: UFFDIO_ZEROPAGE reads and writes one `struct
            // uffdio_zeropage`, which `UffdioZeropage` lays out (size
            // asserted); `arg` is a live local.
            let rc = unsafe { libc::ioctl(self.0.as_raw_fd(), req(abi::UFFDIO_ZEROPAGE), &raw mut arg) };
            if rc == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) if arg.zeropage > 0 => {
                    arg.range.start += arg.zeropage as u64;
                    arg.range.len -= arg.zeropage as u64;
                    arg.zeropage = 0;
                }
                Some(libc::EAGAIN) => {}
                _ => return Err(e),
            }
        }
    }

    /// Wakes the threads faulting in `[start, start + len)` (`UFFDIO_WAKE`),
    /// for pages that became present by other means.
    pub(crate) fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let mut arg = abi::UffdioRange { start, len };
        // SAFETY: UFFDIO_WAKE reads one `struct uffdio_range`, which
        // `UffdioRange` lays out (size asserted); `arg` is a live local.
        cvt(unsafe { libc::ioctl(self.0.as_raw_fd(), req(abi::UFFDIO_WAKE), &raw mut arg) })?;
        Ok(())
    }

    /// Waits up to `timeout` for messages, then reads what is there (the
    /// descriptor is non-blocking): the faulting addresses of page-fault
    /// events go to `faults`. Other events are not enabled and not expected.
    pub(crate) fn read_faults(&self, timeout: std::time::Duration, faults: &mut Vec<u64>) -> io::Result<()> {
        let mut pfd = libc::pollfd { fd: self.0.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: poll(2) reads and writes one `struct pollfd`, a live local.
        let rc = unsafe { libc::poll(&raw mut pfd, 1, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(()) } else { Err(e) };
        }
        if rc == 0 {
            return Ok(());
        }
        let mut msgs = [abi::UffdMsg::default(); 64];
        // SAFETY: read(2) writes at most the given length into `msgs`, a live
        // local array of plain integers (any bytes are valid for it).
        let n = unsafe { libc::read(self.0.as_raw_fd(), msgs.as_mut_ptr().cast(), std::mem::size_of_val(&msgs)) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock { Ok(()) } else { Err(e) };
        }
        let n = n as usize / std::mem::size_of::<abi::UffdMsg>();
        faults.extend(msgs[..n].iter().filter(|m| m.event == abi::UFFD_EVENT_PAGEFAULT).map(|m| m.address));
        Ok(())
    }
}
