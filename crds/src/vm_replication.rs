//! VMReplication: one VM's protection, seen from one side (Hyper-V's
//! `Enable-VMReplication` on the primary and the replica VM on the replica).
//! Its status carries what `Measure-VMReplication` shows.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::*;

/// What to protect, where to send it, and what to do with it.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "vmreplica.io",
    version = "v1alpha1",
    kind = "VMReplication",
    doc = "One VM's replication, seen from one side: its disks, where they replicate, recovery points, failover requests, and what Measure-VMReplication would show.",
    plural = "vmreplications",
    shortname = "vmr",
    namespaced,
    status = "VMReplicationStatus",
    printcolumn = r#"{"name":"Role","type":"string","jsonPath":".spec.role"}"#,
    printcolumn = r#"{"name":"State","type":"string","jsonPath":".status.state"}"#,
    printcolumn = r#"{"name":"Health","type":"string","jsonPath":".status.health"}"#,
    printcolumn = r#"{"name":"Last Replication","type":"date","jsonPath":".status.lastReplicationTime"}"#,
    printcolumn = r#"{"name":"Lag","type":"string","jsonPath":".status.lag"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct VMReplicationSpec {
    /// Primary (the VM runs here), Replica (receives the primary's logs) or
    /// ExtendedReplica (receives what a replica forwards).
    #[serde(default)]
    pub role: Role,
    /// The VM's virtual disks. Names are unique; each is a raw image on the node.
    #[schemars(schema_with = "disks_schema")]
    pub disks: Vec<DiskSpec>,
    /// The node whose agent serves the disks and keeps the log. May be left out
    /// while the site runs a single agent that protects VMs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub node: Option<String>,
    /// The VM object whose power state failover drives. Unset: disks only.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "vm")]
    pub vm: Option<VmReference>,
    /// Primary role: the replica site's server to replicate to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_server: Option<ServerAddress>,
    /// Replica roles: the primary server this replica receives from (set when the
    /// replica site creates the object; informational when declared by hand).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253), pattern(HOST_PATTERN))]
    pub primary_server: Option<String>,
    /// Compress logs on the wire with zstd.
    #[serde(default = "yes")]
    pub compression_enabled: bool,
    /// Seconds between replication cycles, 1 to 3600. Hyper-V's presets are 30,
    /// 300 (the default) and 900.
    #[serde(default = "default_frequency")]
    #[schemars(range(min = 1, max = 3600))]
    pub replication_frequency_seconds: u32,
    /// Which recovery points the replica keeps.
    #[serde(default)]
    pub recovery_history: RecoveryHistory,
    /// How and when the first full copy reaches the replica.
    #[serde(default)]
    pub initial_replication: InitialReplication,
    /// Pause replication. Writes keep being logged and are shipped on resume.
    /// During a resynchronisation: ResynchronizeSuspended; resuming continues it.
    #[serde(default)]
    pub suspended: bool,
    /// Resynchronise now (Hyper-V's `Resume-VMReplication -Resynchronize`),
    /// whatever the automatic window: both sides' disks are compared by hash
    /// tree and only differing blocks are sent. A new `id` starts one;
    /// `status.lastResynchronization.id` says it was done, and the same id
    /// again does nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resynchronize: Option<ResynchronizeRequest>,
    /// Verify the replica end to end (on request): both sides' hash trees are
    /// compared at one log position, nothing is sent or changed, and
    /// `status.lastVerification` says how many bytes differ (0 expected;
    /// also the agent's `vmreplica_agent_verify_differing_bytes`). A new
    /// `id` runs one; the same id again does nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<ResynchronizeRequest>,
    /// When a resynchronisation that replication needs (the log passed half
    /// the disk while the replica was out of reach, a gap in the log, the
    /// replica holding another history) starts on its own.
    #[serde(default)]
    pub automatic_resynchronization: AutomaticResynchronization,
    /// A failover to carry out. See FailoverRequest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<FailoverRequest>,
    /// TCP/IP settings per NIC handed to the VM when it is failed over to this
    /// side. Set them on the primary too, so failing back restores its own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub failover_network: Vec<NicSettings>,
    /// The isolated network a test failover's VM is connected to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_network: Option<TestNetwork>,
    /// Replica role: forward what is applied here to a third site (A→B→C).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extended_replica: Option<ExtendedReplica>,
    /// What to do with the diverged point this site keeps once replication
    /// was reversed onto its disks after an unplanned failover (the writes
    /// that never reached the side that took the VM over; see
    /// `status.divergedPoint`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diverged_point: Option<DivergedPointRequest>,
}

