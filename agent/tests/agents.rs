//! Two real agent processes replicating over loopback with certificates made
//! for the test, while qemu-io writes through the primary's export. The replica
//! is killed with -9 mid-transfer, the primary is killed with -9 mid-stream, and
//! the replica is made to abort halfway through applying a segment. Afterwards
//! the replica holds every acknowledged write, byte for byte.

mod common;

use std::{
    fs,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use common::{procs::*, *};
use vmreplica_tests::pki::Ca;

const MIB: u64 = 1 << 20;

/// Writes `count` 64 KiB blocks of distinct patterns through `url`, starting at
/// block `first`; returns the (offset, pattern) of each write qemu-io reported done.
fn write_blocks(url: &str, first: u64, count: u64) -> Vec<(u64, u8)> {
    let mut cmd = Command::new("stdbuf");
    cmd.args(["-oL", "qemu-io", "-f", "raw"]);
    for b in first..first + count {
        cmd.arg("-c").arg(format!("write -P {} {} 64k", b % 251 + 1, b * 65536));
        if b % 8 == 7 {
            cmd.arg("-c").arg("flush");
        }
    }
    let out = cmd.arg(url).stderr(Stdio::null()).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("wrote 65536/65536 bytes at offset "))
        .map(|o| {
            let off: u64 = o.trim().parse().unwrap();
            (off, ((off / 65536) % 251 + 1) as u8)
        })
        .collect()
}

/// Two agents' arguments, with certificates and a 64 MiB image under `d`.
struct Pair {
    image: PathBuf,
    url: String,
    replica_dir: PathBuf,
    receive: Vec<String>,
    serve: Vec<String>,
}

fn pair(d: &Path) -> Pair {
    let ca = Ca::new("agents-test-ca").unwrap();
    let rtls = write_tls(&d.join("replica-tls"), &ca, &["replica.site-b.example.com", "127.0.0.1"]);
    let ptls = write_tls(&d.join("primary-tls"), &ca, &["host1.site-a.example.com"]);
    let image = d.join("root.img");
    fs::File::create(&image).unwrap().set_len(64 * MIB).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let socket = d.join("nbd.sock");
    let storage = d.join("replicas");
    Pair {
        url: format!("nbd+unix:///root?socket={}", socket.display()),
        replica_dir: storage.join("vm1/root"),
        receive: receive_args(&format!("127.0.0.1:{port}"), &rtls, &storage, &[]),
        serve: serve_args(&image, &socket, &format!("127.0.0.1:{port}"), &ptls, &[]),
        image,
    }
}

#[test]
fn kill_9_of_either_agent_mid_transfer_or_mid_apply_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let Pair { image, url, replica_dir, receive, serve } = pair(d);

    let mut replica = agent(&receive, None, &d.join("replica.log"));
    let mut primary = agent(&serve, None, &d.join("primary.log"));
    let mut acked = write_blocks(&url, 0, 64);
    wait_until(d, "the initial copy and first segments", 20, || applied_through(&replica_dir) > 0);

    // 1. The replica dies mid-transfer and comes back.
    acked.extend(write_blocks(&url, 64, 128));
    replica.kill9();
    let mut replica = agent(&receive, None, &d.join("replica2.log"));

    // 2. The primary dies while qemu-io is writing, and comes back.
    let writer = {
        let url = url.clone();
        std::thread::spawn(move || write_blocks(&url, 192, 200))
    };
    std::thread::sleep(Duration::from_millis(300));
    primary.kill9();
    acked.extend(writer.join().unwrap());
    let _primary = agent(&serve, None, &d.join("primary2.log"));

    // 3. The replica aborts halfway through applying a segment, and comes back.
    replica.kill9();
    let mut aborting = agent(&receive, Some("apply.mid-records"), &d.join("replica3.log"));
    acked.extend(write_blocks(&url, 400, 32));
    wait_until(d, "the replica to abort mid-apply", 20, || aborting.0.try_wait().unwrap().is_some());
    assert!(fs::read_to_string(d.join("replica3.log")).unwrap().contains("failpoint apply.mid-records"));
    let _replica = agent(&receive, None, &d.join("replica4.log"));
    acked.extend(write_blocks(&url, 432, 16));

    // The replica catches up with the primary, byte for byte.
    assert!(acked.len() > 250, "only {} writes were acknowledged", acked.len());
    let replica_image = replica_dir.join("disk.img");
    wait_until(d, "the replica to equal the primary", 60, || {
        replica_image.exists() && identical(path_str(&replica_image), path_str(&image))
    });
    let f = fs::File::open(&replica_image).unwrap();
    for (off, p) in &acked {
        let mut buf = vec![0u8; 65536];
        f.read_exact_at(&mut buf, *off).unwrap();
        assert!(buf.iter().all(|b| b == p), "acknowledged write at {off} missing on the replica");
    }
    drop(aborting);
}

