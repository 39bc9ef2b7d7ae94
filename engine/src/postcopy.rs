//! Post-copy and hybrid migration: the destination runs the guest before
//! all of its memory has arrived.
//!
//! # Sequence
//!
//! ```text
//! source                                          destination
//!   [pre-copy rounds 0..F, as many as asked: hybrid]
//!   pause hook; last dirty pages collected
//!   Switchover(F) pieces on stream 0: the bitmap   waits until every stream
//!     of pages the destination lacks ("needed")    reached its Switchover marker,
//!   empty Switchover(F) marker on every stream     drops the needed pages it holds
//!                                                  (stale copies), registers its
//!                                                  regions with userfaultfd (missing
//!                                                  mode), resumes the guest, answers
//!           ◄──── Switchover (priority stream) ─── "running"
//!   push: round F over the bulk streams,     ───►  UFFDIO_COPY / UFFDIO_ZEROPAGE
//!     every needed page, working set first         each needed page once
//!                                                  guest touches a missing page:
//!           ◄──── PageRequest (priority stream) ── needed: ask for it and a few after
//!   read, seal, send at once on the priority ───►  not needed (zero): UFFDIO_ZEROPAGE
//!     stream: never behind bulk data
//!   RoundEnd(F, final) on bulk streams, Done ───►  when no page is needed any more:
//!           ◄──── Verified ──────────────────────  digest compared, regions unregistered
//! ```
//!
//! The priority stream is an extra TCP connection, the session's last: it
//! carries only requests and their answers, so a vCPU waiting on a page
//! waits for one round trip, not for megabytes of bulk data queued ahead.
//!
//! # Why no page is lost or placed twice
//!
//! The destination keeps, per region, the bitmap of pages still needed.
//! A page is placed only while its bit is set, under the region's range
//! lock, and the bit is cleared in the same critical section; a copy that
//! finds it clear (the push and a request answer both carried it) is
//! dropped. The fault handler reads the bit under the same lock: a clear
//! bit means the page holds its final content — present, or missing and
//! zero (never sent, or a free page the guest reported) — so it maps the
//! zero page, where `EEXIST` only means a second vCPU faulted on the same
//! page first and is answered by waking the waiters. A page still needed
//! is never present (it was dropped at the switchover, or never written),
//! so `UFFDIO_COPY` failing with `EEXIST` would break that invariant and
//! is reported as an error, not ignored.
//!
//! Every page travels in a frame whose check is verified before the page
//! is placed, so the guest never runs on unverified bytes; the digest at
//! the end covers the tables of page hashes both ends kept.
//!
//! # Kernel facts relied on
//!
//! - `MADV_DONTNEED` on private anonymous memory empties the page-table
//!   entries, so the next touch is a missing-page fault, which a
//!   userfaultfd registered in missing mode receives.
//! - `UFFDIO_COPY` and `UFFDIO_ZEROPAGE` fill missing pages atomically and
//!   wake the threads faulting on them; `UFFDIO_UNREGISTER` wakes the rest,
//!   whose faults are then served by the kernel as usual (zero-fill).
//! - A page-fault message names the faulting address; the faulting thread
//!   sleeps until a copy, zero page or wake covers it.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use pmigrate_ranges::{AtomicBitmap, Backing, GuestMemory, MemoryError, RangeLock, PAGE_SIZE_U64};
use pmigrate_transport::TransportError;

use crate::report::LatencySummary;
pub use crate::report::PostcopyReport;
use crate::uffd::{abi, Uffd};

/// Pages asked for per fault when the guest walks memory forward (its fault
/// follows its last one closely): the faulting page and the ones after it,
/// so it finds its next pages already there. A fault elsewhere asks for its
/// page alone: read-ahead on random access only doubles the traffic.
pub const REQUEST_PAGES: u32 = 8;

/// After the source's last frame, pages still missing for this long with
/// nothing landing are asked for again (their frames were lost with a
/// stream).
pub(crate) const SWEEP_AFTER: Duration = Duration::from_secs(1);

/// At most this many pages asked for by one sweep.
pub(crate) const SWEEP_MAX_PAGES: u64 = 16 << 10;

