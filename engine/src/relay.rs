//! Byte-stream mode: one ordered byte stream (QEMU's migration stream)
//! striped over many TCP streams and reassembled in order.
//!
//! ```text
//! input ─ reader ─ chunks ─ workers (lz4, check) ─ sequencer ─┬─ stream 0 ─┐            ┌ receiver 0 ┐
//!                                                             ├─ stream 1 ─┼─ network ─ ┤ receiver 1 ├─ reorder window ─ writer ─ output
//!                                                             └─ stream N ─┘            └ receiver N ┘
//! ```
//!
//! The reader cuts a chunk from whatever one `read` returns (at most
//! [`CHUNK`] bytes): under load a pipe read returns a full chunk, and when
//! the producer writes a few bytes and waits — QEMU's last pages and device
//! state after the guest paused — they leave at once, never held back for
//! a full chunk or a timer. Workers build `Data` frames in parallel; the
//! sequencer hands them to streams in sequence order, each to a stream with
//! room, so every stream carries increasing sequence numbers.
//!
//! The receiver verifies each chunk before it enters a bounded reorder
//! window; a receiver holding a chunk beyond the window stops reading its
//! stream until the writer catches up, which pushes back through TCP to the
//! sender and through the bounded queues to the input, so the producer sees
//! the real rate of the links. Because each stream's chunks are in order,
//! the chunk the writer needs is always at the head of some stream: the
//! window can never deadlock. Only verified bytes reach the output, in
//! order; the output ends after the last byte, and the sender exits
//! successfully only once the receiver confirmed every chunk.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Select, Sender};
use pmigrate_transport::frame::{Encoding, FrameHdr, FrameKind, HEADER_LEN};
use pmigrate_transport::hello::{ErrorCode, Hello, Mode, CAP_LZ4, KNOWN_CAPS, PROTOCOL_VERSION};
use pmigrate_transport::net::{write_frame, FrameReader};
use pmigrate_transport::payload::{build_control, build_data, Opener};
use pmigrate_transport::session::{connect_session, new_session_id, send_error, StreamPlan};
use pmigrate_transport::{Acceptor, TransportError};
use serde::Serialize;

use crate::{Compression, MigrateError};

/// Largest chunk: 256 KiB. Large enough that per-frame costs vanish at
/// 10 Gbit/s, small enough that one chunk on a 1 Gbit/s link takes 2 ms.
pub const CHUNK: usize = 256 << 10;

/// Frames queued per stream on the sending side.
const QUEUE_DEPTH: usize = 4;

/// Chunks the receiver holds out of order at most: 64 × 256 KiB = 16 MiB.
pub const REORDER_WINDOW: u64 = 64;

/// What a relay moved.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RelayReport {
    /// `"send"` or `"recv"`.
    pub role: String,
    /// Bytes of the stream itself.
    pub bytes: u64,
    /// Bytes on the wire, headers included.
    pub wire_bytes: u64,
    /// Chunks.
    pub chunks: u64,
    /// Chunks sent lz4-compressed.
    pub compressed_chunks: u64,
    /// Streams.
    pub streams: usize,
    /// Seconds from the first stream connected to confirmation.
    pub secs: f64,
}

impl std::fmt::Display for RelayReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pmigrate {}: {} bytes in {} chunks ({} lz4) over {} streams, {} bytes on the wire, {:.3} s",
            self.role, self.bytes, self.chunks, self.compressed_chunks, self.streams, self.wire_bytes, self.secs
        )
    }
}

/// Options of the sending side.
#[derive(Clone, Debug)]
pub struct RelaySendConfig {
    /// Where the streams go and how they leave.
    pub plan: StreamPlan,
    /// Worker threads building frames.
    pub threads: usize,
    /// lz4 policy.
    pub compression: Compression,
}

struct Built {
    seq: u64,
    frame: Vec<u8>,
    lz4: bool,
}

