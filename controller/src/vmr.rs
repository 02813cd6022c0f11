//! VMReplication, primary side: the object asks the agent on its node to
//! protect and replicate the VM's disks, and its status reports what the agent
//! measures (Measure-VMReplication).
//!
//! ```text
//!  observe: the object, agent Leases, Control.GetStatus
//!  decide:  agent_spec(), choose_agent(), state(), health()     (pure)
//!  act:     Control.EnableReplication (idempotent by uid + generation)
//!  report:  status (server-side apply, only when changed), Events on every
//!           state and health change
//!  delete:  the finalizer calls Control.RemoveReplication first
//! ```
//! The controller never writes `spec`.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{
    Api, Resource, ResourceExt,
    runtime::{
        Controller,
        controller::Action,
        events::{Event, EventType, Recorder},
        finalizer::{Event as Finalizing, finalizer},
        watcher,
    },
};
use vmreplica_api::{
    control::{
        DiskSpec, EnableReply, FailureKind, GetStatusRequest, PrimaryDisk, RemoveRequest, VmReplicationSpec,
        control_client::ControlClient,
    },
    tls::channel,
};
use vmreplica_crds::{
    Health, Progress, ReplicationServer, ReplicationState, ReplicationStatistics, Role, VMReplication,
    VMReplicationStatus,
};

use crate::{
    agents::{Agent, discover},
    conditions,
    site::MANAGER,
};

/// Most VMReplications reconciled at once.
pub const CONCURRENCY: u16 = 32;

/// Removes replication from the agent before the object goes.
pub const FINALIZER: &str = "vmreplica.io/replication";

pub use crate::Error;

/// What the VMReplication reconciler needs.
pub struct Context {
    pub site: Arc<crate::site::Context>,
    pub recorder: Recorder,
    /// How often a steady replication is read again; its status is written at
    /// most this often. Unsettled states are read every few seconds.
    pub poll: Duration,
    /// Reconcile only this namespace's objects (all namespaces when `None`).
    pub namespace: Option<String>,
    windows: Mutex<HashMap<String, Baseline>>,
    samples: Mutex<HashMap<String, (i64, u64)>>,
    /// When each object's status was last written (by uid).
    written: Mutex<HashMap<String, std::time::Instant>>,
    /// Control API channels by agent endpoint.
    channels: Mutex<HashMap<String, tonic::transport::Channel>>,
}

impl Context {
    pub fn new(site: Arc<crate::site::Context>, poll: Duration, namespace: Option<String>) -> Arc<Self> {
        let reporter = kube::runtime::events::Reporter {
            controller: MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Arc::new(Self {
            recorder: Recorder::new(site.client.clone(), reporter),
            site,
            poll,
            namespace,
            windows: Mutex::default(),
            samples: Mutex::default(),
            written: Mutex::default(),
            channels: Mutex::default(),
        })
    }
}

impl Context {
    /// Whether to write `next` over `previous`: any change of state, health,
    /// conditions or the like at once; moving counters at most once per poll.
    pub fn should_write(
        &self,
        uid: &str,
        previous: &VMReplicationStatus,
        next: &VMReplicationStatus,
    ) -> bool {
        let due = self
            .written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(uid)
            .is_none_or(|t| t.elapsed() >= self.poll);
        next != previous && (due || settled_change(previous, next))
    }

    /// Writes `status` (all but lastFailover, which belongs to the failover
    /// field manager), records the write, and emits an Event for each state
    /// and health change since `previous`.
    pub async fn write_status(
        &self,
        vmr: &VMReplication,
        previous: &VMReplicationStatus,
        status: &VMReplicationStatus,
    ) -> Result<(), Error> {
        let api =
            Api::<VMReplication>::namespaced(self.site.client.clone(), &vmr.namespace().unwrap_or_default());
        // Fields with managers of their own (failover, extended replication).
        let owned = VMReplicationStatus { last_failover: None, extended_replication: None, ..status.clone() };
        crate::apply_status(&api, &vmr.name_any(), MANAGER, &owned).await?;
        let uid = vmr.uid().unwrap_or_default();
        self.wrote(&uid);
        for e in transitions(previous, status) {
            self.publish(vmr, e).await;
        }
        Ok(())
    }

