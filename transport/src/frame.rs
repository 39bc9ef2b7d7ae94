//! Frame header and codec of wire protocol v1 (see `docs/protocol.md`).
//!
//! Every frame is a 40-byte little-endian header followed by `len` payload
//! bytes:
//!
//! ```text
//!  0  kind      u8    FrameKind (0 is invalid)
//!  1  encoding  u8    Encoding of the payload (0 = none)
//!  2  flags     u16   kind-specific flags; unknown bits are rejected
//!  4  len       u32   payload length, at most MAX_PAYLOAD
//!  8  region    u32   region index (Pages, PageRequest)
//! 12  count     u32   page count (Pages), decoded length (Data)
//! 16  first     u64   first page (Pages), frames on this stream (RoundEnd)
//! 24  aux       u64   round (Pages, RoundEnd), sequence (Data, Ack), digest (Done)
//! 32  check     u64   xxh3 of header bytes 0..32 followed by the frame body
//! ```
//!
//! The *body* the check covers is the payload as decoded, except for page
//! frames, whose body is the xxh3 of each decoded page in order (so both ends
//! hash each page once and reuse those hashes for skip decisions and the
//! final memory digest). Because the check covers the header too, a flipped
//! bit in a page address is caught as surely as one in the data.
//!
//! Decoding never panics and never sizes an allocation from an unchecked
//! field: [`FrameHdr::decode`] checks every field against its kind before a
//! payload byte is read.

use xxhash_rust::xxh3::Xxh3;

/// Header size in bytes.
pub const HEADER_LEN: usize = 40;
/// Largest payload of any frame: 4 MiB, a whole batch of 1024 raw pages.
pub const MAX_PAYLOAD: u32 = 4 << 20;
/// Most pages one page frame may carry.
pub const MAX_FRAME_PAGES: u32 = MAX_PAYLOAD / 4096;

/// What a frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// Source → destination, first frame of every stream: session handshake.
    Hello = 1,
    /// Destination → source: the stream is accepted.
    Welcome = 2,
    /// Source → destination: a batch of pages of one region.
    Pages = 3,
    /// Source → destination: this stream sent all its frames of a round.
    RoundEnd = 4,
    /// Source → destination on stream 0: the migration is complete; `aux`
    /// holds the digest of all memory as the source sent it.
    Done = 5,
    /// Destination → source on stream 0: memory verified against the digest.
    /// In stream mode, the confirmation of a direction; [`FLAG_CLOSED`]:
    /// the confirming end's local peer closed, the direction stops here.
    Verified = 6,
    /// Either way: a fatal error with a code and a message; the sender closes.
    Error = 7,
    /// Source → destination in byte-stream mode: one chunk of the stream.
    Data = 8,
    /// Source → destination in byte-stream mode: the stream ended after
    /// `aux` chunks.
    End = 9,
    /// Destination → source on the priority stream (post-copy): send pages
    /// `first..first + count` of `region` now; a guest vCPU waits on one.
    PageRequest = 10,
    /// The authentication exchange that opens every connection (offer,
    /// challenge, proof, confirmation; see [`crate::auth`]). Kind 11, v1's
    /// `Resume`, is retired: a stream coming back says so in its offer.
    Auth = 12,
    /// Source → destination on stream 0 (with `CAP_SHARED`): read these
    /// places of a region through your own mapping and answer. Flag
    /// [`FLAG_PROBE_HASH`]: the payload lists page indices, the answer is
    /// each page's xxh3. Flag [`FLAG_PROBE_WORDS`]: the payload lists byte
    /// offsets of 8-byte words, the answer is each word.
    Probe = 13,
    /// Destination → source on stream 0: the values a `Probe` asked for,
    /// in order, as little-endian `u64`s.
    ProbeReply = 14,
    /// Post-copy switchover. Source → destination on stream 0: the pages
    /// `first..first + count` of `region` the destination must not use
    /// until they arrive, as a bitmap (bit `i` of byte `i / 8`: page
    /// `first + i`); `aux` is the post-copy round, [`FLAG_FINAL`] marks the
    /// last piece. Destination → source on the priority stream, empty with
    /// [`FLAG_FINAL`]: the guest runs here now.
    Switchover = 15,
    /// Either way, after the handshake, empty: "still here". Sent on a
    /// stream that has carried nothing for a while, so the other end can
    /// tell a quiet peer from a vanished or frozen one; receivers skip it.
    Keepalive = 16,
    /// Stream mode with `CAP_RESUME`, either way, empty: every chunk this
    /// stream carried with a sequence number below `aux` was taken, so its
    /// sender need not keep them for sending again after a lost connection.
    Ack = 17,
    /// Destination → source, any stream of a memory session with
    /// `CAP_RESUME`, empty: `aux` frames of this stream were received and
    /// processed since the session began. An acknowledgement now and then,
    /// and the first frame on a connection that came back, so the source
    /// resends exactly what the lost one swallowed.
    Received = 18,
}

