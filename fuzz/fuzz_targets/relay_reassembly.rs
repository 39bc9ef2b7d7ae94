//! The byte-stream relay's reassembly, driven by any sequence of chunks,
//! ends, takes and comebacks (a stream on a new connection, which may
//! replay) over up to four streams, as the stream readers and the
//! deliverer call it.
//!
//! Properties: the output is chunk 0, 1, 2, … in order, each with the
//! bytes inserted for it, once — a replayed chunk is never delivered
//! again; the flow completes only after every chunk up to the total `End`
//! named was delivered; the reorder window bounds what is held; a refused
//! step is final for the flow (the driver ends it).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pmigrate_engine::fuzzing::{Next, Reassembly};
use pmigrate_engine::relay::REORDER_WINDOW;

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
                if r.replayed_end(i, total) { Ok(()) } else { r.end(i, total) }
            }
            Op::Resume { stream } => {
                r.resume(usize::from(stream) % streams);
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
