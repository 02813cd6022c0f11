//! Agent↔agent replication, the primary's half and the rules both halves
//! share: the per-VM replication cycle, the shipper that sends a disk's log,
//! and which primaries a replica site accepts. The replica's half is
//! [`crate::replica`]; its gRPC adapter [`crate::grpc::replication`].

pub mod authz;
pub mod cycle;
pub mod shipper;
