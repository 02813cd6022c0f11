//! The NBD server: one export per protected disk, over a unix socket (default)
//! or TCP on loopback, one thread per connection.
//!
//! Each connection handles its requests in order, so a reply is sent only after
//! the request's log append and image write are done. Protocol errors a client
//! can recover from (bad range, unknown command, oversize request) get the
//! protocol's error reply and the connection goes on; a request with a bad magic
//! means the stream is out of step, and only then is the connection closed.
//!
//! What a client can make the agent hold is bounded ([`Limits`]):
//! ```text
//!  accept ─▶ handshaking < max_handshakes?  else closed at once
//!          ─▶ negotiation within handshake_timeout
//!          ─▶ export's connections < max_connections_per_export?  else NBD_REP_ERR_POLICY
//!          ─▶ requests: payloads read and written in CHUNK pieces (memory per
//!             connection: one chunk), each request's bytes within request_timeout
//!             of its first byte; an idle connection may wait forever
//! ```

use std::{
    collections::BTreeMap,
    io::{self, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    os::unix::net::{UnixListener, UnixStream},
    sync::{
        Arc, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

pub use super::transmission::CHUNK;
use super::{
    io::{Slot, Timed, protocol, read_u32, read_u64},
    proto::*,
    transmission::Transmission,
};
use crate::disk::ProtectedDisk;

/// What one client may hold of the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections an export serves at once (a VM's QEMU opens one, or a few
    /// with multi-conn); more are refused with NBD_REP_ERR_POLICY.
    pub max_connections_per_export: usize,
    /// Connections still negotiating at once; more are closed on accept.
    pub max_handshakes: usize,
    /// How long a connection may take to choose an export.
    pub handshake_timeout: Duration,
    /// How long a request's header and payload may take once its first byte came.
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections_per_export: 16,
            max_handshakes: 64,
            handshake_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// A byte stream a client connected on.
pub trait Stream: Read + Write + Send + Sized + 'static {
    fn try_clone_stream(&self) -> io::Result<Self>;
    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()>;
}

impl Stream for UnixStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(read)?;
        self.set_write_timeout(write)
    }
}

impl Stream for TcpStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(read)?;
        self.set_write_timeout(write)
    }
}

/// An export: its disk and how many connections it serves now.
#[derive(Clone)]
struct Export {
    disk: Arc<ProtectedDisk>,
    connections: Arc<AtomicUsize>,
}

/// Serves a set of protected disks, each as the export of its name.
/// Exports can be added and removed while it serves (the control API does);
/// connections already open keep their disk.
pub struct NbdServer {
    exports: RwLock<BTreeMap<String, Export>>,
    limits: Limits,
    handshaking: Arc<AtomicUsize>,
}

impl NbdServer {
    pub fn new(disks: impl IntoIterator<Item = Arc<ProtectedDisk>>) -> Arc<Self> {
        Self::with_limits(disks, Limits::default())
    }

    pub fn with_limits(disks: impl IntoIterator<Item = Arc<ProtectedDisk>>, limits: Limits) -> Arc<Self> {
        let exports = disks
            .into_iter()
            .map(|d| (d.name().to_owned(), Export { disk: d, connections: Arc::default() }))
            .collect();
        Arc::new(Self { exports: RwLock::new(exports), limits, handshaking: Arc::default() })
    }

