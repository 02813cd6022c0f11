//! vmreplica's node agent: serves protected disks as NBD exports, logs every
//! write before acknowledging it, ships sealed log segments to the replica site,
//! and applies them there with undo so recovery points stay exact.
//!
//! ```text
//!  QEMU ──NBD──▶ nbd::NbdServer ──▶ disk::ProtectedDisk ──▶ log::Journal (segments)
//!                                                      └──▶ raw image
//!  controller ─▶ grpc::control ─▶ agent::Agent ─▶ node::Node (VMs served here) ─▶ replication::shipper
//!  primaries  ─▶ grpc::replication ─┘         └──▶ replica::store (replicas kept here)
//! ```
#![forbid(unsafe_code)]

pub mod agent;
pub mod cli;
pub mod direct;
pub mod disk;
pub mod failpoint;
pub mod grpc;
pub mod hashtree;
pub mod image;
pub mod lease;
pub mod limits;
pub mod log;
pub mod media;
pub mod metrics;
pub mod nbd;
pub mod node;
pub mod quiesce;
pub mod replica;
pub mod replication;
pub mod run;
pub mod site;
