//! The VMReplication reconciler: one pass observes, decides and acts.
//!
//! ```text
//!  observe (observe.rs) ─▶ decide, pure ─▶ act (act.rs)
//!     Leases, agents'        primary.rs    agent calls, VM power,
//!     status once, power,    replica.rs    status and Events
//!     monitoring             failover.rs
//!                            extended.rs
//! ```
//!
//! A Primary object replicates (or, while a planned failover governs it, its
//! state is held); a Replica object carries out failover requests and
//! extended replication — its replication status comes from the replica-site
//! report (`crate::replica_site`). A step that waits is a requeue, never a
//! sleep.

pub mod act;
pub mod extended;
pub mod failover;
pub mod monitoring;
pub mod observe;
pub mod primary;
pub mod replica;
pub mod write;

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use kube::{
    Api, ResourceExt,
    runtime::{
        Controller,
        controller::Action,
        events::EventType,
        finalizer::{Event as Finalizing, finalizer},
        watcher,
    },
};
use vmreplica_crds::{Health, ReplicationState, Role, VMReplication};

use self::{
    failover::{Facts, Plan},
    monitoring::window_start,
    observe::{Observation, observe},
    primary::{
        Baseline, Outcome, StatusInputs, agent_spec, build_status, in_window, lag, needs_enable, view, vm_id,
    },
    write::write_failover,
};
use crate::{
    Error, agent_client,
    context::Context,
    power::{Power, PowerState, VmPower},
    status::{event, health_name, state_name},
};

/// Objects reconciled at once.
pub const CONCURRENCY: u16 = 32;

/// Removes replication from the agent before the object goes.
pub const FINALIZER: &str = "vmreplica.io/replication";

/// How soon a pass that acted looks again when its plan does not say.
const AFTER_ACTING: Duration = Duration::from_secs(5);

fn facts<'a>(vmr: &'a VMReplication, obs: &'a Observation, ctx: &Context) -> Facts<'a> {
    Facts {
        vmr,
        now: obs.now,
        replica: obs.replica.as_ref(),
        primary_agent: matches!(obs.primary, Some(Ok(_))),
        serves_vm: matches!(&obs.primary, Some(Ok((_, Ok(s)))) if s.vms.iter().any(|v| v.vm_id == primary::vm_id(vmr))),
        power: obs.power,
        poll: ctx.poll,
    }
}

/// Carries out a failover plan other than Idle and Hold: when to look
/// again, if it decided this pass.
async fn failover(
    ctx: &Context,
    vmr: &VMReplication,
    obs: &Observation,
    plan: Plan,
) -> Result<Option<Duration>, Error> {
    match plan {
        Plan::Idle | Plan::Hold(..) => Ok(None),
        Plan::Wait { status, note, again } => {
            let last = vmr.status.as_ref().and_then(|s| s.last_failover.as_ref());
            if let Some(s) = status.filter(|s| last != Some(s)) {
                write_failover(ctx, vmr, &s, None).await?;
                if let Some(n) = &note {
                    act::publish(ctx, vmr, n).await;
                }
            }
            Ok(Some(again))
        }
        Plan::NoAgent(what) => {
            Err(Error::NoAgent { what, why: "no live replica agent holds this VM".into() })
        }
        Plan::Run(run) => {
            act::run(ctx, vmr, obs, &run).await?;
            Ok(Some(run.again.unwrap_or(ctx.poll.min(AFTER_ACTING))))
        }
    }
}

async fn apply(vmr: Arc<VMReplication>, ctx: Arc<Context>) -> Result<Action, Error> {
    let obs = observe(&vmr, &ctx).await?;
    if vmr.spec.role != Role::Primary {
        return replica_pass(&vmr, &ctx, &obs).await;
    }
    match failover::primary_plan(&facts(&vmr, &obs, &ctx)) {
        Plan::Hold(state, last) => {
            let next = primary::held_status(&vmr, state, &last, obs.now);
            write::write(&ctx, &vmr, &next).await?;
            Ok(Action::requeue(ctx.poll))
        }
        Plan::Idle => replicate(&vmr, &ctx, &obs).await,
        plan => Ok(Action::requeue(failover(&ctx, &vmr, &obs, plan).await?.unwrap_or(ctx.poll))),
    }
}

/// A Replica object: its failover requests, then its extended replication.
async fn replica_pass(vmr: &VMReplication, ctx: &Context, obs: &Observation) -> Result<Action, Error> {
    let plan = failover::replica_plan(&facts(vmr, obs, ctx));
    let waiting = matches!(plan, Plan::Wait { .. });
    let again = failover(ctx, vmr, obs, plan).await?;
    if let Some(a) = again.filter(|_| !waiting) {
        // It acted: the observation is stale, the next pass goes on.
        return Ok(Action::requeue(a));
    }
    let extended = act::extend(ctx, vmr, obs, extended::plan(vmr, obs.replica.as_ref(), ctx.poll)).await?;
    Ok(match again.into_iter().chain(extended).min() {
        Some(d) => Action::requeue(d),
        None => Action::await_change(),
    })
}

