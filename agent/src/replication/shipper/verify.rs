//! Verification (`spec.verify`), the primary's side: once the replica holds
//! every sealed segment, both sides' hash trees are compared at that
//! position with nothing sent and nothing changed ([`Shipper::send_tree`]
//! counting the differing leaves instead of sending them). The primary's
//! image moves on meanwhile, so a leaf written since the position (the log
//! cut at the end says which) is in flight, not a difference; any other
//! differing leaf is one: the replica does not hold what the primary had.
//!
//! ```text
//!  shipped through P ─▶ Start{verify, next_seq P+1} ─▶ replica: applied exactly through P?
//!  window / block / leaf hashes ─▶ differing leaves ─▶ Finish ◀─ Done
//!  cut the log ─▶ ranges written after P ─▶ differing = leaves not written since
//! ```

use std::{fs::File, io::BufReader, sync::Arc, time::SystemTime};

use vmreplica_api::replication::{ResyncFinish, ResyncStart, resync_down::Msg as Down, resync_up::Msg as Up};

use super::{
    ShipError, Shipper,
    resync::{Reading, Stream, bad},
};
use crate::hashtree::LEAF;

/// What a verification found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifySummary {
    pub id: String,
    /// The position compared: the replica held exactly through it.
    pub seq: u64,
    /// Differing bytes (whole 4 KiB leaves) no write since the position touched.
    pub differing_bytes: u64,
    /// Differing bytes the primary wrote since the position.
    pub in_flight_bytes: u64,
    pub compared_bytes: u64,
    pub finished: Option<SystemTime>,
    pub duration_ms: u64,
}

impl Shipper {
    /// Verifies the replica, which holds exactly through `through`.
    async fn verify(&self, id: &str, through: u64) -> Result<VerifySummary, ShipError> {
        let started = std::time::Instant::now();
        let (size, path) = (self.source.size(), self.source.image_path());
        let start = ResyncStart {
            disk: Some(self.disk_ref()),
            disk_size: size,
            epoch: self.epoch,
            next_seq: through + 1,
            dirty_map: false,
            id: id.to_owned(),
            verify: true,
        };
        let _slot = self.limits.transfers.acquire().await;
        let Stream { tx, mut verdicts, reader } = self.open_resync(start).await?;
        let image = Arc::new(
            File::open(&path).map_err(|e| ShipError::Read { what: path.display().to_string(), source: e })?,
        );
        let mut differing = Vec::new();
        let reading = Reading { image: &image, path: &path, size };
        let compared = self.send_tree(&tx, &mut verdicts, reading, None, Some(&mut differing)).await;
        let done = async {
            compared?;
            self.send_up(&tx, Up::Finish(ResyncFinish { consistent_from: through + 1 })).await?;
            match verdicts.recv().await {
                Some(Ok(Some(m))) if matches!(m.msg, Some(Down::Done(_))) => Ok(()),
                Some(Ok(m)) => Err(bad(format!("after the verification's finish the replica sent {m:?}"))),
                Some(Err(s)) => Err(ShipError::Rpc(s)),
                None => Err(bad("the replica ended the stream before it was done".into())),
            }
        }
        .await;
        reader.abort();
        done?;
        // Every write since the position, now in sealed segments.
        self.source.cut()?;
        let mut written = Vec::new();
        for seg in self.source.sealed()?.iter().filter(|s| s.last_seq > through) {
            let f = File::open(&seg.path)
                .map_err(|e| ShipError::Read { what: seg.path.display().to_string(), source: e })?;
            let (_, ranges, _) = crate::log::format::scan_ranges(BufReader::new(f))
                .map_err(|e| bad(format!("reading {}: {e}", seg.path.display())))?;
            written.extend(ranges);
        }
        let touched = |off: u64| written.iter().any(|&(s, e)| s < off + LEAF && off < e);
        let (mut real, mut in_flight) = (0, 0);
        for (off, len) in differing {
            for leaf in (off..off + len).step_by(LEAF as usize) {
                let n = LEAF.min(off + len - leaf);
                if touched(leaf) { in_flight += n } else { real += n }
            }
        }
        Ok(VerifySummary {
            id: id.to_owned(),
            seq: through,
            differing_bytes: real,
            in_flight_bytes: in_flight,
            compared_bytes: size,
            finished: Some(SystemTime::now()),
            duration_ms: started.elapsed().as_millis() as u64,
        })
    }

    /// Runs the verification asked for, once per id, with the replica
    /// holding exactly through `through`; its result goes to the stats and
    /// the metric. A failed one is the cycle's error (and is tried again).
    pub(super) async fn verify_if_requested(&self, through: u64) -> Result<(), ShipError> {
        let asked = self.policy.lock().unwrap_or_else(|p| p.into_inner()).verify.clone();
        let done = self.stats().last_verify.map(|v| v.id);
        let Some(id) = asked.filter(|id| done.as_ref() != Some(id)) else { return Ok(()) };
        if matches!(self.source, super::Source::Forward(_)) {
            return Ok(());
        }
        tracing::info!(vm = %self.vm_id, disk = %self.disk_id, id, through, "verifying");
        let v = self.verify(&id, through).await?;
        tracing::info!(vm = %self.vm_id, disk = %self.disk_id, ?v, "verified");
        if let Some(m) = &self.metrics {
            m.verify_differing.with_label_values(&self.labels()).set(v.differing_bytes as i64);
        }
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).last_verify = Some(v);
        Ok(())
    }
}
