//! The primary side: ships one disk's sealed segments (and first its initial
//! copy) to the replica, deleting each segment only once the replica says it is
//! durable.
//!
//! ```text
//!  sync_once(): Open ─▶ [initial copy] ─▶ drop what the replica has ─▶ push the rest, in order
//!  push:   reader thread: read 1 MiB ─▶ zstd ─▶ bandwidth limit ─▶ channel ─▶ gRPC stream
//! ```

use std::{
    fs::File,
    io::{self, Read},
    os::unix::fs::FileExt,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use super::{
    proto::{
        CopyChunk, CopyStart, DiskRef, OpenRequest, SegmentChunk, SegmentStart,
        replication_client::ReplicationClient,
    },
    tls::TlsMaterial,
};
use crate::{
    disk::ProtectedDisk, failpoint, image::data_extents, log::SealedSegment, metrics::Metrics,
    replica::ReplicaDisk,
};

/// Why a sync failed; all are retried with back-off.
#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    #[error("replica refused: {}: {}", .0.code(), .0.message())]
    Rpc(#[from] tonic::Status),
    #[error("reading {what}: {source}")]
    Read { what: String, source: io::Error },
    #[error(transparent)]
    Disk(#[from] crate::disk::DiskError),
    #[error(transparent)]
    Replica(#[from] crate::replica::ReplicaError),
    #[error(
        "the replica expects sequence {expected}, inside local segment {first}..={last}: \
         logs cannot bring it up to date; a resynchronisation is required"
    )]
    ResyncRequired { expected: u64, first: u64, last: u64 },
    #[error("{0}")]
    Tls(String),
    #[error(
        "the replica refused this primary's epoch {mine}: it is at epoch {current}, a newer primary of this \
         VM exists (it was failed over); this side's disks are made read-only: {message}"
    )]
    StaleEpoch { current: u64, mine: u64, message: String },
    #[error("the replica answered {call} with next_seq {value}, which no log can hold: nothing was deleted")]
    BadReply { call: &'static str, value: u64 },
    #[error(
        "the replica holds another history (epoch {replica_epoch}, expecting sequence {replica_next}) than \
         this disk's log (epoch {epoch}, sequences {log_start}..={last_logged}): nothing was deleted; \
         a resynchronisation is required"
    )]
    Diverged { replica_epoch: u64, replica_next: u64, epoch: u64, log_start: u64, last_logged: u64 },
}

impl ShipError {
    /// A short, stable name of the kind of failure, for the controller to act on:
    /// the gRPC code name for a refusal (`PermissionDenied`, `Unavailable`, ...).
    pub fn code(&self) -> String {
        match self {
            ShipError::Rpc(s) => format!("{:?}", s.code()),
            ShipError::Read { .. } => "LocalRead".into(),
            ShipError::Disk(_) | ShipError::Replica(_) => "LocalDisk".into(),
            ShipError::BadReply { .. } => "BadReply".into(),
            ShipError::Tls(_) => "TlsRefused".into(),
            ShipError::StaleEpoch { .. } => "StaleEpoch".into(),
            ShipError::ResyncRequired { .. } | ShipError::Diverged { .. } => "ResyncRequired".into(),
        }
    }
}

/// Opens a lazily connecting mTLS channel to a replica agent at `addr`
/// (`host:port`), verifying it as `server_name`.
pub fn channel(addr: &str, server_name: &str, tls: &TlsMaterial) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls.client(server_name))?
        .connect_timeout(Duration::from_secs(10))
        .connect_lazy())
}

/// Where a shipper's channel leads, for telling a refused certificate from
/// a broken connection when a call fails ([`super::tls::diagnose`]).
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: String,
    pub server_name: String,
    pub tls: TlsMaterial,
}

impl Peer {
    /// The lazily connecting channel to this peer.
    pub fn channel(&self) -> Result<Channel, tonic::transport::Error> {
        channel(&self.addr, &self.server_name, &self.tls)
    }
}

/// A token bucket in bytes per second, shared by an agent's transfers.
pub struct RateLimiter {
    rate: u64,
    state: Mutex<(Instant, f64)>,
}

