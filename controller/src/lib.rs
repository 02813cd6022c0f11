//! vmreplica's controller: reconciles ReplicationServer, AuthorizationEntry,
//! VMReplication and RecoveryPlan, and commands the node agents over gRPC.
//!
//! The controller never installs or migrates its CRDs (the chart or
//! `kubectl apply -f charts/vmreplica/crds/` does): it checks they are served
//! and exits with a hint when they are not.

pub mod agents;
pub mod conditions;
pub mod preflight;
pub mod site;
pub mod telemetry;
