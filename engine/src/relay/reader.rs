//! One relay stream's reader as a state machine (protocol.md §7.4), with no
//! sockets, threads or clocks: which of the other end's messages the
//! stream may carry at each point, and what each one means. The reorder
//! window (`super::reassembly`) judges the chunks' numbers and the flow's
//! end; `super::ends` judges how the reading stopped;
//! `super::inbound::stream_reader` reads the frames and carries out what
//! this says.
//!
//! A stream carries its share of the inbound flow's chunks, then that
//! flow's `End`; stream 0 also carries the other end's verdict on this
//! end's outbound flow (`Verified`), once. With `CAP_RESUME` it carries
//! the other end's acknowledgements (`Ack`), and after a comeback the
//! other end sends again what it had not seen acknowledged: chunks (the
//! window drops those it had), and the `End` and `Verified` it had sent,
//! which must be the very ones this stream carried.

use pmigrate_transport::frame::{Encoding, FrameKind};
use pmigrate_transport::message::{Control, DataFrame, Message};

use super::CHUNK;

/// What a message the stream carried means.
#[derive(Clone, Copy, Debug)]
pub enum Heard<'m> {
    /// Nothing to do: a keepalive, or an `End` or `Verified` sent again
    /// after a comeback.
    Nothing,
    /// The other end acknowledged every chunk of this stream below this.
    Acked(u64),
    /// A chunk of the inbound flow, unopened: for the reorder window.
    Chunk(DataFrame<'m>),
    /// The inbound flow's `End`: it had this many chunks.
    End(u64),
    /// The other end's verdict on this end's outbound flow.
    Verified {
        /// The chunks it took.
        value: u64,
        /// Its local peer closed after taking them.
        closed: bool,
    },
}

/// Why a message the stream carried fails the relay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    /// A message of a kind the stream may carry, with content it may not.
    Protocol(String),
    /// A kind the stream may not carry now.
    Unexpected(FrameKind),
}

/// One stream's reader.
#[derive(Debug)]
pub struct ReaderLane {
    resumable: bool,
    /// This end is the session's source: the destination may not close
    /// the session's forward direction.
    source: bool,
    /// `CAP_LZ4` was agreed for the inbound flow.
    lz4_in: bool,
    /// The stream carries inbound chunks; and the `End` it carried.
    has_in: bool,
    end: Option<u64>,
    /// The verdict comes on this stream; and the one it carried.
    expects_verified: bool,
    verified: Option<(u64, bool)>,
    /// The stream came back on a new connection: it may replay.
    resumed: bool,
}

impl ReaderLane {
    /// A reader with the session's terms: `resumable` (`CAP_RESUME`),
    /// at the session's `source`, `lz4_in` agreed; the stream carries
    /// inbound chunks (`has_in`), and the verdict (`expects_verified`).
    pub fn new(resumable: bool, source: bool, lz4_in: bool, has_in: bool, expects_verified: bool) -> Self {
        Self { resumable, source, lz4_in, has_in, end: None, expects_verified, verified: None, resumed: false }
    }

