//! QEMU migrates a live test guest over a `unix:` migration URI through
//! `pmigrate proxy` — the way libvirt and KubeVirt carry migrations:
//!
//! ```text
//! source QEMU ── unix:src.sock ── proxy entry ══ 4 TCP streams a connection ══ proxy exit ── unix:dst.sock ── destination QEMU
//! ```
//!
//! - one connection (QEMU's plain migration stream), and multifd with four
//!   channels (five connections, the main one first: QEMU 7.2 tells the
//!   main channel from the multifd ones only by the order it accepts them);
//! - the link between the proxies cut in the middle: both QEMUs see the
//!   migration fail, the source guest goes on, the destination never runs it.
//!
//! The guest checks its own memory (see `tests/guest/`). The tests run one at
//! a time and skip, saying why, when QEMU is missing.

#[path = "../../tests/support/migration.rs"]
mod migration;
#[path = "../../tests/support/qemu.rs"]
mod qemu;

use std::net::IpAddr;

use migration::{
    boot_source, check_destination_gave_up, check_landed, check_source_runs_on, guest, migrate, one_at_a_time, Fault,
    FaultyLink, ProxyPair, Scratch, EXIT_TIMEOUT,
};
use qemu::{migration_summary, Qemu};

/// The binary under test.
const PMIGRATE: &str = env!("CARGO_BIN_EXE_pmigrate");

/// The busy guest: working set and dirtying rate (MiB, MiB/s).
const WORKING_SET_MIB: u64 = 64;
const RATE_MIBPS: u64 = 20;

/// A migration through the proxy pair; `multifd` channels (0: none).
fn migrate_through_proxy(test: &str, multifd: u64) {
    let scratch = Scratch::new(test);
    let (src_sock, dst_sock) = (scratch.path("src.sock"), scratch.path("dst.sock"));
    let cfg = guest(test, WORKING_SET_MIB, RATE_MIBPS);
    // The destination listens only once its capabilities are set.
    let mut dst = Qemu::spawn(cfg.clone().incoming("defer")).expect("spawning the destination QEMU");
    let mut src = boot_source(cfg);
    if multifd > 0 {
        for vm in [&mut src, &mut dst] {
            vm.qmp().migrate_set_capabilities(&[("multifd", true)]).expect("multifd capability");
            vm.qmp().migrate_set_parameters(serde_json::json!({ "multifd-channels": multifd })).expect("channels");
        }
    }
    dst.qmp().migrate_incoming(&format!("unix:{}", dst_sock.display())).expect("QMP migrate-incoming");
    let proxy = ProxyPair::start(
        PMIGRATE,
        &scratch.0,
        &[format!("unix:{}", src_sock.display())],
        &[format!("unix:{}", dst_sock.display())],
        &["--streams", "4", "--threads", "2"],
        None,
    );
    let (info, wall) = migrate(&mut src, &format!("unix:{}", src_sock.display()));
    eprintln!("{test}: {} wall={:.1}s", migration_summary(&info), wall.as_secs_f64());
    check_landed(&mut src, &mut dst, &info, true);
    // One connection per channel, each carried whole on both sides.
    let conns = 1 + multifd as usize;
    let outcomes = proxy.wait_ended(conns, EXIT_TIMEOUT);
    eprintln!("{}", proxy.logs());
    assert_eq!(outcomes, ((conns, 0), (conns, 0)), "connections done and failed per side:\n{}", proxy.logs());
}

#[test]
fn qemu_migrates_over_a_unix_uri_through_the_proxy() {
    let _serial = one_at_a_time();
    if qemu::skip_without_qemu("qemu_migrates_over_a_unix_uri_through_the_proxy") {
        return;
    }
    migrate_through_proxy("proxy-one", 0);
}

#[test]
fn qemu_multifd_with_four_channels_through_the_proxy() {
    let _serial = one_at_a_time();
    if qemu::skip_without_qemu("qemu_multifd_with_four_channels_through_the_proxy") {
        return;
    }
    migrate_through_proxy("proxy-multifd", 4);
}

#[test]
fn a_cut_link_between_the_proxies_fails_both_qemus_and_the_source_keeps_running() {
    let _serial = one_at_a_time();
    if qemu::skip_without_qemu("a_cut_link_between_the_proxies_fails_both_qemus_and_the_source_keeps_running") {
        return;
    }
    let scratch = Scratch::new("proxy-cut");
    let (src_sock, dst_sock) = (scratch.path("src.sock"), scratch.path("dst.sock"));
    let cfg = guest("proxy-cut", WORKING_SET_MIB, RATE_MIBPS);
    let mut dst = Qemu::spawn(cfg.clone().incoming(&format!("unix:{}", dst_sock.display())))
        .expect("spawning the destination QEMU");
    let mut src = boot_source(cfg);
    // Every TCP stream between the proxies runs through a link that cuts
    // them all once 8 MiB have crossed the first, and lets none through
    // again: no stream can come back.
    let link = std::cell::RefCell::new(None);
    let through = |exit| {
        let l = FaultyLink::start(IpAddr::from([127, 0, 0, 1]), exit, Fault::CloseAllAt(8 << 20));
        let addr = l.addr;
        *link.borrow_mut() = Some(l);
        addr
    };
    let proxy = ProxyPair::start(
        PMIGRATE,
        &scratch.0,
        &[format!("unix:{}", src_sock.display())],
        &[format!("unix:{}", dst_sock.display())],
        &["--streams", "4"],
        Some(&through),
    );
    let (info, wall) = migrate(&mut src, &format!("unix:{}", src_sock.display()));
    eprintln!("proxy-cut: {} wall={:.1}s", migration_summary(&info), wall.as_secs_f64());
    let link = link.into_inner().expect("the link was started");
    assert!(link.fired(), "the link never cut; connections {:?}", link.connections());
    assert_eq!(info["status"], "failed", "the migration did not fail: {}", migration_summary(&info));

    check_source_runs_on(&mut src);
    check_destination_gave_up(&mut dst);

    // Both proxies say the connection failed, and why.
    let ((entry_done, entry_failed), (exit_done, exit_failed)) = proxy.wait_ended(1, EXIT_TIMEOUT);
    eprintln!("{}", proxy.logs());
    assert_eq!((entry_done, exit_done), (0, 0), "a cut connection counted as carried:\n{}", proxy.logs());
    assert!(entry_failed >= 1 && exit_failed >= 1, "both proxies report the failure:\n{}", proxy.logs());
}
