//! One disk on the replica side: received segments, the replica image, undo
//! files, and the recovery points they make.
//!
//! ```text
//!  <storage>/<vm>/<disk>/
//!    disk.img              the replica image, at the newest applied point
//!    incoming/<seq>.part   a segment being received (discarded on restart)
//!    log/<seq>.seg         received, durable and verified, not yet applied
//!    undo/<seq>.undo       what segment <seq> overwrote: rolls a point back to the one before
//!    replica.json          identity, trust group, epoch, sequence positions, points
//! ```
//!
//! Applying a segment, and why each crash point is safe:
//! 1. its undo file is written from the image's current contents, fsynced and
//!    renamed into place (crash before the rename: the image is untouched; the
//!    partial undo is deleted and rebuilt);
//! 2. its records are applied and the image fsynced (crash here: the undo file
//!    is complete, and applying again from the start is idempotent);
//! 3. `replica.json` records the new point (crash before: step 2 repeats);
//! 4. the segment file is deleted (crash before: it is recognised as applied).

use std::{
    fs::{self, File, OpenOptions},
    io::{self, BufReader, BufWriter, Write},
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use super::ranges::{RangeMap, Source};
use crate::{
    image::sparse_copy,
    log::{
        FormatError, Record, RecordKind, SegmentHeader, SegmentReader,
        apply::{apply_record, check_bounds},
        format::{MAX_PAYLOAD, MAX_SEQ, RECORD_HEADER_LEN, SegmentWriter},
    },
};

/// Largest disk a replica accepts (64 TiB, VHDX's limit too).
pub const MAX_DISK_SIZE: u64 = 64 << 40;

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
}

type Result<T, E = ReplicaError> = std::result::Result<T, E>;

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> ReplicaError + '_ {
    move |source| ReplicaError::Io { path: path.to_owned(), source }
}

fn fail(name: &str) -> Result<()> {
    crate::failpoint::hit(name).map_err(|source| ReplicaError::Io { path: PathBuf::from(name), source })
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// How a recovery point came about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PointKind {
    Standard,
    Hourly,
    ApplicationConsistent,
}

/// One recovery point: the image as it was after applying sequence `seq`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Point {
    pub seq: u64,
    /// When the primary sealed the segment ending here (ms since the epoch).
    pub time_ms: u64,
    pub kind: PointKind,
    /// Undo file (in `undo/`) that takes this point back to the previous one;
    /// `None` for the oldest point.
    pub undo: Option<String>,
}

/// What `replica.json` holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaState {
    pub vm_id: String,
    pub disk_id: String,
    pub disk_size: u64,
    pub epoch: u64,
    /// Trust group of the authorisation that created this replica.
    pub trust_group: String,
    /// The primary server name that created it.
    pub primary: String,
    pub has_copy: bool,
    /// Points ending before this sequence are not crash-consistent (the initial
    /// copy was read while the VM kept writing).
    pub consistent_from: u64,
    pub received_through: u64,
    pub applied_through: u64,
    pub points: Vec<Point>,
    /// What was applied, for the replica side's statistics.
    #[serde(default)]
    pub stats: ApplyStats,
    /// The primary removed replication: nothing more arrives; the disk stays.
    /// A primary that opens it again starts over with an initial copy.
    #[serde(default)]
    pub removed: bool,
    /// Removed at the replica site (its Replica object was deleted): the
    /// primary is refused until it removes replication too and enables it again.
    #[serde(default)]
    pub removed_at_replica: bool,
    /// Planned failover: the primary's final sequence (it stopped writing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_final_seq: Option<u64>,
    /// Promoted: this copy is now the primary's disk; nothing more is received.
    #[serde(default)]
    pub promoted: bool,
    /// The VM's own recovery history, as its primary last sent it; `None`:
    /// the site's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<super::retention::Policy>,
    /// Reverse replication onto the old primary: its own disk is the image
    /// (set by this agent, never from the wire). `None`: `disk.img` here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<PathBuf>,
    /// Extended replication: applied segments are kept in `forward/` until
    /// the extended replica acknowledges them, instead of being deleted.
    #[serde(default)]
    pub forward: bool,
    /// The primary's replication interval, as it last said (0: not said).
    #[serde(default)]
    pub primary_interval_seconds: u32,
    /// Initial copies received so far (each starts a new history).
    #[serde(default)]
    pub copies: u64,
    /// Extended replication: which of those the extended replica holds a
    /// copy of; another one arriving means it needs a new copy too.
    #[serde(default)]
    pub forwarded_copy: u64,
    /// An initial copy is being committed (it is durable in
    /// `incoming/disk.img.part` until it replaces the image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committing_copy: Option<CopyCommit>,
}

/// Where replication resumes after an initial copy (see [`ReplicaDisk::finish_copy`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CopyCommit {
    pub next_seq: u64,
    pub consistent_from: u64,
    pub epoch: u64,
}

impl ReplicaState {
    /// Checks what `replica.json` says before it is used: the numbers a
    /// damaged or hand-edited file could carry that arithmetic relies on.
    fn check(&self) -> std::result::Result<(), String> {
        let bad = |field: &str, v: u64| Err(format!("{field} {v} is out of range"));
        if self.disk_size == 0 || self.disk_size > MAX_DISK_SIZE {
            return bad("diskSize", self.disk_size);
        }
        if self.epoch > MAX_SEQ {
            return bad("epoch", self.epoch);
        }
        if self.received_through > MAX_SEQ {
            return bad("receivedThrough", self.received_through);
        }
        if self.applied_through > self.received_through {
            return bad("appliedThrough (beyond receivedThrough)", self.applied_through);
        }
        if self.consistent_from > MAX_SEQ {
            return bad("consistentFrom", self.consistent_from);
        }
        if let Some(p) = self.points.iter().find(|p| p.seq > self.applied_through) {
            return bad("a recovery point's seq (beyond appliedThrough)", p.seq);
        }
        if let Some(c) = self.committing_copy
            && (c.next_seq == 0 || c.next_seq > MAX_SEQ || c.consistent_from < c.next_seq)
        {
            return bad("committingCopy.nextSeq", c.next_seq);
        }
        Ok(())
    }
}

