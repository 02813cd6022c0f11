//! vmreplica's controller: reconciles ReplicationServer, AuthorizationEntry,
//! VMReplication and RecoveryPlan, and commands the node agents over gRPC.
//!
//! The controller never installs or migrates its CRDs (the chart or
//! `kubectl apply -f charts/vmreplica/crds/` does): it checks they are served
//! and exits with a hint when they are not.

pub mod agent_client;
pub mod agents;
pub mod conditions;
pub mod context;
pub mod error;
pub mod leader;
pub mod plan;
pub mod power;
pub mod preflight;
pub mod replica_site;
pub mod site;
pub mod status;
pub mod telemetry;
pub mod vmreplication;

pub use error::Error;

/// What every controller loop does with each reconcile result: errors were
/// already handled by the error policy, so they are only traced.
pub async fn log_result<T, E: std::fmt::Display>(r: Result<T, E>) {
    if let Err(e) = r {
        tracing::debug!(error = %e, "controller event");
    }
}
