//! Accepting a session: what a source offers, what the embedder grants,
//! and what an accepted session tells before anything is received.

use std::net::Shutdown;
use std::time::Instant;

use pmigrate_ranges::{Gpa, GuestMemory, RegionIdx};
use pmigrate_transport::hello::{
    decode_shared_regions, ErrorCode, ErrorMsg, Mode, RegionDesc, CAP_POSTCOPY, CAP_SHARED, EXT_SHARED_REGIONS,
    KNOWN_CAPS,
};
use pmigrate_transport::Acceptor;

use super::Incoming;
use crate::postcopy;
use crate::MigrateError;

/// How the destination's memory differs from the region table the source
/// described.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LayoutMismatch {
    /// The two ends have different numbers of regions.
    #[error("source has {source_regions} regions, destination {dest_regions}")]
    Count {
        /// Regions at the source.
        source_regions: usize,
        /// Regions at the destination.
        dest_regions: usize,
    },
    /// A region starts at another guest address, or has another length.
    #[error("{region}: source {source_gpa}+{source_len:#x}, destination {dest_gpa}+{dest_len:#x}")]
    Region {
        /// The first region that differs.
        region: RegionIdx,
        /// Its guest address at the source.
        source_gpa: Gpa,
        /// Its length in bytes at the source.
        source_len: u64,
        /// Its guest address at the destination.
        dest_gpa: Gpa,
        /// Its length in bytes at the destination.
        dest_len: u64,
    },
}

/// Checks that `mem` has exactly the regions the source described.
pub fn layout_matches(mem: &GuestMemory, regions: &[RegionDesc]) -> Result<(), LayoutMismatch> {
    if mem.regions().len() != regions.len() {
        return Err(LayoutMismatch::Count { source_regions: regions.len(), dest_regions: mem.regions().len() });
    }
    for ((i, r), d) in mem.iter().zip(regions) {
        if r.gpa() != d.gpa || r.len() != d.len {
            return Err(LayoutMismatch::Region {
                region: i,
                source_gpa: d.gpa,
                source_len: d.len,
                dest_gpa: r.gpa(),
                dest_len: r.len(),
            });
        }
    }
    Ok(())
}

/// What a source asks of this end, as the embedder judges it before the
/// session is accepted (the source has proved itself by then).
#[derive(Debug)]
pub struct Offered<'a> {
    /// The source's region table.
    pub regions: &'a [RegionDesc],
    /// Regions the source could hand over instead of copying (zero-copy),
    /// if this end's memory for them turns out to be the source's own.
    pub handover: &'a [u32],
    /// The source asks for post-copy.
    pub postcopy: bool,
}

/// What the embedder grants a source it accepts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Grant {
    /// Let the source prove that this end's memory of the offered regions
    /// is its own and hand them over (zero-copy). Grant it only when that
    /// memory may be shared with the source (a shared file mapping, DAX or
    /// CXL memory): the memory of an offered region is not assumed zero, so
    /// a region that fails the proof is sent whole, zero pages included.
    pub handover: bool,
}

impl Incoming {
    /// Waits on `acceptor` for the streams of one memory-migration session
    /// that `check` accepts (its region table, what it offers). Connections
    /// that are not part of it are refused with an error frame and do not
    /// end the wait; nothing but `deadline` does. A source `check` refuses
    /// is told its `Err` text as the reason (`ErrorCode::Layout`).
    pub fn accept(
        acceptor: &Acceptor,
        mut check: impl FnMut(&Offered<'_>) -> Result<Grant, String>,
        deadline: Option<Instant>,
    ) -> Result<Incoming, MigrateError> {
        let mut judge = |h: &pmigrate_transport::Hello| {
            let protocol =
                |e: pmigrate_transport::WireError| ErrorMsg { code: ErrorCode::Protocol, message: e.to_string() };
            let handover = match h.extension(EXT_SHARED_REGIONS) {
                Some(ext) if h.caps & CAP_SHARED != 0 => {
                    decode_shared_regions(ext, h.regions.len()).map_err(protocol)?
                }
                _ => Vec::new(),
            };
            let postcopy = h.caps & CAP_POSTCOPY != 0;
            let grant = check(&Offered { regions: &h.regions, handover: &handover, postcopy })
                .map_err(|message| ErrorMsg { code: ErrorCode::Layout, message })?;
            if postcopy {
                postcopy::probe().map_err(|why| ErrorMsg {
                    code: ErrorCode::Unsupported,
                    message: format!("the destination cannot do post-copy: {why}"),
                })?;
            }
            let mut caps = h.caps & KNOWN_CAPS;
            if !grant.handover || handover.is_empty() {
                caps &= !CAP_SHARED;
            }
            Ok(caps)
        };
        let accepted = acceptor.accept_session(Mode::Memory, &mut judge, deadline)?;
        tracing::info!(
            peer = %accepted.streams.first().and_then(|s| s.tcp().peer_addr().ok()).map_or("?".into(), |p| p.to_string()),
            streams = accepted.streams.len(),
            regions = accepted.hello.regions.len(),
            "migration session accepted"
        );
        Ok(Incoming { accepted, t0: Instant::now(), acceptor: acceptor.try_clone().ok() })
    }

    /// Waits for a session whose layout is exactly that of `mem`; regions
    /// are handed over only where `mem` maps a shared file.
    pub fn accept_for(
        acceptor: &Acceptor,
        mem: &GuestMemory,
        deadline: Option<Instant>,
    ) -> Result<Incoming, MigrateError> {
        let shared = !crate::shared::candidates(mem).is_empty();
        let check = |o: &Offered<'_>| match layout_matches(mem, o.regions) {
            Ok(()) => Ok(Grant { handover: shared }),
            Err(e) => Err(e.to_string()),
        };
        Self::accept(acceptor, check, deadline)
    }