    /// Judges the next message the stream carried. A chunk's size and
    /// encoding are judged here; its number is the window's to judge.
    pub fn heard<'m>(&mut self, msg: Message<'m>) -> Result<Heard<'m>, Refused> {
        let ended = !self.has_in || self.end.is_some();
        match msg {
            Message::Control(Control::Keepalive) => Ok(Heard::Nothing),
            Message::Control(Control::Ack { next }) if self.resumable => Ok(Heard::Acked(next)),
            // After a comeback the other end sends again what it had not
            // seen acknowledged, the end's own chunks included.
            Message::Data(chunk) if self.has_in && (!ended || self.resumed) => {
                if chunk.decoded_len() as usize > CHUNK {
                    return Err(Refused::Protocol(format!("chunk of {} bytes", chunk.decoded_len())));
                }
                if chunk.encoding() == Encoding::Lz4 && !self.lz4_in {
                    return Err(Refused::Protocol("lz4 chunk without the capability".into()));
                }
                Ok(Heard::Chunk(chunk))
            }
            Message::Control(Control::End { chunks }) if !ended => {
                self.end = Some(chunks);
                Ok(Heard::End(chunks))
            }
            Message::Control(Control::End { chunks }) if self.resumed && self.end == Some(chunks) => Ok(Heard::Nothing),
            Message::Control(Control::Verified { value, closed })
                if self.expects_verified && self.verified.is_none() =>
            {
                if closed && self.source {
                    return Err(Refused::Protocol("the destination closed the session's forward direction".into()));
                }
                self.verified = Some((value, closed));
                Ok(Heard::Verified { value, closed })
            }
            Message::Control(Control::Verified { value, closed })
                if self.resumed && self.verified == Some((value, closed)) =>
            {
                Ok(Heard::Nothing)
            }
            m => Err(Refused::Unexpected(m.kind())),
        }
    }

    /// The stream's part is done: its inbound flow's `End` read (or it
    /// carries none, or `in_closed`: the local peer left and nothing more
    /// is awaited) and the verdict read, if it comes here.
    pub fn at_end(&self, in_closed: bool) -> bool {
        (!self.has_in || self.end.is_some() || in_closed) && (!self.expects_verified || self.verified.is_some())
    }

    /// The stream came back on a new connection.
    pub fn came_back(&mut self) {
        self.resumed = true;
    }
}

#[cfg(test)]
mod tests {
    use pmigrate_transport::frame::{FrameHdr, HEADER_LEN};
    use pmigrate_transport::payload::build_data;

    use super::*;

    /// Feeds `frame` (header and payload) to `r`: what it heard, in words.
    fn hear(r: &mut ReaderLane, frame: &[u8]) -> Result<String, Refused> {
        let hdr = FrameHdr::decode(frame[..HEADER_LEN].try_into().unwrap()).unwrap();
        r.heard(Message::decode(hdr, &frame[HEADER_LEN..]).unwrap()).map(|h| match h {
            Heard::Nothing => "nothing".to_string(),
            Heard::Acked(n) => format!("acked {n}"),
            Heard::Chunk(c) => format!("chunk {}", c.seq()),
            Heard::End(n) => format!("end {n}"),
            Heard::Verified { value, closed } => format!("verified {value} {closed}"),
        })
    }

    fn ok(words: &str) -> Result<String, Refused> {
        Ok(words.to_string())
    }

    fn data(seq: u64, len: usize, lz4: bool) -> Vec<u8> {
        let mut f = Vec::new();
        build_data(&mut f, seq, &vec![0u8; len], lz4);
        f
    }

    fn end(chunks: u64) -> Vec<u8> {
        Control::End { chunks }.encode()
    }

    fn verified(value: u64, closed: bool) -> Vec<u8> {
        Control::Verified { value, closed }.encode()
    }

    fn ack(next: u64) -> Vec<u8> {
        Control::Ack { next }.encode()
    }

    fn unexpected(kind: FrameKind) -> Result<String, Refused> {
        Err(Refused::Unexpected(kind))
    }

