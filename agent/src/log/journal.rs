//! A disk's replication log: the active segment every write is appended to
//! before it is acknowledged, the sealed segments waiting to be shipped, and the
//! switch to dirty-map tracking when the log grows past half the disk.
//!
//! ```text
//!  <image>.vmrlog/
//!    00000000000000000001.seg      sealed (verified on read, shipped, then deleted)
//!    00000000000000000042.seg
//!    00000000000000000057.active   the one being appended to
//!    state                         epoch, resync-required, dirty map, clean flag
//! ```
//!
//! Sealing is split so writers are never blocked by hashing: [`Journal::rotate`]
//! (under the disk's lock) opens the next active segment; [`finish_seal`] (off
//! the lock) makes the image durable, reads the old segment back, verifies it,
//! appends the seal, fsyncs and renames it. A crash between the two leaves two
//! `.active` files; recovery seals the older one.
//!
//! Recovery after a crash re-applies ("redoes") every record of every `.active`
//! segment to the image in order. Records overwrite fixed ranges with fixed
//! contents, so redo is idempotent and the image ends up exactly as the log says,
//! whatever subset of those writes had reached it.
//!
//! One file, about 580 lines, on purpose: appending, sealing and recovery
//! share the segment invariants above, which split files would each restate.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, BufReader, Write},
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use super::{
    apply::apply_record,
    dirty::{DirtyMap, JournalState},
    format::{
        DIGEST_LEN, FormatError, MAX_SEQ, RECORD_HEADER_LEN, RECORD_TRAILER_LEN, RecordKind,
        SEAL_FLAG_APP_CONSISTENT, SEAL_RECORD_LEN, SealInfo, SegmentHeader, SegmentReader, encode_record,
        encode_seal, record_crc, record_header,
    },
};

/// Why the journal failed. Any error on the write path fails the write: the image
/// is only changed after its record is in the log.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("log directory {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("log segment {path} is damaged: {source}")]
    Damaged { path: PathBuf, source: FormatError },
    #[error("log segment {path} belongs to {found}, not {expected}")]
    ForeignSegment { path: PathBuf, expected: String, found: String },
    #[error("log segments do not follow each other: {path} starts at {found}, expected {expected}")]
    Discontinuous { path: PathBuf, expected: u64, found: u64 },
    #[error(
        "the log in {dir} is faulted since {why}: what its storage holds is in doubt, so this disk \
         refuses writes and flushes until the agent restarts on repaired storage (the log is then \
         replayed onto the image)"
    )]
    Faulted { dir: PathBuf, why: String },
}

type Result<T, E = JournalError> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> JournalError + '_ {
    move |source| JournalError::Io { path: path.to_owned(), source }
}

/// A sealed segment on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedSegment {
    pub path: PathBuf,
    pub first_seq: u64,
    pub last_seq: u64,
    pub records: u64,
    pub bytes: u64,
    /// Rotated while the guest was quiesced.
    pub app_consistent: bool,
}

/// What [`Journal::append`] did with a change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logged {
    /// Appended as this sequence number.
    Record(u64),
    /// Resync is required: only the dirty map recorded the change.
    Dirty,
}

/// What recovery found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Records re-applied to the image.
    pub redone: u64,
    /// Bytes of torn records cut from the end of active segments.
    pub torn_bytes: u64,
    /// Rotated segments sealed during recovery.
    pub sealed: u64,
    /// The previous run did not shut down cleanly.
    pub unclean: bool,
}

struct Active {
    file: File,
    path: PathBuf,
    first_seq: u64,
    len: u64,
    /// What the seal will say, kept as records are appended so that sealing
    /// need not read the segment back. `None` for a segment recovered after
    /// a crash (sealing reads it back, verifying every record).
    running: Option<Running>,
}

/// A segment's seal in the making: the BLAKE3 of every byte appended (header
/// first) and the counts.
struct Running {
    hasher: blake3::Hasher,
    first_seq: u64,
    records: u64,
    data_bytes: u64,
}

impl Running {
    fn new(header: &[u8], first_seq: u64) -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(header);
        Self { hasher, first_seq, records: 0, data_bytes: 0 }
    }
}

enum Recovered {
    Unreadable,
    Sealed(SealedSegment),
    Open(Box<SegmentReader<BufReader<File>>>, u64),
}

