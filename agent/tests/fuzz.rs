//! Parsers fed hostile input (property tests, offline): an NBD client
//! sending arbitrary bytes (from the first byte, or after a valid handshake),
//! `replica.json` with arbitrary contents or numbers, an external-media
//! manifest with arbitrary numbers, a resync peer's hashes and data, and a
//! replicated segment damaged anywhere and cut into arbitrary chunks. Each must end with an error or a
//! result that passes its own checks — never a panic, a hang, or a write.
//! CI runs the default number of cases; `PROPTEST_CASES=5000 cargo test -p
//! vmreplica-agent --test fuzz` is the long run.

mod common;

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    sync::Arc,
    time::Duration,
};

use common::*;
use proptest::prelude::*;
use vmreplica_agent::{
    hashtree::{self, LEAF},
    log::format::{RecordKind, SegmentHeader, SegmentWriter},
    media,
    nbd::NbdServer,
    replica::{Incoming, ReplicaDisk, ReplicaState, resync::Comparison, state},
};

/// A sealed segment of `writes` 4 KiB writes from sequence 1, as a primary sends it.
fn segment(writes: u64) -> Vec<u8> {
    let header = SegmentHeader {
        epoch: 0,
        first_seq: 1,
        created_unix_ms: 1_700_000_000_000,
        vm_id: "vm1".into(),
        disk_id: "root".into(),
    };
    let mut w = SegmentWriter::new(Vec::new(), &header).unwrap();
    for i in 0..writes {
        w.write_record(RecordKind::Write, i * 4096, 4096, &[i as u8 + 1; 4096]).unwrap();
    }
    w.finish(1_700_000_001_000).unwrap().0
}

/// Streams `bytes` to the replica as one segment `[1, last]`, in chunks of the given sizes.
fn receive(r: &ReplicaDisk, bytes: &[u8], last: u64, sizes: &[usize]) -> Result<u64, String> {
    let Incoming::New(mut inc) =
        r.begin_segment(1, last, 0, bytes.len() as u64).map_err(|e| e.to_string())?
    else {
        return Err("taken as a duplicate".into());
    };
    let (mut at, mut k) = (0usize, 0usize);
    while at < bytes.len() {
        let n = sizes[k % sizes.len()].min(bytes.len() - at);
        if let Err(e) = inc.write_chunk(at as u64, &bytes[at..at + n]) {
            return Err(e.to_string());
        }
        (at, k) = (at + n, k + 1);
    }
    r.finish_segment(inc).map_err(|e| e.to_string())
}

