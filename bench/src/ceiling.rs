//! The physical ceiling of a path: raw multi-stream TCP, nothing else.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::Instant;

use pmigrate::transport::net::{connect, listen};
use rand::{RngCore, SeedableRng};

/// Bytes per second that `streams` plain TCP streams move from this host to
/// a receiver listening on `listen_addr` (on this host), `bytes` in all,
/// with the same socket tuning as pmigrate's streams.
pub fn raw_tcp(listen_addr: SocketAddr, streams: usize, bytes: u64) -> anyhow::Result<f64> {
    let listener: TcpListener = listen(listen_addr)?;
    let addr = listener.local_addr()?;
    let per = bytes / streams as u64;
    let mut buf = vec![0u8; 1 << 20];
    rand::rngs::SmallRng::seed_from_u64(1).fill_bytes(&mut buf);
    let t = std::thread::scope(|s| -> anyhow::Result<f64> {
        let rx = s.spawn(|| -> anyhow::Result<()> {
            let mut conns = Vec::new();
            for _ in 0..streams {
                conns.push(listener.accept()?.0);
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
        let conns: Vec<_> =
            (0..streams).map(|_| connect(addr, None, std::time::Duration::from_secs(5))).collect::<Result<_, _>>()?;
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
        rx.join().expect("receiver")?;
        Ok(t0.elapsed().as_secs_f64())
    })?;
    Ok((per * streams as u64) as f64 / t)
}
