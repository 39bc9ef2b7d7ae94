//! Frame buffers carved from one anonymous mapping, so that a ring can
//! register the whole arena as one fixed buffer.
//!
//! A [`FramePool`] is `slots` slots of `slot_bytes` each (every slot starts
//! on a page boundary) in one `mmap`. A [`FrameBuf`] owns one slot
//! exclusively and gives it back on drop; when every slot is taken, or when
//! made with [`FrameBuf::heap`], it owns an ordinary `Vec<u8>` instead. The
//! mapping is unmapped when the last of the pool handles, buffers and
//! writers that registered it is gone: each holds an `Arc` to it.
//!
//! A buffer never grows past its capacity (frames have a known maximum
//! size, and a slot cannot be reallocated): [`FrameBuf::resize`],
//! [`FrameBuf::extend_from_slice`] and `io::Write` refuse instead, so a
//! length taken from the wire cannot make it panic.

use std::fmt;
use std::io;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, PoisonError};

use pmigrate_ranges::PAGE_SIZE;

/// One anonymous private read-write mapping (not inherited by a forked
/// child), unmapped on drop.
///
/// It hands out raw pointers only; whoever makes slices of it promises
/// exclusivity (a [`FrameBuf`] for its slot, the reader for its staging).
pub(super) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory with no thread affinity; `Mapping`
// itself never reads or writes it, and every owner of a part of it (a
// `FrameBuf`, a reader) serialises its own access through `&mut self`.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` only yields the address and the length.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` (> 0) zeroed bytes.
    pub(super) fn new(len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        }
        // SAFETY: an anonymous private mapping at an address the kernel
        // chooses creates new memory and touches no existing object.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned address 0"))?;
        let map = Self { ptr, len };
        // Registered pages are pinned, and a fork would have to copy pinned
        // private pages into the child; a child (which execs) never needs
        // them. Best effort: without it a fork is only slower.
        // SAFETY: advice on exactly the range just mapped, owned by `map`.
        let _ = unsafe { libc::madvise(p, len, libc::MADV_DONTFORK) };
        Ok(map)
    }

    /// A mapping of nothing, for leaving a real one leaked in its place.
    pub(super) fn empty() -> Self {
        Self { ptr: NonNull::dangling(), len: 0 }
    }

    pub(super) fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// The whole mapping, as `IORING_REGISTER_BUFFERS` takes it.
    pub(super) fn iovec(&self) -> libc::iovec {
        libc::iovec { iov_base: self.ptr().cast(), iov_len: self.len }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len != 0 {
            // SAFETY: `ptr`/`len` are exactly what mmap returned, and this
            // is the last owner: every user holds the mapping (or the `Arc`
            // around it) for as long as it makes slices or I/O of it.
            unsafe { libc::munmap(self.ptr().cast(), self.len) };
        }
    }
}

/// Why a pool could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// Zero slots or zero-byte slots.
    #[error("frame pool of {slots} slots of {slot_bytes} bytes is empty")]
    Empty {
        /// Slots asked for.
        slots: usize,
        /// Bytes per slot asked for.
        slot_bytes: usize,
    },
    /// The arena size overflows the address space.
    #[error("frame pool of {slots} slots of {slot_bytes} bytes is too large")]
    TooLarge {
        /// Slots asked for.
        slots: usize,
        /// Bytes per slot asked for.
        slot_bytes: usize,
    },
    /// `mmap` failed.
    #[error("mapping a frame pool of {bytes} bytes: {source}")]
    Map {
        /// Size of the mapping.
        bytes: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// A frame buffer cannot grow past its capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("frame buffer of {capacity} bytes cannot hold {needed}")]
pub struct CapacityError {
    /// Length that was asked for (saturating at `usize::MAX`).
    pub needed: usize,
    /// The buffer's capacity.
    pub capacity: usize,
}

struct Pool {
    map: Mapping,
    /// Distance between slot starts: `slot_bytes` rounded up to a page.
    stride: usize,
    slot_bytes: usize,
    slots: usize,
    /// Indices of free slots; the most recently freed is reused first.
    free: Mutex<Vec<usize>>,
}

impl Pool {
    fn free_list(&self) -> std::sync::MutexGuard<'_, Vec<usize>> {
        // A panic while holding the lock cannot leave the list inconsistent
        // (a push or a pop), so a poisoned lock is still good.
        self.free.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A fixed set of equal frame buffers in one anonymous mapping, which a
/// ring can register whole as one fixed buffer.
///
/// `slots` slots of `slot_bytes` each, every slot starting on a page
/// boundary. [`take`](Self::take) hands out a [`FrameBuf`] that owns one
/// slot until dropped, or a heap buffer of the same capacity when every slot
/// is taken. The mapping is unmapped when the last pool handle, buffer and
/// writer that registered it is gone: each holds an `Arc` to it. Cheap to
/// clone (an `Arc`).
#[derive(Clone)]
pub struct FramePool {
    inner: Arc<Pool>,
}

impl fmt::Debug for FramePool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FramePool")
            .field("slots", &self.inner.slots)
            .field("slot_bytes", &self.inner.slot_bytes)
            .field("free", &self.free_slots())
            .finish()
    }
}

