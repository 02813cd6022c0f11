//! Scrub: what a replica stores is read back and verified now and then
//! (`--scrub-hours`), so damage at rest — a flipped bit, a bad sector — is
//! found before it is needed, reported, and never used:
//!
//! - a received segment not yet applied that no longer verifies is set
//!   aside with those after it, and the replica asks for a resync (as the
//!   apply does when it meets one);
//! - an undo file that no longer verifies cannot take the image back past
//!   its point: the older points that needed it are dropped (the newest
//!   points stay exact), and the count is reported;
//! - a damaged undo file of the bridge (what a resync changed since the
//!   newest point) drops every point: none could be materialised exactly.
//!
//! - `replica.json` (checked against its checksum whenever it is loaded,
//!   see `state::load`) is read back too: damaged, it is written again
//!   from the state in memory, which was sound when loaded and is what the
//!   replica has done since.

use std::fs;

use super::{
    ReplicaDisk, Result,
    files::{seq_files, sync_dir, verify_file},
    io_at,
};

/// What one scrub of a replica found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScrubReport {
    /// Files read and verified.
    pub files: usize,
    /// What was damaged, one line each.
    pub damaged: Vec<String>,
    /// Recovery points dropped because an undo file they needed was damaged.
    pub points_lost: usize,
}

impl ReplicaDisk {
    /// Verifies every stored segment and undo file (see the module's doc).
    pub fn scrub(&self) -> Result<ScrubReport> {
        let _apply = self.apply_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut report = ScrubReport::default();
        report.files += 1;
        if let Err(e) = super::state::load(&self.dir) {
            report.damaged.push(format!("{e} (written again from the state in memory)"));
            self.update(|_| {})?;
        }
        let applied = self.state().applied_through;
        for (first, p) in seq_files(&self.dir.join("log"), ".seg")? {
            if first <= applied {
                continue;
            }
            report.files += 1;
            if let Err(e) = verify_file(&p) {
                report.damaged.push(format!("received segment {}: {e}", p.display()));
                self.set_aside_damaged(first, &e)?;
                break; // it set aside the later ones too
            }
        }
        let undo_dir = self.dir.join("undo");
        let damaged = |name: &String, report: &mut ScrubReport| {
            report.files += 1;
            let path = undo_dir.join(name);
            let e = verify_file(&path).err()?;
            report.damaged.push(format!("undo file {}: {e}", path.display()));
            Some(())
        };
        let s = self.state().clone();
        // The newest point whose undo files are damaged: every point before it needed them.
        let mut lose = 0;
        if s.bridge.iter().any(|b| damaged(b, &mut report).is_some()) {
            lose = s.points.len();
        }
        for (i, p) in s.points.iter().enumerate() {
            if p.undo_files().any(|u| damaged(u, &mut report).is_some()) {
                lose = lose.max(i);
            }
        }
        if report.damaged.iter().any(|d| d.starts_with("undo")) {
            self.drop_oldest_points(lose, lose == s.points.len())?;
            report.points_lost = lose;
        }
        if !report.damaged.is_empty() {
            tracing::error!(
                dir = %self.dir.display(),
                damaged = ?report.damaged,
                points_lost = report.points_lost,
                "scrub found damage at rest"
            );
        }
        Ok(report)
    }

    /// Drops the `n` oldest points (all of them and the bridge with `all`);
    /// the oldest point left needs no undo file. Files no longer referred
    /// to are deleted after the state says so.
    fn drop_oldest_points(&self, n: usize, all: bool) -> Result<()> {
        let before: Vec<String> = {
            let s = self.state();
            s.points.iter().flat_map(|p| p.undo_files().cloned()).chain(s.bridge.iter().cloned()).collect()
        };
        self.update(|s| {
            if all {
                s.points.clear();
                s.bridge.clear();
            } else {
                s.points.drain(..n.min(s.points.len()));
                if let Some(oldest) = s.points.first_mut() {
                    oldest.undo = None;
                    oldest.chain.clear();
                }
            }
        })?;
        for name in before.iter().filter(|n| !self.refers_to(n)) {
            let p = self.dir.join("undo").join(name);
            fs::remove_file(&p).map_err(io_at(&p))?;
        }
        sync_dir(&self.dir.join("undo"))
    }
}