    /// The site's agents, as their Leases say now.
    pub async fn agents(&self) -> Result<Vec<Agent>, Error> {
        discover(&self.site.client, &self.site.agents_namespace, (self.site.now)()).await.map_err(Error::Read)
    }

    /// The agent that serves `vmr`'s disks, or why there is none.
    pub async fn agent_for(&self, vmr: &VMReplication) -> Result<Result<Agent, String>, Error> {
        Ok(choose_agent(vmr, &self.agents().await?).cloned())
    }

    /// Emits an Event about `vmr`; a failure to do so is only logged.
    pub async fn publish(&self, vmr: &VMReplication, e: Event) {
        if let Err(err) = self.recorder.publish(&e, &vmr.object_ref(&())).await {
            tracing::warn!(error = %err, "publishing an Event");
        }
    }

    /// Records a status write.
    pub fn wrote(&self, uid: &str) {
        self.written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uid.to_owned(), std::time::Instant::now());
    }
}

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
    if initial.method != vmreplica_crds::InitialReplicationMethod::Network {
        return Err(format!(
            "initialReplication.method {:?} is not supported yet: use Network (the initial copy goes over the \
             replication connection, sparse-aware)",
            initial.method
        ));
    }
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
    })
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
    /// Kind and message of a disk's last failure, when its last cycle failed.
    pub failure: Option<(FailureKind, String)>,
    /// The agent fenced the VM: a newer epoch of it exists (0: not fenced).
    pub fenced_epoch: u64,
    /// The epoch the disks ship under (the newest promotion that made this
    /// node the VM's primary).
    pub epoch: u64,
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
    Enabled(VmView),
}

/// The replication state for what was observed.
pub fn state(suspended: bool, outcome: &Outcome, previous: ReplicationState) -> ReplicationState {
    use ReplicationState::*;
    match outcome {
        Outcome::Invalid { .. } => Error,
        Outcome::AgentUnavailable(_) => previous,
        Outcome::Enabled(v) if v.fenced_epoch > 0 || refused_by_replica(v).is_some() => Error,
        Outcome::Enabled(v) if v.resync_required => WaitingForStartResynchronize,
        Outcome::Enabled(_) if suspended => Suspended,
        Outcome::Enabled(v) if v.disks > 0 && v.replicated == v.disks => Replicating,
        Outcome::Enabled(v) if v.copy_done > 0 || v.errors > 0 => WaitingForInitialReplication,
        Outcome::Enabled(_) => ReadyForInitialReplication,
    }
}

/// Counters at the start of the current monitoring window.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Baseline {
    pub window_start_ms: i64,
    pub successful: u64,
    pub missed: u64,
    pub errors: u64,
    pub segments: u64,
    pub raw_bytes: u64,
    pub latency_total_ms: u64,
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
                v.failure.as_ref().filter(|(kind, _)| *kind == FailureKind::TlsRefused)
            {
                critical.push(format!("Replication fails at the TLS handshake, disk by disk: {m}"));
            } else if let Some(m) = refused_by_replica(v) {
                critical.push(format!(
                    "The replica server refused this primary ({m}); on the replica site, add an \
                     AuthorizationEntry whose allowedPrimaryServer matches this agent's certificate name"
                ));
            } else if v.resync_required {
                critical.push(
                    "Resynchronisation is required: the log could not keep the replica up to date".into(),
                );
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

fn lag(v: &VmView, now_ms: i64) -> Option<Duration> {
    v.last_replication_ms.map(|t| Duration::from_millis((now_ms - t).max(0) as u64))
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

/// Lag as status shows it: coarse, so that a caught-up replication does not
/// rewrite status every pass.
pub fn lag_text(lag: Duration) -> String {
    if lag < Duration::from_secs(60) { "<1m".into() } else { humanize(lag) }
}

/// Calls the agent's control API with a deadline.
pub(crate) async fn control<T>(
    agent: &Agent,
    ctx: &Context,
    call: impl AsyncFnOnce(ControlClient<tonic::transport::Channel>) -> Result<T, tonic::Status>,
) -> Result<T, String> {
    if !agent.live {
        return Err(format!(
            "the agent on node {} is not running (its Lease expired); check the agent's pod",
            agent.node
        ));
    }
    let Some(endpoint) = &agent.control_endpoint else {
        return Err(format!("the agent on node {} announces no control endpoint", agent.node));
    };
    let host = endpoint.rsplit_once(':').map_or(endpoint.as_str(), |(h, _)| h);
    // One channel per agent, reused: a TLS handshake per call would dominate
    // a reconcile. The channel reconnects by itself after a break.
    let cached = ctx.channels.lock().unwrap_or_else(|p| p.into_inner()).get(endpoint).cloned();
    let ch = match cached {
        Some(ch) => ch,
        None => {
            let ch = channel(endpoint, host, &ctx.site.tls).map_err(|e| e.to_string())?;
            ctx.channels.lock().unwrap_or_else(|p| p.into_inner()).insert(endpoint.clone(), ch.clone());
            ch
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), call(ControlClient::new(ch))).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(s)) => Err(format!("the agent on node {} at {endpoint}: {}", agent.node, s.message())),
        Err(_) => Err(format!("the agent on node {} at {endpoint} did not answer within 10s", agent.node)),
    }
}

