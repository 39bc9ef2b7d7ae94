//! One relay stream's writer as a state machine (protocol.md §7.4,
//! `super::resume`), with no sockets, threads or clocks: what it writes
//! next (the frames queued for it, an `Ack` of what its stream's reader
//! took, a keepalive, and after a comeback everything the other end may
//! not have), when it half-closes its connection, and when it stops.
//! `super::outbound::stream_writer` moves the frames and tells it what
//! happened; time comes in as `now`.
//!
//! Without `CAP_RESUME` the writer writes what is queued, half-closes the
//! connection at the queue's end, and stops. With it, it also keeps every
//! chunk it wrote until the other end acknowledges it, takes nothing new
//! while that buffer is full, takes a lost connection back (a failed
//! write is not a failure), sends it all again on the new connection
//! before anything else, and half-closes only once this end is complete,
//! staying until the other end ended the stream too (a comeback may still
//! need it).

use std::time::{Duration, Instant};

use pmigrate_transport::backend::{Outgoing, URING_DEPTH};
use pmigrate_transport::message::Control;
use pmigrate_transport::net::{keepalive_frame, KEEPALIVE_INTERVAL};

use super::resume::{Unacked, ACK_EVERY, ACK_TICK};

/// How long a half-closed writer waits for a wake-up before it looks
/// again whether the stream or the relay is over.
const CLOSED_TICK: Duration = Duration::from_millis(100);

/// What the writer knows of the rest of the relay at a step.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Facts {
    /// The relay failed.
    pub(crate) failed: bool,
    /// The generation of the stream's connection now: a comeback raises it.
    pub(crate) generation: u64,
    /// The other end acknowledged every chunk of this stream below this.
    pub(crate) acknowledged: u64,
    /// The stream's reader took every chunk below this...
    pub(crate) taken: u64,
    /// ...and took this many since the last `Ack` was written.
    pub(crate) taken_since_ack: u64,
    /// This end is complete (it may half-close a resumable stream).
    pub(crate) complete: bool,
    /// The other end ended this stream cleanly.
    pub(crate) finished: bool,
    /// The relay is over.
    pub(crate) closing: bool,
}

/// What the writer's driver does next.
#[derive(Debug)]
pub(crate) enum Do {
    /// Nothing more: the relay failed, or the stream is over.
    Stop,
    /// The stream came back on a new connection: write on it from now on
    /// (a new frame writer), then [`WriterLane::switched`].
    Switch,
    /// Write these frames in order, then [`WriterLane::written`] or
    /// [`WriterLane::write_failed`]. With `ack`, one of them is an `Ack`:
    /// the reader's count since the last one starts again.
    Write { frames: Vec<Outgoing>, ack: bool },
    /// Half-close the connection (this end sends no more on it).
    HalfClose,
    /// Wait for a queued frame (only when `take`: there is room for it),
    /// a wake-up, or `until`; hand over what came ([`WriterLane::queued`],
    /// [`WriterLane::queue_ended`]), then step again.
    Wait { take: bool, until: Instant },
}

/// What a failed write means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Failed {
    /// The connection of this generation was lost: take the stream back
    /// (`super::Shared::recover`); what was not acknowledged is kept.
    Recover(u64),
    /// The relay fails.
    Fail,
}

/// One stream's writer.
pub(crate) struct WriterLane {
    resumable: bool,
    /// The generation of the connection it writes on.
    generation: u64,
    /// The queue may bring more.
    open: bool,
    /// This connection was half-closed.
    closed: bool,
    /// What the last `Ack` on this connection said, and when.
    acked_sent: u64,
    last_ack: Instant,
    last_write: Instant,
    /// What the other end may still need (resumable only).
    kept: Unacked,
    /// Frames to write next: a replay after a comeback, the queue's.
    batch: Vec<Outgoing>,
    /// Frames written and no longer needed, for reuse.
    freed: Vec<Outgoing>,
}

impl WriterLane {
    /// A writer on the connection of `generation`.
    pub(crate) fn new(resumable: bool, generation: u64, now: Instant) -> Self {
        Self {
            resumable,
            generation,
            open: true,
            closed: false,
            acked_sent: 0,
            last_ack: now,
            last_write: now,
            kept: Unacked::default(),
            batch: Vec::new(),
            freed: Vec::new(),
        }
    }

