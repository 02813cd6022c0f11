//! Two sites, two clusters: site A is the shared apiserver, site B a second
//! apiserver started here, each with its own controller and agent, and the
//! objects of `examples/` applied as a user would (only paths, ports and the
//! frequency are changed for a test machine). The VMReplication applied at A
//! makes B's controller create the Replica object (or adopt one declared
//! there), with B's own view of the replica; writes reach B; deleting at A
//! removes replication on both sides and leaves B's disks in place. Planned
//! failover there and back with reverse replication, and extended replication
//! to a third site C (a third apiserver) that follows B after a failover.
//! Planned failovers back and forth with either site's controllers or agent
//! killed at a random moment of each step (`FAILOVER_CHAOS_ROUNDS` moves).

use std::{path::Path, process::Command, time::Duration};

use kube::{
    Api, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
};
use serde_json::json;
use vmreplica_controller::{replica_site, site, vmreplication};
use vmreplica_crds::{ReplicationState, Role, VMReplication};
mod common;

use common::{apply_object, controllers, primary_agent, state_is};
use vmreplica_api::tls::TlsMaterial;
use vmreplica_tests::{
    ControlPlane, FIELD_MANAGER, client, client_for, install_crds, install_virtual_machine_crd,
    pki::Ca,
    procs::{Process, bin, free_port, lease_args, material, wait_secs, write_tls},
    repo_root, shared_kubeconfig, test_namespace, tls_secret,
};

