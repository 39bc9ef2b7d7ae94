//! The byte-stream relay's reassembly rules (protocol.md §7.4), with no
//! sockets, threads or clocks: chunks numbered across all streams come
//! back into one ordered output.
//!
//! Each stream's sequence numbers increase; every chunk comes once; `End`
//! says how many chunks the whole flow had, the same on every stream, and
//! no stream carried a chunk at or past it. Because each stream's numbers
//! increase, a chunk that every stream has passed (or ended without) can
//! never come: that gap is an error at once, not a wait. Chunks beyond
//! [`super::REORDER_WINDOW`] of the next one the output needs wait for it
//! to catch up, which bounds memory whatever the peer sends.
//!
//! A stream that came back on a new connection after a lost one
//! ([`resume`](Reassembly::resume), `CAP_RESUME`) replays: its sender sends
//! again, in order, every frame it had not seen acknowledged, so chunks
//! (and its `End`) it carried before may come again. Such a chunk — at or
//! below the last one the stream carried, and delivered or held — is a
//! duplicate ([`replayed`](Reassembly::replayed)), dropped unopened; the
//! first chunk past the stream's last one ends the replay. Elsewhere a
//! chunk that comes twice is an error, as before.
//!
//! The threaded driver (`super::inbound`) keeps one of these under a lock:
//! stream readers [`announce`](Reassembly::announce) and
//! [`insert`](Reassembly::insert) chunks and [`end`](Reassembly::end) their
//! streams; the deliverer [`take`](Reassembly::take)s what is next.

use std::collections::BTreeMap;

use super::REORDER_WINDOW;

/// What the output gets next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// The next chunk, in order.
    Chunk(Vec<u8>),
    /// Every chunk was delivered: the flow is complete.
    Complete {
        /// How many chunks it had.
        chunks: u64,
    },
    /// The next chunk has not come yet and still may.
    Wait,
}

/// A step the rules refuse: the flow cannot complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReassemblyError {
    /// A stream index past the flow's streams.
    #[error("no stream {stream}")]
    NoStream {
        /// The index.
        stream: usize,
    },
    /// A chunk on a stream that had ended.
    #[error("chunk {seq} after the end of stream {stream}")]
    AfterEnd {
        /// The stream.
        stream: usize,
        /// The chunk's sequence number.
        seq: u64,
    },
    /// A chunk whose number is not above the stream's last one.
    #[error("chunk {seq} out of order on stream {stream}, after chunk {last}")]
    OutOfOrder {
        /// The stream.
        stream: usize,
        /// The chunk's sequence number.
        seq: u64,
        /// The stream's last chunk before it.
        last: u64,
    },
    /// A chunk already delivered, held, or at or past the flow's end.
    #[error("chunk {seq} duplicated")]
    Duplicated {
        /// The chunk's sequence number.
        seq: u64,
    },
    /// An `End` that contradicts what came before: the stream had ended,
    /// another `End` named another total, or chunks at or past `total`
    /// were carried.
    #[error("inconsistent end of stream {stream} ({total} chunks)")]
    BadEnd {
        /// The stream.
        stream: usize,
        /// The total its `End` named.
        total: u64,
    },
    /// Every stream ended, and the chunks delivered are not the total
    /// announced.
    #[error("stream ended after {delivered} chunks, sender announced {announced:?}")]
    Short {
        /// Chunks delivered.
        delivered: u64,
        /// The total the `End`s named, if one came.
        announced: Option<u64>,
    },
    /// Every stream passed (or ended before) the chunk the output needs.
    #[error("chunk {seq} was skipped by every stream")]
    Skipped {
        /// The chunk's sequence number.
        seq: u64,
    },
    /// A stream that came back replays a chunk it never carried.
    #[error("chunk {seq} replayed on stream {stream} was never carried")]
    NeverCarried {
        /// The stream.
        stream: usize,
        /// The chunk's sequence number.
        seq: u64,
    },
}

