//! The replica site's side of a VMReplication: every VM whose disks this
//! site's agents receive gets a Replica object, as Hyper-V creates the replica
//! VM, in the namespace its AuthorizationEntry names (or the
//! ReplicationServer's default). A Replica object already declared there
//! under the same name (GitOps) is adopted: its spec is never written. Its
//! status reports what the replica agent holds: state, recovery points,
//! statistics of applied logs, the last replication time and the epoch. The
//! decisions are `vmreplication::replica`'s; this loop reads and writes.
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
    runtime::events::EventType,
};
use vmreplica_api::control::{MaterializeRequest, PrimaryDisk, ReplicaDisk};
use vmreplica_crds::{
    AuthorizationEntry, DivergedDisk, DivergedPointAction, DivergedPointStatus, ReplicationServer, Role,
    VMReplication, VMReplicationStatus,
};

use crate::{
    Error, agent_client,
    agents::Agent,
    context::Context,
    status::{MANAGER, event},
    vmreplication::replica::{
        REPLICA_OF, admitting_entry, missing_disks, replica_name, replica_namespace, replica_spec,
        replica_status,
    },
};

/// What one pass reads besides the agents.
struct Site {
    entries: Vec<AuthorizationEntry>,
    servers: Vec<ReplicationServer>,
}

/// One pass over the site's replica agents; the number of Replica objects
/// reported on.
pub async fn sync_once(ctx: &Context) -> Result<usize, Error> {
    let client = ctx.site.client.clone();
    let agents = ctx.site.agents().await?;
    let site = Site {
        entries: Api::<AuthorizationEntry>::all(client.clone())
            .list(&ListParams::default())
            .await
            .map_err(Error::read("AuthorizationEntries"))?
            .items,
        servers: Api::<ReplicationServer>::all(client.clone())
            .list(&ListParams::default())
            .await
            .map_err(Error::read("ReplicationServers"))?
            .items,
    };
    let mut reported = 0;
    // Replicas (VMs not removed) per AuthorizationEntry, for its status.
    let mut per_entry: BTreeMap<String, u32> = site.entries.iter().map(|e| (e.name_any(), 0)).collect();
    let mut complete = true;
    for agent in agents.iter().filter(|a| a.live && a.capabilities.iter().any(|c| c == "replica")) {
        let status = match agent_client::status(agent, ctx).await {
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
                    && report_reverse(ctx, vm_id, &disks, agent, &site).await?
                {
                    reported += 1;
                }
                continue;
            }
            if let Some(e) =
                admitting_entry(disks[0], &site.entries).filter(|_| !disks.iter().all(|d| d.removed))
            {
                *per_entry.entry(e.name_any()).or_default() += 1;
            }
            let Some(ns) = replica_namespace(disks[0], &site.entries, &site.servers, agent) else {
                // Agents configured by hand (--authorize) have no entry here.
                tracing::debug!(vm = vm_id, primary = %disks[0].primary, "no AuthorizationEntry or default names a namespace for this replica");
                continue;
            };
            if ctx.namespace.as_ref().is_some_and(|w| *w != ns) {
                continue;
            }
            if report(ctx, &ns, vm_id, &disks, agent, &site, &status.primaries).await? {
                reported += 1;
            }
        }
    }
    // Counts are only whole when every agent answered and every namespace is watched.
    if complete && ctx.namespace.is_none() {
        count_replicas(ctx, &site.entries, &per_entry).await?;
    }
    Ok(reported)
}

/// Writes each entry's `status.replicaCount` where it changed.
async fn count_replicas(
    ctx: &Context,
    entries: &[AuthorizationEntry],
    per_entry: &BTreeMap<String, u32>,
) -> Result<(), Error> {
    let api = Api::<AuthorizationEntry>::all(ctx.site.client.clone());
    for e in entries {
        let n = per_entry.get(&e.name_any()).copied().unwrap_or(0);
        if e.status.as_ref().map_or(0, |s| s.replica_count) != n {
            let patch = serde_json::json!({"status": {"replicaCount": n}});
            api.patch_status(&e.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(Error::write("AuthorizationEntry replicaCount"))?;
        }
    }
    Ok(())
}

/// Creates or adopts the Replica object of `vm_id` in `ns` and reports on it;
/// false when there is none to report on.
async fn report(
    ctx: &Context,
    ns: &str,
    vm_id: &str,
    disks: &[&ReplicaDisk],
    agent: &Agent,
    site: &Site,
    shipping: &[PrimaryDisk],
) -> Result<bool, Error> {
    let api: Api<VMReplication> = Api::namespaced(ctx.site.client.clone(), ns);
    let name = replica_name(vm_id);
    let obj = match api.get_opt(name).await.map_err(Error::read("the Replica object"))? {
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
            api.patch(name, &pp, &Patch::Merge(&patch))
                .await
                .map_err(Error::write("the Replica object's disks"))?
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
            let pp = PostParams { field_manager: Some(MANAGER.into()), ..Default::default() };
            let created = api.create(&pp, &o).await.map_err(Error::write("a Replica object"))?;
            let note = format!("replica of {vm_id} from {} on node {}", disks[0].primary, agent.node);
            ctx.publish(&created, event(EventType::Normal, "ReplicaCreated", "Create", note)).await;
            created
        }
    };
    let mut next = replica_view(ctx, &obj, disks, agent, site);
    // Promoted here and replicating back: how its resyncs went.
    if next.replica_server.is_some() && disks.iter().all(|d| d.promoted) {
        let previous = obj.status.clone().unwrap_or_default();
        let v = crate::vmreplication::primary::view(vm_id, shipping);
        next.last_resynchronization =
            crate::vmreplication::primary::last_resynchronization(&v, &previous, ctx.now().as_millisecond());
    }
    crate::vmreplication::write::write(ctx, &obj, &next).await?;
    Ok(true)
}

