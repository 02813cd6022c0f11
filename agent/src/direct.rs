//! O_DIRECT where it helps: writing a replica's image where a record allows
//! it, writing and reading the segments it receives, and reading whole
//! images (a resync's hashing) without filling the page cache.
//!
//! An apply ends in an fsync of the image either way (DESIGN "Data path" step
//! 4), so going through the page cache only adds a copy of every byte and
//! writeback that lags behind the apply. Records whose offset and length are
//! 4 KiB-aligned — most of what a guest writes — go straight to the device;
//! everything else, and every filesystem that refuses O_DIRECT, goes through
//! the page cache as before. The kernel keeps the two coherent (a direct write
//! flushes and drops cached pages of its range first).

use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::Path,
};

/// The alignment of offsets, lengths and buffers for direct writes: enough
/// for every logical block size up to 4 KiB.
pub const ALIGN: usize = 4096;

/// Whether an O_DIRECT read or write failed because the filesystem refuses
/// O_DIRECT (or this alignment) rather than because the I/O failed: the
/// caller goes through the page cache instead.
pub fn refused(e: &io::Error) -> bool {
    e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error())
}

/// Whether a write at `offset` of `len` bytes can go direct.
pub fn aligned(offset: u64, len: usize) -> bool {
    len > 0 && offset.is_multiple_of(ALIGN as u64) && len.is_multiple_of(ALIGN)
}

/// Opens `path` for direct reads and writes; `None` where that is refused
/// (tmpfs on older kernels, some FUSE and network filesystems): the caller
/// goes through the page cache instead.
pub fn open(path: &Path) -> Option<File> {
    let flags = rustix::fs::OFlags::DIRECT | rustix::fs::OFlags::NOFOLLOW;
    OpenOptions::new().read(true).write(true).custom_flags(flags.bits() as i32).open(path).ok()
}

/// A read-only O_DIRECT handle on `path` (the primary's image, which the
/// agent also holds open for writing), or `None` where the filesystem
/// refuses O_DIRECT.
pub fn open_read(path: &Path) -> Option<File> {
    let flags = rustix::fs::OFlags::DIRECT | rustix::fs::OFlags::NOFOLLOW;
    OpenOptions::new().read(true).custom_flags(flags.bits() as i32).open(path).ok()
}

/// A buffer whose contents start at an [`ALIGN`]-aligned address, as O_DIRECT
/// requires: a Vec one alignment longer than asked, used from its first
/// aligned byte (a Vec's heap block does not move when the Vec does).
pub struct AlignedBuf {
    bytes: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// An empty buffer holding at least `cap` bytes.
    pub fn with_capacity(cap: usize) -> Self {
        let cap = cap.max(ALIGN).next_multiple_of(ALIGN);
        let bytes = vec![0u8; cap + ALIGN];
        let start = bytes.as_ptr().align_offset(ALIGN);
        assert!(start < ALIGN, "a byte pointer can always be aligned");
        Self { bytes, start, len: 0 }
    }

    pub fn capacity(&self) -> usize {
        self.bytes.len() - ALIGN
    }

    /// Replaces the contents with `data`, which must fit.
    pub fn fill_from(&mut self, data: &[u8]) {
        assert!(data.len() <= self.capacity(), "{} bytes into a {}-byte buffer", data.len(), self.capacity());
        self.bytes[self.start..self.start + data.len()].copy_from_slice(data);
        self.len = data.len();
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[self.start..self.start + self.len]
    }

    /// The first `len` bytes, to be filled by the caller (a read).
    pub fn slice_mut(&mut self, len: usize) -> &mut [u8] {
        assert!(len <= self.capacity(), "{len} bytes of a {}-byte buffer", self.capacity());
        self.len = len;
        &mut self.bytes[self.start..self.start + len]
    }

    /// Appends as much of `data` as fits; returns how much that was.
    fn push(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.capacity() - self.len);
        let at = self.start + self.len;
        self.bytes[at..at + n].copy_from_slice(&data[..n]);
        self.len += n;
        n
    }
}

/// A sequential writer of a new file that writes whole aligned blocks with
/// O_DIRECT (when given a direct handle) and only the unaligned tail through
/// the page cache. Writes happen on a helper thread, so the caller fills the
/// next buffer (reading and checksumming) while the last one is written.
/// The caller still fsyncs the file [`DirectWriter::finish`] returns.
pub struct DirectWriter {
    buf: AlignedBuf,
    /// File offset of `buf`'s first byte.
    pos: u64,
    to_worker: Option<std::sync::mpsc::SyncSender<(AlignedBuf, u64)>>,
    free: std::sync::mpsc::Receiver<AlignedBuf>,
    worker: Option<std::thread::JoinHandle<io::Result<File>>>,
}

