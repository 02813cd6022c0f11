//! The agent's Prometheus metrics and its `/metrics` + `/healthz` endpoint.
//! Labels come from bounded sets: the protected VM and disk, a byte kind, a
//! cycle result, and a gRPC status code name for refusals.

use std::sync::{Arc, OnceLock};

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::limits::Limits;

/// Every metric the agent exports.
pub struct Metrics {
    pub registry: Registry,
    /// Log bytes not yet acknowledged by the replica.
    pub pending_bytes: IntGaugeVec,
    pub segments_sent: IntCounterVec,
    /// `kind`: `raw` (segment bytes) or `wire` (after compression).
    pub bytes_sent: IntCounterVec,
    /// `result`: `successful` or `missed`.
    pub cycles: IntCounterVec,
    pub transfer_seconds: HistogramVec,
    pub segment_bytes: HistogramVec,
    pub last_replication: GaugeVec,
    pub initial_copy_bytes: IntCounterVec,
    /// Replica side: the sequence applied through, and points kept.
    pub replica_applied: IntGaugeVec,
    pub replica_points: IntGaugeVec,
    /// Bytes the last verification found differing (spec.verify; 0 expected).
    pub verify_differing: IntGaugeVec,
    /// 1 while a disk's shipments are compressed; 0 when compression is off
    /// or turned itself off for data that does not shrink.
    pub compression_active: IntGaugeVec,
    /// 1 while a protected disk refuses writes after an I/O error.
    pub disk_faulted: IntGaugeVec,
    /// Replica side: requests refused, by gRPC code.
    pub refused: IntCounterVec,
    /// Replica side: files a scrub found damaged at rest.
    pub scrub_damaged: IntCounterVec,
    /// Replica side: bytes received on the wire (compressed as sent).
    pub received_bytes: IntCounterVec,
    /// The agent's transfer slots and bandwidth limit, read when scraped.
    limits: OnceLock<Arc<Limits>>,
    transfers: IntGaugeVec,
    bandwidth_limit: IntGauge,
}

