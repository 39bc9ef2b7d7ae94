//! Tests of the parent module.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{fence, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pmigrate_ranges::Gpa;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::dirty::HashTracker;

/// Whether to skip: the kernel lacks the tracker (reason printed).
fn unsupported() -> bool {
    match probe() {
        Ok(()) => false,
        Err(e) => {
            eprintln!("skipping: {e}");
            true
        }
    }
}

fn anon(gpa: u64, pages: u64) -> GuestRegion {
    GuestRegion::anonymous(Gpa(gpa), pages * PAGE_SIZE_U64, HostPageSize::Small).unwrap()
}

/// The set bits of `b`, in order.
fn set_pages(b: &AtomicBitmap) -> Vec<u64> {
    b.runs(0, b.len()).flat_map(|(s, n)| s..s + n).collect()
}

/// One collect into fresh bitmaps: the `(region, page)`s reported.
fn round(t: &mut UffdWpTracker, mem: &GuestMemory) -> Vec<(usize, u64)> {
    let out: Vec<AtomicBitmap> = mem.regions().iter().map(|r| AtomicBitmap::new(r.pages())).collect();
    t.collect(mem, &out).unwrap();
    out.iter().enumerate().flat_map(|(i, b)| set_pages(b).into_iter().map(move |p| (i, p))).collect()
}

/// A file path removed on drop.
struct TempPath(PathBuf);

