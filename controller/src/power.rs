//! The VM whose power failover drives (`spec.vm`): a small trait with two
//! implementations. `KubeVirt` patches `spec.runStrategy` of a
//! `kubevirt.io/v1` VirtualMachine through the dynamic API and reads its
//! `status.printableStatus`; `Disks` (runtime `None`) has no VM to drive.

use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams},
};
use vmreplica_crds::{VMReplication, VmRuntime};

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
}
