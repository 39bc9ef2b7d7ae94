//! Handshake and control payloads: `Hello`, `Welcome` and `Error`.
//!
//! `Hello` layout (little-endian):
//!
//! ```text
//!  0  magic         [u8; 8]  b"PMIGRATE"
//!  8  version       u16      PROTOCOL_VERSION
//! 10  mode          u8       1 = memory migration, 2 = byte stream
//! 11  reserved      u8       0
//! 12  stream_index  u16
//! 14  stream_count  u16      1..=MAX_STREAMS
//! 16  session       [u8; 16]
//! 32  caps          u64      capability bits offered
//! 40  region_count  u32      at most MAX_REGIONS
//! 44  regions       region_count × { gpa u64, len u64, flags u32, reserved u32 }
//!     ext_count     u16      extensions: { type u16, len u16, bytes }
//! ```
//!
//! Extensions are how v1 grows without a version break: a receiver skips
//! extension types it does not know. Anything that changes the meaning of
//! existing bytes needs a new version.

use crate::frame::WireError;
use pmigrate_ranges::{Gpa, PAGE_SIZE_U64};

/// The magic that opens every `Hello`.
pub const MAGIC: [u8; 8] = *b"PMIGRATE";
/// This implementation's protocol version.
pub const PROTOCOL_VERSION: u16 = 2;
/// Most streams in one session.
pub const MAX_STREAMS: u16 = 64;
/// Most regions in one session.
pub const MAX_REGIONS: u32 = 1024;
/// Most extensions in one `Hello`.
pub const MAX_EXTENSIONS: u16 = 64;

/// Capability: the sender may use lz4 payloads.
pub const CAP_LZ4: u64 = 1 << 0;
/// Capability: post-copy. The session has one stream more than the bulk
/// streams, the last, which carries only page requests (`PageRequest`) and
/// the pages that answer them, so a fault never waits behind bulk data.
pub const CAP_POSTCOPY: u64 = 1 << 1;
/// Capability: a stream lost after the switchover of a post-copy session
/// may reconnect with `Resume` and go on.
pub const CAP_RESUME: u64 = 1 << 2;
/// Capability: regions may be handed over instead of copied when the
/// destination proves it maps the same memory (`Probe` frames, and the
/// [`EXT_SHARED_REGIONS`] extension naming the regions offered).
pub const CAP_SHARED: u64 = 1 << 4;
/// Capability (stream mode): the byte stream is full duplex. Each end
/// sends its own `Data` chunks (its own numbering) and `End`, and confirms
/// the other end's with `Verified`; without it only the source sends data.
pub const CAP_DUPLEX: u64 = 1 << 5;
/// Capabilities this implementation understands.
pub const KNOWN_CAPS: u64 = CAP_LZ4 | CAP_SHARED | CAP_POSTCOPY | CAP_RESUME | CAP_DUPLEX;

/// Hello extension (with [`CAP_SHARED`]): the regions the source could
/// hand over instead of copying, as repeated little-endian `u32` region
/// indices, each in range and named once. It names regions, never paths:
/// the destination proves (protocol §7.2.1) whether the memory *it* was
/// configured with is the source's, and never opens anything a peer names.
/// (Type 1, v1's `EXT_SHARED_PATHS`, is retired.)
pub const EXT_SHARED_REGIONS: u16 = 3;

/// Encodes the [`EXT_SHARED_REGIONS`] extension.
pub fn encode_shared_regions(regions: &[u32]) -> Vec<u8> {
    regions.iter().flat_map(|r| r.to_le_bytes()).collect()
}

/// Decodes the [`EXT_SHARED_REGIONS`] extension against a table of
/// `regions` regions: every index in range, once.
pub fn decode_shared_regions(ext: &[u8], regions: usize) -> Result<Vec<u32>, WireError> {
    let mut c = Cursor::new(ext, "shared regions");
    if ext.len() % 4 != 0 {
        return Err(c.err(format!("{} bytes, not whole u32 region indices", ext.len())));
    }
    let mut out: Vec<u32> = Vec::with_capacity(ext.len() / 4);
    while c.pos < ext.len() {
        let r = c.u32()?;
        if r as usize >= regions || out.contains(&r) {
            return Err(c.err(format!("region {r} out of range or named twice")));
        }
        out.push(r);
    }
    Ok(out)
}

/// Hello extension (stream mode): which of the destination's configured
/// targets the byte stream is for, as one `u32` index. The destination
/// connects only to targets it was configured with; the source names one.
pub const EXT_TARGET: u16 = 2;

