//! VMReplication, primary role, decided: what to ask the agent for
//! (`agent_spec`), which agent (`choose_agent`), what its report means
//! (`view`, `state`, `health`) and the status that says so (`build_status`).
//! Pure: no apiserver, no agent; the clock and the in-memory monitoring
//! window come in as values, so every rule is unit-tested.

use std::time::Duration;

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::ResourceExt;
use vmreplica_api::control::{AgentStatus, DiskSpec, FailureKind, PrimaryDisk, VmReplicationSpec};
use vmreplica_crds::{
    FailoverPhase, FailoverStatus, Health, Progress, ReplicationState, ReplicationStatistics,
    ResynchronizationStatus, VMReplication, VMReplicationStatus, VerificationStatus,
};

use super::monitoring::{Monitoring, humanize, humanize_bytes, lag_text};
pub use crate::context::Baseline;
use crate::{
    agents::Agent,
    conditions,
    status::{QUIESCE_FAILED, health_name, state_name},
};

/// The agent's id of the VM: `<namespace>.<name>` (a namespace has no dots).
pub fn vm_id(vmr: &VMReplication) -> String {
    format!("{}.{}", vmr.namespace().unwrap_or_default(), vmr.name_any())
}

/// What to ask the agent for; the error says what to fix in the spec.
pub fn agent_spec(vmr: &VMReplication) -> Result<VmReplicationSpec, String> {
    let Some(rs) = &vmr.spec.replica_server else {
        return Err("spec.replicaServer is required for role Primary: name the replica site's server".into());
    };
    let initial = &vmr.spec.initial_replication;
    let history = &vmr.spec.recovery_history;
    let quiesce = history.quiesce.as_ref();
    use vmreplica_crds::InitialReplicationMethod as Method;
    let directory = match (initial.method, &initial.directory) {
        (Method::ExternalMedia, None) => {
            return Err(
                "initialReplication.method ExternalMedia needs initialReplication.directory: where the \
                        primary's agent writes the export on its node"
                    .into(),
            );
        }
        (Method::ExternalMedia, Some(d)) => d.clone(),
        _ => String::new(),
    };
    Ok(VmReplicationSpec {
        vm_id: vm_id(vmr),
        uid: vmr.uid().unwrap_or_default(),
        generation: vmr.metadata.generation.unwrap_or(0),
        disks: vmr
            .spec
            .disks
            .iter()
            .map(|d| DiskSpec { name: d.name.clone(), path: d.path.clone() })
            .collect(),
        replica_address: format!("{}:{}", rs.name, rs.port),
        interval_seconds: vmr.spec.replication_frequency_seconds,
        compression: vmr.spec.compression_enabled,
        suspended: vmr.spec.suspended,
        initial_replication_at_unix_ms: initial
            .start_time
            .as_ref()
            .map_or(0, |t| t.0.as_millisecond().max(0) as u64),
        app_consistent_interval_seconds: history.app_consistent_interval_hours.map_or(0, |h| h * 3600),
        freeze_command: quiesce.map(|q| q.freeze_command.clone()).unwrap_or_default(),
        thaw_command: quiesce.map(|q| q.thaw_command.clone()).unwrap_or_default(),
        guest_agent_socket: quiesce.and_then(|q| q.guest_agent_socket.clone()).unwrap_or_default(),
        history_window_seconds: u64::from(history.continuous_window_seconds),
        history_hourly_points: history.hourly_recovery_points,
        initial_method: format!("{:?}", initial.method),
        initial_directory: directory,
        ..resync_spec(vmr)
    })
}

/// The resync part of the agent's spec: the automatic policy and the
/// request, unless the status says that request was done.
pub fn resync_spec(vmr: &VMReplication) -> VmReplicationSpec {
    let auto = &vmr.spec.automatic_resynchronization;
    let minute = |t: &str| super::monitoring::parse_time_of_day(t).unwrap_or(0);
    let (start, end) = auto.window.as_ref().map_or((0, 0), |w| (minute(&w.start), minute(&w.end)));
    let status = vmr.status.as_ref();
    // A request's id until the status says it was done.
    let pending = |asked: Option<&vmreplica_crds::ResynchronizeRequest>, done: Option<&String>| {
        asked.map(|r| r.id.clone()).filter(|id| Some(id) != done).unwrap_or_default()
    };
    VmReplicationSpec {
        resync_manual_only: !auto.enabled,
        resync_window_start_minute: start,
        resync_window_end_minute: end,
        resync_request_id: pending(
            vmr.spec.resynchronize.as_ref(),
            status.and_then(|s| s.last_resynchronization.as_ref()).map(|r| &r.id),
        ),
        verify_request_id: pending(
            vmr.spec.verify.as_ref(),
            status.and_then(|s| s.last_verification.as_ref()).map(|v| &v.id),
        ),
        ..Default::default()
    }
}

