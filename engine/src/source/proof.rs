//! Zero-copy's proof (design.md "Zero-copy"): before the source relies
//! on the destination's memory being its own, it asks (`Probe`) what the
//! destination sees there — first the content of sampled pages, then fresh
//! nonces planted by this end with the guest paused. A region that fails is
//! sent down the copy path.

use std::sync::atomic::Ordering;

use crossbeam_channel::{Receiver, Sender};
use pmigrate_ranges::{AtomicBitmap, RegionIdx};
use pmigrate_transport::message::{Control, Digest, ProbeAsk};
use pmigrate_transport::TransportError;

use super::streams::Msg;
use super::{Run, CONTENT_PROBE_TRIES, PROBE_TIMEOUT};
use crate::report::Report;
use crate::shared::{self, RegionPath};
use crate::MigrateError;

impl Run<'_> {
    /// Asks the destination about `places` of `region` on stream 0 and
    /// waits for its answer (or its error).
    pub(super) fn probe(
        &self,
        txs: &[Sender<Msg>],
        probes: &Receiver<Vec<u64>>,
        verdict: &Receiver<Result<Digest, MigrateError>>,
        region: u32,
        ask: ProbeAsk,
        places: &[u64],
    ) -> Result<Vec<u64>, MigrateError> {
        let f = Control::Probe { region: RegionIdx(region), ask, places: places.to_vec() }.encode();
        txs[0].send(Msg::Control(f)).map_err(|_| MigrateError::Aborted)?;
        crossbeam_channel::select! {
            recv(probes) -> r => {
                let closed = |_| TransportError::Closed("stream 0: waiting for a probe's answer".into());
                let v = r.map_err(closed)?;
                if v.len() != places.len() {
                    return Err(MigrateError::Protocol { stream: 0, why: "probe answered with the wrong count".into() });
                }
                Ok(v)
            }
            recv(verdict) -> v => Err(match v {
                Ok(Err(e)) => e,
                _ => MigrateError::Protocol { stream: 0, why: "the destination ended the session during a probe".into() },
            }),
            default(PROBE_TIMEOUT) => Err(MigrateError::Protocol { stream: 0, why: "no answer to a probe".into() }),
        }
    }

    /// Step 1 of the proof: which offered regions the destination sees with
    /// the same content. Returns per region whether it is (so far) shared.
    pub(super) fn prove_content(
        &self,
        txs: &[Sender<Msg>],
        probes: &Receiver<Vec<u64>>,
        verdict: &Receiver<Result<Digest, MigrateError>>,
        report: &mut Report,
    ) -> Result<Vec<bool>, MigrateError> {
        let mut shared = vec![false; self.mem.regions().len()];
        let mut pick = shared::Picker::new(&self.session);
        for (r, path) in &self.candidates {
            let region = &self.mem.regions()[*r as usize];
            let mut pages = shared::sample_pages(region.pages(), shared::HASH_SAMPLES, &mut pick);
            // The guest runs: a page it writes between our read and the
            // destination's looks different even in the same memory. Pages
            // that differ are asked again, a few times; another file's
            // differ every time. (The proof that counts comes at the pause.)
            let mut same = false;
            for _ in 0..CONTENT_PROBE_TRIES {
                let ours = shared::hash_pages(region, &pages)?;
                let theirs = self.probe(txs, probes, verdict, *r, ProbeAsk::PageHashes, &pages)?;
                pages =
                    pages.iter().zip(ours.iter().zip(&theirs)).filter(|(_, (a, b))| a != b).map(|(p, _)| *p).collect();
                if pages.is_empty() {
                    same = true;
                    break;
                }
            }
            shared[*r as usize] = same;
            if !same {
                self.force[*r as usize].store(true, Ordering::Relaxed);
                report.regions.push(RegionPath {
                    region: *r,
                    bytes: region.len(),
                    path: "copy".into(),
                    why: format!("{path}: sampled pages differ at the destination"),
                });
            }
        }
        Ok(shared)
    }

    /// Step 2, with the guest paused: nonces through our mapping must show
    /// through the destination's. A region that fails is copied whole.
    pub(super) fn prove_identity(
        &self,
        txs: &[Sender<Msg>],
        probes: &Receiver<Vec<u64>>,
        verdict: &Receiver<Result<Digest, MigrateError>>,
        shared: &mut [bool],
        dirty: &[AtomicBitmap],
        report: &mut Report,
    ) -> Result<(), MigrateError> {
        let mut pick = shared::Picker::new(&[&self.session[..], b"nonce"].concat());
        for (r, path) in &self.candidates {
            let ri = *r as usize;
            if !shared[ri] {
                continue;
            }
            let region = &self.mem.regions()[ri];
            let nonces = shared::Nonces::plant(region, &mut pick)?;
            let seen = self.probe(txs, probes, verdict, *r, ProbeAsk::Words, &nonces.offsets);
            let planted = nonces.values.clone();
            // Put the guest's words back before anything else, whatever happened.
            nonces.restore(region)?;
            let same = seen? == planted;
            let (path_taken, why) = if same {
                ("zero-copy", format!("{path}: the destination maps the same memory (nonce proof)"))
            } else {
                shared[ri] = false;
                self.force[ri].store(true, Ordering::Relaxed);
                dirty[ri].set_range(0, region.pages());
                ("copy", format!("{path}: same content but not the same memory; copied during the pause"))
            };
            report.regions.push(RegionPath { region: *r, bytes: region.len(), path: path_taken.into(), why });
        }
        Ok(())
    }
}
