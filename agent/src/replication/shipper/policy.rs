//! When a disk is resynchronised: why one is needed (the replica's Open
//! answer and the log decide), and whether it may run now (the VM's policy:
//! automatically, within an optional daily window, or on request by id —
//! Hyper-V's automatic resynchronisation interval and
//! `Resume-VMReplication -Resynchronize`). A resync that is needed and may
//! not run yet is a failed cycle whose error says why and when it will.

use vmreplica_api::replication::OpenReply;

use super::{ShipError, Shipper};

/// When this disk may be resynchronised (from the VM's spec).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResyncPolicy {
    /// Resync on its own when replication needs it.
    pub automatic: bool,
    /// Automatic resyncs only from `.0` to `.1`, minutes after midnight UTC
    /// (wrapping past midnight when `.1 < .0`).
    pub window: Option<(u16, u16)>,
    /// A resync asked for by id: run once, whatever the window.
    pub requested: Option<String>,
    /// A verification asked for by id (`spec.verify`): run once.
    pub verify: Option<String>,
}

impl Default for ResyncPolicy {
    fn default() -> Self {
        Self { automatic: true, window: None, requested: None, verify: None }
    }
}

impl ResyncPolicy {
    /// Whether an automatic resync may start at `minute` (after midnight UTC).
    pub fn allows_at(&self, minute: u16) -> bool {
        match self.window {
            _ if !self.automatic => false,
            None => true,
            Some((from, to)) if from <= to => from == to || (from..to).contains(&minute),
            Some((from, to)) => minute >= from || minute < to,
        }
    }

    /// The window, as an operator wrote it (`18:30-06:00 UTC`).
    pub fn window_text(&self) -> String {
        match self.window {
            None => "any time".into(),
            Some((a, b)) => format!("{:02}:{:02}-{:02}:{:02} UTC", a / 60, a % 60, b / 60, b % 60),
        }
    }
}

/// Why a resync is needed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResyncWhy {
    Requested(String),
    /// A resync of the replica began and did not finish.
    Interrupted,
    /// More than the threshold was pending: only a dirty map recorded changes.
    LogOverflow,
    /// The replica's position is not in this log (a gap, or another history).
    NotInLog(String),
}

impl std::fmt::Display for ResyncWhy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Requested(id) => write!(f, "a resynchronisation was requested ({id})"),
            Self::Interrupted => f.write_str("a resynchronisation of the replica began and did not finish"),
            Self::LogOverflow => f.write_str(
                "the log passed half the disk while the replica was out of reach, and only a map of changed \\
                 blocks was kept",
            ),
            Self::NotInLog(why) => f.write_str(why),
        }
    }
}

fn minute_of_day_utc() -> u16 {
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
    ((secs % 86_400) / 60) as u16
}

impl Shipper {
    /// Why the replica that answered `reply` (expecting `next`) needs a
    /// resync, if it does.
    pub(super) fn resync_reason(&self, reply: &OpenReply, next: u64) -> Result<Option<ResyncWhy>, ShipError> {
        let requested = self.policy.lock().unwrap_or_else(|p| p.into_inner()).requested.clone();
        let done = self.stats().last_resync.map(|r| r.id);
        if let Some(id) = requested.filter(|id| done.as_ref() != Some(id)) {
            return Ok(Some(ResyncWhy::Requested(id)));
        }
        if reply.needs_resync {
            return Ok(Some(ResyncWhy::Interrupted));
        }
        if self.source.resync_required() {
            return Ok(Some(ResyncWhy::LogOverflow));
        }
        // The replica's sequence must be one of this log's. One that has seen
        // nothing of this epoch must stop exactly where this log starts, and
        // none may be ahead of what was logged here (either means it holds
        // another history, and acknowledging would delete writes it never got).
        let last_logged = self.source.next_seq() - 1;
        let foreign = reply.epoch < self.epoch && next != self.log_start;
        if foreign || next - 1 > last_logged {
            let e = ShipError::Diverged {
                replica_epoch: reply.epoch,
                replica_next: next,
                epoch: self.epoch,
                log_start: self.log_start,
                last_logged,
            };
            return Ok(Some(ResyncWhy::NotInLog(e.to_string())));
        }
        let sealed = self.source.sealed()?;
        if let Some(seg) = sealed.iter().find(|s| s.first_seq < next && s.last_seq >= next) {
            let e = ShipError::ResyncRequired { expected: next, first: seg.first_seq, last: seg.last_seq };
            return Ok(Some(ResyncWhy::NotInLog(e.to_string())));
        }
        if let Some(first) = sealed.first().filter(|s| s.first_seq > next) {
            return Ok(Some(ResyncWhy::NotInLog(format!(
                "the replica expects sequence {next}, and this log starts at {}: a resynchronisation is required",
                first.first_seq
            ))));
        }
        Ok(None)
    }

    /// Resyncs now if the policy allows (returns where replication
    /// resumes), or fails the cycle saying why and when it will run.
    pub(super) async fn resync_if_allowed(&self, why: ResyncWhy, next: u64) -> Result<u64, ShipError> {
        let policy = self.policy.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let id = match &why {
            ResyncWhy::Requested(id) => id.clone(),
            _ if policy.allows_at(minute_of_day_utc()) => format!(
                "auto-{}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs()
            ),
            _ => {
                let when = if policy.automatic {
                    format!("automatic resynchronisation runs {}", policy.window_text())
                } else {
                    "automatic resynchronisation is off: request one (spec.resynchronize)".into()
                };
                let msg = format!("{why}; {when}");
                self.set_waiting(Some(msg.clone()));
                return Err(ShipError::ResyncWaiting(msg));
            }
        };
        self.set_waiting(None);
        tracing::info!(vm = %self.vm_id, disk = %self.disk_id, %id, reason = %why, "resynchronising");
        let started = std::time::Instant::now();
        let (cut, map) = self.source.begin_resync(next)?;
        let resumed = self.resync(&id, cut, map).await?;
        let summary = self.resync.summary(&id, started.elapsed());
        tracing::info!(vm = %self.vm_id, disk = %self.disk_id, ?summary, "resynchronised");
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).last_resync = Some(summary);
        Ok(resumed)
    }

    pub(super) fn set_waiting(&self, why: Option<String>) {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).resync_waiting = why;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_may_wrap_past_midnight_and_off_means_never() {
        let at = |h: u16, m: u16| h * 60 + m;
        let night = ResyncPolicy { window: Some((at(18, 30), at(6, 0))), ..Default::default() };
        assert!(night.allows_at(at(23, 0)) && night.allows_at(at(2, 0)) && night.allows_at(at(18, 30)));
        assert!(!night.allows_at(at(6, 0)) && !night.allows_at(at(12, 0)));
        let day = ResyncPolicy { window: Some((at(9, 0), at(17, 0))), ..Default::default() };
        assert!(day.allows_at(at(9, 0)) && !day.allows_at(at(17, 0)) && !day.allows_at(at(3, 0)));
        assert!(ResyncPolicy::default().allows_at(at(12, 0)));
        assert!(!ResyncPolicy { automatic: false, ..Default::default() }.allows_at(at(12, 0)));
        assert_eq!(night.window_text(), "18:30-06:00 UTC");
    }
}