/// Asks the agent to protect the VM and reads back what it measures.
async fn observe(vmr: &VMReplication, ctx: &Context) -> Result<(Outcome, Option<Agent>), Error> {
    let spec = match agent_spec(vmr) {
        Ok(s) => s,
        Err(message) => return Ok((Outcome::Invalid { reason: "InvalidSpec", message }, None)),
    };
    let agent = match ctx.agent_for(vmr).await? {
        Ok(a) => a,
        Err(message) => return Ok((Outcome::Invalid { reason: "NoAgent", message }, None)),
    };
    let outcome = enable_and_read(&agent, &spec, ctx).await;
    Ok((outcome, Some(agent)))
}

async fn enable_and_read(agent: &Agent, spec: &VmReplicationSpec, ctx: &Context) -> Outcome {
    let enabled =
        control(agent, ctx, async |mut c| c.enable_replication(spec.clone()).await.map(|r| r.into_inner()))
            .await;
    match enabled {
        Err(why) => return Outcome::AgentUnavailable(why),
        Ok(EnableReply { accepted: false, message, .. }) => {
            return Outcome::Invalid {
                reason: "AgentRefused",
                message: format!("the agent on node {} refused: {message}", agent.node),
            };
        }
        Ok(_) => {}
    }
    match control(agent, ctx, async |mut c| c.get_status(GetStatusRequest {}).await.map(|r| r.into_inner()))
        .await
    {
        Err(why) => Outcome::AgentUnavailable(why),
        Ok(status) => {
            let mut v = view(&spec.vm_id, &status.primaries);
            v.fenced_epoch = status
                .vms
                .iter()
                .filter(|m| m.vm_id == spec.vm_id)
                .map(|m| m.fenced_epoch)
                .max()
                .unwrap_or(0);
            Outcome::Enabled(v)
        }
    }
}

/// The monitoring settings of the ReplicationServer that selects the VM's
/// agent (Hyper-V's are per host); the defaults when none does.
async fn monitoring(ctx: &Context, agent: Option<&Agent>) -> Result<(Duration, u32, Duration), Error> {
    let servers = Api::<ReplicationServer>::all(ctx.site.client.clone())
        .list(&Default::default())
        .await
        .map_err(Error::Read)?;
    let rs = agent.and_then(|a| servers.items.iter().find(|rs| crate::site::selects(rs, a)));
    let interval = rs
        .and_then(|r| parse_interval(&r.spec.monitoring_interval))
        .unwrap_or(Duration::from_secs(12 * 3600));
    let start = rs.and_then(|r| parse_time_of_day(&r.spec.monitoring_start_time)).unwrap_or(9 * 60);
    let lag = rs.map_or(3600, |r| u64::from(r.spec.lag_warning_threshold_seconds));
    Ok((interval, start, Duration::from_secs(lag)))
}

