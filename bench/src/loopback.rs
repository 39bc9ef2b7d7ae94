//! One migration of a synthetic guest, source and destination in this
//! process, over the addresses given: loopback by default, or the links of
//! the multi-NIC testbed with each end in its own network namespace.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use pmigrate::{
    Acceptor, GuestMemory, Incoming, Progress, ReceiveOptions, Report, Source, SourceConfig, VmmBitmapTracker,
};

use crate::synth::{fill, start_mutators, ContentMix, MutatorConfig};

/// What to migrate and how.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Guest memory size, bytes.
    pub memory: u64,
    /// Page contents.
    pub mix: ContentMix,
    /// Dirtying while pre-copy runs (none: an idle guest).
    pub mutators: Option<MutatorConfig>,
    /// Streams.
    pub streams: u16,
    /// Engine settings (threads, compression, downtime target, …).
    pub config: SourceConfig,
    /// Where the destination listens (port 0: any); streams are spread over
    /// these addresses.
    pub listen: Vec<SocketAddr>,
    /// Local address or interface of each stream.
    pub via: Vec<pmigrate::Via>,
    /// Network namespaces of the source and destination threads.
    pub netns: Option<(String, String)>,
    /// How both ends authenticate (the same for both, as deployed).
    pub auth: pmigrate::Auth,
}

/// The benchmarks' default authentication: a fresh random pre-shared key,
/// as a deployment runs it.
pub fn fresh_key() -> pmigrate::Auth {
    pmigrate::Auth::Psk(pmigrate::Psk::generate().expect("system randomness"))
}

/// How long a benchmark's destination waits for its source's session: a
/// source that fails to connect or authenticate ends the run with its
/// error instead of leaving the destination waiting.
pub fn accept_deadline() -> Instant {
    Instant::now() + std::time::Duration::from_secs(60)
}

/// Both ends' reports of one run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    /// The source's report.
    pub source: Report,
    /// The destination's report.
    pub destination: Report,
    /// Seconds the fill took (not part of the migration).
    pub fill_secs: f64,
    /// CPU seconds (user + system) of this process, both ends together,
    /// from the session's start to its end.
    pub cpu_secs: f64,
}

