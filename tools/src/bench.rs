//! `pmigrate bench`: the embedded default job.

use std::time::Duration;

use anyhow::Result;
use clap::Args;
use pmigrate::{Compression, SourceConfig, TrackerKind};
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
    /// Worker threads of the pmigrate run.
    #[arg(long, default_value_t = 4)]
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
    listen: Vec<std::net::SocketAddr>,
    /// Local address or interface of each stream, comma-separated.
    #[arg(long, value_delimiter = ',')]
    via: Vec<pmigrate::Via>,
    /// Run the source and destination in these network namespaces, as
    /// SRC:DST (see tools/testbed.sh).
    #[arg(long)]
    netns: Option<String>,
    /// Extra runs as THREADSxSTREAMS, comma-separated (e.g. `1x1,2x2,4x4`),
    /// with the configured compression.
    #[arg(long, value_delimiter = ',')]
    matrix: Vec<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(serde::Serialize)]
struct Row {
    name: String,
    total_secs: f64,
    downtime_ms: f64,
    rounds: usize,
    wire_mib: f64,
    payload_mib: f64,
    throughput_mib_s: f64,
    /// Page data over the seconds the rounds took (setup and the final
    /// handshake excluded): the engine's transfer rate.
    transfer_mib_s: f64,
    /// CPU seconds of the whole process (source and destination) during the run.
    cpu_secs: f64,
}

pub fn run(a: BenchArgs) -> Result<()> {
    let memory = a.memory_mib << 20;
    let mutators = (a.dirty_mib_s > 0).then_some(MutatorConfig {
        threads: 1,
        rate: a.dirty_mib_s << 20,
        working_set: memory / 2,
        skew: Skew::HotCold { hot_pct: 80, hot_share: 20 },
    });
    let listen = if a.listen.is_empty() { vec!["127.0.0.1:0".parse()?] } else { a.listen.clone() };
    let netns = match &a.netns {
        None => None,
        Some(s) => {
            let (src, dst) = s.split_once(':').ok_or_else(|| anyhow::anyhow!("--netns takes SRC:DST"))?;
            Some((src.to_string(), dst.to_string()))
        }
    };
    let path = ceiling::Path { listen: listen.clone(), via: a.via.clone(), netns: netns.clone() };
    eprintln!("measuring raw TCP over the same path ({} streams)...", a.streams);
    let ceiling = ceiling::raw_tcp(&path, a.streams as usize, memory.min(1 << 30))?;
    let raw = ceiling.bytes_per_sec;
    let mut rows = Vec::new();
    let mut runs = vec![
        ("classic (1 thread, 1 stream, no lz4)".to_string(), 1, 1, Compression::Off),
        (format!("pmigrate {}x{}", a.threads, a.streams), a.streams, a.threads, a.compress),
    ];
    for m in &a.matrix {
        let (t, s) = m.split_once('x').ok_or_else(|| anyhow::anyhow!("{m:?}: expected THREADSxSTREAMS"))?;
        runs.push((format!("pmigrate {m}"), s.parse()?, t.parse()?, a.compress));
    }
    for (name, streams, threads, compression) in runs {
        eprintln!("migrating {} MiB: {name}...", a.memory_mib);
        let sc = Scenario {
            memory,
            mix: a.mix,
            mutators,
            streams,
            config: SourceConfig {
                threads,
                compression,
                tracker: TrackerKind::Hash,
                max_rounds: 30,
                downtime_target: Duration::from_millis(300),
                ..SourceConfig::default()
            },
            listen: listen.clone(),
            via: a.via.clone(),
            netns: netns.clone(),
        };
        let o = loopback::run(&sc, 7)?;
        let s = &o.source;
        rows.push(Row {
            name: name.to_string(),
            transfer_mib_s: s.payload_rate() / (1 << 20) as f64,
            cpu_secs: o.cpu_secs,
            total_secs: s.total_secs,
            downtime_ms: s.downtime_secs * 1e3,
            rounds: s.rounds.len(),
            wire_mib: s.wire_bytes as f64 / (1 << 20) as f64,
            payload_mib: s.payload_bytes as f64 / (1 << 20) as f64,
            throughput_mib_s: memory as f64 / (1 << 20) as f64 / s.total_secs,
        });
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "memory_mib": a.memory_mib,
                "raw_tcp_mib_s": raw / (1 << 20) as f64,
                "raw_tcp_cpu_secs_per_gib": ceiling.cpu_secs_per_gib,
                "runs": rows,
            }))?
        );
        return Ok(());
    }
    println!(
        "migration of {} MiB ({:?}) to {:?}{}; raw TCP with {} streams: {:.0} MiB/s, {:.2} CPU s/GiB",
        a.memory_mib,
        a.mix,
        listen,
        a.netns.as_ref().map(|n| format!(" (namespaces {n})")).unwrap_or_default(),
        a.streams,
        raw / (1 << 20) as f64,
        ceiling.cpu_secs_per_gib
    );
    println!(
        "{:<38} {:>8} {:>10} {:>6} {:>9} {:>9} {:>11} {:>8} {:>9} {:>10}",
        "run",
        "total s",
        "downtime",
        "rounds",
        "wire MiB",
        "data MiB",
        "xfer MiB/s",
        "vs TCP",
        "cpu s/GiB",
        "vs classic"
    );
    let base = rows[0].total_secs;
    let raw_mib = raw / (1 << 20) as f64;
    for r in &rows {
        println!(
            "{:<38} {:>8.3} {:>8.1}ms {:>6} {:>9.1} {:>9.1} {:>11.0} {:>7.2}x {:>9.2} {:>9.2}x",
            r.name,
            r.total_secs,
            r.downtime_ms,
            r.rounds,
            r.wire_mib,
            r.payload_mib,
            r.transfer_mib_s,
            r.transfer_mib_s / raw_mib,
            r.cpu_secs / (a.memory_mib as f64 / 1024.0),
            base / r.total_secs
        );
    }
    println!("(xfer: page data over the time the rounds took; vs TCP: against raw TCP with {} streams, measured just before; cpu s/GiB: both ends, one process, per GiB of guest memory)", a.streams);
    Ok(())
}