    fn exports(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Export>> {
        self.exports.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves `disk` as export `name`; false when the name is taken.
    pub fn add_export(&self, name: &str, disk: Arc<ProtectedDisk>) -> bool {
        let mut exports = self.exports.write().unwrap_or_else(|p| p.into_inner());
        if exports.contains_key(name) {
            return false;
        }
        exports.insert(name.to_owned(), Export { disk, connections: Arc::default() });
        true
    }

    /// Stops offering export `name` to new connections.
    pub fn remove_export(&self, name: &str) -> Option<Arc<ProtectedDisk>> {
        self.exports.write().unwrap_or_else(|p| p.into_inner()).remove(name).map(|e| e.disk)
    }

    /// Connections export `name` serves now.
    pub fn connections(&self, name: &str) -> usize {
        self.exports().get(name).map_or(0, |e| e.connections.load(Ordering::Acquire))
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
        let Some(slot) = Slot::take(&self.handshaking, self.limits.max_handshakes) else {
            tracing::warn!(
                limit = self.limits.max_handshakes,
                "too many NBD connections negotiating at once: closing a new one"
            );
            return;
        };
        let server = self.clone();
        thread::spawn(move || {
            if let Err(e) = server.handle_counted(stream, slot) {
                tracing::debug!(error = %e, "NBD connection ended");
            }
        });
    }

    /// Runs one connection to its end.
    pub fn handle<S: Stream>(&self, stream: S) -> io::Result<()> {
        let slot = Slot::take(&self.handshaking, usize::MAX).expect("no limit");
        self.handle_counted(stream, slot)
    }

    fn handle_counted<S: Stream>(&self, stream: S, handshake: Slot) -> io::Result<()> {
        // A stalled read wakes up every tick so deadlines are enforced; an
        // idle connection between requests simply waits again.
        let tick = self.limits.request_timeout.min(self.limits.handshake_timeout).min(Duration::from_secs(5));
        stream.set_timeouts(Some(tick), Some(self.limits.request_timeout))?;
        let mut writer = stream.try_clone_stream()?;
        let mut reader = Timed { inner: BufReader::with_capacity(64 << 10, stream), deadline: None };
        reader.deadline = Some(Instant::now() + self.limits.handshake_timeout);
        let negotiated = self.negotiate(&mut reader, &mut writer);
        drop(handshake);
        match negotiated? {
            Some((disk, slot)) => {
                reader.deadline = None;
                Transmission {
                    disk,
                    reader,
                    writer,
                    buf: Vec::new(),
                    timeout: self.limits.request_timeout,
                    _slot: slot,
                }
                .run()
            }
            None => Ok(()),
        }
    }

    /// Takes a connection slot of export `name`, or says why not.
    fn open_export(&self, name: &str) -> Result<(Arc<ProtectedDisk>, Slot), (u32, String)> {
        let Some(e) = self.exports().get(name).cloned() else {
            return Err((REP_ERR_UNKNOWN, format!("no export named {name:?}")));
        };
        let limit = self.limits.max_connections_per_export;
        match Slot::take(&e.connections, limit) {
            Some(slot) => Ok((e.disk, slot)),
            None => Err((
                REP_ERR_POLICY,
                format!(
                    "export {name:?} already serves {limit} connections, the most allowed \
                     (vmreplica-agent --nbd-max-connections)"
                ),
            )),
        }
    }

    /// The fixed-newstyle handshake; the export to serve, or `None` when the
    /// client aborted. Long (about 90 lines) on purpose: one arm per option
    /// of the protocol, as its specification lists them.
    fn negotiate<R: Read, W: Write>(
        &self,
        r: &mut R,
        w: &mut W,
    ) -> io::Result<Option<(Arc<ProtectedDisk>, Slot)>> {
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
                    // This option has no error reply: closing is the answer.
                    let (disk, slot) = self.open_export(&name).map_err(|(_, why)| {
                        tracing::warn!(export = %name, "NBD_OPT_EXPORT_NAME refused: {why}");
                        protocol("export refused with NBD_OPT_EXPORT_NAME")
                    })?;
                    let mut reply = Vec::with_capacity(134);
                    reply.extend_from_slice(&disk.size().to_be_bytes());
                    reply.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
                    if !no_zeroes {
                        reply.extend_from_slice(&[0u8; 124]);
                    }
                    w.write_all(&reply)?;
                    return Ok(Some((disk, slot)));
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
                    Ok((name, infos)) => {
                        let opened = if option == OPT_GO {
                            self.open_export(&name).map(|(d, slot)| (d, Some(slot)))
                        } else {
                            let disk = self.exports().get(&name).map(|e| e.disk.clone());
                            disk.map(|d| (d, None))
                                .ok_or((REP_ERR_UNKNOWN, format!("no export named {name:?}")))
                        };
                        match opened {
                            Err((code, msg)) => w.write_all(&option_reply(option, code, msg.as_bytes()))?,
                            Ok((disk, slot)) => {
                                write_infos(w, option, &name, &infos, &disk)?;
                                if let Some(slot) = slot {
                                    return Ok(Some((disk, slot)));
                                }
                            }
                        }
                    }
                },
                // Structured replies, metadata contexts, TLS, extended headers:
                // not offered; clients fall back to simple replies.
                _ => w.write_all(&option_reply(option, REP_ERR_UNSUP, b"option not supported"))?,
            }
        }
    }
}

/// The replies to NBD_OPT_INFO / NBD_OPT_GO for an export: its size and
/// flags, the name and block sizes when asked, then the ACK.
fn write_infos<W: Write>(
    w: &mut W,
    option: u32,
    name: &str,
    infos: &[u16],
    disk: &ProtectedDisk,
) -> io::Result<()> {
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
    w.write_all(&option_reply(option, REP_ACK, &[]))
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
