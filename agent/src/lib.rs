//! vmreplica's node agent: serves protected disks as NBD exports, logs every
//! write before acknowledging it, ships sealed log segments to the replica site,
//! and applies them there with undo so recovery points stay exact.
//!
//! ```text
//!  QEMU ──NBD──▶ nbd::NbdServer ──▶ disk::ProtectedDisk ──▶ log::Journal (segments)
//!                                                      └──▶ raw image
//! ```
#![forbid(unsafe_code)]

pub mod control;
pub mod disk;
pub mod failpoint;
pub mod image;
pub mod lease;
pub mod log;
pub mod metrics;
pub mod nbd;
pub mod node;
pub mod quiesce;
pub mod replica;
pub mod replication;
pub mod run;
