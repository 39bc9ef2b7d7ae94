//! End-to-end migrations over loopback: the destination must equal the
//! source byte for byte, with every stream count, tracker and compression.

#[macro_use]
#[path = "support/backends.rs"]
mod backends;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::{RngCore, SeedableRng};

use backends::{config, receive_options};
use pmigrate::BackendChoice;
use pmigrate::{
    Acceptor, Compression, DirtyTracker, GuestMemory, HashTracker, Incoming, ReceiveOptions, Report, Source,
    SourceConfig, TrackerKind, UffdWpTracker, VmmBitmapTracker,
};
use pmigrate_bench::synth::{fill, first_difference, start_mutators, ContentMix, MutatorConfig, Skew};

struct Run {
    source: Report,
    dest: Report,
    dst: GuestMemory,
}

/// Migrates `src` to fresh memory over loopback; `mutate` chooses the
/// tracker and starts mutators, returning what the pause hook must stop.
fn migrate(
    src: &Arc<GuestMemory>,
    streams: u16,
    cfg: SourceConfig,
    tracker: Option<Box<dyn DirtyTracker>>,
    mutators: Option<MutatorConfig>,
    bitmap: Option<Arc<[pmigrate::AtomicBitmap]>>,
) -> Run {
    let dst = GuestMemory::anonymous(src.total_bytes()).unwrap();
    let acceptor = Acceptor::bind(&["127.0.0.1:0".parse().unwrap()], backends::key()).unwrap();
    let addr = acceptor.local_addrs()[0];
    let (source, dest) = std::thread::scope(|s| {
        let dst = &dst;
        let rx = s.spawn(move || {
            let incoming = Incoming::accept_for(&acceptor, dst, None).unwrap();
            incoming.receive(dst, &ReceiveOptions { verify_memory: true, ..receive_options(cfg.io) }).unwrap()
        });
        let mut m = mutators.map(|m| start_mutators(src.clone(), m, bitmap));
        let mut source = Source::new(src, vec![addr], backends::key()).streams(streams).config(cfg);
        if let Some(t) = tracker {
            source = source.tracker(t);
        }
        let paused = AtomicBool::new(false);
        let report = source
            .on_pause(|| {
                if let Some(m) = m.as_mut() {
                    m.stop();
                }
                paused.store(true, Ordering::SeqCst);
                Ok(())
            })
            .run()
            .unwrap();
        assert!(paused.load(Ordering::SeqCst), "the pause hook ran");
        (report, rx.join().unwrap())
    });
    Run { source, dest, dst }
}

fn assert_equal(src: &GuestMemory, run: &Run) {
    assert_eq!(first_difference(src, &run.dst), None, "destination differs from source");
    assert_eq!(run.source.digest, run.dest.digest);
}

fn gib_of_mixed_content_over_four_streams_and_four_workers(io: BackendChoice) {
    let src = Arc::new(GuestMemory::anonymous(1 << 30).unwrap());
    fill(&src, ContentMix::TYPICAL, 1);
    // Pages mixed page by page go in compressed frames, short zero runs
    // riding along; 16 MiB of incompressible pages go raw (lz4 would not
    // shrink them); 16 MiB of zero pages, which a fresh destination holds
    // already, not at all.
    let mut noise = vec![0u8; 16 << 20];
    rand::rngs::SmallRng::seed_from_u64(7).fill_bytes(&mut noise);
    src.regions()[0].write_pages(pmigrate::PageIdx(0), &noise).unwrap();
    src.regions()[0].write_pages(pmigrate::PageIdx(4096), &vec![0u8; 16 << 20]).unwrap();
    let cfg = SourceConfig { threads: 4, tracker: TrackerKind::Hash, compression: Compression::On, ..config(io) };
    let run = migrate(&src, 4, cfg, None, None, None);
    assert_equal(&src, &run);
    let r0 = &run.source.rounds[0];
    assert_eq!(r0.scanned, (1 << 30) / 4096, "round 0 scans every page");
    assert!(r0.zero > 0 && r0.compressed > 0 && r0.raw > 0, "mixed content takes every path: {r0:?}");
    assert_eq!(run.source.streams.len(), 4);
    assert!(run.source.streams.iter().all(|s| s.frames > 0), "every stream carried pages: {:?}", run.source.streams);
    eprintln!("{}", run.source);
}

fn every_stream_count_and_compression_gives_the_same_memory(io: BackendChoice) {
    let src = Arc::new(GuestMemory::anonymous(64 << 20).unwrap());
    fill(&src, ContentMix::TYPICAL, 2);
    for (streams, threads, compression) in
        [(1, 1, Compression::Off), (1, 2, Compression::On), (3, 2, Compression::Auto), (8, 3, Compression::Off)]
    {
        let cfg = SourceConfig { threads, compression, tracker: TrackerKind::Hash, ..config(io) };
        let run = migrate(&src, streams, cfg, None, None, None);
        assert_equal(&src, &run);
        let lz4: u64 = run.source.rounds.iter().map(|r| r.compressed).sum();
        match compression {
            Compression::Off => assert_eq!(lz4, 0),
            Compression::On => assert!(lz4 > 0, "text-like pages compress"),
            Compression::Auto => {} // lz4 only while the streams back up
        }
    }
}

