//! Loopback tests of the writer and the reader against plain sockets and
//! each other. Each skips, saying why, where io_uring is unavailable.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use socket2::SockRef;

use super::reader::DEFAULT_STAGING;
use super::*;
use crate::frame::{HEADER_LEN, MAX_PAYLOAD};
use crate::net::FrameReader;
use crate::payload::{build_data, Opener};

/// The largest frame: a full payload and its header.
const MAX: usize = MAX_PAYLOAD as usize + HEADER_LEN;

/// A test body's limit: a hang fails the test instead of the whole run.
const LIMIT: Duration = Duration::from_secs(300);

fn uring(test: &str) -> Option<Support> {
    match probe() {
        Ok(s) => Some(s),
        Err(e) => {
            println!("{test}: skipped: io_uring unavailable: {e}");
            None
        }
    }
}

/// Runs `f` on a thread and returns what it returns; panics if it panics
/// or has not returned within `LIMIT`.
fn bounded<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let t = thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(LIMIT) {
        Ok(v) => {
            t.join().unwrap();
            v
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => match t.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the body returned without sending"),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("hung for {LIMIT:?}"),
    }
}

/// A connected loopback pair (client, server); `sndbuf` applies to the
/// client, `rcvbuf` to the server (set before the handshake).
fn pair(sndbuf: Option<usize>, rcvbuf: Option<usize>) -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    if let Some(n) = rcvbuf {
        SockRef::from(&l).set_recv_buffer_size(n).unwrap();
    }
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    if let Some(n) = sndbuf {
        SockRef::from(&c).set_send_buffer_size(n).unwrap();
    }
    c.set_nodelay(true).unwrap();
    (c, s)
}

/// Frame `i`'s bytes: pseudo-random, its index in the first 8.
fn fill(i: u64, out: &mut [u8]) {
    SmallRng::seed_from_u64(i).fill_bytes(out);
    if out.len() >= 8 {
        out[..8].copy_from_slice(&i.to_le_bytes());
    }
}

fn frame_bytes(i: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    fill(i, &mut v);
    v
}

fn index_of(frame: &[u8]) -> u64 {
    u64::from_le_bytes(frame[..8].try_into().unwrap())
}

/// `n` frame sizes in `min..=max`: the extremes first, then a quarter of
/// 256 KiB frames (the usual size) and the rest log-uniform.
fn sizes(n: usize, min: usize, max: usize, seed: u64) -> Vec<usize> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let (lo, hi) = ((min as f64).ln(), (max as f64).ln());
    (0..n)
        .map(|i| match i {
            0 => min,
            1 => max,
            2 => HEADER_LEN.clamp(min, max),
            _ if i % 4 == 0 => ((256 << 10) + HEADER_LEN).clamp(min, max),
            _ => (rng.gen_range(lo..=hi).exp() as usize).clamp(min, max),
        })
        .collect()
}

fn first_difference(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(a.len().min(b.len()))
}

/// Builds frames into pool slots (falling back to the heap when the pool
/// is dry) or vectors, reusing what the writer gives back.
struct Frames {
    pool: Option<FramePool>,
    spare: Vec<FrameBuf>,
}

impl Frames {
    fn make(&mut self, i: u64, len: usize) -> Outgoing {
        match &self.pool {
            Some(p) if len <= p.slot_bytes() => {
                let mut b = self.spare.pop().unwrap_or_else(|| p.take());
                b.clear();
                b.resize(len, 0).unwrap();
                fill(i, &mut b);
                Outgoing::Buf(b)
            }
            _ => Outgoing::Vec(frame_bytes(i, len)),
        }
    }

    fn recycle(&mut self, o: Outgoing) {
        if let Outgoing::Buf(b) = o {
            self.spare.push(b);
        }
    }
}

/// A plain blocking reader that checks the frames of `sizes` arrive in
/// order, byte-exact, then end of stream. `slow`: small reads and sleeps.
fn expect_frames(mut s: TcpStream, sizes: Vec<usize>, slow: bool) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut rng = SmallRng::seed_from_u64(99);
        let mut got = Vec::new();
        for (i, &len) in sizes.iter().enumerate() {
            got.resize(len, 0);
            let mut at = 0;
            while at < len {
                let step = rng.gen_range(1..=if slow { 16 << 10 } else { 1 << 20 }).min(len - at);
                s.read_exact(&mut got[at..at + step]).unwrap();
                at += step;
                if slow && rng.gen_ratio(1, 8) {
                    thread::sleep(Duration::from_millis(1));
                }
            }
            let want = frame_bytes(i as u64, len);
            assert!(got == want, "frame {i} ({len} bytes) differs from byte {}", first_difference(&got, &want));
        }
        assert_eq!(s.read(&mut [0; 16]).unwrap(), 0, "end of stream after the last frame");
    })
}

