//! Tests of the parent module.

use super::*;
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU32;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// Long enough that only a bug (a hang, a lost wake-up) runs into it.
const PATIENCE: Duration = Duration::from_secs(10);

/// Waits until `n` requests are blocked in `lock` and asleep, proving
/// without timing that they did not get through, and making sure the
/// release that follows must signal them (the property tests cover the
/// hand-off to a spinning waiter).
fn wait_for_sleepers(lock: &RangeLock, n: usize) {
    let deadline = Instant::now() + PATIENCE;
    while lock.sleeping() != n {
        assert!(Instant::now() < deadline, "expected {n} sleeping requests");
        thread::yield_now();
    }
}

/// A thread of its own that takes one range and holds it until told to
/// let go. The thread is detached, so that a test whose lock is broken
/// fails on a timeout instead of hanging in a join.
struct Holder {
    events: mpsc::Receiver<&'static str>,
    hold: Option<mpsc::Sender<()>>,
}

impl Holder {
    /// Starts taking `[start, end)` in `lock`, exclusive if `write`.
    fn spawn(lock: &Arc<RangeLock>, (start, end, write): (u64, u64, bool)) -> Self {
        let lock = Arc::clone(lock);
        let (tx, events) = mpsc::channel();
        let (hold, until) = mpsc::channel::<()>();
        thread::spawn(move || {
            let g = if write { lock.write(start, end) } else { lock.read(start, end) };
            let _ = tx.send("acquired");
            let _ = until.recv(); // returns when the `Holder` hangs up
            drop(g);
            let _ = tx.send("released");
        });
        Self { events, hold: Some(hold) }
    }

    /// Asserts that the thread takes its range (soon).
    #[track_caller]
    fn acquired(&self) {
        assert_eq!(self.events.recv_timeout(PATIENCE), Ok("acquired"));
    }

    /// Asserts that the thread has not taken its range yet.
    #[track_caller]
    fn waits(&self, why: &str) {
        assert_eq!(self.events.try_recv(), Err(mpsc::TryRecvError::Empty), "{why}");
    }

    /// Lets go of the range and waits until it is released.
    #[track_caller]
    fn release(&mut self) {
        self.hold = None;
        assert_eq!(self.events.recv_timeout(PATIENCE), Ok("released"));
    }
}

#[test]
fn overlapping_writers_exclude() {
    let lock = Arc::new(RangeLock::new());
    let g = lock.write(0, 10);
    let mut h = Holder::spawn(&lock, (5, 15, true));
    wait_for_sleepers(&lock, 1);
    h.waits("overlapping writer got in");
    assert_eq!(lock.held(), 1);
    drop(g);
    h.acquired();
    assert_eq!((lock.held(), lock.waiting()), (1, 0));
    h.release();
    assert_eq!(lock.held(), 0);
}

#[test]
fn readers_share() {
    let lock = Arc::new(RangeLock::new());
    let _g = lock.read(0, 10);
    let h = Holder::spawn(&lock, (5, 15, false));
    h.acquired();
    assert_eq!(lock.held(), 2);
    let _g3 = lock.try_read(0, 20).expect("a third reader shares too");
    assert_eq!(lock.held(), 3);
}

#[test]
fn reader_excludes_writer() {
    let lock = Arc::new(RangeLock::new());
    let g = lock.read(0, 10);
    let h = Holder::spawn(&lock, (9, 10, true));
    wait_for_sleepers(&lock, 1);
    h.waits("writer got past a reader");
    drop(g);
    h.acquired();
}

#[test]
fn writer_excludes_reader() {
    let lock = Arc::new(RangeLock::new());
    let g = lock.write(0, 10);
    let h = Holder::spawn(&lock, (0, 1, false));
    wait_for_sleepers(&lock, 1);
    h.waits("reader got past a writer");
    drop(g);
    h.acquired();
}

#[test]
fn disjoint_writers_proceed_concurrently() {
    let lock = Arc::new(RangeLock::new());
    // A takes [0, 10) and keeps it until told to let go...
    let mut a = Holder::spawn(&lock, (0, 10, true));
    a.acquired();
    // ...and B takes the adjacent [10, 20) while A still holds its range.
    let b = Holder::spawn(&lock, (10, 20, true));
    b.acquired();
    assert_eq!(lock.held(), 2);
    a.release();
    assert_eq!(lock.held(), 1);
    drop(b);
}

