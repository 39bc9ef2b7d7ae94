//! Shared/exclusive locks on page ranges of one region.
//!
//! Several actors work on the same guest-memory region at once: migration
//! workers copy out page batches, dirty tracking harvests and clears bits, and
//! the userfaultfd handler installs faulted pages during post-copy. Almost
//! always they touch *disjoint* page ranges, and then they must not serialize
//! on each other; only when two of them touch the same pages, and at least one
//! of them changes those pages, must one wait. A [`RangeLock`] gives exactly
//! that: [`RangeLock::read`] takes `[start, end)` shared (any number of
//! overlapping readers), [`RangeLock::write`] takes it exclusive (it overlaps
//! no other holder), and the returned [`RangeGuard`] releases it on drop.
//! Ranges are page indices within the region, half-open.
//!
//! # Design
//!
//! One [`Mutex`] guards a small table: the ranges currently held and the
//! requests waiting, in arrival order. Taking or releasing a range is one short
//! critical section (scan the table, push or remove an entry); a caller blocks
//! only when its range really conflicts, and then it spins briefly and sleeps
//! on a [`Condvar`] of its own. Alternatives and why they lose here:
//!
//! - a lock word per page costs memory for millions of pages and one atomic
//!   operation per page, so taking a 512-page batch would be 512 of them;
//! - one `RwLock` per region serializes workers on disjoint ranges, which is
//!   the common case this lock exists for;
//! - an interval tree makes the scan logarithmic, but the table holds one
//!   entry per range held or awaited, which is about one per thread using the
//!   lock (the workers plus the fault handler: tens), and a linear scan of a
//!   `Vec` that short beats pointer chasing. Every operation costs
//!   O(held + waiting) under the mutex.
//!
//! The mutex is taken twice per use (take, release), so when the work done
//! under a range is only tens of nanoseconds, one region-wide `Mutex` is
//! cheaper even for disjoint ranges; the range lock pays off once holders do
//! real work (copying a batch of pages), which then runs in parallel.
//!
//! ## Fairness: no writer starvation
//!
//! A blocking request is admitted only if it conflicts neither with a held
//! range nor with an *earlier waiting* request. So a writer waiting behind
//! readers is not overtaken by a stream of new overlapping readers: they queue
//! behind it. Conflicting requests are served in arrival order (this also
//! keeps readers from starving behind writers); a request that conflicts with
//! nothing held or waiting goes straight through, however many others wait
//! elsewhere in the region. The cost is that waiting can chain: with `[0, 10)`
//! held and a writer waiting for `[5, 15)`, a request for `[12, 20)` queues
//! behind that writer and so, indirectly, behind `[0, 10)`, which it does not
//! overlap. [`RangeLock::try_read`] and
//! [`RangeLock::try_write`] follow the same rule: they succeed exactly when the
//! blocking call would not have waited.
//!
//! ## Wake-ups: direct hand-off, no thundering herd
//!
//! Releasing a range re-examines only the waiters that overlap it, in arrival
//! order, and grants each one that no longer conflicts with anything held or
//! waiting ahead of it: the releaser inserts the waiter's range into the held
//! table itself and sets the waiter's own flag. A granted thread therefore
//! owns its range already and returns without retrying, and no thread is
//! woken only to find it must sleep again. Only a release can unblock a
//! waiter: a waiter granted by a hand-off keeps blocking whatever it blocked
//! while waiting, so a grant never wakes anybody else.
//!
//! A waiter first polls its flag for a short while (`SPIN_LIMIT`), outside
//! the mutex, and only then sleeps on a condition variable of its own, which
//! the releaser signals only if the waiter is asleep. Two threads trading a
//! range they hold briefly then hand it over without system calls.
//!
//! The price of strict hand-off is the usual one of fair locks: when more
//! threads than CPUs hammer the *same* range, a release must wait for the
//! next owner to be scheduled, where an unfair `Mutex` lets the running
//! thread take the lock again. Overlap is the rare case for this lock, so it
//! is the right trade (the `range_lock` bench measures both cases).
//!
//! ## Deadlock rules
//!
//! The lock is not re-entrant. A thread holding a range must not request an
//! overlapping range that conflicts with it (it would wait for itself), and,
//! because of the fairness rule, must not take a second overlapping *read*
//! either: a writer that queued in between waits for the first read, and the
//! second read waits behind the writer. Threads that hold several ranges at
//! once should take them in ascending order of `start`.
//!
//! # Example
//!
//! ```
//! use pmigrate_ranges::RangeLock;
//!
//! let lock = RangeLock::new();
//! let batch = lock.write(0, 512); // a send worker's batch
//! let fault = lock.write(512, 513); // a fault elsewhere does not wait
//! assert!(lock.try_read(100, 101).is_none()); // inside the batch: it would
//! assert_eq!(lock.held(), 2);
//! drop((batch, fault));
//! assert_eq!(lock.held(), 0);
//! ```

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

