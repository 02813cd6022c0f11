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
//! Holes (found with `SEEK_DATA`) are hashed as zeros without being read;
//! a whole image is read with O_DIRECT (no page cache to fill and evict) on
//! one thread while another hashes the window before.

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

/// Reads window `index` of `image` (`size` bytes) into `buf`: only its data
/// extents (`data`: `(offset, len)` ranges of the whole image that hold
/// data, sorted; everything else is zeros), aligned ones through `direct`
/// (an O_DIRECT handle) when there is one. Returns the window's bytes.
pub fn read_window<'b>(
    image: &File,
    direct: Option<&File>,
    size: u64,
    index: u64,
    data: &[(u64, u64)],
    buf: &'b mut crate::direct::AlignedBuf,
) -> io::Result<&'b [u8]> {
    let start = index * WINDOW;
    let end = (start + WINDOW).min(size);
    let bytes = buf.slice_mut((end - start) as usize);
    bytes.fill(0);
    let first = data.partition_point(|(off, l)| off + l <= start);
    for &(off, l) in &data[first..] {
        if off >= end {
            break;
        }
        let (from, to) = (off.max(start), (off + l).min(end));
        let dst = &mut bytes[(from - start) as usize..(to - start) as usize];
        let direct = direct.filter(|_| crate::direct::aligned(from, dst.len()));
        match direct.map(|d| d.read_exact_at(dst, from)) {
            Some(Ok(())) => {}
            // A filesystem that refuses this read direct: through the page cache.
            Some(Err(e)) if crate::direct::refused(&e) => image.read_exact_at(dst, from)?,
            Some(Err(e)) => return Err(e),
            None => image.read_exact_at(dst, from)?,
        }
    }
    Ok(bytes)
}

/// Every level of window `index`, from its bytes.
pub fn hash_bytes(index: u64, bytes: &[u8]) -> WindowHashes {
    let zero = zero_leaf();
    let leaves: Vec<Hash> =
        bytes
            .chunks(LEAF as usize)
            .map(|leaf| {
                if leaf.len() == LEAF as usize && leaf.iter().all(|b| *b == 0) {
                    zero
                } else {
                    leaf_hash(leaf)
                }
            })
            .collect();
    let blocks: Vec<Hash> = leaves.chunks(LEAVES_PER_BLOCK).map(node_hash).collect();
    WindowHashes { index, window: node_hash(&blocks), blocks, leaves }
}

/// Hashes window `index` of `image` (`size` bytes), reading only its data
/// extents (see [`read_window`]). `buf` is reused between calls.
pub fn hash_window(
    image: &File,
    size: u64,
    index: u64,
    data: &[(u64, u64)],
    buf: &mut crate::direct::AlignedBuf,
) -> io::Result<WindowHashes> {
    Ok(hash_bytes(index, read_window(image, None, size, index, data, buf)?))
}

/// The hashes of blocks `blocks` of window `index` only, each block read
/// whole (a hole reads as zeros): for a resync that knows which blocks
/// changed. The other blocks' entries, and the window's hash, are left as
/// zeros' hashes and mean nothing.
pub fn hash_blocks(image: &File, size: u64, index: u64, blocks: &[u32]) -> io::Result<WindowHashes> {
    let start = index * WINDOW;
    let len = (start + WINDOW).min(size) - start;
    let zero = zero_leaf();
    let mut leaves = vec![zero; len.div_ceil(LEAF) as usize];
    let mut buf = vec![0u8; BLOCK as usize];
    for &b in blocks {
        let from = start + u64::from(b) * BLOCK;
        if from >= start + len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("no block {b} in window {index}"),
            ));
        }
        let n = BLOCK.min(start + len - from) as usize;
        image.read_exact_at(&mut buf[..n], from)?;
        for (k, leaf) in buf[..n].chunks(LEAF as usize).enumerate() {
            let all_zero = leaf.len() == LEAF as usize && leaf.iter().all(|x| *x == 0);
            leaves[b as usize * LEAVES_PER_BLOCK + k] = if all_zero { zero } else { leaf_hash(leaf) };
        }
    }
    let blocks: Vec<Hash> = leaves.chunks(LEAVES_PER_BLOCK).map(node_hash).collect();
    Ok(WindowHashes { index, window: node_hash(&blocks), blocks, leaves })
}