/// CPU seconds (user + system) this process has used so far.
pub fn cpu_secs() -> f64 {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given; RUSAGE_SELF is a valid
    // target, and on success every field is initialised.
    let u = unsafe {
        if libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr()) != 0 {
            return 0.0;
        }
        u.assume_init()
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Runs `sc` once. Dirty pages are tracked through a VMM bitmap that the
/// mutators set, as a VMM's KVM dirty log would (it costs the source
/// nothing, like the real thing); the pause hook stops the mutators.
pub fn run(sc: &Scenario, seed: u64) -> anyhow::Result<Outcome> {
    run_watched(sc, seed, &|_| {})
}

/// [`run`], handing the source's live counters to `watch` (a progress bar)
/// when the migration starts; they are dropped when it ends.
pub fn run_watched(sc: &Scenario, seed: u64, watch: &(dyn Fn(Arc<Progress>) + Sync)) -> anyhow::Result<Outcome> {
    let src = Arc::new(GuestMemory::anonymous(sc.memory)?);
    let dst = GuestMemory::anonymous(sc.memory)?;
    let t = Instant::now();
    fill(&src, sc.mix, seed);
    // A destination VMM preallocates guest memory before the incoming
    // migration starts; do the same, so first-touch faults are not timed.
    dst.regions().iter().try_for_each(|r| r.populate())?;
    let fill_secs = t.elapsed().as_secs_f64();
    let cpu0 = cpu_secs();
    std::thread::scope(|s| -> anyhow::Result<Outcome> {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let dst = &dst;
        let rx = s.spawn(move || -> anyhow::Result<Report> {
            let acceptor = (|| {
                if let Some((_, ns)) = &sc.netns {
                    crate::netns::enter(ns)?;
                }
                Ok::<_, anyhow::Error>(Acceptor::bind(&sc.listen, sc.auth.clone())?)
            })();
            let acceptor = match acceptor {
                Ok(a) => a,
                Err(e) => {
                    let _ = addr_tx.send(None);
                    return Err(e);
                }
            };
            let _ = addr_tx.send(Some(acceptor.local_addrs()));
            let incoming = Incoming::accept_for(&acceptor, dst, Some(accept_deadline()))?;
            Ok(incoming.receive(dst, &ReceiveOptions { io: sc.config.io, ..ReceiveOptions::default() })?)
        });
        let Some(addrs) = addr_rx.recv()? else {
            return Err(rx.join().expect("destination thread").expect_err("bind failed"));
        };
        // The source runs on a thread of its own, so that entering its
        // namespace leaves the caller's thread where it was.
        let src = &src;
        let report = s
            .spawn(move || -> anyhow::Result<Report> {
                if let Some((ns, _)) = &sc.netns {
                    crate::netns::enter(ns)?;
                }
                let maps = VmmBitmapTracker::bitmaps_for(src);
                let source = Source::new(src, addrs, sc.auth.clone())
                    .streams(sc.streams)
                    .via(sc.via.clone())
                    .config(sc.config.clone())
                    .tracker(Box::new(VmmBitmapTracker::new(maps.clone())));
                watch(source.progress());
                let muts = sc.mutators.map(|m| start_mutators(src.clone(), m, Some(maps)));
                let muts = std::sync::Mutex::new(muts);
                Ok(source
                    .on_pause(|| {
                        if let Some(m) = muts.lock().expect("mutators").as_mut() {
                            m.stop();
                        }
                        Ok(())
                    })
                    .run()?)
            })
            .join()
            .expect("source thread");
        let dest = rx.join().expect("destination thread");
        let source = report?;
        Ok(Outcome { source, destination: dest?, fill_secs, cpu_secs: cpu_secs() - cpu0 })
    })
}

/// One zero-copy switchover: a shared region of `bytes` (a sparse file in
/// `dir`, which must be on a shared-memory filesystem such as /dev/shm)
/// that both ends map, migrated over loopback with an idle guest. With
/// `copy`, the destination maps a different file, so the region takes the
/// copy path instead, for comparison.
pub fn zero_copy_switchover(dir: &std::path::Path, bytes: u64, copy: bool) -> anyhow::Result<Report> {
    use pmigrate::{Gpa, GuestRegion, HostPageSize};
    let path = dir.join(format!("zc-{}-{bytes}.mem", std::process::id()));
    let other = dir.join(format!("zc-{}-{bytes}.other", std::process::id()));
    let src = GuestMemory::new(vec![GuestRegion::file(Gpa(0), bytes, HostPageSize::Small, &path, true, true)?])?;
    // A few pages of content, so the handshake's sampled hashes mean something.
    for p in [0, bytes / 4096 / 2, bytes / 4096 - 1] {
        src.regions()[0].write_u64(p * 4096, 0x5eed_0000 + p)?;
    }
    let dst_path = if copy { &other } else { &path };
    let dst = GuestMemory::new(vec![GuestRegion::file(Gpa(0), bytes, HostPageSize::Small, dst_path, true, copy)?])?;
    let key = fresh_key();
    let acceptor = Acceptor::bind(&["127.0.0.1:0".parse()?], key.clone())?;
    let addr = acceptor.local_addrs()[0];
    let res = std::thread::scope(|s| -> anyhow::Result<Report> {
        let dst = &dst;
        let rx = s.spawn(move || -> anyhow::Result<Report> {
            let incoming = Incoming::accept_for(&acceptor, dst, Some(accept_deadline()))?;
            Ok(incoming.receive(dst, &ReceiveOptions::default())?)
        });
        let maps = VmmBitmapTracker::bitmaps_for(&src);
        let report = Source::new(&src, vec![addr], key).streams(4).tracker(Box::new(VmmBitmapTracker::new(maps))).run();
        rx.join().expect("destination thread")?;
        Ok(report?)
    });
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&other);
    res
}
