//! Faults: kill -9 of the agent while real NBD clients write, torn log tails,
//! a crash between rotating and sealing, and hostile NBD frames.
//!
//! What kill -9 can prove here is process-crash safety (the kernel keeps what
//! the process wrote). Power-loss safety rests on the FLUSH/FUA ordering (log
//! fdatasync, then image fdatasync), which no test on this machine can cut.

mod common;

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{nbd_raw::*, *};
use vmreplica_agent::{
    disk::{ProtectedDisk, log_dir_for},
    log::{
        Journal, JournalConfig, RecordKind, format::RECORD_HEADER_LEN, format::encode_record, replay::replay,
    },
};

const MIB: u64 = 1 << 20;

/// A running `vmreplica-agent serve`, killed (and reaped) when dropped.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_agent(image: &Path, socket: &Path) -> Agent {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmreplica-agent"))
        .args(["serve", "--vm", "vm1", "--disk"])
        .arg(format!("root={}", image.display()))
        .arg("--socket")
        .arg(socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("agent starts");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready", "agent did not come up");
    Agent(child)
}

fn kill9(agent: &mut Agent) {
    agent.0.kill().unwrap(); // SIGKILL
    agent.0.wait().unwrap();
}

fn sigterm(agent: &mut Agent) {
    let pid = rustix::process::Pid::from_raw(agent.0.id() as i32).expect("a child has a pid");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let status = agent.0.wait().unwrap();
    assert!(status.success(), "clean shutdown failed: {status}");
}

/// Seals what the log holds (via the library, as the restarted agent would) and
/// checks the log replays the base to exactly the image.
fn assert_log_replays_to_image(image: &Path, base: &Path) {
    let (disk, recovery) = ProtectedDisk::open("vm1", "root", image).unwrap();
    assert!(!recovery.unclean, "the agent shut down cleanly before this check");
    disk.seal().unwrap();
    let segments: Vec<PathBuf> = disk.log_status().sealed.into_iter().map(|s| s.path).collect();
    replay(base, &segments).unwrap();
    assert!(identical(path_str(base), path_str(image)), "the log does not replay to the image");
}

fn new_image(dir: &Path, size: u64) -> (PathBuf, PathBuf) {
    let image = dir.join("root.img");
    fs::File::create(&image).unwrap().set_len(size).unwrap();
    let base = dir.join("base.img");
    fs::copy(&image, &base).unwrap();
    (image, base)
}

#[test]
fn kill_9_mid_stream_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let (image, base) = new_image(dir.path(), 64 * MIB);
    let socket = dir.path().join("nbd.sock");
    let url = format!("nbd+unix:///root?socket={}", socket.display());
    let mut acked: Vec<(u64, u8)> = Vec::new();
    // Three crashes at different points of a stream of writes, flushes and FUA writes.
    for (round, kill_after) in [(0u64, 7usize), (1, 23), (2, 61)] {
        let mut agent = start_agent(&image, &socket);
        let mut cmd = Command::new("stdbuf");
        cmd.args(["-oL", "qemu-io", "-f", "raw"]);
        for i in 0..100u64 {
            let n = round * 100 + i;
            let fua = if i % 7 == 0 { "-f " } else { "" };
            cmd.arg("-c").arg(format!("write {fua}-P {} {} 64k", n % 255 + 1, n * 64 * 1024));
            if i % 5 == 4 {
                cmd.arg("-c").arg("flush");
            }
        }
        let mut qemu = cmd.arg(&url).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
        let mut lines = BufReader::new(qemu.stdout.take().unwrap()).lines();
        let mut seen = 0;
        while let Some(Ok(line)) = lines.next() {
            if let Some(rest) = line.strip_prefix("wrote 65536/65536 bytes at offset ") {
                let off: u64 = rest.trim().parse().unwrap();
                acked.push((off, ((off / (64 * 1024)) % 255 + 1) as u8));
                seen += 1;
                if seen == kill_after {
                    kill9(&mut agent);
                }
            }
        }
        let _ = qemu.kill();
        let _ = qemu.wait();
        assert!(seen >= kill_after, "round {round}: only {seen} writes completed");
        assert!(seen < 100, "round {round}: the kill came after the stream ended");

        // Restart: the agent recovers, and every acknowledged write is there,
        // through the export and in the image file.
        let mut agent = start_agent(&image, &socket);
        let checks: Vec<String> = acked.iter().map(|(off, p)| format!("read -P {p} {off} 64k")).collect();
        qemu_io(&url, &checks);
        sigterm(&mut agent);
        let f = fs::File::open(&image).unwrap();
        for (off, p) in &acked {
            let mut buf = vec![0u8; 64 * 1024];
            f.read_exact_at(&mut buf, *off).unwrap();
            assert!(buf.iter().all(|b| b == p), "acknowledged write at {off} lost");
        }
    }
    // ...and in the log: it replays the untouched base to the image byte for byte.
    assert_log_replays_to_image(&image, &base);
}

