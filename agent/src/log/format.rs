//! The on-disk (and later on-wire) format of a replication log segment.
//!
//! ```text
//!  segment = header record* [seal]
//!  header  = magic "VMRLOG\r\n" | version u16 | header_len u16 | reserved u32
//!            | epoch u64 | first_seq u64 | created_unix_ms u64
//!            | vm_id_len u8 | disk_id_len u8 | vm_id | disk_id | crc32c u32
//!  record  = magic u32 | kind u8 | flags u8 | reserved u16 | seq u64
//!            | offset u64 | length u64 | payload_len u32 | reserved u32
//!            | payload | crc32c u32           (crc over magic..payload)
//!  seal    = a record of kind Seal: seq = last record's seq, offset = record
//!            count, length = bytes written, payload = BLAKE3 of every byte of
//!            the segment before the seal record | sealed_unix_ms u64
//! ```
//! All integers little-endian. The CRC catches a torn or flipped record; the
//! seal's digest catches anything else (a record dropped, reordered, or a
//! segment swapped for another's), so a sealed segment that verifies is exactly
//! what the primary wrote.
//!
//! One file, about 580 lines, on purpose: the byte layout, its encoder and
//! its verifying reader are checked against each other by reading them together.

use std::io::{self, Read};

/// First bytes of every segment.
pub const SEGMENT_MAGIC: [u8; 8] = *b"VMRLOG\r\n";
/// The segment format version this code writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// First bytes of every record.
pub const RECORD_MAGIC: u32 = 0x5245_4331; // "REC1" read as big-endian text
/// Bytes of a record before its payload.
pub const RECORD_HEADER_LEN: usize = 40;
/// Bytes of a record after its payload.
pub const RECORD_TRAILER_LEN: usize = 4;
/// Largest payload a record may carry (the NBD export's maximum request size).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Longest VM or disk id.
pub const MAX_ID_LEN: usize = 255;
/// Largest sequence number (and epoch) a log may carry. Every number read from
/// a file or the wire is checked against it, so `seq + 1` can never wrap: a
/// disk logging a billion records a second takes 146 years to get here.
pub const MAX_SEQ: u64 = 1 << 62;
const HEADER_FIXED_LEN: usize = 42;
pub const DIGEST_LEN: usize = 32;
/// Payload of a seal record: digest and seal time.
pub const SEAL_PAYLOAD_LEN: usize = DIGEST_LEN + 8;
/// Seal record flag: the segment was rotated with the guest quiesced, so the
/// point it ends is application-consistent.
pub const SEAL_FLAG_APP_CONSISTENT: u8 = 1;
/// Bytes of a whole seal record.
pub const SEAL_RECORD_LEN: usize = RECORD_HEADER_LEN + SEAL_PAYLOAD_LEN + RECORD_TRAILER_LEN;

/// What a segment or record failed on. Every variant means "do not apply".
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("not a vmreplica log segment (bad magic)")]
    BadMagic,
    #[error("segment format version {0} is not supported (this agent reads version {FORMAT_VERSION})")]
    UnsupportedVersion(u16),
    #[error("segment header is corrupt (checksum mismatch)")]
    HeaderChecksum,
    #[error("segment header is malformed: {0}")]
    BadHeader(&'static str),
    #[error("record at byte {at} is corrupt: {what}")]
    BadRecord { at: u64, what: &'static str },
    #[error("record at byte {at} is corrupt (checksum mismatch)")]
    RecordChecksum { at: u64 },
    #[error("segment is truncated at byte {at}")]
    Truncated { at: u64 },
    #[error("record at byte {at} has sequence {found}, expected {expected}")]
    SequenceGap { at: u64, expected: u64, found: u64 },
    #[error("segment is not sealed")]
    NotSealed,
    #[error("segment seal does not match its contents (digest mismatch)")]
    DigestMismatch,
    #[error("segment seal disagrees with its contents: {0}")]
    SealMismatch(&'static str),
    #[error("{0} bytes follow the seal")]
    TrailingBytes(u64),
    #[error("reading the segment")]
    Io(#[from] io::Error),
}

/// Identity and position of a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Replication epoch; bumped at every promotion.
    pub epoch: u64,
    /// Sequence number of the segment's first record.
    pub first_seq: u64,
    /// When the segment was opened, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// The protected VM.
    pub vm_id: String,
    /// The disk within the VM.
    pub disk_id: String,
}

/// What a record does to the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// `payload` is written at `offset`.
    Write = 1,
    /// `length` bytes at `offset` become zero.
    WriteZeroes = 2,
    /// `length` bytes at `offset` are discarded; they read as zero afterwards.
    Trim = 3,
    /// Closes the segment; see the module docs.
    Seal = 0x7f,
}

impl RecordKind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Write,
            2 => Self::WriteZeroes,
            3 => Self::Trim,
            0x7f => Self::Seal,
            _ => return None,
        })
    }
}

