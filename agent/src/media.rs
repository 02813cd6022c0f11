//! The initial copy on external media (Hyper-V's "send initial copy using
//! external media"), and a replica made from an image already at the
//! replica site (a restored backup, an older copy).
//!
//! ```text
//!  primary:  cut the log at N ─▶ <dir>/<vm>/<disk>/chunks/<offset>.bin (non-zero 4 MiB chunks)
//!            ─▶ manifest.json last {sizes, N, consistent_from, BLAKE3 per chunk}; writes go on being logged
//!  (carried to the replica site)
//!  replica:  `vmreplica-agent import` ─▶ every chunk verified first (a missing or altered one is named,
//!            nothing written) ─▶ image + replica.json (Receiving at N - 1) ─▶ the primary ships from N
//!  existing: `vmreplica-agent import --existing IMAGE` ─▶ the image moves in, the replica is marked
//!            to resynchronise ─▶ the primary's next cycle compares hash trees, sends what differs
//! ```

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::replica::{Lifecycle, MAX_DISK_SIZE, ReplicaState, names};

/// The manifest format this agent writes.
const MANIFEST_VERSION: u32 = 1;
/// Bytes per chunk of an export.
pub const CHUNK: u64 = 4 << 20;

/// What an export holds, written last: its presence means the export is whole.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub version: u32,
    pub vm_id: String,
    pub disk_id: String,
    pub disk_size: u64,
    pub chunk_size: u64,
    /// The epoch the primary's log ships under.
    pub epoch: u64,
    /// The log was cut here: replication resumes at this sequence.
    pub next_seq: u64,
    /// The primary's next sequence when reading ended (the image was read
    /// live): points are crash-consistent from there.
    pub consistent_from: u64,
    /// Non-zero chunks, by offset; every other byte is zero.
    pub chunks: Vec<Chunk>,
}

/// One chunk of an export.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Chunk {
    pub offset: u64,
    pub len: u64,
    /// BLAKE3 of its bytes, hex.
    pub blake3: String,
}

/// Why an export or import failed; nothing was made at the replica when an
/// import fails.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0}")]
    Invalid(String),
    #[error("chunk {path} is missing: the export is incomplete; nothing was imported")]
    Missing { path: PathBuf },
    #[error(
        "chunk {path} does not match the manifest (BLAKE3 {found}, expected {expected}): it was altered or damaged; nothing was imported"
    )]
    Altered { path: PathBuf, found: String, expected: String },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> MediaError + '_ {
    move |source| MediaError::Io { path: path.to_owned(), source }
}

/// `<dir>/<vm>/<disk>`, checked: an absolute directory and plain names.
pub fn disk_dir(dir: &Path, vm: &str, disk: &str) -> Result<PathBuf, MediaError> {
    if !dir.is_absolute() || dir.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(MediaError::Invalid(format!(
            "{}: an absolute directory without `..` is needed",
            dir.display()
        )));
    }
    names::check("VM id", vm).map_err(|e| MediaError::Invalid(e.to_string()))?;
    names::check("disk id", disk).map_err(|e| MediaError::Invalid(e.to_string()))?;
    Ok(dir.join(vm).join(disk))
}

fn chunk_path(dir: &Path, offset: u64) -> PathBuf {
    dir.join("chunks").join(format!("{offset:016x}.bin"))
}

/// The manifest of a whole export in `dir` (`<root>/<vm>/<disk>`), if any.
pub fn manifest(dir: &Path) -> Result<Option<Manifest>, MediaError> {
    let path = dir.join("manifest.json");
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_at(&path)(e)),
    };
    let m: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| MediaError::Invalid(format!("{}: unreadable: {e}", path.display())))?;
    check(&m).map_err(|why| MediaError::Invalid(format!("{}: {why}", path.display())))?;
    Ok(Some(m))
}