impl FramePool {
    /// Maps `slots` slots of `slot_bytes` bytes (each rounded up to a page
    /// in the mapping; the buffers' capacity stays `slot_bytes`).
    pub fn new(slots: usize, slot_bytes: usize) -> Result<Self, PoolError> {
        if slots == 0 || slot_bytes == 0 {
            return Err(PoolError::Empty { slots, slot_bytes });
        }
        let stride = slot_bytes
            .checked_next_multiple_of(PAGE_SIZE)
            .and_then(|s| s.checked_mul(slots).map(|_| s))
            .ok_or(PoolError::TooLarge { slots, slot_bytes })?;
        let bytes = stride * slots; // checked just above
        let map = Mapping::new(bytes).map_err(|source| PoolError::Map { bytes, source })?;
        let free = Mutex::new((0..slots).rev().collect());
        Ok(Self { inner: Arc::new(Pool { map, stride, slot_bytes, slots, free }) })
    }

    /// A slot of the pool, or `None` when every slot is taken.
    pub fn try_take(&self) -> Option<FrameBuf> {
        let index = self.inner.free_list().pop()?;
        Some(FrameBuf { repr: Repr::Slot { pool: Arc::clone(&self.inner), index, len: 0 } })
    }

    /// A slot of the pool, or a heap buffer of the same capacity when every
    /// slot is taken.
    pub fn take(&self) -> FrameBuf {
        self.try_take().unwrap_or_else(|| FrameBuf::heap(self.inner.slot_bytes))
    }

    /// Capacity of each buffer.
    pub fn slot_bytes(&self) -> usize {
        self.inner.slot_bytes
    }

    /// Number of slots.
    pub fn slots(&self) -> usize {
        self.inner.slots
    }

    /// Slots not taken right now.
    pub fn free_slots(&self) -> usize {
        self.inner.free_list().len()
    }

    /// The whole arena, for registration as one fixed buffer.
    pub(super) fn iovec(&self) -> libc::iovec {
        self.inner.map.iovec()
    }

    /// Whether `buf` is a slot of this pool (and so inside [`Self::iovec`]).
    pub(super) fn owns(&self, buf: &FrameBuf) -> bool {
        matches!(&buf.repr, Repr::Slot { pool, .. } if Arc::ptr_eq(pool, &self.inner))
    }
}

enum Repr {
    /// Slot `index` of `pool`; its first `len` bytes are the contents.
    Slot { pool: Arc<Pool>, index: usize, len: usize },
    /// A heap buffer that may hold at most `cap` bytes.
    Heap { vec: Vec<u8>, cap: usize },
}

/// A byte buffer of fixed capacity that owns a [`FramePool`] slot, or a
/// `Vec<u8>` (when the pool was dry, or made by [`FrameBuf::heap`]).
///
/// Dereferences to its contents (`len` bytes). It never grows past its
/// capacity (frames have a known maximum size, and a slot cannot be
/// reallocated): [`resize`](Self::resize),
/// [`extend_from_slice`](Self::extend_from_slice) and `io::Write` refuse
/// instead, so a length taken from the wire cannot make it panic.
pub struct FrameBuf {
    repr: Repr,
}

