//! The source's protocol rules (protocol.md §7.2, design.md "Who owns the
//! guest"), with no sockets, threads or clocks: how a stream accounts for
//! its rounds, what the destination may say on which stream, and what the
//! end of a session means for the guest.
//!
//! The threaded driver in `super` moves bytes and carries these out; the
//! rules are tested in memory here and, against the destination's rules,
//! in `crate::dest::pair`.

use pmigrate_ranges::PageRange;
use pmigrate_transport::frame::FrameKind;
use pmigrate_transport::message::{Control, Digest, Message, Round};
use pmigrate_transport::TransportError;

use crate::MigrateError;

/// What one stream sent of the current round: its `RoundEnd` counts the
/// `Pages` frames it carried.
#[derive(Debug, Default)]
pub struct RoundCounter {
    frames: u64,
}

impl RoundCounter {
    /// A `Pages` frame went out.
    pub fn sent_pages(&mut self) {
        self.frames += 1;
    }

    /// The stream's `RoundEnd` of `round`; the count starts again.
    pub fn end(&mut self, round: u64, last: bool) -> Control<'static> {
        let frames = std::mem::take(&mut self.frames);
        Control::RoundEnd { round: Round(round), frames, last }
    }
}

/// What the destination said on a stream, once the rules accepted it.
#[derive(Debug, PartialEq, Eq)]
pub enum Heard {
    /// Nothing (a keepalive).
    Nothing,
    /// Stream 0: the answer to the probe in flight.
    ProbeReply(Vec<u64>),
    /// The priority stream: a vCPU waits on the first of these pages.
    Request(PageRange),
    /// The priority stream: the guest runs at the destination.
    Running,
    /// Stream 0 (pre-copy) or the priority stream (post-copy): the
    /// destination holds memory of this digest and runs the guest.
    Verified(Digest),
    /// Any stream, at any time: the destination received this many frames
    /// of it (§7.2.3).
    Received(u64),
}

/// What the destination may say on stream `index`; `prio` tells whether it
/// is the post-copy priority stream, `switched` whether the switchover
/// went out (before it, no guest can run at the destination).
pub fn heard(index: usize, prio: bool, switched: bool, m: Message<'_>) -> Result<Heard, MigrateError> {
    let unexpected = |kind: FrameKind| TransportError::Unexpected { what: format!("stream {index}"), kind }.into();
    match m {
        Message::Control(Control::Keepalive) => Ok(Heard::Nothing),
        Message::Control(Control::Received { frames }) => Ok(Heard::Received(frames)),
        Message::Control(Control::ProbeReply(v)) if index == 0 => Ok(Heard::ProbeReply(v)),
        Message::Control(Control::PageRequest(r)) if prio => Ok(Heard::Request(r)),
        Message::Control(Control::Switchover { last: true, need: None, .. }) if prio && switched => Ok(Heard::Running),
        // (`closed` belongs to stream mode.)
        Message::Control(Control::Verified { value, closed: false }) if index == 0 || prio => {
            Ok(Heard::Verified(Digest(value)))
        }
        m => Err(unexpected(m.kind())),
    }
}

/// A post-copy page request the rules refuse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadRequest {
    /// It names a region that does not exist.
    #[error("page request for region {region}, which does not exist")]
    NoRegion {
        /// The region index asked for.
        region: u32,
    },
    /// It names no page, or pages past the end of the region.
    #[error("page request for pages {start}..{end} of region {region}")]
    Outside {
        /// The region index.
        region: u32,
        /// First page asked for.
        start: u64,
        /// One past the last page asked for.
        end: u64,
    },
    /// It came before the switchover, when no guest runs at the
    /// destination.
    #[error("page request before the switchover")]
    BeforeSwitchover,
}

/// Checks a post-copy page request against the region table (`pages`:
/// pages per region) before any page is read for it: it must come after
/// the switchover and name pages that exist.
pub fn check_request(pages: &[u64], req: PageRange, switched: bool) -> Result<(), BadRequest> {
    let region = req.region.0;
    let Some(&len) = pages.get(req.region.as_usize()) else {
        return Err(BadRequest::NoRegion { region });
    };
    if req.is_empty() || req.end.0 > len {
        return Err(BadRequest::Outside { region, start: req.start.0, end: req.end.0 });
    }
    if !switched {
        return Err(BadRequest::BeforeSwitchover);
    }
    Ok(())
}

