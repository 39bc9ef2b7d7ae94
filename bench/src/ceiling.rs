//! The physical ceiling of a path: raw multi-stream TCP, nothing else.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::Instant;

use pmigrate_transport::net::{connect, listen};
use rand::{RngCore, SeedableRng};

/// Where the ceiling is measured: the destination's listening addresses
/// (stream `i` goes to `listen[i % len]`), the source's local side of each
/// stream, and the namespaces of the two ends.
#[derive(Clone, Debug, Default)]
pub struct Path {
    /// Listening addresses (port 0: any).
    pub listen: Vec<SocketAddr>,
    /// Local side of stream `i`: `via[i % len]`.
    pub via: Vec<pmigrate::Via>,
    /// Network namespaces of source and destination.
    pub netns: Option<(String, String)>,
}

/// A raw TCP measurement.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Ceiling {
    /// Bytes per second, all streams together.
    pub bytes_per_sec: f64,
    /// CPU seconds of this process (both ends) per GiB moved.
    pub cpu_secs_per_gib: f64,
}

/// Where raw TCP reads from and writes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ends {
    /// One 1 MiB buffer at each end, reused: the sockets' cost alone.
    Buffers,
    /// Memory to memory: the sender reads `bytes` of filled memory once,
    /// the receiver writes them into `bytes` of fresh anonymous memory,
    /// each stream its own slice. What the kernel itself spends to move
    /// a guest's memory into a new process, page faults included — the
    /// floor of any migration's CPU per GiB.
    Memory,
}

/// Bytes per second that `streams` plain TCP streams move over `path`,
/// `bytes` in all, with the same socket tuning as pmigrate's streams.
pub fn raw_tcp(path: &Path, streams: usize, bytes: u64) -> anyhow::Result<Ceiling> {
    raw_tcp_between(path, streams, bytes, Ends::Buffers)
}

/// [`raw_tcp`], between the given ends.
pub fn raw_tcp_between(path: &Path, streams: usize, bytes: u64, ends: Ends) -> anyhow::Result<Ceiling> {
    let (tx, rx) = std::sync::mpsc::channel();
    let per = bytes / streams as u64;
    let span = if ends == Ends::Memory { per as usize } else { 1 << 20 };
    // The source's memory is filled before the clock starts, the
    // destination's is left untouched (a zeroed allocation this size is a
    // fresh mapping).
    let total = span * if ends == Ends::Memory { streams } else { 1 };
    let mut source = vec![0u8; total];
    rand::rngs::SmallRng::seed_from_u64(1).fill_bytes(&mut source);
    let mut dest = vec![0u8; total];
    let (source, dest) = (&source, &mut dest);
    let cpu0 = crate::loopback::cpu_secs();
    let t = std::thread::scope(|s| -> anyhow::Result<f64> {
        let receiver = s.spawn(move || -> anyhow::Result<()> {
            if let Some((_, ns)) = &path.netns {
                crate::netns::enter(ns)?;
            }
            let listeners: Vec<TcpListener> = path.listen.iter().map(|a| listen(*a)).collect::<Result<_, _>>()?;
            let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr()).collect::<Result<_, _>>()?;
            let _ = tx.send(addrs);
            let mut conns = Vec::new();
            for i in 0..streams {
                conns.push(listeners[i % listeners.len()].accept()?.0);
            }
            std::thread::scope(|s2| {
                let slices: Vec<&mut [u8]> = match ends {
                    Ends::Memory => dest.chunks_mut(span).collect(),
                    Ends::Buffers => Vec::new(),
                };
                let mut slices = slices.into_iter();
                for mut c in conns {
                    let own = slices.next();
                    s2.spawn(move || match own {
                        // Each byte lands once in its place, as a
                        // migration's pages do.
                        Some(b) => {
                            let _ = c.read_exact(b);
                        }
                        None => {
                            let mut b = vec![0u8; 1 << 20];
                            while matches!(c.read(&mut b), Ok(n) if n > 0) {}
                        }
                    });
                }
            });
            Ok(())
        });
        let addrs = rx.recv().map_err(|_| anyhow::anyhow!("the ceiling receiver failed to listen"))?;
        let sender = s.spawn(move || -> anyhow::Result<Instant> {
            if let Some((ns, _)) = &path.netns {
                crate::netns::enter(ns)?;
            }
            let via = |i: usize| (!path.via.is_empty()).then(|| &path.via[i % path.via.len()]);
            let conns: Vec<_> = (0..streams)
                .map(|i| connect(addrs[i % addrs.len()], via(i), std::time::Duration::from_secs(5)))
                .collect::<Result<_, _>>()?;
            let t0 = Instant::now();
            std::thread::scope(|s2| {
                for (i, mut c) in conns.into_iter().enumerate() {
                    let from = match ends {
                        Ends::Memory => &source[i * span..(i + 1) * span],
                        Ends::Buffers => &source[..],
                    };
                    s2.spawn(move || {
                        let mut left = per;
                        let mut at = 0;
                        while left > 0 {
                            let n = left.min((from.len() - at) as u64) as usize;
                            if c.write_all(&from[at..at + n]).is_err() {
                                break;
                            }
                            at = (at + n) % from.len();
                            left -= n as u64;
                        }
                        let _ = c.shutdown(std::net::Shutdown::Write);
                    });
                }
            });
            Ok(t0)
        });
        let t0 = sender.join().expect("sender")?;
        // Timed until the receiver has read the last byte.
        receiver.join().expect("receiver")?;
        Ok(t0.elapsed().as_secs_f64())
    })?;
    let moved = (per * streams as u64) as f64;
    let cpu = crate::loopback::cpu_secs() - cpu0;
    Ok(Ceiling { bytes_per_sec: moved / t, cpu_secs_per_gib: cpu / (moved / (1u64 << 30) as f64) })
}

/// Bytes per second `threads` threads copy from one buffer to another
/// (each thread its own slice; `bytes` per side in all): the ceiling of a
/// data plane that must copy every page out of guest memory once.
pub fn memory_copy(bytes: usize, threads: usize) -> f64 {
    let threads = threads.max(1);
    let src = vec![0x5au8; bytes];
    let mut dst = vec![0u8; bytes];
    // Touch the destination first so page faults are not timed.
    dst.iter_mut().step_by(4096).for_each(|b| *b = 1);
    let per = bytes.div_ceil(threads);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for (d, from) in dst.chunks_mut(per).zip(src.chunks(per)) {
            s.spawn(move || d.copy_from_slice(from));
        }
    });
    bytes as f64 / t0.elapsed().as_secs_f64()
}