/// Sends everything `input` yields until its end, then waits for the
/// receiver's confirmation.
///
/// The input is read on a thread of its own that is not waited for when
/// the relay fails: a failed relay returns at once even if the input never
/// yields another byte.
pub fn send(mut input: impl Read + Send + 'static, cfg: &RelaySendConfig) -> Result<RelayReport, MigrateError> {
    let t0 = Instant::now();
    let caps = if cfg.compression == Compression::Off { 0 } else { CAP_LZ4 };
    let hello = Hello {
        version: PROTOCOL_VERSION,
        mode: Mode::Stream,
        stream_index: 0,
        stream_count: cfg.plan.streams,
        session: new_session_id(),
        caps,
        regions: Vec::new(),
        extensions: Vec::new(),
    };
    let (streams, welcome) = connect_session(&cfg.plan, &hello)?;
    let lz4 = welcome.caps & CAP_LZ4 != 0 && cfg.compression != Compression::Off;
    let n = streams.len();
    let threads = cfg.threads.max(1);
    let abort = AtomicBool::new(false);
    let wire = AtomicU64::new(0);
    // Set while the sequencer finds every stream queue full.
    let backed_up = AtomicBool::new(false);
    let mut report = RelayReport { role: "send".into(), streams: n, ..RelayReport::default() };

    let outcome = std::thread::scope(|s| -> Result<(), MigrateError> {
        let (chunk_tx, chunk_rx) = bounded::<(u64, Vec<u8>)>(threads * 2);
        let (built_tx, built_rx) = bounded::<Built>(threads * 2);
        let (stream_txs, stream_rxs): (Vec<_>, Vec<_>) = (0..n).map(|_| bounded::<Vec<u8>>(QUEUE_DEPTH)).unzip();
        let (verdict_tx, verdict_rx) = bounded::<Result<u64, MigrateError>>(n);
        let (done_tx, done_rx) = bounded::<Result<(u64, u64), MigrateError>>(1);
        let abort = &abort;
        let wire = &wire;
        let backed_up = &backed_up;

        // Reader: one read, one chunk.
        std::thread::spawn(move || {
            let mut seq = 0u64;
            let mut bytes = 0u64;
            let res = loop {
                let mut buf = vec![0u8; CHUNK];
                let k = match input.read(&mut buf) {
                    Ok(0) => break Ok((seq, bytes)),
                    Ok(k) => k,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => break Err(TransportError::io("read input", e).into()),
                };
                buf.truncate(k);
                bytes += k as u64;
                if chunk_tx.send((seq, buf)).is_err() {
                    break Err(MigrateError::Aborted);
                }
                seq += 1;
            };
            drop(chunk_tx);
            let _ = done_tx.send(res);
        });
        // Workers: build and seal frames.
        for _ in 0..threads {
            let (rx, tx) = (chunk_rx.clone(), built_tx.clone());
            s.spawn(move || {
                let mut gate = crate::lz4gate::Lz4Gate::new(if lz4 { cfg.compression } else { Compression::Off });
                for (seq, data) in rx.iter() {
                    let mut frame = Vec::with_capacity(HEADER_LEN + data.len());
                    gate.pressure(backed_up.load(Ordering::Relaxed));
                    let try_lz4 = gate.try_now();
                    let enc = build_data(&mut frame, seq, &data, try_lz4);
                    if try_lz4 {
                        gate.record(data.len(), frame.len());
                    }
                    if tx.send(Built { seq, frame, lz4: enc == Encoding::Lz4 }).is_err() {
                        return;
                    }
                }
            });
        }
        drop((chunk_rx, built_tx));
        // Stream writers and listeners.
        let mut writers = Vec::new();
        for (i, (st, rx)) in streams.iter().zip(stream_rxs).enumerate() {
            writers.push(s.spawn(move || -> Result<(), MigrateError> {
                let name = format!("stream {i}");
                let mut w = st;
                for frame in rx.iter() {
                    if let Err(e) = write_frame(&mut w, &frame, &name) {
                        abort.store(true, Ordering::Relaxed);
                        return Err(e.into());
                    }
                    wire.fetch_add(frame.len() as u64, Ordering::Relaxed);
                }
                Ok(())
            }));
            let tx = verdict_tx.clone();
            s.spawn(move || {
                let mut r = FrameReader::new(st, format!("stream {i}"));
                let v = match r.next_frame() {
                    Ok(Some((h, _))) if h.kind == FrameKind::Verified && i == 0 => h
                        .verify(&[])
                        .map(|()| h.aux)
                        .map_err(|source| TransportError::Wire { what: "stream 0".into(), source }.into()),
                    Ok(Some((h, _))) => Err(TransportError::Unexpected { what: r.name().into(), kind: h.kind }.into()),
                    Ok(None) => return,
                    Err(e) => Err(e.into()),
                };
                if v.is_err() {
                    abort.store(true, Ordering::Relaxed);
                }
                let _ = tx.send(v);
            });
        }
        drop(verdict_tx);
        // Sequencer: hand frames to streams in sequence order.
        let mut pending: BTreeMap<u64, Built> = BTreeMap::new();
        let mut next = 0u64;
        let mut lz4_chunks = 0u64;
        let mut dispatch_err = None;
        'outer: for b in built_rx.iter() {
            pending.insert(b.seq, b);
            while let Some(b) = pending.remove(&next) {
                lz4_chunks += u64::from(b.lz4);
                match dispatch(&stream_txs, b.frame, next as usize % n) {
                    Ok(waited) => backed_up.store(waited, Ordering::Relaxed),
                    Err(e) => {
                        dispatch_err = Some(e);
                        abort.store(true, Ordering::Relaxed);
                        break 'outer;
                    }
                }
                next += 1;
            }
        }
        drop(built_rx);
        let mut first_err = dispatch_err;
        let (mut chunks, mut bytes) = (next, 0);
        if first_err.is_none() {
            // The workers ended, so the reader has ended too.
            match done_rx.recv().unwrap_or(Err(MigrateError::Aborted)) {
                Ok(x) => (chunks, bytes) = x,
                Err(e) => MigrateError::keep(&mut first_err, e),
            }
        }
        if first_err.is_none() {
            let mut h = FrameHdr::new(FrameKind::End);
            h.aux = chunks;
            let mut f = Vec::new();
            build_control(&mut f, h, &[]);
            for tx in &stream_txs {
                if tx.send(f.clone()).is_err() {
                    MigrateError::keep(&mut first_err, MigrateError::Aborted);
                }
            }
        }
        drop(stream_txs);
        for w in writers {
            if let Err(e) = w.join().expect("writer panicked") {
                MigrateError::keep(&mut first_err, e);
            }
        }
        let wait = if first_err.is_none() { Duration::from_secs(120) } else { Duration::from_secs(1) };
        let verdict = verdict_rx.recv_timeout(wait);
        for st in &streams {
            let _ = st.shutdown(Shutdown::Both);
        }
        report.chunks = chunks;
        report.bytes = bytes;
        report.compressed_chunks = lz4_chunks;
        match (first_err, verdict) {
            (_, Ok(Err(peer @ MigrateError::Transport(TransportError::Peer(_))))) => Err(peer),
            (Some(e), _) => Err(e),
            (None, Ok(Err(e))) => Err(e),
            (None, Err(_)) => {
                Err(TransportError::Setup("the receiver did not confirm the end of stream".into()).into())
            }
            (None, Ok(Ok(got))) if got != chunks => {
                Err(MigrateError::Protocol { stream: 0, why: format!("receiver confirmed {got} of {chunks} chunks") })
            }
            (None, Ok(Ok(_))) => Ok(()),
        }
    });
    outcome?;
    report.wire_bytes = wire.load(Ordering::Relaxed);
    report.secs = t0.elapsed().as_secs_f64();
    Ok(report)
}

