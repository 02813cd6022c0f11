//! Reception: segments and initial copies arriving from a primary. Nothing
//! received counts until it is durable and verified; an initial copy replaces
//! the image only once whole, through an intent recorded in `replica.json`.
//!
//! A segment is written and verified as it arrives, on a thread of its own:
//! each chunk is written to the file and parsed (every record's CRC, the
//! BLAKE3 digest of the seal) while the next one is on the wire, so finishing
//! needs only the fsync, not a second read of the whole segment. The file is
//! written with O_DIRECT where the filesystem allows ([`crate::direct`]): it
//! is fsynced before it counts anyway, and filling the page cache with what
//! the apply reads once cost the receiving thread most of its time.

use std::{
    fs::{self, File},
    io::{self, Read, Write},
    os::unix::fs::FileExt,
    path::PathBuf,
    thread,
};

use prost::bytes::Bytes;
use tokio::sync::mpsc;

use super::{
    CopyCommit, Lifecycle, MAX_SEGMENT_LEN, ReplicaDisk, ReplicaError, Result, check_epoch, check_seq, fail,
    files::{open_nofollow, seq_files, sync_dir, undo_files},
    io_at,
};
use crate::{
    direct::DirectWriter,
    log::format::{FormatError, MAX_SEQ, SealInfo, SegmentHeader, SegmentReader},
};

impl ReplicaDisk {
    /// Starts receiving the initial copy announced by `start`: a fresh sparse
    /// image of the disk's size beside the replica. Everything the copy says
    /// about itself is checked here, before anything is written; the replica
    /// stays as it was until [`Self::finish_copy`] commits the whole copy.
    pub fn begin_copy(&self, disk_size: u64, epoch: u64, next_seq: u64) -> Result<IncomingCopy> {
        self.check_start(disk_size, epoch, next_seq)?;
        let path = self.dir.join("incoming").join("disk.img.part");
        let _ = fs::remove_file(&path);
        let file = open_nofollow(&path, true, true).map_err(io_at(&path))?;
        file.set_len(disk_size).map_err(io_at(&path))?;
        Ok(IncomingCopy { path, file, size: disk_size, received: 0, next_seq, epoch })
    }

    /// What an initial copy or a resync says about itself, checked before
    /// anything is written: its next sequence, an epoch no older than the
    /// replica's, the replica's disk size.
    pub(super) fn check_start(&self, disk_size: u64, epoch: u64, next_seq: u64) -> Result<()> {
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
        Ok(())
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
            s.points.clear();
            s.lifecycle = Lifecycle::CommittingCopy { commit };
        })?;
        fail!("copy.after-intent");
        self.commit_copy(commit)
    }

    /// The second half of [`Self::finish_copy`], also run by recovery: the
    /// durable copy replaces the image (unless it already did), the history
    /// it replaces goes, and the new positions are recorded. Idempotent.
    pub(super) fn commit_copy(&self, c: CopyCommit) -> Result<()> {
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
            s.lifecycle = Lifecycle::Receiving;
            s.epoch = s.epoch.max(c.epoch);
            // Checked when the copy began: next_seq >= 1.
            s.received_through = c.next_seq - 1;
            s.applied_through = c.next_seq - 1;
            s.consistent_from = c.consistent_from;
            s.points.clear();
        })
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
        if !s.has_copy() {
            return Err(ReplicaError::NoInitialCopy);
        }
        if epoch < s.epoch {
            return Err(ReplicaError::StaleEpoch { current: s.epoch, found: epoch });
        }
        if matches!(s.lifecycle, Lifecycle::Resyncing { .. }) {
            return Err(ReplicaError::Precondition(
                "a resync of this replica has not finished: segments can follow only a finished resync"
                    .into(),
            ));
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
        let direct = crate::direct::open(&path);
        let (chunks, rx) = mpsc::channel(4);
        let writer = thread::Builder::new()
            .name("segment-in".into())
            .spawn(move || write_and_verify(file, direct, rx))
            .map_err(io_at(&path))?;
        Ok(Incoming::New(IncomingSegment {
            path,
            chunks: Some(chunks),
            writer: Some(writer),
            first_seq,
            last_seq,
            epoch,
            len,
            received: 0,
            kept: false,
        }))
    }

    /// Verifies a fully received segment, makes it durable and queues it for
    /// apply; returns the sequence the replica is durable through.
    pub fn finish_segment(&self, mut seg: IncomingSegment) -> Result<u64> {
        let written = seg.end();
        let (path, first_seq, last_seq, epoch, len, received) =
            (seg.path.clone(), seg.first_seq, seg.last_seq, seg.epoch, seg.len, seg.received);
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
        let (header, seal) = match written {
            Ok(verified) => verified,
            Err(Failed::Io(e)) => return Err(discard(ReplicaError::Io { path: path.clone(), source: e })),
            Err(Failed::Format(e)) => {
                return Err(discard(ReplicaError::Verification { first_seq, source: e }));
            }
        };
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
        seg.kept = true;
        sync_dir(dest.parent().expect("log dir"))?;
        self.update(|s| {
            s.received_through = last_seq;
            s.epoch = s.epoch.max(epoch);
        })?;
        Ok(last_seq)
    }
}

/// A segment being received, or one the replica already has.
pub enum Incoming {
    New(IncomingSegment),
    Duplicate { durable_through: u64 },
}

