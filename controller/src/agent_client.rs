//! Calling an agent's control API: one mutual-TLS channel per agent, reused
//! (a TLS handshake per call would dominate a reconcile), and a deadline on
//! every call. Only the act layer and the observation call agents.

use std::time::Duration;

use vmreplica_api::{
    control::{
        AgentStatus, DeleteMaterializedRequest, EnableReply, ExtendRequest, GetStatusRequest,
        MaterializeReply, MaterializeRequest, PrepareReply, PromoteRequest, RemoveReplicaRequest,
        RemoveRequest, VmReplicationSpec, control_client::ControlClient,
    },
    tls::channel,
};

use crate::{Error, agents::Agent, context::Context};

/// How long an agent has to answer a control call.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// A control call that failed: why, in a sentence, and whether the agent
/// answered at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallError {
    pub message: String,
    /// The agent was not reached (down, restarting, not answering in time):
    /// the call may be tried again as it is. An agent that answered with an
    /// error is not unreachable.
    pub unreachable: bool,
}

impl CallError {
    fn unreachable(message: String) -> Self {
        CallError { message, unreachable: true }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<CallError> for String {
    fn from(e: CallError) -> String {
        e.message
    }
}

/// Calls the agent's control API with the deadline; the error says which
/// agent failed how, in a sentence.
pub async fn control<T>(
    agent: &Agent,
    ctx: &Context,
    call: impl AsyncFnOnce(ControlClient<tonic::transport::Channel>) -> Result<T, tonic::Status>,
) -> Result<T, CallError> {
    if !agent.live {
        return Err(CallError::unreachable(format!(
            "the agent on node {} is not running (its Lease expired); check the agent's pod",
            agent.node
        )));
    }
    let Some((endpoint, server_name)) = agent.control() else {
        return Err(CallError::unreachable(format!(
            "the agent on node {} announces no control endpoint",
            agent.node
        )));
    };
    let key = format!("{endpoint}/{server_name}");
    let cached = ctx.channels.lock().unwrap_or_else(|p| p.into_inner()).get(&key).cloned();
    let ch = match cached {
        Some(ch) => ch,
        None => {
            let ch = channel(endpoint, server_name, &ctx.site.tls)
                .map_err(|e| CallError { message: e.to_string(), unreachable: false })?;
            ctx.channels.lock().unwrap_or_else(|p| p.into_inner()).insert(key, ch.clone());
            ch
        }
    };
    match tokio::time::timeout(DEADLINE, call(ControlClient::new(ch))).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(s)) => Err(CallError {
            message: format!("the agent on node {} at {endpoint}: {}", agent.node, s.message()),
            // The agent's own refusals are never Unavailable: that code is
            // the transport's (connection refused, reset, TLS handshake).
            unreachable: s.code() == tonic::Code::Unavailable,
        }),
        Err(_) => Err(CallError::unreachable(format!(
            "the agent on node {} at {endpoint} did not answer within 10s",
            agent.node
        ))),
    }
}

/// [`control`] for the act layer: a failure is the step's error.
async fn step<T>(
    agent: &Agent,
    ctx: &Context,
    name: &'static str,
    call: impl AsyncFnOnce(ControlClient<tonic::transport::Channel>) -> Result<T, tonic::Status>,
) -> Result<T, Error> {
    control(agent, ctx, call).await.map_err(|e| Error::Agent {
        call: name,
        node: agent.node.clone(),
        message: e.message,
    })
}

pub async fn status(agent: &Agent, ctx: &Context) -> Result<AgentStatus, CallError> {
    control(agent, ctx, async |mut c| c.get_status(GetStatusRequest {}).await.map(|r| r.into_inner())).await
}

pub async fn enable(
    agent: &Agent,
    ctx: &Context,
    spec: &VmReplicationSpec,
) -> Result<EnableReply, CallError> {
    control(agent, ctx, async |mut c| c.enable_replication(spec.clone()).await.map(|r| r.into_inner())).await
}

pub async fn remove_replication(agent: &Agent, ctx: &Context, vm_id: &str, uid: &str) -> Result<bool, Error> {
    let req = RemoveRequest { vm_id: vm_id.to_owned(), uid: uid.to_owned() };
    step(agent, ctx, "RemoveReplication", async |mut c| c.remove_replication(req.clone()).await)
        .await
        .map(|r| r.into_inner().removed)
}

pub async fn prepare_failover(
    agent: &Agent,
    ctx: &Context,
    vm_id: &str,
    uid: &str,
) -> Result<PrepareReply, CallError> {
    let req = RemoveRequest { vm_id: vm_id.to_owned(), uid: uid.to_owned() };
    control(agent, ctx, async |mut c| c.prepare_failover(req.clone()).await.map(|r| r.into_inner())).await
}

pub async fn promote(agent: &Agent, ctx: &Context, req: PromoteRequest) -> Result<EnableReply, CallError> {
    let reply =
        control(agent, ctx, async |mut c| c.promote(req.clone()).await.map(|r| r.into_inner())).await?;
    if reply.accepted { Ok(reply) } else { Err(CallError { message: reply.message, unreachable: false }) }
}

pub async fn materialize(
    agent: &Agent,
    ctx: &Context,
    req: MaterializeRequest,
) -> Result<MaterializeReply, CallError> {
    control(agent, ctx, async |mut c| c.materialize_point(req.clone()).await.map(|r| r.into_inner())).await
}

/// Discards a disk's diverged point.
pub async fn discard_diverged(
    agent: &Agent,
    ctx: &Context,
    vm_id: &str,
    disk_id: &str,
) -> Result<(), CallError> {
    let req = DeleteMaterializedRequest {
        vm_id: vm_id.to_owned(),
        disk_id: disk_id.to_owned(),
        name: String::new(),
    };
    control(agent, ctx, async |mut c| c.discard_diverged_point(req.clone()).await.map(drop)).await
}

pub async fn delete_copy(
    agent: &Agent,
    ctx: &Context,
    vm_id: &str,
    disk_id: &str,
    name: &str,
) -> Result<(), CallError> {
    let req = DeleteMaterializedRequest {
        vm_id: vm_id.to_owned(),
        disk_id: disk_id.to_owned(),
        name: name.to_owned(),
    };
    control(agent, ctx, async |mut c| c.delete_materialized(req.clone()).await.map(drop)).await
}

pub async fn remove_replica(agent: &Agent, ctx: &Context, vm_id: &str, disk_id: &str) -> Result<(), Error> {
    let req = RemoveReplicaRequest { vm_id: vm_id.to_owned(), disk_id: disk_id.to_owned() };
    step(agent, ctx, "RemoveReplica", async |mut c| c.remove_replica(req.clone()).await).await.map(drop)
}

pub async fn extend(agent: &Agent, ctx: &Context, req: ExtendRequest) -> Result<EnableReply, Error> {
    step(agent, ctx, "ExtendReplication", async |mut c| c.extend_replication(req.clone()).await)
        .await
        .map(|r| r.into_inner())
}