/// The numbers a damaged or hostile manifest could carry that arithmetic relies on.
fn check(m: &Manifest) -> Result<(), String> {
    if m.version != MANIFEST_VERSION {
        return Err(format!("format version {} (this agent reads {MANIFEST_VERSION})", m.version));
    }
    if m.disk_size == 0 || m.disk_size > MAX_DISK_SIZE {
        return Err(format!("disk size {} is out of range", m.disk_size));
    }
    if m.chunk_size == 0 || m.chunk_size > 64 << 20 {
        return Err(format!("chunk size {} is out of range", m.chunk_size));
    }
    let max = crate::log::format::MAX_SEQ;
    if m.next_seq == 0 || m.next_seq > max || m.consistent_from < m.next_seq || m.consistent_from > max + 1 {
        return Err(format!("sequences {} and {} are out of range", m.next_seq, m.consistent_from));
    }
    let mut end = 0;
    for c in &m.chunks {
        let stop = c.offset.checked_add(c.len).filter(|&e| e <= m.disk_size);
        if c.offset < end || c.len == 0 || c.len > m.chunk_size || stop.is_none() {
            return Err(format!("chunk at {} (+{}) is out of order or past the disk's end", c.offset, c.len));
        }
        if c.blake3.len() != 64 || !c.blake3.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("chunk at {}: a BLAKE3 hash is 64 hex digits", c.offset));
        }
        end = c.offset + c.len;
    }
    Ok(())
}

/// Writes `image` to `dir` (`<root>/<vm>/<disk>`, made here) as an export
/// whose replication resumes at `next_seq`; `consistent_from()` is read
/// when reading ended. Zero chunks are left out. The manifest goes last.
pub fn export(
    image: &Path,
    dir: &Path,
    ids: (&str, &str),
    epoch: u64,
    next_seq: u64,
    consistent_from: impl FnOnce() -> u64,
) -> Result<Manifest, MediaError> {
    let chunks_dir = dir.join("chunks");
    fs::create_dir_all(&chunks_dir).map_err(io_at(&chunks_dir))?;
    let file = File::open(image).map_err(io_at(image))?;
    let size = file.metadata().map_err(io_at(image))?.len();
    let mut chunks = Vec::new();
    let mut buf = vec![0u8; CHUNK as usize];
    for (start, len) in crate::image::data_extents(&file, size).map_err(io_at(image))? {
        // Chunks are aligned to CHUNK, so an export is the same whatever the extents.
        let mut at = start - start % CHUNK;
        while at < start + len {
            let n = CHUNK.min(size - at);
            let b = &mut buf[..n as usize];
            file.read_exact_at(b, at).map_err(io_at(image))?;
            if chunks.last().is_some_and(|c: &Chunk| c.offset == at) || b.iter().all(|x| *x == 0) {
                at += CHUNK;
                continue;
            }
            let path = chunk_path(dir, at);
            fs::write(&path, &*b).map_err(io_at(&path))?;
            chunks.push(Chunk { offset: at, len: n, blake3: blake3::hash(b).to_hex().to_string() });
            at += CHUNK;
        }
    }
    for c in &chunks {
        let path = chunk_path(dir, c.offset);
        File::open(&path).and_then(|f| f.sync_all()).map_err(io_at(&path))?;
    }
    let m = Manifest {
        version: MANIFEST_VERSION,
        vm_id: ids.0.to_owned(),
        disk_id: ids.1.to_owned(),
        disk_size: size,
        chunk_size: CHUNK,
        epoch,
        next_seq,
        consistent_from: consistent_from().max(next_seq),
        chunks,
    };
    let tmp = dir.join("manifest.json.tmp");
    let body = serde_json::to_vec_pretty(&m).expect("a manifest serialises");
    fs::write(&tmp, body).and_then(|()| File::open(&tmp)?.sync_all()).map_err(io_at(&tmp))?;
    fs::rename(&tmp, dir.join("manifest.json")).map_err(io_at(&tmp))?;
    Ok(m)
}

/// Who a replica made here belongs to (the AuthorizationEntry that admits
/// its primary).
#[derive(Clone, Debug)]
pub struct Owner {
    pub primary: String,
    pub trust_group: String,
}

