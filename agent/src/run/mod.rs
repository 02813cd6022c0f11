//! What the `vmreplica-agent` binary runs, wired from its parts: `serve` (a
//! node's agent: NBD exports and logs, the VMs the controller enables, and
//! with `--listen` the replica role too) and `receive` (a replica site's
//! replication server only). Fixed `--disk` images with `--replicate-to` let
//! an agent run without a controller.
//!
//! ```text
//!  serve:   disks ─▶ NbdServer ─┐        ┌─ Node (controller's VMs) ─┐
//!           metrics, limits ────┼─▶ Agent┤                           ├─▶ grpc::control, grpc::replication
//!           [--listen] ─────────┘        └─ ReplicaStore ────────────┘     + Lease
//! ```

pub mod announce;
pub mod options;

use std::{net::SocketAddr, sync::Arc, time::Duration};

pub use announce::Announce;
pub use options::{ReceiveOptions, ReplicateTo, ServeOptions};
use tokio::sync::{Semaphore, watch};
use vmreplica_api::tls::{Peer, TlsMaterial};

use crate::{
    agent::Agent,
    disk::ProtectedDisk,
    metrics::Metrics,
    nbd::NbdServer,
    node::{Node, NodeConfig},
    replica::store::ReplicaStore,
    replication::{
        authz::SiteConfig,
        cycle::VmReplication,
        shipper::{RateLimiter, Shipper},
    },
};

/// Completes on SIGTERM or SIGINT.
pub async fn terminated() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Starts the metrics endpoint when asked; it stops with the process.
async fn metrics_endpoint(addr: Option<SocketAddr>) -> Result<Arc<Metrics>, String> {
    let metrics = Metrics::new();
    if let Some(addr) = addr {
        let listener =
            tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        tracing::info!(addr = %listener.local_addr().map_err(|e| e.to_string())?, "serving metrics");
        let m = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(m, listener, terminated()).await {
                tracing::error!(error = %e, "metrics endpoint failed");
            }
        });
    }
    Ok(metrics)
}

/// Starts the control API on `addr` for the controller identities; it stops with the process.
async fn spawn_control(
    agent: Arc<Agent>,
    addr: SocketAddr,
    tls: TlsMaterial,
    controllers: Vec<String>,
) -> Result<(), String> {
    let listener =
        tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    tracing::info!(addr = %listener.local_addr().map_err(|e| e.to_string())?, "serving the control API");
    tokio::spawn(async move {
        if let Err(e) = crate::grpc::control::serve(agent, listener, &tls, controllers, terminated()).await {
            tracing::error!(error = %e, "control API failed");
        }
    });
    Ok(())
}

/// Starts the replication API on `addr`; it stops with the process.
async fn spawn_replication(agent: Arc<Agent>, addr: SocketAddr, tls: TlsMaterial) -> Result<(), String> {
    let listener =
        tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    tracing::info!(addr = %listener.local_addr().map_err(|e| e.to_string())?, "receiving replication");
    tokio::spawn(async move {
        if let Err(e) = crate::grpc::replication::serve(agent, listener, &tls, terminated()).await {
            tracing::error!(error = %e, "replication server failed");
        }
    });
    Ok(())
}

