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

/// QEMU's image locking (`block/file-posix.c`), which QEMU, qemu-img and
/// qemu-io apply to every image file they open: open-file-description locks
/// on one byte per block permission, at 100 + bit for a permission held and
/// 200 + bit for one not shared with others; an opener first tests the bytes
/// that would conflict. Bits: consistent read 0, write 1, write-unchanged 2,
/// resize 3.
mod qemu_lock {
    pub const PERM_BASE: i64 = 100;
    pub const SHARED_BASE: i64 = 200;
    pub const CONSISTENT_READ: i64 = 0;
    pub const WRITE: i64 = 1;
    pub const WRITE_UNCHANGED: i64 = 2;
    pub const RESIZE: i64 = 3;
}

/// An open-file-description lock call on byte `byte` (F_OFD_GETLK fills in
/// the conflicting lock, or F_UNLCK).
fn ofd_lock(file: &File, set: bool, kind: libc::c_int, byte: i64) -> io::Result<libc::flock> {
    use nix::fcntl::{FcntlArg, fcntl};
    let mut fl = libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte,
        l_len: 1,
        l_pid: 0,
    };
    let arg = if set { FcntlArg::F_OFD_SETLK(&fl) } else { FcntlArg::F_OFD_GETLK(&mut fl) };
    fcntl(file, arg).map_err(io::Error::from)?;
    Ok(fl)
}

/// Takes the image for the agent as QEMU would for a writer that shares
/// neither writing nor resizing: afterwards QEMU, qemu-img and qemu-io refuse
/// to open it for writing ("Failed to get \"write\" lock") — nothing can write
/// around the log — while reads with force-share (`-U`) still work. Fails,
/// taking nothing, when another process already holds it so (a QEMU running
/// on the image file itself). The locks go when `file` is closed.
pub fn lock_like_qemu(file: &File) -> io::Result<()> {
    use qemu_lock::*;
    // What an opener with our permissions tests first.
    let conflicts = [
        (SHARED_BASE + CONSISTENT_READ, "consistent read"),
        (SHARED_BASE + WRITE, "write"),
        (SHARED_BASE + WRITE_UNCHANGED, "write unchanged"),
        (PERM_BASE + WRITE, "write"),
        (PERM_BASE + RESIZE, "resize"),
    ];
    for (byte, what) in conflicts {
        let fl = ofd_lock(file, false, libc::F_WRLCK, byte)?;
        if fl.l_type != libc::F_UNLCK as libc::c_short {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!(
                    "another process holds the image's \"{what}\" lock (a QEMU using the image file itself?)"
                ),
            ));
        }
    }
    let held = [PERM_BASE + CONSISTENT_READ, PERM_BASE + WRITE, PERM_BASE + WRITE_UNCHANGED];
    let not_shared = [SHARED_BASE + WRITE, SHARED_BASE + RESIZE];
    for byte in held.into_iter().chain(not_shared) {
        ofd_lock(file, true, libc::F_RDLCK, byte)?;
    }
    Ok(())
}
