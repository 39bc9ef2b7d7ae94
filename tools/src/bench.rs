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
}

pub fn run(a: BenchArgs) -> Result<()> {
    let memory = a.memory_mib << 20;
    let mutators = (a.dirty_mib_s > 0).then_some(MutatorConfig {
        threads: 1,
        rate: a.dirty_mib_s << 20,
        working_set: memory / 2,
        skew: Skew::HotCold { hot_pct: 80, hot_share: 20 },
    });
    let listen = vec!["127.0.0.1:0".parse()?];
    eprintln!("measuring raw TCP over loopback ({} streams)...", a.streams);
    let raw = ceiling::raw_tcp("127.0.0.1:0".parse()?, a.streams as usize, memory.min(1 << 30))?;
    let mut rows = Vec::new();
    for (name, streams, threads, compression) in [
        ("classic (1 thread, 1 stream, no lz4)", 1, 1, Compression::Off),
        ("pmigrate", a.streams, a.threads, a.compress),
    ] {
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
        };
        let o = loopback::run(&sc, 7)?;
        let s = &o.source;
        rows.push(Row {
            name: name.to_string(),
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
                "runs": rows,
            }))?
        );
        return Ok(());
    }
    println!(
        "loopback migration of {} MiB ({:?}), raw TCP with {} streams: {:.0} MiB/s",
        a.memory_mib,
        a.mix,
        a.streams,
        raw / (1 << 20) as f64
    );
    println!(
        "{:<38} {:>8} {:>10} {:>6} {:>9} {:>9} {:>12} {:>9}",
        "run", "total s", "downtime", "rounds", "wire MiB", "data MiB", "guest MiB/s", "vs classic"
    );
    let base = rows[0].total_secs;
    for r in &rows {
        println!(
            "{:<38} {:>8.3} {:>8.1}ms {:>6} {:>9.1} {:>9.1} {:>12.0} {:>8.2}x",
            r.name,
            r.total_secs,
            r.downtime_ms,
            r.rounds,
            r.wire_mib,
            r.payload_mib,
            r.throughput_mib_s,
            base / r.total_secs
        );
    }
    Ok(())
}
