//! The source's session (`SourceSession`) under any sequence of events:
//! messages from the destination (built as a destination builds them,
//! checksums right, or raw bytes) on any stream, the source's own steps
//! (switchover, `Done`), lost connections, stream outcomes and time
//! passing, before and after the rounds end; then the end settled.
//!
//! Properties: a count of frames received is taken on any stream, as it
//! was said; a probe reply only on stream 0, a page request and the
//! "running" marker only on the priority stream, `Verified` only on stream
//! 0 or the priority stream; an accepted request names existing pages
//! after the switchover, and the "running" marker comes only after it; a
//! lost stream comes back only in a resumable session not yet settled,
//! and never for a silent destination before the switchover; the verdict
//! wait ends by its deadline; the session settles `Ok` only when the
//! outcome that decided it confirmed the very digest sent; the source
//! keeps the guest when the deciding outcome is the destination's refusal
//! before its guest started, or when something failed before anything was
//! handed over, and never once the destination's guest may have started;
//! a resumable destination is told the source gave up exactly when the
//! source keeps the guest before the switchover and before `Done`.
#![no_main]

use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pmigrate_engine::fuzzing::{check_request, Comeback, Heard, SourceSession};
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

/// A stream listener's outcome other than a message's.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// The destination's refusal.
    Refused,
    /// Its refusal, saying its guest had started.
    Started,
    /// The connection broke.
    Broken,
}

#[derive(Arbitrary, Debug)]
enum Event {
    Said { stream: u8, said: Said },
    /// Post-copy: the switchover went out.
    Switch(u8),
    /// `Done` was queued, and perhaps written.
    Done { written: bool },
    Outcome(End),
    /// Time passes, in milliseconds.
    Wait(u16),
    Lost { kind: u8, given_up: bool },
    /// The rounds end here (the first such event counts).
    RoundsEnd,
}

#[derive(Arbitrary, Debug)]
struct Input {
    streams: u8,
    postcopy: bool,
    resumable: bool,
    digest: u64,
    error_here: bool,
    events: Vec<Event>,
    /// After the events: every listener gone (else the deadline passes).
    gone: bool,
}

/// What decided the verdict wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Decided {
    Confirmed(Digest),
    Refused,
    Started,
}

struct Model {
    s: SourceSession,
    now: Instant,
    digest: Option<Digest>,
    done_sent: bool,
    running: bool,
    /// Outcomes queued before the rounds ended.
    queued: Vec<Result<Digest, End>>,
    waiting: bool,
    decided: Option<Decided>,
    broken_seen: bool,
}

impl Model {
    fn outcome(&mut self, o: Result<Digest, End>) {
        if !self.waiting {
            self.queued.push(o);
            return;
        }
        let undecided = self.s.verdict_deadline().is_some();
        let v = match o {
            Ok(d) => Ok(d),
            Err(End::Refused) => Err(refused(ErrorCode::Digest)),
            Err(End::Started) => Err(refused(ErrorCode::Started)),
            Err(End::Broken) => Err(broken()),
        };
        if undecided {
            match o {
                Ok(d) => self.decided = Some(Decided::Confirmed(d)),
                Err(End::Refused) => self.decided = Some(Decided::Refused),
                Err(End::Started) => self.decided = Some(Decided::Started),
                Err(End::Broken) => self.broken_seen = true,
            }
        }
        self.s.on_verdict(v, self.now);
        if !matches!(o, Err(End::Broken)) && undecided {
            assert!(self.s.verdict_deadline().is_none(), "the destination's word decides at once");
        }
    }
}

fn broken() -> MigrateError {
    MigrateError::from(TransportError::Closed("stream 0".into()))
}

fn refused(code: ErrorCode) -> MigrateError {
    MigrateError::from(TransportError::Peer(ErrorMsg { code, message: "no".into() }))
}