/// How often the fault handler and waiting threads look at the clock.
pub(crate) const TICK: Duration = Duration::from_millis(100);

/// Why post-copy failed, or cannot run here.
#[derive(Debug, thiserror::Error)]
pub enum PostcopyError {
    /// Memory to probe or measure with could not be set up, or read.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// No userfaultfd for this process (`userfaultfd(2)` or `UFFDIO_API`
    /// failed).
    #[error("cannot open a userfaultfd: {0}")]
    Open(#[source] io::Error),
    /// A region that is not private anonymous memory, which missing-page
    /// faults need.
    #[error("region {region} is {backing:?}: post-copy needs private anonymous memory")]
    NotAnonymous {
        /// Region index.
        region: usize,
        /// What backs it.
        backing: Backing,
    },
    /// `UFFDIO_REGISTER` in missing mode failed.
    #[error("UFFDIO_REGISTER (missing) on region {region}: {source}")]
    Register {
        /// Region index.
        region: usize,
        /// The OS error.
        source: io::Error,
    },
    /// A region registered, but the kernel offers no `UFFDIO_COPY` or
    /// `UFFDIO_ZEROPAGE` on it.
    #[error("region {region}: no UFFDIO_COPY/UFFDIO_ZEROPAGE on it (ioctls {ioctls:#x})")]
    NoCopy {
        /// Region index.
        region: usize,
        /// The ioctls the kernel offers on the region.
        ioctls: u64,
    },
    /// Pages still needed were present when their copy arrived
    /// (`UFFDIO_COPY` failed with `EEXIST`): the invariant of the module
    /// docs is broken.
    #[error(
        "region {region}, pages {first}..+{count}: present before their post-copy copy arrived \
         (they should have been missing)"
    )]
    Present {
        /// Region index.
        region: usize,
        /// First page of the run.
        first: u64,
        /// Pages in the run.
        count: u64,
    },
    /// `UFFDIO_COPY` or `UFFDIO_ZEROPAGE` of pages that arrived failed.
    #[error("placing region {region}, pages {first}..+{count}: {source}")]
    Place {
        /// Region index.
        region: usize,
        /// First page of the run.
        first: u64,
        /// Pages in the run.
        count: u64,
        /// The OS error.
        source: io::Error,
    },
    /// Reading fault messages from the userfaultfd failed.
    #[error("reading userfaultfd: {0}")]
    ReadFaults(#[source] io::Error),
    /// The kernel reported a fault at an address outside every region.
    #[error("fault at {addr:#x}, outside guest memory")]
    Outside {
        /// The host address of the fault.
        addr: u64,
    },
    /// Mapping the zero page at a faulting page that holds its final
    /// content failed.
    #[error("zero page at region {region}, page {page}: {source}")]
    ZeroPage {
        /// Region index.
        region: usize,
        /// Page index in the region.
        page: u64,
        /// The OS error.
        source: io::Error,
    },
    /// Waking the threads faulting on a page failed.
    #[error("UFFDIO_WAKE at region {region}, page {page}: {source}")]
    Wake {
        /// Region index.
        region: usize,
        /// Page index in the region.
        page: u64,
        /// The OS error.
        source: io::Error,
    },
    /// Measuring: answering a fault at this host address failed.
    #[error("UFFDIO_COPY at {addr:#x}: {source}")]
    Copy {
        /// Host address of the page.
        addr: u64,
        /// The OS error.
        source: io::Error,
    },
    /// Measuring: no page was touched, so there is no latency to report.
    #[error("no pages touched")]
    NothingMeasured,
    /// The source asked for post-copy and the destination did not grant it.
    #[error("the destination did not accept post-copy")]
    Declined,
    /// After the switchover, the source sent nothing on any stream for
    /// the progress timeout.
    #[error(
        "stream {stream}: nothing from the source on any stream for {quiet:?}: it is frozen or gone; \
         the guest here lacks {missing} pages"
    )]
    Silent {
        /// The stream that noticed.
        stream: usize,
        /// How long the session has been quiet.
        quiet: Duration,
        /// Pages the guest here still lacks.
        missing: u64,
    },
    /// A stream lost after the switchover did not come back.
    #[error(
        "stream {stream} lost after the switchover ({lost}) and not reconnected (nothing from the source for \
         {quiet:?}): it is frozen or gone; the guest here lacks {missing} pages"
    )]
    NotReconnected {
        /// The stream.
        stream: usize,
        /// How it was lost.
        #[source]
        lost: TransportError,
        /// How long the session has been quiet.
        quiet: Duration,
        /// Pages the guest here still lacks.
        missing: u64,
    },
    /// The session ended before every needed page arrived.
    #[error("ended incomplete")]
    Incomplete,
}

