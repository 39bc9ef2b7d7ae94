//! The source's session as a state machine (protocol.md §7.2, design.md
//! "Who owns the guest"): events in, decisions out, with no sockets,
//! threads or clocks inside. Time comes in as an argument (`now`), the way
//! a timer fires.
//!
//! [`SourceSession`] holds what the whole session knows, whichever thread
//! learns it: whether the switchover went out (and its round), whether
//! `Done` was written and with which digest, whether the destination said
//! its guest runs, and whether the destination's verdict is in. The events:
//!
//! - a message arrived on stream *i* ([`SourceSession::on_message`]): the
//!   rules ([`heard`]) judge it against the session's state;
//! - a local action completed: the switchover was queued
//!   ([`SourceSession::switched_over`]), `Done` was queued and written
//!   ([`SourceSession::done_queued`], [`SourceSession::done_written`]);
//! - a stream's connection was lost ([`SourceSession::on_lost`]), answered
//!   with whether and when to reconnect it;
//! - the rounds ended, here or by failure ([`SourceSession::await_verdict`]),
//!   then each stream's outcome ([`SourceSession::on_verdict`]), its
//!   deadline passing ([`SourceSession::on_timeout`]) or every stream gone
//!   ([`SourceSession::on_streams_gone`]);
//! - the end ([`SourceSession::settle`]): who holds the guest, and whether
//!   a destination waiting for lost streams must hear that none will come.
//!
//! The threaded driver (`super`) moves bytes, runs the rounds and feeds
//! these events; the session is tested here in memory and, against the
//! destination's session, through a network that drops, duplicates,
//! reorders and cuts, in `crate::dest::pair`.
//!
//! A stream's round accounting ([`super::rules::RoundCounter`]) stays with
//! the stream's sender: it concerns that stream alone.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pmigrate_transport::message::{Digest, Message};
use pmigrate_transport::TransportError;

use super::rules::{heard, settle, Heard, NoVerdict, Reached};
use crate::MigrateError;

/// How long the source waits for the destination's verdict once it sent
/// everything: verifying a large guest takes a while.
pub const VERDICT_TIMEOUT: Duration = Duration::from_secs(60);

/// After a failure here: how long the destination's own report of it may
/// take to arrive ("checksum mismatch at the destination" explains more
/// than "broken pipe"). Also how long a broken stream's outcome waits for
/// the destination's word on another stream.
pub const VERDICT_GRACE: Duration = Duration::from_secs(1);

/// Before reconnecting a stream closed cleanly: how long the destination's
/// word (a verdict, or a refusal on another stream) may take to arrive. A
/// clean close is how a destination ends a finished session.
pub const CLOSED_GRACE: Duration = Duration::from_secs(1);

/// Before reconnecting a stream that broke: a refusal on another stream
/// may be on its way.
pub const BROKEN_GRACE: Duration = Duration::from_millis(250);

/// The session the source's threads share, locked (a thread that
/// panicked holding it leaves it as it was: every step keeps it whole).
pub(crate) fn lock(shared: &Mutex<SourceSession>) -> MutexGuard<'_, SourceSession> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// What to do about a lost connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Comeback {
    /// Reconnect the stream once this long passed with the session still
    /// undecided (its verdict not in, nothing failed).
    After(Duration),
    /// The loss is the session's error.
    No,
}

/// What the destination said, or why it said nothing.
pub type Verdict = Result<Result<Digest, MigrateError>, NoVerdict>;

/// The wait for the destination's verdict.
#[derive(Debug)]
enum Wait {
    /// For the first stream's outcome, until the deadline.
    First { deadline: Instant, waited: Duration },
    /// A stream broke (not the destination's refusal): the destination's
    /// word may still come on another, until the deadline.
    Grace { deadline: Instant, broken: MigrateError },
    /// Decided.
    Done(Verdict),
}

