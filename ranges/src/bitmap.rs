//! An atomic page bitmap: one bit a page, safe to set from many threads.
//!
//! Dirty tracking sets bits while send workers fetch-and-clear them, so every
//! operation is a single atomic read-modify-write on a 64-bit word: a bit set
//! concurrently with a [`AtomicBitmap::take_word`] is either taken by it or
//! left for the next one, never lost.

use std::sync::atomic::{AtomicU64, Ordering};

/// A fixed-size bitmap of pages whose bits are set and cleared atomically.
#[derive(Debug)]
pub struct AtomicBitmap {
    words: Box<[AtomicU64]>,
    bits: u64,
}

impl AtomicBitmap {
    /// A bitmap of `bits` bits, all clear.
    pub fn new(bits: u64) -> Self {
        let n = usize::try_from(bits.div_ceil(64)).expect("bitmap size fits the address space");
        let words = (0..n).map(|_| AtomicU64::new(0)).collect();
        Self { words, bits }
    }

    /// A bitmap of `bits` bits, all set.
    pub fn new_full(bits: u64) -> Self {
        let b = Self::new(bits);
        b.set_range(0, bits);
        b
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.bits
    }

    /// Whether the bitmap has no bits at all.
    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    /// Number of 64-bit words.
    pub fn word_count(&self) -> usize {
        self.words.len()
    }

    fn locate(&self, bit: u64) -> (usize, u64) {
        assert!(bit < self.bits, "bit {bit} out of a bitmap of {}", self.bits);
        // bit < bits, and bits/64 fit usize (checked in new).
        ((bit / 64) as usize, 1u64 << (bit % 64))
    }

    /// Sets `bit`. Panics if `bit` is out of range (a caller bug, never peer input).
    pub fn set(&self, bit: u64) {
        let (w, m) = self.locate(bit);
        self.words[w].fetch_or(m, Ordering::AcqRel);
    }

    /// Clears `bit`.
    pub fn clear(&self, bit: u64) {
        let (w, m) = self.locate(bit);
        self.words[w].fetch_and(!m, Ordering::AcqRel);
    }

    /// Whether `bit` is set.
    pub fn test(&self, bit: u64) -> bool {
        let (w, m) = self.locate(bit);
        self.words[w].load(Ordering::Acquire) & m != 0
    }

    /// Clears `bit` and returns whether it was set.
    pub fn fetch_clear(&self, bit: u64) -> bool {
        let (w, m) = self.locate(bit);
        self.words[w].fetch_and(!m, Ordering::AcqRel) & m != 0
    }

    /// Sets bits `[start, start + len)`, a word at a time.
    pub fn set_range(&self, start: u64, len: u64) {
        self.update_range(start, len, |w, m| {
            w.fetch_or(m, Ordering::AcqRel);
        });
    }

    /// Clears bits `[start, start + len)`.
    pub fn clear_range(&self, start: u64, len: u64) {
        self.update_range(start, len, |w, m| {
            w.fetch_and(!m, Ordering::AcqRel);
        });
    }

    fn update_range(&self, start: u64, len: u64, op: impl Fn(&AtomicU64, u64)) {
        let end = start.checked_add(len).expect("bit range overflows");
        assert!(end <= self.bits, "bit range {start}..{end} out of {}", self.bits);
        let mut bit = start;
        while bit < end {
            let off = bit % 64;
            let n = (64 - off).min(end - bit);
            let mask = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << off };
            op(&self.words[(bit / 64) as usize], mask);
            bit += n;
        }
    }

    /// Atomically takes word `w` (bits `64*w ..`), leaving it clear.
    pub fn take_word(&self, w: usize) -> u64 {
        self.words[w].swap(0, Ordering::AcqRel)
    }

    /// Reads word `w` without changing it.
    pub fn load_word(&self, w: usize) -> u64 {
        self.words[w].load(Ordering::Acquire)
    }

    /// ORs `bits` into word `w`.
    pub fn or_word(&self, w: usize, bits: u64) {
        if bits != 0 {
            self.words[w].fetch_or(bits, Ordering::AcqRel);
        }
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.load(Ordering::Acquire).count_ones())).sum()
    }

    /// Clears every bit. Words already clear are only read, so clearing a
    /// mostly empty bitmap costs a read of it, not a write.
    pub fn clear_all(&self) {
        for w in self.words.iter() {
            if w.load(Ordering::Relaxed) != 0 {
                w.store(0, Ordering::Release);
            }
        }
    }

    /// ORs every bit of `other` (same length) into `self`, clearing `other`.
    pub fn drain_into(&self, other: &AtomicBitmap) {
        assert_eq!(self.bits, other.bits, "bitmaps of different sizes");
        for (i, w) in other.words.iter().enumerate() {
            // Read first: an atomic swap of every word of a huge, mostly
            // clean bitmap would cost a write per word.
            if w.load(Ordering::Relaxed) != 0 {
                self.or_word(i, w.swap(0, Ordering::AcqRel));
            }
        }
    }

    /// Iterates over the runs of set bits in `[start, end)` as `(first, len)`,
    /// reading (not clearing) a word at a time. Bits that change during the
    /// iteration may or may not be seen.
    pub fn runs(&self, start: u64, end: u64) -> Runs<'_> {
        let end = end.min(self.bits);
        Runs { map: self, pos: start.min(end), end }
    }
}

