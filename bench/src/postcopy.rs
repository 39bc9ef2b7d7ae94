//! Post-copy against pre-copy on the same busy guest, over loopback: time
//! until the guest runs at the destination, total time, bytes, and the
//! fault latency its guest sees, beside the raw userfaultfd round trip
//! measured in the same run.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pmigrate::{Acceptor, GuestMemory, Incoming, PageIdx, ReceiveOptions, Report, Source, SourceConfig};
use pmigrate::{PageRange, RegionIdx};
use pmigrate::{VmmBitmapTracker, PAGE_SIZE};

use crate::loopback::accept_deadline;
use crate::synth::{fill, start_mutators, ContentMix, MutatorConfig};

/// One migration to compare.
#[derive(Clone, Debug)]
pub struct Case {
    /// Guest memory, bytes.
    pub memory: u64,
    /// Page contents.
    pub mix: ContentMix,
    /// Dirtying at the source until the pause.
    pub mutators: Option<MutatorConfig>,
    /// Streams (post-copy adds its priority stream).
    pub streams: u16,
    /// Engine settings.
    pub config: SourceConfig,
    /// `None`: pre-copy; `Some(n)`: post-copy after `n` pre-copy rounds.
    pub postcopy: Option<u32>,
    /// Report the upper half of guest memory free.
    pub half_free: bool,
    /// A guest at the destination touching pages at random from the moment
    /// it may run until the migration is over.
    pub dest_guest: bool,
}

/// What one case measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Measured {
    /// The source's report.
    pub source: Report,
    /// The destination's report.
    pub destination: Report,
    /// Seconds from the start until the guest could run at the destination
    /// (pre-copy: the whole migration).
    pub runnable_secs: f64,
    /// Pages the destination's guest touched before the migration ended.
    pub guest_touches: u64,
}

/// Runs one case over loopback.
pub fn run(c: &Case, seed: u64) -> anyhow::Result<Measured> {
    let src = Arc::new(GuestMemory::anonymous(c.memory)?);
    let dst = GuestMemory::anonymous(c.memory)?;
    fill(&src, c.mix, seed);
    let key = crate::loopback::fresh_key();
    let acceptor = Acceptor::bind(&["127.0.0.1:0".parse()?], key.clone())?;
    let addr = acceptor.local_addrs()[0];
    let pages = c.memory / PAGE_SIZE as u64;
    let free = if c.half_free {
        vec![PageRange { region: RegionIdx(0), start: PageIdx(pages / 2), end: PageIdx(pages) }]
    } else {
        Vec::new()
    };
    let running = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    let t0 = Instant::now();
    std::thread::scope(|s| -> anyhow::Result<Measured> {
        let (dst, running, done) = (&dst, &running, &done);
        let guest = c.dest_guest.then(|| {
            s.spawn(move || {
                while !running.load(Ordering::Acquire) {
                    if done.load(Ordering::Acquire) {
                        return 0;
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                let r = &dst.regions()[0];
                let (mut x, mut n) = (0x2545_f491_4f6c_dd1du64, 0u64);
                while !done.load(Ordering::Acquire) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let at = (x % r.pages()) * PAGE_SIZE as u64;
                    let v = r.read_u64(at).expect("in bounds");
                    r.write_u64(at + 8, v ^ n).expect("in bounds");
                    n += 1;
                }
                n
            })
        });
        let rx = s.spawn(move || -> anyhow::Result<Report> {
            let incoming = Incoming::accept_for(&acceptor, dst, Some(accept_deadline()))?;
            let r = incoming.receive_and_run(dst, &ReceiveOptions::default(), || {
                running.store(true, Ordering::Release);
                Ok(())
            });
            done.store(true, Ordering::Release);
            Ok(r?)
        });
        let maps = VmmBitmapTracker::bitmaps_for(&src);
        let mut m = c.mutators.map(|m| start_mutators(src.clone(), m, Some(maps.clone())));
        let mut source = Source::new(&src, vec![addr], key)
            .streams(c.streams)
            .config(c.config.clone())
            .tracker(Box::new(VmmBitmapTracker::new(maps)))
            .free_pages(free);
        if let Some(n) = c.postcopy {
            source = source.postcopy(n);
        }
        let report = source
            .on_pause(|| {
                if let Some(m) = m.as_mut() {
                    m.stop();
                }
                Ok(())
            })
            .run();
        let dest = rx.join().expect("destination thread");
        let touches = guest.map_or(0, |g| g.join().expect("guest thread"));
        let (source, destination) = (report?, dest?);
        let runnable_secs = match &source.postcopy {
            Some(p) => p.runnable_secs,
            None => t0.elapsed().as_secs_f64().min(source.total_secs),
        };
        Ok(Measured { source, destination, runnable_secs, guest_touches: touches })
    })
}

/// The raw userfaultfd round trip over `pages` pages (see
/// [`pmigrate::raw_fault_round_trip`]).
pub fn raw_round_trip(pages: u64) -> anyhow::Result<pmigrate::LatencySummary> {
    pmigrate::raw_fault_round_trip(pages).map_err(|e| anyhow::anyhow!(e))
}

/// The network's share of a fault's wait: `n` round trips of a 40-byte
/// request and a 4 KiB answer over loopback TCP, between two threads,
/// measured with `TCP_NODELAY` as the streams use it.
pub fn tcp_round_trip(n: u32) -> anyhow::Result<pmigrate::LatencySummary> {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = l.accept()?;
        s.set_nodelay(true)?;
        let (mut req, page) = ([0u8; 40], vec![7u8; PAGE_SIZE]);
        while s.read_exact(&mut req).is_ok() {
            s.write_all(&page)?;
        }
        Ok(())
    });
    let mut c = std::net::TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    let mut h = pmigrate::LatencySummary::histogram();
    let mut page = vec![0u8; PAGE_SIZE];
    for _ in 0..n {
        let t = Instant::now();
        c.write_all(&[1u8; 40])?;
        c.read_exact(&mut page)?;
        h.saturating_record(t.elapsed().as_micros().max(1) as u64);
    }
    drop(c);
    echo.join().expect("echo thread")?;
    pmigrate::LatencySummary::of(&h).ok_or_else(|| anyhow::anyhow!("no round trips"))
}
