//! The destination's session as a state machine (protocol.md §7.2), with
//! no sockets, threads or clocks: what each message on each stream means,
//! whether it may come now, how long a lost stream may take to come back,
//! what the end of a session proves, and when the source heard it. Time
//! comes in as an argument, the way a timer fires.
//!
//! [`DestSession`] takes one typed message at a time, with the index of the
//! stream it came on, and answers with a [`Step`] — place these pages,
//! answer this probe, note this bitmap piece, this stream reached its
//! switchover marker or its end — or refuses the message. The threaded
//! driver in `super` moves bytes and carries the steps out; everything it
//! decides about the peer's messages is decided here, so it is tested in
//! memory (`super::pair`) and fuzzed (`fuzz/fuzz_targets/dest_session.rs`).
//!
//! The rules, per stream: pages belong to the stream's current round; a
//! `RoundEnd` names that round and counts the `Pages` frames the stream
//! carried in it (a count may fall short only when the connection was
//! replaced in that round, after a post-copy switchover: before it, the
//! source sends again what a lost connection swallowed); after the final
//! `RoundEnd` a stream other than 0 is done and stream 0 waits for `Done`.
//! Probes come on stream 0 only, and only about regions offered for
//! handover. In post-copy, every stream reaches the same switchover round,
//! bitmap pieces come on stream 0 only and cover existing pages, and
//! `Done` may follow the marker directly (its `RoundEnd` may have been
//! lost with a connection). At the end, every bulk stream must have ended
//! the same final round and stream 0's digest must equal the one of the
//! memory placed; only then is `Verified` sent.
//!
//! The timers: a stream lost while it may come back is awaited within
//! [`RESUME_WINDOW`] and while the session shows life on another stream
//! ([`DestSession::comeback_wait`]). After `Verified`, a resumable
//! session makes sure the source heard it ([`Confirm`]).

use std::time::{Duration, Instant};

use pmigrate_ranges::{PageRange, RegionIdx};
use pmigrate_transport::frame::{Encoding, FrameKind};
use pmigrate_transport::hello::ErrorCode;
use pmigrate_transport::message::{Control, Digest, Message, NeedBitmap, PagesFrame, ProbeAsk, Round};
use pmigrate_transport::TransportError;

use crate::MigrateError;

/// What the session agreed, as far as the rules need it.
#[derive(Clone, Debug)]
pub struct Shape {
    /// Pages of each region, in order.
    pub pages: Vec<u64>,
    /// Per region: offered for handover, so probes may ask about it.
    pub offered: Vec<bool>,
    /// lz4-encoded pages are allowed.
    pub lz4: bool,
    /// A post-copy session: the last stream is the priority stream.
    pub postcopy: bool,
    /// How many streams.
    pub streams: usize,
}

impl Shape {
    /// The priority stream, in post-copy.
    pub fn prio(&self) -> Option<usize> {
        self.postcopy.then(|| self.streams - 1)
    }

    /// Refuses pages outside the region table before anything looks at
    /// them.
    pub fn check_range(&self, stream: usize, r: PageRange) -> Result<(), MigrateError> {
        let Some(&pages) = self.pages.get(r.region.as_usize()) else {
            return Err(protocol(stream, format!("region {} does not exist", r.region.0)));
        };
        if r.start.0 > r.end.0 || r.end.0 > pages {
            return Err(protocol(
                stream,
                format!("pages {}..{} are outside region {} of {pages} pages", r.start.0, r.end.0, r.region.0),
            ));
        }
        Ok(())
    }
}

