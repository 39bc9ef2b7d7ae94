//! The destination's session rules and its placement into real guest
//! memory, driven by structure-aware message sequences: every frame is
//! built the way a sender builds it, checksums included, so sequences get
//! past the integrity check and reach the rules; a few are raw bytes.
//!
//! Properties, not only "no panic":
//! - no page is placed outside the region table, and memory the rules
//!   never let a page frame touch stays zero;
//! - `Verified` only when stream 0's digest equals the digest of the memory
//!   placed, and that memory rehashes to the tables the digest came from;
//! - no allocation beyond the stated bounds (run with `-malloc_limit_mb`).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pmigrate_engine::fuzzing::{DestSession, Placer, Shape, Step};
use pmigrate_ranges::{GuestMemory, GuestRegion, Gpa, HostPageSize, PageIdx, PageRange, RegionIdx};
use pmigrate_transport::frame::{FrameHdr, HEADER_LEN};
use pmigrate_transport::message::{Control, Digest, Message, NeedBitmap, ProbeAsk, Round};
use pmigrate_transport::payload::{build_pages, build_zero_pages, Opener, PagesAt, Scratch};
use std::sync::OnceLock;
use xxhash_rust::xxh3::xxh3_64;

/// Pages of each region.
const REGIONS: [u64; 2] = [16, 8];
const PAGE: usize = 4096;

#[derive(Arbitrary, Debug)]
enum Op {
    Pages { stream: u8, region: u8, first: u8, count: u8, round: u8, pattern: u8, lz4: bool, zero: bool },
    RoundEnd { stream: u8, round: u8, frames: u8, last: bool },
    /// `Done`, with the digest of what is placed so far or any other.
    Done { stream: u8, honest: bool, digest: u64 },
    Probe { stream: u8, region: u8, words: bool, places: Vec<u16> },
    Switchover { stream: u8, round: u8, last: bool, need: Option<(u8, u8, u8, Vec<u8>)> },
    Keepalive { stream: u8 },
    /// Kinds a destination never gets.
    Stray { stream: u8, which: u8, value: u64 },
    /// Raw bytes: a header and a payload as they come.
    Raw { stream: u8, bytes: Vec<u8> },
    /// The stream's connection was replaced.
    Reconnect { stream: u8 },
}

#[derive(Arbitrary, Debug)]
struct Input {
    streams: u8,
    postcopy: bool,
    lz4: bool,
    offered: [bool; 2],
    ops: Vec<Op>,
}

/// A `Pages` frame of `n` pages (at most 8) filled from `pattern`, at
/// `at`: sealed exactly as `build_pages` seals it. Building (and
/// compressing) is what a run would spend its time on, so each payload is
/// built once and only the header is sealed again.
fn pages_frame(n: usize, pattern: u8, lz4: bool, at: PagesAt) -> Vec<u8> {
    type Built = (FrameHdr, Vec<u8>, Vec<u8>);
    static BUILT: [OnceLock<Built>; 8 * 256 * 2] = [const { OnceLock::new() }; 8 * 256 * 2];
    let (proto, payload, hash_bytes) = BUILT[(n - 1) * 512 + usize::from(pattern) * 2 + usize::from(lz4)].get_or_init(|| {
        let pages: Vec<u8> = (0..n * PAGE)
            .map(|i| if pattern & 1 == 0 { pattern ^ (i as u8 & 0x0f) } else { (i as u32).wrapping_mul(2654435761).rotate_right(13) as u8 ^ pattern })
            .collect();
        let hashes: Vec<u64> = pages.chunks(PAGE).map(xxh3_64).collect();
        let mut f = Vec::new();
        build_pages(&mut f, &mut Scratch::default(), PagesAt { region: 0, first: 0, round: 0 }, &pages, &hashes, lz4);
        let hdr = FrameHdr::decode(f[..HEADER_LEN].try_into().unwrap()).unwrap();
        (hdr, f[HEADER_LEN..].to_vec(), hashes.iter().flat_map(|h| h.to_le_bytes()).collect())
    });
    let mut hdr = *proto;
    hdr.region = at.region;
    hdr.first = at.first;
    hdr.aux = at.round;
    hdr.seal(hash_bytes);
    let mut f = hdr.encode().to_vec();
    f.extend_from_slice(payload);
    f
}

