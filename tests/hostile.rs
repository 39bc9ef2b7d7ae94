//! Hostile input at the destination and vanishing peers at either end.
//! Every case must end in a clear error within bounded time: no panic, no
//! write outside (or inside) guest memory from unverified bytes, no hang,
//! and a source that keeps running.

#[macro_use]
#[path = "support/backends.rs"]
mod backends;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use backends::{config, receive_options};
use pmigrate::BackendChoice;
use pmigrate::{
    Acceptor, Compression, GuestMemory, HashTracker, Incoming, MigrateError, ReceiveOptions, Report, Source,
    SourceConfig,
};
use pmigrate_bench::synth::{fill, first_difference, start_mutators, ContentMix, MutatorConfig, Skew};
use pmigrate_transport::frame::{Encoding, FrameHdr, FrameKind, FLAG_FINAL, HEADER_LEN, MAX_PAYLOAD};
use pmigrate_transport::hello::{ErrorCode, Hello, Mode, RegionDesc, CAP_LZ4, PROTOCOL_VERSION};
use pmigrate_transport::net::FrameReader;
use pmigrate_transport::payload::{build_control, build_pages, PagesAt, Scratch};
use pmigrate_transport::session::{connect_session, connect_stream, new_session_id, StreamPlan};
use pmigrate_transport::SessionKey;
use pmigrate_transport::{TransportError, WireError};
use xxhash_rust::xxh3::xxh3_64;

const MEM: u64 = 4 << 20;
const WAIT: Duration = Duration::from_secs(30);
const STALL: Duration = Duration::from_secs(3);

/// A destination over fresh memory, receiving in a thread.
struct Dest {
    addr: SocketAddr,
    mem: Arc<GuestMemory>,
    result: mpsc::Receiver<Result<Report, MigrateError>>,
}

fn destination(io: BackendChoice, size: u64) -> Dest {
    let acceptor = Acceptor::bind(&["127.0.0.1:0".parse().unwrap()], backends::key()).unwrap();
    let addr = acceptor.local_addrs()[0];
    let mem = Arc::new(GuestMemory::anonymous(size).unwrap());
    let (tx, result) = mpsc::channel();
    let m = mem.clone();
    std::thread::spawn(move || {
        let r = Incoming::accept_for(&acceptor, &m, Some(Instant::now() + WAIT))
            .and_then(|inc| inc.receive(&m, &ReceiveOptions { progress_timeout: STALL, ..receive_options(io) }));
        let _ = tx.send(r);
    });
    Dest { addr, mem, result }
}

impl Dest {
    fn outcome(&self) -> Result<Report, MigrateError> {
        self.result.recv_timeout(WAIT).expect("the destination ended within bounded time")
    }

    fn assert_untouched(&self) {
        let zero = GuestMemory::anonymous(self.mem.total_bytes()).unwrap();
        assert_eq!(first_difference(&self.mem, &zero), None, "no unverified byte reached guest memory");
    }
}

fn hello(size: u64, session: [u8; 16]) -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        mode: Mode::Memory,
        stream_index: 0,
        stream_count: 1,
        session,
        caps: CAP_LZ4,
        regions: vec![RegionDesc { gpa: pmigrate::Gpa(0), len: size, flags: 0 }],
        extensions: vec![],
    }
}

/// A hand-driven source: a real handshake, then whatever bytes we like.
fn fake_source(addr: SocketAddr, streams: u16) -> Vec<TcpStream> {
    let plan = StreamPlan::new(vec![addr], streams, backends::key());
    let streams = connect_session(&plan, &hello(MEM, new_session_id())).unwrap().streams;
    streams.into_iter().map(|c| c.into_tcp().expect("a plan without TLS gives TCP streams")).collect()
}

fn page_frame(first: u64, round: u64, fill_byte: u8) -> Vec<u8> {
    let pages = vec![fill_byte; 2 * 4096];
    let hashes: Vec<u64> = pages.chunks(4096).map(xxh3_64).collect();
    let mut f = Vec::new();
    build_pages(&mut f, &mut Scratch::default(), PagesAt { region: 0, first, round }, &pages, &hashes, false);
    f
}

