//! Replication between two agents on loopback with real certificates: the
//! primary's writes (through qemu-io) arrive at the replica, every recovery
//! point materialises to the primary's bytes at the same sequence, the initial
//! copy skips zeroes, and every kind of bad sender gets its own refusal with
//! nothing written.

mod common;

use std::{fs, sync::Arc, time::Instant};

use common::{net::*, *};
use vmreplica_agent::replication::shipper::{ResyncPolicy, Shipper, ShipperConfig};
use vmreplica_api::{
    replication::{
        CopyChunk, CopyStart, DiskRef, OpenRequest, SegmentChunk, SegmentStart,
        replication_client::ReplicationClient,
    },
    tls::{LiveTls, channel},
};

const MIB: u64 = 1 << 20;

fn fast() -> ShipperConfig {
    ShipperConfig { backoff: vec![std::time::Duration::from_millis(100)], ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_reach_the_replica_and_each_point_equals_the_primary_at_that_sequence() {
    let site = replica_site().await;
    // 1 MiB of data at the start of a 256 MiB disk: the rest must not travel.
    let mut content = Rng(3).bytes(MIB as usize);
    content[128 * 1024..192 * 1024].fill(0); // one zero 64 KiB block inside the data
    let p = tokio::task::spawn_blocking(move || serve_new_image(256 * MIB, &content)).await.unwrap();
    let tls = material(&site.ca, &["host1.site-a.example.com"]);
    let ship = shipper(&site, &tls, p.disk.clone(), fast(), None);
    let through = ship.sync_once().await.unwrap();
    assert_eq!(through, 0);
    let stats = ship.stats();
    assert_eq!(stats.initial_copy_bytes, MIB - 64 * 1024, "only non-zero blocks are sent");
    let replica = applied(&site, 0).await;
    assert!(identical(path_str(&replica.image()), path_str(&p.image)), "initial copy");

    let mut rng = Rng(8);
    let mut snapshots = Vec::new();
    for round in 0..4 {
        let mut cmds: Vec<String> = (0..10)
            .map(|_| {
                format!("write -P {} {} {}", rng.below(255) + 1, rng.below(250 * MIB), 1 + rng.below(300_000))
            })
            .collect();
        cmds.push(format!("write -z {} 65536", rng.below(250 * MIB)));
        cmds.push(format!("discard {} 8192", rng.below(250 * MIB)));
        let url = p.url();
        tokio::task::spawn_blocking(move || qemu_io(&url, &cmds)).await.unwrap();
        let sealed = p.disk.seal().unwrap().unwrap();
        let snap = p.dir.path().join(format!("snap{round}.img"));
        fs::copy(&p.image, &snap).unwrap();
        snapshots.push((sealed.last_seq, snap));
        assert_eq!(ship.sync_once().await.unwrap(), sealed.last_seq);
        assert!(p.disk.log_status().sealed.is_empty(), "acknowledged segments are deleted on the primary");
        let replica = applied(&site, sealed.last_seq).await;
        assert!(identical(path_str(&replica.image()), path_str(&p.image)), "round {round}");
    }
    let replica = applied(&site, snapshots.last().unwrap().0).await;
    assert_eq!(replica.state().trust_group, "finance");
    assert_eq!(replica.state().primary, "host1.site-a.example.com");
    let points = replica.points();
    assert_eq!(points.len(), 4);
    for (pt, (seq, snap)) in points.iter().zip(&snapshots) {
        assert_eq!(pt.seq, *seq);
        let out = site.storage.path().join(format!("mat-{seq}.img"));
        let r = replica.clone();
        let (s, o) = (pt.seq, out.clone());
        tokio::task::spawn_blocking(move || r.materialize(s, &o)).await.unwrap().unwrap();
        assert!(identical(path_str(&out), path_str(snap)), "point at seq {seq}");
    }
    let stats = ship.stats();
    assert_eq!(stats.segments_sent, 4);
    assert!(stats.successful_cycles >= 5 && stats.errors == 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bandwidth_limit_holds() {
    let site = replica_site().await;
    // 12 MiB of incompressible data at 4 MiB/s (1 s of burst): at least 2 s.
    let content = Rng(5).bytes(12 * MIB as usize);
    let p = tokio::task::spawn_blocking(move || serve_new_image(64 * MIB, &content)).await.unwrap();
    let tls = material(&site.ca, &["host1.site-a.example.com"]);
    let ship = shipper(&site, &tls, p.disk.clone(), fast(), Some(4 * MIB));
    let t = Instant::now();
    ship.sync_once().await.unwrap();
    let took = t.elapsed().as_secs_f64();
    assert!(took >= 2.0, "12 MiB at 4 MiB/s went in {took:.2}s");
    assert!(identical(path_str(&applied(&site, 0).await.image()), path_str(&p.image)));
}

async fn client(site: &Site, tls: &Arc<LiveTls>) -> ReplicationClient<tonic::transport::Channel> {
    ReplicationClient::new(channel(&site.addr.to_string(), REPLICA_NAME, tls).unwrap())
        .max_encoding_message_size(64 << 20)
        .max_decoding_message_size(64 << 20)
}

fn disk(vm: &str) -> Option<DiskRef> {
    Some(DiskRef { vm_id: vm.into(), disk_id: "root".into() })
}

fn files_under(dir: &std::path::Path) -> usize {
    fs::read_dir(dir)
        .map(|d| d.map(|e| e.unwrap().path()).map(|p| if p.is_dir() { 1 + files_under(&p) } else { 1 }).sum())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_sender_gets_its_own_refusal_and_nothing_is_written() {
    let site = replica_site().await;
    let root = site.storage.path().join("replicas");
    let open = |vm: &str| OpenRequest {
        disk: disk(vm),
        disk_size: 8 * MIB,
        epoch: 0,
        history: None,
        interval_seconds: 0,
        import_awaited: false,
    };

    // Not authorised: no entry matches site-c.
    let stranger = material(&site.ca, &["host1.site-c.example.com"]);
    let err = client(&site, &stranger).await.open(open("vm1")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert!(err.message().contains("no AuthorizationEntry matches host1.site-c.example.com"), "{err}");
    assert_eq!(files_under(site.storage.path()), 0, "nothing written for a stranger");

    // A certificate from another CA does not even get through TLS.
    let other_ca = vmreplica_tests::pki::Ca::new("another-ca").unwrap();
    let mut forged = material(&other_ca, &["host1.site-a.example.com"]).material();
    forged.ca_pem = site.ca.cert_pem.clone();
    let forged = LiveTls::new(forged).unwrap();
    let err = client(&site, &forged).await.open(open("vm1")).await.unwrap_err();
    // How the refused handshake surfaces depends on timing (an UnknownCA alert,
    // a closed or broken connection); it is a transport failure, never a reply.
    let refused = match err.code() {
        tonic::Code::Unavailable | tonic::Code::Cancelled => true,
        tonic::Code::Unknown => format!("{err:?}").contains("tonic::transport::Error"),
        _ => false,
    };
    assert!(refused, "{err:?}");
    assert_eq!(files_under(site.storage.path()), 0);

    // Path traversal in a name from the wire.
    let primary = material(&site.ca, &["host1.site-a.example.com"]);
    let mut c = client(&site, &primary).await;
    for bad in ["../../etc", "/etc", "a/b", ".."] {
        let err = c.open(open(bad)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad}: {err}");
        assert!(err.message().contains("is not allowed"), "{err}");
    }
    assert_eq!(files_under(site.storage.path()), 0, "nothing written for a traversal");

    // A symlink planted in the storage location cannot lead out of it.
    let outside = tempfile::tempdir().unwrap();
    fs::create_dir_all(&root).unwrap();
    std::os::unix::fs::symlink(outside.path(), root.join("vm-link")).unwrap();
    let err = c.open(open("vm-link")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert!(err.message().contains("not a plain directory"), "{err}");
    assert_eq!(files_under(outside.path()), 0, "nothing written through the symlink");

    // The finance primary creates vm1; an hr primary may not write into it.
    c.open(open("vm1")).await.unwrap();
    let hr = material(&site.ca, &["db.hr.example.com"]);
    let err = client(&site, &hr).await.open(open("vm1")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert!(err.message().contains("trust group \"finance\""), "{err}");
    let before = files_under(&root.join("vm1"));

    // A frame over the limit: refused by the transport.
    let start = CopyStart { disk: disk("vm1"), disk_size: 8 * MIB, epoch: 0, next_seq: 1 };
    let huge = CopyChunk {
        start: Some(start.clone()),
        offset: 0,
        data: vec![7; 6 << 20].into(),
        raw_len: 6 << 20,
        ..Default::default()
    };
    let err = c.push_initial_copy(tokio_stream::iter(vec![huge])).await.unwrap_err();
    assert!(matches!(err.code(), tonic::Code::ResourceExhausted | tonic::Code::OutOfRange), "{err}");

    // A zstd bomb: 1 KiB that would expand to 64 MiB, announced as 4 KiB.
    let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 19).unwrap();
    assert!(bomb.len() < 8192);
    let chunk = CopyChunk {
        start: Some(start),
        offset: 0,
        data: bomb.into(),
        compressed: true,
        raw_len: 4096,
        ..Default::default()
    };
    let err = c.push_initial_copy(tokio_stream::iter(vec![chunk])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
    assert!(err.message().contains("does not decompress to its announced 4096 bytes"), "{err}");

    // A segment before any initial copy, and one announcing an absurd length.
    let seg = |len| SegmentChunk {
        start: Some(SegmentStart { disk: disk("vm1"), first_seq: 1, last_seq: 1, epoch: 0, length: len }),
        offset: 0,
        data: vec![1; 10].into(),
        compressed: false,
        raw_len: 10,
    };
    let err = c.push_segment(tokio_stream::iter(vec![seg(10)])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("no initial copy"), "{err}");
    assert_eq!(files_under(&root.join("vm1")), before, "no refused request left a file behind");
    let replica = site.service.replica("vm1", "root").unwrap();
    assert!(!replica.state().has_copy());
}

/// GET `path` from `addr` with a minimal HTTP/1.0 request; returns the body.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"), "{out}");
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_are_exported_as_prometheus_metrics() {
    use vmreplica_agent::metrics::{Metrics, serve};
    let site = replica_site().await;
    let metrics = Metrics::new();
    site.service.set_metrics(metrics.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(metrics.clone(), listener, std::future::pending()));

    let p = tokio::task::spawn_blocking(|| serve_new_image(32 * MIB, b"boot")).await.unwrap();
    let tls = material(&site.ca, &["host1.site-a.example.com"]);
    let ship = shipper(&site, &tls, p.disk.clone(), fast(), None).with_metrics(metrics.clone());
    ship.sync_once().await.unwrap();
    let url = p.url();
    tokio::task::spawn_blocking(move || qemu_io(&url, &["write -P 7 0 2M".into()])).await.unwrap();
    let seg = p.disk.seal().unwrap().unwrap();
    ship.sync_once().await.unwrap();
    applied(&site, seg.last_seq).await;
    // A refused request counts by its code.
    let stranger = material(&site.ca, &["x.site-c.example.com"]);
    let open = OpenRequest {
        disk: disk("vm1"),
        disk_size: 32 * MIB,
        epoch: 0,
        history: None,
        interval_seconds: 0,
        import_awaited: false,
    };
    client(&site, &stranger).await.open(open).await.unwrap_err();

    let body = http_get(addr, "/metrics").await;
    let line = |name: &str| {
        body.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in\n{body}"))
            .to_owned()
    };
    let value = |name: &str| line(name).rsplit(' ').next().unwrap().parse::<f64>().unwrap();
    assert_eq!(value("vmreplica_agent_segments_sent_total{disk=\"root\",vm=\"vm1\"}"), 1.0);
    assert_eq!(
        value("vmreplica_agent_replication_cycles_total{disk=\"root\",result=\"successful\",vm=\"vm1\"}"),
        2.0
    );
    assert_eq!(
        value("vmreplica_agent_bytes_sent_total{disk=\"root\",kind=\"raw\",vm=\"vm1\"}"),
        seg.bytes as f64
    );
    let wire = value("vmreplica_agent_bytes_sent_total{disk=\"root\",kind=\"wire\",vm=\"vm1\"}");
    assert!(wire > 0.0 && wire < seg.bytes as f64, "a 2 MiB pattern compresses: {wire}");
    assert_eq!(value("vmreplica_agent_transfer_seconds_count{disk=\"root\",vm=\"vm1\"}"), 1.0);
    assert!(
        value("vmreplica_agent_pending_bytes{disk=\"root\",vm=\"vm1\"}") < 4096.0,
        "acknowledged log is gone"
    );
    assert!(value("vmreplica_agent_last_replication_timestamp_seconds{disk=\"root\",vm=\"vm1\"}") > 1.7e9);
    assert_eq!(
        value("vmreplica_agent_replica_applied_sequence{disk=\"root\",vm=\"vm1\"}"),
        seg.last_seq as f64
    );
    assert_eq!(value("vmreplica_agent_replica_recovery_points{disk=\"root\",vm=\"vm1\"}"), 1.0);
    assert_eq!(value("vmreplica_agent_refused_requests_total{code=\"PermissionDenied\"}"), 1.0);
    assert_eq!(http_get(addr, "/healthz").await, "ok");
}

/// Ships a 4 MiB segment of each of `disks` at once, each shipper limited to
/// 2 MiB/s (so transfers overlap unless something serialises them); returns
/// the most transfers the replica ran at the same time.
async fn peak_concurrency(site: &Site, primary_limit: usize) -> usize {
    let tls = material(&site.ca, &["host1.site-a.example.com"]);
    // The primary's limits, shared by its disks: transfer slots and 2 MiB/s.
    let shared = vmreplica_agent::limits::Limits::new(primary_limit, Some(2 * MIB));
    let mut shippers = Vec::new();
    let mut served = Vec::new();
    for k in 0..3u64 {
        let content = Rng(k + 1).bytes(MIB as usize);
        let vm = format!("vm{k}");
        let p =
            tokio::task::spawn_blocking(move || serve_new_image_for(&vm, 16 * MIB, &content)).await.unwrap();
        let ch = channel(&site.addr.to_string(), REPLICA_NAME, &tls).unwrap();
        let ship = vmreplica_agent::replication::shipper::Shipper::new(
            &format!("vm{k}"),
            p.disk.clone(),
            ch,
            // Uncompressed: a pattern would shrink to nothing on the wire and
            // the transfers would finish before they could overlap.
            ShipperConfig { compression: false, ..fast() },
            shared.clone(),
        );
        ship.sync_once().await.unwrap();
        let url = p.url();
        let cmds = vec!["write -P 9 2M 4M".to_string()];
        tokio::task::spawn_blocking(move || qemu_io(&url, &cmds)).await.unwrap();
        p.disk.seal().unwrap().unwrap();
        shippers.push(ship);
        served.push(p);
    }
    let svc = site.service.clone();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = done.clone();
    let watcher = tokio::spawn(async move {
        let mut peak = 0;
        while !d.load(std::sync::atomic::Ordering::Relaxed) {
            peak = peak.max(svc.limits().transfers.slots().active);
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        peak
    });
    let results = futures::future::join_all(shippers.iter().map(|s| s.sync_once())).await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    watcher.await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_the_configured_transfers_run_at_once_on_either_side() {
    // Replica limit 1: three primaries' transfers run one at a time there.
    assert_eq!(peak_concurrency(&replica_site_with(1).await, 6).await, 1);
    // Primary limit 1 (shared by its disks): one at a time, whatever the replica allows.
    assert_eq!(peak_concurrency(&replica_site_with(6).await, 1).await, 1);
    // Neither limits: they overlap (so the two checks above can fail).
    assert!(peak_concurrency(&replica_site_with(6).await, 6).await >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_point_materialises_while_replication_continues() {
    let site = replica_site().await;
    let p = tokio::task::spawn_blocking(|| serve_new_image(64 * MIB, b"base")).await.unwrap();
    let tls = material(&site.ca, &["host1.site-a.example.com"]);
    let ship = shipper(&site, &tls, p.disk.clone(), fast(), None);
    ship.sync_once().await.unwrap();
    let mut snaps = Vec::new();
    for k in 0..2u64 {
        let url = p.url();
        let cmds = vec![format!("write -P {} {}M 8M", k + 1, k * 8)];
        tokio::task::spawn_blocking(move || qemu_io(&url, &cmds)).await.unwrap();
        let seg = p.disk.seal().unwrap().unwrap();
        ship.sync_once().await.unwrap();
        applied(&site, seg.last_seq).await;
        let snap = p.dir.path().join(format!("s{k}.img"));
        fs::copy(&p.image, &snap).unwrap();
        snaps.push((seg.last_seq, snap));
    }
    // Materialise the first point while more writes are shipped and applied.
    let replica = site.service.replica("vm1", "root").unwrap();
    let out = site.storage.path().join("point1.img");
    let (r, o, seq) = (replica.clone(), out.clone(), snaps[0].0);
    let materialising = tokio::task::spawn_blocking(move || r.materialize(seq, &o));
    for k in 2..5u64 {
        let url = p.url();
        let cmds = vec![format!("write -P {} {}M 8M", k + 1, k * 8)];
        tokio::task::spawn_blocking(move || qemu_io(&url, &cmds)).await.unwrap();
        p.disk.seal().unwrap().unwrap();
        ship.sync_once().await.unwrap(); // reception is never blocked by materialising
    }
    materialising.await.unwrap().unwrap();
    assert!(identical(path_str(&out), path_str(&snaps[0].1)), "the materialised point is exact");
    let last = p.disk.log_status().next_seq - 1;
    let replica = applied(&site, last).await;
    assert!(identical(path_str(&replica.image()), path_str(&p.image)), "replication went on meanwhile");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_api_reports_statistics_and_points_over_mutual_tls() {
    use vmreplica_agent::{agent::Agent, grpc::control::serve};
    use vmreplica_api::control::{GetStatusRequest, control_client::ControlClient};
    let site = replica_site().await;
    let p = tokio::task::spawn_blocking(|| serve_new_image(32 * MIB, b"boot")).await.unwrap();
    let tls = material(&site.ca, &["host1.site-a.example.com"]);
    let ship = std::sync::Arc::new(shipper(&site, &tls, p.disk.clone(), fast(), None));
    ship.sync_once().await.unwrap();
    let url = p.url();
    tokio::task::spawn_blocking(move || qemu_io(&url, &["write -P 3 0 1M".into()])).await.unwrap();
    let seg = p.disk.seal().unwrap().unwrap();
    ship.sync_once().await.unwrap();
    applied(&site, seg.last_seq).await;

    let control = Agent::new(None, Some(site.service.clone()), vec![ship.clone()], agent_site(6));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_tls = material(&site.ca, &["agent.site-b.example.com", "127.0.0.1"]);
    let controller_name = "vmreplica-controller.vmreplica.svc";
    let names = vec![controller_name.to_owned()];
    tokio::spawn(async move {
        serve(control, listener, server_tls, names, std::future::pending()).await.unwrap()
    });
    let controller = material(&site.ca, &[controller_name]);
    let ch = channel(&addr.to_string(), "agent.site-b.example.com", &controller).unwrap();
    let status = ControlClient::new(ch).get_status(GetStatusRequest {}).await.unwrap().into_inner();

    let d = &status.primaries[0];
    assert_eq!((d.vm_id.as_str(), d.disk_id.as_str()), ("vm1", "root"));
    assert_eq!((d.segments_sent, d.successful_cycles, d.errors, d.durable_through), (1, 2, 0, seg.last_seq));
    assert_eq!(d.raw_bytes_sent, seg.bytes);
    assert!(d.wire_bytes_sent > 0 && d.last_replication_unix_ms > 1_700_000_000_000, "{d:?}");
    assert!(d.pending_bytes < 4096 && !d.resync_required, "{d:?}");
    let r = &status.replicas[0];
    assert_eq!((r.trust_group.as_str(), r.primary.as_str()), ("finance", "host1.site-a.example.com"));
    assert_eq!((r.applied_through, r.points.len()), (seg.last_seq, 1));
    assert_eq!(r.points[0].kind, "Standard");

    // Another site's agent, with a certificate from the same CA, may not
    // call the control API: not even to read, let alone promote or remove.
    use vmreplica_api::control::{PromoteRequest, RemoveReplicaRequest, SiteConfiguration};
    let before = site.service.replica("vm1", "root").unwrap().state().clone();
    let ch = channel(&addr.to_string(), "agent.site-b.example.com", &tls).unwrap();
    let mut peer = ControlClient::new(ch);
    let refused = |r: Result<(), tonic::Status>, what: &str| {
        let err = r.unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{what}: {err}");
        assert!(
            err.message().contains("admits only the controller (vmreplica-controller.vmreplica.svc)")
                && err.message().contains("host1.site-a.example.com"),
            "{what}: {err}"
        );
    };
    refused(peer.get_status(GetStatusRequest {}).await.map(drop), "GetStatus");
    let promote = PromoteRequest { vm_id: "vm1".into(), uid: "x".into(), ..Default::default() };
    refused(peer.promote(promote).await.map(drop), "Promote");
    let remove = RemoveReplicaRequest { vm_id: "vm1".into(), disk_id: "root".into() };
    refused(peer.remove_replica(remove).await.map(drop), "RemoveReplica");
    refused(peer.configure_site(SiteConfiguration::default()).await.map(drop), "ConfigureSite");
    assert_eq!(site.service.replica("vm1", "root").unwrap().state().clone(), before, "nothing changed");
    // And the controller's identity may not use the replication API.
    site.service.set_controller_names(vec![controller_name.into()]);
    let open = OpenRequest {
        disk: disk("vm1"),
        disk_size: 32 * MIB,
        epoch: 0,
        history: None,
        interval_seconds: 0,
        import_awaited: false,
    };
    let err = client(&site, &controller).await.open(open).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert!(err.message().contains("is the controller's certificate name"), "{err}");
    assert_eq!(site.service.replica("vm1", "root").unwrap().state().clone(), before, "nothing changed");

    // A client without a certificate from the site CA gets nothing.
    let other = vmreplica_tests::pki::Ca::new("other").unwrap();
    let mut stranger = material(&other, &["x"]).material();
    stranger.ca_pem = site.ca.cert_pem.clone();
    let stranger = LiveTls::new(stranger).unwrap();
    let ch = channel(&addr.to_string(), "agent.site-b.example.com", &stranger).unwrap();
    assert!(ControlClient::new(ch).get_status(GetStatusRequest {}).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vms_own_recovery_history_overrides_the_sites() {
    let site = replica_site().await;
    let tls = material(&site.ca, &["host1.site-a.example.com"]);
    // Two VMs on the site's default (every point within an hour) and one that
    // asks for the newest point only (window 0, no hourly points).
    let keep_all =
        tokio::task::spawn_blocking(|| serve_new_image_for("vm-all", 8 * MIB, &[1; 4096])).await.unwrap();
    let latest =
        tokio::task::spawn_blocking(|| serve_new_image_for("vm-latest", 8 * MIB, &[1; 4096])).await.unwrap();
    let history = vmreplica_agent::replication::shipper::History { window_seconds: 0, hourly_points: 0 };
    let ships = [
        shipper_for("vm-all", &site, &tls, keep_all.disk.clone(), fast(), None),
        shipper_for(
            "vm-latest",
            &site,
            &tls,
            latest.disk.clone(),
            ShipperConfig { history: Some(history), ..fast() },
            None,
        ),
    ];
    for ship in &ships {
        ship.sync_once().await.unwrap();
    }
    for round in 0..3u64 {
        for (p, ship) in [&keep_all, &latest].into_iter().zip(&ships) {
            let url = p.url();
            let cmd = vec![format!("write -P {} {} 4096", round + 2, round * 65536)];
            tokio::task::spawn_blocking(move || qemu_io(&url, &cmd)).await.unwrap();
            p.disk.seal().unwrap().unwrap();
            ship.sync_once().await.unwrap();
        }
    }
    let points = |vm: &str| site.service.replica(vm, "root").unwrap().points();
    let seq_latest = latest.disk.log_status().next_seq - 1;
    let newest = |vm: &str| points(vm).last().map(|p| p.seq);
    let seq_all = keep_all.disk.log_status().next_seq - 1;
    // Retention runs just after a segment is applied: wait for the newest
    // point and for the pruning that follows it (the asserts below then fail
    // if pruning never came or went too far).
    wait_until(|| {
        newest("vm-latest") == Some(seq_latest)
            && newest("vm-all") == Some(seq_all)
            && points("vm-latest").len() == 1
    })
    .await;
    assert_eq!(points("vm-all").len(), 3, "the site's default keeps every point of the hour");
    assert_eq!(points("vm-latest").len(), 1, "{:?}", points("vm-latest"));
    assert_eq!(points("vm-latest")[0].seq, seq_latest, "only the newest point is kept");
    let state = site.service.replica("vm-latest", "root").unwrap().state().clone();
    assert_eq!(state.history, Some(vmreplica_agent::replica::retention::Policy { window_ms: 0, hourly: 0 }));
}

async fn wait_until(mut f: impl FnMut() -> bool) {
    for _ in 0..100 {
        if f() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("condition not reached in 10 s");
}

/// Extended replication: site B forwards the segments it applied to site C
/// (after an initial copy of its replica image), at its own pace, and C ends
/// up with exactly the primary's bytes and a point per forwarded segment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_forwards_what_it_applied_to_an_extended_replica() {
    let (b, c) = (replica_site().await, replica_site().await);
    let content = Rng(21).bytes(MIB as usize);
    let p = tokio::task::spawn_blocking(move || serve_new_image(64 * MIB, &content)).await.unwrap();
    let a_to_b = shipper(&b, &material(&b.ca, &["host1.site-a.example.com"]), p.disk.clone(), fast(), None);
    let mut rng = Rng(22);
    let mut write_round = async |k: u64| {
        let cmds: Vec<String> = (0..6)
            .map(|_| format!("write -P {} {} {}", k + 1, rng.below(60 * MIB), 1 + rng.below(200_000)))
            .collect();
        let url = p.url();
        tokio::task::spawn_blocking(move || qemu_io(&url, &cmds)).await.unwrap();
        let seal = p.disk.seal().unwrap().unwrap();
        assert_eq!(a_to_b.sync_once().await.unwrap(), seal.last_seq);
        seal.last_seq
    };
    a_to_b.sync_once().await.unwrap();
    let first = write_round(0).await;
    let at_b = applied(&b, first).await;

    // B's agent, trusted at C as a primary of site A's names.
    let tls_b = material(&c.ca, &["agent.site-a.example.com"]);
    let ch = channel(&c.addr.to_string(), REPLICA_NAME, &tls_b).unwrap();
    let b_to_c = Shipper::forwarding(at_b.clone(), ch, fast(), vmreplica_agent::limits::Limits::new(6, None));
    // First sync: an initial copy of B's image, as of what B applied.
    assert_eq!(b_to_c.sync_once().await.unwrap(), first);
    assert!(at_b.state().forward, "B keeps what it applies from now on");

    let mut last = first;
    for k in 1..4 {
        last = write_round(k).await;
        applied(&b, last).await;
        // Kept once applied: the point is recorded (what `applied` sees)
        // just before the segment moves to forward/.
        wait_until(|| at_b.forward_sealed().unwrap().last().map(|s| s.last_seq) == Some(last)).await;
        assert_eq!(at_b.forward_sealed().unwrap().last().map(|s| s.last_seq), Some(last), "kept for C");
        // B forwards at its own pace: every other round, two segments at once.
        if k % 2 == 0 {
            assert_eq!(b_to_c.sync_once().await.unwrap(), last);
            assert!(at_b.forward_sealed().unwrap().is_empty(), "acknowledged segments are deleted at B");
        }
    }
    assert_eq!(b_to_c.sync_once().await.unwrap(), last);
    let at_c = wait_for(&c, "vm1", last).await;
    assert!(identical(path_str(&at_c.image()), path_str(&p.image)), "C holds the primary's bytes");
    assert_eq!(at_c.state().primary, "agent.site-a.example.com", "C's sender is B's agent");
    assert_eq!(
        at_c.points().iter().map(|pt| pt.seq).collect::<Vec<_>>(),
        at_b.points().iter().map(|pt| pt.seq).filter(|&s| s > first).collect::<Vec<_>>(),
        "a point at C for every segment forwarded after the copy"
    );
    assert_eq!(b_to_c.stats().segments_sent, 3);

    // A starts over with B (replication removed and enabled again: a new
    // initial copy). What B kept for C belongs to the old history; C gets a
    // new copy of B's image, then the new history's segments.
    at_b.mark_removed().unwrap();
    let ahead = write_round(5).await;
    assert!(at_b.forward_sealed().unwrap().is_empty(), "the old history's segments are gone");
    let copies = at_c.state().stats.segments;
    assert_eq!(b_to_c.sync_once().await.unwrap(), at_b.state().applied_through);
    assert!(b_to_c.stats().initial_copy_bytes > MIB, "a second copy went to C");
    let last = write_round(6).await;
    applied(&b, last).await;
    assert_eq!(b_to_c.sync_once().await.unwrap(), last);
    let at_c = wait_for(&c, "vm1", last).await;
    assert!(identical(path_str(&at_c.image()), path_str(&p.image)), "C follows B's new history");
    assert!(ahead < last && at_c.state().stats.segments > copies);

    // Stopping extended replication drops what B kept and keeps nothing more.
    at_b.set_forward(false).unwrap();
    let after = write_round(9).await;
    applied(&b, after).await;
    assert!(at_b.forward_sealed().unwrap().is_empty());
}

/// Waits until `site`'s replica of `vm`/root has applied through `seq`.
async fn wait_for(site: &Site, vm: &str, seq: u64) -> std::sync::Arc<vmreplica_agent::replica::ReplicaDisk> {
    for _ in 0..400 {
        if let Some(r) = site.service.replica(vm, "root").filter(|r| r.state().applied_through >= seq) {
            return r;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("{vm} never applied through {seq}");
}

/// Failover A→B with extended replication to C: B's promoted log continues
/// the numbering of A's log under a new epoch. C, one segment behind at the
/// failover, holds another history than B's new log: it is refused with
/// ResyncRequired and nothing is deleted at B. Once B forwards what it kept
/// for C, C follows B without a copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_the_extended_replica_follows_the_new_primary() {
    let (b, c) = (replica_site().await, replica_site().await);
    let p = tokio::task::spawn_blocking(|| serve_new_image(32 * MIB, &[7; 65536])).await.unwrap();
    let a_to_b = shipper(&b, &material(&b.ca, &["host1.site-a.example.com"]), p.disk.clone(), fast(), None);
    let sem = vmreplica_agent::limits::Limits::new(6, None);
    let to_c = || channel(&c.addr.to_string(), REPLICA_NAME, &material(&c.ca, &["agent.site-a.example.com"]));
    let write = async |url: String, k: u64| {
        let cmds = vec![format!("write -P {k} {} 8192", k * 1_000_000)];
        tokio::task::spawn_blocking(move || qemu_io(&url, &cmds)).await.unwrap();
    };
    a_to_b.sync_once().await.unwrap();
    let at_b = applied(&b, 0).await;
    let b_to_c = Shipper::forwarding(at_b.clone(), to_c().unwrap(), fast(), sem.clone());
    b_to_c.sync_once().await.unwrap();
    for k in 1..=3 {
        write(p.url(), k).await;
        let seal = p.disk.seal().unwrap().unwrap();
        a_to_b.sync_once().await.unwrap();
        applied(&b, seal.last_seq).await;
        if k < 3 {
            b_to_c.sync_once().await.unwrap(); // C misses the last one
        }
    }
    let n = at_b.state().applied_through;
    let c_before = fs::read(wait_for(&c, "vm1", n - 1).await.image()).unwrap();

    // Planned failover A→B: A stopped after its last segment; B promotes and
    // serves its image, logging from n + 1 under epoch 1.
    let image = at_b.promote().unwrap();
    assert_eq!(at_b.state().epoch, 1);
    vmreplica_agent::node::disks::fresh_log("vm1", "root", &image, 1, n + 1).unwrap();
    let served = tokio::task::spawn_blocking(move || serve_image("vm1", &image)).await.unwrap();
    write(served.url(), 9).await;
    let seal = served.disk.seal().unwrap().unwrap();
    assert_eq!(seal.first_seq, n + 1, "the promoted log continues A's numbering");
    let resume = Shipper::new("vm1", served.disk.clone(), to_c().unwrap(), fast(), sem.clone())
        .with_epoch(1)
        .with_log_start(n + 1);

    // C stopped one segment short of what B's image holds: another history
    // for B's new log. With automatic resynchronisation off it is refused,
    // and B keeps its segment (acknowledging C's position would have dropped it).
    resume.set_resync_policy(ResyncPolicy { automatic: false, ..Default::default() });
    let err = resume.sync_once().await.unwrap_err();
    assert_eq!(err.kind(), vmreplica_api::control::FailureKind::ResyncRequired, "{err}");
    assert!(err.to_string().contains("another history"), "{err}");
    assert_eq!(served.disk.log_status().sealed.len(), 1, "nothing deleted at B");
    assert_eq!(fs::read(c.service.replica("vm1", "root").unwrap().image()).unwrap(), c_before);

    // With it on, C is resynchronised to B's image by hash tree (no copy),
    // then follows B's log: the new epoch, B's write.
    resume.set_resync_policy(ResyncPolicy::default());
    assert_eq!(resume.sync_once().await.unwrap(), seal.last_seq);
    let r = resume.stats().last_resync.expect("a resync healed C");
    assert!(!r.dirty_map && r.changed_bytes > 0, "{r:?}");
    assert_eq!(resume.stats().initial_copy_bytes, 0);
    let at_c = wait_for(&c, "vm1", seal.last_seq).await;
    assert!(identical(path_str(&at_c.image()), path_str(&served.image)), "C holds B's bytes");
    assert_eq!(at_c.state().epoch, 1);
}

/// A sealed segment that changed on the primary's disk after sealing (a bit
/// flip at rest): the replica refuses it, the primary then finds its own
/// copy damaged, sets it aside (never sent whole, never applied anywhere),
/// and the replica is resynchronised from the image instead of being sent
/// the same damaged bytes forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_damaged_at_rest_on_the_primary_is_set_aside_and_a_resync_heals() {
    use std::os::unix::fs::FileExt;
    let site = replica_site().await;
    let p = tokio::task::spawn_blocking(|| serve_new_image(64 << 20, b"base")).await.unwrap();
    let tls = material(&site.ca, &["host1.site-a.example.com"]);
    let ship = shipper(&site, &tls, p.disk.clone(), ShipperConfig::default(), None);
    ship.sync_once().await.unwrap();
    let write = |cmds: Vec<String>| {
        let url = p.url();
        tokio::task::spawn_blocking(move || qemu_io(&url, &cmds))
    };
    write(vec!["write -P 1 0 2M".into(), "write -P 2 8M 1M".into()]).await.unwrap();
    let damaged = p.disk.seal().unwrap().unwrap();
    write(vec!["write -P 3 16M 1M".into()]).await.unwrap();
    let later = p.disk.seal().unwrap().unwrap();
    // One bit, in the middle of the first segment's data.
    let f = fs::OpenOptions::new().read(true).write(true).open(&damaged.path).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, damaged.bytes / 2).unwrap();
    f.write_all_at(&[b[0] ^ 0x10], damaged.bytes / 2).unwrap();
    drop(f);

    let err = ship.sync_once().await.unwrap_err();
    assert!(err.to_string().contains("is damaged on this disk"), "{err}");
    assert_eq!(err.kind(), vmreplica_api::control::FailureKind::LocalDisk);
    assert!(!damaged.path.exists() && damaged.path.with_extension("damaged").exists());
    let replica = site.service.replica("vm1", "root").unwrap();
    assert_eq!(replica.state().received_through, 0, "nothing of the damaged segment was taken");
    let log: Vec<u64> = p.disk.log_status().sealed.iter().map(|s| s.first_seq).collect();
    assert_eq!(log, vec![later.first_seq]);

    // The next cycle finds the gap and resynchronises from the image.
    assert_eq!(ship.sync_once().await.unwrap(), later.last_seq);
    let r = applied(&site, later.last_seq).await;
    assert!(ship.stats().last_resync.is_some_and(|s| s.changed_bytes > 0));
    assert!(identical(path_str(&r.image()), path_str(&p.image)));
}