    /// A stream carries chunks, then one `End`; stream 0 one `Verified`.
    /// Nothing after its `End`, no second verdict, no `Ack` without
    /// resumption, no chunk on a stream that carries none.
    #[test]
    fn chunks_then_one_end_and_one_verdict() {
        let mut r = ReaderLane::new(false, false, false, true, true);
        assert!(!r.at_end(false));
        assert_eq!(hear(&mut r, &data(0, 100, false)), ok("chunk 0"));
        assert_eq!(hear(&mut r, net_keepalive()), ok("nothing"));
        assert_eq!(hear(&mut r, &ack(1)), unexpected(FrameKind::Ack));
        assert_eq!(hear(&mut r, &end(3)), ok("end 3"));
        assert!(!r.at_end(false), "the verdict is still awaited here");
        assert_eq!(hear(&mut r, &data(4, 100, false)), unexpected(FrameKind::Data));
        assert_eq!(hear(&mut r, &end(3)), unexpected(FrameKind::End), "not resumed: no replay");
        assert_eq!(hear(&mut r, &verified(7, false)), ok("verified 7 false"));
        assert!(r.at_end(false));
        assert_eq!(hear(&mut r, &verified(7, false)), unexpected(FrameKind::Verified));
        // Stream 1: no verdict comes there.
        let mut r = ReaderLane::new(false, false, false, true, false);
        assert_eq!(hear(&mut r, &verified(7, false)), unexpected(FrameKind::Verified));
        assert_eq!(hear(&mut r, &end(0)), ok("end 0"));
        assert!(r.at_end(false));
        // A stream of an end with no inbound flow carries no chunk, no End.
        let mut r = ReaderLane::new(false, false, false, false, true);
        assert_eq!(hear(&mut r, &data(0, 100, false)), unexpected(FrameKind::Data));
        assert_eq!(hear(&mut r, &end(0)), unexpected(FrameKind::End));
        assert!(!r.at_end(false));
        // The local peer left: the End is no longer awaited.
        let r = ReaderLane::new(false, false, false, true, false);
        assert!(r.at_end(true));
    }

    /// A chunk over the size limit, an lz4 chunk without the capability,
    /// and a verdict that closes the source's forward direction are
    /// refused with a reason.
    #[test]
    fn oversized_uncapable_or_closing_messages_are_refused() {
        let mut r = ReaderLane::new(false, true, false, true, true);
        let Err(Refused::Protocol(why)) = hear(&mut r, &data(0, CHUNK + 1, false)) else { panic!() };
        assert!(why.contains("chunk of"), "{why}");
        let text = vec![b'a'; 4096];
        let mut lz4 = Vec::new();
        assert_eq!(build_data(&mut lz4, 0, &text, true), Encoding::Lz4);
        let Err(Refused::Protocol(why)) = hear(&mut r, &lz4) else { panic!() };
        assert!(why.contains("lz4"), "{why}");
        let mut with = ReaderLane::new(false, true, true, true, true);
        assert_eq!(hear(&mut with, &lz4), ok("chunk 0"));
        let Err(Refused::Protocol(why)) = hear(&mut r, &verified(3, true)) else { panic!() };
        assert!(why.contains("closed"), "{why}");
        // At the destination's end a closed verdict is the source's peer leaving.
        let mut dest = ReaderLane::new(false, false, false, true, true);
        assert_eq!(hear(&mut dest, &verified(3, true)), ok("verified 3 true"));
    }

    /// With resumption: `Ack`s are heard; after a comeback the chunks, the
    /// `End` and the verdict come again: the same `End` and verdict are
    /// nothing new, a different one is refused, and before a comeback a
    /// duplicate is refused.
    #[test]
    fn after_a_comeback_the_same_end_and_verdict_come_again() {
        let mut r = ReaderLane::new(true, false, false, true, true);
        assert_eq!(hear(&mut r, &ack(4)), ok("acked 4"));
        assert_eq!(hear(&mut r, &end(2)), ok("end 2"));
        assert_eq!(hear(&mut r, &verified(9, false)), ok("verified 9 false"));
        assert_eq!(hear(&mut r, &end(2)), unexpected(FrameKind::End), "a duplicate before any comeback");
        r.came_back();
        assert_eq!(hear(&mut r, &data(1, 100, false)), ok("chunk 1"), "the window drops it");
        assert_eq!(hear(&mut r, &end(2)), ok("nothing"));
        assert_eq!(hear(&mut r, &end(3)), unexpected(FrameKind::End));
        assert_eq!(hear(&mut r, &verified(9, false)), ok("nothing"));
        assert_eq!(hear(&mut r, &verified(8, false)), unexpected(FrameKind::Verified));
        assert!(r.at_end(false));
    }

    fn net_keepalive() -> &'static [u8] {
        pmigrate_transport::net::keepalive_frame()
    }
}