fn control(kind: FrameKind, first: u64, aux: u64, flags: u16) -> Vec<u8> {
    let mut h = FrameHdr::new(kind);
    h.first = first;
    h.aux = aux;
    h.flags = flags;
    let mut f = Vec::new();
    build_control(&mut f, h, &[]);
    f
}

/// What the destination told the fake source before closing.
fn peer_error(s: &TcpStream) -> Option<ErrorCode> {
    s.set_read_timeout(Some(WAIT)).unwrap();
    match FrameReader::new(s, "fake").next_frame() {
        Err(TransportError::Peer(m)) => Some(m.code),
        _ => None,
    }
}

/// Sends `bytes` after a valid handshake and returns the destination's error.
fn rejected(io: BackendChoice, bytes: &[u8]) -> (MigrateError, Option<ErrorCode>, Dest) {
    let d = destination(io, MEM);
    let mut s = fake_source(d.addr, 1).remove(0);
    let _ = s.write_all(bytes);
    let err = d.outcome().expect_err("hostile input must fail the migration");
    let code = peer_error(&s);
    (err, code, d)
}

fn a_corrupted_page_is_refused_before_it_touches_memory(io: BackendChoice) {
    let mut f = page_frame(0, 0, 0xab);
    f[HEADER_LEN + 100] ^= 0x01;
    let (err, code, d) = rejected(io, &f);
    assert!(
        matches!(err, MigrateError::Transport(TransportError::Wire { source: WireError::Checksum { .. }, .. })),
        "{err}"
    );
    assert_eq!(code, Some(ErrorCode::Checksum), "the source is told why");
    d.assert_untouched();
}

fn a_flipped_page_address_is_caught_by_the_check(io: BackendChoice) {
    let mut f = page_frame(0, 0, 0xab);
    f[16] ^= 0x04; // first page 0 -> 4, a valid address: only the check tells
    let (err, _, d) = rejected(io, &f);
    assert!(matches!(err, MigrateError::Transport(TransportError::Wire { source: WireError::Checksum { .. }, .. })));
    d.assert_untouched();
}

fn a_page_beyond_the_region_is_refused(io: BackendChoice) {
    let pages = MEM / 4096;
    let (err, code, d) = rejected(io, &page_frame(pages - 1, 0, 0xcd));
    assert!(matches!(&err, MigrateError::Protocol { why, .. } if why.contains("outside region")), "{err}");
    assert_eq!(code, Some(ErrorCode::Protocol));
    d.assert_untouched();
    let (err, _, _) = rejected(io, &page_frame(u64::MAX / 2, 0, 0xcd));
    assert!(matches!(err, MigrateError::Protocol { .. }), "{err}");
    let mut f = page_frame(0, 0, 1);
    f[8] = 9; // region 9 does not exist; the check is recomputed so only the bounds check can tell
    let mut h = FrameHdr::decode(f[..HEADER_LEN].try_into().unwrap()).unwrap();
    let hashes: Vec<u8> = f[HEADER_LEN..].chunks(4096).flat_map(|p| xxh3_64(p).to_le_bytes()).collect();
    h.seal(&hashes);
    f[..HEADER_LEN].copy_from_slice(&h.encode());
    let (err, _, _) = rejected(io, &f);
    assert!(matches!(&err, MigrateError::Protocol { why, .. } if why.contains("region 9")), "{err}");
}

