//! vmreplica's node agent: serves protected disks as NBD exports, logs every
//! write before acknowledging it, ships sealed log segments to the replica site,
//! and applies them there with undo so recovery points stay exact.
#![forbid(unsafe_code)]
