//! `pmigrate bench`: the embedded default job, and the sweeps behind
//! `docs/benchmarks.md`.
//!
//! Every figure is measured in the same run as what it is compared with:
//! the raw TCP ceiling of the same path just before, and the classic data
//! plane (one thread, one stream, no compression) beside pmigrate.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, Result};
use clap::Args;
use pmigrate::{BackendChoice, Compression, SourceConfig, TrackerKind, Via};
use pmigrate_bench::ceiling;
use pmigrate_bench::loopback::{self, Scenario};
use pmigrate_bench::synth::{ContentMix, MutatorConfig, Skew};

/// Options of `pmigrate bench`.
#[derive(Args)]
pub struct BenchArgs {
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1024)]
    memory_mib: u64,
    /// Page mix, e.g. `typical` or `random=100` (the rest is zero pages).
    #[arg(long, default_value = "typical")]
    mix: ContentMix,
    /// Streams of the pmigrate run.
    #[arg(long, default_value_t = 4)]
    streams: u16,
    /// Worker threads of the pmigrate run (default: the cores, at most 4).
    #[arg(long, default_value_t = crate::default_threads())]
    threads: usize,
    /// lz4 of the pmigrate run: auto, lz4, none.
    #[arg(long, default_value = "auto")]
    compress: Compression,
    /// Dirty rate while migrating, MiB/s (0: idle guest).
    #[arg(long, default_value_t = 0)]
    dirty_mib_s: u64,
    /// Destination addresses to listen on (port 0: any); streams are
    /// spread over them. Default: 127.0.0.1:0.
    #[arg(long, value_delimiter = ',')]
    listen: Vec<SocketAddr>,
    /// Local address or interface of each stream, comma-separated.
    #[arg(long, value_delimiter = ',')]
    via: Vec<Via>,
    /// Run the source and destination in these network namespaces, as
    /// SRC:DST (see tools/testbed.sh).
    #[arg(long)]
    netns: Option<String>,
    /// Extra runs as THREADSxSTREAMS, comma-separated (e.g. `1x1,2x2,4x4`),
    /// with the configured compression.
    #[arg(long, value_delimiter = ',')]
    matrix: Vec<String>,
    /// Sweep threads × streams × links × dirty rate and print CSV: links
    /// are the first 1, 2, … of the --listen/--via addresses; dirty rates
    /// are 0 and --dirty-mib-s.
    #[arg(long)]
    sweep: bool,
    /// Zero-copy switchover instead: shared regions of these sizes in GiB
    /// (sparse files in /dev/shm), e.g. `1,4,16,64`, each also through the
    /// copy path when it fits in memory (`--copy-max-gib`).
    #[arg(long, value_delimiter = ',')]
    zero_copy_gib: Vec<u64>,
    /// Post-copy against pre-copy instead, on the same busy guest
    /// (`--dirty-mib-s`, default 256 when 0): time until the destination
    /// runs, total time, bytes, fault latency against the raw userfaultfd
    /// round trip, and the bytes free-page hints save.
    #[arg(long)]
    postcopy: bool,
    /// The I/O backends against each other instead: portable and io_uring,
    /// 1 and 4 streams, over the path given (loopback, or --listen/--via
    /// /--netns); throughput and CPU seconds per GiB of each.
    #[arg(long)]
    io_compare: bool,
    /// Authentication compared instead: the handshake's time with no
    /// authentication, a pre-shared key and mutual TLS, then the migration
    /// with a pre-shared key against TLS over the path given, with CPU
    /// seconds per GiB of each.
    #[arg(long)]
    auth_compare: bool,
    /// Compression compared instead: the same migration with lz4 off, on
    /// and `auto`, alternating, twice each, over the path given; how close
    /// `auto` comes to the better of the other two.
    #[arg(long)]
    compress_compare: bool,
    /// I/O backend of the pmigrate runs: auto, uring or portable.
    #[arg(long, default_value = "auto")]
    io: BackendChoice,
    /// With io_uring: send whole raw page batches zero-copy (SEND_ZC) from
    /// a registered arena.
    #[arg(long)]
    zero_copy_send: bool,
    /// Largest region also migrated through the copy path for comparison.
    #[arg(long, default_value_t = 4)]
    copy_max_gib: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(serde::Serialize)]
