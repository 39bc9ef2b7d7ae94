//! A VMM migrating a running guest, both ends: what embedding pmigrate
//! looks like.
//!
//! The source VMM's guest RAM is a vm-memory `GuestMemoryMmap` in two
//! regions — low RAM, and high RAM above 4 GiB past the PCI hole, as on
//! x86 — and a vCPU thread keeps writing to it. pmigrate sends that memory
//! while the vCPU runs, resends what it dirties (the VMM marks each page it
//! wrote, as KVM's dirty log does), and calls the VMM's pause hook to stop
//! the vCPU for the last round. The destination VMM creates memory of the
//! same layout and receives into it; once the report is in, this example
//! checks that the destination's memory is the source's as of the pause,
//! byte for byte.
//!
//! Here both halves run in one process, on two threads, over loopback.
//! Across two hosts:
//! - the destination host runs [`destination`], its acceptor bound to its
//!   migration address (`0.0.0.0:7000`, or one per NIC) instead of
//!   `127.0.0.1:0`;
//! - the source host runs [`source`], with the destination's addresses;
//! - both read the same key with `Psk::from_file` (`pmigrate keygen` writes
//!   one; copy it over a channel you trust) instead of sharing
//!   `Psk::generate`'s in memory;
//! - pmigrate moves guest memory only: the VMMs agree on the memory layout
//!   and carry vCPU and device state over their own control channel, and
//!   the destination starts its vCPUs from `receive_and_run`'s hook.
//!
//! Run it with `cargo run --release --example vmm --features vm-memory`.

use std::error::Error;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use pmigrate::{from_vm_memory, AtomicBitmap};
use pmigrate::{
    Acceptor, Auth, GuestMemory, Incoming, MigrateError, Psk, ReceiveOptions, Report, Source, VmmBitmapTracker,
    PAGE_SIZE,
};
use rand::{rngs::SmallRng, Rng, SeedableRng};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemory as _, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};

/// Any error of the example, from either end.
pub type BoxError = Box<dyn Error + Send + Sync>;

/// Guest RAM as (guest physical address, bytes): low RAM, a gap, high RAM
/// from 4 GiB — a small x86 guest, so that the example takes seconds.
const RAM: [(GuestAddress, usize); 2] = [(GuestAddress(0), 96 << 20), (GuestAddress(4 << 30), 32 << 20)];
/// The page as vm-memory counts region offsets.
const PAGE: u64 = PAGE_SIZE as u64;
/// Pages the vCPU writes each millisecond: 128 MiB/s of dirtying, which the
/// migration outpaces over loopback.
const WRITES_PER_MS: usize = 32;
/// How long the destination waits for the source to connect.
const ACCEPT_WAIT: Duration = Duration::from_secs(30);

/// What a migration did, once the destination's memory checked out.
pub struct Outcome {
    /// The source's report.
    pub source: Report,
    /// The destination's report.
    pub destination: Report,
    /// Writes of the vCPU to guest memory before it was paused, that is
    /// while the guest migrated.
    pub guest_writes: u64,
}

