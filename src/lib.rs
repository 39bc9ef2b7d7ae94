//! pmigrate: a parallel live-migration data plane for virtual machines.
//!
//! This crate is what a VMM embeds to move a running guest's memory to
//! another host: many worker threads and TCP streams (each able to leave by
//! its own NIC), pre-copy rounds driven by a dirty tracker, post-copy and
//! hybrid with userfaultfd, zero-copy handover of memory both hosts map, and
//! authenticated peers on every stream. The VMM keeps what is its own: vCPU
//! and device state, and when to pause and resume the guest.
//!
//! # A whole migration
//!
//! Both ends on one host, over loopback. The source runs pre-copy rounds
//! while the guest runs, then calls the pause hook and sends the rest; the
//! destination returns only once every page arrived and the final digest
//! matched:
//!
//! ```
//! use pmigrate::{Acceptor, Auth, GuestMemory, Incoming, Psk, ReceiveOptions, Source, SourceConfig, TrackerKind};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let src = GuestMemory::anonymous(32 << 20)?;
//! src.regions()[0].write_u64(8 << 20, 0xfeed)?;
//! let dst = GuestMemory::anonymous(32 << 20)?; // zeroed, of the same layout
//!
//! // Both ends hold the same key; across hosts, `Psk::from_file` reads the
//! // one `pmigrate keygen` wrote.
//! let auth = Auth::Psk(Psk::generate()?);
//! let acceptor = Acceptor::bind(&["127.0.0.1:0".parse()?], auth.clone())?;
//! let addr = acceptor.local_addrs()[0];
//!
//! let (sent, received) = std::thread::scope(|s| {
//!     let destination = s.spawn(|| -> Result<_, pmigrate::MigrateError> {
//!         let incoming = Incoming::accept_for(&acceptor, &dst, None)?;
//!         incoming.receive_and_run(&dst, &ReceiveOptions::default(), || {
//!             // Memory is verified: start the vCPUs here.
//!             Ok(())
//!         })
//!     });
//!     let config = SourceConfig { tracker: TrackerKind::Hash, ..SourceConfig::default() };
//!     let sent = Source::new(&src, vec![addr], auth)
//!         .streams(2)
//!         .config(config)
//!         .on_pause(|| {
//!             // Stop the vCPUs; the final round follows.
//!             Ok(())
//!         })
//!         .run();
//!     (sent, destination.join().expect("the destination thread"))
//! });
//! let (sent, received) = (sent?, received?);
//! assert_eq!(sent.digest, received.digest);
//! assert_eq!(dst.regions()[0].read_u64(8 << 20)?, 0xfeed);
//! # Ok(()) }
//! ```
//!
//! # The source
//!
//! Describe guest memory: [`GuestMemory`] of [`GuestRegion`]s (anonymous,
//! or a file such as QEMU's `memory-backend-file`), or adopt a `vm-memory`
//! `GuestMemoryMmap` with the `vm-memory` feature ([`from_vm_memory`]).
//! Give a dirty tracker: [`VmmBitmapTracker`] fed from your KVM dirty log,
//! or let [`TrackerKind`] pick userfaultfd write-protection
//! ([`UffdWpTracker`]) or page hashing ([`HashTracker`]). The pause hook
//! stops the vCPUs for the last round; if the migration fails while the
//! source still owns the guest, the abort hook resumes it
//! ([`MigrateError::source_keeps_guest`] says who owns it after an error):
//!
//! ```no_run
//! use pmigrate::{Auth, GuestMemory, Psk, Source, VmmBitmapTracker};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mem = GuestMemory::anonymous(1 << 30)?; // or pmigrate::from_vm_memory(&vm_memory)
//! let dirty_log = VmmBitmapTracker::bitmaps_for(&mem); // set bits from KVM_GET_DIRTY_LOG
//! let auth = Auth::Psk(Psk::from_file("/etc/pmigrate/migration.key".as_ref())?);
//! let report = Source::new(&mem, vec!["10.0.0.2:7000".parse()?, "10.0.1.2:7000".parse()?], auth)
//!     .streams(4)
//!     .threads(4)
//!     .tracker(Box::new(VmmBitmapTracker::new(dirty_log)))
//!     .on_pause(|| { /* stop the vCPUs, copy the last dirty log */ Ok(()) })
//!     .on_abort(|| { /* the source keeps the guest: resume the vCPUs */ Ok(()) })
//!     .run()?;
//! println!("{report}");
//! # Ok(()) }
//! ```
//!
//! # The destination
//!
//! Listen on one address per NIC, accept one session whose layout is that
//! of your zeroed memory, and receive. [`Incoming::receive_and_run`] calls
//! its hook the moment the guest may run here — after the digest matched
//! in pre-copy, at the switchover in post-copy — and tells the source only
//! then, so exactly one end owns the guest at any moment:
//!
//! ```no_run
//! use pmigrate::{Acceptor, Auth, GuestMemory, Incoming, Psk, ReceiveOptions};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let auth = Auth::Psk(Psk::from_file("/etc/pmigrate/migration.key".as_ref())?);
//! let acceptor = Acceptor::bind(&["10.0.0.2:7000".parse()?, "10.0.1.2:7000".parse()?], auth)?;
//! let mem = GuestMemory::anonymous(1 << 30)?;
//! let incoming = Incoming::accept_for(&acceptor, &mem, None)?;
//! let report = incoming.receive_and_run(&mem, &ReceiveOptions::default(), || {
//!     /* start the vCPUs */
//!     Ok(())
//! })?;
//! println!("{report}");
//! # Ok(()) }
//! ```
//!
//! # Post-copy and hybrid
//!
//! `Source::postcopy(n)` switches after `n` pre-copy rounds (0: at once):
//! the guest starts at the destination straight away, its touches of
//! missing pages are served first through userfaultfd while the rest is
//! pushed, the working set ([`Source::working_set`]) first. The destination
//! must receive into private anonymous memory with `receive_and_run`;
//! [`probe_postcopy`] says whether this host allows it. Pages the guest
//! reports free ([`parse_free_pages`], [`Source::free_pages`]) are not sent
//! at all.
//!
//! # Zero-copy
//!
//! A region both hosts map — a file in `/dev/shm`, a DAX or CXL device — is
//! handed over instead of copied when `SourceConfig::zero_copy` is set and
//! the destination's region maps the same file: the ends prove it is the
//! same memory (not merely the same content) with nonces written through
//! one mapping and read through the other ([`nonce_proof`]), and only
//! metadata crosses the wire.
//!
//! # Authentication
//!
//! Every stream proves the peer's key before anything is allocated for it:
//! a pre-shared key ([`Psk`]), or mutual TLS ([`TlsConfig::from_pem_files`],
//! `Auth::Tls`), which also encrypts the streams. `Auth::Insecure` exists
//! for tests and trusted lab networks and must be asked for by name.
//!
//! # Byte streams
//!
//! The [`relay`] carries an ordered byte stream (QEMU's `exec:` migration
//! stream) over the same striped, checked streams, and the [`proxy`]
//! carries whole socket connections (libvirt's, QEMU's multifd channels)
//! between hosts. The `pmigrate` CLI is built on these.
//!
//! `examples/vmm.rs` puts both ends together around a running `vm-memory`
//! guest: `cargo run --example vmm --features vm-memory`.
#![warn(missing_docs)]

