//! Post-copy and hybrid migrations over loopback, with a guest running at
//! the destination from the moment it may: every page it touches must hold
//! what the source held at the pause, its own writes must stay, and at the
//! end the destination must equal the source's memory at the pause plus
//! those writes — no page lost, none placed twice.

#[macro_use]
#[path = "support/backends.rs"]
mod backends;

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backends::{config, receive_options};
use pmigrate::BackendChoice;
use pmigrate::{
    Acceptor, GuestMemory, Incoming, MigrateError, PageIdx, Report, Source, SourceConfig, VmmBitmapTracker,
};
use pmigrate::{PageRange, RegionIdx};
use pmigrate_bench::synth::{fill, start_mutators, ContentMix, MutatorConfig, Skew};

/// Byte offset, in every page, of the word the destination's guest stamps.
const STAMP_WORD: u64 = 8;

/// What the destination's guest did.
#[derive(Default)]
struct GuestLog {
    /// Page → the last stamp it wrote there.
    stamps: HashMap<u64, u64>,
    /// Pages touched before the migration completed.
    touched_early: u64,
    /// Pages whose first word differed from the source's at first touch.
    wrong: Vec<u64>,
}

struct Outcome {
    source: Report,
    dest: Report,
    dst: GuestMemory,
    log: GuestLog,
    /// Connections cut while the migration was still going on.
    cut_mid_migration: usize,
}

struct Scenario {
    precopy_rounds: u32,
    streams: u16,
    /// Mutators on the source during pre-copy (hybrid).
    source_writes: Option<MutatorConfig>,
    free: Vec<PageRange>,
    /// Pages the source's guest writes in its last moment before pausing.
    late_writes: Vec<u64>,
    /// Cut connections once the guest runs at the destination: first
    /// stream 1 alone, then every stream.
    cut_links: bool,
    /// Whole raw batches sent zero-copy from the registered arena (with
    /// io_uring; the portable backend ignores it).
    zero_copy_send: bool,
    /// How both ends authenticate (the shared test key unless set).
    auth: Option<(pmigrate::Auth, pmigrate::Auth)>,
}

impl Scenario {
    fn new(precopy_rounds: u32) -> Self {
        Self {
            precopy_rounds,
            streams: 3,
            source_writes: None,
            free: Vec::new(),
            late_writes: Vec::new(),
            cut_links: false,
            zero_copy_send: false,
            auth: None,
        }
    }
}

