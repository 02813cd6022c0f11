//! A protected disk: a raw image plus its replication log, with the ordering
//! rules that make the log exact.
//!
//! ```text
//!  write(buf, off) ── lock ─▶ append record to log ─▶ write image ── unlock ─▶ ack
//!  flush()         ─────────▶ fdatasync log ─▶ fdatasync image ─────────────▶ ack
//!  seal()          ── lock ─▶ rotate ── unlock ─▶ fdatasync image ─▶ seal old segment
//! ```
//!
//! The lock makes the log's order the image's order, so replaying the log gives
//! the image byte for byte, even with several connections writing at once.
//! Appending before writing means the image never holds a write the log lacks.
//! Reads take no lock.
//!
//! An I/O error that leaves the log or the image in doubt — the image write
//! after its record was logged, any failed fsync of either — faults the log
//! ([`Journal::fault`]): every later write and flush fails with EIO until the
//! agent restarts on repaired storage, where recovery replays the log onto
//! the image. A failed append that was cut cleanly only fails that write (a
//! full filesystem: the next write may succeed).

use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::Mutex,
};

use crate::{
    image::zero_range,
    log::{
        Journal, JournalConfig, JournalError, Logged, RecordKind, Recovery, SealedSegment,
        journal::{Rotation, finish_seal},
    },
};

/// Why a disk could not be opened or an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("disk image {path}: {source}")]
    Image { path: PathBuf, source: io::Error },
    #[error("disk image {0} is empty; protected disks are raw images of fixed size")]
    EmptyImage(PathBuf),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("{what} [{offset}, +{len}) is outside the {size}-byte disk")]
    OutOfRange { what: &'static str, offset: u64, len: u64, size: u64 },
    #[error("disk {0} is read-only: it is being failed over")]
    ReadOnly(String),
}

type Result<T, E = DiskError> = std::result::Result<T, E>;

/// Where a disk's log lives: next to the image, as Hyper-V's HRL does.
pub fn log_dir_for(image: &Path) -> PathBuf {
    let mut name = image.file_name().unwrap_or_default().to_owned();
    name.push(".vmrlog");
    image.with_file_name(name)
}

/// The file in a disk's log directory that a planned failover's finished
/// primary part leaves: the disk's final sequence, every record through it
/// durable at the replica. It outlives the agent, so a side restarted
/// between its part and the other side's can still be failed back onto.
const PREPARED_MARK: &str = "prepared";

/// The prepared mark of the disk at `image`, if it has one (see
/// [`ProtectedDisk::mark_prepared`]): the VM, the disk, the final sequence.
pub fn prepared_mark(image: &Path) -> Option<(String, String, u64)> {
    let text = std::fs::read_to_string(log_dir_for(image).join(PREPARED_MARK)).ok()?;
    let mut words = text.split_whitespace();
    let last = words.next()?.parse().ok()?;
    Some((words.next()?.to_owned(), words.next()?.to_owned(), last))
}

/// The images under `roots` (three directories deep at most) whose logs
/// carry the prepared mark of VM `vm_id`: per disk, its name and image.
pub fn prepared_under(roots: &[PathBuf], vm_id: &str) -> Vec<(String, PathBuf)> {
    fn walk(dir: &Path, depth: u32, vm_id: &str, out: &mut Vec<(String, PathBuf)>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let path = e.path();
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            match path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".vmrlog")) {
                Some(image) => {
                    let image = path.with_file_name(image);
                    if let Some((_, disk, _)) = prepared_mark(&image).filter(|(vm, ..)| vm == vm_id) {
                        out.push((disk, image));
                    }
                }
                None if depth > 0 => walk(&path, depth - 1, vm_id, out),
                None => {}
            }
        }
    }
    let mut out = Vec::new();
    for root in roots {
        walk(root, 3, vm_id, &mut out);
    }
    out
}

/// A disk being served and logged.
pub struct ProtectedDisk {
    name: String,
    path: PathBuf,
    image: File,
    size: u64,
    journal: Mutex<Journal>,
    /// Set under the journal lock, so no write is logged after it is set.
    read_only: std::sync::atomic::AtomicBool,
}

/// A snapshot of a disk's log for status and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogStatus {
    pub sealed: Vec<SealedSegment>,
    pub pending_bytes: u64,
    pub next_seq: u64,
    pub resync_required: bool,
    pub dirty_blocks: u64,
}

impl ProtectedDisk {
    /// Opens the image at `path` (an existing raw image) and its log, recovering
    /// the log and image from a crash if needed.
    pub fn open(vm_id: &str, name: &str, path: &Path) -> Result<(Self, Recovery)> {
        Self::open_with_threshold(vm_id, name, path, None)
    }