// A memory migration: the source, the destination, and what they share.
pub use pmigrate_engine::{
    layout_matches, Acceptor, Auth, Backend, BackendChoice, Compression, Grant, Incoming, MigrateError, Offered,
    Progress, Psk, ReceiveOptions, Source, SourceConfig, StreamPlan, TlsConfig, TransportError, Via,
};

// Guest memory.
pub use pmigrate_engine::{
    AtomicBitmap, Gpa, GuestMemory, GuestRegion, HostPageSize, MemoryError, PageIdx, PageRange, RegionDesc, RegionIdx,
    PAGE_SIZE, PAGE_SIZE_U64,
};

// Dirty tracking.
pub use pmigrate_engine::{
    probe_uffd_wp, DirtyError, DirtyTracker, HashTracker, TrackerKind, UffdWpTracker, UffdWpUnsupported,
    VmmBitmapTracker,
};

// What a `MigrateError` carries, and what the embedder's hooks return.
pub use pmigrate_engine::{HookError, LayoutMismatch, NoConfirmation, NoVerdict, PostcopyError, Unreturned};

// Post-copy, guest hints and shared memory.
pub use pmigrate_engine::{nonce_proof, parse_free_pages, probe_postcopy, raw_fault_round_trip, HintError, RegionPath};

// Reports.
pub use pmigrate_engine::{memory_digest, LatencySummary, PostcopyReport, Report, RoundReport, StreamReport};

#[cfg(feature = "vm-memory")]
pub use pmigrate_engine::from_vm_memory;

/// Byte streams instead of guest memory: the relay behind `pmigrate
/// send`/`recv` (QEMU's `exec:` migration) and the socket proxy.
pub use pmigrate_engine::{proxy, relay};

/// The layers below are not part of the API: an embedder cannot name them
/// through this crate, so they may change without breaking it.
///
/// ```compile_fail
/// use pmigrate::engine::Source;
/// ```
///
/// ```compile_fail
/// use pmigrate::transport::frame::FrameHdr;
/// ```
///
/// ```compile_fail
/// use pmigrate::ranges::RangeLock;
/// ```
///
/// ```compile_fail
/// let _ = pmigrate::relay::reassembly::Reassembly::new();
/// ```
#[cfg(doctest)]
struct InternalsStayInternal;
