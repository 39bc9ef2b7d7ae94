//! Wire protocol v1 and the multi-stream TCP transport of pmigrate.
//!
//! - [`backend`]: the I/O backend of a stream, io_uring or portable, chosen
//!   at run time.
//! - [`frame`]: the 40-byte frame header, its codec and the check that
//!   covers header and body. The full specification is `docs/protocol.md`.
//! - [`hello`]: handshake payloads (`Hello`, `Welcome`) and `Error` frames.
//! - [`auth`]: who may take part: pre-shared keys, mutual TLS or nothing
//!   ([`Auth`]), the authentication exchange that opens every connection,
//!   and each session's secret.
//! - `handshake`: one connection's handshake, both ends.
//! - [`payload`]: building page and stream-chunk frames (raw, zero, lz4) and
//!   opening them with verification.
//! - [`net`]: tuned TCP sockets, binding a stream to a local address or an
//!   interface, and a framed reader.
//! - [`session`]: opening the N streams of a session.
//! - [`accept`]: listening, admitting connections into bounded handshakes,
//!   and accepting exactly the streams of one session.
//! - [`serve`]: serving many sessions at once (the socket proxy).
//! - [`tls`], [`conn`]: mutual TLS over a session's streams, and the
//!   connection type that is TCP or TLS.
//! - `uring` (private): the io_uring backend's building blocks, chosen at
//!   run time by a probe ([`backend::probe_uring`]): a registered frame
//!   arena, an ordered multi-frame writer and a reader.
//!
//! ```
//! use pmigrate_transport::frame::{FrameHdr, FrameKind, HEADER_LEN};
//! use pmigrate_transport::payload::{build_zero_pages, Opener, OpenedPages};
//!
//! let mut frame = Vec::new();
//! build_zero_pages(&mut frame, 0, 16, 4, 1);
//! let hdr = FrameHdr::decode(frame[..HEADER_LEN].try_into().unwrap()).unwrap();
//! assert_eq!((hdr.kind, hdr.first, hdr.count), (FrameKind::Pages, 16, 4));
//! let mut opener = Opener::default();
//! assert!(matches!(opener.open_pages(&hdr, &frame[HEADER_LEN..]), Ok(OpenedPages::Zero)));
//! ```
#![warn(missing_docs)]

pub mod accept;
pub mod auth;
pub mod backend;
pub mod conn;
pub mod frame;
pub(crate) mod handshake;
pub mod hello;
pub mod link;
pub mod message;
pub mod net;
pub mod payload;
pub mod serve;
pub mod session;
pub mod tls;
mod uring;

pub use accept::{Accepted, Acceptor};
pub use auth::{Auth, Psk, SessionKey};
pub use backend::{Backend, BackendChoice};
pub use conn::Conn;
pub use frame::{Encoding, FrameHdr, FrameKind, WireError};
pub use hello::{ErrorCode, ErrorMsg, Hello, Mode, RegionDesc, Welcome};
pub use link::{Link, LinkChange, LinkEvent, Rejoin, Resumes};
pub use net::{FrameReader, TransportError, Via};
pub use serve::SessionHandler;
pub use session::{connect_session, Connected, StreamPlan};
pub use tls::TlsConfig;

// The parsers' error types.
pub use backend::ParseBackendError;
pub use net::ParseViaError;