impl RateLimiter {
    pub fn new(bytes_per_second: u64) -> Self {
        Self { rate: bytes_per_second.max(1), state: Mutex::new((Instant::now(), 0.0)) }
    }

    /// Blocks the calling (non-async) thread until `n` bytes may go.
    pub fn acquire_blocking(&self, n: usize) {
        let wait = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            // At most one second of burst.
            let tokens =
                (s.1 + now.duration_since(s.0).as_secs_f64() * self.rate as f64).min(self.rate as f64);
            let left = tokens - n as f64;
            *s = (now, left);
            if left >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-left / self.rate as f64) }
        };
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

/// How a disk is shipped.
#[derive(Clone, Debug)]
pub struct ShipperConfig {
    pub compression: bool,
    pub chunk_size: usize,
    /// Waits between failed attempts; the last repeats.
    pub backoff: Vec<Duration>,
    /// The VM's recovery history for the replica; `None`: the replica site's.
    pub history: Option<super::proto::RecoveryHistory>,
    /// The replication interval, told to the replica (0: not said).
    pub interval_seconds: u32,
}

impl Default for ShipperConfig {
    fn default() -> Self {
        let min = |m: u64| Duration::from_secs(60 * m);
        Self {
            compression: true,
            chunk_size: 1 << 20,
            backoff: vec![min(1), min(2), min(4), min(8), min(30)],
            history: None,
            interval_seconds: 0,
        }
    }
}

/// Per-replication statistics (Measure-VMReplication's numbers).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ShipStats {
    pub segments_sent: u64,
    pub raw_bytes_sent: u64,
    pub wire_bytes_sent: u64,
    pub max_segment_bytes: u64,
    pub last_latency: Duration,
    pub total_latency: Duration,
    pub errors: u64,
    pub successful_cycles: u64,
    /// Cycles that did not complete (each failed sync is one).
    pub missed_cycles: u64,
    pub last_error: Option<String>,
    /// [`ShipError::code`] of `last_error`.
    pub last_error_code: Option<String>,
    pub last_replication: Option<SystemTime>,
    pub durable_through: u64,
    pub initial_copy_bytes: u64,
}

/// What a shipper sends: a protected disk's own log, or (extended
/// replication) the segments a replica applied, kept in its `forward/`.
#[derive(Clone)]
pub enum Source {
    Protected(Arc<ProtectedDisk>),
    Forward(Arc<ReplicaDisk>),
}

impl Source {
    fn size(&self) -> u64 {
        match self {
            Self::Protected(d) => d.size(),
            Self::Forward(r) => r.state().disk_size,
        }
    }

    fn image_path(&self) -> std::path::PathBuf {
        match self {
            Self::Protected(d) => d.path().to_owned(),
            Self::Forward(r) => r.image(),
        }
    }

    fn sealed(&self) -> Result<Vec<SealedSegment>, ShipError> {
        match self {
            Self::Protected(d) => Ok(d.log_status().sealed),
            Self::Forward(r) => Ok(r.forward_sealed()?),
        }
    }

    fn acknowledge(&self, through: u64) -> Result<(), ShipError> {
        match self {
            Self::Protected(d) => Ok(d.acknowledge(through)?),
            Self::Forward(r) => Ok(r.forward_acknowledge(through)?),
        }
    }

    fn pending_bytes(&self) -> u64 {
        match self {
            Self::Protected(d) => d.log_status().pending_bytes,
            Self::Forward(r) => r.forward_sealed().map(|s| s.iter().map(|s| s.bytes).sum()).unwrap_or(0),
        }
    }

    /// Where replication resumes after an initial copy that starts now:
    /// everything before it is in the image already. A protected disk cuts
    /// its log; a replica keeps every segment it applies from now on.
    fn cut(&self) -> Result<u64, ShipError> {
        match self {
            Self::Protected(d) => Ok(d.cut()?.0),
            Self::Forward(r) => Ok(r.set_forward(true)? + 1),
        }
    }

