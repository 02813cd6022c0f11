//! Extended replication (A→B→C), on the Replica object at site B.
//!
//! ```text
//!  spec.extendedReplica {replicaServer, replicationFrequencySeconds}
//!    ─▶ not more often than the primary replicates (else Error, nothing asked)
//!    ─▶ Control.ExtendReplication on the agent holding the replicas
//!    ─▶ status.extendedReplication from the agent's forwarding shippers
//!  field removed ─▶ ExtendReplication {remove} (the third site keeps its disks)
//!  a failover to this site ─▶ the promotion forwards what was kept and stops it;
//!    a planned one without reverse then replicates to the third site from here
//!    ("resume"), one with reverse leaves the third site orphaned, as in Hyper-V
//! ```
//! `status.extendedReplication` is written under its own field manager, so
//! the replica-site report never overwrites it.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::{
    Api, ResourceExt,
    runtime::events::{Event, EventType},
};
use vmreplica_api::control::{ExtendRequest, FailureKind, PrimaryDisk};
use vmreplica_crds::{
    ExtendedReplicationStatus, FailoverPhase, FailoverType, ReplicationState, Role, VMReplication,
};

use crate::{
    Error,
    vmr::{Context, control},
};

/// The field manager of `status.extendedReplication`.
pub const EXTENDED_MANAGER: &str = "vmreplica-controller-extended";

/// After a refusal, ask again this much later.
const RETRY: Duration = Duration::from_secs(30);

/// The server address of `spec.extendedReplica`.
pub fn server(vmr: &VMReplication) -> Option<String> {
    vmr.spec.extended_replica.as_ref().map(|e| format!("{}:{}", e.replica_server.name, e.replica_server.port))
}

/// Why `vmr`'s extended replication cannot be asked for, given the
/// primary's interval as the replica last heard it (0: unknown).
pub fn invalid(vmr: &VMReplication, primary_interval: u32) -> Option<String> {
    let e = vmr.spec.extended_replica.as_ref()?;
    if vmr.spec.role != Role::Replica {
        return Some(
            "spec.extendedReplica is for Replica objects: only a replica forwards to a third site".into(),
        );
    }
    // What the primary said wins over the object's own frequency.
    let primary =
        if primary_interval > 0 { primary_interval } else { vmr.spec.replication_frequency_seconds };
    (e.replication_frequency_seconds < primary).then(|| {
        format!(
            "spec.extendedReplica.replicationFrequencySeconds ({}) is shorter than the primary's interval ({primary}s): \
             a replica cannot forward more often than it receives; set at least {primary}",
            e.replication_frequency_seconds
        )
    })
}

/// The status of forwarding `shippers` (one per disk) to `to`.
pub fn status_of(to: &str, shippers: &[&PrimaryDisk]) -> ExtendedReplicationStatus {
    let error = shippers.iter().find(|d| !d.last_error.is_empty());
    let state = match error {
        Some(d) if d.failure_kind() == FailureKind::ResyncRequired => {
            ReplicationState::WaitingForStartResynchronize
        }
        Some(_) => ReplicationState::Error,
        None if !shippers.is_empty() && shippers.iter().all(|d| d.successful_cycles > 0) => {
            ReplicationState::Replicating
        }
        None => ReplicationState::WaitingForInitialReplication,
    };
    // The VM is as current as its least current disk.
    let last = shippers.iter().map(|d| d.last_replication_unix_ms).min().filter(|&ms| ms > 0);
    ExtendedReplicationStatus {
        replica_server: to.to_owned(),
        state,
        message: error.map(|d| format!("disk {}: {}", d.disk_id, d.last_error)),
        last_replication_time: last.and_then(|ms| Timestamp::from_millisecond(ms as i64).ok()).map(Time),
        pending_replication_bytes: shippers.iter().map(|d| d.pending_bytes).sum(),
    }
}

