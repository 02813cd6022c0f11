//! The replica side: one [`ReplicaDisk`] per replicated disk, in its own
//! directory — received segments, the replica image, undo files, and the
//! recovery points they make — and the [`store::ReplicaStore`] that keeps
//! them under the site's storage locations. Each stage of a replica's life
//! is its own module: `receive` (segments and initial copies arriving),
//! `apply` (with undo), `points` (materialising, pruning, folding),
//! `forward` (extended replication); `state` is `replica.json`.
//!
//! ```text
//!  <storage>/<vm>/<disk>/
//!    disk.img              the replica image, at the newest applied point
//!    incoming/<seq>.part   a segment being received (discarded on restart)
//!    log/<seq>.seg         received, durable and verified, not yet applied
//!    undo/<seq>.undo       what segment <seq> overwrote: rolls a point back to the one before
//!    undo/r<n>.undo        what resync batch <n> overwrote (resync.rs)
//!    resync/<n>.seg        a resync batch, durable, not yet applied
//!    forward/<a>-<b>.seg   applied, kept for the extended replica (forward.rs)
//!    materialized/<n>.img  recovery points written out (points.rs), and a diverged point's (diverged.rs)
//!    replica.json          identity, lifecycle, epoch, sequence positions, points (state.rs)
//!    lock                  flock'd while an agent has it open (one opener at a time)
//! ```

pub mod apply;
mod diverged;
mod files;
pub mod forward;
pub mod names;
pub mod points;
pub mod ranges;
pub mod receive;
pub mod resync;
pub mod retention;
pub mod scrub;
pub mod state;
pub mod store;

use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use crate::log::{FormatError, format::MAX_SEQ};
use files::{seq_files, undo_files, verify_file};
pub use receive::{Incoming, IncomingCopy, IncomingSegment};
pub use state::{ApplyStats, CopyCommit, Diverged, Lifecycle, MAX_DISK_SIZE, Point, PointKind, ReplicaState};

/// Checks a sequence number from the wire: 1..=MAX_SEQ.
pub fn check_seq(field: &'static str, value: u64) -> Result<()> {
    if value == 0 || value > MAX_SEQ {
        return Err(ReplicaError::Invalid { field, value, why: "sequence numbers run from 1 to 2^62" });
    }
    Ok(())
}

/// Checks an epoch from the wire: at most MAX_SEQ.
pub fn check_epoch(value: u64) -> Result<()> {
    if value > MAX_SEQ {
        return Err(ReplicaError::Invalid { field: "epoch", value, why: "epochs run from 0 to 2^62" });
    }
    Ok(())
}

/// Checks a disk size from the wire: 1 byte to [`MAX_DISK_SIZE`].
pub fn check_disk_size(value: u64) -> Result<()> {
    if value == 0 || value > MAX_DISK_SIZE {
        return Err(ReplicaError::Invalid {
            field: "disk_size",
            value,
            why: "a replicated disk holds 1 byte to 64 TiB",
        });
    }
    Ok(())
}

/// Why a replica operation failed. Each says what was refused; none leaves a
/// partly written file behind.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("segment {first_seq} failed verification and was discarded: {source}")]
    Verification { first_seq: u64, source: FormatError },
    #[error("segment {first_seq} does not match what was announced: {what}")]
    Mismatch { first_seq: u64, what: String },
    #[error("segment starts at sequence {found}, but the replica expects {expected}")]
    OutOfOrder { expected: u64, found: u64 },
    #[error(
        "segment is from epoch {found}, older than the replica's epoch {current}: a newer primary exists"
    )]
    StaleEpoch { current: u64, found: u64 },
    #[error("the replica has no initial copy yet")]
    NoInitialCopy,
    #[error("chunk at byte {found} of {what}; expected byte {expected}")]
    ChunkOutOfOrder { what: &'static str, expected: u64, found: u64 },
    #[error("{what} of {len} bytes exceeds the limit of {limit}")]
    TooLarge { what: &'static str, len: u64, limit: u64 },
    #[error("recovery point {0} does not exist")]
    NoSuchPoint(u64),
    #[error("replica state file {path} is unreadable: {why}")]
    BadState { path: PathBuf, why: String },
    #[error("{field} {value} is not allowed: {why}")]
    Invalid { field: &'static str, value: u64, why: &'static str },
    /// The replica is not in a state that allows the call (a resync running, none to finish).
    #[error("{0}")]
    Precondition(String),
    /// Another process (or another open in this one) holds the directory.
    #[error("replica directory {0} is in use by another agent process")]
    InUse(PathBuf),
}

type Result<T, E = ReplicaError> = std::result::Result<T, E>;

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> ReplicaError + '_ {
    move |source| ReplicaError::Io { path: path.to_owned(), source }
}