impl FrameBuf {
    /// A heap buffer (not from any pool) that holds at most `capacity` bytes.
    /// Its storage is allocated now, whole.
    pub fn heap(capacity: usize) -> Self {
        Self { repr: Repr::Heap { vec: Vec::with_capacity(capacity), cap: capacity } }
    }

    /// Whether this buffer is a pool slot (else it is a heap buffer).
    pub fn is_pooled(&self) -> bool {
        matches!(self.repr, Repr::Slot { .. })
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        match &self.repr {
            Repr::Slot { len, .. } => *len,
            Repr::Heap { vec, .. } => vec.len(),
        }
    }

    /// Whether no bytes are held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Most bytes this buffer can hold.
    pub fn capacity(&self) -> usize {
        match &self.repr {
            Repr::Slot { pool, .. } => pool.slot_bytes,
            Repr::Heap { cap, .. } => *cap,
        }
    }

    /// Drops the contents, keeping the storage.
    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Shortens to `len` bytes; no effect when already that short.
    pub fn truncate(&mut self, new_len: usize) {
        match &mut self.repr {
            Repr::Slot { len, .. } => *len = (*len).min(new_len),
            Repr::Heap { vec, .. } => vec.truncate(new_len),
        }
    }

    /// Sets the length to `new_len`, filling new bytes with `value`.
    pub fn resize(&mut self, new_len: usize, value: u8) -> Result<(), CapacityError> {
        self.check(new_len)?;
        let old = self.len();
        if let Repr::Heap { vec, .. } = &mut self.repr {
            vec.resize(new_len, value);
        } else if new_len > old {
            self.slot_mut()[old..new_len].fill(value);
            self.set_slot_len(new_len);
        } else {
            self.set_slot_len(new_len);
        }
        Ok(())
    }

    /// Grows (or shrinks) to `new_len` without writing the bytes gained: in
    /// a slot they hold what the slot held before (an earlier frame's bytes,
    /// or the mapping's zeros), a heap buffer zero-fills them. For a caller
    /// that overwrites what it uses, as a frame being built does.
    pub fn resize_keeping(&mut self, new_len: usize) -> Result<(), CapacityError> {
        self.check(new_len)?;
        match &mut self.repr {
            Repr::Heap { vec, .. } => vec.resize(new_len, 0),
            Repr::Slot { .. } => self.set_slot_len(new_len),
        }
        Ok(())
    }

    /// Appends `bytes`.
    pub fn extend_from_slice(&mut self, bytes: &[u8]) -> Result<(), CapacityError> {
        let old = self.len();
        self.check(old.saturating_add(bytes.len()))?;
        if let Repr::Heap { vec, .. } = &mut self.repr {
            vec.extend_from_slice(bytes);
        } else {
            self.slot_mut()[old..old + bytes.len()].copy_from_slice(bytes);
            self.set_slot_len(old + bytes.len());
        }
        Ok(())
    }

    /// The contents.
    pub fn as_slice(&self) -> &[u8] {
        match &self.repr {
            Repr::Slot { len, .. } => &self.slot()[..*len],
            Repr::Heap { vec, .. } => vec,
        }
    }