struct Row {
    name: String,
    threads: usize,
    streams: u16,
    links: usize,
    dirty_mib_s: u64,
    compression: String,
    io: String,
    total_secs: f64,
    downtime_ms: f64,
    rounds: usize,
    converged: bool,
    wire_mib: f64,
    payload_mib: f64,
    throughput_mib_s: f64,
    /// Page data over the time from the first round's start to the
    /// destination's verification: the engine's transfer rate.
    transfer_mib_s: f64,
    /// CPU seconds of the whole process (source and destination) per GiB
    /// of guest memory.
    cpu_secs_per_gib: f64,
    batch_p50_us: u64,
    batch_p99_us: u64,
    per_stream_mib_s: Vec<f64>,
}

struct Plan {
    listen: Vec<SocketAddr>,
    via: Vec<Via>,
    netns: Option<(String, String)>,
    /// How both ends authenticate: a fresh pre-shared key unless compared.
    auth: pmigrate::Auth,
}

impl Plan {
    /// The first `links` addresses of each list.
    fn links(&self, links: usize) -> (Vec<SocketAddr>, Vec<Via>) {
        let cut = |n: usize| n.min(links).max(1);
        (self.listen[..cut(self.listen.len())].to_vec(), self.via[..self.via.len().min(links)].to_vec())
    }
}

const MIB: f64 = (1 << 20) as f64;

#[allow(clippy::too_many_arguments)]
fn measure(
    a: &BenchArgs,
    plan: &Plan,
    name: &str,
    threads: usize,
    streams: u16,
    links: usize,
    dirty_mib_s: u64,
    compression: Compression,
    io: BackendChoice,
    zero_copy_send: bool,
) -> Result<Row> {
    let memory = a.memory_mib << 20;
    let (listen, via) = plan.links(links);
    say!(
        "migrating {} MiB: {name}, {threads} threads x {streams} streams, {links} links, {dirty_mib_s} MiB/s dirty...",
        a.memory_mib
    );
    let sc = Scenario {
        memory,
        mix: a.mix,
        mutators: (dirty_mib_s > 0).then_some(MutatorConfig {
            threads: 1,
            rate: dirty_mib_s << 20,
            working_set: memory / 2,
            skew: Skew::HotCold { hot_pct: 80, hot_share: 20 },
        }),
        streams,
        config: SourceConfig {
            threads,
            compression,
            tracker: TrackerKind::Hash,
            max_rounds: 30,
            downtime_target: Duration::from_millis(300),
            io,
            zero_copy_send,
            ..SourceConfig::default()
        },
        listen,
        via,
        netns: plan.netns.clone(),
        auth: plan.auth.clone(),
    };
    let bar = std::sync::Mutex::new(None);
    let o = loopback::run_watched(&sc, 7, &|p| *bar.lock().expect("bar") = crate::memfile::progress_bar(p));
    if let Some(b) = bar.lock().expect("bar").take() {
        let _ = b.join();
    }
    let o = o?;
    let s = &o.source;
    Ok(Row {
        name: name.to_string(),
        threads,
        streams,
        links,
        dirty_mib_s,
        compression: format!("{compression:?}").to_lowercase(),
        io: s.io.clone(),
        total_secs: s.total_secs,
        downtime_ms: s.downtime_secs * 1e3,
        rounds: s.rounds.len(),
        converged: s.converged,
        wire_mib: s.wire_bytes as f64 / MIB,
        payload_mib: s.payload_bytes as f64 / MIB,
        throughput_mib_s: memory as f64 / MIB / s.total_secs,
        transfer_mib_s: s.payload_rate() / MIB,
        cpu_secs_per_gib: o.cpu_secs / (a.memory_mib as f64 / 1024.0),
        batch_p50_us: s.batch_latency.as_ref().map_or(0, |l| l.p50_us),
        batch_p99_us: s.batch_latency.as_ref().map_or(0, |l| l.p99_us),
        per_stream_mib_s: s.streams.iter().map(|st| st.bytes_per_sec / MIB).collect(),
    })
}

