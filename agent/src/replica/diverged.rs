//! The diverged point: what an image held before a resync brought it onto
//! another history — the old primary's own disk when the side that took the
//! VM over in an unplanned failover replicates back onto it (its writes that
//! never got there), or an extended replica that was ahead of the point the
//! failover chose. It is kept, listed and materialisable until the operator
//! discards it, and costs only what the resync overwrote: it is reached from
//! the image like a point older than every point (the bridge, then each
//! point's undo files newest first; the oldest point's undo leads to it).
//!
//! ```text
//!  set aside (the old primary's disk)  ─▶ diverged{seq, epoch}, no points, Receiving at its own seq
//!  resync of another history           ─▶ each batch's undo joins the bridge back to it
//!  first point after the resync        ─▶ takes the bridge over: its undo leads to the diverged state
//!  promote / reverse / complete        ─▶ written out first (materialized/diverged.img): the image may
//!                                         change without undo from then on
//!  discard                             ─▶ the undo that only led to it goes
//! ```

use std::{fs, path::PathBuf};

use super::{Diverged, ReplicaDisk, ReplicaError, Result, io_at, now_ms, state::Point};

/// The name of the diverged point's own file under `materialized/`.
const DIVERGED_FILE: &str = "diverged";

impl ReplicaDisk {
    /// The diverged point kept here, if any.
    pub fn diverged(&self) -> Option<Diverged> {
        self.state().diverged.clone()
    }

    /// Makes this replica (in a directory of its own, its image the old
    /// primary's disk `image`) hold that disk as it is as its diverged
    /// point: its own history (`epoch`, logged through `through`) is not
    /// the sender's, so the sender's next Open finds another history and
    /// resynchronises, and what the resync overwrites stays recoverable.
    /// Idempotent for the same disk and position; refused while another
    /// diverged point is kept (it would be lost).
    pub fn set_aside(
        &self,
        epoch: u64,
        primary: String,
        trust_group: String,
        image: PathBuf,
        through: u64,
    ) -> Result<()> {
        let s = self.state().clone();
        if let Some(d) = &s.diverged {
            if s.image.as_deref() == Some(image.as_path()) && d.seq == through && d.epoch == epoch {
                return Ok(());
            }
            return Err(ReplicaError::Precondition(format!(
                "disk {} already keeps a diverged point (its own writes through sequence {} of epoch {}, set aside \
                 at {} ms): materialise it if it is needed, then discard it (spec.divergedPoint.action: Discard on \
                 the Primary object) before replicating onto this disk again",
                s.disk_id, d.seq, d.epoch, d.time_ms
            )));
        }
        self.reverse(epoch, primary, trust_group, Some(image), through)?;
        self.update(|s| s.diverged = Some(Diverged { seq: through, epoch, time_ms: now_ms(), file: None }))
    }

    /// Whether the bridge must lead back to a state: the newest point, or a
    /// diverged point kept as undo.
    pub(super) fn bridged(s: &super::ReplicaState) -> bool {
        !s.points.is_empty() || s.diverged.as_ref().is_some_and(|d| d.file.is_none())
    }

    /// Writes the diverged point to `dest` (a new sparse file).
    pub fn materialize_diverged(&self, dest: &std::path::Path) -> Result<()> {
        let _apply = self.apply_lock.lock().unwrap_or_else(|p| p.into_inner());
        let Some(d) = self.diverged() else {
            return Err(ReplicaError::Precondition("no diverged point is kept here".into()));
        };
        let source = match &d.file {
            Some(name) => self.materialized_path(name),
            None => self.image_path(),
        };
        let points = self.points();
        let undo: Vec<(u64, String)> = match d.file {
            Some(_) => Vec::new(),
            None => {
                self.state().bridge.iter().rev().map(|b| (0, b.clone())).chain(all_undo(&points)).collect()
            }
        };
        self.write_back(&source, &undo, dest)
    }