/// One decoded record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub kind: RecordKind,
    pub seq: u64,
    pub offset: u64,
    pub length: u64,
    pub payload: Vec<u8>,
}

impl SegmentHeader {
    /// The encoded header.
    pub fn encode(&self) -> Vec<u8> {
        assert!(self.vm_id.len() <= MAX_ID_LEN && self.disk_id.len() <= MAX_ID_LEN, "ids are validated");
        let len = HEADER_FIXED_LEN + self.vm_id.len() + self.disk_id.len() + 4;
        let mut b = Vec::with_capacity(len);
        b.extend_from_slice(&SEGMENT_MAGIC);
        b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        b.extend_from_slice(&(len as u16).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&self.epoch.to_le_bytes());
        b.extend_from_slice(&self.first_seq.to_le_bytes());
        b.extend_from_slice(&self.created_unix_ms.to_le_bytes());
        b.push(self.vm_id.len() as u8);
        b.push(self.disk_id.len() as u8);
        b.extend_from_slice(self.vm_id.as_bytes());
        b.extend_from_slice(self.disk_id.as_bytes());
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Reads and checks a header; returns it and its length in bytes.
    pub fn read_from(r: &mut impl Read) -> Result<(Self, usize), FormatError> {
        let mut fixed = [0u8; HEADER_FIXED_LEN];
        read_exact_or(r, &mut fixed, 0)?;
        if fixed[..8] != SEGMENT_MAGIC {
            return Err(FormatError::BadMagic);
        }
        let version = u16_at(&fixed, 8);
        if version != FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let len = u16_at(&fixed, 10) as usize;
        if u32_at(&fixed, 12) != 0 {
            return Err(FormatError::BadHeader("reserved bytes are not zero"));
        }
        let (vm_len, disk_len) = (fixed[40] as usize, fixed[41] as usize);
        if len != HEADER_FIXED_LEN + vm_len + disk_len + 4 {
            return Err(FormatError::BadHeader("length does not match the ids it carries"));
        }
        let mut rest = vec![0u8; len - HEADER_FIXED_LEN];
        read_exact_or(r, &mut rest, HEADER_FIXED_LEN as u64)?;
        let mut crc = crc32c::crc32c(&fixed);
        crc = crc32c::crc32c_append(crc, &rest[..rest.len() - 4]);
        if crc != u32_at(&rest, rest.len() - 4) {
            return Err(FormatError::HeaderChecksum);
        }
        let text =
            |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| FormatError::BadHeader("id is not UTF-8"));
        let (epoch, first_seq) = (u64_at(&fixed, 16), u64_at(&fixed, 24));
        if first_seq == 0 || first_seq > MAX_SEQ {
            return Err(FormatError::BadHeader("first sequence is 0 or beyond the largest allowed"));
        }
        if epoch > MAX_SEQ {
            return Err(FormatError::BadHeader("epoch is beyond the largest allowed"));
        }
        let header = Self {
            epoch,
            first_seq,
            created_unix_ms: u64_at(&fixed, 32),
            vm_id: text(&rest[..vm_len])?,
            disk_id: text(&rest[vm_len..vm_len + disk_len])?,
        };
        Ok((header, len))
    }
}

