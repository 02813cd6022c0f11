//! I/O errors from the storage under the agent: its image, its log, and at
//! the replica site its received segments, image and state. The errors come
//! from the agent's I/O fault points ([`vmreplica_agent::failpoint::io`]:
//! EIO where the agent reads, writes or syncs), armed in this process for the
//! primary's library, or through `VMREPLICA_IO_FAULTS` for real agent
//! processes, started and stopped while they run. (No device-mapper here to
//! fail a block device; DESIGN "Testing".)
//!
//! What must hold: a write or flush that failed is reported failed; one that
//! succeeded is never lost; the log always replays to the image; an error
//! that leaves log or image in doubt faults the disk (writes and flushes
//! refused, said in metrics) until the agent restarts, and the restart
//! recovers; at the replica, nothing is applied wrong or twice, and
//! replication resumes by itself once the storage works again.

mod common;

use std::{
    fs,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    process::Command,
};

use common::{Rng, identical, path_str, procs::*};
use vmreplica_agent::{
    disk::ProtectedDisk,
    failpoint,
    log::{Journal, format::RECORD_HEADER_LEN, replay::replay},
    replica::ReplicaDisk,
};
use vmreplica_tests::pki::Ca;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 4 * MIB;

#[derive(Clone, Copy, Debug)]
enum Op {
    Write,
    Zero,
    Flush,
    Seal,
}

/// Fault points armed for one operation, and whether the disk must be
/// faulted after it (the error left log or image in doubt).
const CASES: &[(&[&str], Op, bool)] = &[
    // A failed append that is cut cleanly fails only that write.
    (&["io.log.append"], Op::Write, false),
    // ...one that cannot be cut would leave a torn record between whole ones.
    (&["io.log.append", "io.log.truncate"], Op::Write, true),
    // The image write fails after the record was logged: what the image
    // holds is logged after it, and only this write fails.
    (&["io.image.write"], Op::Write, false),
    // ...unless the image cannot even be read back.
    (&["io.image.write", "io.image.read"], Op::Write, true),
    (&["io.image.write"], Op::Zero, true),
    // A failed fsync may have dropped pages a later fsync would not report.
    (&["io.log.sync"], Op::Flush, true),
    (&["io.image.sync"], Op::Flush, true),
    (&["io.image.sync"], Op::Seal, true),
    (&["io.log.sync"], Op::Seal, true),
    // The next segment cannot be started: the current one goes on.
    (&["io.log.create"], Op::Seal, false),
];

fn write(disk: &ProtectedDisk, offset: u64, data: &[u8]) -> Result<(), String> {
    let mut buf = vec![0u8; Journal::record_len(data.len())];
    buf[RECORD_HEADER_LEN..RECORD_HEADER_LEN + data.len()].copy_from_slice(data);
    disk.write(&mut buf, offset, false).map(drop).map_err(|e| e.to_string())
}

/// Random writes of 4–64 KiB at 4 KiB-aligned offsets, applied to `model` too.
fn random_writes(disk: &ProtectedDisk, model: &mut [u8], rng: &mut Rng, n: usize) {
    for _ in 0..n {
        let len = 4096 * (1 + rng.below(16));
        let off = 4096 * rng.below((SIZE - len) / 4096);
        let data = rng.bytes(len as usize);
        write(disk, off, &data).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
    }
}

