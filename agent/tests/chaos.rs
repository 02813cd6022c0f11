//! Chaos: randomised rounds of kill -9 against two real agent processes
//! replicating over loopback, while qemu-io writes through the primary's
//! export. Each round writes a random burst (64 KiB-aligned writes of 4–64
//! KiB, a flush now and then), and at a random moment kills the primary, the
//! replica, both, or neither; a replica kept with a short history window
//! prunes and folds recovery points all the time, so the kills land in
//! writing, sealing, shipping, receiving, applying and pruning alike. Some
//! rounds are outages: the replica is down while more than the log may hold
//! is written (half the disk), so the primary keeps only a dirty map and a
//! resync follows; or the replica's storage is lost, so a new initial copy
//! follows. A kill may land in that resync or copy too.
//!
//! After every round the invariants are checked:
//! 1. The primary holds every write qemu-io saw acknowledged, and a write cut
//!    off by a kill is there whole or not at all.
//! 2. The replica converges byte-equal to the primary.
//! 3. Every recovery point the replica keeps materialises to a state the
//!    primary had: a prefix of its writes (each 4 KiB block of a write is
//!    stamped with the write's number, so a block tells which write it holds).
//!
//! `CHAOS_ROUNDS` (default 6) and `CHAOS_SEED` (default: the time) set the
//! run; `benches/chaos.sh` runs long ones and reports them. The seed is
//! printed, so a failing run is repeated by setting it.

mod common;

use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{Rng, procs::*};
use vmreplica_agent::replica::ReplicaDisk;
use vmreplica_tests::pki::Ca;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4 * KIB;
/// The disk: small, so that a round's writes overwrite each other often.
const DISK: u64 = 16 * MIB;

/// Block `b` of write `n`: its number, its offset, then bytes derived from both.
fn block_of(n: u64, offset: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK as usize];
    b[..8].copy_from_slice(&n.to_le_bytes());
    b[8..16].copy_from_slice(&offset.to_le_bytes());
    let fill = (n.wrapping_mul(31).wrapping_add(offset / BLOCK) % 251) as u8 + 1;
    b[16..].fill(fill);
    b
}

/// What the primary was asked to write, in order. Write `n` (from 1) covers
/// `[offset, offset + len)`; an uncertain write was cut off by a kill and is
/// decided by what the restarted primary holds.
#[derive(Default)]
struct History {
    writes: Vec<(u64, u64, Fate)>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fate {
    Acked,
    Uncertain,
    /// Cut off and not on the primary: as if never issued.
    Lost,
}

impl History {
    /// The write that block `b` holds after writes `1..=k` (0: none).
    fn holder(&self, b: u64, k: u64) -> u64 {
        let at = b * BLOCK;
        self.writes[..k as usize]
            .iter()
            .enumerate()
            .rev()
            .find(|(_, (off, len, fate))| *fate != Fate::Lost && (*off..off + len).contains(&at))
            .map_or(0, |(i, _)| i as u64 + 1)
    }

    /// Which write a block of an image holds: its stamp, checked against the
    /// block that write put there. `Err` for bytes no write wrote.
    fn stamp(&self, block: &[u8], b: u64) -> Result<u64, String> {
        if block.iter().all(|&x| x == 0) {
            return Ok(0);
        }
        let n = u64::from_le_bytes(block[..8].try_into().unwrap());
        if n == 0 || n > self.writes.len() as u64 || block != block_of(n, b * BLOCK) {
            return Err(format!("block {b} holds bytes no write wrote (stamp {n})"));
        }
        Ok(n)
    }

    /// Checks that `image` is the state after a prefix of the writes: for
    /// some `k`, every block holds what writes `1..=k` left there. Returns `k`.
    fn prefix_of(&self, image: &Path) -> Result<u64, String> {
        let bytes = fs::read(image).map_err(|e| format!("{}: {e}", image.display()))?;
        if bytes.len() as u64 != DISK {
            return Err(format!("{} is {} bytes, not {DISK}", image.display(), bytes.len()));
        }
        let stamps: Vec<u64> = bytes
            .chunks(BLOCK as usize)
            .enumerate()
            .map(|(b, block)| self.stamp(block, b as u64))
            .collect::<Result<_, _>>()?;
        let k = stamps.iter().copied().max().unwrap_or(0);
        if let Some(b) = (0..DISK / BLOCK).find(|&b| stamps[b as usize] != self.holder(b, k)) {
            return Err(format!(
                "not a prefix of the writes: write {k} is there, but block {b} holds write {} where writes 1..={k} left write {}",
                stamps[b as usize],
                self.holder(b, k)
            ));
        }
        Ok(k)
    }

