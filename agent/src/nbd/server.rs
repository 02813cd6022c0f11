//! The NBD server: one export per protected disk, over a unix socket (default)
//! or TCP on loopback, one thread per connection.
//!
//! Each connection handles its requests in order, so a reply is sent only after
//! the request's log append and image write are done. Protocol errors a client
//! can recover from (bad range, unknown command, oversize request) get the
//! protocol's error reply and the connection goes on; a request with a bad magic
//! means the stream is out of step, and only then is the connection closed.

use std::{
    collections::BTreeMap,
    io::{self, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    os::unix::net::{UnixListener, UnixStream},
    sync::{Arc, RwLock},
    thread,
};

use super::proto::*;
use crate::{
    disk::{DiskError, ProtectedDisk},
    log::{JournalError, format::RECORD_HEADER_LEN, journal::Journal},
};

/// A byte stream a client connected on.
pub trait Stream: Read + Write + Send + Sized + 'static {
    fn try_clone_stream(&self) -> io::Result<Self>;
}

impl Stream for UnixStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
}

impl Stream for TcpStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
}

/// Serves a set of protected disks, each as the export of its name.
/// Exports can be added and removed while it serves (the control API does);
/// connections already open keep their disk.
pub struct NbdServer {
    exports: RwLock<BTreeMap<String, Arc<ProtectedDisk>>>,
}

impl NbdServer {
    pub fn new(disks: impl IntoIterator<Item = Arc<ProtectedDisk>>) -> Arc<Self> {
        Arc::new(Self { exports: RwLock::new(disks.into_iter().map(|d| (d.name().to_owned(), d)).collect()) })
    }

    fn exports(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<ProtectedDisk>>> {
        self.exports.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves `disk` as export `name`; false when the name is taken.
    pub fn add_export(&self, name: &str, disk: Arc<ProtectedDisk>) -> bool {
        let mut exports = self.exports.write().unwrap_or_else(|p| p.into_inner());
        if exports.contains_key(name) {
            return false;
        }
        exports.insert(name.to_owned(), disk);
        true
    }

    /// Stops offering export `name` to new connections.
    pub fn remove_export(&self, name: &str) -> Option<Arc<ProtectedDisk>> {
        self.exports.write().unwrap_or_else(|p| p.into_inner()).remove(name)
    }

    /// Accepts connections on `listener` in a background thread.
    pub fn serve_unix(self: &Arc<Self>, listener: UnixListener) -> thread::JoinHandle<()> {
        let server = self.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => server.spawn_connection(stream),
                    Err(e) => tracing::warn!(error = %e, "accepting an NBD connection"),
                }
            }
        })
    }

    /// Accepts connections on `listener` in a background thread.
    pub fn serve_tcp(self: &Arc<Self>, listener: TcpListener) -> thread::JoinHandle<()> {
        let server = self.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        let _ = stream.set_nodelay(true);
                        server.spawn_connection(stream);
                    }
                    Err(e) => tracing::warn!(error = %e, "accepting an NBD connection"),
                }
            }
        })
    }

    fn spawn_connection<S: Stream>(self: &Arc<Self>, stream: S) {
        let server = self.clone();
        thread::spawn(move || {
            if let Err(e) = server.handle(stream) {
                tracing::debug!(error = %e, "NBD connection ended");
            }
        });
    }

    /// Runs one connection to its end.
    pub fn handle<S: Stream>(&self, stream: S) -> io::Result<()> {
        let mut writer = stream.try_clone_stream()?;
        let mut reader = BufReader::with_capacity(64 << 10, stream);
        match self.negotiate(&mut reader, &mut writer)? {
            Some(disk) => Transmission { disk, reader, writer, buf: Vec::new() }.run(),
            None => Ok(()),
        }
    }

    /// The fixed-newstyle handshake; the export to serve, or `None` when the
    /// client aborted.
    fn negotiate<R: Read, W: Write>(&self, r: &mut R, w: &mut W) -> io::Result<Option<Arc<ProtectedDisk>>> {
        let mut hello = Vec::with_capacity(18);
        hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        w.write_all(&hello)?;
        let client_flags = read_u32(r)?;
        if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(protocol("client sent unknown handshake flags"));
        }
        let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
        loop {
            if read_u64(r)? != IHAVEOPT {
                return Err(protocol("option without IHAVEOPT magic"));
            }
            let option = read_u32(r)?;
            let len = read_u32(r)?;
            if len > MAX_OPTION_LEN {
                // Not worth reading: the client is broken or hostile.
                w.write_all(&option_reply(option, REP_ERR_TOO_BIG, b"option data too large"))?;
                return Err(protocol("option data too large"));
            }
            let mut data = vec![0u8; len as usize];
            r.read_exact(&mut data)?;
            match option {
                OPT_EXPORT_NAME => {
                    let name = String::from_utf8_lossy(&data);
                    let Some(disk) = self.exports().get(name.as_ref()).cloned() else {
                        // This option has no error reply: closing is the answer.
                        return Err(protocol("unknown export requested with NBD_OPT_EXPORT_NAME"));
                    };
                    let mut reply = Vec::with_capacity(134);
                    reply.extend_from_slice(&disk.size().to_be_bytes());
                    reply.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
                    if !no_zeroes {
                        reply.extend_from_slice(&[0u8; 124]);
                    }
                    w.write_all(&reply)?;
                    return Ok(Some(disk));
                }
                OPT_ABORT => {
                    w.write_all(&option_reply(option, REP_ACK, &[]))?;
                    return Ok(None);
                }
                OPT_LIST if !data.is_empty() => {
                    w.write_all(&option_reply(option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data"))?;
                }
                OPT_LIST => {
                    // Not under the lock while writing: a slow client must not stall add/remove.
                    let names: Vec<String> = self.exports().keys().cloned().collect();
                    for name in names {
                        let mut d = (name.len() as u32).to_be_bytes().to_vec();
                        d.extend_from_slice(name.as_bytes());
                        w.write_all(&option_reply(option, REP_SERVER, &d))?;
                    }
                    w.write_all(&option_reply(option, REP_ACK, &[]))?;
                }
                OPT_INFO | OPT_GO => match parse_info_request(&data) {
                    Err(why) => w.write_all(&option_reply(option, REP_ERR_INVALID, why.as_bytes()))?,
                    Ok((name, infos)) => match self.exports().get(&name).cloned() {
                        None => {
                            let msg = format!("no export named {name:?}");
                            w.write_all(&option_reply(option, REP_ERR_UNKNOWN, msg.as_bytes()))?;
                        }
                        Some(disk) => {
                            let mut export = INFO_EXPORT.to_be_bytes().to_vec();
                            export.extend_from_slice(&disk.size().to_be_bytes());
                            export.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
                            w.write_all(&option_reply(option, REP_INFO, &export))?;
                            if infos.contains(&INFO_NAME) {
                                let mut d = INFO_NAME.to_be_bytes().to_vec();
                                d.extend_from_slice(name.as_bytes());
                                w.write_all(&option_reply(option, REP_INFO, &d))?;
                            }
                            if infos.contains(&INFO_BLOCK_SIZE) {
                                let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                                for v in [1u32, 4096, MAX_PAYLOAD] {
                                    d.extend_from_slice(&v.to_be_bytes());
                                }
                                w.write_all(&option_reply(option, REP_INFO, &d))?;
                            }
                            w.write_all(&option_reply(option, REP_ACK, &[]))?;
                            if option == OPT_GO {
                                return Ok(Some(disk));
                            }
                        }
                    },
                },
                // Structured replies, metadata contexts, TLS, extended headers:
                // not offered; clients fall back to simple replies.
                _ => w.write_all(&option_reply(option, REP_ERR_UNSUP, b"option not supported"))?,
            }
        }
    }
}