fuzz_target!(|input: Input| {
    let streams = usize::from(input.streams % 4) + 1 + usize::from(input.postcopy);
    let prio = input.postcopy.then(|| streams - 1);
    let mut m = Model {
        s: SourceSession::new(input.resumable),
        now: Instant::now(),
        digest: None,
        done_sent: false,
        running: false,
        queued: Vec::new(),
        waiting: false,
        decided: None,
        broken_seen: false,
    };
    for ev in input.events.iter().take(128) {
        match ev {
            Event::Said { stream, said } => {
                let index = usize::from(*stream) % streams;
                let f = match said {
                    Said::Keepalive => Control::Keepalive.encode(),
                    Said::ProbeReply(v) => Control::ProbeReply(v.iter().copied().take(64).collect()).encode(),
                    Said::Request { region, first, count } => {
                        let start = PageIdx(u64::from(*first));
                        let end = PageIdx(start.0 + u64::from(*count % 1024) + 1);
                        let r = PageRange { region: RegionIdx(u32::from(*region % 3)), start, end };
                        Control::PageRequest(r).encode()
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
                let switched = m.s.switched();
                match m.s.on_message(index, is_prio, msg, m.now) {
                    Ok(Heard::ProbeReply(_)) => assert_eq!(index, 0),
                    Ok(Heard::Request(r)) => {
                        assert!(is_prio);
                        if check_request(&REGIONS, r, switched).is_ok() {
                            assert!(switched && !r.is_empty());
                            assert!(r.end.0 <= REGIONS[r.region.0 as usize], "a request outside: {r:?}");
                        }
                    }
                    Ok(Heard::Running) => {
                        assert!(is_prio && switched);
                        assert!(m.s.running_at().is_some());
                        m.running = true;
                    }
                    Ok(Heard::Verified(d)) => {
                        assert!(index == 0 || is_prio);
                        assert!(m.s.settled(), "the verdict settles the session");
                        // The listener ends with it.
                        m.outcome(Ok(d));
                    }
                    Ok(Heard::Received(n)) => {
                        assert!(matches!(said, Said::Received(k) if *k == n) || matches!(said, Said::Raw(_)))
                    }
                    Ok(Heard::Nothing) => {}
                    // The listener ends with the rules' refusal.
                    Err(_) => m.outcome(Err(End::Broken)),
                }
            }
            Event::Switch(round) if input.postcopy && !m.waiting && !m.s.switched() => {
                m.s.switched_over(u64::from(*round));
                assert_eq!(m.s.switch_round(), Some(u64::from(*round)));
            }
            Event::Done { written } if !m.waiting && m.digest.is_none() => {
                let d = Digest(input.digest);
                m.s.done_queued(d);
                m.digest = Some(d);
                if *written {
                    m.s.done_written();
                    m.done_sent = true;
                }
            }
            Event::Outcome(end) => m.outcome(Err(*end)),
            Event::Wait(ms) => {
                m.now += Duration::from_millis(u64::from(*ms));
                if let Some(deadline) = m.s.verdict_deadline() {
                    if m.now >= deadline {
                        m.s.on_timeout(m.now);
                        assert!(m.s.verdict_deadline().is_none(), "the wait ends by its deadline");
                    }
                }
            }
            Event::Lost { kind, given_up } => {
                let e = match kind % 3 {
                    0 => TransportError::Idle("stream 0".into(), Duration::from_secs(30)),
                    1 => TransportError::Closed("stream 0".into()),
                    _ => TransportError::io("stream 0", std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
                };
                let idle = matches!(e, TransportError::Idle(..));
                match m.s.on_lost(&e, *given_up) {
                    Comeback::After(grace) => {
                        assert!(input.resumable && !m.s.settled());
                        assert!(!idle || m.s.switched(), "a silent destination ends a session before the switchover");
                        assert!(grace <= Duration::from_secs(1));
                    }
                    Comeback::No => assert!(!input.resumable || m.s.settled() || (idle && !m.s.switched())),
                }
            }
            Event::RoundsEnd if !m.waiting => {
                let deadline = m.s.await_verdict(input.error_here, m.now);
                assert!(deadline > m.now);
                m.waiting = true;
                for o in std::mem::take(&mut m.queued) {
                    m.outcome(o);
                }
            }
            _ => {}
        }
    }
    if !m.waiting {
        m.s.await_verdict(input.error_here, m.now);
        m.waiting = true;
        for o in std::mem::take(&mut m.queued) {
            m.outcome(o);
        }
    }
    if let Some(deadline) = m.s.verdict_deadline() {
        if input.gone {
            m.s.on_streams_gone();
        } else {
            m.s.on_timeout(deadline);
        }
    }
    assert!(m.s.verdict_deadline().is_none());
    let switched = m.s.switched();
    let end = m.s.settle(input.error_here.then(broken));
    assert!(m.s.settled());
    assert_eq!(m.s.on_lost(&broken_io(), false), Comeback::No, "nothing comes back once settled");
    let handed_over = switched || m.done_sent;
    match &end.outcome {
        Ok(()) => {
            assert!(m.digest.is_some(), "settled before the digest sent was known");
            assert_eq!(m.decided, Some(Decided::Confirmed(m.digest.unwrap())), "settled without the digest confirmed");
        }
        Err(e) => {
            let keeps = e.source_keeps_guest();
            if let Some(Decided::Confirmed(d)) = m.decided {
                assert!(Some(d) != m.digest, "the digest sent was confirmed, yet: {e}");
            }
            if m.running || m.decided == Some(Decided::Started) {
                assert!(!keeps, "the guest started at the destination, the source claims it: {e}");
            } else if m.decided == Some(Decided::Refused) {
                assert!(keeps, "the destination refused before its guest started, the source gives it up: {e}");
            } else if matches!(m.decided, Some(Decided::Confirmed(_))) || handed_over {
                assert!(!keeps, "the destination may hold the guest, the source claims it: {e}");
            } else if input.error_here || m.broken_seen {
                assert!(keeps, "a failure before anything was handed over, the source gives it up: {e}");
            }
            let told = input.resumable && keeps && !handed_over;
            assert_eq!(end.tell_gave_up.is_some(), told, "{e}");
        }
    }
    if end.outcome.is_ok() {
        assert!(end.tell_gave_up.is_none());
    }
});

fn broken_io() -> TransportError {
    TransportError::io("stream 0", std::io::Error::from(std::io::ErrorKind::ConnectionReset))
}
