//! What the embedder's hooks return reaches the embedder: each hook's
//! error is the source of the migration's error, and the peer hears it
//! with its causes.

use std::error::Error;
use std::io;

use pmigrate_ranges::GuestMemory;
use pmigrate_transport::{Acceptor, Auth, Psk};

use crate::report::Report;
use crate::{HookError, Incoming, MigrateError, ReceiveOptions, Source, SourceConfig, TrackerKind};

/// An embedder's error with a cause of its own.
#[derive(Debug, thiserror::Error)]
#[error("cannot start the vCPUs")]
struct NoVcpus(#[source] io::Error);

/// Migrates 1 MiB over loopback with these hooks; the source's result and
/// the destination's.
fn migrate(
    pause: impl FnMut() -> Result<(), HookError> + Send,
    abort: impl FnOnce() -> Result<(), HookError> + Send,
    resume: impl FnOnce() -> Result<(), HookError> + Send,
) -> (Result<Report, MigrateError>, Result<Report, MigrateError>) {
    let key = Auth::Psk(Psk::from_bytes(&[7; 32]).unwrap());
    let src = GuestMemory::anonymous(1 << 20).unwrap();
    src.regions()[0].write_u64(4096, 0xfeed).unwrap();
    let dst = GuestMemory::anonymous(1 << 20).unwrap();
    let acceptor = Acceptor::bind(&["127.0.0.1:0".parse().unwrap()], key.clone()).unwrap();
    let addr = acceptor.local_addrs()[0];
    std::thread::scope(|s| {
        let rx = s.spawn(|| {
            let incoming = Incoming::accept_for(&acceptor, &dst, None).unwrap();
            incoming.receive_and_run(&dst, &ReceiveOptions::default(), resume)
        });
        let cfg = SourceConfig { tracker: TrackerKind::Hash, ..SourceConfig::default() };
        let source = Source::new(&src, vec![addr], key).config(cfg).on_pause(pause).on_abort(abort).run();
        (source, rx.join().unwrap())
    })
}

#[test]
fn a_pause_hook_error_is_the_source_of_the_migration_error() {
    let stuck = || Err(io::Error::new(io::ErrorKind::TimedOut, "the vCPU did not stop").into());
    let (source, dest) = migrate(stuck, || Ok(()), || Ok(()));
    let e = source.expect_err("the pause hook failed");
    assert!(matches!(e, MigrateError::Pause(_)), "{e}");
    assert_eq!(e.to_string(), "pause hook failed: the vCPU did not stop");
    let cause = e.source().and_then(|c| c.downcast_ref::<io::Error>()).expect("the hook's io::Error");
    assert_eq!(cause.kind(), io::ErrorKind::TimedOut);
    assert!(e.source_keeps_guest());
    assert!(dest.is_err(), "the destination got nothing to run");
}

#[test]
fn resume_and_abort_hook_errors_are_kept_with_their_causes() {
    let no_memory = io::Error::new(io::ErrorKind::OutOfMemory, "no memory for the vCPU threads");
    let (source, dest) =
        migrate(|| Ok(()), || Err("the guest cannot run here either".into()), || Err(NoVcpus(no_memory).into()));
    // The destination: the resume hook's error, its own cause below it.
    let e = dest.expect_err("the resume hook failed");
    assert!(matches!(e, MigrateError::Resume(_)), "{e}");
    let hook = e.source().and_then(|c| c.downcast_ref::<NoVcpus>()).expect("the hook's error");
    assert_eq!(hook.0.kind(), io::ErrorKind::OutOfMemory);
    // The source heard why, causes included, kept the guest, and its abort
    // hook failed: that error is the source, the migration's beside it.
    let e = source.expect_err("the destination refused");
    let MigrateError::AbortHook { after, .. } = &e else { panic!("{e}") };
    assert!(after.source_keeps_guest(), "{after}");
    assert!(
        after.to_string().contains("cannot start the vCPUs: no memory for the vCPU threads"),
        "the destination's reason with its cause: {after}"
    );
    assert_eq!(e.source().map(|c| c.to_string()).as_deref(), Some("the guest cannot run here either"));
}