fn parse_info_request(data: &[u8]) -> Result<(String, Vec<u16>), &'static str> {
    let name_len = data.get(..4).map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")) as usize);
    let name_len = name_len.ok_or("request shorter than its name length")?;
    let name = data.get(4..4 + name_len).ok_or("name runs past the request")?;
    let name = std::str::from_utf8(name).map_err(|_| "export name is not UTF-8")?.to_owned();
    let rest = &data[4 + name_len..];
    let count =
        rest.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]]) as usize).ok_or("missing info count")?;
    if rest.len() != 2 + 2 * count {
        return Err("info count does not match the request length");
    }
    Ok((name, rest[2..].chunks(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect()))
}

struct Transmission<R, W> {
    disk: Arc<ProtectedDisk>,
    reader: BufReader<R>,
    writer: W,
    /// Reused request buffer: reply header + read data, or record header + write payload.
    buf: Vec<u8>,
}

impl<R: Read, W: Write> Transmission<R, W> {
    fn run(mut self) -> io::Result<()> {
        let mut header = [0u8; Request::LEN];
        loop {
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
                    self.buf.resize(16 + req.length as usize, 0);
                    match self.disk.read(&mut self.buf[16..], off) {
                        Ok(()) => {
                            self.buf[..16].copy_from_slice(&simple_reply(0, req.cookie));
                            return self.writer.write_all(&self.buf);
                        }
                        Err(e) => errno(&e),
                    }
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
                self.buf.resize(Journal::record_len(req.length as usize), 0);
                let payload_end = RECORD_HEADER_LEN + req.length as usize;
                self.reader.read_exact(&mut self.buf[RECORD_HEADER_LEN..payload_end])?;
                let fua = req.flags & CMD_FLAG_FUA != 0;
                let error = match self.disk.write(&mut self.buf, off, fua) {
                    Ok(_) => 0,
                    Err(e) => errno(&e),
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
                let error = if req.flags & !allowed != 0 {
                    EINVAL
                } else if !in_range {
                    if trim { EINVAL } else { ENOSPC }
                } else {
                    let keep = req.flags & CMD_FLAG_NO_HOLE != 0;
                    let fua = req.flags & CMD_FLAG_FUA != 0;
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

fn protocol(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}