    /// [`Self::open`] with the pending-log size past which only the dirty map
    /// records changes (`None`: half the disk, as Hyper-V): for benchmarks.
    pub fn open_with_threshold(
        vm_id: &str,
        name: &str,
        path: &Path,
        threshold: Option<u64>,
    ) -> Result<(Self, Recovery)> {
        let err = |source| DiskError::Image { path: path.to_owned(), source };
        let image = OpenOptions::new().read(true).write(true).open(path).map_err(err)?;
        // Nothing writes the image but through the log: QEMU, qemu-img and
        // qemu-io honour these locks and refuse to open it for writing.
        crate::image::lock_like_qemu(&image).map_err(err)?;
        let size = image.metadata().map_err(err)?.len();
        if size == 0 {
            return Err(DiskError::EmptyImage(path.to_owned()));
        }
        let cfg = JournalConfig {
            vm_id: vm_id.to_owned(),
            disk_id: name.to_owned(),
            disk_size: size,
            resync_threshold: threshold.unwrap_or(size / 2),
        };
        let (journal, recovery) = Journal::open(&log_dir_for(path), cfg, &image)?;
        let disk = Self {
            name: name.to_owned(),
            path: path.to_owned(),
            image,
            size,
            journal: Mutex::new(journal),
            read_only: Default::default(),
        };
        Ok((disk, recovery))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn journal(&self) -> std::sync::MutexGuard<'_, Journal> {
        // A panic while holding the lock is a bug; the journal's own state stays
        // consistent (every append is all or nothing), so keep serving.
        self.journal.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check(&self, what: &'static str, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(DiskError::OutOfRange { what, offset, len, size: self.size }),
        }
    }

