//! A synthetic guest: memory with a realistic mix of page contents, and
//! mutator threads that dirty it the way a busy guest does.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pmigrate::AtomicBitmap;
use pmigrate::{GuestMemory, PAGE_SIZE};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Shares of page kinds in the guest, in percent (the rest is zero pages).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ContentMix {
    /// Incompressible pages (encrypted data, compressed files, media).
    pub random: u32,
    /// Text-like pages (logs, source, JSON): compress about 3:1.
    pub text: u32,
    /// Binary-like pages (code, heap objects): compress about 1.5–2:1.
    pub binary: u32,
}

impl ContentMix {
    /// A typical mix: 25 % zero, 25 % random, 25 % text, 25 % binary.
    pub const TYPICAL: ContentMix = ContentMix { random: 25, text: 25, binary: 25 };
    /// All incompressible.
    pub const RANDOM: ContentMix = ContentMix { random: 100, text: 0, binary: 0 };

    /// Zero-page share.
    pub fn zero(&self) -> u32 {
        100u32.saturating_sub(self.random + self.text + self.binary)
    }
}

impl std::str::FromStr for ContentMix {
    type Err = String;

    /// `random=25,text=25,binary=25` (omitted kinds are 0; the rest is zero pages).
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "typical" {
            return Ok(Self::TYPICAL);
        }
        let mut m = ContentMix { random: 0, text: 0, binary: 0 };
        for part in s.split(',') {
            let (k, v) = part.split_once('=').ok_or_else(|| format!("{part:?}: expected kind=percent"))?;
            let v: u32 = v.parse().map_err(|_| format!("{v:?} is not a percentage"))?;
            match k {
                "random" => m.random = v,
                "text" => m.text = v,
                "binary" => m.binary = v,
                "zero" => {}
                _ => return Err(format!("unknown page kind {k:?}")),
            }
        }
        if m.random + m.text + m.binary > 100 {
            return Err("shares add up to more than 100".into());
        }
        Ok(m)
    }
}

const WORDS: [&str; 16] = [
    "migration ",
    "page ",
    "memory ",
    "guest ",
    "the ",
    "of ",
    "dirty ",
    "round ",
    "stream ",
    "{\"id\": ",
    "42, ",
    "error: ",
    "INFO ",
    "\n",
    "value ",
    "kernel ",
];

/// Fills one page with content of kind `k` (0 zero, 1 random, 2 text, 3 binary).
pub fn fill_page(page: &mut [u8], k: u32, rng: &mut SmallRng) {
    match k {
        0 => page.fill(0),
        1 => rng.fill(page),
        2 => {
            let mut i = 0;
            while i < page.len() {
                let w = WORDS[rng.gen_range(0..WORDS.len())].as_bytes();
                let n = w.len().min(page.len() - i);
                page[i..i + n].copy_from_slice(&w[..n]);
                i += n;
            }
        }
        _ => {
            // Structs of small integers, pointers sharing high bits, padding.
            for chunk in page.chunks_mut(16) {
                let v: u64 = 0x7f00_0000_0000 | (rng.gen::<u64>() & 0xff_fff0);
                let small: u32 = rng.gen_range(0..256);
                chunk[..8].copy_from_slice(&v.to_le_bytes());
                chunk[8..12].copy_from_slice(&small.to_le_bytes());
                chunk[12..16].fill(0);
            }
        }
    }
}

fn kind_of(mix: &ContentMix, roll: u32) -> u32 {
    if roll < mix.random {
        1
    } else if roll < mix.random + mix.text {
        2
    } else if roll < mix.random + mix.text + mix.binary {
        3
    } else {
        0
    }
}

/// Writes every page of `mem` with content drawn from `mix`, on all cores.
/// Pages are written just before use on purpose: this host deduplicates
/// idle zero pages, which would distort first-touch figures.
pub fn fill(mem: &GuestMemory, mix: ContentMix, seed: u64) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (ri, region) in mem.iter() {
        let pages = region.pages();
        let per = pages.div_ceil(threads as u64);
        std::thread::scope(|s| {
            for t in 0..threads as u64 {
                s.spawn(move || {
                    let mut rng = SmallRng::seed_from_u64(seed ^ (u64::from(ri.0) << 32) ^ t);
                    let mut buf = vec![0u8; 64 * PAGE_SIZE];
                    let (a, b) = (t * per, ((t + 1) * per).min(pages));
                    let mut p = a;
                    while p < b {
                        let n = (b - p).min(64);
                        let bytes = &mut buf[..n as usize * PAGE_SIZE];
                        for page in bytes.chunks_mut(PAGE_SIZE) {
                            let k = kind_of(&mix, rng.gen_range(0..100));
                            fill_page(page, k, &mut rng);
                        }
                        region.write_pages(pmigrate::PageIdx(p), bytes).expect("in bounds");
                        p += n;
                    }
                });
            }
        });
    }
}

