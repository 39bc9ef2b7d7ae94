//! Hostile peers against the library's servers, one test per attack, each
//! asserting its outcome: nothing written for a peer that did not prove
//! itself, the server still serving, and the real session landing next.
//! Every case runs over each I/O backend.
//!
//! The attacker may know everything that crosses the wire in clear without
//! TLS (session ids), and in some cases holds the key (a misbehaving or
//! compromised peer), but never the secret of another's session.

#[macro_use]
#[path = "support/backends.rs"]
mod backends;
#[path = "support/paced.rs"]
mod paced;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use backends::{config, key, receive_options};
use pmigrate::relay::{self, Local, Output, RelayRecvOptions, RelaySendConfig};
use pmigrate::{Acceptor, Auth, BackendChoice, GuestMemory, HashTracker, Incoming, MigrateError, Psk, Report, Source};
use pmigrate_bench::synth::{fill, first_difference, ContentMix};
use pmigrate_transport::auth::{Challenge, Confirm, Method, Offer, Proof, Purpose, Transcript};
use pmigrate_transport::frame::{FrameHdr, FrameKind};
use pmigrate_transport::hello::{ErrorCode, Hello, Mode, RegionDesc, CAP_LZ4, PROTOCOL_VERSION};
use pmigrate_transport::net::FrameReader;
use pmigrate_transport::payload::build_control;
use pmigrate_transport::session::{new_session_id, StreamPlan};
use pmigrate_transport::tls::test_pki::{config as tls_config, pki_dir};
use pmigrate_transport::{SessionKey, TransportError};

const MEM: u64 = 16 << 20;
const WAIT: Duration = Duration::from_secs(60);

fn other_key() -> Auth {
    Auth::Psk(Psk::from_bytes(b"not the key the destination holds").unwrap())
}

/// Resident memory of this process, bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    statm.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 4096
}

/// A destination serving as `pmigrate serve` does, in a thread: sessions
/// into fresh memory until one lands; a session that fails before writing
/// anything (an authenticated peer that vanished at once) is logged and the
/// next one served.
struct Dest {
    addr: SocketAddr,
    mem: Arc<GuestMemory>,
    result: mpsc::Receiver<Result<Report, MigrateError>>,
}

fn destination(io: BackendChoice, auth: Auth, tune: impl FnOnce(&mut Acceptor)) -> Dest {
    let mut acceptor = Acceptor::bind(&["127.0.0.1:0".parse().unwrap()], auth).unwrap();
    tune(&mut acceptor);
    let addr = acceptor.local_addrs()[0];
    let mem = Arc::new(GuestMemory::anonymous(MEM).unwrap());
    let (tx, result) = mpsc::channel();
    let m = mem.clone();
    std::thread::spawn(move || {
        let zero = GuestMemory::anonymous(MEM).unwrap();
        loop {
            let r = Incoming::accept_for(&acceptor, &m, Some(Instant::now() + WAIT))
                .and_then(|inc| inc.receive(&m, &receive_options(io)));
            match r {
                Err(e)
                    if !matches!(e, MigrateError::Transport(TransportError::Setup(_)))
                        && first_difference(&m, &zero).is_none() =>
                {
                    eprintln!("destination: a session failed before writing anything ({e}); serving the next");
                }
                r => {
                    let _ = tx.send(r);
                    return;
                }
            }
        }
    });
    Dest { addr, mem, result }
}

impl Dest {
    fn outcome(&self) -> Result<Report, MigrateError> {
        self.result.recv_timeout(WAIT).expect("the destination ended within bounded time")
    }

    fn assert_nothing_written(&self) {
        let zero = GuestMemory::anonymous(MEM).unwrap();
        assert_eq!(first_difference(&self.mem, &zero), None, "nothing was written for a stranger");
    }

    /// Whether the destination is still waiting (has not ended).
    fn still_serving(&self) -> bool {
        matches!(self.result.try_recv(), Err(mpsc::TryRecvError::Empty))
    }
}

fn guest() -> Arc<GuestMemory> {
    let m = Arc::new(GuestMemory::anonymous(MEM).unwrap());
    fill(&m, ContentMix::TYPICAL, 9);
    m
}

