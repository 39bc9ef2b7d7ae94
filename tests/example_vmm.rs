//! The `vmm` example (examples/vmm.rs) runs in the default test run: a
//! running guest's `GuestMemoryMmap` migrates to another, and the copy
//! must equal the source byte for byte as of the pause.
#![cfg(feature = "vm-memory")]

#[path = "../examples/vmm.rs"]
#[allow(dead_code)] // the example's `main`
mod vmm;

#[test]
fn vmm_example_migrates_a_running_guest() {
    let outcome = vmm::run().unwrap_or_else(|e| panic!("the vmm example failed: {e}"));
    assert!(outcome.guest_writes > 0, "the vCPU wrote nothing while the guest migrated");
    assert_eq!(outcome.source.digest, outcome.destination.digest);
    println!("{}\n{}", outcome.source, outcome.destination);
}
