//! How a relay stream's reading ends, and what that means for the relay
//! (protocol.md §7.4, `super::resume` "The end"), with no sockets, threads
//! or clocks: the stream readers (`super::inbound`) read, and ask here.
//!
//! A stream's reading stops in one of three ways: the other end closed it
//! cleanly, the other end's `Error` arrived, or the connection failed. What
//! that is worth depends on whether the stream's part was done (its flow's
//! `End` read, and the other end's confirmation of this end's flow), on
//! whether the relay failed meanwhile, and on whether the session may take
//! a lost stream back (`CAP_RESUME`). Some answers need one more fact
//! that only time brings — whether the relay fails within a moment (a
//! failing end tells why on stream 0 as it closes every stream), or
//! whether the other end's confirmation arrives within a moment (it may be
//! a stream behind) — and the reader asks again with it.
//!
//! A lost stream that did not come back fails the relay only while this
//! end still owes or awaits something ([`not_back`]).
//!
//! With the reorder window (`super::reassembly`, fuzzed), the resend
//! buffer (`super::resume::Unacked`), and each stream's reader and writer
//! (`super::reader`, `super::writer`), these are the relay's rules; the
//! threads in `super::inbound`, `super::outbound` and `super::resume` move
//! the bytes and carry them out.

use pmigrate_transport::TransportError;

use super::resume::lost;

/// What the reader knew when its stream's reading stopped.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Facts {
    /// The stream's part was done: its `End` read (or it carries no
    /// inbound flow) and the other end's verdict on this end's flow read
    /// where it comes.
    pub(crate) at_end: bool,
    /// The relay failed already.
    pub(crate) failed: bool,
    /// `CAP_RESUME`: a lost stream may come back.
    pub(crate) resumable: bool,
}

/// What the reader does next.
#[derive(Debug)]
pub(crate) enum Step {
    /// The stream is done; nothing is wrong.
    Done,
    /// The relay fails with this.
    Fail(TransportError),
    /// Wait a moment for the relay to fail (its reason then arrives on
    /// another stream): if it does, [`Step::Done`]; if not, fail with this.
    UnlessFailing(TransportError),
    /// Wait a moment for the other end's confirmation of this end's flow:
    /// if it comes, the stream is done and the other end complete (it
    /// closes its streams only then); if not, the stream was lost and is
    /// taken back with this reason.
    UnlessConfirmed(TransportError),
    /// The stream was lost: take it back ([`super::Shared::recover`]).
    Recover(TransportError),
}

/// Reading stream `name` stopped with `cut` (`None`: a clean end of
/// stream), knowing `f`.
pub(crate) fn stream_ended(name: &str, cut: Option<TransportError>, f: Facts) -> Step {
    let early = || TransportError::Closed(format!("{name}: before the end of the stream"));
    if !f.resumable {
        return match cut {
            None if f.at_end || f.failed => Step::Done,
            // The other end's word ends the relay, whatever state it is in.
            Some(e @ TransportError::Peer(_)) => Step::Fail(e),
            Some(_) if f.at_end || f.failed => Step::Done,
            // Cut before the end: a failing end tells why on stream 0 (and
            // the failing stream) as it closes them all, which says more.
            None => Step::UnlessFailing(early()),
            Some(e) => Step::UnlessFailing(e),
        };
    }
    if f.failed {
        return Step::Done;
    }
    match cut {
        // The other end closes its streams only once complete, which is
        // after it confirmed this end's outbound flow: a close before that
        // confirmation arrives is the network's, a lost connection.
        None if f.at_end => Step::UnlessConfirmed(early()),
        None => Step::Recover(early()),
        Some(e) if lost(&e) => Step::Recover(e),
        Some(e) => Step::Fail(e),
    }
}

/// Where the two ends stand, as the relay knows it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ends {
    /// The relay failed.
    pub(crate) failed: bool,
    /// This end is complete (its outbound flow confirmed, its inbound flow
    /// ended and confirmed).
    pub(crate) complete: bool,
    /// The other end is complete too.
    pub(crate) peer_complete: bool,
}

/// What a lost stream that could not be taken back means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Unreturned {
    /// The relay failed meanwhile: that failure is the outcome.
    Aborted,
    /// Nothing more was needed on the stream: both ends are complete.
    Over,
    /// This end has everything and said so; the other end may not have
    /// heard the last of it. Not a failure here (it is logged).
    OverUnheard,
    /// The relay fails: the stream did not come back.
    Fail,
}

/// A lost stream did not come back, the ends standing as `e`.
pub(crate) fn not_back(e: Ends) -> Unreturned {
    if e.failed {
        Unreturned::Aborted
    } else if e.complete && e.peer_complete {
        Unreturned::Over
    } else if e.complete {
        Unreturned::OverUnheard
    } else {
        Unreturned::Fail
    }
}

/// What the other end's verdict on this end's outbound flow says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Confirmed {
    /// It took every chunk: the flow arrived whole.
    Whole,
    /// Its local peer closed after taking some of them: the flow stops
    /// there, and that is no failure (the peer chose to close).
    ClosedEarly,
    /// It names chunks this end did not send, or confirms fewer without
    /// its peer closing: the relay fails with this.
    Wrong(String),
}

