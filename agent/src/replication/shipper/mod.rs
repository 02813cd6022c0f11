//! The primary side: ships one disk's sealed segments (and first its initial
//! copy) to the replica, deleting each segment only once the replica says it
//! is durable. The same shipper forwards a replica's applied segments to an
//! extended replica ([`source::Source`]).
//!
//! ```text
//!  sync_once(): Open ─▶ [initial copy | resync] ─▶ drop what the replica has ─▶ push the rest, in order
//!  push:   reader thread: read 1 MiB ─▶ zstd ─▶ bandwidth limit ─▶ channel ─▶ gRPC stream (transfer.rs)
//!  resync: hash tree offered top-down, differing leaves sent (resync.rs), when the log cannot
//!          bring the replica up to date and the VM's policy allows it now (policy.rs)
//! ```

pub mod autocompress;
mod error;
mod media;
pub mod policy;
pub mod resync;
pub mod source;
mod transfer;
pub mod verify;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

pub use error::ShipError;
pub use source::Source;
use tonic::transport::Channel;
pub use vmreplica_api::tls::Peer;
use vmreplica_api::{
    control::FailureKind,
    replication::{
        DiskRef, FinalizeRequest, OpenRequest, RecoveryHistory, replication_client::ReplicationClient,
    },
};

use crate::{disk::ProtectedDisk, limits::Limits, metrics::Metrics, replica::ReplicaDisk};
pub use policy::ResyncPolicy;
pub use resync::{ResyncProgress, ResyncSummary};
pub use verify::VerifySummary;

/// A recovery history for the replica to keep: every point within the
/// window, then one per hour for `hourly_points` hours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct History {
    pub window_seconds: u64,
    pub hourly_points: u32,
}

/// How a disk is shipped.
#[derive(Clone, Debug)]
pub struct ShipperConfig {
    pub compression: bool,
    pub chunk_size: usize,
    /// Waits between failed attempts; the last repeats.
    pub backoff: Vec<Duration>,
    /// The VM's recovery history for the replica; `None`: the replica site's.
    pub history: Option<History>,
    /// The replication interval, told to the replica (0: not said).
    pub interval_seconds: u32,
    /// How a replica without a copy gets one.
    pub initial: InitialMethod,
}

/// How a replica without a copy gets one (`spec.initialReplication.method`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum InitialMethod {
    /// Sent over the replication connection.
    #[default]
    Network,
    /// Exported to this directory here, imported at the replica site.
    ExternalMedia(std::path::PathBuf),
    /// The replica site imports an image it already holds; a resync follows.
    ExistingImage,
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
            initial: InitialMethod::Network,
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
    /// [`ShipError::kind`] of `last_error` (`Unspecified` when none).
    pub last_failure: FailureKind,
    pub last_replication: Option<SystemTime>,
    pub durable_through: u64,
    pub initial_copy_bytes: u64,
    /// The last resync that finished.
    pub last_resync: Option<ResyncSummary>,
    /// Why a resync is needed and not running (waiting for its window or a request).
    pub resync_waiting: Option<String>,
    /// The last verification that finished.
    pub last_verify: Option<VerifySummary>,
}

/// Ships one disk's log (a protected disk's, or a replica's applied
/// segments) to one replica.
pub struct Shipper {
    vm_id: String,
    disk_id: String,
    source: Source,
    client: ReplicationClient<Channel>,
    cfg: ShipperConfig,
    /// The agent's transfer slots and bandwidth, shared by all its transfers.
    limits: Arc<Limits>,
    epoch: u64,
    /// The first sequence this epoch's log holds (1 unless a promotion
    /// continued another log's numbering).
    log_start: u64,
    stats: Mutex<ShipStats>,
    metrics: Option<Arc<Metrics>>,
    /// The initial copy in flight: bytes sent so far and bytes to send (the
    /// image's allocated extents), both 0 when none runs.
    copying: Arc<(std::sync::atomic::AtomicU64, std::sync::atomic::AtomicU64)>,
    /// Whether chunks are compressed now (off for data that does not shrink).
    compress: Arc<autocompress::AutoCompress>,
    /// Where the channel leads (to diagnose TLS failures).
    peer: Option<Peer>,
    /// When a resync may run (the VM's spec), and the one running.
    policy: Mutex<ResyncPolicy>,
    resync: ResyncProgress,
}

