//! A resync on the replica side (DESIGN step 6): the image is compared with
//! the primary's by hash tree ([`crate::hashtree`]) and only what differs is
//! received, into batch files applied with undo like segments, so the newest
//! recovery point stays recoverable throughout: every batch's undo joins the
//! bridge back to it (`ReplicaState::bridge`), and the first point after the
//! resync takes the bridge over.
//!
//! ```text
//!  begin: Resyncing{next_seq} durable ─▶ Open says needs_resync until a resync finishes
//!  data ─▶ resync/<n>.seg.part ─seal, fsync, rename─▶ resync/<n>.seg ─apply with undo r<n>.undo─▶ bridge
//!  finish ─▶ Receiving { applied/received through next_seq - 1, consistent_from }
//! ```
//! A crash at any step: a partial batch is discarded (its bytes come again
//! with the next resync), a whole one is applied on restart (its complete
//! undo reused), and the replica stays Resyncing, never claiming to be
//! consistent, until a resync finishes.

use std::{
    collections::BTreeMap,
    fs::{self, File},
    io::{self, BufWriter},
    path::PathBuf,
};

use super::{
    Lifecycle, ReplicaDisk, ReplicaError, Result, fail,
    files::{open_nofollow, seq_files, sync_dir, verify_file},
    io_at, now_ms,
};
use crate::{
    hashtree::{self, BLOCKS_PER_WINDOW, Hash, LEAF, LEAVES_PER_BLOCK, WINDOW, WindowHashes},
    log::{
        RecordKind, SegmentHeader,
        format::{MAX_PAYLOAD, SegmentWriter},
    },
};

/// A batch is applied once it holds this much (bounds the space a resync
/// needs beyond the image: a batch and its undo).
pub const BATCH_BYTES: u64 = 64 << 20;

/// Received bytes of a resync, on their way into the image.
pub struct ResyncBatch {
    n: u64,
    part: PathBuf,
    writer: SegmentWriter<BufWriter<File>>,
    pub bytes: u64,
}

impl ResyncBatch {
    /// Adds `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        for (k, chunk) in data.chunks(MAX_PAYLOAD as usize).enumerate() {
            let at = offset + (k * MAX_PAYLOAD as usize) as u64;
            self.writer
                .write_record(RecordKind::Write, at, chunk.len() as u64, chunk)
                .map_err(io_at(&self.part))?;
        }
        self.bytes += data.len() as u64;
        Ok(())
    }

    /// Drops a batch that was never made durable (its bytes come again).
    pub fn discard(self) {
        drop(self.writer);
        let _ = fs::remove_file(&self.part);
    }

    /// Adds `len` bytes of zeros at `offset`.
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        self.writer.write_record(RecordKind::WriteZeroes, offset, len, &[]).map_err(io_at(&self.part))?;
        self.bytes += len;
        Ok(())
    }
}

impl ReplicaDisk {
    /// Starts (or restarts) a resync that brings this replica to the
    /// primary's image, replication resuming at `next_seq` afterwards. From
    /// here on the replica is not consistent until [`Self::finish_resync`].
    pub fn begin_resync(&self, disk_size: u64, epoch: u64, next_seq: u64) -> Result<()> {
        self.check_start(disk_size, epoch, next_seq)?;
        let s = self.state();
        match s.lifecycle {
            Lifecycle::Receiving | Lifecycle::Resyncing { .. } => {}
            other => {
                return Err(ReplicaError::Precondition(format!(
                    "a resync needs a replica that holds a copy and receives; this one is {other:?}"
                )));
            }
        }
        drop(s);
        // A batch made durable by a resync that broke off counts: applied first.
        self.recover_resync()?;
        // Segments received for the old position would be applied on top of
        // the resynced image: they go (the primary sends from next_seq).
        for (_, p) in seq_files(&self.dir.join("log"), ".seg")? {
            fs::remove_file(&p).map_err(io_at(&p))?;
        }
        self.update(|s| s.lifecycle = Lifecycle::Resyncing { next_seq, epoch })
    }

