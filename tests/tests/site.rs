//! The site end to end: a ReplicationServer and AuthorizationEntries applied to
//! the real apiserver reach a real agent through the controller, the agent
//! enforces them on replication traffic, and the ReplicationServer's status
//! says which agents accepted them, or why not.

use std::{process::Command, sync::Arc};

use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams},
};
use serde_json::json;
use vmreplica_api::{
    replication::{DiskRef, OpenRequest, replication_client::ReplicationClient},
    tls::{LiveTls, channel},
};
use vmreplica_controller::{context, site};
use vmreplica_crds::{AuthorizationEntry, ReplicationServer};
use vmreplica_tests::{
    FIELD_MANAGER, client,
    pki::Ca,
    procs::{Process, bin, code, free_port, http_get, lease_args, live, material, wait_for, write_tls},
    shared_kubeconfig, test_namespace,
};

async fn open(addr: &str, tls: &Arc<LiveTls>) -> Result<(), tonic::Status> {
    let ch = channel(addr, "127.0.0.1", tls).unwrap();
    let req = OpenRequest {
        disk: Some(DiskRef { vm_id: "vm1".into(), disk_id: "root".into() }),
        disk_size: 1 << 20,
        epoch: 0,
        history: None,
        interval_seconds: 30,
        import_awaited: false,
    };
    ReplicationClient::new(ch).open(req).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_configures_agents_and_reports_what_they_accepted() {
    let client = client().await;
    let ns = test_namespace(&client, "site").await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("site-ca").unwrap();
    write_tls(&dir.path().join("agent"), &material(&ca, &["127.0.0.1"]));
    let (repl, ctl) = (free_port(), free_port());
    let start_agent = || {
        let mut cmd = Command::new(bin("vmreplica-agent"));
        cmd.args([
            "receive",
            "--listen",
            &format!("127.0.0.1:{repl}"),
            "--control-listen",
            &format!("127.0.0.1:{ctl}"),
        ])
        .arg("--tls-dir")
        .arg(dir.path().join("agent"))
        .args(["--node-label", &format!("vmreplica-test={ns}")])
        .args(lease_args(&ns, "node-b", &shared_kubeconfig()));
        Process::spawn_ready(cmd, &dir.path().join("agent.log"))
    };
    let mut agent = start_agent();
    let addr = format!("127.0.0.1:{repl}");
    let primary = live(&ca, &[&format!("host1.{ns}.example.com")]);
    // Before the controller configures it, the agent accepts nobody.
    let err = open(&addr, &primary).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");

    let metrics = vmreplica_controller::telemetry::Metrics::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_addr = listener.local_addr().unwrap();
    tokio::spawn(vmreplica_controller::telemetry::serve(metrics.clone(), listener, std::future::pending()));
    assert_eq!(code(&http_get(metrics_addr, "/readyz").await), "503", "not ready before the controllers run");
    metrics.ready.store(true, std::sync::atomic::Ordering::Relaxed);
    let ctx = Arc::new(context::Shared {
        client: client.clone(),
        agents_namespace: ns.clone(),
        tls: live(&ca, &["vmreplica-controller"]),
        now: k8s_openapi::jiff::Timestamp::now,
        metrics: metrics.clone(),
    });
    tokio::spawn(site::run(ctx, std::future::pending()));

    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let (rs_name, ae_name) = (format!("rs-{ns}"), format!("ae-{ns}"));
    let entries: Api<AuthorizationEntry> = Api::all(client.clone());
    entries
        .patch(&ae_name, &pp, &Patch::Apply(json!({
            "apiVersion": "vmreplica.io/v1alpha1", "kind": "AuthorizationEntry", "metadata": {"name": ae_name},
            "spec": {"allowedPrimaryServer": format!("*.{ns}.example.com"), "trustGroup": "finance",
                     "replicaStorageLocation": dir.path().join("replicas"), "replicaNamespace": ns},
        })))
        .await
        .unwrap();
    let servers: Api<ReplicationServer> = Api::all(client.clone());
    servers
        .patch(&rs_name, &pp, &Patch::Apply(json!({
            "apiVersion": "vmreplica.io/v1alpha1", "kind": "ReplicationServer", "metadata": {"name": rs_name},
            "spec": {"port": repl, "nodeSelector": {"vmreplica-test": ns}},
        })))
        .await
        .unwrap();

    // The status says the one selected agent accepted it.
    let status = wait_for("the agent to accept", async || {
        let s = servers.get(&rs_name).await.ok()?.status?;
        (s.agents_summary.as_deref() == Some("1/1")).then_some(s)
    })
    .await;
    assert_eq!(status.agents[0].node, "node-b");
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", "Accepted"));
    // The entry reports it is enforced.
    let entry_ready = wait_for("the entry's status", async || {
        let s = entries.get(&ae_name).await.ok()?.status?;
        let c = s.conditions.into_iter().find(|c| c.type_ == "Ready")?;
        (c.status == "True").then_some(c)
    })
    .await;
    assert_eq!(entry_ready.reason, "Enforced", "{entry_ready:?}");
    // ...and the agent enforces it: the entry's primaries in, strangers out.
    open(&addr, &primary).await.unwrap();
    let stranger = live(&ca, &["x.nowhere.example.org"]);
    assert_eq!(open(&addr, &stranger).await.unwrap_err().code(), tonic::Code::PermissionDenied);

    // An agent restarted (kill -9) starts with no configuration and accepts
    // nobody; its new Lease (a new acquireTime) has it configured again at
    // once, not at the periodic look 30 s later.
    agent.kill();
    let _agent = start_agent();
    let restarted = std::time::Instant::now();
    vmreplica_tests::procs::wait_secs(10, "the restarted agent configured", async || {
        open(&addr, &primary).await.ok()
    })
    .await;
    eprintln!("the restarted agent was configured {:?} after its start", restarted.elapsed());

    // A configuration the agent cannot enforce: refused, with the reason, and
    // the rules it had stay in force.
    servers
        .patch(&rs_name, &pp, &Patch::Apply(json!({
            "apiVersion": "vmreplica.io/v1alpha1", "kind": "ReplicationServer", "metadata": {"name": rs_name},
            "spec": {"port": repl, "nodeSelector": {"vmreplica-test": ns}, "allowAnyServer": true},
        })))
        .await
        .unwrap();
    let status = wait_for("the refusal", async || {
        let s = servers.get(&rs_name).await.ok()?.status?;
        (s.agents_summary.as_deref() == Some("0/1")).then_some(s)
    })
    .await;
    let why = status.agents[0].message.clone().unwrap_or_default();
    assert!(why.contains("defaultStorageLocation"), "{why}");
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "NotAccepted"));
    let entry_ready = wait_for("the entry to report the refusal", async || {
        let s = entries.get(&ae_name).await.ok()?.status?;
        let c = s.conditions.into_iter().find(|c| c.type_ == "Ready")?;
        (c.status == "False").then_some(c)
    })
    .await;
    assert!(
        entry_ready.message.contains("node-b") && entry_ready.message.contains("defaultStorageLocation"),
        "{entry_ready:?}"
    );
    open(&addr, &primary).await.unwrap();

    // Deleting the entry (with a valid server again) withdraws the permission.
    servers
        .patch(&rs_name, &pp, &Patch::Apply(json!({
            "apiVersion": "vmreplica.io/v1alpha1", "kind": "ReplicationServer", "metadata": {"name": rs_name},
            "spec": {"port": repl, "nodeSelector": {"vmreplica-test": ns}},
        })))
        .await
        .unwrap();
    entries.delete(&ae_name, &DeleteParams::default()).await.unwrap();
    wait_for("the entry's removal to reach the agent", async || {
        (open(&addr, &primary).await.err()?.code() == tonic::Code::PermissionDenied).then_some(())
    })
    .await;
    servers.delete(&rs_name, &DeleteParams::default()).await.unwrap();

    // The controller's own endpoint: ready, and counting its reconciliations.
    assert_eq!(code(&http_get(metrics_addr, "/readyz").await), "200");
    assert_eq!(code(&http_get(metrics_addr, "/healthz").await), "200");
    let body = http_get(metrics_addr, "/metrics").await;
    let line = body
        .lines()
        .find(|l| l.starts_with("vmreplica_controller_reconciles_total{kind=\"ReplicationServer\"}"))
        .unwrap_or_else(|| panic!("{body}"));
    let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= 3.0, "{line}");
    assert!(
        body.contains("vmreplica_controller_reconcile_duration_seconds_count{kind=\"ReplicationServer\"}")
    );
}
