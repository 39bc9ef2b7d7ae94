//! Guest memory as a table of regions, each a host mapping of guest pages.
//!
//! A [`GuestRegion`] is one contiguous stretch of guest physical memory backed
//! by one host mapping: anonymous memory, a private (copy-on-write) file
//! mapping, a shared file mapping (a VM's `memory-backend-file`, a file in
//! `/dev/shm`, a DAX device) or memory the embedding VMM already mapped.
//!
//! Live guest pages change under our feet (vCPUs, mutator threads), so this
//! module never hands out `&[u8]` into guest memory. Every access is a copy
//! between guest memory and a caller-owned buffer through raw pointers, after
//! a bounds check against the region. All `unsafe` of the crate lives here.

use std::any::Any;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use memmap2::{MmapOptions, MmapRaw};

use crate::addr::{Gpa, PageIdx, PageRange, RegionIdx, PAGE_SIZE, PAGE_SIZE_U64};

/// Host page size a region declares for its backing (the migration unit is
/// always 4 KiB; huge pages only change how the backing is mapped and locked).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostPageSize {
    /// 4 KiB pages.
    Small,
    /// 2 MiB pages (the region's base and length must be 2 MiB aligned).
    Huge2M,
}

impl HostPageSize {
    /// Size in bytes.
    pub fn bytes(self) -> u64 {
        match self {
            HostPageSize::Small => 4096,
            HostPageSize::Huge2M => 2 << 20,
        }
    }
}

/// What backs a region's host mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backing {
    /// Private anonymous memory owned by this region.
    Anonymous,
    /// A private copy-on-write mapping of a file: writes stay in this process.
    PrivateFile(PathBuf),
    /// A shared mapping of a file: writes reach the file and its other mappers.
    SharedFile(PathBuf),
    /// Memory mapped by the embedder; the region only borrows it.
    External,
}