/// Counters of applied segments (kept in `replica.json`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyStats {
    pub segments: u64,
    pub bytes: u64,
    pub max_segment_bytes: u64,
    /// Of `bytes`, how many were written with O_DIRECT (aligned writes on a
    /// filesystem that allows it); the rest went through the page cache.
    #[serde(default)]
    pub direct_bytes: u64,
    /// When the newest applied segment was sealed on the primary.
    pub last_sealed_unix_ms: u64,
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
    last_contact_ms: std::sync::atomic::AtomicU64,
}

fn open_nofollow(path: &Path, write: bool, create_new: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .create_new(create_new)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_at(dir))
}

fn seq_files(dir: &Path, ext: &str) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).map_err(io_at(dir))? {
        let path = e.map_err(io_at(dir))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if let Some(seq) = name.strip_suffix(ext).and_then(|n| n.parse::<u64>().ok()) {
            out.push((seq, path));
        }
    }
    out.sort();
    Ok(out)
}

impl ReplicaDisk {
    /// Opens the replica in `dir` (which the store made, confined), creating it
    /// with `init` when there is none, and recovers from any crash.
    pub fn open(dir: &Path, init: impl FnOnce() -> ReplicaState) -> Result<Self> {
        for sub in ["incoming", "log", "undo", "forward"] {
            let d = dir.join(sub);
            fs::create_dir_all(&d).map_err(io_at(&d))?;
        }
        let state_path = dir.join("replica.json");
        let state: ReplicaState = match fs::read(&state_path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| ReplicaError::BadState { path: state_path.clone(), why: e.to_string() })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let s = init();
                store_state(dir, &s)?;
                s
            }
            Err(e) => return Err(ReplicaError::Io { path: state_path, source: e }),
        };
        state.check().map_err(|why| ReplicaError::BadState { path: state_path.clone(), why })?;
        let disk = Self {
            dir: dir.to_owned(),
            state: Mutex::new(state),
            apply_lock: Mutex::new(()),
            last_contact_ms: Default::default(),
        };
        disk.recover()?;
        Ok(disk)
    }

    fn recover(&self) -> Result<()> {
        let committing = self.state().committing_copy;
        if let Some(c) = committing {
            self.commit_copy(c)?;
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

        // Undo files no point refers to, of segments already applied: left by a
        // prune or a first point whose delete was cut short. (Those of segments
        // not yet applied are complete and reused by the next apply.)
        let referenced: Vec<String> = self.state().points.iter().filter_map(|p| p.undo.clone()).collect();
        for (first, p) in undo_files(&self.dir.join("undo"))? {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if first <= applied && !referenced.iter().any(|r| r == name) {
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
        store_state(&self.dir, &next)?;
        *s = next;
        Ok(())
    }

    /// Records the primary's replication interval.
    pub fn set_primary_interval(&self, seconds: u32) -> Result<()> {
        self.update(|s| s.primary_interval_seconds = seconds)
    }

    /// Records the recovery history the primary asks for (`None`: the site's).
    pub fn set_history(&self, history: Option<super::retention::Policy>) -> Result<()> {
        if self.state().history == history {
            return Ok(());
        }
        self.update(|s| s.history = history)
    }

    /// Records the primary's final sequence of a planned failover (`None`
    /// withdraws it).
    pub fn set_final(&self, last_seq: Option<u64>) -> Result<()> {
        if self.state().primary_final_seq == last_seq {
            return Ok(());
        }
        self.update(|s| s.primary_final_seq = last_seq)
    }

    /// Makes this replica the VM's disk: everything received is applied, the
    /// epoch moves on (segments of the old primary's epoch are refused from
    /// now on), and nothing more is received. Returns the image path.
    /// Promoting again (a retry, or serving it again after a restart)
    /// changes nothing.
    pub fn promote(&self) -> Result<PathBuf> {
        if self.state().promoted {
            return Ok(self.image_path());
        }
        self.apply_pending()?;
        self.update(|s| {
            s.promoted = true;
            s.epoch += 1;
        })?;
        Ok(self.image_path())
    }

    /// Completes an unplanned failover: the VM runs elsewhere (a materialised
    /// copy), the old primary is refused from now on, and only the newest
    /// point is kept (Complete-VMFailover).
    pub fn complete_unplanned(&self) -> Result<()> {
        if self.state().promoted {
            return Ok(());
        }
        self.prune(|_| false)?;
        self.update(|s| {
            s.promoted = true;
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
            s.has_copy = true;
            s.consistent_from = 0;
            s.received_through = through;
            s.applied_through = through;
            s.points.clear();
            s.removed = false;
            s.removed_at_replica = false;
            s.primary_final_seq = None;
            s.promoted = false;
            s.image = image;
        })
    }

    /// Records a contact from the primary (an Open).
    pub fn touch(&self) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        self.last_contact_ms.store(now.as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// When the primary last opened this replica (0: not since start).
    pub fn last_contact_ms(&self) -> u64 {
        self.last_contact_ms.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records that the primary removed replication (the disk stays).
    pub fn mark_removed(&self) -> Result<()> {
        self.update(|s| {
            s.removed = true;
            s.removed_at_replica = false;
        })
    }

    /// Records that the replica site removed replication (the disk stays).
    pub fn mark_removed_at_replica(&self) -> Result<()> {
        self.update(|s| {
            s.removed = true;
            s.removed_at_replica = true;
        })
    }

    /// A primary opens a removed replica again: it starts over with an
    /// initial copy; the old image and points stay until that copy lands.
    pub fn restart_after_removal(&self) -> Result<()> {
        self.update(|s| {
            s.removed = false;
            s.has_copy = false;
        })
    }

    /// Starts receiving the initial copy announced by `start`: a fresh sparse
    /// image of the disk's size beside the replica. Everything the copy says
    /// about itself is checked here, before anything is written; the replica
    /// stays as it was until [`Self::finish_copy`] commits the whole copy.
    pub fn begin_copy(&self, disk_size: u64, epoch: u64, next_seq: u64) -> Result<IncomingCopy> {
        check_seq("next_seq", next_seq)?;
        check_epoch(epoch)?;
        let s = self.state();
        if epoch < s.epoch {
            return Err(ReplicaError::StaleEpoch { current: s.epoch, found: epoch });
        }
        if disk_size != s.disk_size {
            return Err(ReplicaError::Mismatch {
                first_seq: 0,
                what: format!("disk size {disk_size}, replica has {}", s.disk_size),
            });
        }
        drop(s);
        let path = self.dir.join("incoming").join("disk.img.part");
        let _ = fs::remove_file(&path);
        let file = open_nofollow(&path, true, true).map_err(io_at(&path))?;
        file.set_len(disk_size).map_err(io_at(&path))?;
        Ok(IncomingCopy { path, file, size: disk_size, received: 0, next_seq, epoch })
    }

    /// Makes a received initial copy the replica image. Replication resumes
    /// at the copy's `next_seq`; points become consistent from
    /// `consistent_from` (the primary's next sequence when its reading ended,
    /// so never before `next_seq`).
    ///
    /// The commit is crash-safe: the copy is made durable and the intent
    /// recorded in `replica.json` (no points from then on: they belonged to
    /// the image being replaced) before the image is replaced and the old
    /// history deleted; [`Self::open`] finishes an interrupted commit.
    pub fn finish_copy(&self, copy: IncomingCopy, consistent_from: u64) -> Result<()> {
        if consistent_from < copy.next_seq || consistent_from > MAX_SEQ {
            let _ = fs::remove_file(&copy.path);
            return Err(ReplicaError::Invalid {
                field: "consistent_from",
                value: consistent_from,
                why: "it must lie between the copy's next_seq and 2^62",
            });
        }
        let _apply = self.apply_lock.lock().unwrap_or_else(|p| p.into_inner());
        copy.file.sync_all().map_err(io_at(&copy.path))?;
        let commit = CopyCommit { next_seq: copy.next_seq, consistent_from, epoch: copy.epoch };
        self.update(|s| {
            s.has_copy = false;
            s.points.clear();
            s.committing_copy = Some(commit);
        })?;
        fail("copy.after-intent")?;
        self.commit_copy(commit)
    }

    /// The second half of [`Self::finish_copy`], also run by recovery: the
    /// durable copy replaces the image (unless it already did), the history
    /// it replaces goes, and the new positions are recorded. Idempotent.
    fn commit_copy(&self, c: CopyCommit) -> Result<()> {
        let part = self.dir.join("incoming").join("disk.img.part");
        if part.exists() {
            let image = self.image_path();
            fs::rename(&part, &image).map_err(io_at(&part))?;
            sync_dir(&self.dir)?;
            if let Some(parent) = image.parent() {
                sync_dir(parent)?;
            }
        }
        // Segments of the history this copy replaces go, those kept for an
        // extended replica too: it gets a new copy instead.
        for (_, p) in seq_files(&self.dir.join("log"), ".seg")?
            .into_iter()
            .chain(undo_files(&self.dir.join("undo"))?)
            .chain(self.forward_sealed()?.into_iter().map(|seg| (seg.first_seq, seg.path)))
        {
            fs::remove_file(&p).map_err(io_at(&p))?;
        }
        self.update(|s| {
            s.copies += 1;
            s.has_copy = true;
            s.epoch = s.epoch.max(c.epoch);
            // Checked when the copy began: next_seq >= 1.
            s.received_through = c.next_seq - 1;
            s.applied_through = c.next_seq - 1;
            s.consistent_from = c.consistent_from;
            s.points.clear();
            s.committing_copy = None;
        })
    }

    /// The sequence the replica expects next, or `None` before an initial copy.
    pub fn next_seq(&self) -> Option<u64> {
        let s = self.state();
        s.has_copy.then_some(s.received_through + 1)
    }

    /// Starts receiving a segment announced as `[first_seq, last_seq]`, `len` bytes.
    pub fn begin_segment(&self, first_seq: u64, last_seq: u64, epoch: u64, len: u64) -> Result<Incoming> {
        check_seq("first_seq", first_seq)?;
        check_seq("last_seq", last_seq)?;
        check_epoch(epoch)?;
        if last_seq < first_seq {
            return Err(ReplicaError::Invalid {
                field: "last_seq",
                value: last_seq,
                why: "a segment cannot end before its first_seq",
            });
        }
        let s = self.state();
        if !s.has_copy {
            return Err(ReplicaError::NoInitialCopy);
        }
        if epoch < s.epoch {
            return Err(ReplicaError::StaleEpoch { current: s.epoch, found: epoch });
        }
        if len > MAX_SEGMENT_LEN {
            return Err(ReplicaError::TooLarge { what: "segment", len, limit: MAX_SEGMENT_LEN });
        }
        if last_seq <= s.received_through {
            return Ok(Incoming::Duplicate { durable_through: s.received_through });
        }
        if first_seq != s.received_through + 1 {
            return Err(ReplicaError::OutOfOrder { expected: s.received_through + 1, found: first_seq });
        }
        drop(s);
        let path = self.dir.join("incoming").join(format!("{first_seq:020}.part"));
        let _ = fs::remove_file(&path);
        let file = open_nofollow(&path, true, true).map_err(io_at(&path))?;
        Ok(Incoming::New(IncomingSegment {
            path,
            file: BufWriter::with_capacity(1 << 20, file),
            first_seq,
            last_seq,
            epoch,
            len,
            received: 0,
        }))
    }

    /// Verifies a fully received segment, makes it durable and queues it for
    /// apply; returns the sequence the replica is durable through.
    pub fn finish_segment(&self, seg: IncomingSegment) -> Result<u64> {
        let IncomingSegment { path, file, first_seq, last_seq, epoch, len, received } = seg;
        let discard = |e: ReplicaError| {
            let _ = fs::remove_file(&path);
            e
        };
        if received != len {
            return Err(discard(ReplicaError::Mismatch {
                first_seq,
                what: format!("{received} bytes received, {len} announced"),
            }));
        }
        let file = file
            .into_inner()
            .map_err(|e| discard(ReplicaError::Io { path: path.clone(), source: e.into_error() }))?;
        file.sync_all().map_err(|e| discard(ReplicaError::Io { path: path.clone(), source: e }))?;
        let (header, seal) =
            verify_file(&path).map_err(|e| discard(ReplicaError::Verification { first_seq, source: e }))?;
        let s = self.state().clone();
        let what =
            if (header.vm_id.as_str(), header.disk_id.as_str()) != (s.vm_id.as_str(), s.disk_id.as_str()) {
                Some(format!("segment is for {}/{}", header.vm_id, header.disk_id))
            } else if header.first_seq != first_seq || seal.last_seq != last_seq {
                Some(format!("holds {}..={}", header.first_seq, seal.last_seq))
            } else if header.epoch != epoch {
                Some(format!("epoch {} inside, {epoch} announced", header.epoch))
            } else {
                None
            };
        if let Some(what) = what {
            return Err(discard(ReplicaError::Mismatch { first_seq, what }));
        }
        let dest = self.dir.join("log").join(format!("{first_seq:020}.seg"));
        fs::rename(&path, &dest).map_err(io_at(&path))?;
        sync_dir(dest.parent().expect("log dir"))?;
        self.update(|s| {
            s.received_through = last_seq;
            s.epoch = s.epoch.max(epoch);
        })?;
        Ok(last_seq)
    }

    /// Applies every received segment not yet applied; returns how many.
    pub fn apply_pending(&self) -> Result<usize> {
        let _apply = self.apply_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        for (first, seg) in seq_files(&self.dir.join("log"), ".seg")? {
            if first <= self.state().applied_through {
                continue;
            }
            self.apply_one(first, &seg)?;
            n += 1;
        }
        Ok(n)
    }

    fn apply_one(&self, first: u64, seg: &Path) -> Result<()> {
        let image_path = self.image_path();
        let image = open_nofollow(&image_path, true, false).map_err(io_at(&image_path))?;
        // Aligned reads and writes of the image bypass the page cache (see
        // `super::direct`); `None` where the filesystem refuses.
        let direct = super::direct::open(&image_path);
        let size = self.state().disk_size;
        let verification = |source| ReplicaError::Verification { first_seq: first, source };
        // Pass 1: the union of ranges the segment touches, from its record
        // headers (it was verified in full when it was received).
        let file = open_nofollow(seg, false, false).map_err(io_at(seg))?;
        let (header, ranges, seal) =
            crate::log::format::scan_ranges(BufReader::with_capacity(64 << 10, file))
                .map_err(verification)?;
        // The image is input 0; its byte at disk offset X is at file offset X.
        // Holes read as zeroes without being read (an empty replica's first
        // segments would otherwise read, and check, gigabytes of zeroes).
        let mut touched = RangeMap::default();
        for (start, end) in ranges {
            touched.insert(start, end.min(size), Source::Zero);
        }
        let spans: Vec<(u64, u64)> = touched.iter().map(|(s, e, _)| (s, e)).collect();
        for (start, end) in spans {
            for (at, len) in crate::image::data_within(&image, start, end).map_err(io_at(&image_path))? {
                touched.insert(at, at + len, Source::File { file: 0, offset: at });
            }
        }
        // Step 1: the undo file.
        let undo_name = format!("{first:020}.undo");
        let undo_path = self.dir.join("undo").join(&undo_name);
        if verify_file(&undo_path).is_err() {
            let part = self.dir.join("undo").join(format!("{undo_name}.part"));
            let _ = fs::remove_file(&part);
            let f = open_nofollow(&part, true, true).map_err(io_at(&part))?;
            let out = super::direct::DirectWriter::new(f, super::direct::open(&part));
            let mut w = SegmentWriter::new(out, &SegmentHeader { first_seq: first, ..header.clone() })
                .map_err(io_at(&part))?;
            write_ranges(&mut w, &touched, &[&image], direct.as_ref(), &image_path, size)?;
            let (out, _) = w.finish(now_ms()).map_err(io_at(&part))?;
            let f = out.finish().map_err(io_at(&part))?;
            f.sync_all().map_err(io_at(&part))?;
            fs::rename(&part, &undo_path).map_err(io_at(&part))?;
            sync_dir(&self.dir.join("undo"))?;
        }
        fail("apply.after-undo")?;
        // Step 2: apply, checking each record's CRC as it goes.
        let f = open_nofollow(seg, false, false).map_err(io_at(seg))?;
        let seg_file = f.try_clone().map_err(io_at(seg))?;
        let reader =
            SegmentReader::new_verified(BufReader::with_capacity(1 << 20, f)).map_err(verification)?;
        let direct_bytes = apply_records(reader, &seg_file, &image, direct.as_ref(), size, seal.records)
            .map_err(|e| match e {
                ApplyError::Format(source) => verification(source),
                ApplyError::Io(source) => ReplicaError::Io { path: image_path.clone(), source },
                ApplyError::Stopped(e) => e,
            })?;
        image.sync_all().map_err(io_at(&image_path))?;
        fail("apply.before-point")?;
        // Step 3: the point.
        self.update(|s| {
            s.applied_through = seal.last_seq;
            s.stats.segments += 1;
            s.stats.bytes += seal.data_bytes;
            s.stats.max_segment_bytes = s.stats.max_segment_bytes.max(seal.data_bytes);
            s.stats.direct_bytes += direct_bytes;
            s.stats.last_sealed_unix_ms = seal.sealed_unix_ms;
            if seal.last_seq + 1 >= s.consistent_from {
                let undo = if s.points.is_empty() { None } else { Some(undo_name.clone()) };
                let kind =
                    if seal.app_consistent { PointKind::ApplicationConsistent } else { PointKind::Standard };
                s.points.push(Point { seq: seal.last_seq, time_ms: seal.sealed_unix_ms, kind, undo });
            }
        })?;
        // Kept only when the new point refers to it: the oldest point needs no
        // undo, and segments before the first consistent point make no point.
        if self.state().points.last().is_none_or(|p| p.undo.as_deref() != Some(undo_name.as_str())) {
            fs::remove_file(&undo_path).map_err(io_at(&undo_path))?;
        }
        fail("apply.before-delete")?;
        // Step 4.
        if self.state().forward {
            return self.keep_for_forwarding(seg, first, seal.last_seq);
        }
        fs::remove_file(seg).map_err(io_at(seg))?;
        // The last handle on the unlinked segment: closing it frees its blocks
        // (with online discard, ~0.15 s per GiB here), which the next apply
        // need not wait for.
        std::thread::spawn(move || drop(seg_file));
        Ok(())
    }

    /// Moves an applied segment into `forward/`, named by its first and
    /// last sequence, for the extended replica.
    fn keep_for_forwarding(&self, seg: &Path, first: u64, last: u64) -> Result<()> {
        let dir = self.dir.join("forward");
        fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        let dest = dir.join(format!("{first:020}-{last:020}.seg"));
        fs::rename(seg, &dest).map_err(io_at(seg))?;
        sync_dir(&dir)
    }

    /// Starts or stops keeping applied segments for an extended replica;
    /// stopping deletes the kept ones. Returns the sequence applied through:
    /// every later segment is kept from now on.
    pub fn set_forward(&self, on: bool) -> Result<u64> {
        let _apply = self.apply_lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.state().forward != on {
            self.update(|s| s.forward = on)?;
        }
        if !on {
            self.forward_acknowledge(u64::MAX)?;
        }
        Ok(self.state().applied_through)
    }

    /// Records that the extended replica now holds initial copy `copy`.
    pub fn set_forwarded_copy(&self, copy: u64) -> Result<()> {
        self.update(|s| s.forwarded_copy = copy)
    }

    /// Segments kept for the extended replica, oldest first.
    pub fn forward_sealed(&self) -> Result<Vec<crate::log::SealedSegment>> {
        let dir = self.dir.join("forward");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(io_at(&dir))? {
            let path = e.map_err(io_at(&dir))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let range = name.strip_suffix(".seg").and_then(|n| n.split_once('-'));
            let Some((first, last)) = range.and_then(|(f, l)| Some((f.parse().ok()?, l.parse().ok()?)))
            else {
                continue; // not one of ours
            };
            let bytes = fs::metadata(&path).map_err(io_at(&path))?.len();
            out.push(crate::log::SealedSegment {
                path,
                first_seq: first,
                last_seq: last,
                records: 0,
                bytes,
                app_consistent: false,
            });
        }
        out.sort_by_key(|s| s.first_seq);
        Ok(out)
    }

    /// Deletes the kept segments the extended replica holds (through `through`).
    pub fn forward_acknowledge(&self, through: u64) -> Result<()> {
        for seg in self.forward_sealed()? {
            if seg.last_seq <= through {
                fs::remove_file(&seg.path).map_err(io_at(&seg.path))?;
            }
        }
        Ok(())
    }

    /// Recovery points, oldest first.
    pub fn points(&self) -> Vec<Point> {
        self.state().points.clone()
    }

    /// Where a materialised copy named `name` (a plain label) lives.
    pub fn materialized_path(&self, name: &str) -> PathBuf {
        self.dir.join("materialized").join(format!("{name}.img"))
    }

    /// Materialises point `seq` (0: the newest, or the image as it is when
    /// there is no point yet) as copy `name`, replacing an earlier one of that
    /// name; returns its path and the point's sequence.
    pub fn materialize_named(&self, seq: u64, name: &str) -> Result<(PathBuf, u64)> {
        let dest = self.materialized_path(name);
        let dir = dest.parent().expect("under the replica dir");
        fs::create_dir_all(dir).map_err(io_at(dir))?;
        let tmp = dest.with_extension("img.part");
        let _ = fs::remove_file(&tmp);
        let seq = match (seq, self.points().last()) {
            (0, Some(p)) => p.seq,
            (0, None) => {
                let _apply = self.apply_lock.lock().unwrap_or_else(|p| p.into_inner());
                let image_path = self.image_path();
                let image = open_nofollow(&image_path, false, false).map_err(io_at(&image_path))?;
                sparse_copy(&image, &tmp).map_err(io_at(&tmp))?;
                File::open(&tmp).and_then(|f| f.sync_all()).map_err(io_at(&tmp))?;
                let seq = self.state().applied_through;
                self.record_copy_seq(name, seq)?;
                fs::rename(&tmp, &dest).map_err(io_at(&tmp))?;
                return Ok((dest, seq));
            }
            (s, _) => s,
        };
        self.materialize(seq, &tmp)?;
        self.record_copy_seq(name, seq)?;
        fs::rename(&tmp, &dest).map_err(io_at(&tmp))?;
        sync_dir(dir)?;
        Ok((dest, seq))
    }

    /// Remembers which sequence copy `name` holds (a promotion of the copy
    /// continues the log from the next one).
    fn record_copy_seq(&self, name: &str, seq: u64) -> Result<()> {
        let path = self.materialized_path(name).with_extension("seq");
        fs::write(&path, seq.to_string()).and_then(|()| File::open(&path)?.sync_all()).map_err(io_at(&path))
    }

    /// The sequence copy `name` holds, if it exists.
    pub fn materialized_seq(&self, name: &str) -> Option<u64> {
        let path = self.materialized_path(name).with_extension("seq");
        fs::read_to_string(path).ok()?.trim().parse().ok()
    }

    /// Deletes copy `name`; whether it existed.
    pub fn delete_materialized(&self, name: &str) -> Result<bool> {
        let _ = fs::remove_file(self.materialized_path(name).with_extension("seq"));
        let path = self.materialized_path(name);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_at(&path)(e)),
        }
    }

    /// Writes the image as it was at point `seq` to a new sparse file at `dest`
    /// (a reflink where the filesystem allows). Application waits meanwhile;
    /// reception does not.
    pub fn materialize(&self, seq: u64, dest: &Path) -> Result<()> {
        let _apply = self.apply_lock.lock().unwrap_or_else(|p| p.into_inner());
        let points = self.points();
        let at = points.iter().position(|p| p.seq == seq).ok_or(ReplicaError::NoSuchPoint(seq))?;
        let image_path = self.image_path();
        let image = open_nofollow(&image_path, false, false).map_err(io_at(&image_path))?;
        sparse_copy(&image, dest).map_err(io_at(dest))?;
        let out = OpenOptions::new().read(true).write(true).open(dest).map_err(io_at(dest))?;
        let size = self.state().disk_size;
        // Newest first: each undo takes a point back to the one before it.
        for p in points[at + 1..].iter().rev() {
            let undo =
                self.dir.join("undo").join(p.undo.as_deref().expect("only the oldest point lacks an undo"));
            let verification = |source| ReplicaError::Verification { first_seq: p.seq, source };
            let mut reader = open_reader(&undo).map_err(verification)?;
            while let Some(r) = reader.next_record().map_err(verification)? {
                apply_record(&out, size, &r).map_err(io_at(dest))?;
            }
            reader.finish_sealed().map_err(verification)?;
        }
        out.sync_all().map_err(io_at(dest))
    }

    /// Drops the points `keep` rejects (never the newest), folding their undo
    /// files into their successors' so the remaining points stay reachable and
    /// storage is the union of what changed between the remaining points.
    pub fn prune(&self, keep: impl Fn(&Point) -> bool) -> Result<usize> {
        let _apply = self.apply_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut points = self.points();
        let mut removed = 0;
        let mut i = 0;
        while i + 1 < points.len() {
            if keep(&points[i]) {
                i += 1;
                continue;
            }
            // Removing point i: point i+1's undo must now reach point i-1, i.e.
            // undo(i+1) then undo(i). The oldest point has no predecessor: its
            // successor's undo simply goes.
            let next_undo = points[i + 1].undo.clone().expect("not the oldest");
            let new_undo = match points[i].undo.clone() {
                None => None,
                Some(this_undo) => Some(self.fold(&next_undo, &this_undo)?),
            };
            let old = [points[i].undo.clone(), Some(next_undo)];
            points[i + 1].undo = new_undo;
            points.remove(i);
            self.update(|s| s.points = points.clone())?;
            for name in old.into_iter().flatten() {
                if points.iter().all(|p| p.undo.as_deref() != Some(name.as_str())) {
                    let p = self.dir.join("undo").join(&name);
                    fs::remove_file(&p).map_err(io_at(&p))?;
                }
            }
            removed += 1;
        }
        Ok(removed)
    }

    /// Applies a recovery-history policy as of `now_ms`: drops (folding) what
    /// it rejects and relabels kept points (Standard points beyond the window
    /// become Hourly). Returns how many points were dropped.
    pub fn apply_retention(&self, policy: &super::retention::Policy, now_ms: u64) -> Result<usize> {
        let points = self.points();
        let plan = super::retention::plan(&points, now_ms, policy);
        let decided: std::collections::HashMap<u64, Option<PointKind>> =
            points.iter().zip(&plan).map(|(p, k)| (p.seq, *k)).collect();
        let dropped = self.prune(|p| decided.get(&p.seq).is_some_and(|k| k.is_some()))?;
        self.update(|s| {
            for p in &mut s.points {
                if let Some(Some(kind)) = decided.get(&p.seq) {
                    p.kind = *kind;
                }
            }
        })?;
        Ok(dropped)
    }

    /// One undo file equal to applying `first` then `second`; returns its name.
    fn fold(&self, first: &str, second: &str) -> Result<String> {
        let undo_dir = self.dir.join("undo");
        let paths = [undo_dir.join(first), undo_dir.join(second)];
        let mut map = RangeMap::default();
        let mut header = None;
        for (i, path) in paths.iter().enumerate() {
            let verification = |source| ReplicaError::Verification { first_seq: 0, source };
            let mut reader = open_reader(path).map_err(verification)?;
            header.get_or_insert_with(|| reader.header.clone());
            loop {
                let at = reader.position;
                let Some(r) = reader.next_record().map_err(verification)? else { break };
                let src = match r.kind {
                    RecordKind::Write => Source::File { file: i, offset: at + RECORD_HEADER_LEN as u64 },
                    _ => Source::Zero,
                };
                map.insert(r.offset, r.offset + r.length, src);
            }
            reader.finish_sealed().map_err(verification)?;
        }
        let files: Vec<File> =
            paths.iter().map(|p| File::open(p).map_err(io_at(p))).collect::<Result<_>>()?;
        // Named after the newer file, with a fold counter so names never repeat.
        let name = format!("{}.f{}.undo", first.trim_end_matches(".undo"), now_ms());
        let part = undo_dir.join(format!("{name}.part"));
        let f = open_nofollow(&part, true, true).map_err(io_at(&part))?;
        let mut w =
            SegmentWriter::new(BufWriter::new(f), &header.expect("two files read")).map_err(io_at(&part))?;
        let size = self.state().disk_size;
        let inputs: Vec<&File> = files.iter().collect();
        write_ranges(&mut w, &map, &inputs, None, &part, size)?;
        let (out, _) = w.finish(now_ms()).map_err(io_at(&part))?;
        let f =
            out.into_inner().map_err(|e| ReplicaError::Io { path: part.clone(), source: e.into_error() })?;
        f.sync_all().map_err(io_at(&part))?;
        let dest = undo_dir.join(&name);
        fs::rename(&part, &dest).map_err(io_at(&part))?;
        sync_dir(&undo_dir)?;
        Ok(name)
    }

    /// Bytes held by undo files (the storage recovery points cost).
    pub fn undo_bytes(&self) -> Result<u64> {
        let mut total = 0;
        for (_, path) in undo_files(&self.dir.join("undo"))? {
            total += fs::metadata(&path).map_err(io_at(&path))?.len();
        }
        Ok(total)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn image(&self) -> PathBuf {
        self.image_path()
    }
}

enum ApplyError {
    Format(FormatError),
    Io(io::Error),
    Stopped(ReplicaError),
}

/// A record on its way from the reader thread to the writer: with its payload
/// in an aligned buffer when it can be written direct.
enum Staged {
    Direct(Record, super::direct::AlignedBuf),
    Buffered(Record),
}

/// Applies `reader`'s records to `image` (DESIGN step 4's "apply"): a reader
/// thread parses and checks records while this one writes, aligned writes
/// through `direct` when given. Buffered bytes are flushed every
/// WRITEBACK_STEP by a helper thread so writeback overlaps the apply and the
/// caller's final fsync has little left to do.
fn apply_records(
    mut reader: SegmentReader<BufReader<File>>,
    segment: &File,
    image: &File,
    direct: Option<&File>,
    size: u64,
    records: u64,
) -> std::result::Result<u64, ApplyError> {
    use super::direct::{AlignedBuf, aligned};
    use std::sync::{atomic::AtomicBool, atomic::Ordering::Relaxed, mpsc};
    const WRITEBACK_STEP: u64 = 64 << 20;
    let direct_ok = AtomicBool::new(direct.is_some());
    std::thread::scope(|scope| {
        // One record being read, one queued, one being written: at most three
        // payloads (each at most MAX_PAYLOAD) in memory per apply.
        let (work_tx, work_rx) = mpsc::sync_channel::<Staged>(1);
        let (free_tx, free_rx) = mpsc::channel::<AlignedBuf>();
        let direct_ok = &direct_ok;
        let parser = scope.spawn(move || -> std::result::Result<(), FormatError> {
            // The segment is deleted once applied: its cached pages are
            // dropped as they are read, here, rather than all at once by the
            // unlink after the point is recorded.
            let mut uncached = 0;
            while let Some(mut r) = reader.next_record()? {
                if let Some(len) = std::num::NonZeroU64::new(reader.position.saturating_sub(uncached))
                    && len.get() >= WRITEBACK_STEP
                {
                    let _ = rustix::fs::fadvise(segment, uncached, Some(len), rustix::fs::Advice::DontNeed);
                    uncached = reader.position;
                }
                let staged = if r.kind == RecordKind::Write
                    && direct_ok.load(Relaxed)
                    && aligned(r.offset, r.payload.len())
                {
                    let mut buf = free_rx
                        .try_recv()
                        .ok()
                        .filter(|b| b.capacity() >= r.payload.len())
                        .unwrap_or_else(|| AlignedBuf::with_capacity(r.payload.len()));
                    buf.fill_from(&r.payload);
                    r.payload = Vec::new();
                    Staged::Direct(r, buf)
                } else {
                    Staged::Buffered(r)
                };
                if work_tx.send(staged).is_err() {
                    break; // the writer stopped; its error is the one reported
                }
            }
            Ok(())
        });
        let (flush_tx, flush_rx) = mpsc::sync_channel::<()>(1);
        let flusher = scope.spawn(move || {
            while flush_rx.recv().is_ok() {
                let _ = image.sync_data();
            }
        });
        let written = (|| {
            let (mut applied, mut since_flush, mut direct_bytes) = (0u64, 0u64, 0u64);
            for staged in work_rx {
                match staged {
                    Staged::Direct(r, buf) => {
                        check_bounds(size, &r).map_err(ApplyError::Io)?;
                        let dio = direct.expect("direct records only with a direct file");
                        match dio.write_all_at(buf.as_slice(), r.offset) {
                            Ok(()) => direct_bytes += buf.as_slice().len() as u64,
                            // A filesystem that opened O_DIRECT but wants
                            // other alignment: the page cache from here on.
                            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                                tracing::warn!(error = %e, "direct writes refused; applying through the page cache");
                                direct_ok.store(false, Relaxed);
                                image.write_all_at(buf.as_slice(), r.offset).map_err(ApplyError::Io)?;
                                since_flush += buf.as_slice().len() as u64;
                            }
                            Err(e) => return Err(ApplyError::Io(e)),
                        }
                        let _ = free_tx.send(buf);
                    }
                    Staged::Buffered(r) => {
                        apply_record(image, size, &r).map_err(ApplyError::Io)?;
                        since_flush += r.payload.len() as u64;
                    }
                }
                applied += 1;
                if since_flush >= WRITEBACK_STEP {
                    let _ = flush_tx.try_send(()); // skipped when a flush is still running
                    since_flush = 0;
                }
                if applied == records.div_ceil(2) {
                    fail("apply.mid-records").map_err(ApplyError::Stopped)?;
                }
            }
            Ok(direct_bytes)
        })();
        drop(flush_tx);
        flusher.join().expect("the flusher does not panic");
        let parsed = parser.join().expect("the parser does not panic");
        let direct_bytes = written?;
        parsed.map_err(ApplyError::Format)?;
        Ok(direct_bytes)
    })
}

/// Writes `map`'s ranges as records, reading bytes from `inputs` (the image
/// when building an undo, undo files when folding); all-zero chunks become
/// WriteZeroes records, which carry no payload. `direct` is an O_DIRECT handle
/// on input 0: aligned reads from it bypass the page cache (an undo reads
/// what is about to be overwritten; caching it only evicts something useful).
fn write_ranges<W: Write>(
    w: &mut SegmentWriter<W>,
    map: &RangeMap,
    inputs: &[&File],
    direct: Option<&File>,
    path: &Path,
    size: u64,
) -> Result<()> {
    use super::direct::AlignedBuf;
    use std::sync::mpsc;
    const CHUNK: u64 = MAX_PAYLOAD as u64 / 8;
    // A reader thread reads chunk k+1 while this one checksums and writes
    // chunk k (reading is as much of an undo's time as writing is).
    let chunks = map.iter().flat_map(|(start, end, src)| {
        let end = end.min(size);
        (start..end).step_by(CHUNK as usize).map(move |off| (off, (end - off).min(CHUNK), src, start))
    });
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::sync_channel::<io::Result<(u64, u64, Option<AlignedBuf>)>>(1);
        let (give_back, free) = mpsc::channel::<AlignedBuf>();
        scope.spawn(move || {
            let (mut direct, mut no_direct) = (direct, None);
            for (off, n, src, start) in chunks {
                let read = match src {
                    Source::Zero => Ok(None),
                    Source::File { file, offset } => {
                        let mut buf =
                            free.try_recv().unwrap_or_else(|_| AlignedBuf::with_capacity(CHUNK as usize));
                        let dio = if file == 0 { &mut direct } else { &mut no_direct };
                        read_chunk(inputs[file], dio, buf.slice_mut(n as usize), offset + (off - start))
                            .map(|()| Some(buf))
                    }
                };
                let failed = read.is_err();
                if tx.send(read.map(|b| (off, n, b))).is_err() || failed {
                    break;
                }
            }
        });
        for item in rx {
            let (off, n, buf) = item.map_err(io_at(path))?;
            match buf {
                Some(buf) if !is_zero(buf.as_slice()) => {
                    w.write_record(RecordKind::Write, off, n, buf.as_slice()).map_err(io_at(path))?;
                    let _ = give_back.send(buf);
                }
                _ => w.write_record(RecordKind::WriteZeroes, off, n, &[]).map_err(io_at(path))?,
            }
        }
        Ok(())
    })
}