/// Runs one qemu-io command on `target`; reads open it read-only and
/// force-shared (-r -U), as reading an image an agent serves requires.
fn qemu_io(target: &str, cmd: &str) -> Result<(), String> {
    let read_only: &[&str] = if cmd.starts_with("read") { &["-r", "-U"] } else { &[] };
    let out =
        Command::new("qemu-io").args(read_only).args(["-f", "raw", "-c", cmd, target]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if out.status.success() && !text.contains("failed") { Ok(()) } else { Err(text) }
}

/// An example's single object, as JSON to adjust before applying.
fn example(file: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(repo_root().join("examples").join(file)).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

/// Failover `id` of `name` once it ended (Completed or Failed); `what` goes
/// into the timeout's message.
async fn failover_ended(
    api: &Api<VMReplication>,
    name: &str,
    id: &str,
    secs: u64,
    what: &str,
) -> vmreplica_crds::FailoverStatus {
    wait_secs(secs, &format!("failover {id} to end {what}"), async || {
        api.get(name).await.ok()?.status?.last_failover.filter(|l| {
            l.id == id
                && matches!(
                    l.phase,
                    vmreplica_crds::FailoverPhase::Completed | vmreplica_crds::FailoverPhase::Failed
                )
        })
    })
    .await
}

async fn last_failover(api: &Api<VMReplication>, name: &str) -> vmreplica_crds::FailoverStatus {
    api.get(name).await.unwrap().status.unwrap().last_failover.unwrap()
}

async fn apply(api: &Api<VMReplication>, name: &str, spec: serde_json::Value) {
    let obj = json!({"apiVersion": "vmreplica.io/v1alpha1", "kind": "VMReplication", "metadata": {"name": name}, "spec": spec});
    api.patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(obj)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_object_follows_the_primary_across_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ca = Ca::new("two-sites-ca").unwrap();

    // Site B: its own apiserver, agent, ReplicationServer and entry.
    let b_plane = ControlPlane::start().await.unwrap();
    let b = client_for(&b_plane.kubeconfig_path()).await.unwrap();
    install_crds(&b).await.unwrap();
    install_virtual_machine_crd(&b).await;
    let b_ns = test_namespace(&b, "site-b").await;
    // The example entry names namespace finance-dr for site A's replicas.
    let dr = "finance-dr".to_owned();
    let ns_obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": dr}});
    apply_object(&Api::<k8s_openapi::api::core::v1::Namespace>::all(b.clone()), &ns_obj).await;
    // Site A: the shared apiserver.
    let a = client().await;
    let a_ns = test_namespace(&a, "site-a").await;
    // Certificates with the examples' names: site A's agents are
    // *.site-a.example.com, site B's replica server replica.site-b.example.com.
    let primary_name = "host1.site-a.example.com".to_owned();
    write_tls(&root.join("a-tls"), &material(&ca, &[&primary_name, "127.0.0.1"]));
    write_tls(&root.join("b-tls"), &material(&ca, &["replica.site-b.example.com", "127.0.0.1"]));

    let (b_repl, b_ctl) = (free_port(), free_port());
    let mut cmd = Command::new(bin("vmreplica-agent"));
    // One agent in both roles, as on a real node: it can serve a promoted replica.
    cmd.args(["serve", "--listen", &format!("127.0.0.1:{b_repl}"), "--control-listen"])
        .arg(format!("127.0.0.1:{b_ctl}"))
        .arg("--socket")
        .arg(root.join("b-nbd.sock"))
        .arg("--tls-dir")
        .arg(root.join("b-tls"))
        .args(["--node-label", "vmreplica.io/replica-server=true"])
        .args(lease_args(&b_ns, "node-b", &b_plane.kubeconfig_path()));
    let _b_agent = Process::spawn_ready(cmd, &root.join("b-agent.log"));
    let storage = root.join("b-replicas");
    std::fs::create_dir_all(&storage).unwrap();
    // The example's port and Secret: the agent's port, and its own certificate.
    let mut rs = example("replicationserver.yaml");
    rs["spec"]["port"] = json!(b_repl);
    tls_secret(&b, &b_ns, "vmreplica-agent-tls", &TlsMaterial::from_dir(&root.join("b-tls")).unwrap()).await;
    apply_object(&Api::<vmreplica_crds::ReplicationServer>::all(b.clone()), &rs).await;
    let mut entry = example("authorizationentry.yaml");
    entry["spec"]["replicaStorageLocation"] = json!(storage);
    apply_object(&Api::<vmreplica_crds::AuthorizationEntry>::all(b.clone()), &entry).await;
    let b_ctx = controllers(b.clone(), &b_ns, &ca, None);
    tokio::spawn(site::run(b_ctx.site.clone(), std::future::pending()));
    tokio::spawn(vmreplication::run(b_ctx.clone(), std::future::pending()));
    tokio::spawn(replica_site::run(b_ctx, std::future::pending()));

    // Site A's agent and controller.
    let socket = root.join("nbd.sock");
    let _a_agent = primary_agent(root, "a-tls", &socket, &a_ns, "node-a", &shared_kubeconfig(), &[]);
    tokio::spawn(vmreplication::run(
        controllers(a.clone(), &a_ns, &ca, Some(a_ns.clone())),
        std::future::pending(),
    ));

    let a_vmrs: Api<VMReplication> = Api::namespaced(a.clone(), &a_ns);
    let b_vmrs: Api<VMReplication> = Api::namespaced(b.clone(), &dr);
    let disk = |name: &str| {
        let p = root.join("disks").join(format!("{name}.img"));
        let ok =
            Command::new("qemu-img").args(["create", "-q", "-f", "raw"]).arg(&p).arg("8M").status().unwrap();
        assert!(ok.success());
        p
    };
    let spec = |p: &Path| {
        json!({"disks": [{"name": "root", "path": p}], "replicationFrequencySeconds": 1,
               "replicaServer": {"name": "replica.site-b.example.com", "port": b_repl}})
    };

    // The example VM, enabled at A: two disks, every second instead of 30 s.
    let (root_img, data_img) = (disk("ledger-root"), disk("ledger-data"));
    let mut vm = example("vmreplication.yaml");
    vm["spec"]["disks"] = json!([{"name": "root", "path": root_img}, {"name": "data", "path": data_img}]);
    vm["spec"]["replicaServer"]["port"] = json!(b_repl);
    vm["spec"]["replicationFrequencySeconds"] = json!(1);
    apply_object(&a_vmrs, &vm).await;
    let ledger = "ledger-db";
    let primary = wait_secs(60, "A to replicate", async || {
        state_is(&a_vmrs, ledger, ReplicationState::Replicating).await
    })
    .await;
    let replica = wait_secs(60, "B's Replica object", async || {
        state_is(&b_vmrs, ledger, ReplicationState::Replicating).await
    })
    .await;
    assert_eq!(replica.spec.role, Role::Replica);
    let entries = Api::<vmreplica_crds::AuthorizationEntry>::all(b.clone());
    wait_secs(30, "the entry to count its replica", async || {
        (entries.get("site-a-finance").await.ok()?.status?.replica_count == 1).then_some(())
    })
    .await;
    assert_eq!(replica.spec.primary_server.as_deref(), Some(primary_name.as_str()));
    assert_eq!(replica.labels().get(vmreplication::replica::REPLICA_OF), Some(&format!("{a_ns}.{ledger}")));
    let rs = replica.status.clone().unwrap();
    assert_eq!(rs.primary_server.as_deref(), Some(primary_name.as_str()));
    assert_eq!(rs.replica_server.as_deref(), Some("node-b"));
    assert!(primary.status.unwrap().recovery_points.is_empty(), "points live at the replica site");

    // A write at A arrives in B's replica image, named by B's object, and
    // makes a recovery point there.
    assert_eq!(replica.spec.disks.len(), 2, "both disks replicate");
    let image = replica.spec.disks.iter().find(|d| d.name == "root").unwrap().path.clone();
    let export = format!("nbd+unix:///{a_ns}.{ledger}/root?socket={}", socket.display());
    qemu_io(&export, "write -P 0x3c 2M 64k").unwrap();
    wait_secs(30, "the write at B", async || qemu_io(&image, "read -P 0x3c 2M 64k").ok()).await;
    let rs = wait_secs(30, "B's points", async || {
        let s = b_vmrs.get(ledger).await.ok()?.status?;
        (!s.recovery_points.is_empty()).then_some(s)
    })
    .await;
    let stats = rs.statistics.clone().unwrap();
    assert!(stats.successful_cycles >= 1 && stats.average_log_size_bytes >= 64 << 10, "{stats:?}");
    // Both sides agree on when the last cycle happened (to within a few cycles).
    let pa = wait_secs(30, "A's status to catch up", async || {
        a_vmrs
            .get(ledger)
            .await
            .ok()?
            .status?
            .last_replication_time
            .filter(|t| *t >= rs.last_replication_time.clone().unwrap())
    })
    .await;
    let pb = rs.last_replication_time.unwrap();
    let apart = (pa.0.as_millisecond() - pb.0.as_millisecond()).abs();
    assert!(apart < 10_000, "primary {pa:?} vs replica {pb:?}");

    // Test failover at B: the newest point as <name>-test disks, while
    // replication goes on; an older point; removing the request cleans up.
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    // The replica VM's object at B (KubeVirt, stopped) on the replica disks:
    // the test failover runs a copy of it on the test disks and network.
    let b_vms: Api<kube::api::DynamicObject> =
        Api::namespaced_with(b.clone(), &dr, &vmreplica_controller::power::virtual_machines());
    let host_disks: Vec<_> = replica
        .spec
        .disks
        .iter()
        .map(|d| json!({"name": d.name, "hostDisk": {"path": d.path, "type": "Disk"}}))
        .collect();
    let replica_vm = json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": "ledger-vm"},
        "spec": {"runStrategy": "Halted", "template": {"spec": {"volumes": host_disks,
            "networks": [{"name": "default", "pod": {}}],
            "domain": {"devices": {"interfaces": [{"name": "default", "masquerade": {}}]}}}}}});
    apply_object(&b_vms, &replica_vm).await;
    let request = |id: &str, point: &str| {
        json!({"apiVersion": "vmreplica.io/v1alpha1", "kind": "VMReplication", "metadata": {"name": ledger},
               "spec": {"role": "Replica", "disks": replica.spec.disks,
                        "vm": {"runtime": "KubeVirt", "name": "ledger-vm"},
                        "testNetwork": {"networkName": "dr-test",
                                        "nics": [{"nic": "eth0", "ipv4Address": "192.168.77.15", "ipv4PrefixLength": 24}]},
                        "failover": {"id": id, "type": "Test", "recoveryPoint": point}}})
    };
    let test_done = |id: &'static str| {
        let b_vmrs = b_vmrs.clone();
        async move || {
            let l = b_vmrs.get(ledger).await.ok()?.status?.last_failover?;
            (l.id == id && l.phase != vmreplica_crds::FailoverPhase::PreparingDisks).then_some(l)
        }
    };
    // The failover request is a field of the user's own: apply it under another manager.
    let tester = PatchParams::apply("dr-drill").force();
    b_vmrs.patch(ledger, &tester, &Patch::Apply(request("t1", "latest"))).await.unwrap();
    let l = wait_secs(30, "the test failover", test_done("t1")).await;
    assert_eq!(l.phase, vmreplica_crds::FailoverPhase::Completed, "{l:?}");
    let test_img =
        Path::new(&image).parent().unwrap().join("materialized").join(format!("{ledger}-test.img"));
    qemu_io(test_img.to_str().unwrap(), "read -P 0x3c 2M 64k").expect("the test disk holds the point's data");
    let first_point = l.recovery_point.clone().unwrap();
    // The test VM: a running copy of the replica VM on the test disks only,
    // on the test network with its addresses.
    assert!(
        l.message.as_deref().unwrap_or_default().contains("test VM ledger-vm-test (network dr-test)"),
        "{l:?}"
    );
    let test_vm = b_vms.get("ledger-vm-test").await.unwrap();
    assert_eq!(test_vm.data["spec"]["runStrategy"], "Always");
    let vm_spec = &test_vm.data["spec"]["template"]["spec"];
    let root_vol = vm_spec["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "root").unwrap();
    assert_eq!(root_vol["hostDisk"]["path"], test_img.to_str().unwrap());
    for v in vm_spec["volumes"].as_array().unwrap().iter().filter_map(|v| v["hostDisk"]["path"].as_str()) {
        assert!(v.contains("/materialized/"), "{v} is a test copy, not a replica disk");
    }
    assert_eq!(vm_spec["networks"], json!([{"name": "default", "multus": {"networkName": "dr-test"}}]));
    let data = vm_spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|v| v["cloudInitNoCloud"]["networkData"].as_str());
    assert!(data.unwrap().contains("192.168.77.15/24"));
    assert_eq!(
        b_vms.get("ledger-vm").await.unwrap().data["spec"]["runStrategy"],
        "Halted",
        "the replica VM stays off"
    );
    // Replication goes on: a newer write reaches the replica, not the test disk.
    qemu_io(&export, "write -P 0x4d 2M 64k").unwrap();
    wait_secs(30, "the newer write at B", async || qemu_io(&image, "read -P 0x4d 2M 64k").ok()).await;
    qemu_io(test_img.to_str().unwrap(), "read -P 0x3c 2M 64k").expect("the test disk is a separate copy");
    // Re-applying the same request changes nothing.
    b_vmrs.patch(ledger, &tester, &Patch::Apply(request("t1", "latest"))).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(b_vmrs.get(ledger).await.unwrap().status.unwrap().last_failover.unwrap(), l);
    // A new id at the older point, after the newer write arrived: the old data.
    wait_secs(30, "a newer point", async || {
        let s = b_vmrs.get(ledger).await.ok()?.status?;
        (s.recovery_points.first()?.id != first_point).then_some(())
    })
    .await;
    b_vmrs.patch(ledger, &tester, &Patch::Apply(request("t2", &first_point))).await.unwrap();
    let l2 = wait_secs(30, "the second test failover", test_done("t2")).await;
    assert_eq!(
        (l2.phase, l2.recovery_point.as_deref()),
        (vmreplica_crds::FailoverPhase::Completed, Some(first_point.as_str()))
    );
    qemu_io(test_img.to_str().unwrap(), "read -P 0x3c 2M 64k").expect("the older point's data");
    // A point that is not there fails with a reason, and touches nothing.
    b_vmrs.patch(ledger, &tester, &Patch::Apply(request("t3", "999999"))).await.unwrap();
    let l3 = wait_secs(30, "the refused test failover", test_done("t3")).await;
    assert_eq!(l3.phase, vmreplica_crds::FailoverPhase::Failed);
    assert!(l3.message.unwrap().contains("choose one from status.recoveryPoints"));
    // Removing the request deletes what the test created (t2's disks).
    b_vmrs
        .patch(
            ledger,
            &tester,
            &Patch::Apply(json!({"apiVersion": "vmreplica.io/v1alpha1", "kind": "VMReplication",
        "metadata": {"name": ledger}, "spec": {"role": "Replica", "disks": replica.spec.disks}})),
        )
        .await
        .unwrap();
    let cleaned = wait_secs(30, "the clean-up", async || {
        let l = b_vmrs.get(ledger).await.ok()?.status?.last_failover?;
        (l.phase == vmreplica_crds::FailoverPhase::Cancelled).then_some(l)
    })
    .await;
    assert_eq!(cleaned.id, "t3");
    assert!(!test_img.exists(), "the test disks are deleted");
    assert!(b_vms.get_opt("ledger-vm-test").await.unwrap().is_none(), "the test VM is deleted");
    assert!(b_vms.get_opt("ledger-vm").await.unwrap().is_some(), "the replica VM stays");
    let _ = pp;

    // Planned failover, primary side: A stops the VM, makes the disks
    // read-only, ships the last log; the replica holds every write (bytes
    // compared), and A says SyncedReplicationComplete.
    qemu_io(&export, "write -P 0x5e 3M 128k").unwrap();
    let mut planned = vm.clone();
    planned["spec"]["failover"] = json!({"id": "move-1", "type": "Planned"});
    apply_object(&a_vmrs, &planned).await;
    let prepared = wait_secs(60, "A's part of the planned failover", async || {
        state_is(&a_vmrs, ledger, ReplicationState::SyncedReplicationComplete).await
    })
    .await;
    let l = wait_secs(10, "lastFailover", async || {
        a_vmrs
            .get(ledger)
            .await
            .ok()?
            .status?
            .last_failover
            .filter(|l| l.phase == vmreplica_crds::FailoverPhase::Completed)
    })
    .await;
    assert_eq!((l.id.as_str(), l.data_loss_window_seconds), ("move-1", Some(0)), "{l:?}");
    assert!(l.message.unwrap().contains("request the planned failover on the Replica object"));
    assert_eq!(prepared.status.unwrap().health, vmreplica_crds::Health::Normal);
    // Re-applying the same request (as GitOps does) changes nothing.
    // (With another field changed too, so the object's generation moves and
    // the controller does look at it again.)
    let before = last_failover(&a_vmrs, ledger).await;
    let mut reapplied = planned.clone();
    reapplied["spec"]["compressionEnabled"] = json!(false);
    apply_object(&a_vmrs, &reapplied).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(last_failover(&a_vmrs, ledger).await, before, "the same id is not run again");
    for d in &replica.spec.disks {
        let primary_img = if d.name == "root" { &root_img } else { &data_img };
        wait_secs(30, &format!("disk {} identical at B", d.name), async || {
            identical(&d.path, primary_img).then_some(())
        })
        .await;
    }
    let err = qemu_io(&export, "write -P 0x6f 3M 4k").unwrap_err();
    assert!(err.contains("Operation not permitted"), "writes after the final sync are refused: {err}");

    // Planned failover, replica side: B promotes its replica and serves it
    // as the VM's disks, holding the primary's last write.
    b_vmrs
        .patch(
            ledger,
            &tester,
            &Patch::Apply(json!({"apiVersion": "vmreplica.io/v1alpha1", "kind": "VMReplication",
        "metadata": {"name": ledger}, "spec": {"role": "Replica", "disks": replica.spec.disks,
        "failover": {"id": "move-1", "type": "Planned"}}})),
        )
        .await
        .unwrap();
    let moved = wait_secs(60, "B to fail over", async || {
        state_is(&b_vmrs, ledger, ReplicationState::FailedOver).await
    })
    .await;
    let l = wait_secs(10, "B's lastFailover", async || {
        b_vmrs
            .get(ledger)
            .await
            .ok()?
            .status?
            .last_failover
            .filter(|l| l.id == "move-1" && l.phase == vmreplica_crds::FailoverPhase::Completed)
    })
    .await;
    assert_eq!(l.data_loss_window_seconds, Some(0), "{l:?}");
    assert!(moved.status.unwrap().epoch >= 1, "promotion moves the epoch on");
    let b_export = format!("nbd+unix:///{a_ns}.{ledger}/root?socket={}", root.join("b-nbd.sock").display());
    qemu_io(&b_export, "read -P 0x5e 3M 128k").expect("B serves the primary's last write");
    qemu_io(&b_export, "write -P 0x7a 5M 4k").expect("and takes new writes");

    // A Replica object declared at B first (GitOps) is adopted, spec untouched.
    apply(
        &b_vmrs,
        "orders",
        json!({"role": "Replica", "disks": [{"name": "root", "path": "/declared/by/git.img"}]}),
    )
    .await;
    let declared = b_vmrs.get("orders").await.unwrap();
    let orders = disk("orders");
    apply(&a_vmrs, "orders", spec(&orders)).await;
    let adopted = wait_secs(60, "B to adopt orders", async || {
        state_is(&b_vmrs, "orders", ReplicationState::Replicating).await
    })
    .await;
    assert_eq!(adopted.spec, declared.spec, "the controller never writes spec");
    assert_eq!(adopted.metadata.generation, declared.metadata.generation);
    assert!(adopted.labels().get(vmreplication::replica::REPLICA_OF).is_none(), "adopted, not created");

    // Deleting the Replica object at B removes replication there: the object
    // is not recreated, A is refused and says why, B's disk stays.
    let orders_image = adopted.spec.disks[0].path.clone();
    let orders_dir = storage.join(format!("{a_ns}.orders")).join("root");
    b_vmrs.delete("orders", &DeleteParams::default()).await.unwrap();
    wait_secs(30, "B's orders to go", async || {
        b_vmrs.get_opt("orders").await.unwrap().is_none().then_some(())
    })
    .await;
    let refused =
        wait_secs(30, "A to be refused", async || state_is(&a_vmrs, "orders", ReplicationState::Error).await)
            .await;
    let ready = refused.status.unwrap().conditions.into_iter().find(|c| c.type_ == "Ready").unwrap();
    assert!(ready.message.contains("removed at the replica site"), "{ready:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(b_vmrs.get_opt("orders").await.unwrap().is_none(), "not recreated");
    assert!(orders_dir.join("disk.img").exists(), "B's disk stays ({orders_image} was the declared path)");

    // Deleting at A removes replication on both sides; B's disk stays.
    a_vmrs.delete(ledger, &DeleteParams::default()).await.unwrap();
    wait_secs(30, "A's object to go", async || a_vmrs.get_opt(ledger).await.unwrap().is_none().then_some(()))
        .await;
    // A revived old primary (its object created again at A) cannot overwrite
    // the new one: B refuses its stale epoch, and A shows Error saying so.
    let mut revived = vm.clone();
    revived["spec"].as_object_mut().unwrap().remove("failover");
    apply_object(&a_vmrs, &revived).await;
    let stale = wait_secs(30, "the revived primary to be refused", async || {
        state_is(&a_vmrs, ledger, ReplicationState::Error).await
    })
    .await;
    let ready = stale.status.unwrap().conditions.into_iter().find(|c| c.type_ == "Ready").unwrap();
    assert!(ready.message.contains("epoch"), "{ready:?}");
    qemu_io(&image, "read -P 0x7a 5M 4k").expect("B's disk is untouched");
    a_vmrs.delete(ledger, &DeleteParams::default()).await.unwrap();
    wait_secs(30, "A's object to go", async || a_vmrs.get_opt(ledger).await.unwrap().is_none().then_some(()))
        .await;

    // The old primary's removal cannot take the promoted disks away from B.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(state_is(&b_vmrs, ledger, ReplicationState::FailedOver).await.is_some());
    assert!(Path::new(&image).exists(), "the replica's disk stays");
    qemu_io(&image, "read -P 0x4d 2M 64k").expect("with its data");
    qemu_io(&image, "read -P 0x7a 5M 4k").expect("and what was written at B after the failover");

    // Unplanned failover of a third VM, with its primary still running.
    let pay_img = disk("pay");
    apply(&a_vmrs, "pay", spec(&pay_img)).await;
    wait_secs(60, "pay at B", async || state_is(&b_vmrs, "pay", ReplicationState::Replicating).await).await;
    let pay_export = format!("nbd+unix:///{a_ns}.pay/root?socket={}", socket.display());
    let pay_replica = b_vmrs.get("pay").await.unwrap().spec.disks[0].path.clone();
    qemu_io(&pay_export, "write -P 0x81 1M 64k").unwrap();
    wait_secs(30, "0x81 at B", async || qemu_io(&pay_replica, "read -P 0x81 1M 64k").ok()).await;
    let p1 = wait_secs(30, "a point at B", async || {
        Some(b_vmrs.get("pay").await.ok()?.status?.recovery_points.first()?.id.clone())
    })
    .await;
    qemu_io(&pay_export, "write -P 0x82 1M 64k").unwrap();
    wait_secs(30, "0x82 at B", async || qemu_io(&pay_replica, "read -P 0x82 1M 64k").ok()).await;
    let request = |id: &str, failover: serde_json::Value| {
        let mut f = failover;
        f["id"] = json!(id);
        f["type"] = json!("Unplanned");
        json!({"apiVersion": "vmreplica.io/v1alpha1", "kind": "VMReplication", "metadata": {"name": "pay"},
               "spec": {"role": "Replica", "disks": [{"name": "root", "path": pay_replica}], "failover": f}})
    };
    let last_of = async |phase: vmreplica_crds::FailoverPhase| {
        wait_secs(30, &format!("pay's failover to reach {phase:?}"), async || {
            b_vmrs.get("pay").await.ok()?.status?.last_failover.filter(|l| l.phase == phase)
        })
        .await
    };
    // The split-brain guard: the primary replicated a moment ago.
    b_vmrs.patch("pay", &tester, &Patch::Apply(request("u1", json!({})))).await.unwrap();
    let l = last_of(vmreplica_crds::FailoverPhase::Pending).await;
    assert!(l.message.unwrap().contains("probably running"));
    assert!(state_is(&b_vmrs, "pay", ReplicationState::Replicating).await.is_some(), "nothing changed");
    // force: true overrides it, recorded in status.
    b_vmrs.patch("pay", &tester, &Patch::Apply(request("u1", json!({"force": true})))).await.unwrap();
    let l = last_of(vmreplica_crds::FailoverPhase::WaitingCompletion).await;
    assert!(l.forced);
    assert_eq!(l.data_loss_window_seconds, Some(0), "the newest point loses none of what arrived: {l:?}");
    assert!(l.message.as_deref().unwrap_or_default().contains("never arrived"), "{l:?}");
    wait_secs(30, "FailOverWaitingCompletion", async || {
        state_is(&b_vmrs, "pay", ReplicationState::FailOverWaitingCompletion).await
    })
    .await;
    let b_pay = format!("nbd+unix:///{a_ns}.pay/root?socket={}", root.join("b-nbd.sock").display());
    qemu_io(&b_pay, "read -P 0x82 1M 64k").expect("the latest point runs at B");
    // Cancel: the copy goes, B is a replica again.
    b_vmrs.patch("pay", &tester, &Patch::Apply(json!({"apiVersion": "vmreplica.io/v1alpha1", "kind": "VMReplication",
        "metadata": {"name": "pay"}, "spec": {"role": "Replica", "disks": [{"name": "root", "path": pay_replica}]}}))).await.unwrap();
    last_of(vmreplica_crds::FailoverPhase::Cancelled).await;
    assert!(qemu_io(&b_pay, "read 0 512").is_err(), "no longer served");
    // Another point (the older one), then Complete.
    b_vmrs
        .patch("pay", &tester, &Patch::Apply(request("u2", json!({"force": true, "recoveryPoint": p1}))))
        .await
        .unwrap();
    let l = last_of(vmreplica_crds::FailoverPhase::WaitingCompletion).await;
    assert_eq!(l.id, "u2");
    qemu_io(&b_pay, "read -P 0x81 1M 64k").expect("the older point runs at B");
    // A controller that stopped after the promotion but before recording it
    // (status still PreparingDisks) resumes without choosing or rewriting
    // the copy the VM already runs on: the VM's write stays.
    qemu_io(&b_pay, "write -P 0x83 5M 64k").unwrap();
    let mut midway = l.clone();
    midway.phase = vmreplica_crds::FailoverPhase::PreparingDisks;
    let status = json!({"apiVersion": "vmreplica.io/v1alpha1", "kind": "VMReplication",
                        "status": {"lastFailover": midway}});
    let pp = PatchParams::apply(vmreplica_controller::status::FAILOVER_MANAGER).force();
    b_vmrs.patch_status("pay", &pp, &Patch::Apply(status)).await.unwrap();
    let resumed = last_of(vmreplica_crds::FailoverPhase::WaitingCompletion).await;
    assert_eq!((resumed.id.as_str(), resumed.recovery_point.as_deref()), ("u2", Some(p1.as_str())));
    let copy = Path::new(&pay_replica).parent().unwrap().join("materialized").join("pay-failover.img");
    qemu_io(copy.to_str().unwrap(), "read -P 0x83 5M 64k")
        .expect("the copy the VM runs on was not rewritten");
    qemu_io(&b_pay, "read -P 0x83 5M 64k").unwrap();
    b_vmrs
        .patch(
            "pay",
            &tester,
            &Patch::Apply(request("u2", json!({"force": true, "recoveryPoint": p1, "complete": true}))),
        )
        .await
        .unwrap();
    let l = last_of(vmreplica_crds::FailoverPhase::Completed).await;
    assert!(
        l.message.unwrap().contains("set reverseReplication: true on this request"),
        "the status says how to protect it again"
    );
    wait_secs(30, "B FailedOver", async || state_is(&b_vmrs, "pay", ReplicationState::FailedOver).await)
        .await;
    // The old primary, still running, is refused from now on.
    let stale =
        wait_secs(30, "A's pay refused", async || state_is(&a_vmrs, "pay", ReplicationState::Error).await)
            .await;
    let ready = stale.status.unwrap().conditions.into_iter().find(|c| c.type_ == "Ready").unwrap();
    assert!(ready.message.contains("epoch"), "{ready:?}");
    // ... and fenced: its disks take no more writes (they could never
    // replicate), status and an Event say so and what to do.
    let fenced = wait_secs(30, "A's pay fenced", async || {
        let s = a_vmrs.get("pay").await.ok()?.status?;
        s.conditions.iter().any(|c| c.type_ == "Ready" && c.reason == "Fenced").then_some(s)
    })
    .await;
    assert_eq!(fenced.health, vmreplica_crds::Health::Critical);
    assert!(
        fenced.health_details.iter().any(|d| d.contains("Fenced") && d.contains("Fail the VM back")),
        "{:?}",
        fenced.health_details
    );
    assert!(qemu_io(&pay_export, "write -P 0x84 1M 4k").is_err(), "a fenced disk refuses writes");
    qemu_io(&pay_export, "read -P 0x82 1M 64k").expect("and still reads what it held");
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(a.clone(), &a_ns);
    wait_secs(30, "the Fenced Event", async || {
        let list = events.list(&Default::default()).await.ok()?;
        list.items.iter().any(|e| e.reason.as_deref() == Some("Fenced")).then_some(())
    })
    .await;
}