/// Encodes the [`EXT_TARGET`] extension.
pub fn encode_target(index: u32) -> Vec<u8> {
    index.to_le_bytes().to_vec()
}

/// Decodes the [`EXT_TARGET`] extension: exactly one `u32`.
pub fn decode_target(ext: &[u8]) -> Result<u32, WireError> {
    let mut c = Cursor::new(ext, "target");
    let index = c.u32()?;
    c.finish()?;
    Ok(index)
}

/// Region flag: the source backs the region with 2 MiB pages.
pub const REGION_HUGE: u32 = 1;

/// What a session carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Guest memory pages into a region table.
    Memory = 1,
    /// One ordered byte stream (the QEMU `exec:` helper), full duplex with
    /// [`CAP_DUPLEX`] (the socket proxy).
    Stream = 2,
}

impl Hello {
    /// The payload of the first extension of type `kind`, if any.
    pub fn extension(&self, kind: u16) -> Option<&[u8]> {
        self.extensions.iter().find(|(t, _)| *t == kind).map(|(_, v)| v.as_slice())
    }
}

/// A region as the handshake describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionDesc {
    /// Guest physical address.
    pub gpa: Gpa,
    /// Length in bytes (a whole number of 4 KiB pages).
    pub len: u64,
    /// `REGION_*` flags.
    pub flags: u32,
}

/// The first frame of every stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version of the sender.
    pub version: u16,
    /// Session mode.
    pub mode: Mode,
    /// Which stream of the session this is.
    pub stream_index: u16,
    /// How many streams the session has.
    pub stream_count: u16,
    /// Random session id, the same on every stream of a session.
    pub session: [u8; 16],
    /// Capability bits the sender offers.
    pub caps: u64,
    /// The source's region table (empty in stream mode).
    pub regions: Vec<RegionDesc>,
    /// Extensions `(type, bytes)`, skipped by receivers that do not know them.
    pub extensions: Vec<(u16, Vec<u8>)>,
}

/// A bounds-checked little-endian reader over a payload.
pub(crate) struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, pos: 0, what }
    }

    fn err(&self, why: impl Into<String>) -> WireError {
        WireError::BadPayload { what: self.what, why: why.into() }
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or_else(|| self.err(format!("truncated at byte {}", self.pos)))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.bytes(1)?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, WireError> {
        let b = self.bytes(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, WireError> {
        let mut x = [0u8; 8];
        x.copy_from_slice(self.bytes(8)?);
        Ok(u64::from_le_bytes(x))
    }

    pub(crate) fn finish(&self) -> Result<(), WireError> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(self.err(format!("{} trailing bytes", self.buf.len() - self.pos)))
        }
    }
}

