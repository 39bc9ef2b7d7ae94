//! Dirty tracking by userfaultfd write-protection in asynchronous mode, read
//! and re-armed with the `PAGEMAP_SCAN` ioctl (Linux 6.7+, probed at run
//! time by [`probe`]).
//!
//! # The kernel mechanism
//!
//! [`UffdWpTracker::start`] opens a userfaultfd whose context enables
//! `UFFD_FEATURE_WP_ASYNC` and `UFFD_FEATURE_WP_UNPOPULATED`, registers every
//! region with it in write-protect mode (`UFFDIO_REGISTER_MODE_WP`) and
//! write-protects all of it (`UFFDIO_WRITEPROTECT`). Protection is a bit in
//! each page-table entry: present pages get the uffd-wp bit, and, thanks to
//! `WP_UNPOPULATED`, pages never touched get a "pte marker" carrying it, so a
//! first write to a fresh page is seen too. Reads do not clear it.
//!
//! In asynchronous mode a write to a protected page sends no message to a
//! handler thread: the kernel's fault handler clears the bit itself, under
//! the page-table lock, and the writer goes on (one minor fault per page per
//! round, 2-5 µs here; nothing ever waits for us). A page without the bit
//! is "written".
//!
//! [`UffdWpTracker::collect`] issues `PAGEMAP_SCAN` on `/proc/self/pagemap`
//! over each region for the category `PAGE_IS_WRITTEN`, with
//! `PM_SCAN_WP_MATCHING`: for every entry the kernel reads the bit and, when
//! it reports the page, sets the bit again, both under the page-table lock
//! the fault handler takes, and flushes the TLB before dropping the lock.
//! That is why no write is lost, whenever write W to page P happens:
//! - W faulted before the scan took P's lock: P is reported now, and the
//!   engine reads P only after `collect` returned, so it copies W.
//! - W faults after the scan re-protected P: the fault clears the bit again
//!   and P is reported by the next `collect`.
//! - W went through a TLB entry that was still writable (no fault): it lands
//!   before the flush completes, so before `collect` returns, in a page being
//!   reported now; the engine's later read copies it.
//!
//! `PM_SCAN_CHECK_WPASYNC` makes the scan fail (`EPERM`) rather than skip a
//! range that is no longer registered for asynchronous write-protection.
//!
//! Kernel details this relies on, checked by the tests below:
//! - With `category_mask` and `return_mask` both exactly `PAGE_IS_WRITTEN`,
//!   the scan counts every entry without the protection as written, empty
//!   ones included, and re-protects them: a page whose content went away
//!   without a write fault (an anonymous page dropped by `MADV_DONTNEED`, a
//!   written file page reclaimed or swapped out) is reported, not lost.
//! - A write to a protected transparent huge page splits it into 4 KiB
//!   entries, so only the written 4 KiB page is reported. A huge mapping
//!   reported whole (hugetlbfs) has all its 4 KiB bits set.
//!
//! What it cannot see: writes through another mapping of a shared file (by
//! another process, or another mapping in this one): the bits live in this
//! process's page tables. For guest memory that others write, use
//! [`HashTracker`](super::HashTracker). Nor content changes that keep the
//! protection mark, such as a hole punched in a shmem file: memory a VMM
//! discards (balloon) must be reported to the engine by the VMM.
//!
//! # Safety
//!
//! The `unsafe` here is foreign calls: `userfaultfd(2)` and `ioctl(2)`s whose
//! argument is one of our own `#[repr(C)]` structs (layouts and ioctl numbers
//! asserted at compile time) plus, for `PAGEMAP_SCAN`, an output buffer we
//! own. Guest addresses are passed to the kernel as numbers, which it checks;
//! this module never dereferences them.
//!
//! The contract on callers is one of correctness, not memory safety: each
//! region must stay mapped at the same address from `start` until `stop` (or
//! drop). Each `collect` borrows the [`GuestMemory`] and checks it holds the
//! regions registered (same addresses and lengths), so the mappings are alive
//! while they are scanned. The engine keeps the rest: `Source<'a>` borrows
//! the `GuestMemory` for `'a` and owns the tracker, and `Source::run` calls
//! `stop` right after the last round and drops the tracker before it
//! returns, so the tracker is gone before the memory can be unmapped (`Drop`
//! unregisters too, as a backstop). Were it not, the final
//! `UFFDIO_UNREGISTER` would find no mapping there (a no-op) or a mapping
//! registered by another userfaultfd, which the kernel refuses to unregister
//! through ours: harmless either way.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::OnceLock;