    /// The contents, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let len = self.len();
        match self.repr {
            Repr::Heap { ref mut vec, .. } => vec,
            Repr::Slot { .. } => &mut self.slot_mut()[..len],
        }
    }

    fn check(&self, needed: usize) -> Result<(), CapacityError> {
        let capacity = self.capacity();
        if needed > capacity {
            return Err(CapacityError { needed, capacity });
        }
        Ok(())
    }

    fn set_slot_len(&mut self, new_len: usize) {
        if let Repr::Slot { len, .. } = &mut self.repr {
            *len = new_len;
        }
    }

    /// The whole slot (`slot_bytes`); empty for a heap buffer.
    fn slot(&self) -> &[u8] {
        match &self.repr {
            // SAFETY: `index < slots`, so the slot's `slot_bytes <= stride`
            // bytes lie inside the mapping, which `pool` keeps mapped. This
            // buffer owns the slot exclusively (it came off the free list and
            // goes back only in `drop`), so no `&mut` to it exists while
            // `&self` is borrowed. Every byte is initialised: the mapping
            // started zeroed and is only ever written with `u8`s.
            Repr::Slot { pool, index, .. } => unsafe {
                std::slice::from_raw_parts(pool.map.ptr().add(index * pool.stride), pool.slot_bytes)
            },
            Repr::Heap { .. } => &[],
        }
    }

    /// The whole slot, writable; empty for a heap buffer.
    fn slot_mut(&mut self) -> &mut [u8] {
        match &mut self.repr {
            // SAFETY: as in `slot`; `&mut self` makes this the only
            // reference into the slot while it lives. (A writer owning this
            // buffer never calls this while the kernel reads the slot.)
            Repr::Slot { pool, index, .. } => unsafe {
                std::slice::from_raw_parts_mut(pool.map.ptr().add(*index * pool.stride), pool.slot_bytes)
            },
            Repr::Heap { .. } => &mut [],
        }
    }
}

impl Drop for FrameBuf {
    fn drop(&mut self) {
        if let Repr::Slot { pool, index, .. } = &self.repr {
            pool.free_list().push(*index);
        }
    }
}

impl Deref for FrameBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl DerefMut for FrameBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl fmt::Debug for FrameBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let slot = match &self.repr {
            Repr::Slot { index, .. } => Some(*index),
            Repr::Heap { .. } => None,
        };
        f.debug_struct("FrameBuf")
            .field("slot", &slot)
            .field("len", &self.len())
            .field("capacity", &self.capacity())
            .finish()
    }
}

