//! `RangeLock` against one region-wide `Mutex<()>` and `RwLock<()>`.
//!
//! Every lock is taken for writing. Each of 1, 2, 4 and 8 threads repeats:
//! lock, touch its own buffer, unlock. The buffer is 512 bytes (a critical
//! section shorter than the lock itself) or 64 KiB (16 pages: what a
//! destination receiver copies under the lock). In `range_lock/disjoint`
//! every thread locks its own page range (the common case for migration
//! workers); in `range_lock/overlapping` they all lock the same range. A
//! single `Mutex`/`RwLock` cannot tell the two apart, so it serializes both.
//! One iteration is one operation on every thread; throughput is reported
//! in operations.
//!
//! The configuration is fixed so runs compare: the whole bench takes about
//! two minutes. `cargo bench -p pmigrate-ranges --bench range_lock -- --test` runs
//! each case once as a smoke test.

use std::hint::black_box;
use std::sync::{Barrier, Mutex, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_main, BenchmarkId, Criterion, Throughput};
use pmigrate_ranges::RangeLock;

const THREADS: [usize; 4] = [1, 2, 4, 8];
/// Bytes of per-thread work done while holding the lock.
const WORK_BYTES: [usize; 2] = [512, 64 << 10];
/// Pages each thread locks.
const SPAN: u64 = 16;

/// The critical section: a small fixed amount of work on a private buffer.
fn work(buf: &mut [u8]) {
    let buf = black_box(buf);
    for b in buf.iter_mut() {
        *b = b.wrapping_add(1);
    }
}

/// The lock under test.
enum Lock {
    Range(RangeLock),
    Mutex(Mutex<()>),
    RwLock(RwLock<()>),
}

impl Lock {
    fn name(&self) -> &'static str {
        match self {
            Lock::Range(_) => "RangeLock",
            Lock::Mutex(_) => "Mutex",
            Lock::RwLock(_) => "RwLock",
        }
    }

    /// One operation by thread `t`, on its own range or on the shared one.
    fn op(&self, t: usize, disjoint: bool, buf: &mut [u8]) {
        match self {
            Lock::Range(l) => {
                let start = if disjoint { u64::try_from(t).unwrap() * SPAN } else { 0 };
                let _g = l.write(start, start + SPAN);
                work(buf);
            }
            Lock::Mutex(l) => {
                let _g = l.lock().unwrap();
                work(buf);
            }
            Lock::RwLock(l) => {
                let _g = l.write().unwrap();
                work(buf);
            }
        }
    }
}

/// Wall time for `threads` threads to do `iters` operations each, started
/// together; thread start-up is not timed.
fn run(lock: &Lock, threads: usize, disjoint: bool, work_bytes: usize, iters: u64) -> Duration {
    let start = Barrier::new(threads + 1);
    thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let start = &start;
                s.spawn(move || {
                    let mut buf = vec![0u8; work_bytes];
                    start.wait();
                    for _ in 0..iters {
                        lock.op(t, disjoint, &mut buf);
                    }
                })
            })
            .collect();
        start.wait();
        let t0 = Instant::now();
        for h in handles {
            h.join().unwrap();
        }
        t0.elapsed()
    })
}

fn bench_locks(c: &mut Criterion) {
    for (group, disjoint, work_bytes) in WORK_BYTES.into_iter().flat_map(|w| {
        [(format!("range_lock/disjoint/{w}B"), true, w), (format!("range_lock/overlapping/{w}B"), false, w)]
    }) {
        let mut g = c.benchmark_group(group);
        for threads in THREADS {
            g.throughput(Throughput::Elements(u64::try_from(threads).unwrap()));
            for lock in [Lock::Range(RangeLock::new()), Lock::Mutex(Mutex::new(())), Lock::RwLock(RwLock::new(()))] {
                g.bench_with_input(BenchmarkId::new(lock.name(), threads), &threads, |b, &n| {
                    b.iter_custom(|iters| run(&lock, n, disjoint, work_bytes, iters))
                });
            }
        }
        g.finish();
    }
}

/// The bench group, written out rather than with `criterion_group!` because
/// the macro's function has no doc comment.
fn benches() {
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    bench_locks(&mut c);
}

criterion_main!(benches);
