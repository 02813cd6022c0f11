//! VMReplication end to end on one apiserver: the controller asks a real
//! primary agent to protect a VM's disk and replicate it to a real replica
//! agent; status, conditions and Events follow; writes made with qemu-io
//! arrive at the replica; suspend, resume and delete do what they say; a bad
//! spec gives Error with a reason to act on, and changes nothing else.

use std::{path::Path, process::Command, sync::Arc, time::Duration};

use k8s_openapi::api::events::v1::Event;
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams},
};
use serde_json::json;
use vmreplica_api::control::{GetStatusRequest, control_client::ControlClient};
use vmreplica_controller::{context, telemetry::Metrics, vmreplication};
use vmreplica_crds::{Health, ReplicationState, VMReplication};
use vmreplica_tests::{
    FIELD_MANAGER, client,
    pki::Ca,
    procs::{Process, bin, free_port, lease_args, live, material, wait_secs, write_tls},
    shared_kubeconfig, test_namespace,
};

fn qemu_io(target: &str, cmd: &str) -> Result<String, String> {
    let out = Command::new("qemu-io").args(["-f", "raw", "-c", cmd, target]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if out.status.success() && !text.contains("Pattern verification failed") && !text.contains("failed") {
        Ok(text)
    } else {
        Err(text)
    }
}

fn qemu_img_create(path: &Path, size: &str) {
    let ok =
        Command::new("qemu-img").args(["create", "-q", "-f", "raw"]).arg(path).arg(size).status().unwrap();
    assert!(ok.success());
}

fn state_of(v: &VMReplication) -> Option<ReplicationState> {
    v.status.as_ref().map(|s| s.state)
}

fn condition<'a>(
    v: &'a VMReplication,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    v.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)
}

async fn events_for(client: &kube::Client, ns: &str, name: &str) -> Vec<Event> {
    Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .collect()
}

/// Waits for Events with these reasons about `name` (they follow the status write).
async fn has_events(s: &Site, name: &str, reasons: &[&str]) {
    wait_secs(10, &format!("events {reasons:?} for {name}"), async || {
        let seen: Vec<String> =
            events_for(&s.client, &s.ns, name).await.into_iter().filter_map(|e| e.reason).collect();
        reasons.iter().all(|r| seen.iter().any(|x| x == r)).then_some(())
    })
    .await;
}

struct Site {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    ns: String,
    client: kube::Client,
    vmrs: Api<VMReplication>,
    replica_storage: std::path::PathBuf,
    denied_storage: std::path::PathBuf,
    socket: std::path::PathBuf,
    primary: Process,
    primary_control: u16,
    replica_port: u16,
    denied_port: u16,
    ca: Ca,
    metrics: Arc<Metrics>,
    base: Arc<context::Shared>,
    controller: tokio::task::JoinHandle<()>,
    replicas: Vec<Process>,
    primary_name: String,
    /// How the primary's agent was started, to start it again.
    primary_args: Vec<std::ffi::OsString>,
}

async fn site() -> Site {
    site_with(&[]).await
}

/// [`site`] with extra arguments for the primary agent.
async fn site_with(primary_args: &[&str]) -> Site {
    site_polling(primary_args, Duration::from_secs(2)).await
}

/// [`site_with`], its controller reading steady VMs every `poll`.
async fn site_polling(primary_args: &[&str], poll: Duration) -> Site {
    let client = client().await;
    let ns = test_namespace(&client, "vmr").await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    let ca = Ca::new("vmr-ca").unwrap();
    let primary_name = format!("primary.{ns}.example.com");
    write_tls(&root.join("primary-tls"), &material(&ca, &[&primary_name, "127.0.0.1"]));
    write_tls(&root.join("replica-tls"), &material(&ca, &[&format!("replica.{ns}.test"), "127.0.0.1"]));
    write_tls(&root.join("denied-tls"), &material(&ca, &[&format!("denied.{ns}.test"), "127.0.0.1"]));
    let (replica_storage, denied_storage) = (root.join("replicas"), root.join("denied"));
    std::fs::create_dir_all(&replica_storage).unwrap();
    std::fs::create_dir_all(&denied_storage).unwrap();
    std::fs::create_dir_all(root.join("disks")).unwrap();

    // The replica site's server authorises this primary; a second server
    // authorises somebody else only.
    let (replica_port, denied_port) = (free_port(), free_port());
    let replicas = vec![
        receiver(&root, "replica-tls", replica_port, &primary_name, &replica_storage),
        receiver(&root, "denied-tls", denied_port, "someone-else.example.com", &denied_storage),
    ];
    let primary_control = free_port();
    let socket = root.join("nbd.sock");
    let mut cmd = Command::new(bin("vmreplica-agent"));
    cmd.args(["serve", "--control-listen", &format!("127.0.0.1:{primary_control}"), "--tls-dir"])
        .arg(root.join("primary-tls"))
        .arg("--socket")
        .arg(&socket)
        .arg("--disk-root")
        .arg(root.join("disks"))
        .args(["--resolve", &format!("replica.{ns}.test=127.0.0.1")])
        .args(["--resolve", &format!("denied.{ns}.test=127.0.0.1")])
        .args(["--retry-seconds", "1", "--allow-quiesce-commands"])
        .args(primary_args)
        .args(lease_args(&ns, "node-a", &shared_kubeconfig()));
    let primary_args = cmd.get_args().map(|a| a.to_owned()).collect();
    let primary = Process::spawn_ready(cmd, &root.join("primary.log"));

    let metrics = Metrics::new();
    let base = Arc::new(context::Shared {
        client: client.clone(),
        agents_namespace: ns.clone(),
        tls: live(&ca, &["vmreplica-controller"]),
        now: k8s_openapi::jiff::Timestamp::now,
        metrics: metrics.clone(),
    });
    let ctx = context::Context::new(base.clone(), poll, Some(ns.clone()));
    let controller = tokio::spawn(vmreplication::run(ctx, std::future::pending()));
    let vmrs = Api::namespaced(client.clone(), &ns);
    Site {
        _dir: dir,
        root,
        ns,
        client,
        vmrs,
        replica_storage,
        denied_storage,
        socket,
        primary,
        primary_control,
        replica_port,
        denied_port,
        ca,
        metrics,
        base,
        controller,
        replicas,
        primary_name,
        primary_args,
    }
}

