//! Application-consistent points: the freeze command runs before the cut and
//! the thaw after it, for all of a VM's disks at once; the replica labels the
//! resulting points; a failed freeze still thaws and yields a crash-consistent
//! point; retention keeps what the recovery history asks for.

mod common;

use std::{fs, sync::Arc, time::Duration};

use common::net::*;
use vmreplica_agent::{
    disk::ProtectedDisk,
    quiesce::Quiesce,
    replica::{PointKind, retention::Policy},
    replication::{
        cycle::{QuiesceStatus, VmReplication},
        shipper::{Shipper, ShipperConfig},
    },
};
use vmreplica_api::tls::channel;

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiesced_cut_makes_application_consistent_points_on_every_disk() {
    let site = replica_site().await;
    let tls = material(&site.ca, &["host1.site-a.example.com"]);
    let dir = tempfile::tempdir().unwrap();
    let mut disks = Vec::new();
    for name in ["root", "data"] {
        let img = dir.path().join(format!("{name}.img"));
        fs::File::create(&img).unwrap().set_len(16 * MIB).unwrap();
        disks.push(Arc::new(ProtectedDisk::open("vm1", name, &img).unwrap().0));
    }
    let ch = channel(&site.addr.to_string(), REPLICA_NAME, &tls).unwrap();
    let limits = vmreplica_agent::limits::Limits::new(6, None);
    let shippers = disks
        .iter()
        .map(|d| Shipper::new("vm1", d.clone(), ch.clone(), ShipperConfig::default(), limits.clone()))
        .map(Arc::new)
        .collect();
    // The freeze and thaw commands record what the logs held when they ran.
    let log = dir.path().join("quiesce.log");
    let q = |what: &str, status: &str| {
        vec!["sh".into(), "-c".into(), format!("echo {what} >> {} && exit {status}", log.display())]
    };
    let quiesce = Quiesce::Command { freeze: q("freeze", "0"), thaw: q("thaw", "0") };
    let mut vm = VmReplication::new(
        shippers,
        Duration::from_secs(1),
        vec![Duration::from_secs(1)],
        Some((quiesce, Duration::ZERO)),
    );

    let first = vm.cycle_once().await; // initial copies (nothing logged yet)
    assert!(first.errors.is_empty(), "{:?}", first.errors);
    for (k, d) in disks.iter().enumerate() {
        let mut buf = vec![k as u8 + 1; vmreplica_agent::log::Journal::record_len(65536)];
        d.write(&mut buf, 0, false).unwrap();
    }
    let report = vm.cycle_once().await;
    assert!(report.app_consistent && report.errors.is_empty(), "{report:?}");
    assert_eq!(fs::read_to_string(&log).unwrap(), "freeze\nthaw\nfreeze\nthaw\n");
    for name in ["root", "data"] {
        let r = site.service.replica("vm1", name).unwrap();
        wait_applied(&r, 1).await;
        assert_eq!(
            r.points().last().unwrap().kind,
            PointKind::ApplicationConsistent,
            "{name}: {:?}",
            r.points()
        );
    }

    // A freeze that fails: thawed anyway, and the point is crash-consistent only.
    fs::write(&log, "").unwrap();
    let failing = Quiesce::Command { freeze: q("freeze", "3"), thaw: q("thaw", "0") };
    let shippers: Vec<Arc<Shipper>> = disks
        .iter()
        .map(|d| Shipper::new("vm1", d.clone(), ch.clone(), ShipperConfig::default(), limits.clone()))
        .map(Arc::new)
        .collect();
    let mut vm = VmReplication::new(
        shippers,
        Duration::from_secs(1),
        vec![Duration::from_secs(1)],
        Some((failing, Duration::ZERO)),
    );
    for d in &disks {
        let mut buf = vec![9u8; vmreplica_agent::log::Journal::record_len(4096)];
        d.write(&mut buf, MIB, false).unwrap();
    }
    let report = vm.cycle_once().await;
    assert!(!report.app_consistent);
    assert!(
        report
            .quiesce_error
            .as_deref()
            .is_some_and(|e| e.contains("freeze command") && e.contains("exit status: 3")),
        "{report:?}"
    );
    assert_eq!(fs::read_to_string(&log).unwrap(), "freeze\nthaw\n", "thawed after the failed freeze");
    let r = site.service.replica("vm1", "root").unwrap();
    wait_applied(&r, 2).await;
    assert_eq!(r.points().last().unwrap().kind, PointKind::Standard);

    // Retention: an hour later, beyond a 1-minute window, the hour keeps its
    // application-consistent point (and the newest).
    let now = r.points().last().unwrap().time_ms + 3_600_000;
    r.apply_retention(&Policy { window_ms: 60_000, hourly: 24 }, now).unwrap();
    let kinds: Vec<PointKind> = r.points().iter().map(|p| p.kind).collect();
    assert!(kinds.contains(&PointKind::ApplicationConsistent), "{kinds:?}");
    assert_eq!(r.points().last().unwrap().seq, 2, "the newest point stays");
}

