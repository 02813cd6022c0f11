//! Agents announce themselves with Leases in the real apiserver, and the
//! controller's discovery finds them: endpoints, capabilities and node labels
//! from the Lease, live while it is renewed, gone when the agent stops cleanly.

use std::{process::Command, time::Duration};

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use vmreplica_controller::agents::discover;
use vmreplica_tests::{
    client,
    pki::Ca,
    procs::{Process, bin, free_port, lease_args, live, material, write_tls},
    shared_kubeconfig, test_namespace,
};

#[tokio::test]
async fn agents_are_found_by_their_leases_and_their_liveness_follows_renewal() {
    let client = client().await;
    let ns = test_namespace(&client, "discovery").await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("discovery-ca").unwrap();
    write_tls(dir.path(), &material(&ca, &["127.0.0.1"]));
    let (repl, ctl) = (free_port(), free_port());
    let start = || {
        let mut cmd = Command::new(bin("vmreplica-agent"));
        cmd.args([
            "receive",
            "--listen",
            &format!("127.0.0.1:{repl}"),
            "--control-listen",
            &format!("127.0.0.1:{ctl}"),
        ])
        .arg("--tls-dir")
        .arg(dir.path())
        .args(["--allow-any-server", "--storage"])
        .arg(dir.path().join("replicas"))
        .args(["--node-label", "topology.kubernetes.io/zone=z1"])
        .args(lease_args(&ns, "node-a", &shared_kubeconfig()));
        Process::spawn_ready(cmd, &dir.path().join("agent.log"))
    };

    let mut agent = start();
    let now = Timestamp::now();
    let found = discover(&client, &ns, now).await.unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    let a = &found[0];
    assert_eq!(a.node, "node-a");
    assert!(a.live);
    assert_eq!(a.control_endpoint.as_deref(), Some(format!("127.0.0.1:{ctl}").as_str()));
    assert_eq!(a.replication_endpoint.as_deref(), Some(format!("127.0.0.1:{repl}").as_str()));
    assert_eq!(a.capabilities, vec!["replica".to_owned()]);
    assert_eq!(a.labels.get("topology.kubernetes.io/zone").map(String::as_str), Some("z1"));

    // kill -9: the Lease stays but stops being renewed; past its duration the
    // agent counts as dead.
    agent.0.kill().unwrap();
    agent.0.wait().unwrap();
    let later = now.checked_add(SignedDuration::from_secs(20)).unwrap();
    let found = discover(&client, &ns, later).await.unwrap();
    assert_eq!(found.len(), 1);
    assert!(!found[0].live, "a Lease not renewed for longer than its duration is not live");

    // A clean stop deletes the Lease: the agent is gone at once.
    let agent = start();
    assert!(discover(&client, &ns, Timestamp::now()).await.unwrap()[0].live, "renewed again on restart");
    let pid = rustix::process::Pid::from_raw(agent.0.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let mut agent = agent;
    assert!(agent.0.wait().unwrap().success());
    let mut gone = false;
    for _ in 0..50 {
        if discover(&client, &ns, Timestamp::now()).await.unwrap().is_empty() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "the Lease is deleted on a clean stop");
}

/// One agent per node in both roles: it protects VMs and receives
/// replication, announces both, and takes the site's rules from the controller.
#[tokio::test]
async fn one_agent_serves_both_roles() {
    use vmreplica_api::control::{AuthorizationRule, SiteConfiguration, control_client::ControlClient};
    let client = client().await;
    let ns = test_namespace(&client, "both-roles").await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("both-ca").unwrap();
    write_tls(dir.path(), &material(&ca, &["127.0.0.1"]));
    let (repl, ctl) = (free_port(), free_port());
    let mut cmd = Command::new(bin("vmreplica-agent"));
    cmd.args([
        "serve",
        "--control-listen",
        &format!("127.0.0.1:{ctl}"),
        "--listen",
        &format!("127.0.0.1:{repl}"),
    ])
    .arg("--tls-dir")
    .arg(dir.path())
    .arg("--socket")
    .arg(dir.path().join("nbd.sock"))
    .args(lease_args(&ns, "node-x", &shared_kubeconfig()));
    let _agent = Process::spawn_ready(cmd, &dir.path().join("agent.log"));
    let found = discover(&client, &ns, Timestamp::now()).await.unwrap();
    assert_eq!(found[0].capabilities, vec!["primary".to_owned(), "replica".to_owned()]);
    assert_eq!(found[0].replication_endpoint.as_deref(), Some(format!("127.0.0.1:{repl}").as_str()));
    // The site's rules reach its replica half.
    let tls = live(&ca, &["vmreplica-controller"]);
    let ch = vmreplica_api::tls::channel(&format!("127.0.0.1:{ctl}"), "127.0.0.1", &tls).unwrap();
    let cfg = SiteConfiguration {
        rules: vec![AuthorizationRule {
            name: "a".into(),
            allowed_primary_server: "*.site-a.example.com".into(),
            storage: dir.path().join("replicas").display().to_string(),
            trust_group: "g".into(),
        }],
        ..Default::default()
    };
    let reply = ControlClient::new(ch).configure_site(cfg).await.unwrap().into_inner();
    assert!(reply.accepted, "{reply:?}");
}
