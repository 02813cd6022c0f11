//! The write path through real NBD clients (qemu-io, qemu-img, qemu-nbd): data
//! round-trips, the log replays to the live image byte for byte, segments and
//! pending bytes are tracked, and the resync-required switch keeps a dirty map.

mod common;

use std::{fs, process::Command};

use common::*;
use vmreplica_agent::log::replay::{ReplayError, replay};

const MIB: u64 = 1 << 20;

#[test]
fn qemu_io_patterns_round_trip_through_the_export() {
    let s = serve_new_image(64 * MIB, &[]);
    let url = s.url();
    qemu_io(
        &url,
        &[
            "write -P 0xab 0 64k".into(),
            "write -P 0xcd 1M 4k".into(),
            "write -P 0x11 5000 3000".into(), // unaligned
            "write -f -P 0x22 63M 1M".into(), // FUA, up to the last byte
            "write -z 8M 1M".into(),
            "discard 16M 64k".into(),
        ],
    );
    qemu_io(
        &url,
        &[
            "read -P 0xab 0 4096".into(),
            "read -P 0x11 5000 3000".into(),
            "read -P 0xab 8000 57536".into(),
            "read -P 0xcd 1M 4k".into(),
            "read -P 0x22 63M 1M".into(),
            "read -P 0 8M 1M".into(),
            "read -P 0 16M 64k".into(),
        ],
    );
    // The image file itself holds the bytes, not just the server's view.
    let img = fs::read(&s.image).unwrap();
    assert!(img[5000..8000].iter().all(|&b| b == 0x11));
    assert!(img[(63 * MIB) as usize..].iter().all(|&b| b == 0x22));
}

#[test]
fn qemu_nbd_lists_the_export_with_truthful_flags() {
    let s = serve_new_image(8 * MIB, &[]);
    let out = Command::new("qemu-nbd").arg("--list").arg("-k").arg(&s.socket).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("export: 'root'") && text.contains("size:  8388608"), "{text}");
    for flag in ["flush", "fua", "trim", "zeroes", "multi"] {
        assert!(text.contains(flag), "flag {flag} not advertised:\n{text}");
    }
    assert!(!text.contains("readonly"), "{text}");
}