fn oversized_truncated_unknown_and_random_frames_are_refused(io: BackendChoice) {
    let mut h = FrameHdr::new(FrameKind::Data);
    h.encoding = Encoding::Raw;
    h.len = MAX_PAYLOAD + 1;
    h.count = MAX_PAYLOAD + 1;
    let (err, _, _) = rejected(io, &h.encode());
    assert!(matches!(err, MigrateError::Transport(TransportError::Wire { source: WireError::TooLong { .. }, .. })));

    // Half a frame, and the connection stays open: a stall, not a hang.
    let f = page_frame(0, 0, 7);
    let (err, _, d) = rejected(io, &f[..f.len() / 2]);
    assert!(
        matches!(&err, MigrateError::Transport(TransportError::Io { what, .. }) if what.contains("stalled")),
        "{err}"
    );
    d.assert_untouched();

    let mut unknown = control(FrameKind::RoundEnd, 0, 0, 0);
    unknown[0] = 0x42;
    let (err, _, _) = rejected(io, &unknown);
    assert!(matches!(err, MigrateError::Transport(TransportError::Wire { source: WireError::UnknownKind(0x42), .. })));

    let noise: Vec<u8> = (0..10_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let (err, _, d) = rejected(io, &noise);
    assert!(matches!(err, MigrateError::Transport(_)), "{err}");
    d.assert_untouched();
}

fn a_truncated_frame_then_close_is_an_error_not_a_hang(io: BackendChoice) {
    let d = destination(io, MEM);
    let mut s = fake_source(d.addr, 1).remove(0);
    let f = page_frame(0, 0, 7);
    s.write_all(&f[..f.len() - 10]).unwrap();
    drop(s);
    let err = d.outcome().expect_err("truncated");
    assert!(matches!(err, MigrateError::Transport(TransportError::Closed(_))), "{err}");
    d.assert_untouched();
}

fn a_lost_frame_or_a_frame_of_the_wrong_round_is_caught(io: BackendChoice) {
    // RoundEnd claims two frames; one arrived.
    let mut b = page_frame(0, 0, 1);
    b.extend(control(FrameKind::RoundEnd, 2, 0, 0));
    let (err, _, _) = rejected(io, &b);
    assert!(matches!(&err, MigrateError::Protocol { why, .. } if why.contains("ended after 2 frames")), "{err}");
    // A round-1 frame during round 0.
    let (err, _, _) = rejected(io, &page_frame(0, 1, 1));
    assert!(matches!(&err, MigrateError::Protocol { why, .. } if why.contains("round 1 during round 0")), "{err}");
    // Done before the final round ended.
    let (err, _, _) = rejected(io, &control(FrameKind::Done, 0, 0, 0));
    assert!(matches!(err, MigrateError::Transport(TransportError::Unexpected { kind: FrameKind::Done, .. })));
}

fn a_wrong_digest_is_refused(io: BackendChoice) {
    let d = destination(io, MEM);
    let mut s = fake_source(d.addr, 1).remove(0);
    let mut b = page_frame(4, 0, 3);
    b.extend(control(FrameKind::RoundEnd, 1, 0, FLAG_FINAL));
    b.extend(control(FrameKind::Done, 0, 0x1234, 0));
    s.write_all(&b).unwrap();
    let err = d.outcome().expect_err("digest");
    assert!(matches!(err, MigrateError::Digest { .. }), "{err}");
    assert_eq!(peer_error(&s), Some(ErrorCode::Digest));
}

fn connections_outside_the_session_are_refused_and_the_real_one_lands(io: BackendChoice) {
    let d = destination(io, MEM);
    // Noise, a silent connection, and a source with the wrong memory layout.
    let mut noise = TcpStream::connect(d.addr).unwrap();
    noise.write_all(&[0x55; 300]).unwrap();
    let _silent = TcpStream::connect(d.addr).unwrap();
    let wrong = connect_session(&StreamPlan::new(vec![d.addr], 1, backends::key()), &hello(MEM * 2, new_session_id()));
    assert!(
        matches!(&wrong, Err(TransportError::Peer(m)) if m.code == ErrorCode::Layout),
        "a layout mismatch is refused: {wrong:?}"
    );
    assert!(peer_error(&noise).is_some(), "noise gets an error frame");

    // A two-stream session: stream 0 arrives; a stream of another session
    // claiming index 1 is refused; the real stream 1 completes the session.
    let session = new_session_id();
    let plan = StreamPlan::new(vec![d.addr], 2, backends::key());
    let open = |index: u16, session: [u8; 16], key: Option<&SessionKey>| {
        let mut h = hello(MEM, session);
        h.stream_index = index;
        h.stream_count = 2;
        connect_stream(&plan, &h, key).map(|(c, _, k)| (c.into_tcp().expect("plain TCP"), k))
    };
    let (mut s0, key) = open(0, session, None).unwrap();
    let intruder = open(1, new_session_id(), Some(&key)).map(drop);
    assert!(matches!(&intruder, Err(TransportError::Peer(m)) if m.code == ErrorCode::NotInSession), "{intruder:?}");
    let dup = open(0, session, None).map(drop);
    assert!(matches!(&dup, Err(TransportError::Peer(m)) if m.code == ErrorCode::NotInSession), "{dup:?}");
    let (mut s1, _) = open(1, session, Some(&key)).unwrap();

    // One page over stream 1, then both streams end; the digest is the
    // destination's own table, which a real source would compute the same.
    let mut b1 = page_frame(8, 0, 9);
    b1.extend(control(FrameKind::RoundEnd, 1, 0, FLAG_FINAL));
    s1.write_all(&b1).unwrap();
    let pages = (MEM / 4096) as usize;
    let zero = xxh3_64(&[0u8; 4096]);
    let nine = xxh3_64(&[9u8; 4096]);
    let table: Vec<std::sync::atomic::AtomicU64> =
        (0..pages).map(|p| std::sync::atomic::AtomicU64::new(if p == 8 || p == 9 { nine } else { zero })).collect();
    let digest = pmigrate::memory_digest(&[table.into_boxed_slice()]);
    let mut b0 = control(FrameKind::RoundEnd, 0, 0, FLAG_FINAL);
    b0.extend(control(FrameKind::Done, 0, digest, 0));
    s0.write_all(&b0).unwrap();
    let report = d.outcome().expect("the real session completes");
    assert_eq!(report.digest, format!("{digest:016x}"));
    assert_eq!(d.mem.regions()[0].read_u64(8 * 4096).unwrap(), 0x0909_0909_0909_0909);
}

fn a_source_that_vanishes_mid_round_fails_the_destination_cleanly(io: BackendChoice) {
    let d = destination(io, MEM);
    let mut streams = fake_source(d.addr, 2);
    streams[1].write_all(&page_frame(0, 0, 5)).unwrap();
    drop(streams);
    let err = d.outcome().expect_err("vanished source");
    assert!(matches!(err, MigrateError::Transport(TransportError::Closed(_))), "{err}");
}

fn a_destination_that_vanishes_mid_round_leaves_the_source_running(io: BackendChoice) {
    let src = Arc::new(GuestMemory::anonymous(64 << 20).unwrap());
    fill(&src, ContentMix::RANDOM, 5);
    let before = GuestMemory::anonymous(64 << 20).unwrap();
    for (r, b) in src.regions().iter().zip(before.regions()) {
        let mut buf = vec![0u8; r.len() as usize];
        r.read_pages(pmigrate::PageIdx(0), &mut buf).unwrap();
        b.write_pages(pmigrate::PageIdx(0), &buf).unwrap();
    }
    // A destination that takes the session, reads a little, and dies.
    let acceptor = Acceptor::bind(&["127.0.0.1:0".parse().unwrap()], backends::key()).unwrap();
    let addr = acceptor.local_addrs()[0];
    let killer = std::thread::spawn(move || {
        let acc = acceptor.accept_session(Mode::Memory, &mut |_| Ok(0), None).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut s = &acc.streams[0];
        s.read_exact(&mut buf).unwrap();
        // Dropping `acc` closes every stream.
    });
    let t = Instant::now();
    let (err, paused) = failing_source(io, &src, addr, 3, 4);
    killer.join().unwrap();
    assert!(t.elapsed() < WAIT, "failed within bounded time");
    assert!(!paused, "the guest was never paused: it keeps running at the source");
    assert!(matches!(err, MigrateError::Transport(_) | MigrateError::Aborted), "{err}");
    assert_eq!(first_difference(&src, &before), None, "source memory unchanged");
}

/// Runs a source (no compression, hash tracker) that must fail; returns
/// its error and whether the pause hook ran. A paused guest must have been
/// resumed (the abort hook) when the source keeps it.
fn failing_source(
    io: BackendChoice,
    src: &GuestMemory,
    to: SocketAddr,
    streams: u16,
    threads: usize,
) -> (MigrateError, bool) {
    let (paused, resumed) = (AtomicBool::new(false), AtomicBool::new(false));
    let cfg = SourceConfig { compression: Compression::Off, threads, ..config(io) };
    let err = Source::new(src, vec![to], backends::key())
        .streams(streams)
        .config(cfg)
        .tracker(Box::new(HashTracker::new()))
        .on_pause(|| {
            paused.store(true, Ordering::SeqCst);
            Ok(())
        })
        .on_abort(|| {
            resumed.store(true, Ordering::SeqCst);
            Ok(())
        })
        .run()
        .expect_err("the migration must fail");
    let paused = paused.load(Ordering::SeqCst);
    if err.source_keeps_guest() {
        assert_eq!(paused, resumed.load(Ordering::SeqCst), "a guest paused and kept is resumed: {err}");
    }
    (err, paused)
}

/// Forwards connections to `to`, flipping one byte of the first
/// connection's source-to-destination direction at offset `at`.
fn corrupting_proxy(to: SocketAddr, at: u64) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for (n, c) in l.incoming().enumerate() {
            let Ok(c) = c else { return };
            let up = TcpStream::connect(to).unwrap();
            let (mut c2, mut up2) = (c.try_clone().unwrap(), up.try_clone().unwrap());
            std::thread::spawn(move || {
                let (mut c, mut up) = (c, up);
                let mut buf = vec![0u8; 64 << 10];
                let mut pos = 0u64;
                while let Ok(k) = c.read(&mut buf) {
                    if k == 0 {
                        break;
                    }
                    if n == 0 && pos <= at && at < pos + k as u64 {
                        buf[(at - pos) as usize] ^= 0x10;
                    }
                    pos += k as u64;
                    if up.write_all(&buf[..k]).is_err() {
                        break;
                    }
                }
                let _ = up.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut up2, &mut c2);
                let _ = c2.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

fn a_stream_corrupted_in_flight_fails_both_ends_and_the_source_keeps_running(io: BackendChoice) {
    let src = Arc::new(GuestMemory::anonymous(32 << 20).unwrap());
    fill(&src, ContentMix::RANDOM, 6);
    let d = destination(io, 32 << 20);
    let proxy = corrupting_proxy(d.addr, 3 << 20);
    let m = MutatorConfig { threads: 1, rate: 8 << 20, working_set: 16 << 20, skew: Skew::Uniform };
    let mut muts = start_mutators(src.clone(), m, None);
    // The source may have reached its pause before the destination's
    // refusal arrived; then it must have resumed the guest.
    let (err, paused) = failing_source(io, &src, proxy, 2, 2);
    assert!(err.source_keeps_guest(), "{err}");
    let _ = paused;
    let dest_err = d.outcome().expect_err("the destination refuses corrupted bytes");
    assert!(matches!(&dest_err, MigrateError::Transport(TransportError::Wire { .. })), "destination: {dest_err}");
    assert!(
        matches!(&err, MigrateError::Transport(TransportError::Peer(m)) if m.code == ErrorCode::Checksum || m.code == ErrorCode::Protocol),
        "the source learns why: {err}"
    );
    let w = muts.writes.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(100));
    assert!(muts.writes.load(Ordering::Relaxed) > w, "the guest is still running at the source");
    muts.stop();
}

over_each_backend!(
    a_corrupted_page_is_refused_before_it_touches_memory,
    a_flipped_page_address_is_caught_by_the_check,
    a_page_beyond_the_region_is_refused,
    oversized_truncated_unknown_and_random_frames_are_refused,
    a_truncated_frame_then_close_is_an_error_not_a_hang,
    a_lost_frame_or_a_frame_of_the_wrong_round_is_caught,
    a_wrong_digest_is_refused,
    connections_outside_the_session_are_refused_and_the_real_one_lands,
    a_source_that_vanishes_mid_round_fails_the_destination_cleanly,
    a_destination_that_vanishes_mid_round_leaves_the_source_running,
    a_stream_corrupted_in_flight_fails_both_ends_and_the_source_keeps_running,
);
