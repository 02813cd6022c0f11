//! The replica side, driven with segments the real write path produced from
//! qemu-io writes: every recovery point materialises to exactly the primary's
//! bytes at that point, re-sends and gaps are handled, tampering is caught,
//! pruning folds undo files, and a crash at any apply step is recovered.

mod common;

use std::{fs, path::Path};

use common::*;
use vmreplica_agent::{
    failpoint,
    log::SealedSegment,
    replica::{Incoming, PointKind, ReplicaDisk, ReplicaError, ReplicaState},
};

const MIB: u64 = 1 << 20;

/// Fail points are process-wide: tests of this file run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A primary with `rounds` sealed segments and a snapshot of its image after each.
struct Primary {
    served: Served,
    segments: Vec<SealedSegment>,
    snapshots: Vec<std::path::PathBuf>,
}

fn primary(rounds: usize, seed: u64) -> Primary {
    let served = serve_new_image(64 * MIB, b"boot");
    let mut rng = Rng(seed);
    let (mut segments, mut snapshots) = (Vec::new(), Vec::new());
    for k in 0..rounds {
        let mut cmds = Vec::new();
        for _ in 0..12 {
            let off = rng.below(60 * MIB);
            let len = 1 + rng.below(512 * 1024);
            cmds.push(match rng.below(8) {
                0 => format!("write -z {off} {len}"),
                1 => format!("discard {off} {len}"),
                _ => format!("write -P {} {off} {len}", rng.below(255) + 1),
            });
        }
        // A range every round overwrites, so folding has something to fold.
        cmds.push(format!("write -P {} 32M 1M", k + 1));
        qemu_io(&served.url(), &cmds);
        segments.push(served.disk.seal().unwrap().unwrap());
        let snap = served.dir.path().join(format!("snap{k}.img"));
        fs::copy(&served.image, &snap).unwrap();
        snapshots.push(snap);
    }
    Primary { served, segments, snapshots }
}