/// How the session ended for the guest ([`SourceSession::settle`]).
#[derive(Debug)]
pub struct Settled {
    /// `Ok` when the guest is the destination's; otherwise who holds it.
    pub outcome: Result<(), MigrateError>,
    /// A destination that may wait for lost streams to come back must be
    /// told none will, and why: the guest stays here.
    pub tell_gave_up: Option<String>,
}

/// The source's session state (see the module docs).
#[derive(Debug)]
pub struct SourceSession {
    /// `CAP_RESUME`: lost streams may reconnect.
    resumable: bool,
    /// Post-copy: the round of the switchover, once it went out.
    switch_round: Option<u64>,
    /// What the guest's ownership depends on.
    reached: Reached,
    /// When the destination said its guest runs.
    running_at: Option<Instant>,
    /// The destination's verdict is in: connections closing now are not
    /// lost, and nothing more needs writing.
    settled: bool,
    /// Once the rounds ended.
    wait: Option<Wait>,
}

impl SourceSession {
    /// A session; `resumable` when the destination accepted `CAP_RESUME`.
    pub fn new(resumable: bool) -> Self {
        SourceSession {
            resumable,
            switch_round: None,
            reached: Reached::default(),
            running_at: None,
            settled: false,
            wait: None,
        }
    }

    /// Post-copy: the switchover of round `round` was queued on every
    /// stream. From now on the guest may start at the destination.
    pub fn switched_over(&mut self, round: u64) {
        self.switch_round = Some(round);
        self.reached.switched = true;
    }

    /// Post-copy: the switchover's round, once it went out.
    pub fn switch_round(&self) -> Option<u64> {
        self.switch_round
    }

    /// Whether the switchover went out.
    pub fn switched(&self) -> bool {
        self.switch_round.is_some()
    }

    /// The digest of the memory sent is known: it goes in `Done`, or, in
    /// post-copy, it is what was pushed and answered since the switchover.
    pub fn done_queued(&mut self, digest: Digest) {
        self.reached.digest = Some(digest);
    }

    /// Whether the digest of the memory sent is known.
    pub fn digest_known(&self) -> bool {
        self.reached.digest.is_some()
    }

    /// `Done` was written: the destination may hold everything.
    pub fn done_written(&mut self) {
        self.reached.done_sent = true;
    }

    /// When the destination said its guest runs.
    pub fn running_at(&self) -> Option<Instant> {
        self.running_at
    }

    /// Whether the destination's verdict is in (what is left to write is
    /// moot, and closing connections are not lost).
    pub fn settled(&self) -> bool {
        self.settled
    }

    /// Message `m` arrived on stream `index` (`prio`: the post-copy
    /// priority stream) at `now`: what it means, or why the rules refuse
    /// it. `Verified` settles the session.
    pub fn on_message(
        &mut self,
        index: usize,
        prio: bool,
        m: Message<'_>,
        now: Instant,
    ) -> Result<Heard, MigrateError> {
        let h = heard(index, prio, self.switched(), m)?;
        match h {
            Heard::Running => {
                self.reached.running = true;
                self.running_at.get_or_insert(now);
            }
            Heard::Verified(_) => self.settled = true,
            _ => {}
        }
        Ok(h)
    }

    /// A stream's connection was lost with `e`; `given_up` when the link's
    /// watchdog gave it up (it has nothing more to say). Whether to
    /// reconnect it, and after how long: only in a resumable session not
    /// yet settled, and, before the switchover, not for a destination
    /// silent for the progress timeout (frozen or gone: that ends the
    /// migration and the guest stays here).
    pub fn on_lost(&self, e: &TransportError, given_up: bool) -> Comeback {
        if !self.resumable || self.settled || (!self.switched() && matches!(e, TransportError::Idle(..))) {
            return Comeback::No;
        }
        Comeback::After(if given_up {
            Duration::ZERO
        } else if matches!(e, TransportError::Closed(_)) {
            CLOSED_GRACE
        } else {
            BROKEN_GRACE
        })
    }