/// What the driver does with a message the rules accepted.
#[derive(Debug)]
pub enum Step<'a> {
    /// Nothing (a keepalive).
    Nothing,
    /// Open the frame and place its pages with `stamp` (1 + their round);
    /// `post`: through post-copy placement (only pages still needed).
    Place {
        /// The frame, range already checked.
        frame: PagesFrame<'a>,
        /// The stamp of its copies.
        stamp: u32,
        /// The stream is past its switchover marker.
        post: bool,
    },
    /// Read these places of an offered region through this end's own
    /// mapping and answer with a `ProbeReply` on the same stream.
    Answer {
        /// The region, offered for handover.
        region: RegionIdx,
        /// What to read.
        ask: ProbeAsk,
        /// Where.
        places: Vec<u64>,
    },
    /// Post-copy: these pages must not be used until they arrive.
    Need(NeedBitmap<'a>),
    /// Post-copy: this stream reached its switchover marker.
    Marker,
    /// This stream's part is over: the final `RoundEnd` of a stream other
    /// than 0, or `Done` on stream 0.
    End,
}

/// Each stream's place in the session.
#[derive(Clone, Debug, Default)]
struct StreamState {
    round: u64,
    frames_in_round: u64,
    /// The connection was replaced in this round: frames may be missing.
    lossy: bool,
    /// The final `RoundEnd` arrived.
    finished: bool,
    /// Post-copy: the switchover marker arrived.
    switched: bool,
    /// The stream's part is over ([`Step::End`] was given).
    ended: bool,
    final_round: Option<u64>,
    pages: u64,
}

/// The destination's rules for one session: every stream's state and what
/// they must agree on.
#[derive(Debug)]
pub struct DestSession {
    shape: Shape,
    streams: Vec<StreamState>,
    /// Post-copy: the round of the first switchover marker or piece.
    switch_round: Option<u64>,
    /// Stream 0's `Done`.
    digest: Option<Digest>,
}

pub(crate) fn protocol(stream: usize, why: impl Into<String>) -> MigrateError {
    MigrateError::Protocol { stream, why: why.into() }
}

fn unexpected(stream: usize, kind: FrameKind) -> MigrateError {
    TransportError::Unexpected { what: format!("stream {stream}"), kind }.into()
}

impl DestSession {
    /// The rules of a session of this shape, before its first message.
    pub fn new(shape: Shape) -> Self {
        let streams = vec![StreamState::default(); shape.streams];
        Self { shape, streams, switch_round: None, digest: None }
    }