/// The agent that serves this VM's disks.
pub fn choose_agent<'a>(vmr: &VMReplication, agents: &'a [Agent]) -> Result<&'a Agent, String> {
    let protecting: Vec<&Agent> =
        agents.iter().filter(|a| a.capabilities.iter().any(|c| c == "primary")).collect();
    match (&vmr.spec.node, protecting.as_slice()) {
        (Some(node), _) => protecting.iter().find(|a| &a.node == node).copied().ok_or_else(|| {
            format!(
                "no agent that protects VMs announces node {node:?}: check spec.node, and that the agent \
                 there runs with --control-listen and --lease-namespace"
            )
        }),
        (None, [one]) => Ok(one),
        (None, []) => Err("no agent on this site protects VMs: start one with --control-listen and \
                           --lease-namespace"
            .into()),
        (None, many) => Err(format!(
            "{} agents protect VMs on this site: set spec.node to the node whose agent serves the disks",
            many.len()
        )),
    }
}

/// One VM's disks as the agent reports them, summed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VmView {
    pub disks: usize,
    /// Disks whose initial replication finished (a cycle succeeded).
    pub replicated: usize,
    pub successful: u64,
    pub missed: u64,
    pub errors: u64,
    pub segments: u64,
    pub raw_bytes: u64,
    pub max_segment: u64,
    pub latency_total_ms: u64,
    pub pending_bytes: u64,
    /// The oldest of the disks' last replications; `None` until every disk has one.
    pub last_replication_ms: Option<i64>,
    pub copy_done: u64,
    pub copy_total: u64,
    pub resync_required: bool,
    /// A resync running on some disk: summed over the disks.
    pub resyncing: Option<ResyncView>,
    /// Why a needed resync waits (its window, or a request), when one does.
    pub resync_waiting: Option<String>,
    /// The last resync that finished on every disk (the same id on all).
    pub last_resync: Option<ResyncView>,
    /// The last verification that finished on every disk (the same id on all).
    pub last_verify: Option<vmreplica_api::control::VerifyResult>,
    /// Kind and message of a disk's last failure, when its last cycle failed.
    pub failure: Option<(FailureKind, String)>,
    /// The agent fenced the VM: a newer epoch of it exists (0: not fenced).
    pub fenced_epoch: u64,
    /// The epoch the disks ship under (the newest promotion that made this
    /// node the VM's primary).
    pub epoch: u64,
    /// The last application-consistent point could not be quiesced: when
    /// (ms) and why. `None` once a later one was.
    pub quiesce_failed: Option<(i64, String)>,
    /// A thaw failed after a freeze reached the guest: it may be frozen.
    pub thaw_pending: bool,
}

/// A resync of the VM's disks, summed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResyncView {
    pub id: String,
    pub dirty_map: bool,
    pub done: u64,
    pub total: u64,
    pub wire: u64,
    pub data: u64,
    pub changed: u64,
    pub duration_ms: u64,
}

impl ResyncView {
    fn add(&mut self, p: &vmreplica_api::control::ResyncProgress) {
        if self.id.is_empty() {
            self.id = p.id.clone();
        }
        self.dirty_map |= p.dirty_map;
        self.done += p.done_bytes;
        self.total += p.total_bytes;
        self.wire += p.wire_bytes;
        self.data += p.data_bytes;
        self.changed += p.changed_bytes;
        self.duration_ms = self.duration_ms.max(p.duration_ms);
    }
}

