use proptest::prelude::*;

use super::*;

fn header() -> SegmentHeader {
    SegmentHeader {
        epoch: 3,
        first_seq: 100,
        created_unix_ms: 1_700_000_000_000,
        vm_id: "ledger".into(),
        disk_id: "root".into(),
    }
}

fn sealed_segment(writes: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let mut b = header().encode();
    let mut data = 0;
    for (i, (off, payload)) in writes.iter().enumerate() {
        b.extend(encode_record(RecordKind::Write, 100 + i as u64, *off, payload.len() as u64, payload));
        data += payload.len() as u64;
    }
    let digest = *blake3::hash(&b).as_bytes();
    b.extend(encode_seal(
        100 + writes.len() as u64 - 1,
        writes.len() as u64,
        data,
        &digest,
        1_700_000_001_000,
        SEAL_FLAG_APP_CONSISTENT,
    ));
    b
}

/// The streaming verification ([`SegmentReader::read_to_seal`]) through a
/// 7-byte buffer, so that every payload arrives in many pieces.
fn skimmed(bytes: &[u8]) -> Result<(SegmentHeader, SealInfo), FormatError> {
    SegmentReader::new(std::io::BufReader::with_capacity(7, bytes)).and_then(SegmentReader::read_to_seal)
}

/// Both readers refuse `bytes`, for the same reason; that reason.
fn refused_by_both(bytes: &[u8]) -> FormatError {
    let (whole, skim) = (verify_sealed(bytes).expect_err("refused"), skimmed(bytes).expect_err("refused"));
    assert_eq!(whole.to_string(), skim.to_string());
    whole
}

#[test]
fn a_sealed_segment_round_trips() {
    let seg = sealed_segment(&[(0, vec![1; 512]), (4096, vec![2; 100])]);
    let (h, records, seal) = verify_sealed(&seg).unwrap();
    assert_eq!(h, header());
    assert_eq!(records.len(), 2);
    assert_eq!(records[1].offset, 4096);
    assert_eq!(records[1].payload, vec![2; 100]);
    assert_eq!(
        seal,
        SealInfo {
            last_seq: 101,
            records: 2,
            data_bytes: 612,
            sealed_unix_ms: 1_700_000_001_000,
            app_consistent: true
        }
    );
    assert_eq!(skimmed(&seg).unwrap(), (header(), seal));
}

#[test]
fn each_kind_of_damage_is_named() {
    let seg = sealed_segment(&[(0, vec![1; 512]), (4096, vec![2; 100])]);
    let hlen = header().encode().len();
    type Case<'a> = (&'a str, Vec<u8>, fn(&FormatError) -> bool);
    let cases: Vec<Case> = vec![
        (
            "magic",
            {
                let mut s = seg.clone();
                s[0] ^= 1;
                s
            },
            |e| matches!(e, FormatError::BadMagic),
        ),
        (
            "version",
            {
                let mut s = seg.clone();
                s[8] = 9;
                s
            },
            |e| matches!(e, FormatError::UnsupportedVersion(9)),
        ),
        (
            "header crc",
            {
                let mut s = seg.clone();
                s[20] ^= 1;
                s
            },
            |e| matches!(e, FormatError::HeaderChecksum),
        ),
        (
            "payload bit",
            {
                let mut s = seg.clone();
                s[hlen + 60] ^= 0x40;
                s
            },
            |e| matches!(e, FormatError::RecordChecksum { .. }),
        ),
        ("truncated", seg[..seg.len() - 10].to_vec(), |e| matches!(e, FormatError::Truncated { .. })),
        ("no seal", seg[..seg.len() - SEAL_RECORD_LEN].to_vec(), |e| matches!(e, FormatError::NotSealed)),
        (
            "trailing",
            {
                let mut s = seg.clone();
                s.push(0);
                s
            },
            |e| matches!(e, FormatError::TrailingBytes(1)),
        ),
    ];
    for (what, bytes, check) in cases {
        let err = refused_by_both(&bytes);
        assert!(check(&err), "{what}: got {err}");
    }
}

#[test]
fn a_header_whose_numbers_would_overflow_is_refused() {
    for (first_seq, epoch) in [(0, 0), (MAX_SEQ + 1, 0), (u64::MAX, 0), (1, u64::MAX)] {
        let h = SegmentHeader { first_seq, epoch, ..header() }.encode();
        let err = SegmentHeader::read_from(&mut &h[..]).unwrap_err();
        assert!(matches!(err, FormatError::BadHeader(_)), "{first_seq}/{epoch}: {err}");
    }
    let h = SegmentHeader { first_seq: MAX_SEQ, epoch: MAX_SEQ, ..header() }.encode();
    assert!(SegmentHeader::read_from(&mut &h[..]).is_ok());
}