/// Encodes the part of a record before its payload.
pub fn record_header(
    kind: RecordKind,
    seq: u64,
    offset: u64,
    length: u64,
    payload_len: u32,
) -> [u8; RECORD_HEADER_LEN] {
    let mut h = [0u8; RECORD_HEADER_LEN];
    h[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    h[4] = kind as u8;
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..24].copy_from_slice(&offset.to_le_bytes());
    h[24..32].copy_from_slice(&length.to_le_bytes());
    h[32..36].copy_from_slice(&payload_len.to_le_bytes());
    h
}

/// The CRC trailer of a record with this header and payload.
pub fn record_crc(header: &[u8; RECORD_HEADER_LEN], payload: &[u8]) -> [u8; RECORD_TRAILER_LEN] {
    crc32c::crc32c_append(crc32c::crc32c(header), payload).to_le_bytes()
}

/// A whole encoded record (tests and seals; the write path avoids the copy).
pub fn encode_record(kind: RecordKind, seq: u64, offset: u64, length: u64, payload: &[u8]) -> Vec<u8> {
    let h = record_header(kind, seq, offset, length, payload.len() as u32);
    let mut b = Vec::with_capacity(RECORD_HEADER_LEN + payload.len() + RECORD_TRAILER_LEN);
    b.extend_from_slice(&h);
    b.extend_from_slice(payload);
    b.extend_from_slice(&record_crc(&h, payload));
    b
}

/// The seal record for a segment whose bytes so far hash to `digest`.
pub fn encode_seal(
    last_seq: u64,
    record_count: u64,
    data_bytes: u64,
    digest: &[u8; DIGEST_LEN],
    sealed_unix_ms: u64,
    flags: u8,
) -> Vec<u8> {
    let mut payload = [0u8; SEAL_PAYLOAD_LEN];
    payload[..DIGEST_LEN].copy_from_slice(digest);
    payload[DIGEST_LEN..].copy_from_slice(&sealed_unix_ms.to_le_bytes());
    let mut h = record_header(RecordKind::Seal, last_seq, record_count, data_bytes, SEAL_PAYLOAD_LEN as u32);
    h[5] = flags;
    let mut b = Vec::with_capacity(SEAL_RECORD_LEN);
    b.extend_from_slice(&h);
    b.extend_from_slice(&payload);
    b.extend_from_slice(&record_crc(&h, &payload));
    b
}

/// Writes a whole segment (undo files, folded undo, tests): header, records, seal.
pub struct SegmentWriter<W: std::io::Write> {
    out: W,
    hasher: blake3::Hasher,
    next_seq: u64,
    records: u64,
    data_bytes: u64,
    len: u64,
}

impl<W: std::io::Write> SegmentWriter<W> {
    pub fn new(mut out: W, header: &SegmentHeader) -> io::Result<Self> {
        let h = header.encode();
        out.write_all(&h)?;
        let mut hasher = blake3::Hasher::new();
        hasher.update(&h);
        Ok(Self { out, hasher, next_seq: header.first_seq, records: 0, data_bytes: 0, len: h.len() as u64 })
    }

