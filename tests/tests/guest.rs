//! A real guest end to end: Debian's kernel under qemu-system-x86_64 with its
//! disk on the agent's NBD export, an ext4 filesystem, a write-ahead log
//! fsynced record by record and checksummed files. After each failover the VM
//! boots again at site B from what vmreplica produced, and the guest itself
//! checks what it finds: the journal, `e2fsck -fn`, the WAL (an exact prefix:
//! no hole, no bad checksum) and the files.
//!
//! Site A is the shared apiserver, site B a second one (its own
//! ReplicationServer selects only its own agent), as in `two_sites.rs`.

mod common;

use std::{path::PathBuf, process::Command};

use common::{apply_object, controllers, primary_agent, state_is};
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use serde_json::json;
use vmreplica_controller::{replica_site, site, vmreplication};
use vmreplica_crds::{
    FailoverPhase, FailoverStatus, Health, RecoveryPoint, RecoveryPointKind, ReplicationState, VMReplication,
};
use vmreplica_tests::{
    ControlPlane, client, client_for,
    guest::{Guest, Kit, Verified, file_drive, last_ack, nbd_drive, serial_ports, verify},
    install_crds,
    pki::Ca,
    procs::{Process, bin, free_port, lease_args, material, wait_secs, write_tls},
    shared_kubeconfig, test_namespace,
};

const VM: &str = "ledger";

/// Two sites and a 64 MiB disk protected at A, replicated every second.
struct Sites {
    _dir: tempfile::TempDir,
    root: PathBuf,
    kit: Kit,
    a_ns: String,
    a: Api<VMReplication>,
    b: Api<VMReplication>,
    a_socket: PathBuf,
    b_socket: PathBuf,
    /// A's replica server, for replication reversed after a failover.
    a_repl: u16,
    _plane: ControlPlane,
    _agents: Vec<Process>,
}