fn migrate(io: BackendChoice, src: &GuestMemory, to: SocketAddr, auth: Auth) -> Result<Report, MigrateError> {
    Source::new(src, vec![to], auth).streams(2).config(config(io)).tracker(Box::new(HashTracker::new())).run()
}

/// The real session lands whole after whatever came before.
fn real_session_lands(io: BackendChoice, d: &Dest) {
    let src = guest();
    let report = migrate(io, &src, d.addr, key()).expect("the real source migrates");
    let dest = d.outcome().expect("the real session completes");
    assert_eq!(report.digest, dest.digest);
    assert_eq!(first_difference(&src, &d.mem), None);
}

fn a_stranger_without_the_key_writes_nothing_and_the_real_session_lands(io: BackendChoice) {
    let d = destination(io, key(), |_| {});
    let src = guest();
    let err = migrate(io, &src, d.addr, other_key()).expect_err("a stranger got in");
    assert!(err.to_string().contains("did not prove the key"), "{err}");
    let err = migrate(io, &src, d.addr, Auth::Insecure).expect_err("a peer without authentication got in");
    assert!(err.to_string().contains("pre-shared key"), "it is told what this end requires: {err}");
    // A peer of the old protocol, straight to a Hello.
    let mut v1 = TcpStream::connect(d.addr).unwrap();
    let h = hello(MEM, 1);
    v1.write_all(&frame(FrameKind::Hello, &h.encode())).unwrap();
    assert_eq!(refusal(&v1), Some(ErrorCode::Protocol));
    assert!(d.still_serving());
    d.assert_nothing_written();
    real_session_lands(io, &d);
}

fn an_untrusted_certificate_is_refused_and_a_tls_memory_migration_lands(io: BackendChoice) {
    let dir = pki_dir(&format!("attacks-{io:?}"));
    let tls = |who: &str| Auth::Tls(Arc::new(tls_config(&dir, who)));
    let d = destination(io, tls("b"), |_| {});
    let src = guest();
    let err = migrate(io, &src, d.addr, tls("other")).expect_err("a stranger's certificate got in");
    assert!(err.to_string().contains("TLS handshake"), "{err}");
    assert!(migrate(io, &src, d.addr, key()).is_err(), "a peer without TLS got in");
    d.assert_nothing_written();
    let report = migrate(io, &src, d.addr, tls("a")).expect("the TLS source migrates");
    let dest = d.outcome().expect("the TLS session completes");
    assert_eq!(report.digest, dest.digest);
    assert_eq!((report.io.as_str(), dest.io.as_str()), ("TLS, portable", "TLS, portable"));
    assert_eq!(first_difference(&src, &d.mem), None);
    let _ = std::fs::remove_dir_all(dir);
}

/// An output that keeps what it gets.
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Output for Sink {
    fn finish(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn a_strangers_byte_stream_reaches_no_output(io: BackendChoice) {
    let acceptor = Acceptor::bind(&["127.0.0.1:0".parse().unwrap()], key()).unwrap();
    let addr = acceptor.local_addrs()[0];
    let sink = Sink::default();
    let out = sink.clone();
    let opts = RelayRecvOptions { backend: io, accept_deadline: Some(Instant::now() + WAIT), ..Default::default() };
    let rx = std::thread::spawn(move || {
        relay::receive(&acceptor, Local { input: None, output: Some(Box::new(out)), abort: Box::new(|| {}) }, &opts)
    });
    let send = |auth: Auth, bytes: &[u8]| {
        let mut cfg = RelaySendConfig::new(StreamPlan::new(vec![addr], 2, auth));
        cfg.backend = io;
        cfg.duplex = false;
        let input = std::io::Cursor::new(bytes.to_vec());
        relay::send(Local { input: Some(Box::new(input)), output: None, abort: Box::new(|| {}) }, &cfg)
    };
    let err = send(other_key(), b"a stranger's migration stream").expect_err("a stranger got in");
    assert!(err.to_string().contains("did not prove the key"), "{err}");
    assert!(sink.0.lock().unwrap().is_empty(), "not one byte of the stranger's reached the output");
    let real: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 253) as u8).collect();
    send(key(), &real).expect("the real sender");
    rx.join().unwrap().expect("the real session");
    assert!(*sink.0.lock().unwrap() == real, "the output is exactly the real stream");
}