/// Reads `chunk` at `at`: through `direct` (O_DIRECT) when aligned, else the page
/// cache. A refusal (other alignment wanted, or a short read at the end of the
/// file) turns direct reads off for the rest of this pass.
fn read_chunk(file: &File, direct: &mut Option<&File>, chunk: &mut [u8], at: u64) -> io::Result<()> {
    if let Some(d) = direct.filter(|_| super::direct::aligned(at, chunk.len())) {
        match d.read_exact_at(chunk, at) {
            Ok(()) => return Ok(()),
            Err(e) if matches!(e.kind(), io::ErrorKind::InvalidInput | io::ErrorKind::UnexpectedEof) => {
                *direct = None
            }
            Err(e) => return Err(e),
        }
    }
    file.read_exact_at(chunk, at)
}

/// Whether `data` is all zeroes (compared a page at a time: memcmp runs
/// vector-wide where a byte loop would not).
fn is_zero(data: &[u8]) -> bool {
    static ZEROES: [u8; 4096] = [0; 4096];
    data.chunks(ZEROES.len()).all(|c| c == &ZEROES[..c.len()])
}

/// Complete undo files (`<seq>.undo`, or `<seq>.f<n>.undo` for folds) with the
/// sequence their name starts with.
fn undo_files(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).map_err(io_at(dir))? {
        let path = e.map_err(io_at(dir))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if let Some(seq) = name.strip_suffix(".undo").and_then(|n| n.split('.').next()?.parse::<u64>().ok()) {
            out.push((seq, path));
        }
    }
    out.sort();
    Ok(out)
}

