//! Post-copy on the source: answering the destination's page requests.
//!
//! The priority stream's listener passes each `PageRequest` here; the pages
//! are read (the guest is paused, so they are final), sealed raw — lz4
//! would add latency to a vCPU's wait — and queued on the priority stream,
//! whose queue holds nothing else. A page may also travel in the push: the
//! destination keeps the first copy and drops the other.

use std::sync::atomic::Ordering;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use pmigrate_ranges::{PageIdx, PAGE_SIZE};
use pmigrate_transport::payload::{build_pages, build_zero_pages, is_zero_page, zero_page_hash, PagesAt, Scratch};
use xxhash_rust::xxh3::xxh3_64;

use super::{Msg, Run};
use crate::MigrateError;

/// Pages `first..first + count` of `region`, as the destination asked.
#[derive(Clone, Copy, Debug)]
pub(super) struct Request {
    pub(super) region: u32,
    pub(super) first: u64,
    pub(super) count: u32,
}

/// Serves requests until the listener goes away. A request outside guest
/// memory is the destination breaking the protocol.
pub(super) fn serve(
    run: &Run<'_>,
    stream: usize,
    requests: Receiver<Request>,
    out: Sender<Msg>,
    pool: &Receiver<Vec<u8>>,
) -> Result<(), MigrateError> {
    let mut pages = Vec::new();
    let mut hashes = Vec::new();
    let mut scratch = Scratch::default();
    for req in requests.iter() {
        let bad = |why: String| MigrateError::Protocol { stream, why };
        let region = run
            .mem
            .regions()
            .get(req.region as usize)
            .ok_or_else(|| bad(format!("page request for region {}, which does not exist", req.region)))?;
        let end = req.first.checked_add(u64::from(req.count));
        if end.is_none_or(|e| e > region.pages()) {
            return Err(bad(format!("page request for pages {}..+{} of region {}", req.first, req.count, req.region)));
        }
        let round = run.post_round.load(Ordering::Acquire);
        if round == u64::MAX {
            return Err(bad("page request before the switchover".into()));
        }
        pages.resize(req.count as usize * PAGE_SIZE, 0);
        region.read_pages(PageIdx(req.first), &mut pages)?;
        hashes.clear();
        let mut zero = true;
        for page in pages.chunks_exact(PAGE_SIZE) {
            if is_zero_page(page) {
                hashes.push(zero_page_hash());
            } else {
                zero = false;
                hashes.push(xxh3_64(page));
            }
        }
        let sent = &run.sent[req.region as usize];
        for (i, h) in hashes.iter().enumerate() {
            sent[(req.first + i as u64) as usize].store(*h, Ordering::Relaxed);
        }
        let mut frame = pool.try_recv().unwrap_or_default();
        if zero {
            build_zero_pages(&mut frame, req.region, req.first, req.count, round);
        } else {
            let at = PagesAt { region: req.region, first: req.first, round };
            build_pages(&mut frame, &mut scratch, at, &pages, &hashes, false);
        }
        run.requested_pages.fetch_add(u64::from(req.count), Ordering::Relaxed);
        if out.send(Msg::Frame(frame, Instant::now())).is_err() {
            break;
        }
    }
    Ok(())
}