    /// What to do next, knowing `f`.
    pub(crate) fn step(&mut self, f: &Facts, now: Instant) -> Do {
        if f.failed {
            return Do::Stop;
        }
        let mut ack = false;
        if self.resumable {
            if f.generation > self.generation {
                return Do::Switch;
            }
            let freed = &mut self.freed;
            self.kept.release(f.acknowledged, |fr| freed.push(fr));
            let tick_over = now.saturating_duration_since(self.last_ack) >= ACK_TICK;
            if !self.closed && f.taken > self.acked_sent && (f.taken_since_ack >= ACK_EVERY || tick_over) {
                self.batch.push(Control::Ack { next: f.taken }.encode().into());
                (self.acked_sent, self.last_ack, ack) = (f.taken, now, true);
            }
        }
        if !self.batch.is_empty() {
            return Do::Write { frames: std::mem::take(&mut self.batch), ack };
        }
        if !self.open && !self.closed && (!self.resumable || f.complete) {
            self.closed = true;
            return Do::HalfClose;
        }
        if self.closed {
            if !self.resumable || f.finished || f.closing {
                return Do::Stop;
            }
            return Do::Wait { take: false, until: now + CLOSED_TICK };
        }
        let keepalive_at = self.last_write + KEEPALIVE_INTERVAL;
        if now >= keepalive_at {
            return Do::Write { frames: vec![keepalive_frame().to_vec().into()], ack: false };
        }
        let ack_at = (self.resumable && f.taken > self.acked_sent).then_some(self.last_ack + ACK_TICK);
        let until = ack_at.map_or(keepalive_at, |a| a.min(keepalive_at));
        Do::Wait { take: self.open && self.kept.room(), until }
    }

    /// A frame came off the queue: it goes out with the next write.
    pub(crate) fn queued(&mut self, frame: Vec<u8>) {
        if self.resumable {
            self.kept.handed(&frame);
        }
        self.batch.push(frame.into());
    }

    /// Whether another queued frame may join the batch now: up to a
    /// batch at a time (one chain, one system call, with io_uring), while
    /// the resend buffer has room.
    pub(crate) fn takes_more(&self) -> bool {
        self.batch.len() < URING_DEPTH && self.kept.room()
    }

    /// Every producer is done: nothing more comes on the queue.
    pub(crate) fn queue_ended(&mut self) {
        self.open = false;
    }

    /// The write went out; `done` are the frames the writer is finished
    /// with.
    pub(crate) fn written(&mut self, done: Vec<Outgoing>, now: Instant) {
        self.last_write = now;
        if self.resumable {
            self.kept.keep(done);
        } else {
            self.freed.extend(done);
        }
    }

    /// The write failed: `done` were written, `unsent` were not (wholly);
    /// `lost` says the connection was lost rather than the write refused.
    pub(crate) fn write_failed(&mut self, done: Vec<Outgoing>, unsent: Vec<Outgoing>, lost: bool) -> Failed {
        if !(self.resumable && lost) {
            return Failed::Fail;
        }
        self.kept.keep(done);
        self.kept.keep(unsent);
        Failed::Recover(self.generation)
    }

    /// The writer now writes on the connection of `generation`; `done`
    /// are the frames the old connection's writer is finished with.
    /// Everything the other end may not have goes out first; returns how
    /// many chunks that sends again.
    pub(crate) fn switched(&mut self, generation: u64, done: Vec<Outgoing>) -> u64 {
        self.kept.keep(done);
        self.kept.keep(self.batch.drain(..));
        (self.generation, self.closed, self.acked_sent) = (generation, false, 0);
        let (frames, chunks) = self.kept.replay();
        self.batch = frames;
        chunks
    }

    /// Frames no longer needed, to reuse.
    pub(crate) fn freed(&mut self) -> std::vec::Drain<'_, Outgoing> {
        self.freed.drain(..)
    }
}

#[cfg(test)]
mod tests {
    use pmigrate_transport::frame::{FrameHdr, FrameKind, HEADER_LEN};
    use pmigrate_transport::message::Message;
    use pmigrate_transport::payload::build_data;

    use super::*;

    fn chunk(seq: u64) -> Vec<u8> {
        let mut f = Vec::new();
        build_data(&mut f, seq, &[seq as u8; 100], false);
        f
    }

    /// What a frame is: `d<seq>`, `ack<next>`, `end`, `ka`.
    fn what(f: &Outgoing) -> String {
        let hdr = FrameHdr::decode(f.as_slice()[..HEADER_LEN].try_into().unwrap()).unwrap();
        match hdr.kind {
            FrameKind::Data => format!("d{}", hdr.aux),
            FrameKind::Keepalive => "ka".into(),
            FrameKind::End => "end".into(),
            _ => match Message::decode(hdr, &f.as_slice()[HEADER_LEN..]) {
                Ok(Message::Control(Control::Ack { next })) => format!("ack{next}"),
                other => format!("{other:?}"),
            },
        }
    }