/// Compares two raw images byte for byte.
fn identical(a: &str, b: &Path) -> bool {
    Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw", a])
        .arg(b)
        .status()
        .is_ok_and(|s| s.success())
}

/// Planned failover A→B with reverse replication, writes at B reaching A's
/// own disks with no resync, then back B→A with reverse again: at each
/// move both sides hold the same bytes (qemu-img compare), and writes at
/// the new primary reach the other side. B's extended replica C is
/// orphaned by the reverse: it keeps A's data and gets nothing from B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_failover_there_and_back_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ca = Ca::new("reverse-ca").unwrap();
    let (a_name, b_name) = ("host1.site-a.example.com", "replica.site-b.example.com");
    write_tls(&root.join("a-tls"), &material(&ca, &[a_name, "127.0.0.1"]));
    // Site B (its own apiserver), as in the examples.
    let c_name = "replica.site-c.example.com";
    let mut b = replica_site(root, "rev-b", &ca, b_name, "*.site-a.example.com", &[a_name, c_name]).await;
    // Site C: B's extended replica, orphaned when the failover reverses.
    let c = replica_site(root, "rev-c", &ca, c_name, b_name, &[]).await;
    let (b_repl, a_repl) = (b.repl_port, free_port());

    let SiteA { ns: a_ns, label, agent: mut a_agent, storage: a_storage, vmrs: a_vmrs, .. } =
        SiteA::start(root, "rev-a", &ca, b_name, a_repl).await;
    let socket = root.join("a-nbd.sock");
    let b_vmrs = b.vmrs.clone();
    let (root_img, data_img) = (disk_image(root, "app-root"), disk_image(root, "app-data"));
    let app = "app";
    let primary = |failover: serde_json::Value| {
        let mut o = json!({"apiVersion": "vmreplica.io/v1alpha1", "kind": "VMReplication",
            "metadata": {"name": app}, "spec": {"disks": [{"name": "root", "path": root_img},
            {"name": "data", "path": data_img}], "replicationFrequencySeconds": 1,
            "replicaServer": {"name": b_name, "port": b_repl}}});
        if !failover.is_null() {
            o["spec"]["failover"] = failover;
        }
        o
    };
    apply_object(&a_vmrs, &primary(serde_json::Value::Null)).await;
    let replica = wait_secs(60, "B's Replica object", async || {
        state_is(&b_vmrs, app, ReplicationState::Replicating).await
    })
    .await;
    let b_disk = |name: &str| replica.spec.disks.iter().find(|d| d.name == name).unwrap().path.clone();
    let (b_root, b_data) = (b_disk("root"), b_disk("data"));
    let a_export = |disk: &str| format!("nbd+unix:///{a_ns}.{app}/{disk}?socket={}", socket.display());
    let b_socket = b.socket.clone();
    let b_export = |disk: &str| format!("nbd+unix:///{a_ns}.{app}/{disk}?socket={}", b_socket.display());
    qemu_io(&a_export("root"), "write -P 0x11 1M 64k").unwrap();
    let tester = PatchParams::apply("dr-operator").force();
    let at_b = |failover: serde_json::Value| {
        json!({"apiVersion": "vmreplica.io/v1alpha1", "kind": "VMReplication", "metadata": {"name": app},
               "spec": {"role": "Replica", "disks": replica.spec.disks, "replicationFrequencySeconds": 1,
                        "extendedReplica": {"replicaServer": {"name": c_name, "port": c.repl_port},
                                            "replicationFrequencySeconds": 1},
                        "failover": failover}})
    };
    // Completed and the epoch it moved to, as one read of the object sees them.
    let completed_with_epoch = async |api: &Api<VMReplication>, id: &str| {
        wait_secs(60, &format!("failover {id} to complete"), async || {
            let s = api.get(app).await.ok()?.status?;
            let l = s
                .last_failover
                .filter(|l| l.id == id && l.phase == vmreplica_crds::FailoverPhase::Completed)?;
            Some((l, s.epoch))
        })
        .await
    };
    let done = async |api: &Api<VMReplication>, id: &str| failover_ended(api, app, id, 60, "").await;

    // B forwards to C.
    b_vmrs.patch(app, &tester, &Patch::Apply(at_b(serde_json::Value::Null))).await.unwrap();
    // (Made when C's first disk arrived; the second is added when it does.)
    let at_c = wait_secs(60, "C's Replica object with both disks", async || {
        state_is(&c.vmrs, app, ReplicationState::Replicating).await.filter(|v| v.spec.disks.len() == 2)
    })
    .await;
    let c_root = at_c.spec.disks.iter().find(|d| d.name == "root").unwrap().path.clone();
    wait_secs(30, "A's write at C", async || qemu_io(&c_root, "read -P 0x11 1M 64k").ok()).await;

    // A→B: A's part, then B's with reverse replication back to A.
    apply_object(&a_vmrs, &primary(json!({"id": "move", "type": "Planned"}))).await;
    let l = done(&a_vmrs, "move").await;
    assert_eq!(l.phase, vmreplica_crds::FailoverPhase::Completed, "{l:?}");
    let reverse_to = json!({"name": a_name, "port": a_repl});
    b_vmrs
        .patch(
            app,
            &tester,
            &Patch::Apply(at_b(json!({"id": "move", "type": "Planned",
            "reverseReplication": true, "reverseReplicaServer": reverse_to}))),
        )
        .await
        .unwrap();
    let l = done(&b_vmrs, "move").await;
    assert_eq!(l.phase, vmreplica_crds::FailoverPhase::Completed, "{l:?}");
    let (_, epoch) = completed_with_epoch(&b_vmrs, "move").await;
    assert!(epoch >= 1, "Completed is written with the epoch it moved to: {epoch}");
    assert!(l.took_over && l.reversed_to.as_deref() == Some(&format!("{a_name}:{a_repl}")[..]), "{l:?}");
    let message = l.message.unwrap();
    assert!(message.contains("no resync"), "{message}");
    assert!(
        message.contains(&format!("{c_name}:{} receives nothing more (orphaned)", c.repl_port)),
        "{message}"
    );
    assert!(identical(&b_root, &root_img) && identical(&b_data, &data_img), "zero loss A→B");
    let moved = wait_secs(30, "B to replicate back", async || {
        state_is(&b_vmrs, app, ReplicationState::Replicating).await.filter(|v| {
            v.status.as_ref().is_some_and(|s| s.primary_server.as_deref() == Some(b.node.as_str()))
        })
    })
    .await;
    assert!(moved.status.unwrap().epoch >= 1);

    // Writes at B reach A's own disks; A's object shows it receives them.
    qemu_io(&b_export("root"), "write -P 0x22 2M 64k").unwrap();
    qemu_io(&b_export("data"), "write -P 0x23 3M 64k").unwrap();
    wait_secs(30, "B's writes at A", async || {
        qemu_io(root_img.to_str().unwrap(), "read -P 0x22 2M 64k").ok()?;
        qemu_io(data_img.to_str().unwrap(), "read -P 0x23 3M 64k").ok()
    })
    .await;
    assert!(
        !a_storage.join(format!("{a_ns}.{app}")).join("root").join("disk.img").exists(),
        "no copy was made"
    );
    // C is orphaned, as in Hyper-V: it keeps what it had, gets nothing from B.
    let orphaned = wait_secs(30, "B's extended replication to stop", async || {
        let s = b_vmrs.get(app).await.ok()?.status?.extended_replication?;
        (s.state == ReplicationState::NotEnabled).then_some(s)
    })
    .await;
    assert!(orphaned.message.unwrap().contains("orphaned"));
    qemu_io(&c_root, "read -P 0x11 1M 64k").expect("C keeps A's write");
    assert!(qemu_io(&c_root, "read -P 0x22 2M 64k").is_err(), "B's write does not reach C");

    // B's agent is killed and comes back: the controller has it serve the
    // VM's disks again, with their log, and replicate to A again.
    qemu_io(&b_export("data"), "write -P 0x25 6M 64k").unwrap();
    b.restart_agent();
    wait_secs(60, "B to serve the VM again", async || qemu_io(&b_export("data"), "read -P 0x25 6M 64k").ok())
        .await;
    qemu_io(&b_export("root"), "write -P 0x26 7M 64k").unwrap();
    wait_secs(60, "B's writes from before and after the restart at A", async || {
        qemu_io(data_img.to_str().unwrap(), "read -P 0x25 6M 64k").ok()?;
        qemu_io(root_img.to_str().unwrap(), "read -P 0x26 7M 64k").ok()
    })
    .await;
    let a_view = wait_secs(30, "A to show the reverse replication", async || {
        state_is(&a_vmrs, app, ReplicationState::Replicating)
            .await
            .filter(|v| v.status.as_ref().is_some_and(|s| s.primary_server.as_deref() == Some(b_name)))
    })
    .await;
    assert_eq!(a_view.status.unwrap().replica_server.as_deref(), Some("node-a"));
    assert!(qemu_io(&a_export("root"), "read 0 512").is_err(), "A no longer serves the VM");

    // B→A: B's part (stop, ship the last log), then A takes the VM back
    // and reverses again, to B.
    qemu_io(&b_export("root"), "write -P 0x24 4M 64k").unwrap();
    b_vmrs.patch(app, &tester, &Patch::Apply(at_b(json!({"id": "back", "type": "Planned"})))).await.unwrap();
    let l = done(&b_vmrs, "back").await;
    assert_eq!(l.phase, vmreplica_crds::FailoverPhase::Completed, "{l:?}");
    // The next step is on the other site's object, and the message says so.
    let next = l.message.clone().unwrap();
    assert!(
        next.contains(&format!("on the Primary object {a_ns}/{app} at {a_name}")),
        "the message names where the next step happens: {next}"
    );
    wait_secs(30, "B SyncedReplicationComplete", async || {
        state_is(&b_vmrs, app, ReplicationState::SyncedReplicationComplete).await
    })
    .await;
    apply_object(&a_vmrs, &primary(json!({"id": "back", "type": "Planned", "reverseReplication": true})))
        .await;
    let l = done(&a_vmrs, "back").await;
    assert_eq!(l.phase, vmreplica_crds::FailoverPhase::Completed, "{l:?}");
    assert!(l.took_over, "{l:?}");
    let (_, a_epoch) = completed_with_epoch(&a_vmrs, "back").await;
    assert!(a_epoch >= 2, "A's object moves to the failback's epoch with Completed: {a_epoch}");
    assert!(identical(&b_root, &root_img) && identical(&b_data, &data_img), "zero loss B→A");
    qemu_io(&a_export("root"), "read -P 0x24 4M 64k").expect("A serves B's last write");
    wait_secs(60, "A to replicate to B again", async || {
        state_is(&a_vmrs, app, ReplicationState::Replicating).await.filter(|v| {
            v.status.as_ref().is_some_and(|s| {
                s.last_replication_time.is_some() && s.replica_server.as_deref() == Some(b_name)
            })
        })
    })
    .await;
    qemu_io(&a_export("root"), "write -P 0x33 5M 64k").unwrap();
    wait_secs(30, "A's new write at B", async || qemu_io(&b_root, "read -P 0x33 5M 64k").ok()).await;
    let back = wait_secs(30, "B a replica again", async || {
        state_is(&b_vmrs, app, ReplicationState::Replicating).await.filter(|v| {
            v.status.as_ref().is_some_and(|s| s.replica_server.as_deref() == Some(b.node.as_str()))
        })
    })
    .await;
    let b_epoch = back.status.unwrap().epoch;
    assert!(b_epoch >= 2, "the failback is a newer promotion");
    wait_secs(30, "both objects to show the same epoch", async || {
        (a_vmrs.get(app).await.ok()?.status?.epoch == b_epoch).then_some(())
    })
    .await;
    assert!(qemu_io(&b_export("root"), "read 0 512").is_err(), "B no longer serves the VM");

    // A's agent is killed and comes back: A serves the VM again and ships
    // under the epoch of its failback (B would refuse an older one).
    a_agent.kill();
    a_agent = site_a_agent(root, &a_ns, &label, b_name, Some(a_repl));
    wait_secs(60, "A to serve the VM again", async || qemu_io(&a_export("root"), "read -P 0x33 5M 64k").ok())
        .await;
    qemu_io(&a_export("root"), "write -P 0x34 6M 64k").unwrap();
    wait_secs(60, "A's write after its restart at B", async || qemu_io(&b_root, "read -P 0x34 6M 64k").ok())
        .await;
    drop(a_agent);
}

