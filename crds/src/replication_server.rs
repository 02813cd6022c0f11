//! ReplicationServer: this site's acceptance of inbound replication
//! (Hyper-V's `Set-VMReplicationServer`). Cluster-scoped; usually one per site.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::*;

/// Which agents of this site serve replication, how they listen, and what they accept.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "vmreplica.io",
    version = "v1alpha1",
    kind = "ReplicationServer",
    doc = "This site accepts inbound replication: which agents serve it, how they listen, and what they accept (Hyper-V Set-VMReplicationServer).",
    shortname = "rsrv",
    status = "ReplicationServerStatus",
    printcolumn = r#"{"name":"Port","type":"integer","jsonPath":".spec.port"}"#,
    printcolumn = r#"{"name":"Any Server","type":"boolean","jsonPath":".spec.allowAnyServer"}"#,
    printcolumn = r#"{"name":"Agents","type":"string","jsonPath":".status.agentsSummary"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationServerSpec {
    /// Labels of the nodes whose agents serve replication for this site. Empty
    /// selects every node that runs an agent.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// TCP port the selected agents receive replication on (mutual TLS). An
    /// agent moves to it when told (transfers in flight finish on the old
    /// port); a port already in use on a node is refused by that agent,
    /// which keeps its previous settings and says so in `status.agents`.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// Secret in the controller's namespace with `tls.crt`, `tls.key` and
    /// `ca.crt`: the certificate the selected agents use for replication in
    /// both directions (the one primaries see when they connect, and the one
    /// these agents present when they ship, e.g. reverse replication), and the
    /// CA that signs the peers they trust. The controller reads it and hands
    /// it to the agents; a renewed Secret (cert-manager) is in force within
    /// 30 seconds, with no restart, for every new connection. Unset: each
    /// agent uses its own certificate (`--tls-dir`; the chart's agent
    /// certificate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), pattern(HOST_PATTERN))]
    pub tls_secret_name: Option<String>,
    /// Accept any authenticated primary server, storing its replicas under
    /// `defaultStorageLocation` and in trust group `defaultTrustGroup`. When false,
    /// a primary is accepted only if an AuthorizationEntry matches it.
    #[serde(default)]
    pub allow_any_server: bool,
    /// Trust group of replicas accepted through `allowAnyServer`.
    #[serde(default = "default_trust_group")]
    #[schemars(length(min = 1, max = 63), pattern(LABEL_PATTERN))]
    pub default_trust_group: String,
    /// Namespace in which Replica objects accepted through `allowAnyServer` are created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), pattern(LABEL_PATTERN))]
    pub default_replica_namespace: Option<String>,
    /// Absolute directory on the agents' nodes where replicas of primaries accepted
    /// through `allowAnyServer` are stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096), pattern(ABSOLUTE_PATH_PATTERN))]
    pub default_storage_location: Option<String>,
    /// How often health is evaluated over a window of replication statistics,
    /// from `1h` to `7d` (Hyper-V's MonitoringInterval). Whole hours (`12h`) or days (`2d`).
    #[serde(default = "default_monitoring_interval")]
    #[schemars(pattern(MONITORING_INTERVAL_PATTERN))]
    pub monitoring_interval: String,
    /// Time of day (`HH:MM`, UTC) at which monitoring windows start (Hyper-V's MonitoringStartTime).
    #[serde(default = "default_start_time")]
    #[schemars(pattern(TIME_OF_DAY_PATTERN))]
    pub monitoring_start_time: String,
    /// Most log transfers a selected agent runs at once, inbound and outbound
    /// together (Hyper-V's MaximumActiveTransfers). More wait; lowering it
    /// lets running transfers finish.
    #[serde(default = "default_max_transfers")]
    #[schemars(range(min = 1, max = 256))]
    pub max_active_transfers: u32,
    /// Bandwidth limit of each selected agent for all its replication
    /// traffic, received and sent together, in bytes per second (bytes on the
    /// wire, after compression). Unset means unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub bandwidth_limit_bytes_per_second: Option<u64>,
    /// A replica more than this many seconds behind its primary makes health Warning.
    #[serde(default = "default_lag_threshold")]
    #[schemars(range(min = 60, max = 604800))]
    pub lag_warning_threshold_seconds: u32,
}

fn default_trust_group() -> String {
    "default".to_owned()
}
fn default_port() -> u16 {
    9443
}
fn default_monitoring_interval() -> String {
    "12h".to_owned()
}
fn default_start_time() -> String {
    "09:00".to_owned()
}
fn default_max_transfers() -> u32 {
    6
}
fn default_lag_threshold() -> u32 {
    3600
}

/// What the site's agents made of this configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationServerStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready: every selected agent accepted the configuration.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Conditions,
    /// One entry per selected agent: whether it accepted the configuration.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<AgentAcceptance>,
    /// `accepted/selected`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agents_summary: Option<String>,
}

/// One agent's answer to a site configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentAcceptance {
    /// The node the agent runs on.
    pub node: String,
    /// Whether the agent applied the configuration.
    pub accepted: bool,
    /// Why not, when it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// What the agent enforces now (after a refusal: its previous settings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_force: Option<AgentSettings>,
}

/// The settings an agent enforces, as it reports them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentSettings {
    /// The port it receives replication on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Most transfers it runs at once.
    pub max_active_transfers: u32,
    /// Its bandwidth limit in bytes per second; absent: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_limit_bytes_per_second: Option<u64>,
    /// Serial number (hex) of the certificate it uses for replication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_serial: Option<String>,
    /// When that certificate expires (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_not_after: Option<String>,
    /// `ReplicationServer` (the Secret `tlsSecretName` names) or `Agent` (its own certificate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_source: Option<String>,
}