#[test]
fn kill_9_during_a_bulk_copy_leaves_log_and_image_in_agreement() {
    let dir = tempfile::tempdir().unwrap();
    let (image, base) = new_image(dir.path(), 128 * MIB);
    let src = dir.path().join("src.img");
    fs::write(&src, Rng(99).bytes((48 * MIB) as usize)).unwrap();
    let socket = dir.path().join("nbd.sock");
    let url = format!("nbd+unix:///root?socket={}", socket.display());
    let mut agent = start_agent(&image, &socket);
    let mut convert = Command::new("qemu-img")
        .args(["convert", "-n", "-W", "-m", "8", "-f", "raw", "--target-image-opts"])
        .arg(path_str(&src))
        .arg(format!("driver=nbd,server.type=unix,server.path={},export=root", socket.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill once the copy is well under way.
    let log_dir = log_dir_for(&image);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let logged: u64 = fs::read_dir(&log_dir)
            .map(|d| d.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum())
            .unwrap_or(0);
        if logged > 8 * MIB {
            break;
        }
        assert!(Instant::now() < deadline, "the copy never got going");
        std::thread::sleep(Duration::from_millis(5));
    }
    kill9(&mut agent);
    let _ = convert.wait();
    let mut agent = start_agent(&image, &socket);
    qemu_io(&url, &["read 0 4k".into()]);
    sigterm(&mut agent);
    assert_log_replays_to_image(&image, &base);
}

fn journal_cfg(size: u64) -> JournalConfig {
    JournalConfig { vm_id: "vm1".into(), disk_id: "root".into(), disk_size: size, resync_threshold: size / 2 }
}

#[test]
fn a_torn_record_at_the_tail_is_cut_and_everything_before_it_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (image, _) = new_image(dir.path(), 8 * MIB);
    let img = fs::OpenOptions::new().read(true).write(true).open(&image).unwrap();
    let log = log_dir_for(&image);
    {
        let (mut j, _) = Journal::open(&log, journal_cfg(8 * MIB), &img).unwrap();
        for i in 0..3u64 {
            let mut buf = vec![i as u8 + 1; Journal::record_len(4096)];
            j.append_write(&mut buf, i * 4096).unwrap();
            img.write_all_at(&buf[RECORD_HEADER_LEN..RECORD_HEADER_LEN + 4096], i * 4096).unwrap();
        }
        j.sync().unwrap();
        // The process dies while appending the 4th record: half of it reached the file.
        let torn = encode_record(RecordKind::Write, 4, 3 * 4096, 4096, &[9u8; 4096]);
        let active = fs::read_dir(&log)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().unwrap() == "active")
            .unwrap();
        fs::OpenOptions::new().append(true).open(active).unwrap().write_all(&torn[..2000]).unwrap();
    }
    let (j, recovery) = Journal::open(&log, journal_cfg(8 * MIB), &img).unwrap();
    assert_eq!(recovery.torn_bytes, 2000);
    assert_eq!(recovery.redone, 3, "the three complete records are redone onto the image");
    assert!(recovery.unclean);
    assert_eq!(j.next_seq(), 4, "the torn record's sequence number is reused");
    let mut buf = vec![0u8; 4096];
    img.read_exact_at(&mut buf, 3 * 4096).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "the torn write never reached the image");
}