/// Checks that this process may handle missing pages of private anonymous
/// memory with userfaultfd: a userfaultfd opens, and a scratch page
/// registers in missing mode with `UFFDIO_COPY` and `UFFDIO_ZEROPAGE`
/// allowed. A success is cached; a failure is probed again on the next
/// call, and carries its OS error each time.
pub fn probe() -> Result<(), PostcopyError> {
    static PROBED: OnceLock<()> = OnceLock::new();
    if PROBED.get().is_none() {
        let mem = GuestMemory::anonymous(PAGE_SIZE_U64)?;
        let f = Faults::open(&mem).map_err(PostcopyError::Open)?;
        f.register(&mem, &[true])?;
        let _ = PROBED.set(());
    }
    Ok(())
}

/// The userfaultfd of the destination's guest memory.
pub(crate) struct Faults {
    uffd: Uffd,
    /// Per region: host start address and length.
    spans: Vec<(u64, u64)>,
    /// Per region: registered.
    registered: Vec<AtomicBool>,
}

impl Faults {
    /// A userfaultfd for `mem`, nothing registered yet.
    pub(crate) fn open(mem: &GuestMemory) -> std::io::Result<Self> {
        let uffd = Uffd::open()?;
        uffd.api(0)?;
        let spans = mem.regions().iter().map(|r| (r.host_addr() as u64, r.len())).collect();
        let registered = mem.regions().iter().map(|_| AtomicBool::new(false)).collect();
        Ok(Self { uffd, spans, registered })
    }

    /// Registers the regions marked in `which` for missing-page faults.
    pub(crate) fn register(&self, mem: &GuestMemory, which: &[bool]) -> Result<(), PostcopyError> {
        for (i, r) in mem.regions().iter().enumerate() {
            if !which[i] {
                continue;
            }
            if *r.backing() != Backing::Anonymous {
                return Err(PostcopyError::NotAnonymous { region: i, backing: r.backing().clone() });
            }
            let (start, len) = self.spans[i];
            let ioctls = self
                .uffd
                .register(abi::UffdioRange { start, len }, abi::UFFDIO_REGISTER_MODE_MISSING)
                .map_err(|source| PostcopyError::Register { region: i, source })?;
            self.registered[i].store(true, Ordering::Release);
            let want = abi::UFFDIO_COPY_BIT | abi::UFFDIO_ZEROPAGE_BIT;
            if ioctls & want != want {
                return Err(PostcopyError::NoCopy { region: i, ioctls });
            }
        }
        Ok(())
    }

    /// Unregisters every registered region: waiting faults are woken and
    /// the kernel serves later ones as usual.
    pub(crate) fn unregister_all(&self) {
        for (i, &(start, len)) in self.spans.iter().enumerate() {
            if self.registered[i].swap(false, Ordering::AcqRel) {
                let _ = self.uffd.unregister(abi::UffdioRange { start, len });
            }
        }
    }

    /// The region and page of a faulting host address.
    fn locate(&self, addr: u64) -> Option<(usize, u64)> {
        self.spans
            .iter()
            .position(|&(s, l)| addr >= s && addr - s < l)
            .map(|r| (r, (addr - self.spans[r].0) / PAGE_SIZE_U64))
    }

    fn addr(&self, region: usize, page: u64) -> u64 {
        self.spans[region].0 + page * PAGE_SIZE_U64
    }
}