pub fn run(a: BenchArgs) -> Result<()> {
    let netns = match &a.netns {
        None => None,
        Some(s) => {
            let (src, dst) = s.split_once(':').ok_or_else(|| anyhow!("--netns takes SRC:DST"))?;
            Some((src.to_string(), dst.to_string()))
        }
    };
    let listen = if a.listen.is_empty() { vec!["127.0.0.1:0".parse()?] } else { a.listen.clone() };
    let plan = Plan { listen, via: a.via.clone(), netns, auth: pmigrate_bench::loopback::fresh_key() };
    if a.sweep {
        return sweep(&a, &plan);
    }
    if !a.zero_copy_gib.is_empty() {
        return zero_copy(&a);
    }
    if a.postcopy {
        return postcopy(&a);
    }
    if a.io_compare {
        return io_compare(&a, &plan);
    }
    if a.auth_compare {
        return auth_compare(&a, plan);
    }
    if a.compress_compare {
        return compress_compare(&a, &plan);
    }
    let path = ceiling::Path { listen: plan.listen.clone(), via: plan.via.clone(), netns: plan.netns.clone() };
    say!("measuring raw TCP over the same path ({} streams)...", a.streams);
    let ceiling = ceiling::raw_tcp(&path, a.streams as usize, (a.memory_mib << 20).min(1 << 30))?;
    let raw = ceiling.bytes_per_sec / MIB;
    // The kernel's own cost of moving memory into fresh memory: the floor
    // of the CPU column.
    let floor =
        ceiling::raw_tcp_between(&path, a.streams as usize, (a.memory_mib << 20).min(1 << 30), ceiling::Ends::Memory)?;
    let memcpy = ceiling::memory_copy(256 << 20, a.threads) / MIB;
    let links = plan.listen.len().max(plan.via.len());
    let mut rows = vec![
        measure(
            &a,
            &plan,
            "classic (1 thread, 1 stream, no lz4)",
            1,
            1,
            links,
            a.dirty_mib_s,
            Compression::Off,
            a.io,
            false,
        )?,
        measure(&a, &plan, "pmigrate", a.threads, a.streams, links, a.dirty_mib_s, a.compress, a.io, a.zero_copy_send)?,
    ];
    for m in &a.matrix {
        let (t, s) = m.split_once('x').ok_or_else(|| anyhow!("{m:?}: expected THREADSxSTREAMS"))?;
        let (t, s) = (t.parse()?, s.parse()?);
        rows.push(measure(&a, &plan, "pmigrate", t, s, links, a.dirty_mib_s, a.compress, a.io, a.zero_copy_send)?);
    }
    if a.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "memory_mib": a.memory_mib,
                "mix": a.mix,
                "raw_tcp_mib_s": raw,
                "raw_tcp_cpu_secs_per_gib": ceiling.cpu_secs_per_gib,
                "raw_tcp_memory_to_memory_mib_s": floor.bytes_per_sec / MIB,
                "raw_tcp_memory_to_memory_cpu_secs_per_gib": floor.cpu_secs_per_gib,
                "memory_copy_mib_s": memcpy,
                "runs": rows,
            }))?
        );
        return Ok(());
    }
    outln!(
        "migration of {} MiB ({:?}) to {:?}{}; raw TCP with {} streams: {:.0} MiB/s, {:.2} CPU s/GiB \
         (memory into fresh memory: {:.0} MiB/s, {:.2} CPU s/GiB); memory copy with {} threads: {:.0} MiB/s",
        a.memory_mib,
        a.mix,
        plan.listen,
        a.netns.as_ref().map(|n| format!(" (namespaces {n})")).unwrap_or_default(),
        a.streams,
        raw,
        ceiling.cpu_secs_per_gib,
        floor.bytes_per_sec / MIB,
        floor.cpu_secs_per_gib,
        a.threads,
        memcpy
    );
    outln!(
        "{:<10} {:>5} {:>8} {:>10} {:>6} {:>9} {:>9} {:>11} {:>7} {:>9} {:>9} {:>10}",
        "run",
        "TxS",
        "total s",
        "downtime",
        "rounds",
        "wire MiB",
        "data MiB",
        "xfer MiB/s",
        "vs TCP",
        "cpu s/GiB",
        "p99 batch",
        "vs classic"
    );
    let base = rows[0].total_secs;
    for r in &rows {
        outln!(
            "{:<10} {:>5} {:>8.3} {:>8.1}ms {:>6} {:>9.1} {:>9.1} {:>11.0} {:>6.2}x {:>9.2} {:>7}us {:>9.2}x",
            if r.name.starts_with("classic") { "classic" } else { "pmigrate" },
            format!("{}x{}", r.threads, r.streams),
            r.total_secs,
            r.downtime_ms,
            r.rounds,
            r.wire_mib,
            r.payload_mib,
            r.transfer_mib_s,
            r.transfer_mib_s / raw,
            r.cpu_secs_per_gib,
            r.batch_p99_us,
            base / r.total_secs
        );
    }
    outln!(
        "(classic: 1 thread, 1 stream, no lz4. xfer: page data from the first round to verification; vs TCP: against raw \
         TCP with {} streams over the same path, measured just before; cpu: both ends in one process, per GiB of guest \
         memory; p99 batch: a frame sealed to its last byte handed to the kernel)",
        a.streams
    );
    if plan.listen.iter().all(|l| l.ip().is_loopback()) {
        outln!(
            "(loopback: both ends share this machine's {} cores, so the CPU, not a link, is the limit and lz4 competes with the receiver for it; tools/testbed.sh builds rate-limited links, see docs/benchmarks.md)",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        );
    }
    Ok(())
}

