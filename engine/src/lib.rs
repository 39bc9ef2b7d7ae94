//! The pmigrate engine: source and destination pipelines of a live
//! migration.
//!
//! - [`Source`]: live pre-copy. Rounds of scan → skip (zero, unchanged) →
//!   lz4 → check → send over many worker threads and TCP streams, until the
//!   rest fits the downtime target; then the embedder's pause hook, the
//!   final round, and the destination's verification.
//! - [`Incoming`]: the destination. Accepts the streams of one session,
//!   verifies and places every page under the range lock, checks the final
//!   digest, confirms.
//! - [`DirtyTracker`]: dirty trackers behind one trait (VMM bitmap,
//!   userfaultfd write-protect + `PAGEMAP_SCAN`, page hashes).
//! - [`relay`] and [`proxy`]: the full-duplex byte-stream relay behind the
//!   CLI's `send`/`recv` (QEMU's `exec:` migration) and the socket proxy.
//! - [`Report`]: what happened, as text or JSON.
//!
//! A loopback migration of 16 MiB:
//!
//! ```
//! use pmigrate_engine::{Acceptor, Auth, GuestMemory, Incoming, ReceiveOptions, Source, TrackerKind};
//!
//! let src = GuestMemory::anonymous(16 << 20).unwrap();
//! src.regions()[0].write_u64(4096, 0xfeed).unwrap();
//! let dst = GuestMemory::anonymous(16 << 20).unwrap();
//! // Both ends hold the same key (`Psk::from_file` reads one `pmigrate keygen` wrote).
//! let key = Auth::Psk(pmigrate_engine::Psk::from_bytes(&[7; 32]).unwrap());
//! let acceptor = Acceptor::bind(&["127.0.0.1:0".parse().unwrap()], key.clone()).unwrap();
//! let addr = acceptor.local_addrs()[0];
//! std::thread::scope(|s| {
//!     let rx = s.spawn(|| {
//!         let incoming = Incoming::accept_for(&acceptor, &dst, None).unwrap();
//!         incoming.receive(&dst, &ReceiveOptions::default()).unwrap()
//!     });
//!     let mut cfg = pmigrate_engine::SourceConfig::default();
//!     cfg.tracker = TrackerKind::Hash;
//!     let report = Source::new(&src, vec![addr], key).streams(2).config(cfg).run().unwrap();
//!     assert_eq!(report.digest, rx.join().unwrap().digest);
//! });
//! assert_eq!(dst.regions()[0].read_u64(4096).unwrap(), 0xfeed);
//! ```
#![warn(missing_docs)]

mod dest;
mod digest;
mod dirty;
mod hints;
mod lz4gate;
mod postcopy;
pub mod proxy;
pub mod relay;
mod report;
mod shared;
mod source;
mod uffd;
#[cfg(feature = "vm-memory")]
mod vmm;

/// The protocol's sans-I/O rules and the destination's placement, for the
/// fuzz targets in `fuzz/` (feature `fuzzing`); not a stable API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::dest::place::Placer;
    pub use crate::dest::session::{DestSession, Shape, Step};
    pub use crate::relay::reader::{Heard as ReaderHeard, ReaderLane};
    pub use crate::relay::reassembly::{Next, Reassembly};
    pub use crate::shared::answer;
    pub use crate::source::rules::{check_request, Heard, RoundCounter};
    pub use crate::source::session::{Comeback, SourceSession};
    // The rules' typed violations.
    pub use crate::relay::reassembly::ReassemblyError;
    pub use crate::source::rules::BadRequest;
}

// The source and the destination of a memory migration.
pub use dest::{layout_matches, Grant, Incoming, Offered, ReceiveOptions};
pub use source::{Progress, Source, SourceConfig};

// Dirty tracking.
pub use dirty::uffd_wp::probe as probe_uffd_wp;
pub use dirty::{DirtyError, DirtyTracker, HashTracker, TrackerKind, UffdWpTracker, VmmBitmapTracker};

// Post-copy and the guest's hints.
pub use hints::parse_free_pages;
pub use postcopy::{probe as probe_postcopy, raw_fault_round_trip};

