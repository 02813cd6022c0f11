//! The VM whose power failover drives (`spec.vm`): a small trait with two
//! implementations. `KubeVirt` patches `spec.runStrategy` of a
//! `kubevirt.io/v1` VirtualMachine through the dynamic API and reads its
//! `status.printableStatus`; `Disks` (runtime `None`) has no VM to drive.

use kube::{
    Api, Client, ResourceExt,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams},
};
use vmreplica_crds::{NicSettings, VMReplication, VmRuntime};

/// What a VM looks like to failover.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerState {
    Running,
    Stopped,
    /// Starting, stopping, migrating, or no status yet.
    Transitioning,
    /// The VM object does not exist.
    Missing,
}

/// Starting and stopping the VM of a VMReplication.
pub trait Power {
    /// The VM's state as its runtime reports it.
    fn state(&self) -> impl Future<Output = Result<PowerState, kube::Error>> + Send;
    /// Asks the runtime to run or halt the VM (idempotent; does not wait).
    fn set_running(&self, running: bool) -> impl Future<Output = Result<(), kube::Error>> + Send;
    /// Hands the VM the TCP/IP settings of this site (failover networking)
    /// before it starts; no settings: nothing changes. Idempotent.
    fn set_network(&self, nics: &[NicSettings]) -> impl Future<Output = Result<(), kube::Error>> + Send;
}

/// The volume (and disk) that carries failover network settings when the VM
/// has no cloud-init volume of its own.
pub const NETWORK_VOLUME: &str = "vmreplica-network";

/// cloud-init network configuration (version 2) for `nics`, as JSON (which
/// YAML readers, cloud-init's included, accept as is).
pub fn network_data(nics: &[NicSettings]) -> String {
    let mut ethernets = serde_json::Map::new();
    for n in nics {
        let mut addresses = Vec::new();
        if let Some(a) = &n.ipv4_address {
            addresses.push(format!("{a}/{}", n.ipv4_prefix_length.unwrap_or(32)));
        }
        if let Some(a) = &n.ipv6_address {
            addresses.push(format!("{a}/{}", n.ipv6_prefix_length.unwrap_or(128)));
        }
        let routes: Vec<serde_json::Value> = [&n.ipv4_gateway, &n.ipv6_gateway]
            .into_iter()
            .zip(["0.0.0.0/0", "::/0"])
            .filter_map(|(gw, to)| gw.as_ref().map(|via| serde_json::json!({"to": to, "via": via})))
            .collect();
        let mut e = serde_json::Map::new();
        // No address given: this NIC keeps asking DHCP.
        if addresses.is_empty() {
            e.insert("dhcp4".into(), true.into());
        } else {
            e.insert("addresses".into(), addresses.into());
        }
        if !routes.is_empty() {
            e.insert("routes".into(), routes.into());
        }
        if !n.dns_servers.is_empty() {
            e.insert("nameservers".into(), serde_json::json!({"addresses": n.dns_servers}));
        }
        ethernets.insert(n.nic.clone(), e.into());
    }
    serde_json::json!({"version": 2, "ethernets": ethernets}).to_string()
}

/// A KubeVirt VirtualMachine in the VMReplication's namespace.
pub struct KubeVirt {
    api: Api<DynamicObject>,
    name: String,
}

/// The `kubevirt.io/v1` VirtualMachine resource.
pub fn virtual_machines() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("kubevirt.io", "v1", "VirtualMachine"),
        "virtualmachines",
    )
}

impl KubeVirt {
    pub fn new(client: Client, namespace: &str, name: &str) -> Self {
        Self { api: Api::namespaced_with(client, namespace, &virtual_machines()), name: name.to_owned() }
    }
}

impl Power for KubeVirt {
    async fn state(&self) -> Result<PowerState, kube::Error> {
        let vm = match self.api.get_opt(&self.name).await {
            Ok(Some(vm)) => vm,
            Ok(None) => return Ok(PowerState::Missing),
            // KubeVirt not installed: the resource is not served at all.
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(PowerState::Missing),
            Err(e) => return Err(e),
        };
        let printable = vm.data.pointer("/status/printableStatus").and_then(|v| v.as_str()).unwrap_or("");
        Ok(match printable {
            "Running" => PowerState::Running,
            "Stopped" | "Halted" => PowerState::Stopped,
            _ => PowerState::Transitioning,
        })
    }

