//! Disk faults at the replica site: its storage fills up. The replica's
//! filesystem is a small ext4 on a loop device this test makes (never one of
//! the machine's own filesystems), mostly taken by a filler file. Two real
//! agents replicate over loopback while qemu-io writes through the primary's
//! export; a segment larger than the space left is refused with the reason
//! (no space left on device) on both sides, leaves no partial file, and the
//! primary keeps logging every write. Once space is freed, replication
//! resumes by itself and the replica converges byte-equal. Needs root (mount).

mod common;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::{Rng, procs::*};
use vmreplica_tests::pki::Ca;

const MIB: u64 = 1 << 20;

/// A small ext4 on a loop device, mounted at `mnt`; unmounted on drop.
struct SmallFs {
    mnt: PathBuf,
}

impl SmallFs {
    fn new(backing: &Path, mnt: &Path, mib: u64) -> Self {
        fs::File::create(backing).unwrap().set_len(mib * MIB).unwrap();
        run(&["mkfs.ext4", "-q", "-F", "-m", "0", backing.to_str().unwrap()]);
        fs::create_dir_all(mnt).unwrap();
        run(&["mount", "-o", "loop", backing.to_str().unwrap(), mnt.to_str().unwrap()]);
        Self { mnt: mnt.to_owned() }
    }

    fn free(&self) -> u64 {
        rustix::fs::statvfs(&self.mnt).map(|s| s.f_bavail * s.f_frsize).unwrap()
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

#[test]
fn a_full_replica_filesystem_is_reported_and_replication_resumes_when_space_is_freed() {
    if !rustix::process::geteuid().is_root() {
        panic!("this test mounts a loop filesystem: run it as root");
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let small = SmallFs::new(&d.join("replica-fs.img"), &d.join("mnt"), 96);
    let ca = Ca::new("diskfault-ca").unwrap();
    let rtls = write_tls(&d.join("replica-tls"), &ca, &["replica.site-b.example.com"]);
    let ptls = write_tls(&d.join("primary-tls"), &ca, &["host1.site-a.example.com"]);
    let image = d.join("root.img");
    fs::File::create(&image).unwrap().set_len(64 * MIB).unwrap();
    let storage = small.mnt.join("replicas");
    let replica_image = storage.join("vm1/root/disk.img");
    let socket = d.join("nbd.sock");
    let url = format!("nbd+unix:///root?socket={}", socket.display());
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let metrics = format!(
        "127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    );
    let to = format!("127.0.0.1:{port}");
    let _replica = agent(&receive_args(&to, &rtls, &storage, &[]), None, &d.join("replica.log"));
    let serve = serve_args(&image, &socket, &to, &ptls, &["--metrics", &metrics]);
    let mut primary = agent(&serve, None, &d.join("primary.log"));
    let mut rng = Rng(0xd15c);
    assert_eq!(write_random(&url, d, 0, 32, &mut rng), 32);
    let converged = |secs| {
        let primary = fs::read(&image).unwrap();
        wait_until(d, "the replica to equal the primary", secs, || {
            fs::read(&replica_image).ok().as_deref() == Some(&primary[..])
        });
    };
    converged(60);

    // Fill the replica's filesystem but for 8 MiB; then write 24 MiB.
    let filler = small.mnt.join("filler");
    let fill = small.free() - 8 * MIB;
    fs::write(&filler, vec![0xaa; fill as usize]).unwrap();
    let missed_before =
        metric(None, &metrics, "vmreplica_agent_replication_cycles_total{disk=\"root\",result=\"missed\"");
    assert_eq!(write_random(&url, d, 32, 384, &mut rng), 384, "the primary refused writes");
    wait_until(d, "a cycle refused for want of space", 60, || {
        metric(None, &metrics, "vmreplica_agent_replication_cycles_total{disk=\"root\",result=\"missed\"")
            > missed_before
    });
    std::thread::sleep(Duration::from_secs(3));
    // Said on both sides, with the reason.
    let plog = fs::read_to_string(d.join("primary.log")).unwrap();
    assert!(plog.contains("No space left on device"), "the primary's log does not say why:\n{plog}");
    let rlog = fs::read_to_string(d.join("replica.log")).unwrap();
    assert!(rlog.contains("No space left on device"), "the replica's log does not say why:\n{rlog}");
    // The primary keeps what did not fit (a segment cut before the space
    // ran out may have gone: at most the 8 MiB that were free).
    assert_ne!(fs::read(&replica_image).unwrap(), fs::read(&image).unwrap());
    let pending = metric(None, &metrics, "vmreplica_agent_pending_bytes");
    assert!(pending >= (16 * MIB) as f64, "the primary holds {pending} bytes of log of the 24 MiB written");
    // Nothing half-received stays once no transfer is in flight (the primary
    // retries every second, so it is stopped to look; its log is durable).
    primary.kill9();
    let incoming = storage.join("vm1/root/incoming");
    wait_until(d, "no partial file in incoming/", 20, || fs::read_dir(&incoming).unwrap().next().is_none());
    let _primary = agent(&serve, None, &d.join("primary2.log"));

    // Space freed: replication resumes by itself.
    let t = Instant::now();
    fs::remove_file(&filler).unwrap();
    converged(120);
    println!(
        "disk full: replication resumed and converged {:.1} s after space was freed",
        t.elapsed().as_secs_f64()
    );
    assert!(metric(None, &metrics, "vmreplica_agent_pending_bytes") < (24 * MIB) as f64);
}
