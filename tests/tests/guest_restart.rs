//! Upgrading an agent under a running VM (docs/install.md, "Upgrading"): a
//! real guest attached with QEMU's `reconnect-delay` keeps running while its
//! agent stops (SIGTERM, as a pod's replacement does) and starts again on the
//! same image; its I/O waits, then goes on, and every write-ahead-log record
//! it acknowledged, before, during and after, is on the disk.

use std::process::Command;

use vmreplica_tests::{
    guest::{Guest, Kit, last_ack, nbd_drive, verify},
    procs::{Process, bin},
};

/// The fixed-disk agent the test restarts: serves `image` as export `root`.
fn agent(root: &std::path::Path, run: u32) -> Process {
    let mut cmd = Command::new(bin("vmreplica-agent"));
    cmd.args(["serve", "--vm", "guest", "--interval", "1", "--socket"])
        .arg(root.join("nbd.sock"))
        .arg("--disk")
        .arg(format!("root={}", root.join("root.img").display()));
    Process::spawn_ready(cmd, &root.join(format!("agent-{run}.log")))
}

#[test]
fn a_guest_attached_with_reconnect_delay_rides_out_an_agent_restart() {
    let kit = Kit::find();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let made = Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(root.join("root.img"))
        .arg("64M")
        .status();
    assert!(made.unwrap().success());
    let mut serving = agent(root, 1);
    let drive = nbd_drive(&root.join("nbd.sock"), "root");
    Guest::boot(&kit, &drive, "mkfs", &[], &[], &root.join("mkfs.log")).wait_done(300);

    // QEMU's NBD client holds requests for up to 60 s and reconnects.
    let patient = format!("{drive},reconnect-delay=60");
    let mut writer = Guest::boot(&kit, &patient, "write", &["records=0"], &[], &root.join("write.log"));
    writer.wait_report("ACK 10", 240);

    // The agent stops as a pod does (SIGTERM, clean shutdown) and a new one
    // starts a few seconds later: the guest waits meanwhile.
    let pid = rustix::process::Pid::from_raw(serving.0.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let stopped = serving.0.wait().unwrap();
    assert!(stopped.success(), "the agent stops cleanly on SIGTERM: {stopped}");
    let before = last_ack(&writer);
    std::thread::sleep(std::time::Duration::from_secs(3));
    let during = last_ack(&writer);
    assert!(during <= before + 1, "no record can be acknowledged with no agent: {before} then {during}");
    let _serving = agent(root, 2);
    writer.wait_report(&format!("ACK {}", during + 20), 240);
    assert!(!writer.output().contains("I/O error"), "the guest saw no I/O error:\n{}", writer.output());

    // Pull the plug, then boot the disk (through the new agent): every
    // acknowledged record is there, in order, and the filesystem recovers.
    writer.crash();
    let acked = last_ack(&writer);
    let seen = verify(&kit, &drive, &root.join("verify.log"));
    assert_eq!((seen.fsck, seen.wal_bad, seen.wal_holes), (0, 0, 0), "{seen:?}");
    assert!(seen.wal_last >= acked, "acknowledged {acked}, found {}", seen.wal_last);
}
