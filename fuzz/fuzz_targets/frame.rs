//! Raw bytes into the frame decoder and the payload opener: never a panic,
//! never an allocation sized from an unchecked field, and whatever decodes
//! is within the protocol's bounds and encodes back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pmigrate_transport::frame::{FrameHdr, FrameKind, HEADER_LEN, MAX_FRAME_PAGES, MAX_PAYLOAD};
use pmigrate_transport::payload::{OpenedPages, Opener};

fuzz_target!(|data: &[u8]| {
    let Some(head) = data.get(..HEADER_LEN) else { return };
    let Ok(hdr) = FrameHdr::decode(head.try_into().expect("40 bytes")) else { return };
    assert_eq!(&hdr.encode()[..], head, "a decoded header encodes back to its bytes");
    assert!(hdr.len <= MAX_PAYLOAD, "payload bounded before any buffer is sized");
    let payload = &data[HEADER_LEN..];
    if payload.len() < hdr.len as usize {
        return;
    }
    let payload = &payload[..hdr.len as usize];
    let mut opener = Opener::default();
    match hdr.kind {
        FrameKind::Pages => {
            assert!(hdr.count >= 1 && hdr.count <= MAX_FRAME_PAGES);
            if let Ok(opened) = opener.open_pages(&hdr, payload) {
                if let OpenedPages::Data { pages, hashes } = opened {
                    assert_eq!(pages.len(), hdr.count as usize * 4096);
                    assert_eq!(hashes.len(), hdr.count as usize);
                }
            }
        }
        FrameKind::Data => {
            if let Ok(d) = opener.open_data(&hdr, payload) {
                assert_eq!(d.len(), hdr.count as usize);
            }
        }
        _ => {
            let _ = hdr.verify(payload);
        }
    }
});
