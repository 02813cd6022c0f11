//! Failover requests: test, planned (with reverse replication and failing
//! back) and unplanned.
//!
//! ```text
//!  spec.failover {id, type: Test, recoveryPoint}      (on the Replica object)
//!    new id ─▶ the point's time ─▶ per disk, its newest point at or before it
//!           ─▶ Control.MaterializePoint "<name>-test" per disk ─▶ lastFailover Completed
//!  request removed ─▶ Control.DeleteMaterialized ─▶ lastFailover Cancelled (cleaned up)
//! ```
//! Replication keeps running throughout: materialising holds back applying,
//! never receiving. `status.lastFailover` is written under its own field
//! manager, so the replica-site report never overwrites it.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{
    Api, ResourceExt,
    runtime::events::{Event, EventType},
};
use vmreplica_api::control::{
    AgentStatus, DeleteMaterializedRequest, GetStatusRequest, MaterializeRequest, ReplicaDisk,
};
use vmreplica_crds::{FailoverPhase, FailoverStatus, FailoverType, VMReplication};

use crate::{
    Error,
    agents::Agent,
    replicas::{REPLICA_OF, replica_name},
    vmr::{Context, control},
};

/// The field manager of `status.lastFailover`.
pub const FAILOVER_MANAGER: &str = "vmreplica-controller-failover";

/// Points of different disks of one cycle are sealed within this of each other.
const SAME_CYCLE_MS: u64 = 500;

/// The name of the test copy of a VM's disks.
pub fn test_copy_name(vmr: &VMReplication) -> String {
    format!("{}-test", vmr.name_any())
}

/// For each disk, the sequence of its state at the chosen point: the point
/// `id` (a sequence of the listed disk) or the newest (`latest`). Errors say
/// what to choose instead.
pub fn choose_points(disks: &[&ReplicaDisk], id: &str) -> Result<(String, BTreeMap<String, u64>), String> {
    let listed = disks
        .iter()
        .max_by_key(|d| {
            (d.points.len(), d.points.last().map(|p| p.time_unix_ms), std::cmp::Reverse(d.disk_id.clone()))
        })
        .ok_or("the replica has no disks")?;
    let chosen = if id == "latest" {
        listed.points.last()
    } else {
        let seq: u64 =
            id.parse().map_err(|_| format!("recovery point {id:?} is not a point id or `latest`"))?;
        Some(listed.points.iter().find(|p| p.seq == seq).ok_or_else(|| {
            format!("recovery point {id} is not (or no longer) on the replica: choose one from status.recoveryPoints")
        })?)
    };
    let Some(chosen) = chosen else {
        // No point yet on any disk: the images as they are (right after the initial copy).
        return Ok(("latest".into(), disks.iter().map(|d| (d.disk_id.clone(), 0)).collect()));
    };
    let mut per_disk = BTreeMap::new();
    for d in disks {
        let at = d.points.iter().rev().find(|p| p.time_unix_ms <= chosen.time_unix_ms + SAME_CYCLE_MS);
        let seq = match (at, d.points.is_empty()) {
            (Some(p), _) => p.seq,
            // Never written since its initial copy: its image is that state.
            (None, true) => 0,
            (None, false) => {
                return Err(format!(
                    "disk {} has no recovery point as old as {}: choose a newer point",
                    d.disk_id, chosen.seq
                ));
            }
        };
        per_disk.insert(d.disk_id.clone(), seq);
    }
    Ok((chosen.seq.to_string(), per_disk))
}

/// What an unplanned failover to `point` (a point id, or `latest` when the
/// replica had none) loses of what reached the replica: the seconds from the
/// point to the newest replicated write, and when that write was sealed.
pub fn data_loss_window(disks: &[&ReplicaDisk], point: &str) -> (Option<u64>, Option<u64>) {
    let newest = disks
        .iter()
        .map(|d| d.points.last().map_or(0, |p| p.time_unix_ms).max(d.last_applied_sealed_unix_ms))
        .max()
        .filter(|ms| *ms > 0);
    let point_ms = disks.iter().flat_map(|d| d.points.iter()).find(|p| p.seq.to_string() == point);
    let window = match (point_ms, newest) {
        (Some(p), Some(n)) => Some(n.saturating_sub(p.time_unix_ms) / 1000),
        // No point yet: the images as they are, which is all that arrived.
        (None, _) if point == "latest" => Some(0),
        _ => None,
    };
    (window, newest)
}

/// The replica agent holding this object's VM, and its disks there.
pub(crate) async fn locate(
    vmr: &VMReplication,
    ctx: &Context,
) -> Result<Option<(Agent, Vec<ReplicaDisk>)>, Error> {
    Ok(located(vmr, ctx).await?.map(|(agent, status)| (agent, status.replicas)))
}

/// [`locate`], with the rest of what that agent reported in the same call
/// (its `replicas` are only this VM's disks).
pub(crate) async fn located(
    vmr: &VMReplication,
    ctx: &Context,
) -> Result<Option<(Agent, AgentStatus)>, Error> {
    let agents = ctx.agents().await?;
    let name = vmr.name_any();
    // A Primary object's VM comes back here only as a reverse replica.
    let vm_id = if vmr.spec.role == vmreplica_crds::Role::Primary {
        Some(crate::vmr::vm_id(vmr))
    } else {
        vmr.labels().get(REPLICA_OF).cloned()
    };
    for agent in agents.iter().filter(|a| a.live && a.capabilities.iter().any(|c| c == "replica")) {
        if vmr.spec.node.as_ref().is_some_and(|n| *n != agent.node) {
            continue;
        }
        let Ok(mut status) = control(agent, ctx, async |mut c| {
            c.get_status(GetStatusRequest {}).await.map(|r| r.into_inner())
        })
        .await
        else {
            continue;
        };
        status.replicas.retain(|d| match &vm_id {
            Some(id) => d.vm_id == *id,
            None => replica_name(&d.vm_id) == name,
        });
        if !status.replicas.is_empty() {
            return Ok(Some((agent.clone(), status)));
        }
    }
    Ok(None)
}