/// Puts `frame` on a stream with room, preferring `home`; waits for the
/// first stream that frees room when all are full.
/// Returns whether it had to wait: the links are the bottleneck.
fn dispatch(txs: &[Sender<Vec<u8>>], frame: Vec<u8>, home: usize) -> Result<bool, MigrateError> {
    let n = txs.len();
    let mut frame = frame;
    for k in 0..n {
        match txs[(home + k) % n].try_send(frame) {
            Ok(()) => return Ok(false),
            Err(e) => frame = e.into_inner(),
        }
    }
    let mut sel = Select::new();
    for tx in txs {
        sel.send(tx);
    }
    let op = sel.select();
    let i = op.index();
    op.send(&txs[i], frame).map(|()| true).map_err(|_| MigrateError::Aborted)
}

/// Options of the receiving side.
#[derive(Clone, Debug)]
pub struct RelayRecvOptions {
    /// A frame whose bytes stop arriving for this long fails the relay.
    pub stall_timeout: Duration,
    /// How long to wait for the sender to connect.
    pub accept_deadline: Option<Instant>,
}

impl Default for RelayRecvOptions {
    fn default() -> Self {
        Self { stall_timeout: Duration::from_secs(30), accept_deadline: None }
    }
}

struct Window {
    chunks: BTreeMap<u64, Vec<u8>>,
    /// Next sequence number the writer needs.
    next: u64,
    /// Total chunks, once an `End` said so.
    total: Option<u64>,
    /// Streams that delivered `End`.
    ended: usize,
    failed: bool,
    /// Per stream: the last sequence number it delivered, and whether it
    /// ended. Each stream's numbers increase, so once every stream is past
    /// `next` (or ended) without delivering it, it can never come.
    heads: Vec<(Option<u64>, bool)>,
}

