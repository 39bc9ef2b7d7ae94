//! Address newtypes: guest physical addresses and page indices.
//!
//! A guest physical address ([`Gpa`]) names a byte in the guest's address
//! space; a page index ([`PageIdx`]) names a 4 KiB page *within one region*.
//! The two are never mixed: converting between them goes through a region,
//! which knows its base and length, and every step is checked.

use std::fmt;

/// Size of the migration page: 4 KiB, the unit of dirty tracking and transfer.
pub const PAGE_SIZE: usize = 4096;
/// `log2(PAGE_SIZE)`.
pub const PAGE_SHIFT: u32 = 12;
/// [`PAGE_SIZE`] as `u64`, for address arithmetic.
pub const PAGE_SIZE_U64: u64 = PAGE_SIZE as u64;

/// A guest physical address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Gpa(pub u64);

impl Gpa {
    /// The address `bytes` further on, or `None` on overflow.
    pub fn checked_add(self, bytes: u64) -> Option<Gpa> {
        self.0.checked_add(bytes).map(Gpa)
    }

    /// Bytes from `base` to `self`, or `None` when `self` lies below `base`.
    pub fn checked_offset_from(self, base: Gpa) -> Option<u64> {
        self.0.checked_sub(base.0)
    }

    /// Whether the address is aligned to `align` (a power of two).
    pub fn is_aligned(self, align: u64) -> bool {
        debug_assert!(align.is_power_of_two());
        self.0 & (align - 1) == 0
    }
}

impl fmt::Display for Gpa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// Index of a 4 KiB page within one region (page 0 is the region's first).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageIdx(pub u64);

impl PageIdx {
    /// Byte offset of this page from the start of its region, or `None` on overflow.
    pub fn byte_offset(self) -> Option<u64> {
        self.0.checked_mul(PAGE_SIZE_U64)
    }

    /// The page `n` pages further on, or `None` on overflow.
    pub fn checked_add(self, n: u64) -> Option<PageIdx> {
        self.0.checked_add(n).map(PageIdx)
    }

    /// The index as `usize`, for indexing host-side tables. Region sizes are
    /// checked against the host address space when the region is built, so a
    /// page index that passed a region's bounds check always fits.
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).expect("page index checked against a mapped region")
    }
}

impl fmt::Display for PageIdx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "page {}", self.0)
    }
}

/// Index of a region in a [`crate::GuestMemory`] table (and on the wire).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RegionIdx(pub u32);

impl RegionIdx {
    /// The index as `usize`.
    pub fn as_usize(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for RegionIdx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "region {}", self.0)
    }
}

/// A half-open range of pages `[start, end)` in one region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageRange {
    /// The region the pages belong to.
    pub region: RegionIdx,
    /// First page.
    pub start: PageIdx,
    /// One past the last page.
    pub end: PageIdx,
}

impl PageRange {
    /// Number of pages in the range.
    pub fn len(&self) -> u64 {
        self.end.0.saturating_sub(self.start.0)
    }

    /// Whether the range holds no page.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_arithmetic_refuses_overflow() {
        assert_eq!(Gpa(u64::MAX).checked_add(1), None);
        assert_eq!(Gpa(10).checked_offset_from(Gpa(11)), None);
        assert_eq!(Gpa(10).checked_offset_from(Gpa(4)), Some(6));
        assert_eq!(PageIdx(u64::MAX / 2).byte_offset(), None);
        assert_eq!(PageIdx(3).byte_offset(), Some(3 * 4096));
        assert!(Gpa(0x20_0000).is_aligned(0x20_0000));
        assert!(!Gpa(0x1000).is_aligned(0x20_0000));
    }
}