/// The reassembly of one flow carried by `streams` streams.
#[derive(Debug)]
pub struct Reassembly {
    chunks: BTreeMap<u64, Vec<u8>>,
    /// The next sequence number the output needs.
    next: u64,
    /// Total chunks, once an `End` said so.
    total: Option<u64>,
    /// Per stream: the last sequence number it announced, and whether it
    /// ended.
    heads: Vec<(Option<u64>, bool)>,
    /// Per stream: it came back on a new connection and may replay what
    /// it carried before.
    replaying: Vec<bool>,
    /// The local peer left and what was held was dropped: a replayed chunk
    /// can no longer be found among them.
    dropped: bool,
}

impl Reassembly {
    /// The reassembly of a flow over `streams` streams, before anything
    /// arrived.
    pub fn new(streams: usize) -> Self {
        Self {
            chunks: BTreeMap::new(),
            next: 0,
            total: None,
            heads: vec![(None, false); streams],
            replaying: vec![false; streams],
            dropped: false,
        }
    }

    /// Stream `i` came back on a new connection: what it carried before
    /// may come again, in order, before anything new.
    pub fn resume(&mut self, i: usize) {
        if let Some(r) = self.replaying.get_mut(i) {
            *r = true;
        }
    }

    /// Whether chunk `seq` on stream `i` is one the stream carried before it
    /// came back, to be dropped unopened; otherwise it is announced as
    /// usual. A replayed number that was neither delivered nor held is an
    /// error: the stream never carried it.
    pub fn replayed(&mut self, i: usize, seq: u64) -> Result<bool, ReassemblyError> {
        let (Some(&(head, _)), Some(replaying)) = (self.heads.get(i), self.replaying.get_mut(i)) else {
            return Err(ReassemblyError::NoStream { stream: i });
        };
        if !*replaying {
            return Ok(false);
        }
        match head {
            Some(last) if seq <= last => {
                if seq < self.next || self.chunks.contains_key(&seq) || self.dropped {
                    Ok(true)
                } else {
                    Err(ReassemblyError::NeverCarried { stream: i, seq })
                }
            }
            // Past the stream's last chunk: the replay is over.
            _ => {
                *replaying = false;
                Ok(false)
            }
        }
    }

    /// Stream `i` carries chunk `seq` (before it is opened): its numbers
    /// must increase, and it must not have ended.
    pub fn announce(&mut self, i: usize, seq: u64) -> Result<(), ReassemblyError> {
        let Some(head) = self.heads.get_mut(i) else { return Err(ReassemblyError::NoStream { stream: i }) };
        if head.1 {
            return Err(ReassemblyError::AfterEnd { stream: i, seq });
        }
        if let Some(last) = head.0.filter(|&l| seq <= l) {
            return Err(ReassemblyError::OutOfOrder { stream: i, seq, last });
        }
        head.0 = Some(seq);
        Ok(())
    }

    /// Whether chunk `seq` fits the reorder window now (otherwise its reader
    /// waits for the output to catch up).
    pub fn fits(&self, seq: u64) -> bool {
        seq < self.next.saturating_add(REORDER_WINDOW)
    }

    /// Chunk `seq`, opened and verified, announced and fitting.
    pub fn insert(&mut self, seq: u64, data: Vec<u8>) -> Result<(), ReassemblyError> {
        debug_assert!(self.fits(seq));
        if seq < self.next || self.total.is_some_and(|t| seq >= t) || self.chunks.contains_key(&seq) {
            return Err(ReassemblyError::Duplicated { seq });
        }
        self.chunks.insert(seq, data);
        Ok(())
    }

    /// Stream `i` ended, saying the flow had `total` chunks.
    pub fn end(&mut self, i: usize, total: u64) -> Result<(), ReassemblyError> {
        let Some(head) = self.heads.get_mut(i) else { return Err(ReassemblyError::NoStream { stream: i }) };
        if head.1 || self.total.is_some_and(|t| t != total) || head.0.is_some_and(|l| l >= total) {
            return Err(ReassemblyError::BadEnd { stream: i, total });
        }
        // Chunks already held at or past the end were never part of it.
        if self.chunks.range(total..).next().is_some() || self.next > total {
            return Err(ReassemblyError::BadEnd { stream: i, total });
        }
        head.1 = true;
        self.total = Some(total);
        Ok(())
    }