async fn wait_applied(r: &vmreplica_agent::replica::ReplicaDisk, seq: u64) {
    for _ in 0..200 {
        if r.state().applied_through >= seq {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("not applied through {seq}");
}

/// A thaw that fails after the freeze ran leaves the guest possibly frozen:
/// the status says so, the thaw is retried at every cycle (and no freeze
/// comes before it succeeds), cycles go on at the interval; a failed attempt
/// waits for the next application-consistent interval, not the next cycle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_thaw_is_retried_every_cycle_and_a_failed_point_waits_for_its_interval() {
    let site = replica_site().await;
    let tls = material(&site.ca, &["host1.site-a.example.com"]);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("root.img");
    fs::File::create(&img).unwrap().set_len(4 * MIB).unwrap();
    let disk = Arc::new(ProtectedDisk::open("vm2", "root", &img).unwrap().0);
    let ch = channel(&site.addr.to_string(), REPLICA_NAME, &tls).unwrap();
    let shipper = Shipper::new(
        "vm2",
        disk.clone(),
        ch,
        ShipperConfig::default(),
        vmreplica_agent::limits::Limits::new(2, None),
    );
    let log = dir.path().join("quiesce.log");
    let thaws = dir.path().join("thaw-works");
    let sh = |script: String| vec!["sh".into(), "-c".into(), script];
    let quiesce = Quiesce::Command {
        freeze: sh(format!("echo freeze >> {}", log.display())),
        thaw: sh(format!("echo thaw >> {0} && test -e {1}", log.display(), thaws.display())),
    };
    let status = Arc::new(std::sync::Mutex::new(QuiesceStatus::default()));
    let mut vm = VmReplication::new(
        vec![Arc::new(shipper)],
        Duration::from_secs(1),
        vec![Duration::from_secs(1)],
        Some((quiesce, Duration::from_secs(3600))),
    )
    .with_quiesce_status(status.clone());

    let first = vm.cycle_once().await;
    assert!(first.app_consistent, "frozen, cut, then the thaw failed: {first:?}");
    assert!(first.quiesce_error.as_deref().is_some_and(|e| e.contains("thaw failed")), "{first:?}");
    assert!(first.errors.is_empty(), "replication itself went on: {:?}", first.errors);
    let st = status.lock().unwrap().clone();
    assert!(st.thaw_pending && st.error.contains("thaw failed") && st.last_point_unix_ms > 0, "{st:?}");

    vm.cycle_once().await;
    assert_eq!(fs::read_to_string(&log).unwrap(), "freeze\nthaw\nthaw\n", "retried, no new freeze");
    assert!(status.lock().unwrap().thaw_pending);
    fs::write(&thaws, "").unwrap();
    vm.cycle_once().await;
    vm.cycle_once().await;
    assert_eq!(
        fs::read_to_string(&log).unwrap(),
        "freeze\nthaw\nthaw\nthaw\n",
        "thawed once more, then nothing until the next interval"
    );
    assert!(!status.lock().unwrap().thaw_pending);
}
