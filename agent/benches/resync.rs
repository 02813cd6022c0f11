//! Resynchronisation benchmark (issue: resync by block hashes). Run with
//! `cargo bench -p vmreplica-agent --bench resync` (as root: it drops the page
//! cache before each timed run); `RESYNC_BENCH_GIB` sets the image size
//! (default 10), `BENCH_DIR` where the work files go (default /var/tmp).
//!
//! An image of real data (files from /usr, each 4 KiB leaf made unique) is
//! replicated; then 1% of its 4 KiB blocks change at random on the primary,
//! and in one run, side by side:
//! 1. `dd iflag=direct` reads each image (the reference: reading both);
//! 2. the hash-tree resync: time, and bytes on the wire (hashes included);
//! 3. `rsync --inplace --no-whole-file --ignore-times` of the same change over loopback
//!    (a daemon on 127.0.0.1), what VolSync does: time and bytes sent;
//! 4. the same change written through the agent's log while the replica is
//!    away, so that only the dirty map records it: the dirty-map resync.
//!
//! Prints Markdown rows for BENCHMARKS.md.

use std::{
    fs,
    io::Write,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

mod common;

use vmreplica_agent::{
    disk::ProtectedDisk,
    log::format::{RECORD_HEADER_LEN, RECORD_TRAILER_LEN},
    replication::shipper::{ResyncPolicy, Shipper, ShipperConfig},
};
use vmreplica_api::tls::channel;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const LEAF: u64 = 4096;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Writes `size` bytes of real data to `path`, every leaf stamped with its
/// offset so no two leaves are alike (as on a real disk).
fn fill(path: &Path, size: u64) {
    // 256 MiB of real file contents, the pattern the image repeats.
    let pattern = common::real_data((256 * MIB) as usize);
    let f = fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut buf = vec![0u8; pattern.len()];
    let mut at = 0;
    while at < size {
        let n = (size - at).min(buf.len() as u64) as usize;
        buf[..n].copy_from_slice(&pattern[..n]);
        for (k, leaf) in buf[..n].chunks_mut(LEAF as usize).enumerate() {
            leaf[..8].copy_from_slice(&(at + k as u64 * LEAF).to_le_bytes());
        }
        f.write_all_at(&buf[..n], at).unwrap();
        at += n as u64;
    }
    f.sync_all().unwrap();
}

/// 1% of the image's leaves, distinct, at random.
fn one_percent(size: u64, seed: u64) -> Vec<u64> {
    let leaves = size / LEAF;
    let mut rng = Rng(seed);
    let mut picked = std::collections::BTreeSet::new();
    while (picked.len() as u64) < leaves / 100 {
        picked.insert(rng.next() % leaves);
    }
    picked.into_iter().collect()
}

fn drop_caches() {
    let _ = Command::new("sync").status();
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
}

fn secs_of(cmd: &mut Command) -> f64 {
    drop_caches();
    let t = Instant::now();
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    t.elapsed().as_secs_f64()
}

fn dd_read(path: &Path) -> f64 {
    secs_of(Command::new("dd").arg(format!("if={}", path.display())).args([
        "of=/dev/null",
        "bs=4M",
        "iflag=direct",
    ]))
}

fn identical(a: &Path, b: &Path) -> bool {
    Command::new("qemu-img")
        .args(["compare", "-U", "-q", "-f", "raw", "-F", "raw"])
        .args([a, b])
        .status()
        .unwrap()
        .success()
}

/// rsync of `src` onto `dest` through a daemon on loopback: (seconds, bytes sent).
fn rsync(work: &Path, src: &Path, dest: &Path) -> (f64, u64) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let conf = work.join("rsyncd.conf");
    fs::write(
        &conf,
        format!(
            "pid file = {}\nuse chroot = no\n[img]\npath = {}\nread only = no\nuid = root\ngid = root\n",
            work.join("rsyncd.pid").display(),
            dest.parent().unwrap().display()
        ),
    )
    .unwrap();
    let mut daemon = Command::new("rsync")
        .args(["--daemon", "--no-detach", "--address=127.0.0.1", &format!("--port={port}"), "--config"])
        .arg(&conf)
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    drop_caches();
    let t = Instant::now();
    let out = Command::new("rsync")
        // --ignore-times: compare by checksum always, as a sync job does (the
        // quick check would skip a file of the same size and second).
        .args(["--inplace", "--no-whole-file", "--ignore-times", "--stats"])
        .arg(src)
        .arg(format!("rsync://127.0.0.1:{port}/img/{}", dest.file_name().unwrap().to_string_lossy()))
        .output()
        .unwrap();
    let secs = t.elapsed().as_secs_f64();
    let _ = daemon.kill();
    let _ = daemon.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "rsync: {text}{}", String::from_utf8_lossy(&out.stderr));
    let sent = text
        .lines()
        .find_map(|l| l.strip_prefix("Total bytes sent: "))
        .map(|n| n.replace(',', "").trim().parse().unwrap())
        .unwrap();
    (secs, sent)
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("resync: benchmark");
        return;
    }
    let gib: u64 = std::env::var("RESYNC_BENCH_GIB").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let size = gib * GIB;
    let base = std::env::var_os("BENCH_DIR").map(PathBuf::from).unwrap_or_else(|| "/var/tmp".into());
    let work = tempfile::Builder::new().prefix("vmreplica-resync-").tempdir_in(base).unwrap();
    let w = work.path();
    let (a_img, storage) = (w.join("a.img"), w.join("replicas"));
    fs::create_dir_all(&storage).unwrap();
    eprintln!("writing {gib} GiB of real data");
    fill(&a_img, size);
    // The log overflows at once into the dirty map (part 4); part 2 writes
    // around the log, as a drifted replica's changes are not in any log.
    let (disk, _) = ProtectedDisk::open_with_threshold("bench", "root", &a_img, Some(MIB)).unwrap();
    let disk = Arc::new(disk);
    let site = common::site(&storage).await;
    let ch = channel(&site.addr, "replica.site-b.example.com", &site.client_tls).unwrap();
    let ship = Shipper::new(
        "bench",
        disk.clone(),
        ch,
        ShipperConfig::default(),
        vmreplica_agent::limits::Limits::new(6, None),
    );
    eprintln!("initial copy");
    ship.sync_once().await.unwrap();
    let replica = site.service.replica("bench", "root").unwrap();
    let b_img = replica.image();
    assert!(identical(&a_img, &b_img));
    let rsync_dest = w.join("rsync").join("old.img");
    fs::create_dir_all(rsync_dest.parent().unwrap()).unwrap();
    fs::copy(&b_img, &rsync_dest).unwrap();

    // 1% of the leaves change on the primary, around the log.
    let leaves = one_percent(size, 17);
    let mut rng = Rng(99);
    let f = fs::OpenOptions::new().write(true).open(&a_img).unwrap();
    for l in &leaves {
        let data: Vec<u8> = (0..LEAF / 8).flat_map(|_| rng.next().to_le_bytes()).collect();
        f.write_all_at(&data, l * LEAF).unwrap();
    }
    f.sync_all().unwrap();
    let changed = leaves.len() as u64 * LEAF;
    eprintln!("{} leaves changed ({changed} bytes)", leaves.len());

    let (ta, tb) = (dd_read(&a_img), dd_read(&b_img));
    ship.set_resync_policy(ResyncPolicy { requested: Some("bench".into()), ..Default::default() });
    drop_caches();
    let t = Instant::now();
    ship.sync_once().await.unwrap();
    let resync_secs = t.elapsed().as_secs_f64();
    let r = ship.stats().last_resync.unwrap();
    assert!(identical(&a_img, &b_img), "the replica equals the primary after the resync");
    let (rsync_secs, rsync_sent) = rsync(w, &a_img, &rsync_dest);
    assert!(identical(&a_img, &rsync_dest));

    // Part 4: the same amount of change through the log, replica away.
    let mut rng = Rng(7);
    for l in one_percent(size, 23) {
        let mut buf = vec![0u8; RECORD_HEADER_LEN + LEAF as usize + RECORD_TRAILER_LEN];
        for c in buf[RECORD_HEADER_LEN..RECORD_HEADER_LEN + LEAF as usize].chunks_mut(8) {
            c.copy_from_slice(&rng.next().to_le_bytes());
        }
        disk.write(&mut buf, l * LEAF, false).unwrap();
    }
    disk.flush().unwrap();
    assert!(disk.resync_required());
    drop_caches();
    let t = Instant::now();
    ship.sync_once().await.unwrap();
    let dirty_secs = t.elapsed().as_secs_f64();
    let d = ship.stats().last_resync.unwrap();
    assert!(d.dirty_map && identical(&a_img, &b_img));

    let pct = |b: u64| b as f64 * 100.0 / size as f64;
    let mib = |b: u64| b as f64 / MIB as f64;
    println!("| what | time | ratio to reading both (dd) | bytes on the wire | of the image |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| dd iflag=direct, primary + replica ({gib} GiB each) | {:.1} s ({ta:.1} + {tb:.1}) | 1.00x | – | – |",
        ta + tb
    );
    println!(
        "| hash-tree resync (1% changed, {:.0} MiB) | {resync_secs:.1} s | {:.2}x | {:.1} MiB | {:.2}% |",
        mib(changed),
        resync_secs / (ta + tb),
        mib(r.wire_bytes),
        pct(r.wire_bytes)
    );
    println!(
        "| rsync --inplace --no-whole-file -I, loopback daemon | {rsync_secs:.1} s | {:.2}x | {:.1} MiB | {:.2}% |",
        rsync_secs / (ta + tb),
        mib(rsync_sent),
        pct(rsync_sent)
    );
    println!(
        "| dirty-map resync (the same share, through the log) | {dirty_secs:.1} s | {:.2}x | {:.1} MiB | {:.2}% |",
        dirty_secs / (ta + tb),
        mib(d.wire_bytes),
        pct(d.wire_bytes)
    );
    let _ = std::io::stdout().flush();
}
