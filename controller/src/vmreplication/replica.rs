//! VMReplication, replica role, decided: the Replica object of a VM this
//! site's agents receive — which namespace it belongs in (the admitting
//! AuthorizationEntry's), its name, the spec this site gives one it creates,
//! and its status from what the agent holds. Pure.

use std::time::Duration;

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::ResourceExt;
use vmreplica_api::{control::ReplicaDisk, names::matches};
use vmreplica_crds::{
    AuthorizationEntry, FailoverPhase, FailoverType, Health, RecoveryPoint, RecoveryPointKind,
    ReplicationServer, ReplicationState, ReplicationStatistics, VMReplication, VMReplicationSpec,
    VMReplicationStatus,
};

use super::monitoring::{humanize, lag_text};
use crate::{agents::Agent, conditions};

/// Label on Replica objects this controller created: the primary's VM id.
pub const REPLICA_OF: &str = "vmreplica.io/replica-of";

/// Most recovery points listed in status (newest first).
pub const MAX_POINTS: usize = 64;

/// Where the Replica object of `vm_id` belongs: the namespace of the entry
/// that admitted its primary, or the default of a ReplicationServer that
/// selects the agent.
pub fn replica_namespace(
    disk: &ReplicaDisk,
    entries: &[AuthorizationEntry],
    servers: &[ReplicationServer],
    agent: &Agent,
) -> Option<String> {
    admitting_entry(disk, entries).map(|e| e.spec.replica_namespace.clone()).or_else(|| {
        servers
            .iter()
            .filter(|rs| crate::site::selects(rs, agent))
            .find_map(|rs| rs.spec.default_replica_namespace.clone())
    })
}

/// The entry that admitted the replica's primary: same trust group, matching
/// pattern, exact names before wildcards (as the agent matches them).
pub fn admitting_entry<'a>(
    disk: &ReplicaDisk,
    entries: &'a [AuthorizationEntry],
) -> Option<&'a AuthorizationEntry> {
    let mut by_pattern: Vec<&AuthorizationEntry> = entries
        .iter()
        .filter(|e| {
            e.spec.trust_group == disk.trust_group && matches(&e.spec.allowed_primary_server, &disk.primary)
        })
        .collect();
    by_pattern.sort_by_key(|e| (e.spec.allowed_primary_server.starts_with("*."), e.name_any()));
    by_pattern.first().copied()
}

/// The Replica object's name: the primary object's name (`<ns>.<name>` → `<name>`).
pub fn replica_name(vm_id: &str) -> &str {
    vm_id.split_once('.').map_or(vm_id, |(_, name)| name)
}

/// The spec of a Replica object this site creates.
pub fn replica_spec(vm_id: &str, disks: &[&ReplicaDisk], node: &str) -> Result<VMReplicationSpec, String> {
    let primary = disks.first().map(|d| d.primary.clone()).unwrap_or_default();
    serde_json::from_value(serde_json::json!({
        "role": "Replica",
        "node": node,
        "primaryServer": primary,
        "disks": disks.iter().map(|d| serde_json::json!({"name": d.disk_id, "path": d.image_path})).collect::<Vec<_>>(),
    }))
    .map_err(|e| format!("replica of {vm_id}: {e}"))
}

/// Whether the agent holds disks of the VM that `obj`'s spec does not list.
pub fn missing_disks(obj: &VMReplication, disks: &[&ReplicaDisk]) -> bool {
    disks.iter().any(|d| !obj.spec.disks.iter().any(|k| k.name == d.disk_id))
}

/// Where a Replica object's VM stands, from its disks and its last failover.
struct Standing {
    state: ReplicationState,
    /// Promoted here (the VM runs here).
    promoted: bool,
    removed: bool,
    /// Promoted and replicating back (reverse replication), to this server.
    reversed_to: Option<String>,
}