/// Runs the scenario: the destination's guest starts from the resume hook
/// and reads and writes pages all over memory until the migration is over.
fn migrate(io: BackendChoice, src: &Arc<GuestMemory>, sc: Scenario) -> Outcome {
    let dst = GuestMemory::anonymous(src.total_bytes()).unwrap();
    let (src_auth, dst_auth) = sc.auth.clone().unwrap_or_else(|| (crate::backends::key(), crate::backends::key()));
    let acceptor = Acceptor::bind(&["127.0.0.1:0".parse().unwrap()], dst_auth).unwrap();
    let addr = acceptor.local_addrs()[0];
    let cutter = sc.cut_links.then(|| Cutter::new(addr));
    let dial = cutter.as_ref().map_or(addr, |c| c.addr);
    let mut cut_mid_migration = 0;
    let maps = VmmBitmapTracker::bitmaps_for(src);
    let running = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    let log = Mutex::new(GuestLog::default());
    let free = sc.free.clone();
    let late = sc.late_writes.clone();
    // A free page not written after the hint is zero at the destination.
    let zero_here = move |p: u64| free.iter().any(|r| r.start.0 <= p && p < r.end.0) && !late.contains(&p);
    let (source, dest) = std::thread::scope(|s| {
        let (dst, running, done, log, zero_here) = (&dst, &running, &done, &log, &zero_here);
        // The guest at the destination: touches pages at random, checks what
        // it reads against the source (paused by then, so frozen), stamps
        // one word of each page it touches.
        let guest = s.spawn(move || {
            while !running.load(Ordering::Acquire) {
                if done.load(Ordering::Acquire) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            let (sr, dr) = (&src.regions()[0], &dst.regions()[0]);
            let pages = dr.pages();
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            let mut stamp = 1u64 << 40;
            let mut local = GuestLog::default();
            let mut after = 0;
            // Keep going a little after completion, over placed pages too.
            while after < 2000 {
                if done.load(Ordering::Acquire) {
                    after += 1;
                } else {
                    local.touched_early += 1;
                }
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let p = x % pages;
                let at = p * 4096;
                let first = dr.read_u64(at).unwrap();
                let want = if zero_here(p) { 0 } else { sr.read_u64(at).unwrap() };
                if !local.stamps.contains_key(&p) && first != want {
                    local.wrong.push(p);
                }
                stamp += 1;
                dr.write_u64(at + STAMP_WORD, stamp).unwrap();
                local.stamps.insert(p, stamp);
            }
            *log.lock().unwrap() = local;
        });
        let rx = s.spawn(move || {
            let incoming = Incoming::accept_for(&acceptor, dst, None).unwrap();
            assert!(incoming.is_postcopy());
            let report = incoming.receive_and_run(dst, &receive_options(io), || {
                running.store(true, Ordering::Release);
                Ok(())
            });
            done.store(true, Ordering::Release);
            report.unwrap()
        });
        let cuts = cutter.as_ref().map(|c| {
            s.spawn(move || {
                while !running.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                let mut mid = c.cut(|i| i == 1) * usize::from(!done.load(Ordering::Acquire));
                std::thread::sleep(Duration::from_millis(100));
                mid += c.cut(|_| true) * usize::from(!done.load(Ordering::Acquire));
                mid
            })
        });
        let mut m = sc.source_writes.map(|m| start_mutators(src.clone(), m, Some(maps.clone())));
        let cfg = SourceConfig {
            threads: 2,
            downtime_target: Duration::from_millis(1),
            zero_copy_send: sc.zero_copy_send,
            ..config(io)
        };
        let region = &src.regions()[0];
        let source = Source::new(src, vec![dial], src_auth)
            .streams(sc.streams)
            .config(cfg)
            .postcopy(sc.precopy_rounds)
            .tracker(Box::new(VmmBitmapTracker::new(maps.clone())))
            .free_pages(sc.free)
            .on_pause(|| {
                if let Some(m) = m.as_mut() {
                    m.stop();
                }
                for &p in &sc.late_writes {
                    region.write_u64(p * 4096 + 16, 0xfeed_f00d).map_err(|e| e.to_string())?;
                    maps[0].set(p);
                }
                Ok(())
            })
            .run();
        let dest = rx.join().unwrap();
        guest.join().unwrap();
        if let Some(c) = cuts {
            cut_mid_migration = c.join().unwrap();
        }
        (source.unwrap(), dest)
    });
    Outcome { source, dest, dst, log: log.into_inner().unwrap(), cut_mid_migration }
}

/// A TCP relay whose connections the test cuts: both of its sockets of a
/// connection are shut down at once, as a lost link looks to both ends.
struct Cutter {
    addr: std::net::SocketAddr,
    conns: Arc<Mutex<Vec<(TcpStream, TcpStream)>>>,
}

impl Cutter {
    fn new(to: std::net::SocketAddr) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<(TcpStream, TcpStream)>>> = Arc::default();
        let reg = conns.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { return };
                let Ok(up) = TcpStream::connect(to) else { return };
                reg.lock().unwrap().push((c.try_clone().unwrap(), up.try_clone().unwrap()));
                for (mut from, mut to) in [(c.try_clone().unwrap(), up.try_clone().unwrap()), (up, c)] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        Self { addr, conns }
    }

    /// Cuts the connections (numbered in the order they came) `which`
    /// selects and that are not cut yet; returns how many.
    fn cut(&self, which: impl Fn(usize) -> bool) -> usize {
        let conns = self.conns.lock().unwrap();
        let mut n = 0;
        for (i, (a, b)) in conns.iter().enumerate() {
            if which(i) && a.peer_addr().is_ok() {
                let _ = a.shutdown(std::net::Shutdown::Both);
                let _ = b.shutdown(std::net::Shutdown::Both);
                n += 1;
            }
        }
        n
    }
}