pub fn view(vm_id: &str, disks: &[PrimaryDisk]) -> VmView {
    let mine: Vec<&PrimaryDisk> = disks.iter().filter(|d| d.vm_id == vm_id).collect();
    let mut v = VmView { disks: mine.len(), ..Default::default() };
    let mut oldest: Option<i64> = None;
    let mut all_replicated = !mine.is_empty();
    for d in &mine {
        if d.successful_cycles > 0 {
            v.replicated += 1;
        }
        v.successful =
            if v.successful == 0 { d.successful_cycles } else { v.successful.min(d.successful_cycles) };
        v.missed = v.missed.max(d.missed_cycles);
        v.errors += d.errors;
        v.segments += d.segments_sent;
        v.raw_bytes += d.average_segment_bytes * d.segments_sent;
        v.max_segment = v.max_segment.max(d.max_segment_bytes);
        v.latency_total_ms += d.average_latency_ms * d.segments_sent;
        v.pending_bytes += d.pending_bytes;
        // A copy in flight counts what it sent of what it will send (its
        // allocated extents); a finished one counts what it sent.
        if d.copy_total_bytes > 0 {
            v.copy_done += d.copy_sent_bytes;
            v.copy_total += d.copy_total_bytes;
        } else {
            v.copy_done += d.initial_copy_bytes;
            v.copy_total += if d.successful_cycles > 0 { d.initial_copy_bytes } else { d.disk_size };
        }
        v.resync_required |= d.resync_required;
        if let Some(r) = &d.resync {
            v.resyncing.get_or_insert_with(Default::default).add(r);
        }
        if !d.resync_waiting.is_empty() && v.resync_waiting.is_none() {
            v.resync_waiting = Some(format!("disk {}: {}", d.disk_id, d.resync_waiting));
        }
        v.epoch = v.epoch.max(d.epoch);
        if d.last_replication_unix_ms == 0 {
            all_replicated = false;
        } else {
            let t = d.last_replication_unix_ms as i64;
            oldest = Some(oldest.map_or(t, |o| o.min(t)));
        }
        if !d.last_error.is_empty() && v.failure.is_none() {
            v.failure = Some((d.failure_kind(), format!("disk {}: {}", d.disk_id, d.last_error)));
        }
    }
    v.last_replication_ms = oldest.filter(|_| all_replicated);
    // A resync counts as finished for the VM once every disk finished that one.
    let last: Vec<&vmreplica_api::control::ResyncProgress> =
        mine.iter().filter_map(|d| d.last_resync.as_ref()).collect();
    if !last.is_empty() && last.len() == mine.len() && last.iter().all(|r| r.id == last[0].id) {
        let mut total = ResyncView::default();
        for r in last {
            total.add(r);
        }
        v.last_resync = Some(total);
    }
    let verified: Vec<&vmreplica_api::control::VerifyResult> =
        mine.iter().filter_map(|d| d.last_verify.as_ref()).collect();
    if !verified.is_empty() && verified.len() == mine.len() && verified.iter().all(|r| r.id == verified[0].id)
    {
        v.last_verify = Some(verified.iter().fold(
            Default::default(),
            |mut t: vmreplica_api::control::VerifyResult, r| {
                t.id.clone_from(&r.id);
                t.differing_bytes += r.differing_bytes;
                t.in_flight_bytes += r.in_flight_bytes;
                t.compared_bytes += r.compared_bytes;
                t.finished_unix_ms = t.finished_unix_ms.max(r.finished_unix_ms);
                t.duration_ms = t.duration_ms.max(r.duration_ms);
                t
            },
        ));
    }
    v
}

/// A failure the primary cannot retry its way out of: the replica site refused
/// it (not authorised, a bad request, or replication removed over there).
fn refused_by_replica(v: &VmView) -> Option<&str> {
    v.failure
        .as_ref()
        .filter(|(kind, _)| {
            matches!(
                kind,
                FailureKind::RefusedPermission
                    | FailureKind::RefusedRequest
                    | FailureKind::RefusedPrecondition
                    | FailureKind::TlsRefused
                    | FailureKind::StaleEpoch
            )
        })
        .map(|(_, m)| m.as_str())
}

/// What an operator reads about a fenced VM.
pub fn fenced_text(epoch: u64) -> String {
    format!(
        "Fenced: a newer primary of this VM exists (epoch {epoch}, after a failover), so its disks here are \
         read-only and its VM was stopped: writes here could never replicate. Fail the VM back to this site \
         to run it here again"
    )
}

