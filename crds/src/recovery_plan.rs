//! RecoveryPlan: VMReplications failed over together, group by group, with
//! hooks between groups (as Hyper-V Recovery Manager's plans).

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::*;

/// Ordered groups of VMReplications and the failover to apply to all of them.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "vmreplica.io",
    version = "v1alpha1",
    kind = "RecoveryPlan",
    doc = "Ordered groups of VMReplications failed over together, with hooks between groups.",
    shortname = "rplan",
    namespaced,
    status = "RecoveryPlanStatus",
    printcolumn = r#"{"name":"Groups","type":"integer","jsonPath":".status.groupCount"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Current Group","type":"string","jsonPath":".status.currentGroup"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryPlanSpec {
    /// Groups in the order they fail over. Names are unique.
    #[schemars(schema_with = "groups_schema")]
    pub groups: Vec<RecoveryGroup>,
    /// A failover applied to every VMReplication of the plan, group by group;
    /// `startVM` of each VM waits for its group's turn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<FailoverRequest>,
}

fn groups_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = named_list_schema::<RecoveryGroup>(generator);
    schema.insert("minItems".into(), 1.into());
    schema.insert("maxItems".into(), 32.into());
    schema
}

/// One group of a plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryGroup {
    /// Name of the group, unique in the plan.
    #[schemars(length(min = 1, max = 63), pattern(LABEL_PATTERN))]
    pub name: String,
    /// Names of VMReplications in the plan's namespace.
    #[schemars(length(min = 1, max = 256))]
    pub vm_replications: Vec<String>,
    /// A Job run before the group fails over; the group waits for it to succeed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_hook: Option<Hook>,
    /// A Job run after the group's VMs have started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_hook: Option<Hook>,
}

/// A hook: a Job created from a template.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Hook {
    /// A `batch/v1` JobTemplateSpec (`metadata` and `spec`), checked when the Job is created.
    #[schemars(schema_with = "preserve_unknown_object")]
    pub job_template: serde_json::Value,
    /// Seconds to wait for the Job to succeed before the plan fails.
    #[serde(default = "default_hook_timeout")]
    #[schemars(range(min = 1, max = 86400))]
    pub timeout_seconds: u32,
}

fn default_hook_timeout() -> u32 {
    600
}

fn preserve_unknown_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// Where the plan stands.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryPlanStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Number of groups.
    #[serde(default)]
    pub group_count: u32,
    /// Idle, Running, Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// The group being failed over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_group: Option<String>,
    /// Ready: every referenced VMReplication exists.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Conditions,
}