use pmigrate_ranges::{AtomicBitmap, Backing, GuestMemory, GuestRegion, HostPageSize, PAGE_SIZE_U64};

use super::{check_shape, DirtyError, DirtyTracker};
use crate::uffd::{abi, cvt, req, Uffd};

/// The tracker's name in reports and errors.
const NAME: &str = "uffd-wp";

/// `page_region` entries read per `PAGEMAP_SCAN` call (24 KiB, allocated once
/// per tracker). A scan that fills the buffer stops early and the next call
/// resumes at `walk_end`, so the size trades calls against memory and never
/// affects what is reported. 1024 ranges cover 1% of 1 GiB dirtied at random
/// pages in three calls.
const SCAN_VEC_LEN: usize = 1024;

/// A `DirtyError::Sys` for the failed `what`.
fn sys(what: impl Into<String>, source: io::Error) -> DirtyError {
    DirtyError::Sys { what: what.into(), source }
}

/// Why the tracker cannot run here: what this kernel, or this memory,
/// lacks ([`DirtyError::Unsupported`]).
#[derive(Debug, thiserror::Error)]
pub enum UffdWpUnsupported {
    /// The ioctl numbers are not encoded for this architecture.
    #[error("ioctl numbers for {arch} are not encoded here")]
    Arch {
        /// The architecture.
        arch: &'static str,
    },
    /// `userfaultfd(2)` does not exist (`ENOSYS`).
    #[error("the kernel has no userfaultfd(2) (built without CONFIG_USERFAULTFD)")]
    NoUserfaultfd,
    /// `userfaultfd(2)` failed otherwise (often `EPERM`:
    /// `vm.unprivileged_userfaultfd`).
    #[error("cannot create a userfaultfd: {0}")]
    Open(#[source] io::Error),
    /// The `UFFDIO_API` handshake failed.
    #[error("UFFDIO_API handshake failed: {0}")]
    Api(#[source] io::Error),
    /// Features the tracker needs are not offered.
    #[error(
        "userfaultfd lacks {} (Linux 6.7+ with CONFIG_PTE_MARKER_UFFD_WP; features offered: {offered:#x})",
        feature_names(.missing)
    )]
    Features {
        /// The `UFFD_FEATURE_*` bits needed and not offered.
        missing: u64,
        /// The bits offered.
        offered: u64,
    },
    /// `/proc/self/pagemap` could not be opened.
    #[error("cannot open /proc/self/pagemap: {0}")]
    Pagemap(#[source] io::Error),
    /// `/proc/self/pagemap` has no `PAGEMAP_SCAN` ioctl (`ENOTTY`).
    #[error("/proc/self/pagemap has no PAGEMAP_SCAN ioctl (Linux 6.7+ needed)")]
    NoPagemapScan,
    /// `PAGEMAP_SCAN` failed otherwise on an empty range.
    #[error("PAGEMAP_SCAN refused a null scan: {0}")]
    NullScan(#[source] io::Error),
    /// Tracking two scratch pages failed. (Its text has the failure's
    /// causes too: a probe's reason is printed alone.)
    #[error("self-test on two pages of anonymous memory failed: {}", crate::describe(.0.as_ref()))]
    SelfTest(#[source] Box<DirtyError>),
    /// Tracking two scratch pages reported other pages than those written.
    #[error(
        "self-test on two pages of anonymous memory failed: after writing page {wrote:?}, pages {got:?} \
         reported, not {want:?}"
    )]
    SelfTestMismatch {
        /// The page written, if any.
        wrote: Option<u64>,
        /// The pages reported.
        got: Vec<u64>,
        /// The pages that should have been.
        want: Vec<u64>,
    },
    /// A region of shared memory or huge pages, and a kernel without
    /// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`.
    #[error(
        "region {region} ({backing:?}, {page_size:?} pages) needs UFFD_FEATURE_WP_HUGETLBFS_SHMEM, \
         which this kernel lacks"
    )]
    Shmem {
        /// Region index.
        region: usize,
        /// What backs it.
        backing: Backing,
        /// Its host page size.
        page_size: HostPageSize,
    },
    /// A region registered without `UFFDIO_WRITEPROTECT` allowed on it.
    #[error(
        "region {region} at {addr:#x}+{len:#x}: registered, but no UFFDIO_WRITEPROTECT on it (ioctls {ioctls:#x})"
    )]
    NoWriteProtect {
        /// Region index.
        region: usize,
        /// Its host address.
        addr: u64,
        /// Its length in bytes.
        len: u64,
        /// The ioctls the kernel offers on it.
        ioctls: u64,
    },
    /// Part of a region the kernel cannot track (not `PAGE_IS_WPALLOWED`).
    #[error(
        "region {region} at {addr:#x}+{len:#x}: the kernel cannot track writes at {from:#x}..{to:#x} \
         (a VM_PFNMAP or other untrackable mapping)"
    )]
    Untrackable {
        /// Region index.
        region: usize,
        /// Its host address.
        addr: u64,
        /// Its length in bytes.
        len: u64,
        /// Host address of the first byte that cannot be tracked.
        from: u64,
        /// One past the last.
        to: u64,
    },
}