#[test]
fn primary_io_errors_fail_the_operation_lose_nothing_and_keep_the_log_exact() {
    for (i, &(points, op, faults)) in CASES.iter().enumerate() {
        let case = format!("{points:?} on {op:?}");
        let dir = tempfile::tempdir().unwrap();
        let mut rng = Rng(0x10fa + i as u64);
        let image = dir.path().join("root.img");
        let base = dir.path().join("base.img");
        let mut model = rng.bytes(SIZE as usize);
        fs::write(&image, &model).unwrap();
        fs::write(&base, &model).unwrap();

        let (disk, _) = ProtectedDisk::open("vm1", "root", &image).unwrap();
        random_writes(&disk, &mut model, &mut rng, 4);
        disk.seal().unwrap();
        random_writes(&disk, &mut model, &mut rng, 4);
        disk.flush().unwrap();

        // The operation under the fault; the range a write or zero targets
        // may end up old or new, but whole.
        let (off, len) = (4096 * rng.below(SIZE / 4096 - 16), 4096 * (1 + rng.below(16)));
        let new = match op {
            Op::Zero => vec![0u8; len as usize],
            _ => rng.bytes(len as usize),
        };
        let old = model[off as usize..(off + len) as usize].to_vec();
        for p in points {
            failpoint::arm(p);
        }
        let r = match op {
            Op::Write => write(&disk, off, &new),
            Op::Zero => disk.zero(off, len, false, true, false).map(drop).map_err(|e| e.to_string()),
            Op::Flush => disk.flush().map_err(|e| e.to_string()),
            Op::Seal => disk.seal().map(drop).map_err(|e| e.to_string()),
        };
        failpoint::disarm_all();
        let err = r.expect_err(&format!("{case}: the operation must fail"));
        assert!(err.contains("Input/output error"), "{case}: {err}");
        assert_eq!(disk.faulted().is_some(), faults, "{case}: faulted? {:?}", disk.faulted());

        if faults {
            // Refused from now on, with the reason; reads still served.
            let e = write(&disk, 0, &[1u8; 4096]).unwrap_err();
            assert!(e.contains("faulted") && e.contains("restarts"), "{case}: {e}");
            assert!(disk.flush().unwrap_err().to_string().contains("faulted"), "{case}");
            assert!(disk.seal().is_err(), "{case}: nothing is sealed on an image in doubt");
            assert!(disk.shutdown().is_err(), "{case}: a faulted log is never marked clean");
            let mut b = vec![0u8; 4096];
            disk.read(&mut b, 0).unwrap();
        } else {
            // The disk goes on: writes, a flush and seals work.
            random_writes(&disk, &mut model, &mut rng, 3);
            disk.flush().unwrap();
            disk.seal().unwrap().expect("something to seal");
        }
        let fresh_writes = model.clone();
        drop(disk); // a crash: no clean shutdown

        let (disk, recovery) = ProtectedDisk::open("vm1", "root", &image).unwrap();
        assert!(recovery.unclean, "{case}");
        let now = fs::read(&image).unwrap();
        let range = off as usize..(off + len) as usize;
        let got = &now[range.clone()];
        if matches!(op, Op::Write | Op::Zero) {
            assert!(got == &old[..] || got == &new[..], "{case}: the failed write's range is torn");
        }
        // Every write that succeeded is there (a failed op touched only its range).
        let mut expect = fresh_writes;
        expect[range.clone()].copy_from_slice(got);
        assert!(now == expect, "{case}: a write that succeeded is missing after recovery");
        // The log replays the base to the image, byte for byte.
        disk.seal().unwrap();
        let segments: Vec<PathBuf> = disk.log_status().sealed.into_iter().map(|s| s.path).collect();
        replay(&base, &segments).unwrap();
        assert!(identical(path_str(&base), path_str(&image)), "{case}: the log does not replay to the image");
        // And the recovered disk takes writes again.
        write(&disk, 0, &[9u8; 4096]).unwrap();
        disk.flush().unwrap();
    }
}

/// Two agents on loopback; the primary's (or the replica's) storage fails
/// through the fault file `faults`.
struct Pair {
    dir: PathBuf,
    image: PathBuf,
    url: String,
    storage: PathBuf,
    replica_image: PathBuf,
    faults: PathBuf,
    metrics: String,
    serve: Vec<String>,
    receive: Vec<String>,
}

impl Pair {
    fn new(dir: &Path) -> Self {
        let ca = Ca::new("iofault-ca").unwrap();
        let rtls = write_tls(&dir.join("replica-tls"), &ca, &["replica.site-b.example.com"]);
        let ptls = write_tls(&dir.join("primary-tls"), &ca, &["host1.site-a.example.com"]);
        let image = dir.join("root.img");
        fs::File::create(&image).unwrap().set_len(16 * MIB).unwrap();
        let storage = dir.join("replicas");
        let socket = dir.join("nbd.sock");
        let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let to = format!("127.0.0.1:{}", free());
        let metrics = format!("127.0.0.1:{}", free());
        let faults = dir.join("faults");
        fs::write(&faults, "").unwrap();
        Self {
            url: format!("nbd+unix:///root?socket={}", socket.display()),
            replica_image: storage.join("vm1/root/disk.img"),
            receive: receive_args(&to, &rtls, &storage, &["--window-seconds", "600"]),
            serve: serve_args(&image, &socket, &to, &ptls, &["--metrics", &metrics]),
            dir: dir.to_owned(),
            image,
            storage,
            faults,
            metrics,
        }
    }

    fn start(&self, args: &[String], name: &str, faulty: bool) -> Proc {
        let env: &[(&str, &Path)] = if faulty { &[("VMREPLICA_IO_FAULTS", &self.faults)] } else { &[] };
        agent_env(args, env, &self.dir.join(format!("{name}.log")))
    }

    /// Waits until the replica has applied everything the primary logged
    /// (its log holds only an empty active segment, named after the next
    /// sequence) and equals it byte for byte.
    fn converged(&self, what: &str) {
        let log = self.dir.join("root.img.vmrlog");
        let next = || {
            let names: Vec<String> = fs::read_dir(&log)
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            let active: Vec<u64> =
                names.iter().filter_map(|n| n.strip_suffix(".active")?.parse().ok()).collect();
            let sealed = names.iter().any(|n| n.ends_with(".seg"));
            (active.len() == 1 && !sealed).then(|| active[0])
        };
        wait_until(&self.dir, what, 60, || {
            next().is_some_and(|n| applied_through(&self.storage.join("vm1/root")) + 1 == n)
                && fs::read(&self.replica_image).ok() == fs::read(&self.image).ok()
        });
    }

    /// Whether every command succeeded, and what qemu-io said.
    fn qemu_io(&self, cmds: &[String]) -> (bool, String) {
        let mut c = Command::new("qemu-io");
        // A guest's write-back cache: writes without FUA (qemu-io's default
        // is write-through), flushes when asked.
        c.args(["-f", "raw", "-t", "writeback"]);
        for cmd in cmds {
            c.arg("-c").arg(cmd);
        }
        let out = c.arg(&self.url).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }
}

