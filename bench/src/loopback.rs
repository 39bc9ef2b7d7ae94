//! One migration of a synthetic guest, source and destination in this
//! process, over the addresses given (loopback by default).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use pmigrate::{Acceptor, GuestMemory, Incoming, ReceiveOptions, Report, Source, SourceConfig, VmmBitmapTracker};

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
    /// Where the destination listens (port 0: any).
    pub listen: Vec<SocketAddr>,
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
    let src = Arc::new(GuestMemory::anonymous(sc.memory)?);
    let dst = GuestMemory::anonymous(sc.memory)?;
    let t = Instant::now();
    fill(&src, sc.mix, seed);
    // A destination VMM preallocates guest memory before the incoming
    // migration starts; do the same, so first-touch faults are not timed.
    dst.regions().iter().try_for_each(|r| r.populate())?;
    let fill_secs = t.elapsed().as_secs_f64();
    let acceptor = Acceptor::bind(&sc.listen)?;
    let addrs = acceptor.local_addrs();
    let cpu0 = cpu_secs();
    std::thread::scope(|s| -> anyhow::Result<Outcome> {
        let rx = s.spawn(|| -> anyhow::Result<Report> {
            let incoming = Incoming::accept_for(&acceptor, &dst, None)?;
            Ok(incoming.receive(&dst, &ReceiveOptions::default())?)
        });
        let maps = VmmBitmapTracker::bitmaps_for(&src);
        let source = Source::new(&src, addrs)
            .streams(sc.streams)
            .config(sc.config.clone())
            .tracker(Box::new(VmmBitmapTracker::new(maps.clone())));
        let muts = sc.mutators.map(|m| start_mutators(src.clone(), m, Some(maps)));
        let muts = std::sync::Mutex::new(muts);
        let report = source
            .on_pause(|| {
                if let Some(m) = muts.lock().expect("mutators").as_mut() {
                    m.stop();
                }
                Ok(())
            })
            .run();
        let dest = rx.join().expect("destination thread");
        let source = report?;
        Ok(Outcome { source, destination: dest?, fill_secs, cpu_secs: cpu_secs() - cpu0 })
    })
}
