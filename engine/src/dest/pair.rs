//! The pair harness: the source's rules and the destination's rules (and
//! its real placement into real guest memory) talking over an in-memory
//! network that can drop, duplicate, reorder, corrupt and cut messages —
//! with no sockets, threads or clocks, so every schedule is reproducible
//! from its seed.
//!
//! The source model sends a pre-copy migration the way `crate::source`
//! does: every page in round 0, then the pages it dirtied, each round's
//! frames spread over the streams (a page often travels on another stream
//! than its previous copy, so the destination sees copies out of order),
//! each stream's rounds closed by its [`RoundCounter`], the digest of what
//! it sent in `Done` on stream 0. The destination runs [`DestSession`] and
//! [`Placer`] exactly as its driver does; its verdict goes back through
//! the source's own rules ([`heard`], [`settle`]).
//!
//! A connection may also break and come back (`CAP_RESUME`): the
//! destination's count of the frames it took goes to the source's rules
//! ([`heard`]) and record ([`SentLog`]), and the source sends again what
//! followed the count, page frames rebuilt from its memory as it is then.
//!
//! What must hold for every schedule: the destination confirms only memory
//! byte-identical to the source's, and whenever it refuses, the source
//! keeps the guest; a connection that came back changes nothing.

use pmigrate_ranges::{Gpa, GuestMemory, GuestRegion, HostPageSize, PageIdx, PageRange, RegionIdx, PAGE_SIZE};
use pmigrate_transport::frame::{FrameHdr, HEADER_LEN};
use pmigrate_transport::hello::{ErrorCode, ErrorMsg};
use pmigrate_transport::message::{Control, Digest, Message};
use pmigrate_transport::payload::{build_pages, build_zero_pages, is_zero_page, Opener, PagesAt, Scratch};
use pmigrate_transport::TransportError;
use proptest::prelude::*;
use xxhash_rust::xxh3::xxh3_64;

use super::place::Placer;
use super::session::{DestSession, Shape, Step};
use crate::digest::memory_digest;
use crate::source::log::{Sent, SentLog};
use crate::source::rules::{Heard, RoundCounter};
use crate::source::session::SourceSession;
use crate::MigrateError;

/// Pages of each region of the harness's guest.
const REGIONS: [u64; 2] = [64, 24];

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// One frame on its way, and what it is (to judge a fault's effect).
#[derive(Clone, Debug)]
struct Wire {
    bytes: Vec<u8>,
    /// `Some(round)` for a `Pages` frame.
    pages_of: Option<u64>,
    /// What the source's record keeps of it.
    sent: Sent,
}

/// What the network does to one stream.
#[derive(Clone, Copy, Debug)]
enum Fault {
    None,
    Drop(usize),
    Duplicate(usize),
    /// Frames `k` and `k + 1` change places.
    Swap(usize),
    /// The connection ends after `k` frames.
    Cut(usize),
    /// One byte of frame `k` changes.
    Corrupt(usize, usize),
    /// The connection breaks after `k` frames and comes back; the
    /// destination had counted `j ≤ k` of them to the source before.
    Resume(usize, usize),
}

/// How a session ended.
#[derive(Debug)]
enum Outcome {
    /// The destination confirmed and the source agreed.
    Verified,
    /// The destination refused; the error is what the source was told.
    Refused(String),
}

/// The source model: its memory, and per page the hash of what it sent.
struct Source {
    mem: Vec<Vec<u8>>,
    sent: Vec<Box<[std::sync::atomic::AtomicU64]>>,
}

impl Source {
    fn new(rng: &mut Rng) -> Self {
        let mut s = Source {
            mem: REGIONS.iter().map(|&p| vec![0u8; p as usize * PAGE_SIZE]).collect(),
            sent: REGIONS.iter().map(|&p| (0..p).map(|_| Default::default()).collect()).collect(),
        };
        for (r, &pages) in REGIONS.iter().enumerate() {
            for p in 0..pages {
                s.dirty_page(rng, r, p);
            }
        }
        s
    }