/// Sends `n` frames through a writer and has a plain reader check them.
fn writer_scenario(test: &'static str, opts: WriterOptions, pooled: bool, n: usize, max: usize, slow: bool) {
    let Some(support) = uring(test) else { return };
    bounded(move || {
        let (c, s) = if slow { pair(Some(16 << 10), Some(4 << 10)) } else { pair(None, None) };
        let sizes = sizes(n, 1, max, n as u64);
        let reader = expect_frames(s, sizes.clone(), slow);
        // Fewer slots than frames in flight: heap fallbacks mix in.
        let pool = pooled.then(|| FramePool::new(opts.depth + 2, max).unwrap());
        let mut w = UringWriter::new(Arc::new(c), opts, pool.as_ref()).unwrap();
        if pooled && opts.zero_copy && support.send_zc && support.fixed_buffers {
            assert!(w.zero_copy(), "arena not registered: {:?}", w.registration_error());
        }
        let mut frames = Frames { pool: pool.clone(), spare: Vec::new() };
        for (i, &len) in sizes.iter().enumerate() {
            w.send(frames.make(i as u64, len)).unwrap();
            for d in w.take_done() {
                frames.recycle(d);
            }
        }
        w.flush().unwrap();
        assert_eq!(w.unsent(), 0);
        drop(w); // the last handle on the socket: the reader sees the end
        reader.join().unwrap();
        drop(frames);
        if let Some(p) = pool {
            assert_eq!(p.free_slots(), p.slots(), "every slot came back");
        }
    });
}

#[test]
fn writer_sends_frames_in_order_byte_exact() {
    let opts = WriterOptions { depth: 8, zero_copy: false };
    writer_scenario("writer_sends_frames_in_order_byte_exact", opts, false, 2000, MAX, false);
}

#[test]
fn writer_sends_zero_copy_from_the_arena_in_order_byte_exact() {
    let opts = WriterOptions { depth: 8, zero_copy: true };
    writer_scenario("writer_sends_zero_copy_from_the_arena_in_order_byte_exact", opts, true, 2000, MAX, false);
}

#[test]
fn writer_plain_sends_from_the_arena_with_depth_one() {
    let opts = WriterOptions { depth: 1, zero_copy: false };
    writer_scenario("writer_plain_sends_from_the_arena_with_depth_one", opts, true, 300, 1 << 20, false);
}

#[test]
fn writer_keeps_order_when_a_slow_reader_backs_sends_up() {
    for zero_copy in [false, true] {
        let opts = WriterOptions { depth: 4, zero_copy };
        writer_scenario("writer_keeps_order_when_a_slow_reader_backs_sends_up", opts, true, 200, 512 << 10, true);
    }
}