/// The guest memory of every run, zeroed again before each.
fn memory() -> &'static GuestMemory {
    static MEM: OnceLock<GuestMemory> = OnceLock::new();
    let mem = MEM.get_or_init(|| {
        GuestMemory::new(
            REGIONS
                .iter()
                .enumerate()
                .map(|(i, &p)| GuestRegion::anonymous(Gpa((i as u64) << 30), p * PAGE as u64, HostPageSize::Small).unwrap())
                .collect(),
        )
        .unwrap()
    });
    for r in mem.regions() {
        r.discard_pages(PageIdx(0), r.pages()).unwrap();
    }
    mem
}

fn frame(op: &Op, placed: Digest) -> (u8, Vec<u8>) {
    let mut f = Vec::new();
    let stream = match op {
        Op::Pages { stream, region, first, count, round, pattern, lz4, zero } => {
            let n = u32::from(*count % 8) + 1;
            if *zero {
                build_zero_pages(&mut f, u32::from(*region % 3), u64::from(*first), n, u64::from(*round % 4));
            } else {
                let at = PagesAt { region: u32::from(*region % 3), first: u64::from(*first), round: u64::from(*round % 4) };
                f = pages_frame(n as usize, *pattern, *lz4, at);
            }
            *stream
        }
        Op::RoundEnd { stream, round, frames, last } => {
            f = Control::RoundEnd { round: Round(u64::from(*round % 4)), frames: u64::from(*frames % 16), last: *last }.encode();
            *stream
        }
        Op::Done { stream, honest, digest } => {
            f = Control::Done(if *honest { placed } else { Digest(*digest) }).encode();
            *stream
        }
        Op::Probe { stream, region, words, places } => {
            let places: Vec<u64> = places.iter().take(64).map(|&p| u64::from(p)).collect();
            if places.is_empty() {
                return (*stream, Control::Keepalive.encode());
            }
            let ask = if *words { ProbeAsk::Words } else { ProbeAsk::PageHashes };
            f = Control::Probe { region: RegionIdx(u32::from(*region % 3)), ask, places }.encode();
            *stream
        }
        Op::Switchover { stream, round, last, need } => {
            let bits;
            let need = match need {
                Some((region, first, count, b)) => {
                    let n = u64::from(*count % 32) + 1;
                    bits = b.iter().copied().chain(std::iter::repeat(0xff)).take(n.div_ceil(8) as usize).collect::<Vec<u8>>();
                    let start = PageIdx(u64::from(*first));
                    let range = PageRange { region: RegionIdx(u32::from(*region % 3)), start, end: PageIdx(start.0 + n) };
                    Some(NeedBitmap { range, bits: &bits })
                }
                None => None,
            };
            f = Control::Switchover { round: Round(u64::from(*round % 4)), last: *last, need }.encode();
            *stream
        }
        Op::Keepalive { stream } => {
            f = Control::Keepalive.encode();
            *stream
        }
        Op::Stray { stream, which, value } => {
            let c = match which % 5 {
                0 => Control::ProbeReply(vec![*value]),
                1 => Control::Verified { value: *value, closed: false },
                2 => Control::End { chunks: *value },
                3 => Control::Received { frames: *value },
                _ => Control::PageRequest(PageRange { region: RegionIdx(0), start: PageIdx(0), end: PageIdx(1) }),
            };
            f = c.encode();
            *stream
        }
        Op::Raw { stream, bytes } => {
            f = bytes.clone();
            *stream
        }
        Op::Reconnect { .. } => unreachable!("not a frame"),
    };
    (stream, f)
}

