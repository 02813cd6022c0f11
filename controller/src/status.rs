//! Status vocabulary every reconciler shares: the controller's field managers
//! (failover and extended replication each have their own), server-side
//! apply, the names of states and health, and which changes are worth a
//! write and an Event. Writing a VMReplication's status is
//! `vmreplication::write`'s.

use kube::{
    Api,
    runtime::events::{Event, EventType},
};
use vmreplica_crds::{Health, ReplicationState, VMReplicationStatus};

use crate::Error;

/// How a health detail about a failed application-consistent point starts
/// (each new one is also an Event).
pub const QUIESCE_FAILED: &str = "The guest could not be quiesced for an application-consistent point";

/// The field manager of everything the controller writes, but for the two below.
pub const MANAGER: &str = "vmreplica-controller";
/// The field manager of `status.lastFailover`.
pub const FAILOVER_MANAGER: &str = "vmreplica-controller-failover";
/// The field manager of `status.extendedReplication`.
pub const EXTENDED_MANAGER: &str = "vmreplica-controller-extended";

/// Server-side applies `status` to object `name` as field manager `manager`,
/// taking over fields other managers held (the controller owns status).
pub async fn apply_status<K>(
    api: &Api<K>,
    name: &str,
    manager: &str,
    status: &impl k8s_openapi::serde::Serialize,
) -> Result<(), Error>
where
    K: kube::Resource<DynamicType = ()> + Clone + k8s_openapi::serde::de::DeserializeOwned + std::fmt::Debug,
{
    let patch =
        serde_json::json!({"apiVersion": K::api_version(&()), "kind": K::kind(&()), "status": status});
    let pp = kube::api::PatchParams::apply(manager).force();
    api.patch_status(name, &pp, &kube::api::Patch::Apply(&patch)).await.map_err(Error::write("status"))?;
    Ok(())
}

pub fn state_name(s: ReplicationState) -> &'static str {
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

pub fn health_name(h: Health) -> &'static str {
    match h {
        Health::Normal => "Normal",
        Health::Warning => "Warning",
        Health::Critical => "Critical",
    }
}

/// Event notes are limited to 1 kB.
pub fn truncate(mut s: String) -> String {
    if s.len() > 1000 {
        let mut cut = 1000;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// An Event with `note`, of `action`.
pub fn event(type_: EventType, reason: &str, action: &str, note: String) -> Event {
    Event { type_, reason: reason.into(), note: Some(truncate(note)), action: action.into(), secondary: None }
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
        let type_ =
            if next.state == ReplicationState::Error { EventType::Warning } else { EventType::Normal };
        let note = format!("{} -> {}{why}", state_name(previous.state), state_name(next.state));
        events.push(event(type_, state_name(next.state), "Replicate", note));
    }
    if previous.health != next.health {
        let details = if next.health_details.is_empty() {
            "all health rules pass".into()
        } else {
            next.health_details.join(" ")
        };
        let type_ = if next.health == Health::Normal { EventType::Normal } else { EventType::Warning };
        let note =
            format!("health {} -> {}: {details}", health_name(previous.health), health_name(next.health));
        events.push(event(type_, &format!("Health{}", health_name(next.health)), "Monitor", note));
    }
    for d in next.health_details.iter().filter(|d| d.starts_with(QUIESCE_FAILED)) {
        if !previous.health_details.contains(d) {
            events.push(event(EventType::Warning, "QuiesceFailed", "Quiesce", d.clone()));
        }
    }
    events
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