async fn write(
    vmr: &VMReplication,
    ctx: &Context,
    next: Option<ExtendedReplicationStatus>,
) -> Result<(), Error> {
    let previous = vmr.status.as_ref().and_then(|s| s.extended_replication.clone());
    if previous == next {
        return Ok(());
    }
    if let Some(n) = next.as_ref().filter(|n| previous.as_ref().is_none_or(|p| p.state != n.state)) {
        let (type_, reason) = match n.state {
            ReplicationState::Replicating => (EventType::Normal, "ExtendedReplicating"),
            ReplicationState::WaitingForInitialReplication => {
                (EventType::Normal, "ExtendedReplicationStarted")
            }
            ReplicationState::NotEnabled => (EventType::Normal, "ExtendedReplicationStopped"),
            _ => (EventType::Warning, "ExtendedReplicationError"),
        };
        let note = n.message.clone().unwrap_or_else(|| format!("to {}", n.replica_server));
        let e = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Extend".into(),
            secondary: None,
        };
        ctx.publish(vmr, e).await;
    }
    let api = Api::<VMReplication>::namespaced(ctx.site.client.clone(), &vmr.namespace().unwrap_or_default());
    let body = match &next {
        Some(n) => serde_json::json!({ "extendedReplication": n }),
        None => serde_json::json!({}),
    };
    crate::apply_status(&api, &vmr.name_any(), EXTENDED_MANAGER, &body).await
}