    /// The guest writes page `p` of region `r`: a quarter of pages end up
    /// zero.
    fn dirty_page(&mut self, rng: &mut Rng, r: usize, p: u64) {
        let page = &mut self.mem[r][p as usize * PAGE_SIZE..][..PAGE_SIZE];
        if rng.below(4) == 0 {
            page.fill(0);
        } else {
            let v = rng.next();
            for (i, w) in page.chunks_exact_mut(8).enumerate() {
                w.copy_from_slice(&(v ^ i as u64).to_le_bytes());
            }
        }
    }

    /// The frames of a migration in `rounds` rounds over `streams` streams.
    fn migrate(&mut self, rng: &mut Rng, rounds: u64, streams: usize) -> Vec<Vec<Wire>> {
        let mut out: Vec<Vec<Wire>> = vec![Vec::new(); streams];
        let mut counters: Vec<RoundCounter> = (0..streams).map(|_| RoundCounter::default()).collect();
        let mut scratch = Scratch::default();
        for round in 0..rounds {
            // Round 0 sends everything; later rounds what the guest dirtied.
            let mut dirty: Vec<Vec<bool>> = REGIONS.iter().map(|&p| vec![round == 0; p as usize]).collect();
            if round > 0 {
                for _ in 0..rng.below(24) + 1 {
                    let r = rng.below(REGIONS.len() as u64) as usize;
                    let p = rng.below(REGIONS[r]);
                    self.dirty_page(rng, r, p);
                    dirty[r][p as usize] = true;
                }
            }
            for (r, d) in dirty.iter().enumerate() {
                let mut p = 0u64;
                while p < REGIONS[r] {
                    if !d[p as usize] {
                        p += 1;
                        continue;
                    }
                    let mut n = 1 + rng.below(8);
                    n = (p..(p + n).min(REGIONS[r])).take_while(|&q| d[q as usize]).count() as u64;
                    let bytes = &self.mem[r][p as usize * PAGE_SIZE..(p + n) as usize * PAGE_SIZE];
                    let hashes: Vec<u64> = bytes.chunks_exact(PAGE_SIZE).map(xxh3_64).collect();
                    for (i, h) in hashes.iter().enumerate() {
                        self.sent[r][p as usize + i].store(*h, std::sync::atomic::Ordering::Relaxed);
                    }
                    let mut f = Vec::new();
                    if bytes.chunks_exact(PAGE_SIZE).all(is_zero_page) {
                        build_zero_pages(&mut f, r as u32, p, n as u32, round);
                    } else {
                        let at = PagesAt { region: r as u32, first: p, round };
                        build_pages(&mut f, &mut scratch, at, bytes, &hashes, rng.below(2) == 0);
                    }
                    let s = rng.below(streams as u64) as usize;
                    counters[s].sent_pages();
                    let range = PageRange { region: RegionIdx(r as u32), start: PageIdx(p), end: PageIdx(p + n) };
                    out[s].push(Wire { bytes: f, pages_of: Some(round), sent: Sent::Pages { range, round } });
                    p += n;
                }
            }
            for (s, c) in counters.iter_mut().enumerate() {
                let end = c.end(round, round + 1 == rounds);
                let Control::RoundEnd { frames, last, .. } = end else { unreachable!() };
                out[s].push(Wire { bytes: end.encode(), pages_of: None, sent: Sent::RoundEnd { round, frames, last } });
            }
        }
        let digest = memory_digest(&self.sent);
        let done = Control::Done(Digest(digest)).encode();
        out[0].push(Wire { bytes: done.clone(), pages_of: None, sent: Sent::Control(done) });
        out
    }

    /// A recorded frame again, as the source sends it after a comeback:
    /// pages from its memory now, raw or zero.
    fn again(&self, s: &Sent) -> Wire {
        let bytes = match s {
            Sent::Pages { range, round } => {
                let r = range.region.as_usize();
                let bytes = &self.mem[r][range.start.0 as usize * PAGE_SIZE..range.end.0 as usize * PAGE_SIZE];
                let mut f = Vec::new();
                if bytes.chunks_exact(PAGE_SIZE).all(is_zero_page) {
                    build_zero_pages(&mut f, range.region.0, range.start.0, range.len() as u32, *round);
                } else {
                    let hashes: Vec<u64> = bytes.chunks_exact(PAGE_SIZE).map(xxh3_64).collect();
                    let at = PagesAt { region: range.region.0, first: range.start.0, round: *round };
                    build_pages(&mut f, &mut Scratch::default(), at, bytes, &hashes, false);
                }
                f
            }
            Sent::RoundEnd { round, frames, last } => {
                Control::RoundEnd { round: pmigrate_transport::message::Round(*round), frames: *frames, last: *last }
                    .encode()
            }
            Sent::Control(f) => f.clone(),
        };
        let pages_of = match s {
            Sent::Pages { round, .. } => Some(*round),
            _ => None,
        };
        Wire { bytes, pages_of, sent: s.clone() }
    }
}

