//! Carrying plans out: the only part of a VMReplication pass that calls
//! agents, drives the VM and writes failover and extended-replication status.
//! Each action is one call; what it produced is gathered into an
//! [`Outcome`] for the plan's final status (`failover::finish`).
//!
//! A failed step either records the failover as Failed (the plan says
//! [`OnError::Fail`]) or returns the error so the pass is retried; a failure
//! to read or drive the VM, or to write status, is always retried.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{ResourceExt, runtime::events::EventType};
use vmreplica_api::control::{DiskSpec, MaterializeRequest, PromoteRequest, ReplicaDisk, VmReplicationSpec};
use vmreplica_crds::{FailoverPhase, FailoverStatus, Role, VMReplication, VmRuntime};

use super::{
    extended,
    failover::{Action, Done, Note, OnError, Outcome, Run, finish, test_vm_name},
    observe::{Located, Observation},
    primary::{self, vm_id},
    write::{write_extended, write_failover},
};
use crate::{
    Error,
    agent_client::{self, CallError},
    agents::Agent,
    context::Context,
    power::{self, Power, VmPower},
    status::event,
};

/// Why a step failed.
enum Failure {
    /// The step could not be carried out: the plan's [`OnError`] applies.
    Step(String),
    /// The agent was not reached (restarting, down, not answering in time):
    /// retried for [`UNREACHABLE_GRACE_MS`] from the failover's start, then
    /// as a [`Failure::Step`]. Every step may be repeated (a controller
    /// restarted mid-step repeats it too).
    Unreachable(String),
    /// The apiserver or the VM runtime: retried whatever the plan says.
    Retry(Error),
}

/// How long a failover waits for an agent it cannot reach before a plan that
/// fails on errors gives up: an agent restarting (a crash, a rollout of the
/// DaemonSet) is back well within it.
pub const UNREACHABLE_GRACE_MS: i64 = 300_000;

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Retry(e)
    }
}

impl From<CallError> for Failure {
    fn from(e: CallError) -> Self {
        Failure::step(e, "")
    }
}

impl Failure {
    /// A failed agent call, its message prefixed with `context`.
    fn step(e: CallError, context: &str) -> Self {
        let message = format!("{context}{}", e.message);
        if e.unreachable { Failure::Unreachable(message) } else { Failure::Step(message) }
    }
}

/// Emits `note` as a Failover Event.
pub async fn publish(ctx: &Context, vmr: &VMReplication, note: &Note) {
    let type_ = if note.warning { EventType::Warning } else { EventType::Normal };
    ctx.publish(vmr, event(type_, note.reason, "Failover", note.text.clone())).await;
}

/// Carries out `run` on what `obs` observed.
pub async fn run(ctx: &Context, vmr: &VMReplication, obs: &Observation, run: &Run) -> Result<(), Error> {
    let mut current = run.status.clone();
    if run.write_first {
        write_failover(ctx, vmr, &current, None).await?;
    }
    if let Some(n) = &run.note {
        publish(ctx, vmr, n).await;
    }
    let mut out = Outcome {
        node: obs.replica.as_ref().map(|l| l.agent.node.clone()).unwrap_or_default(),
        ..Default::default()
    };
    for action in &run.actions {
        match step(ctx, vmr, obs, action, &mut current, &mut out).await {
            Ok(()) => {
                if matches!(action, Action::Promote { .. }) && matches!(run.done, Done::TookOver { .. }) {
                    current.took_over = true;
                }
            }
            Err(Failure::Retry(e)) => return Err(e),
            Err(Failure::Unreachable(why)) if within_grace(&current, ctx.now()) => {
                current.message = Some(format!("waiting for the agent (retried every 5 s): {why}"));
                write_failover(ctx, vmr, &current, None).await?;
                return Err(Error::Agent { call: name(action), node: out.node.clone(), message: why });
            }
            Err(Failure::Step(why) | Failure::Unreachable(why)) => {
                return match run.on_error {
                    OnError::Retry => {
                        Err(Error::Agent { call: name(action), node: out.node.clone(), message: why })
                    }
                    OnError::Fail(reason) => fail(ctx, vmr, current, why, reason).await,
                };
            }
        }
    }
    let (status, note, epoch) = finish(vmr, run, &out, Time(ctx.now()));
    if let Some(s) = status {
        write_failover(ctx, vmr, &s, epoch).await?;
    }
    if let Some(n) = note {
        if matches!(run.done, Done::ServedAgain { .. }) {
            tracing::warn!(vm = %vm_id(vmr), "{}", n.text);
        }
        publish(ctx, vmr, &n).await;
    }
    Ok(())
}