/// Brings `vmr`'s extended replication where its spec says; when to look
/// again (`None`: on the next change).
pub async fn reconcile(vmr: &VMReplication, ctx: &Context) -> Result<Option<Duration>, Error> {
    let last = vmr.status.as_ref().and_then(|s| s.last_failover.as_ref());
    let failed_over = last.is_some_and(|l| l.took_over || l.phase == FailoverPhase::WaitingCompletion);
    let failing_over = vmr.spec.failover.as_ref().is_some_and(|f| f.failover_type != FailoverType::Test);
    let previous = vmr.status.as_ref().and_then(|s| s.extended_replication.clone());
    if failed_over || failing_over {
        // The promotion forwarded what was kept and stopped forwarding; the
        // failover's own status says where the VM replicates to now.
        if let (true, Some(p), Some(to)) = (failed_over, previous, server(vmr)) {
            let resumed = last.and_then(|l| l.reversed_to.as_deref()) == Some(to.as_str());
            let message = if resumed {
                "the VM runs here and replicates to the extended replica from here (resumed after the failover)"
            } else {
                "stopped by the failover: the extended replica keeps its disks and receives nothing more (orphaned)"
            };
            let state = if resumed { ReplicationState::Replicating } else { ReplicationState::NotEnabled };
            let next = ExtendedReplicationStatus { state, message: Some(message.into()), ..p };
            write(vmr, ctx, Some(next)).await?;
        }
        return Ok(None);
    }
    let Some(want) = vmr.spec.extended_replica.as_ref() else {
        if previous.is_some() {
            if let Some((agent, disks)) = crate::failover::locate(vmr, ctx).await? {
                let req = ExtendRequest { vm_id: disks[0].vm_id.clone(), remove: true, ..Default::default() };
                let reply = control(&agent, ctx, async |mut c| {
                    c.extend_replication(req.clone()).await.map(|r| r.into_inner())
                })
                .await
                .map_err(Error::Agent)?;
                if !reply.accepted {
                    return Err(Error::Agent(reply.message));
                }
            }
            write(vmr, ctx, None).await?;
        }
        return Ok(None);
    };
    let to = server(vmr).expect("set");
    let refused = |message: String| ExtendedReplicationStatus {
        replica_server: to.clone(),
        state: ReplicationState::Error,
        message: Some(message),
        ..Default::default()
    };
    if let Some(why) = invalid(vmr, 0) {
        write(vmr, ctx, Some(refused(why))).await?;
        return Ok(None);
    }
    let Some((agent, reported)) = crate::failover::located(vmr, ctx).await? else {
        write(vmr, ctx, Some(refused("no live replica agent holds this VM".into()))).await?;
        return Ok(Some(RETRY));
    };
    let disks = &reported.replicas;
    let primary_interval = disks.iter().map(|d| d.primary_interval_seconds).max().unwrap_or(0);
    if let Some(why) = invalid(vmr, primary_interval) {
        write(vmr, ctx, Some(refused(why))).await?;
        return Ok(None);
    }
    let req = ExtendRequest {
        vm_id: disks[0].vm_id.clone(),
        uid: vmr.uid().unwrap_or_default(),
        generation: vmr.metadata.generation.unwrap_or(0),
        replica_address: to.clone(),
        interval_seconds: want.replication_frequency_seconds,
        compression: vmr.spec.compression_enabled,
        history_window_seconds: u64::from(want.recovery_history.continuous_window_seconds),
        history_hourly_points: want.recovery_history.hourly_recovery_points,
        remove: false,
    };
    let reply =
        control(&agent, ctx, async |mut c| c.extend_replication(req.clone()).await.map(|r| r.into_inner()))
            .await
            .map_err(Error::Agent)?;
    if !reply.accepted {
        write(vmr, ctx, Some(refused(reply.message))).await?;
        return Ok(Some(RETRY));
    }
    // As the agent reported it when it was located (a request it just took
    // for the first time shows as waiting for the initial copy until the next look).
    let shippers: Vec<&PrimaryDisk> = reported.extended.iter().filter(|d| d.vm_id == req.vm_id).collect();
    write(vmr, ctx, Some(status_of(&to, &shippers))).await?;
    let settled = !shippers.is_empty() && shippers.iter().all(|d| d.successful_cycles > 0);
    Ok(Some(if settled { ctx.poll } else { ctx.poll.min(Duration::from_secs(5)) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(freq: u32, extended: u32) -> VMReplication {
        let spec = serde_json::json!({"role": "Replica", "disks": [{"name": "root", "path": "/d/root.img"}],
            "replicationFrequencySeconds": freq,
            "extendedReplica": {"replicaServer": {"name": "c.example.com", "port": 9443},
                                "replicationFrequencySeconds": extended}});
        VMReplication::new("app", serde_json::from_value(spec).unwrap())
    }

    #[test]
    fn forwarding_more_often_than_the_primary_replicates_is_refused() {
        assert_eq!(invalid(&replica(30, 30), 0), None);
        assert_eq!(invalid(&replica(30, 300), 30), None);
        let why = invalid(&replica(30, 15), 0).unwrap();
        assert!(why.contains("(15)") && why.contains("(30s)") && why.contains("at least 30"), "{why}");
        // What the primary said wins over the object's own (hand-written) frequency.
        let why = invalid(&replica(30, 60), 300).unwrap();
        assert!(why.contains("(300s)"), "{why}");
        let mut primary = replica(30, 30);
        primary.spec.role = Role::Primary;
        assert!(invalid(&primary, 0).unwrap().contains("Replica objects"));
    }

    #[test]
    fn forwarding_state_follows_the_agents_shippers() {
        let disk = |cycles, kind: FailureKind, err: &str, ms| PrimaryDisk {
            disk_id: "root".into(),
            successful_cycles: cycles,
            failure_kind: kind as i32,
            last_error: err.into(),
            last_replication_unix_ms: ms,
            pending_bytes: 10,
            ..Default::default()
        };
        let ok = [
            disk(2, FailureKind::Unspecified, "", 1_800_000_000_000),
            disk(1, FailureKind::Unspecified, "", 1_800_000_001_000),
        ];
        let s = status_of("c:1", &ok.iter().collect::<Vec<_>>());
        assert_eq!(s.state, ReplicationState::Replicating);
        assert_eq!(s.pending_replication_bytes, 20);
        assert_eq!(s.last_replication_time.unwrap().0.as_millisecond(), 1_800_000_000_000);
        let copying = [disk(0, FailureKind::Unspecified, "", 0)];
        assert_eq!(
            status_of("c:1", &copying.iter().collect::<Vec<_>>()).state,
            ReplicationState::WaitingForInitialReplication
        );
        let diverged = [disk(3, FailureKind::ResyncRequired, "another history", 5)];
        let s = status_of("c:1", &diverged.iter().collect::<Vec<_>>());
        assert_eq!(s.state, ReplicationState::WaitingForStartResynchronize);
        assert_eq!(s.message.as_deref(), Some("disk root: another history"));
        let refused = [disk(3, FailureKind::RefusedPermission, "not authorised", 5)];
        assert_eq!(status_of("c:1", &refused.iter().collect::<Vec<_>>()).state, ReplicationState::Error);
    }
}
