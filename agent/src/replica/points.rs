//! Recovery points: materialising one as an image of its own (test
//! failover, a chosen point of an unplanned failover), and dropping points a
//! recovery history no longer keeps, folding their undo files so the points
//! that remain stay exact and storage is the union of what changed between them.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, BufWriter},
    path::{Path, PathBuf},
};

use super::{
    Point, PointKind, ReplicaDisk, ReplicaError, Result,
    apply::write_ranges,
    diverged::all_undo,
    files::{open_nofollow, open_reader, sync_dir, undo_files},
    io_at, now_ms,
    ranges::{RangeMap, Source},
    retention::{Policy, plan},
};
use crate::{
    image::sparse_copy,
    log::{
        RecordKind,
        apply::apply_record,
        format::{RECORD_HEADER_LEN, SegmentWriter},
    },
};

impl ReplicaDisk {
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
        let mut done = 0;
        let dest = self.write_named(name, |tmp| {
            done = match (seq, self.points().last()) {
                (0, Some(p)) => p.seq,
                (0, None) => {
                    let _apply = self.apply_lock.lock().unwrap_or_else(|p| p.into_inner());
                    let image_path = self.image_path();
                    let image = open_nofollow(&image_path, false, false).map_err(io_at(&image_path))?;
                    sparse_copy(&image, tmp).map_err(io_at(tmp))?;
                    File::open(tmp).and_then(|f| f.sync_all()).map_err(io_at(tmp))?;
                    done = self.state().applied_through;
                    return self.record_copy_seq(name, done);
                }
                (s, _) => s,
            };
            self.materialize(done, tmp)?;
            self.record_copy_seq(name, done)
        })?;
        Ok((dest, done))
    }

    /// Writes copy `name` (replacing one of that name) through `write`,
    /// which fills a new file at the path it is given: written aside, then
    /// renamed into place, so a copy is whole or absent.
    pub(super) fn write_named(&self, name: &str, write: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
        let dest = self.materialized_path(name);
        let dir = dest.parent().expect("under the replica dir");
        fs::create_dir_all(dir).map_err(io_at(dir))?;
        let tmp = dest.with_extension("img.part");
        let _ = fs::remove_file(&tmp);
        write(&tmp)?;
        fs::rename(&tmp, &dest).map_err(io_at(&tmp))?;
        sync_dir(dir)?;
        Ok(dest)
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
        // Newest first: the bridge takes the image back to the newest point
        // (what a resync or a not yet consistent segment changed since), then
        // each point's undo files take it back to the one before it.
        let bridge = self.state().bridge.iter().rev().map(|b| (0, b.clone())).collect::<Vec<_>>();
        let undo: Vec<(u64, String)> = bridge.into_iter().chain(all_undo(&points[at + 1..])).collect();
        self.write_back(&self.image_path(), &undo, dest)
    }

    /// Copies `source` to `dest` (sparse, a reflink where the filesystem
    /// allows) and applies the undo files `undo` to the copy in order, each
    /// verified as it is read (the number names the point it belongs to).
    /// Called under the apply lock.
    pub(super) fn write_back(&self, source: &Path, undo: &[(u64, String)], dest: &Path) -> Result<()> {
        let image = open_nofollow(source, false, false).map_err(io_at(source))?;
        sparse_copy(&image, dest).map_err(io_at(dest))?;
        let out = OpenOptions::new().read(true).write(true).open(dest).map_err(io_at(dest))?;
        for (seq, name) in undo {
            self.apply_undo(*seq, name, &out, dest)?;
        }
        out.sync_all().map_err(io_at(dest))
    }

    /// Applies undo file `name` (of point `seq`) to `out` (at `out_path`),
    /// verifying it as it is read; the caller syncs.
    pub(super) fn apply_undo(&self, seq: u64, name: &str, out: &File, out_path: &Path) -> Result<()> {
        let size = self.state().disk_size;
        let verification = |source| ReplicaError::Verification { first_seq: seq, source };
        let mut reader = open_reader(&self.dir.join("undo").join(name)).map_err(verification)?;
        while let Some(r) = reader.next_record().map_err(verification)? {
            apply_record(out, size, &r).map_err(io_at(out_path))?;
        }
        reader.finish_sealed().map_err(verification)?;
        Ok(())
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
            // Removing point i: point i+1's undo files must now reach point
            // i-1, i.e. its own then point i's, folded into one. The oldest
            // point has no predecessor: its successor's undo files simply go.
            let old: Vec<String> =
                points[i + 1].undo_files().chain(points[i].undo_files()).cloned().collect();
            let new_undo = match points[i].undo {
                None => None,
                Some(_) => Some(self.fold_all(&old)?),
            };
            points[i + 1].undo = new_undo;
            points[i + 1].chain.clear();
            points.remove(i);
            self.update(|s| s.points = points.clone())?;
            for name in old {
                if !self.refers_to(&name) {
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
    pub fn apply_retention(&self, policy: &Policy, now_ms: u64) -> Result<usize> {
        let points = self.points();
        let plan = plan(&points, now_ms, policy);
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
    /// Folds undo files (in the order they apply) into one new file; the
    /// intermediate folds are removed, the inputs are not.
    fn fold_all(&self, names: &[String]) -> Result<String> {
        let mut acc = names[0].clone();
        for (k, next) in names[1..].iter().enumerate() {
            let folded = self.fold(&acc, next)?;
            if k > 0 {
                let p = self.dir.join("undo").join(&acc);
                fs::remove_file(&p).map_err(io_at(&p))?;
            }
            acc = folded;
        }
        Ok(acc)
    }

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
}