/// [`spawn_hasher`] for the windows holding any of `dirty` (block indexes,
/// sorted): each with the hashes of just those blocks, and which they are.
pub fn spawn_block_hasher(
    path: std::path::PathBuf,
    size: u64,
    dirty: Vec<u64>,
) -> tokio::sync::mpsc::Receiver<io::Result<(WindowHashes, Vec<u32>)>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    std::thread::spawn(move || {
        let run = || -> io::Result<()> {
            let image = File::open(&path)?;
            let per = BLOCKS_PER_WINDOW as u64;
            for chunk in dirty.chunk_by(|a, b| a / per == b / per) {
                let w = chunk[0] / per;
                let blocks: Vec<u32> = chunk.iter().map(|b| (b % per) as u32).collect();
                let h = hash_blocks(&image, size, w, &blocks)?;
                if tx.blocking_send(Ok((h, blocks))).is_err() {
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

/// Hashes the image at `path` (`size` bytes) window by window, in order, a
/// few windows ahead of whoever reads them: one thread reads (O_DIRECT where
/// the filesystem allows) while another hashes the window before. Stops when
/// the receiver goes. The image may change meanwhile (a live disk): each
/// window is read once, as it is then.
pub fn spawn_hasher(
    path: std::path::PathBuf,
    size: u64,
) -> tokio::sync::mpsc::Receiver<io::Result<WindowHashes>> {
    use crate::direct::AlignedBuf;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    // Two buffers: one being read into, one being hashed.
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<(u64, AlignedBuf, usize)>(1);
    let (empty_tx, empty_rx) = std::sync::mpsc::channel::<AlignedBuf>();
    for _ in 0..2 {
        let _ = empty_tx.send(AlignedBuf::with_capacity(WINDOW as usize));
    }
    let failed = tx.clone();
    std::thread::spawn(move || {
        let run = || -> io::Result<()> {
            let image = File::open(&path)?;
            let direct = crate::direct::open_read(&path);
            let data = crate::image::data_extents(&image, size)?;
            for w in 0..windows(size) {
                let Ok(mut buf) = empty_rx.recv() else { return Ok(()) };
                let len = read_window(&image, direct.as_ref(), size, w, &data, &mut buf)?.len();
                if full_tx.send((w, buf, len)).is_err() {
                    return Ok(());
                }
            }
            Ok(())
        };
        if let Err(e) = run() {
            let _ = failed.blocking_send(Err(e));
        }
    });
    std::thread::spawn(move || {
        for (w, mut buf, len) in full_rx {
            let h = hash_bytes(w, &buf.slice_mut(len)[..]);
            if tx.blocking_send(Ok(h)).is_err() {
                return;
            }
            // The reader may be done (windows are still queued): no matter.
            let _ = empty_tx.send(buf);
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
        let mut buf = crate::direct::AlignedBuf::with_capacity(WINDOW as usize);
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
    fn hashing_some_blocks_gives_what_the_whole_window_gives_for_them() {
        let size = WINDOW + 3 * BLOCK;
        let f = image(&[(5 * BLOCK + 10, b"five"), (WINDOW + BLOCK + 1, b"one")], size);
        let whole = all(f.as_file(), size);
        let some = hash_blocks(f.as_file(), size, 0, &[5, 9]).unwrap();
        for b in [5, 9] {
            assert_eq!(some.blocks[b], whole[0].blocks[b]);
            assert_eq!(some.block_leaves(b), whole[0].block_leaves(b));
        }
        let last = hash_blocks(f.as_file(), size, 1, &[1, 2]).unwrap();
        assert_eq!(last.block_leaves(1), whole[1].block_leaves(1));
        assert!(hash_blocks(f.as_file(), size, 1, &[3]).is_err(), "the short last window has 3 blocks");
    }

    #[test]
    fn a_hole_and_written_zeros_hash_the_same() {
        let size = WINDOW;
        let hole = image(&[], size);
        let zeros = image(&[(0, &vec![0u8; WINDOW as usize])], size);
        assert_eq!(all(hole.as_file(), size), all(zeros.as_file(), size));
    }
}

#[cfg(test)]
mod spawn_tests {
    use super::*;

    #[tokio::test]
    async fn the_hasher_yields_every_window_in_order() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let size = 3 * WINDOW + 5000;
        f.as_file().set_len(size).unwrap();
        f.as_file().write_all_at(b"data", WINDOW + 7).unwrap();
        let mut rx = spawn_hasher(f.path().to_owned(), size);
        let mut got = Vec::new();
        while let Some(h) = rx.recv().await {
            got.push(h.unwrap().index);
        }
        assert_eq!(got, [0, 1, 2, 3]);
    }
}
