//! Post-copy on the source: answering the destination's page requests.
//!
//! The priority stream's listener answers each `PageRequest` itself, at
//! once, on the connection it came by: the pages are read (the guest is
//! paused, so they are final), sealed raw — lz4 would add latency to a
//! vCPU's wait — and written; no queue, no other thread in between, and no
//! bulk data on that connection. A page may also travel in the push: the
//! destination keeps the first copy and drops the other.

use pmigrate_ranges::{PageRange, PAGE_SIZE};
use pmigrate_transport::payload::{build_pages, build_zero_pages, is_zero_page, zero_page_hash, PagesAt, Scratch};
use std::sync::atomic::Ordering;
use xxhash_rust::xxh3::xxh3_64;

use super::rules::{check_request, BadRequest};
use super::Run;
use crate::MigrateError;

/// Builds the answers to requests, on the priority stream's listener.
pub(super) struct Answerer<'a> {
    run: &'a Run<'a>,
    stream: usize,
    pages: Vec<u8>,
    hashes: Vec<u64>,
    scratch: Scratch,
    frame: Vec<u8>,
}

impl<'a> Answerer<'a> {
    pub(super) fn new(run: &'a Run<'a>, stream: usize) -> Self {
        Self { run, stream, pages: Vec::new(), hashes: Vec::new(), scratch: Scratch::default(), frame: Vec::new() }
    }

    /// The sealed frame of the pages `req` asks for (at most a frame's
    /// worth, the frame decoder checked). A request outside guest memory,
    /// or before the switchover, breaks the protocol.
    pub(super) fn answer(&mut self, req: PageRange) -> Result<&[u8], MigrateError> {
        let run = self.run;
        let stream = self.stream;
        let bad = |why: BadRequest| MigrateError::Protocol { stream, why: why.to_string() };
        let n = req.region.0;
        let switched = run.state().switch_round();
        let pages: Vec<u64> = run.mem.regions().iter().map(|r| r.pages()).collect();
        check_request(&pages, req, switched.is_some()).map_err(bad)?;
        let Some(round) = switched else { return Err(bad(BadRequest::BeforeSwitchover)) };
        let region = &run.mem.regions()[req.region.as_usize()];
        let (first, count) = (req.start.0, req.len() as u32);
        self.pages.resize(count as usize * PAGE_SIZE, 0);
        region.read_pages(req.start, &mut self.pages)?;
        self.hashes.clear();
        let mut zero = true;
        for page in self.pages.chunks_exact(PAGE_SIZE) {
            if is_zero_page(page) {
                self.hashes.push(zero_page_hash());
            } else {
                zero = false;
                self.hashes.push(xxh3_64(page));
            }
        }
        run.note_sent(n, first, &self.hashes, round);
        if zero {
            build_zero_pages(&mut self.frame, n, first, count, round);
        } else {
            let at = PagesAt { region: n, first, round };
            build_pages(&mut self.frame, &mut self.scratch, at, &self.pages, &self.hashes, false);
        }
        run.requested_pages.fetch_add(u64::from(count), Ordering::Relaxed);
        Ok(&self.frame)
    }
}