    /// What the output gets next, or why the flow cannot complete.
    pub fn take(&mut self) -> Result<Next, ReassemblyError> {
        if let Some(c) = self.chunks.remove(&self.next) {
            self.next += 1;
            return Ok(Next::Chunk(c));
        }
        if self.heads.iter().all(|h| h.1) {
            return match self.total {
                Some(t) if t == self.next => Ok(Next::Complete { chunks: t }),
                announced => Err(ReassemblyError::Short { delivered: self.next, announced }),
            };
        }
        if self.heads.iter().all(|&(head, ended)| ended || head.is_some_and(|h| h > self.next)) {
            return Err(ReassemblyError::Skipped { seq: self.next });
        }
        Ok(Next::Wait)
    }

    /// The next chunk, if it is here: only a chunk, nothing else of
    /// [`Reassembly::take`] (its end and its errors are the deliverer's).
    pub fn take_chunk(&mut self) -> Option<Vec<u8>> {
        let c = self.chunks.remove(&self.next)?;
        self.next += 1;
        Some(c)
    }

    /// Whether the next chunk is here.
    pub fn chunk_ready(&self) -> bool {
        self.chunks.contains_key(&self.next)
    }

    /// Whether every stream ended and every chunk was taken: `take` would
    /// say complete.
    pub fn complete(&self) -> bool {
        self.heads.iter().all(|h| h.1) && self.total == Some(self.next)
    }

    /// The local peer left: what is held is dropped.
    pub fn drop_held(&mut self) {
        self.chunks.clear();
        self.dropped = true;
    }

    /// Chunks held, waiting for the output.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn held(&self) -> usize {
        self.chunks.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::reader::{Heard as ReaderHeard, ReaderLane};
    use pmigrate_transport::message::{Control, Message};
    use proptest::prelude::*;

    /// A fault on the way, applied to one stream's list of frames.
    #[derive(Clone, Debug)]
    enum Fault {
        None,
        Drop(usize, usize),
        Duplicate(usize, usize),
        Swap(usize, usize),
        /// The stream is cut after this many frames.
        Cut(usize, usize),
        /// The stream's connection is lost after this many frames; it
        /// comes back and replays from this many frames earlier.
        Lose(usize, usize, usize),
    }

    #[derive(Clone, Debug, PartialEq)]
    enum Frame {
        Chunk(u64),
        End(u64),
    }

