//! Leader election with two real controller processes on one apiserver: one
//! holds the Lease and acts; kill -9 it and the other takes over within the
//! lease duration and acts in its place.

use std::{process::Command, time::Duration};

use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use serde_json::json;
use vmreplica_crds::{ReplicationState, VMReplication};
use vmreplica_tests::{
    FIELD_MANAGER, client,
    pki::Ca,
    procs::{Process, bin, material, wait_secs, write_tls},
    shared_kubeconfig, test_namespace,
};

const LEASE_SECONDS: u64 = 4;

fn holder(l: &Lease) -> Option<String> {
    l.spec.as_ref()?.holder_identity.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_when_the_leader_dies() {
    let client = client().await;
    let ns = test_namespace(&client, "leader").await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("leader-ca").unwrap();
    write_tls(&dir.path().join("tls"), &material(&ca, &["vmreplica-controller"]));
    let controller = |identity: &str| {
        let mut cmd = Command::new(bin("vmreplica-controller"));
        cmd.env("KUBECONFIG", shared_kubeconfig())
            .args(["--namespace", &ns, "--watch-namespace", &ns, "--metrics", "127.0.0.1:0"])
            .args(["--identity", identity, "--leader-lease-seconds", &LEASE_SECONDS.to_string()])
            .arg("--tls-dir")
            .arg(dir.path().join("tls"));
        // The controller prints nothing on stdout: wrap it to announce itself.
        let mut sh = Command::new("sh");
        sh.arg("-c").arg("echo ready; exec \"$@\"").arg("sh").arg(cmd.get_program()).args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            sh.env(k, v.unwrap());
        }
        Process::spawn_ready(sh, &dir.path().join(format!("{identity}.log")))
    };
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let mut first = controller("first");
    let l = wait_secs(30, "the first controller to lead", async || {
        let l = leases.get_opt("vmreplica-controller").await.ok()??;
        (holder(&l).as_deref() == Some("first")).then_some(l)
    })
    .await;
    assert_eq!(l.spec.as_ref().unwrap().lease_duration_seconds, Some(LEASE_SECONDS as i32));
    let _second = controller("second");
    // The standby waits: the first keeps the Lease through several renewals.
    tokio::time::sleep(Duration::from_secs(LEASE_SECONDS + 2)).await;
    let l = leases.get("vmreplica-controller").await.unwrap();
    assert_eq!(holder(&l).as_deref(), Some("first"), "a live leader keeps the lease");
    let log = std::fs::read_to_string(dir.path().join("second.log")).unwrap();
    assert!(log.contains("another replica leads"), "{log}");

    // kill -9 the leader: the standby takes over within the lease duration
    // (plus one retry period and the test's polling).
    first.kill();
    let killed = std::time::Instant::now();
    let l = wait_secs(LEASE_SECONDS * 3, "the standby to take over", async || {
        let l = leases.get_opt("vmreplica-controller").await.ok()??;
        (holder(&l).as_deref() == Some("second")).then_some(l)
    })
    .await;
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(LEASE_SECONDS * 2), "took over after {took:?}");
    assert_eq!(l.spec.as_ref().unwrap().lease_transitions, Some(1));

    // ...and acts: a VMReplication gets its status (Error: this site runs no agent).
    let vmrs: Api<VMReplication> = Api::namespaced(client.clone(), &ns);
    let obj = json!({
        "apiVersion": "vmreplica.io/v1alpha1", "kind": "VMReplication", "metadata": {"name": "vm1"},
        "spec": {"disks": [{"name": "root", "path": "/var/lib/vmreplica/disks/vm1.img"}],
                 "replicaServer": {"name": "replica.example.com"}},
    });
    vmrs.patch("vm1", &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(obj)).await.unwrap();
    let v = wait_secs(30, "the new leader to reconcile", async || {
        let v = vmrs.get("vm1").await.ok()?;
        (v.status.as_ref()?.state == ReplicationState::Error).then_some(v)
    })
    .await;
    let ready = v.status.unwrap().conditions.into_iter().find(|c| c.type_ == "Ready").unwrap();
    assert!(ready.message.contains("no agent on this site protects VMs"), "{ready:?}");
}