fn frame(kind: FrameKind, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    build_control(&mut f, FrameHdr::new(kind), payload);
    f
}

fn hello(size: u64, streams: u16) -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        mode: Mode::Memory,
        stream_index: 0,
        stream_count: streams,
        session: new_session_id(),
        caps: CAP_LZ4,
        regions: vec![RegionDesc { gpa: pmigrate::Gpa(0), len: size, flags: 0 }],
        extensions: vec![],
    }
}

/// The code of the `Error` frame the server sent before closing, if any.
fn refusal(s: &TcpStream) -> Option<ErrorCode> {
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut r = FrameReader::unbuffered(s, "attacker");
    loop {
        match r.next_frame() {
            Err(TransportError::Peer(m)) => return Some(m.code),
            Ok(Some(_)) => continue,
            _ => return None,
        }
    }
}

/// A hand-driven source that holds the key: connects, passes the
/// authentication exchange as the protocol says, and leaves the
/// connection ready for whatever the attack sends next.
fn authenticated(addr: SocketAddr, auth: &Auth, purpose: Purpose, h: &Hello, index: u16) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let offer = Offer {
        method: Method::Psk,
        purpose,
        mode: h.mode,
        stream_index: index,
        stream_count: h.stream_count,
        session: h.session,
        nonce: [0x42; 32],
    };
    s.write_all(&frame(FrameKind::Auth, &offer.encode())).unwrap();
    let challenge = {
        // Unbuffered: what follows belongs to the attack's next read.
        let mut r = FrameReader::unbuffered(&s, "attacker");
        let (hdr, p) = r.expect(FrameKind::Auth).unwrap();
        hdr.verify(p).unwrap();
        Challenge::decode(p).unwrap()
    };
    let t = Transcript { offer: offer.encode(), challenge: challenge.encode() };
    let proof = Proof { connection: t.source_proof(auth), stream: [0; 32] };
    s.write_all(&frame(FrameKind::Auth, &proof.encode())).unwrap();
    let mut r = FrameReader::unbuffered(&s, "attacker");
    let (hdr, p) = r.expect(FrameKind::Auth).unwrap();
    hdr.verify(p).unwrap();
    assert!(t.dest_proof_ok(auth, &Confirm::decode(p).unwrap().proof), "the destination proved the key");
    s
}

fn hello_then_reset_and_malformed_hellos_leave_the_server_waiting(io: BackendChoice) {
    let d = destination(io, key(), |_| {});
    // A Hello, then a reset before the Welcome can go out.
    let h = hello(MEM, 1);
    let s = authenticated(d.addr, &key(), Purpose::Join, &h, 0);
    (&s).write_all(&frame(FrameKind::Hello, &h.encode())).unwrap();
    pmigrate_transport::net::reset_on_close(&s);
    drop(s);
    // Two regions where this destination has one.
    let mut two = hello(MEM / 2, 1);
    two.regions.push(RegionDesc { gpa: pmigrate::Gpa(1 << 30), len: MEM / 2, flags: 0 });
    let s = authenticated(d.addr, &key(), Purpose::Join, &two, 0);
    (&s).write_all(&frame(FrameKind::Hello, &two.encode())).unwrap();
    assert_eq!(refusal(&s), Some(ErrorCode::Layout));
    // A Hello that is not one, and one that disagrees with its offer.
    let h = hello(MEM, 1);
    let s = authenticated(d.addr, &key(), Purpose::Join, &h, 0);
    (&s).write_all(&frame(FrameKind::Hello, b"PMIGRATE but then nonsense")).unwrap();
    assert_eq!(refusal(&s), Some(ErrorCode::Protocol));
    let s = authenticated(d.addr, &key(), Purpose::Join, &h, 0);
    (&s).write_all(&frame(FrameKind::Hello, &hello(MEM, 1).encode())).unwrap();
    assert_eq!(refusal(&s), Some(ErrorCode::Protocol), "another session's id than the offer's");
    // A comeback to a session that does not run.
    let s = authenticated(d.addr, &key(), Purpose::Resume, &h, 0);
    assert_eq!(refusal(&s), Some(ErrorCode::NotInSession));
    assert!(d.still_serving());
    d.assert_nothing_written();
    real_session_lands(io, &d);
}