/// What to do with a kept diverged point.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DivergedPointRequest {
    /// Keep (the default: nothing is lost), Materialize (also write it out
    /// per disk as `<name>-diverged`, its path in status, to attach to a VM
    /// and recover the writes), or Discard (delete it and any copy: the
    /// space goes, the writes are gone for good).
    #[serde(default)]
    pub action: DivergedPointAction,
}

/// See DivergedPointRequest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum DivergedPointAction {
    #[default]
    Keep,
    Materialize,
    Discard,
}

/// What a verification found.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VerificationStatus {
    /// The `spec.verify.id` it answers.
    pub id: String,
    /// When it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Bytes (in 4 KiB blocks) that differ between the two sides and that
    /// no write since the position compared explains: 0 expected; anything
    /// else means the replica does not hold what the primary had
    /// (request `spec.resynchronize` to repair it).
    pub differing_bytes: u64,
    /// Bytes that differ where the primary wrote after the position
    /// compared (in flight, replicated by the next cycles).
    pub in_flight_bytes: u64,
    /// Bytes of disk compared, over all disks.
    pub compared_bytes: u64,
    /// How long it took (the slowest disk).
    pub duration_seconds: u64,
}

/// A diverged point kept at this site.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DivergedPointStatus {
    /// When the disks were set aside (the resync that followed began).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
    /// The epoch of the history they end.
    pub epoch: u64,
    /// Per disk: the last sequence of its own log the point ends, and the
    /// copy's path once materialised.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DivergedDisk>,
    /// What to do next, or why the requested action failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// One disk of a diverged point.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DivergedDisk {
    /// The disk's name in `spec.disks`.
    pub name: String,
    /// The last sequence of this site's own log the point ends.
    pub sequence: u64,
    /// The materialised copy, once `spec.divergedPoint.action` is Materialize.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

fn yes() -> bool {
    true
}
fn default_frequency() -> u32 {
    300
}

fn disks_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = named_list_schema::<DiskSpec>(generator);
    schema.insert("minItems".into(), 1.into());
    schema.insert("maxItems".into(), 64.into());
    schema
}

/// One virtual disk.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiskSpec {
    /// Name of the disk, unique within the VM (an RFC 1123 label).
    #[schemars(length(min = 1, max = 63), pattern(LABEL_PATTERN))]
    pub name: String,
    /// Absolute path of the raw image on the node. On the replica, the location
    /// relative to the storage location is derived from the VM and disk names.
    #[schemars(length(min = 1, max = 4096), pattern(ABSOLUTE_PATH_PATTERN))]
    pub path: String,
}

/// A reference to the VM object whose power state failover drives.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VmReference {
    /// How power is controlled: KubeVirt (a `kubevirt.io/v1` VirtualMachine in
    /// this namespace) or None (disks only).
    #[serde(default)]
    pub runtime: VmRuntime,
    /// Name of the VM object.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Power-control backends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum VmRuntime {
    /// Patch `spec.runStrategy` of a KubeVirt VirtualMachine.
    #[default]
    KubeVirt,
    /// No VM object; failover prepares disks only.
    None,
}

/// Where a replication server listens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServerAddress {
    /// DNS name (or IPv4 address) of the replica site's replication server.
    #[schemars(length(min = 1, max = 253), pattern(HOST_PATTERN))]
    pub name: String,
    /// Its port.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
}

fn default_port() -> u16 {
    9443
}

