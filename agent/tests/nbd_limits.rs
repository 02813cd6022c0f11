//! What an NBD client can make the agent hold, driven with raw protocol
//! bytes as a hostile or broken client would send them: memory per stalled
//! WRITE is one chunk, not the announced length; an export serves a bounded
//! number of connections and refuses the next with a reason; stalled
//! handshakes and payloads are timed out while idle connections may wait;
//! an empty WRITE costs no log record.

mod common;

use std::{
    io::{Read, Write},
    os::unix::net::{UnixListener, UnixStream},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use common::{nbd_raw::*, *};
use vmreplica_agent::{
    disk::ProtectedDisk,
    nbd::{NbdServer, server::Limits},
};
use vmreplica_tests::procs::{Process, bin};

const MIB: u64 = 1 << 20;
const REP_ACK: u32 = 1;
const REP_ERR_POLICY: u32 = (1 << 31) + 2;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn stalled_writes_hold_a_chunk_each_and_an_export_refuses_connections_beyond_its_limit() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("root.img");
    std::fs::File::create(&image).unwrap().set_len(256 * MIB).unwrap();
    let socket = dir.path().join("nbd.sock");
    let mut cmd = Command::new(bin("vmreplica-agent"));
    cmd.args(["serve", "--vm", "vm1", "--nbd-max-connections", "8", "--disk"])
        .arg(format!("root={}", image.display()))
        .arg("--socket")
        .arg(&socket);
    let agent = Process::spawn_ready(cmd, &dir.path().join("agent.log"));
    let pid = agent.0.id();
    let before = rss_kib(pid);

    // Eight connections (the limit), each announcing a 32 MiB WRITE and
    // sending 64 KiB of it: each may hold one 1 MiB chunk, not 32 MiB.
    let mut stalled = Vec::new();
    for k in 0..8u64 {
        let (mut s, kind, text) = go(&socket, "root");
        assert_eq!(kind, REP_ACK, "connection {k}: {text}");
        s.write_all(&request(1, 0, k, k * 32 * MIB, 32 << 20)).unwrap();
        s.write_all(&vec![0x5a; 64 << 10]).unwrap();
        stalled.push(s);
    }
    std::thread::sleep(Duration::from_millis(500));
    let grown = rss_kib(pid).saturating_sub(before);
    assert!(grown < 24 * 1024, "8 stalled 32 MiB writes grew the agent by {grown} KiB");

    // The ninth is refused with a reason, at negotiation.
    let (_, kind, text) = go(&socket, "root");
    assert_eq!(kind, REP_ERR_POLICY, "{text}");
    assert!(
        text.contains("already serves 8 connections") && text.contains("--nbd-max-connections"),
        "{text}"
    );
    // qemu-io says so too, and nothing was written.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 1 0 4k"])
        .arg(format!("nbd+unix:///root?socket={}", socket.display()))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success() && text.contains("already serves 8 connections"), "{text}");

    // A connection that closes frees its place.
    drop(stalled.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, kind, text) = go(&socket, "root");
        if kind == REP_ACK {
            break;
        }
        assert!(Instant::now() < deadline, "the place was not freed: {text}");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(stalled);
    drop(agent);
}

fn serve_with(limits: Limits) -> (tempfile::TempDir, Arc<ProtectedDisk>, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("root.img");
    std::fs::File::create(&image).unwrap().set_len(8 * MIB).unwrap();
    let (disk, _) = ProtectedDisk::open("vm1", "root", &image).unwrap();
    let disk = Arc::new(disk);
    let socket = dir.path().join("nbd.sock");
    NbdServer::with_limits([disk.clone()], limits).serve_unix(UnixListener::bind(&socket).unwrap());
    (dir, disk, socket)
}

/// Whether the server closed `s` within `within`.
fn closed_within(s: &mut UnixStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn stalled_handshakes_and_payloads_time_out_but_idle_connections_wait() {
    let limits = Limits {
        handshake_timeout: Duration::from_millis(800),
        request_timeout: Duration::from_millis(800),
        ..Default::default()
    };
    let (_dir, disk, socket) = serve_with(limits);

    // Connected, never negotiating.
    let mut silent = UnixStream::connect(&socket).unwrap();
    let t = Instant::now();
    assert!(closed_within(&mut silent, Duration::from_secs(5)), "a silent handshake was kept");
    assert!(t.elapsed() >= Duration::from_millis(700), "closed before the timeout: {:?}", t.elapsed());

    // A WRITE whose payload stalls after 100 bytes: closed, nothing logged.
    let next = disk.log_status().next_seq;
    let (mut s, kind, _) = go(&socket, "root");
    assert_eq!(kind, REP_ACK);
    s.write_all(&request(1, 0, 1, 0, 4096)).unwrap();
    s.write_all(&[7u8; 100]).unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(5)), "a stalled payload was kept");
    assert_eq!(disk.log_status().next_seq, next, "nothing of the stalled write was logged");

    // Idle between requests for longer than the timeout: still served.
    let (mut s, kind, _) = go(&socket, "root");
    assert_eq!(kind, REP_ACK);
    std::thread::sleep(Duration::from_millis(2000));
    s.write_all(&request(1, 0, 2, 4096, 4096)).unwrap();
    s.write_all(&[9u8; 4096]).unwrap();
    assert_eq!(reply(&mut s).0, 0, "an idle connection's next write is served");
    assert_eq!(disk.log_status().next_seq, next + 1);
}

#[test]
fn an_empty_write_is_acknowledged_without_a_log_record() {
    let (_dir, disk, socket) = serve_with(Limits::default());
    let (mut s, kind, _) = go(&socket, "root");
    assert_eq!(kind, REP_ACK);
    let next = disk.log_status().next_seq;
    for (cookie, offset) in [(1, 0), (2, 4 * MIB), (3, 8 * MIB)] {
        // WRITE, WRITE with FUA, WRITE_ZEROES and TRIM of zero bytes, up to offset = size.
        for (kind, flags) in [(1u16, 0u16), (1, 1), (6, 0), (4, 0)] {
            s.write_all(&request(kind, flags, cookie, offset, 0)).unwrap();
            assert_eq!(reply(&mut s).0, 0, "kind {kind} at {offset}");
        }
    }
    assert_eq!(disk.log_status().next_seq, next, "an empty request logged a record");
    // Past the end it is still an error, and a real write is still logged.
    s.write_all(&request(1, 0, 4, 8 * MIB + 1, 0)).unwrap();
    assert_eq!(reply(&mut s).0, 28, "ENOSPC past the end");
    s.write_all(&request(1, 0, 5, 0, 512)).unwrap();
    s.write_all(&[1u8; 512]).unwrap();
    assert_eq!(reply(&mut s).0, 0);
    assert_eq!(disk.log_status().next_seq, next + 1);
}

#[test]
fn a_write_larger_than_a_chunk_is_logged_in_chunks_and_replays_exactly() {
    let (dir, disk, socket) = serve_with(Limits::default());
    let base = dir.path().join("base.img");
    std::fs::File::create(&base).unwrap().set_len(8 * MIB).unwrap();
    let url = format!("nbd+unix:///root?socket={}", socket.display());
    qemu_io(&url, &["write -P 0x42 100000 3500000".into()]);
    let sealed = disk.seal().unwrap().unwrap();
    assert!(sealed.records >= 4, "3.5 MB in 1 MiB chunks: {sealed:?}");
    vmreplica_agent::log::replay::replay(&base, &[sealed.path]).unwrap();
    assert!(identical(path_str(&base), &url));
}
