//! The dirty map: which blocks of a disk changed while payload logging was off
//! (resync required), persisted with the journal's state so a resync knows
//! where to look.
//!
//! State file (`state` in the log directory), replaced atomically:
//! `magic "VMRSTAT1" | flags u32 | block_size u32 | epoch u64 | nblocks u64 |
//!  bitmap (nblocks bits, u64 words) | [dirty_from u64, when flag 4] | crc32c u32`.

use std::{fs, io, path::Path};

/// Granularity of the dirty map (the resync block size).
pub const DIRTY_BLOCK: u64 = 64 << 10;
const MAGIC: &[u8; 8] = b"VMRSTAT1";
const FLAG_RESYNC_REQUIRED: u32 = 1;
const FLAG_CLEAN_SHUTDOWN: u32 = 2;
const FLAG_DIRTY_FROM: u32 = 4;

/// A bitmap of changed blocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyMap {
    words: Vec<u64>,
    blocks: u64,
}

impl DirtyMap {
    pub fn new(disk_size: u64) -> Self {
        let blocks = disk_size.div_ceil(DIRTY_BLOCK);
        Self { words: vec![0; blocks.div_ceil(64) as usize], blocks }
    }

    /// Marks every block `[offset, offset + len)` touches.
    pub fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / DIRTY_BLOCK;
        let last = ((offset + len - 1) / DIRTY_BLOCK).min(self.blocks.saturating_sub(1));
        for b in first..=last {
            self.words[(b / 64) as usize] |= 1 << (b % 64);
        }
    }

    pub fn mark_all(&mut self) {
        for b in 0..self.blocks {
            self.words[(b / 64) as usize] |= 1 << (b % 64);
        }
    }

    pub fn is_dirty(&self, block: u64) -> bool {
        block < self.blocks && self.words[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    pub fn dirty_blocks(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }
}

/// What the journal keeps besides its segments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalState {
    pub epoch: u64,
    pub resync_required: bool,
    pub clean_shutdown: bool,
    pub dirty: DirtyMap,
    /// The first sequence the map covers: every change logged from it on,
    /// and every change since, is marked. `None`: the map cannot be trusted
    /// to be complete (a crash in this mode marked it whole).
    pub dirty_from: Option<u64>,
}

impl JournalState {
    pub fn new(disk_size: u64) -> Self {
        Self {
            epoch: 0,
            resync_required: false,
            clean_shutdown: true,
            dirty: DirtyMap::new(disk_size),
            dirty_from: None,
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(36 + self.dirty.words.len() * 8);
        b.extend_from_slice(MAGIC);
        let flags = (self.resync_required as u32 * FLAG_RESYNC_REQUIRED)
            | (self.clean_shutdown as u32 * FLAG_CLEAN_SHUTDOWN)
            | (self.dirty_from.is_some() as u32 * FLAG_DIRTY_FROM);
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&(DIRTY_BLOCK as u32).to_le_bytes());
        b.extend_from_slice(&self.epoch.to_le_bytes());
        b.extend_from_slice(&self.dirty.blocks.to_le_bytes());
        for w in &self.dirty.words {
            b.extend_from_slice(&w.to_le_bytes());
        }
        if let Some(from) = self.dirty_from {
            b.extend_from_slice(&from.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8], disk_size: u64) -> Result<Self, &'static str> {
        if b.len() < 36 || &b[..8] != MAGIC {
            return Err("not a journal state file");
        }
        let (body, crc) = b.split_at(b.len() - 4);
        if crc32c::crc32c(body).to_le_bytes() != crc {
            return Err("journal state checksum mismatch");
        }
        let word = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().expect("8 bytes"));
        let flags = u32::from_le_bytes(body[8..12].try_into().expect("4 bytes"));
        if u32::from_le_bytes(body[12..16].try_into().expect("4 bytes")) as u64 != DIRTY_BLOCK {
            return Err("journal state has another block size");
        }
        let mut dirty = DirtyMap::new(disk_size);
        let bitmap_end = 32 + dirty.words.len() * 8;
        let has_from = flags & FLAG_DIRTY_FROM != 0;
        if word(24) != dirty.blocks || body.len() != bitmap_end + if has_from { 8 } else { 0 } {
            return Err("journal state is for a disk of another size");
        }
        for (i, w) in dirty.words.iter_mut().enumerate() {
            *w = word(32 + i * 8);
        }
        Ok(Self {
            epoch: word(16),
            resync_required: flags & FLAG_RESYNC_REQUIRED != 0,
            clean_shutdown: flags & FLAG_CLEAN_SHUTDOWN != 0,
            dirty,
            dirty_from: has_from.then(|| word(bitmap_end)),
        })
    }

    /// Loads the state of `dir`, or a fresh one when there is none yet.
    pub fn load(dir: &Path, disk_size: u64) -> io::Result<Self> {
        match fs::read(dir.join("state")) {
            Ok(b) => Self::decode(&b, disk_size).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Self::new(disk_size)),
            Err(e) => Err(e),
        }
    }

    /// Replaces the state file durably.
    pub fn store(&self, dir: &Path) -> io::Result<()> {
        crate::failpoint::io("io.log.state")?;
        replace_durably(dir, "state", &self.encode())
    }
}

/// Replaces `dir/name` with `bytes` so that a crash leaves the old file or
/// the new one, whole: written beside it, fsynced, renamed over it, and the
/// directory fsynced.
pub fn replace_durably(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    fs::write(&tmp, bytes)?;
    fs::File::open(&tmp)?.sync_all()?;
    fs::rename(&tmp, dir.join(name))?;
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_every_block_a_range_touches() {
        let mut m = DirtyMap::new(10 * DIRTY_BLOCK + 1);
        assert_eq!(m.blocks(), 11);
        m.mark(DIRTY_BLOCK - 1, 2);
        assert!(m.is_dirty(0) && m.is_dirty(1) && !m.is_dirty(2));
        m.mark(10 * DIRTY_BLOCK, 1);
        assert!(m.is_dirty(10));
        assert_eq!(m.dirty_blocks(), 3);
        m.mark_all();
        assert_eq!(m.dirty_blocks(), 11);
    }

    #[test]
    fn state_round_trips_and_rejects_damage() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = JournalState::new(1 << 30);
        s.epoch = 7;
        s.resync_required = true;
        s.clean_shutdown = false;
        s.dirty.mark(5 << 20, 1);
        s.store(dir.path()).unwrap();
        assert_eq!(JournalState::load(dir.path(), 1 << 30).unwrap(), s);
        s.dirty_from = Some(1234);
        s.store(dir.path()).unwrap();
        assert_eq!(JournalState::load(dir.path(), 1 << 30).unwrap(), s);
        assert!(JournalState::load(dir.path(), 2 << 30).is_err(), "another disk size is refused");
        let mut raw = fs::read(dir.path().join("state")).unwrap();
        raw[20] ^= 1;
        fs::write(dir.path().join("state"), raw).unwrap();
        assert!(JournalState::load(dir.path(), 1 << 30).is_err(), "a flipped bit is refused");
    }
}