    /// Runs a flow of `chunks` chunks over `streams` streams (chunk `k` on
    /// stream `place[k] % streams`), frames interleaved by `order`, with
    /// `fault`; returns the output or the error.
    fn run(chunks: u64, streams: usize, place: &[u8], order: &[u8], fault: &Fault) -> Result<Vec<u64>, String> {
        let mut lists: Vec<Vec<Frame>> = vec![Vec::new(); streams];
        for k in 0..chunks {
            let s = place.get(k as usize).map_or(0, |&p| p as usize % streams);
            lists[s].push(Frame::Chunk(k));
        }
        for l in &mut lists {
            l.push(Frame::End(chunks));
        }
        let mut cut = vec![usize::MAX; streams];
        let mut lose = None;
        match *fault {
            Fault::None => {}
            Fault::Drop(s, k) if k < lists[s % streams].len() => drop(lists[s % streams].remove(k)),
            Fault::Duplicate(s, k) if k < lists[s % streams].len() => {
                let f = lists[s % streams][k].clone();
                lists[s % streams].insert(k, f);
            }
            Fault::Swap(s, k) if k + 1 < lists[s % streams].len() => lists[s % streams].swap(k, k + 1),
            Fault::Cut(s, k) => cut[s % streams] = k,
            Fault::Lose(s, k, back) => lose = Some((s % streams, k, back)),
            _ => {}
        }
        let mut at = vec![0usize; streams];
        let mut r = Reassembly::new(streams);
        // Each stream's reader judges its End (a replay after a comeback).
        let mut readers: Vec<ReaderLane> =
            (0..streams).map(|_| ReaderLane::new(true, false, false, true, false)).collect();
        let mut out = Vec::new();
        let mut o = order.iter().cycle();
        loop {
            // The output takes what it can.
            loop {
                match r.take().map_err(|e| e.to_string())? {
                    Next::Chunk(c) => out.push(u64::from_le_bytes(c.try_into().unwrap())),
                    Next::Complete { .. } => return Ok(out),
                    Next::Wait => break,
                }
            }
            // A stream that can deliver, picked by `order`.
            let ready: Vec<usize> = (0..streams)
                .filter(|&s| {
                    at[s] < lists[s].len().min(cut[s])
                        && match lists[s][at[s]] {
                            Frame::Chunk(k) => r.fits(k),
                            Frame::End(_) => true,
                        }
                })
                .collect();
            if ready.is_empty() {
                // Every stream is done, cut, or waiting on the window.
                return Err(if (0..streams).any(|s| at[s] >= cut[s]) { "cut".into() } else { "stuck".into() });
            }
            let s = ready[*o.next().unwrap_or(&0) as usize % ready.len()];
            let f = lists[s][at[s]].clone();
            at[s] += 1;
            match f {
                Frame::Chunk(k) if r.replayed(s, k).map_err(|e| e.to_string())? => {}
                Frame::Chunk(k) => {
                    r.announce(s, k).map_err(|e| e.to_string())?;
                    r.insert(k, k.to_le_bytes().to_vec()).map_err(|e| e.to_string())?;
                }
                Frame::End(t) => match readers[s].heard(Message::Control(Control::End { chunks: t })) {
                    Ok(ReaderHeard::End(t)) => r.end(s, t).map_err(|e| e.to_string())?,
                    Ok(_) => {} // the same End again, after a comeback
                    Err(e) => return Err(format!("{e:?}")),
                },
            }
            // The lost connection: everything after the last frame
            // acknowledged comes again on the new one.
            if let Some((ls, k, back)) = lose.filter(|&(ls, k, _)| ls == s && at[s] == k) {
                at[ls] = k.saturating_sub(back);
                r.resume(ls);
                readers[ls].came_back();
                lose = None;
            }
            assert!(r.held() <= REORDER_WINDOW as usize, "the window bounds what is held");
        }
    }

    proptest! {
        /// Whatever the interleaving of the streams, the output is the
        /// flow in order.
        #[test]
        fn any_interleaving_reassembles_in_order(
            chunks in 0u64..300, streams in 1usize..5,
            place in proptest::collection::vec(any::<u8>(), 300), order in proptest::collection::vec(any::<u8>(), 1..64),
        ) {
            let out = run(chunks, streams, &place, &order, &Fault::None).unwrap();
            prop_assert_eq!(out, (0..chunks).collect::<Vec<_>>());
        }

        /// A dropped, duplicated, reordered or cut frame is an error, never
        /// a wrong output; a fault that changes nothing (a swap of equal
        /// frames) gives the right output.
        #[test]
        fn a_fault_is_an_error_never_a_wrong_output(
            chunks in 1u64..200, streams in 1usize..4,
            place in proptest::collection::vec(any::<u8>(), 200), order in proptest::collection::vec(any::<u8>(), 1..64),
            kind in 0u8..4, s in 0usize..4, k in 0usize..200,
        ) {
            let fault = match kind {
                0 => Fault::Drop(s, k),
                1 => Fault::Duplicate(s, k),
                2 => Fault::Swap(s, k),
                _ => Fault::Cut(s, k),
            };
            if let Ok(out) = run(chunks, streams, &place, &order, &fault) {
                prop_assert_eq!(out, (0..chunks).collect::<Vec<_>>(), "{:?}", fault);
            }
        }
    }

    proptest! {
        /// A stream whose connection is lost and comes back, replaying
        /// what was not acknowledged, gives the right output: replayed
        /// chunks are dropped, not delivered twice nor refused.
        #[test]
        fn a_lost_stream_that_replays_gives_the_flow_whole(
            chunks in 1u64..200, streams in 1usize..4,
            place in proptest::collection::vec(any::<u8>(), 200), order in proptest::collection::vec(any::<u8>(), 1..64),
            s in 0usize..4, k in 0usize..200, back in 0usize..80,
        ) {
            let out = run(chunks, streams, &place, &order, &Fault::Lose(s, k, back));
            prop_assert_eq!(out, Ok((0..chunks).collect::<Vec<_>>()));
        }
    }

