//! AuthorizationEntry: one primary server (or a wildcard of them) allowed to
//! replicate to this site (Hyper-V's `New-VMReplicationAuthorizationEntry`).

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::*;

/// Which primaries may replicate here, where their replicas are stored, and in
/// which namespace their Replica objects appear.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "vmreplica.io",
    version = "v1alpha1",
    kind = "AuthorizationEntry",
    doc = "A primary server (or a wildcard of them) allowed to replicate to this site, where its replicas are stored and which trust group they join.",
    shortname = "authz",
    status = "AuthorizationEntryStatus",
    printcolumn = r#"{"name":"Primary","type":"string","jsonPath":".spec.allowedPrimaryServer"}"#,
    printcolumn = r#"{"name":"Trust Group","type":"string","jsonPath":".spec.trustGroup"}"#,
    printcolumn = r#"{"name":"Namespace","type":"string","jsonPath":".spec.replicaNamespace"}"#,
    printcolumn = r#"{"name":"Storage","type":"string","jsonPath":".spec.replicaStorageLocation","priority":1}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".status.replicaCount"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationEntrySpec {
    /// DNS name the primary's client certificate must carry, lower case. `*` is
    /// allowed only as the whole first label: `*.site-a.example.com` matches
    /// `host1.site-a.example.com` but not `site-a.example.com` or `a.b.site-a.example.com`.
    #[schemars(length(min = 1, max = 253), pattern(SERVER_PATTERN_PATTERN))]
    pub allowed_primary_server: String,
    /// Absolute directory on the replica agents' nodes where this primary's
    /// replica disks and logs are stored. Names received from the primary never
    /// escape it.
    #[schemars(length(min = 1, max = 4096), pattern(ABSOLUTE_PATH_PATTERN))]
    pub replica_storage_location: String,
    /// Replicas created through this entry accept later traffic only from servers
    /// whose entry has the same trust group (Hyper-V's TrustGroup).
    #[schemars(length(min = 1, max = 63), pattern(LABEL_PATTERN))]
    pub trust_group: String,
    /// Namespace in which the Replica VMReplication objects of this primary's VMs
    /// are created (or adopted, when already declared there).
    #[schemars(length(min = 1, max = 63), pattern(LABEL_PATTERN))]
    pub replica_namespace: String,
}

/// Whether the site's agents accepted this entry.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationEntryStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready: the site's agents enforce this entry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Conditions,
    /// How many replicas were created through this entry.
    #[serde(default)]
    pub replica_count: u32,
}
