//! One observation per reconcile pass: the agents' Leases once, each agent's
//! status at most once, the VM's power only when a failover needs it, and the
//! monitoring settings of the site. The decisions (`primary`, `replica`,
//! `failover`, `extended`) read only this.
//!
//! ```text
//!  Leases ─▶ agents ─▶ primary role: the chosen agent's GetStatus
//!                   └▶ this VM's replicas: each live replica-capable agent's GetStatus
//!                      (the primary agent's answer reused when it is the same agent)
//!  spec.vm ─▶ power state (KubeVirt), when a failover is active
//! ```

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::{Api, ResourceExt};
use vmreplica_api::control::AgentStatus;
use vmreplica_crds::{FailoverPhase, FailoverType, ReplicationServer, Role, VMReplication};

use super::{
    monitoring::{Monitoring, parse_interval, parse_time_of_day},
    primary::{choose_agent, vm_id},
    replica::{REPLICA_OF, replica_name},
};
use crate::{
    Error, agent_client,
    agents::Agent,
    context::Context,
    power::{Power, PowerState, VmPower},
};

/// This VM's replicas on one of this site's agents, and what else that agent
/// reported in the same call (its `replicas` are only this VM's disks).
#[derive(Clone, Debug)]
pub struct Located {
    pub agent: Agent,
    pub status: AgentStatus,
}

impl Located {
    /// The VM id the replicas carry.
    pub fn vm_id(&self) -> &str {
        &self.status.replicas[0].vm_id
    }

    /// Whether the agent serves the VM for object `uid` (it was promoted there).
    pub fn serves(&self, uid: &str) -> bool {
        let vm = self.vm_id();
        self.status.vms.iter().any(|v| v.vm_id == vm && v.uid == uid)
    }
}

/// The agent chosen to serve a Primary object's disks and what it reported
/// (or why it could not be read), or why no agent serves them.
pub type Serving = Result<(Agent, Result<AgentStatus, String>), String>;

/// What one pass knows about one VMReplication.
pub struct Observation {
    pub now: Timestamp,
    pub agents: Vec<Agent>,
    /// Primary role: the agent that serves the disks (or why there is none),
    /// and what it reported (or why it could not be read).
    pub primary: Option<Serving>,
    /// This VM's replicas held by an agent of this site, when asked for.
    pub replica: Option<Located>,
    /// The VM's power, when a failover is active.
    pub power: Option<PowerState>,
    pub monitoring: Monitoring,
}

/// Whether a failover is in progress or governs this object (its power and,
/// for a primary, this site's replicas of it, are needed).
fn failover_active(vmr: &VMReplication) -> bool {
    let last = vmr.status.as_ref().and_then(|s| s.last_failover.as_ref());
    let requested = vmr.spec.failover.as_ref().is_some_and(|f| f.failover_type != FailoverType::Test);
    let governs = last.is_some_and(|l| {
        l.failover_type == FailoverType::Planned && l.phase == FailoverPhase::Completed
            || !matches!(l.phase, FailoverPhase::Completed | FailoverPhase::Failed | FailoverPhase::Cancelled)
    });
    requested || governs
}

/// Whether a planned failover is to stop the VM (starting, or waiting for it
/// to stop): its power state decides the next step.
fn stopping(vmr: &VMReplication) -> bool {
    let last = vmr.status.as_ref().and_then(|s| s.last_failover.as_ref());
    vmr.spec.failover.as_ref().filter(|f| f.failover_type == FailoverType::Planned).is_some_and(|f| {
        last.is_none_or(|l| l.id != f.id || l.phase == FailoverPhase::StoppingVM || l.took_over)
    })
}