impl DirectWriter {
    const BUFFER: usize = 4 << 20;

    pub fn new(file: File, direct: Option<File>) -> Self {
        Self::with_buffer(file, direct, Self::BUFFER)
    }

    /// A writer whose buffers (up to three) hold `buffer` bytes each.
    pub fn with_buffer(file: File, mut direct: Option<File>, buffer: usize) -> Self {
        // One buffer filling, one queued, one being written.
        let (to_worker, queued) = std::sync::mpsc::sync_channel::<(AlignedBuf, u64)>(1);
        let (give_back, free) = std::sync::mpsc::channel();
        let worker = std::thread::spawn(move || {
            for (buf, pos) in queued {
                write_block(&file, &mut direct, buf.as_slice(), pos)?;
                let _ = give_back.send(buf);
            }
            Ok(file)
        });
        Self {
            buf: AlignedBuf::with_capacity(buffer),
            pos: 0,
            to_worker: Some(to_worker),
            free,
            worker: Some(worker),
        }
    }

    /// Hands the current buffer to the writer thread.
    fn hand_off(&mut self) -> io::Result<()> {
        let cap = self.buf.capacity();
        let mut next = self.free.try_recv().unwrap_or_else(|_| AlignedBuf::with_capacity(cap));
        next.len = 0;
        let full = std::mem::replace(&mut self.buf, next);
        let at = self.pos;
        self.pos += full.len as u64;
        let sent = self.to_worker.as_ref().is_some_and(|tx| tx.send((full, at)).is_ok());
        if sent { Ok(()) } else { self.join().map(drop) }
    }

    /// Stops the writer thread: the file, or the error that stopped it.
    fn join(&mut self) -> io::Result<File> {
        self.to_worker = None;
        match self.worker.take().map(|w| w.join()) {
            Some(Ok(result)) => result,
            Some(Err(panic)) => std::panic::resume_unwind(panic),
            None => Err(io::Error::other("the writer already stopped")),
        }
    }

    /// Writes what is left and returns the file (not yet synced).
    pub fn finish(mut self) -> io::Result<File> {
        self.hand_off()?;
        self.join()
    }
}

/// Writes `data` at `pos`: its whole blocks direct when `pos` is aligned and
/// `direct` works (a refusal turns it off for the rest of the file), the
/// rest through the page cache, whose writeback is started at once so that
/// the caller's fsync finds little left to write.
fn write_block(file: &File, direct: &mut Option<File>, data: &[u8], pos: u64) -> io::Result<()> {
    let whole = data.len() / ALIGN * ALIGN;
    let mut done = 0;
    if let Some(d) = direct.as_ref().filter(|_| aligned(pos, whole)) {
        match d.write_all_at(&data[..whole], pos) {
            Ok(()) => done = whole,
            Err(e) if refused(&e) => *direct = None,
            Err(e) => return Err(e),
        }
    }
    let (rest, at) = (&data[done..], pos + done as u64);
    if rest.is_empty() {
        return Ok(());
    }
    file.write_all_at(rest, at)?;
    // DONTNEED starts writeback of the range without waiting for it (Linux;
    // durability stays the fsync's, and an error here shows again there).
    let len = std::num::NonZeroU64::new(rest.len() as u64);
    let _ = rustix::fs::fadvise(file, at, len, rustix::fs::Advice::DontNeed);
    Ok(())
}

impl Write for DirectWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len == self.buf.capacity() {
            self.hand_off()?;
        }
        Ok(self.buf.push(data))
    }

    /// Whole buffers only: the tail waits for [`DirectWriter::finish`].
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A reader of a file that reads it in big aligned blocks with O_DIRECT
/// (through the page cache where the filesystem refuses): a replica's
/// received segment, written direct and read once or twice by the apply,
/// never enters the page cache. Small reads, and seeks within a block, cost
/// no syscall.
pub struct BlockReader {
    file: File,
    direct: Option<File>,
    buf: AlignedBuf,
    /// File offset of `buf`'s first byte.
    buf_at: u64,
    /// Where the next read starts.
    pos: u64,
}

impl BlockReader {
    const BLOCK: usize = 1 << 20;

    /// Reads `file`, through `direct` (an O_DIRECT handle on it) when given.
    pub fn new(file: File, direct: Option<File>) -> Self {
        Self { file, direct, buf: AlignedBuf::with_capacity(Self::BLOCK), buf_at: 0, pos: 0 }
    }

