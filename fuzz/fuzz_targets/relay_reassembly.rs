//! The byte-stream relay's reassembly, driven by any sequence of chunks,
//! ends, takes and comebacks (a stream on a new connection, which may
//! replay) over up to four streams, as the stream readers and the
//! deliverer call it, each stream's `End`s judged by its reader's rules
//! (`ReaderLane`).
//!
//! Properties: the output is chunk 0, 1, 2, … in order, each with the
//! bytes inserted for it, once — a replayed chunk is never delivered
//! again; the flow completes only after every chunk up to the total `End`
//! named was delivered; the reorder window bounds what is held; a refused
//! step is final for the flow (the driver ends it).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pmigrate_engine::fuzzing::{Next, ReaderHeard, ReaderLane, Reassembly};
use pmigrate_engine::relay::REORDER_WINDOW;
use pmigrate_transport::message::{Control, Message};

#[derive(Arbitrary, Debug)]
enum Op {
    Chunk { stream: u8, seq: u16 },
    End { stream: u8, total: u16 },
    Take,
    Resume { stream: u8 },
}

fuzz_target!(|input: (u8, Vec<Op>)| {
    let (streams, ops) = input;
    let streams = usize::from(streams % 4) + 1;
    let mut r = Reassembly::new(streams);
    // Each stream's reader judges its `End`s: one, or the same one again
    // after a comeback.
    let mut readers: Vec<ReaderLane> = (0..streams).map(|_| ReaderLane::new(true, false, false, true, false)).collect();
    let mut delivered = 0u64;
    for op in ops.iter().take(4096) {
        let step = match *op {
            Op::Chunk { stream, seq } => {
                let (i, seq) = (usize::from(stream) % streams, u64::from(seq));
                match r.replayed(i, seq) {
                    Ok(true) => Ok(()), // dropped unopened
                    Ok(false) => r.announce(i, seq).and_then(|()| {
                        // A reader holds a chunk that does not fit until the
                        // output catches up; here it is simply not inserted.
                        if r.fits(seq) { r.insert(seq, seq.to_le_bytes().to_vec()) } else { Ok(()) }
                    }),
                    Err(e) => Err(e),
                }
            }
            Op::End { stream, total } => {
                let (i, total) = (usize::from(stream) % streams, u64::from(total));
                match readers[i].heard(Message::Control(Control::End { chunks: total })) {
                    Ok(ReaderHeard::End(total)) => r.end(i, total),
                    Ok(_) => Ok(()),
                    Err(_) => return, // refused: the driver ends the flow
                }
            }
            Op::Resume { stream } => {
                let i = usize::from(stream) % streams;
                r.resume(i);
                readers[i].came_back();
                Ok(())
            }
            Op::Take => loop {
                match r.take() {
                    Ok(Next::Chunk(c)) => {
                        assert_eq!(c, delivered.to_le_bytes(), "out of order");
                        delivered += 1;
                    }
                    Ok(Next::Complete { chunks }) => {
                        assert_eq!(chunks, delivered, "complete before every chunk was delivered");
                        return;
                    }
                    Ok(Next::Wait) => break Ok(()),
                    Err(e) => break Err(e),
                }
            },
        };
        assert!(r.held() <= REORDER_WINDOW as usize, "more held than the window");
        if step.is_err() {
            return;
        }
    }
});