fn a_one_stream_claim_times_out_and_the_real_session_lands(io: BackendChoice) {
    let d = destination(io, key(), |a| a.gather_timeout = Duration::from_secs(3));
    // Stream 0 of two, and nothing more.
    let h = hello(MEM, 2);
    let mut plan = StreamPlan::new(vec![d.addr], 2, key());
    plan.connect_timeout = Duration::from_secs(10);
    let (claim, _, _) = pmigrate_transport::session::connect_stream(&plan, &h, None).unwrap();
    let claimed = Instant::now();
    // While it is claimed, another session is refused...
    let err = migrate(io, &guest(), d.addr, key()).expect_err("refused while another session gathers");
    assert!(matches!(&err, MigrateError::Transport(TransportError::Peer(m)) if m.code == ErrorCode::NotInSession));
    // ...and once the claim timed out, the real one lands.
    let tcp = claim.into_tcp().unwrap();
    assert_eq!(refusal(&tcp), Some(ErrorCode::Aborted), "the claim is told it timed out");
    assert!(claimed.elapsed() >= Duration::from_secs(3) && claimed.elapsed() < Duration::from_secs(20));
    real_session_lands(io, &d);
}

fn slow_strangers_cannot_hold_the_door(io: BackendChoice) {
    let d = destination(io, key(), |a| a.handshake_timeout = Duration::from_secs(5));
    // 80 strangers dripping a byte a second, each coming back when cut.
    let stop = Arc::new(AtomicBool::new(false));
    let cut = Arc::new(AtomicUsize::new(0));
    let strangers: Vec<_> = (0..80)
        .map(|_| {
            let (stop, cut, addr) = (stop.clone(), cut.clone(), d.addr);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut s) = TcpStream::connect(addr) else { continue };
                    while !stop.load(Ordering::Relaxed) && s.write_all(&[0x01]).is_ok() {
                        std::thread::sleep(Duration::from_millis(1000));
                    }
                    cut.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    real_session_lands(io, &d);
    assert!(t.elapsed() < Duration::from_secs(30), "the real session waited {:?}", t.elapsed());
    stop.store(true, Ordering::Relaxed);
    for s in strangers {
        s.join().unwrap();
    }
    assert!(cut.load(Ordering::Relaxed) >= 16, "strangers beyond the table were cut");
}

fn a_huge_claim_allocates_nothing(io: BackendChoice) {
    let d = destination(io, key(), |_| {});
    let before = rss();
    // From a stranger: refused at its first frame.
    let mut s = TcpStream::connect(d.addr).unwrap();
    s.write_all(&frame(FrameKind::Hello, &hello(256 << 30, 1).encode())).unwrap();
    assert_eq!(refusal(&s), Some(ErrorCode::Protocol));
    // From a peer with the key: refused by the embedder's layout check.
    let h = hello(256 << 30, 1);
    let s = authenticated(d.addr, &key(), Purpose::Join, &h, 0);
    (&s).write_all(&frame(FrameKind::Hello, &h.encode())).unwrap();
    assert_eq!(refusal(&s), Some(ErrorCode::Layout));
    let grew = rss().saturating_sub(before);
    assert!(grew < 32 << 20, "a 256 GiB claim grew this process by {grew} bytes");
    real_session_lands(io, &d);
}

/// A key holder who knows a running post-copy session's id — it crosses
/// in clear without TLS; here the destination tells it — tries to take
/// over one of its streams.
fn a_resume_with_a_sniffed_session_id_is_refused(io: BackendChoice) {
    if let Err(why) = pmigrate::probe_postcopy() {
        eprintln!("skipping: no post-copy here: {why}");
        return;
    }
    let acceptor = Acceptor::bind(&["127.0.0.1:0".parse().unwrap()], key()).unwrap();
    let addr = acceptor.local_addrs()[0];
    // The source reaches the destination through a slow link, so post-copy
    // is surely running when the attack comes; the link shows the bytes.
    let link = paced::Paced::start(addr, 16 << 20);
    let sniffed = Arc::new(Mutex::new(None::<[u8; 16]>));
    let src = guest();
    let dst = GuestMemory::anonymous(MEM).unwrap();
    let attack: Mutex<Option<std::thread::JoinHandle<TransportError>>> = Mutex::new(None);
    let (report, dest) = std::thread::scope(|s| {
        let rx = s.spawn(|| {
            let inc = Incoming::accept_for(&acceptor, &dst, Some(Instant::now() + WAIT)).unwrap();
            *sniffed.lock().unwrap() = Some(inc.session_id());
            inc.receive_and_run(&dst, &receive_options(io), || {
                // The guest runs here: strike now.
                let id = sniffed.lock().unwrap().expect("the session id was seen");
                *attack.lock().unwrap() = Some(std::thread::spawn(move || {
                    let mut h = hello(MEM, 3);
                    h.session = id;
                    let plan = StreamPlan::new(vec![addr], 3, key());
                    let forged = SessionKey::derive(&key(), &Transcript { offer: [7; 72], challenge: [7; 40] }, None);
                    let never = || false;
                    pmigrate_transport::link::reconnect(&plan, &h, &forged, 1, Duration::from_secs(10), &never)
                        .expect_err("a stream was taken over")
                }));
                Ok(())
            })
        });
        let cfg = pmigrate::SourceConfig { tracker: pmigrate::TrackerKind::Hash, ..config(io) };
        let report = Source::new(&src, vec![link.addr], key()).streams(2).config(cfg).postcopy(0).run();
        (report, rx.join().unwrap())
    });
    let err = attack.lock().unwrap().take().expect("the attack ran").join().unwrap();
    assert!(err.to_string().contains("did not prove the session's secret"), "{err}");
    let (report, dest) = (report.expect("the real source"), dest.expect("the real destination"));
    assert_eq!(report.digest, dest.digest);
    assert_eq!(dest.postcopy.as_ref().map(|p| p.reconnects), Some(0), "no stream was displaced");
    assert_eq!(first_difference(&src, &dst), None);
}

/// A destination that takes the session and then stops reading (a stopped
/// process looks the same to TCP): the source fails within its progress
/// timeout, its guest never paused and its memory as it was.
fn a_destination_that_stops_reading_fails_the_source_within_its_deadline(io: BackendChoice) {
    let acceptor = Acceptor::bind(&["127.0.0.1:0".parse().unwrap()], key()).unwrap();
    let addr = acceptor.local_addrs()[0];
    let held = Arc::new(Mutex::new(None));
    let h2 = held.clone();
    std::thread::spawn(move || {
        let acc = acceptor.accept_session(Mode::Memory, &mut |h| Ok(h.caps & CAP_LZ4), None).unwrap();
        *h2.lock().unwrap() = Some(acc); // held open, never read
    });
    let src = Arc::new(GuestMemory::anonymous(64 << 20).unwrap());
    fill(&src, ContentMix::RANDOM, 3);
    let before = GuestMemory::anonymous(64 << 20).unwrap();
    {
        let mut buf = vec![0u8; 64 << 20];
        src.regions()[0].read_pages(pmigrate::PageIdx(0), &mut buf).unwrap();
        before.regions()[0].write_pages(pmigrate::PageIdx(0), &buf).unwrap();
    }
    let paused = AtomicBool::new(false);
    let cfg = pmigrate::SourceConfig {
        progress_timeout: Duration::from_secs(3),
        compression: pmigrate::Compression::Off,
        ..config(io)
    };
    let t = Instant::now();
    let err = Source::new(&src, vec![addr], key())
        .streams(2)
        .config(cfg)
        .tracker(Box::new(HashTracker::new()))
        .on_pause(|| {
            paused.store(true, Ordering::SeqCst);
            Ok(())
        })
        .run()
        .expect_err("a destination that reads nothing cannot take a migration");
    assert!(t.elapsed() < Duration::from_secs(20), "failed after {:?}", t.elapsed());
    assert!(!paused.load(Ordering::SeqCst), "the guest never stopped");
    assert!(err.source_keeps_guest(), "{err}");
    assert_eq!(first_difference(&src, &before), None, "source memory as it was");
    drop(held);
}

/// A peer with the key names a file of the destination's host the way
/// protocol 1 let it (`EXT_SHARED_PATHS`, type 1) and probes it: the
/// destination never opens it, answers from the memory it was given, and
/// the file's content and mtime stay as they were.
fn a_peer_named_path_is_never_opened(io: BackendChoice) {
    use pmigrate_transport::frame::FLAG_PROBE_HASH;
    use pmigrate_transport::hello::{encode_shared_regions, CAP_SHARED, EXT_SHARED_REGIONS};
    let dir = std::env::temp_dir().join(format!("pm-attack-path-{}-{io:?}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let victim = dir.join("victim");
    std::fs::write(&victim, vec![0x5au8; MEM as usize]).unwrap();
    let mtime = std::fs::metadata(&victim).unwrap().modified().unwrap();
    // The destination's own memory: a shared file mapping, so it grants
    // handover (and must prove it through this mapping only).
    let own = dir.join("own.mem");
    let region = pmigrate::GuestRegion::file(pmigrate::Gpa(0), MEM, pmigrate::HostPageSize::Small, &own, true, true);
    let mem = GuestMemory::new(vec![region.unwrap()]).unwrap();
    let acceptor = Acceptor::bind(&["127.0.0.1:0".parse().unwrap()], key()).unwrap();
    let addr = acceptor.local_addrs()[0];
    let result = std::thread::scope(|sc| {
        let rx = sc.spawn(|| {
            let inc = Incoming::accept_for(&acceptor, &mem, Some(Instant::now() + WAIT))?;
            inc.receive(&mem, &receive_options(io))
        });
        let mut h = hello(MEM, 1);
        h.caps |= CAP_SHARED;
        let mut v1_paths = 0u32.to_le_bytes().to_vec();
        let p = victim.to_string_lossy().into_owned();
        v1_paths.extend_from_slice(&(p.len() as u16).to_le_bytes());
        v1_paths.extend_from_slice(p.as_bytes());
        h.extensions = vec![(1, v1_paths), (EXT_SHARED_REGIONS, encode_shared_regions(&[0]))];
        let s = authenticated(addr, &key(), Purpose::Join, &h, 0);
        (&s).write_all(&frame(FrameKind::Hello, &h.encode())).unwrap();
        let mut r = FrameReader::unbuffered(&s, "attacker");
        let (wh, wp) = r.expect(FrameKind::Welcome).unwrap();
        wh.verify(wp).unwrap();
        let mut probe = FrameHdr::new(FrameKind::Probe);
        probe.flags = FLAG_PROBE_HASH;
        let pages: Vec<u8> = [0u64, 1, 2, 3].iter().flat_map(|p| p.to_le_bytes()).collect();
        let mut f = Vec::new();
        build_control(&mut f, probe, &pages);
        (&s).write_all(&f).unwrap();
        let (ah, answer) = r.expect(FrameKind::ProbeReply).unwrap();
        ah.verify(answer).unwrap();
        let zero = pmigrate_transport::payload::zero_page_hash().to_le_bytes();
        assert!(answer.chunks(8).all(|c| c == zero), "the answer is the destination's own (zero) memory");
        drop(s);
        rx.join().unwrap()
    });
    assert!(result.is_err(), "the attacker's session did not complete");
    assert!(std::fs::read(&victim).unwrap().iter().all(|&b| b == 0x5a), "the victim's content is as it was");
    assert_eq!(std::fs::metadata(&victim).unwrap().modified().unwrap(), mtime, "the victim was not written");
    let _ = std::fs::remove_dir_all(dir);
}

over_each_backend!(
    a_stranger_without_the_key_writes_nothing_and_the_real_session_lands,
    an_untrusted_certificate_is_refused_and_a_tls_memory_migration_lands,
    a_strangers_byte_stream_reaches_no_output,
    hello_then_reset_and_malformed_hellos_leave_the_server_waiting,
    a_one_stream_claim_times_out_and_the_real_session_lands,
    slow_strangers_cannot_hold_the_door,
    a_huge_claim_allocates_nothing,
    a_resume_with_a_sniffed_session_id_is_refused,
    a_destination_that_stops_reading_fails_the_source_within_its_deadline,
    a_peer_named_path_is_never_opened,
);