/// The comeback of a stream whose connection broke after the destination
/// took `k` of its frames, having told `j` of them before: the count goes
/// through the source's rules and record, and what follows it goes again.
/// Returns the stream's frames as the destination now reads them.
fn come_back(src: &Source, frames: &[Wire], index: usize, j: usize, k: usize) -> Vec<Wire> {
    let mut log = SentLog::default();
    for w in frames {
        log.push(w.sent.clone()).unwrap();
    }
    let mut sess = SourceSession::new(true);
    let mut tell = |n: usize| match source_hears(
        &mut sess,
        index,
        Control::Received { frames: n as u64 },
        std::time::Instant::now(),
    ) {
        Heard::Received(n) => n,
        h => panic!("{h:?}"),
    };
    log.ack(tell(j)).unwrap();
    log.ack(tell(k)).unwrap();
    let mut now: Vec<Wire> = frames[..k].to_vec();
    now.extend(log.unacked().map(|s| src.again(s)));
    now
}

/// What the source's session makes of `c` on stream `stream` at `at`,
/// sent through the frame codec as a destination sends it.
fn source_hears(sess: &mut SourceSession, stream: usize, c: Control<'_>, at: std::time::Instant) -> Heard {
    let f = c.encode();
    let hdr = FrameHdr::decode(f[..HEADER_LEN].try_into().unwrap()).unwrap();
    sess.on_message(stream, false, Message::decode(hdr, &f[HEADER_LEN..]).unwrap(), at).unwrap()
}

/// The destination's `Verified` of `d` reaches the source on stream 0 at
/// `at`; the stream's listener ends with it.
fn verified_arrives(sess: &mut SourceSession, d: Digest, at: std::time::Instant) {
    match source_hears(sess, 0, Control::Verified { value: d.0, closed: false }, at) {
        Heard::Verified(d) => sess.on_verdict(Ok(d), at),
        h => panic!("{h:?}"),
    }
}

/// What a fault does to the meaning of a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Harm {
    /// Nothing: the session must end confirmed.
    None,
    /// Something is lost, added or out of place: it must be refused.
    Certain,
    /// Perhaps nothing: a changed byte of an lz4 payload may decode to the
    /// same pages (a match pointing at other, equal bytes). Confirmed or
    /// refused, but confirmed only byte-exact.
    Maybe,
}

/// Applies `fault` to a stream's frames and judges its harm (a swap of two
/// `Pages` frames of one round is none: a round sends each page once).
fn apply(fault: Fault, frames: &mut Vec<Wire>, cut: &mut usize) -> Harm {
    let n = frames.len();
    match fault {
        Fault::None => Harm::None,
        Fault::Drop(k) if k < n => {
            frames.remove(k);
            Harm::Certain
        }
        Fault::Duplicate(k) if k < n => {
            frames.insert(k, frames[k].clone());
            // A copy of a stream's last frame comes after its end, and is
            // never read.
            if k + 1 < n {
                Harm::Certain
            } else {
                Harm::None
            }
        }
        Fault::Swap(k) if k + 1 < n => {
            let same_round = frames[k].pages_of.is_some() && frames[k].pages_of == frames[k + 1].pages_of;
            frames.swap(k, k + 1);
            if same_round {
                Harm::None
            } else {
                Harm::Certain
            }
        }
        Fault::Cut(k) if k < n => {
            *cut = k;
            Harm::Certain
        }
        // Handled by `session`, which has the source.
        Fault::Resume(..) => Harm::None,
        Fault::Corrupt(k, at) if k < n => {
            let f = &mut frames[k].bytes;
            let at = at % f.len();
            f[at] ^= 0x40;
            let lz4 = f[1] == pmigrate_transport::Encoding::Lz4 as u8;
            if lz4 && at >= HEADER_LEN {
                Harm::Maybe
            } else {
                Harm::Certain
            }
        }
        _ => Harm::None,
    }
}

