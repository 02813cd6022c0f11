//! Faults on the wire between two agents: a tampered chunk is refused and the
//! segment re-sent; a stream cut short is resumed from the same sequence; an
//! unreachable replica is retried on the back-off schedule. Fail points
//! are process-wide, so this file holds one test.

mod common;

use std::time::Duration;

use common::{net::*, *};
use vmreplica_agent::{failpoint, replication::shipper::ShipperConfig};

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_and_cut_streams_are_refused_then_recovered_and_failures_back_off() {
    let site = replica_site().await;
    let p = tokio::task::spawn_blocking(|| serve_new_image(64 * MIB, b"base")).await.unwrap();
    let tls = material(&site.ca, &["host1.site-a.example.com"]);
    let cfg = ShipperConfig { backoff: vec![Duration::from_millis(100)], ..Default::default() };
    let ship = shipper(&site, &tls, p.disk.clone(), cfg.clone(), None);
    ship.sync_once().await.unwrap();

    let write = |cmds: Vec<String>| {
        let url = p.url();
        tokio::task::spawn_blocking(move || qemu_io(&url, &cmds))
    };
    write(vec!["write -P 1 0 3M".into(), "write -P 2 10M 2M".into()]).await.unwrap();
    let seg = p.disk.seal().unwrap().unwrap();

    // Tampered in flight: the replica's verification refuses it, nothing applies.
    failpoint::arm_once("ship.tamper-chunk");
    let err = ship.sync_once().await.unwrap_err();
    assert!(err.to_string().contains("failed verification"), "{err}");
    assert_eq!(p.disk.log_status().sealed.len(), 1, "kept on the primary until acknowledged");
    let replica = site.service.replica("vm1", "root").unwrap();
    assert_eq!(replica.state().received_through, 0);
    // Re-sent intact.
    assert_eq!(ship.sync_once().await.unwrap(), seg.last_seq);
    applied(&site, seg.last_seq).await;
    assert!(identical(path_str(&replica.image()), path_str(&p.image)));

    // Cut short mid-segment: refused as incomplete, resumed at the same sequence.
    write(vec!["write -P 3 20M 3M".into()]).await.unwrap();
    let seg = p.disk.seal().unwrap().unwrap();
    failpoint::arm_once("ship.cut-stream");
    let err = ship.sync_once().await.unwrap_err();
    assert!(err.to_string().contains("announced"), "{err}");
    assert_eq!(replica.next_seq(), Some(seg.first_seq));
    assert_eq!(ship.sync_once().await.unwrap(), seg.last_seq);
    applied(&site, seg.last_seq).await;
    assert!(identical(path_str(&replica.image()), path_str(&p.image)));
    failpoint::disarm_all();

    // An unreachable replica: the run loop keeps retrying on the back-off schedule.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let ch = vmreplica_api::tls::channel(&dead_addr.to_string(), REPLICA_NAME, &tls).unwrap();
    let lost = vmreplica_agent::replication::shipper::Shipper::new(
        "vm1",
        p.disk.clone(),
        ch,
        cfg,
        vmreplica_agent::limits::Limits::new(1, None),
    );
    let vm = vmreplica_agent::replication::cycle::VmReplication::new(
        vec![std::sync::Arc::new(lost)],
        Duration::from_millis(50),
        vec![Duration::from_millis(100)],
        None,
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let runner = tokio::spawn(async move { vm.run(stopped).await.shippers()[0].stats() });
    tokio::time::sleep(Duration::from_millis(600)).await;
    stop.send(true).unwrap();
    let stats = runner.await.unwrap();
    assert!(stats.errors >= 3, "retried with back-off: {stats:?}");
    assert!(stats.last_error.as_deref().is_some_and(|e| e.contains("unavailable")), "{stats:?}");
    assert_eq!(stats.successful_cycles, 0);
}
