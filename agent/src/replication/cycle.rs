//! One VM's replication cycle, every interval:
//!
//! ```text
//!  [freeze, if an application-consistent point is due]
//!  cut every disk's log (rotate)          ── the only step under the freeze
//!  [thaw — after any freeze attempt, even a failed one]
//!  finish the seals, then ship every disk
//! ```
//! Cutting all disks together under one freeze makes the point consistent
//! across the VM's disks. A point that could not be quiesced is taken
//! crash-consistent, and the next attempt waits for the next
//! application-consistent interval (a guest agent that does not answer costs
//! one bounded wait per interval, never every cycle); a thaw that failed after
//! the freeze reached the guest is retried at every cycle until it succeeds. After a failed cycle the next one waits on the
//! back-off schedule instead of the interval. A replica that refuses this
//! side's epoch (the VM was failed over elsewhere) fences it: the disks
//! become read-only and the cycle ends.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::watch;

use super::shipper::{ShipError, Shipper};
use crate::{disk::ProtectedDisk, quiesce::Quiesce};

/// What one cycle did.
#[derive(Debug, Default)]
pub struct CycleReport {
    /// The cut was taken with the guest quiesced.
    pub app_consistent: bool,
    /// Why an application-consistent point was due but not taken.
    pub quiesce_error: Option<String>,
    /// Errors per disk that failed to seal or ship.
    pub errors: Vec<String>,
    /// A replica refused this side's epoch: the newer epoch that exists.
    pub stale_epoch: Option<u64>,
}

/// How the VM's application-consistent points go, as status reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QuiesceStatus {
    /// When the last application-consistent point was cut (0: none yet).
    pub last_point_unix_ms: u64,
    /// Why the last attempt failed, and when (empty, 0: it did not).
    pub error: String,
    pub error_unix_ms: u64,
    /// A thaw failed after a freeze that reached the guest: it may still be
    /// frozen (the thaw is retried at every cycle).
    pub thaw_pending: bool,
}

/// Replicates one VM: its disks and a shipper for each.
pub struct VmReplication {
    disks: Vec<Arc<ProtectedDisk>>,
    shippers: Vec<Arc<Shipper>>,
    interval: Duration,
    backoff: Vec<Duration>,
    /// Quiesce and how often an application-consistent point is taken.
    app_consistent: Option<(Quiesce, Duration)>,
    /// When the last application-consistent point was attempted.
    last_app: Option<Instant>,
    quiesce: Arc<Mutex<QuiesceStatus>>,
    /// Set to the newer epoch when this VM was fenced (0: not fenced).
    fenced: Arc<AtomicU64>,
}

impl VmReplication {
    pub fn new(
        shippers: Vec<Arc<Shipper>>,
        interval: Duration,
        backoff: Vec<Duration>,
        app_consistent: Option<(Quiesce, Duration)>,
    ) -> Self {
        let disks = shippers.iter().filter_map(|s| s.disk().cloned()).collect();
        Self {
            disks,
            shippers,
            interval,
            backoff,
            app_consistent,
            last_app: None,
            quiesce: Arc::default(),
            fenced: Arc::default(),
        }
    }

    /// Shares the fence flag: set to the newer epoch once a replica refuses
    /// this side's (see [`Self::run`]).
    pub fn with_fence(mut self, fenced: Arc<AtomicU64>) -> Self {
        self.fenced = fenced;
        self
    }

    /// Shares what becomes of the application-consistent points.
    pub fn with_quiesce_status(mut self, status: Arc<Mutex<QuiesceStatus>>) -> Self {
        self.quiesce = status;
        self
    }

    pub fn shippers(&self) -> &[Arc<Shipper>] {
        &self.shippers
    }