/// What a strike kills at a random moment of a failover step.
#[derive(Clone, Copy, Debug)]
enum Victim {
    Nothing,
    ControllersA,
    ControllersB,
    BothControllers,
    AgentA,
    AgentB,
}

/// A kill during a failover step: whom, when (milliseconds after the step
/// was requested; `None`: once it completed), for how long, and what the
/// step's failover status says meanwhile (`None`: not checked).
#[derive(Clone, Copy, Debug)]
struct Strike {
    victim: Victim,
    at: Option<u64>,
    down: u64,
    says: Option<&'static str>,
}

const CALM: Strike = Strike { victim: Victim::Nothing, at: None, down: 0, says: None };

/// Planned failovers back and forth, A→B then B→A, each with reverse
/// replication, while at a random moment of each of its two steps (the old
/// primary's part, the new primary's) either site's controllers, both, or
/// either site's agent is killed and started again. After every move: the
/// failover completed, both sides hold the same bytes, every write made at
/// any earlier primary is served by the new one, and a write there reaches
/// the old primary. `FAILOVER_CHAOS_ROUNDS` moves (default 2: there and
/// back), seeded by `FAILOVER_CHAOS_SEED` (printed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_failovers_back_and_forth_survive_kills_at_random_moments() {
    let rounds: u64 = std::env::var("FAILOVER_CHAOS_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let seed: u64 =
        std::env::var("FAILOVER_CHAOS_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
        });
    eprintln!("failover chaos: {rounds} moves, FAILOVER_CHAOS_SEED={seed}");
    let mut below = chaos_rng(seed);
    let victims = [
        Victim::Nothing,
        Victim::ControllersA,
        Victim::ControllersB,
        Victim::BothControllers,
        Victim::AgentA,
        Victim::AgentB,
    ];
    let calm = std::env::var_os("FAILOVER_CHAOS_CALM").is_some();
    failover_moves("foc", rounds, &format!("FAILOVER_CHAOS_SEED={seed}"), |_, _| {
        let victim = if calm { Victim::Nothing } else { victims[below(victims.len() as u64) as usize] };
        // One strike in four once the step completed, before the next.
        let at = (below(4) != 0).then(|| below(2500));
        Strike { victim, at, down: below(1000), says: None }
    })
    .await;
}

/// An agent killed right after its side's part of a planned failover (its
/// VM stopped, its disks read-only, its last log at the other side), and
/// started again before the other side takes the VM over: it is still
/// failed back onto, with no copy (before, it had forgotten it was prepared
/// and refused the reverse replication for ever). Both directions: B's
/// promoted replica, then A's own disks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restarted_after_its_part_of_a_planned_failover_is_failed_back_onto() {
    let after = |victim| Strike { victim, at: None, down: 200, says: None };
    failover_moves("fos", 3, "scripted", |round, step| match (round, step) {
        (0, 0) | (2, 0) => after(Victim::AgentA),
        (1, 0) => after(Victim::AgentB),
        _ => CALM,
    })
    .await;
}

