//! The destination's side of post-copy: asking for pages, the switchover
//! (the guest starts here while pages are still arriving), and the end of
//! a post-copy session.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pmigrate_ranges::{PageIdx, PageRange, RegionIdx};
use pmigrate_transport::message::{Control, Round};
use pmigrate_transport::net::write_frame;
use pmigrate_transport::Link;

use super::{Incoming, State, StreamOutcome};
use crate::postcopy::{self, DestPost, PostcopyError};
use crate::report::Report;
use crate::MigrateError;

impl Incoming {
    /// The end of a post-copy session: the digest was sent by the
    /// completion thread; the source's, if its `Done` arrived, must match.
    pub(super) fn postcopy_report(
        &self,
        state: &State<'_>,
        post: &DestPost,
        streams: &[Link],
        outcomes: &[StreamOutcome],
    ) -> Result<Report, MigrateError> {
        let digest = *state.post_digest.get().ok_or(PostcopyError::Incomplete)?;
        // The source's `Done` may have been lost with a connection; if it
        // came, it must match.
        if let Some(d) = state.rules().source_digest().filter(|d| *d != digest) {
            return Err(MigrateError::Digest { source_digest: d, dest_digest: digest });
        }
        let mut report = self.report(state, streams, outcomes, digest);
        let f = post.round.load(Ordering::Relaxed);
        let mut p = post.report(self.t0, u32::try_from(f).unwrap_or(0));
        p.reconnects = streams.iter().map(Link::replaced).sum();
        report.postcopy = Some(p);
        report.mode = "post-copy".into();
        super::report::close_streams(streams);
        Ok(report)
    }
}

impl State<'_> {
    /// Asks the source for pages on the priority stream.
    /// A request lost with a broken priority stream is not an error: the
    /// page comes with the push, or is asked for again (see
    /// [`Self::complete_postcopy`]).
    pub(super) fn request(&self, streams: &[Link], region: usize, first: u64, count: u32) {
        let f = Control::PageRequest(PageRange {
            region: RegionIdx(region as u32),
            start: PageIdx(first),
            end: PageIdx(first + u64::from(count)),
        })
        .encode();
        let _w = streams[self.prio].lock_writes();
        let _ = write_frame(&mut &*streams[self.prio].current().0, &f, "priority stream");
    }

    /// Stream 0 at its switchover marker: once every stream reached its
    /// own, drops the stale copies of needed pages, registers the regions
    /// with userfaultfd, starts the guest and tells the source.
    pub(super) fn switch_over(&self, streams: &[Link], post: &DestPost) -> Result<(), MigrateError> {
        if !post.wait_arrivals(streams.len(), &self.abort) {
            return Err(MigrateError::Aborted);
        }
        let mem = self.placer.mem();
        let mut which = vec![false; mem.regions().len()];
        for (r, region) in mem.regions().iter().enumerate() {
            let runs: Vec<(u64, u64)> = post.need[r].runs(0, region.pages()).collect();
            which[r] = !runs.is_empty();
            for (s, n) in runs {
                region.discard_pages(PageIdx(s), n)?;
            }
        }
        post.faults.register(mem, &which)?;
        post.needed_pages.store(post.missing.load(Ordering::Acquire), Ordering::Relaxed);
        // The ownership rule: a failure told to the source before this
        // point says the guest never started here, so the source keeps it;
        // `fail` raises `abort` before it reads `started`, so either the
        // guest starts and every later failure says so, or it never does.
        let mut started = self.started.lock().expect("start lock");
        if self.abort.load(Ordering::Acquire) {
            return Err(MigrateError::Aborted);
        }
        let resume = self.resume.lock().expect("resume lock").take();
        if let Some(resume) = resume {
            resume().map_err(MigrateError::Resume)?;
        }
        *started = true;
        post.start_running();
        drop(started);
        // The destination's marker: the guest runs here.
        let round = Round(post.round.load(Ordering::Relaxed));
        let f = Control::Switchover { round, last: true, need: None }.encode();
        let _w = streams[self.prio].lock_writes();
        write_frame(&mut &*streams[self.prio].current().0, &f, "priority stream")?;
        Ok(())
    }

    /// Post-copy's end, on a thread of its own from the switchover: waits
    /// until every needed page arrived — asking again for pages that stop
    /// coming (lost with a connection) — then sends `Verified` with the
    /// digest of what arrived on the priority stream, again whenever that
    /// stream reconnects, until the source closes the session.
    pub(super) fn complete_postcopy(&self, streams: &[Link], post: &DestPost) -> Result<(), MigrateError> {
        if !post.wait_running(&self.abort) {
            return Ok(());
        }
        let mut last = (post.landed.load(Ordering::Relaxed), Instant::now());
        while post.missing.load(Ordering::Acquire) > 0 {
            if self.abort.load(Ordering::Relaxed) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(2));
            let landed = post.landed.load(Ordering::Relaxed);
            if landed != last.0 {
                last = (landed, Instant::now());
            } else if last.1.elapsed() >= postcopy::SWEEP_AFTER {
                for (r, first, n) in post.still_needed(postcopy::SWEEP_MAX_PAGES) {
                    self.request(streams, r, first, n as u32);
                }
                last.1 = Instant::now();
            }
        }
        // Every page is here: the kernel may serve the guest's faults again.
        post.faults.unregister_all();
        post.end();
        let digest = self.placer.digest();
        let _ = self.post_digest.set(digest);
        self.complete.store(true, Ordering::Release);
        let f = Control::Verified { value: digest.0, closed: false }.encode();
        let mut sent_on = None;
        while !self.streams_done.load(Ordering::Acquire) && !self.abort.load(Ordering::Relaxed) {
            let (conn, gen) = streams[self.prio].current();
            if sent_on != Some(gen) {
                let _w = streams[self.prio].lock_writes();
                if write_frame(&mut &*conn, &f, "priority stream").is_ok() {
                    sent_on = Some(gen);
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }
}