fn standing(previous: &VMReplicationStatus, disks: &[&ReplicaDisk]) -> Standing {
    let removed = disks.iter().all(|d| d.removed);
    let copied = disks.iter().all(|d| d.has_copy);
    let last = previous.last_failover.as_ref();
    let waiting = last.is_some_and(|l| {
        l.failover_type == FailoverType::Unplanned && l.phase == FailoverPhase::WaitingCompletion
    });
    let planned =
        last.filter(|l| l.failover_type == FailoverType::Planned && l.phase == FailoverPhase::Completed);
    let unplanned =
        last.filter(|l| l.failover_type == FailoverType::Unplanned && l.phase == FailoverPhase::Completed);
    let reversed_to = planned.filter(|l| l.took_over).or(unplanned).and_then(|l| l.reversed_to.clone());
    let promoted = disks.iter().all(|d| d.promoted);
    let state = if promoted && reversed_to.is_some() {
        ReplicationState::Replicating
    } else if promoted && planned.is_some_and(|l| !l.took_over) {
        // Failed back: stopped here, every write shipped to the other side.
        ReplicationState::SyncedReplicationComplete
    } else if promoted {
        ReplicationState::FailedOver
    } else if waiting {
        ReplicationState::FailOverWaitingCompletion
    } else if removed {
        ReplicationState::NotEnabled
    } else if !copied {
        ReplicationState::WaitingForInitialReplication
    } else {
        ReplicationState::Replicating
    };
    Standing { state, promoted, removed, reversed_to }
}

/// When the VM last replicated: its newest applied segment, or — for an idle
/// VM, which sends no segments but opens every cycle — the primary's last
/// contact when nothing is pending.
fn last_replicated(disks: &[&ReplicaDisk]) -> Option<u64> {
    disks
        .iter()
        .map(|d| {
            let caught_up = d.applied_through == d.received_through;
            d.last_applied_sealed_unix_ms.max(if caught_up && d.has_copy {
                d.last_contact_unix_ms
            } else {
                0
            })
        })
        .max()
        .filter(|ms| *ms > 0)
}

/// The newest points, newest first, at most [`MAX_POINTS`]. The VM's disks
/// are cut together each cycle, but a disk that was not written in a cycle
/// makes no point: the disk with the most points is listed.
fn points_of(disks: &[&ReplicaDisk]) -> Vec<RecoveryPoint> {
    let ts = |ms: u64| Timestamp::from_millisecond(ms as i64).ok().map(Time);
    let Some(d) = disks.iter().max_by_key(|d| {
        (d.points.len(), d.points.last().map(|p| p.time_unix_ms), std::cmp::Reverse(d.disk_id.clone()))
    }) else {
        return Vec::new();
    };
    d.points
        .iter()
        .rev()
        .take(MAX_POINTS)
        .filter_map(|p| {
            Some(RecoveryPoint {
                id: p.seq.to_string(),
                time: ts(p.time_unix_ms)?,
                kind: match p.kind.as_str() {
                    "Hourly" => RecoveryPointKind::Hourly,
                    "ApplicationConsistent" => RecoveryPointKind::ApplicationConsistent,
                    _ => RecoveryPointKind::Standard,
                },
                sequence: p.seq,
            })
        })
        .collect()
}