/// The names of the `UFFD_FEATURE_*` bits the tracker needs, among `bits`.
fn feature_names(bits: &u64) -> String {
    [
        (abi::UFFD_FEATURE_WP_ASYNC, "UFFD_FEATURE_WP_ASYNC"),
        (abi::UFFD_FEATURE_WP_UNPOPULATED, "UFFD_FEATURE_WP_UNPOPULATED"),
    ]
    .into_iter()
    .filter(|&(bit, _)| bits & bit != 0)
    .map(|(_, name)| name)
    .collect::<Vec<_>>()
    .join(" and ")
}

/// A `DirtyError::Unsupported` of this tracker.
fn unsupported(why: UffdWpUnsupported) -> DirtyError {
    DirtyError::Unsupported { tracker: NAME, why }
}

/// `/proc/self/pagemap`, with a reusable output buffer for `PAGEMAP_SCAN`.
struct Pagemap {
    file: File,
    vec: Vec<abi::PageRegion>,
}

impl fmt::Debug for Pagemap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pagemap").field("file", &self.file).field("vec_len", &self.vec.len()).finish()
    }
}

impl Pagemap {
    fn open() -> io::Result<Self> {
        let file = File::open("/proc/self/pagemap")?;
        Ok(Self { file, vec: vec![abi::PageRegion::default(); SCAN_VEC_LEN] })
    }

    /// `PAGEMAP_SCAN` over host addresses `[start, end)` with `flags`, for
    /// the pages whose categories include all of `mask`; calls `each(from,
    /// to)` for every range found, resuming while the kernel stops early.
    fn scan(&mut self, start: u64, end: u64, flags: u64, mask: u64, mut each: impl FnMut(u64, u64)) -> io::Result<()> {
        let mut from = start;
        loop {
            let mut arg = abi::PmScanArg {
                size: std::mem::size_of::<abi::PmScanArg>() as u64,
                flags,
                start: from,
                end,
                vec: self.vec.as_mut_ptr() as u64,
                vec_len: self.vec.len() as u64,
                category_mask: mask,
                return_mask: mask,
                ..Default::default()
            };
            // SAFETY: PAGEMAP_SCAN reads and writes one `struct pm_scan_arg`,
            // which `PmScanArg` lays out (size asserted), and writes at most
            // `vec_len` `struct page_region`s (layout asserted) at `vec`:
            // `self.vec`, exclusively borrowed for the call.
            let n = cvt(unsafe { libc::ioctl(self.file.as_raw_fd(), req(abi::PAGEMAP_SCAN), &raw mut arg) })?;
            let n = usize::try_from(n).unwrap_or(0).min(self.vec.len());
            for r in &self.vec[..n] {
                each(r.start, r.end);
            }
            if from >= end || arg.walk_end >= end {
                return Ok(());
            }
            if arg.walk_end <= from {
                return Err(io::Error::other(format!(
                    "PAGEMAP_SCAN from {from:#x} stopped at {:#x} after {n} ranges",
                    arg.walk_end
                )));
            }
            from = arg.walk_end;
        }
    }
}