async fn sites(prefix: &str) -> Sites {
    let kit = Kit::find();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    let ca = Ca::new(&format!("{prefix}-ca")).unwrap();
    write_tls(&root.join("a-tls"), &material(&ca, &["host1.site-a.example.com", "127.0.0.1"]));
    write_tls(&root.join("b-tls"), &material(&ca, &["replica.site-b.example.com", "127.0.0.1"]));

    // Site B: its own apiserver, agent (both roles: it serves the VM after a failover).
    let plane = ControlPlane::start().await.unwrap();
    let b = client_for(&plane.kubeconfig_path()).await.unwrap();
    install_crds(&b).await.unwrap();
    let b_ns = test_namespace(&b, &format!("{prefix}-b")).await;
    let (b_repl, b_ctl) = (free_port(), free_port());
    let b_socket = root.join("b-nbd.sock");
    let mut cmd = Command::new(bin("vmreplica-agent"));
    cmd.args(["serve", "--listen", &format!("127.0.0.1:{b_repl}"), "--control-listen"])
        .arg(format!("127.0.0.1:{b_ctl}"))
        .arg("--socket")
        .arg(&b_socket)
        .arg("--tls-dir")
        .arg(root.join("b-tls"))
        .args(["--resolve", "host1.site-a.example.com=127.0.0.1", "--retry-seconds", "1"])
        .args(["--node-label", "vmreplica.io/site=b"])
        .args(lease_args(&b_ns, "node-b", &plane.kubeconfig_path()));
    let b_agent = Process::spawn_ready(cmd, &root.join("b-agent.log"));
    let storage = root.join("b-replicas");
    std::fs::create_dir_all(&storage).unwrap();
    apply_object(
        &Api::<vmreplica_crds::ReplicationServer>::all(b.clone()),
        &json!({"apiVersion": "vmreplica.io/v1alpha1", "kind": "ReplicationServer", "metadata": {"name": "site-b"},
               "spec": {"nodeSelector": {"vmreplica.io/site": "b"}, "port": b_repl}}),
    )
    .await;
    apply_object(
        &Api::<vmreplica_crds::AuthorizationEntry>::all(b.clone()),
        &json!({"apiVersion": "vmreplica.io/v1alpha1", "kind": "AuthorizationEntry", "metadata": {"name": "site-a"},
               "spec": {"allowedPrimaryServer": "*.site-a.example.com", "replicaStorageLocation": storage,
                        "trustGroup": "guests", "replicaNamespace": b_ns}}),
    )
    .await;
    let b_ctx = controllers(b.clone(), &b_ns, &ca, None);
    tokio::spawn(site::run(b_ctx.site.clone(), std::future::pending()));
    tokio::spawn(vmreplication::run(b_ctx.clone(), std::future::pending()));
    tokio::spawn(replica_site::run(b_ctx, std::future::pending()));

    // Site A: the shared apiserver; a replica server too, for B, so that
    // replication can reverse and the VM fail back.
    let a = client().await;
    let a_ns = test_namespace(&a, &format!("{prefix}-a")).await;
    let a_socket = root.join("a-nbd.sock");
    let a_repl = free_port();
    let label = format!("vmreplica.io/guest-test-{}", &a_ns[a_ns.len().saturating_sub(8)..]);
    let (listen, node_label) = (format!("127.0.0.1:{a_repl}"), format!("{label}=true"));
    let a_agent = primary_agent(
        &root,
        "a-tls",
        &a_socket,
        &a_ns,
        "node-a",
        &shared_kubeconfig(),
        &["--listen", &listen, "--node-label", &node_label],
    );
    let a_storage = root.join("a-replicas");
    std::fs::create_dir_all(&a_storage).unwrap();
    apply_object(
        &Api::<vmreplica_crds::ReplicationServer>::all(a.clone()),
        &json!({"apiVersion": "vmreplica.io/v1alpha1", "kind": "ReplicationServer", "metadata": {"name": a_ns},
               "spec": {"nodeSelector": {label: "true"}, "port": a_repl}}),
    )
    .await;
    apply_object(
        &Api::<vmreplica_crds::AuthorizationEntry>::all(a.clone()),
        &json!({"apiVersion": "vmreplica.io/v1alpha1", "kind": "AuthorizationEntry", "metadata": {"name": a_ns},
               "spec": {"allowedPrimaryServer": "replica.site-b.example.com", "replicaStorageLocation": a_storage,
                        "trustGroup": "guests", "replicaNamespace": a_ns}}),
    )
    .await;
    let a_ctx = controllers(a.clone(), &a_ns, &ca, Some(a_ns.clone()));
    tokio::spawn(site::run(a_ctx.site.clone(), std::future::pending()));
    tokio::spawn(vmreplication::run(a_ctx.clone(), std::future::pending()));
    tokio::spawn(replica_site::run(a_ctx, std::future::pending()));

    let disk = root.join("disks").join("ledger-root.img");
    assert!(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "raw"])
            .arg(&disk)
            .arg("64M")
            .status()
            .unwrap()
            .success()
    );
    let a_vmrs: Api<VMReplication> = Api::namespaced(a, &a_ns);
    let b_vmrs: Api<VMReplication> = Api::namespaced(b, &b_ns);
    apply_object(
        &a_vmrs,
        &json!({"apiVersion": "vmreplica.io/v1alpha1", "kind": "VMReplication", "metadata": {"name": VM},
               "spec": {"disks": [{"name": "root", "path": disk}], "replicationFrequencySeconds": 1,
                        "replicaServer": {"name": "replica.site-b.example.com", "port": b_repl}}}),
    )
    .await;
    for (api, site) in [(&a_vmrs, "A"), (&b_vmrs, "B")] {
        wait_secs(90, &format!("{site} to replicate"), async || {
            state_is(api, VM, ReplicationState::Replicating).await
        })
        .await;
    }
    Sites {
        _dir: dir,
        root,
        kit,
        a_ns,
        a: a_vmrs,
        b: b_vmrs,
        a_socket,
        b_socket,
        a_repl,
        _plane: plane,
        _agents: vec![b_agent, a_agent],
    }
}

async fn failover_in(api: &Api<VMReplication>, id: &str, phase: FailoverPhase) -> FailoverStatus {
    wait_secs(90, &format!("failover {id} to reach {phase:?}"), async || {
        api.get(VM).await.ok()?.status?.last_failover.filter(|l| l.id == id && l.phase == phase)
    })
    .await
}

impl Sites {
    /// The VM's disk as A's agent serves it.
    fn at_a(&self) -> String {
        nbd_drive(&self.a_socket, &format!("{}.{VM}/root", self.a_ns))
    }

    /// The VM's disk as B's agent serves it after a failover.
    fn at_b(&self) -> String {
        nbd_drive(&self.b_socket, &format!("{}.{VM}/root", self.a_ns))
    }

    fn log(&self, name: &str) -> PathBuf {
        self.root.join(format!("{name}.console"))
    }

