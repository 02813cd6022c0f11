//! `vmreplica-controller`: the cluster-side half of vmreplica.
use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use clap::{ArgAction, Parser};
use tracing_subscriber::EnvFilter;
use vmreplica_api::tls::LiveTls;
use vmreplica_controller::{
    context::{Context, Shared},
    leader::Election,
    plan, preflight, replica_site, site,
    telemetry::Metrics,
    vmreplication,
};

/// Reconciles vmreplica's resources in the cluster of the current kubeconfig
/// (or the in-cluster service account).
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Namespace of the agents' Leases and of the leader Lease (the controller's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "vmreplica-system")]
    namespace: String,
    /// Directory with tls.crt, tls.key and ca.crt: the controller's client
    /// certificate for the agents' control APIs. Re-read every 10 s, so a
    /// renewed certificate needs no restart.
    #[arg(long)]
    tls_dir: PathBuf,
    /// Serve /metrics, /healthz and /readyz on this address.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics: std::net::SocketAddr,
    /// Seconds between readings of a steadily replicating VM's agent; its
    /// status is written at most this often (state and health changes at once).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    poll_seconds: u64,
    /// Reconcile the namespaced kinds of this namespace only. The cluster-scoped
    /// kinds (ReplicationServer, AuthorizationEntry) are then left to a
    /// controller that watches all namespaces.
    #[arg(long)]
    watch_namespace: Option<String>,
    /// Act only while holding the leader Lease, so several replicas can run.
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    leader_elect: bool,
    /// Seconds a leader's Lease lasts without renewal (a standby takes over after it).
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(2..=300))]
    leader_lease_seconds: u64,
    /// This replica's identity in the leader Lease (default: POD_NAME, else host and pid).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
}

/// Completes on SIGTERM or SIGINT.
async fn terminated() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("vmreplica-controller: {msg}");
    ExitCode::FAILURE
}

/// What the controllers need before they start: the certificate, metrics
/// served, a client, and the CRDs checked. The error says what is missing.
async fn prepare(args: &Args) -> Result<(Arc<LiveTls>, Arc<Metrics>, kube::Client), String> {
    let tls =
        LiveTls::from_dir(&args.tls_dir).map_err(|e| format!("--tls-dir {}: {e}", args.tls_dir.display()))?;
    tls.watch_dir(args.tls_dir.clone(), Duration::from_secs(10), |_| {});
    let metrics = Metrics::new();
    let listener = tokio::net::TcpListener::bind(args.metrics)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.metrics))?;
    tokio::spawn(vmreplica_controller::telemetry::serve(metrics.clone(), listener, std::future::pending()));
    let client = kube::Client::try_default()
        .await
        .map_err(|e| format!("no usable kubeconfig or in-cluster config: {e}"))?;
    preflight::check_crds(&client).await.map_err(|e| e.to_string())?;
    Ok((tls, metrics, client))
}

/// The leader election this replica takes part in, unless disabled.
fn election(args: &Args, client: &kube::Client) -> Option<Election> {
    args.leader_elect.then(|| {
        let identity = args.identity.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            format!("{}-{}", host.trim(), std::process::id())
        });
        let lease = Duration::from_secs(args.leader_lease_seconds);
        Election::new(client.clone(), &args.namespace, "vmreplica-controller", &identity, lease)
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal, not in a pod's log.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let (tls, metrics, client) = match prepare(&args).await {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    // A standby is ready too: it is healthy and waiting (the leader gauge says who acts).
    metrics.ready.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut election = election(&args, &client);
    if let Some(e) = election.as_mut() {
        tokio::select! {
            _ = e.acquire() => {}
            _ = terminated() => return ExitCode::SUCCESS,
        }
    }
    metrics.leader.set(1);
    let ctx = Arc::new(Shared {
        client,
        agents_namespace: args.namespace.clone(),
        tls,
        now: k8s_openapi::jiff::Timestamp::now,
        metrics: metrics.clone(),
    });
    run(&args, ctx, election).await
}

/// Runs every controller until SIGTERM (or the leader Lease is lost).
async fn run(args: &Args, ctx: Arc<Shared>, mut election: Option<Election>) -> ExitCode {
    let vm_ctx =
        Context::new(ctx.clone(), Duration::from_secs(args.poll_seconds), args.watch_namespace.clone());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let on_stop = || {
        let mut s = stopped.clone();
        async move {
            let _ = s.changed().await;
        }
    };
    let cluster_scoped = args.watch_namespace.is_none();
    tracing::info!(namespace = %args.namespace, watch = ?args.watch_namespace, cluster_scoped, "running the controllers");
    let sites = {
        let ctx = ctx.clone();
        let stop = on_stop();
        async move {
            if cluster_scoped {
                site::run(ctx, stop).await
            }
        }
    };
    let controllers = futures::future::join4(
        sites,
        vmreplication::run(vm_ctx.clone(), on_stop()),
        replica_site::run(vm_ctx, on_stop()),
        plan::run(ctx.clone(), args.watch_namespace.clone(), on_stop()),
    );
    tokio::pin!(controllers);
    {
        let leadership = async {
            match election.as_mut() {
                Some(e) => e.hold().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut controllers => return ExitCode::SUCCESS,
            _ = leadership => {
                // Another replica may act from now on: stop at once, as client-go does.
                return fail("lost the leader lease; exiting so a fresh start competes again");
            }
            _ = terminated() => {}
        }
    }
    let _ = stop.send(true);
    controllers.await;
    if let Some(e) = &election {
        e.release().await;
    }
    ExitCode::SUCCESS
}