impl Shipper {
    pub fn new(
        vm_id: &str,
        disk: Arc<ProtectedDisk>,
        channel: Channel,
        cfg: ShipperConfig,
        limits: Arc<Limits>,
    ) -> Self {
        let disk_id = disk.name().to_owned();
        Self::with_source(vm_id, &disk_id, Source::Protected(disk), channel, cfg, limits)
    }

    /// Extended replication: ships the segments `replica` applied (it keeps
    /// them from the first sync on) to another replica.
    pub fn forwarding(
        replica: Arc<ReplicaDisk>,
        channel: Channel,
        cfg: ShipperConfig,
        limits: Arc<Limits>,
    ) -> Self {
        let (vm_id, disk_id) = {
            let s = replica.state();
            (s.vm_id.clone(), s.disk_id.clone())
        };
        let epoch = replica.state().epoch;
        Self::with_source(&vm_id, &disk_id, Source::Forward(replica), channel, cfg, limits).with_epoch(epoch)
    }

    fn with_source(
        vm_id: &str,
        disk_id: &str,
        source: Source,
        channel: Channel,
        cfg: ShipperConfig,
        limits: Arc<Limits>,
    ) -> Self {
        let client = ReplicationClient::new(channel)
            .max_decoding_message_size(vmreplica_api::MAX_FRAME)
            .max_encoding_message_size(vmreplica_api::MAX_FRAME);
        Self {
            vm_id: vm_id.to_owned(),
            disk_id: disk_id.to_owned(),
            source,
            client,
            compress: Arc::new(autocompress::AutoCompress::new(cfg.compression)),
            cfg,
            limits,
            epoch: 0,
            log_start: 1,
            stats: Mutex::default(),
            metrics: None,
            copying: Arc::default(),
            peer: None,
            policy: Mutex::default(),
            resync: ResyncProgress::default(),
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
        if let Ok(r) = vmreplica_api::replication::Refusal::decode(status.details())
            && r.kind() == vmreplica_api::replication::RefusalKind::StaleEpoch
        {
            return ShipError::StaleEpoch {
                current: r.current_epoch,
                mine: self.epoch,
                message: status.message().to_owned(),
            };
        }
        let server = self.peer.as_ref().map_or("the replica server", |p| p.server_name.as_str());
        if let Some(f) = vmreplica_api::tls::tls_failure(status) {
            return ShipError::Tls(f.explain(server));
        }
        // A connection broken with no reason given: in TLS 1.3 the server's
        // refusal of our certificate arrives after the handshake, and the
        // RPC layer sees only a closed stream. Ask once more by hand.
        let transport =
            matches!(status.code(), tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::Unavailable)
                && std::error::Error::source(status).is_some();
        if let (true, Some(p)) = (transport, &self.peer)
            && let Some(f) = vmreplica_api::tls::diagnose(&p.addr, &p.server_name, &p.tls).await
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

    /// Sets when resyncs may run (and asks for one by id).
    pub fn set_resync_policy(&self, policy: ResyncPolicy) {
        *self.policy.lock().unwrap_or_else(|p| p.into_inner()) = policy;
    }

    /// The resync running now, if any.
    pub fn resync_progress(&self) -> Option<resync::ResyncNow> {
        self.resync.now()
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
        let req = FinalizeRequest { disk: Some(self.disk_ref()), last_seq };
        self.client.clone().finalize(req).await?;
        Ok(())
    }

    /// Brings the replica up to date with every sealed segment; returns the
    /// sequence the replica is durable through.
    pub async fn sync_once(&self) -> Result<u64, ShipError> {
        let started = Instant::now();
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
                s.last_failure = FailureKind::Unspecified;
                if let Some(m) = &self.metrics {
                    m.cycles.with_label_values(&[vm, disk, "successful"]).inc();
                    let now = SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                    m.last_replication.with_label_values(&[vm, disk]).set(now.as_secs_f64());
                }
            }
            Err(e) => {
                s.errors += 1;
                // Every interval the failed attempt spanned went without
                // replication (a partition stalls an attempt for seconds:
                // counted once, it would hide the outage from the window's
                // missed-cycle rule).
                let missed = missed_by_failure(started.elapsed(), self.cfg.interval_seconds);
                s.missed_cycles += missed;
                s.last_error = Some(e.to_string());
                s.last_failure = e.kind();
                if let Some(m) = &self.metrics {
                    m.cycles.with_label_values(&[vm, disk, "missed"]).inc_by(missed);
                }
            }
        }
        if let Some(m) = &self.metrics {
            m.pending_bytes.with_label_values(&[vm, disk]).set(self.source.pending_bytes() as i64);
            m.compression_active.with_label_values(&[vm, disk]).set(i64::from(self.compress.active()));
            m.disk_faulted.with_label_values(&[vm, disk]).set(i64::from(self.source.faulted()));
        }
        result
    }

