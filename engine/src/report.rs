//! What a migration did, for people (`Display`) and machines (JSON).

use std::fmt;

use serde::{Deserialize, Serialize};

/// Pages of one round, by what happened to them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundReport {
    /// Round number (0 is the full copy; the last is the one after pause).
    pub round: u32,
    /// Whether the guest was paused during this round.
    pub paused: bool,
    /// Dirty pages scanned.
    pub scanned: u64,
    /// Pages sent as they are.
    pub raw: u64,
    /// Pages sent lz4-compressed.
    pub compressed: u64,
    /// Zero pages (sent as markers, or skipped where the destination has zeros).
    pub zero: u64,
    /// Non-zero pages skipped because the destination already has them.
    pub unchanged: u64,
    /// Bytes written to the streams, frame headers included.
    pub wire_bytes: u64,
    /// Bytes of page data before compression.
    pub payload_bytes: u64,
    /// Seconds the round took.
    pub secs: f64,
    /// Pages not sent because the guest reported them free (round 0).
    pub hinted_free: u64,
}

/// One stream's share.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamReport {
    /// Stream index.
    pub index: u16,
    /// Local address.
    pub local: String,
    /// Peer address.
    pub peer: String,
    /// Bytes sent (source) or received (destination), headers included.
    pub bytes: u64,
    /// Frames carried.
    pub frames: u64,
    /// Average throughput over the migration, in bytes per second.
    pub bytes_per_sec: f64,
}

/// Percentiles of a latency, in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// Largest.
    pub max_us: u64,
}

impl LatencySummary {
    /// A histogram for latencies in microseconds, the one every latency
    /// in a report is recorded in: 1 µs to 10 minutes, 2 significant
    /// digits (record with `saturating_record`).
    pub fn histogram() -> hdrhistogram::Histogram<u64> {
        hdrhistogram::Histogram::new_with_bounds(1, 600_000_000, 2).expect("valid histogram bounds")
    }

    /// The summary of a histogram of microseconds (`None` when empty).
    pub fn of(h: &hdrhistogram::Histogram<u64>) -> Option<Self> {
        (!h.is_empty()).then(|| LatencySummary {
            count: h.len(),
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            max_us: h.max(),
        })
    }
}

/// The report of a migration, from either end.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// `"source"` or `"destination"`.
    pub role: String,
    /// Guest memory size in bytes.
    pub memory_bytes: u64,
    /// Seconds from start to verified completion.
    pub total_secs: f64,
    /// Seconds spent opening the streams.
    pub setup_secs: f64,
    /// Seconds from the pause hook to the destination's verification
    /// (source); from the final round's first frame to verification
    /// (destination).
    pub downtime_secs: f64,
    /// Whether the dirty set shrank under the downtime target before the
    /// round cap.
    pub converged: bool,
    /// Rounds run, the final (paused) round included.
    pub rounds: Vec<RoundReport>,
    /// Bytes written or read on all streams.
    pub wire_bytes: u64,
    /// Bytes of page data before compression.
    pub payload_bytes: u64,
    /// Per-stream figures.
    pub streams: Vec<StreamReport>,
    /// Worker threads (source); stream threads (destination).
    pub threads: usize,
    /// Dirty tracker used.
    pub tracker: String,
    /// Compression setting.
    pub compression: String,
    /// The I/O backend of the streams (`io_uring` or `portable`).
    pub io: String,
    /// Digest of all memory both ends agreed on, hex.
    pub digest: String,
    /// Source: per-batch latency, from a frame sealed by a worker to its
    /// last byte handed to the kernel (queueing behind slower streams
    /// included).
    pub batch_latency: Option<LatencySummary>,
    /// Regions offered for zero-copy handover: which path each took, and why.
    pub regions: Vec<crate::shared::RegionPath>,
    /// `"pre-copy"`, `"post-copy"` (after no pre-copy round) or `"hybrid"`.
    pub mode: String,
    /// Post-copy's figures, when the migration switched to it.
    pub postcopy: Option<PostcopyReport>,
    /// Connections lost and replaced by a stream that came back, over the
    /// whole migration (pre-copy and post-copy).
    #[serde(default)]
    pub reconnects: u64,
    /// Source: frames sent again after a stream came back, because its
    /// lost connection had swallowed them (the destination cannot tell).
    #[serde(default)]
    pub resent_frames: u64,
    /// What happened to the streams' links: connections lost or given up
    /// as down, streams that came back (by which route), streams back on
    /// their own link. Oldest first.
    #[serde(default)]
    pub links: Vec<LinkReport>,
}