    /// The rounds ended at `now`, having sent everything (`failed_here`
    /// false) or not: the wait for the destination's verdict begins. It
    /// returns the wait's deadline.
    pub fn await_verdict(&mut self, failed_here: bool, now: Instant) -> Instant {
        let waited = if failed_here { VERDICT_GRACE } else { VERDICT_TIMEOUT };
        let deadline = now + waited;
        self.wait = Some(Wait::First { deadline, waited });
        deadline
    }

    /// Until when the driver waits for the next stream's outcome; `None`
    /// once the verdict is decided (or the wait has not begun).
    pub fn verdict_deadline(&self) -> Option<Instant> {
        match self.wait {
            Some(Wait::First { deadline, .. } | Wait::Grace { deadline, .. }) => Some(deadline),
            _ => None,
        }
    }

    /// A stream's outcome at `now`: the destination's verdict, its refusal,
    /// or the stream's own failure. A stream that broke may say so before
    /// the destination's word arrives on another: that word decides who
    /// holds the guest, so it is awaited a moment ([`VERDICT_GRACE`]).
    pub fn on_verdict(&mut self, v: Result<Digest, MigrateError>, now: Instant) {
        let broke = |v: &Result<Digest, MigrateError>| matches!(v, Err(e) if !e.is_peer_refusal());
        self.wait = Some(match self.wait.take() {
            Some(Wait::First { .. }) | None if broke(&v) => {
                let Err(broken) = v else { unreachable!("a broken stream") };
                Wait::Grace { deadline: now + VERDICT_GRACE, broken }
            }
            // Another broken stream: the first one's error stands.
            Some(g @ Wait::Grace { .. }) if broke(&v) => g,
            Some(Wait::First { .. } | Wait::Grace { .. }) | None => Wait::Done(Ok(v)),
            // Decided already: later outcomes change nothing.
            Some(done @ Wait::Done(_)) => done,
        });
        if let Some(Wait::Done(Ok(Ok(_)))) = self.wait {
            self.settled = true;
        }
    }

    /// The wait's deadline passed at `now` (earlier calls change nothing).
    pub fn on_timeout(&mut self, now: Instant) {
        self.wait = Some(match self.wait.take() {
            Some(Wait::First { deadline, waited }) if now >= deadline => Wait::Done(Err(NoVerdict::Timeout(waited))),
            Some(Wait::Grace { deadline, broken }) if now >= deadline => Wait::Done(Ok(Err(broken))),
            Some(w) => w,
            None => Wait::Done(Err(NoVerdict::Timeout(Duration::ZERO))),
        });
    }

    /// Every stream's listener ended: no outcome will come any more.
    pub fn on_streams_gone(&mut self) {
        self.wait = Some(match self.wait.take() {
            Some(Wait::Grace { broken, .. }) => Wait::Done(Ok(Err(broken))),
            Some(done @ Wait::Done(_)) => done,
            Some(Wait::First { .. }) | None => Wait::Done(Err(NoVerdict::Gone)),
        });
    }

