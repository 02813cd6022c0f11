//! VM power control against the real apiserver: KubeVirt's VirtualMachine CRD
//! is installed (the schema-less form: the test needs the API, not KubeVirt's
//! validation), and the controller's KubeVirt power patches `runStrategy` and
//! reads `printableStatus`; failover networking lands in the VM's cloud-init
//! network data.

use kube::{
    Api,
    api::{DynamicObject, Patch, PatchParams},
};
use serde_json::json;
use vmreplica_controller::power::{Power, PowerState, VmPower, virtual_machines};
use vmreplica_crds::VMReplication;
use vmreplica_tests::{FIELD_MANAGER, client, install_virtual_machine_crd, procs::wait_for, test_namespace};

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

#[tokio::test]
async fn failover_network_settings_become_cloud_init_network_data() {
    let client = client().await;
    install_virtual_machine_crd(&client).await;
    let ns = test_namespace(&client, "netdata").await;
    let vms: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &virtual_machines());
    let nics: Vec<vmreplica_crds::NicSettings> = serde_json::from_value(json!([
        {"nic": "eth0", "ipv4Address": "10.9.0.7", "ipv4PrefixLength": 24, "ipv4Gateway": "10.9.0.1",
         "dnsServers": ["10.9.0.53"]}]))
    .unwrap();
    let expected = json!({"version": 2, "ethernets": {"eth0": {"addresses": ["10.9.0.7/24"],
        "routes": [{"to": "0.0.0.0/0", "via": "10.9.0.1"}], "nameservers": {"addresses": ["10.9.0.53"]}}}});
    let network_of = |vm: &DynamicObject, volume: &str| -> serde_json::Value {
        let v = vm.data.pointer("/spec/template/spec/volumes").unwrap().as_array().unwrap();
        let v = v.iter().find(|v| v["name"] == volume).unwrap();
        let text = v.pointer("/cloudInitNoCloud/networkData").unwrap().as_str().unwrap();
        serde_yaml::from_str(text).expect("network data is YAML")
    };

    // A VM with its own cloud-init volume: its network data is replaced,
    // its user data and other volumes are kept.
    let vm = json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": "db-vm"},
        "spec": {"runStrategy": "Halted", "template": {"spec": {
            "domain": {"devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}, {"name": "ci", "disk": {"bus": "virtio"}}]}},
            "volumes": [{"name": "root", "persistentVolumeClaim": {"claimName": "db-root"}},
                        {"name": "ci", "cloudInitNoCloud": {"userData": "#cloud-config\n", "networkDataBase64": "b2xk"}}]}}}});
    vms.patch("db-vm", &PatchParams::apply(FIELD_MANAGER), &Patch::Apply(&vm)).await.unwrap();
    let power = VmPower::for_vmr(client.clone(), &vmr(&ns, "KubeVirt"));
    power.set_network(&nics).await.unwrap();
    let got = vms.get("db-vm").await.unwrap();
    assert_eq!(network_of(&got, "ci"), expected);
    assert_eq!(
        got.data.pointer("/spec/template/spec/volumes/1/cloudInitNoCloud/userData"),
        Some(&json!("#cloud-config\n"))
    );
    assert_eq!(got.data.pointer("/spec/template/spec/volumes/1/cloudInitNoCloud/networkDataBase64"), None);
    assert_eq!(
        got.data.pointer("/spec/template/spec/volumes/0/persistentVolumeClaim/claimName"),
        Some(&json!("db-root"))
    );
    assert_eq!(
        got.data.pointer("/spec/template/spec/domain/devices/disks").unwrap().as_array().unwrap().len(),
        2
    );
    power.set_network(&nics).await.unwrap();
    assert_eq!(vms.get("db-vm").await.unwrap().data["spec"], got.data["spec"], "idempotent");

    // Without one, a NoCloud volume and its disk are added.
    let bare = json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": "db-vm"},
        "spec": {"runStrategy": "Halted", "template": {"spec": {
            "domain": {"devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]}},
            "volumes": [{"name": "root", "persistentVolumeClaim": {"claimName": "db-root"}}]}}}});
    vms.delete("db-vm", &Default::default()).await.unwrap();
    wait_for("the VM to go", async || vms.get_opt("db-vm").await.ok()?.is_none().then_some(())).await;
    vms.patch("db-vm", &PatchParams::apply(FIELD_MANAGER), &Patch::Apply(&bare)).await.unwrap();
    power.set_network(&nics).await.unwrap();
    let got = vms.get("db-vm").await.unwrap();
    assert_eq!(network_of(&got, vmreplica_controller::power::NETWORK_VOLUME), expected);
    let disks = got.data.pointer("/spec/template/spec/domain/devices/disks").unwrap().as_array().unwrap();
    assert!(disks.iter().any(|d| d["name"] == vmreplica_controller::power::NETWORK_VOLUME), "{disks:?}");
    power.set_network(&nics).await.unwrap();
    let again = vms.get("db-vm").await.unwrap();
    assert_eq!(again.data["spec"], got.data["spec"], "idempotent: one volume, one disk");

    // No settings: the VM is not touched; runtime None: nothing to touch.
    power.set_network(&[]).await.unwrap();
    VmPower::for_vmr(client.clone(), &vmr(&ns, "None")).set_network(&nics).await.unwrap();
    assert_eq!(vms.get("db-vm").await.unwrap().metadata.resource_version, again.metadata.resource_version);
}