/// Which recovery points are kept on the replica.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryHistory {
    /// Every replication cycle boundary within this many seconds of the newest
    /// is a recovery point.
    #[serde(default = "default_window")]
    #[schemars(range(min = 0, max = 86400))]
    pub continuous_window_seconds: u32,
    /// Beyond that window, keep one point per hour up to this many (Hyper-V keeps
    /// up to 24; up to 168 is allowed). 0 keeps only the latest point.
    #[serde(default = "default_hourly")]
    #[schemars(range(min = 0, max = 168))]
    pub hourly_recovery_points: u32,
    /// Take an application-consistent point (guest quiesced) every this many
    /// hours, the first at the first cycle after this is set. A point the
    /// guest could not be quiesced for is taken crash-consistent, with a
    /// Warning health detail and a `QuiesceFailed` Event; the next attempt
    /// comes after the interval. Unset: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 12))]
    pub app_consistent_interval_hours: Option<u32>,
    /// How the guest is quiesced for application-consistent points.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quiesce: Option<Quiesce>,
}

impl Default for RecoveryHistory {
    fn default() -> Self {
        Self {
            continuous_window_seconds: default_window(),
            hourly_recovery_points: default_hourly(),
            app_consistent_interval_hours: None,
            quiesce: None,
        }
    }
}

fn default_window() -> u32 {
    3600
}
fn default_hourly() -> u32 {
    24
}

/// How the agent freezes and thaws the guest around an application-consistent point.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Quiesce {
    /// Command (argv) run on the node to freeze the guest (at most 60 s); a
    /// non-zero exit makes the point crash-consistent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub freeze_command: Vec<String>,
    /// Command (argv) run on the node to thaw the guest; always run after a freeze.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub thaw_command: Vec<String>,
    /// Path of the QEMU guest agent socket (the `org.qemu.guest_agent.0`
    /// channel); used (`guest-fsfreeze-freeze` / `guest-fsfreeze-thaw`) when no
    /// commands are given. A guest agent that does not answer `guest-sync`
    /// within 5 s is asked nothing; a freeze or thaw must answer within 10 s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(ABSOLUTE_PATH_PATTERN))]
    pub guest_agent_socket: Option<String>,
}

/// How the first full copy is made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum InitialReplicationMethod {
    /// Copy over the network; zero and unallocated blocks are not sent.
    #[default]
    Network,
    /// The primary's agent exports the disks to `directory` on its node
    /// (under one of its disk roots; non-zero 4 MiB chunks and a manifest
    /// with their BLAKE3) and waits; at the replica site `vmreplica-agent
    /// import --from DIR` verifies every chunk and loads them; then only
    /// what was written since the export is sent.
    ExternalMedia,
    /// The replica site already holds an image (a restored backup, an older
    /// copy): `vmreplica-agent import --existing IMAGE` there adopts it, and
    /// a resynchronisation by block hashes sends only what differs.
    ExistingImage,
}

/// The initial copy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InitialReplication {
    /// Network, ExternalMedia or ExistingImage.
    #[serde(default)]
    pub method: InitialReplicationMethod,
    /// Start no earlier than this time (RFC 3339). Unset: immediately.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// ExternalMedia: the absolute directory on the primary's node the
    /// export is written to (under one of its agent's disk roots; carried
    /// to the replica site and imported from there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096), pattern(ABSOLUTE_PATH_PATTERN))]
    pub directory: Option<String>,
}

/// A resynchronisation asked for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResynchronizeRequest {
    /// Identifies the request: a new id starts one resynchronisation.
    #[schemars(length(min = 1, max = 63), pattern(LABEL_PATTERN))]
    pub id: String,
}

/// When needed resynchronisations start on their own (Hyper-V's automatic
/// resynchronisation and its interval).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutomaticResynchronization {
    /// Start one when replication needs it. When false, the VM waits in
    /// WaitingForStartResynchronize (health Critical) for `spec.resynchronize`.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Only within this daily window (UTC, may wrap past midnight, e.g.
    /// 18:30 to 06:00, outside office hours). Unset: at any time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<DailyWindow>,
}

impl Default for AutomaticResynchronization {
    fn default() -> Self {
        Self { enabled: true, window: None }
    }
}