    pub fn write_record(
        &mut self,
        kind: RecordKind,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> io::Result<()> {
        let r = encode_record(kind, self.next_seq, offset, length, payload);
        self.out.write_all(&r)?;
        self.hasher.update(&r);
        self.next_seq += 1;
        self.records += 1;
        self.data_bytes += payload.len() as u64;
        self.len += r.len() as u64;
        Ok(())
    }

    /// Writes the seal and returns the writer and the segment's length.
    pub fn finish(mut self, sealed_unix_ms: u64) -> io::Result<(W, u64)> {
        let seal = encode_seal(
            self.next_seq.wrapping_sub(1),
            self.records,
            self.data_bytes,
            self.hasher.finalize().as_bytes(),
            sealed_unix_ms,
            0,
        );
        self.out.write_all(&seal)?;
        Ok((self.out, self.len + seal.len() as u64))
    }
}

/// Reads a segment record by record, checking each as it goes and hashing
/// every byte so the seal can be checked.
pub struct SegmentReader<R> {
    inner: R,
    pub header: SegmentHeader,
    /// Bytes consumed so far (header and complete records).
    pub position: u64,
    next_seq: u64,
    records: u64,
    data_bytes: u64,
    hasher: blake3::Hasher,
    sealed: bool,
    seal_time: Option<u64>,
    app_consistent: bool,
    /// Off for segments verified before: CRCs are still checked, the digest not.
    hash: bool,
}

/// What a seal said, once it verified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SealInfo {
    pub last_seq: u64,
    pub records: u64,
    pub data_bytes: u64,
    /// When the segment was sealed (ms since the Unix epoch); 0 before it is.
    pub sealed_unix_ms: u64,
    /// Rotated with the guest quiesced.
    pub app_consistent: bool,
}

impl<R: Read> SegmentReader<R> {
    pub fn new(mut inner: R) -> Result<Self, FormatError> {
        let (header, len) = SegmentHeader::read_from(&mut inner)?;
        let mut hasher = blake3::Hasher::new();
        hasher.update(&header.encode());
        Ok(Self {
            next_seq: header.first_seq,
            header,
            inner,
            position: len as u64,
            records: 0,
            data_bytes: 0,
            hasher,
            sealed: false,
            seal_time: None,
            app_consistent: false,
            hash: true,
        })
    }

    /// Reads a segment already verified in full (e.g. when it was received):
    /// every record's CRC is still checked, but the BLAKE3 digest is not
    /// recomputed, which is most of the cost of reading.
    pub fn new_verified(inner: R) -> Result<Self, FormatError> {
        let mut r = Self::new(inner)?;
        r.hash = false;
        Ok(r)
    }

    /// Sequence number the next record must carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The next data record; `Ok(None)` at a clean end of input or after a valid
    /// seal (see [`Self::seal`]). Errors leave `position` at the start of the
    /// bad record, which is where a torn active segment is cut. Long (about
    /// 85 lines) on purpose: every check a hostile or torn record must pass,
    /// in the order the bytes arrive.
    pub fn next_record(&mut self) -> Result<Option<Record>, FormatError> {
        Ok(self.next_record_placed(None)?.map(|(r, _)| r))
    }

    /// [`Self::next_record`], reading a Write record's payload into `place`
    /// when that can take it as an O_DIRECT write (aligned, and no larger
    /// than its capacity): the record's own payload is then empty, and the
    /// `true` beside it says where the bytes are. One copy fewer than
    /// reading into the record and copying over.
    pub fn next_record_placed(
        &mut self,
        place: Option<&mut crate::direct::AlignedBuf>,
    ) -> Result<Option<(Record, bool)>, FormatError> {
        let Some(head) = self.read_head()? else { return Ok(None) };
        let payload_len = head.payload_len as usize;
        let placed = place.filter(|b| {
            head.kind == RecordKind::Write
                && crate::direct::aligned(head.offset, payload_len)
                && b.capacity() >= payload_len
        });
        let in_place = placed.is_some();
        let mut owned = Vec::new();
        let payload: &mut [u8] = match placed {
            Some(b) => b.slice_mut(payload_len),
            None => {
                owned.resize(payload_len, 0);
                &mut owned
            }
        };
        if read_full(&mut self.inner, payload)? < payload.len() {
            return Err(FormatError::Truncated { at: head.at });
        }
        let crc = record_crc(&head.h, payload);
        if self.hash && head.kind != RecordKind::Seal {
            self.hasher.update(&head.h);
            self.hasher.update(payload);
        }
        if !self.finish_record(&head, crc, payload)? {
            return Ok(None);
        }
        let Head { kind, seq, offset, length, .. } = head;
        Ok(Some((Record { kind, seq, offset, length, payload: owned }, in_place)))
    }