/// Portable against io_uring, 1 and 4 streams, on one path, in one run:
/// the transfer rate and the CPU both ends spend per GiB.
fn io_compare(a: &BenchArgs, plan: &Plan) -> Result<()> {
    use pmigrate_transport::backend::probe_uring;
    if let Err(why) = probe_uring() {
        anyhow::bail!("io_uring is not usable here, nothing to compare: {why}");
    }
    let links = plan.listen.len().max(plan.via.len());
    let path = ceiling::Path { listen: plan.listen.clone(), via: plan.via.clone(), netns: plan.netns.clone() };
    let mut out = Vec::new();
    for streams in [1u16, 4] {
        say!("measuring raw TCP over the same path ({streams} streams)...");
        let raw = ceiling::raw_tcp(&path, streams as usize, (a.memory_mib << 20).min(1 << 30))?;
        let mut pair = Vec::new();
        for (io, zc) in [(BackendChoice::Portable, false), (BackendChoice::Uring, false), (BackendChoice::Uring, true)]
        {
            if zc && !probe_uring().is_ok_and(|s| s.send_zc) {
                continue;
            }
            pair.push(measure(a, plan, "pmigrate", a.threads, streams, links, 0, a.compress, io, zc)?);
        }
        out.push((streams, raw, pair));
    }
    if a.json {
        let rows: Vec<_> = out
            .iter()
            .map(|(s, raw, pair)| {
                serde_json::json!({
                    "streams": s,
                    "raw_tcp_mib_s": raw.bytes_per_sec / MIB,
                    "raw_tcp_cpu_secs_per_gib": raw.cpu_secs_per_gib,
                    "runs": pair,
                })
            })
            .collect();
        outln!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "memory_mib": a.memory_mib, "mix": a.mix, "by_streams": rows })
            )?
        );
        return Ok(());
    }
    outln!(
        "I/O backends, {} MiB ({:?}, lz4 {:?}) to {:?}{}, {} threads; both ends in this process",
        a.memory_mib,
        a.mix,
        a.compress,
        plan.listen,
        a.netns.as_ref().map(|n| format!(" (namespaces {n})")).unwrap_or_default(),
        a.threads
    );
    outln!(
        "{:>7} {:<26} {:>11} {:>10} {:>12} {:>13} {:>14}",
        "streams",
        "backend",
        "xfer MiB/s",
        "cpu s/GiB",
        "GiB per CPU s",
        "vs portable",
        "raw TCP MiB/s"
    );
    for (streams, raw, pair) in &out {
        let base = &pair[0];
        for r in pair {
            outln!(
                "{:>7} {:<26} {:>11.0} {:>10.2} {:>12.2} {:>6.2}x / {:.2}x {:>11.0}",
                streams,
                r.io,
                r.transfer_mib_s,
                r.cpu_secs_per_gib,
                1.0 / r.cpu_secs_per_gib,
                r.transfer_mib_s / base.transfer_mib_s,
                base.cpu_secs_per_gib / r.cpu_secs_per_gib,
                raw.bytes_per_sec / MIB
            );
        }
    }
    outln!(
        "(vs portable: transfer rate, then work per CPU second (portable's cpu s/GiB over this one's); cpu: user + sys \
         of both ends per GiB of guest memory, io_uring's kernel workers included)"
    );
    Ok(())
}