    /// Boots `workload` and waits for it to finish (the guest powers off).
    fn run(&self, drive: &str, workload: &str, args: &[&str], log: &str) -> Guest {
        let mut g = Guest::boot(&self.kit, drive, workload, args, &[], &self.log(log));
        tokio::task::block_in_place(|| g.wait_done(300));
        g
    }

    fn verify(&self, drive: &str, log: &str) -> Verified {
        tokio::task::block_in_place(|| verify(&self.kit, drive, &self.log(log)))
    }

    /// Asks for a failover on the Replica object at B.
    async fn at_b_request(&self, failover: serde_json::Value) {
        let disks = self.b.get(VM).await.unwrap().spec.disks;
        let spec = if failover.is_null() {
            json!({"role": "Replica", "disks": disks})
        } else {
            json!({"role": "Replica", "disks": disks, "failover": failover})
        };
        let obj = json!({"apiVersion": "vmreplica.io/v1alpha1", "kind": "VMReplication", "metadata": {"name": VM}, "spec": spec});
        self.b.patch(VM, &PatchParams::apply("dr-operator").force(), &Patch::Apply(obj)).await.unwrap();
    }
}

/// Planned failover: the VM stops at A with every write shipped; at B it boots
/// with every acknowledged WAL record and every file, and a clean filesystem.
/// Replication reverses to A's own disks; the VM writes at B, fails back, and
/// boots at A with B's writes too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_planned_failover_the_vm_boots_at_b_and_back_at_a_with_every_acknowledged_write() {
    let s = sites("guest-planned").await;
    s.run(&s.at_a(), "mkfs", &[], "mkfs");
    let writer = s.run(&s.at_a(), "write", &["records=30", "files=6"], "write-a");
    assert_eq!(last_ack(&writer), 30, "{}", writer.output());

    let at_a = async |failover: serde_json::Value| {
        let mut vm = s.a.get(VM).await.unwrap();
        vm.metadata.managed_fields = None;
        let obj = json!({"apiVersion": "vmreplica.io/v1alpha1", "kind": "VMReplication", "metadata": {"name": VM},
            "spec": {"disks": vm.spec.disks, "replicationFrequencySeconds": 1, "replicaServer": vm.spec.replica_server,
                     "failover": failover}});
        apply_object(&s.a, &obj).await;
    };
    at_a(json!({"id": "move", "type": "Planned"})).await;
    failover_in(&s.a, "move", FailoverPhase::Completed).await;
    let reverse_to = json!({"name": "host1.site-a.example.com", "port": s.a_repl});
    s.at_b_request(json!({"id": "move", "type": "Planned", "reverseReplication": true, "reverseReplicaServer": reverse_to}))
        .await;
    let l = failover_in(&s.b, "move", FailoverPhase::Completed).await;
    assert_eq!(l.data_loss_window_seconds, Some(0), "{l:?}");

    let seen = s.verify(&s.at_b(), "verify-b");
    let want = Verified {
        needed_recovery: false,
        fsck: 0,
        wal_last: 30,
        wal_bad: 0,
        wal_holes: 0,
        files_ok: 6,
        files_listed: 6,
    };
    assert_eq!(seen, want, "what the guest found at B");

    // The VM runs at B, replicating back to A; then it fails back.
    let writer = s.run(&s.at_b(), "write", &["records=10", "files=2"], "write-b");
    assert_eq!(last_ack(&writer), 40, "{}", writer.output());
    s.at_b_request(json!({"id": "back", "type": "Planned"})).await;
    failover_in(&s.b, "back", FailoverPhase::Completed).await;
    at_a(json!({"id": "back", "type": "Planned", "reverseReplication": true})).await;
    let l = failover_in(&s.a, "back", FailoverPhase::Completed).await;
    assert!(l.took_over, "{l:?}");
    let back = s.verify(&s.at_a(), "verify-back-at-a");
    assert_eq!(
        back,
        Verified { wal_last: 40, files_ok: 8, files_listed: 8, ..want },
        "what the guest found back at A"
    );
}

