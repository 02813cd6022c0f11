//! The hash tree both sides of a resync compute over their image (DESIGN
//! step 6): 4 KiB leaves, 64 KiB blocks of 16 leaves, 4 MiB windows of 64
//! blocks. Each node is a BLAKE3 hash truncated to 16 bytes (a chance
//! collision between two different blocks is 2^-128; nothing here is
//! adversarial: both images belong to the same VM). A window that is equal
//! on both sides costs one hash on the wire; a differing one costs its block
//! hashes, and each differing block its leaf hashes, so 1% of scattered
//! 4 KiB changes sends about 1% of the disk rather than 16 times that.
//!
//! ```text
//!  window  H(b0 | b1 | … | b63)            4 MiB
//!  block   H(l0 | l1 | … | l15)            64 KiB
//!  leaf    H(4096 bytes, fewer at the end)  4 KiB
//! ```
//! Holes (found with `SEEK_DATA`) are hashed as zeros without being read.

use std::{fs::File, io, os::unix::fs::FileExt, sync::OnceLock};

/// Bytes of a leaf, the unit that is sent.
pub const LEAF: u64 = 4096;
/// Leaves per block.
pub const LEAVES_PER_BLOCK: usize = 16;
/// Bytes of a block.
pub const BLOCK: u64 = LEAF * LEAVES_PER_BLOCK as u64;
/// Blocks per window.
pub const BLOCKS_PER_WINDOW: usize = 64;
/// Bytes of a window.
pub const WINDOW: u64 = BLOCK * BLOCKS_PER_WINDOW as u64;

/// A truncated BLAKE3 hash.
pub type Hash = [u8; 16];

fn truncated(h: blake3::Hash) -> Hash {
    let mut out = [0; 16];
    out.copy_from_slice(&h.as_bytes()[..16]);
    out
}

/// The hash of a leaf's bytes.
pub fn leaf_hash(bytes: &[u8]) -> Hash {
    truncated(blake3::hash(bytes))
}

/// The hash of a node's children's hashes, in order.
pub fn node_hash(children: &[Hash]) -> Hash {
    let mut h = blake3::Hasher::new();
    for c in children {
        h.update(c);
    }
    truncated(h.finalize())
}

/// The hash of a whole leaf of zeros (every hole, every zero leaf).
fn zero_leaf() -> Hash {
    static ZERO: OnceLock<Hash> = OnceLock::new();
    *ZERO.get_or_init(|| leaf_hash(&[0; LEAF as usize]))
}

/// Every level of one window of an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowHashes {
    /// Index of the window (its offset is `index * WINDOW`).
    pub index: u64,
    pub window: Hash,
    pub blocks: Vec<Hash>,
    pub leaves: Vec<Hash>,
}

impl WindowHashes {
    /// The leaf hashes of block `b` of this window.
    pub fn block_leaves(&self, b: usize) -> &[Hash] {
        let start = b * LEAVES_PER_BLOCK;
        &self.leaves[start.min(self.leaves.len())..(start + LEAVES_PER_BLOCK).min(self.leaves.len())]
    }
}

/// How many windows a disk of `size` bytes has.
pub fn windows(size: u64) -> u64 {
    size.div_ceil(WINDOW)
}