impl FrameKind {
    fn from_u8(v: u8) -> Option<Self> {
        use FrameKind::*;
        Some(match v {
            1 => Hello,
            2 => Welcome,
            3 => Pages,
            4 => RoundEnd,
            5 => Done,
            6 => Verified,
            7 => Error,
            8 => Data,
            9 => End,
            10 => PageRequest,
            12 => Auth,
            13 => Probe,
            14 => ProbeReply,
            15 => Switchover,
            16 => Keepalive,
            17 => Ack,
            18 => Received,
            _ => return None,
        })
    }
}

/// How a payload is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Encoding {
    /// Not a data frame.
    None = 0,
    /// The bytes as they are.
    Raw = 1,
    /// All-zero pages; no payload.
    Zero = 2,
    /// One lz4 block of the bytes.
    Lz4 = 3,
}

impl Encoding {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Encoding::None,
            1 => Encoding::Raw,
            2 => Encoding::Zero,
            3 => Encoding::Lz4,
            _ => return None,
        })
    }
}

/// RoundEnd flag: the last round; the source is paused.
pub const FLAG_FINAL: u16 = 1;
/// Verified flag (stream mode): the confirming end's local peer closed its
/// end — nothing more of this direction can be delivered there. `aux` is
/// the chunks it delivered; the sender stops the direction and sends no
/// more of it.
pub const FLAG_CLOSED: u16 = 1;
/// Probe flag: hash whole pages.
pub const FLAG_PROBE_HASH: u16 = 1;
/// Probe flag: read 8-byte words.
pub const FLAG_PROBE_WORDS: u16 = 2;
/// Most places one probe may ask about.
pub const MAX_PROBE_ITEMS: u32 = 512;

/// A frame that breaks the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Unknown frame kind.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// Unknown encoding, or one not allowed for the kind.
    #[error("encoding {encoding} not allowed for {kind:?} frames")]
    BadEncoding {
        /// Frame kind.
        kind: FrameKind,
        /// Encoding byte.
        encoding: u8,
    },
    /// Flag bits not defined for the kind.
    #[error("unknown flags {flags:#x} on {kind:?} frame")]
    BadFlags {
        /// Frame kind.
        kind: FrameKind,
        /// Flag bits.
        flags: u16,
    },
    /// Payload larger than allowed.
    #[error("{kind:?} frame of {len} payload bytes exceeds {max}")]
    TooLong {
        /// Frame kind.
        kind: FrameKind,
        /// Length claimed.
        len: u32,
        /// Maximum for the kind.
        max: u32,
    },
    /// Fields inconsistent with each other (page count vs length, …).
    #[error("malformed {kind:?} frame: {why}")]
    Malformed {
        /// Frame kind.
        kind: FrameKind,
        /// What is inconsistent.
        why: &'static str,
    },
    /// The check value does not match the header and body.
    #[error("checksum mismatch on {kind:?} frame (region {region}, first {first}, count {count})")]
    Checksum {
        /// Frame kind.
        kind: FrameKind,
        /// Region field.
        region: u32,
        /// First field.
        first: u64,
        /// Count field.
        count: u32,
    },
    /// A handshake or control payload that does not parse.
    #[error("bad {what}: {why}")]
    BadPayload {
        /// What was being parsed.
        what: &'static str,
        /// Why it failed.
        why: String,
    },
}

/// A decoded, field-checked frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHdr {
    /// Frame kind.
    pub kind: FrameKind,
    /// Payload encoding.
    pub encoding: Encoding,
    /// Kind-specific flags.
    pub flags: u16,
    /// Payload length.
    pub len: u32,
    /// Region index.
    pub region: u32,
    /// Page count, or decoded length for data frames.
    pub count: u32,
    /// First page, or a count for control frames.
    pub first: u64,
    /// Round, sequence or digest.
    pub aux: u64,
    /// xxh3 of header bytes 0..32 and the body.
    pub check: u64,
}

const _: () = assert!(HEADER_LEN == 1 + 1 + 2 + 4 + 4 + 4 + 8 + 8 + 8);

impl FrameHdr {
    /// A header of `kind` with every other field zero.
    pub fn new(kind: FrameKind) -> Self {
        Self { kind, encoding: Encoding::None, flags: 0, len: 0, region: 0, count: 0, first: 0, aux: 0, check: 0 }
    }