    /// The regions the source may hand over instead of copying: offered by
    /// the source and granted by this end. This end's memory of those
    /// regions is the candidate; the source proves it is its own memory
    /// before relying on it, and copies the region whole otherwise.
    pub fn handover_regions(&self) -> Vec<u32> {
        let h = &self.accepted.hello;
        if self.accepted.caps & CAP_SHARED == 0 {
            return Vec::new();
        }
        h.extension(EXT_SHARED_REGIONS)
            .and_then(|ext| decode_shared_regions(ext, h.regions.len()).ok())
            .unwrap_or_default()
    }

    /// Gives the session up before receiving anything: every stream hears
    /// why (`Error{Aborted}`) and is closed; the source keeps its guest.
    pub fn refuse(self, why: &str) {
        for s in &self.accepted.streams {
            s.send_error(ErrorCode::Aborted, why);
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Where the session's stream 0 comes from.
    pub fn peer_addr(&self) -> Option<std::net::SocketAddr> {
        self.accepted.streams.first().and_then(|s| s.tcp().peer_addr().ok())
    }

    /// The session's id (for logs; it proves nothing).
    pub fn session_id(&self) -> [u8; 16] {
        self.accepted.hello.session
    }

    /// The source's region table.
    pub fn regions(&self) -> &[RegionDesc] {
        &self.accepted.hello.regions
    }

    /// Connections refused while the session gathered.
    pub fn refused(&self) -> &[(std::net::SocketAddr, String)] {
        &self.accepted.refused
    }

    /// Whether the source asked for post-copy (and this end can do it).
    pub fn is_postcopy(&self) -> bool {
        self.accepted.caps & CAP_POSTCOPY != 0
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use pmigrate_ranges::{GuestRegion, HostPageSize};

    use super::*;

    fn desc(gpa: u64, len: u64) -> RegionDesc {
        RegionDesc { gpa: pmigrate_ranges::Gpa(gpa), len, flags: 0 }
    }

    #[test]
    fn a_layout_mismatch_names_the_region_and_both_sides() {
        let mem = GuestMemory::new(vec![
            GuestRegion::anonymous(Gpa(0), 16 << 12, HostPageSize::Small).unwrap(),
            GuestRegion::anonymous(Gpa(1 << 30), 8 << 12, HostPageSize::Small).unwrap(),
        ])
        .unwrap();
        assert_eq!(layout_matches(&mem, &[desc(0, 16 << 12), desc(1 << 30, 8 << 12)]), Ok(()));
        let e = layout_matches(&mem, &[desc(0, 16 << 12), desc(1 << 30, 9 << 12)]).unwrap_err();
        assert_eq!(
            e,
            LayoutMismatch::Region {
                region: RegionIdx(1),
                source_gpa: Gpa(1 << 30),
                source_len: 9 << 12,
                dest_gpa: Gpa(1 << 30),
                dest_len: 8 << 12,
            }
        );
        assert_eq!(e.to_string(), "region 1: source 0x40000000+0x9000, destination 0x40000000+0x8000");
        assert_eq!(
            layout_matches(&mem, &[desc(0, 16 << 12)]),
            Err(LayoutMismatch::Count { source_regions: 1, dest_regions: 2 })
        );
        // The migration's error keeps the mismatch as its cause.
        let m = MigrateError::Layout(e.clone());
        assert!(m.to_string().starts_with("memory layout mismatch: region 1"), "{m}");
        let cause = m.source().and_then(|c| c.downcast_ref::<LayoutMismatch>());
        assert_eq!(cause, Some(&e));
    }
}
