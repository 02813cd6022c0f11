//! Extended replication (A→B→C), on the Replica object at site B, decided.
//!
//! ```text
//!  spec.extendedReplica {replicaServer, replicationFrequencySeconds}
//!    ─▶ not more often than the primary replicates (else Error, nothing asked)
//!    ─▶ Control.ExtendReplication on the agent holding the replicas
//!    ─▶ status.extendedReplication from the agent's forwarding shippers
//!  field removed ─▶ ExtendReplication {remove} (the third site keeps its disks)
//!  a failover to this site ─▶ the promotion forwards what was kept and stops it;
//!    a planned one without reverse then replicates to the third site from here
//!    ("resume"; after an unplanned one, by resync), one with reverse leaves the
//!    third site orphaned, as in Hyper-V
//! ```
//! `status.extendedReplication` is written under its own field manager, so
//! the replica-site report never overwrites it. Pure: the act layer asks the
//! agent and writes.

use std::time::Duration;

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::ResourceExt;
use vmreplica_api::control::{ExtendRequest, FailureKind, PrimaryDisk};
use vmreplica_crds::{
    ExtendedReplicationStatus, FailoverPhase, FailoverType, ReplicationState, Role, VMReplication,
};

use super::{failover::extended_server, observe::Located};

/// After a refusal, ask again this much later.
pub const RETRY: Duration = Duration::from_secs(30);

/// The next step of `status.extendedReplication`.
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    /// Nothing to do.
    Idle,
    /// Write this (`None`: remove it) and look again after `again`.
    Write { next: Option<ExtendedReplicationStatus>, again: Option<Duration> },
    /// Ask the agent to stop forwarding `vm_id`, then remove the status.
    Remove { vm_id: String },
    /// Ask the agent to forward; accepted: write `accepted` and look again
    /// after `again`; refused: an Error status, asked again after [`RETRY`].
    Extend { req: ExtendRequest, accepted: ExtendedReplicationStatus, again: Duration },
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

/// An Error status about forwarding to `to`.
pub fn refused(to: &str, message: String) -> ExtendedReplicationStatus {
    ExtendedReplicationStatus {
        replica_server: to.to_owned(),
        state: ReplicationState::Error,
        message: Some(message),
        ..Default::default()
    }
}

/// Where `vmr`'s extended replication goes next, from the replicas this
/// site's agent holds (`replica`).
pub fn plan(vmr: &VMReplication, replica: Option<&Located>, poll: Duration) -> Plan {
    let last = vmr.status.as_ref().and_then(|s| s.last_failover.as_ref());
    let failed_over = last.is_some_and(|l| {
        l.took_over
            || l.phase == FailoverPhase::WaitingCompletion
            || l.failover_type == FailoverType::Unplanned && l.phase == FailoverPhase::Completed
    });
    let failing_over = vmr.spec.failover.as_ref().is_some_and(|f| f.failover_type != FailoverType::Test);
    let previous = vmr.status.as_ref().and_then(|s| s.extended_replication.clone());
    if failed_over || failing_over {
        // The promotion forwarded what was kept and stopped forwarding; the
        // failover's own status says where the VM replicates to now.
        let (true, Some(p), Some(to)) = (failed_over, previous, extended_server(vmr)) else {
            return Plan::Idle;
        };
        let resumed = last.and_then(|l| l.reversed_to.as_deref()) == Some(to.as_str());
        let message = if resumed {
            "the VM runs here and replicates to the extended replica from here (resumed after the failover)"
        } else {
            "stopped by the failover: the extended replica keeps its disks and receives nothing more (orphaned)"
        };
        let state = if resumed { ReplicationState::Replicating } else { ReplicationState::NotEnabled };
        let next = ExtendedReplicationStatus { state, message: Some(message.into()), ..p };
        return Plan::Write { next: Some(next), again: None };
    }
    let Some(want) = vmr.spec.extended_replica.as_ref() else {
        return match (previous, replica) {
            (None, _) => Plan::Idle,
            (Some(_), Some(loc)) => Plan::Remove { vm_id: loc.vm_id().to_owned() },
            (Some(_), None) => Plan::Write { next: None, again: None },
        };
    };
    let to = extended_server(vmr).unwrap_or_default();
    if let Some(why) = invalid(vmr, 0) {
        return Plan::Write { next: Some(refused(&to, why)), again: None };
    }
    let Some(loc) = replica else {
        return Plan::Write {
            next: Some(refused(&to, "no live replica agent holds this VM".into())),
            again: Some(RETRY),
        };
    };
    let disks = &loc.status.replicas;
    let primary_interval = disks.iter().map(|d| d.primary_interval_seconds).max().unwrap_or(0);
    if let Some(why) = invalid(vmr, primary_interval) {
        return Plan::Write { next: Some(refused(&to, why)), again: None };
    }
    let req = ExtendRequest {
        vm_id: loc.vm_id().to_owned(),
        uid: vmr.uid().unwrap_or_default(),
        generation: vmr.metadata.generation.unwrap_or(0),
        replica_address: to.clone(),
        interval_seconds: want.replication_frequency_seconds,
        compression: vmr.spec.compression_enabled,
        history_window_seconds: u64::from(want.recovery_history.continuous_window_seconds),
        history_hourly_points: want.recovery_history.hourly_recovery_points,
        remove: false,
    };
    // As the agent reported it when it was located (a request it just took
    // for the first time shows as waiting for the initial copy until the next look).
    let shippers: Vec<&PrimaryDisk> = loc.status.extended.iter().filter(|d| d.vm_id == req.vm_id).collect();
    let settled = !shippers.is_empty() && shippers.iter().all(|d| d.successful_cycles > 0);
    let again = if settled { poll } else { poll.min(Duration::from_secs(5)) };
    Plan::Extend { accepted: status_of(&to, &shippers), req, again }
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

    #[test]
    fn a_removed_field_stops_forwarding_where_the_replica_is_and_clears_status() {
        let mut vmr = replica(30, 30);
        vmr.spec.extended_replica = None;
        assert_eq!(plan(&vmr, None, Duration::from_secs(30)), Plan::Idle);
        vmr.status = Some(vmreplica_crds::VMReplicationStatus {
            extended_replication: Some(refused("c:1", "x".into())),
            ..Default::default()
        });
        assert_eq!(plan(&vmr, None, Duration::from_secs(30)), Plan::Write { next: None, again: None });
    }

    #[test]
    fn without_a_replica_agent_the_status_says_so_and_it_asks_again() {
        let vmr = replica(30, 30);
        let Plan::Write { next: Some(s), again } = plan(&vmr, None, Duration::from_secs(30)) else {
            panic!()
        };
        assert_eq!(s.state, ReplicationState::Error);
        assert_eq!(s.message.as_deref(), Some("no live replica agent holds this VM"));
        assert_eq!(again, Some(RETRY));
    }
}
