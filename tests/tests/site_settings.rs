//! Every field of a ReplicationServer changes what its agents do, measured
//! from outside: the port they receive on (and a port in use refused with
//! nothing changed), the transfers they run at once and the bandwidth they
//! take (a primary ships real segments through them), and the certificate
//! they present (their own, renewed on disk; then the Secret `tlsSecretName`
//! names, renewed in place) — all without restarting the agent.

use std::{path::Path, process::Command, sync::Arc, time::Duration};

use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use serde_json::json;
use vmreplica_controller::{context, site};
use vmreplica_crds::{AgentAcceptance, AuthorizationEntry, ReplicationServer};
use vmreplica_tests::{
    FIELD_MANAGER, client,
    pki::Ca,
    procs::{
        Process, bin, free_port, http_get, lease_args, live, material, presented_serial, serial_of,
        wait_secs, write_tls,
    },
    shared_kubeconfig, test_namespace, tls_secret,
};

const MIB: u64 = 1 << 20;

/// Sums the samples of `metric` (any labels) in a Prometheus text page.
fn metric(page: &str, metric: &str) -> u64 {
    page.lines()
        .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn connects(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// Writes `len` bytes of pattern `p` at 0 on every export of the primary.
async fn write_all_disks(socket: &Path, p: u8, len: u64) {
    for d in ["d0", "d1", "d2"] {
        let url = format!("nbd+unix:///{d}?socket={}", socket.display());
        let ok = tokio::task::spawn_blocking(move || {
            Command::new("qemu-io")
                .args(["-f", "raw", "-c", &format!("write -P {p} 0 {len}"), &url])
                .status()
                .unwrap()
                .success()
        })
        .await
        .unwrap();
        assert!(ok, "qemu-io write to {d}");
    }
}

/// Samples the replica's received bytes every 100 ms until `bytes` more
/// than `from` arrived and nothing more came for a second; returns the rate
/// over the samples that saw data move (bytes/s) and the seconds from `start`
/// to the last byte.
async fn receive_rate(
    metrics: std::net::SocketAddr,
    from: u64,
    bytes: u64,
    start: std::time::Instant,
) -> (f64, f64) {
    let mut samples: Vec<(std::time::Instant, u64)> = Vec::new();
    let deadline = start + Duration::from_secs(60);
    loop {
        let got = metric(&http_get(metrics, "/metrics").await, "vmreplica_agent_received_bytes_total");
        let now = std::time::Instant::now();
        samples.push((now, got));
        let done = got >= from + bytes;
        let quiet = samples.iter().rev().take_while(|(t, _)| now.duration_since(*t) < Duration::from_secs(1));
        if done && quiet.clone().all(|(_, b)| *b == got) && quiet.count() >= 9 {
            break;
        }
        assert!(now < deadline, "only {} of {bytes} bytes arrived in 60s", got.saturating_sub(from));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first = samples.iter().position(|(_, b)| *b > from).unwrap();
    let last = samples.iter().position(|(_, b)| *b == samples.last().unwrap().1).unwrap();
    let (t0, b0) = samples[first];
    let (t1, b1) = samples[last];
    let secs = t1.duration_since(t0).as_secs_f64();
    ((b1 - b0) as f64 / secs.max(0.05), t1.duration_since(start).as_secs_f64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replication_server_field_changes_what_the_agents_do() {
    let client = client().await;
    let ns = test_namespace(&client, "settings").await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ca = Ca::new("settings-ca").unwrap();
    let replica_name = format!("replica.{ns}.example.com");
    let primary_name = format!("host1.{ns}.example.com");
    let b_tls = material(&ca, &[&replica_name, "127.0.0.1"]);
    write_tls(&root.join("b-tls"), &b_tls);
    write_tls(&root.join("a-tls"), &material(&ca, &[&primary_name]));

    // Site B's agent: receives on p1 until a ReplicationServer says otherwise.
    let (p1, p2, ctl, b_metrics) = (free_port(), free_port(), free_port(), free_port());
    let mut cmd = Command::new(bin("vmreplica-agent"));
    cmd.args(["receive", "--listen", &format!("127.0.0.1:{p1}"), "--control-listen"])
        .arg(format!("127.0.0.1:{ctl}"))
        .args(["--metrics", &format!("127.0.0.1:{b_metrics}"), "--tls-dir"])
        .arg(root.join("b-tls"))
        .args(["--node-label", &format!("vmreplica-test={ns}")])
        .args(lease_args(&ns, "node-b", &shared_kubeconfig()));
    let mut agent = Process::spawn_ready(cmd, &root.join("b-agent.log"));
    let b_metrics: std::net::SocketAddr = format!("127.0.0.1:{b_metrics}").parse().unwrap();

    let ctx = Arc::new(context::Shared {
        client: client.clone(),
        agents_namespace: ns.clone(),
        tls: live(&ca, &["vmreplica-controller"]),
        now: k8s_openapi::jiff::Timestamp::now,
        metrics: vmreplica_controller::telemetry::Metrics::new(),
    });
    tokio::spawn(site::run(ctx, std::future::pending()));
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let (rs_name, ae_name) = (format!("rs-{ns}"), format!("ae-{ns}"));
    Api::<AuthorizationEntry>::all(client.clone())
        .patch(&ae_name, &pp, &Patch::Apply(json!({
            "apiVersion": "vmreplica.io/v1alpha1", "kind": "AuthorizationEntry", "metadata": {"name": ae_name},
            "spec": {"allowedPrimaryServer": format!("*.{ns}.example.com"), "trustGroup": "settings",
                     "replicaStorageLocation": root.join("replicas"), "replicaNamespace": ns},
        })))
        .await
        .unwrap();
    let servers: Api<ReplicationServer> = Api::all(client.clone());
    let apply = async |spec: serde_json::Value| {
        let mut spec = spec;
        spec["nodeSelector"] = json!({"vmreplica-test": ns});
        let rs = json!({"apiVersion": "vmreplica.io/v1alpha1", "kind": "ReplicationServer",
                        "metadata": {"name": rs_name}, "spec": spec});
        servers.patch(&rs_name, &pp, &Patch::Apply(rs)).await.unwrap();
    };
    // The agent's answer once `check` holds for it.
    let agent_status = async |what: &str, check: &dyn Fn(&AgentAcceptance) -> bool| {
        wait_secs(45, what, async || {
            let s = servers.get(&rs_name).await.ok()?.status?;
            s.agents.into_iter().find(|a| a.node == "node-b" && check(a))
        })
        .await
    };

    // --- port, transfers, bandwidth: all three in force at once.
    let limit = 4 * MIB;
    apply(json!({"port": p2, "maxActiveTransfers": 1, "bandwidthLimitBytesPerSecond": limit})).await;
    let a = agent_status("the agent to move to the port", &|a| {
        a.accepted && a.in_force.as_ref().and_then(|f| f.port) == Some(p2)
    })
    .await;
    let f = a.in_force.unwrap();
    assert_eq!((f.max_active_transfers, f.bandwidth_limit_bytes_per_second), (1, Some(limit)));
    assert!(connects(p2) && !connects(p1), "listens on {p2} and no longer on {p1}");
    let lease = Api::<Lease>::namespaced(client.clone(), &ns).get("vmreplica-agent-node-b").await.unwrap();
    let endpoint = lease.metadata.annotations.unwrap()["vmreplica.io/replication-endpoint"].clone();
    assert_eq!(endpoint, format!("127.0.0.1:{p2}"), "the Lease announces the new port");

    // A port another process holds: refused, with the reason, nothing changed.
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let p3 = squatter.local_addr().unwrap().port();
    apply(json!({"port": p3, "maxActiveTransfers": 1, "bandwidthLimitBytesPerSecond": limit})).await;
    let a = agent_status("the refusal of a port in use", &|a| !a.accepted).await;
    let why = a.message.unwrap();
    assert!(why.contains(&format!("port {p3} is in use")), "{why}");
    assert_eq!(a.in_force.unwrap().port, Some(p2), "still on the old port");
    assert!(connects(p2));
    apply(json!({"port": p2, "maxActiveTransfers": 1, "bandwidthLimitBytesPerSecond": limit})).await;
    agent_status("the agent to accept again", &|a| a.accepted).await;
    drop(squatter);

    // A primary with three disks ships to the new port, uncompressed.
    std::fs::create_dir_all(root.join("disks")).unwrap();
    let a_socket = root.join("a.sock");
    let a_metrics = free_port();
    let mut cmd = Command::new(bin("vmreplica-agent"));
    cmd.args(["serve", "--vm", "ledger", "--socket"]).arg(&a_socket);
    for d in ["d0", "d1", "d2"] {
        let img = root.join("disks").join(format!("{d}.img"));
        std::fs::File::create(&img).unwrap().set_len(32 * MIB).unwrap();
        cmd.arg("--disk").arg(format!("{d}={}", img.display()));
    }
    cmd.args(["--replicate-to", &format!("127.0.0.1:{p2}"), "--replica-server-name", &replica_name])
        .args(["--interval", "1", "--no-compression", "--retry-seconds", "1", "--tls-dir"])
        .arg(root.join("a-tls"))
        .args(["--metrics", &format!("127.0.0.1:{a_metrics}")]);
    let _primary = Process::spawn_ready(cmd, &root.join("a-agent.log"));
    let a_metrics: std::net::SocketAddr = format!("127.0.0.1:{a_metrics}").parse().unwrap();
    wait_secs(60, "the initial copies", async || {
        let page = http_get(a_metrics, "/metrics").await;
        (page
            .lines()
            .filter(|l| l.starts_with("vmreplica_agent_last_replication_timestamp_seconds{"))
            .count()
            == 3)
            .then_some(())
    })
    .await;

    // 24 MiB through a replica that allows one transfer at 4 MiB/s.
    let before = metric(&http_get(b_metrics, "/metrics").await, "vmreplica_agent_received_bytes_total");
    let start = std::time::Instant::now();
    write_all_disks(&a_socket, 7, 8 * MIB).await;
    let (rate, took) = receive_rate(b_metrics, before, 24 * MIB, start).await;
    let page = http_get(b_metrics, "/metrics").await;
    assert_eq!(
        page.lines().find(|l| l.starts_with("vmreplica_agent_transfers{slots=\"peak\"}")),
        Some("vmreplica_agent_transfers{slots=\"peak\"} 1"),
        "one transfer at a time:\n{page}"
    );
    let ratio = rate / limit as f64;
    eprintln!("limited: {:.2} MiB/s ({ratio:.2}x the limit), all in {took:.1}s", rate / MIB as f64);
    assert!((0.7..=1.3).contains(&ratio), "received at {rate:.0} B/s under a limit of {limit} B/s");
    assert!(took >= 4.5, "24 MiB at 4 MiB/s (one second of burst) take at least 5 s, took {took:.1}s");

    // Three transfers, no bandwidth limit: they overlap, and it goes fast.
    apply(json!({"port": p2, "maxActiveTransfers": 3})).await;
    agent_status("the new limits", &|a| {
        a.in_force
            .as_ref()
            .is_some_and(|f| f.max_active_transfers == 3 && f.bandwidth_limit_bytes_per_second.is_none())
    })
    .await;
    let before = metric(&http_get(b_metrics, "/metrics").await, "vmreplica_agent_received_bytes_total");
    let start = std::time::Instant::now();
    write_all_disks(&a_socket, 8, 8 * MIB).await;
    let (_, took) = receive_rate(b_metrics, before, 24 * MIB, start).await;
    let page = http_get(b_metrics, "/metrics").await;
    let peak = metric(&page, "vmreplica_agent_transfers{slots=\"peak\"}");
    eprintln!("unlimited: all in {took:.1}s, {peak} transfers at once");
    assert!(peak >= 2, "transfers overlap once three may run:\n{page}");
    assert!(took < 4.0, "without the limit 24 MiB arrive within a cycle or two, took {took:.1}s");

    // --- the agent's own certificate, renewed on disk: presented without a restart.
    let own = serial_of(&b_tls);
    assert_eq!(presented_serial(p2, &root.join("a-tls"), &replica_name).as_deref(), Some(own.as_str()));
    let renewed = material(&ca, &[&replica_name, "127.0.0.1"]);
    write_tls(&root.join("b-tls"), &renewed);
    let want = serial_of(&renewed);
    wait_secs(30, "the renewed certificate on the replication port", async || {
        (presented_serial(p2, &root.join("a-tls"), &replica_name)? == want).then_some(())
    })
    .await;
    let a = agent_status("the renewed serial in status", &|a| {
        a.in_force.as_ref().and_then(|f| f.certificate_serial.clone()).map(|s| s.to_ascii_uppercase())
            == Some(want.clone())
    })
    .await;
    assert_eq!(a.in_force.unwrap().certificate_source.as_deref(), Some("Agent"));

    // --- tlsSecretName: the Secret's certificate replaces the agent's own...
    let from_secret = material(&ca, &[&replica_name, "127.0.0.1"]);
    tls_secret(&client, &ns, "replication-tls", &from_secret).await;
    apply(json!({"port": p2, "maxActiveTransfers": 3, "tlsSecretName": "replication-tls"})).await;
    let want = serial_of(&from_secret);
    wait_secs(45, "the Secret's certificate on the replication port", async || {
        (presented_serial(p2, &root.join("a-tls"), &replica_name)? == want).then_some(())
    })
    .await;
    let a = agent_status("the Secret named as the source", &|a| {
        a.in_force.as_ref().and_then(|f| f.certificate_source.as_deref()) == Some("ReplicationServer")
    })
    .await;
    assert!(a.in_force.unwrap().certificate_not_after.is_some());
    // ...and replication goes on over it.
    let before = metric(&http_get(b_metrics, "/metrics").await, "vmreplica_agent_received_bytes_total");
    write_all_disks(&a_socket, 9, MIB).await;
    receive_rate(b_metrics, before, 3 * MIB, std::time::Instant::now()).await;

    // ...renewed in place (what cert-manager does): in force within a pass.
    let renewed = material(&ca, &[&replica_name, "127.0.0.1"]);
    tls_secret(&client, &ns, "replication-tls", &renewed).await;
    let want = serial_of(&renewed);
    wait_secs(45, "the renewed Secret on the replication port", async || {
        (presented_serial(p2, &root.join("a-tls"), &replica_name)? == want).then_some(())
    })
    .await;

    // A Secret that does not exist: the server is not Ready, says why, and
    // the agent keeps presenting what it had.
    apply(json!({"port": p2, "maxActiveTransfers": 3, "tlsSecretName": "no-such-secret"})).await;
    let ready = wait_secs(45, "the missing Secret reported", async || {
        let s = servers.get(&rs_name).await.ok()?.status?;
        s.conditions.into_iter().find(|c| c.type_ == "Ready" && c.reason == "TLSSecretNotFound")
    })
    .await;
    assert!(ready.message.contains("no-such-secret"), "{}", ready.message);
    assert_eq!(presented_serial(p2, &root.join("a-tls"), &replica_name), Some(want));
    assert!(agent.0.try_wait().unwrap().is_none(), "all of it without restarting the agent");
    servers.delete(&rs_name, &Default::default()).await.unwrap();
}