/// Opens the fixed `--disk` images and serves every export (those and the
/// controller's, added later) on the socket and loopback TCP asked for.
fn serve_nbd(opts: &ServeOptions) -> Result<(Vec<Arc<ProtectedDisk>>, Arc<NbdServer>), String> {
    if opts.socket.is_none() && opts.tcp.is_none() {
        return Err("give --socket, --tcp, or both".into());
    }
    if let Some(addr) = opts.tcp.filter(|a| !a.ip().is_loopback()) {
        return Err(format!("NBD over TCP is unauthenticated: {addr} is not a loopback address"));
    }
    let mut disks = Vec::new();
    for (name, path) in &opts.disks {
        let (disk, recovery) = ProtectedDisk::open(&opts.vm, name, path).map_err(|e| e.to_string())?;
        tracing::info!(disk = name, image = %path.display(), size = disk.size(), ?recovery, "disk opened");
        disks.push(Arc::new(disk));
    }
    let server = NbdServer::with_limits(disks.iter().cloned(), opts.nbd_limits);
    if let Some(path) = &opts.socket {
        // A socket file left by a previous run would make bind fail.
        let _ = std::fs::remove_file(path);
        let listener = std::os::unix::net::UnixListener::bind(path)
            .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
        server.serve_unix(listener);
        tracing::info!(socket = %path.display(), "serving NBD");
    }
    if let Some(addr) = opts.tcp {
        let listener =
            std::net::TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        tracing::info!(addr = %listener.local_addr().map_err(|e| e.to_string())?, "serving NBD over TCP");
        server.serve_tcp(listener);
    }
    Ok((disks, server))
}

/// The fixed disks' background work: a replication cycle to `--replicate-to`,
/// or with only an interval, sealing. Their shippers, for the control API.
fn fixed_disks_work(
    opts: &ServeOptions,
    disks: &[Arc<ProtectedDisk>],
    limits: (&Option<Arc<RateLimiter>>, &Arc<Semaphore>),
    metrics: &Arc<Metrics>,
    stopped: &watch::Receiver<bool>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Result<Vec<Arc<Shipper>>, String> {
    let Some(r) = &opts.replicate else {
        if let Some(interval) = opts.interval {
            for d in disks.iter().cloned() {
                tasks.push(tokio::spawn(seal_every(d, interval, stopped.clone())));
            }
        }
        return Ok(Vec::new());
    };
    let interval = opts.interval.unwrap_or(Duration::from_secs(300));
    let tls = opts.tls.as_ref().ok_or("--replicate-to needs --tls-dir")?;
    let peer = Peer { addr: r.addr.clone(), server_name: r.server_name.clone(), tls: tls.clone() };
    let ch = peer.channel().map_err(|e| format!("replica address {}: {e}", r.addr))?;
    let shippers: Vec<Arc<Shipper>> = disks
        .iter()
        .map(|d| {
            let s = Shipper::new(
                &opts.vm,
                d.clone(),
                ch.clone(),
                r.shipper.clone(),
                limits.0.clone(),
                limits.1.clone(),
            );
            Arc::new(s.with_metrics(metrics.clone()).with_peer(peer.clone()))
        })
        .collect();
    let vm = VmReplication::new(
        shippers.clone(),
        interval,
        r.shipper.backoff.clone(),
        opts.app_consistent.clone(),
    );
    let stopped = stopped.clone();
    tasks.push(tokio::spawn(async move {
        vm.run(stopped).await;
    }));
    tracing::info!(replica = %r.addr, ?interval, "replicating");
    Ok(shippers)
}

/// Seals `d`'s log every `interval` until `stopped` (no replica to ship to).
async fn seal_every(d: Arc<ProtectedDisk>, interval: Duration, mut stopped: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stopped.changed() => return,
        }
        let d = d.clone();
        match tokio::task::spawn_blocking(move || d.seal()).await {
            Ok(Ok(Some(s))) => tracing::info!(first = s.first_seq, last = s.last_seq, "sealed"),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "sealing failed"),
            Err(e) => tracing::error!(error = %e, "sealing panicked"),
        }
    }
}

