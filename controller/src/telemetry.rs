//! The controller's Prometheus metrics and its `/metrics`, `/healthz` and
//! `/readyz` endpoint. Labels: the kind reconciled and an error class (bounded).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder};

pub struct Metrics {
    pub registry: Registry,
    pub reconciles: IntCounterVec,
    pub errors: IntCounterVec,
    pub duration: HistogramVec,
    /// Set once the CRDs were found and the controllers started.
    pub ready: AtomicBool,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let opts = |name: &str, help: &str| Opts::new(name, help).namespace("vmreplica_controller");
        let m = Self {
            registry: Registry::new(),
            reconciles: IntCounterVec::new(opts("reconciles_total", "Reconciliations run"), &["kind"])
                .expect("valid metric"),
            errors: IntCounterVec::new(
                opts("reconcile_errors_total", "Reconciliations that failed, by class"),
                &["kind", "class"],
            )
            .expect("valid metric"),
            duration: HistogramVec::new(
                HistogramOpts::new("reconcile_duration_seconds", "Time a reconciliation took")
                    .namespace("vmreplica_controller")
                    .buckets(prometheus::exponential_buckets(0.001, 2.0, 15).expect("valid buckets")),
                &["kind"],
            )
            .expect("valid metric"),
            ready: AtomicBool::new(false),
        };
        m.registry.register(Box::new(m.reconciles.clone())).expect("unique");
        m.registry.register(Box::new(m.errors.clone())).expect("unique");
        m.registry.register(Box::new(m.duration.clone())).expect("unique");
        Arc::new(m)
    }

    /// Records one reconciliation of `kind` that started at `started`.
    pub fn observe(&self, kind: &str, started: Instant, error_class: Option<&str>) {
        self.reconciles.with_label_values(&[kind]).inc();
        self.duration.with_label_values(&[kind]).observe(started.elapsed().as_secs_f64());
        if let Some(class) = error_class {
            self.errors.with_label_values(&[kind, class]).inc();
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("encoding to memory");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

/// Serves `/metrics`, `/healthz` (the process answers) and `/readyz` (503 until
/// the controllers run) until `shutdown` completes.
pub async fn serve(
    metrics: Arc<Metrics>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::{Router, http::StatusCode, routing::get};
    let (m1, m2) = (metrics.clone(), metrics);
    let app = Router::new()
        .route("/metrics", get(move || std::future::ready(m1.render())))
        .route("/healthz", get(|| std::future::ready("ok")))
        .route(
            "/readyz",
            get(move || {
                std::future::ready(if m2.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ok")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "controllers not started")
                })
            }),
        );
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}