#[test]
fn the_header_scan_agrees_with_full_verification() {
    let seg = sealed_segment(&[(0, vec![1; 512]), (4096, vec![2; 100]), (1 << 20, vec![3; 7])]);
    let (h, records, seal) = verify_sealed(&seg).unwrap();
    let (h2, ranges, seal2) =
        scan_ranges(std::io::BufReader::with_capacity(64, std::io::Cursor::new(&seg))).unwrap();
    assert_eq!((h, seal), (h2, seal2));
    assert_eq!(ranges, records.iter().map(|r| (r.offset, r.offset + r.length)).collect::<Vec<_>>());
}

#[test]
fn a_dropped_record_breaks_the_sequence_and_a_swapped_seal_the_digest() {
    let one = sealed_segment(&[(0, vec![1; 16])]);
    let two = sealed_segment(&[(0, vec![1; 16]), (16, vec![2; 16])]);
    let hlen = header().encode().len();
    let rec = RECORD_HEADER_LEN + 16 + 4;
    // Drop the first record of `two`: the second now starts at the wrong seq.
    let mut dropped = two[..hlen].to_vec();
    dropped.extend_from_slice(&two[hlen + rec..]);
    assert!(matches!(refused_by_both(&dropped), FormatError::SequenceGap { expected: 100, found: 101, .. }));
    // `one`'s records under `two`'s seal: the digest gives it away.
    let mut swapped = one[..hlen + rec].to_vec();
    swapped.extend_from_slice(&two[hlen + 2 * rec..]);
    assert!(matches!(refused_by_both(&swapped), FormatError::DigestMismatch));
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        prop_assert_eq!(verify_sealed(&bytes).is_ok(), skimmed(&bytes).is_ok());
    }

    #[test]
    fn any_flipped_byte_of_a_sealed_segment_is_rejected(
        writes in proptest::collection::vec((0u64..1 << 30, proptest::collection::vec(any::<u8>(), 1..300)), 1..6),
        pos in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let seg = sealed_segment(&writes);
        let mut bad = seg.clone();
        let i = pos.index(bad.len());
        bad[i] ^= 1 << bit;
        prop_assert!(verify_sealed(&bad).is_err(), "flipping bit {} of byte {} went unnoticed", bit, i);
        refused_by_both(&bad);
    }

    #[test]
    fn any_truncation_of_a_sealed_segment_is_rejected(
        writes in proptest::collection::vec((0u64..1 << 30, proptest::collection::vec(any::<u8>(), 1..300)), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let seg = sealed_segment(&writes);
        let len = cut.index(seg.len());
        refused_by_both(&seg[..len]);
    }
}

/// Payloads an O_DIRECT write can take are read into the aligned buffer
/// offered (the record's own payload empty); the rest into the record as
/// before; the checks are the same either way.
#[test]
fn an_aligned_payload_is_read_into_the_buffer_offered() {
    use crate::direct::AlignedBuf;
    let writes = [(8192, vec![7; 8192]), (100, vec![8; 4096]), (0, vec![9; 16384]), (4096, vec![6; 4096])];
    let seg = sealed_segment(&writes);
    let mut r = SegmentReader::new(&seg[..]).unwrap();
    let mut buf = AlignedBuf::with_capacity(8192);
    // Aligned and fits: placed.
    let (rec, placed) = r.next_record_placed(Some(&mut buf)).unwrap().unwrap();
    assert!(placed && rec.payload.is_empty());
    assert_eq!((rec.offset, buf.as_slice().len()), (8192, 8192));
    assert!(buf.as_slice().iter().all(|&b| b == 7));
    // Unaligned offset: into the record.
    let (rec, placed) = r.next_record_placed(Some(&mut buf)).unwrap().unwrap();
    assert!(!placed && rec.payload == vec![8; 4096]);
    // Larger than the buffer: into the record.
    let (rec, placed) = r.next_record_placed(Some(&mut buf)).unwrap().unwrap();
    assert!(!placed && rec.payload.len() == 16384);
    // No buffer offered: into the record.
    let (rec, placed) = r.next_record_placed(None).unwrap().unwrap();
    assert!(!placed && rec.payload == vec![6; 4096]);
    assert!(r.next_record_placed(Some(&mut buf)).unwrap().is_none(), "the seal ends it");
    assert!(r.is_sealed());

    // A flipped payload byte is caught in the buffer as in the record.
    let mut bad = seg.clone();
    bad[header().encode().len() + RECORD_HEADER_LEN + 10] ^= 1;
    let mut r = SegmentReader::new(&bad[..]).unwrap();
    let err = r.next_record_placed(Some(&mut buf)).unwrap_err();
    assert!(matches!(err, FormatError::RecordChecksum { .. }), "{err:?}");
}