    /// The end, with `error` what failed here: who holds the guest (the
    /// ownership rule, [`super::rules::settle`]). The session is settled
    /// from now on, whatever the outcome.
    pub fn settle(&mut self, error: Option<MigrateError>) -> Settled {
        self.settled = true;
        let verdict = match self.wait.take() {
            Some(Wait::Done(v)) => v,
            Some(Wait::Grace { broken, .. }) => Ok(Err(broken)),
            Some(Wait::First { waited, .. }) => Err(NoVerdict::Timeout(waited)),
            None => Err(NoVerdict::Gone),
        };
        let outcome = settle(self.reached, error, verdict);
        let r = self.reached;
        let tell_gave_up = match &outcome {
            Err(e) if self.resumable && !r.switched && !r.done_sent && e.source_keeps_guest() => {
                Some(format!("the source gave up: {}", crate::describe(e)))
            }
            _ => None,
        };
        Settled { outcome, tell_gave_up }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pmigrate_transport::hello::{ErrorCode, ErrorMsg};
    use pmigrate_transport::message::{Control, Round};

    fn refusal() -> MigrateError {
        TransportError::Peer(ErrorMsg { code: ErrorCode::Digest, message: "no".into() }).into()
    }

    fn broken() -> MigrateError {
        TransportError::Closed("stream 1".into()).into()
    }

    /// A pre-copy session that sent everything, with digest 7.
    fn sent_all(resumable: bool) -> SourceSession {
        let mut s = SourceSession::new(resumable);
        s.done_queued(Digest(7));
        s.done_written();
        s
    }

    fn verified(d: u64) -> Message<'static> {
        Message::Control(Control::Verified { value: d, closed: false })
    }

    #[test]
    fn the_verdict_on_stream_0_settles_and_gives_the_guest_away() {
        let t = Instant::now();
        let mut s = sent_all(false);
        assert_eq!(s.on_message(0, false, verified(7), t).unwrap(), Heard::Verified(Digest(7)));
        assert!(s.settled(), "writers stop once the verdict is in");
        let deadline = s.await_verdict(false, t);
        assert_eq!(deadline, t + VERDICT_TIMEOUT);
        s.on_verdict(Ok(Digest(7)), t);
        assert_eq!(s.verdict_deadline(), None);
        let end = s.settle(None);
        assert!(end.outcome.is_ok() && end.tell_gave_up.is_none());
    }

    /// A broken stream's outcome comes first; the destination's own word,
    /// on another stream within the grace, decides.
    #[test]
    fn the_destinations_word_outranks_a_broken_stream_within_the_grace() {
        let t = Instant::now();
        for (late, guest_is_theirs) in [(Ok(Digest(7)), true), (Err(refusal()), false)] {
            let mut s = sent_all(false);
            s.await_verdict(false, t);
            s.on_verdict(Err(broken()), t);
            assert_eq!(s.verdict_deadline(), Some(t + VERDICT_GRACE));
            // Another broken stream (a duplicate of the loss) changes nothing.
            s.on_verdict(Err(broken()), t + Duration::from_millis(10));
            assert_eq!(s.verdict_deadline(), Some(t + VERDICT_GRACE));
            s.on_verdict(late, t + Duration::from_millis(500));
            let e = s.settle(None).outcome;
            assert_eq!(e.is_ok(), guest_is_theirs, "{e:?}");
            if let Err(e) = e {
                assert!(e.is_peer_refusal() && e.source_keeps_guest(), "{e}");
            }
        }
    }

    /// Past the grace the broken stream's error stands: everything was
    /// sent, so nobody knows whether the guest started there.
    #[test]
    fn a_broken_stream_and_then_silence_leaves_the_outcome_unknown() {
        let t = Instant::now();
        let mut s = sent_all(false);
        s.await_verdict(false, t);
        s.on_verdict(Err(broken()), t);
        s.on_timeout(t + Duration::from_millis(999));
        assert!(s.verdict_deadline().is_some(), "a timer that fired early changes nothing");
        s.on_timeout(t + VERDICT_GRACE);
        // A verdict after the wait was decided does not reopen it.
        s.on_verdict(Ok(Digest(7)), t + Duration::from_secs(2));
        let e = s.settle(None).outcome.unwrap_err();
        assert!(matches!(e, MigrateError::Unconfirmed(_)), "{e}");
    }

