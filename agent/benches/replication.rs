//! Replication benchmarks (issue: replication between agents). Run with
//! `cargo bench -p vmreplica-agent --bench replication [apply|ship|copy]`;
//! each prints a Markdown row with its reference measured in the same run.
//!
//! 1. Apply: applying logged 1 MiB writes on the replica (undo file, apply,
//!    fsync) vs `dd oflag=direct` writing the same bytes (and, over data, vs
//!    the direct reads and writes an undo needs).
//! 2. Shipping: real files (from /usr), then data zstd cannot shrink, written
//!    through the write path, shipped over loopback mTLS with and without
//!    zstd (which turns itself off for the second): throughput and ratio.
//! 3. Initial copy: an 8 GiB sparse image holding 1 GiB of real files: bytes
//!    sent and time vs `cp --sparse=always` of the same image.
//!
//! 4. References (`refs`), what the pipeline's stages cannot beat on this
//!    machine: loopback mutual-TLS throughput with the agents' TLS setup,
//!    BLAKE3 and zstd level 1 on one core, `dd oflag=direct` of the disk.
//!    `benches/rpo.sh` prints them beside its lag measurements.
//!
//! Work files go to `$BENCH_DIR` (default /var/tmp) and are removed.
//!
//! To profile only the shipping, not its setup, start the bench under
//! `perf record -D -1 --control fifo:CTL` with `BENCH_PERF_CTL=CTL`: it
//! enables the recording for each timed transfer only.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

mod common;

use common::{Site, real_data, site, tls_pair};
use vmreplica_agent::{
    disk::ProtectedDisk,
    limits::Limits,
    log::Journal,
    replica::{Incoming, ReplicaDisk, ReplicaState},
    replication::shipper::{Shipper, ShipperConfig},
};
use vmreplica_api::tls::channel;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn work_dir() -> tempfile::TempDir {
    let base = std::env::var_os("BENCH_DIR").map(PathBuf::from).unwrap_or_else(|| "/var/tmp".into());
    tempfile::Builder::new().prefix("vmreplica-bench-").tempdir_in(base).unwrap()
}

fn mkdir(p: PathBuf) -> PathBuf {
    fs::create_dir_all(&p).unwrap();
    p
}

fn new_image(path: &Path, size: u64) {
    fs::File::create(path).unwrap().set_len(size).unwrap();
}

fn log_writes(disk: &ProtectedDisk, data: &[u8], at: u64) {
    for (i, chunk) in data.chunks(MIB as usize).enumerate() {
        let mut buf = vec![0u8; Journal::record_len(chunk.len())];
        buf[40..40 + chunk.len()].copy_from_slice(chunk);
        disk.write(&mut buf, at + i as u64 * MIB, false).unwrap();
    }
}

fn replica_state(size: u64) -> ReplicaState {
    ReplicaState {
        vm_id: "bench".into(),
        disk_id: "root".into(),
        disk_size: size,
        epoch: 0,
        trust_group: "bench".into(),
        primary: "bench".into(),
        consistent_from: 0,
        received_through: 0,
        applied_through: 0,
        points: Vec::new(),
        ..Default::default()
    }
}

/// Tells `perf record --control fifo:$BENCH_PERF_CTL` to start or stop
/// recording, when that variable is set.
fn perf_control(what: &str) {
    if let Some(ctl) = std::env::var_os("BENCH_PERF_CTL") {
        fs::write(ctl, format!("{what}\n")).unwrap();
    }
}

/// The process's CPU time so far (user + system, all threads): both agents
/// of a shipping bench run in this process.
fn cpu_time() -> Duration {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct it is given and keeps no pointer.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) }, 0);
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Wall and CPU time of one timed transfer.
struct Meter {
    wall: Instant,
    cpu: Duration,
}

impl Meter {
    fn start() -> Self {
        Self { wall: Instant::now(), cpu: cpu_time() }
    }

