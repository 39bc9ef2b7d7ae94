//! Guest memory, page by page: the ground every other pmigrate crate stands on.
//!
//! - [`addr`]: [`Gpa`] (guest physical address), [`PageIdx`] (a 4 KiB page of
//!   one region), [`RegionIdx`] and [`PageRange`]; checked arithmetic only.
//! - [`region`]: [`GuestMemory`], a table of [`GuestRegion`]s, each a host
//!   mapping (anonymous, private or shared file, or the embedder's own).
//! - [`bitmap`]: [`AtomicBitmap`], one bit a page, set and taken atomically.
//! - [`shard`]: cutting dirty pages into shards and spreading them over
//!   workers with work stealing.
//! - [`range_lock`]: [`RangeLock`], shared and exclusive locks on page ranges.
//!
//! ```
//! use pmigrate_ranges::{AtomicBitmap, GuestMemory, PageIdx, PAGE_SIZE};
//!
//! let mem = GuestMemory::anonymous(16 * PAGE_SIZE as u64).unwrap();
//! let region = &mem.regions()[0];
//! region.write_pages(PageIdx(3), &[1u8; PAGE_SIZE]).unwrap();
//! let dirty = AtomicBitmap::new(region.pages());
//! dirty.set(3);
//! assert_eq!(dirty.runs(0, region.pages()).collect::<Vec<_>>(), vec![(3, 1)]);
//! ```
#![warn(missing_docs)]

pub mod addr;
pub mod bitmap;
pub mod range_lock;
pub mod region;
pub mod shard;

pub use addr::{Gpa, PageIdx, PageRange, RegionIdx, PAGE_SHIFT, PAGE_SIZE, PAGE_SIZE_U64};
pub use bitmap::AtomicBitmap;
pub use range_lock::{RangeGuard, RangeLock};
pub use region::{Backing, GuestMemory, GuestRegion, HostPageSize, MemoryError};
pub use shard::{distribute, distribute_late, plan_shards, ShardWorker, DEFAULT_SHARD_PAGES};