    async fn set_running(&self, running: bool) -> Result<(), kube::Error> {
        // runStrategy replaces the older spec.running, which must not be set with it.
        let patch = serde_json::json!({
            "spec": {"runStrategy": if running { "Always" } else { "Halted" }, "running": null}
        });
        match self.api.patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            // No such VM (or no KubeVirt): nothing runs it to start or stop.
            Err(kube::Error::Api(e)) if e.code == 404 && !running => Ok(()),
            other => other.map(|_| ()),
        }
    }

    async fn set_network(&self, nics: &[NicSettings]) -> Result<(), kube::Error> {
        if nics.is_empty() {
            return Ok(());
        }
        let vm = self.api.get(&self.name).await?;
        let mut spec = vm.data.pointer("/spec/template/spec").cloned().unwrap_or_default();
        with_network_data(&mut spec, nics);
        // Lists are replaced whole by a merge patch: the resourceVersion
        // makes it fail rather than drop a concurrent change.
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": vm.metadata.resource_version},
            "spec": {"template": {"spec": {"volumes": spec["volumes"],
                                          "domain": {"devices": {"disks": spec["domain"]["devices"]["disks"]}}}}}
        });
        self.api.patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch)).await.map(|_| ())
    }
}

/// Puts `nics` as cloud-init network data into a VirtualMachine's
/// `spec.template.spec`: into its own cloud-init volume, replacing any
/// network data it had, or into a NoCloud volume (and disk) of ours.
fn with_network_data(spec: &mut serde_json::Value, nics: &[NicSettings]) {
    let data = network_data(nics);
    let mut volumes = spec.get("volumes").and_then(|v| v.as_array()).cloned().unwrap_or_default();
    let mut disks =
        spec.pointer("/domain/devices/disks").and_then(|v| v.as_array()).cloned().unwrap_or_default();
    let own = volumes.iter_mut().find_map(|v| {
        let o = v.as_object_mut()?;
        let key = ["cloudInitNoCloud", "cloudInitConfigDrive"].into_iter().find(|k| o.contains_key(*k))?;
        o.get_mut(key)
    });
    match own.and_then(|c| c.as_object_mut()) {
        Some(c) => {
            c.remove("networkDataBase64");
            c.remove("networkDataSecretRef");
            c.insert("networkData".into(), data.into());
        }
        None => {
            volumes
                .push(serde_json::json!({"name": NETWORK_VOLUME, "cloudInitNoCloud": {"networkData": data}}));
            if !disks.iter().any(|d| d.get("name").and_then(|n| n.as_str()) == Some(NETWORK_VOLUME)) {
                disks.push(serde_json::json!({"name": NETWORK_VOLUME, "disk": {"bus": "virtio"}}));
            }
        }
    }
    spec["volumes"] = volumes.into();
    spec["domain"]["devices"]["disks"] = disks.into();
}

/// The test VM of a test failover, built from the replica site's VM object
/// `source` (its `spec.template` and labels): named `name`, running, every
/// hostDisk volume on a replica image (`copies`: image path → test copy)
/// moved to its copy, every network on `test.networkName` (Multus), and the
/// test network's TCP/IP settings as cloud-init network data (no test
/// network: no network at all). Refused —
/// nothing is created — when a volume would let the test VM write to
/// anything the replica VM uses: a replica image not in `copies`, or a
/// persistent volume.
pub fn test_vm(
    source: &DynamicObject,
    name: &str,
    vmr: &str,
    copies: &std::collections::BTreeMap<String, String>,
    test: Option<&vmreplica_crds::TestNetwork>,
) -> Result<serde_json::Value, String> {
    let mut template =
        source.data.pointer("/spec/template").cloned().ok_or("the VM object has no spec.template")?;
    let spec = &mut template["spec"];
    let mut moved = 0;
    for v in spec.get_mut("volumes").and_then(|v| v.as_array_mut()).into_iter().flatten() {
        let vol = v.get("name").and_then(|n| n.as_str()).unwrap_or("?").to_owned();
        if let Some(path) = v.pointer_mut("/hostDisk/path") {
            let p = path.as_str().unwrap_or_default().to_owned();
            match copies.get(&p) {
                Some(copy) => {
                    *path = copy.clone().into();
                    moved += 1;
                }
                None => {
                    return Err(format!(
                        "volume {vol}: hostDisk {p} is not one of the replica's disks: the test VM would share it"
                    ));
                }
            }
        }
        for shared in ["persistentVolumeClaim", "dataVolume", "ephemeral"] {
            if v.get(shared).is_some() {
                return Err(format!(
                    "volume {vol} ({shared}) would be shared with the replica VM: not copied"
                ));
            }
        }
    }
    if moved == 0 {
        return Err("the VM object uses none of the replica's disks (as hostDisk volumes)".into());
    }
    match test {
        Some(test) => {
            for n in spec.get_mut("networks").and_then(|v| v.as_array_mut()).into_iter().flatten() {
                let net = n.get("name").cloned().unwrap_or_default();
                *n = serde_json::json!({"name": net, "multus": {"networkName": test.network_name}});
            }
            if !test.nics.is_empty() {
                with_network_data(spec, &test.nics);
            }
        }
        // No test network: not connected (as Hyper-V's test VM by default).
        None => {
            spec["networks"] = serde_json::json!([]);
            spec["domain"]["devices"]["interfaces"] = serde_json::json!([]);
        }
    }
    let mut labels = source.metadata.labels.clone().unwrap_or_default();
    labels.insert(TEST_VM_LABEL.into(), vmr.to_owned());
    Ok(serde_json::json!({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": name, "labels": labels},
        "spec": {"runStrategy": "Always", "template": template}
    }))
}

