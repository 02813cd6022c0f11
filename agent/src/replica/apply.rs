//! Applying received segments with undo (DESIGN step 4), and why each crash
//! point is safe:
//! 1. the segment's undo file is written from the image's current contents,
//!    fsynced and renamed into place (crash before the rename: the image is
//!    untouched; the partial undo is deleted and rebuilt);
//! 2. its records are applied and the image fsynced (crash here: the undo
//!    file is complete, and applying again from the start is idempotent);
//! 3. `replica.json` records the new point (crash before: step 2 repeats);
//! 4. the segment file is deleted, or kept for forwarding (crash before: it
//!    is recognised as applied).
//!
//! Aligned I/O bypasses the page cache ([`super::direct`]); a parser thread
//! checks records while this one writes.

use std::{
    fs::{self, File},
    io::{self, BufReader, Write},
    os::unix::fs::FileExt,
    path::Path,
};

use super::{
    Point, PointKind, ReplicaDisk, ReplicaError, Result, fail,
    files::{open_nofollow, seq_files, sync_dir, verify_file},
    io_at, now_ms,
    ranges::{RangeMap, Source},
};
use crate::{
    direct::BlockReader,
    log::{
        FormatError, Record, RecordKind, SegmentReader,
        apply::{apply_record, check_bounds},
        format::{MAX_PAYLOAD, SegmentWriter},
    },
};

impl ReplicaDisk {
    /// Applies every received segment not yet applied; returns how many.
    pub fn apply_pending(&self) -> Result<usize> {
        let _apply = self.apply_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        for (first, seg) in seq_files(&self.dir.join("log"), ".seg")? {
            if first <= self.state().applied_through {
                continue;
            }
            match self.apply_one(first, &seg) {
                // Handled, not an error for whoever applies (an agent
                // starting must still start): said in the log, and the
                // state asks for a resync.
                Err(ReplicaError::Verification { first_seq, source }) if first_seq == first => {
                    self.set_aside_damaged(first, &source)?;
                    return Ok(n);
                }
                r => r?,
            }
            n += 1;
        }
        Ok(n)
    }

    /// A received segment that no longer verifies (it changed on this disk
    /// after it was received and acknowledged: the primary has deleted its
    /// copy): what of it was applied is undone with its undo file, it and
    /// every segment after it are set aside (renamed `.damaged`, never read
    /// again), and the replica asks for a resync. The point it would have
    /// made is never offered; the newest point stays what it was.
    pub(super) fn set_aside_damaged(&self, first: u64, why: &FormatError) -> Result<()> {
        let undo_name = format!("{first:020}.undo");
        let undo = self.dir.join("undo").join(&undo_name);
        if verify_file(&undo).is_ok() {
            // The image may hold part of the segment: back to the point.
            let image_path = self.image_path();
            let image = open_nofollow(&image_path, true, false).map_err(io_at(&image_path))?;
            self.apply_undo(first, &undo_name, &image, &image_path)?;
            image.sync_all().map_err(io_at(&image_path))?;
        }
        // Durable first: from here on nothing counts as received past the
        // newest applied segment, so the primary cannot take those as held.
        // (The undo file leaves the bridge too: the image is back at the point.)
        self.update(|s| {
            s.received_through = s.applied_through;
            s.resync_wanted = true;
            s.bridge.retain(|b| *b != undo_name);
        })?;
        for (seq, p) in seq_files(&self.dir.join("log"), ".seg")? {
            if seq >= first {
                fs::rename(&p, p.with_extension("damaged")).map_err(io_at(&p))?;
            }
        }
        let _ = fs::remove_file(&undo);
        sync_dir(&self.dir.join("log"))?;
        tracing::error!(
            dir = %self.dir.display(),
            first_seq = first,
            "a received segment is damaged on this disk ({why}): set aside (never applied), a resync is asked for"
        );
        Ok(())
    }