    /// A verification may compare this replica at `next_seq`: it receives,
    /// is `disk_size` bytes, and holds exactly through `next_seq - 1`, all of
    /// it applied (applied here first).
    pub fn check_verifiable(&self, disk_size: u64, next_seq: u64) -> Result<()> {
        self.apply_pending()?;
        let s = self.state();
        if s.lifecycle != Lifecycle::Receiving || s.disk_size != disk_size {
            return Err(ReplicaError::Precondition(format!(
                "a verification needs a receiving replica of {disk_size} bytes; this one is {:?} of {} bytes",
                s.lifecycle, s.disk_size
            )));
        }
        if s.applied_through + 1 != next_seq || s.received_through != s.applied_through {
            return Err(ReplicaError::Precondition(format!(
                "the replica holds through {} (applied through {}), not through {}: a verification compares one position",
                s.received_through,
                s.applied_through,
                next_seq.saturating_sub(1)
            )));
        }
        Ok(())
    }

    /// Whether a resync began and has not finished.
    pub fn resyncing(&self) -> bool {
        matches!(self.state().lifecycle, Lifecycle::Resyncing { .. })
    }

    /// A new batch for received bytes.
    pub fn resync_batch(&self) -> Result<ResyncBatch> {
        let n = self.state().resync_batches + 1;
        let part = self.dir.join("resync").join(format!("{n:020}.seg.part"));
        let _ = fs::remove_file(&part);
        let f = open_nofollow(&part, true, true).map_err(io_at(&part))?;
        let (vm_id, disk_id, epoch) = {
            let s = self.state();
            (s.vm_id.clone(), s.disk_id.clone(), s.epoch)
        };
        let header = SegmentHeader { epoch, first_seq: 1, created_unix_ms: now_ms(), vm_id, disk_id };
        let writer =
            SegmentWriter::new(BufWriter::with_capacity(1 << 20, f), &header).map_err(io_at(&part))?;
        Ok(ResyncBatch { n, part, writer, bytes: 0 })
    }

    /// Makes `batch` durable, then applies it with undo (the undo joins the
    /// bridge back to the newest point).
    pub fn apply_resync_batch(&self, batch: ResyncBatch) -> Result<()> {
        let ResyncBatch { n, part, writer, .. } = batch;
        let (out, _) = writer.finish(now_ms()).map_err(io_at(&part))?;
        let f =
            out.into_inner().map_err(|e| ReplicaError::Io { path: part.clone(), source: e.into_error() })?;
        f.sync_all().map_err(io_at(&part))?;
        let seg = part.with_extension("");
        fs::rename(&part, &seg).map_err(io_at(&part))?;
        sync_dir(&self.dir.join("resync"))?;
        fail!("resync.batch-durable");
        self.apply_batch(n, &seg)
    }

    fn apply_batch(&self, n: u64, seg: &std::path::Path) -> Result<()> {
        let _apply = self.apply_lock.lock().unwrap_or_else(|p| p.into_inner());
        let undo_name = format!("r{n:020}.undo");
        let verification = |source| ReplicaError::Verification { first_seq: 0, source };
        self.apply_with_undo(seg, &undo_name, &verification)?;
        fail!("resync.batch-applied");
        self.update(|s| s.resync_batches = s.resync_batches.max(n))?;
        if !self.refers_to(&undo_name) {
            let p = self.dir.join("undo").join(&undo_name);
            fs::remove_file(&p).map_err(io_at(&p))?;
        }
        fs::remove_file(seg).map_err(io_at(seg))
    }