/// An agent down for seconds while a planned failover needs it: the
/// failover waits for it, says so when it is the old primary's agent, and
/// completes once the agent is back. Before, the first refused connection
/// failed the failover (a CI run: the primary's agent restarting during
/// PrepareFailover). Both agents, in both steps, both directions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_failover_waits_for_an_agent_that_is_down() {
    let down = |victim, says| Strike { victim, at: Some(0), down: 4000, says };
    failover_moves("fod", 2, "scripted", |round, step| match (round, step) {
        // The old primary's agent, during its part: the status says why it waits.
        (0, 0) => down(Victim::AgentA, Some("waiting for the agent")),
        (0, 1) => down(Victim::AgentB, None),
        (1, 0) => down(Victim::AgentB, None),
        _ => down(Victim::AgentA, None),
    })
    .await;
}

/// Runs `rounds` planned failovers, A→B, B→A, …, each with reverse
/// replication, striking as `strike(move, step)` says (step 0: the old
/// primary's part, 1: the new primary's); checks what the chaos test's doc
/// says after every move. `what` names the run in failures; `tag` its
/// sites, and B's server name: A's AuthorizationEntry (cluster-scoped, on
/// the apiserver the tests share) then admits only this test's B, so
/// replication reversed onto A lands in this test's storage.
async fn failover_moves(tag: &str, rounds: u64, what: &str, mut strike: impl FnMut(u64, usize) -> Strike) {
    // The controllers' own words (RUST_LOG), to read beside the agents' logs.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    let root = root.as_path();
    if std::env::var_os("FAILOVER_CHAOS_KEEP").is_some() {
        eprintln!("failover chaos: logs kept in {}", root.display());
        std::mem::forget(dir); // not removed: the agents' logs stay to read
    }
    let ca = Ca::new("fo-chaos-ca").unwrap();
    let a_name = "host1.site-a.example.com";
    let b_name = &format!("replica-{tag}-{}.site-b.example.com", std::process::id());
    write_tls(&root.join("a-tls"), &material(&ca, &[a_name, "127.0.0.1"]));
    let mut b = replica_site(root, &format!("{tag}-b"), &ca, b_name, "*.site-a.example.com", &[a_name]).await;
    let a_repl = free_port();
    let mut a = SiteA::start(root, &format!("{tag}-a"), &ca, b_name, a_repl).await;
    let image = disk_image(root, &format!("{tag}-root"));
    let app = "app";
    let (b_port, a_vmrs, b_vmrs) = (b.repl_port, a.vmrs.clone(), b.vmrs.clone());
    let at_a = |failover: serde_json::Value| {
        json!({"apiVersion": "vmreplica.io/v1alpha1", "kind": "VMReplication", "metadata": {"name": app},
            "spec": {"disks": [{"name": "root", "path": image}], "replicationFrequencySeconds": 1,
                     "replicaServer": {"name": b_name, "port": b_port}, "failover": failover}})
    };
    apply_object(&a.vmrs, &at_a(json!(null))).await;
    let replica = wait_secs(60, "B's Replica object", async || {
        state_is(&b.vmrs, app, ReplicationState::Replicating).await
    })
    .await;
    let b_image = replica.spec.disks[0].path.clone();
    let at_b = |failover: serde_json::Value| {
        json!({"apiVersion": "vmreplica.io/v1alpha1", "kind": "VMReplication", "metadata": {"name": app},
               "spec": {"role": "Replica", "disks": replica.spec.disks, "replicationFrequencySeconds": 1,
                        "failover": failover}})
    };
    let a_export = format!("nbd+unix:///{}.{app}/root?socket={}", a.ns, root.join("a-nbd.sock").display());
    let b_export = format!("nbd+unix:///{}.{app}/root?socket={}", a.ns, b.socket.display());
    let done = async |api: &Api<VMReplication>, id: &str, struck: &[String]| {
        failover_ended(api, app, id, 120, &format!("({what}, {struck:?})")).await
    };
    let mut struck = Vec::new();
    let mut written: Vec<(u64, u64)> = Vec::new(); // (offset, pattern)
    for round in 0..rounds {
        let to_b = round % 2 == 0;
        let (from_export, to_export) = if to_b { (&a_export, &b_export) } else { (&b_export, &a_export) };
        let a_image = image.to_str().unwrap().to_owned();
        let (from_image, to_image) = if to_b { (&a_image, &b_image) } else { (&b_image, &a_image) };
        let off = (round * 2 % 128) * 65536;
        let pattern = 0x10 + round % 0xe0;
        qemu_io(from_export, &format!("write -P {pattern} {off} 64k")).unwrap();
        written.push((off, pattern));
        let id = format!("r{round}");
        let steps = if to_b {
            [
                (&a_vmrs, at_a(json!({"id": id, "type": "Planned"}))),
                (
                    &b_vmrs,
                    at_b(json!({"id": id, "type": "Planned", "reverseReplication": true,
                                      "reverseReplicaServer": {"name": a_name, "port": a_repl}})),
                ),
            ]
        } else {
            [
                (&b_vmrs, at_b(json!({"id": id, "type": "Planned"}))),
                (&a_vmrs, at_a(json!({"id": id, "type": "Planned", "reverseReplication": true}))),
            ]
        };
        for (api, obj) in steps {
            apply_object(api, &obj).await;
            let Strike { victim, at, down, says } = strike(round, struck.len() % 2);
            struck.push(match at {
                Some(at) => format!("move {round} {victim:?} at {at} ms for {down} ms"),
                None => format!("move {round} {victim:?} once done, for {down} ms"),
            });
            eprintln!("failover chaos: {}", struck.last().unwrap());
            match at {
                Some(at) => tokio::time::sleep(Duration::from_millis(at)).await,
                None => {
                    let l = done(api, &id, &struck).await;
                    assert_eq!(
                        l.phase,
                        vmreplica_crds::FailoverPhase::Completed,
                        "move {round}, {what}: {l:?}"
                    );
                }
            }
            kill(victim, &mut a, &mut b);
            let back = tokio::time::Instant::now() + Duration::from_millis(down);
            if let Some(text) = says {
                let saying = async || {
                    let l = api.get(app).await.ok()?.status?.last_failover?;
                    l.message.filter(|m| l.id == id && m.contains(text))
                };
                let said = tokio::time::timeout_at(back, async {
                    loop {
                        if let Some(m) = saying().await {
                            return m;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                });
                let said = said.await.unwrap_or_else(|_| {
                    panic!("move {round}, {what}: the failover never said {text:?} while {victim:?} was down")
                });
                eprintln!("failover chaos: while {victim:?} was down: {said}");
            }
            tokio::time::sleep_until(back).await;
            restart(victim, &mut a, &mut b, &ca, struck.len());
            let l = done(api, &id, &struck).await;
            assert_eq!(
                l.phase,
                vmreplica_crds::FailoverPhase::Completed,
                "move {round}, {what}, {struck:?}: {l:?}"
            );
        }
        // Zero loss: both sides the same bytes, every write ever made served
        // by the new primary.
        assert!(
            identical(to_image, Path::new(from_image)),
            "move {round} ({what}, {struck:?}): sides differ"
        );
        for (off, pattern) in &written {
            wait_secs(60, &format!("move {round}: write {pattern} at {off} served"), async || {
                qemu_io(to_export, &format!("read -P {pattern} {off} 64k")).ok()
            })
            .await;
        }
        // Replicating back: a write at the new primary reaches the old one.
        let off = (round * 2 % 128 + 1) * 65536;
        let pattern = 0xf0 + round % 0x0f;
        qemu_io(to_export, &format!("write -P {pattern} {off} 64k")).unwrap();
        written.push((off, pattern));
        wait_secs(60, &format!("move {round}: the new primary's write at the old one"), async || {
            qemu_io(from_image, &format!("read -P {pattern} {off} 64k")).ok()
        })
        .await;
    }
    eprintln!("failover chaos: {rounds} moves passed ({what}): {struck:?}");
}

/// Site A on the shared apiserver: its agent (see [`site_a_agent`]) is a
/// replica server too, for B on port `repl` — Hyper-V asks the same of a
/// primary that is to receive reverse replication — with its own
/// ReplicationServer, an AuthorizationEntry for B and its controllers.
struct SiteA {
    ns: String,
    label: String,
    agent: Process,
    storage: std::path::PathBuf,
    vmrs: Api<VMReplication>,
    controllers: SiteControllers,
    /// How its agent was started (root, B's name, its replication port), to
    /// start it again.
    agent_args: (std::path::PathBuf, String, u16),
}

/// A site's controller loops (sites, VMReplications, the replica site) as
/// tasks of this test. Killing them aborts them wherever they are, as kill
/// -9 of the controller's process would: nothing of them runs on, no
/// clean-up; started again, they know only what the apiserver holds.
struct SiteControllers {
    client: kube::Client,
    ns: String,
    watch: Option<String>,
    tasks: Vec<tokio::task::AbortHandle>,
}

impl SiteControllers {
    fn start(client: kube::Client, ns: &str, ca: &Ca, watch: Option<String>) -> Self {
        let mut c = Self { client, ns: ns.to_owned(), watch, tasks: Vec::new() };
        c.spawn(ca);
        c
    }

    fn spawn(&mut self, ca: &Ca) {
        let ctx = controllers(self.client.clone(), &self.ns, ca, self.watch.clone());
        self.tasks = vec![
            tokio::spawn(site::run(ctx.site.clone(), std::future::pending())).abort_handle(),
            tokio::spawn(vmreplication::run(ctx.clone(), std::future::pending())).abort_handle(),
            tokio::spawn(replica_site::run(ctx, std::future::pending())).abort_handle(),
        ];
    }

    fn kill(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }

    fn restart(&mut self, ca: &Ca) {
        self.kill();
        self.spawn(ca);
    }
}

impl SiteA {
    async fn start(root: &Path, tag: &str, ca: &Ca, b_name: &str, repl: u16) -> SiteA {
        let a = client().await;
        let ns = test_namespace(&a, tag).await;
        std::fs::create_dir_all(root.join("disks")).unwrap();
        let storage = root.join("a-replicas");
        std::fs::create_dir_all(&storage).unwrap();
        let label = format!("vmreplica.io/reverse-test-{}", &ns[ns.len().saturating_sub(8)..]);
        let agent = site_a_agent(root, &ns, &label, b_name, Some(repl));
        let rs = json!({"apiVersion": "vmreplica.io/v1alpha1", "kind": "ReplicationServer",
            "metadata": {"name": ns}, "spec": {"nodeSelector": {label.clone(): "true"}, "port": repl,
            "allowAnyServer": false}});
        apply_object(&Api::<vmreplica_crds::ReplicationServer>::all(a.clone()), &rs).await;
        let entry = json!({"apiVersion": "vmreplica.io/v1alpha1", "kind": "AuthorizationEntry",
            "metadata": {"name": ns}, "spec": {"allowedPrimaryServer": b_name, "trustGroup": "finance",
            "replicaStorageLocation": storage, "replicaNamespace": ns}});
        apply_object(&Api::<vmreplica_crds::AuthorizationEntry>::all(a.clone()), &entry).await;
        let controllers = SiteControllers::start(a.clone(), &ns, ca, Some(ns.clone()));
        let vmrs = Api::namespaced(a.clone(), &ns);
        let agent_args = (root.to_owned(), b_name.to_owned(), repl);
        SiteA { ns, label, agent, storage, vmrs, controllers, agent_args }
    }

    /// Kills the agent (SIGKILL) and starts it again as it was; its log so
    /// far is kept as `a-agent.<n>.log` beside the new one's.
    fn restart_agent(&mut self, n: usize) {
        self.agent.kill();
        let (root, b_name, repl) = &self.agent_args;
        let _ = std::fs::rename(root.join("a-agent.log"), root.join(format!("a-agent.{n}.log")));
        self.agent = site_a_agent(root, &self.ns, &self.label, b_name, Some(*repl));
    }
}

/// A new 8 MiB raw image under `disks/`.
fn disk_image(root: &Path, name: &str) -> std::path::PathBuf {
    let p = root.join("disks").join(format!("{name}.img"));
    let ok = Command::new("qemu-img").args(["create", "-q", "-f", "raw"]).arg(&p).arg("8M").status().unwrap();
    assert!(ok.success());
    p
}

/// Unplanned failover A→B while A still writes (forced past the
/// split-brain guard; A's replication suspended, so its last writes never
/// reach B), writes at B, then reverse replication on the completing
/// request: A's VM, still attached, is fenced; once it lets go, A's own
/// disks are resynchronised by block hash to B's with only what differs
/// sent; A's writes that never reached B are kept at A as a diverged
/// point, materialised and then discarded on request; B's writes go on
/// reaching A by log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unplanned_failover_then_reverse_by_resync_keeps_the_old_primarys_diverged_writes() {
    unplanned_move("unp", "calm", |_| CALM).await;
}

/// The same with a kill at a random moment of each of its four requests
/// (the unplanned failover, its completion with reverse replication, B's
/// part of failing back, A's): B's controllers, B's agent, A's controllers
/// or both sites' controllers, killed and started again. A's agent is not
/// struck here: its VM stays attached through the reverse, to show the
/// fence (the planned-failover chaos kills it). `FAILOVER_CHAOS_SEED`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unplanned_failover_and_failing_back_survive_kills_at_random_moments() {
    let seed: u64 =
        std::env::var("FAILOVER_CHAOS_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
        });
    eprintln!("unplanned chaos: FAILOVER_CHAOS_SEED={seed}");
    let mut below = chaos_rng(seed);
    let victims = [Victim::ControllersB, Victim::AgentB, Victim::ControllersA, Victim::BothControllers];
    unplanned_move("unc", &format!("FAILOVER_CHAOS_SEED={seed}"), |_| Strike {
        victim: victims[below(victims.len() as u64) as usize],
        at: Some(below(2500)),
        down: below(1000),
        says: None,
    })
    .await;
}

