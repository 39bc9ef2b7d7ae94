//! What the source believes the destination holds, page by page, and how a
//! page frame lost with a connection is built again.
//!
//! The table of hashes last sent (`Run::sent`) decides whether a dirty page
//! need go again (the same hash: the destination has it) and gives the
//! final digest, so it must name, for every page, the copy the destination
//! ends up with. The destination keeps the copy of the latest round
//! (`dest::place`), whatever order copies arrive in. A frame lost with a
//! connection is rebuilt from guest memory as it is now, in its own round:
//! it goes again raw (or zero), never skipped as unchanged, since the copy
//! sent last never arrived. Its content may be newer than what the lost
//! frame carried; that is fine, the dirty tracker still reports a page
//! written since its last collection, and in the final round the guest is
//! paused. But if a later round already sent the page (on another stream),
//! that copy wins at the destination, and the table must keep its hash.
//! So each page also records the round of its latest copy, and a rebuilt
//! frame updates only the pages whose latest copy is of its own round. A
//! lock makes that check and update one step against the workers' updates
//! (taken shared, once per frame).

use std::sync::atomic::Ordering;

use pmigrate_ranges::{PageRange, PAGE_SIZE};
use pmigrate_transport::payload::{build_pages, build_zero_pages, is_zero_page, zero_page_hash, PagesAt, Scratch};
use xxhash_rust::xxh3::xxh3_64;

use super::Run;
use crate::MigrateError;

impl Run<'_> {
    /// Pages `first..` of `region` went out in round `round` with these
    /// hashes.
    pub(super) fn note_sent(&self, region: u32, first: u64, hashes: &[u64], round: u64) {
        let (sent, rounds) = (&self.sent[region as usize], &self.sent_round[region as usize]);
        let round = round as u32; // the destination refuses rounds past u32
        let _shared = self.sent_lock.read().unwrap_or_else(|p| p.into_inner());
        for (i, h) in hashes.iter().enumerate() {
            let p = (first + i as u64) as usize;
            rounds[p].store(round, Ordering::Relaxed);
            sent[p].store(*h, Ordering::Relaxed);
        }
    }

    /// The `Pages` frame of `range` in round `round` again, from guest
    /// memory now: zero-encoded if every page is zero, raw otherwise (one
    /// frame, as the lost one was, so the stream's count of the round
    /// holds). Pages whose latest copy is of this round take its hashes.
    pub(super) fn rebuild(&self, range: PageRange, round: u64) -> Result<Vec<u8>, MigrateError> {
        let r = range.region.as_usize();
        let region = &self.mem.regions()[r];
        let count = range.len() as usize;
        let mut pages = vec![0u8; count * PAGE_SIZE];
        region.read_pages(range.start, &mut pages)?;
        let mut zero = true;
        let hashes: Vec<u64> = pages
            .chunks_exact(PAGE_SIZE)
            .map(|p| {
                if is_zero_page(p) {
                    zero_page_hash()
                } else {
                    zero = false;
                    xxh3_64(p)
                }
            })
            .collect();
        let mut frame = Vec::new();
        let first = range.start.0;
        if zero {
            build_zero_pages(&mut frame, range.region.0, first, count as u32, round);
        } else {
            let at = PagesAt { region: range.region.0, first, round };
            build_pages(&mut frame, &mut Scratch::default(), at, &pages, &hashes, false);
        }
        let (sent, rounds) = (&self.sent[r], &self.sent_round[r]);
        let _alone = self.sent_lock.write().unwrap_or_else(|p| p.into_inner());
        for (i, h) in hashes.iter().enumerate() {
            let p = (first + i as u64) as usize;
            if u64::from(rounds[p].load(Ordering::Relaxed)) == round {
                sent[p].store(*h, Ordering::Relaxed);
            }
        }
        Ok(frame)
    }
}