/// A test failover boots a copy while the VM at A keeps writing; after the
/// VM crashes, an unplanned failover to the latest point and then to an older
/// one each boot: the filesystem recovers by its own journal and the WAL is
/// an exact prefix, holding (at the latest point) every acknowledged record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_each_recovery_point_boots_crash_consistent() {
    let s = sites("guest-unplanned").await;
    s.run(&s.at_a(), "mkfs", &[], "mkfs");
    let mut writer =
        Guest::boot(&s.kit, &s.at_a(), "write", &["records=0", "files=4"], &[], &s.log("write-a"));
    tokio::task::block_in_place(|| writer.wait_report("ACK 10", 240));
    let newest_point = async || s.b.get(VM).await.ok()?.status?.recovery_points.first().map(|p| p.id.clone());
    let older = wait_secs(30, "a recovery point at B", async || newest_point().await).await;

    // Test failover while A writes on: the test copy boots; replication goes on.
    s.at_b_request(json!({"id": "drill", "type": "Test"})).await;
    failover_in(&s.b, "drill", FailoverPhase::Completed).await;
    let replica_dir =
        PathBuf::from(&s.b.get(VM).await.unwrap().spec.disks[0].path).parent().unwrap().to_owned();
    let test_copy = replica_dir.join("materialized").join(format!("{VM}-test.img"));
    let acked_before = last_ack(&writer);
    let drill = s.verify(&file_drive(&test_copy), "verify-test");
    assert_eq!((drill.fsck, drill.wal_bad, drill.wal_holes), (0, 0, 0), "the test copy: {drill:?}");
    assert!(drill.wal_last >= 1);
    assert!(last_ack(&writer) > acked_before, "the VM at A kept writing during the test failover");
    let during = newest_point().await;
    wait_secs(30, "replication to go on after the test failover", async || {
        newest_point().await.filter(|p| Some(p) != during.as_ref())
    })
    .await;
    s.at_b_request(serde_json::Value::Null).await;
    failover_in(&s.b, "drill", FailoverPhase::Cancelled).await;

    // The VM crashes mid-write; a cycle after the crash leaves nothing
    // pending at A: every acknowledged write is in a point at B.
    writer.crash();
    let acked = last_ack(&writer);
    let crashed_ms = k8s_openapi::jiff::Timestamp::now().as_millisecond();
    wait_secs(60, "A to replicate everything after the crash", async || {
        let st = s.a.get(VM).await.ok()?.status?;
        let after = st.last_replication_time?.0.as_millisecond() > crashed_ms + 1000;
        (after && st.pending_replication_bytes == 0).then_some(())
    })
    .await;

    s.at_b_request(json!({"id": "lost-a", "type": "Unplanned", "force": true})).await;
    failover_in(&s.b, "lost-a", FailoverPhase::WaitingCompletion).await;
    let latest = s.verify(&s.at_b(), "verify-latest");
    assert!(latest.needed_recovery, "a crash leaves the journal to replay: {latest:?}");
    assert_eq!((latest.fsck, latest.wal_bad, latest.wal_holes), (0, 0, 0), "{latest:?}");
    assert!(latest.wal_last >= acked, "every acknowledged record ({acked}) is there: {latest:?}");
    assert!(latest.files_ok == latest.files_listed && latest.files_listed >= 1, "{latest:?}");

    // Cancel, and fail over to an older point: an earlier prefix.
    s.at_b_request(serde_json::Value::Null).await;
    failover_in(&s.b, "lost-a", FailoverPhase::Cancelled).await;
    s.at_b_request(json!({"id": "lost-b", "type": "Unplanned", "force": true, "recoveryPoint": older})).await;
    failover_in(&s.b, "lost-b", FailoverPhase::WaitingCompletion).await;
    let earlier = s.verify(&s.at_b(), "verify-older");
    assert_eq!((earlier.fsck, earlier.wal_bad, earlier.wal_holes), (0, 0, 0), "{earlier:?}");
    assert!(
        earlier.wal_last < latest.wal_last,
        "the older point is an earlier prefix: {earlier:?} vs {latest:?}"
    );
    assert_eq!(earlier.files_ok, earlier.files_listed, "{earlier:?}");
}