    /// Applies segment `seg` (starting at `first`) with its undo file and
    /// records the point: steps 1 and 2 in [`Self::apply_with_undo`], then
    /// the point (step 3) and the segment's removal (step 4).
    fn apply_one(&self, first: u64, seg: &Path) -> Result<()> {
        let undo_name = format!("{first:020}.undo");
        let verification = |source| ReplicaError::Verification { first_seq: first, source };
        let (seal, direct_bytes, seg_file) = self.apply_with_undo(seg, &undo_name, &verification)?;
        fail!("apply.before-point");
        // Step 3: the point (its undo files: the bridge, newest first), or
        // not consistent yet (after a copy or a resync): nothing more.
        self.update(|s| {
            s.applied_through = seal.last_seq;
            s.stats.segments += 1;
            s.stats.bytes += seal.data_bytes;
            s.stats.max_segment_bytes = s.stats.max_segment_bytes.max(seal.data_bytes);
            s.stats.direct_bytes += direct_bytes;
            s.stats.last_sealed_unix_ms = seal.sealed_unix_ms;
            if seal.last_seq + 1 >= s.consistent_from {
                let mut back = s.bridge.drain(..).rev();
                let (undo, chain) = (back.next(), back.collect());
                let kind =
                    if seal.app_consistent { PointKind::ApplicationConsistent } else { PointKind::Standard };
                s.points.push(Point { seq: seal.last_seq, time_ms: seal.sealed_unix_ms, kind, undo, chain });
            }
        })?;
        // Kept only when something refers to it: the oldest point needs no
        // undo, and segments before the first consistent point of a new copy
        // make no point.
        if !self.refers_to(&undo_name) {
            let undo_path = self.dir.join("undo").join(&undo_name);
            fs::remove_file(&undo_path).map_err(io_at(&undo_path))?;
        }
        fail!("apply.before-delete");
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

    /// Whether a point or the bridge refers to undo file `name`.
    pub(super) fn refers_to(&self, name: &str) -> bool {
        let s = self.state();
        s.bridge.iter().any(|b| b == name) || s.points.iter().any(|p| p.undo_files().any(|u| u == name))
    }

    /// Steps 1 and 2 for any file of records (a segment, a resync batch):
    /// its undo file `undo_name` is made durable from the image's current
    /// contents (or, when a complete one is there, reused: the image may
    /// already be partly changed) and, when a point exists, joins the bridge
    /// back to it; only then are its records applied and the image fsynced,
    /// so the newest point can be materialised exactly at every moment.
    /// Returns its seal, the bytes written direct, and a handle on it. Long
    /// (about 65 lines) on purpose: the crash-safe order reads as one.
    pub(super) fn apply_with_undo(
        &self,
        seg: &Path,
        undo_name: &str,
        verification: &dyn Fn(FormatError) -> ReplicaError,
    ) -> Result<(crate::log::format::SealInfo, u64, File)> {
        let image_path = self.image_path();
        let image = open_nofollow(&image_path, true, false).map_err(io_at(&image_path))?;
        // Aligned reads and writes of the image bypass the page cache (see
        // `super::direct`); `None` where the filesystem refuses.
        let direct = crate::direct::open(&image_path);
        let size = self.state().disk_size;
        // Pass 1: the union of ranges the file touches, from its record
        // headers (it was verified in full when it was received).
        // The segment was received with O_DIRECT, so both passes read it in
        // big direct blocks (`BlockReader`) rather than through the page cache.
        let file = open_nofollow(seg, false, false).map_err(io_at(seg))?;
        let blocks = BlockReader::new(file, crate::direct::open_read(seg));
        let (header, ranges, seal) =
            crate::log::format::scan_ranges(BufReader::with_capacity(8 << 10, blocks))
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
        let undo_path = self.dir.join("undo").join(undo_name);
        if verify_file(&undo_path).is_err() {
            let part = self.dir.join("undo").join(format!("{undo_name}.part"));
            let _ = fs::remove_file(&part);
            let f = open_nofollow(&part, true, true).map_err(io_at(&part))?;
            let out = crate::direct::DirectWriter::new(f, crate::direct::open(&part));
            let mut w = SegmentWriter::new(out, &header).map_err(io_at(&part))?;
            write_ranges(&mut w, &touched, &[&image], direct.as_ref(), &image_path, size)?;
            let (out, _) = w.finish(now_ms()).map_err(io_at(&part))?;
            let f = out.finish().map_err(io_at(&part))?;
            f.sync_all().map_err(io_at(&part))?;
            fs::rename(&part, &undo_path).map_err(io_at(&part))?;
            sync_dir(&self.dir.join("undo"))?;
        }
        self.update(|s| {
            if Self::bridged(s) && !s.bridge.iter().any(|b| b == undo_name) {
                s.bridge.push(undo_name.to_owned());
            }
        })?;
        fail!("apply.after-undo");
        // Step 2: apply, checking each record's CRC as it goes.
        let f = open_nofollow(seg, false, false).map_err(io_at(seg))?;
        let seg_file = f.try_clone().map_err(io_at(seg))?;
        // A buffer smaller than most payloads: std's BufReader reads those
        // straight into the record (a larger one copies each through itself).
        let blocks = BlockReader::new(f, crate::direct::open_read(seg));
        let reader =
            SegmentReader::new_verified(BufReader::with_capacity(16 << 10, blocks)).map_err(verification)?;
        let direct_bytes = apply_records(reader, &seg_file, &image, direct.as_ref(), size, seal.records)
            .map_err(|e| match e {
                ApplyError::Format(source) => verification(source),
                ApplyError::Io(source) => ReplicaError::Io { path: image_path.clone(), source },
                ApplyError::Stopped(e) => e,
            })?;
        crate::failpoint::io("io.replica.image.sync")
            .and_then(|()| image.sync_all())
            .map_err(io_at(&image_path))?;
        Ok((seal, direct_bytes, seg_file))
    }
}

enum ApplyError {
    Format(FormatError),
    Io(io::Error),
    /// A fail point stopped the apply (tests only).
    #[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
    Stopped(ReplicaError),
}

/// A record on its way from the reader thread to the writer: with its payload
/// in an aligned buffer when it can be written direct.
enum Staged {
    Direct(Record, crate::direct::AlignedBuf),
    Buffered(Record),
}

/// Applies `reader`'s records to `image` (DESIGN step 4's "apply"): a reader
/// thread parses and checks records while this one writes, aligned writes
/// through `direct` when given. Buffered bytes are flushed every
/// WRITEBACK_STEP by a helper thread so writeback overlaps the apply and the
/// caller's final fsync has little left to do. Long (about 95 lines) on
/// purpose: the three threads share one scope and their channels.
fn apply_records(
    mut reader: SegmentReader<BufReader<BlockReader>>,
    segment: &File,
    image: &File,
    direct: Option<&File>,
    size: u64,
    records: u64,
) -> std::result::Result<u64, ApplyError> {
    use crate::direct::{AlignedBuf, aligned};
    use std::sync::{atomic::AtomicBool, atomic::Ordering::Relaxed, mpsc};
    const WRITEBACK_STEP: u64 = 64 << 20;
    let direct_ok = AtomicBool::new(direct.is_some());
    std::thread::scope(|scope| {
        // Records go across in batches (see `Batches`): one batch being read,
        // one queued, one being written: at most three in memory per apply
        // (a batch is one record when that is larger, at most MAX_PAYLOAD).
        let (work_tx, work_rx) = mpsc::sync_channel::<Vec<Staged>>(1);
        let (free_tx, free_rx) = mpsc::channel::<AlignedBuf>();
        let direct_ok = &direct_ok;
        let parser = scope.spawn(move || -> std::result::Result<(), FormatError> {
            // The segment is deleted once applied: where it went through the
            // page cache (a filesystem refusing O_DIRECT, or its buffered
            // tail), its cached pages are dropped as they are read, here,
            // rather than all at once by the unlink after the point is recorded.
            let mut uncached = 0;
            let mut batches = Batches::new(work_tx);
            // Direct-eligible payloads are read straight into an aligned
            // buffer (a returned one, or one the size of the last payload).
            let (mut spare, mut last) = (None::<AlignedBuf>, 64usize << 10);
            loop {
                let direct_now = direct_ok.load(Relaxed);
                let mut buf = spare
                    .take()
                    .or_else(|| free_rx.try_recv().ok())
                    .unwrap_or_else(|| AlignedBuf::with_capacity(last));
                let Some((mut r, placed)) = reader.next_record_placed(direct_now.then_some(&mut buf))? else {
                    break;
                };
                if let Some(len) = std::num::NonZeroU64::new(reader.position.saturating_sub(uncached))
                    && len.get() >= WRITEBACK_STEP
                {
                    let _ = rustix::fs::fadvise(segment, uncached, Some(len), rustix::fs::Advice::DontNeed);
                    uncached = reader.position;
                }
                let staged = if placed {
                    last = buf.as_slice().len();
                    Staged::Direct(r, buf)
                } else if r.kind == RecordKind::Write && direct_now && aligned(r.offset, r.payload.len()) {
                    // Larger than the buffer at hand (which goes: the next
                    // record takes a returned one, or one this size).
                    drop(buf);
                    last = r.payload.len();
                    let mut big = AlignedBuf::with_capacity(r.payload.len());
                    big.fill_from(&r.payload);
                    r.payload = Vec::new();
                    Staged::Direct(r, big)
                } else {
                    spare = Some(buf);
                    Staged::Buffered(r)
                };
                let bytes = match &staged {
                    Staged::Direct(_, buf) => buf.as_slice().len(),
                    Staged::Buffered(r) => r.payload.len(),
                };
                if !batches.push(staged, bytes as u64, false) {
                    return Ok(()); // the writer stopped; its error is the one reported
                }
            }
            batches.finish();
            Ok(())
        });
        let (flush_tx, flush_rx) = mpsc::sync_channel::<()>(1);
        // Its first error fails the apply: a writeback error is reported
        // once per open file, so the final fsync would not see it again.
        let flusher = scope.spawn(move || {
            let mut first = Ok(());
            while flush_rx.recv().is_ok() {
                if let (Ok(()), Err(e)) = (&first, image.sync_data()) {
                    first = Err(e);
                }
            }
            first
        });
        let written = (|| {
            let (mut applied, mut since_flush, mut direct_bytes) = (0u64, 0u64, 0u64);
            for staged in work_rx.into_iter().flatten() {
                crate::failpoint::io("io.replica.image.write").map_err(ApplyError::Io)?;
                match staged {
                    Staged::Direct(r, buf) => {
                        check_bounds(size, &r).map_err(ApplyError::Io)?;
                        let dio = direct.expect("direct records only with a direct file");
                        let data = buf.as_slice();
                        if write_direct(dio, image, data, r.offset, direct_ok).map_err(ApplyError::Io)? {
                            direct_bytes += data.len() as u64;
                        } else {
                            since_flush += data.len() as u64;
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
                    crate::fail_point!("apply.mid-records", |source| {
                        ApplyError::Stopped(ReplicaError::Io { path: "apply.mid-records".into(), source })
                    });
                }
            }
            Ok(direct_bytes)
        })();
        drop(flush_tx);
        let flushed = flusher.join().expect("the flusher does not panic");
        let parsed = parser.join().expect("the parser does not panic");
        let direct_bytes = written?;
        flushed.map_err(ApplyError::Io)?;
        parsed.map_err(ApplyError::Format)?;
        Ok(direct_bytes)
    })
}

/// Writes `data` at `offset` with O_DIRECT; true when it went that way. A
/// filesystem that opened O_DIRECT but wants other alignment gets it (and
/// every later record) through the page cache instead.
fn write_direct(
    dio: &File,
    image: &File,
    data: &[u8],
    offset: u64,
    direct_ok: &std::sync::atomic::AtomicBool,
) -> std::io::Result<bool> {
    match dio.write_all_at(data, offset) {
        Ok(()) => Ok(true),
        Err(e) if crate::direct::refused(&e) => {
            tracing::warn!(error = %e, "direct writes refused; applying through the page cache");
            direct_ok.store(false, std::sync::atomic::Ordering::Relaxed);
            image.write_all_at(data, offset)?;
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Writes `map`'s ranges as records, reading bytes from `inputs` (the image
/// when building an undo, undo files when folding); all-zero chunks become
/// WriteZeroes records, which carry no payload. `direct` is an O_DIRECT handle
/// on input 0: aligned reads from it bypass the page cache (an undo reads
/// what is about to be overwritten; caching it only evicts something useful).
pub(super) fn write_ranges<W: Write>(
    w: &mut SegmentWriter<W>,
    map: &RangeMap,
    inputs: &[&File],
    direct: Option<&File>,
    path: &Path,
    size: u64,
) -> Result<()> {
    use crate::direct::AlignedBuf;
    use std::sync::mpsc;
    const CHUNK: u64 = MAX_PAYLOAD as u64 / 8;
    // A reader thread reads chunk k+1 while this one checksums and writes
    // chunk k (reading is as much of an undo's time as writing is).
    let chunks = map.iter().flat_map(|(start, end, src)| {
        let end = end.min(size);
        (start..end).step_by(CHUNK as usize).map(move |off| (off, (end - off).min(CHUNK), src, start))
    });
    std::thread::scope(|scope| {
        // Chunks go across in batches (see `Batches`; an undo of 64 KiB
        // writes is thousands of small ranges). At most three batches in
        // memory (a batch is one chunk, up to CHUNK, when that is larger).
        type Read = io::Result<(u64, u64, Option<AlignedBuf>)>;
        let (tx, rx) = mpsc::sync_channel::<Vec<Read>>(1);
        let (give_back, free) = mpsc::channel::<AlignedBuf>();
        scope.spawn(move || {
            let (mut direct, mut no_direct) = (direct, None);
            let mut batches = Batches::new(tx);
            for (off, n, src, start) in chunks {
                let read = match src {
                    Source::Zero => Ok(None),
                    Source::File { file, offset } => {
                        let mut buf = free
                            .try_recv()
                            .ok()
                            .filter(|b| b.capacity() >= n as usize)
                            .unwrap_or_else(|| AlignedBuf::with_capacity(n as usize));
                        let dio = if file == 0 { &mut direct } else { &mut no_direct };
                        read_chunk(inputs[file], dio, buf.slice_mut(n as usize), offset + (off - start))
                            .map(|()| Some(buf))
                    }
                };
                let failed = read.is_err();
                if !batches.push(read.map(|b| (off, n, b)), n, failed) || failed {
                    return;
                }
            }
            batches.finish();
        });
        for item in rx.into_iter().flatten() {
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

/// Items handed from one thread to another in batches of about 1 MiB:
/// handed over one at a time (64 KiB writes at 50 MiB/s), the two threads
/// spent a fifth of the replica's CPU waking each other.
struct Batches<T> {
    tx: std::sync::mpsc::SyncSender<Vec<T>>,
    batch: Vec<T>,
    bytes: u64,
}

impl<T> Batches<T> {
    const BYTES: u64 = 1 << 20;

    fn new(tx: std::sync::mpsc::SyncSender<Vec<T>>) -> Self {
        Self { tx, batch: Vec::new(), bytes: 0 }
    }

    /// Adds `item` (`bytes` long; counted as one at least), sending the
    /// batch once it holds about a mebibyte, or at once when `now`; false
    /// once the receiving thread has stopped.
    fn push(&mut self, item: T, bytes: u64, now: bool) -> bool {
        self.batch.push(item);
        self.bytes += bytes.max(1);
        if self.bytes < Self::BYTES && !now {
            return true;
        }
        self.bytes = 0;
        self.tx.send(std::mem::take(&mut self.batch)).is_ok()
    }

    /// Sends what is left.
    fn finish(self) {
        if !self.batch.is_empty() {
            let _ = self.tx.send(self.batch);
        }
    }
}

/// Reads `chunk` at `at`: through `direct` (O_DIRECT) when aligned, else the page
/// cache. A refusal (other alignment wanted, or a short read at the end of the
/// file) turns direct reads off for the rest of this pass.
fn read_chunk(file: &File, direct: &mut Option<&File>, chunk: &mut [u8], at: u64) -> io::Result<()> {
    if let Some(d) = direct.filter(|_| crate::direct::aligned(at, chunk.len())) {
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