/// The status for an observation; `previous` keeps transition times.
fn build_status(
    vmr: &VMReplication,
    ctx: &Context,
    outcome: &Outcome,
    monitoring: (Duration, u32, Duration),
) -> VMReplicationStatus {
    let previous = vmr.status.clone().unwrap_or_default();
    let now = (ctx.site.now)();
    let now_ms = now.as_millisecond();
    let uid = vmr.uid().unwrap_or_default();
    let state = state(vmr.spec.suspended, outcome, previous.state);
    let (interval, start_of_day, lag_warning) = monitoring;
    let window_start_ms = window_start(now_ms, interval, start_of_day);
    let window = match outcome {
        Outcome::Enabled(v) => {
            let mut windows = ctx.windows.lock().unwrap_or_else(|p| p.into_inner());
            let b = windows.entry(uid.clone()).or_insert(Baseline { window_start_ms, ..Default::default() });
            if b.window_start_ms != window_start_ms {
                *b = Baseline {
                    window_start_ms,
                    successful: v.successful,
                    missed: v.missed,
                    errors: v.errors,
                    segments: v.segments,
                    raw_bytes: v.raw_bytes,
                    latency_total_ms: v.latency_total_ms,
                };
            }
            in_window(v, b)
        }
        _ => Baseline { window_start_ms, ..Default::default() },
    };
    let since_ms = vmr.metadata.creation_timestamp.as_ref().map_or(now_ms, |t| t.0.as_millisecond());
    let frequency = Duration::from_secs(u64::from(vmr.spec.replication_frequency_seconds.max(1)));
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
        ..Default::default()
    };
    if let Outcome::Enabled(v) = outcome {
        let ts = |ms: i64| Timestamp::from_millisecond(ms).ok().map(Time);
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
        if state == ReplicationState::WaitingForInitialReplication {
            let mut samples = ctx.samples.lock().unwrap_or_else(|p| p.into_inner());
            let rate = match samples.insert(uid.clone(), (now_ms, v.copy_done)) {
                Some((t, done)) if now_ms > t && v.copy_done >= done => {
                    (v.copy_done - done) * 1000 / (now_ms - t) as u64
                }
                _ => previous.progress.as_ref().map_or(0, |p| p.bytes_per_second),
            };
            let left = v.copy_total.saturating_sub(v.copy_done);
            status.progress = Some(Progress {
                operation: "InitialReplication".into(),
                bytes_done: v.copy_done,
                bytes_total: v.copy_total,
                bytes_per_second: rate,
                eta: (rate > 0).then(|| ts(now_ms + (left / rate * 1000) as i64)).flatten(),
            });
        } else {
            ctx.samples.lock().unwrap_or_else(|p| p.into_inner()).remove(&uid);
        }
    }
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
    conditions::set(
        &mut conds,
        &previous.conditions,
        conditions::Update { type_: "Ready", status: ready, reason, message },
        generation,
        now,
    );
    let replicating = state == ReplicationState::Replicating;
    conditions::set(
        &mut conds,
        &previous.conditions,
        conditions::Update {
            type_: "Replicating",
            status: replicating,
            reason: if replicating { "Replicating" } else { state_name(state) },
            message: if replicating {
                "logs reach the replica at the replication frequency".into()
            } else {
                format!("state is {}", state_name(state))
            },
        },
        generation,
        now,
    );
    let degraded = status.health != Health::Normal;
    conditions::set(
        &mut conds,
        &previous.conditions,
        conditions::Update {
            type_: "Degraded",
            status: degraded,
            reason: if degraded { health_name(status.health) } else { "Normal" },
            message: if degraded { status.health_details.join(" ") } else { "all health rules pass".into() },
        },
        generation,
        now,
    );
    status.conditions = conds;
    status
}

fn state_name(s: ReplicationState) -> &'static str {
    use ReplicationState::*;
    match s {
        NotEnabled => "NotEnabled",
        ReadyForInitialReplication => "ReadyForInitialReplication",
        WaitingForInitialReplication => "WaitingForInitialReplication",
        Replicating => "Replicating",
        SyncedReplicationComplete => "SyncedReplicationComplete",
        FailOverWaitingCompletion => "FailOverWaitingCompletion",
        FailedOver => "FailedOver",
        Suspended => "Suspended",
        Error => "Error",
        WaitingForStartResynchronize => "WaitingForStartResynchronize",
        Resynchronizing => "Resynchronizing",
        ResynchronizeSuspended => "ResynchronizeSuspended",
    }
}

fn health_name(h: Health) -> &'static str {
    match h {
        Health::Normal => "Normal",
        Health::Warning => "Warning",
        Health::Critical => "Critical",
    }
}