/// The file a segment is received into, and the thread writing and
/// verifying it.
pub struct IncomingSegment {
    path: PathBuf,
    /// Chunks for the writer; `None` once the end was sent.
    chunks: Option<mpsc::Sender<Bytes>>,
    writer: Option<thread::JoinHandle<std::result::Result<(SegmentHeader, SealInfo), Failed>>>,
    first_seq: u64,
    last_seq: u64,
    epoch: u64,
    len: u64,
    received: u64,
    /// Moved into the log: dropping it no longer removes the file.
    kept: bool,
}

/// Why the writer stopped: the file could not be written or synced, or the
/// bytes are not a sound sealed segment.
enum Failed {
    Io(io::Error),
    Format(FormatError),
}

/// The writer: every chunk is written to `file` (through `direct` where it
/// can), then parsed; at the end the seal must have verified and nothing may
/// follow it, and the file is synced.
fn write_and_verify(
    file: File,
    direct: Option<File>,
    chunks: mpsc::Receiver<Bytes>,
) -> std::result::Result<(SegmentHeader, SealInfo), Failed> {
    let out = DirectWriter::with_buffer(file, direct, WRITE_BUFFER);
    let mut tee = Tee { chunks, out, chunk: Bytes::new(), at: 0, failed: None };
    let verified = SegmentReader::new(&mut tee).and_then(SegmentReader::read_to_seal);
    // The writer thread is joined whatever happened, so nothing writes to
    // the file once this returns.
    let file = tee.out.finish();
    if let Some(e) = tee.failed.take() {
        return Err(Failed::Io(e));
    }
    let verified = verified.map_err(Failed::Format)?;
    let file = file.map_err(Failed::Io)?;
    crate::failpoint::io("io.replica.segment.sync").and_then(|()| file.sync_all()).map_err(Failed::Io)?;
    Ok(verified)
}

/// Bytes of each of the writer's (up to three) aligned buffers.
const WRITE_BUFFER: usize = 1 << 20;

/// Reads the chunks in order, writing each to the file as it is taken.
struct Tee {
    chunks: mpsc::Receiver<Bytes>,
    out: DirectWriter,
    chunk: Bytes,
    at: usize,
    /// A write failed (told apart from a damaged segment).
    failed: Option<io::Error>,
}

impl io::BufRead for Tee {
    /// The rest of the chunk in hand, or the next chunk once written: the
    /// verification reads the payloads where they lie.
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.at == self.chunk.len() {
            let Some(next) = self.chunks.blocking_recv() else { return Ok(&[]) };
            let written =
                crate::failpoint::io("io.replica.segment.write").and_then(|()| self.out.write_all(&next));
            if let Err(e) = written {
                let kind = e.kind();
                self.failed = Some(e);
                return Err(io::Error::new(kind, "writing the segment failed"));
            }
            (self.chunk, self.at) = (next, 0);
        }
        Ok(&self.chunk[self.at..])
    }

    fn consume(&mut self, n: usize) {
        self.at = (self.at + n).min(self.chunk.len());
    }
}

impl Read for Tee {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = io::BufRead::fill_buf(self)?.len().min(buf.len());
        buf[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

impl IncomingSegment {
    /// Appends the chunk that starts at byte `offset` of the segment (not
    /// from within an async runtime: there, [`Self::write_chunk_async`]).
    pub fn write_chunk(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_chunk(offset, data.len())?;
        let sent =
            self.chunks.as_ref().is_some_and(|c| c.blocking_send(Bytes::copy_from_slice(data)).is_ok());
        self.sent(sent, data.len())
    }

    /// Appends the chunk that starts at byte `offset`, waiting while the
    /// writer is four chunks behind.
    pub async fn write_chunk_async(&mut self, offset: u64, data: Bytes) -> Result<()> {
        let n = data.len();
        self.check_chunk(offset, n)?;
        let sent = match &self.chunks {
            Some(c) => c.send(data).await.is_ok(),
            None => false,
        };
        self.sent(sent, n)
    }

    fn check_chunk(&self, offset: u64, n: usize) -> Result<()> {
        if offset != self.received {
            return Err(ReplicaError::ChunkOutOfOrder {
                what: "segment",
                expected: self.received,
                found: offset,
            });
        }
        if self.received + n as u64 > self.len {
            return Err(ReplicaError::TooLarge {
                what: "segment data",
                len: self.received + n as u64,
                limit: self.len,
            });
        }
        Ok(())
    }

    /// A chunk the writer could no longer take (it stopped at a damaged
    /// record or a failed write) ends the segment with that error.
    fn sent(&mut self, sent: bool, n: usize) -> Result<()> {
        if !sent {
            return Err(match self.end() {
                Err(Failed::Io(e)) => ReplicaError::Io { path: self.path.clone(), source: e },
                Err(Failed::Format(e)) => ReplicaError::Verification { first_seq: self.first_seq, source: e },
                Ok(_) => {
                    ReplicaError::Mismatch { first_seq: self.first_seq, what: "data after the seal".into() }
                }
            });
        }
        self.received += n as u64;
        Ok(())
    }

    /// Ends the input and waits for the writer: what it verified, once the
    /// file is durable.
    fn end(&mut self) -> std::result::Result<(SegmentHeader, SealInfo), Failed> {
        self.chunks = None;
        match self.writer.take().map(|w| w.join()) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(Failed::Io(io::Error::other("the segment writer panicked"))),
            None => Err(Failed::Io(io::Error::other("the segment was already ended"))),
        }
    }

    /// Stops the writer and removes what was received (as dropping does).
    pub fn discard(self) {}
}

impl Drop for IncomingSegment {
    /// A segment dropped unfinished (its stream broke, a chunk was refused)
    /// stops its writer and leaves no file behind.
    fn drop(&mut self) {
        self.chunks = None;
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        if !self.kept {
            let _ = fs::remove_file(&self.path);
        }
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