/// Loads the export in `from` (`<root>/<vm>/<disk>`) as a new replica in
/// `replica` (`<storage>/<vm>/<disk>`). Every chunk is verified before
/// anything is written; the replica then expects the primary's log from
/// the export's cut.
pub fn import(from: &Path, replica: &Path, owner: &Owner) -> Result<Manifest, MediaError> {
    let m = manifest(from)?.ok_or_else(|| {
        MediaError::Invalid(format!("{}: no manifest.json: not a whole export", from.display()))
    })?;
    for c in &m.chunks {
        let path = chunk_path(from, c.offset);
        let found = hash_file(&path, c.len)?;
        if found != c.blake3 {
            return Err(MediaError::Altered { path, found, expected: c.blake3.clone() });
        }
    }
    let _lock = fresh(replica)?;
    let image = replica.join("disk.img");
    let result = (|| {
        let out = OpenOptions::new().write(true).create_new(true).open(&image).map_err(io_at(&image))?;
        out.set_len(m.disk_size).map_err(io_at(&image))?;
        for c in &m.chunks {
            let path = chunk_path(from, c.offset);
            let bytes = fs::read(&path).map_err(io_at(&path))?;
            // Read again: it must still be what was verified.
            if blake3::hash(&bytes).to_hex().as_str() != c.blake3 || bytes.len() as u64 != c.len {
                return Err(MediaError::Altered {
                    path,
                    found: "changed while importing".into(),
                    expected: c.blake3.clone(),
                });
            }
            out.write_all_at(&bytes, c.offset).map_err(io_at(&image))?;
        }
        out.sync_all().map_err(io_at(&image))?;
        let state = ReplicaState {
            lifecycle: Lifecycle::Receiving,
            received_through: m.next_seq - 1,
            applied_through: m.next_seq - 1,
            consistent_from: m.consistent_from,
            copies: 1,
            ..ReplicaState::new(
                &m.vm_id,
                &m.disk_id,
                m.disk_size,
                m.epoch,
                &owner.trust_group,
                &owner.primary,
            )
        };
        crate::replica::state::store(replica, &state).map_err(|e| MediaError::Invalid(e.to_string()))
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(replica);
    }
    result.map(|()| m)
}

/// Makes `replica` (`<storage>/<vm>/<disk>`) from `image`, an image already
/// at this site (moved in, or copied where it lies on another filesystem),
/// marked to be resynchronised: the primary's next cycle compares hash
/// trees and sends only what differs.
pub fn adopt_existing(
    image: &Path,
    replica: &Path,
    ids: (&str, &str),
    owner: &Owner,
) -> Result<u64, MediaError> {
    let size = fs::metadata(image).map_err(io_at(image))?.len();
    if size == 0 || size > MAX_DISK_SIZE {
        return Err(MediaError::Invalid(format!("{}: {size} bytes is not a disk", image.display())));
    }
    let _lock = fresh(replica)?;
    let dest = replica.join("disk.img");
    let result = (|| {
        if fs::rename(image, &dest).is_err() {
            let src = File::open(image).map_err(io_at(image))?;
            crate::image::sparse_copy(&src, &dest).map_err(io_at(&dest))?;
        }
        let state = ReplicaState {
            lifecycle: Lifecycle::Resyncing { next_seq: 1, epoch: 0 },
            copies: 1,
            ..ReplicaState::new(ids.0, ids.1, size, 0, &owner.trust_group, &owner.primary)
        };
        crate::replica::state::store(replica, &state).map_err(|e| MediaError::Invalid(e.to_string()))
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(replica);
    }
    result.map(|()| size)
}

/// A new replica directory, held (its `lock`) while it is made: refused
/// when a replica is there (it would be replaced) or an agent holds it.
fn fresh(replica: &Path) -> Result<File, MediaError> {
    if replica.join("replica.json").exists() {
        return Err(MediaError::Invalid(format!(
            "{} holds a replica already: remove it (or its VMReplication) first",
            replica.display()
        )));
    }
    fs::create_dir_all(replica).map_err(io_at(replica))?;
    crate::replica::hold_dir(replica).map_err(|e| match e {
        crate::replica::ReplicaError::Io { path, source } => MediaError::Io { path, source },
        _ => MediaError::Invalid(format!("{}: an agent holds this replica directory", replica.display())),
    })
}

fn hash_file(path: &Path, len: u64) -> Result<String, MediaError> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(MediaError::Missing { path: path.to_owned() });
        }
        Err(e) => return Err(io_at(path)(e)),
    };
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io_at(path))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        h.update(&buf[..n]);
    }
    if total != len {
        return Ok(format!("(length {total}, not {len})"));
    }
    Ok(h.finalize().to_hex().to_string())
}