/// The status of request `f` as it starts (or resumes) in `phase`.
fn begin(f: &vmreplica_crds::FailoverRequest, phase: FailoverPhase, started: Time) -> FailoverStatus {
    FailoverStatus {
        id: f.id.clone(),
        failover_type: f.failover_type,
        phase,
        recovery_point: None,
        start_time: Some(started),
        end_time: None,
        data_loss_window_seconds: None,
        forced: false,
        took_over: false,
        reversed_to: None,
        message: None,
    }
}

async fn write(vmr: &VMReplication, ctx: &Context, last: &FailoverStatus) -> Result<(), Error> {
    let api = Api::<VMReplication>::namespaced(ctx.site.client.clone(), &vmr.namespace().unwrap_or_default());
    crate::apply_status(&api, &vmr.name_any(), FAILOVER_MANAGER, &serde_json::json!({"lastFailover": last}))
        .await
}

/// Writes a completed `last` together with the epoch it moved the VM to, in
/// one update (whoever waits for Completed reads the new epoch with it), and
/// emits an Event carrying its message.
async fn write_completed(
    vmr: &VMReplication,
    ctx: &Context,
    last: &FailoverStatus,
    epoch: u64,
    reason: &str,
) -> Result<(), Error> {
    let api = Api::<VMReplication>::namespaced(ctx.site.client.clone(), &vmr.namespace().unwrap_or_default());
    let status = serde_json::json!({"lastFailover": last, "epoch": epoch});
    crate::apply_status(&api, &vmr.name_any(), FAILOVER_MANAGER, &status).await?;
    event(ctx, vmr, EventType::Normal, reason, last.message.clone().unwrap_or_default()).await;
    Ok(())
}

/// Writes `status` and emits an Event carrying its message.
async fn record(
    vmr: &VMReplication,
    ctx: &Context,
    status: &FailoverStatus,
    type_: EventType,
    reason: &str,
) -> Result<(), Error> {
    write(vmr, ctx, status).await?;
    event(ctx, vmr, type_, reason, status.message.clone().unwrap_or_default()).await;
    Ok(())
}

async fn event(ctx: &Context, vmr: &VMReplication, type_: EventType, reason: &str, note: String) {
    let e =
        Event { type_, reason: reason.into(), note: Some(note), action: "Failover".into(), secondary: None };
    ctx.publish(vmr, e).await;
}

/// Writes each disk at its point (`per_disk`) as copy `name` on `agent`; the
/// copies' paths as `disk=path`.
async fn materialize_all(
    agent: &Agent,
    ctx: &Context,
    disks: &[ReplicaDisk],
    per_disk: &BTreeMap<String, u64>,
    name: &str,
) -> Result<Vec<(String, String)>, String> {
    let mut paths = Vec::new();
    for d in disks {
        let req = MaterializeRequest {
            vm_id: d.vm_id.clone(),
            disk_id: d.disk_id.clone(),
            seq: per_disk[&d.disk_id],
            name: name.to_owned(),
        };
        let r =
            control(agent, ctx, async |mut c| c.materialize_point(req.clone()).await.map(|r| r.into_inner()))
                .await
                .map_err(|why| format!("disk {}: {why}", d.disk_id))?;
        paths.push((d.image_path.clone(), r.path));
    }
    Ok(paths)
}

/// Asks `agent` to serve the VM's replica (or, with `copy_name`, its copies)
/// as the VM's disks; `complete` ends an unplanned failover. A refusal is an
/// error carrying the agent's reason.
async fn promote(
    agent: &Agent,
    ctx: &Context,
    vm_id: &str,
    uid: &str,
    copy_name: String,
    complete: bool,
) -> Result<vmreplica_api::control::EnableReply, String> {
    let req = vmreplica_api::control::PromoteRequest {
        vm_id: vm_id.to_owned(),
        uid: uid.to_owned(),
        copy_name,
        complete,
    };
    let reply =
        control(agent, ctx, async |mut c| c.promote(req.clone()).await.map(|r| r.into_inner())).await?;
    if reply.accepted { Ok(reply) } else { Err(reply.message) }
}

/// The test VM made from VM object `vm`.
pub fn test_vm_name(vm: &str) -> String {
    format!("{vm}-test")
}

/// Creates the test VM when the object names a KubeVirt VM: the copies
/// (replica image path → test copy) on the test network. Its name, or
/// `None` when there is no VM to copy.
async fn test_vm(
    vmr: &VMReplication,
    ctx: &Context,
    copies: BTreeMap<String, String>,
) -> Result<Option<String>, String> {
    let Some(vm) = vmr.spec.vm.as_ref().filter(|v| v.runtime == vmreplica_crds::VmRuntime::KubeVirt) else {
        return Ok(None);
    };
    let ns = vmr.namespace().unwrap_or_default();
    let api: Api<kube::api::DynamicObject> =
        Api::namespaced_with(ctx.site.client.clone(), &ns, &crate::power::virtual_machines());
    let source = api
        .get_opt(&vm.name)
        .await
        .map_err(|e| format!("reading VirtualMachine {}: {e}", vm.name))?
        .ok_or_else(|| format!("VirtualMachine {} does not exist in {ns}", vm.name))?;
    let name = test_vm_name(&vm.name);
    let obj =
        crate::power::test_vm(&source, &name, &vmr.name_any(), &copies, vmr.spec.test_network.as_ref())?;
    let owner = kube::Resource::controller_owner_ref(vmr, &()).ok_or("the VMReplication has no uid")?;
    crate::power::create_test_vm(ctx.site.client.clone(), &ns, obj, owner).await?;
    let on = vmr
        .spec
        .test_network
        .as_ref()
        .map_or("no network".to_owned(), |t| format!("network {}", t.network_name));
    Ok(Some(format!("{name} ({on})")))
}