    /// Decides the uncertain writes by what the restarted primary holds (a
    /// write there whole happened, one absent did not; anything else is a
    /// torn write), then checks the primary holds every write.
    fn settle(&mut self, primary: &Path) -> Result<(), String> {
        let bytes = fs::read(primary).map_err(|e| e.to_string())?;
        let block = |b: u64| &bytes[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize];
        for i in 0..self.writes.len() {
            let (off, len, fate) = self.writes[i];
            if fate != Fate::Uncertain {
                continue;
            }
            let n = i as u64 + 1;
            // Only later writes that are certain can have covered it since.
            let blocks: Vec<u64> = (off / BLOCK..(off + len) / BLOCK)
                .filter(|&b| self.holder(b, self.writes.len() as u64) == n)
                .collect();
            let there = blocks.iter().filter(|&&b| self.stamp(block(b), b) == Ok(n)).count();
            self.writes[i].2 = match there {
                0 => Fate::Lost,
                t if t == blocks.len() => Fate::Acked,
                t => return Err(format!("write {n} is torn on the primary: {t} of {} blocks", blocks.len())),
            };
        }
        let all = self.writes.len() as u64;
        let k = self.prefix_of(primary)?;
        let last_kept = (1..=all).rev().find(|&n| self.writes[n as usize - 1].2 == Fate::Acked).unwrap_or(0);
        if k < last_kept {
            return Err(format!(
                "the primary lost acknowledged writes: it holds writes 1..={k} of {last_kept}"
            ));
        }
        Ok(())
    }
}

/// Two agents, their directories, and who is running.
struct Pair {
    dir: PathBuf,
    serve: Vec<String>,
    receive: Vec<String>,
    primary: Option<Proc>,
    replica: Option<Proc>,
    image: PathBuf,
    replica_dir: PathBuf,
    url: String,
    starts: usize,
}

impl Pair {
    fn new(dir: &Path) -> Self {
        let ca = Ca::new("chaos-ca").unwrap();
        let rtls = write_tls(&dir.join("replica-tls"), &ca, &["replica.site-b.example.com"]);
        let ptls = write_tls(&dir.join("primary-tls"), &ca, &["host1.site-a.example.com"]);
        let image = dir.join("root.img");
        fs::File::create(&image).unwrap().set_len(DISK).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let socket = dir.join("nbd.sock");
        let storage = dir.join("replicas");
        let to = format!("127.0.0.1:{port}");
        // A short window: points are pruned and folded all the time.
        let receive = receive_args(&to, &rtls, &storage, &["--window-seconds", "3", "--hourly-points", "1"]);
        let serve = serve_args(&image, &socket, &to, &ptls, &[]);
        Self {
            dir: dir.to_owned(),
            serve,
            receive,
            primary: None,
            replica: None,
            image,
            replica_dir: storage.join("vm1/root"),
            url: format!("nbd+unix:///root?socket={}", socket.display()),
            starts: 0,
        }
    }

    fn start_missing(&mut self) {
        self.starts += 1;
        if self.replica.is_none() {
            let log = self.dir.join(format!("replica.{}.log", self.starts));
            self.replica = Some(agent(&self.receive, None, &log));
        }
        if self.primary.is_none() {
            let log = self.dir.join(format!("primary.{}.log", self.starts));
            self.primary = Some(agent(&self.serve, None, &log));
        }
    }
}

/// Writes `writes` through qemu-io in one session (a flush after some), each
/// from its own file of stamped blocks; returns how many qemu-io reported done.
fn run_writes(url: &str, dir: &Path, first_n: u64, writes: &[(u64, u64)], flush_every: usize) -> usize {
    let mut cmd = Command::new("stdbuf");
    cmd.args(["-oL", "qemu-io", "-f", "raw"]);
    for (i, (off, len)) in writes.iter().enumerate() {
        let n = first_n + i as u64;
        let data: Vec<u8> = (0..len / BLOCK).flat_map(|b| block_of(n, off + b * BLOCK)).collect();
        let src = dir.join(format!("w{}.bin", i));
        fs::write(&src, data).unwrap();
        cmd.arg("-c").arg(format!("write -s {} {off} {len}", src.display()));
        if flush_every > 0 && i % flush_every == flush_every - 1 {
            cmd.arg("-c").arg("flush");
        }
    }
    let out = cmd.arg(url).stderr(Stdio::null()).output().unwrap();
    let done = String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with("wrote ")).count();
    // qemu-io runs its commands in order, so those done are the first ones.
    done
}