    fn names(d: &Do) -> Vec<String> {
        match d {
            Do::Write { frames, .. } => frames.iter().map(what).collect(),
            other => vec![format!("{other:?}")],
        }
    }

    /// Writes what the writer wants written, all successfully.
    fn write(w: &mut WriterLane, f: &Facts, now: Instant) -> Vec<String> {
        match w.step(f, now) {
            Do::Write { frames, .. } => {
                let out = frames.iter().map(what).collect();
                w.written(frames, now);
                out
            }
            other => panic!("expected a write, got {other:?}"),
        }
    }

    /// Without resumption: the queue's frames go out in order, batched;
    /// at the queue's end the connection is half-closed and the writer
    /// stops; frames written are freed for reuse at once.
    #[test]
    fn without_resumption_the_queue_goes_out_then_a_half_close_then_stop() {
        let t = Instant::now();
        let f = Facts::default();
        let mut w = WriterLane::new(false, 0, t);
        assert!(matches!(w.step(&f, t), Do::Wait { take: true, .. }));
        for s in 0..3 {
            w.queued(chunk(s));
        }
        assert_eq!(write(&mut w, &f, t), ["d0", "d1", "d2"]);
        assert_eq!(w.freed().count(), 3);
        w.queue_ended();
        assert!(matches!(w.step(&f, t), Do::HalfClose));
        assert!(matches!(w.step(&f, t), Do::Stop));
        // A failed write fails the relay, lost connection or not.
        let mut w = WriterLane::new(false, 0, t);
        w.queued(chunk(0));
        let Do::Write { frames, .. } = w.step(&f, t) else { panic!() };
        assert_eq!(w.write_failed(Vec::new(), frames, true), Failed::Fail);
        // Once the relay failed, it stops, whatever is queued.
        let mut w = WriterLane::new(false, 0, t);
        w.queued(chunk(0));
        assert!(matches!(w.step(&Facts { failed: true, ..f }, t), Do::Stop));
    }

    /// A writer with nothing to write says `Keepalive` once a second, and
    /// waits no longer than that; a half-closed one says nothing more.
    #[test]
    fn an_idle_writer_says_keepalive_each_interval_until_it_half_closes() {
        let t = Instant::now();
        let f = Facts::default();
        for resumable in [false, true] {
            let mut w = WriterLane::new(resumable, 0, t);
            let Do::Wait { until, .. } = w.step(&f, t) else { panic!() };
            assert_eq!(until, t + KEEPALIVE_INTERVAL);
            let later = t + KEEPALIVE_INTERVAL;
            assert_eq!(write(&mut w, &f, later), ["ka"]);
            let Do::Wait { until, .. } = w.step(&f, later) else { panic!() };
            assert_eq!(until, later + KEEPALIVE_INTERVAL, "the interval counts from the last write");
            w.queue_ended();
            let done = Facts { complete: true, ..f };
            assert!(matches!(w.step(&done, later), Do::HalfClose));
            let much_later = later + 10 * KEEPALIVE_INTERVAL;
            match w.step(&done, much_later) {
                Do::Stop => assert!(!resumable),
                // Waiting, without spinning, for the other end to end the stream.
                Do::Wait { take: false, until } => assert!(resumable && until > much_later),
                other => panic!("{other:?}"),
            }
        }
    }

    /// With resumption the reader's chunks are acknowledged once
    /// `ACK_EVERY` were taken, or once any were and the tick passed; not
    /// twice for the same count, and not on a half-closed connection.
    #[test]
    fn taken_chunks_are_acknowledged_by_count_or_by_tick() {
        let t = Instant::now();
        let mut w = WriterLane::new(true, 0, t);
        let few = Facts { taken: 3, taken_since_ack: 3, ..Facts::default() };
        let Do::Wait { until, .. } = w.step(&few, t) else { panic!() };
        assert_eq!(until, t + ACK_TICK, "a trickle waits for the tick, no longer");
        assert_eq!(write(&mut w, &few, t + ACK_TICK), ["ack3"]);
        assert!(matches!(w.step(&few, t + ACK_TICK), Do::Wait { .. }), "acknowledged once");
        let many = Facts { taken: 3 + ACK_EVERY, taken_since_ack: ACK_EVERY, ..few };
        let Do::Write { ack: true, .. } = w.step(&many, t + ACK_TICK) else { panic!("count reached: at once") };
        // The ack rides with the queued frames, in the same write.
        w.queued(chunk(0));
        let more = Facts { taken: 30, taken_since_ack: ACK_EVERY, ..many };
        assert_eq!(names(&w.step(&more, t + ACK_TICK)), ["d0", "ack30"]);
        // Half-closed, it acknowledges nothing more.
        let mut w = WriterLane::new(true, 0, t);
        w.queue_ended();
        let done = Facts { complete: true, ..Facts::default() };
        assert!(matches!(w.step(&done, t), Do::HalfClose));
        let late = Facts { taken: 5, taken_since_ack: ACK_EVERY, ..done };
        assert!(matches!(w.step(&late, t + ACK_TICK), Do::Wait { take: false, .. }));
    }

