//! Extended replication (A→B→C) at B: applied segments are kept in
//! `forward/<first>-<last>.seg` until the extended replica acknowledges them.

use std::{fs, path::Path};

use super::{ReplicaDisk, Result, files::sync_dir, io_at};
use crate::log::SealedSegment;

impl ReplicaDisk {
    /// Moves an applied segment into `forward/`, named by its first and
    /// last sequence, for the extended replica.
    pub(super) fn keep_for_forwarding(&self, seg: &Path, first: u64, last: u64) -> Result<()> {
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
    pub fn forward_sealed(&self) -> Result<Vec<SealedSegment>> {
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
            out.push(SealedSegment {
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
}