fn new_replica(dir: &Path, base: &Path) -> ReplicaDisk {
    let size = fs::metadata(base).unwrap().len();
    let replica = ReplicaDisk::open(dir, || ReplicaState {
        vm_id: "vm1".into(),
        disk_id: "root".into(),
        disk_size: size,
        epoch: 0,
        trust_group: "finance".into(),
        primary: "host1.site-a.example.com".into(),
        consistent_from: 0,
        received_through: 0,
        applied_through: 0,
        points: Vec::new(),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(replica.next_seq(), None, "no copy yet");
    let mut copy = replica.begin_copy(size, 0, 1).unwrap();
    copy.write_range(0, &fs::read(base).unwrap()).unwrap();
    replica.finish_copy(copy, 1).unwrap();
    assert_eq!(replica.next_seq(), Some(1));
    replica
}

fn send(replica: &ReplicaDisk, seg: &SealedSegment, tamper: bool) -> Result<u64, ReplicaError> {
    let mut bytes = fs::read(&seg.path).unwrap();
    if tamper {
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x10;
    }
    match replica.begin_segment(seg.first_seq, seg.last_seq, 0, bytes.len() as u64)? {
        Incoming::Duplicate { durable_through } => Ok(durable_through),
        Incoming::New(mut incoming) => {
            for (i, chunk) in bytes.chunks(256 * 1024).enumerate() {
                incoming.write_chunk((i * 256 * 1024) as u64, chunk)?;
            }
            replica.finish_segment(incoming)
        }
    }
}

#[test]
fn every_point_materialises_to_the_primarys_bytes_at_that_point() {
    let _serial = serial();
    let p = primary(5, 11);
    let dir = tempfile::tempdir().unwrap();
    let replica = new_replica(dir.path(), &p.served.base);
    for (k, seg) in p.segments.iter().enumerate() {
        assert_eq!(send(&replica, seg, false).unwrap(), seg.last_seq);
        assert_eq!(replica.apply_pending().unwrap(), 1);
        assert!(
            identical(path_str(&replica.image()), path_str(&p.snapshots[k])),
            "replica image after segment {k}"
        );
    }
    let points = replica.points();
    assert_eq!(
        points.iter().map(|pt| pt.seq).collect::<Vec<_>>(),
        p.segments.iter().map(|s| s.last_seq).collect::<Vec<_>>()
    );
    assert!(points.iter().all(|pt| pt.kind == PointKind::Standard && pt.time_ms > 1_700_000_000_000));
    for (k, pt) in points.iter().enumerate() {
        let out = dir.path().join(format!("point{k}.img"));
        replica.materialize(pt.seq, &out).unwrap();
        assert!(identical(path_str(&out), path_str(&p.snapshots[k])), "point {k} (seq {})", pt.seq);
    }
    // Materialising leaves the replica image alone.
    assert!(identical(path_str(&replica.image()), path_str(p.snapshots.last().unwrap())));
    assert!(matches!(
        replica.materialize(999, &dir.path().join("x.img")),
        Err(ReplicaError::NoSuchPoint(999))
    ));
}

/// Aligned writes are applied with O_DIRECT and the rest through the page
/// cache: overlapping writes of both kinds (and zeroes) in one segment must
/// still land in the order they were written.
#[test]
fn direct_and_buffered_writes_to_the_same_blocks_apply_in_order() {
    let _serial = serial();
    let served = serve_new_image(16 * MIB, b"boot");
    let cmds: Vec<String> = [
        "write -P 1 0 1M",       // aligned: direct
        "write -P 2 1000 10000", // unaligned, over it: page cache
        "write -P 3 4096 8192",  // aligned, over the cached pages
        "write -P 4 6000 100",   // unaligned again, inside that
        "write -z 0 4096",       // zeroes
        "write -P 5 0 8192",     // aligned, over the zeroed block
        "write -P 6 2M 3M",      // a large aligned run
        "write -P 7 3145727 2",  // one byte either side of a block boundary
    ]
    .map(String::from)
    .to_vec();
    qemu_io(&served.url(), &cmds);
    let seg = served.disk.seal().unwrap().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let replica = new_replica(dir.path(), &served.base);
    send(&replica, &seg, false).unwrap();
    assert_eq!(replica.apply_pending().unwrap(), 1);
    assert!(identical(path_str(&replica.image()), path_str(&served.image)));
    let direct = replica.state().stats.direct_bytes;
    if vmreplica_agent::direct::open(&replica.image()).is_some() {
        assert_eq!(direct, MIB + 8192 + 8192 + 3 * MIB, "the aligned writes went direct");
    } else {
        assert_eq!(direct, 0, "this filesystem refuses O_DIRECT; everything went through the page cache");
    }
}

#[test]
fn resends_gaps_stale_epochs_and_tampering_are_each_handled() {
    let _serial = serial();
    let p = primary(3, 5);
    let dir = tempfile::tempdir().unwrap();
    let replica = new_replica(dir.path(), &p.served.base);
    // Out of order: segment 2 before 1.
    let err = send(&replica, &p.segments[1], false).unwrap_err();
    assert!(matches!(err, ReplicaError::OutOfOrder { expected: 1, .. }), "{err}");
    // Tampered: caught by verification, discarded, nothing advances.
    let err = send(&replica, &p.segments[0], true).unwrap_err();
    assert!(matches!(err, ReplicaError::Verification { first_seq: 1, .. }), "{err}");
    assert_eq!(replica.next_seq(), Some(1));
    assert_eq!(fs::read_dir(dir.path().join("incoming")).unwrap().count(), 0, "the bad copy is gone");
    assert_eq!(fs::read_dir(dir.path().join("log")).unwrap().count(), 0);
    // The honest re-send goes through; sending it again is acknowledged and writes nothing.
    assert_eq!(send(&replica, &p.segments[0], false).unwrap(), p.segments[0].last_seq);
    let before = fs::metadata(dir.path().join("replica.json")).unwrap().modified().unwrap();
    assert_eq!(send(&replica, &p.segments[0], false).unwrap(), p.segments[0].last_seq);
    assert_eq!(fs::metadata(dir.path().join("replica.json")).unwrap().modified().unwrap(), before);
    // An older epoch than the replica's is refused, and so is a copy from one.
    let dir2 = tempfile::tempdir().unwrap();
    let promoted = new_replica(dir2.path(), &p.served.base);
    let size = 64 * MIB;
    let copy = promoted.begin_copy(size, 2, 1).unwrap();
    promoted.finish_copy(copy, 1).unwrap();
    let err = promoted.begin_segment(1, 1, 1, 100).map(|_| ()).unwrap_err();
    assert!(matches!(err, ReplicaError::StaleEpoch { current: 2, found: 1 }), "{err}");
    assert!(err.to_string().contains("a newer primary exists"));
    assert!(matches!(promoted.begin_copy(size, 1, 1).map(|_| ()), Err(ReplicaError::StaleEpoch { .. })));
    // A truncated stream: fewer bytes than announced.
    let bytes = fs::read(&p.segments[1].path).unwrap();
    let Incoming::New(mut inc) = replica
        .begin_segment(p.segments[1].first_seq, p.segments[1].last_seq, 0, bytes.len() as u64)
        .unwrap()
    else {
        panic!()
    };
    inc.write_chunk(0, &bytes[..bytes.len() / 3]).unwrap();
    let err = replica.finish_segment(inc).unwrap_err();
    assert!(matches!(err, ReplicaError::Mismatch { .. }), "{err}");
    // ...then resumes from the same sequence.
    assert_eq!(replica.next_seq(), Some(p.segments[1].first_seq));
    send(&replica, &p.segments[1], false).unwrap();
    send(&replica, &p.segments[2], false).unwrap();
    replica.apply_pending().unwrap();
    assert!(identical(path_str(&replica.image()), path_str(&p.snapshots[2])));
}

#[test]
fn pruning_folds_undo_so_remaining_points_stay_exact_and_storage_is_the_union() {
    let _serial = serial();
    let p = primary(6, 23);
    let dir = tempfile::tempdir().unwrap();
    let replica = new_replica(dir.path(), &p.served.base);
    for seg in &p.segments {
        send(&replica, seg, false).unwrap();
    }
    replica.apply_pending().unwrap();
    let before = replica.undo_bytes().unwrap();
    let seqs: Vec<u64> = replica.points().iter().map(|pt| pt.seq).collect();
    // Keep the oldest, the 4th and the newest.
    let keep = [seqs[0], seqs[3], seqs[5]];
    assert_eq!(replica.prune(|pt| keep.contains(&pt.seq)).unwrap(), 3);
    assert_eq!(replica.points().iter().map(|pt| pt.seq).collect::<Vec<_>>(), keep);
    for (k, seq) in [(0, keep[0]), (3, keep[1]), (5, keep[2])] {
        let out = dir.path().join(format!("kept{k}.img"));
        replica.materialize(seq, &out).unwrap();
        assert!(identical(path_str(&out), path_str(&p.snapshots[k])), "kept point {k}");
    }
    let after = replica.undo_bytes().unwrap();
    // Every round rewrote 32M..33M: folded, that range is stored once per kept
    // interval instead of once per segment.
    assert!(after < before, "folding must shrink undo storage: {before} -> {after}");
    let files = fs::read_dir(dir.path().join("undo")).unwrap().count();
    assert_eq!(files, 2, "one undo per kept point after the oldest");
    // Dropping the oldest point too: its successor's undo goes.
    replica.prune(|pt| pt.seq != keep[0]).unwrap();
    assert_eq!(replica.points().len(), 2);
    assert!(replica.points()[0].undo.is_none());
    let out = dir.path().join("kept3-again.img");
    replica.materialize(keep[1], &out).unwrap();
    assert!(identical(path_str(&out), path_str(&p.snapshots[3])));
}

#[test]
fn a_crash_at_any_apply_step_is_recovered_exactly() {
    let _serial = serial();
    let p = primary(3, 77);
    for fp in ["apply.after-undo", "apply.mid-records", "apply.before-point", "apply.before-delete"] {
        let dir = tempfile::tempdir().unwrap();
        let replica = new_replica(dir.path(), &p.served.base);
        send(&replica, &p.segments[0], false).unwrap();
        replica.apply_pending().unwrap();
        send(&replica, &p.segments[1], false).unwrap();
        failpoint::arm(fp);
        let err = replica.apply_pending().unwrap_err();
        failpoint::disarm_all();
        assert!(err.to_string().contains(fp), "{fp}: {err}");
        drop(replica); // the crash
        let replica = ReplicaDisk::open(dir.path(), || unreachable!("state exists")).unwrap();
        replica.apply_pending().unwrap();
        send(&replica, &p.segments[2], false).unwrap();
        replica.apply_pending().unwrap();
        assert!(identical(path_str(&replica.image()), path_str(&p.snapshots[2])), "{fp}: image");
        let seqs: Vec<u64> = replica.points().iter().map(|pt| pt.seq).collect();
        assert_eq!(seqs, p.segments.iter().map(|s| s.last_seq).collect::<Vec<_>>(), "{fp}: points");
        for (k, pt) in replica.points().iter().enumerate() {
            let out = dir.path().join(format!("p{k}.img"));
            replica.materialize(pt.seq, &out).unwrap();
            assert!(identical(path_str(&out), path_str(&p.snapshots[k])), "{fp}: point {k}");
        }
        assert_eq!(
            fs::read_dir(dir.path().join("log")).unwrap().count(),
            0,
            "{fp}: applied segments are gone"
        );
    }
}

#[test]
fn reversing_drops_the_other_directions_points_undo_and_segments_and_keeps_the_image() {
    let _serial = serial();
    let p = primary(3, 31);
    let dir = tempfile::tempdir().unwrap();
    let replica = new_replica(dir.path(), &p.served.base);
    for seg in &p.segments[..2] {
        send(&replica, seg, false).unwrap();
    }
    replica.apply_pending().unwrap();
    // The third arrives but is not applied: a segment of the old direction on disk.
    send(&replica, &p.segments[2], false).unwrap();
    assert_eq!(fs::read_dir(dir.path().join("log")).unwrap().count(), 1);
    assert!(fs::read_dir(dir.path().join("undo")).unwrap().count() > 0);
    let image = fs::read(replica.image()).unwrap();

    // The other side's log went on to 40 before it was stopped and shipped.
    replica.reverse(2, "replica.site-b.example.com".into(), "finance".into(), None, 40).unwrap();
    let s = replica.state().clone();
    assert_eq!((s.epoch, s.received_through, s.applied_through), (2, 40, 40));
    assert!(s.has_copy() && !s.promoted() && s.points.is_empty() && s.primary_final_seq().is_none());
    assert_eq!(s.primary, "replica.site-b.example.com");
    assert_eq!(replica.next_seq(), Some(41), "the new primary's log continues the numbering");
    assert_eq!(fs::read_dir(dir.path().join("log")).unwrap().count(), 0, "no old segment is applied later");
    assert_eq!(fs::read_dir(dir.path().join("undo")).unwrap().count(), 0);
    assert_eq!(fs::read(replica.image()).unwrap(), image, "the image is what both sides hold");
    // A second opener (another agent process sharing the storage location)
    // is refused while this one holds it: its recovery would delete what a
    // running apply or resync is writing.
    let err = ReplicaDisk::open(dir.path(), || unreachable!("replica.json exists")).err().unwrap();
    assert!(matches!(&err, ReplicaError::InUse(d) if d == dir.path()), "{err}");
    assert!(err.to_string().contains("in use by another agent process"));
    // The state survives a restart as it is.
    drop(replica);
    let reopened = ReplicaDisk::open(dir.path(), || unreachable!("replica.json exists")).unwrap();
    assert_eq!(*reopened.state(), s);
}

#[test]
fn a_crash_while_committing_an_initial_copy_is_finished_on_open_and_a_damaged_state_is_named() {
    let _serial = serial();
    let p = primary(2, 31);
    let dir = tempfile::tempdir().unwrap();
    let replica = new_replica(dir.path(), &p.served.base);
    for seg in &p.segments {
        send(&replica, seg, false).unwrap();
    }
    replica.apply_pending().unwrap();
    assert_eq!(replica.points().len(), 2);
    // A new copy (of the newest snapshot) arrives; the agent dies right after
    // recording that it commits it, before the image is replaced.
    let size = 64 * MIB;
    let next = p.segments[1].last_seq + 1;
    let mut copy = replica.begin_copy(size, 0, next).unwrap();
    copy.write_range(0, &fs::read(&p.snapshots[1]).unwrap()).unwrap();
    failpoint::arm_once("copy.after-intent");
    replica.finish_copy(copy, next).unwrap_err();
    drop(replica);
    // What a restarted agent finds: the commit completed, no stale point.
    let reopened = ReplicaDisk::open(dir.path(), || unreachable!("replica.json exists")).unwrap();
    let s = reopened.state().clone();
    assert!(s.has_copy() && s.lifecycle == vmreplica_agent::replica::Lifecycle::Receiving, "{s:?}");
    assert_eq!((s.received_through, s.applied_through, s.consistent_from), (next - 1, next - 1, next));
    assert!(s.points.is_empty(), "points of the replaced image would materialise garbage");
    assert!(identical(path_str(&reopened.image()), path_str(&p.snapshots[1])));
    assert_eq!(fs::read_dir(dir.path().join("undo")).unwrap().count(), 0);
    drop(reopened);

    // A replica.json whose numbers cannot be right is refused by name.
    let path = dir.path().join("replica.json");
    let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    v["receivedThrough"] = serde_json::json!(u64::MAX);
    // Written as the agent writes it (with its checksum): it is the numbers
    // that are wrong, not the file.
    vmreplica_agent::replica::state::store(dir.path(), &serde_json::from_value(v).unwrap()).unwrap();
    let err = ReplicaDisk::open(dir.path(), || unreachable!()).map(|_| ()).unwrap_err();
    assert!(matches!(err, ReplicaError::BadState { .. }), "{err}");
    assert!(err.to_string().contains("replica.json") && err.to_string().contains("receivedThrough"), "{err}");
}

/// A received segment that changed on the replica's disk before it was
/// applied: never applied (what of it reached the image is undone), set
/// aside with every segment after it, the newest point unchanged, and the
/// replica asks for a resync — also after it is opened again.
#[test]
fn a_received_segment_damaged_at_rest_is_never_applied_and_a_resync_is_asked_for() {
    let _serial = serial();
    let p = primary(3, 23);
    let dir = tempfile::tempdir().unwrap();
    let replica = new_replica(dir.path(), &p.served.base);
    send(&replica, &p.segments[0], false).unwrap();
    replica.apply_pending().unwrap();
    send(&replica, &p.segments[1], false).unwrap();
    send(&replica, &p.segments[2], false).unwrap();
    let stored = dir.path().join("log").join(format!("{:020}.seg", p.segments[1].first_seq));
    let mut bytes = fs::read(&stored).unwrap();
    let at = bytes.len() * 3 / 4;
    bytes[at] ^= 0x40;
    fs::write(&stored, bytes).unwrap();

    // Handled (an agent starting must still start): nothing applied.
    assert_eq!(replica.apply_pending().unwrap(), 0);
    let through = p.segments[0].last_seq;
    assert!(identical(path_str(&replica.image()), path_str(&p.snapshots[0])), "the image holds part of it");
    let s = replica.state().clone();
    assert_eq!((s.received_through, s.applied_through, s.resync_wanted), (through, through, true));
    assert_eq!(replica.points().iter().map(|pt| pt.seq).collect::<Vec<_>>(), vec![through]);
    let mut log: Vec<String> = fs::read_dir(dir.path().join("log"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    log.sort();
    let damaged = |seg: &SealedSegment| format!("{:020}.damaged", seg.first_seq);
    assert_eq!(log, vec![damaged(&p.segments[1]), damaged(&p.segments[2])]);
    assert_eq!(replica.next_seq(), Some(through + 1));
    drop(replica);
    let reopened = ReplicaDisk::open(dir.path(), || unreachable!()).unwrap();
    assert!(reopened.state().resync_wanted);
    assert_eq!(reopened.apply_pending().unwrap(), 0);
    let out = dir.path().join("latest.img");
    reopened.materialize(through, &out).unwrap();
    assert!(identical(path_str(&out), path_str(&p.snapshots[0])));
}

/// The scrub reads back what a replica stores: a sound replica passes; a
/// damaged undo file drops only the older points that needed it (the newer
/// ones still materialise exactly); a damaged received segment is set aside
/// before it is applied and a resync is asked for.
#[test]
fn a_scrub_finds_damage_at_rest_and_nothing_damaged_is_used() {
    let _serial = serial();
    let p = primary(5, 31);
    let dir = tempfile::tempdir().unwrap();
    let replica = new_replica(dir.path(), &p.served.base);
    for seg in &p.segments[..4] {
        send(&replica, seg, false).unwrap();
        replica.apply_pending().unwrap();
    }
    send(&replica, &p.segments[4], false).unwrap();
    let clean = replica.scrub().unwrap();
    assert!(clean.damaged.is_empty() && clean.files >= 4, "{clean:?}");

    let points = replica.points();
    assert_eq!(points.len(), 4);
    let undo = dir.path().join("undo").join(points[2].undo.clone().unwrap());
    let flip = |path: &Path| {
        let mut b = fs::read(path).unwrap();
        let at = b.len() / 2;
        b[at] ^= 0x01;
        fs::write(path, b).unwrap();
    };
    flip(&undo);
    flip(&dir.path().join("log").join(format!("{:020}.seg", p.segments[4].first_seq)));
    flip(&dir.path().join("replica.json"));
    assert!(vmreplica_agent::replica::state::load(dir.path()).is_err(), "the checksum finds the flip");
    let report = replica.scrub().unwrap();
    assert_eq!(report.damaged.len(), 3, "{report:?}");
    assert!(
        report.damaged[0].contains("replica.json") && report.damaged[0].contains("checksum"),
        "{report:?}"
    );
    assert_eq!(report.points_lost, 2);
    let left: Vec<u64> = replica.points().iter().map(|pt| pt.seq).collect();
    assert_eq!(left, vec![p.segments[2].last_seq, p.segments[3].last_seq]);
    assert!(!undo.exists(), "the damaged undo file is gone with the points that needed it");
    for (k, seq) in [(2, left[0]), (3, left[1])] {
        let out = dir.path().join(format!("p{k}.img"));
        replica.materialize(seq, &out).unwrap();
        assert!(identical(path_str(&out), path_str(&p.snapshots[k])), "point {k}");
    }
    let s = replica.state().clone();
    assert!(s.resync_wanted && s.received_through == p.segments[3].last_seq);
    let on_disk = vmreplica_agent::replica::state::load(dir.path()).unwrap().unwrap();
    assert_eq!(on_disk, s, "replica.json was written again, from the state in memory");
    assert_eq!(replica.apply_pending().unwrap(), 0);
    assert!(identical(path_str(&replica.image()), path_str(&p.snapshots[3])));
}
