use super::*;
use pmigrate_transport::frame::HEADER_LEN;
use pmigrate_transport::message::Control;
use pmigrate_transport::payload::build_data;
use pmigrate_transport::{Auth, BackendChoice};
use std::io::Cursor;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex as StdMutex};

/// A reader that hands out its bytes in small, uneven pieces, as a pipe
/// from a producer writing small buffers would.
struct Dribble {
    data: Cursor<Vec<u8>>,
    step: usize,
}

impl Read for Dribble {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.step = (self.step * 7 + 3) % 9000 + 1;
        let n = buf.len().min(self.step);
        self.data.read(&mut buf[..n])
    }
}

#[derive(Clone, Default)]
struct Sink(Arc<StdMutex<Vec<u8>>>, Arc<AtomicBool>);

impl Sink {
    fn finished(&self) -> bool {
        self.1.load(Ordering::Relaxed)
    }
}

impl Output for Sink {
    fn finish(&mut self) -> std::io::Result<()> {
        self.1.store(true, Ordering::Relaxed);
        Ok(())
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn payload(len: usize) -> Vec<u8> {
    let mut x = 0x1234_5678_u64;
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if (i / 4096) % 3 == 0 {
                b"qemu device state "[i % 18]
            } else {
                x as u8
            }
        })
        .collect()
}

fn listen() -> Acceptor {
    Acceptor::bind(&["127.0.0.1:0".parse().unwrap()], Auth::Insecure).unwrap()
}

fn opts(backend: BackendChoice) -> RelayRecvOptions {
    RelayRecvOptions {
        progress_timeout: Duration::from_secs(3),
        resume: true,
        accept_deadline: Some(Instant::now() + Duration::from_secs(30)),
        threads: 1,
        backend,
        idle_timeout: None,
        interrupt: None,
    }
}

fn cfg(backend: BackendChoice, plan: StreamPlan) -> RelaySendConfig {
    RelaySendConfig { backend, ..RelaySendConfig::new(plan) }
}

fn plan(addr: std::net::SocketAddr, streams: u16) -> StreamPlan {
    StreamPlan::new(vec![addr], streams, Auth::Insecure)
}

fn streams_arrive_whole_and_in_order(b: BackendChoice) {
    for (streams, threads, compression, reader_step, duplex) in
        [(1, 1, Compression::Off, 0, false), (4, 2, Compression::Auto, 1, true), (8, 3, Compression::On, 0, false)]
    {
        let data = payload(3 << 20);
        let acc = listen();
        let addr = acc.local_addrs()[0];
        let sink = Sink::default();
        let local = Local { input: None, output: Some(Box::new(sink.clone())), abort: Box::new(|| {}) };
        let rx = std::thread::spawn(move || receive(&acc, local, &opts(b)));
        let cfg = RelaySendConfig { threads, compression, duplex, ..cfg(b, plan(addr, streams)) };
        let input: Box<dyn Read + Send> = if reader_step == 0 {
            Box::new(Cursor::new(data.clone()))
        } else {
            Box::new(Dribble { data: Cursor::new(data.clone()), step: reader_step })
        };
        let back = Sink::default();
        let sent =
            send(Local { input: Some(input), output: Some(Box::new(back.clone())), abort: Box::new(|| {}) }, &cfg)
                .unwrap();
        let got = rx.join().unwrap().unwrap();
        assert_eq!(sent.forward.bytes, data.len() as u64);
        assert_eq!(got.forward.chunks, sent.forward.chunks);
        assert_eq!(got.forward.wire_bytes, sent.forward.wire_bytes);
        assert!(*sink.0.lock().unwrap() == data, "{streams} streams: output differs");
        assert!(sink.finished(), "the output was half-closed after the last byte");
        assert_eq!(back.finished(), duplex, "the way back ends (empty) only in a full-duplex session");
        match compression {
            Compression::Off => assert_eq!(sent.forward.compressed_chunks, 0),
            Compression::On => assert!(sent.forward.compressed_chunks > 0),
            Compression::Auto => {} // depends on whether the streams backed up
        }
    }
}

