//! VM power control against the real apiserver: KubeVirt's VirtualMachine CRD
//! is installed (the schema-less form: the test needs the API, not KubeVirt's
//! validation), and the controller's KubeVirt power patches `runStrategy` and
//! reads `printableStatus`.

use kube::{
    Api,
    api::{DynamicObject, Patch, PatchParams},
};
use serde_json::json;
use vmreplica_controller::power::{Power, PowerState, VmPower, virtual_machines};
use vmreplica_crds::VMReplication;
use vmreplica_tests::{FIELD_MANAGER, client, procs::wait_for, test_namespace};

async fn install_virtual_machine_crd(client: &kube::Client) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "virtualmachines.kubevirt.io"},
        "spec": {"group": "kubevirt.io", "scope": "Namespaced",
                 "names": {"kind": "VirtualMachine", "plural": "virtualmachines", "singular": "virtualmachine", "shortNames": ["vm"]},
                 "versions": [{"name": "v1", "served": true, "storage": true, "subresources": {"status": {}},
                               "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]},
    }))
    .unwrap();
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    api.patch("virtualmachines.kubevirt.io", &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&crd))
        .await
        .unwrap();
    wait_for("the VirtualMachine CRD", async || {
        let c = api.get("virtualmachines.kubevirt.io").await.ok()?;
        c.status?.conditions?.iter().any(|c| c.type_ == "Established" && c.status == "True").then_some(())
    })
    .await;
}

fn vmr(ns: &str, runtime: &str) -> VMReplication {
    serde_json::from_value(json!({
        "apiVersion": "vmreplica.io/v1alpha1", "kind": "VMReplication", "metadata": {"name": "db", "namespace": ns},
        "spec": {"vm": {"runtime": runtime, "name": "db-vm"}, "disks": [{"name": "root", "path": "/d/root.img"}]},
    }))
    .unwrap()
}

#[tokio::test]
async fn kubevirt_power_patches_the_run_strategy_and_reads_the_status() {
    let client = client().await;
    install_virtual_machine_crd(&client).await;
    let ns = test_namespace(&client, "power").await;
    let power = VmPower::for_vmr(client.clone(), &vmr(&ns, "KubeVirt"));
    assert_eq!(power.state().await.unwrap(), PowerState::Missing);

    let vms: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &virtual_machines());
    let vm = json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": "db-vm"},
                    "spec": {"running": true, "template": {"spec": {}}}});
    vms.patch("db-vm", &PatchParams::apply(FIELD_MANAGER), &Patch::Apply(&vm)).await.unwrap();
    assert_eq!(power.state().await.unwrap(), PowerState::Transitioning, "no status yet");
    let status = |s: &str| json!({"status": {"printableStatus": s}});
    vms.patch_status("db-vm", &PatchParams::default(), &Patch::Merge(&status("Running"))).await.unwrap();
    assert_eq!(power.state().await.unwrap(), PowerState::Running);

    power.set_running(false).await.unwrap();
    let got = vms.get("db-vm").await.unwrap();
    assert_eq!(got.data.pointer("/spec/runStrategy"), Some(&json!("Halted")));
    assert_eq!(got.data.pointer("/spec/running"), None, "runStrategy replaces running");
    assert!(got.data.pointer("/spec/template").is_some(), "the rest of the spec is untouched");
    vms.patch_status("db-vm", &PatchParams::default(), &Patch::Merge(&status("Stopped"))).await.unwrap();
    assert_eq!(power.state().await.unwrap(), PowerState::Stopped);
    power.set_running(true).await.unwrap();
    let got = vms.get("db-vm").await.unwrap();
    assert_eq!(got.data.pointer("/spec/runStrategy"), Some(&json!("Always")));

    // Runtime None: disks only, nothing to drive.
    let disks = VmPower::for_vmr(client.clone(), &vmr(&ns, "None"));
    disks.set_running(false).await.unwrap();
    assert_eq!(disks.state().await.unwrap(), PowerState::Missing);
    assert_eq!(vms.get("db-vm").await.unwrap().data.pointer("/spec/runStrategy"), Some(&json!("Always")));
}