    /// Writes the diverged point as copy `name`: its path, and the sequence
    /// it ends in its own history.
    pub fn materialize_diverged_named(&self, name: &str) -> Result<(PathBuf, u64)> {
        let seq = self.diverged().map_or(0, |d| d.seq);
        Ok((self.write_named(name, |tmp| self.materialize_diverged(tmp))?, seq))
    }

    /// Discards the diverged point: its file, or the undo that only led to it.
    pub fn discard_diverged(&self) -> Result<bool> {
        let _apply = self.apply_lock.lock().unwrap_or_else(|p| p.into_inner());
        let Some(d) = self.diverged() else { return Ok(false) };
        self.unlink_diverged_undo()?;
        self.update(|s| s.diverged = None)?;
        if let Some(name) = d.file {
            self.delete_materialized(&name)?;
        }
        tracing::info!(disk = %self.state().disk_id, seq = d.seq, epoch = d.epoch, "diverged point discarded");
        Ok(true)
    }

    /// Before the image may change without undo (promoted, reversed): a
    /// diverged point kept as undo is written out as a file of its own.
    pub(super) fn settle_diverged(&self) -> Result<()> {
        if self.diverged().is_none_or(|d| d.file.is_some()) {
            return Ok(());
        }
        self.write_named(DIVERGED_FILE, |tmp| self.materialize_diverged(tmp))?;
        let _apply = self.apply_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.update(|s| {
            if let Some(d) = &mut s.diverged {
                d.file = Some(DIVERGED_FILE.into());
            }
        })?;
        self.unlink_diverged_undo()
    }

    /// The undo that leads only to the diverged point goes: the oldest
    /// point's (or, with no point, the bridge's). Called under the apply lock.
    fn unlink_diverged_undo(&self) -> Result<()> {
        let mut gone = Vec::new();
        self.update(|s| match s.points.first_mut() {
            Some(oldest) => {
                gone.extend(oldest.undo.take());
                gone.append(&mut oldest.chain);
            }
            None => gone.append(&mut s.bridge),
        })?;
        for name in gone {
            if !self.refers_to(&name) {
                let p = self.dir.join("undo").join(&name);
                match fs::remove_file(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_at(&p)(e)),
                }
            }
        }
        Ok(())
    }

    /// A resync of another history finished (its points are numbered past
    /// where the new log resumes, so they cannot stay points): the newest
    /// becomes the diverged point, the others fold into it. With a diverged
    /// point kept already (as undo) they all lead on to it through the bridge.
    pub(super) fn collapse_history(&self) -> Result<()> {
        self.prune(|_| false)?;
        let _apply = self.apply_lock.lock().unwrap_or_else(|p| p.into_inner());
        let Some(newest) = self.points().pop() else { return Ok(()) };
        let mut dropped = Vec::new();
        self.update(|s| {
            s.points.clear();
            match &s.diverged {
                Some(d) if d.file.is_none() => {
                    // Applied after the bridge (newest first): older than it.
                    let mut bridge: Vec<String> = newest.undo_files().cloned().collect();
                    bridge.reverse();
                    bridge.append(&mut s.bridge);
                    s.bridge = bridge;
                }
                Some(_) => {
                    dropped.extend(newest.undo_files().cloned());
                    dropped.append(&mut s.bridge);
                }
                None => {
                    s.diverged = Some(Diverged {
                        seq: newest.seq,
                        epoch: s.epoch,
                        time_ms: newest.time_ms,
                        file: None,
                    })
                }
            }
        })?;
        if !dropped.is_empty() {
            tracing::warn!(
                seq = newest.seq,
                "another history's newest point is dropped: a diverged point is kept here already"
            );
        }
        for name in dropped {
            if !self.refers_to(&name) {
                let p = self.dir.join("undo").join(&name);
                fs::remove_file(&p).map_err(io_at(&p))?;
            }
        }
        Ok(())
    }
}

/// Every point's undo files, newest point first, each in the order they apply.
pub(super) fn all_undo(points: &[Point]) -> impl Iterator<Item = (u64, String)> + '_ {
    points.iter().rev().flat_map(|p| p.undo_files().map(move |u| (p.seq, u.clone())))
}