impl TempPath {
    fn new(dir: &str, tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        Self(PathBuf::from(dir).join(format!("pmigrate-uffd-wp-{}-{tag}-{n}", std::process::id())))
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Exact rounds over region 0 of `mem` (the only region), on pages
/// `base..base + 64`: a page written before `start` is not reported, nor
/// are reads, written pages are reported once, and re-armed.
fn check_rounds(mem: &GuestMemory, base: u64) -> Result<(), DirtyError> {
    let r = &mem.regions()[0];
    let at = |p: u64| (base + p) * PAGE_SIZE_U64;
    let pages = |t: &mut UffdWpTracker| -> Vec<u64> { round(t, mem).into_iter().map(|(_, p)| p - base).collect() };
    r.write_u64(at(3), 1)?;
    let mut t = UffdWpTracker::new();
    t.start(mem)?;
    assert_eq!(pages(&mut t), [0u64; 0], "nothing written yet");
    assert_eq!(r.read_u64(at(3))?, 1);
    assert_eq!(r.read_u64(at(20))?, 0);
    assert_eq!(pages(&mut t), [0u64; 0], "reads are not writes");
    r.write_u64(at(3) + 16, 2)?;
    r.write_u64(at(10), 3)?;
    r.write_u64(at(63) + 4088, 4)?;
    assert_eq!(pages(&mut t), [3, 10, 63]);
    assert_eq!(pages(&mut t), [0u64; 0], "re-armed");
    r.write_u64(at(10), 5)?;
    r.write_u64(at(20), 6)?;
    assert_eq!(pages(&mut t), [10, 20]);
    t.stop(mem);
    t.stop(mem);
    assert!(t.collect(mem, &[AtomicBitmap::new(r.pages())]).is_err(), "collect after stop");
    Ok(())
}

#[test]
fn shared_shmem_file_region_is_tracked() {
    if unsupported() {
        return;
    }
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        "/dev/shm".to_string()
    } else {
        std::env::temp_dir().display().to_string()
    };
    let path = TempPath::new(&dir, "shared");
    let region = GuestRegion::file(Gpa(0), 64 * PAGE_SIZE_U64, HostPageSize::Small, &path.0, true, true).unwrap();
    let mem = GuestMemory::new(vec![region]).unwrap();
    match check_rounds(&mem, 0) {
        Err(DirtyError::Unsupported { why, .. }) => eprintln!("shmem write-protection refused: {why}"),
        res => res.unwrap(),
    }
}

#[test]
fn private_file_region_is_tracked() {
    if unsupported() {
        return;
    }
    let path = TempPath::new(&std::env::temp_dir().display().to_string(), "private");
    std::fs::write(&path.0, vec![0u8; 64 * 4096]).unwrap();
    let region = GuestRegion::file(Gpa(0), 64 * PAGE_SIZE_U64, HostPageSize::Small, &path.0, false, false).unwrap();
    let mem = GuestMemory::new(vec![region]).unwrap();
    check_rounds(&mem, 0).unwrap();
}

#[test]
fn transparent_huge_page_reports_only_the_written_small_pages() {
    if unsupported() {
        return;
    }
    const HUGE: usize = 2 << 20;
    let mem = GuestMemory::anonymous(2 * HUGE as u64).unwrap();
    let r = &mem.regions()[0];
    let huge = r.host_addr().next_multiple_of(HUGE);
    // SAFETY: `[huge, huge + 2 MiB)` lies inside the region's 4 MiB
    // mapping (`huge` is less than 2 MiB past its start), which `mem`
    // keeps mapped; MADV_HUGEPAGE only changes how faults fill it.
    let rc = unsafe { libc::madvise(huge as *mut libc::c_void, HUGE, libc::MADV_HUGEPAGE) };
    if rc != 0 {
        eprintln!("MADV_HUGEPAGE: {}; going on with small pages", io::Error::last_os_error());
    }
    let base = ((huge - r.host_addr()) / 4096) as u64;
    r.write_u64(base * PAGE_SIZE_U64, 9).unwrap();
    let mut pagemap = Pagemap::open().unwrap();
    let mut huge_pages = 0;
    pagemap.scan(huge as u64, (huge + HUGE) as u64, 0, abi::PAGE_IS_HUGE, |s, e| huge_pages += (e - s) / 4096).unwrap();
    eprintln!("{huge_pages} of 512 pages mapped by a transparent huge page before start");
    check_rounds(&mem, base).unwrap();
}

/// A write some writer made, logged after it: `epoch` before and after.
struct Write {
    region: usize,
    page: u64,
    before: u64,
    after: u64,
}

#[test]
fn concurrent_writers_are_never_missed() {
    if unsupported() {
        return;
    }
    const WRITERS: usize = 4;
    const WRITES: usize = 50_000;
    let mem = GuestMemory::new(vec![anon(0, 1024), anon(1 << 30, 3072)]).unwrap();
    for p in (0..1024).step_by(2) {
        mem.regions()[0].write_u64(p * PAGE_SIZE_U64, 1).unwrap();
    }
    let mut t = UffdWpTracker::new();
    t.start(&mem).unwrap();
    // `epoch` = number of collects returned. A write made after reading
    // `before` and before reading `after` must be reported by a collect
    // among `before..=after + 1`: the first to scan its page after it.
    let epoch = AtomicU64::new(0);
    let running = AtomicUsize::new(WRITERS);
    let mut rounds: Vec<Vec<(usize, u64)>> = Vec::new();
    let logs: Vec<Vec<Write>> = std::thread::scope(|s| {
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (mem, epoch, running) = (&mem, &epoch, &running);
                s.spawn(move || {
                    let mut rng = SmallRng::seed_from_u64(w as u64);
                    let mut log = Vec::with_capacity(WRITES);
                    for i in 0..WRITES {
                        let region = rng.gen_range(0..2);
                        let page = rng.gen_range(0..mem.regions()[region].pages());
                        let word = rng.gen_range(0..512u64);
                        let before = epoch.load(Ordering::SeqCst);
                        mem.regions()[region].write_u64(page * PAGE_SIZE_U64 + word * 8, i as u64).unwrap();
                        fence(Ordering::SeqCst);
                        let after = epoch.load(Ordering::SeqCst);
                        log.push(Write { region, page, before, after });
                    }
                    running.fetch_sub(1, Ordering::SeqCst);
                    log
                })
            })
            .collect();
        while running.load(Ordering::SeqCst) > 0 {
            rounds.push(round(&mut t, &mem));
            epoch.fetch_add(1, Ordering::SeqCst);
        }
        writers.into_iter().map(|h| h.join().unwrap()).collect()
    });
    rounds.push(round(&mut t, &mem));
    let quiet = round(&mut t, &mem);
    assert_eq!(quiet, [], "a collect after the last one with no write in between");

    let mut reported: HashMap<(usize, u64), Vec<u64>> = HashMap::new();
    for (k, pages) in rounds.iter().enumerate() {
        for &p in pages {
            reported.entry(p).or_default().push(k as u64);
        }
    }
    let mut written: HashMap<(usize, u64), Vec<(u64, u64)>> = HashMap::new();
    let last = rounds.len() as u64 - 1;
    for w in logs.iter().flatten() {
        let key = (w.region, w.page);
        let window = (w.before, (w.after + 1).min(last));
        let ks = reported.get(&key).map_or(&[][..], Vec::as_slice);
        let first = ks.partition_point(|&k| k < window.0);
        assert!(
            ks.get(first).is_some_and(|&k| k <= window.1),
            "write to {key:?} in collects {window:?} missed; reported in {ks:?}"
        );
        written.entry(key).or_default().push(window);
    }
    // Exact: each report is explained by a write inside its window.
    for (key, ks) in &reported {
        let windows = &written[key];
        for k in ks {
            assert!(windows.iter().any(|&(a, b)| (a..=b).contains(k)), "{key:?} reported in collect {k} unwritten");
        }
    }
    let reports: usize = rounds.iter().map(Vec::len).sum();
    eprintln!("{} writes by {WRITERS} threads, {} collects, {reports} pages reported", WRITERS * WRITES, rounds.len());
}

#[test]
fn discarded_pages_are_reported() {
    if unsupported() {
        return;
    }
    let mem = GuestMemory::anonymous(16 * PAGE_SIZE_U64).unwrap();
    let r = &mem.regions()[0];
    r.write_u64(5 * PAGE_SIZE_U64, 7).unwrap();
    let mut t = UffdWpTracker::new();
    t.start(&mem).unwrap();
    // SAFETY: page 5 lies inside the region's mapping; MADV_DONTNEED on
    // private anonymous memory only makes it read back as zeros, which
    // no reference observes (all access is by copy).
    let rc = unsafe { libc::madvise((r.host_addr() + 5 * 4096) as *mut libc::c_void, 4096, libc::MADV_DONTNEED) };
    assert_eq!(rc, 0);
    assert_eq!(r.read_u64(5 * PAGE_SIZE_U64).unwrap(), 0);
    assert_eq!(round(&mut t, &mem), [(0, 5)], "a page whose content was dropped");
    assert_eq!(round(&mut t, &mem), []);
}

