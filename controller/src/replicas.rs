//! The replica site's side of a VMReplication: every VM whose disks this
//! site's agents receive gets a Replica object, as Hyper-V creates the replica
//! VM, in the namespace its AuthorizationEntry names (or the
//! ReplicationServer's default). A Replica object already declared there
//! under the same name (GitOps) is adopted: its spec is never written. Its
//! status reports what the replica agent holds: state, recovery points,
//! statistics of applied logs, the last replication time and the epoch.
//!
//! ```text
//!  every poll: replica agents' Leases ─▶ Control.GetStatus ─▶ group by VM
//!     ─▶ entry (pattern + trust group) ─▶ namespace ─▶ create or adopt ─▶ status
//! ```

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{
    Api, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
    runtime::events::{Event, EventType},
};
use vmreplica_api::{
    control::{GetStatusRequest, ReplicaDisk},
    names::matches,
};
use vmreplica_crds::{
    AuthorizationEntry, Health, RecoveryPoint, RecoveryPointKind, ReplicationServer, ReplicationState,
    ReplicationStatistics, Role, VMReplication, VMReplicationSpec, VMReplicationStatus,
};

use crate::{
    Error,
    agents::Agent,
    conditions,
    site::MANAGER,
    vmr::{Context, control},
};

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
fn missing_disks(obj: &VMReplication, disks: &[&ReplicaDisk]) -> bool {
    disks.iter().any(|d| !obj.spec.disks.iter().any(|k| k.name == d.disk_id))
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
    let removed = disks.iter().all(|d| d.removed);
    let copied = disks.iter().all(|d| d.has_copy);
    let waiting = previous.last_failover.as_ref().is_some_and(|l| {
        l.failover_type == vmreplica_crds::FailoverType::Unplanned
            && l.phase == vmreplica_crds::FailoverPhase::WaitingCompletion
    });
    let planned = previous.last_failover.as_ref().filter(|l| {
        l.failover_type == vmreplica_crds::FailoverType::Planned
            && l.phase == vmreplica_crds::FailoverPhase::Completed
    });
    // Promoted and replicating back to the old primary (reverse replication).
    let reversed_to = planned.filter(|l| l.took_over).and_then(|l| l.reversed_to.clone());
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
    let ts = |ms: u64| Timestamp::from_millisecond(ms as i64).ok().map(Time);
    // A disk not written in a cycle sends nothing and is still current: the
    // VM's last replication is its newest applied segment, its cycles with
    // data at least the busiest disk's.
    // An idle VM sends no segments but opens every cycle: with nothing
    // pending, that contact counts as a replication too.
    let last = disks
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
        .filter(|ms| *ms > 0);
    let segments = disks.iter().map(|d| d.segments_applied).max().unwrap_or(0);
    let (bytes, all_segments): (u64, u64) =
        disks.iter().fold((0, 0), |(b, s), d| (b + d.bytes_applied, s + d.segments_applied));
    // The VM's disks are cut together each cycle, but a disk that was not
    // written in a cycle makes no point: list the disk with the most points.
    // (Failover will need points keyed by cycle across disks.)
    let mut points: Vec<RecoveryPoint> = disks
        .iter()
        .max_by_key(|d| {
            (d.points.len(), d.points.last().map(|p| p.time_unix_ms), std::cmp::Reverse(d.disk_id.clone()))
        })
        .map(|d| {
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
        })
        .unwrap_or_default();
    points.truncate(MAX_POINTS);
    let lag = last.map(|ms| Duration::from_millis((now.as_millisecond() - ms as i64).max(0) as u64));
    let mut details = Vec::new();
    if removed {
        details.push("The primary removed replication; this replica's disks stay where they are".into());
    }
    if let Some(l) = lag.filter(|l| *l > lag_warning && !removed) {
        details.push(format!(
            "The replica is {} behind, more than the {} threshold",
            crate::vmr::humanize(l),
            crate::vmr::humanize(lag_warning)
        ));
    }
    let health = if details.is_empty() || removed { Health::Normal } else { Health::Warning };
    let health_details = if health == Health::Normal { Vec::new() } else { details.clone() };
    let mut status = VMReplicationStatus {
        observed_generation: generation,
        state,
        health,
        health_details,
        primary_server: if promoted {
            Some(node.to_owned())
        } else {
            disks.first().map(|d| d.primary.clone())
        },
        replica_server: if promoted { reversed_to.clone() } else { Some(node.to_owned()) },
        last_replication_time: last.and_then(ts),
        lag: lag.filter(|_| !removed && !promoted).map(crate::vmr::lag_text),
        statistics: Some(ReplicationStatistics {
            window_start: None,
            average_log_size_bytes: bytes.checked_div(all_segments).unwrap_or(0),
            maximum_log_size_bytes: disks.iter().map(|d| d.max_segment_bytes).max().unwrap_or(0),
            average_latency_milliseconds: 0,
            errors: 0,
            successful_cycles: segments,
            missed_cycles: 0,
        }),
        recovery_points: points,
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
    let (reason, message) = match state {
        ReplicationState::FailedOver => {
            ("FailedOver", "this site runs the VM now: the replica was promoted".to_owned())
        }
        ReplicationState::Replicating if promoted => (
            "Reversed",
            format!(
                "this site runs the VM and replicates it back to {}",
                reversed_to.clone().unwrap_or_default()
            ),
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
    conditions::set(
        &mut status.conditions,
        &previous.conditions,
        conditions::Update { type_: "Ready", status: !removed, reason, message },
        generation,
        now,
    );
    let replicating = state == ReplicationState::Replicating;
    conditions::set(
        &mut status.conditions,
        &previous.conditions,
        conditions::Update {
            type_: "Replicating",
            status: replicating,
            reason: if replicating { "Replicating" } else { reason },
            message: if replicating {
                "logs arrive and are applied".into()
            } else {
                "no logs are applied".into()
            },
        },
        generation,
        now,
    );
    let degraded = health != Health::Normal;
    conditions::set(
        &mut status.conditions,
        &previous.conditions,
        conditions::Update {
            type_: "Degraded",
            status: degraded,
            reason: if degraded { "Warning" } else { "Normal" },
            message: if degraded { status.health_details.join(" ") } else { "all health rules pass".into() },
        },
        generation,
        now,
    );
    status
}

/// One pass over the site's replica agents; the number of Replica objects
/// reported on.
pub async fn sync_once(ctx: &Context) -> Result<usize, Error> {
    let client = ctx.site.client.clone();
    let agents = ctx.agents().await?;
    let entries = Api::<AuthorizationEntry>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(Error::Read)?
        .items;
    let servers = Api::<ReplicationServer>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(Error::Read)?
        .items;
    let mut reported = 0;
    // Replicas (VMs not removed) per AuthorizationEntry, for its status.
    let mut per_entry: BTreeMap<String, u32> = entries.iter().map(|e| (e.name_any(), 0)).collect();
    let mut complete = true;
    for agent in agents.iter().filter(|a| a.live && a.capabilities.iter().any(|c| c == "replica")) {
        let status = match control(agent, ctx, async |mut c| {
            c.get_status(GetStatusRequest {}).await.map(|r| r.into_inner())
        })
        .await
        {
            Ok(s) => s,
            Err(why) => {
                tracing::warn!(node = %agent.node, error = %why, "reading a replica agent");
                complete = false;
                continue;
            }
        };
        let mut by_vm: BTreeMap<&str, Vec<&ReplicaDisk>> = BTreeMap::new();
        for d in &status.replicas {
            by_vm.entry(d.vm_id.as_str()).or_default().push(d);
        }
        for (vm_id, disks) in by_vm {
            if disks.iter().any(|d| d.reverse) {
                // The old primary's own disks receiving the promoted side's
                // logs: its Primary object shows that (until it takes over).
                if !disks.iter().all(|d| d.promoted)
                    && report_reverse(ctx, vm_id, &disks, agent, &servers).await?
                {
                    reported += 1;
                }
                continue;
            }
            if let Some(e) = admitting_entry(disks[0], &entries).filter(|_| !disks.iter().all(|d| d.removed))
            {
                *per_entry.entry(e.name_any()).or_default() += 1;
            }
            let Some(ns) = replica_namespace(disks[0], &entries, &servers, agent) else {
                // Agents configured by hand (--authorize) have no entry here.
                tracing::debug!(vm = vm_id, primary = %disks[0].primary, "no AuthorizationEntry or default names a namespace for this replica");
                continue;
            };
            if ctx.namespace.as_ref().is_some_and(|w| *w != ns) {
                continue;
            }
            if report(ctx, &ns, vm_id, &disks, agent, &servers).await? {
                reported += 1;
            }
        }
    }
    // Counts are only whole when every agent answered and every namespace is watched.
    if complete && ctx.namespace.is_none() {
        let api = Api::<AuthorizationEntry>::all(client.clone());
        for e in &entries {
            let n = per_entry.get(&e.name_any()).copied().unwrap_or(0);
            if e.status.as_ref().map_or(0, |s| s.replica_count) != n {
                let patch = serde_json::json!({"status": {"replicaCount": n}});
                api.patch_status(&e.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map_err(Error::WriteStatus)?;
            }
        }
    }
    Ok(reported)
}

async fn report(
    ctx: &Context,
    ns: &str,
    vm_id: &str,
    disks: &[&ReplicaDisk],
    agent: &Agent,
    servers: &[ReplicationServer],
) -> Result<bool, Error> {
    let api: Api<VMReplication> = Api::namespaced(ctx.site.client.clone(), ns);
    let name = replica_name(vm_id);
    let obj = match api.get_opt(name).await.map_err(Error::Read)? {
        Some(o) if o.spec.role == Role::Primary => {
            tracing::warn!(
                namespace = ns,
                name,
                vm = vm_id,
                "a Primary VMReplication has the replica's name: not adopting it"
            );
            return Ok(false);
        }
        // One this site created, made when only some disks had arrived
        // (each disk opens on its own): the others are added, none removed.
        Some(o) if o.labels().contains_key(REPLICA_OF) && missing_disks(&o, disks) => {
            let all: Vec<serde_json::Value> = o
                .spec
                .disks
                .iter()
                .map(|d| serde_json::json!({"name": d.name, "path": d.path}))
                .chain(
                    disks
                        .iter()
                        .filter(|d| !o.spec.disks.iter().any(|k| k.name == d.disk_id))
                        .map(|d| serde_json::json!({"name": d.disk_id, "path": d.image_path})),
                )
                .collect();
            let patch = serde_json::json!({"spec": {"disks": all}});
            let pp = PatchParams { field_manager: Some(MANAGER.into()), ..Default::default() };
            api.patch(name, &pp, &Patch::Merge(&patch)).await.map_err(Error::WriteStatus)?
        }
        Some(o) => o,
        None if disks.iter().all(|d| d.removed) => return Ok(false),
        None => {
            let spec = match replica_spec(vm_id, disks, &agent.node) {
                Ok(s) => s,
                Err(why) => {
                    tracing::warn!(error = %why, "cannot describe the replica");
                    return Ok(false);
                }
            };
            let mut o = VMReplication::new(name, spec);
            o.metadata.labels = Some([(REPLICA_OF.to_owned(), vm_id.to_owned())].into());
            let created = api
                .create(&PostParams { field_manager: Some(MANAGER.into()), ..Default::default() }, &o)
                .await
                .map_err(Error::WriteStatus)?;
            let note = format!("replica of {vm_id} from {} on node {}", disks[0].primary, agent.node);
            ctx.publish(
                &created,
                Event {
                    type_: EventType::Normal,
                    reason: "ReplicaCreated".into(),
                    note: Some(note),
                    action: "Create".into(),
                    secondary: None,
                },
            )
            .await;
            created
        }
    };
    write_replica_status(ctx, &obj, disks, agent, servers).await?;
    Ok(true)
}

/// Writes `obj`'s status as the replica side sees it (when worth a write).
async fn write_replica_status(
    ctx: &Context,
    obj: &VMReplication,
    disks: &[&ReplicaDisk],
    agent: &Agent,
    servers: &[ReplicationServer],
) -> Result<(), Error> {
    let previous = obj.status.clone().unwrap_or_default();
    let lag_warning =
        servers.iter().find(|rs| crate::site::selects(rs, agent)).map_or(Duration::from_secs(3600), |rs| {
            Duration::from_secs(u64::from(rs.spec.lag_warning_threshold_seconds))
        });
    let status =
        replica_status(&previous, disks, &agent.node, obj.metadata.generation, (ctx.site.now)(), lag_warning);
    if ctx.should_write(&obj.uid().unwrap_or_default(), &previous, &status) {
        ctx.write_status(obj, &previous, &status).await?;
    }
    Ok(())
}

/// Reports reverse replication on the Primary object whose VM it is: it is
/// the replica side now.
async fn report_reverse(
    ctx: &Context,
    vm_id: &str,
    disks: &[&ReplicaDisk],
    agent: &Agent,
    servers: &[ReplicationServer],
) -> Result<bool, Error> {
    let Some((ns, name)) = vm_id.split_once('.') else { return Ok(false) };
    if ctx.namespace.as_ref().is_some_and(|w| w != ns) {
        return Ok(false);
    }
    let api: Api<VMReplication> = Api::namespaced(ctx.site.client.clone(), ns);
    let Some(obj) = api.get_opt(name).await.map_err(Error::Read)?.filter(|o| o.spec.role == Role::Primary)
    else {
        return Ok(false);
    };
    write_replica_status(ctx, &obj, disks, agent, servers).await?;
    Ok(true)
}

/// Reports the site's replicas every poll interval until `shutdown` completes.
pub async fn run(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()> + Send) {
    tokio::pin!(shutdown);
    let every = ctx.poll.min(Duration::from_secs(10));
    loop {
        let started = std::time::Instant::now();
        let result = sync_once(&ctx).await;
        ctx.site.metrics.observe("Replica", started, result.as_ref().err().map(Error::class));
        if let Err(e) = result {
            tracing::warn!(error = %e, "reporting replicas");
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = &mut shutdown => return,
        }
    }
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