/// The destination equals the source, except the stamp word of each page
/// the destination's guest wrote, which holds its last stamp; pages in
/// `free` (and not in `sent_anyway`) are zero.
fn check(src: &GuestMemory, o: &Outcome, free: &[PageRange], sent_anyway: &[u64]) {
    assert!(o.log.wrong.is_empty(), "pages read before they held the source's content: {:?}", &o.log.wrong[..]);
    assert_eq!(o.source.digest, o.dest.digest);
    let (sr, dr) = (&src.regions()[0], &o.dst.regions()[0]);
    let is_free = |p: u64| free.iter().any(|r| r.start.0 <= p && p < r.end.0) && !sent_anyway.contains(&p);
    let (mut a, mut b) = (vec![0u8; 4096], vec![0u8; 4096]);
    for p in 0..sr.pages() {
        sr.read_pages(PageIdx(p), &mut a).unwrap();
        dr.read_pages(PageIdx(p), &mut b).unwrap();
        if is_free(p) {
            a.fill(0);
        }
        if let Some(stamp) = o.log.stamps.get(&p) {
            let w = STAMP_WORD as usize;
            assert_eq!(u64::from_le_bytes(b[w..w + 8].try_into().unwrap()), *stamp, "page {p}: the guest's write");
            a[w..w + 8].copy_from_slice(&stamp.to_le_bytes());
        }
        assert!(a == b, "page {p} differs");
    }
}

fn post_copy_of_a_gib_while_the_guest_runs_at_the_destination(io: BackendChoice) {
    let src = Arc::new(GuestMemory::anonymous(1 << 30).unwrap());
    fill(&src, ContentMix::TYPICAL, 11);
    let t = Instant::now();
    let o = migrate(io, &src, Scenario { streams: 4, ..Scenario::new(0) });
    check(&src, &o, &[], &[]);
    let p = o.dest.postcopy.as_ref().expect("post-copy figures");
    eprintln!("{}\n{}\n{:?} in {:?}", o.source, o.dest, p, t.elapsed());
    assert_eq!(o.source.mode, "post-copy");
    assert_eq!(p.needed_pages, (1 << 30) / 4096, "no pre-copy: every page came after the switchover");
    assert!(o.log.touched_early > 0, "the guest ran before the migration completed");
    assert!(p.faults > 0 && p.fault_latency.is_some(), "the guest faulted on missing pages: {p:?}");
    let sp = o.source.postcopy.as_ref().unwrap();
    assert!(sp.requested_pages > 0, "faults were answered on the priority stream: {sp:?}");
    assert_eq!(sp.pushed_pages, (1 << 30) / 4096, "the push covers every page");
}

fn hybrid_pre_copy_rounds_then_post_copy(io: BackendChoice) {
    let src = Arc::new(GuestMemory::anonymous(256 << 20).unwrap());
    fill(&src, ContentMix::TYPICAL, 12);
    let writes = MutatorConfig { threads: 1, rate: 64 << 20, working_set: 128 << 20, skew: Skew::Uniform };
    let o = migrate(io, &src, Scenario { source_writes: Some(writes), ..Scenario::new(2) });
    check(&src, &o, &[], &[]);
    eprintln!("{}\n{}", o.source, o.dest);
    assert_eq!(o.source.mode, "hybrid");
    let sp = o.source.postcopy.as_ref().unwrap();
    assert_eq!(sp.precopy_rounds, 2, "{}", o.source);
    assert_eq!(o.source.rounds.len(), 3, "two pre-copy rounds and the post-copy push: {}", o.source);
    let all = (256 << 20) / 4096;
    assert!(sp.needed_pages > 0 && sp.needed_pages < all, "only pages dirtied since round 1 are needed: {sp:?}");
    assert_eq!(o.dest.postcopy.as_ref().unwrap().needed_pages, sp.needed_pages);
}