    /// Stream `stream` brought `m`.
    pub fn on_message<'a>(&mut self, stream: usize, m: Message<'a>) -> Result<Step<'a>, MigrateError> {
        let shape = &self.shape;
        let Some(st) = self.streams.get_mut(stream) else {
            return Err(protocol(stream, "no such stream"));
        };
        if st.ended {
            return Err(unexpected(stream, m.kind()));
        }
        match m {
            Message::Control(Control::Keepalive) => Ok(Step::Nothing),
            Message::Pages(frame) if !st.finished => {
                let round = frame.round().0;
                if round != st.round {
                    return Err(protocol(stream, format!("page frame of round {round} during round {}", st.round)));
                }
                let stamp = u32::try_from(st.round + 1).map_err(|_| protocol(stream, "too many rounds"))?;
                if frame.encoding() == Encoding::Lz4 && !shape.lz4 {
                    return Err(protocol(stream, "lz4 pages without the capability"));
                }
                shape.check_range(stream, frame.range())?;
                st.frames_in_round += 1;
                st.pages += u64::from(frame.count());
                Ok(Step::Place { frame, stamp, post: st.switched })
            }
            Message::Control(Control::RoundEnd { round: Round(round), frames, last }) if !st.finished => {
                if round != st.round || (frames != st.frames_in_round && !st.lossy) {
                    return Err(protocol(
                        stream,
                        format!(
                            "round {round} ended after {frames} frames; received round {} with {}",
                            st.round, st.frames_in_round
                        ),
                    ));
                }
                st.round += 1;
                st.frames_in_round = 0;
                st.lossy = false;
                if !last {
                    return Ok(Step::Nothing);
                }
                st.finished = true;
                st.final_round = Some(round);
                if stream == 0 {
                    return Ok(Step::Nothing); // `Done` follows
                }
                st.ended = true;
                Ok(Step::End)
            }
            Message::Control(Control::Probe { region, ask, places }) if !st.finished && stream == 0 => {
                if !shape.offered.get(region.as_usize()).copied().unwrap_or(false) {
                    return Err(protocol(stream, format!("probe of region {}, not offered for handover", region.0)));
                }
                Ok(Step::Answer { region, ask, places })
            }
            Message::Control(Control::Switchover { round: Round(round), last, need })
                if !st.finished && !st.switched && shape.postcopy =>
            {
                if round != st.round {
                    return Err(protocol(stream, format!("switchover at round {round} during round {}", st.round)));
                }
                match self.switch_round {
                    Some(other) if other != round => {
                        return Err(protocol(stream, format!("switchover at round {round}, another at {other}")))
                    }
                    _ => self.switch_round = Some(round),
                }
                if let Some(need) = need {
                    if stream != 0 {
                        return Err(protocol(stream, "switchover bitmap on a stream other than 0"));
                    }
                    if last {
                        return Err(protocol(stream, "a switchover marker carrying a bitmap"));
                    }
                    shape.check_range(stream, need.range)?;
                    return Ok(Step::Need(need));
                }
                if !last {
                    return Err(protocol(stream, "an empty switchover piece"));
                }
                st.switched = true;
                Ok(Step::Marker)
            }
            // In post-copy the `RoundEnd` before `Done` may have been lost
            // with a connection.
            Message::Control(Control::Done(digest)) if (st.finished || st.switched) && stream == 0 => {
                if shape.postcopy && !st.switched {
                    return Err(protocol(stream, "post-copy session ended without a switchover"));
                }
                st.ended = true;
                self.digest = Some(digest);
                Ok(Step::End)
            }
            m => Err(unexpected(stream, m.kind())),
        }
    }

    /// Stream `stream`'s connection was lost: whether it may come back (a
    /// session with resumption, the stream's part not over) — in pre-copy,
    /// or past the stream's own switchover marker, but not in between: a
    /// stream lost while the switchover goes out fails the session before
    /// the guest can start here.
    pub fn may_come_back(&self, stream: usize, resumable: bool) -> bool {
        let precopy = self.switch_round.is_none();
        resumable && self.streams.get(stream).is_some_and(|s| !s.ended && (s.switched || precopy))
    }

    /// Stream `stream` came back on a new connection. Before its
    /// switchover marker the source sends again exactly what the old one
    /// swallowed (it learnt the count), so the round's count holds; past
    /// it, frames of its round may have been lost (post-copy asks again).
    pub fn reconnected(&mut self, stream: usize) {
        if let Some(s) = self.streams.get_mut(stream) {
            s.lossy |= s.switched;
        }
    }

    /// Whether stream `stream` passed its switchover marker.
    pub fn switched(&self, stream: usize) -> bool {
        self.streams.get(stream).is_some_and(|s| s.switched)
    }

    /// Stream 0's `Done`, once it came.
    pub fn source_digest(&self) -> Option<Digest> {
        self.digest
    }

    /// The post-copy round, once a switchover marker or piece came.
    pub fn switch_round(&self) -> Option<u64> {
        self.switch_round
    }

    /// Stream `stream` was lost `waited` ago and no stream delivered
    /// anything for `quiet`: `Ok` to go on waiting for it to come back;
    /// otherwise why it will not. A stream comes back within
    /// [`RESUME_WINDOW`] while the session shows life (`quiet` within the
    /// progress timeout `patience`), and only while the rules allow it
    /// ([`DestSession::may_come_back`]).
    pub fn comeback_wait(
        &self,
        stream: usize,
        resumable: bool,
        waited: Duration,
        quiet: Duration,
        patience: Duration,
    ) -> Result<(), Unreturned> {
        if !self.may_come_back(stream, resumable) {
            return Err(Unreturned::Switchover);
        }
        if waited > RESUME_WINDOW || quiet > patience {
            return Err(Unreturned::Deadline { waited, quiet });
        }
        Ok(())
    }

    /// Pages frames' pages accepted on stream `stream`.
    pub fn pages(&self, stream: usize) -> u64 {
        self.streams.get(stream).map_or(0, |s| s.pages)
    }

    /// The end of a pre-copy session, every stream's part over: `Ok` with
    /// the digest to confirm (`Verified`) only if every stream ended the
    /// same final round and the source's digest is `placed`, the digest of
    /// the memory placed here; otherwise what to tell the source.
    pub fn verdict(&self, placed: Digest) -> Result<Digest, (ErrorCode, MigrateError)> {
        let proto = |why: String| (ErrorCode::Protocol, protocol(0, why));
        if let Some(i) = self.streams.iter().position(|s| !s.ended) {
            return Err(proto(format!("stream {i} did not end")));
        }
        let Some(source) = self.digest else {
            return Err(proto("stream 0 ended without the source's digest".into()));
        };
        if !self.shape.postcopy {
            let first = self.streams[0].final_round;
            if let Some(o) = self.streams.iter().find(|s| s.final_round != first) {
                return Err(proto(format!(
                    "streams disagree on the final round: {} and {}",
                    first.map_or(-1, |r| r as i128),
                    o.final_round.map_or(-1, |r| r as i128)
                )));
            }
        }
        if source != placed {
            return Err((ErrorCode::Digest, MigrateError::Digest { source_digest: source, dest_digest: placed }));
        }
        Ok(placed)
    }
}