    #[test]
    fn no_verdict_within_the_timeout_or_every_stream_gone_is_unconfirmed() {
        let t = Instant::now();
        let mut s = sent_all(false);
        let deadline = s.await_verdict(false, t);
        s.on_timeout(deadline);
        let e = s.settle(None).outcome.unwrap_err();
        assert!(e.to_string().contains(&format!("none within {VERDICT_TIMEOUT:?}")), "{e}");
        let mut s = sent_all(false);
        s.await_verdict(false, t);
        s.on_streams_gone();
        let e = s.settle(None).outcome.unwrap_err();
        assert!(matches!(e, MigrateError::Unconfirmed(_)) && e.to_string().contains("every stream closed"), "{e}");
    }

    /// A failure here before `Done`: the destination's report is awaited
    /// only briefly, the guest stays here, and a resumable destination is
    /// told no stream will come back.
    #[test]
    fn a_failure_before_done_keeps_the_guest_and_tells_a_waiting_destination() {
        let t = Instant::now();
        for resumable in [false, true] {
            let mut s = SourceSession::new(resumable);
            assert_eq!(s.await_verdict(true, t), t + VERDICT_GRACE);
            s.on_streams_gone();
            let end = s.settle(Some(broken()));
            let e = end.outcome.unwrap_err();
            assert!(e.source_keeps_guest(), "{e}");
            assert_eq!(end.tell_gave_up.is_some(), resumable);
            assert!(s.settled());
        }
        // After `Done` nobody knows, so nothing is said.
        let mut s = sent_all(true);
        s.await_verdict(true, t);
        s.on_timeout(t + VERDICT_GRACE);
        let end = s.settle(Some(broken()));
        assert!(end.tell_gave_up.is_none());
        assert!(!end.outcome.unwrap_err().source_keeps_guest());
    }

    /// Reconnecting: only in a resumable session, never once settled, and
    /// before the switchover not for a destination gone silent.
    #[test]
    fn a_lost_stream_comes_back_only_while_the_session_is_undecided() {
        let idle = TransportError::Idle("stream 1".into(), Duration::from_secs(30));
        let closed = TransportError::Closed("stream 1".into());
        let io = TransportError::io("stream 1", std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(SourceSession::new(false).on_lost(&io, false), Comeback::No);
        let mut s = SourceSession::new(true);
        assert_eq!(s.on_lost(&io, false), Comeback::After(BROKEN_GRACE));
        assert_eq!(s.on_lost(&closed, false), Comeback::After(CLOSED_GRACE));
        assert_eq!(s.on_lost(&io, true), Comeback::After(Duration::ZERO));
        assert_eq!(s.on_lost(&idle, false), Comeback::No, "frozen or gone before the switchover");
        s.switched_over(3);
        assert_eq!(s.switch_round(), Some(3));
        assert_eq!(s.on_lost(&idle, false), Comeback::After(BROKEN_GRACE), "after it, pages are still owed");
        s.on_verdict(Ok(Digest(1)), Instant::now());
        assert_eq!(s.on_lost(&io, false), Comeback::No, "settled");
    }

    /// Post-copy: the destination's "running" counts only after the
    /// switchover, and from then on a failure leaves the guest there.
    #[test]
    fn running_at_the_destination_hands_the_guest_over() {
        let t = Instant::now();
        let marker = || Message::Control(Control::Switchover { round: Round(2), last: true, need: None });
        let mut s = SourceSession::new(true);
        assert!(s.on_message(2, true, marker(), t).is_err(), "no guest runs there before the switchover");
        s.switched_over(2);
        s.done_queued(Digest(7));
        assert_eq!(s.on_message(2, true, marker(), t).unwrap(), Heard::Running);
        assert_eq!(s.running_at(), Some(t));
        // A duplicate keeps the first time.
        s.on_message(2, true, marker(), t + Duration::from_secs(1)).unwrap();
        assert_eq!(s.running_at(), Some(t));
        s.await_verdict(true, t);
        s.on_streams_gone();
        let end = s.settle(Some(broken()));
        assert!(matches!(end.outcome, Err(MigrateError::HandedOver(_))), "{:?}", end.outcome);
        assert!(end.tell_gave_up.is_none());
    }
}