/// A xorshift generator seeded by splitmix64 of `seed` (neighbouring seeds
/// are unrelated runs): a number below `n` per call.
fn chaos_rng(seed: u64) -> impl FnMut(u64) -> u64 {
    let mut rng = {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) | 1
    };
    move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    }
}

/// Kills `victim` (see [`restart`]).
fn kill(victim: Victim, a: &mut SiteA, b: &mut ReplicaSite) {
    match victim {
        Victim::Nothing => {}
        Victim::ControllersA => a.controllers.kill(),
        Victim::ControllersB => b.controllers.kill(),
        Victim::BothControllers => {
            a.controllers.kill();
            b.controllers.kill();
        }
        Victim::AgentA => a.agent.kill(),
        Victim::AgentB => b.agent.kill(),
    }
}

/// Starts `victim` again, as it was (`n`: the strike's number, for A's
/// agent's kept log).
fn restart(victim: Victim, a: &mut SiteA, b: &mut ReplicaSite, ca: &Ca, n: usize) {
    match victim {
        Victim::Nothing => {}
        Victim::ControllersA => a.controllers.restart(ca),
        Victim::ControllersB => b.controllers.restart(ca),
        Victim::BothControllers => {
            a.controllers.restart(ca);
            b.controllers.restart(ca);
        }
        Victim::AgentA => a.restart_agent(n),
        Victim::AgentB => b.restart_agent(),
    }
}

/// The unplanned failover A→B, its completion with reverse replication by
/// resync, the diverged point, and failing back (see the calm test's doc),
/// striking as `strike(request)` says after each of its four requests.
async fn unplanned_move(tag: &str, what: &str, mut strike: impl FnMut(usize) -> Strike) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ca = Ca::new("unplanned-ca").unwrap();
    // B's own name: AuthorizationEntries are cluster-wide, and other tests'
    // on this apiserver admit replica.site-b into their own storage.
    let a_name = "host1.site-a.example.com";
    let b_name = &format!("{tag}-{}.site-b.example.com", std::process::id());
    write_tls(&root.join("a-tls"), &material(&ca, &[a_name, "127.0.0.1"]));
    let mut b = replica_site(root, &format!("{tag}-b"), &ca, b_name, "*.site-a.example.com", &[a_name]).await;
    let (b_repl, a_repl) = (b.repl_port, free_port());
    let mut a = SiteA::start(root, &format!("{tag}-a"), &ca, b_name, a_repl).await;
    let (a_ns, a_vmrs) = (a.ns.clone(), a.vmrs.clone());
    let mut struck = Vec::new();
    let mut strike_now = async |b: &mut ReplicaSite, a: &mut SiteA| {
        let Strike { victim, at, down, .. } = strike(struck.len());
        struck.push(format!("request {} {victim:?} at {at:?} ms for {down} ms", struck.len()));
        eprintln!("unplanned chaos ({what}): {}", struck.last().unwrap());
        tokio::time::sleep(Duration::from_millis(at.unwrap_or(0))).await;
        kill(victim, a, b);
        tokio::time::sleep(Duration::from_millis(down)).await;
        restart(victim, a, b, &ca, struck.len());
    };
    let (root_img, data_img) = (disk_image(root, "app-root"), disk_image(root, "app-data"));
    for img in [&root_img, &data_img] {
        qemu_io(img.to_str().unwrap(), "write -P 0x01 0 4M").unwrap();
    }
    let app = "app";
    let primary = |extra: serde_json::Value| {
        let mut o = json!({"apiVersion": "vmreplica.io/v1alpha1", "kind": "VMReplication",
            "metadata": {"name": app}, "spec": {"disks": [{"name": "root", "path": root_img},
            {"name": "data", "path": data_img}], "replicationFrequencySeconds": 1,
            "replicaServer": {"name": b_name, "port": b_repl}}});
        for (k, v) in extra.as_object().into_iter().flatten() {
            o["spec"][k] = v.clone();
        }
        o
    };
    apply_object(&a_vmrs, &primary(json!({}))).await;
    let replica = wait_secs(60, "B's Replica object", async || {
        state_is(&b.vmrs, app, ReplicationState::Replicating).await.filter(|v| v.spec.disks.len() == 2)
    })
    .await;
    let socket = root.join("a-nbd.sock");
    let a_export = |disk: &str| format!("nbd+unix:///{a_ns}.{app}/{disk}?socket={}", socket.display());
    let b_socket = b.socket.clone();
    let b_export = |disk: &str| format!("nbd+unix:///{a_ns}.{app}/{disk}?socket={}", b_socket.display());
    qemu_io(&a_export("root"), "write -P 0x11 1M 64k").unwrap();
    let b_image = |name: &str| replica.spec.disks.iter().find(|d| d.name == name).unwrap().path.clone();
    wait_secs(30, "A's write at B", async || qemu_io(&b_image("root"), "read -P 0x11 1M 64k").ok()).await;

    // A is cut off (its replication suspended) and goes on writing.
    apply_object(&a_vmrs, &primary(json!({"suspended": true}))).await;
    state_is_within(&a_vmrs, app, ReplicationState::Suspended).await;
    qemu_io(&a_export("root"), "write -P 0x44 5M 64k").unwrap();
    qemu_io(&a_export("data"), "write -P 0x45 6M 64k").unwrap();

    // Unplanned failover at B, forced (A replicated within the minute); B's VM writes.
    let at_b = |failover: serde_json::Value| {
        json!({"apiVersion": "vmreplica.io/v1alpha1", "kind": "VMReplication", "metadata": {"name": app},
               "spec": {"role": "Replica", "disks": replica.spec.disks, "replicationFrequencySeconds": 1,
                        "failover": failover}})
    };
    let operator = PatchParams::apply("dr-operator").force();
    let request = json!({"id": "u1", "type": "Unplanned", "force": true});
    b.vmrs.patch(app, &operator, &Patch::Apply(at_b(request.clone()))).await.unwrap();
    strike_now(&mut b, &mut a).await;
    wait_secs(60, "B to run the VM on the chosen point", async || {
        let l = b.vmrs.get(app).await.ok()?.status?.last_failover?;
        (l.phase == vmreplica_crds::FailoverPhase::WaitingCompletion).then_some(l)
    })
    .await;
    // (An agent struck after the promotion serves again at the next pass.)
    wait_secs(30, "B's write", async || qemu_io(&b_export("root"), "write -P 0x55 2M 64k").ok()).await;
    // A's VM is still attached to its disks when the reverse comes.
    let mut attached = Command::new("qemu-io")
        .args(["-f", "raw", &a_export("root")])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut complete = request.clone();
    complete["complete"] = json!(true);
    complete["reverseReplication"] = json!(true);
    complete["reverseReplicaServer"] = json!({"name": a_name, "port": a_repl});
    b.vmrs.patch(app, &operator, &Patch::Apply(at_b(complete))).await.unwrap();
    strike_now(&mut b, &mut a).await;
    let l = wait_secs(60, "the failover to complete, reversed", async || {
        let l = b.vmrs.get(app).await.ok()?.status?.last_failover?;
        (l.phase == vmreplica_crds::FailoverPhase::Completed).then_some(l)
    })
    .await;
    assert_eq!(l.reversed_to.as_deref(), Some(&format!("{a_name}:{a_repl}")[..]), "{l:?}");
    assert!(l.message.as_deref().unwrap_or_default().contains("diverged point"), "{l:?}");
    // Fenced while attached: A's object says so, and nothing of A's disks changed.
    let fenced = wait_secs(60, "A fenced", async || {
        state_is(&a_vmrs, app, ReplicationState::Error).await.filter(|v| {
            v.status.as_ref().is_some_and(|s| s.health_details.iter().any(|d| d.starts_with("Fenced")))
        })
    })
    .await;
    assert!(fenced.status.unwrap().epoch == 0);
    qemu_io(root_img.to_str().unwrap(), "read -P 0x44 5M 64k").expect("A's disk untouched while fenced");
    drop(attached.stdin.take());
    attached.wait().unwrap();

    // Let go: A's disks are resynchronised to B's, only the differing leaves sent.
    let b_dir = Path::new(&b_image("root")).parent().unwrap().parent().unwrap().to_owned();
    let copy = |disk: &str| b_dir.join(disk).join("materialized").join(format!("{app}-failover.img"));
    let done = wait_secs(120, "the resync back to A", async || {
        b.vmrs.get(app).await.ok()?.status?.last_resynchronization
    })
    .await;
    assert!(identical(copy("root").to_str().unwrap(), &root_img), "A's root equals B's");
    assert!(identical(copy("data").to_str().unwrap(), &data_img), "A's data equals B's");
    // A's two writes B never had and B's one write: 3 x 64 KiB differ (a
    // resync struck and begun again finds less left to send).
    if what == "calm" {
        assert_eq!(done.bytes_resynchronized, 3 * 65536, "{done:?}");
    } else {
        assert!(done.bytes_resynchronized <= 3 * 65536, "{done:?}");
    }
    assert!(done.bytes_sent < 3 * 65536 + 64 * 1024, "hashes and framing besides the data: {done:?}");
    qemu_io(root_img.to_str().unwrap(), "read -P 0x55 2M 64k").expect("B's write at A");
    assert!(
        qemu_io(root_img.to_str().unwrap(), "read -P 0x44 5M 64k").is_err(),
        "A's own write gone from its disk"
    );

    // ...but kept at A as its diverged point, listed on A's object.
    let listed = wait_secs(60, "A's diverged point", async || {
        let s = a_vmrs.get(app).await.ok()?.status?;
        s.diverged_point.filter(|d| d.disks.len() == 2).map(|d| (s.state, d))
    })
    .await;
    assert_eq!(listed.0, ReplicationState::Replicating, "A is B's replica now: {listed:?}");
    assert!(listed.1.message.as_deref().unwrap_or_default().contains("Materialize"), "{listed:?}");
    apply_object(&a_vmrs, &primary(json!({"suspended": true, "divergedPoint": {"action": "Materialize"}})))
        .await;
    let copies = wait_secs(60, "A's diverged point written out", async || {
        let d = a_vmrs.get(app).await.ok()?.status?.diverged_point?;
        d.disks.iter().map(|k| Some((k.name.clone(), k.path.clone()?))).collect::<Option<Vec<_>>>()
    })
    .await;
    let of = |disk: &str| copies.iter().find(|(n, _)| n == disk).unwrap().1.clone();
    qemu_io(&of("root"), "read -P 0x44 5M 64k").expect("A's diverged write");
    qemu_io(&of("root"), "read -P 0x11 1M 64k").expect("what both had");
    assert!(qemu_io(&of("root"), "read -P 0x55 2M 64k").is_err(), "not B's write");
    qemu_io(&of("data"), "read -P 0x45 6M 64k").expect("A's diverged write on the other disk");

    // B's writes go on reaching A's own disks, by log.
    wait_secs(30, "B's next write", async || qemu_io(&b_export("data"), "write -P 0x66 3M 64k").ok()).await;
    wait_secs(30, "B's next write at A", async || {
        qemu_io(data_img.to_str().unwrap(), "read -P 0x66 3M 64k").ok()
    })
    .await;
    assert!(qemu_io(&a_export("root"), "read 0 512").is_err(), "A no longer serves the VM");

    // Failing back to A (planned, B's part then A's): the diverged point is
    // still listed there and still discarded on request, copies and all.
    let back = json!({"id": "back", "type": "Planned"});
    b.vmrs.patch(app, &operator, &Patch::Apply(at_b(back))).await.unwrap();
    strike_now(&mut b, &mut a).await;
    wait_secs(60, "B's part of failing back", async || {
        let l = b.vmrs.get(app).await.ok()?.status?.last_failover?;
        (l.id == "back" && l.phase == vmreplica_crds::FailoverPhase::Completed).then_some(())
    })
    .await;
    let a_back = json!({"divergedPoint": {"action": "Materialize"},
        "failover": {"id": "back", "type": "Planned", "reverseReplication": true}});
    apply_object(&a_vmrs, &primary(a_back)).await;
    strike_now(&mut b, &mut a).await;
    wait_secs(90, "A to take the VM back", async || {
        let l = a_vmrs.get(app).await.ok()?.status?.last_failover?;
        (l.id == "back" && l.phase == vmreplica_crds::FailoverPhase::Completed && l.took_over).then_some(())
    })
    .await;
    qemu_io(&a_export("data"), "read -P 0x66 3M 64k").expect("A serves B's writes");
    let kept = a_vmrs
        .get(app)
        .await
        .unwrap()
        .status
        .unwrap()
        .diverged_point
        .expect("still listed after failing back");
    assert_eq!(kept.disks.len(), 2, "{kept:?}");
    let a_discard = json!({"divergedPoint": {"action": "Discard"},
        "failover": {"id": "back", "type": "Planned", "reverseReplication": true}});
    apply_object(&a_vmrs, &primary(a_discard)).await;
    wait_secs(60, "A's diverged point discarded", async || {
        a_vmrs.get(app).await.ok()?.status.filter(|s| s.diverged_point.is_none())
    })
    .await;
    assert!(!Path::new(&of("root")).exists(), "its copies went with it");
    let files = files_named(&root.join("a-replicas"), "diverged.img");
    assert!(files.is_empty(), "the point's own files went too: {files:?}");
}