    /// Which initial copy of its own the source holds (a replica receives a
    /// new one after a break; 0 for a protected disk).
    fn copy_generation(&self) -> u64 {
        match self {
            Self::Protected(_) => 0,
            Self::Forward(r) => r.state().copies,
        }
    }

    /// Whether the replica shipped to must get a new copy although it has
    /// one: the forwarding source received a new copy since it sent one.
    fn needs_copy(&self) -> bool {
        match self {
            Self::Protected(_) => false,
            Self::Forward(r) => {
                let s = r.state();
                s.copies != s.forwarded_copy
            }
        }
    }

    /// Records that the replica shipped to holds copy `generation`.
    fn copied(&self, generation: u64) -> Result<(), ShipError> {
        match self {
            Self::Protected(_) => Ok(()),
            Self::Forward(r) => Ok(r.set_forwarded_copy(generation)?),
        }
    }

    /// The first sequence not yet in the image: where a copy that ends now
    /// is consistent from.
    fn next_seq(&self) -> u64 {
        match self {
            Self::Protected(d) => d.log_status().next_seq,
            Self::Forward(r) => r.state().applied_through + 1,
        }
    }
}

/// Ships one disk's log (a protected disk's, or a replica's applied
/// segments) to one replica.
pub struct Shipper {
    vm_id: String,
    disk_id: String,
    source: Source,
    client: ReplicationClient<Channel>,
    cfg: ShipperConfig,
    limiter: Option<Arc<RateLimiter>>,
    transfers: Arc<Semaphore>,
    epoch: u64,
    /// The first sequence this epoch's log holds (1 unless a promotion
    /// continued another log's numbering).
    log_start: u64,
    stats: Mutex<ShipStats>,
    metrics: Option<Arc<Metrics>>,
    /// The initial copy in flight: bytes sent so far and bytes to send (the
    /// image's allocated extents), both 0 when none runs.
    copying: Arc<(std::sync::atomic::AtomicU64, std::sync::atomic::AtomicU64)>,
    /// Where the channel leads (to diagnose TLS failures).
    peer: Option<Peer>,
}

/// What one chunk producer hands the gRPC stream.
type Chunks<T> = mpsc::Receiver<T>;

impl Shipper {
    pub fn new(
        vm_id: &str,
        disk: Arc<ProtectedDisk>,
        channel: Channel,
        cfg: ShipperConfig,
        limiter: Option<Arc<RateLimiter>>,
        transfers: Arc<Semaphore>,
    ) -> Self {
        let disk_id = disk.name().to_owned();
        Self::with_source(vm_id, &disk_id, Source::Protected(disk), channel, cfg, limiter, transfers)
    }

    /// Extended replication: ships the segments `replica` applied (it keeps
    /// them from the first sync on) to another replica.
    pub fn forwarding(
        replica: Arc<ReplicaDisk>,
        channel: Channel,
        cfg: ShipperConfig,
        limiter: Option<Arc<RateLimiter>>,
        transfers: Arc<Semaphore>,
    ) -> Self {
        let (vm_id, disk_id) = {
            let s = replica.state();
            (s.vm_id.clone(), s.disk_id.clone())
        };
        let epoch = replica.state().epoch;
        Self::with_source(&vm_id, &disk_id, Source::Forward(replica), channel, cfg, limiter, transfers)
            .with_epoch(epoch)
    }

    fn with_source(
        vm_id: &str,
        disk_id: &str,
        source: Source,
        channel: Channel,
        cfg: ShipperConfig,
        limiter: Option<Arc<RateLimiter>>,
        transfers: Arc<Semaphore>,
    ) -> Self {
        let client = ReplicationClient::new(channel)
            .max_decoding_message_size(super::service::MAX_FRAME)
            .max_encoding_message_size(super::service::MAX_FRAME);
        Self {
            vm_id: vm_id.to_owned(),
            disk_id: disk_id.to_owned(),
            source,
            client,
            cfg,
            limiter,
            transfers,
            epoch: 0,
            log_start: 1,
            stats: Mutex::default(),
            metrics: None,
            copying: Arc::default(),
            peer: None,
        }
    }