/// Times `n` sessions of `streams` streams opened against an acceptor on
/// loopback (connect, TLS, authentication, `Hello`, `Welcome`); returns the
/// times sorted.
fn handshake_times(auth: &pmigrate::Auth, streams: u16, n: usize) -> Result<Vec<Duration>> {
    use pmigrate_transport::hello::{Hello, Mode, PROTOCOL_VERSION};
    use pmigrate_transport::session::{connect_session, new_session_id, StreamPlan};
    let acceptor = pmigrate::Acceptor::bind(&["127.0.0.1:0".parse()?], auth.clone())?;
    let addr = acceptor.local_addrs()[0];
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let deadline = Some(std::time::Instant::now() + Duration::from_millis(200));
                let _ = acceptor.accept_session(Mode::Stream, &mut |h| Ok(h.caps), deadline);
            }
        });
        let plan = StreamPlan::new(vec![addr], streams, auth.clone());
        let mut times = Vec::with_capacity(n);
        for _ in 0..n {
            let hello = Hello {
                version: PROTOCOL_VERSION,
                mode: Mode::Stream,
                stream_index: 0,
                stream_count: streams,
                session: new_session_id(),
                caps: 0,
                regions: Vec::new(),
                extensions: Vec::new(),
            };
            let t = std::time::Instant::now();
            let session = connect_session(&plan, &hello);
            times.push(t.elapsed());
            drop(session?);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        times.sort();
        Ok(times)
    })
}