/// A segment damaged on the replica's disk while its agent was down (after
/// it was acknowledged, before it was applied; the primary has deleted its
/// copy): the restarted replica sets it aside and asks for a resync, the
/// primary resynchronises from its image, and the replica converges byte
/// for byte — nothing damaged was applied.
#[test]
fn a_segment_damaged_on_the_replica_while_it_was_down_is_healed_by_a_resync() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let Pair { image, url, replica_dir, receive, serve } = pair(d);
    let mut replica = agent(&receive, None, &d.join("replica.log"));
    let _primary = agent(&serve, None, &d.join("primary.log"));
    write_blocks(&url, 0, 64);
    let replica_image = replica_dir.join("disk.img");
    let converged = |what: &str| {
        wait_until(d, what, 60, || {
            replica_image.exists() && identical(path_str(&replica_image), path_str(&image))
        })
    };
    converged("the first copy");
    // Nothing received is left to apply: else the next agent would meet
    // its fail point applying that at startup, before it says it is ready.
    let received = || {
        let v: serde_json::Value =
            serde_json::from_slice(&fs::read(replica_dir.join("replica.json")).unwrap()).unwrap();
        v["receivedThrough"].as_u64().unwrap()
    };
    wait_until(d, "the replica to apply all it received", 20, || received() == applied_through(&replica_dir));

    // The replica takes the next segments but dies applying them...
    replica.kill9();
    let mut aborting = agent(&receive, Some("apply.mid-records"), &d.join("replica2.log"));
    write_blocks(&url, 64, 32);
    wait_until(d, "the replica to abort mid-apply", 20, || aborting.0.try_wait().unwrap().is_some());
    // ...and while it is down, what it received changes on its disk.
    let applied = applied_through(&replica_dir);
    let mut damaged = 0;
    for e in fs::read_dir(replica_dir.join("log")).unwrap().flatten() {
        let first: u64 = e.file_name().to_string_lossy().split('.').next().unwrap().parse().unwrap();
        if first > applied {
            let f = fs::OpenOptions::new().read(true).write(true).open(e.path()).unwrap();
            let at = f.metadata().unwrap().len() * 3 / 4;
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, at).unwrap();
            f.write_all_at(&[b[0] ^ 0x08], at).unwrap();
            damaged += 1;
        }
    }
    assert!(damaged > 0, "no received segment was waiting to be applied");
    let _replica = agent(&receive, None, &d.join("replica3.log"));
    converged("the resync after the damage");
    let rlog = fs::read_to_string(d.join("replica3.log")).unwrap();
    assert!(rlog.contains("damaged on this disk"), "{rlog}");
    wait_until(d, "the primary to say it resynchronised", 20, || {
        fs::read_to_string(d.join("primary.log")).unwrap().contains("resynchronised")
    });
    let set_aside = fs::read_dir(replica_dir.join("log"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "damaged"))
        .count();
    assert!(set_aside >= 1);
    drop(aborting);
}