fn free_pages_are_zero_in_post_copy_and_never_sent_unless_written(io: BackendChoice) {
    let src = Arc::new(GuestMemory::anonymous(64 << 20).unwrap());
    fill(&src, ContentMix { random: 100, text: 0, binary: 0 }, 13);
    let free = vec![PageRange { region: RegionIdx(0), start: PageIdx(1000), end: PageIdx(9000) }];
    let o = migrate(io, &src, Scenario { free: free.clone(), late_writes: vec![5000], ..Scenario::new(0) });
    check(&src, &o, &free, &[5000]);
    let sp = o.source.postcopy.as_ref().unwrap();
    assert_eq!(o.source.rounds[0].hinted_free, 8000, "{}", o.source);
    let all = (64 << 20) / 4096;
    assert_eq!(sp.needed_pages, all - 8000 + 1, "hinted pages never needed, but the one written after: {sp:?}");
    assert_eq!(sp.pushed_pages, all - 8000 + 1, "nor pushed: {sp:?}");
}

fn post_copy_survives_losing_one_stream_and_then_all(io: BackendChoice) {
    let src = Arc::new(GuestMemory::anonymous(512 << 20).unwrap());
    fill(&src, ContentMix { random: 60, text: 20, binary: 10 }, 14);
    let o = migrate(io, &src, Scenario { cut_links: true, zero_copy_send: true, ..Scenario::new(0) });
    check(&src, &o, &[], &[]);
    eprintln!("{}\n{}", o.source, o.dest);
    let (sp, dp) = (o.source.postcopy.as_ref().unwrap(), o.dest.postcopy.as_ref().unwrap());
    assert!(o.cut_mid_migration >= 2, "links were cut while pages were still coming: {}", o.cut_mid_migration);
    assert!(sp.reconnects >= 2 && dp.reconnects >= 2, "streams reconnected: {sp:?} {dp:?}");
}

/// The same over mutual TLS: every stream, and every one that comes back,
/// runs TLS, and the comebacks prove the session's secret from stream 0's
/// TLS exporter.
fn post_copy_over_tls_survives_losing_one_stream_and_then_all(io: BackendChoice) {
    use pmigrate_transport::tls::test_pki::{config as tls, pki_dir};
    let dir = pki_dir(&format!("postcopy-{io:?}"));
    let auth = |who: &str| pmigrate::Auth::Tls(Arc::new(tls(&dir, who)));
    let src = Arc::new(GuestMemory::anonymous(256 << 20).unwrap());
    fill(&src, ContentMix { random: 60, text: 20, binary: 10 }, 15);
    let o = migrate(io, &src, Scenario { cut_links: true, auth: Some((auth("a"), auth("b"))), ..Scenario::new(0) });
    check(&src, &o, &[], &[]);
    let (sp, dp) = (o.source.postcopy.as_ref().unwrap(), o.dest.postcopy.as_ref().unwrap());
    assert!(sp.reconnects >= 2 && dp.reconnects >= 2, "streams reconnected: {sp:?} {dp:?}");
    assert_eq!((o.source.io.as_str(), o.dest.io.as_str()), ("TLS, portable", "TLS, portable"));
    let _ = std::fs::remove_dir_all(dir);
}

/// How a post-copy session that fails around its switchover ends for
/// each side: which end holds the guest, and whether the source's hook
/// resumed it.
struct Ending {
    source: MigrateError,
    resumed_at_source: bool,
    dest: MigrateError,
    started_at_dest: bool,
}

