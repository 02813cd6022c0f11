//! RecoveryPlan validation against the real apiserver: a plan naming a
//! VMReplication that does not exist is not Ready and says which; creating
//! it makes the plan Ready, with the members' states summarised.

use std::sync::Arc;

use kube::{
    Api,
    api::{Patch, PatchParams},
};
use serde_json::json;
use vmreplica_controller::{context, plan, telemetry::Metrics};
use vmreplica_crds::RecoveryPlan;
use vmreplica_tests::{
    FIELD_MANAGER, client,
    pki::Ca,
    procs::{live, wait_secs},
    test_namespace,
};

#[tokio::test]
async fn a_plan_is_ready_once_every_member_exists() {
    let client = client().await;
    let ns = test_namespace(&client, "plan").await;
    let ctx = Arc::new(context::Shared {
        client: client.clone(),
        agents_namespace: ns.clone(),
        tls: live(&Ca::new("plan-ca").unwrap(), &["vmreplica-controller"]),
        now: k8s_openapi::jiff::Timestamp::now,
        metrics: Metrics::new(),
    });
    tokio::spawn(plan::run(ctx, Some(ns.clone()), std::future::pending()));
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let plans: Api<RecoveryPlan> = Api::namespaced(client.clone(), &ns);
    plans
        .patch("finance", &pp, &Patch::Apply(json!({
            "apiVersion": "vmreplica.io/v1alpha1", "kind": "RecoveryPlan", "metadata": {"name": "finance"},
            "spec": {"groups": [{"name": "database", "vmReplications": ["ledger-db"]}]},
        })))
        .await
        .unwrap();
    let ready = |want: &'static str| {
        let plans = plans.clone();
        async move || {
            let s = plans.get("finance").await.ok()?.status?;
            let c = s.conditions.into_iter().find(|c| c.type_ == "Ready")?;
            (c.status == want).then_some((s.group_count, c))
        }
    };
    let (groups, c) = wait_secs(30, "the plan to be refused", ready("False")).await;
    assert_eq!(groups, 1);
    assert!(
        c.message.contains(&format!("VMReplication ledger-db does not exist in namespace {ns}")),
        "{c:?}"
    );

    Api::<vmreplica_crds::VMReplication>::namespaced(client.clone(), &ns)
        .patch("ledger-db", &pp, &Patch::Apply(json!({
            "apiVersion": "vmreplica.io/v1alpha1", "kind": "VMReplication", "metadata": {"name": "ledger-db"},
            "spec": {"disks": [{"name": "root", "path": "/var/lib/vmreplica/disks/ledger.img"}]},
        })))
        .await
        .unwrap();
    // The VMReplication's arrival reconciles the plan (no plan change needed).
    let (_, c) = wait_secs(30, "the plan to be Ready", ready("True")).await;
    assert_eq!(c.message, "1 groups, 1 VMReplications: 1 NotEnabled");
}