/// The peer reads a little, then resets the connection: the writer fails
/// with exactly the frames it did not wholly write, in order, and later
/// calls fail too.
fn peer_reset_scenario(zero_copy: bool) {
    let test = "writer_returns_exactly_the_unsent_frames_when_the_peer_resets";
    if uring(test).is_none() {
        return;
    }
    bounded(move || {
        let (c, mut s) = pair(Some(64 << 10), Some(64 << 10));
        let sizes = sizes(20_000, 8, 512 << 10, 5);
        let stop_at = 2_500_001;
        let peer = {
            let sizes = sizes.clone();
            thread::spawn(move || {
                let mut got = vec![0; stop_at];
                s.read_exact(&mut got).unwrap();
                let (mut whole, mut at) = (0, 0);
                while at + sizes[whole] <= stop_at {
                    let want = frame_bytes(whole as u64, sizes[whole]);
                    assert!(got[at..at + sizes[whole]] == want[..], "frame {whole} arrived corrupt");
                    at += sizes[whole];
                    whole += 1;
                }
                SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
                drop(s); // a reset, unread bytes or not
                whole
            })
        };
        let pool = FramePool::new(6, 512 << 10).unwrap();
        let opts = WriterOptions { depth: 4, zero_copy };
        let mut w = UringWriter::new(Arc::new(c), opts, Some(&pool)).unwrap();
        let mut frames = Frames { pool: Some(pool.clone()), spare: Vec::new() };
        let mut done = Vec::new();
        let mut calls = 0;
        let failure = loop {
            assert!(calls < sizes.len(), "the writer never noticed the reset");
            let r = w.send(frames.make(calls as u64, sizes[calls]));
            calls += 1;
            for d in w.take_done() {
                done.push(index_of(d.as_slice()));
                frames.recycle(d);
            }
            if let Err(f) = r {
                break f;
            }
        };
        println!("{test}: after {calls} frames: {}", failure.error);
        assert!(
            matches!(
                failure.error.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
            ),
            "{failure}"
        );
        let whole_at_peer = peer.join().unwrap();
        // The unsent frames are the last ones handed over, in order, intact.
        let first = calls - failure.unsent.len();
        assert!(!failure.unsent.is_empty(), "the frame of the failing call is unsent");
        for (j, f) in failure.unsent.iter().enumerate() {
            let i = first + j;
            assert!(f.as_slice() == frame_bytes(i as u64, sizes[i]), "unsent frame {j} is not frame {i}");
        }
        assert!(whole_at_peer <= first, "frame {} reached the peer whole yet came back unsent", first - 1);
        // Failed for good.
        let again = w.send(frames.make(calls as u64, 100)).unwrap_err();
        assert_eq!(again.unsent.len(), 1);
        assert_eq!(index_of(again.unsent[0].as_slice()), calls as u64);
        assert!(w.flush().is_err());
        // Every frame before the first unsent one was wholly written: it
        // comes back through take_done (a zero-copy one after its
        // notification, which the reset releases).
        let deadline = Instant::now() + Duration::from_secs(30);
        while done.len() < first && Instant::now() < deadline {
            done.extend(w.take_done().map(|d| index_of(d.as_slice())));
            thread::sleep(Duration::from_millis(5));
        }
        done.sort_unstable();
        assert_eq!(done, (0..first as u64).collect::<Vec<_>>());
        drop(w);
    });
}

#[test]
fn writer_returns_exactly_the_unsent_frames_when_the_peer_resets() {
    peer_reset_scenario(false);
}

#[test]
fn writer_returns_exactly_the_unsent_frames_when_the_peer_resets_zero_copy() {
    peer_reset_scenario(true);
}

#[test]
fn writer_drop_with_sends_in_flight_to_a_stalled_peer_returns() {
    if uring("writer_drop_with_sends_in_flight_to_a_stalled_peer_returns").is_none() {
        return;
    }
    for zero_copy in [false, true] {
        bounded(move || {
            let (c, s) = pair(Some(16 << 10), Some(16 << 10));
            let pool = FramePool::new(4, MAX).unwrap();
            let opts = WriterOptions { depth: 4, zero_copy };
            let mut w = UringWriter::new(Arc::new(c), opts, Some(&pool)).unwrap();
            let mut frames = Frames { pool: Some(pool.clone()), spare: Vec::new() };
            // The first goes out alone and stalls; the others queue behind.
            for i in 0..3 {
                w.send(frames.make(i, MAX)).unwrap();
            }
            assert!(w.unsent() > 0);
            drop(w);
            drop(s);
        });
    }
}

/// An arena the kernel will not register (one fixed buffer is at most
/// 1 GiB): the writer says why and sends its slots with plain sends.
#[test]
fn writer_falls_back_to_plain_sends_when_the_arena_does_not_register() {
    let Some(support) = uring("writer_falls_back_to_plain_sends_when_the_arena_does_not_register") else { return };
    bounded(move || {
        let (c, s) = pair(None, None);
        let sizes = sizes(50, 1, 1 << 20, 8);
        let reader = expect_frames(s, sizes.clone(), false);
        // Mapped lazily: only the pages written below become resident.
        let pool = FramePool::new(1, (1 << 30) + 4096).unwrap();
        let opts = WriterOptions { depth: 4, zero_copy: true };
        let mut w = UringWriter::new(Arc::new(c), opts, Some(&pool)).unwrap();
        match w.registration_error() {
            Some(e) => {
                println!("arena not registered, as expected: {e}");
                assert!(!w.zero_copy());
            }
            None => assert_eq!(w.zero_copy(), support.send_zc, "registered: this kernel takes 1 GiB+ buffers"),
        }
        let mut frames = Frames { pool: Some(pool.clone()), spare: Vec::new() };
        for (i, &len) in sizes.iter().enumerate() {
            w.send(frames.make(i as u64, len)).unwrap();
            for d in w.take_done() {
                frames.recycle(d);
            }
        }
        w.flush().unwrap();
        drop(w);
        reader.join().unwrap();
    });
}

