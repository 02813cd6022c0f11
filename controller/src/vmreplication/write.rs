//! Writing a VMReplication's status: its own part at once when state,
//! health or conditions change and its moving counters at most once per
//! poll, with an Event per state and health transition; `lastFailover` and
//! `extendedReplication` under their own field managers, so the replica-site
//! report never overwrites them.

use kube::{Api, ResourceExt, runtime::events::EventType};
use vmreplica_crds::{
    ExtendedReplicationStatus, FailoverStatus, ReplicationState, VMReplication, VMReplicationStatus,
};

use crate::{
    Error,
    context::Context,
    status::{EXTENDED_MANAGER, FAILOVER_MANAGER, MANAGER, apply_status, event, settled_change, transitions},
};

fn vmrs(ctx: &Context, vmr: &VMReplication) -> Api<VMReplication> {
    Api::namespaced(ctx.site.client.clone(), &vmr.namespace().unwrap_or_default())
}

/// Writes `status` when it is worth it (any change of state, health,
/// conditions or the like at once; moving counters at most once per poll),
/// all but the fields other managers own, and emits an Event for each state
/// and health change since `previous`.
pub async fn write(ctx: &Context, vmr: &VMReplication, status: &VMReplicationStatus) -> Result<(), Error> {
    let previous = vmr.status.clone().unwrap_or_default();
    let uid = vmr.uid().unwrap_or_default();
    let due = !ctx.written_recently(&uid);
    if *status == previous || !(due || settled_change(&previous, status)) {
        return Ok(());
    }
    let owned = VMReplicationStatus { last_failover: None, extended_replication: None, ..status.clone() };
    apply_status(&vmrs(ctx, vmr), &vmr.name_any(), MANAGER, &owned).await?;
    ctx.wrote(&uid);
    for e in transitions(&previous, status) {
        ctx.publish(vmr, e).await;
    }
    Ok(())
}

/// Writes `status.lastFailover` (and, with `epoch`, the epoch it moved the
/// VM to, in the same update: whoever waits for Completed reads both).
pub async fn write_failover(
    ctx: &Context,
    vmr: &VMReplication,
    last: &FailoverStatus,
    epoch: Option<u64>,
) -> Result<(), Error> {
    let body = match epoch {
        Some(e) => serde_json::json!({"lastFailover": last, "epoch": e}),
        None => serde_json::json!({"lastFailover": last}),
    };
    apply_status(&vmrs(ctx, vmr), &vmr.name_any(), FAILOVER_MANAGER, &body).await
}

/// Writes `status.extendedReplication` when it changed, with an Event when
/// its state did.
pub async fn write_extended(
    ctx: &Context,
    vmr: &VMReplication,
    next: Option<&ExtendedReplicationStatus>,
) -> Result<(), Error> {
    let previous = vmr.status.as_ref().and_then(|s| s.extended_replication.as_ref());
    if previous == next {
        return Ok(());
    }
    if let Some(n) = next.filter(|n| previous.is_none_or(|p| p.state != n.state)) {
        let (type_, reason) = match n.state {
            ReplicationState::Replicating => (EventType::Normal, "ExtendedReplicating"),
            ReplicationState::WaitingForInitialReplication => {
                (EventType::Normal, "ExtendedReplicationStarted")
            }
            ReplicationState::NotEnabled => (EventType::Normal, "ExtendedReplicationStopped"),
            _ => (EventType::Warning, "ExtendedReplicationError"),
        };
        let note = n.message.clone().unwrap_or_else(|| format!("to {}", n.replica_server));
        ctx.publish(vmr, event(type_, reason, "Extend", note)).await;
    }
    let body = match next {
        Some(n) => serde_json::json!({ "extendedReplication": n }),
        None => serde_json::json!({}),
    };
    apply_status(&vmrs(ctx, vmr), &vmr.name_any(), EXTENDED_MANAGER, &body).await
}