/// The status of a Replica object from its disks on the agent.
pub fn replica_status(
    previous: &VMReplicationStatus,
    disks: &[&ReplicaDisk],
    node: &str,
    generation: Option<i64>,
    now: Timestamp,
    lag_warning: Duration,
) -> VMReplicationStatus {
    let Standing { state, promoted, removed, reversed_to } = standing(previous, disks);
    let ts = |ms: u64| Timestamp::from_millisecond(ms as i64).ok().map(Time);
    let last = last_replicated(disks);
    let segments = disks.iter().map(|d| d.segments_applied).max().unwrap_or(0);
    let (bytes, all_segments): (u64, u64) =
        disks.iter().fold((0, 0), |(b, s), d| (b + d.bytes_applied, s + d.segments_applied));
    let lag = last.map(|ms| Duration::from_millis((now.as_millisecond() - ms as i64).max(0) as u64));
    let mut details = Vec::new();
    if removed {
        details.push("The primary removed replication; this replica's disks stay where they are".into());
    }
    if let Some(l) = lag.filter(|l| *l > lag_warning && !removed) {
        details.push(format!(
            "The replica is {} behind, more than the {} threshold",
            humanize(l),
            humanize(lag_warning)
        ));
    }
    let health = if details.is_empty() || removed { Health::Normal } else { Health::Warning };
    let mut status = VMReplicationStatus {
        observed_generation: generation,
        state,
        health,
        health_details: if health == Health::Normal { Vec::new() } else { details.clone() },
        primary_server: if promoted {
            Some(node.to_owned())
        } else {
            disks.first().map(|d| d.primary.clone())
        },
        replica_server: if promoted { reversed_to.clone() } else { Some(node.to_owned()) },
        last_replication_time: last.and_then(ts),
        lag: lag.filter(|_| !removed && !promoted).map(lag_text),
        statistics: Some(ReplicationStatistics {
            window_start: None,
            average_log_size_bytes: bytes.checked_div(all_segments).unwrap_or(0),
            maximum_log_size_bytes: disks.iter().map(|d| d.max_segment_bytes).max().unwrap_or(0),
            average_latency_milliseconds: 0,
            errors: 0,
            successful_cycles: segments,
            missed_cycles: 0,
        }),
        recovery_points: points_of(disks),
        epoch: disks.iter().map(|d| d.epoch).max().unwrap_or(0),
        last_failover: previous.last_failover.clone(),
        extended_replication: previous.extended_replication.clone(),
        ..Default::default()
    };
    if promoted {
        // The points describe the other direction; the VM's run here now.
        status.recovery_points.clear();
        status.last_replication_time = None;
    }
    status.conditions = replica_conditions(
        &status,
        previous,
        removed,
        promoted,
        reversed_to,
        &details,
        node,
        generation,
        now,
    );
    status
}

/// Ready, Replicating and Degraded of a Replica object.
#[allow(clippy::too_many_arguments)]
fn replica_conditions(
    status: &VMReplicationStatus,
    previous: &VMReplicationStatus,
    removed: bool,
    promoted: bool,
    reversed_to: Option<String>,
    details: &[String],
    node: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    let state = status.state;
    let (reason, message) = match state {
        ReplicationState::FailedOver => {
            ("FailedOver", "this site runs the VM now: the replica was promoted".to_owned())
        }
        ReplicationState::Replicating if promoted => (
            "Reversed",
            format!("this site runs the VM and replicates it back to {}", reversed_to.unwrap_or_default()),
        ),
        ReplicationState::SyncedReplicationComplete => (
            "FailedBack",
            "the VM was stopped here and every write shipped: the other side takes it over".to_owned(),
        ),
        ReplicationState::NotEnabled => ("Removed", details.join(" ")),
        ReplicationState::WaitingForInitialReplication => {
            ("WaitingForInitialCopy", "the initial copy has not completed on every disk".to_owned())
        }
        _ => ("Receiving", format!("node {node} receives and applies the primary's logs")),
    };
    let mut conds = Vec::new();
    let mut set = |type_, ok, reason, message| {
        let update = conditions::Update { type_, status: ok, reason, message };
        conditions::set(&mut conds, &previous.conditions, update, generation, now)
    };
    set("Ready", !removed, reason, message);
    let replicating = state == ReplicationState::Replicating;
    let message = if replicating { "logs arrive and are applied" } else { "no logs are applied" };
    set("Replicating", replicating, if replicating { "Replicating" } else { reason }, message.into());
    let degraded = status.health != Health::Normal;
    let message = if degraded { status.health_details.join(" ") } else { "all health rules pass".into() };
    set("Degraded", degraded, if degraded { "Warning" } else { "Normal" }, message);
    conds
}

#[cfg(test)]
mod tests {
    use vmreplica_api::control::RecoveryPoint as Point;