    /// The next record's header, checked; `None` at a clean end of input or
    /// after a seal.
    fn read_head(&mut self) -> Result<Option<Head>, FormatError> {
        if self.sealed {
            return Ok(None);
        }
        let at = self.position;
        let mut h = [0u8; RECORD_HEADER_LEN];
        match read_full(&mut self.inner, &mut h)? {
            0 => return Ok(None),
            n if n < RECORD_HEADER_LEN => return Err(FormatError::Truncated { at: at + n as u64 }),
            _ => {}
        }
        if u32_at(&h, 0) != RECORD_MAGIC {
            return Err(FormatError::BadRecord { at, what: "bad record magic" });
        }
        let kind =
            RecordKind::from_u8(h[4]).ok_or(FormatError::BadRecord { at, what: "unknown record kind" })?;
        let allowed_flags = if kind == RecordKind::Seal { SEAL_FLAG_APP_CONSISTENT } else { 0 };
        if h[5] & !allowed_flags != 0 || h[6..8] != [0, 0] || h[36..40] != [0, 0, 0, 0] {
            return Err(FormatError::BadRecord { at, what: "reserved bytes are not zero" });
        }
        let (seq, offset, length) = (u64_at(&h, 8), u64_at(&h, 16), u64_at(&h, 24));
        let payload_len = u32_at(&h, 32);
        let expected_payload = match kind {
            RecordKind::Write => {
                if payload_len > MAX_PAYLOAD {
                    return Err(FormatError::BadRecord { at, what: "payload larger than the maximum" });
                }
                length
            }
            RecordKind::WriteZeroes | RecordKind::Trim => 0,
            RecordKind::Seal => SEAL_PAYLOAD_LEN as u64,
        };
        if payload_len as u64 != expected_payload {
            return Err(FormatError::BadRecord { at, what: "payload length does not match the record kind" });
        }
        if kind != RecordKind::Seal && offset.checked_add(length).is_none() {
            return Err(FormatError::BadRecord { at, what: "offset + length overflows" });
        }
        Ok(Some(Head { at, h, kind, seq, offset, length, payload_len }))
    }

    /// After a record's payload, whose CRC trailer (over header and
    /// payload) should read `crc` and, for a seal only, whose bytes are `payload` (the header and
    /// payload of any other record are already hashed): reads and checks the
    /// trailer, then the seal or the sequence, and counts the record. False
    /// after a seal.
    fn finish_record(
        &mut self,
        head: &Head,
        crc: [u8; RECORD_TRAILER_LEN],
        payload: &[u8],
    ) -> Result<bool, FormatError> {
        let mut trailer = [0u8; RECORD_TRAILER_LEN];
        if read_full(&mut self.inner, &mut trailer)? < RECORD_TRAILER_LEN {
            return Err(FormatError::Truncated { at: head.at });
        }
        if crc != trailer {
            return Err(FormatError::RecordChecksum { at: head.at });
        }
        let record_len = (RECORD_HEADER_LEN + head.payload_len as usize + RECORD_TRAILER_LEN) as u64;
        if head.kind == RecordKind::Seal {
            let sealed_unix_ms = u64_at(payload, DIGEST_LEN);
            let app_consistent = head.h[5] & SEAL_FLAG_APP_CONSISTENT != 0;
            let info = SealInfo {
                last_seq: head.seq,
                records: head.offset,
                data_bytes: head.length,
                sealed_unix_ms,
                app_consistent,
            };
            if self.hash && self.hasher.finalize().as_bytes()[..] != payload[..DIGEST_LEN] {
                return Err(FormatError::DigestMismatch);
            }
            if info.last_seq != self.next_seq.wrapping_sub(1) {
                return Err(FormatError::SealMismatch("last sequence number"));
            }
            if info.records != self.records || info.data_bytes != self.data_bytes {
                return Err(FormatError::SealMismatch("record count or byte count"));
            }
            self.sealed = true;
            self.seal_time = Some(sealed_unix_ms);
            self.app_consistent = app_consistent;
            self.position += record_len;
            return Ok(false);
        }
        if head.seq != self.next_seq {
            return Err(FormatError::SequenceGap { at: head.at, expected: self.next_seq, found: head.seq });
        }
        if self.hash {
            self.hasher.update(&trailer);
        }
        self.position += record_len;
        self.next_seq += 1;
        self.records += 1;
        self.data_bytes += u64::from(head.payload_len);
        Ok(true)
    }