/// How a range is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Shared,
    Exclusive,
}

/// A non-empty half-open page range `[start, end)` and the mode it is wanted in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    start: u64,
    end: u64,
    mode: Mode,
}

impl Span {
    /// The span `[start, end)` in `mode`.
    ///
    /// # Panics
    ///
    /// If `start >= end`.
    #[track_caller]
    fn new(start: u64, end: u64, mode: Mode) -> Self {
        assert!(start < end, "RangeLock: empty page range [{start}, {end}) (start must be below end)");
        Self { start, end, mode }
    }

    fn overlaps(&self, other: &Span) -> bool {
        self.start < other.end && other.start < self.end
    }

    /// Whether the two spans may not be held at the same time.
    fn conflicts(&self, other: &Span) -> bool {
        self.overlaps(other) && (self.mode == Mode::Exclusive || other.mode == Mode::Exclusive)
    }
}

/// Where a blocked request waits until a releaser grants it its range.
#[derive(Default)]
struct Slot {
    cv: Condvar,
    /// Set by the releaser that moved the request into the held table, with
    /// `Release`, so that a waiter spinning on it outside the mutex (with
    /// `Acquire`) sees everything the previous holders did in the range.
    granted: AtomicBool,
    /// Set by the waiter when it gives up spinning and sleeps on `cv`; only
    /// accessed with the state mutex held, so `Relaxed` suffices. A releaser
    /// signals `cv` only if it is set: a spinning waiter needs no system call.
    sleeping: AtomicBool,
}

/// How many times a blocked request polls its [`Slot`] before it sleeps.
/// A `spin_loop` hint takes tens of cycles, so this covers a holder that
/// touches a few pages, a few microseconds at most: then the hand-off costs
/// no system call and no context switch on either side, and a holder that
/// copies whole batches is not waited for by burning a CPU for long.
const SPIN_LIMIT: u32 = 100;

/// A range somebody holds; `id` is what its guard releases it by.
struct Held {
    id: u64,
    span: Span,
}

/// A blocked request; it keeps its `id` when granted.
struct Waiter {
    id: u64,
    span: Span,
    slot: Arc<Slot>,
}

/// Everything behind the mutex.
#[derive(Default)]
struct State {
    held: Vec<Held>,
    /// Blocked requests in arrival order.
    waiters: Vec<Waiter>,
    next_id: u64,
}

impl State {
    fn new_id(&mut self) -> u64 {
        let id = self.next_id;
        // A u64 counter bumped once per acquisition does not wrap in practice.
        self.next_id = self.next_id.wrapping_add(1);
        id
    }

    /// Whether `span` must wait: it conflicts with a held range or with one
    /// of the first `ahead` waiters (those that arrived before it).
    fn blocked(&self, span: &Span, ahead: usize) -> bool {
        self.held.iter().any(|h| h.span.conflicts(span)) || self.waiters[..ahead].iter().any(|w| w.span.conflicts(span))
    }

    /// Takes `span` if nothing held or waiting stands in its way.
    fn try_take(&mut self, span: Span) -> Option<u64> {
        if self.blocked(&span, self.waiters.len()) {
            return None;
        }
        let id = self.new_id();
        self.held.push(Held { id, span });
        Some(id)
    }

    /// Drops held range `id` and grants every waiter that this unblocks;
    /// returns the slots of those that sleep, to be signalled once the mutex
    /// is released.
    fn release(&mut self, id: u64) -> Vec<Arc<Slot>> {
        let pos =
            self.held.iter().position(|h| h.id == id).expect("RangeLock: a live guard's range is in the held table");
        let freed = self.held.swap_remove(pos).span;

        // Only waiters overlapping `freed` can have been waiting for it; a
        // grant below never unblocks anyone (see the module docs), so one
        // pass in arrival order suffices.
        let mut woken = Vec::new();
        let mut i = 0;
        while i < self.waiters.len() {
            let span = self.waiters[i].span;
            if span.overlaps(&freed) && !self.blocked(&span, i) {
                let w = self.waiters.remove(i);
                self.held.push(Held { id: w.id, span });
                w.slot.granted.store(true, Ordering::Release);
                if w.slot.sleeping.load(Ordering::Relaxed) {
                    woken.push(w.slot);
                }
            } else {
                i += 1;
            }
        }
        woken
    }
}

/// Shared/exclusive locks on half-open page ranges `[start, end)` of one
/// region.
///
/// Readers ([`read`](Self::read)) may overlap each other; a writer
/// ([`write`](Self::write)) overlaps nobody. A request that conflicts with
/// no range held or awaited never waits beyond a short critical section;
/// conflicting requests are served in arrival order, so writers are not
/// starved by readers. See the
/// [module docs](self) for the design, and for the rules that keep a thread
/// holding several ranges from deadlocking.
///
/// # Panics
///
/// Every acquiring method panics if `start >= end`: an empty range is a bug
/// in the caller.
pub struct RangeLock {
    state: Mutex<State>,
}