/// Deletes the VMs of this object's test failovers.
pub(crate) async fn delete_test_vms(vmr: &VMReplication, ctx: &Context) -> Result<(), Error> {
    let ns = vmr.namespace().unwrap_or_default();
    crate::power::delete_test_vms(ctx.site.client.clone(), &ns, &vmr.name_any())
        .await
        .map(drop)
        .map_err(|why| Error::Agent(format!("deleting the test VM: {why}")))
}

/// Deletes copy `name` of every disk on `agent` (a missing one is no error).
async fn delete_all(agent: &Agent, ctx: &Context, disks: &[ReplicaDisk], name: &str) -> Result<(), String> {
    for d in disks {
        let req = DeleteMaterializedRequest {
            vm_id: d.vm_id.clone(),
            disk_id: d.disk_id.clone(),
            name: name.to_owned(),
        };
        control(agent, ctx, async |mut c| c.delete_materialized(req.clone()).await.map(|r| r.into_inner()))
            .await?;
    }
    Ok(())
}

/// Deletes the test failover's copies, wherever the VM's replica agent is.
pub(crate) async fn delete_copies(vmr: &VMReplication, ctx: &Context) -> Result<Result<(), String>, Error> {
    let Some((agent, disks)) = locate(vmr, ctx).await? else {
        return Ok(Err("the replica agent holding this VM is not reachable".into()));
    };
    Ok(delete_all(&agent, ctx, &disks, &test_copy_name(vmr)).await)
}

/// Carries out or cleans up a test failover; true when it acted.
pub async fn reconcile_test(vmr: &VMReplication, ctx: &Context) -> Result<bool, Error> {
    let request = vmr.spec.failover.as_ref().filter(|f| f.failover_type == FailoverType::Test);
    let last = vmr.status.as_ref().and_then(|s| s.last_failover.clone());
    let now = || Time((ctx.site.now)());
    // Test copies have one name per VM, so whatever the last test request
    // left (completed, failed, or interrupted) is found and deleted.
    let running_test = last
        .as_ref()
        .filter(|l| l.failover_type == FailoverType::Test && l.phase != FailoverPhase::Cancelled);
    match request {
        // Done already: re-applying the same request changes nothing.
        Some(f) if last.as_ref().is_some_and(|l| l.id == f.id) => Ok(false),
        Some(f) => {
            let started = now();
            let mut status = begin(f, FailoverPhase::PreparingDisks, started);
            status.message = Some("materialising the recovery point as test disks".into());
            write(vmr, ctx, &status).await?;
            // An earlier test's VM runs on the disks about to be replaced.
            delete_test_vms(vmr, ctx).await?;
            let outcome = async {
                let (agent, disks) = locate(vmr, ctx)
                    .await?
                    .ok_or_else(|| Error::Agent("no live replica agent holds this VM".into()))?;
                let refs: Vec<&ReplicaDisk> = disks.iter().collect();
                let (point, per_disk) = match choose_points(&refs, &f.recovery_point) {
                    Ok(c) => c,
                    Err(why) => return Ok(Err(why)),
                };
                let copies = match materialize_all(&agent, ctx, &disks, &per_disk, &test_copy_name(vmr)).await
                {
                    Ok(p) => p,
                    Err(why) => return Ok(Err(why)),
                };
                let paths: Vec<String> = copies.iter().map(|(_, copy)| copy.clone()).collect();
                let vm = match test_vm(vmr, ctx, copies.into_iter().collect()).await {
                    Ok(vm) => vm,
                    Err(why) => {
                        return Ok(Err(format!(
                            "test disks made ({}), but no test VM: {why}",
                            paths.join(", ")
                        )));
                    }
                };
                Ok::<_, Error>(Ok((point, paths, vm)))
            }
            .await;
            match outcome {
                Ok(Ok((point, paths, vm))) => {
                    status.phase = FailoverPhase::Completed;
                    status.recovery_point = Some(point.clone());
                    status.end_time = Some(now());
                    status.message = Some(format!(
                        "test disks at point {point} (replication continues): {}{}; remove spec.failover to delete them",
                        paths.join(", "),
                        vm.map(|v| format!("; test VM {v}")).unwrap_or_default()
                    ));
                    record(vmr, ctx, &status, EventType::Normal, "TestFailoverReady").await?;
                }
                Ok(Err(why)) => {
                    status.phase = FailoverPhase::Failed;
                    status.end_time = Some(now());
                    status.message = Some(why.clone());
                    write(vmr, ctx, &status).await?;
                    event(ctx, vmr, EventType::Warning, "TestFailoverFailed", why).await;
                }
                Err(e) => return Err(e),
            }
            Ok(true)
        }
        None => {
            let Some(l) = running_test else { return Ok(false) };
            delete_test_vms(vmr, ctx).await?;
            match delete_copies(vmr, ctx).await? {
                Ok(()) => {
                    let mut done = l.clone();
                    done.phase = FailoverPhase::Cancelled;
                    done.message = Some("test failover stopped: its test VM and disks were deleted".into());
                    record(vmr, ctx, &done, EventType::Normal, "TestFailoverCleanedUp").await?;
                    Ok(true)
                }
                Err(why) => Err(Error::Agent(format!("deleting the test disks: {why}"))),
            }
        }
    }
}