#[test]
fn writer_rejects_bad_options() {
    if uring("writer_rejects_bad_options").is_none() {
        return;
    }
    let (c, _s) = pair(None, None);
    let c = Arc::new(c);
    let bad = WriterOptions { depth: 0, zero_copy: false };
    assert!(matches!(UringWriter::new(c.clone(), bad, None), Err(UringError::Depth { .. })));
    c.set_nonblocking(true).unwrap();
    assert!(matches!(UringWriter::new(c, WriterOptions::default(), None), Err(UringError::NonBlocking)));
}

/// A plain writer sends a byte stream in random pieces; the reader reads
/// it with every read size from 1 to past the staging size.
fn reader_scenario(register: bool) {
    let Some(support) = uring("reader_reads_byte_exact_at_every_split") else { return };
    bounded(move || {
        let (mut c, s) = pair(None, None);
        let total = (3 << 20) + 12345;
        let data = frame_bytes(7, total);
        let sent = data.clone();
        let writer = thread::spawn(move || {
            let mut rng = SmallRng::seed_from_u64(3);
            let mut at = 0;
            while at < total {
                let n = rng.gen_range(1..=200_000).min(total - at);
                c.write_all(&sent[at..at + n]).unwrap();
                at += n;
                if rng.gen_ratio(1, 4) {
                    thread::sleep(Duration::from_millis(1));
                }
            }
        });
        const STAGING: usize = 4096;
        let mut r = UringReader::build(Arc::new(s), STAGING, register).unwrap();
        assert_eq!(r.uses_fixed_buffer(), register && support.fixed_buffers);
        let mut got = Vec::with_capacity(total);
        let mut buf = vec![0; 1 << 20];
        let mut size = 0;
        for k in 0.. {
            size = size % (STAGING + 100) + 1;
            let want = if k % 97 == 0 { buf.len() } else { size };
            let n = r.read(&mut buf[..want]).unwrap();
            if n == 0 {
                break;
            }
            assert!(n <= want);
            got.extend_from_slice(&buf[..n]);
        }
        writer.join().unwrap();
        assert!(got == data, "{} of {} bytes, differing from byte {}", got.len(), total, first_difference(&got, &data));
        assert_eq!(r.read(&mut buf).unwrap(), 0, "end of stream stays");
        assert_eq!(r.read(&mut buf[..1]).unwrap(), 0, "end of stream stays");
    });
}

#[test]
fn reader_reads_byte_exact_at_every_split() {
    reader_scenario(true);
}

#[test]
fn reader_reads_byte_exact_at_every_split_unregistered() {
    reader_scenario(false);
}

fn read_some(r: &mut UringReader, buf: &mut [u8]) -> usize {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            res => return res.unwrap(),
        }
    }
}

