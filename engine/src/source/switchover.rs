//! Post-copy's switchover on the source (protocol.md §7.2.2): the bitmap
//! of the pages still to come goes on stream 0, then a marker on every
//! stream; from then on the guest may run at the destination.

use std::sync::atomic::Ordering;

use crossbeam_channel::Sender;
use pmigrate_ranges::{AtomicBitmap, PageIdx, PageRange, RegionIdx};
use pmigrate_transport::message::{Control, NeedBitmap, Round};

use super::streams::Msg;
use super::Run;
use crate::MigrateError;

impl Run<'_> {
    /// Starts post-copy as round `round`: the bitmap of pages to come on
    /// stream 0, then a marker on every stream (see [`crate::postcopy`]).
    pub(super) fn switch_over(
        &self,
        txs: &[Sender<Msg>],
        round: u64,
        dirty: &[AtomicBitmap],
    ) -> Result<(), MigrateError> {
        /// Pages per bitmap piece: 4 MiB of bitmap, 128 GiB of memory.
        const PIECE: u64 = (pmigrate_transport::frame::MAX_PAYLOAD as u64) * 8;
        self.state().switched_over(round);
        self.progress.handed_over.store(true, Ordering::Release);
        let send =
            |tx: &Sender<Msg>, c: Control<'_>| tx.send(Msg::Control(c.encode())).map_err(|_| MigrateError::Aborted);
        let round = Round(round);
        for (r, map) in dirty.iter().enumerate() {
            let mut first = 0;
            while first < map.len() {
                let count = (map.len() - first).min(PIECE);
                if map.runs(first, first + count).next().is_some() {
                    let words = (first / 64) as usize..(first + count).div_ceil(64) as usize;
                    let mut bits: Vec<u8> = words.flat_map(|w| map.load_word(w).to_le_bytes()).collect();
                    bits.truncate(count.div_ceil(8) as usize);
                    let range =
                        PageRange { region: RegionIdx(r as u32), start: PageIdx(first), end: PageIdx(first + count) };
                    let need = Some(NeedBitmap { range, bits: &bits });
                    send(&txs[0], Control::Switchover { round, last: false, need })?;
                }
                first += count;
            }
        }
        for tx in txs {
            send(tx, Control::Switchover { round, last: true, need: None })?;
        }
        Ok(())
    }
}