    use super::*;

    fn entry(name: &str, pattern: &str, group: &str, ns: &str) -> AuthorizationEntry {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "vmreplica.io/v1alpha1", "kind": "AuthorizationEntry", "metadata": {"name": name},
            "spec": {"allowedPrimaryServer": pattern, "trustGroup": group, "replicaStorageLocation": "/r", "replicaNamespace": ns},
        }))
        .unwrap()
    }

    fn disk(primary: &str, group: &str) -> ReplicaDisk {
        ReplicaDisk {
            vm_id: "prod.db".into(),
            disk_id: "root".into(),
            primary: primary.into(),
            trust_group: group.into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_namespace_comes_from_the_admitting_entry() {
        let agent = Agent {
            node: "n".into(),
            control_endpoint: None,
            replication_endpoint: None,
            capabilities: vec![],
            labels: Default::default(),
            live: true,
            server_name: None,
        };
        let entries = [
            entry("wild", "*.a.example.com", "g1", "dr-wild"),
            entry("exact", "h1.a.example.com", "g1", "dr-exact"),
            entry("other", "h1.a.example.com", "g2", "dr-g2"),
        ];
        let ns = |primary, group| replica_namespace(&disk(primary, group), &entries, &[], &agent);
        assert_eq!(ns("h1.a.example.com", "g1").as_deref(), Some("dr-exact"), "exact before wildcard");
        assert_eq!(ns("h2.a.example.com", "g1").as_deref(), Some("dr-wild"));
        assert_eq!(ns("h1.a.example.com", "g2").as_deref(), Some("dr-g2"), "the trust group decides");
        assert_eq!(ns("x.b.example.com", "g1"), None);
        assert_eq!(replica_name("prod.db"), "db");
        assert_eq!(replica_name("legacy-vm"), "legacy-vm");
    }

    #[test]
    fn replica_status_reads_the_disks() {
        let t = Timestamp::from_second(1_000_000).unwrap();
        let mut d = disk("h1.a.example.com", "g1");
        d.has_copy = true;
        d.segments_applied = 4;
        d.bytes_applied = 400;
        d.last_applied_sealed_unix_ms = 999_990_000;
        d.points = (1..=100)
            .map(|i| Point { seq: i, time_unix_ms: 999_000_000 + i, kind: "Standard".into() })
            .collect();
        let s = replica_status(&Default::default(), &[&d], "node-b", Some(1), t, Duration::from_secs(3600));
        assert_eq!(s.state, ReplicationState::Replicating);
        assert_eq!(s.recovery_points.len(), MAX_POINTS, "bounded");
        assert_eq!(s.recovery_points[0].sequence, 100, "newest first");
        assert_eq!(s.statistics.as_ref().unwrap().average_log_size_bytes, 100);
        assert_eq!(s.lag.as_deref(), Some("<1m"));
        let s = replica_status(
            &s,
            &[&d],
            "node-b",
            Some(1),
            Timestamp::from_second(1_010_000).unwrap(),
            Duration::from_secs(3600),
        );
        assert_eq!(s.health, Health::Warning, "behind by more than the threshold");
        let mut idle = d.clone();
        idle.last_contact_unix_ms = 1_009_999_000;
        let later = Timestamp::from_second(1_010_000).unwrap();
        let st = replica_status(&s, &[&idle], "node-b", Some(1), later, Duration::from_secs(3600));
        assert_eq!((st.health, st.lag.as_deref()), (Health::Normal, Some("<1m")), "idle, not behind");
        d.removed = true;
        let s = replica_status(&s, &[&d], "node-b", Some(1), t, Duration::from_secs(3600));
        assert_eq!((s.state, s.health), (ReplicationState::NotEnabled, Health::Normal));
        d.removed = false;
        d.has_copy = false;
        let s = replica_status(&s, &[&d], "node-b", Some(1), t, Duration::from_secs(3600));
        assert_eq!(s.state, ReplicationState::WaitingForInitialReplication);
    }
}