#[test]
fn a_primary_whose_storage_fails_refuses_writes_says_so_and_recovers_on_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pair = Pair::new(d);
    let _replica = pair.start(&pair.receive, "replica", false);
    let mut primary = pair.start(&pair.serve, "primary", true);
    let mut rng = Rng(0xe10);
    assert_eq!(write_random(&pair.url, d, 0, 16, &mut rng), 16);
    pair.converged("the first writes to replicate");
    let faulted = || metric(None, &pair.metrics, "vmreplica_agent_disk_faulted");
    assert_eq!(faulted(), 0.0);

    // The image's fsync fails: the flush is refused, and so is everything after.
    fs::write(&pair.faults, "io.image.sync").unwrap();
    let block = d.join("block.bin");
    fs::write(&block, rng.bytes(65536)).unwrap();
    let (ok, out) =
        pair.qemu_io(&[format!("write -s {} {} 64k", block.display(), 20 * 65536), "flush".into()]);
    let log = || fs::read_to_string(d.join("primary.log")).unwrap();
    assert!(out.contains("wrote 65536"), "the write itself succeeds: {out}\n{}", log());
    assert!(!ok && log().contains("NBD request failed"), "the flush fails: {out}\n{}", log());
    fs::write(&pair.faults, "").unwrap(); // the storage works again, but the agent cannot know
    let (ok, out) = pair.qemu_io(&["write -P 7 0 4k".into()]);
    assert!(!ok && out.contains("write failed") && out.contains("Input/output error"), "{out}");
    wait_until(d, "the fault to show in the metrics", 10, || faulted() == 1.0);
    let log = log();
    assert!(log.contains("log faulted") && log.contains("Input/output error"), "{log}");

    // Restarted on working storage: the log is replayed onto the image (the
    // write before the failed flush is in it), writes are taken again, and
    // the replica converges.
    primary.kill9();
    let _primary = pair.start(&pair.serve, "primary2", false);
    let mut got = vec![0u8; 65536];
    fs::File::open(&pair.image).unwrap().read_exact_at(&mut got, 20 * 65536).unwrap();
    assert!(got == fs::read(&block).unwrap(), "the logged write was replayed onto the image");
    assert_eq!(write_random(&pair.url, d, 32, 8, &mut rng), 8);
    pair.converged("the replica to converge after the restart");
    assert_eq!(faulted(), 0.0);
}

#[test]
fn replica_storage_errors_hold_replication_back_and_it_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pair = Pair::new(d);
    let mut replica = pair.start(&pair.receive, "replica", true);
    let _primary = pair.start(&pair.serve, "primary", false);
    let mut rng = Rng(0x5e9);
    assert_eq!(write_random(&pair.url, d, 0, 16, &mut rng), 16);
    pair.converged("the first writes to replicate");
    // The states the primary had, and the sequence each ends at.
    let mut states = vec![(applied_through(&pair.storage.join("vm1/root")), fs::read(&pair.image).unwrap())];
    let errors = || fs::read_to_string(d.join("replica.log")).unwrap().matches("Input/output error").count();
    let points = [
        "io.replica.segment.write",
        "io.replica.segment.sync",
        "io.replica.image.write",
        "io.replica.image.sync",
        "io.replica.state",
    ];
    for (i, point) in points.into_iter().enumerate() {
        fs::write(&pair.faults, point).unwrap();
        let applied = applied_through(&pair.storage.join("vm1/root"));
        let before = errors();
        assert_eq!(write_random(&pair.url, d, 16 + 8 * i as u64, 8, &mut rng), 8);
        // Held back, and said: the primary's shipments are refused, or (the
        // segment taken, its apply failing) the replica applies nothing.
        wait_until(d, &format!("{point} to hold replication back"), 20, || errors() >= before + 2);
        assert_eq!(applied_through(&pair.storage.join("vm1/root")), applied, "{point}: nothing applied");
        fs::write(&pair.faults, "").unwrap();
        pair.converged(&format!("the replica to converge once {point} stops failing"));
        states.push((applied_through(&pair.storage.join("vm1/root")), fs::read(&pair.image).unwrap()));
    }
    let log = fs::read_to_string(d.join("replica.log")).unwrap();
    assert!(log.contains("Input/output error"), "the replica says what failed: {log}");

    // Every state the primary had at a convergence is a recovery point that
    // materialises to it: no apply that failed half-way was recorded, and
    // its retry undid nothing wrong.
    replica.kill9();
    let r = ReplicaDisk::open(&pair.storage.join("vm1/root"), || unreachable!("the replica exists")).unwrap();
    for (seq, state) in &states {
        let out = d.join(format!("point-{seq}.img"));
        r.materialize(*seq, &out).unwrap_or_else(|e| panic!("point {seq}: {e}"));
        assert!(fs::read(&out).unwrap() == *state, "point {seq} is not the state the primary had");
        fs::remove_file(&out).unwrap();
    }
}