    /// `(wall time, "N cores, M ms of CPU per MiB")` for `bytes` moved.
    fn stop(self, bytes: u64) -> (Duration, String) {
        let (wall, cpu) = (self.wall.elapsed(), cpu_time() - self.cpu);
        let per_mib = cpu.as_secs_f64() * 1000.0 / (bytes as f64 / MIB as f64);
        (wall, format!("{:.2} cores, {per_mib:.2} ms CPU/MiB", cpu.as_secs_f64() / wall.as_secs_f64()))
    }
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

/// How long `dd bs=1M if=SRC of=DST FLAGS…` takes.
fn time_dd(src: &Path, dst: &Path, flags: &[&str]) -> Duration {
    let t = Instant::now();
    let st = Command::new("dd")
        .arg("bs=1M")
        .args(flags)
        .arg(format!("if={}", src.display()))
        .arg(format!("of={}", dst.display()))
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    t.elapsed()
}

fn bench_apply(dir: &Path) {
    // 2 GiB of log stays below the resync threshold (half the disk).
    let size = 8 * GIB;
    let data = real_data(GIB as usize);
    let img = dir.join("primary.img");
    new_image(&img, size);
    let (disk, _) = ProtectedDisk::open("bench", "root", &img).unwrap();
    // Two rounds over the same 1 GiB: the first lands on an empty replica, the
    // second's undo must save a full GiB of real data first.
    let mut rounds = Vec::new();
    for round in 0..2u8 {
        let mut d = data.clone();
        d.iter_mut().step_by(4096).for_each(|b| *b = b.wrapping_add(round));
        log_writes(&disk, &d, 0);
        rounds.push(disk.seal().unwrap().unwrap());
    }
    let rdir = dir.join("replica");
    fs::create_dir_all(&rdir).unwrap();
    let replica = ReplicaDisk::open(&rdir, || replica_state(size)).unwrap();
    let copy = replica.begin_copy(size, 0, 1).unwrap();
    replica.finish_copy(copy, 1).unwrap();
    let mut times = Vec::new();
    for seg in &rounds {
        let bytes = fs::read(&seg.path).unwrap();
        let Incoming::New(mut inc) =
            replica.begin_segment(seg.first_seq, seg.last_seq, 0, bytes.len() as u64).unwrap()
        else {
            unreachable!("a new segment")
        };
        inc.write_chunk(0, &bytes).unwrap();
        replica.finish_segment(inc).unwrap();
        let t = Instant::now();
        replica.apply_pending().unwrap();
        times.push(t.elapsed());
    }
    drop(disk);
    fs::remove_file(&img).unwrap();
    // Reference: the same bytes with dd oflag=direct into a fresh file, twice.
    let src = dir.join("dd-src.bin");
    fs::write(&src, &data).unwrap();
    let dst = dir.join("dd-dst.bin");
    let mut dd = Duration::ZERO;
    for _ in 0..2 {
        dd += time_dd(&src, &dst, &["oflag=direct", "conv=notrunc"]);
    }
    let r = mbps(2 * GIB, dd);
    // Over data, an apply must first read the GiB it overwrites and write it
    // to the undo file: the least I/O that takes is a direct read of 1 GiB
    // and two direct writes of 1 GiB.
    let undo_floor = time_dd(&dst, Path::new("/dev/null"), &["iflag=direct"]) + dd;
    for (what, t) in [("onto an empty replica", times[0]), ("over data (1 GiB of undo first)", times[1])] {
        let a = mbps(GIB, t);
        println!(
            "| apply 1 GiB of 1 MiB writes {what} | {a:.0} MiB/s | dd oflag=direct: {r:.0} MiB/s | {:.2}x |",
            a / r
        );
    }
    let a = mbps(2 * GIB, times[0] + times[1]);
    println!("| apply, both rounds | {a:.0} MiB/s | dd oflag=direct: {r:.0} MiB/s | {:.2}x |", a / r);
    let f = mbps(GIB, undo_floor);
    println!(
        "| apply over data, against the I/O it needs | {:.0} MiB/s | dd iflag=direct 1 GiB + oflag=direct 2 GiB: {f:.0} MiB/s | {:.2}x |",
        mbps(GIB, times[1]),
        mbps(GIB, times[1]) / f
    );
    // The ceiling of any page-cache write path on this disk: buffered dd + fdatasync.
    let buffered = dir.join("dd-buffered.bin");
    let b = mbps(GIB, time_dd(&src, &buffered, &["conv=fdatasync"]));
    println!(
        "| (reference) buffered dd conv=fdatasync, same bytes | {b:.0} MiB/s | dd oflag=direct: {r:.0} MiB/s | {:.2}x |",
        b / r
    );
}

fn shipper(site: &Site, disk: Arc<ProtectedDisk>, compression: bool) -> Shipper {
    let ch = channel(&site.addr, "replica.site-b.example.com", &site.client_tls).unwrap();
    let cfg = ShipperConfig { compression, ..Default::default() };
    Shipper::new("bench", disk, ch, cfg, Limits::new(6, None))
}

/// 512 MiB that zstd cannot shrink (what encrypted or compressed guest data looks like).
fn noise(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

async fn bench_shipping(dir: &Path) {
    for (what, data) in [
        ("/usr files", Arc::new(real_data(512 * MIB as usize))),
        ("random data", Arc::new(noise(512 * MIB as usize))),
    ] {
        ship_data(dir, what, &data).await;
    }
}

async fn ship_data(dir: &Path, what: &str, data: &Arc<Vec<u8>>) {
    // The reference: what zstd level 1 costs on this data, one core, 1 MiB at a time.
    let t = Instant::now();
    let out: usize = data.chunks(MIB as usize).map(|c| zstd::bulk::compress(c, 1).unwrap().len()).sum();
    println!(
        "| zstd level 1 alone on the same 512 MiB of {what}, one core | {:.0} MiB/s | {:.0} MiB out | {:.2} |",
        mbps(data.len() as u64, t.elapsed()),
        out as f64 / MIB as f64,
        data.len() as f64 / out as f64
    );
    for compression in [false, true] {
        let sub = mkdir(dir.join(if compression { "zstd" } else { "raw" }));
        let storage = mkdir(sub.join("replicas"));
        let img = sub.join("primary.img");
        new_image(&img, 4 * GIB);
        let disk = Arc::new(ProtectedDisk::open("bench", "root", &img).unwrap().0);
        let site = site(&storage).await;
        let ship = shipper(&site, disk.clone(), compression);
        ship.sync_once().await.unwrap(); // initial copy of the empty disk
        let (d, data) = (disk.clone(), data.clone());
        tokio::task::spawn_blocking(move || {
            log_writes(&d, data.as_slice(), 0);
            d.seal().unwrap();
        })
        .await
        .unwrap();
        let before = ship.stats();
        perf_control("enable");
        let meter = Meter::start();
        ship.sync_once().await.unwrap();
        let s = ship.stats();
        let (raw, wire) =
            (s.raw_bytes_sent - before.raw_bytes_sent, s.wire_bytes_sent - before.wire_bytes_sent);
        let (took, cpu) = meter.stop(raw);
        perf_control("disable");
        println!(
            "| ship 512 MiB of {what} as 1 MiB writes, zstd {} | {:.0} MiB/s ({cpu}) | {:.0} MiB on the wire | {:.2} (raw/wire) |",
            if compression { "on (auto-off)" } else { "off" },
            mbps(raw, took),
            wire as f64 / MIB as f64,
            raw as f64 / wire as f64
        );
        drop(site);
        fs::remove_dir_all(&sub).unwrap();
    }
}

async fn bench_initial_copy(dir: &Path) {
    let size = 8 * GIB;
    let img = dir.join("sparse.img");
    new_image(&img, size);
    let data = real_data(GIB as usize);
    let f = fs::OpenOptions::new().write(true).open(&img).unwrap();
    // 1 GiB of data in 8 runs of 128 MiB, one per GiB of the disk.
    for (i, chunk) in data.chunks(128 * MIB as usize).enumerate() {
        std::os::unix::fs::FileExt::write_all_at(&f, chunk, i as u64 * GIB).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    let cp_to = dir.join("cp.img");
    let t = Instant::now();
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cp --sparse=always {} {} && sync -f {}",
            img.display(),
            cp_to.display(),
            cp_to.display()
        ))
        .status()
        .unwrap();
    assert!(st.success());
    let cp = t.elapsed();
    fs::remove_file(&cp_to).unwrap();
    let storage = mkdir(dir.join("replicas"));
    let disk = Arc::new(ProtectedDisk::open("bench", "root", &img).unwrap().0);
    let site = site(&storage).await;
    let ship = shipper(&site, disk, true);
    let t = Instant::now();
    ship.sync_once().await.unwrap();
    let took = t.elapsed();
    let s = ship.stats();
    assert!(site.service.replica("bench", "root").is_some());
    println!(
        "| initial copy of an 8 GiB sparse image holding 1 GiB of /usr files | {:.1} s; {:.0} MiB sent, {:.0} MiB on the wire | cp --sparse=always: {:.1} s | {:.2}x the time |",
        took.as_secs_f64(),
        s.initial_copy_bytes as f64 / MIB as f64,
        s.wire_bytes_sent as f64 / MIB as f64,
        cp.as_secs_f64(),
        took.as_secs_f64() / cp.as_secs_f64()
    );
}

/// Bytes per second through one mutual-TLS connection on loopback, the
/// agents' own TLS configuration (rustls, ring): 2 GiB in 1 MiB writes.
/// Also what it cost: "N cores, M ms of CPU per MiB" (both ends).
async fn mtls_loopback() -> (f64, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (server, client) = tls_pair();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config());
    let reader = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let mut buf = vec![0u8; MIB as usize];
        let mut n = 0u64;
        loop {
            match tls.read(&mut buf).await.unwrap() {
                0 => return n,
                k => n += k as u64,
            }
        }
    });
    let connector = tokio_rustls::TlsConnector::from(client.client_config());
    let name = rustls::pki_types::ServerName::try_from("replica.site-b.example.com").unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    let data = noise(MIB as usize);
    perf_control("enable");
    let meter = Meter::start();
    for _ in 0..2048 {
        tls.write_all(&data).await.unwrap();
    }
    tls.shutdown().await.unwrap();
    let got = reader.await.unwrap();
    let (took, cpu) = meter.stop(got);
    perf_control("disable");
    assert_eq!(got, 2 * GIB);
    (got as f64 / took.as_secs_f64(), cpu)
}