impl Hello {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(48 + self.regions.len() * 24);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&self.version.to_le_bytes());
        b.push(self.mode as u8);
        b.push(0);
        b.extend_from_slice(&self.stream_index.to_le_bytes());
        b.extend_from_slice(&self.stream_count.to_le_bytes());
        b.extend_from_slice(&self.session);
        b.extend_from_slice(&self.caps.to_le_bytes());
        b.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        for r in &self.regions {
            b.extend_from_slice(&r.gpa.0.to_le_bytes());
            b.extend_from_slice(&r.len.to_le_bytes());
            b.extend_from_slice(&r.flags.to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
        }
        b.extend_from_slice(&(self.extensions.len() as u16).to_le_bytes());
        for (t, v) in &self.extensions {
            b.extend_from_slice(&t.to_le_bytes());
            b.extend_from_slice(&(v.len() as u16).to_le_bytes());
            b.extend_from_slice(v);
        }
        b
    }

    /// Decodes and checks a payload: magic, version, stream numbering,
    /// table sizes and region shapes (page-aligned, non-empty, no wrap, no
    /// overlap).
    pub fn decode(payload: &[u8]) -> Result<Self, WireError> {
        let mut c = Cursor::new(payload, "hello");
        if c.bytes(8)? != MAGIC {
            return Err(c.err("not a pmigrate peer (bad magic)"));
        }
        let version = c.u16()?;
        if version != PROTOCOL_VERSION {
            return Err(c.err(format!("protocol version {version}, this end speaks {PROTOCOL_VERSION}")));
        }
        let mode = match c.u8()? {
            1 => Mode::Memory,
            2 => Mode::Stream,
            m => return Err(c.err(format!("unknown mode {m}"))),
        };
        if c.u8()? != 0 {
            return Err(c.err("reserved byte set"));
        }
        let stream_index = c.u16()?;
        let stream_count = c.u16()?;
        if stream_count == 0 || stream_count > MAX_STREAMS || stream_index >= stream_count {
            return Err(c.err(format!("stream {stream_index} of {stream_count}")));
        }
        let mut session = [0u8; 16];
        session.copy_from_slice(c.bytes(16)?);
        let caps = c.u64()?;
        let n = c.u32()?;
        if n > MAX_REGIONS {
            return Err(c.err(format!("{n} regions, at most {MAX_REGIONS}")));
        }
        let mut regions = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let r = RegionDesc { gpa: Gpa(c.u64()?), len: c.u64()?, flags: c.u32()? };
            if c.u32()? != 0 {
                return Err(c.err("reserved region field set"));
            }
            if r.flags & !REGION_HUGE != 0 {
                return Err(c.err(format!("unknown region flags {:#x}", r.flags)));
            }
            if r.len == 0
                || r.len % PAGE_SIZE_U64 != 0
                || !r.gpa.is_aligned(PAGE_SIZE_U64)
                || r.gpa.checked_add(r.len).is_none()
            {
                return Err(c.err(format!("region at {} of {} bytes", r.gpa, r.len)));
            }
            regions.push(r);
        }
        let mut sorted: Vec<_> = regions.iter().map(|r| (r.gpa.0, r.gpa.0 + r.len)).collect();
        sorted.sort_unstable();
        if sorted.windows(2).any(|w| w[1].0 < w[0].1) {
            return Err(c.err("overlapping regions"));
        }
        let ne = c.u16()?;
        if ne > MAX_EXTENSIONS {
            return Err(c.err(format!("{ne} extensions")));
        }
        let mut extensions = Vec::with_capacity(ne as usize);
        for _ in 0..ne {
            let t = c.u16()?;
            let l = c.u16()?;
            extensions.push((t, c.bytes(l as usize)?.to_vec()));
        }
        c.finish()?;
        Ok(Hello { version, mode, stream_index, stream_count, session, caps, regions, extensions })
    }
}

/// The destination's answer to a `Hello`: the session id it accepted and the
/// capabilities both ends will use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Welcome {
    /// Session id echoed back.
    pub session: [u8; 16],
    /// Capabilities in force (a subset of those offered).
    pub caps: u64,
}

impl Welcome {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = self.session.to_vec();
        b.extend_from_slice(&self.caps.to_le_bytes());
        b
    }

    /// Decodes a payload.
    pub fn decode(payload: &[u8]) -> Result<Self, WireError> {
        let mut c = Cursor::new(payload, "welcome");
        let mut session = [0u8; 16];
        session.copy_from_slice(c.bytes(16)?);
        let caps = c.u64()?;
        c.finish()?;
        Ok(Welcome { session, caps })
    }
}

/// Why a peer gave up, carried by an `Error` frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ErrorCode {
    /// The frame stream broke the protocol.
    Protocol = 1,
    /// A checksum did not match.
    Checksum = 2,
    /// The connection is not part of the session being served.
    NotInSession = 3,
    /// The memory layouts of the two ends do not fit.
    Layout = 4,
    /// An I/O error on the other end.
    Io = 5,
    /// The final digest did not match.
    Digest = 6,
    /// The peer gave up for another reason.
    Aborted = 7,
    /// The peer cannot do what the session asks (a capability it lacks).
    Unsupported = 8,
    /// The peer did not prove what it must: the key, the certificate, the
    /// session's secret, or the same authentication method.
    Auth = 9,
    /// Post-copy: the guest started at the destination, and then the
    /// session failed; the guest is the destination's, incomplete. Every
    /// other code from a destination means its guest never started.
    Started = 10,
}

/// An `Error` frame's payload: code and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorMsg {
    /// What kind of failure.
    pub code: ErrorCode,
    /// Human-readable detail (at most 4 KiB − 4 of UTF-8).
    pub message: String,
}