/// An output slower than the streams (QEMU loading its stream): the reorder
/// window fills, the stream readers hold chunks beyond it and are woken
/// only once the output has made room, and every byte still arrives in
/// order.
fn a_slow_output_fills_the_window_and_the_output_is_exact(b: BackendChoice) {
    struct Slow(Sink);
    impl Write for Slow {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            std::thread::sleep(Duration::from_millis(1));
            self.0.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl Output for Slow {
        fn finish(&mut self) -> std::io::Result<()> {
            self.0.finish()
        }
    }
    // More than the window holds: 16 MiB.
    let data = payload(24 << 20);
    let acc = listen();
    let addr = acc.local_addrs()[0];
    let sink = Sink::default();
    let local = Local { input: None, output: Some(Box::new(Slow(sink.clone()))), abort: Box::new(|| {}) };
    let rx = std::thread::spawn(move || receive(&acc, local, &opts(b)));
    let cfg = RelaySendConfig { compression: Compression::Off, duplex: false, ..cfg(b, plan(addr, 4)) };
    let input: Box<dyn Read + Send> = Box::new(Cursor::new(data.clone()));
    let sent = send(Local { input: Some(input), output: None, abort: Box::new(|| {}) }, &cfg).unwrap();
    let got = rx.join().unwrap().unwrap();
    assert_eq!(got.forward.chunks, sent.forward.chunks);
    assert!(*sink.0.lock().unwrap() == data, "output differs");
    assert!(sink.finished(), "the output was half-closed after the last byte");
}

/// Both ways at once: a large stream forward and small, uneven writes back
/// (a return path), each end's local peer ending its writing at its own time.
fn a_full_duplex_session_carries_both_ways_whole(b: BackendChoice) {
    let forward = payload(6 << 20);
    let back: Vec<u8> = payload(300 << 10).into_iter().rev().collect();
    let acc = listen();
    let addr = acc.local_addrs()[0];
    let (fw_sink, bk_sink) = (Sink::default(), Sink::default());
    let dst_local = Local {
        input: Some(Box::new(Dribble { data: Cursor::new(back.clone()), step: 5 })),
        output: Some(Box::new(fw_sink.clone())),
        abort: Box::new(|| {}),
    };
    let rx = std::thread::spawn(move || receive(&acc, dst_local, &opts(b)));
    let cfg = RelaySendConfig { threads: 2, ..cfg(b, plan(addr, 3)) };
    let src_local = Local {
        input: Some(Box::new(Cursor::new(forward.clone()))),
        output: Some(Box::new(bk_sink.clone())),
        abort: Box::new(|| {}),
    };
    let sent = send(src_local, &cfg).unwrap();
    let got = rx.join().unwrap().unwrap();
    assert!(*fw_sink.0.lock().unwrap() == forward, "forward bytes differ");
    assert!(*bk_sink.0.lock().unwrap() == back, "bytes of the way back differ");
    assert!(fw_sink.finished() && bk_sink.finished());
    assert_eq!((sent.back.bytes, got.back.bytes), (back.len() as u64, back.len() as u64));
    // Every read of the dribbling input left as a chunk of its own.
    let mut d = Dribble { data: Cursor::new(back.clone()), step: 5 };
    let mut buf = vec![0u8; CHUNK];
    let reads = std::iter::from_fn(|| Some(d.read(&mut buf).unwrap()).filter(|&k| k > 0)).count();
    assert_eq!(sent.back.chunks, reads as u64, "small writes left as they came");
    assert_eq!(sent.back.chunks, got.back.chunks);
}

/// Unix sockets on both ends, as the proxy uses them: half-close passes
/// through, and each local peer reads the other's bytes to their end.
fn half_close_passes_through_sockets(b: BackendChoice) {
    use std::os::unix::net::UnixStream;
    let acc = listen();
    let addr = acc.local_addrs()[0];
    let (mut a_peer, a) = UnixStream::pair().unwrap();
    let (mut b_peer, b_end) = UnixStream::pair().unwrap();
    let rx = std::thread::spawn(move || receive(&acc, Local::unix(b_end).unwrap(), &opts(b)));
    let tx = std::thread::spawn(move || send(Local::unix(a).unwrap(), &cfg(b, plan(addr, 2))));
    // A says its piece and half-closes; B reads it to the end, then answers.
    a_peer.write_all(b"request").unwrap();
    a_peer.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    b_peer.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"request");
    b_peer.write_all(b"answer").unwrap();
    drop(b_peer);
    let mut got = Vec::new();
    a_peer.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"answer");
    tx.join().unwrap().unwrap();
    rx.join().unwrap().unwrap();
}

/// The other end's relay vanishing mid-stream reaches the local peer as a
/// failure: its socket is shut down while it still expects bytes, and the
/// relay reports an error.
fn a_vanishing_peer_aborts_the_local_side(b: BackendChoice) {
    use std::os::unix::net::UnixStream;
    let acc = listen();
    let addr = acc.local_addrs()[0];
    let (mut a_peer, a) = UnixStream::pair().unwrap();
    let tx = std::thread::spawn(move || send(Local::unix(a).unwrap(), &cfg(b, plan(addr, 2))));
    let mut judge = |h: &Hello| Ok(h.caps & (CAP_LZ4 | CAP_DUPLEX));
    let accepted = acc.accept_session(Mode::Stream, &mut judge, None).unwrap();
    a_peer.write_all(&[1u8; 1000]).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    drop(accepted); // the far end is gone without a word
    let err = tx.join().unwrap().expect_err("the relay must fail");
    assert!(matches!(err, MigrateError::Transport(_)), "{err}");
    // The local peer sees its socket shut: writing fails or reading ends,
    // and never with bytes that did not come from the far end.
    let mut rest = Vec::new();
    let _ = a_peer.read_to_end(&mut rest);
    assert!(rest.is_empty());
    assert!(a_peer.write_all(&[2u8; 1 << 20]).is_err(), "the relay no longer takes bytes");
}

/// A TCP peer of a failed relay is reset, never closed, even while it
/// writes and reads at once (QEMU's migration thread and its return path).
/// Linux reports a reset once, to whichever call comes first: when the
/// writer takes it, the reader reads an end of stream after it. So the
/// peer saw the reset when its reader failed or its writer met
/// `ECONNRESET` — which also proves no FIN came first (a reset after a FIN
/// fails the writer with `EPIPE`).
fn a_tcp_peer_of_a_failed_relay_is_reset_not_closed(b: BackendChoice) {
    use std::net::{TcpListener, TcpStream};
    let acc = listen();
    let addr = acc.local_addrs()[0];
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let peer = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (local, _) = l.accept().unwrap();
    let tx = std::thread::spawn(move || send(Local::tcp(local).unwrap(), &cfg(b, plan(addr, 2))));
    let mut judge = |h: &Hello| Ok(h.caps & (CAP_LZ4 | CAP_DUPLEX));
    let accepted = acc.accept_session(Mode::Stream, &mut judge, None).unwrap();
    // The far end takes nothing: the relay's queues and the peer's socket
    // fill, and the peer's writer blocks while its reader waits.
    let mut w = peer.try_clone().unwrap();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        loop {
            w.write_all(&[3u8; 64 << 10])?;
        }
    });
    let mut r = peer;
    let reader = std::thread::spawn(move || r.read(&mut [0u8; 1 << 16]));
    std::thread::sleep(Duration::from_millis(300));
    drop(accepted); // the far end is gone without a word
    tx.join().unwrap().expect_err("the relay must fail");
    let wrote = writer.join().unwrap().expect_err("the peer's writing fails");
    let read = reader.join().unwrap();
    assert!(
        read.is_err() || wrote.kind() == std::io::ErrorKind::ConnectionReset,
        "the peer was closed, not reset: its read returned {read:?}, its write {wrote}"
    );
    assert!(!matches!(read, Ok(n) if n > 0), "the peer read bytes the far end never sent");
}