/// A daily time window, UTC.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DailyWindow {
    /// Start, `HH:MM` UTC.
    #[schemars(pattern(TIME_OF_DAY_PATTERN))]
    pub start: String,
    /// End, `HH:MM` UTC (before `start`: the window wraps past midnight).
    #[schemars(pattern(TIME_OF_DAY_PATTERN))]
    pub end: String,
}

/// The isolated network of a test failover.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TestNetwork {
    /// Name of the network (for KubeVirt, a Multus NetworkAttachmentDefinition).
    #[schemars(length(min = 1, max = 253))]
    pub network_name: String,
    /// TCP/IP settings per NIC for the test VM.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub nics: Vec<NicSettings>,
}

/// Forwarding to a third site.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExtendedReplica {
    /// The third site's replication server.
    pub replica_server: ServerAddress,
    /// Seconds between forwarding cycles; not shorter than the primary's frequency.
    #[serde(default = "default_frequency")]
    #[schemars(range(min = 1, max = 3600))]
    pub replication_frequency_seconds: u32,
    /// Recovery points kept at the third site.
    #[serde(default)]
    pub recovery_history: RecoveryHistory,
}

/// What `Measure-VMReplication` would show, and where any failover stands.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VMReplicationStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Replication state.
    #[serde(default)]
    pub state: ReplicationState,
    /// Replication health.
    #[serde(default)]
    pub health: Health,
    /// Each health rule that fired, as a sentence saying what to do.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub health_details: Vec<String>,
    /// The server the VM currently runs on (replicates from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_server: Option<String>,
    /// The server currently receiving its replication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_server: Option<String>,
    /// When the replica last acknowledged a complete replication cycle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_replication_time: Option<Time>,
    /// Bytes logged on the primary and not yet acknowledged by the replica.
    #[serde(default)]
    pub pending_replication_bytes: u64,
    /// How far the replica was behind at the last cycle, e.g. `42s` or `3m10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<String>,
    /// Statistics over the current monitoring window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statistics: Option<ReplicationStatistics>,
    /// Recovery points on the replica, newest first (bounded list).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub recovery_points: Vec<RecoveryPoint>,
    /// Progress of an initial replication or resynchronisation in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// The last resynchronisation that finished on every disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_resynchronization: Option<ResynchronizationStatus>,
    /// Incremented at every promotion; segments of an older epoch are refused.
    #[serde(default)]
    pub epoch: u64,
    /// Ready, Replicating, Degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Conditions,
    /// The last failover request handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failover: Option<FailoverStatus>,
    /// Replica role with `spec.extendedReplica`: forwarding to the third site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extended_replication: Option<ExtendedReplicationStatus>,
    /// The last verification (`spec.verify`) that finished on every disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verification: Option<VerificationStatus>,
    /// The writes this site's disks held that never reached the side that
    /// took the VM over, kept when replication was reversed onto them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diverged_point: Option<DivergedPointStatus>,
}

/// Extended replication (A→B→C) as site B sees it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExtendedReplicationStatus {
    /// The third site's replication server, HOST:PORT.
    pub replica_server: String,
    /// WaitingForInitialReplication, Replicating, Error or
    /// WaitingForStartResynchronize.
    #[serde(default)]
    pub state: ReplicationState,
    /// What went wrong, or what the operator should know.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the third site last acknowledged everything forwarded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_replication_time: Option<Time>,
    /// Bytes applied here and not yet forwarded.
    #[serde(default)]
    pub pending_replication_bytes: u64,
}

/// Replication statistics over a monitoring window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationStatistics {
    /// Start of the monitoring window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_start: Option<Time>,
    /// Average size of a replicated log, in bytes.
    #[serde(default)]
    pub average_log_size_bytes: u64,
    /// Largest replicated log, in bytes.
    #[serde(default)]
    pub maximum_log_size_bytes: u64,
    /// Average time to transfer and acknowledge a log, in milliseconds.
    #[serde(default)]
    pub average_latency_milliseconds: u64,
    /// Replication errors in the window.
    #[serde(default)]
    pub errors: u64,
    /// Cycles that completed in the window.
    #[serde(default)]
    pub successful_cycles: u64,
    /// Cycles that did not complete in time in the window.
    #[serde(default)]
    pub missed_cycles: u64,
}

