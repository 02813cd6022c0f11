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