/// How far a session got, as the source knows it when it ends.
#[derive(Clone, Copy, Debug, Default)]
pub struct Reached {
    /// The digest of the memory this end sent (in `Done`, or, post-copy,
    /// as pushed and answered since the switchover), once known.
    pub digest: Option<Digest>,
    /// Post-copy: the switchover went out, so the guest may start at the
    /// destination once every stream's marker arrived there.
    pub switched: bool,
    /// Post-copy: the destination said its guest runs.
    pub running: bool,
    /// `Done` was written: the destination may hold everything.
    pub done_sent: bool,
}

/// Why the destination's verdict is missing.
#[derive(Debug, thiserror::Error)]
pub enum NoVerdict {
    /// It did not come within this long.
    #[error("none within {0:?}")]
    Timeout(std::time::Duration),
    /// Every stream's listener ended without one.
    #[error("every stream closed without one")]
    Gone,
}

/// Why nobody knows whether the guest started at the destination
/// ([`MigrateError::Unconfirmed`]).
#[derive(Debug)]
pub enum NoConfirmation {
    /// No verdict came, and nothing failed here.
    Missing(NoVerdict),
    /// The destination confirmed memory of another digest.
    OtherDigest {
        /// The digest it confirmed.
        confirmed: Digest,
        /// The digest of the memory this end sent.
        sent: Digest,
    },
    /// The destination confirmed a digest before this end finished sending.
    Early {
        /// The digest it confirmed.
        confirmed: Digest,
    },
    /// The switchover went out, then this failed, and the destination did
    /// not say whether its guest started.
    AfterSwitchover(Box<MigrateError>),
    /// Everything was sent, then this failed before the verdict came.
    AfterDone(Box<MigrateError>),
}

impl From<NoVerdict> for NoConfirmation {
    fn from(v: NoVerdict) -> Self {
        NoConfirmation::Missing(v)
    }
}

impl std::fmt::Display for NoConfirmation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoConfirmation::Missing(v) => write!(f, "{v}"),
            NoConfirmation::OtherDigest { confirmed, sent } => {
                write!(f, "it confirmed digest {confirmed}, this end sent {sent}")
            }
            NoConfirmation::Early { confirmed } => {
                write!(f, "it confirmed digest {confirmed} before this end finished sending")
            }
            NoConfirmation::AfterSwitchover(e) => {
                write!(f, "the switchover went out and the destination did not say whether its guest started ({e})")
            }
            NoConfirmation::AfterDone(e) => write!(f, "{e}"),
        }
    }
}

// By hand, not derived: the source of the last two is the boxed
// `MigrateError` itself (a derive would give the `Box`, which a caller
// cannot downcast to `MigrateError`).
impl std::error::Error for NoConfirmation {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            NoConfirmation::Missing(v) => v.source(),
            NoConfirmation::OtherDigest { .. } | NoConfirmation::Early { .. } => None,
            NoConfirmation::AfterSwitchover(e) | NoConfirmation::AfterDone(e) => Some(&**e),
        }
    }
}