#[test]
fn try_returns_none_on_conflict() {
    let lock = RangeLock::new();
    let w = lock.write(10, 20);
    assert!(lock.try_write(19, 30).is_none());
    assert!(lock.try_read(0, 11).is_none());
    let r = lock.try_read(20, 30).expect("adjacent to the writer");
    assert!(lock.try_write(25, 26).is_none());
    assert!(lock.try_read(25, 26).is_some());
    assert_eq!(lock.held(), 2);
    drop(w);
    assert!(lock.try_write(0, 20).is_some());
    drop(r);
    assert!(lock.try_write(0, u64::MAX).is_some());
    assert_eq!(lock.held(), 0);
}

#[test]
#[should_panic(expected = "empty page range [5, 5)")]
fn empty_range_panics() {
    let _ = RangeLock::new().read(5, 5);
}

#[test]
#[should_panic(expected = "empty page range [6, 5)")]
fn reversed_range_panics() {
    let _ = RangeLock::new().try_write(6, 5);
}

#[test]
fn waiting_writer_is_not_overtaken_by_new_readers() {
    let lock = Arc::new(RangeLock::new());
    let r = lock.read(0, 10);
    let mut w = Holder::spawn(&lock, (5, 15, true));
    wait_for_sleepers(&lock, 1);
    // A new reader overlapping the waiting writer (but nothing held
    // exclusively) queues behind it...
    assert!(lock.try_read(12, 13).is_none());
    let r2 = Holder::spawn(&lock, (0, 10, false));
    wait_for_sleepers(&lock, 2);
    // ...while one clear of both still goes straight through.
    assert!(lock.try_read(15, 16).is_some());
    drop(r);
    w.acquired();
    r2.waits("reader overtook the writer");
    w.release();
    r2.acquired();
}

#[test]
fn release_grants_every_waiter_it_unblocks() {
    let lock = Arc::new(RangeLock::new());
    let g = lock.write(0, 10);
    let mut hs = Vec::new();
    for (i, range) in [(0, 5, true), (5, 10, false), (2, 8, false)].into_iter().enumerate() {
        hs.push(Holder::spawn(&lock, range));
        wait_for_sleepers(&lock, i + 1);
    }
    // Writer [0, 5) and reader [5, 10) are granted together; reader
    // [2, 8) waits behind the writer it overlaps.
    drop(g);
    hs[0].acquired();
    hs[1].acquired();
    assert_eq!((lock.held(), lock.waiting()), (2, 1));
    hs[2].waits("reader got past a writer");
    hs[0].release();
    hs[2].acquired();
    hs[1].release();
    hs[2].release();
    assert_eq!((lock.held(), lock.waiting()), (0, 0));
}

#[test]
fn release_does_not_let_a_later_waiter_overtake() {
    let lock = Arc::new(RangeLock::new());
    let a = lock.write(0, 5);
    let b = lock.write(10, 15);
    // Y needs both held ranges; X needs only B's, but overlaps Y.
    let y = Holder::spawn(&lock, (0, 15, true));
    wait_for_sleepers(&lock, 1);
    let x = Holder::spawn(&lock, (10, 12, false));
    wait_for_sleepers(&lock, 2);
    drop(b);
    // X conflicts with nothing held now, but Y came first and still
    // waits for A; X must stay behind Y.
    assert_eq!((lock.held(), lock.waiting()), (1, 2));
    x.waits("a later reader overtook a waiting writer");
    drop(a);
    y.acquired();
    x.waits("reader got past a writer");
    drop(y);
    x.acquired();
}

#[test]
fn guard_released_on_another_thread() {
    let lock = RangeLock::new();
    let g = lock.write(0, 4);
    thread::scope(|s| {
        s.spawn(move || drop(g));
    });
    assert!(lock.try_write(0, 4).is_some());
}

/// One step of a property-test thread.
#[derive(Clone, Copy, Debug)]
enum Op {
    Read(u64, u64),
    Write(u64, u64),
    TryRead(u64, u64),
    TryWrite(u64, u64),
}

const PAGES: u64 = 64;

