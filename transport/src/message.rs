//! Typed messages: every frame kind with its fields named and typed, one
//! decode path and one encode path. Nothing outside this crate reads or
//! fills a frame header's raw fields; `docs/protocol.md` §4 is the table
//! this module implements.
//!
//! [`Message::decode`] takes a header [`FrameHdr::decode`] has validated and
//! its payload, checks the frame's check for every kind whose body is its
//! payload, and gives the kind's fields meaning. The two data-carrying kinds
//! keep their payload as it came: a [`PagesFrame`] or [`DataFrame`] is
//! opened (decompressed and verified) by [`Opener`], where the check covers
//! the decoded bytes. Outbound, [`Control::encode`] builds every kind that
//! carries no bulk data; pages and chunks are built in place by
//! [`crate::payload`], whose builders take the same typed coordinates.

use pmigrate_ranges::{PageIdx, PageRange, RegionIdx};

use crate::frame::{
    Encoding, FrameHdr, FrameKind, WireError, FLAG_CLOSED, FLAG_FINAL, FLAG_PROBE_HASH, FLAG_PROBE_WORDS,
    MAX_PROBE_ITEMS,
};
use crate::hello::{ErrorMsg, Welcome};
use crate::payload::{build_control, OpenedPages, Opener};

/// A round of a memory migration: pre-copy rounds 0, 1, …, then the final
/// (or post-copy) round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Round(pub u64);

/// A memory digest (§7.3).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Digest(pub u64);

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// What a `Probe` asks about its places (§7.2.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeAsk {
    /// Page indices: answer each page's xxh3.
    PageHashes,
    /// Byte offsets of aligned 8-byte words: answer each word.
    Words,
}

/// A `Switchover` bitmap piece: which pages of `range` the destination
/// must not use until they arrive (bit `i` of byte `i / 8` is page
/// `range.start + i`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NeedBitmap<'a> {
    /// The pages the bitmap covers.
    pub range: PageRange,
    /// One bit per page, `⌈len / 8⌉` bytes.
    pub bits: &'a [u8],
}

/// A `Pages` frame as received: coordinates decoded, payload not yet
/// opened (see [`PagesFrame::open`]).
#[derive(Clone, Copy, Debug)]
pub struct PagesFrame<'a> {
    hdr: FrameHdr,
    payload: &'a [u8],
}

impl<'a> PagesFrame<'a> {
    /// The pages it carries.
    pub fn range(&self) -> PageRange {
        let first = PageIdx(self.hdr.first);
        // FrameHdr::decode refused a range that wraps.
        PageRange {
            region: RegionIdx(self.hdr.region),
            start: first,
            end: PageIdx(first.0 + u64::from(self.hdr.count)),
        }
    }

    /// The round it belongs to.
    pub fn round(&self) -> Round {
        Round(self.hdr.aux)
    }

    /// How many pages.
    pub fn count(&self) -> u32 {
        self.hdr.count
    }

    /// How its payload is encoded.
    pub fn encoding(&self) -> Encoding {
        self.hdr.encoding
    }

    /// Bytes on the wire, header included.
    pub fn wire_len(&self) -> usize {
        crate::frame::HEADER_LEN + self.payload.len()
    }

    /// Decodes and verifies the pages; nothing comes back unless the check
    /// over header and page hashes matches.
    pub fn open<'o>(&self, opener: &'o mut Opener) -> Result<OpenedPages<'o>, WireError>
    where
        'a: 'o,
    {
        opener.open_pages(&self.hdr, self.payload)
    }
}

/// A `Data` frame (byte-stream mode) as received, not yet opened.
#[derive(Clone, Copy, Debug)]
pub struct DataFrame<'a> {
    hdr: FrameHdr,
    payload: &'a [u8],
}

impl<'a> DataFrame<'a> {
    /// The chunk's sequence number.
    pub fn seq(&self) -> u64 {
        self.hdr.aux
    }

    /// The length of the chunk once opened.
    pub fn decoded_len(&self) -> u32 {
        self.hdr.count
    }

    /// How its payload is encoded.
    pub fn encoding(&self) -> Encoding {
        self.hdr.encoding
    }

    /// Bytes on the wire, header included.
    pub fn wire_len(&self) -> usize {
        crate::frame::HEADER_LEN + self.payload.len()
    }

    /// Decodes and verifies the chunk.
    pub fn open<'o>(&self, opener: &'o mut Opener) -> Result<&'o [u8], WireError>
    where
        'a: 'o,
    {
        opener.open_data(&self.hdr, self.payload)
    }
}