    /// The 40 header bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = self.kind as u8;
        b[1] = self.encoding as u8;
        b[2..4].copy_from_slice(&self.flags.to_le_bytes());
        b[4..8].copy_from_slice(&self.len.to_le_bytes());
        b[8..12].copy_from_slice(&self.region.to_le_bytes());
        b[12..16].copy_from_slice(&self.count.to_le_bytes());
        b[16..24].copy_from_slice(&self.first.to_le_bytes());
        b[24..32].copy_from_slice(&self.aux.to_le_bytes());
        b[32..40].copy_from_slice(&self.check.to_le_bytes());
        b
    }

    /// Parses and checks 40 header bytes. Every field is validated against
    /// its kind here, so `len` is safe to allocate from afterwards.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, WireError> {
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(x)
        };
        let kind = FrameKind::from_u8(b[0]).ok_or(WireError::UnknownKind(b[0]))?;
        let encoding = Encoding::from_u8(b[1]).ok_or(WireError::BadEncoding { kind, encoding: b[1] })?;
        let hdr = FrameHdr {
            kind,
            encoding,
            flags: u16::from_le_bytes([b[2], b[3]]),
            len: u32_at(4),
            region: u32_at(8),
            count: u32_at(12),
            first: u64_at(16),
            aux: u64_at(24),
            check: u64_at(32),
        };
        hdr.validate()?;
        Ok(hdr)
    }

    fn validate(&self) -> Result<(), WireError> {
        use FrameKind::*;
        let kind = self.kind;
        let allowed_flags = match kind {
            RoundEnd | Switchover => FLAG_FINAL,
            Verified => FLAG_CLOSED,
            Probe => FLAG_PROBE_HASH | FLAG_PROBE_WORDS,
            _ => 0,
        };
        if self.flags & !allowed_flags != 0 {
            return Err(WireError::BadFlags { kind, flags: self.flags });
        }
        let max = match kind {
            Pages | Data | Switchover => MAX_PAYLOAD,
            Hello | Welcome => 64 << 10,
            // Read before the peer proved anything: a few dozen bytes.
            Auth => crate::auth::MAX_AUTH_LEN as u32,
            Error => 4 << 10,
            RoundEnd | Done | Verified | End | PageRequest | Keepalive | Ack | Received => 0,
            Probe | ProbeReply => MAX_PROBE_ITEMS * 8,
        };
        if self.len > max {
            return Err(WireError::TooLong { kind, len: self.len, max });
        }
        let malformed = |why| Err(WireError::Malformed { kind, why });
        match (kind, self.encoding) {
            (Pages, Encoding::None) | (Data, Encoding::None | Encoding::Zero) => {
                Err(WireError::BadEncoding { kind, encoding: self.encoding as u8 })
            }
            (Pages, enc) => {
                if self.count == 0 || self.count > MAX_FRAME_PAGES {
                    return malformed("page count out of range");
                }
                if self.first.checked_add(u64::from(self.count)).is_none() {
                    return malformed("page range wraps");
                }
                let raw_len = self.count * 4096;
                match enc {
                    Encoding::Raw if self.len != raw_len => malformed("raw length differs from page count"),
                    Encoding::Zero if self.len != 0 => malformed("zero pages carry no payload"),
                    Encoding::Lz4 if self.len == 0 || self.len > raw_len => {
                        malformed("lz4 payload larger than its pages")
                    }
                    _ => Ok(()),
                }
            }
            (Data, enc) => {
                if self.count == 0 || self.count > MAX_PAYLOAD {
                    return malformed("data length out of range");
                }
                match enc {
                    Encoding::Raw if self.len != self.count => malformed("raw length differs from data length"),
                    Encoding::Lz4 if self.len == 0 || self.len > self.count => {
                        malformed("lz4 payload larger than its data")
                    }
                    _ => Ok(()),
                }
            }
            (Probe, Encoding::None) => {
                if self.flags.count_ones() != 1 || self.len == 0 || self.len % 8 != 0 {
                    return malformed("a probe asks one kind of question about whole u64 places");
                }
                Ok(())
            }
            (ProbeReply, Encoding::None) if self.len % 8 != 0 => malformed("a probe reply is whole u64s"),
            (PageRequest, Encoding::None) => {
                if self.count == 0 || self.count > MAX_FRAME_PAGES {
                    return malformed("page count out of range");
                }
                if self.first.checked_add(u64::from(self.count)).is_none() {
                    return malformed("page range wraps");
                }
                Ok(())
            }
            (Switchover, Encoding::None) => {
                if u64::from(self.len) != u64::from(self.count).div_ceil(8) {
                    return malformed("a switchover bitmap has one bit per page");
                }
                if self.first.checked_add(u64::from(self.count)).is_none() {
                    return malformed("page range wraps");
                }
                Ok(())
            }
            (_, Encoding::None) => Ok(()),
            (_, enc) => Err(WireError::BadEncoding { kind, encoding: enc as u8 }),
        }
    }

    /// Starts the check hash over header bytes 0..32 (check field excluded).
    pub fn check_hasher(&self) -> Xxh3 {
        let mut h = Xxh3::new();
        h.update(&self.encode()[..32]);
        h
    }

    /// Computes `check` from the body and stores it.
    pub fn seal(&mut self, body: &[u8]) {
        let mut h = self.check_hasher();
        h.update(body);
        self.check = h.digest();
    }

    /// Verifies `check` against the body.
    pub fn verify(&self, body: &[u8]) -> Result<(), WireError> {
        let mut h = self.check_hasher();
        h.update(body);
        self.verify_digest(h.digest())
    }

    /// Verifies `check` against a finished hasher's digest.
    pub fn verify_digest(&self, digest: u64) -> Result<(), WireError> {
        if digest == self.check {
            Ok(())
        } else {
            Err(WireError::Checksum { kind: self.kind, region: self.region, first: self.first, count: self.count })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_hdr() -> impl Strategy<Value = [u8; HEADER_LEN]> {
        proptest::array::uniform32(any::<u8>()).prop_flat_map(|a| {
            proptest::array::uniform8(any::<u8>()).prop_map(move |b| {
                let mut x = [0u8; HEADER_LEN];
                x[..32].copy_from_slice(&a);
                x[32..].copy_from_slice(&b);
                x
            })
        })
    }

    proptest! {
        #[test]
        fn decoding_random_bytes_never_panics_and_round_trips(bytes in arb_hdr()) {
            if let Ok(h) = FrameHdr::decode(&bytes) {
                prop_assert_eq!(h.encode(), bytes);
                prop_assert!(h.len <= MAX_PAYLOAD);
            }
        }

        #[test]
        fn valid_page_headers_round_trip(count in 1u32..=MAX_FRAME_PAGES, first in 0u64..u64::MAX/2,
                                         region in any::<u32>(), round in any::<u64>()) {
            let mut h = FrameHdr::new(FrameKind::Pages);
            h.encoding = Encoding::Raw;
            h.count = count;
            h.len = count * 4096;
            h.first = first;
            h.region = region;
            h.aux = round;
            h.seal(b"body");
            let d = FrameHdr::decode(&h.encode()).unwrap();
            prop_assert_eq!(d, h);
            prop_assert!(d.verify(b"body").is_ok());
            prop_assert!(d.verify(b"bodx").is_err());
        }
    }

    #[test]
    fn unknown_values_are_rejected() {
        let mut h = FrameHdr::new(FrameKind::RoundEnd).encode();
        assert!(FrameHdr::decode(&h).is_ok());
        h[0] = 0;
        assert_eq!(FrameHdr::decode(&h), Err(WireError::UnknownKind(0)));
        h[0] = 200;
        assert_eq!(FrameHdr::decode(&h), Err(WireError::UnknownKind(200)));
        h[0] = FrameKind::RoundEnd as u8;
        h[2] = 0x80;
        assert!(matches!(FrameHdr::decode(&h), Err(WireError::BadFlags { .. })));
        h[2] = 0;
        h[1] = 9;
        assert!(matches!(FrameHdr::decode(&h), Err(WireError::BadEncoding { .. })));
        h[1] = Encoding::Raw as u8;
        assert!(matches!(FrameHdr::decode(&h), Err(WireError::BadEncoding { .. })));
    }

    #[test]
    fn verified_takes_the_closed_flag_and_nothing_else() {
        let mut h = FrameHdr::new(FrameKind::Verified);
        h.flags = FLAG_CLOSED;
        assert!(FrameHdr::decode(&h.encode()).is_ok());
        h.flags = 2;
        assert!(matches!(FrameHdr::decode(&h.encode()), Err(WireError::BadFlags { .. })));
        let mut e = FrameHdr::new(FrameKind::End);
        e.flags = FLAG_CLOSED;
        assert!(matches!(FrameHdr::decode(&e.encode()), Err(WireError::BadFlags { .. })));
    }

    #[test]
    fn an_ack_is_empty_and_takes_no_flags() {
        let mut h = FrameHdr::new(FrameKind::Ack);
        h.aux = 42;
        assert!(FrameHdr::decode(&h.encode()).is_ok());
        h.flags = FLAG_FINAL;
        assert!(matches!(FrameHdr::decode(&h.encode()), Err(WireError::BadFlags { .. })));
        h.flags = 0;
        h.len = 8;
        assert!(matches!(FrameHdr::decode(&h.encode()), Err(WireError::TooLong { .. })));
        h.len = 0;
        h.encoding = Encoding::Raw;
        assert!(matches!(FrameHdr::decode(&h.encode()), Err(WireError::BadEncoding { .. })));
    }

    #[test]
    fn post_copy_frames_are_bounded() {
        let mut h = FrameHdr::new(FrameKind::Switchover);
        h.count = 100;
        h.len = 13;
        h.flags = FLAG_FINAL;
        assert!(FrameHdr::decode(&h.encode()).is_ok());
        h.len = 12;
        assert!(matches!(FrameHdr::decode(&h.encode()), Err(WireError::Malformed { .. })), "one bit per page");
        h.len = 13;
        h.first = u64::MAX - 10;
        assert!(matches!(FrameHdr::decode(&h.encode()), Err(WireError::Malformed { .. })), "wrapping range");
        h.first = 0;
        h.flags = 2;
        assert!(matches!(FrameHdr::decode(&h.encode()), Err(WireError::BadFlags { .. })));
        let mut r = FrameHdr::new(FrameKind::PageRequest);
        r.count = 8;
        r.first = 5;
        assert!(FrameHdr::decode(&r.encode()).is_ok());
        r.first = u64::MAX - 3;
        assert!(FrameHdr::decode(&r.encode()).is_err(), "wrapping request");
        r.first = 5;
        r.count = 0;
        assert!(FrameHdr::decode(&r.encode()).is_err(), "empty request");
        r.count = 8;
        r.len = 8;
        assert!(FrameHdr::decode(&r.encode()).is_err(), "requests carry no payload");
    }

    #[test]
    fn inconsistent_page_frames_are_rejected() {
        let mut h = FrameHdr::new(FrameKind::Pages);
        h.encoding = Encoding::Raw;
        h.count = 2;
        h.len = 4096;
        assert!(matches!(FrameHdr::decode(&h.encode()), Err(WireError::Malformed { .. })));
        h.count = MAX_FRAME_PAGES + 1;
        h.len = MAX_PAYLOAD;
        assert!(FrameHdr::decode(&h.encode()).is_err());
        h.count = 1;
        h.len = 4096;
        h.first = u64::MAX;
        assert!(matches!(FrameHdr::decode(&h.encode()), Err(WireError::Malformed { .. })));
        h.first = 0;
        h.encoding = Encoding::Lz4;
        h.len = 4097;
        assert!(FrameHdr::decode(&h.encode()).is_err());
        h.len = MAX_PAYLOAD + 1;
        h.kind = FrameKind::Data;
        h.count = MAX_PAYLOAD;
        assert!(matches!(FrameHdr::decode(&h.encode()), Err(WireError::TooLong { .. })));
        let mut e = FrameHdr::new(FrameKind::Done);
        e.len = 1;
        assert!(matches!(FrameHdr::decode(&e.encode()), Err(WireError::TooLong { .. })));
    }

    #[test]
    fn probes_ask_one_kind_of_question_about_whole_words() {
        let mut h = FrameHdr::new(FrameKind::Probe);
        h.flags = FLAG_PROBE_HASH;
        h.len = 16;
        assert!(FrameHdr::decode(&h.encode()).is_ok());
        h.flags = FLAG_PROBE_HASH | FLAG_PROBE_WORDS;
        assert!(FrameHdr::decode(&h.encode()).is_err(), "both kinds");
        h.flags = FLAG_PROBE_WORDS;
        h.len = 12;
        assert!(FrameHdr::decode(&h.encode()).is_err(), "not whole u64s");
        h.len = MAX_PROBE_ITEMS * 8 + 8;
        assert!(matches!(FrameHdr::decode(&h.encode()), Err(WireError::TooLong { .. })));
        let mut r = FrameHdr::new(FrameKind::ProbeReply);
        r.len = 7;
        assert!(FrameHdr::decode(&r.encode()).is_err());
    }

    #[test]
    fn the_check_covers_the_header() {
        let mut h = FrameHdr::new(FrameKind::Pages);
        h.encoding = Encoding::Zero;
        h.count = 4;
        h.seal(&[]);
        assert!(h.verify(&[]).is_ok());
        h.first = 1;
        assert!(matches!(h.verify(&[]), Err(WireError::Checksum { .. })));
    }
}