/// Hashes window `index` of `image` (`size` bytes), reading only its data
/// extents (`data`: `(offset, len)` ranges of the whole image that hold
/// data, sorted; everything else reads as zeros). `buf` is reused between
/// calls.
pub fn hash_window(
    image: &File,
    size: u64,
    index: u64,
    data: &[(u64, u64)],
    buf: &mut Vec<u8>,
) -> io::Result<WindowHashes> {
    let start = index * WINDOW;
    let end = (start + WINDOW).min(size);
    let len = (end - start) as usize;
    buf.clear();
    buf.resize(len, 0);
    // Read the data extents that overlap this window; holes stay zero.
    let first = data.partition_point(|(off, l)| off + l <= start);
    for &(off, l) in &data[first..] {
        if off >= end {
            break;
        }
        let (from, to) = (off.max(start), (off + l).min(end));
        image.read_exact_at(&mut buf[(from - start) as usize..(to - start) as usize], from)?;
    }
    let zero = zero_leaf();
    let leaves: Vec<Hash> =
        buf.chunks(LEAF as usize)
            .map(|leaf| {
                if leaf.len() == LEAF as usize && leaf.iter().all(|b| *b == 0) {
                    zero
                } else {
                    leaf_hash(leaf)
                }
            })
            .collect();
    let blocks: Vec<Hash> = leaves.chunks(LEAVES_PER_BLOCK).map(node_hash).collect();
    Ok(WindowHashes { index, window: node_hash(&blocks), blocks, leaves })
}

/// Hashes the image at `path` (`size` bytes) window by window on a thread
/// of its own, in order, a few windows ahead of whoever reads them; stops
/// when the receiver goes. The image may change meanwhile (a live disk):
/// each window is read once, as it is then.
pub fn spawn_hasher(
    path: std::path::PathBuf,
    size: u64,
) -> tokio::sync::mpsc::Receiver<io::Result<WindowHashes>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    std::thread::spawn(move || {
        let run = || -> io::Result<()> {
            let image = File::open(&path)?;
            let data = crate::image::data_extents(&image, size)?;
            let mut buf = Vec::new();
            for w in 0..windows(size) {
                let h = hash_window(&image, size, w, &data, &mut buf)?;
                if tx.blocking_send(Ok(h)).is_err() {
                    return Ok(());
                }
            }
            Ok(())
        };
        if let Err(e) = run() {
            let _ = tx.blocking_send(Err(e));
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(bytes: &[(u64, &[u8])], size: u64) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(size).unwrap();
        for (off, b) in bytes {
            f.as_file().write_all_at(b, *off).unwrap();
        }
        f
    }

    fn all(f: &File, size: u64) -> Vec<WindowHashes> {
        let data = crate::image::data_extents(f, size).unwrap();
        let mut buf = Vec::new();
        (0..windows(size)).map(|w| hash_window(f, size, w, &data, &mut buf).unwrap()).collect()
    }

    #[test]
    fn one_changed_byte_changes_its_leaf_block_and_window_and_nothing_else() {
        let size = 2 * WINDOW + 5000; // a short last window and a short last leaf
        let a = image(&[(100, b"boot"), (WINDOW + 7 * BLOCK + 3 * LEAF + 9, b"x")], size);
        let b = image(&[(100, b"boot"), (WINDOW + 7 * BLOCK + 3 * LEAF + 9, b"y")], size);
        let (ha, hb) = (all(a.as_file(), size), all(b.as_file(), size));
        assert_eq!(ha.len(), 3);
        assert_eq!(ha[0], hb[0]);
        assert_eq!(ha[2], hb[2]);
        assert_ne!(ha[1].window, hb[1].window);
        let differing: Vec<usize> =
            (0..BLOCKS_PER_WINDOW).filter(|&i| ha[1].blocks[i] != hb[1].blocks[i]).collect();
        assert_eq!(differing, [7]);
        let leaves: Vec<usize> =
            (0..LEAVES_PER_BLOCK).filter(|&i| ha[1].block_leaves(7)[i] != hb[1].block_leaves(7)[i]).collect();
        assert_eq!(leaves, [3]);
        assert_eq!(ha[2].leaves.len(), 2, "5000 bytes: one full leaf and a short one");
    }

    #[test]
    fn a_hole_and_written_zeros_hash_the_same() {
        let size = WINDOW;
        let hole = image(&[], size);
        let zeros = image(&[(0, &vec![0u8; WINDOW as usize])], size);
        assert_eq!(all(hole.as_file(), size), all(zeros.as_file(), size));
    }
}