/// A registered host range: one region's mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    addr: u64,
    len: u64,
}

impl Span {
    fn of(i: usize, r: &GuestRegion) -> Result<Self, DirtyError> {
        let addr = r.host_addr() as u64;
        match addr.checked_add(r.len()) {
            Some(_) => Ok(Self { addr, len: r.len() }),
            None => Err(DirtyError::Shape(format!("region {i} at {addr:#x}+{:#x} wraps", r.len()))),
        }
    }

    /// One past the last byte (cannot overflow: checked in `of`).
    fn end(self) -> u64 {
        self.addr + self.len
    }

    fn range(self) -> abi::UffdioRange {
        abi::UffdioRange { start: self.addr, len: self.len }
    }

    /// `"<op> on region <i> at <addr>+<len>"`, for errors.
    fn what(self, op: &str, i: usize) -> String {
        format!("{op} on region {i} at {:#x}+{:#x}", self.addr, self.len)
    }
}

/// A userfaultfd with regions registered and protected, and the pagemap to
/// scan them. Dropping it unregisters them and closes the descriptors.
#[derive(Debug)]
struct Armed {
    uffd: Uffd,
    pagemap: Pagemap,
    /// Registered ranges, one per region in order.
    spans: Vec<Span>,
}

impl Armed {
    /// A userfaultfd with `features` tracking writes to `spans`.
    fn arm(spans: &[Span], features: u64) -> Result<Self, DirtyError> {
        let uffd = Uffd::open().map_err(|e| sys("userfaultfd(2)", e))?;
        uffd.api(features).map_err(|e| sys(format!("UFFDIO_API with features {features:#x}"), e))?;
        let pagemap = Pagemap::open().map_err(|e| sys("opening /proc/self/pagemap", e))?;
        let mut armed = Self { uffd, pagemap, spans: Vec::with_capacity(spans.len()) };
        for (i, &span) in spans.iter().enumerate() {
            let ioctls = armed
                .uffd
                .register(span.range(), abi::UFFDIO_REGISTER_MODE_WP)
                .map_err(|e| sys(span.what("UFFDIO_REGISTER", i), e))?;
            // Registered: from here on, dropping `armed` unregisters it.
            armed.spans.push(span);
            if ioctls & abi::UFFDIO_WRITEPROTECT_BIT == 0 {
                let (addr, len) = (span.addr, span.len);
                return Err(unsupported(UffdWpUnsupported::NoWriteProtect { region: i, addr, len, ioctls }));
            }
        }
        for (i, &span) in spans.iter().enumerate() {
            armed.uffd.write_protect(span.range()).map_err(|e| sys(span.what("UFFDIO_WRITEPROTECT", i), e))?;
        }
        for (i, &span) in spans.iter().enumerate() {
            armed.check_coverage(i, span)?;
        }
        Ok(armed)
    }

    /// Checks that the kernel will report writes anywhere in `span`: a scan
    /// silently skips mappings it cannot track (`VM_PFNMAP`, device memory),
    /// so every page must show as `PAGE_IS_WPALLOWED`.
    fn check_coverage(&mut self, i: usize, span: Span) -> Result<(), DirtyError> {
        let mut covered = span.addr;
        let mut gap = None;
        self.pagemap
            .scan(span.addr, span.end(), 0, abi::PAGE_IS_WPALLOWED, |s, e| {
                if s > covered && gap.is_none() {
                    gap = Some((covered, s));
                }
                covered = covered.max(e);
            })
            .map_err(|e| sys(span.what("PAGEMAP_SCAN for PAGE_IS_WPALLOWED", i), e))?;
        if gap.is_none() && covered < span.end() {
            gap = Some((covered, span.end()));
        }
        match gap {
            None => Ok(()),
            Some((from, to)) => {
                Err(unsupported(UffdWpUnsupported::Untrackable { region: i, addr: span.addr, len: span.len, from, to }))
            }
        }
    }

    /// Checks that `mem` is the memory registered.
    fn check_same(&self, mem: &GuestMemory) -> Result<(), DirtyError> {
        let n = mem.regions().len();
        if n != self.spans.len() {
            return Err(DirtyError::Shape(format!("{n} regions, but tracking {}", self.spans.len())));
        }
        for (i, (r, span)) in mem.regions().iter().zip(&self.spans).enumerate() {
            if r.host_addr() as u64 != span.addr || r.len() != span.len {
                return Err(DirtyError::Shape(format!(
                    "region {i} is at {:#x}+{:#x}, but tracking {:#x}+{:#x}",
                    r.host_addr(),
                    r.len(),
                    span.addr,
                    span.len
                )));
            }
        }
        Ok(())
    }