/// A fail point: the replica operation fails there as a crash would leave it.
macro_rules! fail {
    ($name:literal) => {
        $crate::fail_point!($name, |source| $crate::replica::ReplicaError::Io {
            path: std::path::PathBuf::from($name),
            source
        })
    };
}
pub(crate) use fail;

/// Takes `dir`'s `lock` exclusively, for as long as the returned file is
/// open: one opener of a replica directory at a time (an agent, or an import).
pub fn hold_dir(dir: &Path) -> Result<fs::File> {
    let path = dir.join("lock");
    let lock =
        fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io_at(&path))?;
    match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(lock),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(ReplicaError::InUse(dir.to_owned())),
        Err(e) => Err(io_at(&path)(e.into())),
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Limits on what a sender may make the replica write.
pub const MAX_SEGMENT_LEN: u64 = 64 << 30;

/// A replica disk. Reception and application lock separately, so receiving
/// continues while a point is materialised.
pub struct ReplicaDisk {
    dir: PathBuf,
    state: Mutex<ReplicaState>,
    apply_lock: Mutex<()>,
    /// When the primary last opened this replica (ms since the epoch; 0:
    /// not since this process started): its heartbeat when it has nothing to send.
    last_contact_ms: AtomicU64,
    /// `lock` in the directory, held exclusively while this is open: a
    /// second opener (another agent sharing the storage location) would
    /// run recovery under a running apply or resync.
    _lock: fs::File,
}

impl ReplicaDisk {
    /// Opens the replica in `dir` (which the store made, confined), creating it
    /// with `init` when there is none, and recovers from any crash.
    pub fn open(dir: &Path, init: impl FnOnce() -> ReplicaState) -> Result<Self> {
        let lock = hold_dir(dir)?;
        for sub in ["incoming", "log", "undo", "forward", "resync"] {
            let d = dir.join(sub);
            fs::create_dir_all(&d).map_err(io_at(&d))?;
        }
        let state = match state::load(dir)? {
            Some(s) => s,
            None => {
                let s = ReplicaState { version: state::STATE_VERSION, ..init() };
                state::store(dir, &s)?;
                s
            }
        };
        let disk = Self {
            dir: dir.to_owned(),
            state: Mutex::new(state),
            apply_lock: Mutex::new(()),
            last_contact_ms: Default::default(),
            _lock: lock,
        };
        disk.recover()?;
        Ok(disk)
    }

