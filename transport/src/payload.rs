//! Building and opening data-carrying frames: page batches and stream chunks.
//!
//! The source builds each frame straight into one buffer (header, then
//! payload) that the stream writer sends as it is; the destination opens a
//! frame by decoding its payload into a reusable buffer and verifying the
//! check before any byte is used.

use pmigrate_ranges::PAGE_SIZE;
use xxhash_rust::xxh3::xxh3_64;

use crate::frame::{Encoding, FrameHdr, FrameKind, WireError, HEADER_LEN, MAX_FRAME_PAGES, MAX_PAYLOAD};

/// The xxh3 of an all-zero page.
pub fn zero_page_hash() -> u64 {
    static H: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *H.get_or_init(|| xxh3_64(&[0u8; PAGE_SIZE]))
}

/// Whether a page is all zero (word at a time; the compiler vectorises it).
pub fn is_zero_page(page: &[u8]) -> bool {
    let (pre, words, post) = {
        // SAFETY: any bit pattern is a valid u64; align_to only reinterprets
        // the aligned middle of the slice and leaves the rest in pre/post.
        unsafe { page.align_to::<u64>() }
    };
    pre.iter().all(|&b| b == 0) && post.iter().all(|&b| b == 0) && words.iter().fold(0, |a, &w| a | w) == 0
}

fn hashes_as_bytes(hashes: &[u64], out: &mut Vec<u8>) {
    out.clear();
    for h in hashes {
        out.extend_from_slice(&h.to_le_bytes());
    }
}

fn start_frame(out: &mut Vec<u8>) {
    out.clear();
    out.resize(HEADER_LEN, 0);
}

fn finish_frame(out: &mut [u8], hdr: &mut FrameHdr, body: &[u8]) {
    hdr.len = (out.len() - HEADER_LEN) as u32;
    hdr.seal(body);
    out[..HEADER_LEN].copy_from_slice(&hdr.encode());
}

/// Starts a frame in `out` and appends `bytes` as its payload: lz4 when
/// asked for and it makes the payload smaller, as they are otherwise.
fn put_payload(out: &mut Vec<u8>, bytes: &[u8], lz4: bool) -> Encoding {
    start_frame(out);
    if lz4 {
        let max = lz4_flex::block::get_maximum_output_size(bytes.len());
        out.resize(HEADER_LEN + max, 0);
        match lz4_flex::block::compress_into(bytes, &mut out[HEADER_LEN..]) {
            Ok(n) if n < bytes.len() => {
                out.truncate(HEADER_LEN + n);
                return Encoding::Lz4;
            }
            _ => out.truncate(HEADER_LEN),
        }
    }
    out.extend_from_slice(bytes);
    Encoding::Raw
}

/// Reusable scratch for building frames.
#[derive(Default, Debug)]
pub struct Scratch {
    body: Vec<u8>,
}

/// Where a batch of pages goes: region, first page, and the round it
/// belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagesAt {
    /// Region index.
    pub region: u32,
    /// First page.
    pub first: u64,
    /// Round.
    pub round: u64,
}

/// Builds a `Pages` frame of `pages` (a whole number of 4 KiB pages, at most
/// [`MAX_FRAME_PAGES`]) whose per-page xxh3 are `hashes`, into `out`. With
/// `lz4` the payload is compressed, unless that does not make it smaller.
/// Returns the encoding used.
pub fn build_pages(
    out: &mut Vec<u8>,
    scratch: &mut Scratch,
    at: PagesAt,
    pages: &[u8],
    hashes: &[u64],
    lz4: bool,
) -> Encoding {
    let PagesAt { region, first, round } = at;
    let count = pages.len() / PAGE_SIZE;
    assert!(pages.len() % PAGE_SIZE == 0 && count > 0 && count <= MAX_FRAME_PAGES as usize);
    assert_eq!(hashes.len(), count);
    let encoding = put_payload(out, pages, lz4);
    let mut hdr = FrameHdr::new(FrameKind::Pages);
    hdr.encoding = encoding;
    hdr.region = region;
    hdr.count = count as u32;
    hdr.first = first;
    hdr.aux = round;
    hashes_as_bytes(hashes, &mut scratch.body);
    finish_frame(out, &mut hdr, &scratch.body);
    encoding
}