/// How mutators choose pages.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Skew {
    /// Every page of the working set equally.
    Uniform,
    /// `hot_pct` % of the writes go to the first `hot_share` % of the
    /// working set.
    HotCold {
        /// Share of writes to the hot set, percent.
        hot_pct: u32,
        /// Size of the hot set, percent of the working set.
        hot_share: u32,
    },
}

/// What mutator threads do.
#[derive(Clone, Copy, Debug)]
pub struct MutatorConfig {
    /// Threads.
    pub threads: usize,
    /// Bytes of pages dirtied per second, all threads together.
    pub rate: u64,
    /// Working set: the first this-many bytes of region 0.
    pub working_set: u64,
    /// Page choice.
    pub skew: Skew,
}

/// Running mutators; stop them with [`Mutators::stop`].
pub struct Mutators {
    stop: Arc<AtomicBool>,
    handles: Vec<std::thread::JoinHandle<()>>,
    /// Pages written so far.
    pub writes: Arc<AtomicU64>,
}

/// Starts mutators over region 0 of `mem`. Each write stores a fresh
/// 8-byte stamp in one word of a page (so the page changes) and then, when
/// `bitmap` is given, sets the page's bit as a VMM's dirty log would.
pub fn start_mutators(mem: Arc<GuestMemory>, cfg: MutatorConfig, bitmap: Option<Arc<[AtomicBitmap]>>) -> Mutators {
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let threads = cfg.threads.max(1);
    let handles = (0..threads)
        .map(|t| {
            let (mem, stop, writes, bitmap) = (mem.clone(), stop.clone(), writes.clone(), bitmap.clone());
            std::thread::spawn(move || {
                let region = &mem.regions()[0];
                let ws_pages = (cfg.working_set / PAGE_SIZE as u64).clamp(1, region.pages());
                let pages_per_sec = (cfg.rate / PAGE_SIZE as u64) as f64 / threads as f64;
                let mut rng = SmallRng::seed_from_u64(0x5eed + t as u64);
                let start = Instant::now();
                let mut done = 0u64;
                let mut stamp = (t as u64) << 48;
                while !stop.load(Ordering::Relaxed) {
                    let due = (start.elapsed().as_secs_f64() * pages_per_sec) as u64;
                    if done >= due {
                        std::thread::sleep(Duration::from_micros(500));
                        continue;
                    }
                    // Catch up in bursts, but never more than 10 ms worth.
                    let burst = (due - done).min((pages_per_sec / 100.0).max(1.0) as u64);
                    for _ in 0..burst {
                        let page = match cfg.skew {
                            Skew::Uniform => rng.gen_range(0..ws_pages),
                            Skew::HotCold { hot_pct, hot_share } => {
                                let hot = (ws_pages * u64::from(hot_share) / 100).max(1);
                                if rng.gen_range(0..100) < hot_pct {
                                    rng.gen_range(0..hot)
                                } else {
                                    rng.gen_range(0..ws_pages)
                                }
                            }
                        };
                        stamp += 1;
                        let word = rng.gen_range(0..(PAGE_SIZE as u64 / 8));
                        region.write_u64(page * PAGE_SIZE as u64 + word * 8, stamp).expect("in bounds");
                        if let Some(b) = &bitmap {
                            b[0].set(page);
                        }
                    }
                    done += burst;
                    writes.fetch_add(burst, Ordering::Relaxed);
                }
            })
        })
        .collect();
    Mutators { stop, handles, writes }
}

impl Mutators {
    /// Stops every mutator and waits for it: after this returns, no more
    /// writes happen (call it from the pause hook).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            h.join().expect("mutator panicked");
        }
    }
}

impl Drop for Mutators {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Index of the first page where `a` and `b` differ, if any.
pub fn first_difference(a: &GuestMemory, b: &GuestMemory) -> Option<(usize, u64)> {
    let mut x = vec![0u8; 256 * PAGE_SIZE];
    let mut y = vec![0u8; 256 * PAGE_SIZE];
    for ((i, ra), rb) in a.iter().zip(b.regions()) {
        let mut p = 0;
        while p < ra.pages() {
            let n = (ra.pages() - p).min(256);
            let len = n as usize * PAGE_SIZE;
            ra.read_pages(pmigrate::PageIdx(p), &mut x[..len]).expect("in bounds");
            rb.read_pages(pmigrate::PageIdx(p), &mut y[..len]).expect("same layout");
            if x[..len] != y[..len] {
                let k = x[..len].chunks(PAGE_SIZE).zip(y[..len].chunks(PAGE_SIZE)).position(|(a, b)| a != b);
                return Some((i.as_usize(), p + k.unwrap_or(0) as u64));
            }
            p += n;
        }
    }
    None
}
