//! What a shipper sends: a protected disk's own log, or (extended
//! replication) the segments a replica applied, kept in its `forward/`.

use std::sync::Arc;

use super::ShipError;
use crate::{disk::ProtectedDisk, log::SealedSegment, replica::ReplicaDisk};

/// What a shipper sends: a protected disk's own log, or (extended
/// replication) the segments a replica applied, kept in its `forward/`.
#[derive(Clone)]
pub enum Source {
    Protected(Arc<ProtectedDisk>),
    Forward(Arc<ReplicaDisk>),
}

impl Source {
    pub(super) fn size(&self) -> u64 {
        match self {
            Self::Protected(d) => d.size(),
            Self::Forward(r) => r.state().disk_size,
        }
    }

    pub(super) fn image_path(&self) -> std::path::PathBuf {
        match self {
            Self::Protected(d) => d.path().to_owned(),
            Self::Forward(r) => r.image(),
        }
    }

    pub(super) fn sealed(&self) -> Result<Vec<SealedSegment>, ShipError> {
        match self {
            Self::Protected(d) => Ok(d.log_status().sealed),
            Self::Forward(r) => Ok(r.forward_sealed()?),
        }
    }

    /// A segment the replica refused as damaged, checked here: when this
    /// side's copy is damaged too, it is taken out of the log (a protected
    /// disk's; a forwarded one is left to its replica's own checks).
    pub(super) fn check_refused(&self, seg: &SealedSegment) -> Result<(), ShipError> {
        let Self::Protected(d) = self else { return Ok(()) };
        let Err(e) = crate::log::format::verify_sealed_file(&seg.path) else { return Ok(()) };
        let kept = d.quarantine_oldest(seg.first_seq)?;
        Err(ShipError::DamagedAtRest {
            first: seg.first_seq,
            last: seg.last_seq,
            why: e.to_string(),
            kept: kept.display().to_string(),
        })
    }

    pub(super) fn acknowledge(&self, through: u64) -> Result<(), ShipError> {
        match self {
            Self::Protected(d) => Ok(d.acknowledge(through)?),
            Self::Forward(r) => Ok(r.forward_acknowledge(through)?),
        }
    }

    pub(super) fn pending_bytes(&self) -> u64 {
        match self {
            Self::Protected(d) => d.log_status().pending_bytes,
            Self::Forward(r) => r.forward_sealed().map(|s| s.iter().map(|s| s.bytes).sum()).unwrap_or(0),
        }
    }

    /// Where replication resumes after an initial copy that starts now:
    /// everything before it is in the image already. A protected disk cuts
    /// its log; a replica keeps every segment it applies from now on.
    pub(super) fn cut(&self) -> Result<u64, ShipError> {
        match self {
            Self::Protected(d) => Ok(d.cut()?.0),
            Self::Forward(r) => Ok(r.set_forward(true)? + 1),
        }
    }

    /// A resync starts now: the cut (where replication resumes after it)
    /// and a dirty map to send instead of comparing, when one is trustworthy
    /// for a replica at `replica_next`.
    pub(super) fn begin_resync(
        &self,
        replica_next: u64,
    ) -> Result<(u64, Option<crate::log::dirty::DirtyMap>), ShipError> {
        match self {
            Self::Protected(d) => Ok(d.begin_resync(replica_next)?),
            Self::Forward(r) => Ok((r.set_forward(true)? + 1, None)),
        }
    }

    /// Whether the source disk refuses writes after an I/O error.
    pub(super) fn faulted(&self) -> bool {
        match self {
            Self::Protected(d) => d.faulted().is_some(),
            Self::Forward(_) => false,
        }
    }

    /// Whether only a dirty map recorded the latest changes (the log overflowed).
    pub(super) fn resync_required(&self) -> bool {
        match self {
            Self::Protected(d) => d.resync_required(),
            Self::Forward(_) => false,
        }
    }

    /// Which initial copy of its own the source holds (a replica receives a
    /// new one after a break; 0 for a protected disk).
    pub(super) fn copy_generation(&self) -> u64 {
        match self {
            Self::Protected(_) => 0,
            Self::Forward(r) => r.state().copies,
        }
    }

    /// Whether the replica shipped to must get a new copy although it has
    /// one: the forwarding source received a new copy since it sent one.
    pub(super) fn needs_copy(&self) -> bool {
        match self {
            Self::Protected(_) => false,
            Self::Forward(r) => {
                let s = r.state();
                s.copies != s.forwarded_copy
            }
        }
    }

    /// Records that the replica shipped to holds copy `generation`.
    pub(super) fn copied(&self, generation: u64) -> Result<(), ShipError> {
        match self {
            Self::Protected(_) => Ok(()),
            Self::Forward(r) => Ok(r.set_forwarded_copy(generation)?),
        }
    }

    /// The first sequence not yet in the image: where a copy that ends now
    /// is consistent from.
    pub(super) fn next_seq(&self) -> u64 {
        match self {
            Self::Protected(d) => d.log_status().next_seq,
            Self::Forward(r) => r.state().applied_through + 1,
        }
    }
}