/// Seals a raw `Pages` frame whose pages were already copied into
/// `frame[HEADER_LEN..]`: fills in the header, nothing is copied. This is
/// the source's common path for incompressible pages.
pub fn seal_raw_pages_in_place(frame: &mut [u8], scratch: &mut Scratch, at: PagesAt, hashes: &[u64]) {
    let len = frame.len() - HEADER_LEN;
    let count = len / PAGE_SIZE;
    assert!(len % PAGE_SIZE == 0 && count > 0 && count <= MAX_FRAME_PAGES as usize && hashes.len() == count);
    let mut hdr = FrameHdr::new(FrameKind::Pages);
    hdr.encoding = Encoding::Raw;
    hdr.region = at.region;
    hdr.count = count as u32;
    hdr.first = at.first;
    hdr.aux = at.round;
    hashes_as_bytes(hashes, &mut scratch.body);
    finish_frame(frame, &mut hdr, &scratch.body);
}

/// Builds a `Pages` frame of `count` zero pages into `out`.
pub fn build_zero_pages(out: &mut Vec<u8>, region: u32, first: u64, count: u32, round: u64) {
    assert!(count > 0 && count <= MAX_FRAME_PAGES);
    start_frame(out);
    let mut hdr = FrameHdr::new(FrameKind::Pages);
    hdr.encoding = Encoding::Zero;
    hdr.region = region;
    hdr.count = count;
    hdr.first = first;
    hdr.aux = round;
    finish_frame(out, &mut hdr, &[]);
}

/// Builds a `Data` frame (byte-stream mode) carrying `data` as chunk `seq`.
pub fn build_data(out: &mut Vec<u8>, seq: u64, data: &[u8], lz4: bool) -> Encoding {
    assert!(!data.is_empty() && data.len() <= MAX_PAYLOAD as usize);
    let encoding = put_payload(out, data, lz4);
    let mut hdr = FrameHdr::new(FrameKind::Data);
    hdr.encoding = encoding;
    hdr.count = data.len() as u32;
    hdr.aux = seq;
    finish_frame(out, &mut hdr, data);
    encoding
}

/// Seals a raw `Data` frame (byte-stream mode) for chunk `seq` whose
/// bytes were read straight into `frame[HEADER_LEN..]`: fills in the
/// header, nothing is copied. The frame equals what [`build_data`] builds
/// from the same bytes without lz4.
pub fn seal_raw_data_in_place(frame: &mut [u8], seq: u64) {
    let len = frame.len() - HEADER_LEN;
    assert!(len > 0 && len <= MAX_PAYLOAD as usize);
    let mut hdr = FrameHdr::new(FrameKind::Data);
    hdr.encoding = Encoding::Raw;
    hdr.count = len as u32;
    hdr.aux = seq;
    hdr.len = len as u32;
    hdr.seal(&frame[HEADER_LEN..]);
    frame[..HEADER_LEN].copy_from_slice(&hdr.encode());
}

/// Builds a payload-less control frame from `hdr` into `out`.
pub fn build_control(out: &mut Vec<u8>, mut hdr: FrameHdr, payload: &[u8]) {
    start_frame(out);
    out.extend_from_slice(payload);
    finish_frame(out, &mut hdr, payload);
}

/// Reusable buffers for opening frames on the receiving side.
#[derive(Default, Debug)]
pub struct Opener {
    decoded: Vec<u8>,
    hashes: Vec<u64>,
    body: Vec<u8>,
}

/// Pages of a verified `Pages` frame.
#[derive(Debug)]
pub enum OpenedPages<'a> {
    /// `count` zero pages.
    Zero,
    /// The decoded pages and their hashes.
    Data {
        /// `count × 4096` bytes.
        pages: &'a [u8],
        /// xxh3 of each page.
        hashes: &'a [u64],
    },
}