impl Drop for Faults {
    fn drop(&mut self) {
        self.unregister_all();
    }
}

/// Where the switchover stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Pre-copy, or gathering the switchover.
    Before,
    /// The guest runs here; pages land by userfaultfd.
    Running,
    /// Every needed page arrived, or the migration failed: stop handling.
    Over,
}

/// The destination's post-copy state, shared by the stream receivers and
/// the fault handler.
pub(crate) struct DestPost {
    pub(crate) faults: Faults,
    /// Per region: pages still to arrive.
    pub(crate) need: Vec<AtomicBitmap>,
    /// Bits set in `need`.
    pub(crate) missing: AtomicU64,
    /// The post-copy round (`u64::MAX` until the switchover starts).
    pub(crate) round: AtomicU64,
    /// Streams that reached their switchover marker.
    arrived: Mutex<usize>,
    arrived_cv: Condvar,
    phase: Mutex<Phase>,
    phase_cv: Condvar,
    /// Faults waiting for a needed page: when each was seen.
    pending: Mutex<HashMap<(usize, u64), Instant>>,
    latency: Mutex<Histogram<u64>>,
    pub(crate) fault_count: AtomicU64,
    pub(crate) zero_faults: AtomicU64,
    pub(crate) needed_pages: AtomicU64,
    pub(crate) runnable: OnceLock<Instant>,
    /// Pages placed so far (to tell a stalled transfer from a slow one).
    pub(crate) landed: AtomicU64,
}

impl DestPost {
    pub(crate) fn new(mem: &GuestMemory) -> std::io::Result<Self> {
        Ok(Self {
            faults: Faults::open(mem)?,
            need: mem.regions().iter().map(|r| AtomicBitmap::new(r.pages())).collect(),
            missing: AtomicU64::new(0),
            round: AtomicU64::new(u64::MAX),
            arrived: Mutex::new(0),
            arrived_cv: Condvar::new(),
            phase: Mutex::new(Phase::Before),
            phase_cv: Condvar::new(),
            pending: Mutex::new(HashMap::new()),
            latency: Mutex::new(LatencySummary::histogram()),
            fault_count: AtomicU64::new(0),
            zero_faults: AtomicU64::new(0),
            needed_pages: AtomicU64::new(0),
            runnable: OnceLock::new(),
            landed: AtomicU64::new(0),
        })
    }

    /// A stream reached its switchover marker.
    pub(crate) fn arrive(&self) {
        *self.arrived.lock().expect("arrival lock") += 1;
        self.arrived_cv.notify_all();
    }

    /// Waits until `n` streams arrived; `false` if `abort` was raised.
    pub(crate) fn wait_arrivals(&self, n: usize, abort: &AtomicBool) -> bool {
        let mut got = self.arrived.lock().expect("arrival lock");
        while *got < n {
            if abort.load(Ordering::Relaxed) {
                return false;
            }
            got = self.arrived_cv.wait_timeout(got, TICK).expect("arrival lock").0;
        }
        true
    }

    fn set_phase(&self, p: Phase) {
        *self.phase.lock().expect("phase lock") = p;
        self.phase_cv.notify_all();
    }

    /// The guest runs here from now on.
    pub(crate) fn start_running(&self) {
        let _ = self.runnable.set(Instant::now());
        self.set_phase(Phase::Running);
    }

    /// Stops the fault handler and wakes everyone waiting on the phase.
    pub(crate) fn end(&self) {
        self.set_phase(Phase::Over);
    }

    /// Waits until the guest runs here (or ran: with nothing left to fetch
    /// the migration may already be over); `false` if it ended before the
    /// guest started, or `abort` was raised first.
    pub(crate) fn wait_running(&self, abort: &AtomicBool) -> bool {
        let mut p = self.phase.lock().expect("phase lock");
        loop {
            match *p {
                Phase::Running => return true,
                Phase::Over => return self.runnable.get().is_some(),
                Phase::Before if abort.load(Ordering::Relaxed) => return false,
                Phase::Before => p = self.phase_cv.wait_timeout(p, TICK).expect("phase lock").0,
            }
        }
    }

