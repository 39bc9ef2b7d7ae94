//! The source's rules for what the destination says: any sequence of
//! messages (built as a destination builds them, checksums right, or raw
//! bytes) on any stream, each page request checked against the region
//! table, and then the end of the session settled.
//!
//! Properties: a count of frames received is taken on any stream, as it
//! was said; a probe reply is taken only on stream 0, a page request and
//! the "running" marker only on the priority stream, `Verified` only on
//! stream 0 or the priority stream; an accepted request names existing
//! pages after the switchover, and the "running" marker only after it; the
//! session settles `Ok` only when the destination confirmed the very digest
//! sent; a failure says the source keeps the guest exactly when the
//! destination's guest cannot have started: before the switchover, or on
//! the destination's refusal that does not say its guest started, before
//! its marker.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pmigrate_engine::fuzzing::{check_request, heard, settle, Heard, NoVerdict, Reached};
use pmigrate_engine::MigrateError;
use pmigrate_ranges::{PageIdx, PageRange, RegionIdx};
use pmigrate_transport::frame::{FrameHdr, HEADER_LEN};
use pmigrate_transport::hello::{ErrorCode, ErrorMsg};
use pmigrate_transport::message::{Control, Digest, Message, Round};
use pmigrate_transport::TransportError;

/// Pages of each region.
const REGIONS: [u64; 2] = [64, 8];

#[derive(Arbitrary, Debug)]
enum Said {
    Keepalive,
    ProbeReply(Vec<u64>),
    Request { region: u8, first: u16, count: u16 },
    Switchover { round: u8, last: bool },
    Verified { value: u64, closed: bool },
    Done(u64),
    Received(u64),
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum End {
    Verified(u64),
    Refused,
    /// Refused after its guest started.
    Lost,
    Broken,
    Timeout,
    Gone,
}

#[derive(Arbitrary, Debug)]
struct Input {
    streams: u8,
    postcopy: bool,
    switched: bool,
    done_sent: bool,
    digest: u64,
    said: Vec<(u8, Said)>,
    error_here: bool,
    end: End,
}

fuzz_target!(|input: Input| {
    let streams = usize::from(input.streams % 4) + 1 + usize::from(input.postcopy);
    let prio = input.postcopy.then(|| streams - 1);
    let mut verdict = None;
    let mut running = false;
    for (stream, said) in input.said.iter().take(128) {
        let index = usize::from(*stream) % streams;
        let f = match said {
            Said::Keepalive => Control::Keepalive.encode(),
            Said::ProbeReply(v) => Control::ProbeReply(v.iter().copied().take(64).collect()).encode(),
            Said::Request { region, first, count } => {
                let start = PageIdx(u64::from(*first));
                let end = PageIdx(start.0 + u64::from(*count % 1024) + 1);
                Control::PageRequest(PageRange { region: RegionIdx(u32::from(*region % 3)), start, end }).encode()
            }
            Said::Switchover { round, last } => {
                Control::Switchover { round: Round(u64::from(*round)), last: *last, need: None }.encode()
            }
            Said::Verified { value, closed } => Control::Verified { value: *value, closed: *closed }.encode(),
            Said::Done(d) => Control::Done(Digest(*d)).encode(),
            Said::Received(n) => Control::Received { frames: *n }.encode(),
            Said::Raw(b) => b.clone(),
        };
        let Some(head) = f.get(..HEADER_LEN) else { continue };
        let Ok(hdr) = FrameHdr::decode(head.try_into().unwrap()) else { continue };
        let Some(payload) = f.get(HEADER_LEN..HEADER_LEN + hdr.len as usize) else { continue };
        let Ok(msg) = Message::decode(hdr, payload) else { continue };
        let is_prio = prio == Some(index);
        match heard(index, is_prio, input.switched, msg) {
            Ok(Heard::ProbeReply(_)) => assert_eq!(index, 0),
            Ok(Heard::Request(r)) => {
                assert!(is_prio);
                if check_request(&REGIONS, r, input.switched).is_ok() {
                    assert!(input.switched && !r.is_empty());
                    assert!(r.end.0 <= REGIONS[r.region.0 as usize], "a request outside: {r:?}");
                }
            }
            Ok(Heard::Running) => {
                assert!(is_prio && input.switched);
                running = true;
            }
            Ok(Heard::Verified(d)) => {
                assert!(index == 0 || is_prio);
                verdict.get_or_insert(d);
            }
            Ok(Heard::Received(n)) => assert!(matches!(said, Said::Received(m) if *m == n) || matches!(said, Said::Raw(_))),
            Ok(Heard::Nothing) | Err(_) => {}
        }
    }
    let digest = Some(Digest(input.digest));
    let reached = Reached { digest, switched: input.switched, running, done_sent: input.done_sent };
    let broken = || MigrateError::from(TransportError::Closed("stream 0".into()));
    let refused = |code| MigrateError::from(TransportError::Peer(ErrorMsg { code, message: "no".into() }));
    let told = match (&input.end, verdict) {
        (_, Some(d)) => Ok(Ok(d)),
        (End::Verified(d), None) => Ok(Ok(Digest(*d))),
        (End::Refused, None) => Ok(Err(refused(ErrorCode::Digest))),
        (End::Lost, None) => Ok(Err(refused(ErrorCode::Started))),
        (End::Broken, None) => Ok(Err(broken())),
        (End::Timeout, None) => Err(NoVerdict::Timeout(std::time::Duration::from_secs(1))),
        (End::Gone, None) => Err(NoVerdict::Gone),
    };
    let confirmed = matches!(&told, Ok(Ok(d)) if Some(*d) == digest);
    // What the destination said last, when no `Verified` came on a stream.
    let refused = verdict.is_none() && !running && matches!(input.end, End::Refused);
    let lost = verdict.is_none() && matches!(input.end, End::Lost);
    let claimed = verdict.is_some() || matches!(input.end, End::Verified(_));
    let failed = verdict.is_none() && (input.error_here || matches!(input.end, End::Broken));
    match settle(reached, input.error_here.then(broken), told) {
        Ok(()) => assert!(confirmed, "settled without the digest sent confirmed"),
        Err(e) => {
            assert!(!confirmed);
            let keeps = e.source_keeps_guest();
            if running || lost {
                assert!(!keeps, "the guest started at the destination, the source claims it: {e}");
            } else if refused {
                assert!(keeps, "the destination refused before its guest started, the source gives it up: {e}");
            } else if claimed || input.switched || input.done_sent {
                assert!(!keeps, "the destination may hold the guest, the source claims it: {e}");
            } else if failed {
                assert!(keeps, "a failure before anything was handed over, the source gives it up: {e}");
            }
        }
    }
});