    /// Names where the channel leads, so a refused certificate is reported
    /// as one (which side refused, and why) rather than a broken connection.
    pub fn with_peer(mut self, peer: Peer) -> Self {
        self.peer = Some(peer);
        self
    }

    /// A failed call, told apart: a certificate refused by either side
    /// becomes [`ShipError::Tls`], which says which side and why.
    async fn explain(&self, e: ShipError) -> ShipError {
        let ShipError::Rpc(status) = &e else { return e };
        use prost::Message;
        if let Ok(r) = super::proto::Refusal::decode(status.details())
            && r.kind() == super::proto::RefusalKind::StaleEpoch
        {
            return ShipError::StaleEpoch {
                current: r.current_epoch,
                mine: self.epoch,
                message: status.message().to_owned(),
            };
        }
        let server = self.peer.as_ref().map_or("the replica server", |p| p.server_name.as_str());
        if let Some(f) = super::tls::tls_failure(status) {
            return ShipError::Tls(f.explain(server));
        }
        // A connection broken with no reason given: in TLS 1.3 the server's
        // refusal of our certificate arrives after the handshake, and the
        // RPC layer sees only a closed stream. Ask once more by hand.
        let transport =
            matches!(status.code(), tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::Unavailable)
                && std::error::Error::source(status).is_some();
        if let (true, Some(p)) = (transport, &self.peer)
            && let Some(f) = super::tls::diagnose(&p.addr, &p.server_name, &p.tls).await
        {
            return ShipError::Tls(f.explain(server));
        }
        e
    }

    /// Also reports to these Prometheus metrics.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Sends under this epoch: that of the promotion that made this the
    /// VM's primary (0: never failed over).
    pub fn with_epoch(mut self, epoch: u64) -> Self {
        self.epoch = epoch;
        self
    }

    /// Where this epoch's log starts: a replica that has not yet received
    /// anything of this epoch must hold exactly what came before it.
    pub fn with_log_start(mut self, first_seq: u64) -> Self {
        self.log_start = first_seq;
        self
    }

    fn labels(&self) -> [&str; 2] {
        [self.vm_id.as_str(), self.disk_id.as_str()]
    }

