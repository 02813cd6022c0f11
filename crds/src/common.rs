//! Types and schema rules shared by several kinds: states, health, failover
//! requests, NIC settings, and the patterns the apiserver validates against.
//!
//! Patterns are RE2 (the apiserver's regex engine): no look-around, so "no `..`
//! path component" is spelled out as the three shapes a component may take.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// An absolute path with no `.` or `..` components and no empty ones.
pub const ABSOLUTE_PATH_PATTERN: &str = r"^/$|^(/([^/.][^/]*|\.[^/.][^/]*|\.\.[^/]+))+/?$";
/// A DNS name (labels of 1-63 characters), optionally with `*` as the whole
/// first label (`*.site-a.example.com`).
pub const SERVER_PATTERN_PATTERN: &str =
    r"^(\*\.)?[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*$";
/// A DNS name (labels of 1-63 characters) or an IPv4 address (a replica
/// server to connect to).
pub const HOST_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*$";
/// An RFC 1123 label: disk names, trust groups, namespaces.
pub const LABEL_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// 1h to 7d, in whole hours (`12h`) or days (`2d`).
pub const MONITORING_INTERVAL_PATTERN: &str = r"^(([1-9]|[1-9][0-9]|1[0-5][0-9]|16[0-8])h|[1-7]d)$";
/// A time of day, `HH:MM`, 24-hour clock.
pub const TIME_OF_DAY_PATTERN: &str = r"^([01][0-9]|2[0-3]):[0-5][0-9]$";

/// Condition type: the object is accepted and doing what its spec asks.
pub const CONDITION_READY: &str = "Ready";
/// Condition type: writes are flowing to the replica.
pub const CONDITION_REPLICATING: &str = "Replicating";
/// Condition type: health is not Normal.
pub const CONDITION_DEGRADED: &str = "Degraded";

/// A VMReplication's replication state, named as Hyper-V names them
/// (`Get-VMReplication`'s `State`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum ReplicationState {
    /// Replication is not configured for this VM.
    #[default]
    NotEnabled,
    /// Configured; the initial copy has not started (scheduled, or waiting for the replica).
    ReadyForInitialReplication,
    /// The initial copy is running or waiting for an import on the replica.
    WaitingForInitialReplication,
    /// Logs flow to the replica at the replication frequency.
    Replicating,
    /// A planned failover completed on this (former primary) side.
    SyncedReplicationComplete,
    /// An unplanned failover ran; waiting for Complete (`complete: true`) or Cancel.
    FailOverWaitingCompletion,
    /// This side was failed over to and is now serving.
    FailedOver,
    /// Paused by `spec.suspended`; writes are still logged.
    Suspended,
    /// Replication cannot proceed; `healthDetails` and the conditions say why.
    Error,
    /// Logs cannot catch the replica up; a resynchronisation must be started.
    WaitingForStartResynchronize,
    /// Block hashes are being compared and differing blocks sent.
    Resynchronizing,
    /// A resynchronisation was paused by `spec.suspended`.
    ResynchronizeSuspended,
}

/// Replication health, as `Measure-VMReplication` reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Health {
    /// All rules pass.
    #[default]
    Normal,
    /// Too many missed cycles in the monitoring window, the replica lags, or a resync runs.
    Warning,
    /// Replication is in error, a resync is required, or the replica is unusable.
    Critical,
}

/// Which side of a replication relationship an object describes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Role {
    /// The VM runs here and its writes are replicated away.
    #[default]
    Primary,
    /// This site receives a primary's logs and keeps recovery points.
    Replica,
    /// This site receives what a replica forwards (A→B→C).
    ExtendedReplica,
}

/// The kind of failover a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum FailoverType {
    /// Materialise a recovery point as `<name>-test` disks (and VM) on the test
    /// network, while replication continues. Requested on the replica side.
    Test,
    /// Shut the primary down, ship the last log, promote the replica with no data
    /// loss. Requested on the primary side.
    Planned,
    /// The primary is lost: promote the replica at a recovery point. Requested on
    /// the replica side.
    Unplanned,
}

