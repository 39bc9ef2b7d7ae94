//! The per-page hot paths of the data plane, one function at a time.
//!
//! A migration moves every page through a short chain of steps (see
//! `docs/design.md`). At the source a worker copies a batch of pages out of
//! guest memory, checks each for zero, hashes it with xxh3, compresses the
//! batch with lz4 when that pays and seals it into a frame; at the
//! destination a receiver decodes the header, decompresses, rehashes every
//! page to verify the check, and copies the pages in. Once the network is
//! fast enough, the sum of these per-page costs is what bounds a worker's
//! pages per second, so each step is measured here on its own, on the real
//! project functions, with the page contents of the synthetic guest
//! (`pmigrate_bench::synth::fill_page`: zero, random, text-like, binary-like).
//!
//! Groups (throughput in bytes of guest pages, so criterion prints GiB/s):
//!
//! - `zero_check`: [`is_zero_page`] on one 4 KiB page, all zero and with only
//!   its last byte set. The check reads the whole page either way (it does not
//!   stop early), so the second case is the worst case and both should match.
//!   Every page the source reads goes through it.
//! - `xxh3_page/<kind>`: `xxh3_64` of one page. Every non-zero page is hashed
//!   once at the source (skip decision, frame check, digest) and once more at
//!   the destination (verification).
//! - `lz4_encode/<kind>`, `lz4_decode/<kind>`: `lz4_flex::block::compress_into`
//!   and `decompress_into`, as `transport/src/payload.rs` calls them, on a
//!   64-page (256 KiB) batch, the source's default batch. The compression ratio
//!   of each kind is printed once on stderr. Zero pages never reach lz4 in the
//!   pipeline (they travel as a marker); they are here as the best case.
//! - `frame_build`: building a `Pages` frame of 64 pages whose hashes are
//!   already known (they come from the hashing step above): `raw` is
//!   [`build_pages`] without lz4, one copy of the pages into the frame, so it
//!   is also about the price of the source's copy out of guest memory and of the
//!   destination's copy in; `seal_in_place` is [`seal_raw_pages_in_place`],
//!   the source's common raw path, where the pages were read straight behind
//!   room for a header and only header and check are computed (no page byte
//!   is read, so its GiB/s only says how little it adds per batch);
//!   `lz4/<kind>` is [`build_pages`] with lz4, which falls back to raw when
//!   compression does not shrink the batch (the chosen encoding and frame
//!   size are printed on stderr).
//! - `frame_open`: what a receiver does per frame before writing to guest
//!   memory: [`FrameHdr::decode`] of the header, then [`Opener::open_pages`]
//!   (lz4 decode if any, xxh3 of every page, check). `raw` is content
//!   independent; `lz4/<kind>` for the kinds that compress (random pages stay
//!   raw). `frame_open/hdr_decode` is the header decode alone.
//! - `bitmap_scan`: the start of every round on a 1 GiB region (262144 pages)
//!   whose dirty bitmap has 0.1 %, 10 % or 100 % of its bits set, scattered at
//!   random: `runs` walks the runs of set bits the way a worker walks its
//!   shard, `plan_shards` cuts the bitmap into 2 MiB shards and keeps the
//!   non-empty ones. Throughput is in pages (bits) covered.
//!
//! Lock contention at the destination (`RangeLock` against one global lock)
//! is measured by `ranges/benches/range_lock.rs`, not here.
//!
//! The configuration is fixed so runs compare: the whole bench takes about
//! 80 seconds. `cargo bench -p pmigrate-bench --bench hotpaths -- --test`
//! runs each case once as a smoke test.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_main, BenchmarkId, Criterion, Throughput};
use pmigrate_bench::synth::fill_page;
use pmigrate_ranges::{plan_shards, AtomicBitmap, PAGE_SIZE};
use pmigrate_transport::frame::HEADER_LEN;
use pmigrate_transport::payload::{
    build_pages, is_zero_page, seal_raw_pages_in_place, OpenedPages, Opener, PagesAt, Scratch,
};
use pmigrate_transport::{Encoding, FrameHdr};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use xxhash_rust::xxh3::xxh3_64;