/// A test failover's VM: created once (again: kept), never over a VM that is
/// not a test VM, and deleted by the VMReplication it belongs to.
#[tokio::test]
async fn test_vms_are_created_once_and_deleted_by_their_vmreplication() {
    use vmreplica_controller::power::{TEST_VM_LABEL, create_test_vm, delete_test_vms};
    let client = client().await;
    install_virtual_machine_crd(&client).await;
    let ns = test_namespace(&client, "testvm").await;
    let vms: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &virtual_machines());
    let owner = k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
        api_version: "vmreplica.io/v1alpha1".into(),
        kind: "VMReplication".into(),
        name: "db".into(),
        uid: "0f6b1c1e-0000-4000-8000-000000000001".into(),
        controller: Some(true),
        ..Default::default()
    };
    let test_vm = |name: &str| {
        json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
               "metadata": {"name": name, "labels": {TEST_VM_LABEL: "db"}},
               "spec": {"runStrategy": "Always", "template": {"spec": {}}}})
    };
    create_test_vm(client.clone(), &ns, test_vm("db-vm-test"), owner.clone()).await.unwrap();
    let made = vms.get("db-vm-test").await.unwrap();
    assert_eq!(made.metadata.owner_references.unwrap()[0].name, "db", "it goes with its VMReplication");
    create_test_vm(client.clone(), &ns, test_vm("db-vm-test"), owner.clone()).await.unwrap();
    // Someone's own VM of that name is not replaced.
    let mine = json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": "web-test"},
                      "spec": {"runStrategy": "Halted", "template": {"spec": {}}}});
    vms.patch("web-test", &PatchParams::apply(FIELD_MANAGER), &Patch::Apply(&mine)).await.unwrap();
    let err = create_test_vm(client.clone(), &ns, test_vm("web-test"), owner).await.unwrap_err();
    assert!(err.contains("is not a test VM"), "{err}");
    assert_eq!(vms.get("web-test").await.unwrap().data["spec"]["runStrategy"], "Halted");
    // Deleting by VMReplication removes its test VM only.
    assert_eq!(delete_test_vms(client.clone(), &ns, "db").await.unwrap(), 1);
    wait_for("the test VM to go", async || vms.get_opt("db-vm-test").await.ok()?.is_none().then_some(()))
        .await;
    assert!(vms.get_opt("web-test").await.unwrap().is_some());
    assert_eq!(delete_test_vms(client.clone(), &ns, "db").await.unwrap(), 0);
}