/// The Events a status change is worth: one per state transition and one per
/// health change.
pub fn transitions(previous: &VMReplicationStatus, next: &VMReplicationStatus) -> Vec<Event> {
    let mut events = Vec::new();
    if previous.state != next.state {
        let why = next
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready" && c.status == "False")
            .map(|c| format!(": {}", c.message))
            .unwrap_or_default();
        events.push(Event {
            type_: if next.state == ReplicationState::Error { EventType::Warning } else { EventType::Normal },
            reason: state_name(next.state).into(),
            note: Some(truncate(format!(
                "{} -> {}{why}",
                state_name(previous.state),
                state_name(next.state)
            ))),
            action: "Replicate".into(),
            secondary: None,
        });
    }
    if previous.health != next.health {
        let details = if next.health_details.is_empty() {
            "all health rules pass".into()
        } else {
            next.health_details.join(" ")
        };
        events.push(Event {
            type_: if next.health == Health::Normal { EventType::Normal } else { EventType::Warning },
            reason: format!("Health{}", health_name(next.health)),
            note: Some(truncate(format!(
                "health {} -> {}: {details}",
                health_name(previous.health),
                health_name(next.health)
            ))),
            action: "Monitor".into(),
            secondary: None,
        });
    }
    events
}

/// Event notes are limited to 1 kB.
fn truncate(mut s: String) -> String {
    if s.len() > 1000 {
        let mut cut = 1000;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

async fn apply(vmr: Arc<VMReplication>, ctx: Arc<Context>) -> Result<Action, Error> {
    if vmr.spec.role != Role::Primary {
        // Replica objects' status comes from the replica-site report
        // (replicas.rs); here only their failover requests are carried out.
        crate::failover::reconcile_test(&vmr, &ctx).await?;
        if crate::failover::planned_back(&vmr, &ctx).await? {
            return Ok(Action::requeue(ctx.poll));
        }
        if let Some(again) = crate::failover::planned_replica(&vmr, &ctx).await? {
            return Ok(Action::requeue(again));
        }
        if let Some(again) = crate::failover::unplanned_replica(&vmr, &ctx).await? {
            return Ok(Action::requeue(again));
        }
        let serving = crate::failover::keep_serving(&vmr, &ctx).await?;
        let extended = crate::extended::reconcile(&vmr, &ctx).await?;
        return Ok(match serving.into_iter().chain(extended).min() {
            Some(again) => Action::requeue(again),
            None => Action::await_change(),
        });
    }
    if let Some(held) = planned_failover(&vmr, &ctx).await? {
        return Ok(held);
    }
    let (outcome, agent) = observe(&vmr, &ctx).await?;
    if let Outcome::Enabled(v) = &outcome
        && v.fenced_epoch > 0
    {
        fence(&vmr, &ctx, v.fenced_epoch).await?;
    }
    let status = build_status(&vmr, &ctx, &outcome, monitoring(&ctx, agent.as_ref()).await?);
    let previous = vmr.status.clone().unwrap_or_default();
    if ctx.should_write(&vmr.uid().unwrap_or_default(), &previous, &status) {
        ctx.write_status(&vmr, &previous, &status).await?;
    }
    let (shipped, lag_seconds) = match &outcome {
        Outcome::Enabled(v) => {
            (v.raw_bytes, lag(v, (ctx.site.now)().as_millisecond()).map(|l| l.as_secs_f64()))
        }
        _ => (0, None),
    };
    ctx.site.metrics.vm(crate::telemetry::VmReport {
        vm: &vm_id(&vmr),
        state: state_name(status.state),
        health: health_name(status.health),
        health_level: status.health as i64,
        bytes_shipped: shipped,
        lag_seconds,
    });
    let settled = matches!(status.state, ReplicationState::Replicating | ReplicationState::Suspended)
        && status.health == Health::Normal;
    Ok(Action::requeue(if settled { ctx.poll } else { ctx.poll.min(Duration::from_secs(5)) }))
}

/// The agent fenced the VM (its disks are read-only): its VM is stopped
/// through the power runtime, with an Event the first time.
async fn fence(vmr: &VMReplication, ctx: &Context, epoch: u64) -> Result<(), Error> {
    use crate::power::{Power, PowerState, VmPower};
    let power = VmPower::for_vmr(ctx.site.client.clone(), vmr);
    let running =
        !matches!(power.state().await.map_err(Error::Read)?, PowerState::Stopped | PowerState::Missing);
    if running {
        power.set_running(false).await.map_err(Error::Read)?;
    }
    let already = vmr
        .status
        .as_ref()
        .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready" && c.reason == "Fenced"));
    if !already || running {
        let e = Event {
            type_: EventType::Warning,
            reason: "Fenced".into(),
            note: Some(truncate(fenced_text(epoch))),
            action: "Fence".into(),
            secondary: None,
        };
        ctx.publish(vmr, e).await;
    }
    Ok(())
}

async fn cleanup(vmr: Arc<VMReplication>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.site.metrics.forget_vm(&vm_id(&vmr));
    let uid = vmr.uid().unwrap_or_default();
    ctx.windows.lock().unwrap_or_else(|p| p.into_inner()).remove(&uid);
    ctx.samples.lock().unwrap_or_else(|p| p.into_inner()).remove(&uid);
    ctx.written.lock().unwrap_or_else(|p| p.into_inner()).remove(&uid);
    if vmr.spec.role != Role::Primary {
        return remove_replica(&vmr, &ctx).await;
    }
    let Ok(agent) = ctx.agent_for(&vmr).await? else {
        // No agent was ever chosen, or its node is gone with its Lease: nothing to remove.
        return Ok(Action::await_change());
    };
    if !agent.live {
        let note = format!(
            "the agent on node {} is not running: replication is forgotten here, and its log stays on that node until the agent removes it",
            agent.node
        );
        let e = Event {
            type_: EventType::Warning,
            reason: "RemovedWithoutAgent".into(),
            note: Some(note),
            action: "Remove".into(),
            secondary: None,
        };
        ctx.publish(&vmr, e).await;
        return Ok(Action::await_change());
    }
    let req = RemoveRequest { vm_id: vm_id(&vmr), uid };
    control(&agent, &ctx, async |mut c| c.remove_replication(req.clone()).await.map(|r| r.into_inner()))
        .await
        .map_err(|message| Error::Remove { node: agent.node.clone(), message })?;
    Ok(Action::await_change())
}

/// A planned failover on the primary: once it governs the VM, its state is
/// reported instead of replicating.
async fn planned_failover(vmr: &VMReplication, ctx: &Context) -> Result<Option<Action>, Error> {
    use crate::failover::{PlannedPrimary, planned_primary};
    let governs =
        vmr.spec.failover.as_ref().is_some_and(|f| f.failover_type == vmreplica_crds::FailoverType::Planned)
            || vmr.status.as_ref().and_then(|s| s.last_failover.as_ref()).is_some_and(|l| {
                l.failover_type == vmreplica_crds::FailoverType::Planned
                    && l.phase == vmreplica_crds::FailoverPhase::Completed
            });
    if !governs {
        return Ok(None);
    }
    let Ok(agent) = ctx.agent_for(vmr).await? else { return Ok(None) };
    // Replication reversed onto this side: it is the VM's replica now (the
    // replica-site report shows it), or it is taking the VM back.
    if let Some((_, disks)) =
        crate::failover::locate(vmr, ctx).await?.filter(|(_, d)| d.iter().any(|d| d.reverse))
    {
        let taken_back = disks.iter().all(|d| d.promoted)
            && vmr
                .status
                .as_ref()
                .and_then(|s| s.last_failover.as_ref())
                .is_some_and(|l| l.took_over && l.phase == vmreplica_crds::FailoverPhase::Completed);
        if !taken_back {
            if let Some(again) = crate::failover::planned_replica(vmr, ctx).await? {
                return Ok(Some(Action::requeue(again)));
            }
            return Ok(Some(Action::requeue(ctx.poll)));
        }
    }
    let PlannedPrimary::Holds(state, last) = planned_primary(vmr, ctx, &agent, &vm_id(vmr)).await? else {
        return Ok(None);
    };
    let previous = vmr.status.clone().unwrap_or_default();
    let now = (ctx.site.now)();
    let done = last.phase == vmreplica_crds::FailoverPhase::Completed;
    let mut status = VMReplicationStatus {
        observed_generation: vmr.metadata.generation,
        state,
        health: if done { Health::Normal } else { Health::Critical },
        health_details: if done {
            Vec::new()
        } else {
            vec![format!("Planned failover failed: {}", last.message.clone().unwrap_or_default())]
        },
        last_failover: None,
        lag: None,
        progress: None,
        ..previous.clone()
    };
    let message = last.message.clone().unwrap_or_default();
    conditions::set(
        &mut status.conditions,
        &previous.conditions,
        conditions::Update {
            type_: "Replicating",
            status: false,
            reason: if done { "PlannedFailover" } else { "PlannedFailoverFailed" },
            message: message.clone(),
        },
        vmr.metadata.generation,
        now,
    );
    conditions::set(
        &mut status.conditions,
        &previous.conditions,
        conditions::Update {
            type_: "Degraded",
            status: !done,
            reason: if done { "Normal" } else { "Critical" },
            message,
        },
        vmr.metadata.generation,
        now,
    );
    if status != (VMReplicationStatus { last_failover: None, ..previous.clone() }) {
        ctx.write_status(vmr, &previous, &status).await?;
    }
    Ok(Some(Action::requeue(ctx.poll)))
}

/// A Replica object goes: its test VM and disks are deleted and the replica
/// agent stops accepting the primary (the disks and points stay). With no
/// agent holding the VM (already gone), there is nothing more to remove.
async fn remove_replica(vmr: &VMReplication, ctx: &Context) -> Result<Action, Error> {
    crate::failover::delete_test_vms(vmr, ctx).await?;
    let Some((agent, disks)) = crate::failover::locate(vmr, ctx).await? else {
        return Ok(Action::await_change());
    };
    if let Err(why) = crate::failover::delete_copies(vmr, ctx).await? {
        return Err(Error::Agent(format!("deleting test disks: {why}")));
    }
    for d in &disks {
        let req = vmreplica_api::control::RemoveReplicaRequest {
            vm_id: d.vm_id.clone(),
            disk_id: d.disk_id.clone(),
        };
        control(&agent, ctx, async |mut c| c.remove_replica(req.clone()).await.map(|r| r.into_inner()))
            .await
            .map_err(|message| Error::Remove { node: agent.node.clone(), message })?;
    }
    Ok(Action::await_change())
}

/// Reconciles one VMReplication, recording it in the metrics.
#[tracing::instrument(skip_all, fields(namespace = vmr.namespace().unwrap_or_default(), name = %vmr.name_any()))]
pub async fn reconcile(vmr: Arc<VMReplication>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let api = Api::<VMReplication>::namespaced(ctx.site.client.clone(), &vmr.namespace().unwrap_or_default());
    let c = ctx.clone();
    let result = finalizer(&api, FINALIZER, vmr, |event| async move {
        match event {
            Finalizing::Apply(o) => apply(o, c).await,
            Finalizing::Cleanup(o) => cleanup(o, c).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    });
    let class = result.as_ref().err().map(Error::class);
    ctx.site.metrics.observe("VMReplication", started, class);
    result
}

fn error_policy(_vmr: Arc<VMReplication>, e: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(error = %e, "reconciling a VMReplication failed");
    Action::requeue(Duration::from_secs(5))
}

/// Runs the VMReplication controller until `shutdown` completes.
pub async fn run(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static) {
    let api = match &ctx.namespace {
        Some(ns) => Api::<VMReplication>::namespaced(ctx.site.client.clone(), ns),
        None => Api::<VMReplication>::all(ctx.site.client.clone()),
    };
    // Bounded concurrency: a thousand objects arriving at once queue here
    // instead of all contending for the apiserver and the agents together.
    Controller::new(api, watcher::Config::default())
        .with_config(kube::runtime::controller::Config::default().concurrency(CONCURRENCY))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(crate::log_result)
        .await;
}

/// Whether `next` differs from `previous` in more than the counters that move
/// at every cycle (last replication time, lag, statistics, pending bytes,
/// progress, recovery points): those are written at most once per poll interval.
pub fn settled_change(previous: &VMReplicationStatus, next: &VMReplicationStatus) -> bool {
    let strip = |s: &VMReplicationStatus| VMReplicationStatus {
        last_replication_time: None,
        lag: None,
        statistics: None,
        pending_replication_bytes: 0,
        progress: None,
        recovery_points: Vec::new(),
        ..s.clone()
    };
    strip(previous) != strip(next)
}

#[cfg(test)]
mod tests;
