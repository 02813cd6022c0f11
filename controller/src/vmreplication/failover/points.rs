//! Which sequence of each disk a recovery point means, and what failing over
//! to it loses.

use std::collections::BTreeMap;

use vmreplica_api::control::ReplicaDisk;

/// Points of different disks of one cycle are sealed within this of each other.
const SAME_CYCLE_MS: u64 = 500;
/// For each disk, the sequence of its state at the chosen point: the point
/// `id` (a sequence of the listed disk) or the newest (`latest`). Errors say
/// what to choose instead.
pub fn choose_points(disks: &[&ReplicaDisk], id: &str) -> Result<(String, BTreeMap<String, u64>), String> {
    let listed = disks
        .iter()
        .max_by_key(|d| {
            (d.points.len(), d.points.last().map(|p| p.time_unix_ms), std::cmp::Reverse(d.disk_id.clone()))
        })
        .ok_or("the replica has no disks")?;
    let chosen = if id == "latest" {
        listed.points.last()
    } else {
        let seq: u64 =
            id.parse().map_err(|_| format!("recovery point {id:?} is not a point id or `latest`"))?;
        Some(listed.points.iter().find(|p| p.seq == seq).ok_or_else(|| {
            format!("recovery point {id} is not (or no longer) on the replica: choose one from status.recoveryPoints")
        })?)
    };
    let Some(chosen) = chosen else {
        // No point yet on any disk: the images as they are (right after the initial copy).
        return Ok(("latest".into(), disks.iter().map(|d| (d.disk_id.clone(), 0)).collect()));
    };
    // A disk's point of the chosen cycle is sealed at most SAME_CYCLE_MS
    // after it, and before halfway to the listed disk's next cycle: a cycle
    // may follow sooner than SAME_CYCLE_MS (the first one after a spec
    // change), and its points must not be taken for the chosen one's.
    let next = listed.points.iter().find(|p| p.seq > chosen.seq);
    let reach = next.map_or(SAME_CYCLE_MS, |n| {
        SAME_CYCLE_MS.min(n.time_unix_ms.saturating_sub(chosen.time_unix_ms).saturating_sub(1) / 2)
    });
    let mut per_disk = BTreeMap::new();
    for d in disks {
        let at = d.points.iter().rev().find(|p| p.time_unix_ms <= chosen.time_unix_ms + reach);
        let seq = match (at, d.points.is_empty()) {
            (Some(p), _) => p.seq,
            // Never written since its initial copy: its image is that state.
            (None, true) => 0,
            (None, false) => {
                return Err(format!(
                    "disk {} has no recovery point as old as {}: choose a newer point",
                    d.disk_id, chosen.seq
                ));
            }
        };
        per_disk.insert(d.disk_id.clone(), seq);
    }
    Ok((chosen.seq.to_string(), per_disk))
}

/// What an unplanned failover to `point` (a point id, or `latest` when the
/// replica had none) loses of what reached the replica: the seconds from the
/// point to the newest replicated write, and when that write was sealed.
pub fn data_loss_window(disks: &[&ReplicaDisk], point: &str) -> (Option<u64>, Option<u64>) {
    let newest = disks
        .iter()
        .map(|d| d.points.last().map_or(0, |p| p.time_unix_ms).max(d.last_applied_sealed_unix_ms))
        .max()
        .filter(|ms| *ms > 0);
    let point_ms = disks.iter().flat_map(|d| d.points.iter()).find(|p| p.seq.to_string() == point);
    let window = match (point_ms, newest) {
        (Some(p), Some(n)) => Some(n.saturating_sub(p.time_unix_ms) / 1000),
        // No point yet: the images as they are, which is all that arrived.
        (None, _) if point == "latest" => Some(0),
        _ => None,
    };
    (window, newest)
}