/// The end of a session for the guest (the ownership rule): `Ok` only when
/// the destination confirmed the very memory this end sent, so the guest
/// is its now; otherwise the error says who holds it. `error` is what
/// failed here; `verdict` what the destination said, or why nothing.
pub fn settle(
    reached: Reached,
    error: Option<MigrateError>,
    verdict: Result<Result<Digest, MigrateError>, NoVerdict>,
) -> Result<(), MigrateError> {
    let verdict = match (error, verdict) {
        // `Verified` means the destination holds it all and runs it.
        (_, Ok(Ok(d))) => Ok(d),
        // What the destination said, or what its streams showed, explains
        // more than what failed here in consequence.
        (_, Ok(Err(v))) => Err(v),
        (Some(e), Err(_)) => Err(e),
        (None, Err(missing)) => Err(MigrateError::Unconfirmed(missing.into())),
    };
    match verdict {
        // The destination claims the guest with other memory.
        Ok(confirmed) if Some(confirmed) != reached.digest => Err(MigrateError::Unconfirmed(match reached.digest {
            Some(sent) => NoConfirmation::OtherDigest { confirmed, sent },
            None => NoConfirmation::Early { confirmed },
        })),
        Ok(_) => Ok(()),
        // The guest started at the destination: it is the destination's,
        // incomplete.
        Err(e) if reached.running || e.guest_started_at_peer() => Err(MigrateError::HandedOver(Box::new(e))),
        // Any other refusal from the destination means its guest never
        // started: the source keeps it, switchover or not.
        Err(e) if e.is_peer_refusal() => Err(e),
        Err(e @ MigrateError::Unconfirmed(_)) => Err(e),
        // The switchover went out and the destination fell silent: its
        // guest may have started, or not.
        Err(e) if reached.switched => Err(MigrateError::Unconfirmed(NoConfirmation::AfterSwitchover(Box::new(e)))),
        // Everything was sent: without the destination's own refusal,
        // nobody knows whether the guest started there.
        Err(e) if reached.done_sent => Err(MigrateError::Unconfirmed(NoConfirmation::AfterDone(Box::new(e)))),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pmigrate_ranges::{PageIdx, RegionIdx};
    use pmigrate_transport::hello::{ErrorCode, ErrorMsg};

    fn refusal() -> MigrateError {
        TransportError::Peer(ErrorMsg { code: ErrorCode::Digest, message: "no".into() }).into()
    }

    fn started_there() -> MigrateError {
        TransportError::Peer(ErrorMsg { code: ErrorCode::Started, message: "lost".into() }).into()
    }

    fn broken() -> MigrateError {
        TransportError::Closed("stream 0".into()).into()
    }

    #[test]
    fn a_round_end_counts_what_its_stream_sent_and_starts_again() {
        let mut c = RoundCounter::default();
        c.sent_pages();
        c.sent_pages();
        assert_eq!(c.end(0, false), Control::RoundEnd { round: Round(0), frames: 2, last: false });
        assert_eq!(c.end(1, true), Control::RoundEnd { round: Round(1), frames: 0, last: true });
    }

    #[test]
    fn a_request_names_existing_pages_after_the_switchover() {
        let r = |region, start, end| PageRange { region: RegionIdx(region), start: PageIdx(start), end: PageIdx(end) };
        let pages = [8, 4];
        assert!(check_request(&pages, r(1, 0, 4), true).is_ok());
        let past_the_end = check_request(&pages, r(1, 0, 5), true).unwrap_err();
        assert_eq!(past_the_end, BadRequest::Outside { region: 1, start: 0, end: 5 });
        assert!(past_the_end.to_string().contains("pages 0..5 of region 1"));
        assert_eq!(check_request(&pages, r(2, 0, 1), true), Err(BadRequest::NoRegion { region: 2 }));
        assert_eq!(check_request(&pages, r(0, 3, 3), true), Err(BadRequest::Outside { region: 0, start: 3, end: 3 }));
        assert_eq!(check_request(&pages, r(0, 0, 1), false), Err(BadRequest::BeforeSwitchover));
    }

    #[test]
    fn each_answer_comes_on_its_own_stream() {
        let req = PageRange { region: RegionIdx(0), start: PageIdx(3), end: PageIdx(4) };
        let ok = |i, prio, c: Control<'_>| heard(i, prio, true, Message::Control(c)).ok();
        assert_eq!(ok(0, false, Control::ProbeReply(vec![1])), Some(Heard::ProbeReply(vec![1])));
        assert_eq!(ok(1, false, Control::ProbeReply(vec![1])), None);
        assert_eq!(ok(2, true, Control::PageRequest(req)), Some(Heard::Request(req)));
        assert_eq!(ok(0, false, Control::PageRequest(req)), None);
        let marker = || Control::Switchover { round: Round(1), last: true, need: None };
        assert_eq!(ok(2, true, marker()), Some(Heard::Running));
        assert!(heard(2, true, false, Message::Control(marker())).is_err(), "running before the switchover");
        assert_eq!(ok(0, false, marker()), None);
        assert_eq!(ok(2, true, Control::Switchover { round: Round(1), last: false, need: None }), None);
        assert_eq!(ok(0, false, Control::Verified { value: 5, closed: false }), Some(Heard::Verified(Digest(5))));
        assert_eq!(ok(0, false, Control::Verified { value: 5, closed: true }), None);
        assert_eq!(ok(1, false, Control::Verified { value: 5, closed: false }), None);
        assert_eq!(ok(0, false, Control::Done(Digest(1))), None);
        assert_eq!(ok(0, false, Control::Keepalive), Some(Heard::Nothing));
        // Acknowledgements come on every stream, before and after the
        // switchover.
        for (i, prio) in [(0, false), (1, false), (2, true)] {
            assert_eq!(ok(i, prio, Control::Received { frames: 7 }), Some(Heard::Received(7)));
            let before = heard(i, prio, false, Message::Control(Control::Received { frames: 7 })).ok();
            assert_eq!(before, Some(Heard::Received(7)));
        }
    }

    /// An unknown outcome says why, and keeps what failed as its cause.
    #[test]
    fn an_unconfirmed_end_keeps_its_reason() {
        let done = Reached { digest: Some(Digest(7)), done_sent: true, ..Reached::default() };
        let e = settle(done, None, Ok(Ok(Digest(8)))).unwrap_err();
        assert!(
            matches!(
                e,
                MigrateError::Unconfirmed(NoConfirmation::OtherDigest { confirmed: Digest(8), sent: Digest(7) })
            ),
            "{e}"
        );
        let e = settle(done, Some(broken()), Err(NoVerdict::Gone)).unwrap_err();
        let MigrateError::Unconfirmed(why) = &e else { panic!("{e}") };
        let cause = std::error::Error::source(why).and_then(|c| c.downcast_ref::<MigrateError>());
        assert!(matches!(cause, Some(MigrateError::Transport(TransportError::Closed(_)))), "{e}");
        assert!(
            e.to_string().starts_with("no verdict from the destination (stream 0: connection closed by peer)"),
            "{e}"
        );
    }

    /// The ownership rule, case by case: who holds the guest after each
    /// way a session can end.
    #[test]
    fn only_the_confirmation_of_the_memory_sent_gives_the_guest_away() {
        let sent = Reached { digest: Some(Digest(7)), ..Reached::default() };
        let done = Reached { done_sent: true, ..sent };
        let switched = Reached { switched: true, ..done };
        let running = Reached { running: true, ..switched };
        let unknown = |e: &MigrateError| matches!(e, MigrateError::Unconfirmed(_)) && !e.source_keeps_guest();
        let handed = |e: &MigrateError| matches!(e, MigrateError::HandedOver(_)) && !e.source_keeps_guest();
        // Confirmed, with the digest sent: the destination owns it.
        assert!(settle(done, None, Ok(Ok(Digest(7)))).is_ok());
        assert!(settle(running, None, Ok(Ok(Digest(7)))).is_ok());
        // Confirmed even though a stream broke here afterwards.
        assert!(settle(done, Some(broken()), Ok(Ok(Digest(7)))).is_ok());
        // Confirmed with other memory, or before this end knew what it
        // sent: nobody knows.
        assert!(unknown(&settle(done, None, Ok(Ok(Digest(8)))).unwrap_err()));
        let e = settle(Reached { digest: None, ..running }, None, Ok(Ok(Digest(7)))).unwrap_err();
        assert!(unknown(&e), "{e}");
        // Refused by the destination: the source keeps it, after a
        // post-copy switchover too (the destination's guest never started).
        for reached in [done, switched] {
            let e = settle(reached, None, Ok(Err(refusal()))).unwrap_err();
            assert!(e.is_peer_refusal() && e.source_keeps_guest(), "{e}");
        }
        // A failure before `Done`: the source keeps it.
        let e = settle(sent, Some(broken()), Err(NoVerdict::Gone)).unwrap_err();
        assert!(e.source_keeps_guest(), "{e}");
        // Everything sent, or the switchover, and then silence or a broken
        // stream: nobody knows.
        for e in [
            settle(done, None, Err(NoVerdict::Timeout(std::time::Duration::from_secs(60)))).unwrap_err(),
            settle(done, Some(broken()), Err(NoVerdict::Gone)).unwrap_err(),
            settle(done, None, Ok(Err(broken()))).unwrap_err(),
            settle(switched, Some(broken()), Err(NoVerdict::Gone)).unwrap_err(),
            settle(switched, None, Ok(Err(broken()))).unwrap_err(),
        ] {
            assert!(unknown(&e), "{e}");
        }
        // Once the guest started at the destination (its marker came, or
        // its refusal says so), it is the destination's, incomplete.
        for e in [
            settle(running, None, Ok(Err(refusal()))).unwrap_err(),
            settle(running, Some(broken()), Err(NoVerdict::Timeout(std::time::Duration::ZERO))).unwrap_err(),
            settle(switched, None, Ok(Err(started_there()))).unwrap_err(),
        ] {
            assert!(handed(&e), "{e}");
        }
    }
}