    async fn sync_inner(&self) -> Result<u64, ShipError> {
        let mut client = self.client.clone();
        let open = OpenRequest {
            disk: Some(self.disk_ref()),
            disk_size: self.source.size(),
            epoch: self.epoch,
            history: self.cfg.history.map(|h| RecoveryHistory {
                window_seconds: h.window_seconds,
                hourly_points: h.hourly_points,
            }),
            interval_seconds: self.cfg.interval_seconds,
            import_awaited: self.imported_copy().is_some(),
        };
        let reply = client.open(open).await?.into_inner();
        let mut next = checked_next(reply.next_seq, "Open")?;
        if let Some(method) = self.imported_copy().filter(|_| reply.needs_initial_copy) {
            return Err(self.awaiting_import(method).await?);
        } else if reply.needs_initial_copy || self.source.needs_copy() {
            next = checked_next(self.initial_copy().await?, "PushInitialCopy")?;
        } else if let Some(why) = self.resync_reason(&reply, next)? {
            next = checked_next(self.resync_if_allowed(why, next).await?, "Resync")?;
        }
        self.set_waiting(None);
        // What the replica already has is no longer needed here.
        self.source.acknowledge(next - 1)?;
        let mut through = next - 1;
        for seg in self.source.sealed()? {
            let started = Instant::now();
            through = match self.push(&seg).await {
                // Refused as damaged: sent again unless it is damaged here.
                Err(ShipError::Rpc(s)) if s.code() == tonic::Code::DataLoss => {
                    self.source.check_refused(&seg)?;
                    return Err(ShipError::Rpc(s));
                }
                r => r?,
            };
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
        self.verify_if_requested(through).await?;
        Ok(through)
    }
}

/// The replication cycles a failed attempt that took `took` missed: its own
/// and every further interval it spanned (one when the interval is not set).
fn missed_by_failure(took: Duration, interval_seconds: u32) -> u64 {
    match interval_seconds {
        0 => 1,
        i => 1 + took.as_secs() / u64::from(i),
    }
}

/// A replica's "next sequence" answer, checked before any arithmetic on it.
fn checked_next(value: u64, call: &'static str) -> Result<u64, ShipError> {
    if value == 0 || value > crate::log::format::MAX_SEQ + 1 {
        return Err(ShipError::BadReply { call, value });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_attempt_misses_every_interval_it_spanned() {
        assert_eq!(missed_by_failure(Duration::from_millis(300), 1), 1);
        assert_eq!(missed_by_failure(Duration::from_millis(10_400), 1), 11, "stalled 10 s by a partition");
        assert_eq!(missed_by_failure(Duration::from_secs(29), 30), 1);
        assert_eq!(missed_by_failure(Duration::from_secs(95), 30), 4);
        assert_eq!(missed_by_failure(Duration::from_secs(95), 0), 1, "no interval: the attempt alone");
    }
}