/// What the agent serving the VM reports of it, enabling it first where it
/// does not protect it for this object at this generation.
async fn outcome(vmr: &VMReplication, ctx: &Context, obs: &Observation) -> Outcome {
    let spec = match agent_spec(vmr) {
        Ok(s) => s,
        Err(message) => return Outcome::Invalid { reason: "InvalidSpec", message },
    };
    let (agent, status) = match &obs.primary {
        Some(Ok((a, s))) => (a, s),
        Some(Err(message)) => return Outcome::Invalid { reason: "NoAgent", message: message.clone() },
        None => return Outcome::Invalid { reason: "NoAgent", message: "no agent was looked for".into() },
    };
    let mut status = match status {
        Ok(s) => s.clone(),
        Err(why) => return Outcome::AgentUnavailable(why.clone()),
    };
    if needs_enable(&spec, &status) {
        match agent_client::enable(agent, ctx, &spec).await {
            Err(why) => return Outcome::AgentUnavailable(why.into()),
            Ok(r) if !r.accepted => {
                let message = format!("the agent on node {} refused: {}", agent.node, r.message);
                return Outcome::Invalid { reason: "AgentRefused", message };
            }
            Ok(_) => {}
        }
        status = match agent_client::status(agent, ctx).await {
            Ok(s) => s,
            Err(why) => return Outcome::AgentUnavailable(why.into()),
        };
    }
    let mut v = view(&spec.vm_id, &status.primaries);
    let protected = status.vms.iter().filter(|m| m.vm_id == spec.vm_id);
    v.fenced_epoch = protected.clone().map(|m| m.fenced_epoch).max().unwrap_or(0);
    if let Some(m) = protected.max_by_key(|m| m.generation) {
        v.thaw_pending = m.thaw_pending;
        v.quiesce_failed = (!m.quiesce_error.is_empty()
            && m.quiesce_error_unix_ms >= m.last_app_consistent_unix_ms)
            .then(|| (m.quiesce_error_unix_ms as i64, m.quiesce_error.clone()));
    }
    Outcome::Enabled(Box::new(v))
}

/// A Primary object replicating: ask, read, write status, record metrics.
async fn replicate(vmr: &VMReplication, ctx: &Context, obs: &Observation) -> Result<Action, Error> {
    let outcome = outcome(vmr, ctx, obs).await;
    if let Outcome::Enabled(v) = &outcome
        && v.fenced_epoch > 0
    {
        fence(vmr, ctx, v.fenced_epoch).await?;
    }
    let uid = vmr.uid().unwrap_or_default();
    let now_ms = obs.now.as_millisecond();
    let previous = vmr.status.clone().unwrap_or_default();
    let m = obs.monitoring;
    let window_start_ms = window_start(now_ms, m.interval, m.start_of_day_min);
    let (window, rate) = match &outcome {
        Outcome::Enabled(v) => {
            let fresh = Baseline {
                window_start_ms,
                successful: v.successful,
                missed: v.missed,
                errors: v.errors,
                segments: v.segments,
                raw_bytes: v.raw_bytes,
                latency_total_ms: v.latency_total_ms,
            };
            let window = in_window(v, &ctx.window(&uid, window_start_ms, fresh));
            // The rate of the long operation running: an initial copy or a resync.
            let done = match primary::state(vmr.spec.suspended, &outcome, previous.state) {
                ReplicationState::WaitingForInitialReplication => Some(v.copy_done),
                ReplicationState::Resynchronizing => v.resyncing.as_ref().map(|r| r.done),
                _ => None,
            };
            let rate = if let Some(now_done) = done {
                match ctx.sample(&uid, now_ms, now_done) {
                    Some((t, done)) if now_ms > t && now_done >= done => {
                        Some((now_done - done) * 1000 / (now_ms - t) as u64)
                    }
                    _ => None,
                }
            } else {
                ctx.forget_sample(&uid);
                None
            };
            (window, rate)
        }
        _ => (Baseline { window_start_ms, ..Default::default() }, None),
    };
    let mut next = build_status(vmr, &outcome, &StatusInputs { now: obs.now, window, rate, monitoring: m });
    // Taken back after failing over: the diverged point kept here (written
    // out at the promotion) is still listed, and spec.divergedPoint acts on it.
    if let Some(loc) = &obs.replica {
        let disks: Vec<&vmreplica_api::control::ReplicaDisk> = loc.status.replicas.iter().collect();
        next.diverged_point = crate::replica_site::diverged_point(ctx, vmr, &disks, &loc.agent).await;
    }
    write::write(ctx, vmr, &next).await?;
    let (shipped, lag_seconds) = match &outcome {
        Outcome::Enabled(v) => (v.raw_bytes, lag(v, now_ms).map(|l| l.as_secs_f64())),
        _ => (0, None),
    };
    ctx.site.metrics.vm(crate::telemetry::VmReport {
        vm: &vm_id(vmr),
        state: state_name(next.state),
        health: health_name(next.health),
        health_level: next.health as i64,
        bytes_shipped: shipped,
        lag_seconds,
    });
    let settled = matches!(next.state, ReplicationState::Replicating | ReplicationState::Suspended)
        && next.health == Health::Normal;
    Ok(Action::requeue(if settled { ctx.poll } else { ctx.poll.min(Duration::from_secs(5)) }))
}