    /// Sets in `out` the pages of region `i` written since the last scan,
    /// and re-protects them. On failure some pages may have been re-protected
    /// without being reported, so every bit of `out` is set before the error
    /// is returned.
    fn collect_region(&mut self, i: usize, out: &AtomicBitmap) -> Result<(), DirtyError> {
        let span = self.spans[i];
        let pages = out.len();
        let flags = abi::PM_SCAN_WP_MATCHING | abi::PM_SCAN_CHECK_WPASYNC;
        let res = self.pagemap.scan(span.addr, span.end(), flags, abi::PAGE_IS_WRITTEN, |s, e| {
            let first = s.saturating_sub(span.addr) / PAGE_SIZE_U64;
            let last = e.min(span.end()).saturating_sub(span.addr).div_ceil(PAGE_SIZE_U64).min(pages);
            if last > first {
                out.set_range(first, last - first);
            }
        });
        res.map_err(|e| {
            out.set_range(0, pages);
            sys(span.what("PAGEMAP_SCAN", i), e)
        })
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        for &span in &self.spans {
            // Nothing to do on failure: the descriptor is closed right after,
            // which releases the registration anyway.
            let _ = self.uffd.unregister(span.range());
        }
    }
}

/// What [`probe`] learnt about this kernel.
#[derive(Clone, Copy, Debug)]
struct Kernel {
    /// `UFFDIO_API` features offered.
    features: u64,
}

/// What this kernel offers, from a cache once a probe succeeded, or why
/// the tracker cannot run here. A failure is probed again on the next
/// call, and carries its OS error each time.
fn kernel() -> Result<Kernel, DirtyError> {
    static PROBED: OnceLock<Kernel> = OnceLock::new();
    if let Some(k) = PROBED.get() {
        return Ok(*k);
    }
    let k = probe_kernel().map_err(unsupported)?;
    Ok(*PROBED.get_or_init(|| k))
}

/// Checks (until it succeeds once per process, then from a cache) that
/// this kernel offers what [`UffdWpTracker`] needs: a userfaultfd this
/// process may open, with `UFFD_FEATURE_WP_ASYNC` and
/// `UFFD_FEATURE_WP_UNPOPULATED`, and the `PAGEMAP_SCAN` ioctl on
/// `/proc/self/pagemap` (Linux 6.7+); then tracks two pages of scratch
/// memory through a few writes and checks the reports are exact.
/// Shared-memory support (`UFFD_FEATURE_WP_HUGETLBFS_SHMEM`) is checked by
/// [`UffdWpTracker::start`] for the regions that need it.
pub fn probe() -> Result<(), DirtyError> {
    kernel().map(|_| ())
}

fn probe_kernel() -> Result<Kernel, UffdWpUnsupported> {
    if !abi::GENERIC_IOCTL {
        return Err(UffdWpUnsupported::Arch { arch: std::env::consts::ARCH });
    }
    let uffd = Uffd::open().map_err(|e| match e.raw_os_error() {
        Some(libc::ENOSYS) => UffdWpUnsupported::NoUserfaultfd,
        _ => UffdWpUnsupported::Open(e),
    })?;
    let offered = uffd.api(0).map_err(UffdWpUnsupported::Api)?;
    let missing = (abi::UFFD_FEATURE_WP_ASYNC | abi::UFFD_FEATURE_WP_UNPOPULATED) & !offered;
    if missing != 0 {
        return Err(UffdWpUnsupported::Features { missing, offered });
    }
    drop(uffd);
    let mut pagemap = Pagemap::open().map_err(UffdWpUnsupported::Pagemap)?;
    pagemap.scan(0, 0, 0, abi::PAGE_IS_WRITTEN, |_, _| {}).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOTTY) => UffdWpUnsupported::NoPagemapScan,
        _ => UffdWpUnsupported::NullScan(e),
    })?;
    self_test()?;
    Ok(Kernel { features: offered })
}

