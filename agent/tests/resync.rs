//! Resynchronisation between two agents on loopback (real shipper, real
//! replica service, mutual TLS): a replica that drifted is brought back by
//! hash tree sending about what differs; a log that overflowed is healed by
//! its dirty map; the replica's newest point stays exact throughout; a
//! resync waits for its window unless requested.

mod common;

use std::{fs, os::unix::fs::FileExt, path::Path};

use common::{net::*, *};
use vmreplica_agent::replication::shipper::{ResyncPolicy, Shipper, ShipperConfig};

const MIB: u64 = 1 << 20;
const LEAF: u64 = 4096;

fn plain() -> ShipperConfig {
    // Uncompressed: bytes on the wire are bytes of the disk, so they can be counted.
    ShipperConfig {
        compression: false,
        backoff: vec![std::time::Duration::from_millis(100)],
        ..Default::default()
    }
}

fn request(ship: &Shipper, id: &str) {
    ship.set_resync_policy(ResyncPolicy { requested: Some(id.into()), ..Default::default() });
}

/// Writes one random leaf at each of `leaves` (leaf indexes) of the file at `path`.
fn scribble(path: &Path, leaves: &[u64], seed: u64) {
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    let mut rng = Rng(seed);
    for l in leaves {
        f.write_all_at(&rng.bytes(LEAF as usize), l * LEAF).unwrap();
    }
    f.sync_all().unwrap();
}

/// `n` distinct leaf indexes below `within`.
fn distinct(n: usize, within: u64, seed: u64) -> Vec<u64> {
    let mut rng = Rng(seed);
    let mut out = Vec::new();
    while out.len() < n {
        let l = rng.below(within);
        if !out.contains(&l) {
            out.push(l);
        }
    }
    out
}

/// A replica site and a primary disk of `size` bytes holding `data` random
/// bytes (from `seed`), copied over by its shipper (uncompressed).
async fn copied(
    size: u64,
    data: u64,
    seed: u64,
) -> (Site, Served, std::sync::Arc<vmreplica_api::tls::LiveTls>, Shipper) {
    let site = replica_site().await;
    let content = Rng(seed).bytes(data as usize);
    let p = tokio::task::spawn_blocking(move || serve_new_image(size, &content)).await.unwrap();
    let tls = material(&site.ca, &["host1.site-a.example.com"]);
    let ship = shipper(&site, &tls, p.disk.clone(), plain(), None);
    ship.sync_once().await.unwrap();
    (site, p, tls, ship)
}