/// Whether a failover begun at `status.start_time` still waits for an
/// unreachable agent at `now`.
fn within_grace(status: &FailoverStatus, now: k8s_openapi::jiff::Timestamp) -> bool {
    status
        .start_time
        .as_ref()
        .is_none_or(|t| now.as_millisecond() - t.0.as_millisecond() <= UNREACHABLE_GRACE_MS)
}

/// Records the failover as Failed with `why`.
async fn fail(
    ctx: &Context,
    vmr: &VMReplication,
    mut status: FailoverStatus,
    why: String,
    reason: &'static str,
) -> Result<(), Error> {
    status.phase = FailoverPhase::Failed;
    status.end_time = Some(Time(ctx.now()));
    status.message = Some(why.clone());
    write_failover(ctx, vmr, &status, None).await?;
    publish(ctx, vmr, &Note { warning: true, reason, text: why }).await;
    Ok(())
}

/// The name an action's failure is reported under.
fn name(action: &Action) -> &'static str {
    match action {
        Action::Progress(..) => "WriteStatus",
        Action::StopVm => "StopVM",
        Action::StartVm => "StartVM",
        Action::SetNetwork => "SetNetwork",
        Action::PrepareFailover => "PrepareFailover",
        Action::DeleteTestVms => "DeleteTestVMs",
        Action::Materialize { .. } => "MaterializePoint",
        Action::CreateTestVm => "CreateTestVM",
        Action::DeleteCopies { .. } => "DeleteMaterialized",
        Action::Promote { .. } => "Promote",
        Action::ReplicateTo { .. } => "EnableReplication",
        Action::RemoveReplication => "RemoveReplication",
        Action::Refuse(_) => "Failover",
    }
}

/// The replica agent an action needs.
fn located(obs: &Observation) -> Result<&Located, Failure> {
    obs.replica.as_ref().ok_or_else(|| Failure::Step("no live replica agent holds this VM".into()))
}

async fn step(
    ctx: &Context,
    vmr: &VMReplication,
    obs: &Observation,
    action: &Action,
    current: &mut FailoverStatus,
    out: &mut Outcome,
) -> Result<(), Failure> {
    let power = || VmPower::for_vmr(ctx.site.client.clone(), vmr);
    match action {
        Action::Progress(phase, message) => {
            current.phase = *phase;
            current.message = Some(message.clone());
            write_failover(ctx, vmr, current, None).await?;
        }
        Action::StopVm => power().set_running(false).await.map_err(Error::power("stopping it"))?,
        Action::StartVm => power().set_running(true).await.map_err(Error::power("starting it"))?,
        Action::SetNetwork => power()
            .set_network(&vmr.spec.failover_network)
            .await
            .map_err(Error::power("setting its network"))?,
        Action::PrepareFailover => out.finals = prepare(ctx, vmr, obs).await?,
        Action::DeleteTestVms => delete_test_vms(ctx, vmr).await?,
        Action::CreateTestVm => {
            out.test_vm = test_vm(ctx, vmr, &out.copy_of).await.map_err(|why| {
                Failure::Step(format!("test disks made ({}), but no test VM: {why}", out.copies.join(", ")))
            })?;
        }
        Action::Materialize { .. }
        | Action::DeleteCopies { .. }
        | Action::Promote { .. }
        | Action::ReplicateTo { .. }
        | Action::RemoveReplication => on_replica(ctx, vmr, located(obs)?, action, out).await?,
        Action::Refuse(why) => return Err(Failure::Step(why.clone())),
    }
    Ok(())
}

/// Deletes the VMs of this object's test failovers (a failure is retried).
pub(super) async fn delete_test_vms(ctx: &Context, vmr: &VMReplication) -> Result<(), Error> {
    let ns = vmr.namespace().unwrap_or_default();
    power::delete_test_vms(ctx.site.client.clone(), &ns, &vmr.name_any()).await.map(drop).map_err(|why| {
        Error::Agent {
            call: "DeleteTestVMs",
            node: String::new(),
            message: format!("deleting the test VM: {why}"),
        }
    })
}

