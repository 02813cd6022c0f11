//! The test harness of vmreplica: a real control plane on loopback, shared by
//! every test of a run, with a fresh namespace per test.
//!
//! `hack/test.sh` starts one control plane (`vmreplica-testenv`) for the whole
//! run and points every test process at it with `VMREPLICA_TEST_KUBECONFIG`.
//! A test run without that variable (plain `cargo test -p vmreplica-tests`)
//! starts one control plane per test process instead.

pub mod controlplane;
pub mod guest;
pub mod netns;
pub mod pki;
pub mod procs;

use std::{
    path::PathBuf,
    sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};
use k8s_openapi::{
    api::core::v1::Namespace, apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};

pub use controlplane::{ControlPlane, client_for};

/// The field manager tests apply with.
pub const FIELD_MANAGER: &str = "vmreplica-tests";

static SHARED: OnceLock<PathBuf> = OnceLock::new();

/// The kubeconfig of the control plane shared by this test process.
pub fn shared_kubeconfig() -> PathBuf {
    SHARED
        .get_or_init(|| {
            if let Some(path) = std::env::var_os("VMREPLICA_TEST_KUBECONFIG") {
                return PathBuf::from(path);
            }
            // PR_SET_PDEATHSIG fires when the *thread* that spawned the children exits,
            // so they are spawned from a thread that lives as long as the process.
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build();
                let started = rt.map_err(anyhow::Error::from).and_then(|rt| rt.block_on(start_shared()));
                match started {
                    Ok(cp) => {
                        tx.send(Ok(cp.kubeconfig_path())).ok();
                        // Keep `cp` (and its temp dir) alive until the process ends.
                        loop {
                            std::thread::park();
                        }
                    }
                    Err(e) => {
                        tx.send(Err(e)).ok();
                    }
                }
            });
            match rx.recv() {
                Ok(Ok(path)) => path,
                Ok(Err(e)) => panic!("cannot start the test control plane: {e:#}"),
                Err(_) => panic!("the control plane thread died"),
            }
        })
        .clone()
}

async fn start_shared() -> Result<ControlPlane> {
    let cp = ControlPlane::start().await?;
    install_crds(&client_for(&cp.kubeconfig_path()).await?).await?;
    Ok(cp)
}

/// A client for the shared control plane.
pub async fn client() -> Client {
    client_for(&shared_kubeconfig()).await.expect("client for the shared control plane")
}

/// Server-side-applies every vmreplica CRD and waits until each is Established.
pub async fn install_crds(client: &Client) -> Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    for crd in vmreplica_crds::crds() {
        let name = crd.metadata.name.clone().context("CRD without a name")?;
        api.patch(&name, &pp, &Patch::Apply(&crd)).await.with_context(|| format!("applying CRD {name}"))?;
        let established = |c: &CustomResourceDefinition| {
            c.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Established" && c.status == "True"))
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !established(&api.get(&name).await?) {
            if std::time::Instant::now() > deadline {
                bail!("CRD {name} not Established after 30s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Creates a namespace no other test uses: `<prefix>-<pid>-<n>`.
pub async fn test_namespace(client: &Client, prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let name = format!("{prefix}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
    let ns = Namespace {
        metadata: kube::api::ObjectMeta { name: Some(name.clone()), ..Default::default() },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("create test namespace");
    name
}

/// The repository root (for `examples/`, `charts/`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// Server-side-applies every document of a YAML stream, into `namespace` for
/// namespaced kinds, and returns what the apiserver stored.
pub async fn apply_yaml(
    client: &Client,
    namespace: &str,
    yaml: &str,
) -> Result<Vec<kube::api::DynamicObject>> {
    use serde::Deserialize;
    let mut applied = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value = serde_yaml::Value::deserialize(doc)?;
        if value.is_null() {
            continue;
        }
        let obj: kube::api::DynamicObject = serde_yaml::from_value(value)?;
        let types = obj.types.clone().context("document without apiVersion/kind")?;
        let gvk = kube::api::GroupVersionKind::try_from(&types)?;
        let (resource, caps) = kube::discovery::pinned_kind(client, &gvk).await?;
        let api: Api<kube::api::DynamicObject> = match caps.scope {
            kube::discovery::Scope::Namespaced => Api::namespaced_with(client.clone(), namespace, &resource),
            kube::discovery::Scope::Cluster => Api::all_with(client.clone(), &resource),
        };
        let name = obj.metadata.name.clone().context("document without metadata.name")?;
        let stored = api
            .patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&obj))
            .await
            .with_context(|| format!("applying {} {name}", gvk.kind))?;
        applied.push(stored);
    }
    Ok(applied)
}

/// Creates (or replaces) the Secret `name` in `namespace` with `m` as
/// `tls.crt`, `tls.key` and `ca.crt`: what cert-manager writes for a
/// Certificate, and what a ReplicationServer's `tlsSecretName` names.
pub async fn tls_secret(client: &Client, namespace: &str, name: &str, m: &vmreplica_api::tls::TlsMaterial) {
    use k8s_openapi::{ByteString, api::core::v1::Secret};
    let data = [("tls.crt", &m.cert_pem), ("tls.key", &m.key_pem), ("ca.crt", &m.ca_pem)]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), ByteString(v.as_bytes().to_vec())))
        .collect();
    let secret = Secret {
        metadata: kube::api::ObjectMeta { name: Some(name.to_owned()), ..Default::default() },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), namespace)
        .patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&secret))
        .await
        .expect("writing a TLS Secret");
}

/// Installs KubeVirt's VirtualMachine CRD in its schema-less form (tests
/// need the API, not KubeVirt's validation).
pub async fn install_virtual_machine_crd(client: &kube::Client) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let crd: CustomResourceDefinition = serde_json::from_value(serde_json::json!({
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
    crate::procs::wait_for("the VirtualMachine CRD", async || {
        let c = api.get("virtualmachines.kubevirt.io").await.ok()?;
        c.status?.conditions?.iter().any(|c| c.type_ == "Established" && c.status == "True").then_some(())
    })
    .await;
}
