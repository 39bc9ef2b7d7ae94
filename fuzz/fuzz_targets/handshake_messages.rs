//! The handshake's payload codecs (`Hello`, `Welcome`, `Error`, the four
//! authentication messages, the extensions) on raw bytes: never a panic,
//! whatever decodes encodes back to the same bytes (one canonical form),
//! and proofs verify only under the key and exchange they were made for.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pmigrate_transport::auth::{Auth, Challenge, Confirm, Offer, Proof, Psk, SessionKey, Transcript};
use pmigrate_transport::hello::{decode_shared_regions, decode_target, ErrorMsg, Hello, Welcome};

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = Hello::decode(data) {
        assert_eq!(h.encode(), data, "Hello");
        assert!(h.stream_index < h.stream_count);
    }
    if let Ok(w) = Welcome::decode(data) {
        assert_eq!(w.encode(), data, "Welcome");
    }
    if let Ok(e) = ErrorMsg::decode(data) {
        assert_eq!(e.encode(), data, "Error");
    }
    if let Ok(o) = Offer::decode(data) {
        assert_eq!(&o.encode()[..], data, "Offer");
    }
    if let Ok(c) = Challenge::decode(data) {
        assert_eq!(&c.encode()[..], data, "Challenge");
    }
    if let Ok(p) = Proof::decode(data) {
        assert_eq!(&p.encode()[..], data, "Proof");
    }
    if let Ok(c) = Confirm::decode(data) {
        assert_eq!(&c.encode()[..], data, "Confirm");
    }
    if let Ok(r) = decode_shared_regions(data, 8) {
        assert!(r.iter().all(|&x| x < 8));
    }
    let _ = decode_target(data);
    // Proofs: bound to the key and to every byte of the exchange.
    if data.len() >= 112 + 32 {
        let mut t = Transcript { offer: [0; 72], challenge: [0; 40] };
        t.offer.copy_from_slice(&data[..72]);
        t.challenge.copy_from_slice(&data[72..112]);
        let key = Auth::Psk(Psk::from_bytes(&data[112..144]).expect("32 bytes"));
        let p = t.source_proof(&key);
        assert!(t.source_proof_ok(&key, &p));
        assert!(!t.dest_proof_ok(&key, &p), "no reflection");
        let mut other = t.clone();
        other.offer[usize::from(data[0]) % 72] ^= 1;
        assert!(!other.source_proof_ok(&key, &p), "bound to every byte");
        let s = SessionKey::derive(&key, &t, None);
        assert!(!s.stream_proof_ok(&other, &s.stream_proof(&t)));
    }
});