/// Whole raw batches built in the registered arena and sent with SEND_ZC
/// (io_uring where the kernel has it): the same memory, and the report says
/// so; the portable backend ignores the setting.
fn zero_copy_send_gives_the_same_memory(io: BackendChoice) {
    let src = Arc::new(GuestMemory::anonymous(64 << 20).unwrap());
    fill(&src, ContentMix::TYPICAL, 4);
    let cfg = SourceConfig { threads: 2, tracker: TrackerKind::Hash, zero_copy_send: true, ..config(io) };
    let run = migrate(&src, 4, cfg, None, None, None);
    assert_equal(&src, &run);
    let zc = io == BackendChoice::Uring && pmigrate_transport::backend::probe_uring().is_ok_and(|s| s.send_zc);
    assert_eq!(run.source.io.contains("zero-copy send"), zc, "{}", run.source.io);
}

fn live(io: BackendChoice, tracker: Box<dyn DirtyTracker>, with_bitmap: Option<Arc<[pmigrate::AtomicBitmap]>>) -> Run {
    let src = Arc::new(GuestMemory::anonymous(256 << 20).unwrap());
    fill(&src, ContentMix::TYPICAL, 3);
    let m = MutatorConfig {
        threads: 2,
        rate: 64 << 20,
        working_set: 128 << 20,
        skew: Skew::HotCold { hot_pct: 80, hot_share: 10 },
    };
    // A tight downtime target, so that several live rounds run.
    let cfg = SourceConfig { threads: 2, max_rounds: 6, downtime_target: Duration::from_millis(5), ..config(io) };
    let run = migrate(&src, 3, cfg, Some(tracker), Some(m), with_bitmap);
    assert_equal(&src, &run);
    assert!(run.source.rounds.len() >= 3, "live rounds and the final one: {}", run.source);
    let resent: u64 = run.source.rounds[1..].iter().map(|r| r.raw + r.compressed).sum();
    assert!(resent > 0, "pages dirtied during pre-copy were sent again");
    eprintln!("{}", run.source);
    run
}

fn live_precopy_with_the_vmm_bitmap_tracker(io: BackendChoice) {
    let probe = GuestMemory::anonymous(256 << 20).unwrap();
    let maps = VmmBitmapTracker::bitmaps_for(&probe);
    drop(probe);
    let run = live(io, Box::new(VmmBitmapTracker::new(maps.clone())), Some(maps));
    assert_eq!(run.source.tracker, "vmm-bitmap");
}

fn live_precopy_with_the_uffd_wp_tracker(io: BackendChoice) {
    if let Err(e) = pmigrate::probe_uffd_wp() {
        eprintln!("skipping: {e}");
        return;
    }
    let run = live(io, Box::new(UffdWpTracker::new()), None);
    assert_eq!(run.source.tracker, "uffd-wp");
}

fn live_precopy_with_the_hash_tracker(io: BackendChoice) {
    let run = live(io, Box::new(HashTracker::new()), None);
    assert_eq!(run.source.tracker, "hash");
}

fn a_slow_dirty_rate_converges_a_fast_one_hits_the_round_cap(io: BackendChoice) {
    let src = Arc::new(GuestMemory::anonymous(128 << 20).unwrap());
    fill(&src, ContentMix::TYPICAL, 4);
    // 1 MiB/s of dirtying against a loopback link of hundreds of MiB/s.
    let slow = MutatorConfig { threads: 1, rate: 1 << 20, working_set: 64 << 20, skew: Skew::Uniform };
    let cfg = SourceConfig { threads: 2, max_rounds: 30, tracker: TrackerKind::Hash, ..config(io) };
    let run = migrate(&src, 2, cfg, Some(Box::new(HashTracker::new())), Some(slow), None);
    assert_equal(&src, &run);
    assert!(run.source.converged, "{}", run.source);
    assert!(run.source.rounds.len() < 31);

    // Dirtying the whole working set many times a second, against a
    // downtime target no link could meet: only the round cap stops it.
    let fast = MutatorConfig { threads: 1, rate: 4 << 30, working_set: 128 << 20, skew: Skew::Uniform };
    let cfg = SourceConfig {
        threads: 2,
        max_rounds: 3,
        downtime_target: Duration::from_micros(1),
        tracker: TrackerKind::Hash,
        ..config(io)
    };
    let run = migrate(&src, 2, cfg, Some(Box::new(HashTracker::new())), Some(fast), None);
    assert_equal(&src, &run);
    assert!(!run.source.converged, "{}", run.source);
    assert_eq!(run.source.rounds.len(), 4, "three live rounds and the final one");
    assert!(run.source.rounds[3].paused);
}