    /// With resumption, a lost connection is no failure: what was written
    /// and not acknowledged, what was not written, and the `End` after
    /// them go out again, in order, on the new connection before anything
    /// new; what the other end acknowledged is freed and not sent again;
    /// the next `Ack` on the new connection repeats what the reader took.
    #[test]
    fn a_lost_connection_is_replayed_in_order_on_the_new_one() {
        let t = Instant::now();
        let mut w = WriterLane::new(true, 1, t);
        let f = Facts { generation: 1, ..Facts::default() };
        for s in 0..3 {
            w.queued(chunk(s));
        }
        assert_eq!(write(&mut w, &f, t), ["d0", "d1", "d2"]);
        assert_eq!(w.freed().count(), 0, "kept until acknowledged");
        // The other end acknowledges d0; the reader took 4 chunks.
        let f = Facts { acknowledged: 1, taken: 4, taken_since_ack: ACK_EVERY, ..f };
        w.queued(chunk(3));
        w.queued(Control::End { chunks: 5 }.encode());
        w.queue_ended();
        let Do::Write { frames, ack: true } = w.step(&f, t) else { panic!() };
        assert_eq!(w.freed().count(), 1, "d0 is freed");
        // d3 went out, the ack and the End did not.
        let mut frames = frames;
        let unsent = frames.split_off(1);
        assert_eq!(w.write_failed(frames, unsent, true), Failed::Recover(1));
        // Until the stream is back it waits; then it switches.
        assert!(matches!(w.step(&f, t), Do::Wait { .. }));
        let back = Facts { generation: 2, ..f };
        assert!(matches!(w.step(&back, t), Do::Switch));
        assert_eq!(w.switched(2, Vec::new()), 3, "d1, d2, d3 again");
        assert_eq!(write(&mut w, &back, t), ["d1", "d2", "d3", "end", "ack4"]);
        // Complete: half-close, then stay until the other end ends the stream.
        let complete = Facts { complete: true, acknowledged: 4, ..back };
        assert!(matches!(w.step(&complete, t), Do::HalfClose));
        assert_eq!(w.freed().count(), 3);
        assert!(matches!(w.step(&complete, t), Do::Wait { take: false, .. }));
        // A comeback after the half-close opens the new connection again,
        // with the End the other end may not have.
        let again = Facts { generation: 3, ..complete };
        assert!(matches!(w.step(&again, t), Do::Switch));
        assert_eq!(w.switched(3, Vec::new()), 0);
        assert_eq!(write(&mut w, &again, t), ["end", "ack4"]);
        assert!(matches!(w.step(&again, t), Do::HalfClose));
        assert!(matches!(w.step(&Facts { finished: true, ..again }, t), Do::Stop));
        // A refused write (not a lost connection) fails the relay.
        let mut w = WriterLane::new(true, 0, t);
        w.queued(chunk(0));
        let Do::Write { frames, .. } = w.step(&Facts::default(), t) else { panic!() };
        assert_eq!(w.write_failed(Vec::new(), frames, false), Failed::Fail);
    }

    /// A resumable writer takes nothing new while its resend buffer is
    /// full, and takes again once the other end acknowledges; it
    /// half-closes only once this end is complete.
    #[test]
    fn a_full_resend_buffer_stops_the_queue_and_an_ack_opens_it() {
        let t = Instant::now();
        let mut w = WriterLane::new(true, 0, t);
        let f = Facts::default();
        let mut seq = 0;
        while w.kept.room() {
            let mut big = Vec::new();
            build_data(&mut big, seq, &vec![1u8; super::super::CHUNK], false);
            w.queued(big);
            seq += 1;
            if !w.takes_more() {
                // A full batch, or a full buffer: written.
                write(&mut w, &f, t);
            }
        }
        assert!(matches!(w.step(&f, t), Do::Wait { take: false, .. }), "full: the queue waits");
        let acked = Facts { acknowledged: seq, ..f };
        assert!(matches!(w.step(&acked, t), Do::Wait { take: true, .. }));
        assert_eq!(w.freed().count() as u64, seq);
        w.queue_ended();
        assert!(matches!(w.step(&acked, t), Do::Wait { take: false, .. }), "not complete: no half-close yet");
        assert!(matches!(w.step(&Facts { complete: true, ..acked }, t), Do::HalfClose));
    }
}