/// Observes `vmr` for one pass.
pub async fn observe(vmr: &VMReplication, ctx: &Context) -> Result<Observation, Error> {
    let now = ctx.now();
    let agents = ctx.site.agents().await?;
    let active = failover_active(vmr);
    let primary_role = vmr.spec.role == Role::Primary;
    let primary = if primary_role {
        Some(match choose_agent(vmr, &agents) {
            Ok(a) => {
                let a = a.clone();
                let status = agent_client::status(&a, ctx).await.map_err(String::from);
                Ok((a, status))
            }
            Err(why) => Err(why),
        })
    } else {
        None
    };
    // Replication reversed onto this side's own disks (after a failover):
    // its primary agent reports them as replicas, and the object shows them.
    let reversed_here = matches!(&primary, Some(Ok((_, Ok(s))))
        if s.replicas.iter().any(|d| d.reverse && d.vm_id == vm_id(vmr)));
    let replica = if !primary_role || active || reversed_here {
        let reuse = match &primary {
            Some(Ok((a, Ok(s)))) => Some((a, s)),
            _ => None,
        };
        locate(vmr, ctx, &agents, reuse).await
    } else {
        None
    };
    let power = if stopping(vmr) {
        Some(
            VmPower::for_vmr(ctx.site.client.clone(), vmr)
                .state()
                .await
                .map_err(Error::power("reading its state"))?,
        )
    } else {
        None
    };
    let monitoring =
        if primary_role { monitoring(ctx, primary.as_ref()).await? } else { Monitoring::default() };
    Ok(Observation { now, agents, primary, replica, power, monitoring })
}

/// The replica-capable agent holding this VM's replicas (a Primary object's
/// VM comes back here only as a reverse replica).
pub(crate) async fn locate(
    vmr: &VMReplication,
    ctx: &Context,
    agents: &[Agent],
    reuse: Option<(&Agent, &AgentStatus)>,
) -> Option<Located> {
    let name = vmr.name_any();
    let wanted =
        if vmr.spec.role == Role::Primary { Some(vm_id(vmr)) } else { vmr.labels().get(REPLICA_OF).cloned() };
    for agent in agents.iter().filter(|a| a.live && a.capabilities.iter().any(|c| c == "replica")) {
        if vmr.spec.node.as_ref().is_some_and(|n| *n != agent.node) {
            continue;
        }
        let status = match reuse.filter(|(a, _)| a.node == agent.node) {
            Some((_, s)) => s.clone(),
            None => match agent_client::status(agent, ctx).await {
                Ok(s) => s,
                Err(why) => {
                    tracing::debug!(node = %agent.node, error = %why, "reading a replica agent");
                    continue;
                }
            },
        };
        let mut status = status;
        status.replicas.retain(|d| match &wanted {
            Some(id) => d.vm_id == *id,
            None => replica_name(&d.vm_id) == name,
        });
        if !status.replicas.is_empty() {
            return Some(Located { agent: agent.clone(), status });
        }
    }
    None
}

/// The monitoring settings of the ReplicationServer that selects the VM's
/// agent (Hyper-V's are per host); the defaults when none does.
async fn monitoring(ctx: &Context, primary: Option<&Serving>) -> Result<Monitoring, Error> {
    let servers = Api::<ReplicationServer>::all(ctx.site.client.clone())
        .list(&Default::default())
        .await
        .map_err(Error::read("ReplicationServers"))?;
    let agent = primary.and_then(|p| p.as_ref().ok()).map(|(a, _)| a);
    let rs = agent.and_then(|a| servers.items.iter().find(|rs| crate::site::selects(rs, a)));
    let d = Monitoring::default();
    Ok(Monitoring {
        interval: rs.and_then(|r| parse_interval(&r.spec.monitoring_interval)).unwrap_or(d.interval),
        start_of_day_min: rs
            .and_then(|r| parse_time_of_day(&r.spec.monitoring_start_time))
            .unwrap_or(d.start_of_day_min),
        lag_warning: rs
            .map_or(d.lag_warning, |r| Duration::from_secs(u64::from(r.spec.lag_warning_threshold_seconds))),
    })
}