/// `obj`'s status as the replica side sees it.
fn replica_view(
    ctx: &Context,
    obj: &VMReplication,
    disks: &[&ReplicaDisk],
    agent: &Agent,
    site: &Site,
) -> VMReplicationStatus {
    let previous = obj.status.clone().unwrap_or_default();
    let lag_warning = site
        .servers
        .iter()
        .find(|rs| crate::site::selects(rs, agent))
        .map_or(Duration::from_secs(3600), |rs| {
            Duration::from_secs(u64::from(rs.spec.lag_warning_threshold_seconds))
        });
    replica_status(&previous, disks, &agent.node, obj.metadata.generation, ctx.now(), lag_warning)
}

/// Reports reverse replication on the Primary object whose VM it is: it is
/// the replica side now.
async fn report_reverse(
    ctx: &Context,
    vm_id: &str,
    disks: &[&ReplicaDisk],
    agent: &Agent,
    site: &Site,
) -> Result<bool, Error> {
    let Some((ns, name)) = vm_id.split_once('.') else { return Ok(false) };
    if ctx.namespace.as_ref().is_some_and(|w| w != ns) {
        return Ok(false);
    }
    let api: Api<VMReplication> = Api::namespaced(ctx.site.client.clone(), ns);
    let found = api.get_opt(name).await.map_err(Error::read("the Primary object"))?;
    let Some(obj) = found.filter(|o| o.spec.role == Role::Primary) else { return Ok(false) };
    let mut next = replica_view(ctx, &obj, disks, agent, site);
    next.diverged_point = diverged_point(ctx, &obj, disks, agent).await;
    crate::vmreplication::write::write(ctx, &obj, &next).await?;
    Ok(true)
}

/// The diverged point the old primary's disks keep, after carrying out
/// `spec.divergedPoint.action` on it.
pub(crate) async fn diverged_point(
    ctx: &Context,
    obj: &VMReplication,
    disks: &[&ReplicaDisk],
    agent: &Agent,
) -> Option<DivergedPointStatus> {
    let kept: Vec<(&ReplicaDisk, &vmreplica_api::control::DivergedPoint)> =
        disks.iter().filter_map(|d| d.diverged.as_ref().map(|p| (*d, p))).collect();
    let (_, first) = kept.first()?;
    let action = obj.spec.diverged_point.as_ref().map_or(DivergedPointAction::Keep, |r| r.action);
    let previous = obj.status.as_ref().and_then(|s| s.diverged_point.clone()).unwrap_or_default();
    let copy = format!("{}-diverged", obj.name_any());
    let mut status = DivergedPointStatus {
        time: Timestamp::from_millisecond(first.time_unix_ms as i64).ok().map(Time),
        epoch: first.epoch,
        disks: Vec::new(),
        message: None,
    };
    let mut failed = Vec::new();
    for (d, p) in &kept {
        let known = previous.disks.iter().find(|k| k.name == d.disk_id).and_then(|k| k.path.clone());
        let path = match action {
            DivergedPointAction::Discard => {
                let gone = agent_client::discard_diverged(agent, ctx, &d.vm_id, &d.disk_id).await;
                let copy_gone = agent_client::delete_copy(agent, ctx, &d.vm_id, &d.disk_id, &copy).await;
                if let Err(why) = gone.and(copy_gone) {
                    failed.push(format!("disk {}: {why}", d.disk_id));
                } else {
                    continue;
                }
                known
            }
            DivergedPointAction::Materialize if known.is_none() => {
                let req = MaterializeRequest {
                    vm_id: d.vm_id.clone(),
                    disk_id: d.disk_id.clone(),
                    seq: 0,
                    name: copy.clone(),
                    diverged: true,
                };
                match agent_client::materialize(agent, ctx, req).await {
                    Ok(r) => Some(r.path),
                    Err(why) => {
                        failed.push(format!("disk {}: {why}", d.disk_id));
                        None
                    }
                }
            }
            _ => known,
        };
        status.disks.push(DivergedDisk { name: d.disk_id.clone(), sequence: p.seq, path });
    }
    if status.disks.is_empty() {
        return None;
    }
    status.message = Some(if !failed.is_empty() {
        format!("{action:?} failed: {}", failed.join("; "))
    } else if status.disks.iter().all(|d| d.path.is_some()) {
        "materialised: attach the copies to a VM to recover these writes; set spec.divergedPoint.action: Discard \
         to delete the point and its copies"
            .into()
    } else {
        "these disks' writes that never reached the side that took the VM over are kept: set \
         spec.divergedPoint.action to Materialize to write them out as disks, or Discard to delete them"
            .into()
    });
    Some(status)
}

/// Reports the site's replicas every poll interval until `shutdown` completes.
pub async fn run(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()> + Send) {
    tokio::pin!(shutdown);
    let every = ctx.poll.min(Duration::from_secs(10));
    loop {
        let started = std::time::Instant::now();
        let result = sync_once(&ctx).await;
        ctx.site.metrics.observe("Replica", started, result.as_ref().err().map(Error::label));
        if let Err(e) = result {
            tracing::warn!(error = %e, "reporting replicas");
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = &mut shutdown => return,
        }
    }
}