/// Tracks two anonymous pages, one populated before tracking starts, and
/// checks each scan reports exactly the pages written since the last.
fn self_test() -> Result<(), UffdWpUnsupported> {
    let failed = |e: DirtyError| UffdWpUnsupported::SelfTest(Box::new(e));
    let mem = GuestMemory::anonymous(2 * PAGE_SIZE_U64).map_err(|e| failed(e.into()))?;
    let r = &mem.regions()[0];
    let span = Span::of(0, r).map_err(failed)?;
    r.write_u64(0, 1).map_err(|e| failed(e.into()))?;
    let mut armed =
        Armed::arm(&[span], abi::UFFD_FEATURE_WP_ASYNC | abi::UFFD_FEATURE_WP_UNPOPULATED).map_err(failed)?;
    let mut round = |write: Option<u64>, want: &[u64]| -> Result<(), UffdWpUnsupported> {
        if let Some(page) = write {
            r.write_u64(page * PAGE_SIZE_U64 + 8, 2).map_err(|e| failed(e.into()))?;
        }
        let out = AtomicBitmap::new(2);
        armed.collect_region(0, &out).map_err(failed)?;
        let got: Vec<u64> = out.runs(0, 2).flat_map(|(s, n)| s..s + n).collect();
        if got != want {
            return Err(UffdWpUnsupported::SelfTestMismatch { wrote: write, got, want: want.to_vec() });
        }
        Ok(())
    };
    round(None, &[])?;
    round(Some(1), &[1])?;
    round(None, &[])?;
    round(Some(0), &[0])?;
    Ok(())
}

/// Whether region `r` needs write-protection of shared memory or hugetlbfs
/// pages (`UFFD_FEATURE_WP_HUGETLBFS_SHMEM`). Only private anonymous memory
/// surely does not; file mappings, external memory (often a memfd) and
/// huge pages are treated as if they did.
fn needs_shmem_wp(r: &GuestRegion) -> bool {
    *r.backing() != Backing::Anonymous || r.host_page_size() == HostPageSize::Huge2M
}

/// Tracks writes with userfaultfd write-protection (asynchronous mode) and
/// `PAGEMAP_SCAN`; see docs/design.md, "Dirty trackers", for the mechanism and its
/// limits. Costs one minor fault per page written per round, and a
/// page-table walk per `collect` (no memory is read).
#[derive(Debug, Default)]
pub struct UffdWpTracker {
    armed: Option<Armed>,
}

impl UffdWpTracker {
    /// A tracker not started yet; [`DirtyTracker::start`] probes the kernel
    /// and registers the memory.
    pub fn new() -> Self {
        Self::default()
    }
}

impl DirtyTracker for UffdWpTracker {
    fn name(&self) -> &'static str {
        NAME
    }

    fn start(&mut self, mem: &GuestMemory) -> Result<(), DirtyError> {
        let kernel = kernel()?;
        self.armed = None;
        let mut features = abi::UFFD_FEATURE_WP_ASYNC | abi::UFFD_FEATURE_WP_UNPOPULATED;
        let mut spans = Vec::with_capacity(mem.regions().len());
        for (i, r) in mem.regions().iter().enumerate() {
            if needs_shmem_wp(r) {
                if kernel.features & abi::UFFD_FEATURE_WP_HUGETLBFS_SHMEM == 0 {
                    return Err(unsupported(UffdWpUnsupported::Shmem {
                        region: i,
                        backing: r.backing().clone(),
                        page_size: r.host_page_size(),
                    }));
                }
                features |= abi::UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
            }
            spans.push(Span::of(i, r)?);
        }
        self.armed = Some(Armed::arm(&spans, features)?);
        Ok(())
    }

    fn collect(&mut self, mem: &GuestMemory, out: &[AtomicBitmap]) -> Result<(), DirtyError> {
        check_shape(mem, out)?;
        let armed =
            self.armed.as_mut().ok_or_else(|| DirtyError::Shape("collect before start, or after stop".into()))?;
        armed.check_same(mem)?;
        for (i, bits) in out.iter().enumerate() {
            armed.collect_region(i, bits)?;
        }
        Ok(())
    }

    fn stop(&mut self, _mem: &GuestMemory) {
        self.armed = None;
    }
}

#[cfg(test)]
mod tests;
