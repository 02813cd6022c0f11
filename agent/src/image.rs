//! Operations on a raw, sparse disk image beyond plain reads and writes.

use std::{fs::File, io, os::unix::fs::FileExt};

use rustix::fs::{FallocateFlags, fallocate};

/// Makes `[offset, offset + len)` read as zeroes. With `keep_allocated` false the
/// range is deallocated (a hole), which keeps a sparse image sparse.
pub fn zero_range(file: &File, offset: u64, len: u64, keep_allocated: bool) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let flags = if keep_allocated {
        FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE
    } else {
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE
    };
    match fallocate(file, flags, offset, len) {
        Ok(()) => Ok(()),
        // Filesystems without the flag: write the zeroes out.
        Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::INVAL => {
            write_zeroes(file, offset, len)
        }
        Err(e) => Err(e.into()),
    }
}

fn write_zeroes(file: &File, mut offset: u64, mut len: u64) -> io::Result<()> {
    static ZEROES: [u8; 64 << 10] = [0; 64 << 10];
    while len > 0 {
        let n = len.min(ZEROES.len() as u64);
        file.write_all_at(&ZEROES[..n as usize], offset)?;
        offset += n;
        len -= n;
    }
    Ok(())
}

/// The ranges of `file` that hold data, by `SEEK_DATA`/`SEEK_HOLE` (a sparse
/// file's holes are left out; a filesystem without the calls reports one range).
pub fn data_extents(file: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    data_within(file, 0, len)
}

/// [`data_extents`] within `[from, len)`: `(start, length)` of each data range,
/// clipped to it.
pub fn data_within(file: &File, from: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
    use rustix::fs::{SeekFrom, seek};
    let mut extents = Vec::new();
    let mut pos = from;
    while pos < len {
        let start = match seek(file, SeekFrom::Data(pos)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => break, // no data after pos
            Err(e) => return Err(e.into()),
        };
        if start >= len {
            break;
        }
        let end = seek(file, SeekFrom::Hole(start))?.min(len);
        extents.push((start, end - start));
        pos = end;
    }
    Ok(extents)
}

/// Copies `src` into a new file at `dst` of the same length: a reflink where the
/// filesystem can share blocks, else only the data ranges (holes stay holes).
pub fn sparse_copy(src: &File, dst_path: &std::path::Path) -> io::Result<()> {
    let len = src.metadata()?.len();
    let dst = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(dst_path)?;
    if rustix::fs::ioctl_ficlone(&dst, src).is_ok() {
        return dst.sync_all();
    }
    dst.set_len(len)?;
    let mut buf = vec![0u8; 1 << 20];
    for (mut off, mut n) in data_extents(src, len)? {
        while n > 0 {
            let k = n.min(buf.len() as u64) as usize;
            src.read_exact_at(&mut buf[..k], off)?;
            if buf[..k].iter().any(|&b| b != 0) {
                dst.write_all_at(&buf[..k], off)?;
            }
            off += k as u64;
            n -= k as u64;
        }
    }
    dst.sync_all()
}