/// Something that happened to one stream's link.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LinkReport {
    /// Stream index.
    pub stream: u16,
    /// Seconds from the start of the migration.
    pub at_secs: f64,
    /// `"down"` (its path acknowledged nothing for `secs`; the stream
    /// moves to another route), `"lost"` (the connection failed),
    /// `"resumed"` (a new connection, after `secs` without one) or
    /// `"returned"` (back on its own route once it answered again).
    pub event: String,
    /// The connection, `local -> peer`: the one lost for `down` and
    /// `lost`, the new one otherwise.
    pub route: String,
    /// `down`: how long nothing was acknowledged; `resumed`: the time lost.
    pub secs: f64,
    /// `resumed`, `returned`: frames (or chunks) sent again on the new
    /// connection.
    pub resent: u64,
}

impl LinkReport {
    /// The events of every stream's link, in time order, timed from `t0`.
    pub fn of(links: &[&pmigrate_transport::Link], t0: std::time::Instant) -> Vec<LinkReport> {
        use pmigrate_transport::LinkChange;
        let mut all: Vec<LinkReport> = links
            .iter()
            .enumerate()
            .flat_map(|(i, l)| {
                l.events().into_iter().map(move |e| {
                    let (event, secs, resent) = match e.change {
                        LinkChange::Down { silent } => ("down", silent.as_secs_f64(), 0),
                        LinkChange::Lost => ("lost", 0.0, 0),
                        LinkChange::Resumed { after, resent } => ("resumed", after.as_secs_f64(), resent),
                        LinkChange::Returned { resent } => ("returned", 0.0, resent),
                    };
                    LinkReport {
                        stream: i as u16,
                        at_secs: e.at.saturating_duration_since(t0).as_secs_f64(),
                        event: event.into(),
                        route: e.route,
                        secs,
                        resent,
                    }
                })
            })
            .collect();
        all.sort_by(|a, b| a.at_secs.total_cmp(&b.at_secs));
        all
    }

    /// Seconds streams spent without a connection, all streams together.
    pub fn time_lost(events: &[LinkReport]) -> f64 {
        events.iter().filter(|e| e.event == "resumed").map(|e| e.secs).sum()
    }
}

impl fmt::Display for LinkReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stream {} at {:.2} s: ", self.stream, self.at_secs)?;
        match self.event.as_str() {
            "down" => write!(f, "link down ({}): nothing acknowledged for {:.1} s", self.route, self.secs),
            "lost" => write!(f, "connection lost ({})", self.route),
            "resumed" => {
                write!(f, "resumed over {} after {:.2} s, {} sent again", self.route, self.secs, self.resent)
            }
            "returned" => write!(f, "back on its own link ({}), {} sent again", self.route, self.resent),
            other => write!(f, "{other} ({})", self.route),
        }
    }
}

impl Report {
    /// Pages sent in all rounds (raw + compressed).
    pub fn pages_sent(&self) -> u64 {
        self.rounds.iter().map(|r| r.raw + r.compressed).sum()
    }

    /// Throughput of page data (before compression), bytes per second:
    /// from the first round's start to the destination's verification, so
    /// bytes still sitting in socket buffers when a round ends are not
    /// counted as moved.
    pub fn payload_rate(&self) -> f64 {
        let secs = self.total_secs - self.setup_secs;
        if secs > 0.0 {
            self.payload_bytes as f64 / secs
        } else {
            0.0
        }
    }