impl Site {
    async fn apply(&self, name: &str, spec: serde_json::Value) {
        let obj = json!({
            "apiVersion": "vmreplica.io/v1alpha1", "kind": "VMReplication",
            "metadata": {"name": name}, "spec": spec,
        });
        self.vmrs.patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(obj)).await.unwrap();
    }

    async fn wait_state(&self, name: &str, want: ReplicationState, secs: u64) -> VMReplication {
        wait_secs(secs, &format!("{name} to reach {want:?}"), async || {
            let v = self.vmrs.get(name).await.ok()?;
            (state_of(&v) == Some(want)).then_some(v)
        })
        .await
    }

    async fn agent_status(&self) -> vmreplica_api::control::AgentStatus {
        let tls = live(&self.ca, &["vmreplica-controller"]);
        let ch =
            vmreplica_api::tls::channel(&format!("127.0.0.1:{}", self.primary_control), "127.0.0.1", &tls)
                .unwrap();
        ControlClient::new(ch).get_status(GetStatusRequest {}).await.unwrap().into_inner()
    }

    /// The NBD URI of VM `name`'s disk `root` on the primary's export.
    fn export(&self, name: &str) -> String {
        format!("nbd+unix:///{}.{name}/root?socket={}", self.ns, self.socket.display())
    }

    /// Where the replica agent keeps VM `name`'s disk `root`.
    fn replica_image(&self, name: &str) -> std::path::PathBuf {
        self.replica_storage.join(format!("{}.{name}", self.ns)).join("root").join("disk.img")
    }

    /// A new disk of `size` (qemu-img's notation) for VM `name`, replicated
    /// to the authorising server with the default spec: once Replicating,
    /// its image and its export.
    async fn replicating(&self, name: &str, size: &str) -> (std::path::PathBuf, String) {
        let disk = self.root.join("disks").join(format!("{name}.img"));
        qemu_img_create(&disk, size);
        self.apply(name, self.spec(&disk, "replica", self.replica_port)).await;
        self.wait_state(name, ReplicationState::Replicating, 60).await;
        (disk, self.export(name))
    }

    fn spec(&self, disk: &Path, server: &str, port: u16) -> serde_json::Value {
        json!({
            "role": "Primary",
            "disks": [{"name": "root", "path": disk}],
            "replicaServer": {"name": format!("{server}.{}.test", self.ns), "port": port},
            "replicationFrequencySeconds": 1,
        })
    }
}

/// A replica site's server (`receive`) authorising `pattern` into `storage`.
fn receiver(root: &Path, tls: &str, port: u16, pattern: &str, storage: &Path) -> Process {
    let mut cmd = Command::new(bin("vmreplica-agent"));
    cmd.args(["receive", "--listen", &format!("127.0.0.1:{port}"), "--tls-dir"]).arg(root.join(tls));
    cmd.arg("--authorize").arg(format!("pattern={pattern},storage={},trust-group=g1", storage.display()));
    Process::spawn_ready(cmd, &root.join(format!("{tls}.log")))
}

/// `spec` with `key` set to `value`.
fn with(mut spec: serde_json::Value, key: &str, value: serde_json::Value) -> serde_json::Value {
    spec[key] = value;
    spec
}