/// Writes as much as fits; a full buffer takes 0 bytes (so `write_all`
/// fails with `WriteZero`).
impl io::Write for FrameBuf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(self.capacity() - self.len());
        self.extend_from_slice(&buf[..n]).map_err(io::Error::other)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<FrameBuf>();
    send_sync::<FramePool>();
};

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;

    #[test]
    fn slots_are_reused() {
        let pool = FramePool::new(2, 1000).unwrap();
        let a = pool.take();
        let addr = a.as_ptr();
        assert!(a.is_pooled());
        assert_eq!((a.len(), a.capacity()), (0, 1000));
        assert_eq!(pool.free_slots(), 1);
        drop(a);
        assert_eq!(pool.free_slots(), 2);
        let b = pool.take();
        assert_eq!(b.as_ptr(), addr, "the slot just freed is handed out again");
        let c = pool.take();
        assert_ne!(c.as_ptr(), addr);
        // slots start on page boundaries
        assert_eq!(b.as_ptr() as usize % PAGE_SIZE, 0);
        assert_eq!(c.as_ptr() as usize % PAGE_SIZE, 0);
    }

    #[test]
    fn falls_back_to_the_heap_when_exhausted() {
        let pool = FramePool::new(2, 64).unwrap();
        let held: Vec<_> = (0..2).map(|_| pool.take()).collect();
        assert!(held.iter().all(FrameBuf::is_pooled));
        assert!(pool.try_take().is_none());
        let mut h = pool.take();
        assert!(!h.is_pooled());
        assert!(!pool.owns(&h));
        assert!(pool.owns(&held[0]));
        assert_eq!(h.capacity(), 64);
        h.resize(64, 7).unwrap();
        assert_eq!(h.resize(65, 7), Err(CapacityError { needed: 65, capacity: 64 }));
        drop(held);
        assert!(pool.take().is_pooled());
    }

    #[test]
    fn contents_survive_moves_between_threads() {
        let pool = FramePool::new(4, 1 << 16).unwrap();
        let mut b = pool.take();
        let data: Vec<u8> = (0..60_000u32).map(|i| (i * 7 + i / 256) as u8).collect();
        b.extend_from_slice(&data).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let mut b: FrameBuf = rx.recv().unwrap();
            assert_eq!(b.len(), 60_000);
            b[0] ^= 0xff;
            b
        });
        tx.send(b).unwrap();
        let mut b = t.join().unwrap();
        b[0] ^= 0xff;
        assert_eq!(&b[..], &data[..]);
    }

    #[test]
    fn mapping_outlives_the_pool_handle() {
        let pool = FramePool::new(1, 4096).unwrap();
        let weak = Arc::downgrade(&pool.inner);
        let mut b = pool.take();
        drop(pool);
        assert!(weak.upgrade().is_some(), "a buffer keeps the mapping");
        b.extend_from_slice(b"still mapped").unwrap();
        assert_eq!(&b[..], b"still mapped");
        drop(b);
        assert!(weak.upgrade().is_none(), "the last buffer unmaps it");
    }

    #[test]
    fn write_stops_at_capacity() {
        let pool = FramePool::new(1, 10).unwrap();
        let mut b = pool.take();
        assert_eq!(b.write(b"0123456").unwrap(), 7);
        assert_eq!(b.write(b"789abc").unwrap(), 3);
        assert_eq!(b.write_all(b"x").unwrap_err().kind(), io::ErrorKind::WriteZero);
        assert_eq!(&b[..], b"0123456789");
    }

    #[test]
    fn rejects_empty_and_huge_pools() {
        assert!(matches!(FramePool::new(0, 10), Err(PoolError::Empty { .. })));
        assert!(matches!(FramePool::new(10, 0), Err(PoolError::Empty { .. })));
        assert!(matches!(FramePool::new(usize::MAX / 2, 8192), Err(PoolError::TooLarge { .. })));
        assert!(matches!(FramePool::new(1, usize::MAX), Err(PoolError::TooLarge { .. })));
    }

    #[derive(Clone, Debug)]
    enum Op {
        Resize(usize, u8),
        Truncate(usize),
        Extend(Vec<u8>),
        Clear,
        Poke(usize, u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0usize..300, any::<u8>()).prop_map(|(n, v)| Op::Resize(n, v)),
            (0usize..300).prop_map(Op::Truncate),
            proptest::collection::vec(any::<u8>(), 0..100).prop_map(Op::Extend),
            Just(Op::Clear),
            (0usize..300, any::<u8>()).prop_map(|(i, v)| Op::Poke(i, v)),
        ]
    }

    proptest! {
        /// A slot buffer, a heap buffer and a `Vec` capped at the same
        /// capacity agree after any sequence of operations, including a slot
        /// reused with stale bytes in it.
        #[test]
        fn behaves_like_a_capped_vec(ops in proptest::collection::vec(op(), 0..60)) {
            const CAP: usize = 200;
            let pool = FramePool::new(1, CAP).unwrap();
            let mut dirty = pool.take();
            dirty.resize(CAP, 0xaa).unwrap();
            drop(dirty);
            let mut bufs = [pool.take(), FrameBuf::heap(CAP)];
            prop_assert!(bufs[0].is_pooled());
            let mut oracle: Vec<u8> = Vec::new();
            for op in ops {
                let fits = match &op {
                    Op::Resize(n, _) => *n <= CAP,
                    Op::Extend(b) => oracle.len() + b.len() <= CAP,
                    _ => true,
                };
                match &op {
                    Op::Resize(n, v) if fits => oracle.resize(*n, *v),
                    Op::Truncate(n) => oracle.truncate(*n),
                    Op::Extend(b) if fits => oracle.extend_from_slice(b),
                    Op::Clear => oracle.clear(),
                    Op::Poke(i, v) => if let Some(x) = oracle.get_mut(*i) { *x = *v },
                    _ => {}
                }
                for b in &mut bufs {
                    match &op {
                        Op::Resize(n, v) => prop_assert_eq!(b.resize(*n, *v).is_ok(), fits),
                        Op::Truncate(n) => b.truncate(*n),
                        Op::Extend(x) => prop_assert_eq!(b.extend_from_slice(x).is_ok(), fits),
                        Op::Clear => b.clear(),
                        Op::Poke(i, v) => if let Some(x) = b.get_mut(*i) { *x = *v },
                    }
                    prop_assert_eq!(&b[..], &oracle[..]);
                    prop_assert_eq!(b.len(), oracle.len());
                    prop_assert_eq!(b.capacity(), CAP);
                }
            }
        }
    }
}