fn open_reader(path: &Path) -> Result<SegmentReader<BufReader<File>>, FormatError> {
    let f = open_nofollow(path, false, false)?;
    SegmentReader::new(BufReader::with_capacity(1 << 20, f))
}

fn verify_file(path: &Path) -> Result<(SegmentHeader, crate::log::format::SealInfo), FormatError> {
    let mut r = open_reader(path)?;
    while r.next_record()?.is_some() {}
    let h = r.header.clone();
    Ok((h, r.finish_sealed()?))
}

fn store_state(dir: &Path, s: &ReplicaState) -> Result<()> {
    let tmp = dir.join("replica.json.tmp");
    let body = serde_json::to_vec_pretty(s).expect("state serialises");
    fs::write(&tmp, body).and_then(|()| File::open(&tmp)?.sync_all()).map_err(io_at(&tmp))?;
    fs::rename(&tmp, dir.join("replica.json")).map_err(io_at(&tmp))?;
    sync_dir(dir)
}

/// A segment being received, or one the replica already has.
pub enum Incoming {
    New(IncomingSegment),
    Duplicate { durable_through: u64 },
}

/// The file a segment is received into.
pub struct IncomingSegment {
    path: PathBuf,
    file: BufWriter<File>,
    first_seq: u64,
    last_seq: u64,
    epoch: u64,
    len: u64,
    received: u64,
}