/// The VMReplication at the other site of this one, as an operator finds it:
/// a Replica object's primary is `<namespace>/<name>` at its primary server;
/// a Primary object's replica has its name at the replica server (in the
/// namespace the AuthorizationEntry there names).
pub fn other_side(vmr: &VMReplication) -> String {
    if vmr.spec.role == vmreplica_crds::Role::Primary {
        let server = vmr.spec.replica_server.as_ref().map_or("the replica site", |r| r.name.as_str());
        return format!(
            "the Replica object {} at {server} (in the namespace its AuthorizationEntry names)",
            vmr.name_any()
        );
    }
    let object = vmr
        .labels()
        .get(REPLICA_OF)
        .and_then(|id| id.split_once('.'))
        .map_or_else(|| vmr.name_any(), |(ns, name)| format!("{ns}/{name}"));
    let server = vmr.spec.primary_server.as_deref().unwrap_or("the primary site");
    format!("the Primary object {object} at {server}")
}

/// What a planned failover means for the primary object this pass.
pub enum PlannedPrimary {
    /// No planned failover governs the VM: replicate as usual.
    No,
    /// The primary's part is done or failed: report this state, do not replicate.
    Holds(vmreplica_crds::ReplicationState, FailoverStatus),
}

/// Planned failover, primary side (Hyper-V's "prepare"): stop the VM, make
/// its disks read-only, ship the last log, and check the replica holds every
/// logged write. The replica side then promotes (not built yet).
pub async fn planned_primary(
    vmr: &VMReplication,
    ctx: &Context,
    agent: &Agent,
    vm_id: &str,
) -> Result<PlannedPrimary, Error> {
    use vmreplica_crds::ReplicationState;

    use crate::power::{Power, PowerState, VmPower};
    let request = vmr.spec.failover.as_ref().filter(|f| f.failover_type == FailoverType::Planned);
    let last = vmr
        .status
        .as_ref()
        .and_then(|s| s.last_failover.clone())
        .filter(|l| l.failover_type == FailoverType::Planned);
    let held = |l: FailoverStatus| {
        let state = if l.phase == FailoverPhase::Completed {
            ReplicationState::SyncedReplicationComplete
        } else {
            ReplicationState::Error
        };
        Ok(PlannedPrimary::Holds(state, l))
    };
    let f = match (request, last) {
        // This side took the VM over (failed back here): it is the primary.
        (Some(f), Some(l)) if l.id == f.id && l.took_over => return Ok(PlannedPrimary::No),
        (None, Some(l)) if l.took_over => return Ok(PlannedPrimary::No),
        (Some(f), Some(l))
            if l.id == f.id && matches!(l.phase, FailoverPhase::Completed | FailoverPhase::Failed) =>
        {
            return held(l);
        }
        // Prepared earlier and the request since removed: the disks stay
        // read-only until the object is deleted (or the failover resumed).
        (None, Some(l)) if l.phase == FailoverPhase::Completed => return held(l),
        (None, _) => return Ok(PlannedPrimary::No),
        (Some(f), _) => f,
    };
    let mut status = begin(f, FailoverPhase::StoppingVM, Time((ctx.site.now)()));
    status.recovery_point = Some("latest".into());
    status.message = Some("stopping the VM".into());
    write(vmr, ctx, &status).await?;
    event(ctx, vmr, EventType::Normal, "PlannedFailoverStarted", "stopping the VM".into()).await;
    let fail = async |mut status: FailoverStatus, why: String| {
        status.phase = FailoverPhase::Failed;
        status.end_time = Some(Time((ctx.site.now)()));
        status.message = Some(why.clone());
        write(vmr, ctx, &status).await?;
        event(ctx, vmr, EventType::Warning, "PlannedFailoverFailed", why).await;
        held(status)
    };
    let power = VmPower::for_vmr(ctx.site.client.clone(), vmr);
    power.set_running(false).await.map_err(Error::Read)?;
    let mut stopped = false;
    for _ in 0..120 {
        if matches!(power.state().await.map_err(Error::Read)?, PowerState::Stopped | PowerState::Missing) {
            stopped = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    if !stopped {
        return fail(status, "the VM did not stop within 60 s; nothing was failed over".into()).await;
    }
    status.phase = FailoverPhase::SyncingFinalLog;
    status.message = Some("shipping the last log with the disks read-only".into());
    write(vmr, ctx, &status).await?;
    let req = vmreplica_api::control::RemoveRequest {
        vm_id: vm_id.to_owned(),
        uid: vmr.metadata.uid.clone().unwrap_or_default(),
    };
    let reply = match control(agent, ctx, async |mut c| {
        c.prepare_failover(req.clone()).await.map(|r| r.into_inner())
    })
    .await
    {
        Ok(r) => r,
        Err(why) => return fail(status, why).await,
    };
    if !reply.synced {
        let detail = if reply.message.is_empty() { format!("{:?}", reply.disks) } else { reply.message };
        return fail(status, format!("the replica does not hold every logged write: {detail}")).await;
    }
    let finals: Vec<String> =
        reply.disks.iter().map(|d| format!("{} through {}", d.disk_id, d.last_seq)).collect();
    status.phase = FailoverPhase::Completed;
    status.end_time = Some(Time((ctx.site.now)()));
    status.data_loss_window_seconds = Some(0);
    status.message = Some(format!(
        "primary side done: VM stopped, disks read-only, the replica holds every write ({}); now request the \
         planned failover on {}, with the same id{}",
        finals.join(", "),
        other_side(vmr),
        if vmr.spec.role == vmreplica_crds::Role::Primary { "" } else { " and reverseReplication: true" },
    ));
    record(vmr, ctx, &status, EventType::Normal, "PlannedFailoverPrepared").await?;
    held(status)
}

/// A Replica object whose side took the VM over and reversed replication
/// is the VM's primary: a new planned request fails the VM back, and this
/// side does the primary's part (stop, ship the last log). True when that
/// applies.
pub async fn planned_back(vmr: &VMReplication, ctx: &Context) -> Result<bool, Error> {
    let Some(f) = vmr.spec.failover.as_ref().filter(|f| f.failover_type == FailoverType::Planned) else {
        return Ok(false);
    };
    let Some(l) = vmr.status.as_ref().and_then(|s| s.last_failover.as_ref()) else { return Ok(false) };
    let starting = l.took_over && l.phase == FailoverPhase::Completed && l.id != f.id;
    let resuming =
        l.id == f.id && matches!(l.phase, FailoverPhase::StoppingVM | FailoverPhase::SyncingFinalLog);
    if !(starting || resuming) {
        return Ok(false);
    }
    let Some((agent, disks)) = locate(vmr, ctx).await? else {
        return Err(Error::Agent("no live agent holds this VM".into()));
    };
    planned_primary(vmr, ctx, &agent, &disks[0].vm_id).await?;
    Ok(true)
}

/// Planned failover, replica side: once the primary's part is done (its
/// final log is here), promote the replica (epoch + 1, served as the VM's
/// disks) and start the VM. Returns when to look again, if the primary's
/// part is still awaited.
pub async fn planned_replica(
    vmr: &VMReplication,
    ctx: &Context,
) -> Result<Option<std::time::Duration>, Error> {
    use crate::power::{Power, VmPower};
    let Some(f) = vmr.spec.failover.as_ref().filter(|f| f.failover_type == FailoverType::Planned) else {
        return Ok(None);
    };
    let last = vmr.status.as_ref().and_then(|s| s.last_failover.clone());
    if last
        .as_ref()
        .is_some_and(|l| l.id == f.id && matches!(l.phase, FailoverPhase::Completed | FailoverPhase::Failed))
    {
        return Ok(None);
    }
    let started = last.as_ref().filter(|l| l.id == f.id).and_then(|l| l.start_time.clone());
    let mut status = begin(f, FailoverPhase::Pending, started.unwrap_or_else(|| Time((ctx.site.now)())));
    status.recovery_point = Some("latest".into());
    let Some((agent, disks)) = locate(vmr, ctx).await? else {
        status.message = Some("no live replica agent holds this VM".into());
        write(vmr, ctx, &status).await?;
        return Ok(Some(std::time::Duration::from_secs(5)));
    };
    let finished =
        disks.iter().all(|d| d.promoted || (d.primary_finished && d.received_through >= d.primary_final_seq));
    if !finished {
        let message = format!(
            "waiting for the other side's part: request the planned failover on {}, with the same id (it stops \
             the VM and ships the last log)",
            other_side(vmr)
        );
        let message = message.as_str();
        if last.as_ref().and_then(|l| l.message.as_deref()) != Some(message) {
            status.message = Some(message.into());
            write(vmr, ctx, &status).await?;
        }
        return Ok(Some(std::time::Duration::from_secs(3)));
    }
    status.phase = FailoverPhase::PreparingDisks;
    status.message = Some("promoting the replica".into());
    write(vmr, ctx, &status).await?;
    let uid = vmr.metadata.uid.clone().unwrap_or_default();
    let reply = match promote(&agent, ctx, &disks[0].vm_id, &uid, String::new(), false).await {
        Ok(r) => r,
        Err(why) => return fail_with(vmr, ctx, status, why).await,
    };
    let power = VmPower::for_vmr(ctx.site.client.clone(), vmr);
    power.set_network(&vmr.spec.failover_network).await.map_err(Error::Read)?;
    if f.start_vm {
        status.phase = FailoverPhase::StartingVM;
        status.message = Some("starting the VM".into());
        write(vmr, ctx, &status).await?;
        power.set_running(true).await.map_err(Error::Read)?;
    }
    status.took_over = true;
    let extended = crate::extended::server(vmr).filter(|_| vmr.spec.role == vmreplica_crds::Role::Replica);
    let reverse = if let (false, Some(to)) = (f.reverse_replication, &extended) {
        // Extended replication: the third site follows this one now.
        status.phase = FailoverPhase::Reversing;
        status.message = Some(format!("resuming replication to the extended replica {to}"));
        write(vmr, ctx, &status).await?;
        match replicate_promoted(vmr, ctx, &agent, &disks, to).await {
            Ok(()) => {
                status.reversed_to = Some(to.clone());
                format!(
                    " Replication resumed to the extended replica {to}: no copy, it continues the same log."
                )
            }
            Err(why) => {
                return fail_with(vmr, ctx, status, format!("resuming to the extended replica: {why}")).await;
            }
        }
    } else if !f.reverse_replication {
        " Not replicated now: request reverseReplication to protect it again.".to_owned()
    } else {
        status.phase = FailoverPhase::Reversing;
        status.message = Some("reversing replication".into());
        write(vmr, ctx, &status).await?;
        match reverse(vmr, ctx, f, &agent, &disks).await {
            Ok(to) => {
                let mut text =
                    format!(" Replication reversed to {to}: no resync, both sides hold the same bytes.");
                if let Some(c) = extended {
                    text.push_str(&format!(" The extended replica {c} receives nothing more (orphaned)."));
                }
                status.reversed_to = Some(to);
                text
            }
            Err(why) => return fail_with(vmr, ctx, status, format!("reversing replication: {why}")).await,
        }
    };
    status.phase = FailoverPhase::Completed;
    status.end_time = Some(Time((ctx.site.now)()));
    status.data_loss_window_seconds = Some(0);
    status.message = Some(format!(
        "failed over with no loss: the VM's disks are served at {}.{reverse}",
        reply.exports.join(", ")
    ));
    write_completed(vmr, ctx, &status, reply.epoch, "PlannedFailoverCompleted").await?;
    Ok(None)
}

/// Reverse replication after a planned failover to this side: the promoted
/// disks replicate back to the old primary, whose agent turns its prepared
/// disks into their replica (no copy: both hold the same bytes). A Primary
/// object (failing back) reverses by replicating as usual to
/// `spec.replicaServer`. Returns where it replicates to.
async fn reverse(
    vmr: &VMReplication,
    ctx: &Context,
    f: &vmreplica_crds::FailoverRequest,
    agent: &Agent,
    disks: &[ReplicaDisk],
) -> Result<String, String> {
    if vmr.spec.role == vmreplica_crds::Role::Primary {
        let to = vmr.spec.replica_server.as_ref().ok_or("spec.replicaServer is not set")?;
        return Ok(format!("{}:{}", to.name, to.port));
    }
    let to = match (&f.reverse_replica_server, &vmr.spec.primary_server) {
        (Some(s), _) => format!("{}:{}", s.name, s.port),
        (None, Some(name)) => format!("{name}:9443"),
        (None, None) => {
            return Err("no server to reverse to: set spec.failover.reverseReplicaServer".into());
        }
    };
    replicate_promoted(vmr, ctx, agent, disks, &to).await?;
    Ok(to)
}

/// Replicates the disks promoted on `agent` to the replica server `to`
/// (HOST:PORT), with the object's own frequency, compression and history.
async fn replicate_promoted(
    vmr: &VMReplication,
    ctx: &Context,
    agent: &Agent,
    disks: &[ReplicaDisk],
    to: &str,
) -> Result<(), String> {
    let mut images: Vec<&ReplicaDisk> = disks.iter().collect();
    images.sort_by(|a, b| a.disk_id.cmp(&b.disk_id));
    let history = &vmr.spec.recovery_history;
    let spec = vmreplica_api::control::VmReplicationSpec {
        vm_id: disks[0].vm_id.clone(),
        uid: vmr.metadata.uid.clone().unwrap_or_default(),
        // Above the promotion's (0).
        generation: vmr.metadata.generation.unwrap_or(1).max(1),
        disks: images
            .iter()
            .map(|d| vmreplica_api::control::DiskSpec { name: d.disk_id.clone(), path: d.image_path.clone() })
            .collect(),
        replica_address: to.to_owned(),
        interval_seconds: vmr.spec.replication_frequency_seconds,
        compression: vmr.spec.compression_enabled,
        history_window_seconds: u64::from(history.continuous_window_seconds),
        history_hourly_points: history.hourly_recovery_points,
        ..Default::default()
    };
    let reply =
        control(agent, ctx, async |mut c| c.enable_replication(spec.clone()).await.map(|r| r.into_inner()))
            .await?;
    if reply.accepted { Ok(()) } else { Err(reply.message) }
}

async fn fail_with(
    vmr: &VMReplication,
    ctx: &Context,
    mut status: FailoverStatus,
    why: String,
) -> Result<Option<std::time::Duration>, Error> {
    status.phase = FailoverPhase::Failed;
    status.end_time = Some(Time((ctx.site.now)()));
    status.message = Some(why.clone());
    write(vmr, ctx, &status).await?;
    event(ctx, vmr, EventType::Warning, "PlannedFailoverFailed", why).await;
    Ok(None)
}

/// After a failover to this side: the agent keeps serving the VM's disks.
/// One that restarted serves nothing until asked again: it is asked again
/// (the promotion, and the replication out of here, are idempotent and
/// reopen the disks with their logs as they were). When to look again.
pub async fn keep_serving(vmr: &VMReplication, ctx: &Context) -> Result<Option<std::time::Duration>, Error> {
    let Some(l) = vmr.status.as_ref().and_then(|s| s.last_failover.as_ref()) else { return Ok(None) };
    let unplanned = l.failover_type == FailoverType::Unplanned
        && matches!(l.phase, FailoverPhase::WaitingCompletion | FailoverPhase::Completed);
    let planned =
        l.failover_type == FailoverType::Planned && l.phase == FailoverPhase::Completed && l.took_over;
    if !(planned || unplanned) || vmr.spec.role == vmreplica_crds::Role::Primary {
        return Ok(None);
    }
    let Some((agent, status)) = located(vmr, ctx).await? else {
        // The agent is not back (or not configured) yet.
        return Ok(Some(ctx.poll));
    };
    let (vm_id, uid) = (status.replicas[0].vm_id.clone(), vmr.uid().unwrap_or_default());
    if serves(&status, &vm_id, &uid) {
        return Ok(Some(ctx.poll));
    }
    let disks = status.replicas;
    let copy = if unplanned { failover_copy_name(vmr) } else { String::new() };
    let reply = promote(&agent, ctx, &vm_id, &uid, copy, false).await.map_err(Error::Agent)?;
    if let Some(to) = l.reversed_to.as_deref() {
        replicate_promoted(vmr, ctx, &agent, &disks, to).await.map_err(Error::Agent)?;
    }
    let note = format!(
        "the agent on {} served nothing (it restarted): the VM's disks are served again at {}{}",
        agent.node,
        reply.exports.join(", "),
        l.reversed_to.as_deref().map(|to| format!(", replicating to {to}")).unwrap_or_default()
    );
    tracing::warn!(vm = %vm_id, "{note}");
    event(ctx, vmr, EventType::Warning, "DisksServedAgain", note).await;
    Ok(Some(ctx.poll))
}

/// The split-brain guard: a primary that replicated a moment ago is
/// running, so the failover waits (unless forced); when to look again.
async fn split_brain_guard(
    vmr: &VMReplication,
    ctx: &Context,
    f: &vmreplica_crds::FailoverRequest,
    same: Option<&FailoverStatus>,
    status: &mut FailoverStatus,
    disks: &[ReplicaDisk],
    now_ms: u64,
) -> Result<Option<std::time::Duration>, Error> {
    let contact = disks.iter().map(|d| d.last_contact_unix_ms).max().unwrap_or(0);
    if f.force || contact == 0 || now_ms.saturating_sub(contact) >= PRIMARY_ALIVE_MS {
        return Ok(None);
    }
    let message = format!(
        "refused: the primary replicated {} s ago, so it is probably running (two running copies would \
         diverge). Stop it, or set force: true to fail over anyway",
        now_ms.saturating_sub(contact) / 1000
    );
    if same.and_then(|l| l.message.as_deref()) != Some(message.as_str()) {
        status.message = Some(message.clone());
        write(vmr, ctx, status).await?;
        event(ctx, vmr, EventType::Warning, "UnplannedFailoverRefused", message).await;
    }
    Ok(Some(std::time::Duration::from_secs(5)))
}

/// Whether the agent that reported `status` serves VM `vm_id` for object
/// `uid` (it was promoted there).
fn serves(status: &AgentStatus, vm_id: &str, uid: &str) -> bool {
    status.vms.iter().any(|v| v.vm_id == vm_id && v.uid == uid)
}

/// The name of the copy an unplanned failover runs the VM on.
pub fn failover_copy_name(vmr: &VMReplication) -> String {
    format!("{}-failover", vmr.name_any())
}

/// A primary that opened its replica this recently is taken to be running.
pub const PRIMARY_ALIVE_MS: u64 = 60_000;

/// Unplanned failover, replica side: refuse while the primary looks alive
/// (unless forced), run the VM on a copy of the chosen point and wait for
/// Complete (old primary refused, other points folded away) or Cancel
/// (request removed: the copy goes, the replica is a replica again). Returns
/// when to look again.
pub async fn unplanned_replica(
    vmr: &VMReplication,
    ctx: &Context,
) -> Result<Option<std::time::Duration>, Error> {
    use crate::power::{Power, VmPower};
    let request = vmr.spec.failover.as_ref().filter(|f| f.failover_type == FailoverType::Unplanned);
    let last = vmr
        .status
        .as_ref()
        .and_then(|s| s.last_failover.clone())
        .filter(|l| l.failover_type == FailoverType::Unplanned);
    let uid = vmr.metadata.uid.clone().unwrap_or_default();
    let Some(f) = request else {
        // Cancel: the request went while waiting for completion.
        let Some(mut l) = last.filter(|l| l.phase == FailoverPhase::WaitingCompletion) else {
            return Ok(None);
        };
        let Some((agent, disks)) = locate(vmr, ctx).await? else {
            return Err(Error::Agent("no live replica agent holds this VM".into()));
        };
        let req = vmreplica_api::control::RemoveRequest { vm_id: disks[0].vm_id.clone(), uid: uid.clone() };
        control(&agent, ctx, async |mut c| c.remove_replication(req.clone()).await.map(|r| r.into_inner()))
            .await
            .map_err(Error::Agent)?;
        delete_all(&agent, ctx, &disks, &failover_copy_name(vmr)).await.map_err(Error::Agent)?;
        l.phase = FailoverPhase::Cancelled;
        l.end_time = Some(Time((ctx.site.now)()));
        l.message = Some("cancelled: the failover copy was deleted; this is a replica again, and another point may be chosen".into());
        record(vmr, ctx, &l, EventType::Normal, "UnplannedFailoverCancelled").await?;
        return Ok(None);
    };
    let same = last.as_ref().filter(|l| l.id == f.id);
    if same.is_some_and(|l| matches!(l.phase, FailoverPhase::Completed | FailoverPhase::Failed)) {
        return Ok(None);
    }
    let Some((agent, reported)) = located(vmr, ctx).await? else {
        return Err(Error::Agent("no live replica agent holds this VM".into()));
    };
    let disks = &reported.replicas;
    let vm_id = disks[0].vm_id.clone();
    if let Some(l) = same.filter(|l| l.phase == FailoverPhase::WaitingCompletion) {
        if !f.complete {
            return Ok(None);
        }
        let reply =
            promote(&agent, ctx, &vm_id, &uid, failover_copy_name(vmr), true).await.map_err(Error::Agent)?;
        let mut done = l.clone();
        done.phase = FailoverPhase::Completed;
        done.end_time = Some(Time((ctx.site.now)()));
        done.message = Some(format!(
            "completed: the other recovery points are folded away and the old primary is refused; the VM's disks are {}. \
             It is not protected now: reverse replication after an unplanned failover is not built yet (it needs \
             the block-hash resync), so protecting it again means enabling replication anew, with a full network copy",
            reply.exports.join(", ")
        ));
        write_completed(vmr, ctx, &done, reply.epoch, "UnplannedFailoverCompleted").await?;
        return Ok(None);
    }
    let now_ms = (ctx.site.now)().as_millisecond().max(0) as u64;
    let started = same.and_then(|l| l.start_time.clone()).unwrap_or_else(|| Time((ctx.site.now)()));
    let mut status = begin(f, FailoverPhase::Pending, started);
    status.forced = f.force;
    let refs: Vec<&ReplicaDisk> = disks.iter().collect();
    // A controller stopped after the promotion (status still says
    // PreparingDisks): the copy is the VM's disk now, and choosing a point
    // again or rewriting the copy under the running VM would lose its writes.
    let chosen =
        same.filter(|l| l.phase == FailoverPhase::PreparingDisks).and_then(|l| l.recovery_point.clone());
    let point = match chosen {
        Some(point) if serves(&reported, &vm_id, &uid) => {
            status.phase = FailoverPhase::PreparingDisks;
            status.recovery_point = Some(point.clone());
            point
        }
        _ => {
            if let Some(wait) = split_brain_guard(vmr, ctx, f, same, &mut status, disks, now_ms).await? {
                return Ok(Some(wait));
            }
            let (point, per_disk) = match choose_points(&refs, &f.recovery_point) {
                Ok(c) => c,
                Err(why) => {
                    status.phase = FailoverPhase::Failed;
                    status.message = Some(why.clone());
                    write(vmr, ctx, &status).await?;
                    event(ctx, vmr, EventType::Warning, "UnplannedFailoverFailed", why).await;
                    return Ok(None);
                }
            };
            status.phase = FailoverPhase::PreparingDisks;
            status.recovery_point = Some(point.clone());
            status.message = Some(format!("rolling to point {point}"));
            write(vmr, ctx, &status).await?;
            if f.force {
                event(
                    ctx,
                    vmr,
                    EventType::Warning,
                    "UnplannedFailoverForced",
                    "force: true overrides the split-brain guard".into(),
                )
                .await;
            }
            materialize_all(&agent, ctx, disks, &per_disk, &failover_copy_name(vmr))
                .await
                .map_err(Error::Agent)?;
            point
        }
    };
    let reply =
        promote(&agent, ctx, &vm_id, &uid, failover_copy_name(vmr), false).await.map_err(Error::Agent)?;
    let power = VmPower::for_vmr(ctx.site.client.clone(), vmr);
    power.set_network(&vmr.spec.failover_network).await.map_err(Error::Read)?;
    if f.start_vm {
        power.set_running(true).await.map_err(Error::Read)?;
    }
    let (window, newest_ms) = data_loss_window(&refs, &point);
    status.phase = FailoverPhase::WaitingCompletion;
    status.data_loss_window_seconds = window;
    let last_replicated = newest_ms
        .and_then(|ms| k8s_openapi::jiff::Timestamp::from_millisecond(ms as i64).ok())
        .map_or_else(|| "never".to_owned(), |t| t.to_string());
    status.message = Some(format!(
        "the VM runs on point {point} at {}; set complete: true to keep it (the other points are folded away), \
         or remove the request to cancel. Data-loss window: {}s of replicated writes after the point; the \
         primary's last write to reach this site was sealed at {last_replicated}, anything it wrote after that \
         never arrived",
        reply.exports.join(", "),
        window.unwrap_or(0)
    ));
    record(vmr, ctx, &status, EventType::Normal, "UnplannedFailoverWaitingCompletion").await?;
    Ok(None)
}

#[cfg(test)]
mod tests {
    use vmreplica_api::control::RecoveryPoint as Point;

    use super::*;

    fn disk(name: &str, points: &[(u64, u64)]) -> ReplicaDisk {
        ReplicaDisk {
            vm_id: "a.db".into(),
            disk_id: name.into(),
            points: points
                .iter()
                .map(|&(seq, t)| Point { seq, time_unix_ms: t, kind: "Standard".into() })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn the_data_loss_window_counts_replicated_writes_after_the_point_not_the_clock() {
        let root = disk("root", &[(5, 1_000), (9, 7_000), (12, 13_000)]);
        let mut data = disk("data", &[(4, 7_003)]);
        data.last_applied_sealed_unix_ms = 14_500;
        assert_eq!(
            data_loss_window(&[&root, &data], "12"),
            (Some(1), Some(14_500)),
            "newest write 1.5 s later"
        );
        assert_eq!(
            data_loss_window(&[&root], "12"),
            (Some(0), Some(13_000)),
            "the newest point loses nothing"
        );
        assert_eq!(data_loss_window(&[&root], "9"), (Some(6), Some(13_000)));
        assert_eq!(data_loss_window(&[&disk("x", &[])], "latest"), (Some(0), None));
    }

    #[test]
    fn each_disk_goes_to_its_state_at_the_chosen_cycle() {
        // root written in cycles at t=1000, 2000, 3000; data at 2000 (sealed 3 ms later) only.
        let root = disk("root", &[(5, 1000), (9, 2000), (12, 3000)]);
        let data = disk("data", &[(4, 2003)]);
        let fresh = disk("logs", &[]);
        let (point, per) = choose_points(&[&root, &data, &fresh], "latest").unwrap();
        assert_eq!(point, "12");
        assert_eq!((per["root"], per["data"], per["logs"]), (12, 4, 0));
        let (_, per) = choose_points(&[&root, &data, &fresh], "9").unwrap();
        assert_eq!((per["root"], per["data"]), (9, 4), "the same cycle, sealed a little later");
        let err = choose_points(&[&root, &data], "5").unwrap_err();
        assert!(err.contains("disk data has no recovery point as old as 5"), "{err}");
        let err = choose_points(&[&root], "7").unwrap_err();
        assert!(err.contains("not (or no longer) on the replica"), "{err}");
        assert!(choose_points(&[&root], "yesterday").unwrap_err().contains("not a point id"));
    }
}
