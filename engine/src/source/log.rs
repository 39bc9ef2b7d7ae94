//! What a stream sent that the destination has not acknowledged yet
//! (protocol.md §7.2.3), with no sockets, threads or clocks.
//!
//! A stream's sender records every frame it writes, in order, as what the
//! frame was rather than its bytes: a `Pages` frame by its pages and round
//! (its content is read from guest memory again if it must go again), a
//! `RoundEnd` by its fields, a small control frame as it was written;
//! keepalives carry no state and are neither recorded nor counted. The
//! destination counts the frames it received and processed on the stream
//! and says so (`Received`); each count trims the log. After a lost
//! connection the destination's first word on the new one is its count,
//! and what the log still holds past it is exactly what the old
//! connection swallowed: the sender writes it again, in order, before
//! anything new.

use std::collections::VecDeque;

use pmigrate_ranges::PageRange;

/// Frames a stream may send without an acknowledgement before the session
/// fails. The destination acknowledges at least every
/// [`crate::dest::ACK_EVERY`] frames and every few tenths of a second; a
/// log of this many is a destination that does not, and its metadata
/// (a few dozen bytes a frame) stays a few MiB.
pub const MAX_UNACKED: usize = 1 << 16;

/// One frame a stream sent, as the log keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sent {
    /// A `Pages` frame of these pages, of round `round`: rebuilt from
    /// guest memory, raw or zero, when it must go again.
    Pages {
        /// The pages.
        range: PageRange,
        /// Its round.
        round: u64,
    },
    /// A `RoundEnd`, written again as it was.
    RoundEnd {
        /// The round it ended.
        round: u64,
        /// `Pages` frames the stream carried in the round.
        frames: u64,
        /// The final round.
        last: bool,
    },
    /// A control frame (a probe, a switchover piece or marker, `Done`), as
    /// written.
    Control(Vec<u8>),
}

/// An acknowledgement the log cannot take, or a log grown too long.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LogError {
    /// The destination counts more frames than this end sent.
    #[error("the destination acknowledged {acked} frames, but {sent} were sent")]
    AheadOfSent {
        /// Its count.
        acked: u64,
        /// Frames sent on the stream.
        sent: u64,
    },
    /// The destination's count went down.
    #[error("the destination acknowledged {acked} frames after {before}")]
    Backwards {
        /// Its count.
        acked: u64,
        /// Its count before.
        before: u64,
    },
    /// [`MAX_UNACKED`] frames went without an acknowledgement.
    #[error("{MAX_UNACKED} frames sent and none acknowledged by the destination")]
    Unacknowledged,
}

/// The frames a stream sent past the destination's last count.
#[derive(Debug, Default)]
pub struct SentLog {
    /// Frames `acked + 1 ..= acked + len`, in order.
    unacked: VecDeque<Sent>,
    /// The destination's latest count.
    acked: u64,
}

impl SentLog {
    /// A frame was handed to the connection.
    pub fn push(&mut self, s: Sent) -> Result<(), LogError> {
        if self.unacked.len() >= MAX_UNACKED {
            return Err(LogError::Unacknowledged);
        }
        self.unacked.push_back(s);
        Ok(())
    }

    /// The destination counts `frames` frames received: they leave the log.
    pub fn ack(&mut self, frames: u64) -> Result<(), LogError> {
        let sent = self.sent();
        if frames > sent {
            return Err(LogError::AheadOfSent { acked: frames, sent });
        }
        if frames < self.acked {
            return Err(LogError::Backwards { acked: frames, before: self.acked });
        }
        let n = (frames - self.acked) as usize; // at most the log's length
        self.unacked.drain(..n);
        self.acked = frames;
        Ok(())
    }

    /// Frames sent on the stream since the session began.
    pub fn sent(&self) -> u64 {
        self.acked + self.unacked.len() as u64
    }

    /// The destination's latest count.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// The frames past the latest count, oldest first: after a lost
    /// connection and the count on the new one, what must go again.
    pub fn unacked(&self) -> impl Iterator<Item = &Sent> {
        self.unacked.iter()
    }

    /// Whether the destination counted everything sent.
    pub fn is_empty(&self) -> bool {
        self.unacked.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pmigrate_ranges::{PageIdx, RegionIdx};

    fn pages(start: u64) -> Sent {
        Sent::Pages {
            range: PageRange { region: RegionIdx(0), start: PageIdx(start), end: PageIdx(start + 4) },
            round: 0,
        }
    }

    #[test]
    fn an_acknowledgement_trims_what_was_counted_and_the_rest_goes_again() {
        let mut log = SentLog::default();
        let probe = || Sent::Control(vec![13; 48]);
        for s in [pages(0), pages(4), probe(), pages(8), Sent::RoundEnd { round: 0, frames: 3, last: false }] {
            log.push(s).unwrap();
        }
        log.ack(2).unwrap();
        assert_eq!((log.acked(), log.sent()), (2, 5));
        // The same count again (the first word on a new connection) trims
        // nothing more.
        log.ack(2).unwrap();
        let rest: Vec<&Sent> = log.unacked().collect();
        assert_eq!(rest, [&probe(), &pages(8), &Sent::RoundEnd { round: 0, frames: 3, last: false }]);
        log.ack(5).unwrap();
        assert!(log.is_empty());
    }

    #[test]
    fn a_count_past_what_was_sent_or_going_back_is_refused() {
        let mut log = SentLog::default();
        log.push(Sent::RoundEnd { round: 0, frames: 0, last: false }).unwrap();
        log.push(Sent::RoundEnd { round: 0, frames: 0, last: false }).unwrap();
        assert_eq!(log.ack(3), Err(LogError::AheadOfSent { acked: 3, sent: 2 }));
        log.ack(2).unwrap();
        assert_eq!(log.ack(1), Err(LogError::Backwards { acked: 1, before: 2 }));
        assert_eq!(log.sent(), 2, "a refused count changes nothing");
    }

    #[test]
    fn a_log_never_acknowledged_is_bounded() {
        let mut log = SentLog::default();
        for _ in 0..MAX_UNACKED {
            log.push(Sent::RoundEnd { round: 0, frames: 0, last: false }).unwrap();
        }
        assert_eq!(log.push(Sent::RoundEnd { round: 0, frames: 0, last: false }), Err(LogError::Unacknowledged));
        log.ack(1).unwrap();
        assert!(log.push(Sent::RoundEnd { round: 0, frames: 0, last: false }).is_ok());
    }
}