/// How long a lost stream may take to come back while the session shows
/// life on its other streams (with none, the progress timeout ends it
/// sooner).
pub const RESUME_WINDOW: Duration = Duration::from_secs(60);

/// Why a stream lost before its switchover marker (or in a pre-copy
/// migration) did not come back ([`MigrateError::Lost`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unreturned {
    /// Not within the resume window, or the whole session fell silent.
    #[error("not within {waited:?}, {quiet:?} without a frame on any stream")]
    Deadline {
        /// How long this end waited.
        waited: Duration,
        /// How long no stream delivered anything.
        quiet: Duration,
    },
    /// The post-copy switchover began on other streams meanwhile, or the
    /// stream's part was over.
    #[error("the switchover began without it")]
    Switchover,
}

/// How long the destination waits, after its verdict, for the source to
/// close stream 0 (it does once it heard the verdict) before it takes the
/// verdict as heard.
pub const CONFIRM_LINGER: Duration = Duration::from_secs(5);

/// After `Verified` went out in a resumable session: whether the source
/// heard it. The source closes its streams once it has; a stream 0 that
/// broke first may come back (the source redials until it hears the
/// verdict) and is told again; one lost for good keeps the first write's
/// outcome, as the source may have read it before.
#[derive(Debug)]
pub struct Confirm {
    /// Stream 0 broke at this time, and has not come back.
    lost_at: Option<Instant>,
    /// Without news from stream 0 until then, the verdict counts as heard.
    linger: Instant,
    /// How long a lost stream 0 may take to come back.
    patience: Duration,
}

/// What the driver does next while confirming.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfirmStep {
    /// Read stream 0 a moment (the source's close ends the wait).
    Read,
    /// Stream 0 is lost: wait a moment for it to come back.
    Wait,
    /// The source heard the verdict, or had every chance to.
    Heard,
    /// Stream 0 was lost for good: the first write's outcome stands.
    Lost,
}

/// What a read of stream 0 found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Read {
    /// The source closed it: it heard the verdict.
    Closed,
    /// Bytes, or nothing yet.
    Nothing,
    /// The connection broke.
    Broken,
}

impl Confirm {
    /// The verdict's first write went out (`written`) or failed, at `now`.
    pub fn new(written: bool, now: Instant, patience: Duration) -> Self {
        Confirm { lost_at: (!written).then_some(now), linger: now + CONFIRM_LINGER, patience }
    }