    fn recover(&self) -> Result<()> {
        let lifecycle = self.state().lifecycle;
        if let Lifecycle::CommittingCopy { commit } = lifecycle {
            self.commit_copy(commit)?;
        }
        // Partial receptions and partial undo files never counted for anything.
        for (_, p) in seq_files(&self.dir.join("incoming"), ".part")?
            .into_iter()
            .chain(seq_files(&self.dir.join("undo"), ".undo.part")?)
        {
            fs::remove_file(&p).map_err(io_at(&p))?;
        }
        let applied = self.state().applied_through;
        for (first, p) in seq_files(&self.dir.join("log"), ".seg")? {
            if first <= applied {
                // Applied; step 4 was cut short.
                if self.state().forward {
                    let (_, seal) = verify_file(&p)
                        .map_err(|source| ReplicaError::Verification { first_seq: first, source })?;
                    self.keep_for_forwarding(&p, first, seal.last_seq)?;
                } else {
                    fs::remove_file(&p).map_err(io_at(&p))?;
                }
            }
        }

        // Resync batches received whole are applied; partial ones go.
        self.recover_resync()?;

        // Undo files nothing refers to, of segments already applied: left by a
        // prune or a first point whose delete was cut short. (Those of segments
        // not yet applied are complete and reused by the next apply.)
        for (first, p) in undo_files(&self.dir.join("undo"))? {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if first <= applied && !self.refers_to(name) {
                fs::remove_file(&p).map_err(io_at(&p))?;
            }
        }
        Ok(())
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, ReplicaState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn image_path(&self) -> PathBuf {
        self.state().image.clone().unwrap_or_else(|| self.dir.join("disk.img"))
    }

    fn update(&self, f: impl FnOnce(&mut ReplicaState)) -> Result<()> {
        let mut s = self.state();
        let mut next = s.clone();
        f(&mut next);
        state::store(&self.dir, &next)?;
        *s = next;
        Ok(())
    }

    /// Records the primary's replication interval.
    pub fn set_primary_interval(&self, seconds: u32) -> Result<()> {
        self.update(|s| s.primary_interval_seconds = seconds)
    }

    /// Records the recovery history the primary asks for (`None`: the site's).
    pub fn set_history(&self, history: Option<retention::Policy>) -> Result<()> {
        if self.state().history == history {
            return Ok(());
        }
        self.update(|s| s.history = history)
    }

    /// Records the primary's final sequence of a planned failover (`None`
    /// withdraws it: the primary resumed). Only a replica that is receiving
    /// can be finalised.
    pub fn set_final(&self, last_seq: Option<u64>) -> Result<()> {
        let next = match (self.state().lifecycle, last_seq) {
            (Lifecycle::Receiving | Lifecycle::Finalized { .. }, Some(last_seq)) => {
                Lifecycle::Finalized { last_seq }
            }
            (Lifecycle::Finalized { .. }, None) => Lifecycle::Receiving,
            _ => return Ok(()),
        };
        if self.state().lifecycle == next {
            return Ok(());
        }
        self.update(|s| s.lifecycle = next)
    }

    /// Makes this replica the VM's disk: everything received is applied, the
    /// epoch moves on (segments of the old primary's epoch are refused from
    /// now on), and nothing more is received. Returns the image path.
    /// Promoting again (a retry, or serving it again after a restart)
    /// changes nothing.
    pub fn promote(&self) -> Result<PathBuf> {
        if self.state().promoted() {
            return Ok(self.image_path());
        }
        self.apply_pending()?;
        self.settle_diverged()?;
        self.update(|s| {
            s.lifecycle = Lifecycle::Promoted;
            s.epoch += 1;
        })?;
        Ok(self.image_path())
    }

    /// Completes an unplanned failover: the VM runs elsewhere (a materialised
    /// copy), the old primary is refused from now on, and only the newest
    /// point is kept (Complete-VMFailover).
    pub fn complete_unplanned(&self) -> Result<()> {
        if self.state().promoted() {
            return Ok(());
        }
        self.settle_diverged()?;
        self.prune(|_| false)?;
        self.update(|s| {
            s.lifecycle = Lifecycle::Promoted;
            s.epoch += 1;
        })
    }

    /// Reverse replication after a planned failover: this promoted copy,
    /// whose VM was since prepared (stopped, every write shipped) here,
    /// becomes the replica of the side that promoted it in turn. Both hold
    /// the same bytes, so nothing is copied: the new primary's log continues
    /// after `through` (the last sequence this side logged, which the image
    /// holds), and the points of the other direction are dropped.
    /// `image`: the old primary's own disk, when it is the image from now on.
    pub fn reverse(
        &self,
        epoch: u64,
        primary: String,
        trust_group: String,
        image: Option<PathBuf>,
        through: u64,
    ) -> Result<()> {
        // A diverged point is written out first: its undo goes next.
        self.settle_diverged()?;
        // Every undo file and segment of the other direction goes (folding
        // the undo files first would only rewrite what is deleted next).
        let _apply = self.apply_lock.lock().unwrap_or_else(|p| p.into_inner());
        for (_, p) in undo_files(&self.dir.join("undo"))?
            .into_iter()
            .chain(seq_files(&self.dir.join("log"), ".seg")?)
            .chain(self.forward_sealed()?.into_iter().map(|seg| (seg.first_seq, seg.path)))
        {
            fs::remove_file(&p).map_err(io_at(&p))?;
        }
        self.update(|s| {
            s.forward = false;
            s.epoch = epoch;
            s.primary = primary;
            s.trust_group = trust_group;
            s.lifecycle = Lifecycle::Receiving;
            s.consistent_from = 0;
            s.received_through = through;
            s.applied_through = through;
            s.points.clear();
            s.image = image;
        })
    }

    /// Records a contact from the primary (an Open).
    pub fn touch(&self) {
        self.last_contact_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// When the primary last opened this replica (0: not since start).
    pub fn last_contact_ms(&self) -> u64 {
        self.last_contact_ms.load(Ordering::Relaxed)
    }

    /// Records that the primary removed replication (the disk stays).
    pub fn mark_removed(&self) -> Result<()> {
        self.update(|s| s.lifecycle = Lifecycle::Removed { at_replica: false })
    }

    /// Records that the replica site removed replication (the disk stays).
    pub fn mark_removed_at_replica(&self) -> Result<()> {
        self.update(|s| s.lifecycle = Lifecycle::Removed { at_replica: true })
    }

    /// A primary opens a removed replica again: it starts over with an
    /// initial copy; the old image and points stay until that copy lands.
    pub fn restart_after_removal(&self) -> Result<()> {
        self.update(|s| s.lifecycle = Lifecycle::AwaitingCopy)
    }

    /// The sequence the replica expects next, or `None` before an initial copy.
    pub fn next_seq(&self) -> Option<u64> {
        let s = self.state();
        s.has_copy().then_some(s.received_through + 1)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn image(&self) -> PathBuf {
        self.image_path()
    }
}
