//! The controller's Prometheus metrics and its `/metrics`, `/healthz` and
//! `/readyz` endpoint. Labels: the kind reconciled and an error class (bounded).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// What the controller last saw of one VM, for its gauges.
pub struct VmReport<'a> {
    pub vm: &'a str,
    pub state: &'a str,
    pub health: &'a str,
    pub health_level: i64,
    pub bytes_shipped: u64,
    pub lag_seconds: Option<f64>,
}

pub struct Metrics {
    pub registry: Registry,
    pub reconciles: IntCounterVec,
    pub errors: IntCounterVec,
    pub duration: HistogramVec,
    /// 1 for each VM's current state and health (`vm`, `state`, `health`).
    pub vm_state: IntGaugeVec,
    /// Health per VM: 0 Normal, 1 Warning, 2 Critical.
    pub vm_health: IntGaugeVec,
    /// Log bytes the primary agent shipped for the VM.
    pub vm_bytes_shipped: IntGaugeVec,
    /// Seconds since the VM's last complete replication.
    pub vm_lag: GaugeVec,
    last_state: std::sync::Mutex<std::collections::HashMap<String, (String, String)>>,
    /// 1 while this replica holds the leader Lease (or runs without election).
    pub leader: prometheus::IntGauge,
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
            vm_state: IntGaugeVec::new(
                opts("vm_state", "1 for the current replication state and health of each VM"),
                &["vm", "state", "health"],
            )
            .expect("valid metric"),
            vm_health: IntGaugeVec::new(
                opts("vm_health", "Replication health per VM: 0 Normal, 1 Warning, 2 Critical"),
                &["vm"],
            )
            .expect("valid metric"),
            vm_bytes_shipped: IntGaugeVec::new(
                opts("vm_bytes_shipped", "Log bytes the primary agent shipped for the VM"),
                &["vm"],
            )
            .expect("valid metric"),
            vm_lag: GaugeVec::new(
                opts("vm_lag_seconds", "Seconds since the VM's last complete replication"),
                &["vm"],
            )
            .expect("valid metric"),
            last_state: Default::default(),
            leader: prometheus::IntGauge::with_opts(opts(
                "leader",
                "1 while this replica holds the leader Lease",
            ))
            .expect("valid metric"),
            ready: AtomicBool::new(false),
        };
        m.registry.register(Box::new(m.reconciles.clone())).expect("unique");
        m.registry.register(Box::new(m.errors.clone())).expect("unique");
        m.registry.register(Box::new(m.duration.clone())).expect("unique");
        m.registry.register(Box::new(m.vm_state.clone())).expect("unique");
        m.registry.register(Box::new(m.vm_health.clone())).expect("unique");
        m.registry.register(Box::new(m.vm_bytes_shipped.clone())).expect("unique");
        m.registry.register(Box::new(m.vm_lag.clone())).expect("unique");
        m.registry.register(Box::new(m.leader.clone())).expect("unique");
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

    /// Records what was seen of a VM, replacing its previous state series.
    pub fn vm(&self, r: VmReport<'_>) {
        let mut last = self.last_state.lock().unwrap_or_else(|p| p.into_inner());
        let now = (r.state.to_owned(), r.health.to_owned());
        if let Some((s, h)) = last.insert(r.vm.to_owned(), now.clone())
            && (s.as_str(), h.as_str()) != (r.state, r.health)
        {
            let _ = self.vm_state.remove_label_values(&[r.vm, &s, &h]);
        }
        self.vm_state.with_label_values(&[r.vm, r.state, r.health]).set(1);
        self.vm_health.with_label_values(&[r.vm]).set(r.health_level);
        self.vm_bytes_shipped.with_label_values(&[r.vm]).set(r.bytes_shipped as i64);
        match r.lag_seconds {
            Some(l) => self.vm_lag.with_label_values(&[r.vm]).set(l),
            None => {
                let _ = self.vm_lag.remove_label_values(&[r.vm]);
            }
        }
    }

    /// Drops a deleted VM's series.
    pub fn forget_vm(&self, vm: &str) {
        if let Some((s, h)) = self.last_state.lock().unwrap_or_else(|p| p.into_inner()).remove(vm) {
            let _ = self.vm_state.remove_label_values(&[vm, &s, &h]);
        }
        let _ = self.vm_health.remove_label_values(&[vm]);
        let _ = self.vm_bytes_shipped.remove_label_values(&[vm]);
        let _ = self.vm_lag.remove_label_values(&[vm]);
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
