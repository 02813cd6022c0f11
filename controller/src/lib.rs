//! vmreplica's controller: reconciles ReplicationServer, AuthorizationEntry,
//! VMReplication and RecoveryPlan, and commands the node agents over gRPC.
//!
//! The controller never installs or migrates its CRDs (the chart or
//! `kubectl apply -f charts/vmreplica/crds/` does): it checks they are served
//! and exits with a hint when they are not.

pub mod agents;
pub mod conditions;
pub mod extended;
pub mod failover;
pub mod leader;
pub mod plan;
pub mod power;
pub mod preflight;
pub mod replicas;
pub mod site;
pub mod telemetry;
pub mod vmr;

/// Why a reconciliation failed; every kind is retried.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading from the apiserver")]
    Read(#[source] kube::Error),
    #[error("writing status")]
    WriteStatus(#[source] kube::Error),
    #[error("removing replication from the agent on {node}: {message}")]
    Remove { node: String, message: String },
    #[error("finalizer: {0}")]
    Finalizer(String),
    #[error("{0}")]
    Agent(String),
}

impl Error {
    /// The bounded error class the metrics count by.
    pub fn class(&self) -> &'static str {
        match self {
            Error::Read(_) => "read",
            Error::WriteStatus(_) => "write",
            Error::Remove { .. } | Error::Agent(_) => "agent",
            Error::Finalizer(_) => "finalizer",
        }
    }
}

/// Server-side applies `status` to object `name` as field manager `manager`,
/// taking over fields other managers held (the controller owns status).
pub async fn apply_status<K>(
    api: &kube::Api<K>,
    name: &str,
    manager: &str,
    status: &impl k8s_openapi::serde::Serialize,
) -> Result<(), Error>
where
    K: kube::Resource<DynamicType = ()> + Clone + k8s_openapi::serde::de::DeserializeOwned + std::fmt::Debug,
{
    let patch =
        serde_json::json!({"apiVersion": K::api_version(&()), "kind": K::kind(&()), "status": status});
    let pp = kube::api::PatchParams::apply(manager).force();
    api.patch_status(name, &pp, &kube::api::Patch::Apply(&patch)).await.map_err(Error::WriteStatus)?;
    Ok(())
}

/// What every controller loop does with each reconcile result: errors were
/// already handled by the error policy, so they are only traced.
pub async fn log_result<T, E: std::fmt::Display>(r: Result<T, E>) {
    if let Err(e) = r {
        tracing::debug!(error = %e, "controller event");
    }
}