/// Marks a test VM with the name of the VMReplication whose test failover
/// made it.
pub const TEST_VM_LABEL: &str = "vmreplica.io/test-failover-of";

/// Creates (or keeps) test VM `vm` in `namespace`, owned by `owner` so it
/// goes with it. An existing one not made by a test failover is left alone
/// and reported.
pub async fn create_test_vm(
    client: Client,
    namespace: &str,
    vm: serde_json::Value,
    owner: k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
) -> Result<(), String> {
    let api: Api<DynamicObject> = Api::namespaced_with(client, namespace, &virtual_machines());
    let name = vm["metadata"]["name"].as_str().unwrap_or_default().to_owned();
    match api.get_opt(&name).await.map_err(|e| e.to_string())? {
        Some(existing) if existing.metadata.deletion_timestamp.is_some() => {
            return Err(format!(
                "the previous test VM {name} is still being deleted: request the test again (a new id) once it is gone"
            ));
        }
        Some(existing) if existing.labels().contains_key(TEST_VM_LABEL) => return Ok(()),
        Some(_) => {
            return Err(format!("a VirtualMachine named {name} exists and is not a test VM: not replaced"));
        }
        None => {}
    }
    let mut vm = vm;
    vm["metadata"]["ownerReferences"] = serde_json::json!([owner]);
    let obj: DynamicObject = serde_json::from_value(vm).map_err(|e| e.to_string())?;
    api.create(&Default::default(), &obj).await.map(drop).map_err(|e| e.to_string())
}