    #[test]
    fn only_a_resumed_stream_replays_and_only_what_it_carried() {
        let mut r = Reassembly::new(2);
        for (s, k) in [(0, 0), (1, 1), (0, 2)] {
            assert_eq!(r.replayed(s, k), Ok(false), "nothing replays before a stream came back");
            r.announce(s, k).unwrap();
            r.insert(k, vec![k as u8]).unwrap();
        }
        assert_eq!(r.take().unwrap(), Next::Chunk(vec![0]));
        r.end(0, 4).unwrap();
        // Stream 1 has not come back: its chunk again is a duplicate.
        assert_eq!(r.replayed(1, 1), Ok(false));
        assert!(r.announce(1, 1).is_err());
        r.resume(0);
        // Delivered (0) and held (2) chunks, and its End, come again.
        assert_eq!(r.replayed(0, 0), Ok(true));
        assert_eq!(r.replayed(0, 2), Ok(true));
        // A number at or below its last one that was neither delivered
        // nor held is no replay.
        let mut r2 = Reassembly::new(1);
        r2.announce(0, 5).unwrap();
        r2.resume(0);
        assert!(r2.replayed(0, 3).is_err(), "never carried, never delivered");
        // Past its last chunk the replay is over: later duplicates are errors.
        assert_eq!(r2.replayed(0, 6), Ok(false));
        r2.announce(0, 6).unwrap();
        assert_eq!(r2.replayed(0, 5), Ok(false));
        assert!(r2.announce(0, 5).is_err());
    }

    #[test]
    fn each_fault_is_caught_with_its_reason() {
        let place = [0u8, 1, 0, 1, 0, 1];
        let order = [0u8, 1];
        let err = |f| run(6, 2, &place, &order, &f).unwrap_err();
        assert!(err(Fault::Drop(0, 1)).contains("skipped by every stream"), "{}", err(Fault::Drop(0, 1)));
        assert!(err(Fault::Duplicate(1, 0)).contains("out of order"));
        // Chunk 2 before 0 on stream 0: out of order, or (if stream 1 is
        // already past 0) a gap nobody can fill.
        let e = err(Fault::Swap(0, 0));
        assert!(e.contains("out of order") || e.contains("chunk 0 was skipped"), "{e}");
        assert_eq!(err(Fault::Cut(1, 2)), "cut");
        // Dropping a stream's `End`: the flow never completes.
        assert_eq!(err(Fault::Drop(0, 3)), "stuck");
        assert_eq!(run(6, 2, &place, &order, &Fault::None).unwrap(), (0..6).collect::<Vec<_>>());
    }

    #[test]
    fn ends_must_agree_and_come_after_every_chunk() {
        let mut r = Reassembly::new(2);
        r.announce(0, 0).unwrap();
        r.insert(0, vec![0]).unwrap();
        r.end(0, 2).unwrap();
        assert_eq!(r.end(1, 3), Err(ReassemblyError::BadEnd { stream: 1, total: 3 }), "a different total");
        let mut r = Reassembly::new(1);
        r.announce(0, 5).unwrap();
        assert_eq!(r.end(0, 5), Err(ReassemblyError::BadEnd { stream: 0, total: 5 }), "a chunk at the total");
        let mut r = Reassembly::new(2);
        r.announce(1, 4).unwrap();
        r.insert(4, vec![4]).unwrap();
        assert_eq!(r.end(0, 3), Err(ReassemblyError::BadEnd { stream: 0, total: 3 }), "a held chunk past the total");
        let mut r = Reassembly::new(1);
        r.end(0, 0).unwrap();
        assert_eq!(r.announce(0, 0), Err(ReassemblyError::AfterEnd { stream: 0, seq: 0 }), "a chunk after the end");
        assert_eq!(r.take().unwrap(), Next::Complete { chunks: 0 });
    }
}