#[test]
fn collect_checks_the_memory() {
    if unsupported() {
        return;
    }
    let mem = GuestMemory::anonymous(8 * PAGE_SIZE_U64).unwrap();
    let other = GuestMemory::anonymous(8 * PAGE_SIZE_U64).unwrap();
    let mut t = UffdWpTracker::new();
    assert!(matches!(t.collect(&mem, &[AtomicBitmap::new(8)]), Err(DirtyError::Shape(_))));
    t.start(&mem).unwrap();
    assert!(matches!(t.collect(&other, &[AtomicBitmap::new(8)]), Err(DirtyError::Shape(_))));
    assert_eq!(round(&mut t, &mem), []);
}

/// Collect cost over 1 GiB of touched anonymous memory with 1% of its
/// pages written between collects, against the hash tracker.
#[test]
#[ignore = "allocates and hashes 1 GiB; run with --ignored --nocapture"]
fn stress_uffd_wp_collect_cost() {
    if unsupported() {
        return;
    }
    const PAGES: u64 = (1 << 30) / PAGE_SIZE_U64;
    let mem = GuestMemory::new(vec![anon(0, PAGES)]).unwrap();
    let r = &mem.regions()[0];
    for p in 0..PAGES {
        r.write_u64(p * PAGE_SIZE_U64, p).unwrap();
    }
    let mut rng = SmallRng::seed_from_u64(1);
    let mut stamp = 0u64;
    // Distinct pages, each given a value it never had (the hash tracker
    // skips a write that leaves a page as it was).
    let mut dirty = |n: usize| {
        stamp += 1;
        for p in rand::seq::index::sample(&mut rng, PAGES as usize, n) {
            r.write_u64(p as u64 * PAGE_SIZE_U64 + 8, stamp).unwrap();
        }
    };
    let one_percent = (PAGES / 100) as usize;
    // (time to write the pages, time to collect), five rounds.
    let timed = |t: &mut dyn DirtyTracker, dirty: &mut dyn FnMut(usize)| -> Vec<(Duration, Duration)> {
        let out = [AtomicBitmap::new(PAGES)];
        (0..5)
            .map(|_| {
                out[0].clear_all();
                let t0 = Instant::now();
                dirty(one_percent);
                let t1 = Instant::now();
                t.collect(&mem, &out).unwrap();
                let t2 = Instant::now();
                assert_eq!(out[0].count(), one_percent as u64, "{}", t.name());
                (t1 - t0, t2 - t1)
            })
            .collect()
    };
    let mut uffd = UffdWpTracker::new();
    let t0 = Instant::now();
    uffd.start(&mem).unwrap();
    let uffd_start = t0.elapsed();
    let t0 = Instant::now();
    uffd.collect(&mem, &[AtomicBitmap::new(PAGES)]).unwrap();
    let uffd_idle = t0.elapsed();
    let uffd_times = timed(&mut uffd, &mut dirty);
    uffd.stop(&mem);
    let mut hash = HashTracker::new();
    let t0 = Instant::now();
    hash.start(&mem).unwrap();
    let hash_start = t0.elapsed();
    let hash_times = timed(&mut hash, &mut dirty);
    eprintln!("1 GiB touched anonymous memory, {one_percent} pages (1%) written between collects:");
    eprintln!("  uffd-wp: start {uffd_start:?}, idle collect {uffd_idle:?}; (writes, collect): {uffd_times:?}");
    eprintln!("  hash:    start {hash_start:?}; (writes, collect): {hash_times:?}");
}

#[test]
fn an_unsupported_kernel_is_told_by_name_and_number() {
    let missing = abi::UFFD_FEATURE_WP_ASYNC | abi::UFFD_FEATURE_WP_UNPOPULATED;
    let e = super::unsupported(UffdWpUnsupported::Features { missing, offered: 0x1 });
    assert_eq!(
        e.to_string(),
        "uffd-wp dirty tracking is not available: userfaultfd lacks UFFD_FEATURE_WP_ASYNC and \
         UFFD_FEATURE_WP_UNPOPULATED (Linux 6.7+ with CONFIG_PTE_MARKER_UFFD_WP; features offered: 0x1)"
    );
    let e = super::unsupported(UffdWpUnsupported::Open(io::Error::from_raw_os_error(libc::EPERM)));
    let os = std::error::Error::source(&e).and_then(std::error::Error::source);
    let os = os.and_then(|c| c.downcast_ref::<io::Error>()).expect("the OS error, two causes down");
    assert_eq!(os.raw_os_error(), Some(libc::EPERM));
}