/// What the reconciler found out about the VM.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// The spec cannot be carried out; the message says what to fix.
    Invalid { reason: &'static str, message: String },
    /// The agent is gone or unreachable; replication may still run.
    AgentUnavailable(String),
    /// The agent protects the VM.
    Enabled(Box<VmView>),
}

/// The replication state for what was observed.
pub fn state(suspended: bool, outcome: &Outcome, previous: ReplicationState) -> ReplicationState {
    use ReplicationState::*;
    match outcome {
        Outcome::Invalid { .. } => Error,
        Outcome::AgentUnavailable(_) => previous,
        Outcome::Enabled(v)
            if v.fenced_epoch > 0
                || refused_by_replica(v).is_some()
                || v.failure.as_ref().is_some_and(|(kind, _)| *kind == FailureKind::DiskFaulted) =>
        {
            Error
        }
        Outcome::Enabled(v) if v.resyncing.is_some() => Resynchronizing,
        Outcome::Enabled(v) if v.resync_required && suspended => ResynchronizeSuspended,
        Outcome::Enabled(v) if v.resync_required => WaitingForStartResynchronize,
        Outcome::Enabled(_) if suspended => Suspended,
        Outcome::Enabled(v) if v.disks > 0 && v.replicated == v.disks => Replicating,
        Outcome::Enabled(v) if v.copy_done > 0 || v.errors > 0 => WaitingForInitialReplication,
        Outcome::Enabled(_) => ReadyForInitialReplication,
    }
}

/// The counters within the window: the view minus the baseline (a counter
/// that went backwards means the agent restarted: count from zero).
pub fn in_window(v: &VmView, b: &Baseline) -> Baseline {
    let sub = |now: u64, then: u64| if now >= then { now - then } else { now };
    Baseline {
        window_start_ms: b.window_start_ms,
        successful: sub(v.successful, b.successful),
        missed: sub(v.missed, b.missed),
        errors: sub(v.errors, b.errors),
        segments: sub(v.segments, b.segments),
        raw_bytes: sub(v.raw_bytes, b.raw_bytes),
        latency_total_ms: sub(v.latency_total_ms, b.latency_total_ms),
    }
}

/// What the health rules need besides the observation.
pub struct HealthInput<'a> {
    pub state: ReplicationState,
    pub outcome: &'a Outcome,
    pub window: Baseline,
    pub now_ms: i64,
    /// Since when the VM should have replicated (the object's creation).
    pub since_ms: i64,
    pub frequency: Duration,
    pub lag_warning: Duration,
}