/// Deletes the test VMs of VMReplication `vmr`'s test failovers (whatever
/// its spec names now); how many there were.
pub async fn delete_test_vms(client: Client, namespace: &str, vmr: &str) -> Result<usize, String> {
    let api: Api<DynamicObject> = Api::namespaced_with(client, namespace, &virtual_machines());
    let lp = kube::api::ListParams::default().labels(&format!("{TEST_VM_LABEL}={vmr}"));
    let vms = match api.list(&lp).await {
        Ok(l) => l.items,
        // KubeVirt not installed: there is no test VM.
        Err(kube::Error::Api(e)) if e.code == 404 => return Ok(0),
        Err(e) => return Err(e.to_string()),
    };
    for vm in &vms {
        match api.delete(&vm.name_any(), &Default::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(vms.len())
}

/// Runtime `None`: only disks; nothing to start or stop.
pub struct Disks;

impl Power for Disks {
    async fn state(&self) -> Result<PowerState, kube::Error> {
        Ok(PowerState::Missing)
    }

    async fn set_running(&self, _running: bool) -> Result<(), kube::Error> {
        Ok(())
    }

    async fn set_network(&self, _nics: &[NicSettings]) -> Result<(), kube::Error> {
        Ok(())
    }
}

/// The power control a VMReplication names.
pub enum VmPower {
    KubeVirt(Box<KubeVirt>),
    Disks(Disks),
}

impl VmPower {
    pub fn for_vmr(client: Client, vmr: &VMReplication) -> Self {
        match &vmr.spec.vm {
            Some(vm) if vm.runtime == VmRuntime::KubeVirt => {
                let ns = vmr.metadata.namespace.clone().unwrap_or_default();
                VmPower::KubeVirt(Box::new(KubeVirt::new(client, &ns, &vm.name)))
            }
            _ => VmPower::Disks(Disks),
        }
    }
}

impl Power for VmPower {
    async fn state(&self) -> Result<PowerState, kube::Error> {
        match self {
            VmPower::KubeVirt(k) => k.state().await,
            VmPower::Disks(d) => d.state().await,
        }
    }

    async fn set_running(&self, running: bool) -> Result<(), kube::Error> {
        match self {
            VmPower::KubeVirt(k) => k.set_running(running).await,
            VmPower::Disks(d) => d.set_running(running).await,
        }
    }

    async fn set_network(&self, nics: &[NicSettings]) -> Result<(), kube::Error> {
        match self {
            VmPower::KubeVirt(k) => k.set_network(nics).await,
            VmPower::Disks(d) => d.set_network(nics).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nic(v: serde_json::Value) -> NicSettings {
        serde_json::from_value(v).unwrap()
    }

    fn source(volumes: serde_json::Value) -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
            "metadata": {"name": "db-vm", "namespace": "dr", "labels": {"app": "db"}, "resourceVersion": "7"},
            "spec": {"runStrategy": "Halted", "template": {"spec": {
                "domain": {"devices": {"disks": [{"name": "root", "disk": {}}],
                                       "interfaces": [{"name": "default", "masquerade": {}}]}},
                "networks": [{"name": "default", "pod": {}}],
                "volumes": volumes}}},
            "status": {"printableStatus": "Stopped"}}))
        .unwrap()
    }

    #[test]
    fn the_test_vm_runs_on_the_copies_and_the_test_network_only() {
        let copies: std::collections::BTreeMap<String, String> =
            [("/r/db/root/disk.img".to_owned(), "/r/db/root/materialized/db-test.img".to_owned())].into();
        let test: vmreplica_crds::TestNetwork = serde_json::from_value(serde_json::json!({
            "networkName": "dr-test", "nics": [{"nic": "eth0", "ipv4Address": "192.168.7.5", "ipv4PrefixLength": 24}]}))
        .unwrap();
        let src = source(serde_json::json!([
            {"name": "root", "hostDisk": {"path": "/r/db/root/disk.img", "type": "Disk"}},
            {"name": "ci", "cloudInitNoCloud": {"userData": "#cloud-config\n"}}]));
        let vm = test_vm(&src, "db-vm-test", "db", &copies, Some(&test)).unwrap();
        assert_eq!(vm["metadata"]["name"], "db-vm-test");
        assert_eq!(vm["metadata"]["labels"], serde_json::json!({"app": "db", TEST_VM_LABEL: "db"}));
        assert!(vm["metadata"].get("resourceVersion").is_none() && vm.get("status").is_none());
        assert_eq!(vm["spec"]["runStrategy"], "Always");
        let spec = &vm["spec"]["template"]["spec"];
        assert_eq!(spec["volumes"][0]["hostDisk"]["path"], "/r/db/root/materialized/db-test.img");
        assert_eq!(
            spec["networks"],
            serde_json::json!([{"name": "default", "multus": {"networkName": "dr-test"}}])
        );
        let data: serde_json::Value =
            serde_json::from_str(spec["volumes"][1]["cloudInitNoCloud"]["networkData"].as_str().unwrap())
                .unwrap();
        assert_eq!(data["ethernets"]["eth0"]["addresses"], serde_json::json!(["192.168.7.5/24"]));
        assert_eq!(spec["volumes"][1]["cloudInitNoCloud"]["userData"], "#cloud-config\n");

        // No test network: no network at all.
        let vm = test_vm(&src, "db-vm-test", "db", &copies, None).unwrap();
        assert_eq!(vm["spec"]["template"]["spec"]["networks"], serde_json::json!([]));
        assert_eq!(vm["spec"]["template"]["spec"]["domain"]["devices"]["interfaces"], serde_json::json!([]));

        // Anything the test VM would share with the replica VM is refused.
        for (volumes, why) in [
            (
                serde_json::json!([{"name": "root", "hostDisk": {"path": "/r/db/root/disk.img"}},
                                {"name": "logs", "persistentVolumeClaim": {"claimName": "db-logs"}}]),
                "persistentVolumeClaim",
            ),
            (
                serde_json::json!([{"name": "root", "hostDisk": {"path": "/elsewhere/root.img"}}]),
                "not one of the replica's disks",
            ),
            (serde_json::json!([{"name": "ci", "cloudInitNoCloud": {}}]), "none of the replica's disks"),
        ] {
            let err = test_vm(&source(volumes), "db-vm-test", "db", &copies, Some(&test)).unwrap_err();
            assert!(err.contains(why), "{err}");
        }
    }

    #[test]
    fn network_data_is_cloud_init_version_2() {
        let data = network_data(&[
            nic(serde_json::json!({"nic": "eth0", "ipv4Address": "10.2.0.5", "ipv4PrefixLength": 24,
                "ipv4Gateway": "10.2.0.1", "ipv6Address": "fd00::5", "ipv6PrefixLength": 64,
                "dnsServers": ["10.2.0.53", "10.2.0.54"]})),
            nic(serde_json::json!({"nic": "eth1"})),
        ]);
        let v: serde_json::Value = serde_json::from_str(&data).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"version": 2, "ethernets": {
                "eth0": {"addresses": ["10.2.0.5/24", "fd00::5/64"], "routes": [{"to": "0.0.0.0/0", "via": "10.2.0.1"}],
                         "nameservers": {"addresses": ["10.2.0.53", "10.2.0.54"]}},
                "eth1": {"dhcp4": true}}})
        );
    }
}