// Handing shared memory over instead of copying it.
pub use shared::{nonce_proof, RegionPath};

// Reports, and the digest they carry.
pub use digest::memory_digest;
pub use report::{LatencySummary, PostcopyReport, Report, RoundReport, StreamReport};

#[cfg(feature = "vm-memory")]
pub use vmm::from_vm_memory;

// The layers below, as far as an embedder meets them.
pub use pmigrate_ranges::{
    AtomicBitmap, Gpa, GuestMemory, GuestRegion, HostPageSize, MemoryError, PageIdx, PageRange, RegionIdx, PAGE_SIZE,
    PAGE_SIZE_U64,
};
pub use pmigrate_transport::{
    Acceptor, Auth, Backend, BackendChoice, Psk, RegionDesc, StreamPlan, TlsConfig, TransportError, Via,
};

// Error types: what a `MigrateError` carries, and the parsers' and
// probes' own.
pub use dest::{LayoutMismatch, Unreturned};
pub use dirty::UffdWpUnsupported;
pub use hints::HintError;
pub use postcopy::PostcopyError;
pub use proxy::EndpointError;
pub use shared::ProbeError;
pub use source::rules::{NoConfirmation, NoVerdict};

/// Whether to lz4 page batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Compression {
    /// Never.
    Off,
    /// Always (a batch that does not shrink is still sent raw).
    On,
    /// While the links are the bottleneck and it pays: see docs/design.md, "The source pipeline".
    Auto,
}

/// A text that names no [`Compression`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("compression must be auto, lz4 or none, not {input:?}")]
pub struct ParseCompressionError {
    /// The text.
    pub input: String,
}

impl std::str::FromStr for Compression {
    type Err = ParseCompressionError;

    fn from_str(s: &str) -> Result<Self, ParseCompressionError> {
        match s {
            "off" | "none" => Ok(Compression::Off),
            "on" | "lz4" => Ok(Compression::On),
            "auto" => Ok(Compression::Auto),
            _ => Err(ParseCompressionError { input: s.to_string() }),
        }
    }
}