/// Files called `name` under `dir`, recursively.
fn files_named(dir: &Path, name: &str) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().is_dir() {
            out.extend(files_named(&e.path(), name));
        } else if e.file_name() == name {
            out.push(e.path());
        }
    }
    out
}

/// Waits for `name` in `api` to reach `want`.
async fn state_is_within(api: &Api<VMReplication>, name: &str, want: ReplicationState) -> VMReplication {
    wait_secs(30, &format!("{name} {want:?}"), async || state_is(api, name, want).await).await
}

/// Site A's agent on the shared apiserver (TLS in `a-tls`, disks under
/// `disks`, NBD on `a-nbd.sock`), sending to `to` on loopback; with
/// `listen`, also a replica server on that port.
fn site_a_agent(root: &Path, ns: &str, label: &str, to: &str, listen: Option<u16>) -> Process {
    let mut cmd = Command::new(bin("vmreplica-agent"));
    cmd.arg("serve");
    if let Some(port) = listen {
        cmd.args(["--listen", &format!("127.0.0.1:{port}")]);
    }
    cmd.args(["--control-listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--tls-dir")
        .arg(root.join("a-tls"))
        .arg("--socket")
        .arg(root.join("a-nbd.sock"))
        .arg("--disk-root")
        .arg(root.join("disks"))
        .args(["--resolve", &format!("{to}=127.0.0.1"), "--retry-seconds", "1"])
        .args(["--node-label", &format!("{label}=true")])
        .args(lease_args(ns, "node-a", &shared_kubeconfig()));
    Process::spawn_ready(cmd, &root.join("a-agent.log"))
}

/// A replica site with its own apiserver, controller and agent (both roles,
/// so that it can be failed over to), accepting `allowed` as primaries into
/// namespace `finance-dr`. `resolve`: names its agent sends to, on loopback.
struct ReplicaSite {
    _plane: ControlPlane,
    vmrs: Api<VMReplication>,
    repl_port: u16,
    socket: std::path::PathBuf,
    /// The node name its agent's Lease carries.
    node: String,
    agent: Process,
    /// How its agent was started, to start it again.
    agent_args: (Vec<std::ffi::OsString>, std::path::PathBuf),
    restarts: u32,
    controllers: SiteControllers,
}

impl ReplicaSite {
    /// Kills the agent (SIGKILL) and starts it again as it was.
    fn restart_agent(&mut self) {
        self.agent.kill();
        let (args, log) = &self.agent_args;
        let mut cmd = Command::new(bin("vmreplica-agent"));
        cmd.args(args);
        // Each start's log kept.
        self.restarts += 1;
        self.agent =
            Process::spawn_ready(cmd, &log.with_extension(format!("restarted-{}.log", self.restarts)));
    }
}

async fn replica_site(
    root: &Path,
    tag: &str,
    ca: &Ca,
    name: &str,
    allowed: &str,
    resolve: &[&str],
) -> ReplicaSite {
    write_tls(&root.join(format!("{tag}-tls")), &material(ca, &[name, "127.0.0.1"]));
    let plane = ControlPlane::start().await.unwrap();
    let client = client_for(&plane.kubeconfig_path()).await.unwrap();
    install_crds(&client).await.unwrap();
    let ns = test_namespace(&client, tag).await;
    let dr = "finance-dr";
    let ns_obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": dr}});
    apply_object(&Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone()), &ns_obj).await;
    let (repl_port, ctl_port) = (free_port(), free_port());
    let socket = root.join(format!("{tag}-nbd.sock"));
    let node = format!("node-{tag}");
    let mut cmd = Command::new(bin("vmreplica-agent"));
    cmd.args(["serve", "--listen", &format!("127.0.0.1:{repl_port}"), "--control-listen"])
        .arg(format!("127.0.0.1:{ctl_port}"))
        .arg("--socket")
        .arg(&socket)
        .arg("--tls-dir")
        .arg(root.join(format!("{tag}-tls")))
        .args(["--retry-seconds", "1"])
        .args(["--node-label", "vmreplica.io/replica-server=true"])
        .args(lease_args(&ns, &node, &plane.kubeconfig_path()));
    for r in resolve {
        cmd.args(["--resolve", &format!("{r}=127.0.0.1")]);
    }
    let agent_args = (cmd.get_args().map(|a| a.to_owned()).collect(), root.join(format!("{tag}-agent.log")));
    let agent = Process::spawn_ready(cmd, &agent_args.1);
    let storage = root.join(format!("{tag}-replicas"));
    std::fs::create_dir_all(&storage).unwrap();
    // The example names the Secret with the agents' certificate: created here
    // from the agent's own files, as a user (or cert-manager) would.
    let tls = TlsMaterial::from_dir(&root.join(format!("{tag}-tls"))).unwrap();
    tls_secret(&client, &ns, "vmreplica-agent-tls", &tls).await;
    let mut rs = example("replicationserver.yaml");
    rs["spec"]["port"] = json!(repl_port);
    apply_object(&Api::<vmreplica_crds::ReplicationServer>::all(client.clone()), &rs).await;
    let mut entry = example("authorizationentry.yaml");
    entry["spec"]["replicaStorageLocation"] = json!(storage);
    entry["spec"]["allowedPrimaryServer"] = json!(allowed);
    apply_object(&Api::<vmreplica_crds::AuthorizationEntry>::all(client.clone()), &entry).await;
    let controllers = SiteControllers::start(client.clone(), &ns, ca, None);
    let vmrs = Api::namespaced(client.clone(), dr);
    ReplicaSite { _plane: plane, vmrs, repl_port, socket, node, agent, agent_args, restarts: 0, controllers }
}

