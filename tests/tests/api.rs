//! The API against a real apiserver: the CRDs install, every example applies,
//! the schema refuses each kind of bad value with the apiserver's own message,
//! and `kubectl explain` shows the field docs.

use std::{process::Command, time::Duration};

use kube::{
    Api, Client,
    api::{DynamicObject, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use vmreplica_crds::{AuthorizationEntry, RecoveryPlan, ReplicationServer, VMReplication};
use vmreplica_tests::{apply_yaml, client, repo_root, shared_kubeconfig, test_namespace};

#[tokio::test]
async fn every_crd_is_established_with_status_and_short_names() {
    let client = client().await;
    let api: Api<
        k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    > = Api::all(client);
    for (name, short) in [
        ("replicationservers.vmreplica.io", "rsrv"),
        ("authorizationentries.vmreplica.io", "authz"),
        ("vmreplications.vmreplica.io", "vmr"),
        ("recoveryplans.vmreplica.io", "rplan"),
    ] {
        let crd = api.get(name).await.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(crd.spec.names.short_names.as_deref(), Some(&[short.to_owned()][..]));
        let version = &crd.spec.versions[0];
        assert!(
            version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(),
            "{name} has no status subresource"
        );
    }
}

#[tokio::test]
async fn every_example_applies_and_gets_defaults() {
    let client = client().await;
    let ns = test_namespace(&client, "examples").await;
    let mut files: Vec<_> = std::fs::read_dir(repo_root().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "expected one example per kind, found {files:?}");
    let mut kinds = Vec::new();
    for file in &files {
        let yaml = std::fs::read_to_string(file).unwrap();
        let applied =
            apply_yaml(&client, &ns, &yaml).await.unwrap_or_else(|e| panic!("{}: {e:#}", file.display()));
        kinds.extend(applied.iter().map(|o| o.types.as_ref().unwrap().kind.clone()));
    }
    kinds.sort();
    assert_eq!(kinds, ["AuthorizationEntry", "RecoveryPlan", "ReplicationServer", "VMReplication"]);

    // The typed view of what was stored: defaults from the schema are filled in
    // by the apiserver itself.
    let vmr = Api::<VMReplication>::namespaced(client.clone(), &ns).get("ledger-db").await.unwrap();
    assert_eq!(vmr.spec.disks.len(), 2);
    assert_eq!(vmr.spec.replication_frequency_seconds, 30);
    assert_eq!(vmr.spec.recovery_history.app_consistent_interval_hours, Some(4));
    assert!(!vmr.spec.suspended, "suspended defaults to false");
    let rs = Api::<ReplicationServer>::all(client.clone()).get("site-b").await.unwrap();
    assert_eq!(rs.spec.lag_warning_threshold_seconds, 3600, "schema default applied");
    let ae = Api::<AuthorizationEntry>::all(client.clone()).get("site-a-finance").await.unwrap();
    assert_eq!(ae.spec.trust_group, "finance");
    let plan = Api::<RecoveryPlan>::namespaced(client.clone(), &ns).get("finance").await.unwrap();
    assert_eq!(plan.spec.groups.len(), 2);
    assert_eq!(plan.spec.groups[0].post_hook.as_ref().unwrap().timeout_seconds, 300);
}

fn valid_vmr(name: &str) -> Value {
    json!({
        "apiVersion": "vmreplica.io/v1alpha1", "kind": "VMReplication",
        "metadata": {"name": name},
        "spec": {
            "disks": [{"name": "root", "path": "/var/lib/vm/root.img"}, {"name": "data", "path": "/var/lib/vm/data.img"}],
            "replicaServer": {"name": "replica.site-b.example.com"},
        }
    })
}

fn valid_rs(name: &str) -> Value {
    json!({
        "apiVersion": "vmreplica.io/v1alpha1", "kind": "ReplicationServer",
        "metadata": {"name": name},
        "spec": {"tlsSecretName": "tls", "defaultStorageLocation": "/var/lib/vmreplica"}
    })
}

fn valid_ae(name: &str) -> Value {
    json!({
        "apiVersion": "vmreplica.io/v1alpha1", "kind": "AuthorizationEntry",
        "metadata": {"name": name},
        "spec": {"allowedPrimaryServer": "*.site-a.example.com", "replicaStorageLocation": "/srv/replicas",
                 "trustGroup": "finance", "replicaNamespace": "finance-dr"}
    })
}

fn valid_plan(name: &str) -> Value {
    json!({
        "apiVersion": "vmreplica.io/v1alpha1", "kind": "RecoveryPlan",
        "metadata": {"name": name},
        "spec": {"groups": [{"name": "db", "vmReplications": ["a"]}]}
    })
}

/// Sets `pointer` (a JSON pointer) in `obj` to `value`, creating objects on the way.
fn set(mut obj: Value, pointer: &str, value: Value) -> Value {
    let mut cur = &mut obj;
    let parts: Vec<&str> = pointer.trim_start_matches('/').split('/').collect();
    for (i, part) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            match cur {
                Value::Array(a) => a[part.parse::<usize>().unwrap()] = value,
                _ => {
                    cur[*part] = value;
                }
            }
            break;
        }
        cur = match cur {
            Value::Array(a) => &mut a[part.parse::<usize>().unwrap()],
            _ => {
                if cur.get(*part).is_none() {
                    cur[*part] = json!({});
                }
                &mut cur[*part]
            }
        };
    }
    obj
}