fn auth_compare(a: &BenchArgs, mut plan: Plan) -> Result<()> {
    use pmigrate::Auth;
    let dir = std::env::temp_dir().join(format!("pmigrate-bench-pki-{}", std::process::id()));
    pmigrate_transport::tls::test_pki::write_pki(&dir)?;
    // The test certificates name "localhost": the name to expect whatever
    // address is dialled (a testbed's included), as `--tls-name` does.
    let tls = |who: &str| {
        let mut cfg = pmigrate_transport::tls::test_pki::config(&dir, who);
        cfg.peer_name = Some("localhost".into());
        Auth::Tls(std::sync::Arc::new(cfg))
    };
    let methods =
        [("none", Auth::Insecure), ("pre-shared key", pmigrate_bench::loopback::fresh_key()), ("TLS", tls("a"))];
    let mut hs = Vec::new();
    for (name, auth) in &methods {
        for streams in [1u16, 4] {
            say!("timing 200 handshakes: {name}, {streams} streams...");
            let t = handshake_times(auth, streams, 200)?;
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            hs.push((name.to_string(), streams, ms(t[t.len() / 2]), ms(t[t.len() * 9 / 10])));
        }
    }
    // The migration with each, alternating, so both see the same machine.
    let links = plan.listen.len().max(plan.via.len());
    let mut runs = Vec::new();
    for round in 0..2 {
        for (name, auth) in [("pre-shared key", pmigrate_bench::loopback::fresh_key()), ("TLS", tls("a"))] {
            plan.auth = auth;
            let mut r = measure(a, &plan, name, a.threads, a.streams, links, 0, a.compress, a.io, false)?;
            r.name = format!("{name} (run {})", round + 1);
            runs.push(r);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    if a.json {
        let hs: Vec<_> = hs
            .iter()
            .map(|(m, s, p50, p90)| serde_json::json!({ "method": m, "streams": s, "p50_ms": p50, "p90_ms": p90 }))
            .collect();
        outln!("{}", serde_json::to_string_pretty(&serde_json::json!({ "handshakes": hs, "runs": runs }))?);
        return Ok(());
    }
    outln!("handshake, whole session over loopback (connect, TLS, authentication, Hello, Welcome):");
    outln!("{:<16} {:>7} {:>8} {:>8}", "method", "streams", "p50 ms", "p90 ms");
    for (m, s, p50, p90) in &hs {
        outln!("{m:<16} {s:>7} {p50:>8.2} {p90:>8.2}");
    }
    outln!(
        "\nmigration of {} MiB ({:?}, lz4 {:?}), {} threads x {} streams to {:?}{}:",
        a.memory_mib,
        a.mix,
        a.compress,
        a.threads,
        a.streams,
        plan.listen,
        a.netns.as_ref().map(|n| format!(" (namespaces {n})")).unwrap_or_default()
    );
    outln!("{:<24} {:>11} {:>10} {:>14}", "auth", "xfer MiB/s", "cpu s/GiB", "io");
    for r in &runs {
        outln!("{:<24} {:>11.0} {:>10.2} {:>14}", r.name, r.transfer_mib_s, r.cpu_secs_per_gib, r.io);
    }
    let mean = |name: &str, f: fn(&Row) -> f64| {
        let v: Vec<f64> = runs.iter().filter(|r| r.name.starts_with(name)).map(f).collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    outln!(
        "TLS / pre-shared key: {:.2}x the transfer rate, {:.2}x the CPU per GiB (means of the runs above)",
        mean("TLS", |r| r.transfer_mib_s) / mean("pre-shared key", |r| r.transfer_mib_s),
        mean("TLS", |r| r.cpu_secs_per_gib) / mean("pre-shared key", |r| r.cpu_secs_per_gib)
    );
    Ok(())
}

fn compress_compare(a: &BenchArgs, plan: &Plan) -> Result<()> {
    let links = plan.listen.len().max(plan.via.len());
    let modes = [("none", Compression::Off), ("lz4", Compression::On), ("auto", Compression::Auto)];
    let mut runs = Vec::new();
    // Alternating, so every mode sees the same machine.
    for round in 0..2 {
        for (name, c) in modes {
            let mut r = measure(a, plan, name, a.threads, a.streams, links, a.dirty_mib_s, c, a.io, false)?;
            r.name = format!("{name} (run {})", round + 1);
            runs.push(r);
        }
    }
    let mean = |name: &str| {
        let v: Vec<f64> = runs.iter().filter(|r| r.name.starts_with(name)).map(|r| r.total_secs).collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let (none, lz4, auto) = (mean("none"), mean("lz4"), mean("auto"));
    if a.json {
        let j = serde_json::json!({ "runs": runs, "mean_total_secs": { "none": none, "lz4": lz4, "auto": auto } });
        outln!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(());
    }
    outln!(
        "migration of {} MiB ({:?}), {} threads x {} streams to {:?}{}:",
        a.memory_mib,
        a.mix,
        a.threads,
        a.streams,
        plan.listen,
        a.netns.as_ref().map(|n| format!(" (namespaces {n})")).unwrap_or_default()
    );
    outln!("{:<14} {:>8} {:>9} {:>11} {:>10}", "lz4", "total s", "wire MiB", "xfer MiB/s", "cpu s/GiB");
    for r in &runs {
        outln!(
            "{:<14} {:>8.3} {:>9.1} {:>11.0} {:>10.2}",
            r.name,
            r.total_secs,
            r.wire_mib,
            r.transfer_mib_s,
            r.cpu_secs_per_gib
        );
    }
    let best = none.min(lz4);
    outln!(
        "mean total: none {none:.3} s, lz4 {lz4:.3} s, auto {auto:.3} s; auto takes {:.2}x the better of none and lz4",
        auto / best
    );
    Ok(())
}

fn postcopy(a: &BenchArgs) -> Result<()> {
    use pmigrate_bench::postcopy::{raw_round_trip, run, tcp_round_trip, Case};
    say!("measuring the raw userfaultfd and loopback TCP round trips...");
    let raw = raw_round_trip(16 << 10)?;
    let tcp = tcp_round_trip(10_000)?;
    let dirty = if a.dirty_mib_s == 0 { 256 } else { a.dirty_mib_s };
    let busy = MutatorConfig {
        threads: 1,
        rate: dirty << 20,
        working_set: (a.memory_mib << 20) / 2,
        skew: Skew::HotCold { hot_pct: 80, hot_share: 10 },
    };
    let base = Case {
        memory: a.memory_mib << 20,
        mix: a.mix,
        mutators: Some(busy),
        streams: a.streams,
        config: SourceConfig {
            threads: a.threads,
            compression: a.compress,
            tracker: TrackerKind::Auto,
            ..SourceConfig::default()
        },
        postcopy: None,
        half_free: false,
        dest_guest: false,
    };
    let cases = [
        ("pre-copy", Case { ..base.clone() }),
        ("post-copy", Case { postcopy: Some(0), dest_guest: true, ..base.clone() }),
        ("hybrid (1 round)", Case { postcopy: Some(1), dest_guest: true, ..base.clone() }),
        ("pre-copy, idle", Case { mutators: None, ..base.clone() }),
        ("pre-copy, idle, half free", Case { mutators: None, half_free: true, ..base.clone() }),
    ];
    outln!(
        "{:<26} {:>9} {:>8} {:>11} {:>10} {:>8} {:>9} {:>9}",
        "case",
        "runs at s",
        "total s",
        "downtime ms",
        "wire MiB",
        "faults",
        "p50 us",
        "p99 us"
    );
    let mut rows = Vec::new();
    for (name, c) in cases {
        say!("{name}: {} MiB, {} MiB/s dirtied...", a.memory_mib, c.mutators.map_or(0, |m| m.rate >> 20));
        let m = run(&c, 1)?;
        let p = m.destination.postcopy.clone().unwrap_or_default();
        let lat = p.fault_latency.clone().unwrap_or_default();
        outln!(
            "{:<26} {:>9.3} {:>8.3} {:>11.1} {:>10.1} {:>8} {:>9} {:>9}",
            name,
            m.runnable_secs,
            m.source.total_secs,
            m.source.downtime_secs * 1e3,
            m.source.wire_bytes as f64 / (1 << 20) as f64,
            p.faults,
            lat.p50_us,
            lat.p99_us
        );
        rows.push(serde_json::json!({ "case": name, "measured": m }));
    }
    outln!(
        "raw userfaultfd round trip (fault -> UFFDIO_COPY -> wake, no network): p50 {} us, p99 {} us",
        raw.p50_us,
        raw.p99_us
    );
    outln!(
        "loopback TCP round trip (40-byte request, 4 KiB answer, idle threads): p50 {} us, p99 {} us",
        tcp.p50_us,
        tcp.p99_us
    );
    if a.json {
        let all = serde_json::json!({ "raw_uffd": raw, "tcp": tcp, "cases": rows });
        outln!("{}", serde_json::to_string_pretty(&all)?);
    }
    Ok(())
}

fn zero_copy(a: &BenchArgs) -> Result<()> {
    let dir = std::path::Path::new("/dev/shm");
    outln!("{:>8} {:>10} {:>14} {:>12} {:>10}", "GiB", "path", "switchover ms", "wire bytes", "total s");
    let mut rows = Vec::new();
    for &gib in &a.zero_copy_gib {
        for copy in [false, true] {
            if copy && gib > a.copy_max_gib {
                continue;
            }
            say!("{gib} GiB shared region, {}...", if copy { "copy path" } else { "zero-copy" });
            let r = loopback::zero_copy_switchover(dir, gib << 30, copy)?;
            let path = r.regions.first().map_or("-", |p| p.path.as_str()).to_string();
            outln!(
                "{:>8} {:>10} {:>14.1} {:>12} {:>10.3}",
                gib,
                path,
                r.downtime_secs * 1e3,
                r.wire_bytes,
                r.total_secs
            );
            rows.push(serde_json::json!({
                "gib": gib, "path": path, "switchover_ms": r.downtime_secs * 1e3,
                "wire_bytes": r.wire_bytes, "total_secs": r.total_secs,
            }));
        }
    }
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&rows)?);
    }
    outln!("(switchover: pause to the destination's verification; an idle guest, 4 streams, loopback)");
    Ok(())
}

fn sweep(a: &BenchArgs, plan: &Plan) -> Result<()> {
    let max_links = plan.listen.len().max(plan.via.len()).max(1);
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "threads,streams,links,dirty_mib_s,compression,total_secs,downtime_ms,rounds,converged,wire_mib,payload_mib,\
         transfer_mib_s,raw_tcp_mib_s,cpu_secs_per_gib,batch_p99_us"
    )?;
    let rates: Vec<u64> = if a.dirty_mib_s > 0 { vec![0, a.dirty_mib_s] } else { vec![0] };
    for links in (1..=max_links).filter(|l| l.is_power_of_two() || *l == max_links) {
        let (listen, via) = plan.links(links);
        let path = ceiling::Path { listen, via, netns: plan.netns.clone() };
        for (threads, streams) in [(1usize, 1u16), (2, 2), (4, 4), (8, 8)] {
            let streams = streams.max(links as u16);
            let raw = ceiling::raw_tcp(&path, streams as usize, (a.memory_mib << 20).min(1 << 30))?.bytes_per_sec / MIB;
            for &rate in &rates {
                let r = measure(a, plan, "sweep", threads, streams, links, rate, a.compress, a.io, a.zero_copy_send)?;
                writeln!(
                    out,
                    "{},{},{},{},{},{:.3},{:.1},{},{},{:.1},{:.1},{:.1},{:.1},{:.3},{}",
                    r.threads,
                    r.streams,
                    r.links,
                    r.dirty_mib_s,
                    r.compression,
                    r.total_secs,
                    r.downtime_ms,
                    r.rounds,
                    r.converged,
                    r.wire_mib,
                    r.payload_mib,
                    r.transfer_mib_s,
                    raw,
                    r.cpu_secs_per_gib,
                    r.batch_p99_us
                )?;
                out.flush()?;
            }
        }
    }
    Ok(())
}