    /// Fills the buffer with the block holding `pos`; false at the end of the file.
    fn fill(&mut self) -> io::Result<bool> {
        let at = self.pos / ALIGN as u64 * ALIGN as u64;
        let cap = self.buf.capacity();
        let buf = self.buf.slice_mut(cap);
        let n = match self.direct.as_ref().map(|d| read_full_at(d, buf, at)) {
            Some(Ok(n)) => n,
            Some(Err(e)) if refused(&e) => {
                self.direct = None;
                read_full_at(&self.file, buf, at)?
            }
            Some(Err(e)) => return Err(e),
            None => read_full_at(&self.file, buf, at)?,
        };
        self.buf.len = n;
        self.buf_at = at;
        Ok(self.pos < at + n as u64)
    }
}

/// Reads at `at` until `buf` is full or the file ends; the bytes read.
fn read_full_at(f: &File, buf: &mut [u8], at: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], at + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

impl io::Read for BlockReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let in_buf = |r: &Self| r.pos >= r.buf_at && r.pos < r.buf_at + r.buf.len as u64;
        if out.is_empty() || (!in_buf(self) && !self.fill()?) {
            return Ok(0);
        }
        let from = (self.pos - self.buf_at) as usize;
        let n = out.len().min(self.buf.len - from);
        out[..n].copy_from_slice(&self.buf.as_slice()[from..from + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl io::Seek for BlockReader {
    fn seek(&mut self, to: io::SeekFrom) -> io::Result<u64> {
        let target = match to {
            io::SeekFrom::Start(n) => Some(n),
            io::SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            io::SeekFrom::End(d) => self.file.metadata()?.len().checked_add_signed(d),
        };
        self.pos =
            target.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"))?;
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_hold_what_was_copied() {
        for cap in [1, 4096, 4097, 1 << 20] {
            let mut b = AlignedBuf::with_capacity(cap);
            assert_eq!(b.as_slice().as_ptr() as usize % ALIGN, 0);
            assert!(b.capacity() >= cap && b.capacity().is_multiple_of(ALIGN));
            let data: Vec<u8> = (0..cap).map(|i| i as u8).collect();
            b.fill_from(&data);
            assert_eq!(b.as_slice(), &data[..]);
        }
    }

    #[test]
    fn only_whole_aligned_blocks_go_direct() {
        assert!(aligned(0, 4096) && aligned(8192, 1 << 20));
        assert!(!aligned(512, 4096) && !aligned(0, 512) && !aligned(0, 0));
    }

    #[test]
    fn the_direct_writer_writes_every_byte_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = OpenOptions::new().write(true).create_new(true).open(&path).unwrap();
        let mut w = DirectWriter::new(file, open(&path));
        let data: Vec<u8> = (0..(9 << 20) + 123).map(|i: u32| (i % 251) as u8).collect();
        // Pieces of awkward sizes, as a segment writer's headers and payloads are.
        for piece in data.chunks(40 + 4093) {
            w.write_all(piece).unwrap();
        }
        w.finish().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
    }

    #[test]
    fn the_block_reader_reads_and_seeks_like_the_file() {
        use std::io::{Read, Seek, SeekFrom};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..(3 << 20) + 4321).map(|i: u32| (i % 253) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        for direct in [open_read(&path), None] {
            let mut r = BlockReader::new(File::open(&path).unwrap(), direct);
            // Reads of awkward sizes across block boundaries, then to the end.
            let mut got = vec![0u8; 40 + 4093];
            r.read_exact(&mut got).unwrap();
            assert_eq!(got, data[..got.len()]);
            // Forward within the block, forward past it, back before it.
            for (to, at) in [
                (SeekFrom::Current(100), 4233u64),
                (SeekFrom::Current((2 << 20) + 7), (2 << 20) + 4250),
                (SeekFrom::Start(5), 5),
            ] {
                assert_eq!(r.seek(to).unwrap(), at);
                let mut b = [0u8; 10];
                r.read_exact(&mut b).unwrap();
                assert_eq!(b, data[at as usize..at as usize + 10], "after seeking to {at}");
            }
            let mut rest = Vec::new();
            r.read_to_end(&mut rest).unwrap();
            assert_eq!(rest, data[15..]);
            assert_eq!(r.read(&mut [0u8; 8]).unwrap(), 0, "nothing after the end");
            assert!(r.seek(SeekFrom::Current(-(data.len() as i64) - 1)).is_err(), "before the start");
        }
    }

    #[test]
    #[should_panic(expected = "into a 4096-byte buffer")]
    fn an_oversized_copy_is_refused() {
        AlignedBuf::with_capacity(10).fill_from(&[0; 4097]);
    }
}
