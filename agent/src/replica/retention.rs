//! Which recovery points a replica keeps (Hyper-V's recovery history): every
//! point within the continuous window; beyond it, one point per hour for the
//! most recent N hours, an application-consistent one where the hour has one;
//! and always the newest. Pure: the replica prunes (folding undo) what this drops.

pub use super::state::Policy;
use super::state::{Point, PointKind};

const HOUR_MS: u64 = 3_600_000;

/// For each point (oldest first), `Some(kind)` to keep it as that kind, `None` to drop it.
pub fn plan(points: &[Point], now_ms: u64, policy: &Policy) -> Vec<Option<PointKind>> {
    let mut out: Vec<Option<PointKind>> = vec![None; points.len()];
    let oldest_hour = (now_ms / HOUR_MS).saturating_sub(policy.hourly as u64);
    for (i, p) in points.iter().enumerate() {
        let newest = i + 1 == points.len();
        if newest || p.time_ms.saturating_add(policy.window_ms) >= now_ms {
            out[i] = Some(p.kind);
        }
    }
    // Per hour bucket of the last N hours: the latest application-consistent
    // point (even when the hour already has a window or newest point: a point
    // taken with the guest quiesced is worth keeping), else, if nothing of the
    // hour is kept yet, the latest point as the hour's Hourly point.
    let mut i = 0;
    while i < points.len() {
        let hour = points[i].time_ms / HOUR_MS;
        let mut j = i;
        while j < points.len() && points[j].time_ms / HOUR_MS == hour {
            j += 1;
        }
        let bucket = i..j;
        if hour >= oldest_hour && policy.hourly > 0 {
            let consistent =
                bucket.clone().rev().find(|&k| points[k].kind == PointKind::ApplicationConsistent);
            match consistent {
                Some(k) => out[k] = Some(PointKind::ApplicationConsistent),
                None if bucket.clone().all(|k| out[k].is_none()) => out[j - 1] = Some(PointKind::Hourly),
                None => {}
            }
        }
        i = j;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pt(seq: u64, minutes: u64, kind: PointKind) -> Point {
        Point { seq, time_ms: minutes * 60_000, kind, undo: None, chain: Vec::new() }
    }

    #[test]
    fn window_then_hourly_then_nothing() {
        use PointKind::*;
        // A point every 20 minutes for 30 hours; now is just after the last.
        let points: Vec<Point> =
            (0..90).map(|k| pt(k, k * 20, if k == 40 { ApplicationConsistent } else { Standard })).collect();
        let now = 89 * 20 * 60_000 + 60_000;
        let plan = plan(&points, now, &Policy { window_ms: HOUR_MS, hourly: 4 });
        let kept: Vec<(u64, PointKind)> =
            points.iter().zip(&plan).filter_map(|(p, k)| k.map(|k| (p.seq, k))).collect();
        // Within the hour: seqs 87, 88, 89 (minutes 1740, 1760, 1780; now = 1781).
        // Beyond the window, 4 hourly points: hours 25..=28 (now's hour is 29),
        // the last point of each; nothing from hour 24 or before.
        assert_eq!(
            kept,
            vec![
                (77, Hourly),
                (80, Hourly),
                (83, Hourly),
                (86, Hourly),
                (87, Standard),
                (88, Standard),
                (89, Standard)
            ]
        );
    }

    #[test]
    fn an_application_consistent_point_represents_its_hour() {
        use PointKind::*;
        let points = vec![
            pt(1, 0, Standard),
            pt(2, 20, ApplicationConsistent),
            pt(3, 40, Standard),
            pt(4, 300, Standard),
        ];
        let plan = plan(&points, 301 * 60_000, &Policy { window_ms: 10 * 60_000, hourly: 24 });
        assert_eq!(plan, vec![None, Some(ApplicationConsistent), None, Some(Standard)]);
    }

    #[test]
    fn the_hour_of_the_newest_point_keeps_its_application_consistent_point() {
        use PointKind::*;
        let points = vec![pt(1, 5, ApplicationConsistent), pt(2, 6, Standard), pt(3, 7, Standard)];
        let plan = plan(&points, 120 * 60_000 - 1, &Policy { window_ms: 60_000, hourly: 24 });
        assert_eq!(plan, vec![Some(ApplicationConsistent), None, Some(Standard)]);
    }

    #[test]
    fn zero_hourly_points_keeps_only_the_window_and_the_newest() {
        let points = vec![pt(1, 0, PointKind::Standard), pt(2, 200, PointKind::Standard)];
        assert_eq!(
            plan(&points, 10 * HOUR_MS, &Policy { window_ms: HOUR_MS, hourly: 0 }),
            vec![None, Some(PointKind::Standard)]
        );
    }
}