#[test]
fn a_crash_between_rotation_and_seal_is_finished_by_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let (image, base) = new_image(dir.path(), 8 * MIB);
    let img = fs::OpenOptions::new().read(true).write(true).open(&image).unwrap();
    let log = log_dir_for(&image);
    {
        let (mut j, _) = Journal::open(&log, journal_cfg(8 * MIB), &img).unwrap();
        let mut buf = vec![7u8; Journal::record_len(65536)];
        j.append_write(&mut buf, 0).unwrap();
        img.write_all_at(&buf[RECORD_HEADER_LEN..RECORD_HEADER_LEN + 65536], 0).unwrap();
        let rotation = j.rotate(false).unwrap().expect("one record to seal");
        drop(rotation); // crash: never sealed
        let mut buf = vec![8u8; Journal::record_len(4096)];
        j.append_write(&mut buf, 1 << 20).unwrap();
        img.write_all_at(&buf[RECORD_HEADER_LEN..RECORD_HEADER_LEN + 4096], 1 << 20).unwrap();
    }
    let (j, recovery) = Journal::open(&log, journal_cfg(8 * MIB), &img).unwrap();
    assert_eq!(recovery.sealed, 1, "the rotated segment is sealed by recovery");
    assert_eq!(j.sealed().len(), 1);
    assert_eq!((j.sealed()[0].first_seq, j.sealed()[0].last_seq), (1, 1));
    assert_eq!(j.next_seq(), 3);
    let segments: Vec<PathBuf> = j.sealed().iter().map(|s| s.path.clone()).collect();
    replay(&base, &segments).unwrap();
    let mut head = vec![0u8; 65536];
    fs::File::open(&base).unwrap().read_exact_at(&mut head, 0).unwrap();
    assert!(head.iter().all(|&b| b == 7));
}

#[test]
fn an_unclean_restart_while_resync_is_required_marks_the_whole_disk_dirty() {
    let dir = tempfile::tempdir().unwrap();
    let (image, _) = new_image(dir.path(), 4 * MIB);
    {
        let (disk, _) = ProtectedDisk::open("vm1", "root", &image).unwrap();
        let mut buf = vec![1u8; Journal::record_len(3 * MIB as usize)];
        disk.write(&mut buf, 0, false).unwrap();
        assert!(disk.log_status().resync_required);
        assert_eq!(disk.log_status().dirty_blocks, 48);
        // dropped without shutdown(): a crash
    }
    let (disk, recovery) = ProtectedDisk::open("vm1", "root", &image).unwrap();
    assert!(recovery.unclean);
    assert_eq!(
        disk.log_status().dirty_blocks,
        64,
        "changes after the last flush may be missing from the map"
    );
    disk.shutdown().unwrap();
    drop(disk);
    let (disk, recovery) = ProtectedDisk::open("vm1", "root", &image).unwrap();
    assert!(!recovery.unclean);
    assert_eq!(disk.log_status().dirty_blocks, 64);
}

// --- hostile frames ---------------------------------------------------------

