//! The destination's report of a session.

use std::net::Shutdown;

use pmigrate_ranges::PAGE_SIZE;
use pmigrate_transport::hello::CAP_LZ4;
use pmigrate_transport::message::Digest;
use pmigrate_transport::Link;

use super::{Incoming, State, StreamOutcome};
use crate::report::{Report, StreamReport};

impl Incoming {
    pub(super) fn report(
        &self,
        state: &State<'_>,
        streams: &[Link],
        outcomes: &[StreamOutcome],
        digest: Digest,
    ) -> Report {
        let mem = state.placer.mem();
        let handed_over = state.placer.handed_over();
        let rules = state.rules();
        let total = self.t0.elapsed().as_secs_f64();
        let mut report = Report {
            role: "destination".into(),
            memory_bytes: mem.total_bytes(),
            total_secs: total,
            // From the first page of the last round to now, the memory
            // verified (pre-copy; post-copy's guest ran from the switchover).
            downtime_secs: state.latest_round.lock().unwrap_or_else(|p| p.into_inner()).1.elapsed().as_secs_f64(),
            converged: true,
            threads: streams.len(),
            digest: digest.to_string(),
            compression: if self.accepted.caps & CAP_LZ4 != 0 { "lz4".into() } else { "off".into() },
            io: state.io_report.clone(),
            mode: "pre-copy".into(),
            reconnects: streams.iter().map(Link::replaced).sum(),
            links: crate::report::LinkReport::of(&streams.iter().collect::<Vec<_>>(), self.t0),
            ..Report::default()
        };
        for (r, offered) in state.placer.offered().iter().enumerate() {
            if !*offered {
                continue;
            }
            let received = !handed_over[r];
            report.regions.push(crate::shared::RegionPath {
                region: r as u32,
                bytes: mem.regions()[r].len(),
                path: if received { "copy" } else { "zero-copy" }.into(),
                why: if received { "pages received" } else { "no page received: handed over" }.into(),
            });
        }
        for (i, (o, st)) in outcomes.iter().zip(streams.iter().map(|l| l.current().0)).enumerate() {
            report.wire_bytes += o.bytes;
            report.payload_bytes += rules.pages(i) * PAGE_SIZE as u64;
            report.streams.push(StreamReport {
                index: i as u16,
                local: st.tcp().local_addr().map(|a| a.to_string()).unwrap_or_default(),
                peer: st.tcp().peer_addr().map(|a| a.to_string()).unwrap_or_default(),
                bytes: o.bytes,
                frames: o.frames,
                bytes_per_sec: o.bytes as f64 / total.max(1e-9),
            });
        }
        report
    }
}

/// Half-closes every stream once the source was told its verdict, so it
/// reads `Verified` before the sockets close.
pub(super) fn close_streams(streams: &[Link]) {
    for st in streams {
        let _ = st.current().0.shutdown(Shutdown::Write);
    }
}