    /// Ends a resync: the image holds the primary's as of its reading, and
    /// replication resumes where the primary cut its log; points are
    /// consistent again from `consistent_from`. Returns where replication resumes.
    pub fn finish_resync(&self, consistent_from: u64) -> Result<u64> {
        let Lifecycle::Resyncing { next_seq, epoch } = self.state().lifecycle else {
            return Err(ReplicaError::Precondition("no resync is running".into()));
        };
        if consistent_from < next_seq || consistent_from > crate::log::format::MAX_SEQ {
            return Err(ReplicaError::Invalid {
                field: "consistent_from",
                value: consistent_from,
                why: "it must lie between the resync's next_seq and 2^62",
            });
        }
        // Points of another history cannot be numbered in the log that
        // resumes here: kept as the diverged point (diverged.rs).
        if self.state().points.iter().any(|p| p.seq >= next_seq) {
            self.collapse_history()?;
        }
        self.update(|s| {
            s.lifecycle = Lifecycle::Receiving;
            s.epoch = s.epoch.max(epoch);
            s.received_through = next_seq - 1;
            s.applied_through = next_seq - 1;
            s.consistent_from = consistent_from;
            s.resyncs += 1;
            s.resync_wanted = false;
        })?;
        Ok(next_seq)
    }

    /// After a crash: whole batches are applied, partial ones go.
    pub(super) fn recover_resync(&self) -> Result<()> {
        let dir = self.dir.join("resync");
        for e in fs::read_dir(&dir).map_err(io_at(&dir))? {
            let p = e.map_err(io_at(&dir))?.path();
            if p.extension().is_some_and(|x| x == "part") {
                fs::remove_file(&p).map_err(io_at(&p))?;
            }
        }
        for (n, seg) in seq_files(&dir, ".seg")? {
            if verify_file(&seg).is_ok() {
                self.apply_batch(n, &seg)?;
            } else {
                fs::remove_file(&seg).map_err(io_at(&seg))?;
            }
        }
        Ok(())
    }

    /// The hashes of blocks `blocks` of window `window` of this replica's image.
    pub fn hash_blocks(&self, window: u64, blocks: &[u32]) -> io::Result<WindowHashes> {
        let image = File::open(self.image_path())?;
        hashtree::hash_blocks(&image, self.state().disk_size, window, blocks)
    }

    /// Hashes this replica's image window by window on a thread of its own,
    /// in order, a few windows ahead of whoever reads them.
    pub fn hash_windows(&self) -> tokio::sync::mpsc::Receiver<io::Result<WindowHashes>> {
        hashtree::spawn_hasher(self.image_path(), self.state().disk_size)
    }
}

/// What the replica compares and expects, window by window (pure: the
/// gRPC adapter feeds it both sides' hashes and the data that arrives).
#[derive(Default)]
pub struct Comparison {
    /// This side's hashes of windows still being compared.
    own: BTreeMap<u64, WindowHashes>,
    /// Leaves asked for and not received yet: window → leaf indexes within it.
    wanted: BTreeMap<u64, Vec<u32>>,
    pub windows_compared: u64,
    pub windows_differing: u64,
    pub leaves_wanted: u64,
}

fn hashes(bytes: &[u8], n: usize, what: &str) -> std::result::Result<Vec<Hash>, String> {
    if bytes.len() != n * 16 {
        return Err(format!("{what}: {} bytes where {} hashes of 16 bytes were due", bytes.len(), n));
    }
    Ok(bytes.chunks(16).map(|c| c.try_into().expect("16 bytes")).collect())
}

impl Comparison {
    /// Compares the primary's hash of window `own.index` with ours: equal
    /// settles it; else its block hashes are asked for.
    pub fn window(&mut self, own: WindowHashes, theirs: &[u8]) -> std::result::Result<bool, String> {
        let theirs: Hash =
            theirs.try_into().map_err(|_| format!("window {}: a hash is 16 bytes", own.index))?;
        self.windows_compared += 1;
        if own.window == theirs {
            return Ok(false);
        }
        self.windows_differing += 1;
        self.own.insert(own.index, own);
        Ok(true)
    }