/// Every message that carries no bulk data: what [`Control::encode`]
/// builds and [`Message::decode`] gives back in [`Message::Control`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Control<'a> {
    /// §6.2: the destination's answer to a `Hello`.
    Welcome(Welcome),
    /// §6.3: a fatal error; the sender closes.
    Error(ErrorMsg),
    /// §7.2: this stream sent all `frames` of `round`'s `Pages`; `last`
    /// for the final round.
    RoundEnd {
        /// The round ended.
        round: Round,
        /// `Pages` frames this stream carried in it.
        frames: u64,
        /// The final round (`FLAG_FINAL`).
        last: bool,
    },
    /// §7.2, stream 0: the source's digest of all memory.
    Done(Digest),
    /// §7.2/§7.4: the destination's verdict. Memory mode: its digest; stream
    /// mode: the chunks written, `closed` when the way back was closed by
    /// its reader (`FLAG_CLOSED`).
    Verified {
        /// Digest (memory mode) or chunk count (stream mode).
        value: u64,
        /// Stream mode: the output's reader closed first.
        closed: bool,
    },
    /// §7.4: the stream ended after `chunks` chunks in all.
    End {
        /// Chunks in the whole session.
        chunks: u64,
    },
    /// §7.2.2: a vCPU waits on the first of these pages.
    PageRequest(PageRange),
    /// §7.2.1: read these places of a region through your own mapping.
    Probe {
        /// The region.
        region: RegionIdx,
        /// What to answer.
        ask: ProbeAsk,
        /// Page indices or word offsets, at most [`MAX_PROBE_ITEMS`].
        places: Vec<u64>,
    },
    /// §7.2.1: one value per place asked.
    ProbeReply(Vec<u64>),
    /// §7.2.2: the post-copy switchover: a bitmap piece, the marker
    /// (`last`), or the destination's "the guest runs here".
    Switchover {
        /// The post-copy round.
        round: Round,
        /// The marker (`FLAG_FINAL`).
        last: bool,
        /// A bitmap piece (source → destination, stream 0 only).
        need: Option<NeedBitmap<'a>>,
    },
    /// §7.5: still here.
    Keepalive,
    /// §7.4.1 (`CAP_RESUME`): every chunk this stream carried below `next`
    /// was taken; the sender may forget them.
    Ack {
        /// The sequence number after the stream's last chunk taken.
        next: u64,
    },
    /// §7.2.3: the destination received and processed `frames` frames of
    /// this stream since the session began (every kind but `Keepalive`).
    Received {
        /// Frames received on the stream, over all its connections.
        frames: u64,
    },
}