/// Pages in a batch: the source's default (`engine::source::DEFAULT_BATCH_PAGES`).
const BATCH_PAGES: usize = 64;
/// Bytes in a batch.
const BATCH: usize = BATCH_PAGES * PAGE_SIZE;
/// Page kinds of `synth::fill_page`, by number.
const KINDS: [(u32, &str); 4] = [(0, "zero"), (1, "random"), (2, "text"), (3, "binary")];
/// Bitmap size: 1 GiB of 4 KiB pages.
const BITMAP_PAGES: u64 = 1 << 18;
/// Shard size of the source, in pages (2 MiB).
const SHARD_PAGES: u64 = 512;
/// Where a benchmarked frame claims to go.
const AT: PagesAt = PagesAt { region: 0, first: 4096, round: 1 };

/// A batch of `BATCH_PAGES` pages of kind `kind`, the same on every run.
fn batch(kind: u32) -> Vec<u8> {
    let mut rng = SmallRng::seed_from_u64(0x5eed ^ u64::from(kind));
    let mut pages = vec![0u8; BATCH];
    for page in pages.chunks_exact_mut(PAGE_SIZE) {
        fill_page(page, kind, &mut rng);
    }
    pages
}

/// The xxh3 of every page of `pages`.
fn hashes(pages: &[u8]) -> Vec<u64> {
    pages.chunks_exact(PAGE_SIZE).map(xxh3_64).collect()
}

/// Splits a frame into its decoded header and payload.
fn open_hdr(frame: &[u8]) -> (FrameHdr, &[u8]) {
    let (hdr, payload) = frame.split_at(HEADER_LEN);
    (FrameHdr::decode(hdr.try_into().expect("header length")).expect("valid header"), payload)
}

/// What a receiver learns from an opened frame, so none of it is optimised out.
fn first_hash(opened: OpenedPages<'_>) -> u64 {
    match opened {
        OpenedPages::Zero => 0,
        OpenedPages::Data { hashes, .. } => hashes[0],
    }
}

fn bench_zero_check(c: &mut Criterion) {
    let mut g = c.benchmark_group("zero_check");
    g.throughput(Throughput::Bytes(PAGE_SIZE as u64));
    let zero = vec![0u8; PAGE_SIZE];
    let mut last = vec![0u8; PAGE_SIZE];
    last[PAGE_SIZE - 1] = 1;
    for (name, page) in [("zero", &zero), ("last_byte_set", &last)] {
        g.bench_function(name, |b| b.iter(|| is_zero_page(black_box(page))));
    }
    g.finish();
}

fn bench_xxh3(c: &mut Criterion) {
    let mut g = c.benchmark_group("xxh3_page");
    g.throughput(Throughput::Bytes(PAGE_SIZE as u64));
    for (kind, name) in KINDS {
        let pages = batch(kind);
        let page = &pages[..PAGE_SIZE];
        g.bench_function(name, |b| b.iter(|| xxh3_64(black_box(page))));
    }
    g.finish();
}

fn bench_lz4(c: &mut Criterion) {
    let max = lz4_flex::block::get_maximum_output_size(BATCH);
    let batches: Vec<_> = KINDS
        .iter()
        .map(|&(kind, name)| {
            let pages = batch(kind);
            let mut packed = vec![0u8; max];
            let n = lz4_flex::block::compress_into(&pages, &mut packed).expect("output sized for the worst case");
            packed.truncate(n);
            eprintln!("lz4 {name:>6}: {BATCH} -> {n} bytes, ratio {:.2}:1", BATCH as f64 / n as f64);
            (name, pages, packed)
        })
        .collect();

    let mut g = c.benchmark_group("lz4_encode");
    g.throughput(Throughput::Bytes(BATCH as u64));
    let mut out = vec![0u8; max];
    for (name, pages, _) in &batches {
        g.bench_function(*name, |b| {
            b.iter(|| lz4_flex::block::compress_into(black_box(pages), black_box(&mut out)).unwrap())
        });
    }
    g.finish();

    let mut g = c.benchmark_group("lz4_decode");
    g.throughput(Throughput::Bytes(BATCH as u64));
    let mut out = vec![0u8; BATCH];
    for (name, _, packed) in &batches {
        g.bench_function(*name, |b| {
            b.iter(|| lz4_flex::block::decompress_into(black_box(packed), black_box(&mut out)).unwrap())
        });
    }
    g.finish();
}

