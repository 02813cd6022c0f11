//! The VM whose power failover drives (`spec.vm`): a small trait with two
//! implementations. `KubeVirt` patches `spec.runStrategy` of a
//! `kubevirt.io/v1` VirtualMachine through the dynamic API and reads its
//! `status.printableStatus`; `Disks` (runtime `None`) has no VM to drive.

use kube::{
    Api, Client,
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
        let spec = vm.data.pointer("/spec/template/spec").cloned().unwrap_or_default();
        let mut volumes = spec.get("volumes").and_then(|v| v.as_array()).cloned().unwrap_or_default();
        let mut disks =
            spec.pointer("/domain/devices/disks").and_then(|v| v.as_array()).cloned().unwrap_or_default();
        let data = network_data(nics);
        // The VM's own cloud-init volume carries it, replacing any network
        // data it had; without one, a NoCloud volume of ours is added.
        let own = volumes.iter_mut().find_map(|v| {
            let o = v.as_object_mut()?;
            let key =
                ["cloudInitNoCloud", "cloudInitConfigDrive"].into_iter().find(|k| o.contains_key(*k))?;
            o.get_mut(key)
        });
        match own.and_then(|c| c.as_object_mut()) {
            Some(c) => {
                c.remove("networkDataBase64");
                c.remove("networkDataSecretRef");
                c.insert("networkData".into(), data.into());
            }
            None => {
                volumes.push(
                    serde_json::json!({"name": NETWORK_VOLUME, "cloudInitNoCloud": {"networkData": data}}),
                );
                if !disks.iter().any(|d| d.get("name").and_then(|n| n.as_str()) == Some(NETWORK_VOLUME)) {
                    disks.push(serde_json::json!({"name": NETWORK_VOLUME, "disk": {"bus": "virtio"}}));
                }
            }
        }
        // Lists are replaced whole by a merge patch: the resourceVersion
        // makes it fail rather than drop a concurrent change.
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": vm.metadata.resource_version},
            "spec": {"template": {"spec": {"volumes": volumes, "domain": {"devices": {"disks": disks}}}}}
        });
        self.api.patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch)).await.map(|_| ())
    }
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