/// A frame, typed.
#[derive(Debug)]
pub enum Message<'a> {
    /// §4 `Pages`.
    Pages(PagesFrame<'a>),
    /// §4 `Data`.
    Data(DataFrame<'a>),
    /// Every other kind after the handshake.
    Control(Control<'a>),
}

fn wire(e: WireError) -> WireError {
    e
}

impl<'a> Message<'a> {
    /// Gives a validated header and its payload their meaning. The check is
    /// verified here for every kind but `Pages` and `Data` (their openers
    /// verify it over the decoded bytes); handshake kinds (`Hello`, `Auth`)
    /// are the handshake's and refused here.
    pub fn decode(hdr: FrameHdr, payload: &'a [u8]) -> Result<Message<'a>, WireError> {
        use FrameKind::*;
        let control = |c| Ok(Message::Control(c));
        match hdr.kind {
            Pages => return Ok(Message::Pages(PagesFrame { hdr, payload })),
            Data => return Ok(Message::Data(DataFrame { hdr, payload })),
            _ => hdr.verify(payload).map_err(wire)?,
        }
        let unexpected = || WireError::Malformed { kind: hdr.kind, why: "not a message after the handshake" };
        match hdr.kind {
            Welcome => control(Control::Welcome(crate::hello::Welcome::decode(payload)?)),
            Error => control(Control::Error(ErrorMsg::decode(payload)?)),
            RoundEnd => control(Control::RoundEnd {
                round: Round(hdr.aux),
                frames: hdr.first,
                last: hdr.flags & FLAG_FINAL != 0,
            }),
            Done => control(Control::Done(Digest(hdr.aux))),
            Verified => control(Control::Verified { value: hdr.aux, closed: hdr.flags & FLAG_CLOSED != 0 }),
            End => control(Control::End { chunks: hdr.aux }),
            PageRequest => control(Control::PageRequest(PageRange {
                region: RegionIdx(hdr.region),
                start: PageIdx(hdr.first),
                end: PageIdx(hdr.first + u64::from(hdr.count)),
            })),
            Probe => {
                let ask = if hdr.flags & FLAG_PROBE_WORDS != 0 { ProbeAsk::Words } else { ProbeAsk::PageHashes };
                control(Control::Probe { region: RegionIdx(hdr.region), ask, places: words(payload) })
            }
            ProbeReply => control(Control::ProbeReply(words(payload))),
            Switchover => {
                let need = (hdr.count > 0).then(|| NeedBitmap {
                    range: PageRange {
                        region: RegionIdx(hdr.region),
                        start: PageIdx(hdr.first),
                        end: PageIdx(hdr.first + u64::from(hdr.count)),
                    },
                    bits: payload,
                });
                control(Control::Switchover { round: Round(hdr.aux), last: hdr.flags & FLAG_FINAL != 0, need })
            }
            Keepalive => control(Control::Keepalive),
            Ack => control(Control::Ack { next: hdr.aux }),
            Received => control(Control::Received { frames: hdr.aux }),
            Hello | Auth | Pages | Data => Err(unexpected()),
        }
    }

    /// The frame kind, for errors about unexpected frames.
    pub fn kind(&self) -> FrameKind {
        match self {
            Message::Pages(_) => FrameKind::Pages,
            Message::Data(_) => FrameKind::Data,
            Message::Control(c) => c.kind(),
        }
    }
}

/// Little-endian u64s; the frame decoder checked the length is a multiple
/// of 8 and at most [`MAX_PROBE_ITEMS`] of them.
fn words(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()
}

impl Control<'_> {
    /// The frame kind.
    pub fn kind(&self) -> FrameKind {
        match self {
            Control::Welcome(_) => FrameKind::Welcome,
            Control::Error(_) => FrameKind::Error,
            Control::RoundEnd { .. } => FrameKind::RoundEnd,
            Control::Done(_) => FrameKind::Done,
            Control::Verified { .. } => FrameKind::Verified,
            Control::End { .. } => FrameKind::End,
            Control::PageRequest(_) => FrameKind::PageRequest,
            Control::Probe { .. } => FrameKind::Probe,
            Control::ProbeReply(_) => FrameKind::ProbeReply,
            Control::Switchover { .. } => FrameKind::Switchover,
            Control::Keepalive => FrameKind::Keepalive,
            Control::Ack { .. } => FrameKind::Ack,
            Control::Received { .. } => FrameKind::Received,
        }
    }

    /// Appends the whole frame (header, payload, check) to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let mut h = FrameHdr::new(self.kind());
        let mut body = Vec::new();
        match self {
            Control::Welcome(w) => body = w.encode(),
            Control::Error(e) => body = e.encode(),
            Control::RoundEnd { round, frames, last } => {
                h.aux = round.0;
                h.first = *frames;
                h.flags = if *last { FLAG_FINAL } else { 0 };
            }
            Control::Done(d) => h.aux = d.0,
            Control::Verified { value, closed } => {
                h.aux = *value;
                h.flags = if *closed { FLAG_CLOSED } else { 0 };
            }
            Control::End { chunks } => h.aux = *chunks,
            Control::PageRequest(r) => {
                h.region = r.region.0;
                h.first = r.start.0;
                h.count = u32::try_from(r.len()).expect("a page request fits a frame");
            }
            Control::Probe { region, ask, places } => {
                debug_assert!(places.len() <= MAX_PROBE_ITEMS as usize);
                h.region = region.0;
                h.flags = match ask {
                    ProbeAsk::PageHashes => FLAG_PROBE_HASH,
                    ProbeAsk::Words => FLAG_PROBE_WORDS,
                };
                body = places.iter().flat_map(|p| p.to_le_bytes()).collect();
            }
            Control::ProbeReply(values) => body = values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Control::Switchover { round, last, need } => {
                h.aux = round.0;
                h.flags = if *last { FLAG_FINAL } else { 0 };
                if let Some(n) = need {
                    h.region = n.range.region.0;
                    h.first = n.range.start.0;
                    h.count = u32::try_from(n.range.len()).expect("a bitmap piece fits a frame");
                    body = n.bits.to_vec();
                }
            }
            Control::Keepalive => {}
            Control::Ack { next } => h.aux = *next,
            Control::Received { frames } => h.aux = *frames,
        }
        let mut f = Vec::new();
        build_control(&mut f, h, &body);
        out.extend_from_slice(&f);
    }

    /// The whole frame.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::HEADER_LEN;
    use crate::hello::ErrorCode;

    fn round_trip(c: Control<'_>) {
        let f = c.encode();
        let hdr = FrameHdr::decode(f[..HEADER_LEN].try_into().unwrap()).unwrap();
        match Message::decode(hdr, &f[HEADER_LEN..]).unwrap() {
            Message::Control(back) => assert_eq!(back, c),
            other => panic!("{other:?}"),
        }
        // Any flipped byte is refused (the check covers header and payload).
        for at in 0..f.len() {
            let mut g = f.clone();
            g[at] ^= 0x20;
            let Ok(hdr) = FrameHdr::decode(g[..HEADER_LEN].try_into().unwrap()) else { continue };
            let Some(p) = g.get(HEADER_LEN..HEADER_LEN + hdr.len as usize) else { continue };
            if g.len() == HEADER_LEN + hdr.len as usize {
                assert!(Message::decode(hdr, p).is_err(), "byte {at} of {:?} changed unnoticed", c.kind());
            }
        }
    }

    fn range(r: u32, s: u64, e: u64) -> PageRange {
        PageRange { region: RegionIdx(r), start: PageIdx(s), end: PageIdx(e) }
    }

    #[test]
    fn every_control_message_round_trips_and_any_changed_byte_is_refused() {
        round_trip(Control::Welcome(Welcome { session: [3; 16], caps: 5 }));
        round_trip(Control::Error(ErrorMsg { code: ErrorCode::Auth, message: "no".into() }));
        round_trip(Control::RoundEnd { round: Round(7), frames: 1234, last: true });
        round_trip(Control::RoundEnd { round: Round(0), frames: 0, last: false });
        round_trip(Control::Done(Digest(0xfeed)));
        round_trip(Control::Verified { value: 99, closed: true });
        round_trip(Control::End { chunks: 42 });
        round_trip(Control::PageRequest(range(2, 100, 108)));
        round_trip(Control::Probe { region: RegionIdx(1), ask: ProbeAsk::Words, places: vec![8, 16, 4096] });
        round_trip(Control::Probe { region: RegionIdx(0), ask: ProbeAsk::PageHashes, places: vec![0, 5] });
        round_trip(Control::ProbeReply(vec![1, 2, 3]));
        round_trip(Control::Switchover { round: Round(3), last: true, need: None });
        let bits = [0xff, 0x0f];
        round_trip(Control::Switchover {
            round: Round(3),
            last: false,
            need: Some(NeedBitmap { range: range(0, 1016, 1028), bits: &bits }),
        });
        round_trip(Control::Keepalive);
        round_trip(Control::Ack { next: 0 });
        round_trip(Control::Ack { next: 1 << 40 });
        round_trip(Control::Received { frames: 0 });
        round_trip(Control::Received { frames: u64::MAX });
    }

    /// An acknowledgement is a header alone: no flag, no payload.
    #[test]
    fn a_received_with_flags_or_a_payload_is_refused() {
        let mut f = Control::Received { frames: 9 }.encode();
        f[2] = 1;
        let e = FrameHdr::decode(f[..HEADER_LEN].try_into().unwrap()).unwrap_err();
        assert_eq!(e, WireError::BadFlags { kind: FrameKind::Received, flags: 1 });
        let mut f = Vec::new();
        build_control(&mut f, FrameHdr::new(FrameKind::Received), &[0; 8]);
        let e = FrameHdr::decode(f[..HEADER_LEN].try_into().unwrap()).unwrap_err();
        assert_eq!(e, WireError::TooLong { kind: FrameKind::Received, len: 8, max: 0 });
    }

    #[test]
    fn handshake_kinds_are_not_messages() {
        let mut f = Vec::new();
        build_control(&mut f, FrameHdr::new(FrameKind::Hello), b"x");
        let hdr = FrameHdr::decode(f[..HEADER_LEN].try_into().unwrap()).unwrap();
        assert!(Message::decode(hdr, &f[HEADER_LEN..]).is_err());
    }

    #[test]
    fn pages_and_data_keep_their_coordinates_and_open() {
        use crate::payload::{build_data, build_pages, PagesAt, Scratch};
        let pages = vec![7u8; 2 * 4096];
        let hashes: Vec<u64> = pages.chunks(4096).map(xxhash_rust::xxh3::xxh3_64).collect();
        let mut f = Vec::new();
        let at = PagesAt { region: 1, first: 10, round: 4 };
        build_pages(&mut f, &mut Scratch::default(), at, &pages, &hashes, true);
        let hdr = FrameHdr::decode(f[..HEADER_LEN].try_into().unwrap()).unwrap();
        let Message::Pages(p) = Message::decode(hdr, &f[HEADER_LEN..]).unwrap() else { panic!() };
        assert_eq!((p.range(), p.round(), p.count()), (range(1, 10, 12), Round(4), 2));
        let mut opener = Opener::default();
        assert!(matches!(p.open(&mut opener), Ok(OpenedPages::Data { pages: got, .. }) if got == &pages[..]));
        let mut f = Vec::new();
        build_data(&mut f, 9, b"chunk", false);
        let hdr = FrameHdr::decode(f[..HEADER_LEN].try_into().unwrap()).unwrap();
        let Message::Data(d) = Message::decode(hdr, &f[HEADER_LEN..]).unwrap() else { panic!() };
        assert_eq!((d.seq(), d.decoded_len()), (9, 5));
        assert_eq!(d.open(&mut opener).unwrap(), b"chunk");
    }
}