    /// A window offered below its top level (a dirty-map resync): compared
    /// from its leaves on.
    pub fn offer(&mut self, own: WindowHashes) -> std::result::Result<(), String> {
        if self.own.insert(own.index, own).is_some() {
            return Err("a window offered twice".into());
        }
        self.windows_compared += 1;
        Ok(())
    }

    /// The blocks of `window` whose hashes differ from `theirs`.
    pub fn blocks(&mut self, window: u64, theirs: &[u8]) -> std::result::Result<Vec<u32>, String> {
        let own = self.own.get(&window).ok_or_else(|| format!("window {window} was not asked for"))?;
        let theirs = hashes(theirs, own.blocks.len(), &format!("window {window}'s blocks"))?;
        let differing: Vec<u32> =
            (0..own.blocks.len()).filter(|&b| own.blocks[b] != theirs[b]).map(|b| b as u32).collect();
        if differing.is_empty() {
            self.own.remove(&window);
        }
        Ok(differing)
    }

    /// For each block listed, a mask of its leaves that differ from `theirs`
    /// (16 hashes per block, fewer for a short last block); the leaves are
    /// then expected as data.
    pub fn leaves(
        &mut self,
        window: u64,
        blocks: &[u32],
        theirs: &[u8],
    ) -> std::result::Result<Vec<u32>, String> {
        let own = self.own.remove(&window).ok_or_else(|| format!("window {window} was not asked for"))?;
        let mut masks = Vec::new();
        let mut at = 0;
        let mut wanted = Vec::new();
        for &b in blocks {
            if b as usize >= BLOCKS_PER_WINDOW || b as usize >= own.blocks.len() {
                return Err(format!("window {window} has no block {b}"));
            }
            let ours = own.block_leaves(b as usize);
            let n = ours.len() * 16;
            let slice =
                theirs.get(at..at + n).ok_or_else(|| format!("window {window}: leaf hashes cut short"))?;
            at += n;
            let theirs = hashes(slice, ours.len(), "leaves")?;
            let mut mask = 0u32;
            for (l, (o, t)) in ours.iter().zip(&theirs).enumerate() {
                if o != t {
                    mask |= 1 << l;
                    wanted.push(b * LEAVES_PER_BLOCK as u32 + l as u32);
                }
            }
            masks.push(mask);
        }
        if at != theirs.len() {
            return Err(format!("window {window}: {} bytes of leaf hashes too many", theirs.len() - at));
        }
        self.leaves_wanted += wanted.len() as u64;
        if !wanted.is_empty() {
            self.wanted.insert(window, wanted);
        }
        Ok(masks)
    }

    /// Checks that `[offset, offset + len)` is exactly leaves asked for in
    /// its window, and crosses them off.
    pub fn received(&mut self, offset: u64, len: u64, size: u64) -> std::result::Result<(), String> {
        let window = offset / WINDOW;
        let bad = || format!("bytes {offset}+{len} were not asked for");
        if !offset.is_multiple_of(LEAF) || len == 0 || offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(bad());
        }
        let first = ((offset % WINDOW) / LEAF) as u32;
        let count = len.div_ceil(LEAF) as u32;
        let wanted = self.wanted.get_mut(&window).ok_or_else(bad)?;
        for leaf in first..first + count {
            let end = (window * WINDOW + u64::from(leaf + 1) * LEAF).min(size);
            let whole = offset + len >= end || leaf + 1 < first + count;
            let Some(i) = wanted.iter().position(|w| *w == leaf).filter(|_| whole) else { return Err(bad()) };
            wanted.swap_remove(i);
        }
        if wanted.is_empty() {
            self.wanted.remove(&window);
        }
        Ok(())
    }

    /// Leaves of `window` asked for will not come (a verification): settled.
    pub fn forget(&mut self, window: u64) {
        self.wanted.remove(&window);
    }

    /// Whether every window is settled: nothing asked for is still awaited.
    pub fn settled(&self) -> bool {
        self.own.is_empty() && self.wanted.is_empty()
    }
}