#[test]
fn hostile_negotiation_gets_errors_not_a_crash() {
    let srv = serve_new_image(8 * MIB, &[]);
    let mut s = connect(&srv.socket);
    // GO for an export that does not exist: an error, and negotiation goes on.
    let mut go = 5u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"nope!");
    go.extend_from_slice(&0u16.to_be_bytes());
    option(&mut s, 7, &go);
    let (kind, msg) = option_reply(&mut s);
    assert_eq!(kind, (1 << 31) + 6, "NBD_REP_ERR_UNKNOWN");
    assert!(String::from_utf8_lossy(&msg).contains("nope!"));
    // A GO whose name length runs past the data.
    option(&mut s, 7, &[0, 0, 1, 0, b'x']);
    assert_eq!(option_reply(&mut s).0, (1 << 31) + 3, "NBD_REP_ERR_INVALID");
    // An unknown option.
    option(&mut s, 999, &[]);
    assert_eq!(option_reply(&mut s).0, (1 << 31) + 1, "NBD_REP_ERR_UNSUP");
    // LIST still works on the same connection.
    option(&mut s, 3, &[]);
    let (kind, data) = option_reply(&mut s);
    assert_eq!((kind, &data[4..]), (2, &b"root"[..]));
    assert_eq!(option_reply(&mut s).0, 1, "NBD_REP_ACK");
    // An option claiming 1 GiB of data: refused and closed without reading it.
    let mut b = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
    b.extend_from_slice(&7u32.to_be_bytes());
    b.extend_from_slice(&(1u32 << 30).to_be_bytes());
    s.write_all(&b).unwrap();
    assert_eq!(option_reply(&mut s).0, (1 << 31) + 9, "NBD_REP_ERR_TOO_BIG");
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).unwrap_or(0), 0, "connection closed");
    // The server is unharmed.
    qemu_io(&srv.url(), &["write -P 3 0 4k".into(), "read -P 3 0 4k".into()]);
}

#[test]
fn bad_requests_get_error_replies_and_the_connection_and_data_survive() {
    let srv = serve_new_image(8 * MIB, &[]);
    let size = 8 * MIB;
    let mut s = connect(&srv.socket);
    option(&mut s, 1, b"root"); // NBD_OPT_EXPORT_NAME
    let mut info = [0u8; 10];
    s.read_exact(&mut info).unwrap();
    assert_eq!(u64::from_be_bytes(info[..8].try_into().unwrap()), size);

    let mut w = request(1, 0, 1, 0, 4096);
    w.extend_from_slice(&[0x5a; 4096]);
    s.write_all(&w).unwrap();
    assert_eq!(reply(&mut s), (0, 1), "a valid write");

    let cases: Vec<(&str, Vec<u8>, u32)> = vec![
        ("read past the end", request(0, 0, 2, size, 4096), 22),
        ("write past the end", [request(1, 0, 3, size - 100, 4096), vec![1; 4096]].concat(), 28),
        (
            "write whose offset+length overflows",
            [request(1, 0, 4, u64::MAX - 10, 4096), vec![2; 4096]].concat(),
            28,
        ),
        ("write larger than the maximum", [request(1, 0, 5, 0, 33 << 20), vec![3; 33 << 20]].concat(), 22),
        ("read larger than the maximum", request(0, 0, 6, 0, 64 << 20), 75),
        ("unknown command", request(42, 0, 7, 0, 0), 22),
        ("read with an unknown flag", request(0, 0x100, 8, 0, 4096), 22),
        ("write with an unknown flag", [request(1, 0x40, 9, 0, 512), vec![4; 512]].concat(), 22),
        ("flush with an offset", request(3, 0, 10, 4096, 0), 22),
        ("trim past the end", request(4, 0, 11, size, 1), 22),
        ("write zeroes past the end", request(6, 0, 12, size - 1, 2), 28),
    ];
    for (what, frame, errno) in cases {
        s.write_all(&frame).unwrap();
        let (got, cookie) = reply(&mut s);
        assert_eq!((got, cookie), (errno, u64::from_be_bytes(frame[8..16].try_into().unwrap())), "{what}");
    }
    // Same connection, still in step: the valid write is intact.
    s.write_all(&request(0, 0, 99, 0, 4096)).unwrap();
    assert_eq!(reply(&mut s), (0, 99));
    let mut data = vec![0u8; 4096];
    s.read_exact(&mut data).unwrap();
    assert!(data.iter().all(|&b| b == 0x5a));
    // Nothing rejected reached the log or the image.
    assert_eq!(srv.disk.log_status().next_seq, 2, "only the valid write was logged");
    let img = fs::read(&srv.image).unwrap();
    assert!(img[4096..].iter().all(|&b| b == 0), "no rejected write touched the image");
    // A bad magic means the stream is out of step: the server hangs up.
    s.write_all(&[0xde; 28]).unwrap();
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).unwrap_or(0), 0);
    qemu_io(&srv.url(), &["read -P 0x5a 0 4k".into()]);
}