/// Errors building or accessing guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// A region of zero bytes, or not a whole number of pages.
    #[error("region at {gpa} of {len} bytes is not a whole, non-zero number of {align}-byte pages")]
    BadSize {
        /// Guest address of the region.
        gpa: Gpa,
        /// Length asked for.
        len: u64,
        /// Alignment required.
        align: u64,
    },
    /// A region whose guest address is not aligned to its page size.
    #[error("region at {gpa} is not aligned to its {align}-byte pages")]
    Misaligned {
        /// Guest address of the region.
        gpa: Gpa,
        /// Alignment required.
        align: u64,
    },
    /// Two regions overlap in guest physical space, or one wraps around.
    #[error("region at {gpa} of {len} bytes overlaps another or wraps the address space")]
    Overlap {
        /// Guest address of the region.
        gpa: Gpa,
        /// Its length.
        len: u64,
    },
    /// A region too large for this host's address space.
    #[error("region of {len} bytes does not fit the host address space")]
    TooLarge {
        /// Its length.
        len: u64,
    },
    /// Mapping or opening the backing failed.
    #[error("cannot map {what}")]
    Map {
        /// What was being mapped.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A page access outside the region.
    #[error("pages {first}..+{count} are outside a region of {pages} pages")]
    OutOfBounds {
        /// First page asked for.
        first: u64,
        /// Number of pages asked for.
        count: u64,
        /// Pages in the region.
        pages: u64,
    },
    /// Writing pages into a file region's file failed (no room left on
    /// its file system, for one).
    #[error("cannot write pages {first}..+{count} of guest memory into {path}")]
    Write {
        /// First page written.
        first: u64,
        /// Number of pages.
        count: u64,
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// No such region.
    #[error("{0} does not exist")]
    NoRegion(RegionIdx),
    /// A buffer whose length does not match the pages asked for.
    #[error("buffer of {got} bytes for {pages} pages")]
    BufferSize {
        /// Buffer length.
        got: usize,
        /// Pages asked for.
        pages: u64,
    },
}

enum Owner {
    Mmap(#[allow(dead_code)] MmapRaw),
    External(#[allow(dead_code)] Box<dyn Any + Send + Sync>),
}

/// One contiguous region of guest memory and its host mapping.
pub struct GuestRegion {
    gpa: Gpa,
    len: u64,
    host_page: HostPageSize,
    backing: Backing,
    ptr: *mut u8,
    /// A shared file of small pages: written with `pwrite` (see
    /// [`GuestRegion::write_pages`]).
    file: Option<File>,
    _owner: Owner,
}

// SAFETY: the region owns (or keeps alive through `_owner`) a mapping that is
// valid for its whole life; all accesses go through raw-pointer copies that
// tolerate concurrent writers, exactly like the guest's own vCPUs do.
unsafe impl Send for GuestRegion {}
// SAFETY: as for `Send`: no method hands out references into the mapping.
unsafe impl Sync for GuestRegion {}

impl std::fmt::Debug for GuestRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRegion")
            .field("gpa", &self.gpa)
            .field("len", &self.len)
            .field("host_page", &self.host_page)
            .field("backing", &self.backing)
            .finish()
    }
}

fn check_shape(gpa: Gpa, len: u64, host_page: HostPageSize) -> Result<usize, MemoryError> {
    let align = host_page.bytes();
    if len == 0 || len % align != 0 {
        return Err(MemoryError::BadSize { gpa, len, align });
    }
    if !gpa.is_aligned(align) {
        return Err(MemoryError::Misaligned { gpa, align });
    }
    if gpa.checked_add(len).is_none() {
        return Err(MemoryError::Overlap { gpa, len });
    }
    usize::try_from(len).ok().filter(|&l| isize::try_from(l).is_ok()).ok_or(MemoryError::TooLarge { len })
}

impl GuestRegion {
    /// A region of fresh, zeroed anonymous memory.
    pub fn anonymous(gpa: Gpa, len: u64, host_page: HostPageSize) -> Result<Self, MemoryError> {
        let n = check_shape(gpa, len, host_page)?;
        let mut opts = MmapOptions::new();
        opts.len(n);
        if host_page == HostPageSize::Huge2M {
            opts.huge(Some(21));
        }
        let map = opts
            .map_anon()
            .map_err(|source| MemoryError::Map { what: format!("{n} bytes of anonymous memory"), source })?;
        Ok(Self::from_mmap(gpa, len, host_page, Backing::Anonymous, MmapRaw::from(map)))
    }

    /// A region mapping `path`, created and sized to `len` bytes if needed.
    /// `shared` chooses a shared mapping (writes reach the file) over a
    /// private copy-on-write one. With `truncate` the file is emptied first,
    /// so the region starts all zero.
    pub fn file(
        gpa: Gpa,
        len: u64,
        host_page: HostPageSize,
        path: &Path,
        shared: bool,
        truncate: bool,
    ) -> Result<Self, MemoryError> {
        let n = check_shape(gpa, len, host_page)?;
        let map_err = |source| MemoryError::Map { what: path.display().to_string(), source };
        let file: File =
            OpenOptions::new().read(true).write(true).create(true).truncate(truncate).open(path).map_err(map_err)?;
        let cur = file.metadata().map_err(map_err)?.len();
        if cur != len && (truncate || cur < len) {
            file.set_len(len).map_err(map_err)?;
        }
        let mut opts = MmapOptions::new();
        opts.len(n);
        let (raw, backing) = if shared {
            let raw = opts.map_raw(&file).map_err(map_err)?;
            let mut r = Self::from_mmap(gpa, len, host_page, Backing::SharedFile(path.into()), raw);
            // hugetlbfs takes no write(2): its regions are written through
            // the mapping.
            r.file = (host_page == HostPageSize::Small).then_some(file);
            return Ok(r);
        } else {
            // SAFETY: a private mapping: other processes' writes to the file
            // may show through pages we have not written yet, which is the
            // documented meaning of a private file region; we never form
            // references into it.
            let m = unsafe { opts.map_copy(&file) }.map_err(map_err)?;
            (MmapRaw::from(m), Backing::PrivateFile(path.into()))
        };
        Ok(Self::from_mmap(gpa, len, host_page, backing, raw))
    }

    fn from_mmap(gpa: Gpa, len: u64, host_page: HostPageSize, backing: Backing, map: MmapRaw) -> Self {
        let ptr = map.as_mut_ptr();
        Self { gpa, len, host_page, backing, ptr, file: None, _owner: Owner::Mmap(map) }
    }

    /// A region over memory the embedder mapped, kept alive by `owner`.
    ///
    /// # Safety
    /// `host` must point to `len` bytes that stay mapped, readable and
    /// writable for as long as `owner` lives, and nothing may unmap or remap
    /// them meanwhile. Concurrent writes by vCPUs are fine.
    pub unsafe fn from_raw(
        gpa: Gpa,
        len: u64,
        host_page: HostPageSize,
        host: *mut u8,
        owner: Box<dyn Any + Send + Sync>,
    ) -> Result<Self, MemoryError> {
        check_shape(gpa, len, host_page)?;
        Ok(Self {
            gpa,
            len,
            host_page,
            backing: Backing::External,
            ptr: host,
            file: None,
            _owner: Owner::External(owner),
        })
    }

    /// Guest physical address of the first byte.
    pub fn gpa(&self) -> Gpa {
        self.gpa
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the region is empty (never: regions are checked non-empty).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of 4 KiB pages.
    pub fn pages(&self) -> u64 {
        self.len / PAGE_SIZE_U64
    }

    /// The host page size declared for the backing.
    pub fn host_page_size(&self) -> HostPageSize {
        self.host_page
    }

    /// What backs the mapping.
    pub fn backing(&self) -> &Backing {
        &self.backing
    }

    /// Host virtual address of the first byte, for kernel interfaces
    /// (userfaultfd, pagemap) that take addresses.
    pub fn host_addr(&self) -> usize {
        self.ptr as usize
    }

    /// The page holding guest address `gpa`, if this region holds it.
    pub fn page_of(&self, gpa: Gpa) -> Option<PageIdx> {
        let off = gpa.checked_offset_from(self.gpa)?;
        (off < self.len).then_some(PageIdx(off / PAGE_SIZE_U64))
    }

    /// Checks that `count` pages from `first` lie inside the region and
    /// returns the byte offset of `first`.
    fn span(&self, first: PageIdx, count: u64) -> Result<usize, MemoryError> {
        let oob = || MemoryError::OutOfBounds { first: first.0, count, pages: self.pages() };
        let end = first.0.checked_add(count).ok_or_else(oob)?;
        if end > self.pages() {
            return Err(oob());
        }
        // In bounds, so the offset is below `len`, which fits usize (check_shape).
        Ok((first.0 * PAGE_SIZE_U64) as usize)
    }

    /// Copies `dst.len() / 4096` pages starting at `first` out of guest memory.
    pub fn read_pages(&self, first: PageIdx, dst: &mut [u8]) -> Result<(), MemoryError> {
        let pages = (dst.len() / PAGE_SIZE) as u64;
        if dst.len() % PAGE_SIZE != 0 {
            return Err(MemoryError::BufferSize { got: dst.len(), pages });
        }
        let off = self.span(first, pages)?;
        // SAFETY: `span` checked [off, off + dst.len()) lies inside the
        // mapping, which lives as long as `self`; `dst` is a distinct
        // caller-owned buffer. Guest writers may race: the copy then holds a
        // mix of old and new bytes, which dirty tracking resends.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// Copies `src.len() / 4096` pages into guest memory starting at `first`.
    ///
    /// A shared file region of small pages is written with `pwrite`, not
    /// through its mapping: a file system out of room then answers with an
    /// error ([`MemoryError::Write`]) where a store into the mapping would
    /// kill the process with SIGBUS, and a fresh page costs neither a
    /// fault nor a clear before its copy (docs/benchmarks.md, "CPU per
    /// GiB"). The mapping sees the same page cache.
    pub fn write_pages(&self, first: PageIdx, src: &[u8]) -> Result<(), MemoryError> {
        let pages = (src.len() / PAGE_SIZE) as u64;
        if src.len() % PAGE_SIZE != 0 {
            return Err(MemoryError::BufferSize { got: src.len(), pages });
        }
        let off = self.span(first, pages)?;
        if self.write_file(first, pages, off, src)? {
            return Ok(());
        }
        // SAFETY: bounds checked by `span`; the mapping is writable and lives
        // as long as `self`; `src` is caller-owned and cannot alias it.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(off), src.len()) };
        Ok(())
    }

    /// Zeroes `count` pages from `first` (a shared file region's with
    /// `pwrite`, as [`GuestRegion::write_pages`]).
    pub fn zero_pages(&self, first: PageIdx, count: u64) -> Result<(), MemoryError> {
        static ZEROS: [u8; 64 * PAGE_SIZE] = [0; 64 * PAGE_SIZE];
        let off = self.span(first, count)?;
        if self.file.is_some() {
            let mut done = 0;
            while done < count {
                let n = (count - done).min(64);
                let at = off + (done * PAGE_SIZE_U64) as usize;
                if !self.write_file(PageIdx(first.0 + done), n, at, &ZEROS[..n as usize * PAGE_SIZE])? {
                    break; // the mapping below zeroes it all
                }
                done += n;
            }
            if done == count {
                return Ok(());
            }
        }
        // SAFETY: bounds checked by `span`; the mapping is writable.
        unsafe { std::ptr::write_bytes(self.ptr.add(off), 0, (count * PAGE_SIZE_U64) as usize) };
        Ok(())
    }

    /// Writes `src` at byte `off` of the region's file, if it has one that
    /// takes `pwrite`: true when written, false when the caller is to copy
    /// through the mapping (no file, or a file, such as a DAX device, whose
    /// file system refuses write(2) for any offset).
    fn write_file(&self, first: PageIdx, pages: u64, off: usize, src: &[u8]) -> Result<bool, MemoryError> {
        use std::os::unix::fs::FileExt;
        let Some(f) = &self.file else { return Ok(false) };
        match f.write_all_at(src, off as u64) {
            Ok(()) => Ok(true),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENODEV)) => Ok(false),
            Err(source) => Err(MemoryError::Write {
                first: first.0,
                count: pages,
                path: match &self.backing {
                    Backing::SharedFile(p) => p.display().to_string(),
                    _ => "guest memory".into(),
                },
                source,
            }),
        }
    }

    /// Drops `count` pages from `first` of a private anonymous region
    /// (`MADV_DONTNEED`): they read as zero again and are *missing* — the
    /// next touch faults, which a userfaultfd registered on the region in
    /// missing mode sees. Post-copy discards the pages whose copy went stale
    /// this way before the guest runs. Other backings are refused: dropping
    /// a file page reverts it to the file rather than making it missing.
    pub fn discard_pages(&self, first: PageIdx, count: u64) -> Result<(), MemoryError> {
        if self.backing != Backing::Anonymous {
            return Err(MemoryError::Map {
                what: format!("discarding pages of a {:?} region", self.backing),
                source: std::io::Error::from(std::io::ErrorKind::Unsupported),
            });
        }
        let off = self.span(first, count)?;
        // SAFETY: bounds checked by `span`; the range lies in this region's
        // private anonymous mapping, whose pages the advice only drops
        // (contents become zero), as the documentation above promises.
        let rc =
            unsafe { libc::madvise(self.ptr.add(off).cast(), (count * PAGE_SIZE_U64) as usize, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(MemoryError::Map { what: "MADV_DONTNEED".into(), source: std::io::Error::last_os_error() });
        }
        Ok(())
    }

    /// Host address of byte `offset` of the region, for kernel interfaces
    /// that take addresses (userfaultfd); `None` past the end.
    pub fn host_addr_of(&self, offset: u64) -> Option<u64> {
        (offset < self.len).then(|| self.ptr as u64 + offset)
    }

    /// Writes `value` to the 8-byte word at byte `offset` (aligned to 8), as
    /// a guest vCPU would. For workloads and tests that mutate guest memory.
    pub fn write_u64(&self, offset: u64, value: u64) -> Result<(), MemoryError> {
        self.check_word(offset)?;
        // SAFETY: `check_word` proved the aligned 8 bytes lie in the mapping.
        unsafe { std::ptr::write_volatile(self.ptr.add(offset as usize).cast::<u64>(), value) };
        Ok(())
    }

    /// Reads the 8-byte word at byte `offset` (aligned to 8).
    pub fn read_u64(&self, offset: u64) -> Result<u64, MemoryError> {
        self.check_word(offset)?;
        // SAFETY: `check_word` proved the aligned 8 bytes lie in the mapping.
        Ok(unsafe { std::ptr::read_volatile(self.ptr.add(offset as usize).cast::<u64>()) })
    }

    fn check_word(&self, offset: u64) -> Result<(), MemoryError> {
        if offset % 8 != 0 || offset.checked_add(8).is_none_or(|e| e > self.len) {
            return Err(MemoryError::OutOfBounds { first: offset / PAGE_SIZE_U64, count: 1, pages: self.pages() });
        }
        Ok(())
    }

    /// Faults every page of the region in, writable, ahead of use
    /// (`MADV_POPULATE_WRITE`): a destination that populates its memory
    /// before the migration starts does not pay a page fault per page
    /// during it, as a VMM started with preallocated memory would not.
    pub fn populate(&self) -> Result<(), MemoryError> {
        const MADV_POPULATE_WRITE: libc::c_int = 23;
        // SAFETY: the range is exactly this region's live mapping; the
        // advice only faults pages in and never changes their contents.
        let rc = unsafe { libc::madvise(self.ptr.cast(), self.len as usize, MADV_POPULATE_WRITE) };
        if rc != 0 {
            return Err(MemoryError::Map {
                what: "MADV_POPULATE_WRITE".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Flushes the writes to the page holding byte `offset` of a shared
    /// file mapping (msync of one page).
    pub fn flush_page_of(&self, offset: u64) -> Result<(), MemoryError> {
        if let Owner::Mmap(m) = &self._owner {
            if matches!(self.backing, Backing::SharedFile(_)) && offset < self.len {
                let start = (offset & !(PAGE_SIZE_U64 - 1)) as usize;
                m.flush_range(start, PAGE_SIZE).map_err(|source| MemoryError::Map { what: "msync".into(), source })?;
            }
        }
        Ok(())
    }

    /// Flushes a shared file mapping's writes to the file (msync).
    pub fn flush(&self) -> Result<(), MemoryError> {
        if let Owner::Mmap(m) = &self._owner {
            if matches!(self.backing, Backing::SharedFile(_)) {
                m.flush().map_err(|source| MemoryError::Map { what: "msync".into(), source })?;
            }
        }
        Ok(())
    }
}

/// A table of non-overlapping guest memory regions.
#[derive(Debug, Default)]
pub struct GuestMemory {
    regions: Vec<GuestRegion>,
}

impl GuestMemory {
    /// A table of `regions`, checked not to overlap in guest physical space.
    pub fn new(regions: Vec<GuestRegion>) -> Result<Self, MemoryError> {
        let mut spans: Vec<(u64, u64)> = regions.iter().map(|r| (r.gpa.0, r.gpa.0 + r.len)).collect();
        spans.sort_unstable();
        for w in spans.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(MemoryError::Overlap { gpa: Gpa(w[1].0), len: w[1].1 - w[1].0 });
            }
        }
        if regions.len() > u32::MAX as usize {
            return Err(MemoryError::TooLarge { len: regions.len() as u64 });
        }
        Ok(Self { regions })
    }

    /// One anonymous region of `len` bytes at guest address 0.
    pub fn anonymous(len: u64) -> Result<Self, MemoryError> {
        Self::new(vec![GuestRegion::anonymous(Gpa(0), len, HostPageSize::Small)?])
    }

    /// The regions, in table order (their index is their [`RegionIdx`]).
    pub fn regions(&self) -> &[GuestRegion] {
        &self.regions
    }

    /// Region `idx`, or an error naming it.
    pub fn region(&self, idx: RegionIdx) -> Result<&GuestRegion, MemoryError> {
        self.regions.get(idx.as_usize()).ok_or(MemoryError::NoRegion(idx))
    }

    /// Iterates `(index, region)`.
    pub fn iter(&self) -> impl Iterator<Item = (RegionIdx, &GuestRegion)> {
        self.regions.iter().enumerate().map(|(i, r)| (RegionIdx(i as u32), r))
    }

    /// Total bytes of guest memory.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }

    /// Total 4 KiB pages.
    pub fn total_pages(&self) -> u64 {
        self.regions.iter().map(|r| r.pages()).sum()
    }

    /// The region and page holding guest address `gpa`.
    pub fn locate(&self, gpa: Gpa) -> Option<(RegionIdx, PageIdx)> {
        self.iter().find_map(|(i, r)| r.page_of(gpa).map(|p| (i, p)))
    }

    /// Checks that `range` names pages inside an existing region.
    pub fn check(&self, range: PageRange) -> Result<(), MemoryError> {
        let r = self.region(range.region)?;
        let oob = MemoryError::OutOfBounds { first: range.start.0, count: range.len(), pages: r.pages() };
        if range.start.0 > range.end.0 || range.end.0 > r.pages() {
            return Err(oob);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_checked() {
        assert!(matches!(GuestRegion::anonymous(Gpa(0), 4095, HostPageSize::Small), Err(MemoryError::BadSize { .. })));
        assert!(matches!(GuestRegion::anonymous(Gpa(0), 0, HostPageSize::Small), Err(MemoryError::BadSize { .. })));
        assert!(matches!(
            GuestRegion::anonymous(Gpa(4096), 2 << 20, HostPageSize::Huge2M),
            Err(MemoryError::Misaligned { .. })
        ));
        assert!(matches!(
            GuestRegion::anonymous(Gpa(u64::MAX - 4095), 8192, HostPageSize::Small),
            Err(MemoryError::Overlap { .. })
        ));
    }

    #[test]
    fn overlapping_regions_are_refused() {
        let a = GuestRegion::anonymous(Gpa(0), 8192, HostPageSize::Small).unwrap();
        let b = GuestRegion::anonymous(Gpa(4096), 8192, HostPageSize::Small).unwrap();
        assert!(matches!(GuestMemory::new(vec![a, b]), Err(MemoryError::Overlap { .. })));
    }

    #[test]
    fn page_copies_are_bounds_checked() {
        let mem = GuestMemory::anonymous(4 * 4096).unwrap();
        let r = &mem.regions()[0];
        let mut buf = vec![7u8; 2 * PAGE_SIZE];
        r.write_pages(PageIdx(2), &buf).unwrap();
        assert!(r.write_pages(PageIdx(3), &buf).is_err());
        assert!(r.write_pages(PageIdx(u64::MAX), &buf[..PAGE_SIZE]).is_err());
        assert!(r.read_pages(PageIdx(0), &mut buf[..100]).is_err());
        buf.fill(0);
        r.read_pages(PageIdx(2), &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 7));
        r.zero_pages(PageIdx(3), 1).unwrap();
        r.read_pages(PageIdx(2), &mut buf).unwrap();
        assert!(buf[..PAGE_SIZE].iter().all(|&b| b == 7) && buf[PAGE_SIZE..].iter().all(|&b| b == 0));
        assert!(r.read_u64(4 * 4096 - 8).is_ok());
        assert!(r.read_u64(4 * 4096).is_err());
        assert!(r.read_u64(3).is_err());
        assert_eq!(mem.locate(Gpa(4096 * 3 + 5)), Some((RegionIdx(0), PageIdx(3))));
        assert_eq!(mem.locate(Gpa(4096 * 4)), None);
    }

    #[test]
    fn shared_file_regions_share_bytes() {
        let dir = std::env::temp_dir().join(format!("pmigrate-ranges-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mem");
        let a = GuestRegion::file(Gpa(0), 8192, HostPageSize::Small, &path, true, true).unwrap();
        let b = GuestRegion::file(Gpa(0), 8192, HostPageSize::Small, &path, true, false).unwrap();
        let p = GuestRegion::file(Gpa(0), 8192, HostPageSize::Small, &path, false, false).unwrap();
        a.write_u64(4096, 42).unwrap();
        assert_eq!(b.read_u64(4096).unwrap(), 42);
        p.write_u64(0, 9).unwrap();
        assert_eq!(a.read_u64(0).unwrap(), 0, "private mapping writes stay private");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_file_system_out_of_room_is_an_error_not_a_signal() {
        // A shared file larger than its file system: a store into the
        // mapping past the room left would raise SIGBUS and kill the
        // process; write_pages must answer with an error instead. Needs
        // root, for the small tmpfs (skipped otherwise, as the project's
        // other root-only tests are).
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping: mounting a small tmpfs needs root");
            return;
        }
        let dir = std::env::temp_dir().join(format!("pmigrate-ranges-full-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
            .arg(&dir)
            .status()
            .expect("mount");
        assert!(st.success(), "mounting a 256 KiB tmpfs: {st}");
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(&self.0).status();
                let _ = std::fs::remove_dir(&self.0);
            }
        }
        let _u = Unmount(dir.clone());
        let r = GuestRegion::file(Gpa(0), 1 << 20, HostPageSize::Small, &dir.join("mem"), true, true).unwrap();
        let src = vec![9u8; 32 * PAGE_SIZE];
        r.write_pages(PageIdx(0), &src).unwrap();
        let more = vec![7u8; 64 * PAGE_SIZE];
        let e = r.write_pages(PageIdx(64), &more).expect_err("256 KiB hold 64 pages, not 96");
        assert!(
            matches!(&e, MemoryError::Write { source, .. } if source.raw_os_error() == Some(libc::ENOSPC)),
            "{e:?}"
        );
        assert!(e.to_string().contains("cannot write pages 64..+64 of guest memory into"), "{e}");
        let mut back = vec![0u8; 32 * PAGE_SIZE];
        r.read_pages(PageIdx(0), &mut back).unwrap();
        assert_eq!(back, src, "what fitted is there");
    }

    /// Pages of `r` resident in this process's mapping, by `mincore`.
    fn resident(r: &GuestRegion) -> Vec<bool> {
        let mut v = vec![0u8; r.pages() as usize];
        // SAFETY: the range is the region's whole mapping, page aligned;
        // `v` has one byte per page, as mincore writes.
        let rc = unsafe { libc::mincore(r.host_addr() as *mut libc::c_void, r.len as usize, v.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
        v.iter().map(|b| b & 1 == 1).collect()
    }

    #[test]
    fn a_write_into_a_fresh_shared_file_fills_its_own_pages_only() {
        // write_pages writes a shared file with pwrite: the bytes must land
        // where the mapping sees them, and no page outside the span may be
        // brought in (a mostly empty guest stays sparse).
        // In /dev/shm, whose page cache holds 4 KiB pages unless the host
        // asks for huge ones (a disk file system may cache a hole in large
        // folios, which mincore would report whole).
        let dir = Path::new("/dev/shm").join(format!("pmigrate-ranges-populate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let r = GuestRegion::file(Gpa(0), 256 * 4096, HostPageSize::Small, &dir.join("mem"), true, true).unwrap();
        assert!(resident(&r).iter().all(|&b| !b), "a fresh file has no page in memory");
        let src: Vec<u8> = (0..64 * PAGE_SIZE).map(|i| (i / PAGE_SIZE) as u8 + 1).collect();
        r.write_pages(PageIdx(100), &src).unwrap();
        let res = resident(&r);
        assert!(res[100..164].iter().all(|&b| b), "the span written is in memory");
        let outside: Vec<usize> = (0..res.len()).filter(|&p| res[p] && !(100..164).contains(&p)).collect();
        assert!(outside.is_empty(), "nothing outside the span is: {outside:?}");
        let mut back = vec![0u8; 64 * PAGE_SIZE];
        r.read_pages(PageIdx(100), &mut back).unwrap();
        assert_eq!(back, src);
        r.zero_pages(PageIdx(110), 70).unwrap();
        r.read_pages(PageIdx(100), &mut back).unwrap();
        assert_eq!(&back[..10 * PAGE_SIZE], &src[..10 * PAGE_SIZE]);
        assert!(back[10 * PAGE_SIZE..].iter().all(|&b| b == 0));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