/// Runs a node's agent until SIGTERM/SIGINT, then shuts its disks down cleanly.
pub async fn serve(opts: ServeOptions) -> Result<(), String> {
    let (disks, nbd) = serve_nbd(&opts)?;
    let metrics = metrics_endpoint(opts.metrics).await?;
    // One bandwidth budget and one transfer limit for everything this agent
    // ships: its --disk images and the VMs the controller enables.
    let limiter = opts.bandwidth.map(|b| Arc::new(RateLimiter::new(b)));
    let transfers = Arc::new(Semaphore::new(opts.max_transfers.max(1)));
    let node = match (&opts.tls, opts.control) {
        (Some(tls), Some(_)) => Some(Node::new(
            NodeConfig {
                tls: tls.clone(),
                disk_roots: opts.disk_roots.clone(),
                resolve: opts.resolve.clone(),
                socket: opts.socket.clone(),
                backoff: opts.retry.clone(),
                limiter: limiter.clone(),
                transfers: transfers.clone(),
                allow_quiesce_commands: opts.allow_quiesce_commands,
            },
            nbd.clone(),
            metrics.clone(),
        )),
        _ => None,
    };
    let (stop, stopped) = watch::channel(false);
    let mut tasks = Vec::new();
    let fixed = fixed_disks_work(&opts, &disks, (&limiter, &transfers), &metrics, &stopped, &mut tasks)?;
    // Nobody is accepted until the controller pushes the site's rules; the
    // replicas are opened (and recovered) when its first ConfigureSite names
    // their storage.
    let store = opts.receive.map(|_| {
        let store = ReplicaStore::new(SiteConfig::default(), opts.max_transfers);
        store.set_retention(opts.receive_retention);
        store.set_metrics(metrics.clone());
        store.set_controller_names(opts.controllers.clone());
        store
    });
    let agent = Agent::new(node, store, fixed);
    if let Some(listen) = opts.receive {
        spawn_replication(agent.clone(), listen, opts.tls.clone().ok_or("--listen needs --tls-dir")?).await?;
    }
    if let Some(addr) = opts.control {
        let tls = opts.tls.clone().ok_or("--control-listen needs --tls-dir")?;
        spawn_control(agent.clone(), addr, tls, opts.controllers.clone()).await?;
    }
    if let Some(a) = &opts.announce {
        let capability = if opts.receive.is_some() { "primary,replica" } else { "primary" };
        tasks.push(announce::announce(a, capability, opts.control, opts.receive, stopped.clone()).await?);
    }
    println!("ready");
    terminated().await;
    let _ = stop.send(true);
    for t in tasks {
        let _ = t.await;
    }
    agent.shutdown().await;
    for d in &disks {
        if let Err(e) = d.shutdown() {
            tracing::error!(disk = d.name(), error = %e, "clean shutdown failed");
        }
    }
    if let Some(path) = &opts.socket {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// Runs a replica site's replication server until SIGTERM/SIGINT.
pub async fn receive(opts: ReceiveOptions) -> Result<(), String> {
    let store = ReplicaStore::new(opts.site, opts.max_transfers);
    store.set_retention(opts.retention);
    store.set_controller_names(opts.controllers.clone());
    store.set_metrics(metrics_endpoint(opts.metrics).await?);
    let agent = Agent::new(None, Some(store.clone()), Vec::new());
    if let Some(addr) = opts.control {
        spawn_control(agent.clone(), addr, opts.tls.clone(), opts.controllers.clone()).await?;
    }
    // Finish what a previous run left: recover and apply received segments.
    let s = store.clone();
    let recovered = tokio::task::spawn_blocking(move || s.recover_all()).await.map_err(|e| e.to_string())?;
    tracing::info!(replicas = recovered.map_err(|e| e.to_string())?, "replicas recovered");
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", opts.listen))?;
    tracing::info!(addr = %listener.local_addr().map_err(|e| e.to_string())?, "receiving replication");
    let (stop, stopped) = watch::channel(false);
    let lease = match &opts.announce {
        Some(a) => Some(announce::announce(a, "replica", opts.control, Some(opts.listen), stopped).await?),
        None => None,
    };
    println!("ready");
    let served = crate::grpc::replication::serve(agent, listener, &opts.tls, terminated())
        .await
        .map_err(|e| e.to_string());
    let _ = stop.send(true);
    if let Some(l) = lease {
        let _ = l.await;
    }
    served
}