/// Runs a post-copy migration of 16 MiB whose destination's resume hook
/// answers `resume`, with `cut` called from the source's pause hook (the
/// last moment before the switchover goes out) on the relay between the
/// ends.
fn ending(io: BackendChoice, resume: Result<(), String>, cut: impl Fn(&Cutter) + Send + Sync) -> Ending {
    let src = GuestMemory::anonymous(16 << 20).unwrap();
    fill(&src, ContentMix { random: 60, text: 20, binary: 10 }, 16);
    let dst = GuestMemory::anonymous(16 << 20).unwrap();
    let acceptor = Acceptor::bind(&["127.0.0.1:0".parse().unwrap()], crate::backends::key()).unwrap();
    let relay = Cutter::new(acceptor.local_addrs()[0]);
    let (started, resumed) = (AtomicBool::new(false), AtomicBool::new(false));
    let (source, dest) = std::thread::scope(|s| {
        let rx = s.spawn(|| {
            let incoming = Incoming::accept_for(&acceptor, &dst, None).unwrap();
            incoming.receive_and_run(&dst, &receive_options(io), || {
                started.store(resume.is_ok(), Ordering::SeqCst);
                Ok(resume.clone()?)
            })
        });
        let source = Source::new(&src, vec![relay.addr], crate::backends::key())
            .streams(3)
            .config(SourceConfig { threads: 2, ..config(io) })
            .postcopy(0)
            .on_pause(|| {
                cut(&relay);
                Ok(())
            })
            .on_abort(|| {
                resumed.store(true, Ordering::SeqCst);
                Ok(())
            })
            .run();
        (source, rx.join().unwrap())
    });
    Ending {
        source: source.expect_err("the session fails"),
        resumed_at_source: resumed.into_inner(),
        dest: dest.expect_err("the session fails"),
        started_at_dest: started.into_inner(),
    }
}

/// The destination's guest cannot start (its resume hook fails) after the
/// switchover went out: the destination says so, and the source, which
/// has not heard that the guest runs there, keeps it and resumes it.
fn a_guest_that_cannot_start_at_the_destination_stays_with_the_source(io: BackendChoice) {
    let e = ending(io, Err("no room for the vCPUs".into()), |_| {});
    assert!(!e.started_at_dest);
    assert!(matches!(&e.dest, MigrateError::Resume(_)), "{}", e.dest);
    assert!(e.source.source_keeps_guest() && e.resumed_at_source, "{}", e.source);
    assert!(e.source.to_string().contains("no room for the vCPUs"), "the destination's reason: {}", e.source);
}

/// A stream cut just before the switchover goes out: its marker never
/// reaches the destination, which gives up without starting the guest and
/// says so on the other streams; the source keeps the guest and resumes
/// it, although it had sent the switchover.
fn a_stream_lost_before_its_marker_leaves_the_guest_with_the_source(io: BackendChoice) {
    let e = ending(io, Ok(()), |relay| {
        assert_eq!(relay.cut(|i| i == 1), 1, "stream connection 1 was up");
    });
    assert!(!e.started_at_dest, "the destination's guest never started: {}", e.dest);
    assert!(e.source.source_keeps_guest() && e.resumed_at_source, "{}", e.source);
}

mod hostile {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use pmigrate::{Acceptor, GuestMemory, Incoming, MigrateError, ReceiveOptions, Source};
    use pmigrate_transport::frame::{FrameHdr, FrameKind, FLAG_FINAL};
    use pmigrate_transport::hello::{Hello, Mode, RegionDesc, CAP_POSTCOPY, PROTOCOL_VERSION};
    use pmigrate_transport::net::{write_frame, FrameReader};
    use pmigrate_transport::payload::build_control;
    use pmigrate_transport::session::{connect_session, new_session_id, StreamPlan};

    const MEM: u64 = 4 << 20;

    fn frame(h: FrameHdr, body: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        build_control(&mut f, h, body);
        f
    }