    /// Cuts every disk (quiesced when due), then ships them all.
    pub async fn cycle_once(&mut self) -> CycleReport {
        let mut report = CycleReport::default();
        // No new freeze while an earlier one may still hold the guest.
        let thawed = self.retry_thaw().await;
        let due = self
            .app_consistent
            .clone()
            .filter(|(_, every)| thawed && self.last_app.is_none_or(|t| t.elapsed() >= *every))
            .map(|(q, _)| q);
        let (frozen, to_thaw) = match &due {
            Some(q) => match q.freeze().await {
                Ok(()) => (true, true),
                Err(e) => {
                    tracing::warn!(error = %e, "freeze failed: this point is crash-consistent only");
                    report.quiesce_error = Some(e.to_string());
                    (false, e.reached_guest())
                }
            },
            None => (false, false),
        };
        let disks = self.disks.clone();
        let rotations =
            tokio::task::spawn_blocking(move || disks.iter().map(|d| d.rotate(frozen)).collect::<Vec<_>>())
                .await
                .expect("rotation does not panic");
        // After any freeze that may have reached the guest, even a failed one.
        let mut thaw_failed = false;
        if let Some(q) = due.as_ref().filter(|_| to_thaw)
            && let Err(e) = q.thaw().await
        {
            tracing::error!(error = %e, "thaw failed: the guest may still be frozen; retrying every cycle");
            report.quiesce_error.get_or_insert(format!("thaw failed, retried every cycle: {e}"));
            thaw_failed = true;
        }
        if due.is_some() {
            self.last_app = Some(Instant::now());
            let mut st = self.quiesce.lock().expect("not poisoned");
            let now = crate::replica::now_ms();
            if to_thaw {
                st.thaw_pending = thaw_failed;
            }
            match &report.quiesce_error {
                Some(e) => (st.error, st.error_unix_ms) = (e.clone(), now),
                None => (st.error, st.error_unix_ms) = (String::new(), 0),
            }
            if frozen {
                st.last_point_unix_ms = now;
            }
        }
        report.app_consistent = frozen;
        for (disk, rotation) in self.disks.clone().into_iter().zip(rotations) {
            let finished = match rotation {
                Ok(Some(r)) => {
                    tokio::task::spawn_blocking(move || disk.finish(r).map(|_| ())).await.expect("no panic")
                }
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            };
            if let Err(e) = finished {
                report.errors.push(e.to_string());
            }
        }
        let results: Vec<Result<u64, ShipError>> =
            futures::future::join_all(self.shippers.iter().map(|s| s.sync_once())).await;
        for e in results.into_iter().filter_map(|r| r.err()) {
            if let ShipError::StaleEpoch { current, .. } = e {
                report.stale_epoch = Some(report.stale_epoch.unwrap_or(0).max(current));
            }
            report.errors.push(e.to_string());
        }
        report
    }

    /// A thaw that failed after a freeze reached the guest, tried again;
    /// whether none is pending any more.
    async fn retry_thaw(&mut self) -> bool {
        let pending = self.quiesce.lock().expect("not poisoned").thaw_pending;
        let Some((q, _)) = self.app_consistent.as_ref().filter(|_| pending) else { return true };
        match q.thaw().await {
            Ok(()) => {
                tracing::info!("thawed the guest after an earlier thaw failed");
                self.quiesce.lock().expect("not poisoned").thaw_pending = false;
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "thaw failed again: the guest may still be frozen");
                false
            }
        }
    }

    /// Runs cycles until `stop` fires. Cycles start an interval apart, start
    /// to start: a cycle that took longer than the interval (a large segment
    /// to ship) is followed at once, not an interval later, so the lag stays
    /// near the interval while the pipeline keeps up. Writes go on into the
    /// next segment while one is shipped.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) -> Self {
        let mut failures = 0usize;
        let mut next_start = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next_start.into()) => {}
                _ = stop.changed() => return self,
            }
            let started = Instant::now();
            let report = self.cycle_once().await;
            if let Some(epoch) = report.stale_epoch.filter(|_| !self.disks.is_empty()) {
                // A newer primary of this VM exists: every write from now on
                // would diverge from it and could never replicate. Fence.
                for d in &self.disks {
                    d.make_read_only();
                }
                self.fenced.store(epoch, Ordering::Release);
                tracing::error!(
                    epoch,
                    "fenced: the replica is at a newer epoch (the VM was failed over); the disks are read-only \
                     and replication stops here"
                );
                return self;
            }
            if report.errors.is_empty() {
                failures = 0;
                next_start = started + self.interval;
            } else {
                // After a failure the back-off counts from the failure.
                let wait = self.backoff[failures.min(self.backoff.len().saturating_sub(1))];
                next_start = Instant::now() + wait;
                failures += 1;
                tracing::warn!(errors = ?report.errors, retry_in = ?wait, "replication cycle failed");
            }
        }
    }
}