/// The references, one row each, in MiB/s.
async fn bench_references(dir: &Path) {
    let data = real_data(256 * MIB as usize);
    let t = Instant::now();
    let mut h = blake3::Hasher::new();
    for c in data.chunks(MIB as usize) {
        h.update(c);
    }
    std::hint::black_box(h.finalize());
    println!("| reference: BLAKE3, one core | {:.0} MiB/s | | |", mbps(data.len() as u64, t.elapsed()));
    let t = Instant::now();
    let out: usize = data.chunks(MIB as usize).map(|c| zstd::bulk::compress(c, 1).unwrap().len()).sum();
    println!(
        "| reference: zstd level 1 on /usr files, one core | {:.0} MiB/s | {:.2}x smaller | |",
        mbps(data.len() as u64, t.elapsed()),
        data.len() as f64 / out as f64
    );
    let (tls, cpu) = mtls_loopback().await;
    println!(
        "| reference: loopback mutual TLS, one connection | {:.0} MiB/s ({cpu}) | | |",
        tls / MIB as f64
    );
    let src = dir.join("dd-src.bin");
    fs::write(&src, &data).unwrap();
    let dst = dir.join("dd-dst.bin");
    let took = time_dd(&src, &dst, &["oflag=direct"]);
    println!("| reference: dd oflag=direct, 1 MiB blocks | {:.0} MiB/s | | |", mbps(data.len() as u64, took));
}

fn main() {
    let only = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let want = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let dir = work_dir();
    println!("| benchmark | vmreplica | reference | ratio |");
    println!("|---|---:|---:|---:|");
    if want("apply") {
        bench_apply(&mkdir(dir.path().join("apply")));
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    if want("ship") {
        rt.block_on(bench_shipping(&mkdir(dir.path().join("ship"))));
    }
    if want("copy") {
        rt.block_on(bench_initial_copy(&mkdir(dir.path().join("copy"))));
    }
    if want("refs") {
        rt.block_on(bench_references(&mkdir(dir.path().join("refs"))));
    }
}
