//! Why a sync failed, and what kind of failure that is for the controller.

use std::io;

use vmreplica_api::control::FailureKind;

/// Why a sync failed; all are retried with back-off.
#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    #[error("replica refused: {}: {}", .0.code(), .0.message())]
    Rpc(#[from] tonic::Status),
    #[error("reading {what}: {source}")]
    Read { what: String, source: io::Error },
    #[error(transparent)]
    Disk(#[from] crate::disk::DiskError),
    #[error(transparent)]
    Replica(#[from] crate::replica::ReplicaError),
    #[error(
        "the replica expects sequence {expected}, inside local segment {first}..={last}: \
         logs cannot bring it up to date; a resynchronisation is required"
    )]
    ResyncRequired { expected: u64, first: u64, last: u64 },
    #[error("{0}")]
    Tls(String),
    #[error(
        "the replica refused this primary's epoch {mine}: it is at epoch {current}, a newer primary of this \
         VM exists (it was failed over); this side's disks are made read-only: {message}"
    )]
    StaleEpoch { current: u64, mine: u64, message: String },
    #[error("the replica answered {call} with next_seq {value}, which no log can hold: nothing was deleted")]
    BadReply { call: &'static str, value: u64 },
    #[error(
        "the replica holds another history (epoch {replica_epoch}, expecting sequence {replica_next}) than \
         this disk's log (epoch {epoch}, sequences {log_start}..={last_logged}): nothing was deleted; \
         a resynchronisation is required"
    )]
    Diverged { replica_epoch: u64, replica_next: u64, epoch: u64, log_start: u64, last_logged: u64 },
    /// A resync is needed and may not run yet: why, and when it will.
    #[error("a resynchronisation is required: {0}")]
    ResyncWaiting(String),
    /// The initial copy goes by external media or an existing image: not yet imported there.
    #[error("{0}")]
    AwaitingInitial(String),
    /// A sealed segment changed on this side's disk after it was sealed.
    #[error(
        "log segment {first}..={last} is damaged on this disk ({why}): it was never sent whole and is kept \
         aside as {kept}; the replica will be resynchronised from the image"
    )]
    DamagedAtRest { first: u64, last: u64, why: String, kept: String },
}

impl ShipError {
    /// The kind of failure, for the controller to act on.
    pub fn kind(&self) -> FailureKind {
        use tonic::Code;
        match self {
            ShipError::Rpc(s) => match s.code() {
                Code::PermissionDenied | Code::Unauthenticated => FailureKind::RefusedPermission,
                Code::InvalidArgument => FailureKind::RefusedRequest,
                Code::FailedPrecondition => FailureKind::RefusedPrecondition,
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
                    FailureKind::Unreachable
                }
                _ => FailureKind::Other,
            },
            ShipError::Disk(crate::disk::DiskError::Journal(crate::log::JournalError::Faulted {
                ..
            })) => FailureKind::DiskFaulted,
            ShipError::Read { .. }
            | ShipError::Disk(_)
            | ShipError::Replica(_)
            | ShipError::DamagedAtRest { .. } => FailureKind::LocalDisk,
            ShipError::BadReply { .. } => FailureKind::BadReply,
            ShipError::Tls(_) => FailureKind::TlsRefused,
            ShipError::StaleEpoch { .. } => FailureKind::StaleEpoch,
            ShipError::ResyncRequired { .. } | ShipError::Diverged { .. } | ShipError::ResyncWaiting(_) => {
                FailureKind::ResyncRequired
            }
            ShipError::AwaitingInitial(_) => FailureKind::AwaitingInitialCopy,
        }
    }
}