fn lz4_into(dst: &mut Vec<u8>, src: &[u8], len: usize, kind: FrameKind) -> Result<(), WireError> {
    // No clearing: the decoder overwrites all `len` bytes or fails, and a
    // reused buffer of the same length then costs no zero-fill.
    dst.resize(len, 0);
    match lz4_flex::block::decompress_into(src, dst) {
        Ok(n) if n == len => Ok(()),
        Ok(_) => Err(WireError::Malformed { kind, why: "lz4 payload decodes to the wrong length" }),
        Err(_) => Err(WireError::Malformed { kind, why: "lz4 payload does not decode" }),
    }
}

impl Opener {
    /// Decodes and verifies a `Pages` frame. Nothing is returned unless the
    /// check over header and page hashes matches.
    pub fn open_pages<'a>(&'a mut self, hdr: &FrameHdr, payload: &'a [u8]) -> Result<OpenedPages<'a>, WireError> {
        debug_assert_eq!(hdr.kind, FrameKind::Pages);
        let len = hdr.count as usize * PAGE_SIZE;
        let pages: &[u8] = match hdr.encoding {
            Encoding::Zero => {
                hdr.verify(&[])?;
                return Ok(OpenedPages::Zero);
            }
            Encoding::Raw => payload,
            Encoding::Lz4 => {
                lz4_into(&mut self.decoded, payload, len, hdr.kind)?;
                &self.decoded
            }
            Encoding::None => return Err(WireError::BadEncoding { kind: hdr.kind, encoding: 0 }),
        };
        if pages.len() != len {
            return Err(WireError::Malformed { kind: hdr.kind, why: "payload length" });
        }
        self.hashes.clear();
        self.hashes.extend(pages.chunks_exact(PAGE_SIZE).map(xxh3_64));
        hashes_as_bytes(&self.hashes, &mut self.body);
        hdr.verify(&self.body)?;
        Ok(OpenedPages::Data { pages, hashes: &self.hashes })
    }

    /// Decodes and verifies a `Data` frame, returning its bytes.
    pub fn open_data<'a>(&'a mut self, hdr: &FrameHdr, payload: &'a [u8]) -> Result<&'a [u8], WireError> {
        debug_assert_eq!(hdr.kind, FrameKind::Data);
        let data: &[u8] = match hdr.encoding {
            Encoding::Raw => payload,
            Encoding::Lz4 => {
                lz4_into(&mut self.decoded, payload, hdr.count as usize, hdr.kind)?;
                &self.decoded
            }
            e => return Err(WireError::BadEncoding { kind: hdr.kind, encoding: e as u8 }),
        };
        hdr.verify(data)?;
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn split(frame: &[u8]) -> (FrameHdr, &[u8]) {
        let h = FrameHdr::decode(frame[..HEADER_LEN].try_into().unwrap()).unwrap();
        assert_eq!(h.len as usize, frame.len() - HEADER_LEN);
        (h, &frame[HEADER_LEN..])
    }

    fn pages_of(kind: u8, n: usize, seed: u64) -> Vec<u8> {
        let mut v = vec![0u8; n * PAGE_SIZE];
        let mut x = seed | 1;
        for (i, b) in v.iter_mut().enumerate() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = match kind {
                0 => x as u8,
                1 => b"the quick brown fox "[i % 20],
                _ => 0,
            };
        }
        v
    }