/// Migrates a running guest from one `GuestMemoryMmap` to another over
/// loopback, and checks the copy.
pub fn run() -> Result<Outcome, BoxError> {
    // The source VMM: guest memory, booted, and a dirty log over it.
    let src_vm = GuestMemoryMmap::<()>::from_ranges(&RAM)?;
    boot(&src_vm)?;
    let src_mem = from_vm_memory(&src_vm)?; // the same mappings, not a copy
    let dirty_log = VmmBitmapTracker::bitmaps_for(&src_mem); // bitmap i for region i

    // The destination VMM: zeroed memory of the same layout, and a listener.
    let dst_vm = GuestMemoryMmap::<()>::from_ranges(&RAM)?;
    let dst_mem = from_vm_memory(&dst_vm)?;
    let key = Psk::generate()?;
    let acceptor = Acceptor::bind(&["127.0.0.1:0".parse()?], Auth::Psk(key.clone()))?;
    let dest_addr = acceptor.local_addrs()[0];

    let vcpu = Vcpu::default();
    let (source, destination, guest) = thread::scope(|s| {
        let destination = s.spawn(|| destination(&acceptor, &dst_mem));
        let guest = s.spawn(|| vcpu.run_guest(&src_vm, &dirty_log));
        let source = source(&src_mem, dirty_log.clone(), &vcpu, dest_addr, key);
        let destination = destination.join().map_err(|_| "the destination thread panicked");
        // Verified or not, this example is done with the source's vCPU.
        vcpu.set(Run::Exit);
        let guest = guest.join().map_err(|_| "the vCPU thread panicked");
        (source, destination, guest)
    });
    let source = source?;
    let destination = destination??;
    guest??;

    let guest_writes = vcpu.paused_at.load(Ordering::Acquire);
    if vcpu.writes.load(Ordering::Acquire) != guest_writes {
        return Err("the vCPU wrote to guest memory after the pause".into());
    }
    if let Some(at) = first_difference(&src_vm, &dst_vm)? {
        return Err(format!("the destination's memory differs from the source's at {at:#x}").into());
    }
    Ok(Outcome { source, destination, guest_writes })
}

/// The source VMM's half: migrates `mem` to `dest` while the vCPU runs,
/// learning what it dirties from `dirty_log`, and pauses the vCPU for the
/// last round.
fn source(
    mem: &GuestMemory,
    dirty_log: Arc<[AtomicBitmap]>,
    vcpu: &Vcpu,
    dest: SocketAddr,
    key: Psk,
) -> Result<Report, MigrateError> {
    Source::new(mem, vec![dest], Auth::Psk(key))
        .streams(2)
        .threads(2)
        .tracker(Box::new(VmmBitmapTracker::new(dirty_log)))
        .on_pause(|| vcpu.pause())
        .on_abort(|| {
            vcpu.set(Run::Running); // the guest is still ours: let it run on
            Ok(())
        })
        .run()
}

/// The destination VMM's half: accepts one session for memory of `mem`'s
/// layout and receives it.
pub fn destination(acceptor: &Acceptor, mem: &GuestMemory) -> Result<Report, MigrateError> {
    let incoming = Incoming::accept_for(acceptor, mem, Some(Instant::now() + ACCEPT_WAIT))?;
    incoming.receive_and_run(mem, &ReceiveOptions::default(), || {
        // Memory is verified: a VMM starts its vCPUs here, before the source
        // lets go of the guest. This one has none to start.
        Ok(())
    })
}

/// Fills guest memory as a booted guest's looks: every fourth page left
/// zero (free memory), the rest half random, half a repeated byte.
fn boot(vm: &GuestMemoryMmap) -> Result<(), BoxError> {
    let mut rng = SmallRng::seed_from_u64(16);
    let mut page = [0u8; PAGE_SIZE];
    for region in vm.iter() {
        for p in (0..region.len() / PAGE).filter(|p| p % 4 != 0) {
            rng.fill(&mut page[..PAGE_SIZE / 2]);
            page[PAGE_SIZE / 2..].fill(p.to_le_bytes()[0]);
            region.write_slice(&page, MemoryRegionAddress(p * PAGE))?;
        }
    }
    Ok(())
}

/// The address of the first byte where two memories of the same layout
/// differ.
fn first_difference(a: &GuestMemoryMmap, b: &GuestMemoryMmap) -> Result<Option<u64>, BoxError> {
    const CHUNK: usize = 1 << 20;
    let (mut x, mut y) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    for (ra, rb) in a.iter().zip(b.iter()) {
        for offset in (0..ra.len()).step_by(CHUNK) {
            let n = CHUNK.min(usize::try_from(ra.len() - offset)?);
            let (x, y) = (&mut x[..n], &mut y[..n]);
            ra.read_slice(x, MemoryRegionAddress(offset))?;
            rb.read_slice(y, MemoryRegionAddress(offset))?;
            if x != y {
                let i = x.iter().zip(y.iter()).position(|(p, q)| p != q).unwrap_or(0);
                return Ok(Some(ra.start_addr().raw_value() + offset + i as u64));
            }
        }
    }
    Ok(None)
}