impl IncomingSegment {
    /// Appends the chunk that starts at byte `offset` of the segment.
    pub fn write_chunk(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        if offset != self.received {
            return Err(ReplicaError::ChunkOutOfOrder {
                what: "segment",
                expected: self.received,
                found: offset,
            });
        }
        if self.received + data.len() as u64 > self.len {
            return Err(ReplicaError::TooLarge {
                what: "segment data",
                len: self.received + data.len() as u64,
                limit: self.len,
            });
        }
        self.file.write_all(data).map_err(io_at(&self.path))?;
        self.received += data.len() as u64;
        Ok(())
    }

    pub fn discard(self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// The sparse image an initial copy is received into.
pub struct IncomingCopy {
    path: PathBuf,
    file: File,
    size: u64,
    received: u64,
    next_seq: u64,
    epoch: u64,
}

impl IncomingCopy {
    /// Writes a data range of the copy. Ranges arrive in increasing order.
    pub fn write_range(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        if offset < self.received {
            return Err(ReplicaError::ChunkOutOfOrder {
                what: "initial copy",
                expected: self.received,
                found: offset,
            });
        }
        let end = offset.checked_add(data.len() as u64).filter(|&e| e <= self.size);
        let Some(end) = end else {
            return Err(ReplicaError::TooLarge {
                what: "copy range end",
                len: offset.saturating_add(data.len() as u64),
                limit: self.size,
            });
        };
        self.file.write_all_at(data, offset).map_err(io_at(&self.path))?;
        self.received = end;
        Ok(())
    }

    pub fn discard(self) {
        let _ = fs::remove_file(&self.path);
    }
}