/// Files under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().is_dir() {
            out.extend(files_under(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_replicates_suspends_resumes_and_is_removed() {
    let s = site().await;
    let disk = s.root.join("disks").join("db-root.img");
    qemu_img_create(&disk, "16M");
    qemu_io(disk.to_str().unwrap(), "write -P 0x11 0 1M").unwrap();
    // Application-consistent points every hour, quiescing with commands: the
    // first cycle takes one.
    let (frozen, thawed) = (s.root.join("frozen"), s.root.join("thawed"));
    let touch = |f: &Path| json!(["sh", "-c", format!("touch {}", f.display())]);
    let history = json!({"appConsistentIntervalHours": 1,
                         "quiesce": {"freezeCommand": touch(&frozen), "thawCommand": touch(&thawed)}});
    s.apply("db", with(s.spec(&disk, "replica", s.replica_port), "recoveryHistory", history.clone())).await;

    let v = s.wait_state("db", ReplicationState::Replicating, 60).await;
    assert!(frozen.exists() && thawed.exists(), "the spec's quiesce commands ran on the node");
    assert!(v.finalizers().iter().any(|f| f == vmreplication::FINALIZER), "the finalizer guards removal");
    let st = v.status.clone().unwrap();
    assert_eq!(st.health, Health::Normal, "{:?}", st.health_details);
    assert_eq!(st.observed_generation, v.metadata.generation);
    assert_eq!(st.replica_server.as_deref(), Some(format!("replica.{}.test", s.ns).as_str()));
    assert!(st.last_replication_time.is_some());
    assert!(st.statistics.as_ref().is_some_and(|x| x.successful_cycles >= 1), "{:?}", st.statistics);
    assert_eq!(condition(&v, "Ready").unwrap().status, "True");
    assert_eq!(condition(&v, "Replicating").unwrap().status, "True");
    assert_eq!(condition(&v, "Degraded").unwrap().status, "False");
    has_events(&s, "db", &["Replicating"]).await;

    // The initial copy and a write through the NBD export reach the replica.
    let replica_img = s.replica_image("db");
    let export = s.export("db");
    qemu_io(&export, "write -P 0x5a 4M 64k").unwrap();
    wait_secs(30, "the write to reach the replica", async || {
        qemu_io(replica_img.to_str()?, "read -P 0x5a 4M 64k").ok()
    })
    .await;
    qemu_io(replica_img.to_str().unwrap(), "read -P 0x11 0 1M").expect("the initial copy arrived");

    // Suspend: writes are logged, not shipped; the state says so.
    let mut spec = with(s.spec(&disk, "replica", s.replica_port), "recoveryHistory", history);
    spec["suspended"] = json!(true);
    s.apply("db", spec.clone()).await;
    let v = s.wait_state("db", ReplicationState::Suspended, 30).await;
    assert_eq!(
        v.status.as_ref().unwrap().health,
        Health::Warning,
        "Hyper-V reports paused replication as Warning"
    );
    qemu_io(&export, "write -P 0x6b 5M 64k").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        qemu_io(replica_img.to_str().unwrap(), "read -P 0x6b 5M 64k").is_err(),
        "nothing shipped while suspended"
    );
    let pending = s.agent_status().await.primaries.iter().map(|p| p.pending_bytes).sum::<u64>();
    assert!(pending >= 64 << 10, "the write waits in the log: {pending} bytes pending");

    // Resume: it catches up.
    spec["suspended"] = json!(false);
    s.apply("db", spec).await;
    s.wait_state("db", ReplicationState::Replicating, 30).await;
    wait_secs(30, "the suspended write to arrive after resume", async || {
        qemu_io(replica_img.to_str()?, "read -P 0x6b 5M 64k").ok()
    })
    .await;

    // Metrics name the VM's state.
    let body = s.metrics.render();
    let series = format!(
        "vmreplica_controller_vm_state{{health=\"Normal\",state=\"Replicating\",vm=\"{}.db\"}} 1",
        s.ns
    );
    wait_secs(10, "the Replicating series", async || s.metrics.render().contains(&series).then_some(()))
        .await;
    assert!(body.contains("vmreplica_controller_reconciles_total{kind=\"VMReplication\"}"), "{body}");

    // Delete: the agent forgets the VM and its log, the finalizer goes, the
    // replica's disk stays.
    let log_dir = log_dir_for(&disk.canonicalize().unwrap());
    assert!(log_dir.exists());
    s.vmrs.delete("db", &DeleteParams::default()).await.unwrap();
    wait_secs(30, "the object to go", async || s.vmrs.get_opt("db").await.unwrap().is_none().then_some(()))
        .await;
    let status = s.agent_status().await;
    assert!(status.vms.is_empty() && status.primaries.is_empty(), "{status:?}");
    assert!(!log_dir.exists(), "the log is removed with the replication");
    assert!(disk.exists() && replica_img.exists(), "images stay on both sides");
    assert!(qemu_io(&export, "read 0 512").is_err(), "the export is gone");
    drop(s.primary);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_spec_gives_error_with_what_to_fix_and_changes_nothing() {
    let s = site().await;
    let disk = s.root.join("disks").join("good.img");
    qemu_img_create(&disk, "4M");
    let outside = s.root.join("elsewhere.img");
    qemu_img_create(&outside, "4M");

    // Each bad spec: its state, the Ready reason, and words from the message.
    let cases = [
        ("outside", s.spec(&outside, "replica", s.replica_port), "AgentRefused", "outside the directories"),
        ("unknown", s.spec(&disk, "nowhere", s.replica_port), "AgentRefused", "does not resolve"),
        ("denied", s.spec(&disk, "denied", s.denied_port), "ReplicaRefused", "no AuthorizationEntry matches"),
        (
            "media",
            with(
                s.spec(&disk, "replica", s.replica_port),
                "initialReplication",
                json!({"method": "ExternalMedia"}),
            ),
            "InvalidSpec",
            "needs initialReplication.directory",
        ),
    ];
    for (name, spec, reason, words) in cases {
        s.apply(name, spec).await;
        let v = s.wait_state(name, ReplicationState::Error, 60).await;
        let ready = condition(&v, "Ready").unwrap();
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", reason), "{name}: {ready:?}");
        assert!(ready.message.contains(words), "{name}: {}", ready.message);
        let st = v.status.as_ref().unwrap();
        assert_eq!(st.health, Health::Critical, "{name}");
        assert!(!st.health_details.is_empty());
        wait_secs(10, &format!("{name}: a Warning Event saying {words:?}"), async || {
            let events = events_for(&s.client, &s.ns, name).await;
            events
                .iter()
                .any(|e| {
                    e.reason.as_deref() == Some("Error")
                        && e.type_.as_deref() == Some("Warning")
                        && e.note.as_deref().is_some_and(|n| n.contains(words))
                })
                .then_some(())
        })
        .await;
        s.vmrs.delete(name, &DeleteParams::default()).await.unwrap();
        wait_secs(30, "the object to go", async || {
            s.vmrs.get_opt(name).await.unwrap().is_none().then_some(())
        })
        .await;
    }
    // A scheduled initial replication waits for its time, writing nothing.
    let later =
        (k8s_openapi::jiff::Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_hours(1)).to_string();
    s.apply(
        "later",
        with(s.spec(&disk, "replica", s.replica_port), "initialReplication", json!({"startTime": later})),
    )
    .await;
    s.wait_state("later", ReplicationState::ReadyForInitialReplication, 30).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let v = s.vmrs.get("later").await.unwrap();
    assert_eq!(state_of(&v), Some(ReplicationState::ReadyForInitialReplication));
    assert_eq!(v.status.unwrap().health, Health::Normal);
    assert!(files_under(&s.replica_storage).is_empty(), "nothing sent before the start time");
    s.vmrs.delete("later", &DeleteParams::default()).await.unwrap();
    wait_secs(30, "later to go", async || s.vmrs.get_opt("later").await.unwrap().is_none().then_some(()))
        .await;

    // Nothing else changed: no replica written on the refusing server, no log
    // next to the image outside the roots, nothing left protected.
    assert!(files_under(&s.denied_storage).is_empty(), "{:?}", files_under(&s.denied_storage));
    assert!(!log_dir_for(&outside).exists());
    let status = s.agent_status().await;
    assert!(status.vms.is_empty(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_replica_agent_down_and_back() {
    let mut s = site().await;
    let disk = s.root.join("disks").join("web.img");
    qemu_img_create(&disk, "4M");
    s.apply("web", s.spec(&disk, "replica", s.replica_port)).await;
    s.wait_state("web", ReplicationState::Replicating, 60).await;
    // A few good cycles first.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let health = |v: &VMReplication| v.status.as_ref().map(|st| (st.health, st.health_details.join(" ")));
    assert_eq!(health(&s.vmrs.get("web").await.unwrap()).unwrap().0, Health::Normal);

    // kill -9 the replica site's agent: cycles are missed (Warning), and after
    // ten intervals without success replication is in error (Critical).
    s.replicas[0].kill();
    let (_, why) = wait_secs(60, "Warning", async || {
        health(&s.vmrs.get("web").await.ok()?).filter(|(h, _)| *h == Health::Warning)
    })
    .await;
    assert!(why.contains("replication cycles in this monitoring window were missed"), "{why}");
    let (_, why) = wait_secs(60, "Critical", async || {
        health(&s.vmrs.get("web").await.ok()?).filter(|(h, _)| *h == Health::Critical)
    })
    .await;
    assert!(
        why.contains("No replication cycle has succeeded for") && why.contains("replica site's agent"),
        "{why}"
    );
    let v = s.vmrs.get("web").await.unwrap();
    let degraded = condition(&v, "Degraded").unwrap();
    assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "Critical"));
    has_events(&s, "web", &["HealthWarning", "HealthCritical"]).await;

    // The agent comes back: Critical clears at once, and once good cycles
    // outweigh the missed ones in the window, health is Normal again.
    let storage = s.replica_storage.clone();
    s.replicas[0] = receiver(&s.root, "replica-tls", s.replica_port, &s.primary_name, &storage);
    let (h, _) = wait_secs(30, "Critical to clear", async || {
        health(&s.vmrs.get("web").await.ok()?).filter(|(h, _)| *h != Health::Critical)
    })
    .await;
    assert_eq!(h, Health::Warning, "the missed cycles still count in this window");
    wait_secs(150, "Normal", async || {
        health(&s.vmrs.get("web").await.ok()?).filter(|(h, _)| *h == Health::Normal)
    })
    .await;
    has_events(&s, "web", &["HealthNormal"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_replication_reports_its_progress() {
    // 2 MB/s: the 16 MiB initial copy takes about 8 s.
    let s = site_with(&["--bandwidth-limit", "2000000"]).await;
    let disk = s.root.join("disks").join("big.img");
    qemu_img_create(&disk, "64M");
    qemu_io(disk.to_str().unwrap(), "write -P 0x21 0 16M").unwrap();
    s.apply("big", with(s.spec(&disk, "replica", s.replica_port), "compressionEnabled", json!(false))).await;
    let progress = wait_secs(30, "progress of the initial copy", async || {
        let st = s.vmrs.get("big").await.ok()?.status?;
        let p = st.progress.filter(|p| p.bytes_done > 0 && p.bytes_per_second > 0)?;
        (st.state == ReplicationState::WaitingForInitialReplication).then_some(p)
    })
    .await;
    assert_eq!(progress.operation, "InitialReplication");
    assert_eq!(progress.bytes_total, 16 << 20, "the allocated bytes, not the 64 MiB disk");
    assert!(progress.bytes_done < progress.bytes_total, "{progress:?}");
    assert!(progress.eta.is_some(), "{progress:?}");
    // Roughly the limit (the copy shares it with nothing else).
    assert!(progress.bytes_per_second < 4_000_000, "{progress:?}");
    let v = s.wait_state("big", ReplicationState::Replicating, 60).await;
    assert!(v.status.unwrap().progress.is_none(), "no progress once replicating");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_mid_failover_resumes_from_status_and_finishes() {
    let mut s = site().await;
    let (disk, export) = s.replicating("mv", "8M").await;
    qemu_io(&export, "write -P 0x44 1M 256k").unwrap();

    // The controller dies in the middle of a planned failover: the request is
    // in spec and status says it was shipping the last log.
    s.controller.abort();
    let _ = (&mut s.controller).await;
    s.apply(
        "mv",
        with(s.spec(&disk, "replica", s.replica_port), "failover", json!({"id": "m1", "type": "Planned"})),
    )
    .await;
    let midway = json!({"apiVersion": "vmreplica.io/v1alpha1", "kind": "VMReplication",
        "status": {"lastFailover": {"id": "m1", "type": "Planned", "phase": "SyncingFinalLog",
                                    "startTime": "2026-01-01T00:00:00Z", "forced": false}}});
    s.vmrs
        .patch_status(
            "mv",
            &PatchParams::apply(vmreplica_controller::status::FAILOVER_MANAGER).force(),
            &Patch::Apply(midway),
        )
        .await
        .unwrap();

    // A new controller picks it up from status and finishes it.
    let ctx = context::Context::new(s.base.clone(), Duration::from_secs(2), Some(s.ns.clone()));
    tokio::spawn(vmreplication::run(ctx, std::future::pending()));
    let v = s.wait_state("mv", ReplicationState::SyncedReplicationComplete, 60).await;
    let l = v.status.unwrap().last_failover.unwrap();
    assert_eq!((l.id.as_str(), l.phase), ("m1", vmreplica_crds::FailoverPhase::Completed), "{l:?}");
    let replica_img = s.replica_image("mv");
    let same = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw"])
        .arg(&replica_img)
        .arg(&disk)
        .status()
        .unwrap();
    assert!(same.success(), "no write lost across the restart");
}

/// Where the agent keeps an image's log: next to it, as `<image>.vmrlog`
/// (docs/architecture.md, "Segments").
fn log_dir_for(image: &std::path::Path) -> std::path::PathBuf {
    let mut name = image.file_name().unwrap().to_owned();
    name.push(".vmrlog");
    image.with_file_name(name)
}

/// The replica goes away and the log passes half the disk: the VM waits in
/// WaitingForStartResynchronize (Critical, naming the window) while outside
/// its automatic window, ResynchronizeSuspended while suspended, and a
/// request resynchronises it at once by dirty map; a second request with
/// nothing to heal compares hashes and sends no data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overflowed_log_is_resynchronised_on_request_outside_the_window() {
    let mut s = site().await;
    let disk = s.root.join("disks").join("rs-root.img");
    qemu_img_create(&disk, "32M");
    qemu_io(disk.to_str().unwrap(), "write -P 0x21 0 4M").unwrap();
    // A window that is never now: an hour from now to an hour ago.
    let now_min =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() % 86_400 / 60;
    let hhmm = |m: u64| format!("{:02}:{:02}", m % 1440 / 60, m % 60);
    let window =
        json!({"enabled": true, "window": {"start": hhmm(now_min + 60), "end": hhmm(now_min + 1380)}});
    let spec = with(s.spec(&disk, "replica", s.replica_port), "automaticResynchronization", window);
    s.apply("rs", spec.clone()).await;
    s.wait_state("rs", ReplicationState::Replicating, 60).await;

    // The replica site's agent goes away; 18 MiB are written (more than half of 32).
    s.replicas[0].kill();
    let export = s.export("rs");
    for k in 0..18 {
        qemu_io(&export, &format!("write -P {} {}M 1M", k + 1, k + 8)).unwrap();
    }
    s.replicas[0] = receiver(&s.root, "replica-tls", s.replica_port, &s.primary_name, &s.replica_storage);
    let v = s.wait_state("rs", ReplicationState::WaitingForStartResynchronize, 60).await;
    let st = v.status.unwrap();
    assert_eq!(st.health, Health::Critical);
    let details = st.health_details.join(" ");
    assert!(details.contains("automatic resynchronisation runs") && details.contains("UTC"), "{details}");
    assert!(details.contains("spec.resynchronize"), "it says how to start one now: {details}");

    // Suspended meanwhile: ResynchronizeSuspended.
    s.apply("rs", with(spec.clone(), "suspended", json!(true))).await;
    s.wait_state("rs", ReplicationState::ResynchronizeSuspended, 30).await;

    // Resumed with a request: it runs at once, by dirty map.
    s.apply("rs", with(spec.clone(), "resynchronize", json!({"id": "now-1"}))).await;
    let v = wait_secs(90, "the requested resync to finish", async || {
        let v = s.vmrs.get("rs").await.ok()?;
        let st = v.status.as_ref()?;
        (st.state == ReplicationState::Replicating
            && st.last_resynchronization.as_ref().is_some_and(|r| r.id == "now-1"))
        .then_some(v)
    })
    .await;
    let r = v.status.unwrap().last_resynchronization.unwrap();
    assert_eq!(r.mode, "DirtyMap", "{r:?}");
    assert_eq!(r.bytes_resynchronized, 18 << 20, "the dirty bytes: {r:?}");
    assert!(r.data_bytes_sent < r.bytes_resynchronized / 10, "patterns compress (zstd): {r:?}");
    let replica_img = s.replica_image("rs");
    let same = |a: &Path, b: &Path| {
        Command::new("qemu-img")
            .args(["compare", "-U", "-q", "-f", "raw", "-F", "raw"])
            .arg(a)
            .arg(b)
            .status()
            .unwrap()
            .success()
    };
    wait_secs(30, "the replica to equal the disk", async || same(&replica_img, &disk).then_some(())).await;

    // Nothing to heal: a requested resync compares hashes and sends no data.
    s.apply("rs", with(spec.clone(), "resynchronize", json!({"id": "check-2"}))).await;
    let v = wait_secs(90, "the second resync", async || {
        let v = s.vmrs.get("rs").await.ok()?;
        v.status.as_ref()?.last_resynchronization.as_ref().is_some_and(|r| r.id == "check-2").then_some(v)
    })
    .await;
    let r = v.status.unwrap().last_resynchronization.unwrap();
    assert_eq!((r.mode.as_str(), r.bytes_resynchronized, r.data_bytes_sent), ("HashTree", 0, 0), "{r:?}");
    assert!(r.bytes_sent > 0 && r.bytes_sent < 64 << 10, "hashes only: {r:?}");

    // Verification: 0 on equal sides; the exact count once three 4 KiB
    // blocks of the replica are corrupted on purpose; nothing repaired by it.
    let verified = async |id: &str| {
        wait_secs(90, &format!("verification {id}"), async || {
            let v = s.vmrs.get("rs").await.ok()?;
            v.status.as_ref()?.last_verification.as_ref().is_some_and(|r| r.id == id).then_some(v)
        })
        .await
        .status
        .unwrap()
    };
    s.apply("rs", with(spec.clone(), "verify", json!({"id": "v-1"}))).await;
    let st = verified("v-1").await;
    let r = st.last_verification.unwrap();
    assert_eq!((r.differing_bytes, r.compared_bytes), (0, 32 << 20), "{r:?}");
    for at in ["29M", "30M", "31M"] {
        qemu_io(replica_img.to_str().unwrap(), &format!("write -P 0xEE {at} 4k")).unwrap();
    }
    s.apply("rs", with(spec, "verify", json!({"id": "v-2"}))).await;
    let st = verified("v-2").await;
    let r = st.last_verification.unwrap();
    assert_eq!(r.differing_bytes, 3 * 4096, "exactly the corrupted blocks: {r:?}");
    assert_eq!(st.health, Health::Warning);
    assert!(
        st.health_details.iter().any(|d| d.contains("verification (v-2) found 12.0 KiB")),
        "{:?}",
        st.health_details
    );
    assert!(!same(&replica_img, &disk), "a verification repairs nothing");
}

/// An agent restarted (kill -9, as a crash or a DaemonSet rollout does)
/// serves its VMs' disks again at once, and replicates them: its new Lease
/// has every VMReplication reconciled. The controller here reads steady VMs
/// every 10 minutes, so nothing else could bring the disk back in the test's
/// time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_serves_its_vms_disks_again_without_waiting_for_the_poll() {
    let mut s = site_polling(&[], Duration::from_secs(600)).await;
    let (_, export) = s.replicating("rs", "16M").await;
    qemu_io(&export, "write -P 0x21 0 64k").unwrap();

    s.primary.kill();
    assert!(qemu_io(&export, "read 0 512").is_err(), "nothing serves the disk while its agent is down");
    let mut again = Command::new(bin("vmreplica-agent"));
    again.args(&s.primary_args);
    s.primary = Process::spawn_ready(again, &s.root.join("primary-restarted.log"));
    let restarted = std::time::Instant::now();
    wait_secs(30, "the restarted agent to serve the disk, with the write from before", async || {
        qemu_io(&export, "read -P 0x21 0 64k").ok()
    })
    .await;
    eprintln!("the disk was served again {:?} after the agent's start", restarted.elapsed());
    let replica_img = s.replica_image("rs");
    qemu_io(&export, "write -P 0x22 1M 64k").unwrap();
    wait_secs(30, "a write made after the restart to reach the replica", async || {
        qemu_io(replica_img.to_str()?, "read -P 0x22 1M 64k").ok()
    })
    .await;
    qemu_io(replica_img.to_str().unwrap(), "read -P 0x21 0 64k").expect("the write from before the restart");
}

/// kill -9 mid-resync, on both sides, as processes: the log overflows while
/// the replica site is down (a bandwidth limit makes the resync that follows
/// take seconds); the primary's agent is killed while it runs, then the
/// replica's. While the replica's agent is down its newest point — from
/// before the resync — materialises byte for byte what it held (what a
/// failover would get), and in the end the replica equals the disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_killed_mid_resync_lose_nothing_and_keep_the_pre_resync_point() {
    let mut s = site_with(&["--bandwidth-limit", "4000000"]).await;
    let (disk, export) = s.replicating("k9", "32M").await;
    qemu_io(&export, "write -P 0x11 0 64k").unwrap();
    let replica_dir = s.replica_storage.join(format!("{}.k9", s.ns)).join("root");
    let replica_img = replica_dir.join("disk.img");
    wait_secs(30, "the first write at the replica", async || {
        qemu_io(replica_img.to_str().unwrap(), "read -P 0x11 0 64k").ok()
    })
    .await;

    // The replica site goes away; what it holds is its newest point.
    s.replicas[0].kill();
    let before = s.root.join("before-resync.img");
    std::fs::copy(&replica_img, &before).unwrap();
    // 20 MiB of data that does not compress (more than half of 32 MiB).
    let random = s.root.join("random.bin");
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let bytes: Vec<u8> = (0..1 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&random, bytes).unwrap();
    for k in 0..20 {
        qemu_io(&export, &format!("write -s {} {}M 1M", random.display(), k + 4)).unwrap();
    }
    let restart_replica =
        |s: &Site| receiver(&s.root, "replica-tls", s.replica_port, &s.primary_name, &s.replica_storage);
    s.replicas[0] = restart_replica(&s);
    let resyncing = async |s: &Site| {
        wait_secs(60, "a resync under way", async || {
            let st = s.vmrs.get("k9").await.ok()?.status?;
            let p = st.progress.filter(|p| p.operation == "Resynchronization" && p.bytes_done > 0)?;
            (st.state == ReplicationState::Resynchronizing).then_some(p)
        })
        .await
    };
    resyncing(&s).await;

    // kill -9 the primary's agent mid-resync, and start it again.
    s.primary.kill();
    let mut again = Command::new(bin("vmreplica-agent"));
    again.args(&s.primary_args);
    s.primary = Process::spawn_ready(again, &s.root.join("primary-restarted.log"));
    resyncing(&s).await;
    // Now the replica's.
    s.replicas[0].kill();
    // Down: its newest point is what it held before the resync began (what
    // a failover would get), written out with the agent's offline tool.
    let agent = |args: &[&std::ffi::OsStr]| Command::new(bin("vmreplica-agent")).args(args).output().unwrap();
    let listed = agent(&["materialize".as_ref(), "--replica".as_ref(), replica_dir.as_os_str()]);
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert!(listed.starts_with("Resyncing"), "it never claims to be consistent mid-resync: {listed}");
    assert!(listed.contains("\npoint "), "the point from before: {listed}");
    let point = s.root.join("point.img");
    let out = agent(&[
        "materialize".as_ref(),
        "--replica".as_ref(),
        replica_dir.as_os_str(),
        "--point".as_ref(),
        "latest".as_ref(),
        "--out".as_ref(),
        point.as_os_str(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let same = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw"])
        .arg(&point)
        .arg(&before)
        .status()
        .unwrap();
    assert!(same.success(), "the pre-resync point, byte for byte, after two kills");
    s.replicas[0] = restart_replica(&s);
    wait_secs(180, "the replica to equal the disk", async || {
        let st = s.vmrs.get("k9").await.ok()?.status?;
        if st.state != ReplicationState::Replicating {
            return None;
        }
        let same = Command::new("qemu-img")
            .args(["compare", "-U", "-q", "-f", "raw", "-F", "raw"])
            .arg(&replica_img)
            .arg(&disk)
            .status()
            .ok()?;
        same.success().then_some(())
    })
    .await;
}

/// initialReplication.method ExternalMedia through the CRD: the primary's
/// agent exports the disk to the directory and the VM waits for the import
/// (status says where and how); `vmreplica-agent import` at the replica
/// site loads it; then only what was written since is shipped and the
/// replica equals the disk. A bad directory is refused with a reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_initial_copy_on_external_media_is_imported_at_the_replica_site() {
    let s = site().await;
    let disk = s.root.join("disks").join("em.img");
    qemu_img_create(&disk, "16M");
    qemu_io(disk.to_str().unwrap(), "write -P 0x31 0 6M").unwrap();
    // Outside the agent's disk roots: refused (the agent would write there).
    let outside = with(
        s.spec(&disk, "replica", s.replica_port),
        "initialReplication",
        json!({
        "method": "ExternalMedia", "directory": s.root.join("elsewhere")}),
    );
    s.apply("em", outside).await;
    let v = s.wait_state("em", ReplicationState::Error, 30).await;
    let details = v.status.unwrap().health_details.join(" ");
    assert!(details.contains("outside the directories this agent may write"), "{details}");
    let media = s.root.join("disks").join("media");
    let initial = |dir: serde_json::Value| json!({"method": "ExternalMedia", "directory": dir});
    let spec =
        with(s.spec(&disk, "replica", s.replica_port), "initialReplication", initial(json!("relative")));
    assert!(
        s.vmrs
            .create(
                &Default::default(),
                &serde_json::from_value(json!({"apiVersion":
        "vmreplica.io/v1alpha1", "kind": "VMReplication", "metadata": {"name": "em"}, "spec": spec}))
                .unwrap()
            )
            .await
            .is_err(),
        "a relative directory is refused by the schema"
    );
    let spec = with(s.spec(&disk, "replica", s.replica_port), "initialReplication", initial(json!(media)));
    s.apply("em", spec).await;
    let v = wait_secs(60, "the export", async || {
        let v = s.vmrs.get("em").await.ok()?;
        let st = v.status.as_ref()?;
        (st.state == ReplicationState::WaitingForInitialReplication
            && st.health_details.iter().any(|d| d.contains("exported to")))
        .then_some(v)
    })
    .await;
    let details = v.status.unwrap().health_details.join(" ");
    assert!(details.contains("vmreplica-agent import"), "it says how to import: {details}");
    // Writes while the media travels.
    let export = s.export("em");
    qemu_io(&export, "write -P 0x32 10M 64k").unwrap();
    let import = Command::new(bin("vmreplica-agent"))
        .args(["import", "--from"])
        .arg(&media)
        .arg("--storage")
        .arg(&s.replica_storage)
        .args(["--primary", &s.primary_name, "--trust-group", "g1"])
        .output()
        .unwrap();
    assert!(import.status.success(), "{import:?}");
    assert!(String::from_utf8_lossy(&import.stdout).contains("chunks verified and imported"), "{import:?}");
    s.wait_state("em", ReplicationState::Replicating, 60).await;
    let replica_img = s.replica_image("em");
    wait_secs(30, "the replica to equal the disk", async || {
        Command::new("qemu-img")
            .args(["compare", "-U", "-q", "-f", "raw", "-F", "raw"])
            .arg(&replica_img)
            .arg(&disk)
            .status()
            .ok()?
            .success()
            .then_some(())
    })
    .await;
}