/// The agent fenced the VM (its disks are read-only): its VM is stopped
/// through the power runtime, with an Event the first time.
async fn fence(vmr: &VMReplication, ctx: &Context, epoch: u64) -> Result<(), Error> {
    let power = VmPower::for_vmr(ctx.site.client.clone(), vmr);
    let state = power.state().await.map_err(Error::power("reading its state"))?;
    let running = !matches!(state, PowerState::Stopped | PowerState::Missing);
    if running {
        power.set_running(false).await.map_err(Error::power("stopping the fenced VM"))?;
    }
    let already = vmr
        .status
        .as_ref()
        .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready" && c.reason == "Fenced"));
    if !already || running {
        let text = primary::fenced_text(epoch);
        ctx.publish(vmr, event(EventType::Warning, "Fenced", "Fence", text)).await;
    }
    Ok(())
}

async fn cleanup(vmr: Arc<VMReplication>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.site.metrics.forget_vm(&vm_id(&vmr));
    let uid = vmr.uid().unwrap_or_default();
    ctx.forget(&uid);
    let agents = ctx.site.agents().await?;
    if vmr.spec.role != Role::Primary {
        return remove_replica(&vmr, &ctx, &agents).await;
    }
    let Ok(agent) = primary::choose_agent(&vmr, &agents) else {
        // No agent was ever chosen, or its node is gone with its Lease: nothing to remove.
        return Ok(Action::await_change());
    };
    if !agent.live {
        let note = format!(
            "the agent on node {} is not running: replication is forgotten here, and its log stays on that node until \
             the agent removes it",
            agent.node
        );
        ctx.publish(&vmr, event(EventType::Warning, "RemovedWithoutAgent", "Remove", note)).await;
        return Ok(Action::await_change());
    }
    agent_client::remove_replication(agent, &ctx, &vm_id(&vmr), &uid).await?;
    Ok(Action::await_change())
}

/// A Replica object goes: its test VM and disks are deleted and the replica
/// agent stops accepting the primary (the disks and points stay). With no
/// agent holding the VM (already gone), there is nothing more to remove.
async fn remove_replica(
    vmr: &VMReplication,
    ctx: &Context,
    agents: &[crate::agents::Agent],
) -> Result<Action, Error> {
    act::delete_test_vms(ctx, vmr).await?;
    let Some(loc) = observe::locate(vmr, ctx, agents, None).await else { return Ok(Action::await_change()) };
    let copy = failover::test_copy_name(vmr);
    for d in &loc.status.replicas {
        agent_client::delete_copy(&loc.agent, ctx, &d.vm_id, &d.disk_id, &copy).await.map_err(|message| {
            Error::Agent {
                call: "DeleteMaterialized",
                node: loc.agent.node.clone(),
                message: format!("deleting test disks: {message}"),
            }
        })?;
    }
    for d in &loc.status.replicas {
        agent_client::remove_replica(&loc.agent, ctx, &d.vm_id, &d.disk_id).await?;
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
    ctx.site.metrics.observe("VMReplication", started, result.as_ref().err().map(Error::label));
    result
}

fn error_policy(_vmr: Arc<VMReplication>, e: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(error = %e, "reconciling a VMReplication failed");
    e.action()
}

/// Runs the VMReplication controller until `shutdown` completes.
pub async fn run(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static) {
    let api = match &ctx.namespace {
        Some(ns) => Api::<VMReplication>::namespaced(ctx.site.client.clone(), ns),
        None => Api::<VMReplication>::all(ctx.site.client.clone()),
    };
    // Bounded concurrency: a thousand objects arriving at once queue here
    // instead of all contending for the apiserver and the agents together.
    // A restarted agent serves its VMs' disks again at once, not at their
    // next poll: every VMReplication is reconciled when an agent starts (a
    // steady one's pass asks its agent and writes nothing new; at most
    // CONCURRENCY at a time).
    let started = crate::site::agents_started(&ctx.site);
    Controller::new(api, watcher::Config::default())
        .with_config(kube::runtime::controller::Config::default().concurrency(CONCURRENCY))
        .reconcile_all_on(started)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(crate::log_result)
        .await;
}