/// A rotated segment waiting for [`finish_seal`].
pub struct Rotation {
    path: PathBuf,
    len: u64,
    app_consistent: bool,
    running: Option<Running>,
}

/// Names and sizes of one disk's log.
#[derive(Clone, Debug)]
pub struct JournalConfig {
    pub vm_id: String,
    pub disk_id: String,
    pub disk_size: u64,
    /// Pending log above this many bytes makes a resync required (Hyper-V: half the disk).
    pub resync_threshold: u64,
}

/// One disk's log. Not thread-safe: the disk holds it under its lock.
pub struct Journal {
    dir: PathBuf,
    cfg: JournalConfig,
    state: JournalState,
    active: Active,
    next_seq: u64,
    sealed: Vec<SealedSegment>,
    rotating_bytes: u64,
    /// Set by the first I/O error that leaves the log or the image in doubt
    /// (see [`Journal::fault`]); then nothing more is logged or synced.
    faulted: Option<String>,
}

fn segment_name(first_seq: u64, sealed: bool) -> String {
    format!("{first_seq:020}.{}", if sealed { "seg" } else { "active" })
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

impl Journal {
    /// Opens (creating if needed) the log in `dir` for the disk whose image is
    /// `image`, recovering from any crash first. Long (about 95 lines) on
    /// purpose: recovery's steps must run in this order, and reading them in
    /// one place is how that order is checked.
    pub fn open(dir: &Path, cfg: JournalConfig, image: &File) -> Result<(Self, Recovery)> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut state = JournalState::load(dir, cfg.disk_size).map_err(io_err(dir))?;
        let mut recovery = Recovery { unclean: !state.clean_shutdown, ..Default::default() };
        if state.resync_required && !state.clean_shutdown {
            // Writes acknowledged after the last persisted dirty map may be missing
            // from it: only a full comparison is safe.
            state.dirty.mark_all();
            state.dirty_from = None;
        }
        state.clean_shutdown = false;
        state.store(dir).map_err(io_err(dir))?;

        let (mut sealed_firsts, mut active_firsts) = (Vec::new(), Vec::new());
        for entry in fs::read_dir(dir).map_err(io_err(dir))? {
            let name = entry.map_err(io_err(dir))?.file_name().to_string_lossy().into_owned();
            let parsed =
                name.split_once('.').and_then(|(n, ext)| Some((n.parse::<u64>().ok()?, ext.to_owned())));
            match parsed {
                Some((seq, ext)) if ext == "seg" => sealed_firsts.push(seq),
                Some((seq, ext)) if ext == "active" => active_firsts.push(seq),
                _ => {}
            }
        }
        sealed_firsts.sort_unstable();
        active_firsts.sort_unstable();

        let mut sealed: Vec<SealedSegment> = Vec::new();
        let expect = |path: &Path, first: u64, sealed: &[SealedSegment]| match sealed.last() {
            Some(prev) if prev.last_seq + 1 != first => Err(JournalError::Discontinuous {
                path: path.to_owned(),
                expected: prev.last_seq + 1,
                found: first,
            }),
            _ => Ok(()),
        };
        for first in sealed_firsts {
            let path = dir.join(segment_name(first, true));
            expect(&path, first, &sealed)?;
            sealed.push(Self::read_sealed_summary(&path, &cfg)?);
        }

        let mut next_seq = sealed.last().map_or(1, |s| s.last_seq + 1);
        let mut active = None;
        let newest = active_firsts.last().copied();
        for first in active_firsts {
            let path = dir.join(segment_name(first, false));
            match Self::recover_active(&path, &cfg, image, &mut recovery)? {
                Recovered::Unreadable if Some(first) == newest => {
                    // Created but its header never reached the disk: nothing was logged in it.
                    fs::remove_file(&path).map_err(io_err(&path))?;
                }
                Recovered::Unreadable => {
                    return Err(JournalError::Damaged {
                        path,
                        source: FormatError::BadHeader("unreadable header"),
                    });
                }
                Recovered::Sealed(segment) => {
                    expect(&path, first, &sealed)?;
                    next_seq = segment.last_seq + 1;
                    sealed.push(segment);
                    recovery.sealed += 1;
                }
                Recovered::Open(reader, len) => {
                    expect(&path, first, &sealed)?;
                    next_seq = reader.next_seq();
                    if Some(first) == newest {
                        let file = OpenOptions::new().append(true).open(&path).map_err(io_err(&path))?;
                        active = Some(Active { file, path, first_seq: first, len, running: None });
                    } else {
                        sealed.push(finish_seal_with(
                            Rotation { path, len, app_consistent: false, running: None },
                            *reader,
                        )?);
                        recovery.sealed += 1;
                    }
                }
            }
        }
        if recovery.redone > 0 {
            image.sync_data().map_err(io_err(dir))?;
        }
        let mut journal = Self {
            dir: dir.to_owned(),
            active: match active {
                Some(a) => a,
                None => Self::create_active(dir, &cfg, state.epoch, next_seq)?,
            },
            cfg,
            state,
            next_seq,
            sealed,
            rotating_bytes: 0,
            faulted: None,
        };
        if journal.state.resync_required {
            journal.drop_pending_into_dirty_map()?;
        }
        Ok((journal, recovery))
    }

    fn read_sealed_summary(path: &Path, cfg: &JournalConfig) -> Result<SealedSegment> {
        let damaged = |source| JournalError::Damaged { path: path.to_owned(), source };
        let bytes = fs::metadata(path).map_err(io_err(path))?.len();
        let file = File::open(path).map_err(io_err(path))?;
        let (header, _) = SegmentHeader::read_from(&mut BufReader::new(&file)).map_err(damaged)?;
        Self::check_ids(path, cfg, &header)?;
        // The seal is the last record: its seq and count say what the segment holds.
        let seal_len = SEAL_RECORD_LEN as u64;
        let mut tail = vec![0u8; SEAL_RECORD_LEN];
        use std::os::unix::fs::FileExt;
        file.read_exact_at(&mut tail, bytes.checked_sub(seal_len).ok_or(damaged(FormatError::NotSealed))?)
            .map_err(io_err(path))?;
        let h: [u8; RECORD_HEADER_LEN] = tail[..RECORD_HEADER_LEN].try_into().expect("40 bytes");
        let payload = &tail[RECORD_HEADER_LEN..SEAL_RECORD_LEN - RECORD_TRAILER_LEN];
        if h[4] != RecordKind::Seal as u8
            || record_crc(&h, payload)[..] != tail[SEAL_RECORD_LEN - RECORD_TRAILER_LEN..]
        {
            return Err(damaged(FormatError::NotSealed));
        }
        let field = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
        let last_seq = field(8);
        if last_seq < header.first_seq || last_seq > MAX_SEQ {
            return Err(damaged(FormatError::SealMismatch("last sequence number")));
        }
        Ok(SealedSegment {
            path: path.to_owned(),
            first_seq: header.first_seq,
            last_seq,
            records: field(16),
            bytes,
            app_consistent: h[5] & SEAL_FLAG_APP_CONSISTENT != 0,
        })
    }

    fn check_ids(path: &Path, cfg: &JournalConfig, h: &SegmentHeader) -> Result<()> {
        if h.vm_id != cfg.vm_id || h.disk_id != cfg.disk_id {
            return Err(JournalError::ForeignSegment {
                path: path.to_owned(),
                expected: format!("{}/{}", cfg.vm_id, cfg.disk_id),
                found: format!("{}/{}", h.vm_id, h.disk_id),
            });
        }
        Ok(())
    }

    /// Scans an active segment, redoes its records onto the image, and cuts a
    /// torn tail. `None` when even the header is unreadable.
    fn recover_active(
        path: &Path,
        cfg: &JournalConfig,
        image: &File,
        recovery: &mut Recovery,
    ) -> Result<Recovered> {
        let file = File::open(path).map_err(io_err(path))?;
        let size = file.metadata().map_err(io_err(path))?.len();
        let mut reader = match SegmentReader::new(BufReader::with_capacity(1 << 20, file)) {
            Ok(r) => r,
            Err(FormatError::Truncated { .. } | FormatError::HeaderChecksum | FormatError::BadMagic) => {
                return Ok(Recovered::Unreadable);
            }
            Err(source) => return Err(JournalError::Damaged { path: path.to_owned(), source }),
        };
        Self::check_ids(path, cfg, &reader.header)?;
        loop {
            match reader.next_record() {
                Ok(Some(record)) => {
                    apply_record(image, cfg.disk_size, &record).map_err(io_err(path))?;
                    recovery.redone += 1;
                }
                Ok(None) => break,
                // A torn or garbled tail: everything before it is intact (each
                // record has its own CRC), nothing after it was acknowledged.
                Err(FormatError::Io(e)) => return Err(JournalError::Io { path: path.to_owned(), source: e }),
                Err(_) => break,
            }
        }
        if reader.is_sealed() {
            // Sealed, then the crash came before the rename: finish the rename.
            let info = reader.seal_info();
            let first_seq = reader.header.first_seq;
            let valid = reader.position;
            drop(reader);
            let f = OpenOptions::new().write(true).open(path).map_err(io_err(path))?;
            f.set_len(valid).and_then(|()| f.sync_all()).map_err(io_err(path))?;
            let sealed_path = path.with_extension("seg");
            fs::rename(path, &sealed_path).map_err(io_err(path))?;
            sync_dir(sealed_path.parent().expect("segments live in a directory"))?;
            return Ok(Recovered::Sealed(SealedSegment {
                path: sealed_path,
                first_seq,
                last_seq: info.last_seq,
                records: info.records,
                bytes: valid,
                app_consistent: info.app_consistent,
            }));
        }
        let valid = reader.position;
        if valid < size {
            recovery.torn_bytes += size - valid;
            let f = OpenOptions::new().write(true).open(path).map_err(io_err(path))?;
            f.set_len(valid).and_then(|()| f.sync_all()).map_err(io_err(path))?;
        }
        Ok(Recovered::Open(Box::new(reader), valid))
    }

    /// Starts an empty log in `dir` whose first record will carry
    /// `first_seq`: a promoted replica continues the numbering of the log it
    /// applied, so that replicas of that log can follow the new one.
    pub fn start_at(dir: &Path, vm_id: &str, disk_id: &str, epoch: u64, first_seq: u64) -> Result<()> {
        let cfg = JournalConfig {
            vm_id: vm_id.to_owned(),
            disk_id: disk_id.to_owned(),
            disk_size: 0,
            resync_threshold: 0,
        };
        Self::create_active(dir, &cfg, epoch, first_seq).map(drop)
    }

    fn create_active(dir: &Path, cfg: &JournalConfig, epoch: u64, first_seq: u64) -> Result<Active> {
        let path = dir.join(segment_name(first_seq, false));
        let header = SegmentHeader {
            epoch,
            first_seq,
            created_unix_ms: now_ms(),
            vm_id: cfg.vm_id.clone(),
            disk_id: cfg.disk_id.clone(),
        }
        .encode();
        let mut file = OpenOptions::new().create_new(true).append(true).open(&path).map_err(io_err(&path))?;
        let written = crate::failpoint::io("io.log.create")
            .and_then(|()| file.write_all(&header))
            .and_then(|()| file.sync_all())
            .map_err(io_err(&path))
            .and_then(|()| sync_dir(dir));
        if let Err(e) = written {
            // Gone again, or it would stand in the way of the next try.
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        let running = Some(Running::new(&header, first_seq));
        Ok(Active { file, path, first_seq, len: header.len() as u64, running })
    }

    /// Bytes a write record of `payload_len` bytes needs around its payload:
    /// callers read the payload into `buf[RECORD_HEADER_LEN..]` of a buffer
    /// this long so the record is written without a copy.
    pub const fn record_len(payload_len: usize) -> usize {
        RECORD_HEADER_LEN + payload_len + RECORD_TRAILER_LEN
    }

    /// Appends a write whose payload sits in `buf[RECORD_HEADER_LEN..len - 4]`.
    pub fn append_write(&mut self, buf: &mut [u8], offset: u64) -> Result<Logged> {
        self.healthy()?;
        let payload_len = buf.len() - RECORD_HEADER_LEN - RECORD_TRAILER_LEN;
        if self.must_track_only(buf.len() as u64)? {
            self.state.dirty.mark(offset, payload_len as u64);
            return Ok(Logged::Dirty);
        }
        let h =
            record_header(RecordKind::Write, self.next_seq, offset, payload_len as u64, payload_len as u32);
        let crc = record_crc(&h, &buf[RECORD_HEADER_LEN..RECORD_HEADER_LEN + payload_len]);
        buf[..RECORD_HEADER_LEN].copy_from_slice(&h);
        buf[RECORD_HEADER_LEN + payload_len..].copy_from_slice(&crc);
        self.write_active(buf, payload_len as u64)
    }

    /// Appends a WRITE_ZEROES or TRIM.
    pub fn append_zeroes(&mut self, kind: RecordKind, offset: u64, len: u64) -> Result<Logged> {
        self.healthy()?;
        let record = encode_record(kind, self.next_seq, offset, len, &[]);
        if self.must_track_only(record.len() as u64)? {
            self.state.dirty.mark(offset, len);
            return Ok(Logged::Dirty);
        }
        self.write_active(&record, 0)
    }

    fn write_active(&mut self, record: &[u8], payload_len: u64) -> Result<Logged> {
        let written = crate::failpoint::io("io.log.append")
            // Failing storage may take part of a write: half the record lands.
            .inspect_err(|_| drop(self.active.file.write_all(&record[..record.len() / 2])))
            .and_then(|()| self.active.file.write_all(record));
        if let Err(e) = written {
            // Cut whatever part reached the file, so the next record follows a
            // complete one; the caller fails the write and leaves the image
            // alone. If even that fails, a torn record could end up between
            // whole ones, and recovery would stop at it: fault.
            let cut = crate::failpoint::io("io.log.truncate")
                .and_then(|()| self.active.file.set_len(self.active.len));
            if let Err(cut) = cut {
                self.fault(format!("cutting a failed append from {}: {cut}", self.active.path.display()));
            }
            return Err(JournalError::Io { path: self.active.path.clone(), source: e });
        }
        self.active.len += record.len() as u64;
        if let Some(r) = &mut self.active.running {
            r.hasher.update(record);
            r.records += 1;
            r.data_bytes += payload_len;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        Ok(Logged::Record(seq))
    }

    /// Whether the next change of `record_len` bytes goes to the dirty map only,
    /// switching to that mode when the pending log would pass the threshold.
    fn must_track_only(&mut self, record_len: u64) -> Result<bool> {
        if !self.state.resync_required && self.pending_bytes() + record_len > self.cfg.resync_threshold {
            self.state.resync_required = true;
            let dropped = self.drop_pending_into_dirty_map();
            self.fault_on(dropped)?;
        }
        Ok(self.state.resync_required)
    }

    /// Marks every range the pending log touches as dirty, persists the map, and
    /// deletes the log it no longer needs. The sequence continues after the gap,
    /// so the replica sees that a resync must follow.
    fn drop_pending_into_dirty_map(&mut self) -> Result<()> {
        // Everything from the oldest record not acknowledged on is in the map.
        let oldest = self.sealed.first().map_or(self.active.first_seq, |s| s.first_seq);
        self.state.dirty_from = Some(oldest);
        let mut paths: Vec<PathBuf> = self.sealed.iter().map(|s| s.path.clone()).collect();
        paths.push(self.active.path.clone());
        for path in &paths {
            let file = File::open(path).map_err(io_err(path))?;
            let mut reader = SegmentReader::new(BufReader::with_capacity(1 << 20, file))
                .map_err(|source| JournalError::Damaged { path: path.clone(), source })?;
            while let Some(r) =
                reader.next_record().map_err(|source| JournalError::Damaged { path: path.clone(), source })?
            {
                self.state.dirty.mark(r.offset, r.length);
            }
        }
        self.state.store(&self.dir).map_err(io_err(&self.dir))?;
        let had_records = self.active.len > 0;
        for path in &paths {
            fs::remove_file(path).map_err(io_err(path))?;
        }
        self.sealed.clear();
        if had_records {
            self.active = Self::create_active(&self.dir, &self.cfg, self.state.epoch, self.next_seq)?;
        }
        Ok(())
    }

    /// Starts a new active segment and hands back the old one for
    /// [`finish_seal`], or `None` when the active segment holds no record.
    pub fn rotate(&mut self, app_consistent: bool) -> Result<Option<Rotation>> {
        self.healthy()?;
        if self.next_seq == self.active.first_seq || self.state.resync_required {
            return Ok(None);
        }
        let next = Self::create_active(&self.dir, &self.cfg, self.state.epoch, self.next_seq)?;
        let old = std::mem::replace(&mut self.active, next);
        self.rotating_bytes += old.len;
        Ok(Some(Rotation { path: old.path, len: old.len, app_consistent, running: old.running }))
    }

    /// Records a segment [`finish_seal`] sealed.
    pub fn register_sealed(&mut self, segment: SealedSegment, rotated_len: u64) {
        self.rotating_bytes -= rotated_len;
        let at = self.sealed.partition_point(|s| s.first_seq < segment.first_seq);
        self.sealed.insert(at, segment);
    }

    /// Makes every appended record durable; in resync mode, the dirty map.
    /// A failed sync faults the log: the kernel may have dropped the pages
    /// it could not write, and a later sync would then succeed without them.
    pub fn sync(&mut self) -> Result<()> {
        self.healthy()?;
        let synced = self.sync_active().and_then(|()| {
            if self.state.resync_required {
                self.state.store(&self.dir).map_err(io_err(&self.dir))?;
            }
            Ok(())
        });
        self.fault_on(synced)
    }

    fn sync_active(&self) -> Result<()> {
        crate::failpoint::io("io.log.sync")
            .and_then(|()| self.active.file.sync_data())
            .map_err(io_err(&self.active.path))
    }

    /// Syncs and marks the shutdown clean (the dirty map is complete). A
    /// faulted log is never marked clean.
    pub fn shutdown(&mut self) -> Result<()> {
        self.healthy()?;
        let synced = self.sync_active();
        self.fault_on(synced)?;
        self.state.clean_shutdown = true;
        self.state.store(&self.dir).map_err(io_err(&self.dir))
    }

    /// Faults the log (once; the first cause is kept): an I/O error left the
    /// log or the image in doubt. From now on every append, sync, rotation,
    /// resync and shutdown fails with [`JournalError::Faulted`], so no write
    /// or flush is acknowledged on top of what may be lost, and the log is
    /// never marked clean; the agent's restart on repaired storage replays
    /// the log onto the image (recovery redoes every unsealed record).
    pub fn fault(&mut self, why: String) {
        if self.faulted.is_none() {
            tracing::error!(log = %self.dir.display(), "log faulted: {why}");
            self.faulted = Some(why);
        }
    }

    /// Why the log is faulted, if it is.
    pub fn faulted(&self) -> Option<&str> {
        self.faulted.as_deref()
    }

    /// `Err(Faulted)` once the log is faulted.
    pub fn healthy(&self) -> Result<()> {
        match &self.faulted {
            Some(why) => Err(JournalError::Faulted { dir: self.dir.clone(), why: why.clone() }),
            None => Ok(()),
        }
    }

    /// Passes `r` on, faulting the log when it is an error (of the log, or
    /// of the image it records).
    pub fn fault_on<T, E: std::fmt::Display>(&mut self, r: Result<T, E>) -> Result<T, E> {
        if let Err(e) = &r {
            self.fault(e.to_string());
        }
        r
    }

    /// Deletes sealed segments whose records all have `seq <= through` (the
    /// replica acknowledged them).
    pub fn acknowledge(&mut self, through: u64) -> Result<()> {
        while let Some(s) = self.sealed.first().filter(|s| s.last_seq <= through) {
            fs::remove_file(&s.path).map_err(io_err(&s.path))?;
            self.sealed.remove(0);
        }
        sync_dir(&self.dir)
    }

    /// Takes the oldest sealed segment out of the log, renamed
    /// `<seq>.damaged` (kept for inspection, never read again): it was found
    /// damaged at rest. The log then starts after it, and a replica that
    /// needed it is resynchronised from the image. Only the oldest: a log
    /// with a gap in its middle would not open again.
    pub fn quarantine_oldest(&mut self, first_seq: u64) -> Result<PathBuf> {
        let Some(seg) = self.sealed.first().filter(|s| s.first_seq == first_seq).cloned() else {
            return Err(JournalError::Io {
                path: self.dir.clone(),
                source: io::Error::other(format!("segment {first_seq} is not the oldest sealed one")),
            });
        };
        let to = seg.path.with_extension("damaged");
        fs::rename(&seg.path, &to).map_err(io_err(&seg.path))?;
        sync_dir(&self.dir)?;
        self.sealed.remove(0);
        Ok(to)
    }

    /// Sealed segments, oldest first.
    pub fn sealed(&self) -> &[SealedSegment] {
        &self.sealed
    }

    /// Log bytes not yet acknowledged by the replica: 0 once everything is
    /// (an active segment without records is only its header, nothing to ship).
    pub fn pending_bytes(&self) -> u64 {
        let active = if self.next_seq == self.active.first_seq { 0 } else { self.active.len };
        self.sealed.iter().map(|s| s.bytes).sum::<u64>() + self.rotating_bytes + active
    }

    /// Sequence number the next record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub fn resync_required(&self) -> bool {
        self.state.resync_required
    }

    /// A resync starts: returns the cut (the first sequence not in the image,
    /// where replication resumes after it) and, when only the dirty map
    /// recorded changes and it covers every one since `replica_next` (the
    /// replica's position), that map. Logging resumes at once; the map is
    /// handed over (a failed resync then compares hashes instead).
    pub fn begin_resync(&mut self, replica_next: u64) -> Result<(u64, Option<DirtyMap>)> {
        // A faulted primary's image may lack what its log holds: sending the
        // image and dropping the log would lose those writes at the replica.
        self.healthy()?;
        if !self.state.resync_required {
            return Ok((self.next_seq, None));
        }
        let map = std::mem::replace(&mut self.state.dirty, DirtyMap::new(self.cfg.disk_size));
        let trusted = self.state.dirty_from == Some(replica_next);
        self.state.resync_required = false;
        self.state.dirty_from = None;
        self.state.store(&self.dir).map_err(io_err(&self.dir))?;
        Ok((self.next_seq, trusted.then_some(map)))
    }

    pub fn state(&self) -> &JournalState {
        &self.state
    }

    /// Moves the log to a newer `epoch` (an unplanned failover completed on
    /// the copy it logs): the state records it at once, and segments started
    /// from now on carry it (an empty active segment is started again).
    /// Whether the active segment holds records of the old one (to seal).
    pub fn raise_epoch(&mut self, epoch: u64) -> Result<bool> {
        self.healthy()?;
        if epoch <= self.state.epoch {
            return Ok(false);
        }
        let raised = self.raise_epoch_steps(epoch);
        self.fault_on(raised)
    }

    /// Half done, these leave the epoch in memory ahead of the disk, or no
    /// active segment: [`Self::raise_epoch`] faults the log then.
    fn raise_epoch_steps(&mut self, epoch: u64) -> Result<bool> {
        self.state.epoch = epoch;
        self.state.store(&self.dir).map_err(io_err(&self.dir))?;
        if self.next_seq == self.active.first_seq {
            // Nothing in the active segment yet: started again under the new
            // epoch (a crash in between: opening makes a missing one anew).
            fs::remove_file(&self.active.path).map_err(io_err(&self.active.path))?;
            self.active = Self::create_active(&self.dir, &self.cfg, epoch, self.next_seq)?;
            return Ok(false);
        }
        Ok(true)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The VM whose disk this log records.
    pub fn vm_id(&self) -> &str {
        &self.cfg.vm_id
    }
}

/// Seals a rotated segment: the caller made the image durable first; this
/// appends the seal (its digest kept while the records were appended, or, for
/// a segment recovered after a crash, read back verifying every record),
/// fsyncs and renames it. Runs without the disk's lock.
pub fn finish_seal(mut rotation: Rotation) -> Result<SealedSegment> {
    if let Some(r) = rotation.running.take() {
        let info = SealInfo {
            last_seq: r.first_seq + r.records - 1,
            records: r.records,
            data_bytes: r.data_bytes,
            sealed_unix_ms: 0,
            app_consistent: rotation.app_consistent,
        };
        return write_seal(rotation, r.first_seq, info, r.hasher.finalize().as_bytes());
    }
    let file = File::open(&rotation.path).map_err(io_err(&rotation.path))?;
    let damaged = |source| JournalError::Damaged { path: rotation.path.clone(), source };
    let mut reader = SegmentReader::new(BufReader::with_capacity(1 << 20, file)).map_err(damaged)?;
    while reader.next_record().map_err(damaged)?.is_some() {}
    if reader.position != rotation.len {
        return Err(damaged(FormatError::Truncated { at: reader.position }));
    }
    finish_seal_with(rotation, reader)
}

fn finish_seal_with<R: io::Read>(rotation: Rotation, reader: SegmentReader<R>) -> Result<SealedSegment> {
    write_seal(rotation, reader.header.first_seq, reader.seal_info(), &reader.digest())
}

fn write_seal(
    rotation: Rotation,
    first_seq: u64,
    info: SealInfo,
    digest: &[u8; DIGEST_LEN],
) -> Result<SealedSegment> {
    let flags = if rotation.app_consistent { SEAL_FLAG_APP_CONSISTENT } else { 0 };
    let seal = encode_seal(info.last_seq, info.records, info.data_bytes, digest, now_ms(), flags);
    let path = &rotation.path;
    let mut file = OpenOptions::new().append(true).open(path).map_err(io_err(path))?;
    file.write_all(&seal)
        .and_then(|()| crate::failpoint::io("io.log.sync"))
        .and_then(|()| file.sync_all())
        .map_err(io_err(path))?;
    let sealed_path = path.with_extension("seg");
    fs::rename(path, &sealed_path).map_err(io_err(path))?;
    sync_dir(sealed_path.parent().expect("segments live in a directory"))?;
    Ok(SealedSegment {
        path: sealed_path,
        first_seq,
        last_seq: info.last_seq,
        records: info.records,
        bytes: rotation.len + seal.len() as u64,
        app_consistent: rotation.app_consistent,
    })
}

impl Rotation {
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory and a 1 MiB image in it for a log.
    fn scratch() -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir().unwrap();
        let image = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(dir.path().join("img"))
            .unwrap();
        image.set_len(1 << 20).unwrap();
        (dir, image)
    }

    fn config() -> JournalConfig {
        JournalConfig {
            vm_id: "vm".into(),
            disk_id: "root".into(),
            disk_size: 1 << 20,
            resync_threshold: 1 << 19,
        }
    }

    /// A segment set aside as damaged stays out of the log when it opens
    /// again; only the oldest may be set aside.
    #[test]
    fn a_quarantined_segment_stays_out_when_the_log_opens_again() {
        let (dir, image) = scratch();
        let log = dir.path().join("log");
        let (mut j, _) = Journal::open(&log, config(), &image).unwrap();
        let mut firsts = Vec::new();
        for i in 0..3u8 {
            let mut buf = vec![i + 1; Journal::record_len(4096)];
            j.append_write(&mut buf, 0).unwrap();
            let r = j.rotate(false).unwrap().unwrap();
            let sealed = finish_seal(r).unwrap();
            firsts.push(sealed.first_seq);
            j.register_sealed(sealed, 0);
        }
        assert!(j.quarantine_oldest(firsts[1]).is_err(), "not the oldest");
        let kept = j.quarantine_oldest(firsts[0]).unwrap();
        assert!(kept.exists() && kept.extension().is_some_and(|e| e == "damaged"));
        drop(j);
        let (j, _) = Journal::open(&log, config(), &image).unwrap();
        assert_eq!(j.sealed().iter().map(|s| s.first_seq).collect::<Vec<_>>(), firsts[1..]);
        assert_eq!(j.next_seq(), firsts[2] + 1);
    }

    /// The seal kept while appending is the one reading the segment back
    /// would write: the reader checks its digest, counts and last sequence.
    /// A recovered segment (nothing kept) is sealed by reading it back.
    #[test]
    fn the_seal_kept_while_appending_verifies_like_one_read_back() {
        let (dir, image) = scratch();
        let (mut j, _) = Journal::open(&dir.path().join("log"), config(), &image).unwrap();
        let seal = |j: &mut Journal| {
            for (i, len) in [4096usize, 512, 65536].into_iter().enumerate() {
                let mut buf = vec![i as u8 + 1; Journal::record_len(len)];
                j.append_write(&mut buf, (i as u64) << 16).unwrap();
            }
            j.append_zeroes(RecordKind::WriteZeroes, 8192, 4096).unwrap();
            j.rotate(true).unwrap().unwrap()
        };
        let kept = seal(&mut j);
        assert!(kept.running.is_some());
        let mut read_back = seal(&mut j);
        read_back.running = None;
        for s in [finish_seal(kept).unwrap(), finish_seal(read_back).unwrap()] {
            let bytes = fs::read(&s.path).unwrap();
            let mut r = SegmentReader::new(&bytes[..]).unwrap();
            while r.next_record().unwrap().is_some() {}
            let info = r.finish_sealed().unwrap();
            assert_eq!((info.records, info.data_bytes, info.app_consistent), (4, 4096 + 512 + 65536, true));
            assert_eq!((info.last_seq, s.records, s.bytes), (s.first_seq + 3, 4, bytes.len() as u64));
        }
    }
}
