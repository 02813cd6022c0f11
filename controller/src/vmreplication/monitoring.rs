//! The monitoring settings Hyper-V keeps per host (here per
//! ReplicationServer): the window statistics are counted over, when windows
//! start, when lag is worth a warning; and durations as status shows them.

use std::time::Duration;

/// The monitoring settings of the ReplicationServer selecting the VM's agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Monitoring {
    pub interval: Duration,
    /// Minutes after midnight UTC the windows are laid from.
    pub start_of_day_min: u32,
    pub lag_warning: Duration,
}

impl Default for Monitoring {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(12 * 3600),
            start_of_day_min: 9 * 60,
            lag_warning: Duration::from_secs(3600),
        }
    }
}

/// Start of the monitoring window holding `now`: windows of `interval` laid
/// from `start_of_day` (minutes after midnight UTC).
pub fn window_start(now_ms: i64, interval: Duration, start_of_day_min: u32) -> i64 {
    let step = (interval.as_millis() as i64).max(60_000);
    let anchor = i64::from(start_of_day_min) * 60_000;
    anchor + (now_ms - anchor).div_euclid(step) * step
}

/// Parses `12h` / `2d` (the schema admits nothing else).
pub fn parse_interval(s: &str) -> Option<Duration> {
    let (n, unit) = s.split_at(s.len().checked_sub(1)?);
    let n: u64 = n.parse().ok()?;
    match unit {
        "h" => Some(Duration::from_secs(n * 3600)),
        "d" => Some(Duration::from_secs(n * 86_400)),
        _ => None,
    }
}

/// Parses `HH:MM` into minutes after midnight.
pub fn parse_time_of_day(s: &str) -> Option<u32> {
    let (h, m) = s.split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 60 + m)
}

/// `42s`, `3m`, `2h5m`, `3d4h`.
pub fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// Bytes as an operator reads them (binary units, one decimal).
pub fn humanize_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{b} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

/// Lag as status shows it: coarse, so that a caught-up replication does not
/// rewrite status every pass.
pub fn lag_text(lag: Duration) -> String {
    if lag < Duration::from_secs(60) { "<1m".into() } else { humanize(lag) }
}