/// Planned failover, the primary's part, on the agent serving the disks:
/// each disk's final sequence, once the replica holds every logged write.
async fn prepare(
    ctx: &Context,
    vmr: &VMReplication,
    obs: &Observation,
) -> Result<Vec<(String, u64)>, Failure> {
    let (agent, vm) = match (vmr.spec.role, &obs.primary) {
        (Role::Primary, Some(Ok((agent, status)))) => {
            // An agent restarted since it last replicated the VM has not
            // been told of it again (a failover holds the primary's pass
            // back): told now, its log recovered, before it prepares.
            if let Ok(status) = status {
                let spec = primary::agent_spec(vmr).map_err(Failure::Step)?;
                if primary::needs_enable(&spec, status) {
                    let reply = agent_client::enable(agent, ctx, &spec).await?;
                    if !reply.accepted {
                        let why =
                            format!("the agent on node {} refused the VM: {}", agent.node, reply.message);
                        return Err(Failure::Step(why));
                    }
                }
            }
            (agent, vm_id(vmr))
        }
        (Role::Primary, _) => return Err(Failure::Step("no agent serves this VM's disks here".into())),
        _ => located(obs).map(|l| (&l.agent, l.vm_id().to_owned()))?,
    };
    let uid = vmr.uid().unwrap_or_default();
    let reply = agent_client::prepare_failover(agent, ctx, &vm, &uid).await?;
    if !reply.synced {
        let detail = if reply.message.is_empty() { format!("{:?}", reply.disks) } else { reply.message };
        return Err(Failure::Step(format!("the replica does not hold every logged write: {detail}")));
    }
    Ok(reply.disks.iter().map(|d| (d.disk_id.clone(), d.last_seq)).collect())
}

/// An action on the replica agent holding the VM (`loc`).
async fn on_replica(
    ctx: &Context,
    vmr: &VMReplication,
    loc: &Located,
    action: &Action,
    out: &mut Outcome,
) -> Result<(), Failure> {
    let uid = vmr.uid().unwrap_or_default();
    match action {
        Action::Materialize { name, per_disk } => {
            for d in &loc.status.replicas {
                let req = MaterializeRequest {
                    vm_id: d.vm_id.clone(),
                    disk_id: d.disk_id.clone(),
                    seq: per_disk.get(&d.disk_id).copied().unwrap_or(0),
                    name: name.clone(),
                    diverged: false,
                };
                let r = agent_client::materialize(&loc.agent, ctx, req)
                    .await
                    .map_err(|e| Failure::step(e, &format!("disk {}: ", d.disk_id)))?;
                out.copies.push(r.path.clone());
                out.copy_of.insert(d.image_path.clone(), r.path);
            }
        }
        Action::DeleteCopies { name } => {
            for d in &loc.status.replicas {
                agent_client::delete_copy(&loc.agent, ctx, &d.vm_id, &d.disk_id, name)
                    .await
                    .map_err(|e| Failure::step(e, &format!("deleting the copies {name}: ")))?;
            }
        }
        Action::Promote { copy, complete } => {
            let req = PromoteRequest {
                vm_id: loc.vm_id().to_owned(),
                uid,
                copy_name: copy.clone(),
                complete: *complete,
            };
            let reply = agent_client::promote(&loc.agent, ctx, req).await?;
            out.exports = reply.exports;
            out.epoch = Some(reply.epoch);
        }
        Action::ReplicateTo { to, what } => {
            replicate_promoted(ctx, vmr, &loc.agent, &loc.status.replicas, to)
                .await
                .map_err(|e| Failure::step(e, &format!("{what}: ")))?;
        }
        Action::RemoveReplication => {
            agent_client::remove_replication(&loc.agent, ctx, loc.vm_id(), &uid).await?;
        }
        other => return Err(Failure::Step(format!("{} is not a call on the replica agent", name(other)))),
    }
    Ok(())
}