/// Health and the rules that fired (DESIGN.md, "Resources").
pub fn health(h: &HealthInput<'_>) -> (Health, Vec<String>) {
    let mut critical = Vec::new();
    let mut warning = Vec::new();
    match h.outcome {
        Outcome::Invalid { message, .. } => critical.push(format!("Replication is in error: {message}")),
        Outcome::AgentUnavailable(why) => {
            critical.push(format!("Replication cannot be checked or carried out: {why}"))
        }
        Outcome::Enabled(v) => {
            if v.fenced_epoch > 0 {
                critical.push(fenced_text(v.fenced_epoch));
            } else if let Some((_, m)) =
                v.failure.as_ref().filter(|(kind, _)| *kind == FailureKind::DiskFaulted)
            {
                critical.push(format!(
                    "The primary's storage failed under a protected disk ({m}). The VM's writes to that disk \
                     fail and it does not replicate. Repair the storage, then restart the vmreplica agent on \
                     that node: it replays the disk's log onto the image and replication resumes"
                ));
            } else if let Some((_, m)) =
                v.failure.as_ref().filter(|(kind, _)| *kind == FailureKind::TlsRefused)
            {
                critical.push(format!("Replication fails at the TLS handshake, disk by disk: {m}"));
            } else if let Some(m) = refused_by_replica(v) {
                critical.push(format!(
                    "The replica server refused this primary ({m}); on the replica site, add an \
                     AuthorizationEntry whose allowedPrimaryServer matches this agent's certificate name"
                ));
            } else if v.resync_required && v.resyncing.is_none() {
                critical.push(match &v.resync_waiting {
                    Some(why) => format!(
                        "Resynchronisation is required and waiting: {why}. To start it now, set \
                         spec.resynchronize.id to a new value"
                    ),
                    None => {
                        "Resynchronisation is required: the log could not keep the replica up to date; it \
                             starts at the next cycle"
                            .into()
                    }
                });
            } else if let Some(r) = &v.resyncing {
                warning.push(format!(
                    "A resynchronisation ({}) is running: {} of {} compared; the replica is not consistent \
                     until it finishes, its newest recovery point stays recoverable",
                    r.id,
                    humanize_bytes(r.done),
                    humanize_bytes(r.total)
                ));
            } else if let Some((_, m)) =
                v.failure.as_ref().filter(|(kind, _)| *kind == FailureKind::AwaitingInitialCopy)
            {
                warning.push(format!("The initial copy is awaited at the replica site: {m}"));
            } else if let Some((_, m)) = &v.failure {
                let since = v.last_replication_ms.unwrap_or(h.since_ms);
                let failing = Duration::from_millis((h.now_ms - since).max(0) as u64);
                if failing > h.frequency * 10 {
                    critical.push(format!(
                        "No replication cycle has succeeded for {} (ten intervals): {m}. Check that the \
                         replica site's agent is running and reachable",
                        humanize(failing)
                    ));
                }
            }
            if v.thaw_pending {
                critical.push(format!(
                    "The guest may still be frozen: thawing it after an application-consistent point failed \
                     ({}); the agent retries the thaw at every cycle. Check the guest agent in the VM",
                    v.quiesce_failed.as_ref().map_or("no detail", |(_, e)| e.as_str())
                ));
            } else if let Some((at, e)) = &v.quiesce_failed {
                let at = Timestamp::from_millisecond(*at).map_or_else(|_| at.to_string(), |t| t.to_string());
                warning.push(format!(
                    "{QUIESCE_FAILED} at {at}: {e}. That point is crash-consistent; the next attempt comes \
                     after appConsistentIntervalHours"
                ));
            }
            if let Some(r) = v.last_verify.as_ref().filter(|r| r.differing_bytes > 0) {
                warning.push(format!(
                    "The last verification ({}) found {} differing between primary and replica that no write \
                     explains: set spec.resynchronize.id to repair the replica, then spec.verify.id again",
                    r.id,
                    humanize_bytes(r.differing_bytes)
                ));
            }
            let cycles = h.window.successful + h.window.missed;
            if cycles > 0 && h.window.missed * 5 > cycles {
                warning.push(format!(
                    "{} of {cycles} replication cycles in this monitoring window were missed (more than 20%)",
                    h.window.missed
                ));
            }
            if let Some(lag) = lag(v, h.now_ms).filter(|l| *l > h.lag_warning) {
                warning.push(format!(
                    "The replica is {} behind, more than the {} threshold",
                    humanize(lag),
                    humanize(h.lag_warning)
                ));
            }
        }
    }
    if h.state == ReplicationState::Suspended {
        warning
            .push("Replication is suspended (spec.suspended): writes are logged and sent on resume".into());
    }
    if !critical.is_empty() {
        critical.extend(warning);
        (Health::Critical, critical)
    } else if !warning.is_empty() {
        (Health::Warning, warning)
    } else {
        (Health::Normal, Vec::new())
    }
}

pub fn lag(v: &VmView, now_ms: i64) -> Option<Duration> {
    v.last_replication_ms.map(|t| Duration::from_millis((now_ms - t).max(0) as u64))
}

/// Whether the agent must be asked to (re-)enable the VM: it does not
/// protect it for this object at this generation.
pub fn needs_enable(spec: &VmReplicationSpec, status: &AgentStatus) -> bool {
    !status.vms.iter().any(|v| v.vm_id == spec.vm_id && v.uid == spec.uid && v.generation >= spec.generation)
}

/// What one pass read of the VM, and when: the inputs of its status besides
/// the object.
pub struct StatusInputs {
    pub now: Timestamp,
    /// The counters within the current monitoring window.
    pub window: Baseline,
    /// The initial copy's rate since the last look (bytes per second), if known.
    pub rate: Option<u64>,
    pub monitoring: Monitoring,
}