    #[test]
    fn page_frames_round_trip_in_every_encoding() {
        let mut s = Scratch::default();
        let mut o = Opener::default();
        for (kind, lz4, want) in [(0, true, Encoding::Raw), (1, true, Encoding::Lz4), (1, false, Encoding::Raw)] {
            let pages = pages_of(kind, 3, 9);
            let hashes: Vec<u64> = pages.chunks(PAGE_SIZE).map(xxh3_64).collect();
            let mut f = Vec::new();
            assert_eq!(
                build_pages(&mut f, &mut s, PagesAt { region: 2, first: 10, round: 5 }, &pages, &hashes, lz4),
                want
            );
            let (h, p) = split(&f);
            assert_eq!((h.region, h.first, h.count, h.aux), (2, 10, 3, 5));
            match o.open_pages(&h, p).unwrap() {
                OpenedPages::Data { pages: got, hashes: gh } => {
                    assert_eq!(got, &pages[..]);
                    assert_eq!(gh, &hashes[..]);
                }
                OpenedPages::Zero => panic!("not zero"),
            }
        }
        let pages = pages_of(0, 4, 1);
        let hashes: Vec<u64> = pages.chunks(PAGE_SIZE).map(xxh3_64).collect();
        let mut f = vec![0u8; HEADER_LEN];
        f.extend_from_slice(&pages);
        let at = PagesAt { region: 1, first: 8, round: 2 };
        seal_raw_pages_in_place(&mut f, &mut s, at, &hashes);
        let mut g = Vec::new();
        build_pages(&mut g, &mut s, at, &pages, &hashes, false);
        assert_eq!(f, g, "sealing in place builds the same frame");
        let mut f = Vec::new();
        build_zero_pages(&mut f, 0, 7, 512, 1);
        let (h, p) = split(&f);
        assert!(matches!(o.open_pages(&h, p).unwrap(), OpenedPages::Zero));
    }

    #[test]
    fn zero_check_sees_every_byte() {
        let mut p = vec![0u8; PAGE_SIZE];
        assert!(is_zero_page(&p));
        for i in [0, 1, 7, 8, 2048, 4095] {
            p[i] = 1;
            assert!(!is_zero_page(&p), "byte {i}");
            p[i] = 0;
        }
        assert_eq!(zero_page_hash(), xxh3_64(&p));
    }

    proptest! {
        #[test]
        fn no_corruption_of_a_page_frame_yields_wrong_pages(kind in 0u8..2, lz4: bool, at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let pages = pages_of(kind, 2, 3);
            let hashes: Vec<u64> = pages.chunks(PAGE_SIZE).map(xxh3_64).collect();
            let mut f = Vec::new();
            build_pages(&mut f, &mut Scratch::default(), PagesAt { region: 0, first: 0, round: 0 }, &pages, &hashes, lz4);
            let i = at.index(f.len());
            f[i] ^= 1 << bit;
            let mut o = Opener::default();
            let res = FrameHdr::decode(f[..HEADER_LEN].try_into().unwrap())
                .and_then(|h| {
                    if h.len as usize != f.len() - HEADER_LEN {
                        return Err(WireError::Malformed { kind: h.kind, why: "len" });
                    }
                    match o.open_pages(&h, &f[HEADER_LEN..])? {
                        OpenedPages::Data { pages: got, .. } => Ok(got == &pages[..] && h.region == 0 && h.first == 0),
                        OpenedPages::Zero => Ok(false),
                    }
                });
            // Either the flip is caught, or (an lz4 stream has redundant
            // encodings) it decodes to exactly the pages that were sent.
            prop_assert!(!matches!(res, Ok(false)), "flipping bit {} of byte {} went unnoticed", bit, i);
        }

        #[test]
        fn data_frames_round_trip(data in proptest::collection::vec(any::<u8>(), 1..5000), lz4: bool, seq: u64) {
            let mut f = Vec::new();
            build_data(&mut f, seq, &data, lz4);
            let (h, p) = split(&f);
            prop_assert_eq!(h.aux, seq);
            let mut o = Opener::default();
            prop_assert_eq!(o.open_data(&h, p).unwrap(), &data[..]);
        }

        #[test]
        fn a_data_frame_sealed_in_place_is_the_one_built(data in proptest::collection::vec(any::<u8>(), 1..5000), seq: u64) {
            let mut built = Vec::new();
            build_data(&mut built, seq, &data, false);
            let mut sealed = vec![0xa5u8; HEADER_LEN];
            sealed.extend_from_slice(&data);
            seal_raw_data_in_place(&mut sealed, seq);
            prop_assert_eq!(sealed, built);
        }

        #[test]
        fn garbage_lz4_is_an_error_not_a_panic(junk in proptest::collection::vec(any::<u8>(), 1..4096)) {
            let mut h = FrameHdr::new(FrameKind::Pages);
            h.encoding = Encoding::Lz4;
            h.count = 1;
            h.len = junk.len() as u32;
            let mut o = Opener::default();
            prop_assert!(o.open_pages(&h, &junk).is_err());
        }
    }
}