    fn image_err(&self) -> impl FnOnce(io::Error) -> DiskError + '_ {
        |source| DiskError::Image { path: self.path.clone(), source }
    }

    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check("read", offset, buf.len() as u64)?;
        self.read_image(buf, offset)
    }

    fn read_image(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        crate::failpoint::io("io.image.read")
            .and_then(|()| self.image.read_exact_at(buf, offset))
            .map_err(self.image_err())
    }

    /// Logs and applies a write whose payload is `buf[RECORD_HEADER_LEN..len-4]`
    /// (see [`Journal::record_len`]); with `fua`, both are durable on return.
    pub fn write(&self, buf: &mut [u8], offset: u64, fua: bool) -> Result<Logged> {
        let payload =
            crate::log::format::RECORD_HEADER_LEN..buf.len() - crate::log::format::RECORD_TRAILER_LEN;
        self.check("write", offset, payload.len() as u64)?;
        let logged = {
            let mut journal = self.journal();
            self.writable()?;
            let logged = journal.append_write(buf, offset)?;
            let written = crate::failpoint::io("io.image.write")
                .and_then(|()| self.image.write_all_at(&buf[payload.clone()], offset));
            if let Err(e) = written {
                // The log holds a record the image may hold none or part of
                // (a sparse image on a full filesystem). Logging what the image
                // holds now makes them agree again, and only this write fails:
                // the guest can retry it once space is freed.
                let now = self
                    .read_image(&mut buf[payload], offset)
                    .and_then(|()| Ok(journal.append_write(buf, offset)?));
                journal.fault_on(now)?;
                return Err(self.image_err()(e));
            }
            logged
        };
        if fua {
            self.flush()?;
        }
        Ok(logged)
    }

    /// Logs and applies a WRITE_ZEROES (`trim` false) or TRIM (`trim` true).
    pub fn zero(&self, offset: u64, len: u64, trim: bool, keep_allocated: bool, fua: bool) -> Result<Logged> {
        self.check(if trim { "trim" } else { "write zeroes" }, offset, len)?;
        let kind = if trim { RecordKind::Trim } else { RecordKind::WriteZeroes };
        let logged = {
            let mut journal = self.journal();
            self.writable()?;
            let logged = journal.append_zeroes(kind, offset, len)?;
            let zeroed = crate::failpoint::io("io.image.write")
                .and_then(|()| zero_range(&self.image, offset, len, keep_allocated))
                .map_err(self.image_err());
            journal.fault_on(zeroed)?;
            logged
        };
        if fua {
            self.flush()?;
        }
        Ok(logged)
    }

    /// Why this disk refuses writes after an I/O error, if it does.
    pub fn faulted(&self) -> Option<String> {
        self.journal().faulted().map(str::to_owned)
    }

    fn sync_image(&self) -> Result<()> {
        crate::failpoint::io("io.image.sync").and_then(|()| self.image.sync_data()).map_err(self.image_err())
    }

    fn writable(&self) -> Result<()> {
        if self.read_only.load(std::sync::atomic::Ordering::Acquire) {
            return Err(DiskError::ReadOnly(self.name.clone()));
        }
        Ok(())
    }

    /// Refuses every later write (EPERM to NBD clients): once this returns,
    /// the log holds every write the disk will ever acknowledge.
    pub fn make_read_only(&self) {
        let _journal = self.journal();
        self.read_only.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Accepts writes again (a failover was cancelled before the VM moved);
    /// the prepared mark goes first.
    pub fn make_writable(&self) {
        let _journal = self.journal();
        let mark = log_dir_for(&self.path).join(PREPARED_MARK);
        if let Err(e) = std::fs::remove_file(&mark)
            && e.kind() != io::ErrorKind::NotFound
        {
            // Harmless: a mark is believed only with no record after it.
            tracing::warn!(mark = %mark.display(), error = %e, "removing the prepared mark");
        }
        self.read_only.store(false, std::sync::atomic::Ordering::Release);
    }

    /// Records, durably, that this read-only disk's log ends at `last` and
    /// the replica holds all of it: a planned failover's primary part is
    /// done for it (see [`prepared_mark`]).
    pub fn mark_prepared(&self, last: u64) -> Result<()> {
        let dir = log_dir_for(&self.path);
        let vm = self.journal().vm_id().to_owned();
        crate::log::dirty::replace_durably(
            &dir,
            PREPARED_MARK,
            format!("{last} {vm} {}\n", self.name).as_bytes(),
        )
        .map_err(|source| DiskError::Image { path: dir.clone(), source })
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Makes every write completed so far durable, in the log and the image.
    pub fn flush(&self) -> Result<()> {
        self.journal().sync()?;
        let synced = self.sync_image();
        self.journal().fault_on(synced)
    }

    /// Seals the active segment (if it holds any record) and opens the next one.
    /// Writers wait only for the rotation, not for the hashing and syncing.
    pub fn seal(&self) -> Result<Option<SealedSegment>> {
        match self.rotate(false)? {
            Some(rotation) => self.finish(rotation).map(Some),
            None => Ok(None),
        }
    }

    /// Seals what is logged and returns the first sequence after the cut, taken
    /// under the same lock as the rotation (so no write can slip between).
    /// An initial copy resumes replication exactly there.
    pub fn cut(&self) -> Result<(u64, Option<SealedSegment>)> {
        let (next, rotation) = {
            let mut j = self.journal();
            (j.next_seq(), j.rotate(false)?)
        };
        Ok((next, rotation.map(|r| self.finish(r)).transpose()?))
    }

    /// A resync starts: the log is cut (see [`Journal::begin_resync`]);
    /// returns the cut and the dirty map when it can be trusted.
    pub fn begin_resync(&self, replica_next: u64) -> Result<(u64, Option<crate::log::dirty::DirtyMap>)> {
        let (cut, map, rotation) = {
            let mut j = self.journal();
            let (cut, map) = j.begin_resync(replica_next)?;
            (cut, map, j.rotate(false)?)
        };
        if let Some(r) = rotation {
            self.finish(r)?;
        }
        Ok((cut, map))
    }

    /// Whether only the dirty map records changes (the log overflowed).
    pub fn resync_required(&self) -> bool {
        self.journal().resync_required()
    }

    /// The first half of [`Self::seal`]: the cut point. Quiescing for an
    /// application-consistent point needs to cover only this.
    pub fn rotate(&self, app_consistent: bool) -> Result<Option<Rotation>> {
        Ok(self.journal().rotate(app_consistent)?)
    }

    /// The second half of [`Self::seal`]: hashing and syncing, off the lock.
    pub fn finish(&self, rotation: Rotation) -> Result<SealedSegment> {
        // Everything in the rotated segment is in the image; make it durable so a
        // sealed segment never describes writes the image could lose. Failing
        // that, or the seal, the rotated segment stays unsealed for recovery
        // to redo and seal.
        let len = rotation.len();
        // Not after a fault: a sync would then succeed without what was lost.
        self.journal().healthy()?;
        let sealed = self.sync_image().and_then(|()| Ok(finish_seal(rotation)?));
        let mut journal = self.journal();
        let sealed = journal.fault_on(sealed)?;
        journal.register_sealed(sealed.clone(), len);
        Ok(sealed)
    }

    /// Takes the oldest sealed segment, found damaged at rest, out of the
    /// log (see [`Journal::quarantine_oldest`]); where it was put.
    pub fn quarantine_oldest(&self, first_seq: u64) -> Result<std::path::PathBuf> {
        Ok(self.journal().quarantine_oldest(first_seq)?)
    }

    /// Deletes sealed segments the replica acknowledged, through sequence `through`.
    pub fn acknowledge(&self, through: u64) -> Result<()> {
        Ok(self.journal().acknowledge(through)?)
    }

    /// The epoch its log's segments carry: that of the promotion that made
    /// this node the VM's primary (0: never failed over). Kept in the log's
    /// state file, so a restarted agent ships under the right one.
    pub fn epoch(&self) -> u64 {
        self.journal().state().epoch
    }

    /// Moves this disk's log to a newer `epoch`, sealing what was logged
    /// under the old one so that every later segment carries the new one.
    pub fn raise_epoch(&self, epoch: u64) -> Result<()> {
        if self.journal().raise_epoch(epoch)? {
            self.seal()?;
        }
        Ok(())
    }

    pub fn log_status(&self) -> LogStatus {
        let j = self.journal();
        LogStatus {
            sealed: j.sealed().to_vec(),
            pending_bytes: j.pending_bytes(),
            next_seq: j.next_seq(),
            resync_required: j.resync_required(),
            dirty_blocks: j.state().dirty.dirty_blocks(),
        }
    }

    /// Flushes and records a clean shutdown.
    pub fn shutdown(&self) -> Result<()> {
        let synced = self.sync_image();
        let mut journal = self.journal();
        journal.fault_on(synced)?;
        Ok(journal.shutdown()?)
    }
}