/// The status for an observation; the previous status keeps transition times.
pub fn build_status(vmr: &VMReplication, outcome: &Outcome, input: &StatusInputs) -> VMReplicationStatus {
    let previous = vmr.status.clone().unwrap_or_default();
    let now_ms = input.now.as_millisecond();
    let state = state(vmr.spec.suspended, outcome, previous.state);
    let since_ms = vmr.metadata.creation_timestamp.as_ref().map_or(now_ms, |t| t.0.as_millisecond());
    let frequency = Duration::from_secs(u64::from(vmr.spec.replication_frequency_seconds.max(1)));
    let window = input.window;
    let lag_warning = input.monitoring.lag_warning;
    let (health, health_details) =
        health(&HealthInput { state, outcome, window, now_ms, since_ms, frequency, lag_warning });
    let mut status = VMReplicationStatus {
        observed_generation: vmr.metadata.generation,
        state,
        health,
        health_details,
        // The VM runs here (its points are at the replica site; any shown
        // while replication ran the other way are gone with it).
        primary_server: vmr.spec.node.clone(),
        replica_server: vmr.spec.replica_server.as_ref().map(|r| r.name.clone()),
        epoch: match outcome {
            Outcome::Enabled(v) => previous.epoch.max(v.epoch),
            _ => previous.epoch,
        },
        last_failover: previous.last_failover.clone(),
        extended_replication: previous.extended_replication.clone(),
        // Kept at this site's agent after failing back (written out as a
        // file there): still shown.
        diverged_point: previous.diverged_point.clone(),
        ..Default::default()
    };
    if let Outcome::Enabled(v) = outcome {
        measured(&mut status, v, input, state, &previous);
    }
    status.conditions = conditions_of(vmr, outcome, &status, &previous, input.now);
    status
}

/// The measured part of a status: last replication, lag, statistics over
/// the monitoring window, initial-copy progress.
fn measured(
    status: &mut VMReplicationStatus,
    v: &VmView,
    input: &StatusInputs,
    state: ReplicationState,
    previous: &VMReplicationStatus,
) {
    let now_ms = input.now.as_millisecond();
    let ts = |ms: i64| Timestamp::from_millisecond(ms).ok().map(Time);
    let window = &input.window;
    status.last_replication_time = v.last_replication_ms.and_then(ts);
    status.pending_replication_bytes = v.pending_bytes;
    status.lag = lag(v, now_ms).map(lag_text);
    status.statistics = Some(ReplicationStatistics {
        window_start: ts(window.window_start_ms),
        average_log_size_bytes: window.raw_bytes.checked_div(window.segments).unwrap_or(0),
        maximum_log_size_bytes: v.max_segment,
        average_latency_milliseconds: window.latency_total_ms.checked_div(window.segments).unwrap_or(0),
        errors: window.errors,
        successful_cycles: window.successful,
        missed_cycles: window.missed,
    });
    status.last_resynchronization = last_resynchronization(v, previous, now_ms);
    status.last_verification = match &v.last_verify {
        Some(r) => Some(VerificationStatus {
            id: r.id.clone(),
            completion_time: ts(r.finished_unix_ms as i64),
            differing_bytes: r.differing_bytes,
            in_flight_bytes: r.in_flight_bytes,
            compared_bytes: r.compared_bytes,
            duration_seconds: r.duration_ms / 1000,
        }),
        // An agent restarted since: what was seen stays.
        None => previous.last_verification.clone(),
    };
    // The long operation running: its rate since the last look, else the last one known.
    let progress = |operation: &str, done: u64, total: u64| {
        let rate = input.rate.unwrap_or_else(|| previous.progress.as_ref().map_or(0, |p| p.bytes_per_second));
        let left = total.saturating_sub(done);
        Progress {
            operation: operation.into(),
            bytes_done: done,
            bytes_total: total,
            bytes_per_second: rate,
            eta: (rate > 0).then(|| ts(now_ms + (left / rate * 1000) as i64)).flatten(),
        }
    };
    status.progress = match (state, &v.resyncing) {
        (ReplicationState::Resynchronizing, Some(r)) => Some(progress("Resynchronization", r.done, r.total)),
        (ReplicationState::WaitingForInitialReplication, _) => {
            Some(progress("InitialReplication", v.copy_done, v.copy_total))
        }
        _ => None,
    };
}

