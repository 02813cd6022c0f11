//! `vmreplica-controller`: the cluster-side half of vmreplica.
use std::{path::PathBuf, process::ExitCode, sync::Arc};

use clap::Parser;
use tracing_subscriber::EnvFilter;
use vmreplica_agent::replication::tls::TlsMaterial;
use vmreplica_controller::{preflight, site};

/// Reconciles vmreplica's resources in the cluster of the current kubeconfig
/// (or the in-cluster service account).
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Namespace of the agents' Leases (the controller's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "vmreplica-system")]
    namespace: String,
    /// Directory with tls.crt, tls.key and ca.crt: the controller's client
    /// certificate for the agents' control APIs.
    #[arg(long)]
    tls_dir: PathBuf,
    /// Serve /metrics, /healthz and /readyz on this address.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics: std::net::SocketAddr,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let tls = match TlsMaterial::from_dir(&args.tls_dir) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("vmreplica-controller: {e}");
            return ExitCode::FAILURE;
        }
    };
    let metrics = vmreplica_controller::telemetry::Metrics::new();
    match tokio::net::TcpListener::bind(args.metrics).await {
        Ok(l) => {
            tokio::spawn(vmreplica_controller::telemetry::serve(metrics.clone(), l, std::future::pending()));
        }
        Err(e) => {
            eprintln!("vmreplica-controller: cannot listen on {}: {e}", args.metrics);
            return ExitCode::FAILURE;
        }
    }
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmreplica-controller: no usable kubeconfig or in-cluster config: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = preflight::check_crds(&client).await {
        eprintln!("vmreplica-controller: {e}");
        return ExitCode::FAILURE;
    }
    // So far the ReplicationServer controller runs (it configures the agents
    // from ReplicationServers and AuthorizationEntries); the VMReplication and
    // RecoveryPlan controllers come next.
    tracing::info!(namespace = %args.namespace, "running the ReplicationServer controller");
    let ctx = Arc::new(site::Context {
        client,
        agents_namespace: args.namespace,
        tls,
        now: k8s_openapi::jiff::Timestamp::now,
        metrics: metrics.clone(),
    });
    metrics.ready.store(true, std::sync::atomic::Ordering::Relaxed);
    site::run(ctx, async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    })
    .await;
    ExitCode::SUCCESS
}
