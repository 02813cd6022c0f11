//! Network faults between the sites, inside two network namespaces this test
//! creates (no other address is used): the primary agent runs in one, the
//! replica agent in the other, a veth pair between them (10.77.0.1 and
//! 10.77.0.2, inside the namespaces only). Partitions and packet loss are
//! iptables rules inside the replica's namespace; latency, a bandwidth cap
//! and connection resets come from a userspace TCP proxy in the primary's
//! namespace (common/netem.rs). Meanwhile qemu-io writes through the
//! primary's export. After every fault heals, the replica converges
//! byte-equal and holds every acknowledged write once, in order (its points
//! and positions say so), and the primary's metrics show the outage and the
//! recovery. Needs root (namespaces, iptables).

mod common;

use std::{
    fs,
    net::SocketAddr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use common::{Rng, netem::Netem, procs::*};
use vmreplica_tests::{netns::NetNs, pki::Ca};

const MIB: u64 = 1 << 20;
const DISK: u64 = 64 * MIB;
const INTERVAL: Duration = Duration::from_secs(1);

/// Two namespaces joined by a veth pair; deleted (with the pair) on drop.
struct Namespaces {
    a: NetNs,
    b: NetNs,
}

impl Namespaces {
    fn new() -> Self {
        let (a, b) = (NetNs::new("a"), NetNs::new("b"));
        let id = std::process::id() % 100_000;
        let (va, vb) = (format!("vmra{id}"), format!("vmrb{id}"));
        run(&[
            "ip", "link", "add", &va, "netns", &a.name, "type", "veth", "peer", "name", &vb, "netns", &b.name,
        ]);
        run(&["ip", "-n", &a.name, "addr", "add", "10.77.0.1/30", "dev", &va]);
        run(&["ip", "-n", &b.name, "addr", "add", "10.77.0.2/30", "dev", &vb]);
        run(&["ip", "-n", &a.name, "link", "set", &va, "up"]);
        run(&["ip", "-n", &b.name, "link", "set", &vb, "up"]);
        Self { a, b }
    }

    /// Adds (`-A`) or deletes (`-D`) an iptables rule for packets in and
    /// out of the replica's namespace.
    fn rule(&self, op: &str, rule: &[&str]) {
        self.b.rule(op, rule);
    }

    /// The primary's metrics, read from inside its namespace.
    fn metric(&self, name: &str) -> f64 {
        metric(Some(&self.a.name), "127.0.0.1:9090", name)
    }
}

/// Writes `count` 64 KiB blocks from block `first`, each filled with
/// `tag + block` (mod 251, never 0); returns how many qemu-io acknowledged.
fn write(url: &str, first: u64, count: u64, tag: u64) -> u64 {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for b in first..first + count {
        cmd.arg("-c").arg(format!("write -P {} {} 64k", (tag + b) % 251 + 1, b * 65536));
    }
    cmd.arg("-c").arg("flush");
    let out = cmd.arg(url).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with("wrote ")).count() as u64
}

/// Waits until the replica's image equals the primary's; how long it took.
fn converge(d: &Path, image: &Path, replica: &Path, what: &str, secs: u64) -> Duration {
    let t = Instant::now();
    let primary = fs::read(image).unwrap();
    wait_until(d, what, secs, || fs::read(replica).ok().as_deref() == Some(&primary[..]));
    t.elapsed()
}

/// The replica's positions and points, which must only move forward.
fn positions(replica_dir: &Path) -> (u64, Vec<u64>) {
    let v: serde_json::Value =
        serde_json::from_slice(&fs::read(replica_dir.join("replica.json")).unwrap()).unwrap();
    let points = v["points"].as_array().unwrap().iter().map(|p| p["seq"].as_u64().unwrap()).collect();
    (v["appliedThrough"].as_u64().unwrap(), points)
}