/// A declarative failover request. A new `id` starts one operation;
/// `status.lastFailover.id` says it was handled, so re-applying the same YAML
/// from Git does nothing new.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = no_defaults)]
pub struct FailoverRequest {
    /// Identifies this request; change it to request another failover.
    #[schemars(length(min = 1, max = 63), pattern(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"))]
    pub id: String,
    /// Test, Planned or Unplanned.
    #[serde(rename = "type")]
    pub failover_type: FailoverType,
    /// The recovery point to fail over to: a point id from
    /// `status.recoveryPoints`, or `latest` (the default).
    #[serde(default = "latest", skip_serializing_if = "is_latest")]
    #[schemars(length(min = 1, max = 63))]
    pub recovery_point: String,
    /// Replicate back from the new primary to the old one's own disks, with
    /// this object's replicationFrequencySeconds, compression and recovery
    /// history. After a Planned failover no resync is needed (both sides are
    /// identical). After an Unplanned one (on the request that completes it,
    /// or added to it later) the old primary's disks are resynchronised by
    /// block hash — only what differs is sent — once its VM is stopped (a
    /// running one is fenced and stopped), and what they held that never
    /// reached this side is kept there as a diverged point (see
    /// `spec.divergedPoint` on the Primary object). The old primary's site
    /// must accept this site (a ReplicationServer and an AuthorizationEntry
    /// there), as for any replication.
    #[serde(default)]
    pub reverse_replication: bool,
    /// On a Replica object: where to reverse to, the old primary
    /// site's replication server. Unset: `spec.primaryServer` on port 9443.
    /// (On a Primary object the reverse goes to `spec.replicaServer`.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverse_replica_server: Option<crate::ServerAddress>,
    /// Start the VM once its disks are ready.
    #[serde(default = "yes", rename = "startVM")]
    pub start_vm: bool,
    /// Unplanned only: confirm the chosen point and discard the other recovery
    /// points (Hyper-V's Complete-VMFailover). Removing the request instead cancels.
    #[serde(default)]
    pub complete: bool,
    /// Unplanned only: fail over even though the primary VM is believed to be
    /// running (overrides the split-brain guard). Recorded in status and an Event.
    #[serde(default)]
    pub force: bool,
}

/// Defaults of a request live in serde, not in the schema: fields the
/// apiserver defaults are owned by no field manager, so a request carrying
/// them could never be removed again by server-side apply (GitOps deleting
/// the block would leave an invalid remnant).
fn no_defaults(schema: &mut schemars::Schema) {
    if let Some(props) = schema.get_mut("properties").and_then(|p| p.as_object_mut()) {
        for p in props.values_mut() {
            if let Some(o) = p.as_object_mut() {
                o.remove("default");
            }
        }
    }
}

fn latest() -> String {
    "latest".to_owned()
}
fn is_latest(s: &str) -> bool {
    s == "latest"
}
fn yes() -> bool {
    true
}

/// TCP/IP settings handed to one NIC of the VM at failover (or test failover).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NicSettings {
    /// The VM's interface name these settings apply to.
    #[schemars(length(min = 1, max = 63), pattern(LABEL_PATTERN))]
    pub nic: String,
    /// IPv4 address, without prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^((25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])$"))]
    pub ipv4_address: Option<String>,
    /// IPv4 prefix length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 32))]
    pub ipv4_prefix_length: Option<u8>,
    /// IPv4 default gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^((25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])$"))]
    pub ipv4_gateway: Option<String>,
    /// IPv6 address, without prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[0-9a-fA-F:]+$"))]
    pub ipv6_address: Option<String>,
    /// IPv6 prefix length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 128))]
    pub ipv6_prefix_length: Option<u8>,
    /// IPv6 default gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[0-9a-fA-F:]+$"))]
    pub ipv6_gateway: Option<String>,
    /// DNS servers, in order of preference.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub dns_servers: Vec<String>,
}

/// Standard conditions, a list keyed by `type` (the apiserver keeps types unique).
pub type Conditions = Vec<Condition>;

/// Schema for a `conditions` field: the standard Condition in a list-map.
pub fn conditions_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = generator.subschema_for::<Vec<Condition>>();
    schema.insert("x-kubernetes-list-type".into(), "map".into());
    schema.insert("x-kubernetes-list-map-keys".into(), serde_json::json!(["type"]));
    schema
}

/// Schema for a list whose items are unique by their `name`.
pub fn named_list_schema<T: JsonSchema>(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = generator.subschema_for::<Vec<T>>();
    schema.insert("x-kubernetes-list-type".into(), "map".into());
    schema.insert("x-kubernetes-list-map-keys".into(), serde_json::json!(["name"]));
    schema
}
