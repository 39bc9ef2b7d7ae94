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

/// One-line description of `e` with its causes, for `Unsupported` reasons.
fn describe(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
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

    /// `"region <i> at <addr>+<len>"`, for errors.
    fn at(self, i: usize) -> String {
        format!("region {i} at {:#x}+{:#x}", self.addr, self.len)
    }

    /// `"<op> on region <i> at <addr>+<len>"`, for errors.
    fn what(self, op: &str, i: usize) -> String {
        format!("{op} on {}", self.at(i))
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
                return Err(DirtyError::Unsupported {
                    tracker: NAME,
                    why: format!("{}: registered, but no UFFDIO_WRITEPROTECT on it (ioctls {ioctls:#x})", span.at(i)),
                });
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
            Some((a, b)) => Err(DirtyError::Unsupported {
                tracker: NAME,
                why: format!(
                    "{}: the kernel cannot track writes at {a:#x}..{b:#x} (a VM_PFNMAP or other untrackable mapping)",
                    span.at(i)
                ),
            }),
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

/// The cached probe result, or why the tracker cannot run here.
fn kernel() -> Result<Kernel, DirtyError> {
    static PROBED: OnceLock<Result<Kernel, String>> = OnceLock::new();
    PROBED.get_or_init(probe_kernel).clone().map_err(|why| DirtyError::Unsupported { tracker: NAME, why })
}

/// Checks (once per process, then from a cache) that this kernel offers what
/// [`UffdWpTracker`] needs: a userfaultfd this process may open, with
/// `UFFD_FEATURE_WP_ASYNC` and `UFFD_FEATURE_WP_UNPOPULATED`, and the
/// `PAGEMAP_SCAN` ioctl on `/proc/self/pagemap` (Linux 6.7+); then tracks
/// two pages of scratch memory through a few writes and checks the reports
/// are exact. Shared-memory support (`UFFD_FEATURE_WP_HUGETLBFS_SHMEM`) is
/// checked by [`UffdWpTracker::start`] for the regions that need it.
pub fn probe() -> Result<(), DirtyError> {
    kernel().map(|_| ())
}

fn probe_kernel() -> Result<Kernel, String> {
    if !abi::GENERIC_IOCTL {
        return Err(format!("ioctl numbers for {} are not encoded here", std::env::consts::ARCH));
    }
    let uffd = Uffd::open().map_err(|e| match e.raw_os_error() {
        Some(libc::ENOSYS) => "the kernel has no userfaultfd(2) (built without CONFIG_USERFAULTFD)".to_string(),
        _ => format!("cannot create a userfaultfd: {e}"),
    })?;
    let offered = uffd.api(0).map_err(|e| format!("UFFDIO_API handshake failed: {e}"))?;
    let missing: Vec<&str> = [
        (abi::UFFD_FEATURE_WP_ASYNC, "UFFD_FEATURE_WP_ASYNC"),
        (abi::UFFD_FEATURE_WP_UNPOPULATED, "UFFD_FEATURE_WP_UNPOPULATED"),
    ]
    .into_iter()
    .filter(|&(bit, _)| offered & bit == 0)
    .map(|(_, name)| name)
    .collect();
    if !missing.is_empty() {
        return Err(format!(
            "userfaultfd lacks {} (Linux 6.7+ with CONFIG_PTE_MARKER_UFFD_WP; features offered: {offered:#x})",
            missing.join(" and ")
        ));
    }
    drop(uffd);
    let mut pagemap = Pagemap::open().map_err(|e| format!("cannot open /proc/self/pagemap: {e}"))?;
    pagemap.scan(0, 0, 0, abi::PAGE_IS_WRITTEN, |_, _| {}).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOTTY) => "/proc/self/pagemap has no PAGEMAP_SCAN ioctl (Linux 6.7+ needed)".to_string(),
        _ => format!("PAGEMAP_SCAN refused a null scan: {e}"),
    })?;
    self_test().map_err(|why| format!("self-test on two pages of anonymous memory failed: {why}"))?;
    Ok(Kernel { features: offered })
}

/// Tracks two anonymous pages, one populated before tracking starts, and
/// checks each scan reports exactly the pages written since the last.
fn self_test() -> Result<(), String> {
    let mem = GuestMemory::anonymous(2 * PAGE_SIZE_U64).map_err(|e| describe(&e))?;
    let r = &mem.regions()[0];
    let span = Span::of(0, r).map_err(|e| describe(&e))?;
    r.write_u64(0, 1).map_err(|e| describe(&e))?;
    let mut armed =
        Armed::arm(&[span], abi::UFFD_FEATURE_WP_ASYNC | abi::UFFD_FEATURE_WP_UNPOPULATED).map_err(|e| describe(&e))?;
    let mut round = |write: Option<u64>, want: &[u64]| -> Result<(), String> {
        if let Some(page) = write {
            r.write_u64(page * PAGE_SIZE_U64 + 8, 2).map_err(|e| describe(&e))?;
        }
        let out = AtomicBitmap::new(2);
        armed.collect_region(0, &out).map_err(|e| describe(&e))?;
        let got: Vec<u64> = out.runs(0, 2).flat_map(|(s, n)| s..s + n).collect();
        if got != want {
            return Err(format!("after writing page {write:?}, pages {got:?} reported, not {want:?}"));
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
                    return Err(DirtyError::Unsupported {
                        tracker: NAME,
                        why: format!(
                            "region {i} ({:?}, {:?} pages) needs UFFD_FEATURE_WP_HUGETLBFS_SHMEM, \
                             which this kernel lacks",
                            r.backing(),
                            r.host_page_size()
                        ),
                    });
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
