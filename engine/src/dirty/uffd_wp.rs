//! Placeholder until the userfaultfd write-protect tracker lands.
use pmigrate_ranges::{AtomicBitmap, GuestMemory};

use super::{DirtyError, DirtyTracker};

/// Whether the kernel offers the tracker.
pub fn probe() -> Result<(), DirtyError> {
    Err(DirtyError::Unsupported { tracker: "uffd-wp", why: "not built yet".into() })
}

/// userfaultfd write-protect tracker.
#[derive(Debug, Default)]
pub struct UffdWpTracker;

impl UffdWpTracker {
    /// A tracker.
    pub fn new() -> Self {
        Self
    }
}

impl DirtyTracker for UffdWpTracker {
    fn name(&self) -> &'static str {
        "uffd-wp"
    }
    fn start(&mut self, _mem: &GuestMemory) -> Result<(), DirtyError> {
        probe()
    }
    fn collect(&mut self, _mem: &GuestMemory, _out: &[AtomicBitmap]) -> Result<(), DirtyError> {
        probe()
    }
    fn stop(&mut self, _mem: &GuestMemory) {}
}