    #[test]
    fn a_switchover_naming_pages_outside_memory_fails_before_the_guest_starts() {
        let acceptor = Acceptor::bind(&["127.0.0.1:0".parse().unwrap()], crate::backends::key()).unwrap();
        let addr = acceptor.local_addrs()[0];
        let dst = GuestMemory::anonymous(MEM).unwrap();
        let started = AtomicBool::new(false);
        std::thread::scope(|s| {
            let rx = s.spawn(|| {
                let inc = Incoming::accept_for(&acceptor, &dst, Some(Instant::now() + Duration::from_secs(30)))?;
                inc.receive_and_run(&dst, &ReceiveOptions::default(), || {
                    started.store(true, Ordering::SeqCst);
                    Ok(())
                })
            });
            let hello = Hello {
                version: PROTOCOL_VERSION,
                mode: Mode::Memory,
                stream_index: 0,
                stream_count: 2,
                session: new_session_id(),
                caps: CAP_POSTCOPY,
                regions: vec![RegionDesc { gpa: pmigrate::Gpa(0), len: MEM, flags: 0 }],
                extensions: vec![],
            };
            let pmigrate_transport::Connected { streams, welcome, .. } =
                connect_session(&StreamPlan::new(vec![addr], 2, crate::backends::key()), &hello).unwrap();
            assert_ne!(welcome.caps & CAP_POSTCOPY, 0);
            // The bitmap runs 8 pages past the region's 1024.
            let mut h = FrameHdr::new(FrameKind::Switchover);
            h.first = 1020;
            h.count = 12;
            write_frame(&mut &streams[0], &frame(h, &[0xff, 0x0f]), "s0").unwrap();
            let err = rx.join().unwrap().expect_err("refused");
            assert!(matches!(&err, MigrateError::Protocol { .. }), "{err}");
            assert!(err.to_string().contains("outside region"), "{err}");
            assert!(!started.load(Ordering::SeqCst), "the guest never started on a bad switchover");
        });
    }

    #[test]
    fn a_page_request_outside_memory_is_refused_by_the_source() {
        let acceptor = Acceptor::bind(&["127.0.0.1:0".parse().unwrap()], crate::backends::key()).unwrap();
        let addr = acceptor.local_addrs()[0];
        let src = GuestMemory::anonymous(MEM).unwrap();
        std::thread::scope(|s| {
            // A destination that welcomes post-copy, waits for the switchover
            // and then asks for a region that does not exist.
            s.spawn(|| {
                let mut judge = |h: &Hello| Ok(h.caps);
                let acc = acceptor.accept_session(Mode::Memory, &mut judge, None).unwrap();
                let prio = acc.streams.len() - 1;
                let mut r = FrameReader::new(&acc.streams[0], "s0");
                loop {
                    let (h, _) = r.next_frame().unwrap().expect("frames until the switchover");
                    if h.kind == FrameKind::Switchover && h.flags & FLAG_FINAL != 0 {
                        break;
                    }
                }
                let mut q = FrameHdr::new(FrameKind::PageRequest);
                q.region = 7;
                q.count = 1;
                write_frame(&mut &acc.streams[prio], &frame(q, &[]), "prio").unwrap();
                std::thread::sleep(Duration::from_secs(2));
            });
            let cfg = pmigrate::SourceConfig { tracker: pmigrate::TrackerKind::Hash, ..Default::default() };
            let err = Source::new(&src, vec![addr], crate::backends::key())
                .config(cfg)
                .postcopy(0)
                .run()
                .expect_err("refused");
            assert!(err.to_string().contains("region 7"), "{err}");
        });
    }
}

over_each_backend!(
    post_copy_of_a_gib_while_the_guest_runs_at_the_destination,
    hybrid_pre_copy_rounds_then_post_copy,
    free_pages_are_zero_in_post_copy_and_never_sent_unless_written,
    post_copy_survives_losing_one_stream_and_then_all,
    post_copy_over_tls_survives_losing_one_stream_and_then_all,
    a_guest_that_cannot_start_at_the_destination_stays_with_the_source,
    a_stream_lost_before_its_marker_leaves_the_guest_with_the_source,
);