/// The destination's guest memory: the harness's regions, all zero.
fn guest_memory() -> GuestMemory {
    let region = |(i, &p): (usize, &u64)| {
        GuestRegion::anonymous(Gpa((i as u64) << 30), p * PAGE_SIZE as u64, HostPageSize::Small)
    };
    GuestMemory::new(REGIONS.iter().enumerate().map(|r| region(r).unwrap()).collect()).unwrap()
}

/// One session: a migration of `rounds` rounds over `streams` streams with
/// `fault` on stream `on`, delivered in the interleaving `seed` picks.
/// Returns how it ended and the fault's harm.
fn session(seed: u64, rounds: u64, streams: usize, on: usize, fault: Fault) -> (Outcome, Harm) {
    let mut rng = Rng::new(seed);
    let mut src = Source::new(&mut rng);
    let mut wires = src.migrate(&mut rng, rounds, streams);
    let mut cut = vec![usize::MAX; streams];
    let harm = apply(fault, &mut wires[on % streams], &mut cut[on % streams]);
    let mut back = vec![usize::MAX; streams];
    if let Fault::Resume(j, k) = fault {
        let s = on % streams;
        let k = k % wires[s].len();
        wires[s] = come_back(&src, &wires[s], s, j.min(k), k);
        back[s] = k;
    }
    let mem = guest_memory();
    let shape =
        Shape { pages: REGIONS.to_vec(), offered: vec![false; REGIONS.len()], lz4: true, postcopy: false, streams };
    let outcome = receive(&mut rng, &wires, &cut, &back, shape, &mem);
    // The source's session: everything sent, then each stream's outcome.
    let t = std::time::Instant::now();
    let mut sess = SourceSession::new(matches!(fault, Fault::Resume(..)));
    sess.done_queued(Digest(memory_digest(&src.sent)));
    sess.done_written();
    sess.await_verdict(false, t);
    if let Fault::Cut(_) = fault {
        // The cut stream's listener says so before the destination's word
        // arrives on stream 0.
        sess.on_verdict(Err(TransportError::Closed(format!("stream {}", on % streams)).into()), t);
    }
    let later = t + std::time::Duration::from_millis(10);
    match outcome {
        // The destination's `Verified`, read by the source's session.
        Ok(d) => verified_arrives(&mut sess, d, later),
        // Its `Error` frame, as the source's reader reports it.
        Err(e) => sess.on_verdict(
            Err(MigrateError::from(TransportError::Peer(ErrorMsg { code: ErrorCode::Protocol, message: e }))),
            later,
        ),
    };
    assert_eq!(sess.verdict_deadline(), None, "seed {seed}: the destination's word decides");
    let outcome = match sess.settle(None).outcome {
        Ok(()) => {
            for (r, region) in mem.regions().iter().enumerate() {
                let mut here = vec![0u8; region.len() as usize];
                region.read_pages(PageIdx(0), &mut here).unwrap();
                assert!(here == src.mem[r], "seed {seed}: confirmed, but region {r} differs from the source's");
            }
            Outcome::Verified
        }
        Err(e) => {
            assert!(e.source_keeps_guest(), "seed {seed}: refused, yet the source gave the guest up: {e}");
            Outcome::Refused(e.to_string())
        }
    };
    (outcome, harm)
}

