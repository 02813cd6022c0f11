//! The controller at scale: N VMReplications (default 1000) against a real
//! apiserver, with real agents holding small sparse disks. Measures the
//! controller's resident memory, the time until every VM is Replicating, the
//! apiserver writes per VM per minute at steady state (from the apiserver's
//! own request counters), and the p99 reconcile duration (from the
//! controller's histogram).
//!
//! `benches/controller-scale.sh [VMS] [AGENTS] [STEADY_SECONDS]` builds the
//! release binaries and runs this.

use std::{
    collections::BTreeMap,
    process::Command,
    time::{Duration, Instant},
};

use kube::{
    Api, Client,
    api::{ListParams, PostParams},
};
use vmreplica_crds::{ReplicationState, VMReplication};
use vmreplica_tests::{
    ControlPlane, client_for, install_crds,
    pki::Ca,
    procs::{Process, bin, free_port, http_get, lease_args, material, write_tls},
    test_namespace,
};

fn arg(i: usize, default: u64) -> u64 {
    std::env::args().filter(|a| !a.starts_with('-')).nth(i).and_then(|a| a.parse().ok()).unwrap_or(default)
}

/// Sum of `apiserver_request_total` for writes to these resources.
async fn apiserver_writes(client: &Client, resources: &[&str]) -> f64 {
    let req = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = client.request_text(req).await.expect("apiserver /metrics");
    let mut total = 0.0;
    for line in text.lines().filter(|l| l.starts_with("apiserver_request_total{")) {
        let write = ["verb=\"POST\"", "verb=\"PUT\"", "verb=\"PATCH\"", "verb=\"DELETE\"", "verb=\"APPLY\""]
            .iter()
            .any(|v| line.contains(v));
        let ours = resources.iter().any(|r| line.contains(&format!("resource=\"{r}\"")));
        if std::env::var_os("BENCH_DEBUG").is_some() && ours {
            eprintln!("{line}");
        }
        if write && ours {
            total += line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        }
    }
    total
}

/// The cumulative buckets of a Prometheus histogram, by upper bound.
fn buckets(metrics: &str, name: &str, kind: &str) -> Vec<(f64, f64)> {
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for line in metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}_bucket{{")) && l.contains(&format!("kind=\"{kind}\"")))
    {
        let le = line.split("le=\"").nth(1).and_then(|r| r.split('"').next()).unwrap();
        let le = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap() };
        let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        buckets.push((le, n));
    }
    buckets.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    buckets
}

/// The p99 of cumulative buckets as the upper bound of its bucket, and the count.
fn p99(buckets: &[(f64, f64)]) -> (f64, u64) {
    let total = buckets.last().map_or(0.0, |b| b.1);
    let at = buckets.iter().find(|(_, n)| *n >= total * 0.99).map_or(f64::NAN, |b| b.0);
    (at, total as u64)
}

fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[tokio::main]
async fn main() {
    let vms = arg(1, 1000) as usize;
    let agents = arg(2, 10) as usize;
    let steady = arg(3, 120);
    let frequency = 30;
    println!(
        "controller scale: {vms} VMReplications on {agents} primary agents, frequency {frequency}s, steady window {steady}s"
    );
    let plane = ControlPlane::start().await.expect("control plane");
    let kubeconfig = plane.kubeconfig_path();
    let client = client_for(&kubeconfig).await.unwrap();
    install_crds(&client).await.unwrap();
    let system = test_namespace(&client, "bench-system").await;
    let vm_ns = test_namespace(&client, "bench-vms").await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ca = Ca::new("bench-ca").unwrap();
    write_tls(&root.join("replica-tls"), &material(&ca, &["replica.bench.test", "127.0.0.1"]));
    write_tls(&root.join("controller-tls"), &material(&ca, &["vmreplica-controller"]));

    let repl = free_port();
    let mut cmd = Command::new(bin("vmreplica-agent"));
    cmd.args(["receive", "--listen", &format!("127.0.0.1:{repl}"), "--tls-dir"])
        .arg(root.join("replica-tls"))
        .arg("--authorize")
        .arg(format!("pattern=*.bench.test,storage={},trust-group=bench", root.join("replicas").display()))
        .args(["--max-transfers", "64"])
        .env("RUST_LOG", "warn");
    std::fs::create_dir_all(root.join("replicas")).unwrap();
    let mut procs = vec![Process::spawn_ready(cmd, &root.join("replica.log"))];
    for a in 0..agents {
        let node = format!("node-{a}");
        write_tls(
            &root.join(format!("{node}-tls")),
            &material(&ca, &[&format!("{node}.bench.test"), "127.0.0.1"]),
        );
        let disks = root.join(&node);
        std::fs::create_dir_all(&disks).unwrap();
        let mut cmd = Command::new(bin("vmreplica-agent"));
        cmd.args(["serve", "--control-listen", &format!("127.0.0.1:{}", free_port()), "--tls-dir"])
            .arg(root.join(format!("{node}-tls")))
            .arg("--socket")
            .arg(root.join(format!("{node}.sock")))
            .arg("--disk-root")
            .arg(&disks)
            .args(["--resolve", "replica.bench.test=127.0.0.1", "--retry-seconds", "5"])
            .args(lease_args(&system, &node, &kubeconfig))
            .env("RUST_LOG", "warn");
        procs.push(Process::spawn_ready(cmd, &root.join(format!("{node}.log"))));
    }
    let metrics_port = free_port();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("echo ready; exec \"$@\"")
        .arg("sh")
        .arg(bin("vmreplica-controller"))
        .args(["--namespace", &system, "--metrics", &format!("127.0.0.1:{metrics_port}")])
        .arg("--tls-dir")
        .arg(root.join("controller-tls"))
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "warn");
    let controller = Process::spawn_ready(cmd, &root.join("controller.log"));
    let pid = controller.0.id();

    // 1 MiB sparse disks with 64 KiB of data each.
    let api: Api<VMReplication> = Api::namespaced(client.clone(), &vm_ns);
    let started = Instant::now();
    let objects: Vec<_> = (0..vms)
        .map(|i| {
            let node = format!("node-{}", i % agents);
            let path = root.join(&node).join(format!("vm{i}.img"));
            let f = std::fs::File::create(&path).unwrap();
            f.set_len(1 << 20).unwrap();
            std::os::unix::fs::FileExt::write_all_at(&f, &[0xab; 65536], 0).unwrap();
            serde_json::from_value::<VMReplication>(serde_json::json!({
                "apiVersion": "vmreplica.io/v1alpha1", "kind": "VMReplication", "metadata": {"name": format!("vm{i}")},
                "spec": {"node": node, "disks": [{"name": "root", "path": path}], "replicationFrequencySeconds": frequency,
                         "replicaServer": {"name": "replica.bench.test", "port": repl}},
            }))
            .unwrap()
        })
        .collect();
    futures::future::join_all(objects.chunks(vms.div_ceil(16)).map(|chunk| {
        let api = api.clone();
        async move {
            for o in chunk {
                api.create(&PostParams::default(), o).await.unwrap();
            }
        }
    }))
    .await;
    let created = started.elapsed();
    let mut last_print = Instant::now();
    let all_replicating = loop {
        let list = api.list(&ListParams::default()).await.unwrap();
        let mut by_state: BTreeMap<String, usize> = BTreeMap::new();
        for v in &list.items {
            *by_state.entry(format!("{:?}", v.status.as_ref().map(|s| s.state))).or_default() += 1;
        }
        let done = list
            .items
            .iter()
            .filter(|v| v.status.as_ref().is_some_and(|s| s.state == ReplicationState::Replicating))
            .count();
        if done == vms {
            break started.elapsed();
        }
        if last_print.elapsed() > Duration::from_secs(10) {
            println!("  {:>5.0}s: {by_state:?}", started.elapsed().as_secs_f64());
            last_print = Instant::now();
        }
        assert!(
            started.elapsed() < Duration::from_secs(1800),
            "not all Replicating after 30 minutes: {by_state:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let (rss_busy, _) = rss_kib(pid);
    // Steady state: let the first status writes settle, then count.
    tokio::time::sleep(Duration::from_secs(70)).await;
    let resources = ["vmreplications", "events"];
    let controller_metrics = format!("127.0.0.1:{metrics_port}").parse().unwrap();
    let hist = "vmreplica_controller_reconcile_duration_seconds";
    let b0 = buckets(&http_get(controller_metrics, "/metrics").await, hist, "VMReplication");
    let w0 = apiserver_writes(&client, &resources).await;
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(steady)).await;
    let w1 = apiserver_writes(&client, &resources).await;
    let minutes = t0.elapsed().as_secs_f64() / 60.0;
    let per_vm_minute = (w1 - w0) / vms as f64 / minutes;
    let (rss, hwm) = rss_kib(pid);
    let body = http_get(controller_metrics, "/metrics").await;
    let b1 = buckets(&body, hist, "VMReplication");
    let (p99_s, reconciles) = p99(&b1);
    let steady_buckets: Vec<(f64, f64)> =
        b1.iter().zip(&b0).map(|((le, n1), (_, n0))| (*le, n1 - n0)).collect();
    let (p99_steady, steady_reconciles) = p99(&steady_buckets);
    let errors: u64 = body
        .lines()
        .filter(|l| {
            l.starts_with("vmreplica_controller_reconcile_errors_total{") && l.contains("VMReplication")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();

    println!();
    println!("| measure | value |");
    println!("|---|---:|");
    println!("| VMReplications created | {vms} in {:.1} s |", created.as_secs_f64());
    println!(
        "| time until all are Replicating (from the first create) | {:.1} s |",
        all_replicating.as_secs_f64()
    );
    println!("| controller RSS when all were Replicating | {:.1} MiB |", rss_busy as f64 / 1024.0);
    println!(
        "| controller RSS at steady state / peak | {:.1} / {:.1} MiB |",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    println!(
        "| apiserver writes (VMReplication + Event) per VM per minute, steady {steady} s | {per_vm_minute:.2} |"
    );
    println!(
        "| p99 VMReplication reconcile duration, whole run ({reconciles} reconciles; bucket bound) | {:.0} ms |",
        p99_s * 1000.0
    );
    println!(
        "| p99 VMReplication reconcile duration, steady window ({steady_reconciles} reconciles) | {:.0} ms |",
        p99_steady * 1000.0
    );
    println!("| VMReplication reconcile errors | {errors} |");
    drop(controller);
    drop(procs);
}