impl RangeLock {
    /// A lock with no range held.
    pub fn new() -> Self {
        Self { state: Mutex::new(State::default()) }
    }

    /// Takes `[start, end)` shared, waiting while a writer holds or waits for
    /// an overlapping range.
    ///
    /// # Panics
    ///
    /// If `start >= end`.
    #[track_caller]
    pub fn read(&self, start: u64, end: u64) -> RangeGuard<'_> {
        self.acquire(Span::new(start, end, Mode::Shared))
    }

    /// Takes `[start, end)` exclusive, waiting while anybody holds or waits
    /// for an overlapping range.
    ///
    /// # Panics
    ///
    /// If `start >= end`.
    #[track_caller]
    pub fn write(&self, start: u64, end: u64) -> RangeGuard<'_> {
        self.acquire(Span::new(start, end, Mode::Exclusive))
    }

    /// Takes `[start, end)` shared if [`read`](Self::read) would not wait,
    /// else returns `None`.
    ///
    /// # Panics
    ///
    /// If `start >= end`.
    #[track_caller]
    pub fn try_read(&self, start: u64, end: u64) -> Option<RangeGuard<'_>> {
        self.try_acquire(Span::new(start, end, Mode::Shared))
    }

    /// Takes `[start, end)` exclusive if [`write`](Self::write) would not
    /// wait, else returns `None`.
    ///
    /// # Panics
    ///
    /// If `start >= end`.
    #[track_caller]
    pub fn try_write(&self, start: u64, end: u64) -> Option<RangeGuard<'_>> {
        self.try_acquire(Span::new(start, end, Mode::Exclusive))
    }

    /// Number of ranges held right now, for tests and diagnostics; other
    /// threads may change it as soon as it is read.
    pub fn held(&self) -> usize {
        self.state().held.len()
    }

    /// Number of requests blocked right now.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.state().waiters.len()
    }

    /// Number of blocked requests that stopped spinning and sleep.
    #[cfg(test)]
    fn sleeping(&self) -> usize {
        self.state().waiters.iter().filter(|w| w.slot.sleeping.load(Ordering::Relaxed)).count()
    }

    fn acquire(&self, span: Span) -> RangeGuard<'_> {
        let mut state = self.state();
        if let Some(id) = state.try_take(span) {
            return self.guard(id, span);
        }
        let id = state.new_id();
        let slot = Arc::new(Slot::default());
        state.waiters.push(Waiter { id, span, slot: Arc::clone(&slot) });
        drop(state);
        // The releaser that grants us moves our range into the held table
        // before setting `granted`, so once it is set we own the range.
        for _ in 0..SPIN_LIMIT {
            if slot.granted.load(Ordering::Acquire) {
                return self.guard(id, span);
            }
            std::hint::spin_loop();
        }
        let state = self.state();
        // Checked under the mutex before sleeping, so a grant made between
        // the last poll and now is seen here rather than lost.
        slot.sleeping.store(true, Ordering::Relaxed);
        let _state = slot
            .cv
            .wait_while(state, |_| !slot.granted.load(Ordering::Relaxed))
            .unwrap_or_else(PoisonError::into_inner);
        self.guard(id, span)
    }

    fn try_acquire(&self, span: Span) -> Option<RangeGuard<'_>> {
        let id = self.state().try_take(span)?;
        Some(self.guard(id, span))
    }

    /// The guard for held range `id`.
    fn guard(&self, id: u64, span: Span) -> RangeGuard<'_> {
        RangeGuard { lock: self, id, span }
    }

    fn release(&self, id: u64) {
        let woken = self.state().release(id);
        // Signal after unlocking, so that the woken thread does not block
        // straight away on the mutex we still hold.
        for slot in woken {
            slot.cv.notify_one();
        }
    }

    /// The state table. The only panic with the mutex held is the `expect`
    /// in [`State::release`], on a broken invariant, and it leaves the table
    /// as it was; so poisoning is ignored, letting other guards still
    /// release while that panic unwinds.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Default for RangeLock {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for RangeLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state();
        f.debug_struct("RangeLock").field("held", &state.held.len()).field("waiting", &state.waiters.len()).finish()
    }
}

/// A range held in a [`RangeLock`], shared or exclusive; dropping it releases
/// the range and hands it on to the waiters this unblocks.
///
/// A guard may be sent to and dropped on another thread.
#[must_use = "the range is released as soon as the guard is dropped"]
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    id: u64,
    span: Span,
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        self.lock.release(self.id);
    }
}

impl fmt::Debug for RangeGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RangeGuard")
            .field("start", &self.span.start)
            .field("end", &self.span.end)
            .field("exclusive", &(self.span.mode == Mode::Exclusive))
            .finish()
    }
}

// The lock is shared by all workers of a region, and guards travel with the
// batches they protect.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<RangeLock>();
    send_sync::<RangeGuard<'static>>();
};

#[cfg(test)]
mod tests;
