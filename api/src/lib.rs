//! The wire between vmreplica's parts, and nothing else: the control API
//! (controller → agent) and the replication API (agent ↔ agent) as generated
//! from `proto/`, the mutual TLS both run over, the kinds of failure a caller
//! acts on (proto enums, never strings), and how certificate names are
//! matched against authorisation entries.
//!
//! ```text
//!  controller ──control.proto──▶ agent ──replication.proto──▶ agent
//!       └──────── crds ◀──┐          both over tls (mutual)
//!                vmreplica-api: control, replication, tls, names
//! ```
//! The controller and the tests depend on this crate and `crds`, never on
//! the agent.
#![forbid(unsafe_code)]

pub mod names;
pub mod tls;

/// Generated from `proto/control.proto`.
pub mod control {
    tonic::include_proto!("vmreplica.control.v1");
}

/// Generated from `proto/replication.proto`.
pub mod replication {
    tonic::include_proto!("vmreplica.replication.v1");
}

/// Largest chunk, raw or compressed, a replication stream may carry.
pub const MAX_CHUNK: usize = 4 << 20;
/// Largest gRPC message either side accepts (a chunk plus its envelope).
pub const MAX_FRAME: usize = MAX_CHUNK + (64 << 10);