async fn create(client: &Client, ns: &str, obj: &Value) -> Result<DynamicObject, kube::Error> {
    let obj: DynamicObject = serde_json::from_value(obj.clone()).unwrap();
    let kind = obj.types.as_ref().unwrap().kind.clone();
    let (gvk, namespaced) = match kind.as_str() {
        "VMReplication" => (kube::api::ApiResource::erase::<VMReplication>(&()), true),
        "RecoveryPlan" => (kube::api::ApiResource::erase::<RecoveryPlan>(&()), true),
        "ReplicationServer" => (kube::api::ApiResource::erase::<ReplicationServer>(&()), false),
        "AuthorizationEntry" => (kube::api::ApiResource::erase::<AuthorizationEntry>(&()), false),
        other => panic!("unexpected kind {other}"),
    };
    let api: Api<DynamicObject> = if namespaced {
        Api::namespaced_with(client.clone(), ns, &gvk)
    } else {
        Api::all_with(client.clone(), &gvk)
    };
    api.create(&PostParams::default(), &obj).await
}

fn rejection(result: Result<DynamicObject, kube::Error>) -> String {
    match result {
        Err(kube::Error::Api(status)) if status.code == 422 => status.message,
        Err(e) => panic!("expected 422 Invalid, got {e}"),
        Ok(o) => panic!("expected the apiserver to reject, but it stored {:?}", o.metadata.name),
    }
}