/// A non-empty range of at most 16 pages within `0..PAGES`.
fn range() -> impl Strategy<Value = (u64, u64)> {
    (0..PAGES, 1..=16u64).prop_map(|(start, len)| (start, (start + len).min(PAGES)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        range().prop_map(|(s, e)| Op::Read(s, e)),
        range().prop_map(|(s, e)| Op::Write(s, e)),
        range().prop_map(|(s, e)| Op::TryRead(s, e)),
        range().prop_map(|(s, e)| Op::TryWrite(s, e)),
    ]
}

/// Per-page occupancy, checked by whoever holds the page.
struct Pages {
    readers: Vec<AtomicU32>,
    writers: Vec<AtomicU32>,
}

impl Pages {
    fn new() -> Self {
        let n = usize::try_from(PAGES).unwrap();
        Self {
            readers: (0..n).map(|_| AtomicU32::new(0)).collect(),
            writers: (0..n).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    fn pages(start: u64, end: u64) -> std::ops::Range<usize> {
        usize::try_from(start).unwrap()..usize::try_from(end).unwrap()
    }

    fn hold_shared(&self, start: u64, end: u64) {
        let pages = Self::pages(start, end);
        for p in pages.clone() {
            self.readers[p].fetch_add(1, Ordering::SeqCst);
            self.assert_no_writer(p);
        }
        thread::yield_now();
        for p in pages {
            self.assert_no_writer(p);
            self.readers[p].fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn hold_exclusive(&self, start: u64, end: u64) {
        let pages = Self::pages(start, end);
        for p in pages.clone() {
            let writers = self.writers[p].fetch_add(1, Ordering::SeqCst);
            assert_eq!(writers, 0, "page {p}: two writers");
            self.assert_no_reader(p);
        }
        thread::yield_now();
        for p in pages {
            self.assert_no_reader(p);
            let writers = self.writers[p].fetch_sub(1, Ordering::SeqCst);
            assert_eq!(writers, 1, "page {p}: two writers");
        }
    }

    fn assert_no_writer(&self, p: usize) {
        let writers = self.writers[p].load(Ordering::SeqCst);
        assert_eq!(writers, 0, "page {p}: writer beside a reader");
    }

    fn assert_no_reader(&self, p: usize) {
        let readers = self.readers[p].load(Ordering::SeqCst);
        assert_eq!(readers, 0, "page {p}: reader beside a writer");
    }
}

fn run_thread(lock: &RangeLock, pages: &Pages, ops: &[Op]) {
    for &op in ops {
        match op {
            Op::Read(s, e) => {
                let _g = lock.read(s, e);
                pages.hold_shared(s, e);
            }
            Op::Write(s, e) => {
                let _g = lock.write(s, e);
                pages.hold_exclusive(s, e);
            }
            Op::TryRead(s, e) => {
                if let Some(_g) = lock.try_read(s, e) {
                    pages.hold_shared(s, e);
                }
            }
            Op::TryWrite(s, e) => {
                if let Some(_g) = lock.try_write(s, e) {
                    pages.hold_exclusive(s, e);
                }
            }
        }
    }
}

/// Runs each op list on a thread of its own against one lock; whoever
/// holds a page checks that the lock's promise holds for it. A lost
/// wake-up or a deadlock fails instead of hanging.
fn run_threads(threads: Vec<Vec<Op>>) -> Result<(), String> {
    let lock = Arc::new(RangeLock::new());
    let pages = Arc::new(Pages::new());
    let (done, finished) = mpsc::channel();
    let handles: Vec<_> = threads
        .into_iter()
        .map(|ops| {
            let (lock, pages, done) = (Arc::clone(&lock), Arc::clone(&pages), done.clone());
            thread::spawn(move || {
                run_thread(&lock, &pages, &ops);
                let _ = done.send(());
            })
        })
        .collect();
    drop(done);
    for _ in 0..handles.len() {
        // A thread that panics hangs up without sending; join reports it.
        if finished.recv_timeout(PATIENCE) == Err(mpsc::RecvTimeoutError::Timeout) {
            return Err(format!("deadlock or lost wake-up: {:?}", lock));
        }
    }
    for h in handles {
        h.join().map_err(|_| "a holder saw a conflict".to_string())?;
    }
    match (lock.held(), lock.waiting()) {
        (0, 0) => Ok(()),
        left => Err(format!("(held, waiting) = {left:?} after every guard dropped")),
    }
}

/// The property test's scenario, bigger: 8 threads, 20 000 ops each.
#[test]
#[ignore = "stress test, run with --ignored"]
fn stress_many_threads_random_ops() {
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    let mut rng = SmallRng::seed_from_u64(0x5eed);
    let threads = (0..8)
        .map(|_| {
            (0..20_000)
                .map(|_| {
                    let start = rng.gen_range(0..PAGES);
                    let end = (start + rng.gen_range(1..=16)).min(PAGES);
                    match rng.gen_range(0..4) {
                        0 => Op::Read(start, end),
                        1 => Op::Write(start, end),
                        2 => Op::TryRead(start, end),
                        _ => Op::TryWrite(start, end),
                    }
                })
                .collect()
        })
        .collect();
    run_threads(threads).unwrap();
}

/// One step of the single-threaded oracle test.
#[derive(Clone, Copy, Debug)]
enum OracleOp {
    TryRead(u64, u64),
    TryWrite(u64, u64),
    /// Blocking, issued only when the oracle says it will not wait.
    Read(u64, u64),
    /// Blocking, issued only when the oracle says it will not wait.
    Write(u64, u64),
    /// Drops the live guard at this index (modulo their number).
    Release(usize),
}

fn oracle_op() -> impl Strategy<Value = OracleOp> {
    prop_oneof![
        3 => range().prop_map(|(s, e)| OracleOp::TryRead(s, e)),
        3 => range().prop_map(|(s, e)| OracleOp::TryWrite(s, e)),
        1 => range().prop_map(|(s, e)| OracleOp::Read(s, e)),
        1 => range().prop_map(|(s, e)| OracleOp::Write(s, e)),
        4 => any::<usize>().prop_map(OracleOp::Release),
    ]
}

/// The naive model: every held range, `(start, end, exclusive)`, keyed
/// by a serial number.
#[derive(Default)]
struct Oracle {
    held: BTreeMap<u64, (u64, u64, bool)>,
    next: u64,
}

impl Oracle {
    fn admits(&self, start: u64, end: u64, write: bool) -> bool {
        !self.held.values().any(|&(s, e, w)| s < end && start < e && (w || write))
    }

    fn take(&mut self, start: u64, end: u64, write: bool) -> u64 {
        self.next += 1;
        self.held.insert(self.next, (start, end, write));
        self.next
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Threads run random op lists against one lock (see `run_threads`).
    #[test]
    fn concurrent_holders_never_conflict(
        threads in proptest::collection::vec(proptest::collection::vec(op(), 1..40), 2..=4),
    ) {
        run_threads(threads).map_err(TestCaseError::fail)?;
    }

    /// In one thread, every attempt succeeds exactly when the naive
    /// model finds no conflicting held range.
    #[test]
    fn try_ops_match_the_oracle(ops in proptest::collection::vec(oracle_op(), 1..200)) {
        let lock = RangeLock::new();
        let mut oracle = Oracle::default();
        let mut live: Vec<(u64, RangeGuard<'_>)> = Vec::new();
        for op in ops {
            match op {
                OracleOp::TryRead(s, e) | OracleOp::TryWrite(s, e) => {
                    let write = matches!(op, OracleOp::TryWrite(..));
                    let want = oracle.admits(s, e, write);
                    let got = if write { lock.try_write(s, e) } else { lock.try_read(s, e) };
                    prop_assert_eq!(got.is_some(), want, "{:?}", op);
                    if let Some(g) = got {
                        live.push((oracle.take(s, e, write), g));
                    }
                }
                OracleOp::Read(s, e) | OracleOp::Write(s, e) => {
                    let write = matches!(op, OracleOp::Write(..));
                    if oracle.admits(s, e, write) {
                        let g = if write { lock.write(s, e) } else { lock.read(s, e) };
                        live.push((oracle.take(s, e, write), g));
                    }
                }
                OracleOp::Release(i) => {
                    if !live.is_empty() {
                        let (key, g) = live.swap_remove(i % live.len());
                        drop(g);
                        oracle.held.remove(&key);
                    }
                }
            }
            prop_assert_eq!(lock.held(), oracle.held.len());
        }
    }
}
