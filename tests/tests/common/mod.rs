//! What the multi-site tests (`two_sites.rs`, `guest.rs`) share: a site's
//! controller loops, applying objects as a user does, a primary agent.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::Duration,
};

use kube::{
    Api,
    api::{Patch, PatchParams},
};
use vmreplica_controller::{context, telemetry::Metrics};
use vmreplica_crds::{ReplicationState, VMReplication};
use vmreplica_tests::{
    FIELD_MANAGER,
    pki::Ca,
    procs::{Process, bin, free_port, lease_args, live},
};

/// A site's controller context: its agents announce themselves in `ns`;
/// `watch` limits it to one namespace.
pub fn controllers(client: kube::Client, ns: &str, ca: &Ca, watch: Option<String>) -> Arc<context::Context> {
    let base = Arc::new(context::Shared {
        client,
        agents_namespace: ns.to_owned(),
        tls: live(ca, &["vmreplica-controller"]),
        now: k8s_openapi::jiff::Timestamp::now,
        metrics: Metrics::new(),
    });
    context::Context::new(base, Duration::from_secs(2), watch)
}

/// Server-side applies `obj` (named in its metadata) as the tests' field manager.
pub async fn apply_object<K>(api: &Api<K>, obj: &serde_json::Value)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let name = obj["metadata"]["name"].as_str().unwrap();
    api.patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(obj)).await.unwrap();
}

/// The VMReplication `name` once its state is `want`.
pub async fn state_is(api: &Api<VMReplication>, name: &str, want: ReplicationState) -> Option<VMReplication> {
    let v = api.get_opt(name).await.ok()??;
    (v.status.as_ref()?.state == want).then_some(v)
}

/// Site A's agent: serves disks under `root/disks` on `socket`, with the
/// certificate in `root/<tls>`, replicating to replica.site-b.example.com on
/// loopback, announced as `node` in `ns` through `kubeconfig`; `extra`: more
/// of its arguments (a replica server's `--listen`, node labels).
pub fn primary_agent(
    root: &Path,
    tls: &str,
    socket: &PathBuf,
    ns: &str,
    node: &str,
    kubeconfig: &Path,
    extra: &[&str],
) -> Process {
    std::fs::create_dir_all(root.join("disks")).unwrap();
    let mut cmd = Command::new(bin("vmreplica-agent"));
    cmd.args(["serve", "--control-listen", &format!("127.0.0.1:{}", free_port()), "--tls-dir"])
        .arg(root.join(tls))
        .arg("--socket")
        .arg(socket)
        .arg("--disk-root")
        .arg(root.join("disks"))
        .args(["--resolve", "replica.site-b.example.com=127.0.0.1", "--retry-seconds", "1"])
        .args(lease_args(ns, node, kubeconfig))
        .args(extra);
    Process::spawn_ready(cmd, &root.join(format!("{node}-agent.log")))
}