/// Extended replication A→B→C across three apiservers: B forwards what it
/// applies to C (a forwarding interval shorter than the primary's is
/// refused first), writes at A reach C; then a planned failover A→B without
/// reverse resumes replication B→C with no copy, and writes at B reach C.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_replication_then_failover_to_b_resumes_to_c() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ca = Ca::new("extended-ca").unwrap();
    let (a_name, b_name, c_name) =
        ("host1.site-a.example.com", "replica.site-b.example.com", "replica.site-c.example.com");
    let b = replica_site(root, "ext-b", &ca, b_name, "*.site-a.example.com", &[c_name]).await;
    let c = replica_site(root, "ext-c", &ca, c_name, b_name, &[]).await;

    // Site A: the shared apiserver, a primary agent.
    write_tls(&root.join("a-tls"), &material(&ca, &[a_name, "127.0.0.1"]));
    let a = client().await;
    let a_ns = test_namespace(&a, "ext-a").await;
    std::fs::create_dir_all(root.join("disks")).unwrap();
    let label = format!("vmreplica.io/extended-test-{}", &a_ns[a_ns.len().saturating_sub(8)..]);
    let socket = root.join("a-nbd.sock");
    let _a_agent = site_a_agent(root, &a_ns, &label, b_name, None);
    let a_ctx = controllers(a.clone(), &a_ns, &ca, Some(a_ns.clone()));
    tokio::spawn(vmreplication::run(a_ctx, std::future::pending()));
    let a_vmrs: Api<VMReplication> = Api::namespaced(a.clone(), &a_ns);
    let img = root.join("disks").join("app-root.img");
    assert!(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "raw"])
            .arg(&img)
            .arg("8M")
            .status()
            .unwrap()
            .success()
    );
    let app = "app";
    let primary = |failover: serde_json::Value| {
        let mut o = json!({"apiVersion": "vmreplica.io/v1alpha1", "kind": "VMReplication",
            "metadata": {"name": app}, "spec": {"disks": [{"name": "root", "path": img}],
            "replicationFrequencySeconds": 2, "replicaServer": {"name": b_name, "port": b.repl_port}}});
        if !failover.is_null() {
            o["spec"]["failover"] = failover;
        }
        o
    };
    apply_object(&a_vmrs, &primary(serde_json::Value::Null)).await;
    let at_b_obj = wait_secs(60, "B's Replica object", async || {
        state_is(&b.vmrs, app, ReplicationState::Replicating).await
    })
    .await;
    let b_root = at_b_obj.spec.disks[0].path.clone();
    let operator = PatchParams::apply("dr-operator").force();
    let at_b = |every: u32, failover: serde_json::Value| {
        json!({"apiVersion": "vmreplica.io/v1alpha1", "kind": "VMReplication", "metadata": {"name": app},
               "spec": {"role": "Replica", "disks": at_b_obj.spec.disks, "replicationFrequencySeconds": 2,
                        "extendedReplica": {"replicaServer": {"name": c_name, "port": c.repl_port},
                                            "replicationFrequencySeconds": every},
                        "failover": failover}})
    };
    let extended = async |want: ReplicationState| {
        wait_secs(60, &format!("B's extended replication {want:?}"), async || {
            let s = b.vmrs.get(app).await.ok()?.status?.extended_replication?;
            (s.state == want).then_some(s)
        })
        .await
    };

    // More often than A replicates: refused, with the reason.
    b.vmrs.patch(app, &operator, &Patch::Apply(at_b(1, serde_json::Value::Null))).await.unwrap();
    let refused = extended(ReplicationState::Error).await;
    assert!(refused.message.as_deref().unwrap_or_default().contains("at least 2"), "{refused:?}");
    // As often: C gets a copy of B's replica, then what B applies.
    b.vmrs.patch(app, &operator, &Patch::Apply(at_b(2, serde_json::Value::Null))).await.unwrap();
    let on = extended(ReplicationState::Replicating).await;
    assert_eq!(on.replica_server, format!("{c_name}:{}", c.repl_port));
    let at_c = wait_secs(60, "C's Replica object", async || {
        state_is(&c.vmrs, app, ReplicationState::Replicating).await
    })
    .await;
    assert_eq!(at_c.status.unwrap().primary_server.as_deref(), Some(b_name), "C's primary is B");
    let c_root = at_c.spec.disks[0].path.clone();
    let a_export = format!("nbd+unix:///{a_ns}.{app}/root?socket={}", socket.display());
    qemu_io(&a_export, "write -P 0x41 1M 64k").unwrap();
    wait_secs(60, "A's write at C", async || qemu_io(&c_root, "read -P 0x41 1M 64k").ok()).await;

    // Planned failover A→B, no reverse: B resumes to C.
    apply_object(&a_vmrs, &primary(json!({"id": "move", "type": "Planned"}))).await;
    wait_secs(60, "A's part", async || {
        a_vmrs
            .get(app)
            .await
            .ok()?
            .status?
            .last_failover
            .filter(|l| l.phase == vmreplica_crds::FailoverPhase::Completed)
    })
    .await;
    b.vmrs
        .patch(app, &operator, &Patch::Apply(at_b(2, json!({"id": "move", "type": "Planned"}))))
        .await
        .unwrap();
    let l = wait_secs(60, "B's part", async || {
        b.vmrs.get(app).await.ok()?.status?.last_failover.filter(|l| {
            matches!(
                l.phase,
                vmreplica_crds::FailoverPhase::Completed | vmreplica_crds::FailoverPhase::Failed
            )
        })
    })
    .await;
    assert_eq!(l.phase, vmreplica_crds::FailoverPhase::Completed, "{l:?}");
    let c_addr = format!("{c_name}:{}", c.repl_port);
    assert_eq!(l.reversed_to.as_deref(), Some(c_addr.as_str()), "{l:?}");
    assert!(l.message.as_deref().unwrap_or_default().contains("resumed to the extended replica"), "{l:?}");
    assert!(identical(&b_root, &img), "zero loss A→B");
    let b_export = format!("nbd+unix:///{a_ns}.{app}/root?socket={}", b.socket.display());
    qemu_io(&b_export, "write -P 0x42 2M 64k").unwrap();
    wait_secs(60, "B's write at C", async || qemu_io(&c_root, "read -P 0x42 2M 64k").ok()).await;
    qemu_io(&c_root, "read -P 0x41 1M 64k").expect("A's write is still at C");
    let resumed = wait_secs(30, "B's status to say it resumed", async || {
        let s = b.vmrs.get(app).await.ok()?.status?.extended_replication?;
        s.message.as_deref().is_some_and(|m| m.contains("resumed")).then_some(s)
    })
    .await;
    assert_eq!(resumed.state, ReplicationState::Replicating);
    wait_secs(30, "C to show B's epoch", async || {
        (c.vmrs.get(app).await.ok()?.status?.epoch >= 1).then_some(())
    })
    .await;
}

/// A partition between the sites: the replica agent runs in a network
/// namespace this test makes, reached through a bridge from loopback, and
/// the partition is an iptables DROP of everything inside that namespace.
/// The Primary object's health goes Critical, saying that no cycle succeeded
/// and to check that the replica site's agent is reachable; after the heal
/// the replica converges, Critical clears at once, Warning says how many of
/// the window's cycles were missed (every interval a stalled attempt spanned
/// counts), and health is Normal again once successful cycles outnumber
/// them enough or the monitoring window ends (its ReplicationServer's
/// windows are laid, just before the partition, to start afresh then and
/// to end shortly after the heal). Needs root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_between_the_sites_shows_in_health_until_it_heals() {
    use vmreplica_crds::Health;
    assert!(rustix::process::geteuid().is_root(), "this test makes a network namespace: run it as root");
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ca = Ca::new("partition-ca").unwrap();
    let (a_name, b_name) = ("host1.site-a.example.com", "partition.site-b.example.com");
    write_tls(&root.join("a-tls"), &material(&ca, &[a_name, "127.0.0.1"]));
    write_tls(&root.join("b-tls"), &material(&ca, &[b_name, "127.0.0.1"]));
    let net = vmreplica_tests::netns::NetNs::new("part");
    let storage = root.join("b-replicas");
    std::fs::create_dir_all(&storage).unwrap();
    let mut cmd = net.command(bin("vmreplica-agent"));
    cmd.args(["receive", "--listen", "127.0.0.1:7443", "--tls-dir"])
        .arg(root.join("b-tls"))
        .arg("--authorize")
        .arg(format!("pattern=*.site-a.example.com,storage={},trust-group=t", storage.display()));
    let _b = Process::spawn_ready(cmd, &root.join("b-agent.log"));
    let bridge = net.bridge_to("127.0.0.1:7443".parse().unwrap());
    let a_repl = free_port();
    let a = SiteA::start(root, "part-a", &ca, b_name, a_repl).await;
    let image = disk_image(root, "part-root");
    let app = "app";
    apply_object(
        &a.vmrs,
        &json!({"apiVersion": "vmreplica.io/v1alpha1", "kind": "VMReplication", "metadata": {"name": app},
            "spec": {"disks": [{"name": "root", "path": image}], "replicationFrequencySeconds": 1,
                     "replicaServer": {"name": b_name, "port": bridge.port()}}}),
    )
    .await;
    let export = format!("nbd+unix:///{}.{app}/root?socket={}", a.ns, root.join("a-nbd.sock").display());
    let health = async || {
        let s = a.vmrs.get(app).await.ok()?.status?;
        Some((s.state, s.health, s.health_details))
    };
    wait_secs(60, "replicating, health Normal", async || {
        health().await.filter(|(s, h, _)| *s == ReplicationState::Replicating && *h == Health::Normal)
    })
    .await;
    qemu_io(&export, "write -P 0x61 0 1M").unwrap();
    let replica_image = || {
        let found =
            Command::new("find").arg(&storage).args(["-name", "*.img", "-path", "*root*"]).output().unwrap();
        String::from_utf8_lossy(&found.stdout).lines().next().map(std::path::PathBuf::from)
    };
    wait_secs(30, "the write at the replica", async || {
        replica_image().filter(|p| qemu_io(p.to_str().unwrap(), "read -P 0x61 0 1M").is_ok())
    })
    .await;

    // Hour-long monitoring windows, one of which ends 90 to 150 s from now:
    // the partition and its heal come before that. Laid now, they also start
    // the window afresh (a new window start), so the cycles the partition
    // misses are most of it, whatever the machine's speed before.
    let start = k8s_openapi::jiff::Timestamp::now();
    let boundary = {
        let s = (start.as_second() + 150) / 60 * 60;
        k8s_openapi::jiff::Timestamp::from_second(s).unwrap()
    };
    let hhmm = boundary.strftime("%H:%M").to_string();
    let rs = json!({"apiVersion": "vmreplica.io/v1alpha1", "kind": "ReplicationServer",
        "metadata": {"name": a.ns}, "spec": {"nodeSelector": {a.label.clone(): "true"}, "port": a_repl,
        "allowAnyServer": false, "monitoringInterval": "1h", "monitoringStartTime": hhmm}});
    apply_object(&Api::<vmreplica_crds::ReplicationServer>::all(client().await), &rs).await;
    tokio::time::sleep(Duration::from_secs(3)).await; // two passes: the new window's baseline
    // The partition: writes go on at A, nothing reaches B.
    net.rule("-A", &["-j", "DROP"]);
    qemu_io(&export, "write -P 0x62 1M 1M").unwrap();
    let (_, _, details) = wait_secs(60, "health Critical during the partition", async || {
        health().await.filter(|(_, h, _)| *h == Health::Critical)
    })
    .await;
    eprintln!("partition: {details:?}");
    assert!(
        details.iter().any(|d| d.starts_with("No replication cycle has succeeded for")
            && d.contains("Check that the replica site's agent is running and reachable")),
        "{details:?}"
    );
    let image_b = replica_image().unwrap();
    assert!(
        qemu_io(image_b.to_str().unwrap(), "read -P 0x62 1M 1M").is_err(),
        "a write crossed the partition"
    );

    // Healed: B converges, Critical clears, Normal once the window ends.
    net.rule("-D", &["-j", "DROP"]);
    let healed = k8s_openapi::jiff::Timestamp::now();
    assert!(
        healed.as_second() + 10 < boundary.as_second(),
        "the partition outlasted the monitoring window laid for it ({healed} vs {boundary}): the machine is too slow"
    );
    wait_secs(60, "the partition's write at B", async || {
        qemu_io(image_b.to_str().unwrap(), "read -P 0x62 1M 1M").ok()
    })
    .await;
    assert!(identical(image.to_str().unwrap(), &image_b), "the sides differ after the heal");
    // The cycles the partition cost are in the window: Warning, saying so.
    let (_, _, details) = wait_secs(15, "Critical to clear after the heal", async || {
        health().await.filter(|(_, h, _)| *h != Health::Critical)
    })
    .await;
    eprintln!("healed: {details:?}");
    assert!(
        details.iter().any(|d| d.contains("replication cycles in this monitoring window were missed")),
        "{details:?}"
    );
    let wait = (boundary.as_second() - k8s_openapi::jiff::Timestamp::now().as_second()).max(0) as u64 + 30;
    wait_secs(wait, "health Normal again", async || {
        health()
            .await
            .filter(|(s, h, d)| *s == ReplicationState::Replicating && *h == Health::Normal && d.is_empty())
    })
    .await;
    eprintln!(
        "partition: healed at {healed}, Normal at {} (window ends {boundary})",
        k8s_openapi::jiff::Timestamp::now()
    );
}
