//! Dirty tracking supplied by the embedding VMM.

use std::sync::Arc;

use pmigrate_ranges::{AtomicBitmap, GuestMemory};

use super::{check_shape, DirtyError, DirtyTracker};

/// A tracker over bitmaps the VMM fills: it sets a page's bit after the
/// guest wrote it (from KVM's dirty log, or its own device emulation), and
/// `collect` moves the bits over atomically, word by word, so a bit set
/// during `collect` is either taken now or left for the next call.
#[derive(Debug, Clone)]
pub struct VmmBitmapTracker {
    maps: Arc<[AtomicBitmap]>,
}

impl VmmBitmapTracker {
    /// A tracker over `maps`, one bitmap per region, one bit per 4 KiB page.
    pub fn new(maps: Arc<[AtomicBitmap]>) -> Self {
        Self { maps }
    }

    /// Bitmaps for `mem`, all clear, for a VMM to share with a tracker.
    pub fn bitmaps_for(mem: &GuestMemory) -> Arc<[AtomicBitmap]> {
        mem.regions().iter().map(|r| AtomicBitmap::new(r.pages())).collect()
    }
}

impl DirtyTracker for VmmBitmapTracker {
    fn name(&self) -> &'static str {
        "vmm-bitmap"
    }

    fn start(&mut self, mem: &GuestMemory) -> Result<(), DirtyError> {
        check_shape(mem, &self.maps)?;
        for m in self.maps.iter() {
            m.clear_all();
        }
        Ok(())
    }

    fn collect(&mut self, mem: &GuestMemory, out: &[AtomicBitmap]) -> Result<(), DirtyError> {
        check_shape(mem, out)?;
        for (o, m) in out.iter().zip(self.maps.iter()) {
            o.drain_into(m);
        }
        Ok(())
    }

    fn stop(&mut self, _mem: &GuestMemory) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use pmigrate_ranges::PAGE_SIZE_U64;

    #[test]
    fn moves_bits_and_leaves_later_ones() {
        let mem = GuestMemory::anonymous(128 * PAGE_SIZE_U64).unwrap();
        let maps = VmmBitmapTracker::bitmaps_for(&mem);
        let mut t = VmmBitmapTracker::new(maps.clone());
        t.start(&mem).unwrap();
        maps[0].set(7);
        let out = [AtomicBitmap::new(128)];
        t.collect(&mem, &out).unwrap();
        assert!(out[0].test(7));
        assert_eq!(maps[0].count(), 0);
        maps[0].set(9);
        assert!(!out[0].test(9));
    }
}