    /// Whether a valid seal has been read.
    pub fn is_sealed(&self) -> bool {
        self.sealed
    }

    /// The digest of everything read so far (what a seal written now would carry).
    pub fn digest(&self) -> [u8; DIGEST_LEN] {
        *self.hasher.finalize().as_bytes()
    }

    /// Counts for a seal written now (or, after a seal was read, what it said).
    pub fn seal_info(&self) -> SealInfo {
        SealInfo {
            last_seq: self.next_seq.wrapping_sub(1),
            records: self.records,
            data_bytes: self.data_bytes,
            sealed_unix_ms: self.seal_time.unwrap_or(0),
            app_consistent: self.app_consistent,
        }
    }

    /// After the last record: checks that a seal was read and nothing follows it.
    pub fn finish_sealed(mut self) -> Result<SealInfo, FormatError> {
        if !self.sealed {
            return Err(FormatError::NotSealed);
        }
        let mut rest = Vec::new();
        self.inner.read_to_end(&mut rest)?;
        if !rest.is_empty() {
            return Err(FormatError::TrailingBytes(rest.len() as u64));
        }
        Ok(self.seal_info())
    }
}

impl<R: io::BufRead> SegmentReader<R> {
    /// Reads every record to the end, checking each, then the seal (see
    /// [`Self::finish_sealed`]): the whole verification of a sealed segment.
    /// Payloads are checked where they lie in the reader's buffer, never
    /// copied out of it.
    pub fn read_to_seal(mut self) -> Result<(SegmentHeader, SealInfo), FormatError> {
        while self.skim_record()? {}
        let header = self.header.clone();
        Ok((header, self.finish_sealed()?))
    }