/// Runs one qemu-io `cmd` at the primary, seals and ships it: the sealed
/// segment's last sequence.
async fn write_and_ship(p: &Served, ship: &Shipper, cmd: &str) -> u64 {
    let (url, cmd) = (p.url(), cmd.to_owned());
    tokio::task::spawn_blocking(move || qemu_io(&url, &[cmd])).await.unwrap();
    let last = p.disk.seal().unwrap().unwrap().last_seq;
    ship.sync_once().await.unwrap();
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_drifted_gets_only_the_leaves_that_differ_and_keeps_its_point() {
    let (site, p, _tls, ship) = copied(64 * MIB, 40 * MIB, 11).await;
    // A first point at the replica.
    let last = write_and_ship(&p, &ship, "write -P 5 1M 64k").await;
    let replica = applied(&site, last).await;
    let point = replica.points().last().unwrap().seq;

    // 37 leaves of the replica change behind its back (a restored backup, a
    // bit of another history): it holds something the primary never had.
    let image = replica.image();
    let leaves = distinct(37, 60 * MIB / LEAF, 5);
    // Those past the primary's 40 MiB of data are zeros there: sent as such, no payload.
    let with_data = leaves.iter().filter(|l| **l * LEAF < 40 * MIB).count() as u64;
    scribble(&image, &leaves, 99);
    let drifted = site.storage.path().join("drifted.img");
    fs::copy(&image, &drifted).unwrap();
    assert!(!identical(path_str(&p.image), path_str(&image)));

    request(&ship, "drift-1");
    ship.sync_once().await.unwrap();
    let done = ship.stats().last_resync.expect("a resync finished");
    assert_eq!((done.id.as_str(), done.dirty_map), ("drift-1", false));
    assert_eq!(done.changed_bytes, 37 * LEAF, "exactly the leaves that differ are brought over");
    assert_eq!(done.data_bytes, with_data * LEAF, "zeros travel as such");
    // Hashes: one per window, the block hashes of differing windows, 16 leaf
    // hashes per differing block, and the messages' framing.
    assert!(done.wire_bytes < 37 * LEAF + 64 * 1024, "hashes and framing: {done:?}");
    assert!(identical(path_str(&p.image), path_str(&image)), "the replica equals the primary");

    // The newest point before the resync is still exactly what it was.
    let out = site.storage.path().join("point.img");
    replica.materialize(point, &out).unwrap();
    assert!(identical(path_str(&out), path_str(&drifted)), "the pre-resync point, byte for byte");

    // Replication goes on from the resync; the next point chains back through it.
    let url = p.url();
    tokio::task::spawn_blocking(move || qemu_io(&url, &["write -P 6 2M 64k".into()])).await.unwrap();
    let seg = p.disk.seal().unwrap().unwrap();
    ship.sync_once().await.unwrap();
    applied(&site, seg.last_seq).await;
    assert!(identical(path_str(&p.image), path_str(&image)));
    fs::remove_file(&out).unwrap();
    replica.materialize(point, &out).unwrap();
    assert!(identical(path_str(&out), path_str(&drifted)), "still reachable after the next point");
    // The same request id again does nothing.
    ship.sync_once().await.unwrap();
    assert_eq!(ship.stats().last_resync.unwrap(), done);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_overflowed_is_healed_by_its_dirty_map_sending_about_the_dirty_bytes() {
    let site = replica_site().await;
    // 32 MiB: the log may hold 16 MiB before only the dirty map records changes.
    let p = tokio::task::spawn_blocking(|| serve_new_image(32 * MIB, &[1; 4096])).await.unwrap();
    let tls = material(&site.ca, &["host1.site-a.example.com"]);
    let ship = shipper(&site, &tls, p.disk.clone(), plain(), None);
    ship.sync_once().await.unwrap();
    applied(&site, 0).await;
    // The replica is out of reach while 20 x 1 MiB are written, at 64 KiB-aligned
    // places: the log passes half the disk.
    let url = p.url();
    let cmds: Vec<String> = (0..20).map(|k| format!("write -P {} {}M 1M", k + 10, k + 6)).collect();
    tokio::task::spawn_blocking(move || qemu_io(&url, &cmds)).await.unwrap();
    assert!(p.disk.resync_required(), "the log overflowed into the dirty map");

    // Back in reach: a resync sends the dirty blocks, and nothing is hashed.
    ship.sync_once().await.unwrap();
    let done = ship.stats().last_resync.expect("a resync finished");
    assert!(done.dirty_map, "{done:?}");
    assert_eq!(done.data_bytes, 20 * MIB, "the dirty bytes, no more");
    let replica = site.service.replica("vm1", "root").unwrap();
    assert!(identical(path_str(&p.image), path_str(&replica.image())));
    assert!(!p.disk.resync_required(), "logging resumed");
    // And replication goes on by log.
    let url = p.url();
    tokio::task::spawn_blocking(move || qemu_io(&url, &["write -P 77 0 4k".into()])).await.unwrap();
    let seg = p.disk.seal().unwrap().unwrap();
    ship.sync_once().await.unwrap();
    applied(&site, seg.last_seq).await;
    assert!(identical(path_str(&p.image), path_str(&replica.image())));

    // Away again: 17 MiB rewritten with what was already there, and 4 leaves
    // with something new. The map names 17 MiB of blocks; only the 4 leaves
    // that differ travel (the dirty blocks are hashed on both sides, nothing else).
    let url = p.url();
    let mut cmds: Vec<String> = (0..17).map(|k| format!("write -P {} {}M 1M", k + 10, k + 6)).collect();
    cmds.extend((0..4).map(|k| format!("write -P 200 {} 4k", (k * 4 + 7) * MIB + 8192)));
    tokio::task::spawn_blocking(move || qemu_io(&url, &cmds)).await.unwrap();
    assert!(p.disk.resync_required());
    ship.sync_once().await.unwrap();
    let done = ship.stats().last_resync.unwrap();
    assert!(done.dirty_map, "{done:?}");
    assert_eq!((done.changed_bytes, done.data_bytes), (4 * LEAF, 4 * LEAF), "{done:?}");
    // The 17 MiB's leaf hashes (16 bytes per 4 KiB) and framing, besides the data.
    assert!(done.wire_bytes < 4 * LEAF + 17 * MIB / 256 + 32 * 1024, "{done:?}");
    assert!(identical(path_str(&p.image), path_str(&replica.image())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_needed_resync_waits_for_its_window_and_runs_at_once_when_requested() {
    let site = replica_site().await;
    let p = tokio::task::spawn_blocking(|| serve_new_image(32 * MIB, &[2; 4096])).await.unwrap();
    let tls = material(&site.ca, &["host1.site-a.example.com"]);
    let ship = shipper(&site, &tls, p.disk.clone(), plain(), None);
    ship.sync_once().await.unwrap();
    let url = p.url();
    let cmds: Vec<String> = (0..18).map(|k| format!("write -P 3 {k}M 1M")).collect();
    tokio::task::spawn_blocking(move || qemu_io(&url, &cmds)).await.unwrap();
    assert!(p.disk.resync_required());
    // A window that is never now: 24 hours minus the one we are in.
    let now_min = (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
        % 86_400
        / 60) as u16;
    let (from, to) = ((now_min + 60) % 1440, (now_min + 1380) % 1440);
    ship.set_resync_policy(ResyncPolicy { window: Some((from, to)), ..Default::default() });
    let err = ship.sync_once().await.unwrap_err().to_string();
    assert!(err.contains("automatic resynchronisation runs") && err.contains("UTC"), "{err}");
    assert!(ship.stats().resync_waiting.is_some());
    assert!(p.disk.resync_required(), "nothing changed while waiting");
    // Off entirely: it says how to start one.
    ship.set_resync_policy(ResyncPolicy { automatic: false, ..Default::default() });
    let err = ship.sync_once().await.unwrap_err().to_string();
    assert!(err.contains("spec.resynchronize"), "{err}");
    // A request runs at once, whatever the window.
    ship.set_resync_policy(ResyncPolicy {
        window: Some((from, to)),
        requested: Some("now".into()),
        ..Default::default()
    });
    ship.sync_once().await.unwrap();
    assert_eq!(ship.stats().last_resync.unwrap().id, "now");
    assert!(ship.stats().resync_waiting.is_none());
    let replica = site.service.replica("vm1", "root").unwrap();
    assert!(identical(path_str(&p.image), path_str(&replica.image())));
}

/// The old primary's own disk, set aside when the side that took the VM
/// over replicates back onto it: the resync of another history brings it
/// to the new primary's bytes, and what it held (writes that never reached
/// the other side) stays a diverged point — exact through the resync, the
/// points after it and their pruning, written out when the disk is
/// promoted, and gone once discarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_set_aside_keeps_what_it_held_as_a_diverged_point() {
    let (site, p, _tls, ship) = copied(16 * MIB, 8 * MIB, 21).await;
    let last = write_and_ship(&p, &ship, "write -P 5 1M 64k").await;
    let replica = applied(&site, last).await;

    // Its own writes, then set aside as of its own log's sequence 1000 (a
    // history the primary's log does not hold).
    let image = replica.image();
    let leaves = distinct(9, 16 * MIB / LEAF, 8);
    scribble(&image, &leaves, 31);
    let expected = site.storage.path().join("diverged-expected.img");
    fs::copy(&image, &expected).unwrap();
    let (primary, group) = {
        let s = replica.state();
        (s.primary.clone(), s.trust_group.clone())
    };
    replica.set_aside(0, primary.clone(), group.clone(), image.clone(), 1000).unwrap();
    replica
        .set_aside(0, primary.clone(), group.clone(), image.clone(), 1000)
        .expect("the same again: nothing");
    assert!(replica.points().is_empty());

    // The next cycle finds another history and resynchronises: only the
    // leaves that differ travel.
    ship.sync_once().await.unwrap();
    let done = ship.stats().last_resync.expect("a resync ran");
    assert_eq!(done.changed_bytes, 9 * LEAF, "{done:?}");
    assert!(identical(path_str(&p.image), path_str(&image)), "the disk equals the new primary's");
    let out = site.storage.path().join("diverged.img");
    let check = |why: &str| {
        let _ = fs::remove_file(&out);
        replica.materialize_diverged(&out).unwrap();
        assert!(identical(path_str(&out), path_str(&expected)), "the diverged point, byte for byte: {why}");
    };
    check("right after the resync");

    // Points after it, one of them pruned: still exact.
    for (k, at) in [(6, "2M"), (7, "3M"), (8, "4M")] {
        let url = p.url();
        tokio::task::spawn_blocking(move || qemu_io(&url, &[format!("write -P {k} {at} 64k")]))
            .await
            .unwrap();
        let seg = p.disk.seal().unwrap().unwrap();
        ship.sync_once().await.unwrap();
        applied(&site, seg.last_seq).await;
    }
    assert_eq!(replica.points().len(), 3);
    check("behind three points");
    let middle = replica.points()[1].seq;
    let oldest = replica.points()[0].seq;
    assert_eq!(replica.prune(|p| p.seq != middle).unwrap(), 1);
    check("a point between pruned");
    assert_eq!(replica.prune(|p| p.seq != oldest).unwrap(), 1);
    check("the oldest point pruned");

    // Another one cannot be set aside while this one is kept.
    let err =
        replica.set_aside(0, primary.clone(), group.clone(), image.clone(), 2000).unwrap_err().to_string();
    assert!(err.contains("already keeps a diverged point") && err.contains("Discard"), "{err}");

    // Promoted, the image may change without undo: it is written out first.
    replica.promote().unwrap();
    assert!(replica.diverged().unwrap().file.is_some());
    fs::OpenOptions::new().write(true).open(&image).unwrap().write_all_at(&[0xEE; 4096], 0).unwrap();
    check("written out at the promotion");
    assert!(replica.discard_diverged().unwrap());
    assert!(replica.diverged().is_none() && !replica.discard_diverged().unwrap());
    assert!(replica.materialize_diverged(&site.storage.path().join("none.img")).is_err());
    let files: Vec<_> = fs::read_dir(replica.dir().join("materialized")).unwrap().collect();
    assert!(files.is_empty(), "its file went with it: {files:?}");
}

/// An extended replica that got further than the point an unplanned
/// failover chose holds another history, ahead of the new primary's log:
/// the new primary (the chosen point's copy, logging under the next epoch
/// after it) resynchronises it, and what it held — its newest point — stays
/// as its diverged point, the older points folded into it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_ahead_of_the_point_a_failover_chose_keeps_its_newest_point_as_diverged() {
    use vmreplica_agent::{disk::log_dir_for, node::disks::fresh_log};
    let (site, p, tls, ship) = copied(16 * MIB, 4 * MIB, 41).await;
    let mut last = 0;
    for k in 0..4u64 {
        last = write_and_ship(&p, &ship, &format!("write -P {} {}M 64k", 10 + k, k + 5)).await;
    }
    let replica = applied(&site, last).await;
    assert_eq!(replica.points().len(), 4);
    let ahead = site.storage.path().join("ahead.img");
    fs::copy(replica.image(), &ahead).unwrap();

    // The failover chose the second point; the VM runs on its copy, which
    // logs under epoch 1 after it, and writes.
    let chosen = replica.points()[1].seq;
    let b = tempfile::tempdir().unwrap();
    let copy = b.path().join("root.img");
    replica.materialize(chosen, &copy).unwrap();
    fresh_log("vm1", "root", &copy, 1, chosen + 1).unwrap();
    assert!(log_dir_for(&copy).exists());
    let b_disk = tokio::task::spawn_blocking({
        let copy = copy.clone();
        move || serve_image("vm1", &copy)
    })
    .await
    .unwrap();
    let url = b_disk.url();
    tokio::task::spawn_blocking(move || qemu_io(&url, &["write -P 99 12M 64k".into()])).await.unwrap();
    let b_ship =
        shipper(&site, &tls, b_disk.disk.clone(), plain(), None).with_epoch(1).with_log_start(chosen + 1);
    b_ship.sync_once().await.unwrap();
    let done = b_ship.stats().last_resync.expect("another history: resynchronised");
    // Points 3 and 4 wrote 64 KiB each that the copy lacks; the copy wrote 64 KiB.
    assert_eq!(done.changed_bytes, 3 * 65536, "{done:?}");
    assert!(identical(path_str(&copy), path_str(&replica.image())));
    let kept = replica.diverged().expect("the newest point kept");
    assert_eq!((kept.seq, kept.epoch), (last, 0));
    assert!(replica.points().is_empty(), "another history's points cannot stay points");
    let out = site.storage.path().join("diverged.img");
    replica.materialize_diverged(&out).unwrap();
    assert!(identical(path_str(&out), path_str(&ahead)), "the replica as it was, byte for byte");
    // Replication goes on by log, under the new epoch.
    let url = b_disk.url();
    tokio::task::spawn_blocking(move || qemu_io(&url, &["write -P 98 13M 4k".into()])).await.unwrap();
    let seg = b_disk.disk.seal().unwrap().unwrap();
    b_ship.sync_once().await.unwrap();
    applied(&site, seg.last_seq).await;
    assert!(identical(path_str(&copy), path_str(&replica.image())));
    assert_eq!(replica.state().epoch, 1);
    let _ = fs::remove_file(&out);
    replica.materialize_diverged(&out).unwrap();
    assert!(identical(path_str(&out), path_str(&ahead)), "still, behind the next point");
}

/// Verification (`spec.verify`): equal sides report 0 bytes differing;
/// leaves corrupted at the replica on purpose are counted exactly; writes
/// the primary made since the position compared are in flight, not
/// differences; nothing changes on either side; the same id runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verification_counts_exactly_what_differs_and_changes_nothing() {
    let (site, p, _tls, ship) = copied(16 * MIB, 8 * MIB, 51).await;
    let url = p.url();
    tokio::task::spawn_blocking(move || qemu_io(&url, &["write -P 5 1M 64k".into()])).await.unwrap();
    let seg = p.disk.seal().unwrap().unwrap();
    let verify = |id: &str| {
        ship.set_resync_policy(ResyncPolicy { verify: Some(id.into()), ..Default::default() });
    };
    verify("v1");
    ship.sync_once().await.unwrap();
    let v = ship.stats().last_verify.expect("verified");
    assert_eq!((v.id.as_str(), v.seq, v.differing_bytes, v.in_flight_bytes), ("v1", seg.last_seq, 0, 0));
    assert_eq!(v.compared_bytes, 16 * MIB);

    // Five leaves go bad at the replica.
    let replica = site.service.replica("vm1", "root").unwrap();
    let points = replica.points();
    let image = replica.image();
    scribble(&image, &distinct(5, 16 * MIB / LEAF, 3), 77);
    let bad = site.storage.path().join("bad.img");
    fs::copy(&image, &bad).unwrap();
    verify("v2");
    ship.sync_once().await.unwrap();
    let v = ship.stats().last_verify.unwrap();
    assert_eq!((v.id.as_str(), v.differing_bytes, v.in_flight_bytes), ("v2", 5 * LEAF, 0), "{v:?}");
    assert!(identical(path_str(&bad), path_str(&image)), "nothing was sent: the replica is as it was");
    assert_eq!(replica.points(), points);

    // A write at the primary not yet shipped: in flight, not a difference.
    let url = p.url();
    tokio::task::spawn_blocking(move || qemu_io(&url, &["write -P 9 9M 64k".into()])).await.unwrap();
    verify("v3");
    ship.sync_once().await.unwrap();
    let v = ship.stats().last_verify.unwrap();
    assert_eq!((v.id.as_str(), v.differing_bytes, v.in_flight_bytes), ("v3", 5 * LEAF, 65536), "{v:?}");
    // The same id again: nothing runs (the write is shipped by the next cycle).
    ship.sync_once().await.unwrap();
    assert_eq!(ship.stats().last_verify.unwrap(), v);
    // A resync heals it, and the next verification says so.
    ship.set_resync_policy(ResyncPolicy {
        requested: Some("heal".into()),
        verify: Some("v4".into()),
        ..Default::default()
    });
    ship.sync_once().await.unwrap();
    let v = ship.stats().last_verify.unwrap();
    assert_eq!((v.id.as_str(), v.differing_bytes), ("v4", 0), "{v:?}");
    assert!(identical(path_str(&p.image), path_str(&image)));
}

/// The initial copy on external media: the primary exports once (the log
/// cut there) and waits, saying where; writes go on meanwhile. At the
/// replica site a chunk altered in transport, or one missing, is named and
/// nothing is imported; the whole export is imported, and the primary then
/// sends only what was written since. An existing image (an older copy)
/// is adopted instead and resynchronised with only what differs sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_initial_copy_by_external_media_or_an_existing_image_then_only_the_rest() {
    use vmreplica_agent::{
        media::{self, Owner},
        replication::shipper::InitialMethod,
    };
    let site = replica_site().await;
    let content = Rng(61).bytes(10 * MIB as usize);
    let p = tokio::task::spawn_blocking(move || serve_new_image(24 * MIB, &content)).await.unwrap();
    let tls = material(&site.ca, &["host1.site-a.example.com"]);
    let media_dir = tempfile::tempdir().unwrap();
    let cfg = ShipperConfig { initial: InitialMethod::ExternalMedia(media_dir.path().to_owned()), ..plain() };
    let ship = shipper(&site, &tls, p.disk.clone(), cfg, None);
    let err = ship.sync_once().await.unwrap_err().to_string();
    assert!(err.contains("exported to") && err.contains("vmreplica-agent import"), "{err}");
    let export = media_dir.path().join("vm1").join("root");
    let m = media::manifest(&export).unwrap().expect("a whole export");
    assert_eq!(
        (m.disk_size, m.chunks.len()),
        (24 * MIB, 3),
        "10 MiB of data in 4 MiB chunks, zeros left out"
    );
    // Writes during transport; asking again exports nothing new.
    let url = p.url();
    tokio::task::spawn_blocking(move || {
        qemu_io(&url, &["write -P 7 20M 64k".into(), "write -P 8 1M 4k".into()])
    })
    .await
    .unwrap();
    p.disk.seal().unwrap();
    let again = ship.sync_once().await.unwrap_err().to_string();
    assert!(again.contains(&format!("sequence {}", m.next_seq)), "{again}");
    assert_eq!(media::manifest(&export).unwrap().unwrap(), m);

    // At the replica site.
    let owner = Owner { primary: "host1.site-a.example.com".into(), trust_group: "finance".into() };
    let replica_dir = site.storage.path().join("replicas").join("vm1").join("root");
    let chunk = export.join("chunks").join(format!("{:016x}.bin", m.chunks[1].offset));
    let good = std::fs::read(&chunk).unwrap();
    let mut bad = good.clone();
    bad[12345] ^= 1;
    std::fs::write(&chunk, &bad).unwrap();
    let e = media::import(&export, &replica_dir, &owner).unwrap_err().to_string();
    assert!(e.contains(&chunk.display().to_string()) && e.contains("altered"), "{e}");
    assert!(!replica_dir.exists(), "nothing imported");
    std::fs::remove_file(&chunk).unwrap();
    let e = media::import(&export, &replica_dir, &owner).unwrap_err().to_string();
    assert!(e.contains(&chunk.display().to_string()) && e.contains("missing"), "{e}");
    std::fs::write(&chunk, &good).unwrap();
    media::import(&export, &replica_dir, &owner).unwrap();
    let e = media::import(&export, &replica_dir, &owner).unwrap_err().to_string();
    assert!(e.contains("holds a replica already"), "{e}");

    // The primary sends what was written since the cut, and no copy.
    let through = ship.sync_once().await.unwrap();
    let replica = applied(&site, through).await;
    assert!(identical(path_str(&p.image), path_str(&replica.image())));
    assert_eq!(ship.stats().initial_copy_bytes, 0, "no network copy");
    assert!(ship.stats().raw_bytes_sent < 256 << 10, "only the writes since: {:?}", ship.stats());

    // An existing image: an older copy of the disk, adopted and resynchronised.
    let older = site.storage.path().join("older.img");
    std::fs::copy(replica.image(), &older).unwrap();
    let url = p.url();
    tokio::task::spawn_blocking(move || qemu_io(&url, &["write -P 9 5M 8k".into()])).await.unwrap();
    let p2 = p.disk.clone();
    let cfg = ShipperConfig { initial: InitialMethod::ExistingImage, ..plain() };
    let replica_dir2 = site.storage.path().join("replicas").join("vm2").join("root");
    let ship2 = shipper_for("vm2", &site, &tls, p2, cfg, None);
    let err = ship2.sync_once().await.unwrap_err().to_string();
    assert!(err.contains("import --existing"), "{err}");
    media::adopt_existing(&older, &replica_dir2, ("vm2", "root"), &owner).unwrap();
    assert!(!older.exists(), "moved in");
    ship2.sync_once().await.unwrap();
    let done = ship2.stats().last_resync.expect("resynchronised");
    assert_eq!(done.changed_bytes, 8192, "only what differs: {done:?}");
    let r2 = site.service.replica("vm2", "root").unwrap();
    assert!(identical(path_str(&p.image), path_str(&r2.image())));
}
