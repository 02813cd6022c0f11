//! An NBD connection once it chose its export: requests in order, each
//! reply sent only after the request's log append and image write are done;
//! payloads read and written in [`CHUNK`] pieces.

use std::{
    io::{self, BufReader, Read, Write},
    sync::Arc,
    time::{Duration, Instant},
};

use super::{
    io::{Slot, Timed, protocol},
    proto::*,
};
use crate::{
    disk::{DiskError, ProtectedDisk},
    log::{JournalError, format::RECORD_HEADER_LEN, journal::Journal},
};

/// Largest piece of a payload held in memory: a WRITE is logged and applied
/// as records of at most this many bytes, a READ answered in pieces of it.
pub const CHUNK: usize = 1 << 20;

pub struct Transmission<R, W> {
    pub disk: Arc<ProtectedDisk>,
    pub reader: Timed<BufReader<R>>,
    pub writer: W,
    /// Reused buffer of at most one chunk: reply header + read data, or
    /// record header + write payload + CRC.
    pub buf: Vec<u8>,
    pub timeout: Duration,
    /// This connection's place in its export's count.
    pub _slot: Slot,
}

impl<R: Read, W: Write> Transmission<R, W> {
    pub fn run(mut self) -> io::Result<()> {
        let mut header = [0u8; Request::LEN];
        loop {
            self.reader.deadline = None;
            if !self.reader.wait_for_request()? {
                return Ok(());
            }
            // From its first byte, a request must arrive whole in time.
            self.reader.deadline = Some(Instant::now() + self.timeout);
            match self.reader.read_exact(&mut header) {
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                other => other?,
            }
            let req = Request::parse(&header).ok_or_else(|| protocol("request with a bad magic"))?;
            if req.kind == CMD_DISC {
                return Ok(());
            }
            self.serve(req)?;
        }
    }

    fn reply(&mut self, error: u32, cookie: u64) -> io::Result<()> {
        self.writer.write_all(&simple_reply(error, cookie))
    }

    /// Reads a WRITE's payload chunk by chunk, logging and applying each as
    /// it arrives; the error to reply with (0: none). After a failed chunk
    /// the rest of the payload is read and dropped, to stay in step.
    fn write_chunks(&mut self, offset: u64, len: u64, fua: bool) -> io::Result<u32> {
        let mut error = 0;
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            self.buf.resize(Journal::record_len(n), 0);
            self.reader.read_exact(&mut self.buf[RECORD_HEADER_LEN..RECORD_HEADER_LEN + n])?;
            if error == 0 {
                let last = done + n as u64 == len;
                if let Err(e) = self.disk.write(&mut self.buf, offset + done, fua && last) {
                    error = errno(&e);
                }
            }
            done += n as u64;
        }
        Ok(error)
    }

    /// Answers a READ in chunks. The reply header goes first with the first
    /// chunk; a disk error after it has been sent can only be answered by
    /// closing the connection (the protocol's way out).
    fn read_chunks(&mut self, offset: u64, len: u64, cookie: u64) -> io::Result<()> {
        let mut done = 0u64;
        loop {
            let n = (len - done).min(CHUNK as u64) as usize;
            let head = if done == 0 { 16 } else { 0 };
            self.buf.resize(head + n, 0);
            if let Err(e) = self.disk.read(&mut self.buf[head..], offset + done) {
                if done == 0 {
                    return self.reply(errno(&e), cookie);
                }
                return Err(io::Error::other(format!("reading the disk mid-reply: {e}")));
            }
            if done == 0 {
                self.buf[..16].copy_from_slice(&simple_reply(0, cookie));
            }
            self.writer.write_all(&self.buf)?;
            done += n as u64;
            if done >= len {
                return Ok(());
            }
        }
    }

    fn serve(&mut self, req: Request) -> io::Result<()> {
        let (off, len) = (req.offset, req.length as u64);
        let in_range = off.checked_add(len).is_some_and(|end| end <= self.disk.size());
        match req.kind {
            CMD_READ => {
                let error = if req.flags != 0 {
                    EINVAL
                } else if req.length > MAX_PAYLOAD {
                    EOVERFLOW
                } else if !in_range {
                    EINVAL
                } else {
                    return self.read_chunks(off, len, req.cookie);
                };
                self.reply(error, req.cookie)
            }
            CMD_WRITE => {
                // The payload follows the header whatever we think of the request:
                // read it (or skip it) so the stream stays in step.
                if req.length > MAX_PAYLOAD || req.flags & !CMD_FLAG_FUA != 0 || !in_range {
                    io::copy(&mut (&mut self.reader).take(len), &mut io::sink())?;
                    let error = if req.length > MAX_PAYLOAD || req.flags & !CMD_FLAG_FUA != 0 {
                        EINVAL
                    } else {
                        ENOSPC
                    };
                    return self.reply(error, req.cookie);
                }
                let fua = req.flags & CMD_FLAG_FUA != 0;
                // Nothing to log for an empty write; FUA still makes what
                // came before durable.
                let error = if len == 0 {
                    if fua { self.disk.flush().err().map_or(0, |e| errno(&e)) } else { 0 }
                } else {
                    self.write_chunks(off, len, fua)?
                };
                self.reply(error, req.cookie)
            }
            CMD_FLUSH => {
                let error = if req.flags != 0 || req.offset != 0 || req.length != 0 {
                    EINVAL
                } else {
                    self.disk.flush().err().map_or(0, |e| errno(&e))
                };
                self.reply(error, req.cookie)
            }
            CMD_TRIM | CMD_WRITE_ZEROES => {
                let trim = req.kind == CMD_TRIM;
                let allowed = if trim { CMD_FLAG_FUA } else { CMD_FLAG_FUA | CMD_FLAG_NO_HOLE };
                let fua = req.flags & CMD_FLAG_FUA != 0;
                let error = if req.flags & !allowed != 0 {
                    EINVAL
                } else if !in_range {
                    if trim { EINVAL } else { ENOSPC }
                } else if len == 0 {
                    if fua { self.disk.flush().err().map_or(0, |e| errno(&e)) } else { 0 }
                } else {
                    let keep = req.flags & CMD_FLAG_NO_HOLE != 0;
                    self.disk.zero(off, len, trim, keep, fua).err().map_or(0, |e| errno(&e))
                };
                self.reply(error, req.cookie)
            }
            _ => self.reply(EINVAL, req.cookie),
        }
    }
}

/// The NBD error a failed disk operation is reported as.
fn errno(e: &DiskError) -> u32 {
    tracing::warn!(error = %e, "NBD request failed");
    let io = match e {
        DiskError::OutOfRange { .. } => return EINVAL,
        DiskError::ReadOnly(_) => return EPERM,
        DiskError::Image { source, .. } | DiskError::Journal(JournalError::Io { source, .. }) => source,
        _ => return EIO,
    };
    match io.raw_os_error() {
        Some(28) | Some(122) | Some(27) => ENOSPC, // ENOSPC, EDQUOT, EFBIG
        Some(1) | Some(30) => EPERM,               // EPERM, EROFS
        _ => EIO,
    }
}