impl Window {
    fn gap(&self) -> bool {
        !self.chunks.contains_key(&self.next)
            && self.heads.iter().all(|&(head, ended)| ended || head.is_some_and(|h| h > self.next))
    }
}

/// Receives one byte-stream session from `acceptor` and writes it to
/// `output` in order, verified; returns after the last byte was written
/// and the sender was told.
pub fn receive(
    acceptor: &Acceptor,
    mut output: impl Write + Send,
    opts: &RelayRecvOptions,
) -> Result<RelayReport, MigrateError> {
    let mut judge = |h: &Hello| Ok(h.caps & KNOWN_CAPS & CAP_LZ4);
    let accepted = acceptor.accept_session(Mode::Stream, &mut judge, opts.accept_deadline)?;
    let t0 = Instant::now();
    let streams = accepted.streams;
    let n = streams.len();
    let lz4_granted = accepted.caps & CAP_LZ4 != 0;
    let window = Mutex::new(Window {
        chunks: BTreeMap::new(),
        next: 0,
        total: None,
        ended: 0,
        failed: false,
        heads: vec![(None, false); n],
    });
    let changed = Condvar::new();
    let first_error: Mutex<Option<MigrateError>> = Mutex::new(None);
    let wire = AtomicU64::new(0);
    let fail = |i: usize, e: MigrateError| {
        let mut fe = first_error.lock().expect("error lock");
        if fe.is_none() {
            let code = match &e {
                MigrateError::Transport(TransportError::Wire {
                    source: pmigrate_transport::WireError::Checksum { .. },
                    ..
                }) => ErrorCode::Checksum,
                MigrateError::Transport(TransportError::Wire { .. }) | MigrateError::Protocol { .. } => {
                    ErrorCode::Protocol
                }
                _ => ErrorCode::Io,
            };
            send_error(&streams[i], code, e.to_string());
            if i != 0 {
                send_error(&streams[0], code, e.to_string());
            }
            *fe = Some(e);
            for st in &streams {
                let _ = st.shutdown(Shutdown::Both);
            }
        }
        window.lock().expect("window lock").failed = true;
        changed.notify_all();
    };
    let (bytes, chunks) = std::thread::scope(|s| {
        for (i, st) in streams.iter().enumerate() {
            let (window, changed, wire, fail) = (&window, &changed, &wire, &fail);
            s.spawn(move || {
                if let Err(e) = receive_one(st, i, opts, lz4_granted, window, changed, wire) {
                    fail(i, e);
                }
            });
        }
        // The writer: this thread.
        let mut written = 0u64;
        loop {
            let mut w = window.lock().expect("window lock");
            let chunk = loop {
                if w.failed {
                    return (written, w.next);
                }
                let next = w.next;
                if let Some(c) = w.chunks.remove(&next) {
                    w.next += 1;
                    break Some(c);
                }
                if w.ended == n {
                    break None;
                }
                if w.gap() {
                    let why = format!("chunk {} was skipped by every stream", w.next);
                    drop(w);
                    fail(0, MigrateError::Protocol { stream: 0, why });
                    return (written, 0);
                }
                w = changed.wait(w).expect("window lock");
            };
            changed.notify_all();
            let total = w.total;
            let next = w.next;
            drop(w);
            match chunk {
                Some(c) => {
                    if let Err(e) = output.write_all(&c) {
                        fail(0, TransportError::io("write output", e).into());
                        return (written, next);
                    }
                    written += c.len() as u64;
                }
                None => {
                    if total != Some(next) {
                        let why = format!("stream ended after {next} chunks, sender announced {total:?}");
                        fail(0, MigrateError::Protocol { stream: 0, why });
                        return (written, next);
                    }
                    if let Err(e) = output.flush() {
                        fail(0, TransportError::io("flush output", e).into());
                    }
                    return (written, next);
                }
            }
        }
    });
    if let Some(e) = first_error.lock().expect("error lock").take() {
        return Err(e);
    }
    drop(output);
    let mut h = FrameHdr::new(FrameKind::Verified);
    h.aux = chunks;
    let mut f = Vec::new();
    build_control(&mut f, h, &[]);
    write_frame(&mut &streams[0], &f, "stream 0")?;
    for st in &streams {
        let _ = st.shutdown(Shutdown::Write);
    }
    Ok(RelayReport {
        role: "recv".into(),
        bytes,
        wire_bytes: wire.load(Ordering::Relaxed),
        chunks,
        compressed_chunks: 0,
        streams: n,
        secs: t0.elapsed().as_secs_f64(),
    })
}