fn a_session_naming_a_target_is_refused_by_a_plain_receiver(b: BackendChoice) {
    let acc = listen();
    let addr = acc.local_addrs()[0];
    let local = Local { input: None, output: Some(Box::new(Sink::default())), abort: Box::new(|| {}) };
    let mut o = opts(b);
    o.accept_deadline = Some(Instant::now() + Duration::from_secs(3));
    let rx = std::thread::spawn(move || receive(&acc, local, &o));
    let cfg = RelaySendConfig { target: Some(0), ..cfg(b, plan(addr, 1)) };
    let err = send(Local::pipes(None, None), &cfg).expect_err("refused");
    assert!(err.to_string().contains("no targets"), "{err}");
    assert!(rx.join().unwrap().is_err(), "the receiver kept waiting for a real sender, then gave up");
}

fn an_empty_stream_ends_cleanly(b: BackendChoice) {
    let acc = listen();
    let addr = acc.local_addrs()[0];
    let sink = Sink::default();
    let local = Local { input: None, output: Some(Box::new(sink.clone())), abort: Box::new(|| {}) };
    let rx = std::thread::spawn(move || receive(&acc, local, &opts(b)));
    let cfg = RelaySendConfig { threads: 1, ..cfg(b, plan(addr, 2)) };
    assert_eq!(send(Local::pipes(None, None), &cfg).unwrap().forward.chunks, 0);
    assert_eq!(rx.join().unwrap().unwrap().forward.bytes, 0);
    assert!(sink.finished());
}

/// An output whose reader has gone (QEMU closed its end of the return
/// path): `reader_gone` says so and every write fails with a broken pipe,
/// or (`quiet`) only writes do.
struct Gone {
    quiet: bool,
    writes: Arc<AtomicU64>,
}