/// The verdict `got` chunks (`closed`: its local peer closed) on this
/// end's outbound flow of `chunks` chunks.
pub(crate) fn confirmed(got: u64, closed: bool, chunks: u64) -> Confirmed {
    match (got, closed) {
        (got, false) if got == chunks => Confirmed::Whole,
        (got, true) if got <= chunks => Confirmed::ClosedEarly,
        (got, _) => Confirmed::Wrong(format!("the other end confirmed {got} of {chunks} chunks")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pmigrate_transport::hello::{ErrorCode, ErrorMsg};

    fn peer() -> TransportError {
        TransportError::Peer(ErrorMsg { code: ErrorCode::Aborted, message: "no".into() })
    }

    fn reset() -> TransportError {
        TransportError::io("stream 1: read", std::io::Error::from(std::io::ErrorKind::ConnectionReset))
    }

    fn stalled() -> TransportError {
        TransportError::Idle("stream 1".into(), std::time::Duration::from_secs(30))
    }

    fn facts(at_end: bool, failed: bool, resumable: bool) -> Facts {
        Facts { at_end, failed, resumable }
    }

    fn name(s: &Step) -> &'static str {
        match s {
            Step::Done => "done",
            Step::Fail(_) => "fail",
            Step::UnlessFailing(_) => "unless failing",
            Step::UnlessConfirmed(_) => "unless confirmed",
            Step::Recover(_) => "recover",
        }
    }

    /// Without resumption: a stream's end is fine once its part is done or
    /// the relay failed; the other end's refusal always fails the relay; a
    /// cut before the end fails it unless the relay's own failure (and its
    /// reason) is on its way.
    #[test]
    fn without_resumption_a_cut_before_the_end_fails_the_relay() {
        let at = |cut, at_end, failed| name(&stream_ended("stream 1", cut, facts(at_end, failed, false)));
        assert_eq!(at(None, true, false), "done");
        assert_eq!(at(None, false, true), "done");
        assert_eq!(at(Some(reset()), true, false), "done", "the part was done: a reset after it is moot");
        assert_eq!(at(Some(peer()), true, false), "fail");
        assert_eq!(at(Some(peer()), false, true), "fail");
        assert_eq!(at(None, false, false), "unless failing");
        assert_eq!(at(Some(reset()), false, false), "unless failing");
        let Step::UnlessFailing(e) = stream_ended("stream 1", None, facts(false, false, false)) else { panic!() };
        assert!(e.to_string().contains("stream 1: before the end of the stream"), "{e}");
    }

    /// With resumption: a clean close is the other end's completion only
    /// once its confirmation arrived; otherwise it, and any lost
    /// connection, is taken back; a stall, a broken frame or the peer's
    /// refusal are not lost connections.
    #[test]
    fn with_resumption_a_lost_stream_is_taken_back_and_only_a_confirmed_close_completes() {
        let at = |cut, at_end, failed| name(&stream_ended("stream 1", cut, facts(at_end, failed, true)));
        assert_eq!(at(None, true, false), "unless confirmed");
        assert_eq!(at(None, false, false), "recover");
        assert_eq!(at(Some(reset()), true, false), "recover");
        assert_eq!(at(Some(reset()), false, false), "recover");
        assert_eq!(at(Some(TransportError::Closed("stream 1".into())), false, false), "recover");
        assert_eq!(at(Some(stalled()), false, false), "fail");
        assert_eq!(at(Some(peer()), false, false), "fail");
        // Once the relay failed, every stream just stops.
        for cut in [None, Some(reset()), Some(peer())] {
            assert_eq!(at(cut, false, true), "done");
        }
    }

    /// The verdict on the outbound flow: whole only when it names every
    /// chunk; fewer only with the peer's close; never more.
    #[test]
    fn the_verdict_confirms_the_whole_flow_or_a_close_after_part_of_it() {
        assert_eq!(confirmed(5, false, 5), Confirmed::Whole);
        assert_eq!(confirmed(0, false, 0), Confirmed::Whole);
        assert_eq!(confirmed(3, true, 5), Confirmed::ClosedEarly);
        assert_eq!(confirmed(5, true, 5), Confirmed::ClosedEarly);
        assert!(matches!(confirmed(4, false, 5), Confirmed::Wrong(w) if w.contains("4 of 5")));
        assert!(matches!(confirmed(6, false, 5), Confirmed::Wrong(_)));
        assert!(matches!(confirmed(6, true, 5), Confirmed::Wrong(_)));
    }

    /// A stream that did not come back fails the relay only while this end
    /// still owes or awaits something.
    #[test]
    fn a_stream_not_back_fails_the_relay_only_before_this_end_is_complete() {
        let e = |failed, complete, peer_complete| not_back(Ends { failed, complete, peer_complete });
        assert_eq!(e(true, true, true), Unreturned::Aborted);
        assert_eq!(e(false, true, true), Unreturned::Over);
        assert_eq!(e(false, true, false), Unreturned::OverUnheard);
        assert_eq!(e(false, false, true), Unreturned::Fail);
        assert_eq!(e(false, false, false), Unreturned::Fail);
    }
}