#[test]
fn qemu_img_convert_copies_a_whole_disk_through_the_export() {
    // 20 MiB of data on a 64 MiB disk: below the resync threshold (half the disk).
    let s = serve_new_image(64 * MIB, &[]);
    let src = s.dir.path().join("src.img");
    let mut rng = Rng(7);
    let mut data = rng.bytes((20 * MIB) as usize);
    data.resize((64 * MIB) as usize, 0);
    data[(4 * MIB) as usize..(6 * MIB) as usize].fill(0); // a zero run qemu-img may send as WRITE_ZEROES
    fs::write(&src, &data).unwrap();
    let out = qemu_img(&["convert", "-n", "-f", "raw", "-O", "raw", path_str(&src), &s.url()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(identical(path_str(&src), &s.url()), "the export differs from the source");
    assert!(identical(path_str(&src), path_str(&s.image)), "the image file differs from the source");
    // ... and the log holds all of it: replaying it onto the base gives the same disk.
    s.disk.seal().unwrap().expect("records were logged");
    replay(&s.base, &sealed_paths(&s.disk)).unwrap();
    assert!(identical(path_str(&s.base), path_str(&src)));
}

#[test]
fn replaying_sealed_segments_reproduces_the_image_at_every_seal() {
    let s = serve_new_image(128 * MIB, b"an existing boot sector");
    let url = s.url();
    let mut rng = Rng(42);
    let mut snapshots = Vec::new();
    for round in 0..5 {
        let mut cmds = Vec::new();
        for _ in 0..40 {
            let off = rng.below(128 * MIB - 256 * 1024);
            let len = 1 + rng.below(256 * 1024);
            cmds.push(match rng.below(10) {
                0 => format!("write -z {off} {len}"),
                1 => format!("discard {off} {len}"),
                _ => format!("write -P {} {off} {len}", rng.below(255) + 1),
            });
        }
        qemu_io(&url, &cmds);
        let sealed = s.disk.seal().unwrap().expect("this round logged records");
        assert_eq!(sealed.records, 40, "round {round}: one record per request");
        let snap = s.dir.path().join(format!("snap{round}.img"));
        fs::copy(&s.image, &snap).unwrap();
        snapshots.push(snap);
    }
    let segments = sealed_paths(&s.disk);
    assert_eq!(segments.len(), 5);
    for (k, snap) in snapshots.iter().enumerate() {
        let copy = s.dir.path().join(format!("replay{k}.img"));
        fs::copy(&s.base, &copy).unwrap();
        let report = replay(&copy, &segments[..=k]).unwrap();
        assert_eq!(report.records, 40 * (k as u64 + 1));
        assert!(identical(path_str(&copy), path_str(snap)), "replay of {} segments differs", k + 1);
    }
}

#[test]
fn several_connections_write_at_once_and_the_log_still_replays_exactly() {
    let s = serve_new_image(64 * MIB, &[]);
    let url = s.url();
    // Four clients writing overlapping ranges concurrently: whatever order the
    // server applied them in, the log must have the same order.
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let url = url.clone();
            std::thread::spawn(move || {
                let cmds: Vec<String> = (0..50u64)
                    .map(|i| format!("write -P {} {} 96k", w + 1, ((i * 37 + w * 11) % 120) * 64 * 1024))
                    .collect();
                qemu_io(&url, &cmds);
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    qemu_io(&url, &["flush".into()]);
    s.disk.seal().unwrap();
    replay(&s.base, &sealed_paths(&s.disk)).unwrap();
    assert!(identical(path_str(&s.base), path_str(&s.image)));
}

#[test]
fn sealed_segments_are_listed_with_sizes_and_pending_bytes_add_up() {
    let s = serve_new_image(16 * MIB, &[]);
    let url = s.url();
    assert_eq!(s.disk.seal().unwrap(), None, "nothing to seal before any write");
    assert_eq!(s.disk.log_status().pending_bytes, 0, "an empty active segment is nothing pending");
    qemu_io(&url, &["write -P 1 0 1M".into(), "write -P 2 1M 1M".into()]);
    let first = s.disk.seal().unwrap().unwrap();
    qemu_io(&url, &["write -P 3 2M 512k".into()]);
    let second = s.disk.seal().unwrap().unwrap();
    qemu_io(&url, &["write -P 4 3M 4k".into()]);
    let status = s.disk.log_status();
    assert_eq!(status.sealed, vec![first.clone(), second.clone()]);
    assert_eq!((first.first_seq, first.last_seq, second.first_seq, second.last_seq), (1, 2, 3, 3));
    for seg in &status.sealed {
        assert_eq!(fs::metadata(&seg.path).unwrap().len(), seg.bytes, "listed size is the file's size");
    }
    let active: u64 = fs::read_dir(s.image.with_file_name("root.img.vmrlog"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "active"))
        .map(|p| fs::metadata(p).unwrap().len())
        .sum();
    assert_eq!(status.pending_bytes, first.bytes + second.bytes + active);
    assert!(status.pending_bytes > 2 * MIB + 512 * 1024 + 4096, "payload bytes are pending");
    assert_eq!(status.next_seq, 5);
    // The replica acknowledged the first segment: it goes, the rest stays.
    s.disk.acknowledge(first.last_seq).unwrap();
    assert!(!first.path.exists());
    assert_eq!(s.disk.log_status().sealed, vec![second.clone()]);
    // Everything sealed and acknowledged: nothing is pending.
    let third = s.disk.seal().unwrap().unwrap();
    s.disk.acknowledge(third.last_seq).unwrap();
    assert_eq!(s.disk.log_status().pending_bytes, 0, "all acknowledged: {:?}", s.disk.log_status());
}

#[test]
fn pending_log_past_half_the_disk_requires_resync_and_tracks_a_dirty_map() {
    let s = serve_new_image(4 * MIB, &[]);
    let url = s.url();
    qemu_io(&url, &["write -P 1 0 1M".into()]);
    s.disk.seal().unwrap();
    assert!(!s.disk.log_status().resync_required);
    // 1 MiB sealed + 1.5 MiB more passes 2 MiB (half of 4 MiB).
    qemu_io(&url, &["write -P 2 1M 1M".into(), "write -P 3 3M 512k".into()]);
    let status = s.disk.log_status();
    assert!(status.resync_required, "{status:?}");
    assert!(status.sealed.is_empty(), "the log it replaced is gone");
    assert!(status.pending_bytes < 4096, "no payload is logged any more: {status:?}");
    // 64 KiB blocks: 0..2 MiB (32 blocks, from the dropped log) + 3M..3.5M (8 blocks).
    assert_eq!(status.dirty_blocks, 40);
    qemu_io(&url, &["write -P 4 2M 64k".into(), "flush".into()]);
    assert_eq!(s.disk.log_status().dirty_blocks, 41, "writes keep being tracked");
    qemu_io(&url, &["read -P 4 2M 64k".into(), "read -P 3 3M 512k".into()]);
    assert_eq!(s.disk.seal().unwrap(), None, "nothing is sealed while resync is required");
}

#[test]
fn a_damaged_segment_is_reported_and_never_applied() {
    let s = serve_new_image(8 * MIB, &[]);
    qemu_io(&s.url(), &["write -P 9 0 1M".into()]);
    s.disk.seal().unwrap();
    qemu_io(&s.url(), &["write -P 8 2M 1M".into()]);
    s.disk.seal().unwrap();
    let segments = sealed_paths(&s.disk);
    let mut bytes = fs::read(&segments[1]).unwrap();
    bytes[5000] ^= 0x01;
    fs::write(&segments[1], &bytes).unwrap();
    let pristine = s.dir.path().join("pristine.img");
    fs::copy(&s.base, &pristine).unwrap();
    let err = replay(&s.base, &segments).unwrap_err();
    assert!(matches!(err, ReplayError::Damaged { .. }), "{err}");
    assert!(err.to_string().contains("checksum mismatch"), "{err}");
    assert!(
        identical(path_str(&s.base), path_str(&pristine)),
        "nothing may be applied, not even the good first segment"
    );
    // Truncated: named as such.
    fs::write(&segments[1], &bytes[..bytes.len() / 2]).unwrap();
    let err = replay(&s.base, &segments).unwrap_err();
    assert!(err.to_string().contains("truncated") || err.to_string().contains("checksum"), "{err}");
    // Out of order: a gap in the sequence.
    let err = replay(&s.base, &segments[1..])
        .map(|_| ())
        .and(replay(&s.base, &[segments[0].clone(), segments[0].clone()]));
    assert!(matches!(err, Err(ReplayError::Gap { .. }) | Err(ReplayError::Damaged { .. })), "{err:?}");
    assert!(identical(path_str(&s.base), path_str(&pristine)));
}

#[test]
fn the_agent_cli_replays_and_inspects_segments() {
    let s = serve_new_image(16 * MIB, &[]);
    qemu_io(&s.url(), &["write -P 5 0 1M".into()]);
    s.disk.seal().unwrap();
    qemu_io(&s.url(), &["write -P 6 4M 64k".into(), "discard 0 64k".into()]);
    s.disk.seal().unwrap();
    let segments = sealed_paths(&s.disk);
    let agent = env!("CARGO_BIN_EXE_vmreplica-agent");
    let out = Command::new(agent).arg("inspect").args(&segments).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("ok: vm1/root epoch 0 sequence 1..=1 (1 records, 1048576 data bytes)"), "{text}");
    assert!(text.contains("sequence 2..=3 (2 records"), "{text}");
    let out = Command::new(agent).args(["replay", "--image"]).arg(&s.base).args(&segments).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("applied 2 segments (3 records"));
    assert!(identical(path_str(&s.base), path_str(&s.image)));
    // A damaged segment: inspect names it and fails; nothing else is claimed ok.
    let mut bytes = fs::read(&segments[0]).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0xff;
    fs::write(&segments[0], bytes).unwrap();
    let out = Command::new(agent).arg("inspect").arg(&segments[0]).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("DAMAGED"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn direct(args: &[&str], image: &std::path::Path) -> (bool, String) {
    let out = Command::new(args[0]).args(&args[1..]).arg(image).output().expect("runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// A paused QEMU with `image` as its VM's disk (it takes the image's locks
/// at start, or exits saying why it cannot).
fn qemu_on(image: &std::path::Path) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.args([
        "30",
        "qemu-system-x86_64",
        "-S",
        "-accel",
        "tcg",
        "-nodefaults",
        "-display",
        "none",
        "-drive",
    ])
    .arg(format!("file={},format=raw,if=virtio", image.display()));
    cmd
}

/// While the agent serves an image it holds QEMU's own image locks on it: a
/// QEMU, qemu-io or qemu-img opening the file for writing is refused instead
/// of writing around the log; force-shared reads still work; the export takes
/// writes as before; and once the disk is closed the image is free again.
#[test]
fn nothing_writes_around_the_log_while_the_agent_serves_the_image() {
    let s = serve_new_image(16 * MIB, &[]);
    qemu_io(&s.url(), &["write -P 0x77 0 64k".into()]);
    let (ok, text) = direct(&["qemu-io", "-f", "raw", "-c", "write -P 0x99 0 4k"], &s.image);
    assert!(!ok && text.contains("Failed to get \"write\" lock"), "qemu-io: {text}");
    let out = qemu_on(&s.image).output().expect("qemu-system-x86_64 (hack/guest-kit.sh installs it)");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Failed to get \"write\" lock"), "QEMU on the image file itself: {text}");
    let (ok, text) = direct(&["qemu-io", "-r", "-U", "-f", "raw", "-c", "read -P 0x77 0 64k"], &s.image);
    assert!(ok && !text.contains("failed"), "a force-shared read: {text}");
    qemu_io(&s.url(), &["write -P 0x55 0 4k".into(), "read -P 0x55 0 4k".into()]);
    assert!(fs::read(&s.image).unwrap()[..4096].iter().all(|&b| b == 0x55), "no direct write landed");

    // Opened and closed again by hand: the locks go with the disk.
    let other = s.dir.path().join("other.img");
    fs::File::create(&other).unwrap().set_len(MIB).unwrap();
    let (disk, _) = vmreplica_agent::disk::ProtectedDisk::open("vm2", "root", &other).unwrap();
    assert!(!direct(&["qemu-io", "-f", "raw", "-c", "write 0 4k"], &other).0, "locked while open");
    drop(disk);
    let (ok, text) = direct(&["qemu-io", "-f", "raw", "-c", "write 0 4k"], &other);
    assert!(ok, "free once closed: {text}");
}

/// An image a QEMU already runs on is refused, and nothing is written to it:
/// the agent would otherwise log writes the VM's own writes overtake.
#[test]
fn an_image_a_qemu_already_uses_is_refused() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("busy.img");
    fs::File::create(&image).unwrap().set_len(MIB).unwrap();
    let ino = fs::metadata(&image).unwrap().ino();
    let mut holder = qemu_on(&image).stderr(std::process::Stdio::null()).spawn().expect("qemu-system-x86_64");
    // QEMU takes its locks in steps while it starts (the first ones seen in
    // /proc/locks are not yet a writer's): wait until they are, as
    // a writer opening it sees them ("Failed to get \"write\" lock").
    let held = (0..200).any(|_| {
        let locks = fs::read_to_string("/proc/locks").unwrap_or_default();
        let mine = locks
            .lines()
            .any(|l| l.split_whitespace().nth(5).is_some_and(|f| f.ends_with(&format!(":{ino}"))));
        let probe = Command::new("qemu-io").args(["-c", "quit", "-f", "raw"]).arg(&image).output().unwrap();
        let text =
            String::from_utf8_lossy(&probe.stderr).into_owned() + &String::from_utf8_lossy(&probe.stdout);
        let writer = text.contains("\"write\" lock");
        (mine && writer) || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            false
        }
    });
    assert!(held, "QEMU took its locks on the image");
    let e = vmreplica_agent::disk::ProtectedDisk::open("vm3", "root", &image).err().expect("refused");
    assert!(e.to_string().contains("another process holds the image's"), "{e}");
    let made: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(made.len(), 1, "nothing made beside the image: {made:?}");
    // SIGTERM: `timeout` passes it on to QEMU and waits for it (a SIGKILL
    // would leave QEMU running with its locks).
    assert!(Command::new("kill").arg(holder.id().to_string()).status().unwrap().success());
    holder.wait().unwrap();
    let (disk, _) =
        vmreplica_agent::disk::ProtectedDisk::open("vm3", "root", &image).expect("free once QEMU is gone");
    drop(disk);
}