/// One run of `rounds` rounds from `seed`; `Err` says which invariant broke.
fn chaos(seed: u64, rounds: u64, dir: &Path) -> Result<Stats, String> {
    // Mixed, so that neighbouring seeds (benches/chaos.sh counts up) differ.
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut pair = Pair::new(dir);
    let mut history = History::default();
    let mut stats = Stats::default();
    pair.start_missing();
    for round in 0..rounds {
        // 1 in 8 rounds: an outage past the log's threshold (a resync);
        // 1 in 10: the replica's storage lost (a new initial copy).
        let overflow = rng.below(8) == 0;
        let lost = !overflow && rng.below(10) == 0;
        if overflow || lost {
            pair.replica.take().unwrap().kill9();
            stats.replica_kills += 1;
            if lost {
                // (Not there yet if the first copy has not begun.)
                match fs::remove_dir_all(&pair.replica_dir) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => panic!("{e}"),
                    _ => {}
                }
                stats.copies += 1;
            } else {
                stats.resyncs += 1;
            }
        }
        let count = if overflow { 150 } else { 8 + rng.below(40) as usize };
        let writes: Vec<(u64, u64)> = (0..count)
            .map(|_| {
                let len = if overflow { 64 * KIB } else { (1 + rng.below(16)) * BLOCK };
                (rng.below(DISK / (64 * KIB)) * 64 * KIB, len)
            })
            .collect();
        let first_n = history.writes.len() as u64 + 1;
        // 0: nobody, 1: the primary, 2: the replica, 3: both (the replica
        // only if it runs).
        let victim = rng.below(4) & if pair.replica.is_some() { 3 } else { 1 };
        let delay = Duration::from_millis(rng.below(1500));
        let flush_every = 1 + rng.below(8) as usize;
        let (url, wdir) = (pair.url.clone(), dir.join("writes"));
        fs::create_dir_all(&wdir).unwrap();
        let batch = writes.clone();
        let writer = std::thread::spawn(move || run_writes(&url, &wdir, first_n, &batch, flush_every));
        std::thread::sleep(delay);
        if victim & 1 != 0 {
            pair.primary.take().unwrap().kill9();
            stats.primary_kills += 1;
        }
        if victim & 2 != 0 {
            pair.replica.take().unwrap().kill9();
            stats.replica_kills += 1;
        }
        let done = writer.join().unwrap();
        for (i, (off, len)) in writes.iter().enumerate() {
            let fate = if i < done {
                Fate::Acked
            } else if i == done && victim & 1 != 0 {
                Fate::Uncertain
            } else {
                Fate::Lost
            };
            history.writes.push((*off, *len, fate));
        }
        stats.writes += done as u64;
        pair.start_missing();
        if overflow || lost {
            // A kill in the resync or copy that follows the outage.
            std::thread::sleep(Duration::from_millis(rng.below(800)));
            if rng.below(2) == 0 {
                pair.replica.take().unwrap().kill9();
                stats.replica_kills += 1;
            } else {
                pair.primary.take().unwrap().kill9();
                stats.primary_kills += 1;
            }
            pair.start_missing();
        }
        history.settle(&pair.image).map_err(|e| format!("round {round}: {e}"))?;
        // 2. The replica converges to the primary.
        let started = Instant::now();
        let primary = fs::read(&pair.image).unwrap();
        let replica_image = pair.replica_dir.join("disk.img");
        let deadline = started + Duration::from_secs(90);
        while fs::read(&replica_image).ok().as_deref() != Some(&primary[..]) {
            if Instant::now() > deadline {
                return Err(format!("round {round}: the replica did not converge in 90 s"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        stats.max_converge = stats.max_converge.max(started.elapsed());
        // 3. Every point is a prefix (the replica is stopped to read them,
        // as an operator would with the offline tool).
        pair.replica.take().unwrap().kill9();
        stats.replica_kills += 1;
        let points = check_points(&history, &pair.replica_dir, &dir.join("points"))
            .map_err(|e| format!("round {round}: {e}"))?;
        stats.points_checked += points;
        pair.start_missing();
        stats.rounds += 1;
    }
    // What the primaries' logs say was done: resyncs finished, copies sent.
    for e in fs::read_dir(dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("primary.") {
            let log = fs::read_to_string(e.path()).unwrap_or_default();
            stats.resyncs_done += log.matches("resynchronised").count() as u64;
        }
    }
    Ok(stats)
}

/// Materialises every recovery point of the replica and checks it is a
/// prefix of the writes; returns how many were checked.
fn check_points(history: &History, replica_dir: &Path, scratch: &Path) -> Result<u64, String> {
    let _ = fs::remove_dir_all(scratch);
    fs::create_dir_all(scratch).unwrap();
    let r =
        ReplicaDisk::open(replica_dir, || unreachable!("the replica exists")).map_err(|e| e.to_string())?;
    let mut seen = BTreeMap::new();
    for p in r.points() {
        let out = scratch.join(format!("{}.img", p.seq));
        r.materialize(p.seq, &out).map_err(|e| format!("point {}: {e}", p.seq))?;
        let k = history.prefix_of(&out).map_err(|e| format!("point {}: {e}", p.seq))?;
        seen.insert(p.seq, k);
        fs::remove_file(&out).unwrap();
    }
    // Later points hold later prefixes.
    let ks: Vec<u64> = seen.values().copied().collect();
    if ks.windows(2).any(|w| w[0] > w[1]) {
        return Err(format!("points out of order: {seen:?}"));
    }
    Ok(seen.len() as u64)
}

#[derive(Debug, Default)]
struct Stats {
    rounds: u64,
    writes: u64,
    primary_kills: u64,
    replica_kills: u64,
    points_checked: u64,
    max_converge: Duration,
    resyncs: u64,
    copies: u64,
    resyncs_done: u64,
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn randomised_kills_lose_no_acknowledged_write_and_every_point_is_a_prefix() {
    let rounds = env_u64("CHAOS_ROUNDS").unwrap_or(6);
    let seed = env_u64("CHAOS_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    println!("chaos: seed {seed}, {rounds} rounds");
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    match chaos(seed, rounds, dir.path()) {
        Ok(s) => println!(
            "chaos: seed {seed}: {} rounds, 0 violations; {} writes acknowledged, {} primary and {} replica kills, {} outages ending in a resync ({} resyncs finished), {} in a new copy, {} points checked, slowest convergence {:.1} s, {:.0} s in all",
            s.rounds,
            s.writes,
            s.primary_kills,
            s.replica_kills,
            s.resyncs,
            s.resyncs_done,
            s.copies,
            s.points_checked,
            s.max_converge.as_secs_f64(),
            started.elapsed().as_secs_f64()
        ),
        Err(e) => {
            // Keep the directory (logs, images) for whoever looks into it.
            let kept = dir.keep();
            panic!("chaos: seed {seed}: VIOLATION: {e}\n(kept {})", kept.display());
        }
    }
}

/// The checker catches what it must: a block changed in a point, a block
/// from the future, and a lost acknowledged write.
#[test]
fn the_checker_catches_a_corrupted_block_a_non_prefix_and_a_lost_write() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    let mut h = History {
        writes: vec![
            (0, 8 * KIB, Fate::Acked),
            (4 * KIB, 4 * KIB, Fate::Acked),
            (64 * KIB, 4 * KIB, Fate::Acked),
        ],
    };
    let write = |n: u64, blocks: &[u64]| {
        let f = fs::OpenOptions::new().write(true).open(&img).unwrap();
        for &b in blocks {
            f.write_all_at(&block_of(n, b * BLOCK), b * BLOCK).unwrap();
        }
    };
    fs::File::create(&img).unwrap().set_len(DISK).unwrap();
    write(1, &[0, 1]);
    write(2, &[1]);
    assert_eq!(h.prefix_of(&img), Ok(2));
    write(3, &[16]);
    assert_eq!(h.prefix_of(&img), Ok(3));
    // A flipped bit.
    let f = fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&[0x55], 100).unwrap();
    assert!(h.prefix_of(&img).unwrap_err().contains("no write wrote"));
    // Write 3 without write 2 under it: not a prefix.
    write(1, &[0, 1]);
    assert!(h.prefix_of(&img).unwrap_err().contains("not a prefix"));
    // The primary lost acknowledged write 3.
    write(2, &[1]);
    f.write_all_at(&vec![0; BLOCK as usize], 16 * BLOCK).unwrap();
    assert!(h.settle(&img).unwrap_err().contains("lost acknowledged writes"));
    // A cut-off write there in part is torn.
    h.writes.push((128 * KIB, 8 * KIB, Fate::Uncertain));
    write(3, &[16]);
    write(4, &[32]);
    assert!(h.settle(&img).unwrap_err().contains("torn"));
}