    fn phase(&self) -> Phase {
        *self.phase.lock().expect("phase lock")
    }

    /// Marks pages `[first, first + count)` of `region` needed.
    pub(crate) fn mark_needed(&self, region: usize, first: u64, bits: &[u8], count: u64) {
        let map = &self.need[region];
        let mut n = 0;
        for i in 0..count {
            if bits[(i / 8) as usize] & (1 << (i % 8)) != 0 && !map.test(first + i) {
                map.set(first + i);
                n += 1;
            }
        }
        self.missing.fetch_add(n, Ordering::AcqRel);
    }

    /// Places pages `[first, first + count)` of `region` that are still
    /// needed: `data` holds all `count` pages, or `None` for zero pages.
    /// Calls `placed(page)` for each page placed. The caller holds the
    /// region's range lock over the pages.
    pub(crate) fn place(
        &self,
        region: usize,
        first: u64,
        count: u64,
        data: Option<&[u8]>,
        mut placed: impl FnMut(u64),
    ) -> Result<u64, PostcopyError> {
        let map = &self.need[region];
        let runs: Vec<(u64, u64)> = map.runs(first, first + count).collect();
        let mut n = 0;
        for (s, len) in runs {
            let addr = self.faults.addr(region, s);
            let res = match data {
                Some(d) => {
                    let off = ((s - first) * PAGE_SIZE_U64) as usize;
                    self.faults.uffd.copy(addr, &d[off..off + (len * PAGE_SIZE_U64) as usize])
                }
                None => self.faults.uffd.zeropage(addr, len * PAGE_SIZE_U64),
            };
            res.map_err(|source| match source.raw_os_error() {
                Some(libc::EEXIST) => PostcopyError::Present { region, first: s, count: len },
                _ => PostcopyError::Place { region, first: s, count: len, source },
            })?;
            map.clear_range(s, len);
            for p in s..s + len {
                placed(p);
            }
            n += len;
        }
        if n > 0 {
            self.missing.fetch_sub(n, Ordering::AcqRel);
            self.landed.fetch_add(n, Ordering::Relaxed);
            let now = Instant::now();
            let mut pending = self.pending.lock().expect("pending lock");
            if !pending.is_empty() {
                let mut lat = self.latency.lock().expect("latency lock");
                for p in first..first + count {
                    if let Some(t) = pending.remove(&(region, p)) {
                        lat.saturating_record(now.duration_since(t).as_micros() as u64);
                    }
                }
            }
        }
        Ok(n)
    }