#[tokio::test]
async fn schema_rejects_each_bad_value_with_the_apiservers_message() {
    let client = client().await;
    let ns = test_namespace(&client, "schema").await;
    let cases: Vec<(&str, Value, &[&str])> = vec![
        (
            "role enum",
            set(valid_vmr("v1"), "/spec/role", json!("Master")),
            &["spec.role", "Unsupported value: \"Master\"", "\"Primary\", \"Replica\", \"ExtendedReplica\""],
        ),
        (
            "failover type enum",
            set(valid_vmr("v2"), "/spec/failover", json!({"id": "f1", "type": "Sideways"})),
            &[
                "spec.failover.type",
                "Unsupported value: \"Sideways\"",
                "\"Test\", \"Planned\", \"Unplanned\"",
            ],
        ),
        (
            "initial replication method enum",
            set(valid_vmr("v3"), "/spec/initialReplication/method", json!("Carrier-Pigeon")),
            &[
                "spec.initialReplication.method",
                "Unsupported value",
                "\"Network\", \"ExternalMedia\", \"ExistingImage\"",
            ],
        ),
        (
            "frequency below 1 s",
            set(valid_vmr("v4"), "/spec/replicationFrequencySeconds", json!(0)),
            &["spec.replicationFrequencySeconds", "greater than or equal to 1"],
        ),
        (
            "frequency above 3600 s",
            set(valid_vmr("v5"), "/spec/replicationFrequencySeconds", json!(3601)),
            &["spec.replicationFrequencySeconds", "less than or equal to 3600"],
        ),
        (
            "hourly recovery points above 168",
            set(valid_vmr("v6"), "/spec/recoveryHistory/hourlyRecoveryPoints", json!(169)),
            &["spec.recoveryHistory.hourlyRecoveryPoints", "less than or equal to 168"],
        ),
        (
            "empty disk list",
            set(valid_vmr("v7"), "/spec/disks", json!([])),
            &["spec.disks", "at least 1 items"],
        ),
        (
            "duplicate disk names",
            set(valid_vmr("v8"), "/spec/disks/1/name", json!("root")),
            &["spec.disks[1]", "Duplicate value"],
        ),
        (
            "relative disk path",
            set(valid_vmr("v9"), "/spec/disks/0/path", json!("disks/root.img")),
            &["spec.disks.path", "should match"],
        ),
        (
            "disk path with ..",
            set(valid_vmr("v10"), "/spec/disks/0/path", json!("/var/lib/vm/../../etc/shadow")),
            &["spec.disks.path", "should match"],
        ),
        (
            "replica server port 0",
            set(valid_vmr("v11"), "/spec/replicaServer/port", json!(0)),
            &["spec.replicaServer.port", "greater than or equal to 1"],
        ),
        (
            "server port above 65535",
            set(valid_rs("rs-bad-port"), "/spec/port", json!(65536)),
            &["spec.port", "less than or equal to 65535"],
        ),
        (
            "monitoring interval under 1h",
            set(valid_rs("rs-bad-mon-1"), "/spec/monitoringInterval", json!("30m")),
            &["spec.monitoringInterval", "should match"],
        ),
        (
            "monitoring interval over 7d",
            set(valid_rs("rs-bad-mon-2"), "/spec/monitoringInterval", json!("8d")),
            &["spec.monitoringInterval", "should match"],
        ),
        (
            "relative default storage",
            set(valid_rs("rs-bad-store"), "/spec/defaultStorageLocation", json!("replicas")),
            &["spec.defaultStorageLocation", "should match"],
        ),
        (
            "wildcard not the whole first label",
            set(valid_ae("ae-bad-1"), "/spec/allowedPrimaryServer", json!("host*.site-a.example.com")),
            &["spec.allowedPrimaryServer", "should match"],
        ),
        (
            "wildcard in a later label",
            set(valid_ae("ae-bad-2"), "/spec/allowedPrimaryServer", json!("a.*.example.com")),
            &["spec.allowedPrimaryServer", "should match"],
        ),
        (
            "bare wildcard (use allowAnyServer)",
            set(valid_ae("ae-bad-3"), "/spec/allowedPrimaryServer", json!("*")),
            &["spec.allowedPrimaryServer", "should match"],
        ),
        (
            "replica storage with ..",
            set(valid_ae("ae-bad-4"), "/spec/replicaStorageLocation", json!("/srv/../etc")),
            &["spec.replicaStorageLocation", "should match"],
        ),
        (
            "recovery plan without groups",
            set(valid_plan("p1"), "/spec/groups", json!([])),
            &["spec.groups", "at least 1 items"],
        ),
    ];
    let mut failures = Vec::new();
    for (what, obj, expected) in &cases {
        let message = rejection(create(&client, &ns, obj).await);
        if let Some(missing) = expected.iter().find(|e| !message.contains(**e)) {
            failures.push(format!("{what}: message lacks {missing:?}: {message}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // The valid bases themselves are accepted, so each rejection above is the rule's doing.
    for obj in [
        valid_vmr("ok-vmr"),
        valid_plan("ok-plan"),
        valid_rs(&format!("ok-rs-{ns}")),
        valid_ae(&format!("ok-ae-{ns}")),
    ] {
        create(&client, &ns, &obj).await.unwrap_or_else(|e| panic!("valid object refused: {e}"));
    }
}

#[tokio::test]
async fn status_enums_are_enforced_on_the_status_subresource() {
    let client = client().await;
    let ns = test_namespace(&client, "status").await;
    create(&client, &ns, &valid_vmr("s1")).await.unwrap();
    let api = Api::<VMReplication>::namespaced(client, &ns);
    let pp = PatchParams::default();
    for (field, bad, good) in [("state", "Bogus", "Replicating"), ("health", "Fine", "Warning")] {
        let err =
            api.patch_status("s1", &pp, &Patch::Merge(json!({"status": {field: bad}}))).await.unwrap_err();
        let message = match err {
            kube::Error::Api(status) if status.code == 422 => status.message,
            other => panic!("expected 422 Invalid, got {other}"),
        };
        assert!(
            message.contains(&format!("status.{field}")) && message.contains("Unsupported value"),
            "{message}"
        );
        api.patch_status("s1", &pp, &Patch::Merge(json!({"status": {field: good}}))).await.unwrap();
    }
    let stored = api.get("s1").await.unwrap().status.unwrap();
    assert_eq!(stored.state, vmreplica_crds::ReplicationState::Replicating);
    assert_eq!(stored.health, vmreplica_crds::Health::Warning);
}

#[tokio::test]
async fn kubectl_explain_shows_the_field_docs() {
    let _ = client().await; // starts the shared control plane if needed
    let kubeconfig = shared_kubeconfig();
    // The apiserver publishes CRD schemas to its OpenAPI document a moment after
    // the CRD is established.
    let mut last = String::new();
    for _ in 0..60 {
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["explain", "vmreplication.spec"])
            .output()
            .expect("kubectl runs");
        last = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if out.status.success() && last.contains("replicationFrequencySeconds") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for expected in [
        "What to protect, where to send it",
        "replicationFrequencySeconds",
        "Hyper-V's presets are 30",
        "The VM's virtual disks",
    ] {
        assert!(last.contains(expected), "kubectl explain lacks {expected:?}:\n{last}");
    }
}