impl Output for Gone {
    fn finish(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    fn reader_gone(&self) -> bool {
        !self.quiet
    }
}

impl Write for Gone {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        Err(std::io::ErrorKind::BrokenPipe.into())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An input that yields `first` and then never ends (a return path QEMU
/// keeps open), with the handle that keeps it open.
fn open_ended(first: &[u8]) -> (Box<dyn Read + Send>, std::os::unix::net::UnixStream) {
    let (mut writer, reader) = std::os::unix::net::UnixStream::pair().unwrap();
    writer.write_all(first).unwrap();
    (Box::new(reader), writer)
}

/// QEMU cancelling (or completing) an `exec:` migration closes both pipes
/// of `send` and waits for it: the stream so far is delivered whole, and
/// both ends finish at once although the destination's return path never
/// ends — found by `reader_gone`, or (`quiet` output) by a broken pipe on
/// the bytes that come back.
fn a_source_whose_peer_closed_ends_both_sides_at_once(b: BackendChoice) {
    for quiet in [false, true] {
        let forward = payload(3 << 20);
        let acc = listen();
        let addr = acc.local_addrs()[0];
        let sink = Sink::default();
        // The quiet case needs bytes coming back to learn of the broken pipe.
        let (back_input, _keep_open) = open_ended(if quiet { b"pong" } else { b"" });
        let dst_local = Local { input: Some(back_input), output: Some(Box::new(sink.clone())), abort: Box::new(|| {}) };
        let rx = std::thread::spawn(move || receive(&acc, dst_local, &opts(b)));
        let writes = Arc::new(AtomicU64::new(0));
        let src_local = Local {
            input: Some(Box::new(Cursor::new(forward.clone()))),
            output: Some(Box::new(Gone { quiet, writes: writes.clone() })),
            abort: Box::new(|| {}),
        };
        let t0 = Instant::now();
        let sent = send(src_local, &cfg(b, plan(addr, 3))).expect("send");
        let got = rx.join().unwrap().expect("recv");
        assert!(t0.elapsed() < Duration::from_secs(5), "took {:?}", t0.elapsed());
        assert!(*sink.0.lock().unwrap() == forward, "quiet {quiet}: forward bytes differ");
        assert!(sink.finished(), "the destination's output was closed after the last byte");
        assert!(sent.back.closed_early && got.back.closed_early, "{sent}\n{got}");
        assert!(!sent.forward.closed_early && !got.forward.closed_early);
        assert_eq!(sent.back.chunks, 0, "nothing reached the closed output");
        assert_eq!(writes.load(Ordering::Relaxed) > 0, quiet);
        assert!(sent.to_string().contains("its reader closed first"), "{sent}");
    }
}

/// At the destination a local peer that stops reading before the end is a
/// failure, never a close: the source's QEMU still writes.
fn a_destination_peer_that_stops_reading_fails_the_relay(b: BackendChoice) {
    let acc = listen();
    let addr = acc.local_addrs()[0];
    let dst_local = Local {
        input: None,
        output: Some(Box::new(Gone { quiet: false, writes: Arc::default() })),
        abort: Box::new(|| {}),
    };
    let rx = std::thread::spawn(move || receive(&acc, dst_local, &opts(b)));
    let (input, _keep_open) = open_ended(&payload(64 << 10));
    let src_local = Local { input: Some(input), output: Some(Box::new(Sink::default())), abort: Box::new(|| {}) };
    let err = send(src_local, &cfg(b, plan(addr, 2))).expect_err("send must fail");
    let rerr = rx.join().unwrap().expect_err("recv must fail");
    assert!(rerr.to_string().contains("write output"), "{rerr}");
    assert!(matches!(err, MigrateError::Transport(_)), "{err}");
}

/// A destination may not close the session's forward direction.
fn a_destination_closing_the_forward_direction_is_refused(b: BackendChoice) {
    let acc = listen();
    let addr = acc.local_addrs()[0];
    let (input, _keep_open) = open_ended(b"qemu");
    let carrying = Interrupt::new();
    let c = RelaySendConfig { interrupt: Some(carrying.clone()), ..cfg(b, plan(addr, 1)) };
    let tx = std::thread::spawn(move || {
        let local = Local { input: Some(input), output: Some(Box::new(Sink::default())), abort: Box::new(|| {}) };
        send(local, &c)
    });
    let mut judge = |h: &Hello| Ok(h.caps & (CAP_LZ4 | CAP_DUPLEX));
    let mut accepted = acc.accept_session(Mode::Stream, &mut judge, None).unwrap();
    let f = Control::Verified { value: 0, closed: true }.encode();
    // (Only once the sender reads its streams as a relay: its handshake
    // reader may have buffered past the `Welcome`.)
    while !carrying.carrying() {
        std::thread::sleep(Duration::from_millis(10));
    }
    accepted.streams[0].write_all(&f).unwrap();
    let err = tx.join().unwrap().expect_err("refused");
    assert!(err.to_string().contains("closed the session's forward direction"), "{err}");
}

/// An interrupt (a signal at `send` or `recv`) ends both ends at once, the
/// other one told why, although neither local input ever ends.
fn an_interrupt_ends_both_ends_and_says_why(b: BackendChoice) {
    for at_source in [true, false] {
        let acc = listen();
        let addr = acc.local_addrs()[0];
        let interrupt = Interrupt::new();
        let (back, _keep_back) = open_ended(b"");
        let dst_local = Local { input: Some(back), output: Some(Box::new(Sink::default())), abort: Box::new(|| {}) };
        let mut o = opts(b);
        if !at_source {
            o.interrupt = Some(interrupt.clone());
        }
        let rx = std::thread::spawn(move || receive(&acc, dst_local, &o));
        let (input, _keep_open) = open_ended(&payload(64 << 10));
        let src_local = Local { input: Some(input), output: Some(Box::new(Sink::default())), abort: Box::new(|| {}) };
        let c = RelaySendConfig { interrupt: at_source.then(|| interrupt.clone()), ..cfg(b, plan(addr, 2)) };
        let tx = std::thread::spawn(move || send(src_local, &c));
        while !interrupt.carrying() {
            std::thread::sleep(Duration::from_millis(10));
        }
        let t0 = Instant::now();
        interrupt.raise("interrupted by SIGTERM");
        let (sent, got) = (tx.join().unwrap(), rx.join().unwrap());
        assert!(t0.elapsed() < Duration::from_secs(2), "took {:?}", t0.elapsed());
        let (here, there) = if at_source { (sent, got) } else { (got, sent) };
        let here = here.expect_err("the interrupted end fails");
        assert!(matches!(&here, MigrateError::Interrupted(w) if w == "interrupted by SIGTERM"), "{here}");
        let there = there.expect_err("the other end fails");
        assert!(there.to_string().contains("interrupted by SIGTERM"), "{there}");
        assert!(!interrupt.carrying());
    }
}

/// A hand-driven sender: a real handshake, then the frames given.
/// With `vanish`, the sender closes its streams after the frames;
/// otherwise it stays connected until the receiver has given its verdict.
fn hostile_with(
    b: BackendChoice,
    streams: u16,
    frames: Vec<(usize, Vec<u8>)>,
    vanish: bool,
) -> (Result<RelayReport, MigrateError>, Vec<u8>) {
    hostile_caps(b, streams, CAP_LZ4, frames, vanish)
}

/// [`hostile_with`], offering `caps`.
fn hostile_caps(
    b: BackendChoice,
    streams: u16,
    caps: u64,
    frames: Vec<(usize, Vec<u8>)>,
    vanish: bool,
) -> (Result<RelayReport, MigrateError>, Vec<u8>) {
    let acc = listen();
    let addr = acc.local_addrs()[0];
    let sink = Sink::default();
    let local = Local { input: None, output: Some(Box::new(sink.clone())), abort: Box::new(|| {}) };
    let rx = std::thread::spawn(move || receive(&acc, local, &opts(b)));
    let hello = Hello {
        version: PROTOCOL_VERSION,
        mode: Mode::Stream,
        stream_index: 0,
        stream_count: streams,
        session: new_session_id(),
        caps,
        regions: vec![],
        extensions: vec![],
    };
    let mut conns = connect_session(&plan(addr, streams), &hello).unwrap().streams;
    for (i, f) in frames {
        let _ = conns[i].write_all(&f);
    }
    if vanish {
        conns.clear();
    }
    let res = rx.join().unwrap();
    drop(conns);
    let out = sink.0.lock().unwrap().clone();
    (res, out)
}

fn hostile(
    b: BackendChoice,
    streams: u16,
    frames: Vec<(usize, Vec<u8>)>,
) -> (Result<RelayReport, MigrateError>, Vec<u8>) {
    hostile_with(b, streams, frames, false)
}

fn data(seq: u64, byte: u8) -> Vec<u8> {
    let mut f = Vec::new();
    build_data(&mut f, seq, &[byte; 1000], false);
    f
}

fn end(total: u64) -> Vec<u8> {
    Control::End { chunks: total }.encode()
}

fn a_corrupted_chunk_is_never_written(b: BackendChoice) {
    let mut bad = data(1, 2);
    bad[HEADER_LEN + 10] ^= 1;
    let (res, out) = hostile(b, 1, vec![(0, data(0, 1)), (0, bad), (0, data(2, 3)), (0, end(3))]);
    let err = res.expect_err("corruption");
    assert!(err.to_string().contains("checksum"), "{err}");
    assert!(out.iter().all(|&b| b == 1), "only verified bytes, in order, reached the output");
}

fn a_skipped_chunk_is_an_error_not_a_hang(b: BackendChoice) {
    // Stream 0 carries 0, 2, 3, ...; stream 1 jumps ahead: chunk 1 never comes.
    let mut frames = vec![(0, data(0, 1))];
    for s in 2..200 {
        frames.push(((s % 2) as usize, data(s, 1)));
    }
    let (res, _) = hostile(b, 2, frames);
    let err = res.expect_err("gap");
    assert!(err.to_string().contains("skipped"), "{err}");
}

fn duplicates_oversized_chunks_and_a_short_end_are_refused(b: BackendChoice) {
    let (res, _) = hostile(b, 2, vec![(0, data(0, 1)), (1, data(0, 1))]);
    assert!(res.expect_err("dup").to_string().contains("duplicated"));
    let (res, _) = hostile(b, 1, vec![(0, data(0, 1)), (0, end(2))]);
    assert!(res.is_err(), "End announces a chunk that never came");
    let mut big = Vec::new();
    build_data(&mut big, 0, &vec![7u8; CHUNK + 1], false);
    let (res, out) = hostile(b, 1, vec![(0, big)]);
    assert!(res.expect_err("big").to_string().contains("chunk of"));
    assert!(out.is_empty());
}

fn a_sender_that_vanishes_fails_the_receiver(b: BackendChoice) {
    let (res, _) = hostile_with(b, 2, vec![(0, data(0, 1))], true);
    let err = res.expect_err("vanished");
    assert!(matches!(err, MigrateError::Transport(_)), "{err}");
}

/// Mutual TLS over every stream: both ways whole, the report says so; a
/// sender without a certificate of the CA, or without TLS at all, gets
/// nowhere.
fn tls_sessions_carry_both_ways_and_refuse_strangers(b: BackendChoice) {
    use pmigrate_transport::tls::test_pki::{config, pki_dir};
    let dir = pki_dir(&format!("relay-{b:?}"));
    let mut acc = listen();
    acc.auth = Auth::Tls(std::sync::Arc::new(config(&dir, "b")));
    let addr = acc.local_addrs()[0];
    let (fw, bk) = (Sink::default(), Sink::default());
    let forward = payload(2 << 20);
    let dst_local = Local {
        input: Some(Box::new(Cursor::new(b"back".to_vec()))),
        output: Some(Box::new(fw.clone())),
        abort: Box::new(|| {}),
    };
    let rx = std::thread::spawn(move || receive(&acc, dst_local, &opts(b)));
    // Strangers first: the receiver refuses them and keeps waiting.
    let mut stranger = plan(addr, 2);
    stranger.auth = Auth::Tls(std::sync::Arc::new(config(&dir, "other")));
    let err = send(Local::pipes(None, None), &cfg(b, stranger)).expect_err("a stranger got in");
    assert!(err.to_string().contains("TLS handshake"), "{err}");
    assert!(send(Local::pipes(None, None), &cfg(b, plan(addr, 1))).is_err(), "a sender without TLS got in");
    let mut ok = plan(addr, 3);
    ok.auth = Auth::Tls(std::sync::Arc::new(config(&dir, "a")));
    let src_local = Local {
        input: Some(Box::new(Cursor::new(forward.clone()))),
        output: Some(Box::new(bk.clone())),
        abort: Box::new(|| {}),
    };
    let sent = send(src_local, &cfg(b, ok)).unwrap();
    let got = rx.join().unwrap().unwrap();
    assert!(*fw.0.lock().unwrap() == forward, "forward bytes differ");
    assert_eq!(*bk.0.lock().unwrap(), b"back");
    assert_eq!((sent.backend.as_str(), got.backend.as_str()), ("TLS, portable", "TLS, portable"));
    let _ = std::fs::remove_dir_all(dir);
}

/// An input that calls its hooks once its reader has read past their
/// offsets: to kill a stream mid-transfer at a known point.
struct Tripwire {
    data: Cursor<Vec<u8>>,
    hooks: Vec<(u64, Box<dyn FnOnce() + Send>)>,
}

impl Tripwire {
    fn new(data: Vec<u8>, mut hooks: Vec<(u64, Box<dyn FnOnce() + Send>)>) -> Self {
        hooks.sort_by_key(|h| std::cmp::Reverse(h.0));
        Tripwire { data: Cursor::new(data), hooks }
    }
}

impl Read for Tripwire {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.hooks.last().is_some_and(|h| h.0 <= self.data.position()) {
            (self.hooks.pop().expect("just looked").1)();
        }
        // Small reads, so the hooks strike between chunks of the stream.
        let n = buf.len().min(64 << 10);
        self.data.read(&mut buf[..n])
    }
}

/// The TCP connections under a session's streams, to kill from outside.
fn sockets(s: &Session) -> Vec<std::net::TcpStream> {
    s.streams.iter().map(|c| c.tcp().try_clone().unwrap()).collect()
}

/// Kills a connection as the kernel does when a NIC flaps or `ss -K`
/// destroys it: a reset to the peer, and every call on it here fails.
fn kill(s: &std::net::TcpStream) {
    pmigrate_transport::net::reset_now(s);
}

/// How the network takes a connection away.
#[derive(Clone, Copy)]
enum Cut {
    /// A reset (a NIC flap, `ss -K`).
    Reset,
    /// A clean end of stream both ways, as a relay that shuts its sockets
    /// down sends: to an end whose duties on the stream are done it looks
    /// like the other end finishing.
    Close,
}

/// Cuts stream `i` from `side` once its sockets are known (the other end
/// may still be starting its relay).
fn cut_later(side: &Arc<StdMutex<Vec<std::net::TcpStream>>>, i: usize, how: Cut) -> Box<dyn FnOnce() + Send> {
    let side = side.clone();
    Box::new(move || {
        let t = Instant::now();
        while side.lock().unwrap().is_empty() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let s = &side.lock().unwrap()[i];
        match how {
            Cut::Reset => kill(s),
            Cut::Close => drop(s.shutdown(Shutdown::Both)),
        }
    })
}

fn kill_later(side: &Arc<StdMutex<Vec<std::net::TcpStream>>>, i: usize) -> Box<dyn FnOnce() + Send> {
    cut_later(side, i, Cut::Reset)
}

/// A relay of 4 streams, simplex, with the given kills: (tenths of the
/// input read, stream, killed at the accepting end). Returns both reports
/// after checking the output byte for byte.
fn relay_under_kills(b: BackendChoice, kills: &[(u64, usize, bool)]) -> (RelayReport, RelayReport) {
    let cuts: Vec<_> = kills.iter().map(|&(t, i, d)| (t, i, d, Cut::Reset)).collect();
    relay_under_cuts(b, &cuts, (Auth::Insecure, Auth::Insecure))
}

/// [`relay_under_kills`], cutting each as given, the ends authenticated as
/// `auth` says (accepting end, source).
fn relay_under_cuts(
    b: BackendChoice,
    kills: &[(u64, usize, bool, Cut)],
    auth: (Auth, Auth),
) -> (RelayReport, RelayReport) {
    let data = payload(16 << 20);
    let mut acc = listen();
    acc.auth = auth.0;
    let addr = acc.local_addrs()[0];
    let sink = Sink::default();
    let (src_side, dst_side) = (Arc::new(StdMutex::new(Vec::new())), Arc::new(StdMutex::new(Vec::new())));
    let (o, dst, out) = (opts(b), dst_side.clone(), sink.clone());
    let rx = std::thread::spawn(move || {
        let session = accept(&acc, &o)?;
        assert!(session.resume.is_some(), "the receiver takes lost streams back");
        *dst.lock().unwrap() = sockets(&session);
        session.carry(Local { input: None, output: Some(Box::new(out)), abort: Box::new(|| {}) })
    });
    let mut plan = plan(addr, 4);
    plan.auth = auth.1;
    let cfg = RelaySendConfig { threads: 2, compression: Compression::Off, duplex: false, ..cfg(b, plan) };
    let session = connect(&cfg).unwrap();
    *src_side.lock().unwrap() = sockets(&session);
    let len = data.len() as u64;
    let hooks = kills
        .iter()
        .map(|&(tenths, i, at_dst, how)| {
            (len * tenths / 10, cut_later(if at_dst { &dst_side } else { &src_side }, i, how))
        })
        .collect();
    let input = Tripwire::new(data.clone(), hooks);
    let sent = session.carry(Local { input: Some(Box::new(input)), output: None, abort: Box::new(|| {}) });
    let got = rx.join().unwrap();
    let (sent, got) = (sent.expect("send"), got.expect("recv"));
    assert!(*sink.0.lock().unwrap() == data, "the output differs from the input");
    assert!(sink.finished());
    (sent, got)
}

/// One of four streams loses its connection mid-transfer (a reset, as a
/// NIC flap looks to both ends): the source dials it again, the stream
/// resumes, and the output is the input byte for byte.
fn a_stream_killed_mid_transfer_resumes_and_the_output_is_exact(b: BackendChoice) {
    let (sent, got) = relay_under_kills(b, &[(3, 1, false)]);
    assert_eq!((sent.reconnects, got.reconnects), (1, 1), "{sent}\n{got}");
    assert!(sent.to_string().contains("1 lost stream resumed"), "{sent}");
    // The same from the accepting end's socket.
    let (sent, got) = relay_under_kills(b, &[(5, 2, true)]);
    assert_eq!((sent.reconnects, got.reconnects), (1, 1), "{sent}\n{got}");
}

/// The network ends a stream's connection cleanly mid-transfer (a FIN
/// each way, no reset). The sender's reader of that stream has no duty on
/// it (the session is simplex): that end of stream is still no sign that
/// the other end finished, since it has not confirmed the flow yet. The
/// stream comes back and the output is exact.
fn a_stream_closed_cleanly_by_the_network_resumes_and_the_output_is_exact(b: BackendChoice) {
    let (sent, got) = relay_under_cuts(b, &[(4, 2, true, Cut::Close)], (Auth::Insecure, Auth::Insecure));
    assert_eq!((sent.reconnects, got.reconnects), (1, 1), "{sent}\n{got}");
}

/// Under mutual TLS a stream killed mid-transfer comes back the same way:
/// a new TLS connection whose comeback proves the session's secret.
fn a_tls_stream_killed_mid_transfer_resumes_and_the_output_is_exact(b: BackendChoice) {
    use pmigrate_transport::tls::test_pki::{config, pki_dir};
    let dir = pki_dir(&format!("relay-resume-{b:?}"));
    let tls = |name| Auth::Tls(Arc::new(config(&dir, name)));
    let (sent, got) = relay_under_cuts(b, &[(3, 1, false, Cut::Reset), (6, 3, true, Cut::Reset)], (tls("b"), tls("a")));
    assert_eq!((sent.reconnects, got.reconnects), (2, 2), "{sent}\n{got}");
    assert_eq!(sent.backend, "TLS, portable");
    let _ = std::fs::remove_dir_all(dir);
}

/// Every stream loses its connection once, at both ends by turns.
fn every_stream_killed_once_resumes_and_the_output_is_exact(b: BackendChoice) {
    let (sent, got) = relay_under_kills(b, &[(2, 0, false), (4, 1, true), (6, 2, false), (8, 3, true)]);
    assert_eq!((sent.reconnects, got.reconnects), (4, 4), "{sent}\n{got}");
    assert!(sent.resent_chunks > 0, "chunks lost with the connections were sent again: {sent}");
}

/// A full-duplex session (the proxy's, QEMU's return path) whose streams
/// are killed while both directions carry: both arrive byte for byte.
fn a_duplex_session_killed_both_ways_resumes_both_directions(b: BackendChoice) {
    let forward = payload(12 << 20);
    let back: Vec<u8> = payload(12 << 20).into_iter().rev().collect();
    let acc = listen();
    let addr = acc.local_addrs()[0];
    let (fw_sink, bk_sink) = (Sink::default(), Sink::default());
    let (src_side, dst_side) = (Arc::new(StdMutex::new(Vec::new())), Arc::new(StdMutex::new(Vec::new())));
    let len = back.len() as u64;
    let dst_input =
        Tripwire::new(back.clone(), vec![(len / 2, kill_later(&dst_side, 2)), (len * 3 / 4, kill_later(&src_side, 0))]);
    let (o, dst, out) = (opts(b), dst_side.clone(), fw_sink.clone());
    let rx = std::thread::spawn(move || {
        let session = accept(&acc, &o)?;
        *dst.lock().unwrap() = sockets(&session);
        session.carry(Local { input: Some(Box::new(dst_input)), output: Some(Box::new(out)), abort: Box::new(|| {}) })
    });
    let cfg = RelaySendConfig { threads: 2, compression: Compression::Off, ..cfg(b, plan(addr, 3)) };
    let session = connect(&cfg).unwrap();
    *src_side.lock().unwrap() = sockets(&session);
    let len = forward.len() as u64;
    let src_input = Tripwire::new(forward.clone(), vec![(len / 3, kill_later(&src_side, 1))]);
    let sent = session.carry(Local {
        input: Some(Box::new(src_input)),
        output: Some(Box::new(bk_sink.clone())),
        abort: Box::new(|| {}),
    });
    let (sent, got) = (sent.expect("source end"), rx.join().unwrap().expect("accepting end"));
    assert!(*fw_sink.0.lock().unwrap() == forward, "forward bytes differ");
    assert!(*bk_sink.0.lock().unwrap() == back, "bytes of the way back differ");
    assert!(fw_sink.finished() && bk_sink.finished());
    assert_eq!((sent.reconnects, got.reconnects), (3, 3), "{sent}\n{got}");
}

/// A stream that cannot come back — the way to the accepting end is gone
/// with it — fails both ends cleanly once the deadline (the progress
/// timeout) has passed, each local peer told: never a clean end of a
/// cut-short stream.
fn a_stream_that_cannot_come_back_fails_both_ends_within_the_deadline(b: BackendChoice) {
    use super::cutter;
    let data = payload(16 << 20);
    let acc = listen();
    let addr = acc.local_addrs()[0];
    let sink = Sink::default();
    let (o, out) = (opts(b), sink.clone());
    let (src_aborted, dst_aborted) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let d = dst_aborted.clone();
    let rx = std::thread::spawn(move || {
        let abort = Box::new(move || d.store(true, Ordering::Relaxed));
        let r = receive(&acc, Local { input: None, output: Some(Box::new(out)), abort }, &o);
        (r, Instant::now())
    });
    // The network between the ends: it resets the connection crossing 4
    // MiB, and then goes away for good (every connection reset, nothing
    // accepted any more).
    let link = cutter::Cutter::start(addr, 4 << 20, cutter::Trigger::Cut).unwrap();
    let c = RelaySendConfig {
        compression: Compression::Off,
        duplex: false,
        progress_timeout: Duration::from_secs(3),
        ..cfg(b, plan(link.addr, 4))
    };
    let cut = Arc::new(StdMutex::new(None));
    let gone = cut.clone();
    let watcher = std::thread::spawn(move || {
        while !link.fired() {
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(link);
        *gone.lock().unwrap() = Some(Instant::now());
    });
    let s = src_aborted.clone();
    let abort = Box::new(move || s.store(true, Ordering::Relaxed));
    let err = send(Local { input: Some(Box::new(Cursor::new(data))), output: None, abort }, &c).expect_err("send");
    let src_failed = Instant::now();
    let (rerr, dst_failed) = rx.join().unwrap();
    let rerr = rerr.expect_err("recv");
    watcher.join().unwrap();
    let cut = cut.lock().unwrap().expect("the link was cut");
    // The source dials for its progress timeout; the accepting end waits
    // as long, and a handshake more.
    let (src_took, dst_took) = (src_failed - cut, dst_failed - cut);
    assert!(
        src_took >= Duration::from_secs(2) && src_took < Duration::from_secs(8),
        "send failed after {src_took:?}: {err}"
    );
    assert!(dst_took < Duration::from_secs(14), "recv failed after {dst_took:?}: {rerr}");
    assert!(err.to_string().contains("did not come back"), "{err}");
    assert!(src_aborted.load(Ordering::Relaxed) && dst_aborted.load(Ordering::Relaxed), "both local peers told");
    assert!(!sink.finished(), "the cut-short output was not closed as if whole");
}

/// Without `CAP_RESUME` (an older peer, or resume turned off) a lost
/// stream fails the relay at once, both ends.
fn without_resume_a_lost_stream_fails_the_relay_at_once(b: BackendChoice) {
    let data = payload(16 << 20);
    let acc = listen();
    let addr = acc.local_addrs()[0];
    let mut o = opts(b);
    o.resume = false;
    let rx = std::thread::spawn(move || {
        let session = accept(&acc, &o)?;
        assert!(session.resume.is_none());
        session.carry(Local { input: None, output: Some(Box::new(Sink::default())), abort: Box::new(|| {}) })
    });
    let session = connect(&RelaySendConfig { duplex: false, ..cfg(b, plan(addr, 4)) }).unwrap();
    assert!(session.resume.is_none(), "CAP_RESUME was not granted");
    let victims = sockets(&session);
    let input = Tripwire::new(data.clone(), vec![((data.len() / 3) as u64, Box::new(move || kill(&victims[1])))]);
    let t0 = Instant::now();
    let err = session.carry(Local { input: Some(Box::new(input)), output: None, abort: Box::new(|| {}) });
    assert!(err.is_err() && rx.join().unwrap().is_err(), "both ends fail");
    assert!(t0.elapsed() < Duration::from_secs(5), "took {:?}", t0.elapsed());
}

/// A resumable sender that vanishes (its process killed: every stream
/// lost, none dialled again) fails the receiver once it waited the
/// deadline out.
fn a_resumable_sender_that_vanishes_fails_the_receiver_after_the_deadline(b: BackendChoice) {
    let t0 = Instant::now();
    let (res, out) = hostile_caps(b, 2, CAP_LZ4 | CAP_RESUME, vec![(0, data(0, 1))], true);
    let err = res.expect_err("vanished");
    assert!(err.to_string().contains("did not come back"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(15), "took {:?}", t0.elapsed());
    assert_eq!(out, vec![1; 1000], "what arrived whole was delivered, and no more");
}

/// Every case above runs over each I/O backend: the same bytes, the same
/// failures. io_uring cases skip, saying why, where the kernel refuses it.
macro_rules! over_each_backend {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            use super::*;

            #[test]
            fn portable() {
                super::$case(BackendChoice::Portable);
            }

            #[test]
            fn io_uring() {
                match pmigrate_transport::backend::probe_uring() {
                    Ok(_) => super::$case(BackendChoice::Uring),
                    Err(why) => eprintln!("skipping {} over io_uring: {why}", stringify!($case)),
                }
            }
        }
    )*};
}

over_each_backend!(
    tls_sessions_carry_both_ways_and_refuse_strangers,
    streams_arrive_whole_and_in_order,
    a_slow_output_fills_the_window_and_the_output_is_exact,
    a_full_duplex_session_carries_both_ways_whole,
    half_close_passes_through_sockets,
    a_vanishing_peer_aborts_the_local_side,
    a_tcp_peer_of_a_failed_relay_is_reset_not_closed,
    a_session_naming_a_target_is_refused_by_a_plain_receiver,
    an_empty_stream_ends_cleanly,
    a_corrupted_chunk_is_never_written,
    a_skipped_chunk_is_an_error_not_a_hang,
    duplicates_oversized_chunks_and_a_short_end_are_refused,
    a_sender_that_vanishes_fails_the_receiver,
    a_source_whose_peer_closed_ends_both_sides_at_once,
    a_destination_peer_that_stops_reading_fails_the_relay,
    a_destination_closing_the_forward_direction_is_refused,
    an_interrupt_ends_both_ends_and_says_why,
    a_stream_killed_mid_transfer_resumes_and_the_output_is_exact,
    a_stream_closed_cleanly_by_the_network_resumes_and_the_output_is_exact,
    a_tls_stream_killed_mid_transfer_resumes_and_the_output_is_exact,
    every_stream_killed_once_resumes_and_the_output_is_exact,
    a_duplex_session_killed_both_ways_resumes_both_directions,
    a_stream_that_cannot_come_back_fails_both_ends_within_the_deadline,
    without_resume_a_lost_stream_fails_the_relay_at_once,
    a_resumable_sender_that_vanishes_fails_the_receiver_after_the_deadline,
);