fuzz_target!(|input: Input| {
    let streams = usize::from(input.streams % 4) + 1 + usize::from(input.postcopy);
    let mem = memory();
    let shape = Shape {
        pages: REGIONS.to_vec(),
        offered: input.offered.to_vec(),
        lz4: input.lz4,
        postcopy: input.postcopy,
        streams,
    };
    let mut rules = DestSession::new(shape);
    // Offered regions are not known to be zero; here they are.
    let placer = Placer::new(mem, vec![false; REGIONS.len()]);
    let mut opener = Opener::default();
    // Pages some accepted frame covered.
    let mut touched: Vec<Vec<bool>> = REGIONS.iter().map(|&p| vec![false; p as usize]).collect();
    let mut ended = vec![false; streams];
    let mut failed = false;
    for op in input.ops.iter().take(256) {
        if failed {
            break;
        }
        if let Op::Reconnect { stream } = op {
            // As the driver does: only a stream the rules let come back.
            let stream = usize::from(*stream) % streams;
            if rules.may_come_back(stream, true) {
                rules.reconnected(stream);
            }
            continue;
        }
        let (stream, f) = frame(op, placer.digest());
        let stream = usize::from(stream) % streams;
        let Some(head) = f.get(..HEADER_LEN) else { continue };
        let Ok(hdr) = FrameHdr::decode(head.try_into().unwrap()) else {
            failed = true;
            continue;
        };
        let Some(payload) = f.get(HEADER_LEN..HEADER_LEN + hdr.len as usize) else {
            failed = true;
            continue;
        };
        let Ok(msg) = Message::decode(hdr, payload) else {
            failed = true;
            continue;
        };
        match rules.on_message(stream, msg) {
            Ok(Step::Place { frame, stamp, .. }) => {
                let r = frame.range();
                let region = r.region.0 as usize;
                assert!(region < REGIONS.len() && r.end.0 <= REGIONS[region] && r.start.0 < r.end.0, "placed outside: {r:?}");
                assert!(stamp >= 1);
                match frame.open(&mut opener) {
                    Ok(opened) => {
                        placer.apply(r, opened, stamp).expect("in bounds");
                        for p in r.start.0..r.end.0 {
                            touched[region][p as usize] = true;
                        }
                    }
                    Err(_) => failed = true,
                }
            }
            Ok(Step::Answer { region, ask, places }) => {
                assert!(input.offered.get(region.0 as usize).copied().unwrap_or(false), "probe of a region not offered");
                if let Ok(v) = pmigrate_engine::fuzzing::answer(mem, region, ask, &places) {
                    assert_eq!(v.len(), places.len());
                }
            }
            Ok(Step::Need(need)) => {
                let r = need.range;
                let region = r.region.0 as usize;
                assert!(input.postcopy && stream == 0);
                assert!(region < REGIONS.len() && r.end.0 <= REGIONS[region], "a bitmap outside: {r:?}");
                assert_eq!(need.bits.len() as u64, r.len().div_ceil(8));
            }
            Ok(Step::Marker) => assert!(input.postcopy),
            Ok(Step::End) => {
                assert!(!ended[stream], "a stream ended twice");
                ended[stream] = true;
            }
            Ok(Step::Nothing) => {}
            Err(_) => failed = true,
        }
    }
    // Memory no accepted frame covered is still zero.
    let mut page = vec![0u8; PAGE];
    for (r, region) in mem.regions().iter().enumerate() {
        for p in 0..REGIONS[r] {
            if !touched[r][p as usize] {
                region.read_pages(PageIdx(p), &mut page).unwrap();
                // (A slice comparison: memcmp, not a traced loop.)
                assert!(page[..] == [0u8; PAGE][..], "region {r} page {p} written without a frame");
            }
        }
    }
    if !failed && !input.postcopy && ended.iter().all(|e| *e) {
        let placed = placer.digest();
        if let Ok(d) = rules.verdict(placed) {
            assert_eq!(d, placed);
            assert_eq!(rules.source_digest(), Some(placed), "verified without the source's digest matching");
            placer.verify_memory().expect("verified memory rehashes to its tables");
        }
    }
});