    /// Stream 0 came back at `now` and was told the verdict again (`told`)
    /// or not.
    pub fn came_back(&mut self, told: bool, now: Instant) {
        if told {
            (self.lost_at, self.linger) = (None, now + CONFIRM_LINGER);
        }
    }

    /// A read of stream 0 at `now` found `r`.
    pub fn on_read(&mut self, r: Read, now: Instant) {
        match r {
            Read::Closed => self.linger = now,
            Read::Nothing => {}
            Read::Broken => self.lost_at = Some(now),
        }
    }

    /// What to do at `now`.
    pub fn next(&self, now: Instant) -> ConfirmStep {
        match self.lost_at {
            Some(t) if now.saturating_duration_since(t) >= self.patience => ConfirmStep::Lost,
            Some(_) => ConfirmStep::Wait,
            None if now >= self.linger => ConfirmStep::Heard,
            None => ConfirmStep::Read,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pmigrate_ranges::PageIdx;
    use pmigrate_transport::frame::{FrameHdr, HEADER_LEN};
    use pmigrate_transport::payload::build_zero_pages;

    fn shape(streams: usize, postcopy: bool) -> Shape {
        Shape { pages: vec![64, 8], offered: vec![false, true], lz4: false, postcopy, streams }
    }

    /// Runs `f` on the typed message of a frame's bytes, as a reader gives
    /// them.
    fn with_msg<T>(frame: &[u8], f: impl FnOnce(Message<'_>) -> T) -> T {
        let hdr = FrameHdr::decode(frame[..HEADER_LEN].try_into().unwrap()).unwrap();
        f(Message::decode(hdr, &frame[HEADER_LEN..]).unwrap())
    }

    fn zeros(region: u32, first: u64, count: u32, round: u64) -> Vec<u8> {
        let mut f = Vec::new();
        build_zero_pages(&mut f, region, first, count, round);
        f
    }

    fn control(c: Control<'_>) -> Vec<u8> {
        c.encode()
    }

    fn round_end(round: u64, frames: u64, last: bool) -> Vec<u8> {
        control(Control::RoundEnd { round: Round(round), frames, last })
    }

    fn feed(rules: &mut DestSession, stream: usize, frame: &[u8]) -> Result<String, String> {
        with_msg(frame, |m| rules.on_message(stream, m).map(|s| format!("{s:?}")).map_err(|e| e.to_string()))
    }

    #[test]
    fn pages_outside_the_table_are_refused_before_anything_else() {
        let mut r = DestSession::new(shape(1, false));
        assert!(feed(&mut r, 0, &zeros(0, 60, 4, 0)).unwrap().starts_with("Place"));
        let e = feed(&mut r, 0, &zeros(0, 61, 4, 0)).unwrap_err();
        assert!(e.contains("outside region 0 of 64 pages"), "{e}");
        let e = feed(&mut r, 0, &zeros(2, 0, 1, 0)).unwrap_err();
        assert!(e.contains("region 2 does not exist"), "{e}");
    }

    #[test]
    fn a_round_end_counts_the_frames_of_its_stream() {
        let mut r = DestSession::new(shape(2, false));
        feed(&mut r, 0, &zeros(0, 0, 1, 0)).unwrap();
        feed(&mut r, 0, &zeros(0, 1, 1, 0)).unwrap();
        // One frame short: a frame was dropped.
        let e = feed(&mut r, 0, &round_end(0, 3, false)).unwrap_err();
        assert!(e.contains("round 0 ended after 3 frames; received round 0 with 2"), "{e}");
        // A frame of the next round before this round ended.
        let mut r = DestSession::new(shape(2, false));
        let e = feed(&mut r, 1, &zeros(0, 0, 1, 1)).unwrap_err();
        assert!(e.contains("page frame of round 1 during round 0"), "{e}");
    }

    #[test]
    fn only_a_finished_session_with_the_same_digest_is_verified() {
        let mut r = DestSession::new(shape(2, false));
        feed(&mut r, 0, &zeros(0, 0, 4, 0)).unwrap();
        assert_eq!(feed(&mut r, 1, &round_end(0, 0, true)).unwrap(), "End");
        // Not every stream ended.
        assert!(r.verdict(Digest(7)).is_err());
        feed(&mut r, 0, &round_end(0, 1, true)).unwrap();
        assert_eq!(feed(&mut r, 0, &control(Control::Done(Digest(7)))).unwrap(), "End");
        assert_eq!(r.verdict(Digest(7)).unwrap(), Digest(7));
        let (code, e) = r.verdict(Digest(8)).unwrap_err();
        assert_eq!(code, ErrorCode::Digest);
        assert!(matches!(e, MigrateError::Digest { .. }));
        // Nothing more on an ended stream.
        assert!(feed(&mut r, 0, &control(Control::Keepalive)).is_err());
    }

    #[test]
    fn streams_must_agree_on_the_final_round() {
        let mut r = DestSession::new(shape(2, false));
        feed(&mut r, 0, &round_end(0, 0, false)).unwrap();
        feed(&mut r, 0, &round_end(1, 0, true)).unwrap();
        feed(&mut r, 0, &control(Control::Done(Digest(1)))).unwrap();
        feed(&mut r, 1, &round_end(0, 0, true)).unwrap();
        let (_, e) = r.verdict(Digest(1)).unwrap_err();
        assert!(e.to_string().contains("disagree on the final round: 1 and 0"), "{e}");
    }

    #[test]
    fn probes_only_on_stream_0_and_about_offered_regions() {
        let probe = |region| {
            control(Control::Probe { region: RegionIdx(region), ask: ProbeAsk::PageHashes, places: vec![1, 2] })
        };
        let mut r = DestSession::new(shape(2, false));
        assert!(feed(&mut r, 0, &probe(1)).unwrap().starts_with("Answer"));
        assert!(feed(&mut r, 0, &probe(0)).unwrap_err().contains("not offered"));
        assert!(feed(&mut r, 1, &probe(1)).unwrap_err().contains("Probe"));
    }

    #[test]
    fn a_switchover_is_one_round_for_all_streams_and_its_bitmap_comes_on_stream_0() {
        let marker = |round| control(Control::Switchover { round: Round(round), last: true, need: None });
        let bits = [0xffu8];
        let piece = |first: u64, n: u64| {
            control(Control::Switchover {
                round: Round(0),
                last: false,
                need: Some(NeedBitmap {
                    range: PageRange { region: RegionIdx(0), start: PageIdx(first), end: PageIdx(first + n) },
                    bits: &bits,
                }),
            })
        };
        // Not in pre-copy.
        let mut r = DestSession::new(shape(2, false));
        assert!(feed(&mut r, 0, &marker(0)).is_err());
        let mut r = DestSession::new(shape(3, true));
        assert!(feed(&mut r, 0, &piece(0, 8)).unwrap().starts_with("Need"));
        assert!(feed(&mut r, 0, &piece(60, 8)).unwrap_err().contains("outside region 0"));
        assert!(feed(&mut r, 1, &piece(0, 8)).unwrap_err().contains("other than 0"));
        assert_eq!(feed(&mut r, 0, &marker(0)).unwrap(), "Marker");
        // Once per stream, and the same round everywhere.
        assert!(feed(&mut r, 0, &marker(0)).is_err());
        feed(&mut r, 1, &round_end(0, 0, false)).unwrap();
        assert!(feed(&mut r, 1, &marker(1)).unwrap_err().contains("another at 0"));
        // Pages after the marker are post-copy pages.
        assert!(feed(&mut r, 0, &zeros(0, 0, 1, 0)).unwrap().contains("post: true"));
        // Done may follow the marker at once; a stream that passed its
        // marker may come back, one that did not may not (the switchover
        // is under way).
        assert!(r.may_come_back(0, true) && !r.may_come_back(2, true) && !r.may_come_back(0, false));
        assert_eq!(feed(&mut r, 0, &control(Control::Done(Digest(3)))).unwrap(), "End");
    }

    #[test]
    fn a_replaced_connection_may_fall_short_of_its_round_end() {
        let mut r = DestSession::new(shape(2, true));
        feed(&mut r, 1, &control(Control::Switchover { round: Round(0), last: true, need: None })).unwrap();
        feed(&mut r, 1, &zeros(0, 0, 1, 0)).unwrap();
        assert!(feed(&mut r, 1, &round_end(0, 3, true)).is_err());
        let mut r = DestSession::new(shape(2, true));
        feed(&mut r, 1, &control(Control::Switchover { round: Round(0), last: true, need: None })).unwrap();
        r.reconnected(1);
        feed(&mut r, 1, &zeros(0, 0, 1, 0)).unwrap();
        assert_eq!(feed(&mut r, 1, &round_end(0, 3, true)).unwrap(), "End");
    }

    /// In pre-copy a lost stream may come back until its part is over, and
    /// the source sends again exactly what was lost: its count holds.
    #[test]
    fn a_pre_copy_stream_comes_back_and_is_held_to_its_count() {
        let mut r = DestSession::new(shape(2, false));
        feed(&mut r, 1, &zeros(0, 0, 1, 0)).unwrap();
        assert!(r.may_come_back(1, true) && !r.may_come_back(1, false), "only with resumption");
        r.reconnected(1);
        feed(&mut r, 1, &zeros(0, 1, 1, 0)).unwrap();
        let e = feed(&mut r, 1, &round_end(0, 3, false)).unwrap_err();
        assert!(e.contains("round 0 ended after 3 frames; received round 0 with 2"), "{e}");
        let mut r = DestSession::new(shape(2, false));
        r.reconnected(1);
        feed(&mut r, 1, &zeros(0, 0, 1, 0)).unwrap();
        assert_eq!(feed(&mut r, 1, &round_end(0, 1, true)).unwrap(), "End");
        assert!(!r.may_come_back(1, true), "a stream whose part is over is not waited for");
        // Stream 0 until its `Done`.
        feed(&mut r, 0, &round_end(0, 0, true)).unwrap();
        assert!(r.may_come_back(0, true));
        feed(&mut r, 0, &control(Control::Done(Digest(1)))).unwrap();
        assert!(!r.may_come_back(0, true));
    }

    /// In post-copy, before the switchover as in pre-copy; not once it is
    /// under way on another stream, before the stream's own marker.
    #[test]
    fn a_post_copy_stream_comes_back_before_the_switchover_or_after_its_marker() {
        let marker = || control(Control::Switchover { round: Round(1), last: true, need: None });
        let mut r = DestSession::new(shape(3, true));
        feed(&mut r, 1, &round_end(0, 0, false)).unwrap();
        assert!(r.may_come_back(1, true) && r.may_come_back(2, true));
        r.reconnected(1);
        feed(&mut r, 0, &round_end(0, 0, false)).unwrap();
        feed(&mut r, 0, &marker()).unwrap();
        assert!(r.may_come_back(0, true), "past its marker");
        assert!(!r.may_come_back(1, true), "the switchover is under way without it");
        feed(&mut r, 1, &marker()).unwrap();
        assert!(r.may_come_back(1, true));
    }

    #[test]
    fn kinds_that_never_come_to_a_destination_are_refused() {
        let mut r = DestSession::new(shape(1, false));
        for c in [
            Control::ProbeReply(vec![1]),
            Control::Verified { value: 1, closed: false },
            Control::End { chunks: 1 },
            Control::PageRequest(PageRange { region: RegionIdx(0), start: PageIdx(0), end: PageIdx(1) }),
            Control::Received { frames: 1 },
        ] {
            let e = feed(&mut r, 0, &control(c)).unwrap_err();
            assert!(e.contains("unexpected"), "{e}");
        }
        let _ = HEADER_LEN;
    }

    /// A lost stream is awaited within the resume window while another
    /// stream shows life; in post-copy, not once the switchover began
    /// without it.
    #[test]
    fn a_lost_stream_is_awaited_only_within_the_window_and_while_the_session_lives() {
        let patience = Duration::from_secs(30);
        let s = |n| Duration::from_secs(n);
        let r = DestSession::new(shape(2, false));
        assert_eq!(r.comeback_wait(1, true, s(10), s(1), patience), Ok(()));
        assert_eq!(r.comeback_wait(1, false, s(0), s(0), patience), Err(Unreturned::Switchover), "no resumption");
        let late = r.comeback_wait(1, true, RESUME_WINDOW + s(1), s(1), patience).unwrap_err();
        assert_eq!(late, Unreturned::Deadline { waited: RESUME_WINDOW + s(1), quiet: s(1) });
        let silent = r.comeback_wait(1, true, s(10), s(31), patience).unwrap_err();
        assert!(silent.to_string().contains("31s without a frame on any stream"), "{silent}");
        // Post-copy: stream 0 passed its marker while stream 1 was lost
        // before its own; stream 0, lost after its marker, may come back.
        let mut r = DestSession::new(shape(2, true));
        let marker = control(Control::Switchover { round: Round(0), last: true, need: None });
        assert_eq!(feed(&mut r, 0, &marker).unwrap(), "Marker");
        assert_eq!(r.comeback_wait(1, true, s(0), s(0), patience), Err(Unreturned::Switchover));
        assert_eq!(r.comeback_wait(0, true, s(0), s(0), patience), Ok(()));
    }

    /// After the verdict: heard once the source closes stream 0, or once
    /// the linger passed without news.
    #[test]
    fn the_verdict_counts_as_heard_when_the_source_closes_or_the_linger_passes() {
        let t = Instant::now();
        let patience = Duration::from_secs(30);
        let mut c = Confirm::new(true, t, patience);
        assert_eq!(c.next(t), ConfirmStep::Read);
        c.on_read(Read::Nothing, t + Duration::from_secs(1));
        assert_eq!(c.next(t + Duration::from_secs(1)), ConfirmStep::Read);
        assert_eq!(c.next(t + CONFIRM_LINGER), ConfirmStep::Heard);
        let mut c = Confirm::new(true, t, patience);
        c.on_read(Read::Closed, t + Duration::from_millis(3));
        assert_eq!(c.next(t + Duration::from_millis(3)), ConfirmStep::Heard);
    }

    /// Stream 0 broke around the verdict: it is awaited, told again when
    /// it comes back, and lost for good only past the patience.
    #[test]
    fn a_stream_0_lost_around_the_verdict_is_awaited_and_told_again() {
        let t = Instant::now();
        let patience = Duration::from_secs(30);
        let at = |ms| t + Duration::from_millis(ms);
        // The first write failed.
        let mut c = Confirm::new(false, t, patience);
        assert_eq!(c.next(at(10)), ConfirmStep::Wait);
        // Back, but the verdict could not be written on it: still lost.
        c.came_back(false, at(20));
        assert_eq!(c.next(at(20)), ConfirmStep::Wait);
        c.came_back(true, at(1000));
        assert_eq!(c.next(at(1000)), ConfirmStep::Read);
        // The linger starts again from the comeback.
        assert_eq!(c.next(at(1000) + CONFIRM_LINGER - Duration::from_millis(1)), ConfirmStep::Read);
        assert_eq!(c.next(at(1000) + CONFIRM_LINGER), ConfirmStep::Heard);
        // Written, then broken, and never back.
        let mut c = Confirm::new(true, t, patience);
        c.on_read(Read::Broken, at(100));
        assert_eq!(c.next(at(100) + patience - Duration::from_millis(1)), ConfirmStep::Wait);
        assert_eq!(c.next(at(100) + patience), ConfirmStep::Lost);
    }
}