    /// The fault handler: runs until the phase is over. A fault on a
    /// needed page is passed to `request(region, first, count)` (once per
    /// page until it lands); on any other page it maps the zero page.
    pub(crate) fn handle_faults(
        &self,
        mem: &GuestMemory,
        locks: &[RangeLock],
        mut request: impl FnMut(usize, u64, u32),
    ) -> Result<(), PostcopyError> {
        let mut addrs = Vec::with_capacity(64);
        // Per region: the last page faulted on, to tell a forward walk.
        let mut last = vec![u64::MAX; self.need.len()];
        loop {
            match self.phase() {
                Phase::Over => return Ok(()),
                Phase::Before => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Phase::Running => {}
            }
            addrs.clear();
            self.faults.uffd.read_faults(TICK, &mut addrs).map_err(PostcopyError::ReadFaults)?;
            for &a in &addrs {
                let now = Instant::now();
                self.fault_count.fetch_add(1, Ordering::Relaxed);
                let Some((r, p)) = self.faults.locate(a) else {
                    return Err(PostcopyError::Outside { addr: a });
                };
                let _g = locks[r].read(p, p + 1);
                if !self.need[r].test(p) {
                    self.zero_faults.fetch_add(1, Ordering::Relaxed);
                    let addr = self.faults.addr(r, p);
                    match self.faults.uffd.zeropage(addr, PAGE_SIZE_U64) {
                        Ok(()) => {}
                        // Another vCPU's fault on this page was answered first.
                        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                            match self.faults.uffd.wake(addr, PAGE_SIZE_U64) {
                                Err(source) if source.raw_os_error() != Some(libc::ENOENT) => {
                                    return Err(PostcopyError::Wake { region: r, page: p, source })
                                }
                                _ => {}
                            }
                        }
                        // Every page arrived meanwhile and the regions were
                        // unregistered, which woke the faulting thread.
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                        Err(source) => return Err(PostcopyError::ZeroPage { region: r, page: p, source }),
                    }
                    continue;
                }
                let fresh = self.pending.lock().expect("pending lock").insert((r, p), now).is_none();
                if fresh {
                    let walking = p.wrapping_sub(last[r]) <= u64::from(REQUEST_PAGES);
                    let ahead = if walking { u64::from(REQUEST_PAGES) } else { 1 };
                    let n = (mem.regions()[r].pages() - p).min(ahead) as u32;
                    request(r, p, n);
                }
                last[r] = p;
            }
        }
    }

    /// Runs of pages still needed, at most `max` pages in all.
    pub(crate) fn still_needed(&self, max: u64) -> Vec<(usize, u64, u64)> {
        let mut out = Vec::new();
        let mut total = 0;
        for (r, map) in self.need.iter().enumerate() {
            for (s, n) in map.runs(0, map.len()) {
                let mut s = s;
                let mut n = n.min(max - total);
                total += n;
                while n > 0 {
                    let k = n.min(u64::from(pmigrate_transport::frame::MAX_FRAME_PAGES).min(256));
                    out.push((r, s, k));
                    s += k;
                    n -= k;
                }
                if total >= max {
                    return out;
                }
            }
        }
        out
    }

    /// The figures of the destination's side.
    pub(crate) fn report(&self, t0: Instant, precopy_rounds: u32) -> PostcopyReport {
        PostcopyReport {
            precopy_rounds,
            needed_pages: self.needed_pages.load(Ordering::Relaxed),
            faults: self.fault_count.load(Ordering::Relaxed),
            zero_faults: self.zero_faults.load(Ordering::Relaxed),
            fault_latency: LatencySummary::of(&self.latency.lock().expect("latency lock")),
            runnable_secs: self.runnable.get().map_or(0.0, |t| t.duration_since(t0).as_secs_f64()),
            ..PostcopyReport::default()
        }
    }
}

/// The floor under post-copy's fault latency, measured here: a thread
/// touches `pages` missing pages of fresh anonymous memory one after
/// another, and a handler thread answers each fault with `UFFDIO_COPY` of
/// a page it holds ready — the kernel's fault → message → copy → wake
/// round trip, with no network and no source. Returns the latency of each
/// touch in microseconds.
pub fn raw_fault_round_trip(pages: u64) -> Result<LatencySummary, PostcopyError> {
    let mem = GuestMemory::anonymous(pages * PAGE_SIZE_U64)?;
    let f = Faults::open(&mem).map_err(PostcopyError::Open)?;
    f.register(&mem, &[true])?;
    let stop = AtomicBool::new(false);
    let page = vec![0x5au8; PAGE_SIZE_U64 as usize];
    let mut h = LatencySummary::histogram();
    std::thread::scope(|s| -> Result<(), PostcopyError> {
        let handler = s.spawn(|| -> Result<(), PostcopyError> {
            let mut addrs = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                addrs.clear();
                f.uffd.read_faults(TICK, &mut addrs).map_err(PostcopyError::ReadFaults)?;
                for &a in &addrs {
                    let at = a & !(PAGE_SIZE_U64 - 1);
                    f.uffd.copy(at, &page).map_err(|source| PostcopyError::Copy { addr: at, source })?;
                }
            }
            Ok(())
        });
        let region = &mem.regions()[0];
        let mut res = Ok(());
        for p in 0..pages {
            let t = Instant::now();
            match region.read_u64(p * PAGE_SIZE_U64) {
                Ok(_) => h.saturating_record(t.elapsed().as_micros().max(1) as u64),
                Err(e) => {
                    res = Err(e.into());
                    break;
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        handler.join().expect("fault handler panicked")?;
        res
    })?;
    LatencySummary::of(&h).ok_or(PostcopyError::NothingMeasured)
}