/// Iterator over runs of set bits; see [`AtomicBitmap::runs`].
pub struct Runs<'a> {
    map: &'a AtomicBitmap,
    pos: u64,
    end: u64,
}

impl Runs<'_> {
    /// The next bit at or after `from` (below `end`) whose value is `value`.
    fn seek(&self, from: u64, value: bool) -> u64 {
        let mut bit = from;
        while bit < self.end {
            let w = (bit / 64) as usize;
            let raw = self.map.words[w].load(Ordering::Acquire);
            let word = if value { raw } else { !raw };
            let masked = word & (u64::MAX << (bit % 64));
            if masked != 0 {
                let found = (w as u64) * 64 + u64::from(masked.trailing_zeros());
                return found.min(self.end);
            }
            bit = (w as u64 + 1) * 64;
        }
        self.end
    }
}

impl Iterator for Runs<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let first = self.seek(self.pos, true);
        if first >= self.end {
            self.pos = self.end;
            return None;
        }
        let stop = self.seek(first, false);
        self.pos = stop;
        Some((first, stop - first))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn set_test_clear() {
        let b = AtomicBitmap::new(130);
        assert!(!b.test(129));
        b.set(129);
        b.set(0);
        assert!(b.test(129) && b.test(0));
        assert_eq!(b.count(), 2);
        assert!(b.fetch_clear(129));
        assert!(!b.fetch_clear(129));
        assert_eq!(b.count(), 1);
    }

    #[test]
    fn full_bitmap_has_no_stray_bits() {
        let b = AtomicBitmap::new_full(70);
        assert_eq!(b.count(), 70);
        assert_eq!(b.runs(0, 70).collect::<Vec<_>>(), vec![(0, 70)]);
    }

    proptest! {
        #[test]
        fn runs_match_a_naive_scan(bits in proptest::collection::vec(any::<bool>(), 0..400),
                                   lo in 0u64..400, hi in 0u64..400) {
            let b = AtomicBitmap::new(bits.len() as u64);
            for (i, &v) in bits.iter().enumerate() {
                if v { b.set(i as u64) }
            }
            let (lo, hi) = (lo.min(hi), lo.max(hi));
            let mut expect = Vec::new();
            let mut i = lo;
            let end = hi.min(bits.len() as u64);
            while i < end {
                if bits[i as usize] {
                    let s = i;
                    while i < end && bits[i as usize] { i += 1 }
                    expect.push((s, i - s));
                } else { i += 1 }
            }
            prop_assert_eq!(b.runs(lo, hi).collect::<Vec<_>>(), expect);
        }

        #[test]
        fn set_range_matches_single_sets(len in 1u64..300, start in 0u64..300, n in 0u64..300) {
            let start = start % len;
            let n = n.min(len - start);
            let a = AtomicBitmap::new(len);
            let b = AtomicBitmap::new(len);
            a.set_range(start, n);
            for i in start..start + n { b.set(i) }
            for i in 0..len { prop_assert_eq!(a.test(i), b.test(i)) }
            a.clear_range(start, n);
            prop_assert_eq!(a.count(), 0);
        }
    }

    #[test]
    fn concurrent_sets_are_never_lost() {
        let b = std::sync::Arc::new(AtomicBitmap::new(64 * 64));
        let taken = std::sync::Arc::new(AtomicBitmap::new(64 * 64));
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let b = b.clone();
                s.spawn(move || {
                    for i in (t..64 * 64).step_by(4) {
                        b.set(i);
                    }
                });
            }
            let (b, taken) = (b.clone(), taken.clone());
            s.spawn(move || {
                for _ in 0..1000 {
                    for w in 0..b.word_count() {
                        taken.or_word(w, b.take_word(w));
                    }
                }
            });
        });
        taken.drain_into(&b);
        assert_eq!(taken.count(), 64 * 64);
    }
}