/// The last resync that finished on every disk, as status shows it.
pub fn last_resynchronization(
    v: &VmView,
    previous: &VMReplicationStatus,
    now_ms: i64,
) -> Option<ResynchronizationStatus> {
    let ts = |ms: i64| Timestamp::from_millisecond(ms).ok().map(Time);
    match &v.last_resync {
        // The time it was first seen finished stays.
        Some(r) => Some(ResynchronizationStatus {
            id: r.id.clone(),
            completion_time: previous
                .last_resynchronization
                .as_ref()
                .filter(|p| p.id == r.id)
                .and_then(|p| p.completion_time.clone())
                .or_else(|| ts(now_ms)),
            mode: if r.dirty_map { "DirtyMap" } else { "HashTree" }.into(),
            bytes_sent: r.wire,
            data_bytes_sent: r.data,
            bytes_resynchronized: r.changed,
            duration_seconds: r.duration_ms / 1000,
        }),
        // An agent restarted since: what was seen stays.
        None => previous.last_resynchronization.clone(),
    }
}

/// Ready, Replicating and Degraded for the status.
fn conditions_of(
    vmr: &VMReplication,
    outcome: &Outcome,
    status: &VMReplicationStatus,
    previous: &VMReplicationStatus,
    now: Timestamp,
) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    let generation = vmr.metadata.generation;
    let (ready, reason, message) = match outcome {
        Outcome::Invalid { reason, message } => (false, *reason, message.clone()),
        Outcome::AgentUnavailable(why) => (false, "AgentUnavailable", why.clone()),
        Outcome::Enabled(v) if v.fenced_epoch > 0 => (false, "Fenced", fenced_text(v.fenced_epoch)),
        Outcome::Enabled(v) => match refused_by_replica(v) {
            Some(m) if v.failure.as_ref().is_some_and(|(kind, _)| *kind == FailureKind::TlsRefused) => {
                (false, "TlsRefused", m.to_owned())
            }
            Some(m) => (false, "ReplicaRefused", format!("the replica server refused this primary: {m}")),
            None => (true, "Enabled", format!("the agent protects {} disk(s)", v.disks)),
        },
    };
    let mut conds = Vec::new();
    let mut set = |type_, status, reason, message| {
        conditions::set(
            &mut conds,
            &previous.conditions,
            conditions::Update { type_, status, reason, message },
            generation,
            now,
        )
    };
    set("Ready", ready, reason, message);
    let state = status.state;
    let replicating = state == ReplicationState::Replicating;
    let (reason, message) = if replicating {
        ("Replicating", "logs reach the replica at the replication frequency".to_owned())
    } else {
        (state_name(state), format!("state is {}", state_name(state)))
    };
    set("Replicating", replicating, reason, message);
    let degraded = status.health != Health::Normal;
    let (reason, message) = if degraded {
        (health_name(status.health), status.health_details.join(" "))
    } else {
        ("Normal", "all health rules pass".to_owned())
    };
    set("Degraded", degraded, reason, message);
    conds
}

/// The status of a Primary object a planned failover holds (`state`): not
/// replicating, Critical when its part failed.
pub fn held_status(
    vmr: &VMReplication,
    state: ReplicationState,
    last: &FailoverStatus,
    now: Timestamp,
) -> VMReplicationStatus {
    let previous = vmr.status.clone().unwrap_or_default();
    let done = last.phase == FailoverPhase::Completed;
    let message = last.message.clone().unwrap_or_default();
    let mut status = VMReplicationStatus {
        observed_generation: vmr.metadata.generation,
        state,
        health: if done { Health::Normal } else { Health::Critical },
        health_details: if done { Vec::new() } else { vec![format!("Planned failover failed: {message}")] },
        lag: None,
        progress: None,
        ..previous.clone()
    };
    let generation = vmr.metadata.generation;
    let (reason, degraded) =
        if done { ("PlannedFailover", "Normal") } else { ("PlannedFailoverFailed", "Critical") };
    let replicating =
        conditions::Update { type_: "Replicating", status: false, reason, message: message.clone() };
    conditions::set(&mut status.conditions, &previous.conditions, replicating, generation, now);
    let update = conditions::Update { type_: "Degraded", status: !done, reason: degraded, message };
    conditions::set(&mut status.conditions, &previous.conditions, update, generation, now);
    status
}

#[cfg(test)]
#[path = "primary_tests.rs"]
mod tests;
