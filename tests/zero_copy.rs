//! Zero-copy: regions both ends map are handed over, after proof, and
//! everything else takes the copy path in the same migration.

#[macro_use]
#[path = "support/backends.rs"]
mod backends;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use backends::{config, receive_options};
use pmigrate::BackendChoice;
use pmigrate::{
    Acceptor, Compression, Gpa, GuestMemory, GuestRegion, HashTracker, HostPageSize, Incoming, MigrateError,
    ReceiveOptions, Report, Source, SourceConfig,
};
use pmigrate_bench::synth::{fill, first_difference, start_mutators, ContentMix, MutatorConfig, Skew};
use pmigrate_transport::hello::{Mode, CAP_SHARED};

const SHARED: u64 = 64 << 20;
const PRIVATE: u64 = 32 << 20;

/// A fresh directory in /dev/shm for one case (cases run in parallel, each
/// over every backend).
fn dir(name: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let d = PathBuf::from(format!("/dev/shm/pmigrate-zc-{}-{name}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Region 0: a shared file; region 1: private anonymous memory.
fn source_memory(path: &Path) -> Arc<GuestMemory> {
    let mem = GuestMemory::new(vec![
        GuestRegion::file(Gpa(0), SHARED, HostPageSize::Small, path, true, true).unwrap(),
        GuestRegion::anonymous(Gpa(1 << 32), PRIVATE, HostPageSize::Small).unwrap(),
    ])
    .unwrap();
    fill(&mem, ContentMix::TYPICAL, 11);
    Arc::new(mem)
}

fn snapshot(mem: &GuestMemory) -> GuestMemory {
    let copy = GuestMemory::new(
        mem.regions().iter().map(|r| GuestRegion::anonymous(r.gpa(), r.len(), HostPageSize::Small).unwrap()).collect(),
    )
    .unwrap();
    for (a, b) in mem.regions().iter().zip(copy.regions()) {
        let mut buf = vec![0u8; a.len() as usize];
        a.read_pages(pmigrate::PageIdx(0), &mut buf).unwrap();
        b.write_pages(pmigrate::PageIdx(0), &buf).unwrap();
    }
    copy
}

/// Migrates `src` to a destination whose region 0 maps `dst_path`; with
/// `dirty`, a mutator writes region 0 (the shared one) during pre-copy.
fn migrate(io: BackendChoice, src: &Arc<GuestMemory>, dst_path: &Path, dirty: bool) -> (Report, Report, GuestMemory) {
    let dst = GuestMemory::new(vec![
        GuestRegion::file(Gpa(0), SHARED, HostPageSize::Small, dst_path, true, false).unwrap(),
        GuestRegion::anonymous(Gpa(1 << 32), PRIVATE, HostPageSize::Small).unwrap(),
    ])
    .unwrap();
    let acceptor = Acceptor::bind(&["127.0.0.1:0".parse().unwrap()], backends::key()).unwrap();
    let addr = acceptor.local_addrs()[0];
    let (s, d) = std::thread::scope(|sc| {
        let dst = &dst;
        let rx = sc.spawn(move || {
            let incoming = Incoming::accept_for(&acceptor, dst, None).unwrap();
            assert_eq!(
                incoming.handover_regions(),
                vec![0],
                "region 0 is offered, and granted: region 0 here maps a shared file"
            );
            incoming.receive(dst, &ReceiveOptions { verify_memory: true, ..receive_options(io) }).unwrap()
        });
        // Guest writes land in the shared region while pre-copy runs.
        let mut m = dirty.then(|| {
            start_mutators(
                src.clone(),
                MutatorConfig { threads: 1, rate: 16 << 20, working_set: SHARED, skew: Skew::Uniform },
                None,
            )
        });
        let cfg = SourceConfig { threads: 2, compression: Compression::Off, ..config(io) };
        let report = Source::new(src, vec![addr], backends::key())
            .streams(2)
            .config(cfg)
            .tracker(Box::new(HashTracker::new()))
            .on_pause(|| {
                if let Some(m) = m.as_mut() {
                    m.stop();
                }
                Ok(())
            })
            .run()
            .unwrap();
        (report, rx.join().unwrap())
    });
    (s, d, dst)
}

fn pages_sent_of(report: &Report) -> u64 {
    report.rounds.iter().map(|r| r.raw + r.compressed).sum()
}

fn mixed_regions_each_take_their_path(io: BackendChoice) {
    let d = dir("mixed");
    let path = d.join("guest.mem");
    let src = source_memory(&path);
    let (s, dr, dst) = migrate(io, &src, &path, true);
    assert_eq!(s.regions.len(), 1, "{s}");
    assert_eq!(s.regions[0].path, "zero-copy", "{s}");
    assert_eq!(dr.regions[0].path, "zero-copy");
    assert!(pages_sent_of(&s) <= PRIVATE / 4096, "only the private region's pages travelled: {s}");
    assert!(s.wire_bytes < PRIVATE + (1 << 20), "{s}");
    assert_eq!(first_difference(&src, &dst), None);
    let _ = std::fs::remove_dir_all(d);
}

fn a_different_file_of_the_same_size_takes_the_copy_path(io: BackendChoice) {
    let d = dir("other");
    let src = source_memory(&d.join("guest.mem"));
    let other = d.join("other.mem");
    std::fs::File::create(&other).unwrap().set_len(SHARED).unwrap();
    let (s, _, dst) = migrate(io, &src, &other, false);
    assert_eq!(s.regions[0].path, "copy", "{s}");
    assert!(s.regions[0].why.contains("differ"), "{s}");
    assert_eq!(first_difference(&src, &dst), None, "the copy path filled the other file");
    let _ = std::fs::remove_dir_all(d);
}

fn a_copy_of_the_file_is_caught_by_the_nonce_proof(io: BackendChoice) {
    let d = dir("copy");
    let path = d.join("guest.mem");
    let src = source_memory(&path);
    let twin = d.join("twin.mem");
    std::fs::copy(&path, &twin).unwrap();
    let before = snapshot(&src);
    let (s, _, dst) = migrate(io, &src, &twin, false);
    assert_eq!(s.regions[0].path, "copy", "{s}");
    assert!(s.regions[0].why.contains("not the same memory"), "{s}");
    assert_eq!(first_difference(&src, &dst), None);
    assert_eq!(first_difference(&src, &before), None, "the nonces were taken out again");
    let _ = std::fs::remove_dir_all(d);
}

fn failure_before_handover_leaves_the_source_owning_its_memory(io: BackendChoice) {
    let d = dir("fail");
    let path = d.join("guest.mem");
    let src = source_memory(&path);
    let before = snapshot(&src);
    let acceptor = Acceptor::bind(&["127.0.0.1:0".parse().unwrap()], backends::key()).unwrap();
    let addr = acceptor.local_addrs()[0];
    // A destination that grants handover, then vanishes at the first probe.
    let peer = std::thread::spawn(move || {
        let acc = acceptor.accept_session(Mode::Memory, &mut |_| Ok(CAP_SHARED), None).unwrap();
        let mut r = pmigrate_transport::FrameReader::new(&acc.streams[0], "peer");
        let (h, _) = r.next_frame().unwrap().unwrap();
        assert_eq!(h.kind, pmigrate_transport::FrameKind::Probe);
    });
    let paused = AtomicBool::new(false);
    let err = Source::new(&src, vec![addr], backends::key())
        .config(config(io))
        .tracker(Box::new(HashTracker::new()))
        .on_pause(|| {
            paused.store(true, Ordering::SeqCst);
            Ok(())
        })
        .run()
        .expect_err("the destination vanished");
    peer.join().unwrap();
    assert!(matches!(err, MigrateError::Protocol { .. } | MigrateError::Transport(_)), "{err}");
    assert!(!paused.load(Ordering::SeqCst), "the guest never stopped");
    assert_eq!(first_difference(&src, &before), None, "source memory as it was");
    let _ = std::fs::remove_dir_all(d);
}

over_each_backend!(
    mixed_regions_each_take_their_path,
    a_different_file_of_the_same_size_takes_the_copy_path,
    a_copy_of_the_file_is_caught_by_the_nonce_proof,
    failure_before_handover_leaves_the_source_owning_its_memory,
);
