//! A lost connection is no lost migration: `pmigrate send | recv` (QEMU's
//! `exec:` helpers) over four streams, through a network that resets one
//! of their connections midway, delivers the stream byte for byte; both
//! ends exit 0 and say a stream was lost and resumed. Over each I/O
//! backend.

#[path = "../../tests/support/cutter.rs"]
mod cutter;
#[path = "../../tests/support/keys.rs"]
mod keys;
#[path = "../../tests/support/listening.rs"]
mod listening;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Instant;

use listening::start_listening_any;
use rand::{RngCore, SeedableRng};

const BIN: &str = env!("CARGO_BIN_EXE_pmigrate");

/// What crosses: 256 MiB, three quarters random, a quarter text.
fn stream() -> Vec<u8> {
    let mut data = vec![0u8; 256 << 20];
    let mut rng = rand::rngs::SmallRng::seed_from_u64(18);
    for (i, page) in data.chunks_mut(4096).enumerate() {
        match i % 4 {
            0 => page.iter_mut().enumerate().for_each(|(k, b)| *b = b"qemu device state "[k % 18]),
            _ => rng.fill_bytes(page),
        }
    }
    data
}

/// Carries `data` from `send` to `recv` through the test's network, which
/// resets the connection carrying its 128 MiB-th byte when `cut`; checks
/// the outcome and returns the seconds `send` took.
fn relay(data: &[u8], io: &str, cut: bool) -> f64 {
    let (mut recv, recv_log, listen) = start_listening_any(
        Command::new(BIN)
            .args(["recv", "--listen", "127.0.0.1:0", "--report", "--io", io])
            .args(keys::psk_args())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped()),
    );
    let mut out = recv.stdout.take().unwrap();
    let received = std::thread::spawn(move || {
        let mut v = Vec::with_capacity(256 << 20);
        out.read_to_end(&mut v).map(|_| v)
    });
    // The network: the connection carrying its 128 MiB-th byte is reset
    // (both sides, no FIN), as a NIC flap or `ss -K` does; later
    // connections pass.
    let trigger = if cut { cutter::Trigger::Cut } else { cutter::Trigger::Pass };
    let link = cutter::Cutter::start(listen, 128 << 20, trigger).unwrap();
    let mut send = Command::new(BIN)
        .args(["send", "--streams", "4", "--report", "--io", io, &link.addr.to_string()])
        .args(keys::psk_args())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let mut stdin = send.stdin.take().unwrap();
    let input = data.to_vec();
    let feed = std::thread::spawn(move || stdin.write_all(&input));
    let sent = send.wait_with_output().unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let recv_status = recv.wait().unwrap();
    let recv_log = recv_log.join().unwrap();
    let send_log = String::from_utf8_lossy(&sent.stderr);
    feed.join().unwrap().expect("send took all of its input");
    assert_eq!(link.fired(), cut, "the network reset a connection");
    assert!(sent.status.success(), "send: {send_log}");
    assert!(recv_status.success(), "recv: {recv_log}");
    let got = received.join().unwrap().expect("recv's stdout");
    assert!(got.len() == data.len() && got == data, "recv's stdout is not the stream ({} bytes)", got.len());
    if !cut {
        return secs;
    }
    assert_eq!(link.connections(), 5, "four streams and the one that came back");
    for log in [&*send_log, &recv_log] {
        assert!(log.contains("1 lost stream resumed"), "the report says a link flapped: {log}");
    }
    assert!(
        recv_log.contains("stream lost; reconnecting") && recv_log.contains("stream resumed"),
        "recv logs the loss and the comeback: {recv_log}"
    );
    eprintln!("{send_log}{recv_log}");
    secs
}

fn send_and_recv_survive_a_reset_midway(io: &str) {
    let data = stream();
    // The same network without the reset, for comparison.
    let whole = relay(&data, io, false);
    let cut = relay(&data, io, true);
    eprintln!("{io}: 256 MiB in {whole:.2} s, across a reset in {cut:.2} s");
}

#[test]
fn send_and_recv_survive_a_reset_midway_portable() {
    send_and_recv_survive_a_reset_midway("portable");
}

#[test]
fn send_and_recv_survive_a_reset_midway_io_uring() {
    match pmigrate_transport::backend::probe_uring() {
        Ok(_) => send_and_recv_survive_a_reset_midway("uring"),
        Err(why) => eprintln!("skipping over io_uring: {why}"),
    }
}