#[test]
fn partitions_loss_latency_caps_and_resets_heal_and_the_replica_converges() {
    if !rustix::process::geteuid().is_root() {
        panic!("this test makes network namespaces and iptables rules: run it as root");
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let net = Namespaces::new();
    let ca = Ca::new("netfault-ca").unwrap();
    let rtls = write_tls(&d.join("replica-tls"), &ca, &["replica.site-b.example.com"]);
    let ptls = write_tls(&d.join("primary-tls"), &ca, &["host1.site-a.example.com"]);
    let image = d.join("root.img");
    fs::File::create(&image).unwrap().set_len(DISK).unwrap();
    let storage = d.join("replicas");
    let replica_dir = storage.join("vm1/root");
    let replica_image = replica_dir.join("disk.img");
    let socket = d.join("nbd.sock");
    let url = format!("nbd+unix:///root?socket={}", socket.display());
    let receive = receive_args("10.77.0.2:7443", &rtls, &storage, &[]);
    let _replica = agent_in(Some(&net.b.name), &receive, None, &d.join("replica.log"));
    let proxy = Netem::start(Some(&net.a.path()), "10.77.0.2:7443".parse::<SocketAddr>().unwrap());
    let serve = serve_args(&image, &socket, &proxy.addr.to_string(), &ptls, &["--metrics", "127.0.0.1:9090"]);
    let _primary = agent_in(Some(&net.a.name), &serve, None, &d.join("primary.log"));
    let mut acked = write(&url, 0, 64, 0);
    converge(d, &image, &replica_image, "the first copy", 60);
    let mut report = Vec::new();

    // 1. A partition of 10 s: nothing passes either way. The primary keeps
    // logging, its cycles fail (its pings go unanswered: the connection is
    // given up, not waited on); within two intervals of the heal the replica
    // has caught up. (Before the pings, TCP's back-off made a 30 s partition
    // cost 26 s after the heal.)
    let last_ok = net.metric("vmreplica_agent_last_replication_timestamp_seconds");
    let missed = net.metric("vmreplica_agent_replication_cycles_total{disk=\"root\",result=\"missed\"");
    net.rule("-A", &["-j", "DROP"]);
    acked += write(&url, 64, 32, 1);
    let partition = std::env::var("PARTITION_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    std::thread::sleep(Duration::from_secs(partition));
    assert_ne!(
        fs::read(&replica_image).unwrap(),
        fs::read(&image).unwrap(),
        "the partition let writes through"
    );
    let stalled = net.metric("vmreplica_agent_last_replication_timestamp_seconds");
    assert!(stalled - last_ok < 2.0, "a cycle succeeded across the partition ({last_ok} -> {stalled})");
    net.rule("-D", &["-j", "DROP"]);
    let healed = converge(d, &image, &replica_image, "convergence after the partition", 120);
    report.push(format!("partition {partition} s: converged {:.1} s after the heal", healed.as_secs_f64()));
    assert!(
        net.metric("vmreplica_agent_replication_cycles_total{disk=\"root\",result=\"missed\"") > missed,
        "no cycle failed during the partition"
    );
    // Two intervals, and a second for the new connection's handshake.
    assert!(healed <= 2 * INTERVAL + Duration::from_secs(1), "{healed:?} after the heal");
    assert!(net.metric("vmreplica_agent_last_replication_timestamp_seconds") > stalled);

    // 2. 10% packet loss each way: slower, still byte-equal.
    let loss = ["-m", "statistic", "--mode", "random", "--probability", "0.1", "-j", "DROP"];
    net.rule("-A", &loss);
    let mut rng = Rng(0x5eed);
    acked += write_random(&url, d, 96, 128, &mut rng);
    let lossy = converge(d, &image, &replica_image, "convergence under 10% loss", 180);
    report.push(format!("10% loss: 8 MiB converged in {:.1} s", lossy.as_secs_f64()));
    net.rule("-D", &loss);

    // 3. 50 ms each way and a 2 MiB/s cap: 8 MiB of random data takes at
    // least the 4 s the cap allows, and arrives.
    proxy.set_delay(Duration::from_millis(50));
    proxy.set_rate(2 * MIB);
    let (before, points_before) = positions(&replica_dir);
    acked += write_random(&url, d, 224, 128, &mut rng);
    let capped = converge(d, &image, &replica_image, "convergence under latency and a cap", 180);
    report.push(format!("50 ms + 2 MiB/s: 8 MiB converged in {:.1} s", capped.as_secs_f64()));
    assert!(capped > Duration::from_secs(3), "the cap did not hold: {capped:?}");

    // 4. Connections cut mid-transfer, five times (16 MiB at 2 MiB/s is
    // still on its way at each cut): each broken stream is sent again from
    // its first sequence; nothing is applied twice.
    let connections = proxy.accepted();
    let writer = {
        let (url, d) = (url.clone(), d.to_owned());
        std::thread::spawn(move || write_random(&url, &d, 352, 256, &mut Rng(0xc0ffee)))
    };
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(1500));
        proxy.reset();
    }
    acked += writer.join().unwrap();
    proxy.set_delay(Duration::ZERO);
    proxy.set_rate(0);
    let reset = converge(d, &image, &replica_image, "convergence after resets", 180);
    report.push(format!("5 resets mid-transfer: converged {:.1} s after the last", reset.as_secs_f64()));
    assert!(proxy.accepted() > connections, "the resets did not make the primary reconnect");
    assert_eq!(acked, 64 + 32 + 128 + 128 + 256, "qemu-io saw writes fail");
    let (after, points_after) = positions(&replica_dir);
    assert!(after > before, "the replica's position did not move: {before} -> {after}");
    assert!(points_after.windows(2).all(|w| w[0] < w[1]), "points out of order: {points_after:?}");
    assert!(points_before.iter().chain(&points_after).all(|&p| p <= after));
    let log = fs::read_to_string(d.join("replica.log")).unwrap();
    assert!(!log.contains("panicked"), "{log}");
    println!("network faults:\n  {}", report.join("\n  "));
}
