//! Frames built the way a sender builds them — so they get past the
//! integrity check and reach the deep paths — then at most one byte flipped.
//! Properties: an intact frame opens to exactly what was sealed; a frame with
//! any byte changed is refused, never opened into different content (a
//! changed lz4 byte that decodes to the same content is the one acceptance).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pmigrate_transport::frame::{FrameHdr, FrameKind, HEADER_LEN};
use pmigrate_transport::payload::{build_data, build_pages, build_zero_pages, OpenedPages, Opener, PagesAt, Scratch};
use xxhash_rust::xxh3::xxh3_64;

#[derive(Arbitrary, Debug)]
enum Body {
    /// Pages of this many 4 KiB pages (1..=8), each filled from a pattern.
    Pages { count: u8, pattern: u8, lz4: bool, region: u32, first: u32, round: u16 },
    Zero { count: u16, region: u32, first: u32, round: u16 },
    Data { len: u16, pattern: u8, lz4: bool, seq: u64 },
}

#[derive(Arbitrary, Debug)]
struct Input {
    body: Body,
    /// Flip `xor` into the byte at this offset (modulo the frame's length).
    flip: Option<(u32, u8)>,
}

fn bytes(n: usize, pattern: u8) -> Vec<u8> {
    // Compressible or not, depending on the pattern.
    (0..n).map(|i| if pattern & 1 == 0 { pattern ^ (i as u8 & 0x0f) } else { ((i as u32).wrapping_mul(2654435761) >> 13) as u8 ^ pattern }).collect()
}

fuzz_target!(|input: Input| {
    let mut frame = Vec::new();
    let mut scratch = Scratch::default();
    let expect: Option<Vec<u8>> = match &input.body {
        Body::Pages { count, pattern, lz4, region, first, round } => {
            let n = usize::from(*count % 8) + 1;
            let pages = bytes(n * 4096, *pattern);
            let hashes: Vec<u64> = pages.chunks(4096).map(xxh3_64).collect();
            let at = PagesAt { region: *region, first: u64::from(*first), round: u64::from(*round) };
            build_pages(&mut frame, &mut scratch, at, &pages, &hashes, *lz4);
            Some(pages)
        }
        Body::Zero { count, region, first, round } => {
            let n = u32::from(*count % 1024) + 1;
            build_zero_pages(&mut frame, *region, u64::from(*first), n, u64::from(*round));
            None
        }
        Body::Data { len, pattern, lz4, seq } => {
            let d = bytes(usize::from(*len) + 1, *pattern);
            build_data(&mut frame, *seq, &d, *lz4);
            Some(d)
        }
    };
    let flipped = match input.flip {
        Some((at, xor)) if xor != 0 => {
            let at = at as usize % frame.len();
            frame[at] ^= xor;
            true
        }
        _ => false,
    };
    let opened = (|| {
        let hdr = FrameHdr::decode(frame[..HEADER_LEN].try_into().expect("40 bytes")).ok()?;
        let payload = frame.get(HEADER_LEN..HEADER_LEN + hdr.len as usize)?;
        if frame.len() != HEADER_LEN + hdr.len as usize {
            return None; // a changed length no longer frames these bytes
        }
        let mut opener = Opener::default();
        match hdr.kind {
            FrameKind::Pages => match opener.open_pages(&hdr, payload).ok()? {
                OpenedPages::Zero => Some(None),
                OpenedPages::Data { pages, .. } => Some(Some(pages.to_vec())),
            },
            FrameKind::Data => Some(Some(opener.open_data(&hdr, payload).ok()?.to_vec())),
            _ => None,
        }
    })();
    if flipped {
        // A changed byte of an lz4 payload may decode to the very same
        // bytes (a match pointing at other, equal bytes): accepted only
        // then, since the check covers the decoded content.
        let lz4 = frame[1] == pmigrate_transport::Encoding::Lz4 as u8;
        let in_payload = input.flip.is_some_and(|(at, _)| at as usize % frame.len() >= HEADER_LEN);
        if let Some(o) = &opened {
            assert!(lz4 && in_payload && *o == expect, "a changed frame was accepted: {input:?}");
        }
    } else {
        assert_eq!(opened, Some(expect), "an intact frame opens to what was sealed");
    }
});