/// What the VMM asks of its vCPU thread.
#[derive(Default)]
enum Run {
    /// Run the guest.
    #[default]
    Running,
    /// Stop at the next exit and say so.
    Pause,
    /// Stopped, until told otherwise.
    Paused,
    /// Leave: the guest is gone from this host.
    Exit,
}

/// The one vCPU of the source's guest, with the run state it obeys.
#[derive(Default)]
struct Vcpu {
    run: Mutex<Run>,
    changed: Condvar,
    /// Writes to guest memory so far.
    writes: AtomicU64,
    /// `writes` when it was last paused.
    paused_at: AtomicU64,
}

impl Vcpu {
    /// Sets the run state (a paused vCPU wakes up to it).
    fn set(&self, to: Run) {
        *self.run.lock().unwrap() = to;
        self.changed.notify_all();
    }

    /// Stops the vCPU and returns once it stands still (a KVM VMM kicks it
    /// out of `KVM_RUN` with a signal and waits the same way).
    fn pause(&self) -> Result<(), BoxError> {
        let mut run = self.run.lock().unwrap();
        *run = Run::Pause;
        self.changed.notify_all();
        loop {
            match *run {
                Run::Paused => {
                    self.paused_at.store(self.writes.load(Ordering::Acquire), Ordering::Release);
                    return Ok(());
                }
                Run::Exit => return Err("the vCPU thread has exited".into()),
                Run::Running | Run::Pause => run = self.changed.wait(run).unwrap(),
            }
        }
    }

    /// The vCPU thread: the guest writes to random pages of `vm` until told
    /// to exit, and, as KVM's dirty log would, every page it writes is
    /// marked in `dirty_log` — the write first, the bit after, so that
    /// pmigrate never takes the bit and reads the page before the write.
    fn run_guest(&self, vm: &GuestMemoryMmap, dirty_log: &[AtomicBitmap]) -> Result<(), BoxError> {
        let res = self.guest(vm, dirty_log);
        self.set(Run::Exit); // never leave `pause` waiting for a dead thread
        res
    }

    fn guest(&self, vm: &GuestMemoryMmap, dirty_log: &[AtomicBitmap]) -> Result<(), BoxError> {
        let regions: Vec<_> = vm.iter().collect(); // in the order of `dirty_log`
        let mut rng = SmallRng::seed_from_u64(17);
        while self.may_run() {
            for _ in 0..WRITES_PER_MS {
                let r = rng.gen_range(0..regions.len());
                let page = rng.gen_range(0..regions[r].len() / PAGE);
                let n = self.writes.fetch_add(1, Ordering::AcqRel) + 1; // what the guest writes: a count
                regions[r].write_obj(n, MemoryRegionAddress(page * PAGE + (n % (PAGE / 8)) * 8))?;
                dirty_log[r].set(page);
            }
            thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Between two bursts of guest writes: parks while paused, and says
    /// whether to go on.
    fn may_run(&self) -> bool {
        let mut run = self.run.lock().unwrap();
        loop {
            match *run {
                Run::Running => return true,
                Run::Exit => return false,
                Run::Pause => {
                    *run = Run::Paused;
                    self.changed.notify_all();
                }
                Run::Paused => run = self.changed.wait(run).unwrap(),
            }
        }
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(o) => {
            println!("{}\n{}", o.source, o.destination);
            println!(
                "The vCPU wrote {} times to guest memory while the guest migrated, never after the pause; \
                 the destination's {} MiB are the source's, byte for byte.",
                o.guest_writes,
                o.source.memory_bytes >> 20
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vmm example: {e}");
            ExitCode::FAILURE
        }
    }
}
