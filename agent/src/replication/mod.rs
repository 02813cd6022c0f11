//! Agent↔agent replication over mutually authenticated gRPC: the replica's
//! service, the primary's shipper, and the authorisation rules between them.

pub mod authz;
pub mod cycle;
pub mod service;
pub mod shipper;
pub mod tls;

/// Generated from `agent/proto/replication.proto`.
pub mod proto {
    tonic::include_proto!("vmreplica.replication.v1");
}