impl ErrorMsg {
    /// Encodes the payload, cutting the message to fit.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = (self.code as u32).to_le_bytes().to_vec();
        let mut end = self.message.len().min(4092);
        while !self.message.is_char_boundary(end) {
            end -= 1;
        }
        b.extend_from_slice(&self.message.as_bytes()[..end]);
        b
    }

    /// Decodes a payload; an unknown code or invalid UTF-8 is an error.
    pub fn decode(payload: &[u8]) -> Result<Self, WireError> {
        use ErrorCode::*;
        let mut c = Cursor::new(payload, "error frame");
        let code = match c.u32()? {
            1 => Protocol,
            2 => Checksum,
            3 => NotInSession,
            4 => Layout,
            5 => Io,
            6 => Digest,
            7 => Aborted,
            8 => Unsupported,
            9 => Auth,
            10 => Started,
            x => return Err(c.err(format!("unknown error code {x}"))),
        };
        let rest = c.bytes(payload.len() - 4)?;
        let message = String::from_utf8(rest.to_vec()).map_err(|_| c.err("message is not UTF-8"))?;
        Ok(ErrorMsg { code, message })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hello() -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            mode: Mode::Memory,
            stream_index: 1,
            stream_count: 4,
            session: [7; 16],
            caps: CAP_LZ4,
            regions: vec![
                RegionDesc { gpa: Gpa(0), len: 1 << 30, flags: 0 },
                RegionDesc { gpa: Gpa(1 << 32), len: 2 << 20, flags: REGION_HUGE },
            ],
            extensions: vec![(0x7777, b"future".to_vec())],
        }
    }

    #[test]
    fn hello_round_trips() {
        let h = hello();
        assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn bad_hellos_are_refused() {
        let mut h = hello();
        h.stream_index = 4;
        assert!(Hello::decode(&h.encode()).is_err());
        let mut h = hello();
        h.regions[1].gpa = Gpa(1 << 29);
        assert!(Hello::decode(&h.encode()).is_err(), "overlap");
        let mut h = hello();
        h.regions[0].len = 100;
        assert!(Hello::decode(&h.encode()).is_err(), "not page sized");
        let mut h = hello();
        h.regions[0].gpa = Gpa(u64::MAX - 4095);
        h.regions[0].len = 8192;
        assert!(Hello::decode(&h.encode()).is_err(), "wraps");
        let mut b = hello().encode();
        b[8] = 1;
        assert!(Hello::decode(&b).is_err(), "version");
        let mut b = hello().encode();
        b.push(0);
        assert!(Hello::decode(&b).is_err(), "trailing byte");
        let mut b = hello().encode();
        b[40..44].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Hello::decode(&b).is_err(), "huge region count is refused before allocating");
    }

    #[test]
    fn error_messages_round_trip_and_are_bounded() {
        let e = ErrorMsg { code: ErrorCode::Checksum, message: "é".repeat(5000) };
        let b = e.encode();
        assert!(b.len() <= 4096);
        let d = ErrorMsg::decode(&b).unwrap();
        assert_eq!(d.code, ErrorCode::Checksum);
        assert!(e.message.starts_with(&d.message));
        assert!(ErrorMsg::decode(&[99, 0, 0, 0]).is_err());
    }

    #[test]
    fn targets_round_trip_and_are_exactly_four_bytes() {
        assert_eq!(decode_target(&encode_target(7)).unwrap(), 7);
        assert!(decode_target(&[1, 2, 3]).is_err());
        assert!(decode_target(&[1, 2, 3, 4, 5]).is_err());
        let mut h = hello();
        h.extensions.push((EXT_TARGET, encode_target(3)));
        let back = Hello::decode(&h.encode()).unwrap();
        assert_eq!(back.extension(EXT_TARGET).map(decode_target).unwrap().unwrap(), 3);
        assert!(back.extension(0x4242).is_none());
    }

    #[test]
    fn shared_regions_round_trip_and_are_checked() {
        assert_eq!(decode_shared_regions(&encode_shared_regions(&[0, 2]), 3).unwrap(), vec![0, 2]);
        assert!(decode_shared_regions(&encode_shared_regions(&[0, 2]), 2).is_err(), "region 2 of 2");
        assert!(decode_shared_regions(&encode_shared_regions(&[1, 1]), 3).is_err(), "named twice");
        assert!(decode_shared_regions(&[0, 0, 0], 3).is_err(), "not whole u32s");
    }

    proptest! {
        #[test]
        fn random_shared_region_extensions_never_panic(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_shared_regions(&b, 4);
        }

        #[test]
        fn random_payloads_never_panic(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Hello::decode(&b);
            let _ = Welcome::decode(&b);
            let _ = ErrorMsg::decode(&b);
        }

        #[test]
        fn truncated_hellos_are_refused(cut in 0usize..200) {
            let b = hello().encode();
            let cut = cut.min(b.len() - 1);
            prop_assert!(Hello::decode(&b[..cut]).is_err());
        }
    }
}