    /// [`Self::next_record`] without keeping the record: a Write's payload
    /// goes through the CRC and the digest in the pieces the reader holds.
    /// False at the end (or after the seal).
    fn skim_record(&mut self) -> Result<bool, FormatError> {
        let Some(head) = self.read_head()? else { return Ok(false) };
        if head.kind == RecordKind::Seal {
            let mut payload = [0u8; SEAL_PAYLOAD_LEN];
            if read_full(&mut self.inner, &mut payload)? < SEAL_PAYLOAD_LEN {
                return Err(FormatError::Truncated { at: head.at });
            }
            return self.finish_record(&head, record_crc(&head.h, &payload), &payload);
        }
        let mut crc = crc32c::crc32c(&head.h);
        if self.hash {
            self.hasher.update(&head.h);
        }
        let mut left = head.payload_len as usize;
        while left > 0 {
            let piece = match self.inner.fill_buf() {
                Ok(piece) => piece,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            if piece.is_empty() {
                return Err(FormatError::Truncated { at: head.at });
            }
            let n = piece.len().min(left);
            crc = crc32c::crc32c_append(crc, &piece[..n]);
            if self.hash {
                self.hasher.update(&piece[..n]);
            }
            self.inner.consume(n);
            left -= n;
        }
        self.finish_record(&head, crc.to_le_bytes(), &[])
    }
}

/// A record's header, checked, before its payload is read.
struct Head {
    /// Where the record starts.
    at: u64,
    h: [u8; RECORD_HEADER_LEN],
    kind: RecordKind,
    seq: u64,
    offset: u64,
    length: u64,
    payload_len: u32,
}

/// What [`scan_ranges`] finds: the header, each record's `[start, end)`, the seal.
pub type ScannedRanges = (SegmentHeader, Vec<(u64, u64)>, SealInfo);

/// The ranges a segment verified before touches, and its seal, read from the
/// record headers alone (payloads are skipped with a seek).
pub fn scan_ranges<R: Read + io::Seek>(mut r: io::BufReader<R>) -> Result<ScannedRanges, FormatError> {
    let (header, len) = SegmentHeader::read_from(&mut r)?;
    let mut at = len as u64;
    let mut ranges = Vec::new();
    let (mut records, mut data_bytes) = (0u64, 0u64);
    loop {
        let mut h = [0u8; RECORD_HEADER_LEN];
        read_exact_or(&mut r, &mut h, at)?;
        if u32_at(&h, 0) != RECORD_MAGIC {
            return Err(FormatError::BadRecord { at, what: "bad record magic" });
        }
        let kind =
            RecordKind::from_u8(h[4]).ok_or(FormatError::BadRecord { at, what: "unknown record kind" })?;
        let (offset, length, payload_len) = (u64_at(&h, 16), u64_at(&h, 24), u32_at(&h, 32) as u64);
        if kind == RecordKind::Seal {
            let mut p = [0u8; SEAL_PAYLOAD_LEN];
            read_exact_or(&mut r, &mut p, at)?;
            let info = SealInfo {
                last_seq: u64_at(&h, 8),
                records,
                data_bytes,
                sealed_unix_ms: u64_at(&p, DIGEST_LEN),
                app_consistent: h[5] & SEAL_FLAG_APP_CONSISTENT != 0,
            };
            if (offset, length) != (records, data_bytes) {
                return Err(FormatError::SealMismatch("record count or byte count"));
            }
            return Ok((header, ranges, info));
        }
        ranges.push((
            offset,
            offset
                .checked_add(length)
                .ok_or(FormatError::BadRecord { at, what: "offset + length overflows" })?,
        ));
        records += 1;
        data_bytes += payload_len;
        let skip = payload_len + RECORD_TRAILER_LEN as u64;
        // Within the buffer where possible: small records cost no syscall.
        r.seek_relative(skip as i64)?;
        at += RECORD_HEADER_LEN as u64 + skip;
    }
}

/// Reads a whole sealed segment, checking every record and the seal, and returns
/// its header, records and seal. For segments small enough to hold in memory.
pub fn verify_sealed(bytes: &[u8]) -> Result<(SegmentHeader, Vec<Record>, SealInfo), FormatError> {
    let mut reader = SegmentReader::new(bytes)?;
    let mut records = Vec::new();
    while let Some(r) = reader.next_record()? {
        records.push(r);
    }
    let header = reader.header.clone();
    let seal = reader.finish_sealed()?;
    Ok((header, records, seal))
}

/// Reads a sealed segment file through, checking every record and the
/// seal's digest, without keeping the records.
pub fn verify_sealed_file(path: &std::path::Path) -> Result<(SegmentHeader, SealInfo), FormatError> {
    let f = std::fs::File::open(path)?;
    SegmentReader::new(io::BufReader::with_capacity(1 << 20, f))?.read_to_seal()
}

/// Reads until `buf` is full or the input ends; the bytes read.
pub(crate) fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn read_exact_or(r: &mut impl Read, buf: &mut [u8], at: u64) -> Result<(), FormatError> {
    let n = read_full(r, buf)?;
    if n < buf.len() { Err(FormatError::Truncated { at: at + n as u64 }) } else { Ok(()) }
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes(b[i..i + 2].try_into().expect("2 bytes"))
}
fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
#[path = "format_tests.rs"]
mod tests;