fn labels(help: &str, name: &str) -> Opts {
    Opts::new(name, help).namespace("vmreplica_agent")
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let vd = &["vm", "disk"];
        let m = Self {
            registry: Registry::new(),
            pending_bytes: IntGaugeVec::new(
                labels("Log bytes not yet acknowledged by the replica", "pending_bytes"),
                vd,
            )
            .expect("valid metric"),
            segments_sent: IntCounterVec::new(
                labels("Segments the replica acknowledged", "segments_sent_total"),
                vd,
            )
            .expect("valid metric"),
            bytes_sent: IntCounterVec::new(
                labels("Segment bytes shipped: raw, and on the wire after compression", "bytes_sent_total"),
                &["vm", "disk", "kind"],
            )
            .expect("valid metric"),
            cycles: IntCounterVec::new(
                labels("Replication cycles, successful or missed", "replication_cycles_total"),
                &["vm", "disk", "result"],
            )
            .expect("valid metric"),
            transfer_seconds: HistogramVec::new(
                HistogramOpts::new("transfer_seconds", "Time to ship a segment and have it acknowledged")
                    .namespace("vmreplica_agent")
                    .buckets(prometheus::exponential_buckets(0.005, 2.0, 14).expect("valid buckets")),
                vd,
            )
            .expect("valid metric"),
            segment_bytes: HistogramVec::new(
                HistogramOpts::new("segment_bytes", "Size of shipped log segments")
                    .namespace("vmreplica_agent")
                    .buckets(prometheus::exponential_buckets(4096.0, 4.0, 12).expect("valid buckets")),
                vd,
            )
            .expect("valid metric"),
            last_replication: GaugeVec::new(
                labels(
                    "Unix time of the last successful replication cycle",
                    "last_replication_timestamp_seconds",
                ),
                vd,
            )
            .expect("valid metric"),
            initial_copy_bytes: IntCounterVec::new(
                labels("Bytes sent by initial copies (zero blocks are not sent)", "initial_copy_bytes_total"),
                vd,
            )
            .expect("valid metric"),
            replica_applied: IntGaugeVec::new(
                labels("Sequence the replica has applied through", "replica_applied_sequence"),
                vd,
            )
            .expect("valid metric"),
            replica_points: IntGaugeVec::new(
                labels("Recovery points kept on the replica", "replica_recovery_points"),
                vd,
            )
            .expect("valid metric"),
            compression_active: IntGaugeVec::new(
                labels(
                    "1 while shipments are compressed, 0 when off (or off by itself: the data does not shrink)",
                    "compression_active",
                ),
                vd,
            )
            .expect("valid metric"),
            disk_faulted: IntGaugeVec::new(
                labels(
                    "1 while a protected disk refuses writes: an I/O error left its log or image in doubt \
                     (restart the agent once the storage is repaired)",
                    "disk_faulted",
                ),
                vd,
            )
            .expect("valid metric"),
            verify_differing: IntGaugeVec::new(
                labels(
                    "Bytes the last verification found to differ between primary and replica (0 expected)",
                    "verify_differing_bytes",
                ),
                vd,
            )
            .expect("valid metric"),
            refused: IntCounterVec::new(
                labels("Replication requests refused, by gRPC code", "refused_requests_total"),
                &["code"],
            )
            .expect("valid metric"),
            scrub_damaged: IntCounterVec::new(
                labels("Stored segments and undo files a scrub found damaged at rest", "scrub_damaged_files_total"),
                &["vm", "disk"],
            )
            .expect("valid metric"),
            received_bytes: IntCounterVec::new(
                labels("Bytes the replica received on the wire, as sent (compressed)", "received_bytes_total"),
                vd,
            )
            .expect("valid metric"),
            limits: OnceLock::new(),
            transfers: IntGaugeVec::new(
                labels(
                    "Transfer slots, inbound and outbound together: the limit, those in use, and the most in use \
                     at once since the limit was set",
                    "transfers",
                ),
                &["slots"],
            )
            .expect("valid metric"),
            bandwidth_limit: IntGauge::with_opts(labels(
                "Bandwidth limit for all replication traffic in bytes per second (0: unlimited)",
                "bandwidth_limit_bytes_per_second",
            ))
            .expect("valid metric"),
        };
        m.register();
        Arc::new(m)
    }

    /// Also reports these limits (what a ReplicationServer set is in force).
    pub fn set_limits(&self, limits: Arc<Limits>) {
        let _ = self.limits.set(limits);
    }

    fn register(&self) {
        let r = &self.registry;
        let all: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(self.pending_bytes.clone()),
            Box::new(self.scrub_damaged.clone()),
            Box::new(self.segments_sent.clone()),
            Box::new(self.bytes_sent.clone()),
            Box::new(self.cycles.clone()),
            Box::new(self.transfer_seconds.clone()),
            Box::new(self.segment_bytes.clone()),
            Box::new(self.last_replication.clone()),
            Box::new(self.initial_copy_bytes.clone()),
            Box::new(self.replica_applied.clone()),
            Box::new(self.replica_points.clone()),
            Box::new(self.verify_differing.clone()),
            Box::new(self.compression_active.clone()),
            Box::new(self.disk_faulted.clone()),
            Box::new(self.refused.clone()),
            Box::new(self.received_bytes.clone()),
            Box::new(self.transfers.clone()),
            Box::new(self.bandwidth_limit.clone()),
        ];
        for c in all {
            r.register(c).expect("metric names are unique");
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        if let Some(l) = self.limits.get() {
            let s = l.transfers.slots();
            for (which, n) in [("max", s.max), ("active", s.active), ("peak", s.peak)] {
                self.transfers.with_label_values(&[which]).set(i64::try_from(n).unwrap_or(i64::MAX));
            }
            self.bandwidth_limit.set(i64::try_from(l.bandwidth.rate()).unwrap_or(i64::MAX));
        }
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("encoding to memory");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown` completes.
pub async fn serve(
    metrics: Arc<Metrics>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::{Router, routing::get};
    let app = Router::new()
        .route("/metrics", get(move || std::future::ready(metrics.render())))
        .route("/healthz", get(|| std::future::ready("ok")));
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}
