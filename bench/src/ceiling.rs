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

/// Bytes per second that `streams` plain TCP streams move over `path`,
/// `bytes` in all, with the same socket tuning as pmigrate's streams.
pub fn raw_tcp(path: &Path, streams: usize, bytes: u64) -> anyhow::Result<Ceiling> {
    let (tx, rx) = std::sync::mpsc::channel();
    let cpu0 = crate::loopback::cpu_secs();
    let per = bytes / streams as u64;
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
                for mut c in conns {
                    s2.spawn(move || {
                        let mut b = vec![0u8; 1 << 20];
                        while matches!(c.read(&mut b), Ok(n) if n > 0) {}
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
            let mut buf = vec![0u8; 1 << 20];
            rand::rngs::SmallRng::seed_from_u64(1).fill_bytes(&mut buf);
            let t0 = Instant::now();
            std::thread::scope(|s2| {
                for mut c in conns {
                    let buf = &buf;
                    s2.spawn(move || {
                        let mut left = per;
                        while left > 0 {
                            let n = left.min(buf.len() as u64) as usize;
                            if c.write_all(&buf[..n]).is_err() {
                                break;
                            }
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