fn free_page_hints_are_not_sent_unless_written_after_the_hint(io: BackendChoice) {
    use pmigrate::{PageRange, RegionIdx};
    let src = Arc::new(GuestMemory::anonymous(64 << 20).unwrap());
    fill(&src, ContentMix::RANDOM, 8); // every page non-zero
    let pages = (64 << 20) / 4096;
    let dst = GuestMemory::anonymous(64 << 20).unwrap();
    let acceptor = Acceptor::bind(&["127.0.0.1:0".parse().unwrap()], backends::key()).unwrap();
    let addr = acceptor.local_addrs()[0];
    let maps = VmmBitmapTracker::bitmaps_for(&src);
    let hint = PageRange { region: RegionIdx(0), start: pmigrate::PageIdx(100), end: pmigrate::PageIdx(200) };
    let report = std::thread::scope(|s| {
        let dst = &dst;
        let rx = s.spawn(move || {
            let incoming = Incoming::accept_for(&acceptor, dst, None).unwrap();
            incoming.receive(dst, &ReceiveOptions { verify_memory: true, ..receive_options(io) }).unwrap()
        });
        let region = &src.regions()[0];
        let report = Source::new(&src, vec![addr], backends::key())
            .streams(2)
            .tracker(Box::new(VmmBitmapTracker::new(maps.clone())))
            .free_pages(vec![hint])
            .on_pause(|| {
                // The guest takes page 150 back into use just before it stops.
                region.write_u64(150 * 4096, 0xfeed_f00d).map_err(|e| e.to_string())?;
                maps[0].set(150);
                Ok(())
            })
            .run()
            .unwrap();
        rx.join().unwrap();
        report
    });
    assert_eq!(report.rounds[0].hinted_free, 100, "{report}");
    assert_eq!(report.pages_sent(), pages - 100 + 1, "hinted pages never sent, but the one written after: {report}");
    let (s0, d0) = (&src.regions()[0], &dst.regions()[0]);
    let page = |r: &pmigrate::GuestRegion, p: u64| {
        let mut b = vec![0u8; 4096];
        r.read_pages(pmigrate::PageIdx(p), &mut b).unwrap();
        b
    };
    assert_eq!(page(d0, 150), page(s0, 150), "the page written after the hint arrived");
    for p in (100..200).filter(|&p| p != 150) {
        assert!(page(d0, p).iter().all(|&b| b == 0), "free page {p} was not sent");
    }
    for p in (0..100).chain(200..pages) {
        assert_eq!(page(d0, p), page(s0, p), "page {p}");
    }
}

fn a_working_set_hint_keeps_the_migration_exact(io: BackendChoice) {
    use pmigrate::{PageRange, RegionIdx};
    let src = Arc::new(GuestMemory::anonymous(128 << 20).unwrap());
    fill(&src, ContentMix::TYPICAL, 9);
    let dst = GuestMemory::anonymous(128 << 20).unwrap();
    let acceptor = Acceptor::bind(&["127.0.0.1:0".parse().unwrap()], backends::key()).unwrap();
    let addr = acceptor.local_addrs()[0];
    let maps = VmmBitmapTracker::bitmaps_for(&src);
    // Mutators write the first 6.4 MiB (10 % of their 64 MiB) nine times in ten.
    let m = MutatorConfig {
        threads: 1,
        rate: 64 << 20,
        working_set: 64 << 20,
        skew: Skew::HotCold { hot_pct: 90, hot_share: 10 },
    };
    let hot = PageRange { region: RegionIdx(0), start: pmigrate::PageIdx(0), end: pmigrate::PageIdx(2048) };
    let report = std::thread::scope(|s| {
        let dst = &dst;
        let rx = s.spawn(move || {
            let incoming = Incoming::accept_for(&acceptor, dst, None).unwrap();
            incoming.receive(dst, &ReceiveOptions { verify_memory: true, ..receive_options(io) }).unwrap()
        });
        let mut muts = Some(start_mutators(src.clone(), m, Some(maps.clone())));
        let cfg = SourceConfig { threads: 2, downtime_target: Duration::from_millis(5), max_rounds: 5, ..config(io) };
        let report = Source::new(&src, vec![addr], backends::key())
            .streams(2)
            .config(cfg)
            .tracker(Box::new(VmmBitmapTracker::new(maps.clone())))
            .working_set(vec![hot])
            .on_pause(|| {
                if let Some(mut m) = muts.take() {
                    m.stop();
                }
                Ok(())
            })
            .run()
            .unwrap();
        rx.join().unwrap();
        report
    });
    assert!(report.rounds.len() >= 2, "{report}");
    assert_eq!(first_difference(&src, &dst), None);
}

over_each_backend!(
    zero_copy_send_gives_the_same_memory,
    gib_of_mixed_content_over_four_streams_and_four_workers,
    every_stream_count_and_compression_gives_the_same_memory,
    live_precopy_with_the_vmm_bitmap_tracker,
    live_precopy_with_the_uffd_wp_tracker,
    live_precopy_with_the_hash_tracker,
    a_slow_dirty_rate_converges_a_fast_one_hits_the_round_cap,
    free_page_hints_are_not_sent_unless_written_after_the_hint,
    a_working_set_hint_keeps_the_migration_exact,
);