#[test]
fn reader_times_out_with_would_block_then_reads_then_sees_the_end() {
    if uring("reader_times_out_with_would_block_then_reads_then_sees_the_end").is_none() {
        return;
    }
    bounded(|| {
        let (mut c, s) = pair(None, None);
        s.set_read_timeout(Some(Duration::from_millis(30))).unwrap();
        let tick = s.read_timeout().unwrap(); // as the kernel rounded it
        let mut r = UringReader::new(Arc::new(s), DEFAULT_STAGING).unwrap();
        assert_eq!(r.read_timeout(), tick, "starts with the socket's SO_RCVTIMEO");
        assert_eq!(r.set_read_timeout(Some(Duration::ZERO)).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        let mut small = [0u8; 100];
        let mut big = vec![0u8; DEFAULT_STAGING];
        assert_eq!(r.read(&mut small).unwrap_err().kind(), io::ErrorKind::WouldBlock, "staged read");
        assert_eq!(r.read(&mut big).unwrap_err().kind(), io::ErrorKind::WouldBlock, "direct read");
        c.write_all(b"hello").unwrap();
        let n = read_some(&mut r, &mut small);
        assert_eq!(&small[..n], b"hello");
        assert_eq!(r.read(&mut small).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        c.write_all(b"world").unwrap();
        let n = read_some(&mut r, &mut big);
        assert_eq!(&big[..n], b"world");
        drop(c);
        assert_eq!(read_some(&mut r, &mut small), 0, "end of stream");
        assert_eq!(read_some(&mut r, &mut big), 0, "end of stream stays");
    });
}

#[test]
fn reader_sees_an_immediate_end_of_stream() {
    if uring("reader_sees_an_immediate_end_of_stream").is_none() {
        return;
    }
    bounded(|| {
        let (c, s) = pair(None, None);
        drop(c);
        let mut r = UringReader::new(Arc::new(s), DEFAULT_STAGING).unwrap();
        assert_eq!(r.read(&mut [0; 10]).unwrap(), 0);
        assert_eq!(r.read(&mut []).unwrap(), 0);
    });
}

/// Real frames, uring writer to uring reader under a `FrameReader` whose
/// read timeout ticks every few milliseconds (timeouts fire mid-frame).
#[test]
fn frames_pass_from_uring_writer_to_frame_reader_over_uring_reader() {
    if uring("frames_pass_from_uring_writer_to_frame_reader_over_uring_reader").is_none() {
        return;
    }
    bounded(|| {
        let (c, s) = pair(None, None);
        let chunks: Vec<Vec<u8>> = sizes(300, 1, MAX_PAYLOAD as usize, 11)
            .iter()
            .enumerate()
            .map(|(i, &n)| frame_bytes(i as u64, n))
            .collect();
        let sent = chunks.clone();
        let writer = thread::spawn(move || {
            let mut w = UringWriter::new(Arc::new(c), WriterOptions::default(), None).unwrap();
            for (seq, chunk) in sent.iter().enumerate() {
                let mut f = Vec::new();
                build_data(&mut f, seq as u64, chunk, seq % 2 == 0);
                w.send(f).unwrap();
                if seq % 7 == 0 {
                    w.flush().unwrap();
                    thread::sleep(Duration::from_millis(3));
                }
            }
            w.flush().unwrap();
        });
        let mut r = UringReader::new(Arc::new(s), DEFAULT_STAGING).unwrap();
        r.set_read_timeout(Some(Duration::from_millis(2))).unwrap();
        let mut frames = FrameReader::new(r, "uring");
        let mut opener = Opener::default();
        for (seq, chunk) in chunks.iter().enumerate() {
            let (hdr, payload) = frames.next_frame().unwrap().expect("a frame");
            assert_eq!(hdr.aux, seq as u64);
            assert!(opener.open_data(&hdr, payload).unwrap() == &chunk[..], "chunk {seq} differs");
        }
        assert!(frames.next_frame().unwrap().is_none(), "clean end after the last frame");
        writer.join().unwrap();
    });
}

/// `cargo test -p pmigrate-transport --lib stress_uring_throughput -- --ignored --nocapture`
#[test]
#[ignore]
fn stress_uring_throughput() {
    if uring("stress_uring_throughput").is_none() {
        return;
    }
    const TOTAL: usize = 1 << 30;
    const FRAME: usize = (256 << 10) + HEADER_LEN;
    let n = TOTAL / FRAME;
    let run = |name: &str, send: &dyn Fn(TcpStream)| {
        let (c, mut s) = pair(None, None);
        crate::net::tune_accepted(&c).unwrap();
        crate::net::tune_accepted(&s).unwrap();
        let sink = thread::spawn(move || {
            let mut buf = vec![0; 1 << 20];
            let mut got = 0;
            loop {
                match s.read(&mut buf).unwrap() {
                    0 => return got,
                    k => got += k,
                }
            }
        });
        let t = Instant::now();
        send(c);
        let got = sink.join().unwrap();
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(got, n * FRAME);
        println!(
            "{name:>24}: {:6.2} GiB/s ({n} frames of {FRAME} bytes in {secs:.2} s)",
            got as f64 / secs / f64::from(1 << 30)
        );
    };
    // As many distinct buffers as a depth-8 writer cycles through, so that
    // cache effects do not favour one side.
    run("write_all", &|mut c| {
        let bufs: Vec<Vec<u8>> = (0..18).map(|i| frame_bytes(i, FRAME)).collect();
        for i in 0..n {
            c.write_all(&bufs[i % bufs.len()]).unwrap();
        }
    });
    for (depth, zero_copy) in [(1, false), (8, false), (32, false), (8, true), (32, true)] {
        let name = format!("uring depth {depth}{}", if zero_copy { " zc" } else { "" });
        run(&name, &|c| {
            let pool = FramePool::new(2 * depth + 2, FRAME).unwrap();
            let mut w = UringWriter::new(Arc::new(c), WriterOptions { depth, zero_copy }, Some(&pool)).unwrap();
            assert_eq!(w.zero_copy(), zero_copy);
            let mut spare: Vec<FrameBuf> = Vec::new();
            for _ in 0..n {
                let mut b = spare.pop().unwrap_or_else(|| pool.take());
                if b.is_empty() {
                    b.resize(FRAME, 0x5a).unwrap();
                }
                w.send(b).unwrap();
                spare.extend(w.take_done().filter_map(|d| match d {
                    Outgoing::Buf(b) => Some(b),
                    Outgoing::Vec(_) => None,
                }));
            }
            w.flush().unwrap();
        });
    }
}