    /// The report as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("reports serialise")
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {:.1} MiB of guest memory in {:.3} s (setup {:.3} s), downtime {:.1} ms",
            self.role,
            mib(self.memory_bytes),
            self.total_secs,
            self.setup_secs,
            self.downtime_secs * 1e3,
        )?;
        let source = self.role == "source";
        if source {
            write!(f, ", {}", if self.converged { "converged" } else { "did NOT converge (round cap)" })?;
        }
        write!(f, "\n  wire {:.1} MiB, page data {:.1} MiB, ", mib(self.wire_bytes), mib(self.payload_bytes))?;
        if source {
            write!(f, "{} threads, tracker {}, ", self.threads, self.tracker)?;
        } else {
            write!(f, "a thread per stream, ")?;
        }
        writeln!(f, "compression {}, {} I/O", self.compression, self.io)?;
        if !self.rounds.is_empty() {
            writeln!(
                f,
                "  {:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>8}",
                "round", "scanned", "raw", "lz4", "zero", "unchanged", "wire MiB", "secs"
            )?;
            for r in &self.rounds {
                writeln!(
                    f,
                    "  {:>4}{} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10.1} {:>8.3}",
                    r.round,
                    if r.paused { "*" } else { " " },
                    r.scanned,
                    r.raw,
                    r.compressed,
                    r.zero,
                    r.unchanged,
                    mib(r.wire_bytes),
                    r.secs
                )?;
            }
        }
        let hinted: u64 = self.rounds.iter().map(|r| r.hinted_free).sum();
        if hinted > 0 {
            writeln!(f, "  {hinted} pages the guest reported free were not sent")?;
        }
        for r in &self.regions {
            writeln!(f, "  region {} ({:.1} MiB): {} — {}", r.region, mib(r.bytes), r.path, r.why)?;
        }
        if let Some(p) = &self.postcopy {
            write!(
                f,
                "  {} after {} pre-copy rounds: guest ran at the destination at {:.3} s; {} pages needed",
                self.mode, p.precopy_rounds, p.runnable_secs, p.needed_pages,
            )?;
            if self.role == "source" {
                write!(f, ", {} pushed, {} sent on request", p.pushed_pages, p.requested_pages)?;
            }
            writeln!(f, "; {} reconnects", p.reconnects)?;
            if p.faults > 0 {
                write!(f, "  {} faults ({} on pages never sent)", p.faults, p.zero_faults)?;
                match &p.fault_latency {
                    Some(l) => {
                        writeln!(f, ", wait for a page: p50 {} us, p99 {} us, max {} us", l.p50_us, l.p99_us, l.max_us)?
                    }
                    None => writeln!(f)?,
                }
            }
        }
        if self.reconnects > 0 {
            write!(f, "  {} lost connections came back", self.reconnects)?;
            if source {
                write!(f, ", {} frames sent again", self.resent_frames)?;
            }
            writeln!(f, ", {:.2} s without a connection", LinkReport::time_lost(&self.links))?;
        }
        for e in &self.links {
            writeln!(f, "    {e}")?;
        }
        if let Some(l) = &self.batch_latency {
            writeln!(
                f,
                "  batch latency: p50 {} us, p90 {} us, p99 {} us, max {} us ({} batches)",
                l.p50_us, l.p90_us, l.p99_us, l.max_us, l.count
            )?;
        }
        for s in &self.streams {
            writeln!(
                f,
                "  stream {:>2} {} -> {}: {:.1} MiB, {} frames, {:.1} MiB/s",
                s.index,
                s.local,
                s.peer,
                mib(s.bytes),
                s.frames,
                s.bytes_per_sec / (1 << 20) as f64
            )?;
        }
        write!(f, "  digest {}", self.digest)
    }
}

/// What post-copy did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PostcopyReport {
    /// Pre-copy rounds before the switchover (0: pure post-copy).
    pub precopy_rounds: u32,
    /// Pages the destination lacked when the guest resumed there.
    pub needed_pages: u64,
    /// Source: pages sent by the background push.
    pub pushed_pages: u64,
    /// Source: pages sent to answer requests.
    pub requested_pages: u64,
    /// Destination: page faults the guest took.
    pub faults: u64,
    /// Destination: of those, faults on pages that were not needed,
    /// answered at once with the zero page.
    pub zero_faults: u64,
    /// Destination: from a fault's message to its page placed.
    pub fault_latency: Option<LatencySummary>,
    /// Seconds from the start until the guest ran at the destination.
    pub runnable_secs: f64,
    /// Streams lost after the switchover and reconnected.
    pub reconnects: u64,
}
