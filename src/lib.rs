//! pmigrate: a parallel live-migration data plane for virtual machines.
//!
//! This crate is the facade a VMM embeds. It re-exports the three layers:
//!
//! - [`ranges`]: guest memory regions, page bitmaps, shards, range locks;
//! - [`transport`]: wire protocol v2, authentication and multi-stream TCP;
//! - [`engine`]: the source ([`Source`]) and destination ([`Incoming`])
//!   pipelines, dirty trackers and reports.
//!
//! # Embedding
//!
//! On the source, describe guest memory (or adopt a `vm-memory`
//! `GuestMemoryMmap` with the `vm-memory` feature), give a dirty tracker —
//! [`VmmBitmapTracker`] over your KVM dirty log, or let pmigrate pick
//! userfaultfd write-protect or page hashing — and a pause hook that stops
//! the vCPUs:
//!
//! ```no_run
//! use pmigrate::{Auth, GuestMemory, Psk, Source, VmmBitmapTracker};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mem = GuestMemory::anonymous(1 << 30)?; // or pmigrate::engine::from_vm_memory(&vm_memory)
//! let dirty_log = VmmBitmapTracker::bitmaps_for(&mem); // set bits from KVM_GET_DIRTY_LOG
//! // Both hosts hold the same key (`pmigrate keygen` writes one); or mutual TLS.
//! let auth = Auth::Psk(Psk::from_file("/etc/pmigrate/migration.key".as_ref())?);
//! let report = Source::new(&mem, vec!["10.0.0.2:7000".parse()?, "10.0.1.2:7000".parse()?], auth)
//!     .streams(4)
//!     .threads(4)
//!     .tracker(Box::new(VmmBitmapTracker::new(dirty_log)))
//!     .on_pause(|| { /* stop the vCPUs */ Ok(()) })
//!     .run()?;
//! println!("{report}");
//! # Ok(()) }
//! ```
//!
//! On the destination, listen, accept one session and receive into zeroed
//! memory of the same layout; [`Incoming::receive`] returns only after the
//! final digest matched, so resuming the guest then is safe:
//!
//! ```no_run
//! use pmigrate::{Acceptor, Auth, GuestMemory, Incoming, Psk, ReceiveOptions};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let auth = Auth::Psk(Psk::from_file("/etc/pmigrate/migration.key".as_ref())?);
//! let acceptor = Acceptor::bind(&["0.0.0.0:7000".parse()?], auth)?;
//! let mem = GuestMemory::anonymous(1 << 30)?;
//! let incoming = Incoming::accept_for(&acceptor, &mem, None)?;
//! let report = incoming.receive(&mem, &ReceiveOptions::default())?;
//! println!("{report}");
//! # Ok(()) }
//! ```
//!
//! `examples/vmm.rs` puts both ends together around a running `vm-memory`
//! guest: `cargo run --example vmm --features vm-memory`.
#![warn(missing_docs)]

pub use pmigrate_engine as engine;
pub use pmigrate_ranges as ranges;
pub use pmigrate_transport as transport;

pub use pmigrate_engine::{
    Acceptor, Auth, BackendChoice, Compression, DirtyTracker, Gpa, Grant, GuestMemory, GuestRegion, HashTracker,
    HostPageSize, Incoming, MigrateError, Offered, PageIdx, Progress, Psk, ReceiveOptions, Report, Source,
    SourceConfig, TrackerKind, UffdWpTracker, Via, VmmBitmapTracker, PAGE_SIZE,
};

// Error types (issue 16): what a `MigrateError` carries, and what hooks return.
pub use pmigrate_engine::{
    DirtyError, HookError, LayoutMismatch, NoConfirmation, PostcopyError, TransportError, UffdWpUnsupported,
};
pub use pmigrate_ranges::MemoryError;
