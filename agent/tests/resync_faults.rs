//! A resync cut short at each step a crash can interrupt on the replica
//! (fail points, in a test binary of their own): the replica never claims
//! to be consistent meanwhile, its newest recovery point materialises byte
//! for byte as it was before the resync (what a failover during the resync
//! gets), and the next cycle resyncs again to byte equality.

mod common;

use std::{fs, os::unix::fs::FileExt};

use common::{net::*, *};
use vmreplica_agent::{
    failpoint,
    replication::shipper::{ResyncPolicy, ShipperConfig},
};

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_cut_short_anywhere_keeps_the_point_and_finishes_next_time() {
    let site = replica_site().await;
    let content = Rng(21).bytes(24 * MIB as usize);
    let p = tokio::task::spawn_blocking(move || serve_new_image(32 * MIB, &content)).await.unwrap();
    let tls = material(&site.ca, &["host1.site-a.example.com"]);
    let cfg = ShipperConfig { compression: false, ..Default::default() };
    let ship = shipper(&site, &tls, p.disk.clone(), cfg, None);
    ship.sync_once().await.unwrap();
    let url = p.url();
    tokio::task::spawn_blocking(move || qemu_io(&url, &["write -P 9 3M 4k".into()])).await.unwrap();
    let seg = p.disk.seal().unwrap().unwrap();
    ship.sync_once().await.unwrap();
    let replica = applied(&site, seg.last_seq).await;
    let point = replica.points().last().unwrap().seq;

    for (round, fail) in
        ["resync.batch-durable", "apply.after-undo", "resync.batch-applied"].iter().enumerate()
    {
        // The replica drifts again: 12 leaves.
        let f = fs::OpenOptions::new().write(true).open(replica.image()).unwrap();
        let mut rng = Rng(round as u64 + 40);
        for _ in 0..12 {
            f.write_all_at(&rng.bytes(4096), rng.below(30 * MIB / 4096) * 4096).unwrap();
        }
        drop(f);
        // What the newest point is now (it was cut before any drift in this
        // round was applied by a resync: the drift is the replica's own).
        let before = site.storage.path().join(format!("before-{round}.img"));
        replica.materialize(point, &before).unwrap();

        failpoint::arm_once(fail);
        ship.set_resync_policy(ResyncPolicy { requested: Some(format!("r{round}")), ..Default::default() });
        let err = ship.sync_once().await.unwrap_err().to_string();
        assert!(err.contains(fail) || err.contains("failpoint"), "{fail}: {err}");
        assert!(replica.resyncing(), "{fail}: the replica does not claim to be consistent");

        // A failover now would get the newest point: exactly as before.
        let during = site.storage.path().join(format!("during-{round}.img"));
        replica.materialize(point, &during).unwrap();
        assert!(identical(path_str(&during), path_str(&before)), "{fail}: the point mid-resync");

        // The next cycle resyncs again, to equality.
        ship.sync_once().await.unwrap();
        assert!(!replica.resyncing());
        assert!(identical(path_str(&p.image), path_str(&replica.image())), "{fail}: equal after");
        let after = site.storage.path().join(format!("after-{round}.img"));
        replica.materialize(point, &after).unwrap();
        assert!(identical(path_str(&after), path_str(&before)), "{fail}: the point after");
    }
}