/// The destination: reads the streams in an interleaving `rng` picks, as
/// its driver does, until every stream ended; its verdict. A stream comes
/// back on a new connection before its frame `back[s]`.
fn receive(
    rng: &mut Rng,
    wires: &[Vec<Wire>],
    cut: &[usize],
    back: &[usize],
    shape: Shape,
    mem: &GuestMemory,
) -> Result<Digest, String> {
    let streams = wires.len();
    let mut rules = DestSession::new(shape);
    let placer = Placer::new(mem, vec![false; mem.regions().len()]);
    let mut opener = Opener::default();
    let mut at = vec![0usize; streams];
    let mut ended = vec![false; streams];
    while ended.iter().any(|e| !e) {
        let open: Vec<usize> = (0..streams).filter(|&s| !ended[s]).collect();
        let s = open[rng.below(open.len() as u64) as usize];
        if at[s] >= wires[s].len().min(cut[s]) {
            return Err(format!("stream {s}: connection closed before the migration completed"));
        }
        if at[s] == back[s] {
            assert!(rules.may_come_back(s, true), "a pre-copy stream whose part is not over may come back");
            rules.reconnected(s);
        }
        let f = &wires[s][at[s]].bytes;
        at[s] += 1;
        // What a frame reader does: a header, then exactly its payload.
        let hdr = FrameHdr::decode(f[..HEADER_LEN].try_into().unwrap()).map_err(|e| e.to_string())?;
        if f.len() != HEADER_LEN + hdr.len as usize {
            return Err(format!("stream {s}: the stream is out of step"));
        }
        let msg = Message::decode(hdr, &f[HEADER_LEN..]).map_err(|e| e.to_string())?;
        match rules.on_message(s, msg).map_err(|e| e.to_string())? {
            Step::Place { frame, stamp, post: false } => {
                let opened = frame.open(&mut opener).map_err(|e| e.to_string())?;
                placer.apply(frame.range(), opened, stamp).map_err(|e| e.to_string())?;
            }
            Step::End => ended[s] = true,
            Step::Nothing => {}
            step => panic!("a pre-copy source never causes {step:?}"),
        }
    }
    rules.verdict(placer.digest()).map_err(|(_, e)| e.to_string())
}

#[test]
fn without_faults_every_interleaving_ends_confirmed_and_byte_exact() {
    for seed in 0..64 {
        let (o, _) = session(seed, 1 + seed % 4, 1 + (seed as usize % 4), 0, Fault::None);
        assert!(matches!(o, Outcome::Verified), "seed {seed}: {o:?}");
    }
}

/// One case per fault, each with the reason the destination gives.
#[test]
fn each_fault_is_refused_with_its_reason() {
    let refused = |fault, on| match session(7, 3, 3, on, fault) {
        (Outcome::Refused(why), Harm::Certain) => why,
        o => panic!("{fault:?}: {o:?}"),
    };
    let cases = [
        (Fault::Drop(0), "ended after"),
        (Fault::Duplicate(0), "ended after"),
        (Fault::Cut(1), "closed before the migration completed"),
        (Fault::Corrupt(0, HEADER_LEN + 100), "checksum"),
        (Fault::Corrupt(0, 18), ""),
    ];
    for (fault, why) in cases {
        let got = refused(fault, 1);
        assert!(got.contains(why), "{fault:?}: {got}");
    }
    // Stream 0's `Done`, dropped: it never ends.
    let n = {
        let mut rng = Rng::new(7);
        let mut src = Source::new(&mut rng);
        src.migrate(&mut rng, 3, 3)[0].len()
    };
    let got = refused(Fault::Drop(n - 1), 0);
    assert!(got.contains("closed before the migration completed"), "{got}");
    // A round end moved before a page frame of its round.
    let got = refused(Fault::Swap(n - 3), 0);
    assert!(got.contains("round"), "{got}");
}

/// A connection that breaks anywhere and comes back: the session ends
/// confirmed and byte-exact, every time.
#[test]
fn a_stream_that_comes_back_ends_confirmed_and_byte_exact() {
    for seed in 0..64 {
        let streams = 1 + seed as usize % 4;
        let k = (seed as usize * 7) % 40;
        let (o, harm) = session(seed, 1 + seed % 4, streams, seed as usize, Fault::Resume(k / 2, k));
        assert_eq!(harm, Harm::None);
        assert!(matches!(o, Outcome::Verified), "seed {seed}: {o:?}");
    }
}

