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
        caps: CAP_LZ4,
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
);