/// Replicates the disks promoted on `agent` to the replica server `to`
/// (HOST:PORT), with the object's own frequency, compression and history.
async fn replicate_promoted(
    ctx: &Context,
    vmr: &VMReplication,
    agent: &Agent,
    disks: &[ReplicaDisk],
    to: &str,
) -> Result<(), CallError> {
    let vm_id = disks.first().map(|d| d.vm_id.clone()).unwrap_or_default();
    // The disks as the agent serves them now (after an unplanned failover,
    // the copies of the chosen point, not the replica images).
    let status = agent_client::status(agent, ctx).await?;
    let served = status.vms.iter().find(|v| v.vm_id == vm_id).map(|v| v.disks.clone()).unwrap_or_default();
    if served.is_empty() {
        let message = format!("the agent on {} does not serve {vm_id}'s disks", agent.node);
        return Err(CallError { message, unreachable: false });
    }
    let mut images: Vec<DiskSpec> = served;
    images.sort_by(|a, b| a.name.cmp(&b.name));
    let history = &vmr.spec.recovery_history;
    let spec = VmReplicationSpec {
        vm_id,
        uid: vmr.uid().unwrap_or_default(),
        // Above the promotion's (0).
        generation: vmr.metadata.generation.unwrap_or(1).max(1),
        disks: images,
        replica_address: to.to_owned(),
        interval_seconds: vmr.spec.replication_frequency_seconds,
        compression: vmr.spec.compression_enabled,
        history_window_seconds: u64::from(history.continuous_window_seconds),
        history_hourly_points: history.hourly_recovery_points,
        ..Default::default()
    };
    let reply = agent_client::enable(agent, ctx, &spec).await?;
    if reply.accepted { Ok(()) } else { Err(CallError { message: reply.message, unreachable: false }) }
}

/// Creates the test VM when the object names a KubeVirt VM: the copies
/// (replica image path → test copy) on the test network. Its name, or
/// `None` when there is no VM to copy.
async fn test_vm(
    ctx: &Context,
    vmr: &VMReplication,
    copies: &BTreeMap<String, String>,
) -> Result<Option<String>, String> {
    let Some(vm) = vmr.spec.vm.as_ref().filter(|v| v.runtime == VmRuntime::KubeVirt) else {
        return Ok(None);
    };
    let ns = vmr.namespace().unwrap_or_default();
    let api: kube::Api<kube::api::DynamicObject> =
        kube::Api::namespaced_with(ctx.site.client.clone(), &ns, &power::virtual_machines());
    let source = api
        .get_opt(&vm.name)
        .await
        .map_err(|e| format!("reading VirtualMachine {}: {e}", vm.name))?
        .ok_or_else(|| format!("VirtualMachine {} does not exist in {ns}", vm.name))?;
    let name = test_vm_name(&vm.name);
    let obj = power::test_vm(&source, &name, &vmr.name_any(), copies, vmr.spec.test_network.as_ref())?;
    let owner = kube::Resource::controller_owner_ref(vmr, &()).ok_or("the VMReplication has no uid")?;
    power::create_test_vm(ctx.site.client.clone(), &ns, obj, owner).await?;
    let on = vmr
        .spec
        .test_network
        .as_ref()
        .map_or("no network".to_owned(), |t| format!("network {}", t.network_name));
    Ok(Some(format!("{name} ({on})")))
}

/// Carries out an extended-replication plan; when to look again.
pub async fn extend(
    ctx: &Context,
    vmr: &VMReplication,
    obs: &Observation,
    plan: extended::Plan,
) -> Result<Option<std::time::Duration>, Error> {
    use extended::Plan::*;
    match plan {
        Idle => Ok(None),
        Write { next, again } => {
            write_extended(ctx, vmr, next.as_ref()).await?;
            Ok(again)
        }
        Remove { vm_id } => {
            if let Some(loc) = &obs.replica {
                let req = vmreplica_api::control::ExtendRequest { vm_id, remove: true, ..Default::default() };
                let reply = agent_client::extend(&loc.agent, ctx, req).await?;
                if !reply.accepted {
                    return Err(Error::Agent {
                        call: "ExtendReplication",
                        node: loc.agent.node.clone(),
                        message: reply.message,
                    });
                }
            }
            write_extended(ctx, vmr, None).await?;
            Ok(None)
        }
        Extend { req, accepted, again } => {
            let Some(loc) = &obs.replica else { return Ok(Some(extended::RETRY)) };
            let to = req.replica_address.clone();
            let reply = agent_client::extend(&loc.agent, ctx, req).await?;
            if !reply.accepted {
                write_extended(ctx, vmr, Some(&extended::refused(&to, reply.message))).await?;
                return Ok(Some(extended::RETRY));
            }
            write_extended(ctx, vmr, Some(&accepted)).await?;
            Ok(Some(again))
        }
    }
}