/// The destination's word on its way back, through the same faults: the
/// verdict dropped, duplicated, or behind a cut stream's own failure. The
/// source gives the guest away only on the confirmation of what it sent,
/// and keeps it only on the destination's refusal; a verdict lost leaves
/// the outcome unknown, never "kept".
#[test]
fn the_verdict_dropped_duplicated_or_behind_a_cut_settles_truthfully() {
    let mut rng = Rng::new(11);
    let mut src = Source::new(&mut rng);
    let wires = src.migrate(&mut rng, 2, 3);
    let mem = guest_memory();
    let shape = Shape { pages: REGIONS.to_vec(), offered: vec![false; 2], lz4: true, postcopy: false, streams: 3 };
    let none = vec![usize::MAX; 3];
    let confirmed = receive(&mut rng, &wires, &none, &none, shape, &mem).expect("no fault");
    let sent = Digest(memory_digest(&src.sent));
    assert_eq!(confirmed, sent);
    let refusal =
        || MigrateError::from(TransportError::Peer(ErrorMsg { code: ErrorCode::Digest, message: "no".into() }));
    let cut = || MigrateError::from(TransportError::Closed("stream 2".into()));
    let t = std::time::Instant::now();
    let ms = |n| t + std::time::Duration::from_millis(n);
    let hear = |sess: &mut SourceSession, at| verified_arrives(sess, confirmed, at);
    let run = |deliver: &dyn Fn(&mut SourceSession)| {
        let mut sess = SourceSession::new(true);
        sess.done_queued(sent);
        sess.done_written();
        sess.await_verdict(false, t);
        deliver(&mut sess);
        // Whatever is still awaited, its deadline passes.
        if let Some(d) = sess.verdict_deadline() {
            sess.on_timeout(d);
        }
        sess.settle(None)
    };
    // Delivered once, or twice: the guest is the destination's.
    assert!(run(&|s| hear(s, ms(5))).outcome.is_ok());
    assert!(run(&|s| {
        hear(s, ms(5));
        hear(s, ms(6));
    })
    .outcome
    .is_ok());
    // Behind a cut stream's failure, within the grace: still confirmed.
    assert!(run(&|s| {
        s.on_verdict(Err(cut()), ms(1));
        hear(s, ms(400));
    })
    .outcome
    .is_ok());
    // Dropped, with a cut stream and then silence: nobody knows; the
    // source neither claims the guest nor tells the destination it gave up.
    for deliver in [&(|s: &mut SourceSession| s.on_verdict(Err(cut()), ms(1))) as &dyn Fn(&mut SourceSession), &|_| {}]
    {
        let end = run(deliver);
        let e = end.outcome.unwrap_err();
        assert!(matches!(e, MigrateError::Unconfirmed(_)) && !e.source_keeps_guest(), "{e}");
        assert!(end.tell_gave_up.is_none());
    }
    // A refusal, duplicated or behind a cut: the source keeps the guest.
    let end = run(&|s| {
        s.on_verdict(Err(cut()), ms(1));
        s.on_verdict(Err(refusal()), ms(2));
        s.on_verdict(Err(refusal()), ms(3));
    });
    let e = end.outcome.unwrap_err();
    assert!(e.is_peer_refusal() && e.source_keeps_guest(), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    /// Any schedule and any one fault: confirmed only byte-exact (checked
    /// in `session`), refused only with the source keeping the guest, and
    /// confirmed whenever the fault could not matter.
    #[test]
    fn no_fault_makes_a_wrong_confirmation(
        seed in any::<u64>(), rounds in 1u64..5, streams in 1usize..5, on in 0usize..4,
        kind in 0u8..7, k in 0usize..40, byte in any::<usize>(),
    ) {
        let fault = match kind {
            0 => Fault::None,
            1 => Fault::Drop(k),
            2 => Fault::Duplicate(k),
            3 => Fault::Swap(k),
            4 => Fault::Cut(k),
            5 => Fault::Resume(byte % (k + 1), k),
            _ => Fault::Corrupt(k, byte),
        };
        match session(seed, rounds, streams, on, fault) {
            (o, Harm::None) => prop_assert!(matches!(o, Outcome::Verified), "{:?}: {:?}", fault, o),
            (o, Harm::Certain) => prop_assert!(matches!(o, Outcome::Refused(_)), "{:?} was accepted", fault),
            (_, Harm::Maybe) => {}
        }
    }
}