/// The error of an embedder's hook ([`Source::on_pause`],
/// [`Source::on_abort`], the `resume` of [`Incoming::receive_and_run`]):
/// any error, kept as the source of the [`MigrateError`] it causes. `?`
/// converts any error type into it, and `.into()` a `String` or `&str`.
pub type HookError = Box<dyn std::error::Error + Send + Sync>;

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The transport failed: connection, handshake, I/O, or a frame that
    /// breaks the wire format.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Guest memory could not be read or written.
    #[error(transparent)]
    Memory(#[from] pmigrate_ranges::MemoryError),
    /// Dirty tracking failed.
    #[error(transparent)]
    Dirty(#[from] dirty::DirtyError),
    /// The peer sent well-formed frames that break the session's rules.
    #[error("stream {stream}: {why}")]
    Protocol {
        /// Stream index.
        stream: usize,
        /// What was wrong.
        why: String,
    },
    /// The two ends disagree about the memory at the end.
    #[error("memory digest mismatch: source {source_digest}, destination {dest_digest}")]
    Digest {
        /// Source's digest.
        source_digest: pmigrate_transport::message::Digest,
        /// Destination's digest.
        dest_digest: pmigrate_transport::message::Digest,
    },
    /// The memory layouts of the two ends do not fit.
    #[error("memory layout mismatch: {0}")]
    Layout(#[source] dest::LayoutMismatch),
    /// Checking memory after the final round
    /// ([`ReceiveOptions::verify_memory`]) found a page that differs from
    /// what was received.
    #[error("{region}, {page}: memory differs from what was received")]
    Differs {
        /// The region.
        region: pmigrate_ranges::RegionIdx,
        /// The first page that differs.
        page: PageIdx,
    },
    /// A free-page or working-set hint names pages outside guest memory.
    #[error("hint {range:?}: {source}")]
    Hint {
        /// The pages the hint named.
        range: pmigrate_ranges::PageRange,
        /// Why they are not in guest memory.
        source: pmigrate_ranges::MemoryError,
    },
    /// The embedder's pause hook failed (its error is the source); the
    /// guest keeps running.
    #[error("pause hook failed: {0}")]
    Pause(#[source] HookError),
    /// Post-copy could not go on: the destination declined it, userfaultfd
    /// failed, pages could not be placed, or the source fell silent after
    /// the switchover.
    #[error("post-copy: {0}")]
    Postcopy(#[from] postcopy::PostcopyError),
    /// The embedder's hook starting the guest at the destination failed
    /// (its error is the source).
    #[error("resume hook failed: {0}")]
    Resume(#[source] HookError),
    /// The migration failed after the pause hook stopped the guest, and
    /// the embedder's abort hook, which was to start it again at the
    /// source, failed too (its error is the source).
    #[error("abort hook failed: {hook}, after: {after}")]
    AbortHook {
        /// What the abort hook returned.
        #[source]
        hook: HookError,
        /// Why the migration failed.
        after: Box<MigrateError>,
    },
    /// The destination verified the memory and the guest started there,
    /// but the source could not be told (the failed write is the source):
    /// it must not resume the guest.
    #[error("the guest started here, but the source could not be told ({0}): it must not resume it")]
    Untold(#[source] TransportError),
    /// The source sent everything, but the destination's verdict did not
    /// arrive, or confirmed other memory: the guest may be running there.
    /// Neither end may resume it before an operator has looked.
    #[error(
        "no verdict from the destination ({0}): the guest may be running there; do not resume it here before checking"
    )]
    Unconfirmed(#[source] source::rules::NoConfirmation),
    /// Post-copy: the guest was handed to the destination at the
    /// switchover, then the migration failed; the guest cannot run at the
    /// source any more, and the destination's copy is incomplete.
    #[error("the guest was handed over at the post-copy switchover and runs at the destination, then: {0}")]
    HandedOver(Box<MigrateError>),
    /// A stream's connection was lost before its part was over and it did
    /// not come back (the destination's side; before a post-copy
    /// switchover, so the guest never ran here).
    #[error("stream {stream} was lost ({lost}) and did not come back: {why}")]
    Lost {
        /// The stream.
        stream: usize,
        /// How its connection was lost.
        #[source]
        lost: TransportError,
        /// Why it is given up.
        why: dest::Unreturned,
    },
    /// Stopped because another part of the migration failed.
    #[error("migration aborted")]
    Aborted,
    /// Stopped from outside (a signal), for the reason given.
    #[error("{0}")]
    Interrupted(String),
}

impl MigrateError {
    /// Whether the source still owns the guest after this error, so it may
    /// (and must) resume it: everything but a handover that may have
    /// happened ([`MigrateError::Unconfirmed`], [`MigrateError::Untold`])
    /// or did ([`MigrateError::HandedOver`]).
    pub fn source_keeps_guest(&self) -> bool {
        !matches!(self, MigrateError::Unconfirmed(_) | MigrateError::Untold(_) | MigrateError::HandedOver(_))
    }

    /// Whether this is the peer's own refusal (an `Error` frame).
    pub(crate) fn is_peer_refusal(&self) -> bool {
        matches!(self, MigrateError::Transport(TransportError::Peer(_)))
    }

    /// Whether the peer's refusal says the guest had started there
    /// (post-copy: [`ErrorCode::Started`](pmigrate_transport::hello::ErrorCode::Started)).
    pub(crate) fn guest_started_at_peer(&self) -> bool {
        matches!(self, MigrateError::Transport(TransportError::Peer(m)) if m.code == pmigrate_transport::hello::ErrorCode::Started)
    }

    /// Keeps the most telling of two errors in `slot`: the first real one,
    /// over an `Aborted` that only reports that something else failed.
    pub(crate) fn keep(slot: &mut Option<MigrateError>, e: MigrateError) {
        if slot.as_ref().is_none_or(|s| matches!(s, MigrateError::Aborted)) {
            *slot = Some(e);
        }
    }
}

/// `e` and its causes on one line, each cause once: most errors here print
/// their cause in their own message already, an embedder's hook error may
/// not. What a peer is told.
pub(crate) fn describe(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}