/// Feeds `bytes` to a server session on a socket pair and waits for it to end.
fn session(server: &Arc<NbdServer>, bytes: &[u8]) -> Result<(), TestCaseError> {
    let (mut client, conn) = UnixStream::pair().unwrap();
    let s = server.clone();
    let handled = std::thread::spawn(move || s.handle(conn));
    // Drain what the server sends so it never blocks writing.
    let mut reader = client.try_clone().unwrap();
    let drained = std::thread::spawn(move || {
        let mut sink = vec![0u8; 1 << 16];
        while matches!(reader.read(&mut sink), Ok(n) if n > 0) {}
    });
    let _ = client.write_all(bytes);
    let _ = client.shutdown(std::net::Shutdown::Write);
    for _ in 0..500 {
        if handled.is_finished() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    prop_assert!(handled.is_finished(), "the session did not end within 5 s of EOF");
    prop_assert!(handled.join().is_ok(), "the session panicked");
    drop(client);
    let _ = drained.join();
    Ok(())
}

/// A client's side of a fixed-newstyle handshake that opens export `root`
/// (no zeroes), so what follows is transmission.
fn handshake() -> Vec<u8> {
    let mut b = 3u32.to_be_bytes().to_vec(); // FIXED_NEWSTYLE | NO_ZEROES
    b.extend(0x4948_4156_454F_5054u64.to_be_bytes()); // IHAVEOPT
    b.extend(1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
    b.extend(4u32.to_be_bytes());
    b.extend(b"root");
    b
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48),
        ..ProptestConfig::default()
    })]

    #[test]
    fn nbd_sessions_of_arbitrary_bytes_end_cleanly(
        raw in proptest::collection::vec(any::<u8>(), 0..512),
        after in proptest::collection::vec(any::<u8>(), 0..2048),
        requests in proptest::collection::vec((any::<u16>(), 0u16..8, any::<u64>(), any::<u32>()), 0..8),
    ) {
        // Not served on a socket: `session` drives the server itself (a
        // listener's accept thread would keep each case's disk open: after
        // ~5,000 cases, "Too many open files").
        let p = new_image_for("vm1", 1 << 20, b"fuzz");
        let server = NbdServer::new([p.disk.clone()]);
        // Arbitrary bytes from the start.
        session(&server, &raw)?;
        // A valid handshake, then arbitrary bytes.
        let mut b = handshake();
        b.extend(&after);
        session(&server, &b)?;
        // A valid handshake, then well-framed requests with arbitrary fields
        // (flags, kind, offset, length: past the end, overflowing, huge).
        let mut b = handshake();
        for (flags, kind, offset, len) in &requests {
            b.extend(0x2560_9513u32.to_be_bytes());
            b.extend(flags.to_be_bytes());
            b.extend(kind.to_be_bytes());
            b.extend(7u64.to_be_bytes());
            b.extend(offset.to_be_bytes());
            b.extend(len.to_be_bytes());
            if *kind == 1 {
                b.extend(std::iter::repeat_n(0xAB, (*len as usize).min(4096)));
            }
        }
        session(&server, &b)?;
        // The disk is still whole: its log replays to the image.
        prop_assert!(p.disk.seal().is_ok());
    }

    #[test]
    fn a_segment_damaged_anywhere_is_refused_as_it_arrives_and_leaves_nothing(
        writes in 1u64..6,
        damage in 0u8..3,
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
        sizes in proptest::collection::vec(1usize..20_000, 1..5),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let r = ReplicaDisk::open(dir.path(), || ReplicaState::new("vm1", "root", 1 << 20, 0, "g", "p")).unwrap();
        let copy = r.begin_copy(1 << 20, 0, 1).unwrap();
        r.finish_copy(copy, 1).unwrap();
        let good = segment(writes);
        let mut bad = good.clone();
        let i = at.index(good.len());
        match damage {
            0 => bad[i] ^= 1 << bit,     // a flipped bit anywhere
            1 => bad.truncate(i),         // cut short (announced so)
            _ => bad.extend_from_slice(&good[i..]), // something after the seal
        }
        let refused = receive(&r, &bad, writes, &sizes);
        prop_assert!(refused.is_err(), "damage {damage} at {i} was accepted");
        prop_assert_eq!(r.state().received_through, 0);
        for sub in ["incoming", "log"] {
            let left: Vec<_> = std::fs::read_dir(dir.path().join(sub)).unwrap().flatten().map(|e| e.path()).collect();
            prop_assert!(left.is_empty(), "{sub} holds {left:?} after {refused:?}");
        }
        // The sound segment is taken after it, as if nothing happened.
        prop_assert_eq!(receive(&r, &good, writes, &sizes), Ok(writes));
    }

    #[test]
    fn replica_json_of_arbitrary_contents_is_refused_or_sound(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        nums in proptest::collection::vec(any::<u64>(), 6),
    ) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("replica.json"), &bytes).unwrap();
        if let Ok(Some(l)) = state::load(dir.path()) {
            prop_assert!(l.disk_size > 0 && l.applied_through <= l.received_through, "{l:?}");
        }
        // A well-formed file with arbitrary numbers: loaded only when they hold together.
        let s = ReplicaState {
            disk_size: nums[0],
            epoch: nums[1],
            received_through: nums[2],
            applied_through: nums[3],
            consistent_from: nums[4],
            ..ReplicaState::new("vm1", "root", 1, 0, "g", "p")
        };
        // (Stored as the agent stores it, checksum included: what is
        // checked here is whether the numbers hold together.)
        state::store(dir.path(), &s).unwrap();
        if let Ok(Some(l)) = state::load(dir.path()) {
            prop_assert!(l.disk_size > 0 && l.applied_through <= l.received_through);
            prop_assert!(l.received_through <= vmreplica_agent::log::format::MAX_SEQ);
        }
    }

    #[test]
    fn a_manifest_with_arbitrary_numbers_is_refused_and_imports_nothing(
        size in any::<u64>(),
        chunk_size in any::<u64>(),
        next in any::<u64>(),
        from in any::<u64>(),
        chunks in proptest::collection::vec((any::<u64>(), any::<u64>()), 0..6),
    ) {
        let root = tempfile::tempdir().unwrap();
        let export = root.path().join("vm1").join("root");
        std::fs::create_dir_all(export.join("chunks")).unwrap();
        let m = serde_json::json!({
            "version": 1, "vmId": "vm1", "diskId": "root", "diskSize": size, "chunkSize": chunk_size,
            "epoch": 0, "nextSeq": next, "consistentFrom": from,
            "chunks": chunks.iter().map(|(o, l)| serde_json::json!({"offset": o, "len": l,
                "blake3": "00".repeat(32)})).collect::<Vec<_>>(),
        });
        std::fs::write(export.join("manifest.json"), m.to_string()).unwrap();
        let replica = root.path().join("replicas").join("vm1").join("root");
        let owner = media::Owner { primary: "p".into(), trust_group: "g".into() };
        match media::import(&export, &replica, &owner) {
            // Only a manifest whose numbers hold together and that lists no
            // chunk (no file can match one): an all-zero disk of that size.
            Ok(m) => {
                prop_assert!(m.chunks.is_empty() && m.disk_size == size && m.next_seq == next);
                prop_assert_eq!(std::fs::metadata(replica.join("disk.img")).unwrap().len(), size);
            }
            Err(_) => {
                prop_assert!(!replica.join("replica.json").exists() && !replica.join("disk.img").exists());
            }
        }
    }

    #[test]
    fn a_resync_peer_s_arbitrary_hashes_and_data_are_refused_or_accounted(
        bytes in proptest::collection::vec(any::<u8>(), 1..(256 << 10)),
        window_hash in proptest::collection::vec(any::<u8>(), 0..20),
        block_hashes in proptest::collection::vec(any::<u8>(), 0..200),
        blocks in proptest::collection::vec(any::<u32>(), 0..6),
        leaf_hashes in proptest::collection::vec(any::<u8>(), 0..800),
        data in proptest::collection::vec((any::<u64>(), any::<u64>()), 0..6),
        size in any::<u64>(),
    ) {
        let own = hashtree::hash_bytes(0, &bytes);
        let leaves = own.leaves.len() as u64;
        let mut cmp = Comparison::default();
        let _ = cmp.window(own.clone(), &window_hash);
        let _ = cmp.blocks(0, &block_hashes);
        if let Ok(masks) = cmp.leaves(0, &blocks, &leaf_hashes) {
            prop_assert_eq!(masks.len(), blocks.len());
        }
        for (offset, len) in &data {
            if cmp.received(*offset, *len, size).is_ok() {
                // Only whole leaves asked for, inside the disk, are taken.
                prop_assert!(offset % LEAF == 0 && *len > 0 && offset + len <= size);
                prop_assert!(offset / LEAF < leaves);
            }
        }
        // Settled means nothing asked for is still awaited: never with a window open.
        let _ = cmp.settled();
    }
}
