//! Adapter for rust-vmm `vm-memory`: migrate a VMM's `GuestMemoryMmap`
//! without copying it (feature `vm-memory`).

use std::sync::Arc;

use pmigrate_ranges::{Gpa, GuestMemory, GuestRegion, HostPageSize, MemoryError};
use vm_memory::{Address, GuestMemory as _, GuestMemoryMmap, GuestMemoryRegion};

/// A [`GuestMemory`] over the same host mappings as `mem`. The returned
/// table keeps a clone of `mem` (its regions are reference-counted) alive,
/// so the mappings outlive it.
pub fn from_vm_memory(mem: &GuestMemoryMmap) -> Result<GuestMemory, MemoryError> {
    let keep = Arc::new(mem.clone());
    let mut regions = Vec::new();
    for r in mem.iter() {
        let host = r.as_ptr();
        // SAFETY: `host` points to the `r.len()` bytes of this mmap'ed
        // region, which stay mapped while any clone of `mem` lives; the owner
        // passed below is such a clone, and vm-memory never remaps a region
        // in place.
        let region = unsafe {
            GuestRegion::from_raw(
                Gpa(r.start_addr().raw_value()),
                r.len(),
                HostPageSize::Small,
                host,
                Box::new(keep.clone()),
            )
        }?;
        regions.push(region);
    }
    GuestMemory::new(regions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn shares_the_vmm_mapping() {
        let vmm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20), (GuestAddress(1 << 32), 2 << 20)])
            .unwrap();
        let mem = from_vm_memory(&vmm).unwrap();
        assert_eq!(mem.total_bytes(), 3 << 20);
        vmm.write_obj(0xabcdu64, GuestAddress((1 << 32) + 4096)).unwrap();
        assert_eq!(mem.regions()[1].read_u64(4096).unwrap(), 0xabcd);
        mem.regions()[0].write_u64(8, 7).unwrap();
        assert_eq!(vmm.read_obj::<u64>(GuestAddress(8)).unwrap(), 7);
    }
}