fn bench_frames(c: &mut Criterion) {
    let batches: Vec<_> = KINDS
        .iter()
        .map(|&(kind, name)| {
            let pages = batch(kind);
            let hashes = hashes(&pages);
            (name, pages, hashes)
        })
        .collect();
    let mut scratch = Scratch::default();

    let mut g = c.benchmark_group("frame_build");
    g.throughput(Throughput::Bytes(BATCH as u64));
    let (_, pages, page_hashes) = &batches[1];
    let mut out = Vec::with_capacity(HEADER_LEN + lz4_flex::block::get_maximum_output_size(BATCH));
    g.bench_function("raw", |b| {
        b.iter(|| build_pages(&mut out, &mut scratch, AT, black_box(pages), black_box(page_hashes), false))
    });
    let mut frame = vec![0u8; HEADER_LEN + BATCH];
    frame[HEADER_LEN..].copy_from_slice(pages);
    g.bench_function("seal_in_place", |b| {
        b.iter(|| seal_raw_pages_in_place(black_box(&mut frame), &mut scratch, AT, black_box(page_hashes)))
    });
    for (name, pages, page_hashes) in &batches {
        let enc = build_pages(&mut out, &mut scratch, AT, pages, page_hashes, true);
        eprintln!("frame_build lz4 {name:>6}: {:?}, {} byte frame", enc, out.len());
        g.bench_with_input(BenchmarkId::new("lz4", name), pages, |b, pages| {
            b.iter(|| build_pages(&mut out, &mut scratch, AT, black_box(pages), black_box(page_hashes), true))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("frame_open");
    g.throughput(Throughput::Bytes(BATCH as u64));
    let mut opener = Opener::default();
    let mut cases = Vec::new();
    let (_, pages, page_hashes) = &batches[1];
    let mut raw = Vec::new();
    build_pages(&mut raw, &mut scratch, AT, pages, page_hashes, false);
    cases.push(("raw".to_owned(), raw));
    for (name, pages, page_hashes) in &batches {
        let mut frame = Vec::new();
        if build_pages(&mut frame, &mut scratch, AT, pages, page_hashes, true) == Encoding::Lz4 {
            cases.push((format!("lz4/{name}"), frame));
        }
    }
    for (name, frame) in &cases {
        // Opened once outside the timing: a frame that fails to verify is a bug here.
        let (hdr, payload) = open_hdr(frame);
        assert!(matches!(opener.open_pages(&hdr, payload), Ok(OpenedPages::Data { .. })), "{name} verifies");
        g.bench_function(name.as_str(), |b| {
            b.iter(|| {
                let (hdr, payload) = open_hdr(black_box(frame));
                first_hash(opener.open_pages(&hdr, payload).unwrap())
            })
        });
    }
    g.throughput(Throughput::Elements(1));
    let hdr: [u8; HEADER_LEN] = cases[0].1[..HEADER_LEN].try_into().unwrap();
    g.bench_function("hdr_decode", |b| b.iter(|| FrameHdr::decode(black_box(&hdr)).unwrap()));
    g.finish();
}

/// A bitmap of `BITMAP_PAGES` bits, each set with probability `density`.
fn bitmap(density: f64) -> AtomicBitmap {
    if density >= 1.0 {
        return AtomicBitmap::new_full(BITMAP_PAGES);
    }
    let mut rng = SmallRng::seed_from_u64(0xb17);
    let map = AtomicBitmap::new(BITMAP_PAGES);
    for bit in 0..BITMAP_PAGES {
        if rng.gen_bool(density) {
            map.set(bit);
        }
    }
    map
}

fn bench_bitmap(c: &mut Criterion) {
    let mut g = c.benchmark_group("bitmap_scan");
    g.throughput(Throughput::Elements(BITMAP_PAGES));
    for (density, name) in [(0.001, "0.1%"), (0.1, "10%"), (1.0, "100%")] {
        let maps = [bitmap(density)];
        let map = &maps[0];
        eprintln!(
            "bitmap {name:>4}: {} bits set, {} runs, {} of {} shards",
            map.count(),
            map.runs(0, map.len()).count(),
            plan_shards(&maps, SHARD_PAGES).len(),
            BITMAP_PAGES / SHARD_PAGES
        );
        g.bench_function(BenchmarkId::new("runs", name), |b| b.iter(|| black_box(map).runs(0, map.len()).count()));
        g.bench_function(BenchmarkId::new("plan_shards", name), |b| {
            b.iter(|| plan_shards(black_box(&maps), SHARD_PAGES))
        });
    }
    g.finish();
}

/// The bench group, written out rather than with `criterion_group!` because
/// the macro's function has no doc comment.
fn benches() {
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_millis(1500))
        .configure_from_args();
    bench_zero_check(&mut c);
    bench_xxh3(&mut c);
    bench_lz4(&mut c);
    bench_frames(&mut c);
    bench_bitmap(&mut c);
}

criterion_main!(benches);