fn receive_one(
    st: &TcpStream,
    i: usize,
    opts: &RelayRecvOptions,
    lz4_granted: bool,
    window: &Mutex<Window>,
    changed: &Condvar,
    wire: &AtomicU64,
) -> Result<(), MigrateError> {
    let name = format!("stream {i}");
    st.set_read_timeout(Some(Duration::from_millis(500))).map_err(|e| TransportError::io(&name, e))?;
    let mut reader = FrameReader::new(st, name.clone());
    reader.set_stall_limit(opts.stall_timeout);
    let mut opener = Opener::default();
    let mut last_seq: Option<u64> = None;
    loop {
        let Some((hdr, payload)) = reader.next_frame()? else {
            if window.lock().expect("window lock").failed {
                return Err(MigrateError::Aborted);
            }
            return Err(TransportError::Closed(format!("{name}: before the end of the stream")).into());
        };
        wire.fetch_add((HEADER_LEN + payload.len()) as u64, Ordering::Relaxed);
        match hdr.kind {
            FrameKind::Data => {
                if hdr.count as usize > CHUNK {
                    return Err(MigrateError::Protocol { stream: i, why: format!("chunk of {} bytes", hdr.count) });
                }
                if hdr.encoding == Encoding::Lz4 && !lz4_granted {
                    return Err(MigrateError::Protocol { stream: i, why: "lz4 chunk without the capability".into() });
                }
                if last_seq.is_some_and(|l| hdr.aux <= l) {
                    return Err(MigrateError::Protocol { stream: i, why: format!("chunk {} out of order", hdr.aux) });
                }
                last_seq = Some(hdr.aux);
                let data = opener
                    .open_data(&hdr, payload)
                    .map_err(|source| TransportError::Wire { what: name.clone(), source })?
                    .to_vec();
                let mut w = window.lock().expect("window lock");
                w.heads[i].0 = Some(hdr.aux);
                changed.notify_all();
                // Hold a chunk beyond the window until the writer catches up.
                while !w.failed && hdr.aux >= w.next + REORDER_WINDOW {
                    w = changed.wait(w).expect("window lock");
                }
                if w.failed {
                    return Err(MigrateError::Aborted);
                }
                if hdr.aux < w.next || w.total.is_some_and(|t| hdr.aux >= t) || w.chunks.contains_key(&hdr.aux) {
                    return Err(MigrateError::Protocol { stream: i, why: format!("chunk {} duplicated", hdr.aux) });
                }
                w.chunks.insert(hdr.aux, data);
                changed.notify_all();
            }
            FrameKind::End => {
                hdr.verify(&[]).map_err(|source| TransportError::Wire { what: name.clone(), source })?;
                let mut w = window.lock().expect("window lock");
                if w.total.is_some_and(|t| t != hdr.aux) || last_seq.is_some_and(|l| l >= hdr.aux) {
                    return Err(MigrateError::Protocol { stream: i, why: "inconsistent end of stream".into() });
                }
                w.total = Some(hdr.aux);
                w.ended += 1;
                w.heads[i].1 = true;
                changed.notify_all();
                return Ok(());
            }
            kind => return Err(TransportError::Unexpected { what: name, kind }.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pmigrate_transport::payload::build_data;
    use std::io::Cursor;
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
    struct Sink(Arc<StdMutex<Vec<u8>>>);

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
        Acceptor::bind(&["127.0.0.1:0".parse().unwrap()]).unwrap()
    }

    fn opts() -> RelayRecvOptions {
        RelayRecvOptions {
            stall_timeout: Duration::from_secs(2),
            accept_deadline: Some(Instant::now() + Duration::from_secs(30)),
        }
    }

    #[test]
    fn streams_arrive_whole_and_in_order() {
        for (streams, threads, compression, reader_step) in
            [(1, 1, Compression::Off, 0), (4, 2, Compression::Auto, 1), (8, 3, Compression::On, 0)]
        {
            let data = payload(3 << 20);
            let acc = listen();
            let addr = acc.local_addrs()[0];
            let sink = Sink::default();
            let out = sink.clone();
            let rx = std::thread::spawn(move || receive(&acc, out, &opts()));
            let cfg = RelaySendConfig { plan: StreamPlan::new(vec![addr], streams), threads, compression };
            let sent = if reader_step == 0 {
                send(Cursor::new(data.clone()), &cfg).unwrap()
            } else {
                send(Dribble { data: Cursor::new(data.clone()), step: reader_step }, &cfg).unwrap()
            };
            let got = rx.join().unwrap().unwrap();
            assert_eq!(sent.bytes, data.len() as u64);
            assert_eq!(got.chunks, sent.chunks);
            assert!(*sink.0.lock().unwrap() == data, "{streams} streams: output differs");
            match compression {
                Compression::Off => assert_eq!(sent.compressed_chunks, 0),
                Compression::On => assert!(sent.compressed_chunks > 0),
                Compression::Auto => {} // depends on whether the streams backed up
            }
        }
    }

    #[test]
    fn an_empty_stream_ends_cleanly() {
        let acc = listen();
        let addr = acc.local_addrs()[0];
        let sink = Sink::default();
        let out = sink.clone();
        let rx = std::thread::spawn(move || receive(&acc, out, &opts()));
        let cfg = RelaySendConfig { plan: StreamPlan::new(vec![addr], 2), threads: 1, compression: Compression::Auto };
        assert_eq!(send(Cursor::new(Vec::new()), &cfg).unwrap().chunks, 0);
        assert_eq!(rx.join().unwrap().unwrap().bytes, 0);
    }

    /// A hand-driven sender: a real handshake, then the frames given.
    /// With `vanish`, the sender closes its streams after the frames;
    /// otherwise it stays connected until the receiver has given its verdict.
    fn hostile_with(
        streams: u16,
        frames: Vec<(usize, Vec<u8>)>,
        vanish: bool,
    ) -> (Result<RelayReport, MigrateError>, Vec<u8>) {
        let acc = listen();
        let addr = acc.local_addrs()[0];
        let sink = Sink::default();
        let out = sink.clone();
        let rx = std::thread::spawn(move || receive(&acc, out, &opts()));
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
        let (mut conns, _) = connect_session(&StreamPlan::new(vec![addr], streams), &hello).unwrap();
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

    fn hostile(streams: u16, frames: Vec<(usize, Vec<u8>)>) -> (Result<RelayReport, MigrateError>, Vec<u8>) {
        hostile_with(streams, frames, false)
    }

    fn data(seq: u64, byte: u8) -> Vec<u8> {
        let mut f = Vec::new();
        build_data(&mut f, seq, &[byte; 1000], false);
        f
    }

    fn end(total: u64) -> Vec<u8> {
        let mut h = FrameHdr::new(FrameKind::End);
        h.aux = total;
        let mut f = Vec::new();
        build_control(&mut f, h, &[]);
        f
    }

    #[test]
    fn a_corrupted_chunk_is_never_written() {
        let mut bad = data(1, 2);
        bad[HEADER_LEN + 10] ^= 1;
        let (res, out) = hostile(1, vec![(0, data(0, 1)), (0, bad), (0, data(2, 3)), (0, end(3))]);
        let err = res.expect_err("corruption");
        assert!(err.to_string().contains("checksum"), "{err}");
        assert!(out.iter().all(|&b| b == 1), "only verified bytes, in order, reached the output");
    }

    #[test]
    fn a_skipped_chunk_is_an_error_not_a_hang() {
        // Stream 0 carries 0, 2, 3, ...; stream 1 jumps ahead: chunk 1 never comes.
        let mut frames = vec![(0, data(0, 1))];
        for s in 2..200 {
            frames.push(((s % 2) as usize, data(s, 1)));
        }
        let (res, _) = hostile(2, frames);
        let err = res.expect_err("gap");
        assert!(err.to_string().contains("skipped"), "{err}");
    }

    #[test]
    fn duplicates_oversized_chunks_and_a_short_end_are_refused() {
        let (res, _) = hostile(2, vec![(0, data(0, 1)), (1, data(0, 1))]);
        assert!(res.expect_err("dup").to_string().contains("duplicated"));
        let (res, _) = hostile(1, vec![(0, data(0, 1)), (0, end(2))]);
        assert!(res.is_err(), "End announces a chunk that never came");
        let mut big = Vec::new();
        build_data(&mut big, 0, &vec![7u8; CHUNK + 1], false);
        let (res, out) = hostile(1, vec![(0, big)]);
        assert!(res.expect_err("big").to_string().contains("chunk of"));
        assert!(out.is_empty());
    }

    #[test]
    fn a_sender_that_vanishes_fails_the_receiver() {
        let (res, _) = hostile_with(2, vec![(0, data(0, 1))], true);
        let err = res.expect_err("vanished");
        assert!(matches!(err, MigrateError::Transport(_)), "{err}");
    }
}