/// Application-consistent points through the guest's own qemu-ga. First the
/// VMReplication names a channel nobody in the guest answers: the point is
/// crash-consistent, A says why (a health detail and an Event), cycles go on
/// and the guest keeps writing. Then it names the guest agent's channel: the
/// next point is cut with the filesystem frozen inside the guest, and a test
/// failover to it finds a journal that needs no recovery, while one to the
/// crash-consistent point just before it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_consistent_points_come_from_the_guests_own_agent() {
    let s = sites("guest-quiesce").await;
    s.run(&s.at_a(), "mkfs", &[], "mkfs");
    let (qga, silent) = (s.root.join("qga.sock"), s.root.join("silent.sock"));
    let ports = serial_ports(&[(&qga, "org.qemu.guest_agent.0"), (&silent, "org.example.nobody.0")]);
    let ports: Vec<&str> = ports.iter().map(String::as_str).collect();
    let mut writer =
        Guest::boot(&s.kit, &s.at_a(), "write", &["records=0", "qga=1"], &ports, &s.log("write-a"));
    tokio::task::block_in_place(|| writer.wait_report("ACK 5", 240));
    let points = async || s.b.get(VM).await.ok()?.status.map(|st| st.recovery_points);
    let newest = async || points().await?.first().map(|p| p.id.clone());

    // A channel nobody answers: bounded, crash-consistent, said.
    let quiesced_by = async |socket: &std::path::Path| {
        let mut vm = s.a.get(VM).await.unwrap();
        vm.metadata.managed_fields = None;
        let obj = json!({"apiVersion": "vmreplica.io/v1alpha1", "kind": "VMReplication", "metadata": {"name": VM},
            "spec": {"disks": vm.spec.disks, "replicationFrequencySeconds": 1, "replicaServer": vm.spec.replica_server,
                     "recoveryHistory": {"appConsistentIntervalHours": 1, "quiesce": {"guestAgentSocket": socket}}}});
        apply_object(&s.a, &obj).await;
    };
    quiesced_by(&silent).await;
    let detail = wait_secs(60, "A to say the guest could not be quiesced", async || {
        let st = s.a.get(VM).await.ok()?.status?;
        let d = st.health_details.iter().find(|d| d.contains("could not be quiesced"))?.clone();
        (st.health == Health::Warning).then_some(d)
    })
    .await;
    assert!(detail.contains("guest-sync within 5s") && detail.contains("crash-consistent"), "{detail}");
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client().await, &s.a_ns);
    wait_secs(30, "the QuiesceFailed Event", async || {
        let list = events.list(&Default::default()).await.ok()?;
        list.items.iter().any(|e| e.reason.as_deref() == Some("QuiesceFailed")).then_some(())
    })
    .await;
    let (acked, seen) = (last_ack(&writer), newest().await);
    wait_secs(20, "cycles to go on after the failed quiesce", async || {
        newest().await.filter(|p| Some(p) != seen.as_ref())
    })
    .await;
    tokio::task::block_in_place(|| writer.wait_report(&format!("ACK {}", acked + 3), 60));
    let kinds: Vec<RecoveryPointKind> = points().await.unwrap().iter().map(|p| p.kind).collect();
    assert!(!kinds.contains(&RecoveryPointKind::ApplicationConsistent), "{kinds:?}");

    // The guest agent's channel: a frozen cut, and the guest goes on.
    quiesced_by(&qga).await;
    let (app, crash) = wait_secs(90, "an application-consistent point at B", async || {
        let list: Vec<RecoveryPoint> = points().await?;
        let i = list.iter().position(|p| p.kind == RecoveryPointKind::ApplicationConsistent)?;
        let older = list[i + 1..].iter().find(|p| p.kind == RecoveryPointKind::Standard)?;
        Some((list[i].id.clone(), older.id.clone()))
    })
    .await;
    wait_secs(30, "A's warning to clear", async || {
        (s.a.get(VM).await.ok()?.status?.health == Health::Normal).then_some(())
    })
    .await;
    let acked = last_ack(&writer);
    tokio::task::block_in_place(|| writer.wait_report(&format!("ACK {}", acked + 3), 60));

    let replica_dir =
        PathBuf::from(&s.b.get(VM).await.unwrap().spec.disks[0].path).parent().unwrap().to_owned();
    let test_copy = file_drive(&replica_dir.join("materialized").join(format!("{VM}-test.img")));
    let mut seen = Vec::new();
    for (id, point) in [("frozen", &app), ("crashed", &crash)] {
        s.at_b_request(json!({"id": id, "type": "Test", "recoveryPoint": point})).await;
        failover_in(&s.b, id, FailoverPhase::Completed).await;
        seen.push(s.verify(&test_copy, &format!("verify-{id}")));
        s.at_b_request(serde_json::Value::Null).await;
        failover_in(&s.b, id, FailoverPhase::Cancelled).await;
    }
    let (frozen, crashed) = (&seen[0], &seen[1]);
    assert!(!frozen.needed_recovery, "the quiesced point mounts without journal recovery: {frozen:?}");
    assert!(crashed.needed_recovery, "the crash-consistent point needs it: {crashed:?}");
    for v in &seen {
        assert_eq!((v.fsck, v.wal_bad, v.wal_holes), (0, 0, 0), "{v:?}");
    }
    assert!(crashed.wal_last <= frozen.wal_last, "{crashed:?} then {frozen:?}");
}