/// Kinds of recovery point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RecoveryPointKind {
    /// A replication cycle boundary within the continuous window.
    Standard,
    /// An hourly point beyond the window.
    Hourly,
    /// A point taken with the guest quiesced.
    ApplicationConsistent,
}

/// One recovery point on the replica.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryPoint {
    /// Identifier to name in `spec.failover.recoveryPoint`.
    pub id: String,
    /// When the point was taken on the primary.
    pub time: Time,
    /// Standard, Hourly or ApplicationConsistent.
    pub kind: RecoveryPointKind,
    /// Log sequence number the point ends at.
    pub sequence: u64,
}

/// Progress of a long operation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// InitialReplication or Resynchronization.
    pub operation: String,
    /// Bytes done so far.
    pub bytes_done: u64,
    /// Bytes to do in all.
    pub bytes_total: u64,
    /// Recent rate, in bytes per second.
    #[serde(default)]
    pub bytes_per_second: u64,
    /// Estimated completion time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta: Option<Time>,
}

/// What a finished resynchronisation did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResynchronizationStatus {
    /// The request's id (`spec.resynchronize.id`), or `auto-<time>` for an automatic one.
    pub id: String,
    /// When the controller saw it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// HashTree (both sides compared block hashes) or DirtyMap (the primary
    /// sent only the blocks its map of changes named).
    pub mode: String,
    /// Everything sent on the wire, hashes included, over all disks.
    pub bytes_sent: u64,
    /// Of that, bytes of disk data (compressed; zeros cost none).
    pub data_bytes_sent: u64,
    /// Bytes of the disk brought over: every block that differed, zeros included.
    pub bytes_resynchronized: u64,
    /// How long the slowest disk took.
    pub duration_seconds: u64,
}

/// Phases of a failover operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum FailoverPhase {
    /// Accepted, not yet started.
    Pending,
    /// Stopping the primary VM (planned).
    StoppingVM,
    /// Shipping and verifying the last log (planned).
    SyncingFinalLog,
    /// Materialising or rolling disks to the recovery point.
    PreparingDisks,
    /// Starting the VM.
    StartingVM,
    /// Unplanned: waiting for Complete or Cancel.
    WaitingCompletion,
    /// Reversing the direction of replication.
    Reversing,
    /// Finished.
    Completed,
    /// Cancelled: the replica is back to its replica state.
    Cancelled,
    /// Refused or failed; `message` says why.
    Failed,
}

/// Where the last failover request stands.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailoverStatus {
    /// The request's id.
    pub id: String,
    /// The request's type.
    #[serde(rename = "type")]
    pub failover_type: FailoverType,
    /// Current phase.
    pub phase: FailoverPhase,
    /// The recovery point used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_point: Option<String>,
    /// When it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<Time>,
    /// The primary's replicated writes lost by the chosen point, in seconds: from
    /// the chosen point to the newest write that reached the replica (0 for
    /// planned, and for an unplanned failover to the newest point). Writes the
    /// primary made after its last replication never reached this site and
    /// cannot be counted here; the message says when that last replication was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_loss_window_seconds: Option<u64>,
    /// The split-brain guard was overridden with `force`.
    #[serde(default)]
    pub forced: bool,
    /// This side took the VM over (its replica was promoted here).
    #[serde(default)]
    pub took_over: bool,
    /// Replication was reversed: this side now replicates to that server.
    /// Kept through this side's part of a planned failover back (it
    /// replicates there until that part is done).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reversed_to: Option<String>,
    /// The materialised copy this side's agent serves as the VM's disks, when
    /// it took the VM over by an unplanned failover (the chosen point's
    /// copy); kept, like `reversedTo`, through its part of a planned failover
    /// back. An agent restarted meanwhile is told to serve these disks again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_copy: Option<String>,
    /// What happened, in a sentence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