    /// The epoch this shipper sends under.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn vm_id(&self) -> &str {
        &self.vm_id
    }

    pub fn disk_id(&self) -> &str {
        &self.disk_id
    }

    /// The protected disk shipped; `None` for a forwarding shipper.
    pub fn disk(&self) -> Option<&Arc<ProtectedDisk>> {
        match &self.source {
            Source::Protected(d) => Some(d),
            Source::Forward(_) => None,
        }
    }

    /// Bytes logged (or kept, when forwarding) and not yet acknowledged.
    pub fn pending_bytes(&self) -> u64 {
        self.source.pending_bytes()
    }

    /// The first sequence not yet in the shipped disk's image.
    pub fn next_seq(&self) -> u64 {
        self.source.next_seq()
    }

    pub fn disk_size(&self) -> u64 {
        self.source.size()
    }

    /// The initial copy in flight: (bytes sent, bytes to send); (0, 0) when none runs.
    pub fn copy_progress(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.copying.0.load(Relaxed), self.copying.1.load(Relaxed))
    }

    pub fn stats(&self) -> ShipStats {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn disk_ref(&self) -> DiskRef {
        DiskRef { vm_id: self.vm_id.clone(), disk_id: self.disk_id.clone() }
    }

    /// Tells the replica that replication of this disk is removed (it keeps
    /// its disk and accepts nothing more).
    pub async fn remove_remote(&self) -> Result<bool, ShipError> {
        Ok(self.client.clone().remove(self.disk_ref()).await?.into_inner().removed)
    }

    /// Tells the replica the primary stopped writing after `last_seq`.
    pub async fn finalize(&self, last_seq: u64) -> Result<(), ShipError> {
        let req = super::proto::FinalizeRequest { disk: Some(self.disk_ref()), last_seq };
        self.client.clone().finalize(req).await?;
        Ok(())
    }

    /// Brings the replica up to date with every sealed segment; returns the
    /// sequence the replica is durable through.
    pub async fn sync_once(&self) -> Result<u64, ShipError> {
        let result = match self.sync_inner().await {
            Err(e) => Err(self.explain(e).await),
            ok => ok,
        };
        if let Err(ShipError::Tls(why)) = &result {
            tracing::warn!(vm = %self.vm_id, disk = %self.disk_id, "{why}");
        }
        let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let [vm, disk] = self.labels();
        match &result {
            Ok(through) => {
                s.successful_cycles += 1;
                s.durable_through = *through;
                s.last_replication = Some(SystemTime::now());
                s.last_error = None;
                s.last_error_code = None;
                if let Some(m) = &self.metrics {
                    m.cycles.with_label_values(&[vm, disk, "successful"]).inc();
                    let now = SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                    m.last_replication.with_label_values(&[vm, disk]).set(now.as_secs_f64());
                }
            }
            Err(e) => {
                s.errors += 1;
                s.missed_cycles += 1;
                s.last_error = Some(e.to_string());
                s.last_error_code = Some(e.code());
                if let Some(m) = &self.metrics {
                    m.cycles.with_label_values(&[vm, disk, "missed"]).inc();
                }
            }
        }
        if let Some(m) = &self.metrics {
            m.pending_bytes.with_label_values(&[vm, disk]).set(self.source.pending_bytes() as i64);
        }
        result
    }

    async fn sync_inner(&self) -> Result<u64, ShipError> {
        let mut client = self.client.clone();
        let open = OpenRequest {
            disk: Some(self.disk_ref()),
            disk_size: self.source.size(),
            epoch: self.epoch,
            history: self.cfg.history,
            interval_seconds: self.cfg.interval_seconds,
        };
        let reply = client.open(open).await?.into_inner();
        let mut next = checked_next(reply.next_seq, "Open")?;
        if reply.needs_initial_copy || self.source.needs_copy() {
            next = checked_next(self.initial_copy().await?, "PushInitialCopy")?;
        } else {
            // Before anything is dropped as "already there": the replica's
            // sequence must be one of this log's. One that has seen nothing of
            // this epoch must stop exactly where this log starts, and none may
            // be ahead of what was logged here (either means it holds another
            // history, and acknowledging would delete writes it never got).
            let last_logged = self.source.next_seq() - 1;
            let foreign = reply.epoch < self.epoch && next != self.log_start;
            if foreign || next - 1 > last_logged {
                return Err(ShipError::Diverged {
                    replica_epoch: reply.epoch,
                    replica_next: next,
                    epoch: self.epoch,
                    log_start: self.log_start,
                    last_logged,
                });
            }
        }
        // What the replica already has is no longer needed here.
        self.source.acknowledge(next - 1)?;
        let mut through = next - 1;
        for seg in self.source.sealed()? {
            if seg.first_seq < next && seg.last_seq >= next {
                return Err(ShipError::ResyncRequired {
                    expected: next,
                    first: seg.first_seq,
                    last: seg.last_seq,
                });
            }
            let started = Instant::now();
            through = self.push(&seg).await?;
            self.source.acknowledge(through)?;
            let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
            s.segments_sent += 1;
            s.max_segment_bytes = s.max_segment_bytes.max(seg.bytes);
            let latency = started.elapsed();
            s.last_latency = latency;
            s.total_latency += latency;
            if let Some(m) = &self.metrics {
                let l = self.labels();
                m.segments_sent.with_label_values(&l).inc();
                m.transfer_seconds.with_label_values(&l).observe(latency.as_secs_f64());
                m.segment_bytes.with_label_values(&l).observe(seg.bytes as f64);
            }
        }
        Ok(through)
    }

    /// Streams `produce`'s chunks from a blocking reader thread.
    /// The producer returns the bytes it put on the wire.
    fn spawn_producer<T: Send + 'static>(
        &self,
        produce: impl FnOnce(&mpsc::Sender<T>) -> Result<u64, ShipError> + Send + 'static,
    ) -> (Chunks<T>, tokio::task::JoinHandle<Result<u64, ShipError>>) {
        let (tx, rx) = mpsc::channel(4);
        let handle = tokio::task::spawn_blocking(move || produce(&tx));
        (rx, handle)
    }

    /// Reads, compresses and rate-limits one chunk: `(data, compressed, raw_len)`.
    fn encode(raw: &mut [u8], compression: bool, limiter: &Option<Arc<RateLimiter>>) -> (Vec<u8>, bool, u32) {
        // Test hook: corrupt what is sent (the replica must notice).
        if failpoint::hit("ship.tamper-chunk").is_err() && !raw.is_empty() {
            raw[raw.len() / 2] ^= 0x20;
        }
        let raw_len = raw.len() as u32;
        let (data, compressed) = match compression.then(|| zstd::bulk::compress(raw, 1)) {
            Some(Ok(c)) if c.len() < raw.len() => (c, true),
            _ => (raw.to_vec(), false),
        };
        if let Some(l) = limiter {
            l.acquire_blocking(data.len());
        }
        (data, compressed, raw_len)
    }

    async fn push(&self, seg: &SealedSegment) -> Result<u64, ShipError> {
        let _permit = self.transfers.acquire().await.expect("the semaphore is never closed");
        let start = SegmentStart {
            disk: Some(self.disk_ref()),
            first_seq: seg.first_seq,
            last_seq: seg.last_seq,
            epoch: self.epoch,
            length: seg.bytes,
        };
        let (path, chunk, compression, limiter) =
            (seg.path.clone(), self.cfg.chunk_size, self.cfg.compression, self.limiter.clone());
        let (rx, producer) = self.spawn_producer(move |tx| {
            let read_err = |source| ShipError::Read { what: path.display().to_string(), source };
            let mut file = File::open(&path).map_err(read_err)?;
            let mut offset = 0u64;
            let mut wire = 0u64;
            let mut start = Some(start);
            let mut buf = vec![0u8; chunk];
            loop {
                let n = read_full(&mut file, &mut buf).map_err(read_err)?;
                if n == 0 {
                    return Ok(wire);
                }
                // Test hook: end the stream early, as a dropped connection would.
                if offset > 0 && failpoint::hit("ship.cut-stream").is_err() {
                    return Ok(wire);
                }
                let (data, compressed, raw_len) = Self::encode(&mut buf[..n], compression, &limiter);
                wire += data.len() as u64;
                let c = SegmentChunk { start: start.take(), offset, data, compressed, raw_len };
                if tx.blocking_send(c).is_err() {
                    return Ok(wire); // the call ended; its status says why
                }
                offset += n as u64;
            }
        });
        let call = self.client.clone().push_segment(ReceiverStream::new(rx)).await;
        let wire = producer
            .await
            .map_err(|e| ShipError::Read { what: "segment reader".into(), source: io::Error::other(e) })??;
        let ack = call?.into_inner();
        let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        s.raw_bytes_sent += seg.bytes;
        s.wire_bytes_sent += wire;
        if let Some(m) = &self.metrics {
            let [vm, disk] = self.labels();
            m.bytes_sent.with_label_values(&[vm, disk, "raw"]).inc_by(seg.bytes);
            m.bytes_sent.with_label_values(&[vm, disk, "wire"]).inc_by(wire);
        }
        Ok(ack.durable_through)
    }

    /// Sends every non-zero block of the disk; returns the sequence replication
    /// resumes at. Writes go on meanwhile and are shipped after.
    async fn initial_copy(&self) -> Result<u64, ShipError> {
        let _permit = self.transfers.acquire().await.expect("the semaphore is never closed");
        // Everything logged before the cut is in the image, so the copy covers
        // it; replication resumes at the cut. (Reading next_seq after sealing
        // instead would race with writes landing in the new segment.)
        // Read before the cut: a new copy arriving at a forwarding source
        // during this one leaves the generation behind, so it is sent again.
        let generation = self.source.copy_generation();
        let next_seq = self.source.cut()?;
        let start = CopyStart {
            disk: Some(self.disk_ref()),
            disk_size: self.source.size(),
            epoch: self.epoch,
            next_seq,
        };
        let (path, size, chunk, compression, limiter, source, copying) = (
            self.source.image_path(),
            self.source.size(),
            self.cfg.chunk_size,
            self.cfg.compression,
            self.limiter.clone(),
            self.source.clone(),
            self.copying.clone(),
        );
        let (rx, producer) = self.spawn_producer(move |tx| {
            let read_err = |source| ShipError::Read { what: path.display().to_string(), source };
            let file = File::open(&path).map_err(read_err)?;
            let mut start = Some(start);
            let mut buf = vec![0u8; chunk];
            // Runs of non-zero 64 KiB blocks, up to a chunk each: holes and zero
            // blocks inside allocated extents are not sent.
            const BLOCK: u64 = 64 << 10;
            let mut wire = 0u64;
            let extents = data_extents(&file, size).map_err(read_err)?;
            use std::sync::atomic::Ordering::Relaxed;
            copying.0.store(0, Relaxed);
            copying.1.store(extents.iter().map(|(_, len)| len).sum(), Relaxed);
            let mut send = |off: u64, data: &mut [u8]| {
                copying.0.fetch_add(data.len() as u64, Relaxed);
                let (data, compressed, raw_len) = Self::encode(data, compression, &limiter);
                wire += data.len() as u64;
                let c = CopyChunk {
                    start: start.take(),
                    offset: off,
                    data,
                    compressed,
                    raw_len,
                    ..Default::default()
                };
                tx.blocking_send(c).is_ok()
            };
            let mut run_start = 0u64;
            let mut run_len = 0usize;
            for (ext_off, ext_len) in extents {
                let mut off = ext_off;
                while off < ext_off + ext_len {
                    let n = (ext_off + ext_len - off).min(BLOCK) as usize;
                    let at = if run_len > 0 && run_start + run_len as u64 == off && run_len + n <= chunk {
                        run_len
                    } else {
                        if run_len > 0 && !send(run_start, &mut buf[..run_len]) {
                            return Ok(0);
                        }
                        run_start = off;
                        run_len = 0;
                        0
                    };
                    file.read_exact_at(&mut buf[at..at + n], off).map_err(read_err)?;
                    if buf[at..at + n].iter().any(|&b| b != 0) {
                        run_len = at + n;
                    } else if run_len > 0 {
                        if !send(run_start, &mut buf[..run_len]) {
                            return Ok(0);
                        }
                        run_len = 0;
                    }
                    off += n as u64;
                }
            }
            if run_len > 0 && !send(run_start, &mut buf[..run_len]) {
                return Ok(0);
            }
            let last = CopyChunk {
                start: start.take(),
                last: true,
                consistent_from: source.next_seq(),
                offset: size,
                ..Default::default()
            };
            let _ = tx.blocking_send(last);
            Ok(wire)
        });
        let call = self.client.clone().push_initial_copy(ReceiverStream::new(rx)).await;
        let produced = producer.await;
        self.copying.0.store(0, std::sync::atomic::Ordering::Relaxed);
        self.copying.1.store(0, std::sync::atomic::Ordering::Relaxed);
        let wire = produced
            .map_err(|e| ShipError::Read { what: "image reader".into(), source: io::Error::other(e) })??;
        let ack = call?.into_inner();
        self.source.copied(generation)?;
        let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        s.initial_copy_bytes += ack.bytes_received;
        s.wire_bytes_sent += wire;
        if let Some(m) = &self.metrics {
            let [vm, disk] = self.labels();
            m.initial_copy_bytes.with_label_values(&[vm, disk]).inc_by(ack.bytes_received);
            m.bytes_sent.with_label_values(&[vm, disk, "wire"]).inc_by(wire);
        }
        Ok(ack.next_seq)
    }
}

/// A replica's "next sequence" answer, checked before any arithmetic on it.
fn checked_next(value: u64, call: &'static str) -> Result<u64, ShipError> {
    if value == 0 || value > crate::log::format::MAX_SEQ + 1 {
        return Err(ShipError::BadReply { call, value });
    }
    Ok(value)
}

fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}
