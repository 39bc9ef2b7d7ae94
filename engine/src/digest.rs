//! The digest of all guest memory that both ends compare at the end.
//!
//! Both ends already hold the xxh3 of every page: the source of what it last
//! sent, the destination of what it last wrote (each verified on arrival).
//! The digest is the xxh3 of those tables, region by region, so it costs
//! 8 bytes of hashing per 4 KiB page instead of a second pass over memory,
//! and it proves the destination applied every page in the right order.

use std::sync::atomic::{AtomicU64, Ordering};

use xxhash_rust::xxh3::Xxh3;

/// The digest of per-page hash tables, one table per region in order.
pub fn memory_digest(tables: &[Box<[AtomicU64]>]) -> u64 {
    let tables: Vec<&[AtomicU64]> = tables.iter().map(|t| &t[..]).collect();
    digest_handing_over(&tables, &[])
}

/// The digest of per-page hash tables, where the regions marked in
/// `handed_over` (zero-copy: no page of theirs travels, so their tables say
/// nothing, and the destination may not even have one) count by index only.
/// This keeps the switchover of a huge shared region from hashing a table
/// of it.
pub fn digest_handing_over(tables: &[&[AtomicU64]], handed_over: &[bool]) -> u64 {
    let mut h = Xxh3::new();
    let mut buf = Vec::with_capacity(8 * 1024);
    for (i, t) in tables.iter().enumerate() {
        h.update(&(i as u64).to_le_bytes());
        if handed_over.get(i).copied().unwrap_or(false) {
            h.update(b"handed over");
            continue;
        }
        h.update(&(t.len() as u64).to_le_bytes());
        for chunk in t.chunks(1024) {
            buf.clear();
            for x in chunk {
                buf.extend_from_slice(&x.load(Ordering::Relaxed).to_le_bytes());
            }
            h.update(&buf);
        }
    }
    h.digest()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(v: &[u64]) -> Box<[AtomicU64]> {
        v.iter().map(|&x| AtomicU64::new(x)).collect()
    }

    #[test]
    fn digest_sees_order_values_and_region_boundaries() {
        let a = memory_digest(&[table(&[1, 2]), table(&[3])]);
        assert_eq!(a, memory_digest(&[table(&[1, 2]), table(&[3])]));
        assert_ne!(a, memory_digest(&[table(&[2, 1]), table(&[3])]));
        assert_ne!(a, memory_digest(&[table(&[1]), table(&[2, 3])]));
        assert_ne!(a, memory_digest(&[table(&[1, 2]), table(&[4])]));
    }
}
