//! What the `vmreplica-agent` binary runs, wired from its parts: `serve` (a
//! node's agent: NBD exports and logs, the VMs the controller enables, and
//! with `--listen` the replica role too) and `receive` (a replica site's
//! replication server only). Fixed `--disk` images with `--replicate-to` let
//! an agent run without a controller.
//!
//! ```text
//!  serve:   disks ─▶ NbdServer ─┐        ┌─ Node (controller's VMs) ─┐
//!           metrics ────────────┼─▶ Agent┤                           ├─▶ grpc::control, grpc::replication
//!           site (limits, certs,┘        └─ ReplicaStore ────────────┘     + Lease
//!                 [--listen])
//! ```
//! The certificate in `--tls-dir` is re-read every ten seconds, so a renewed
//! Secret takes effect without a restart.

pub mod announce;
pub mod options;

use std::{net::SocketAddr, sync::Arc, time::Duration};

pub use announce::Announce;
pub use options::{ReceiveOptions, ReplicateTo, ServeOptions, TlsDir};
use tokio::sync::watch;
use vmreplica_api::tls::{LiveTls, Peer};

use crate::{
    agent::Agent,
    disk::ProtectedDisk,
    metrics::Metrics,
    nbd::NbdServer,
    node::{Node, NodeConfig},
    replica::store::ReplicaStore,
    replication::{authz::SiteConfig, cycle::VmReplication, shipper::Shipper},
    site::{Certificates, Defaults, Listener, Site},
};

/// How often `--tls-dir` is looked at for a renewed certificate.
const TLS_RELOAD: Duration = Duration::from_secs(10);

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
    tls: Arc<LiveTls>,
    controllers: Vec<String>,
) -> Result<(), String> {
    let listener =
        tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    tracing::info!(addr = %listener.local_addr().map_err(|e| e.to_string())?, "serving the control API");
    tokio::spawn(async move {
        if let Err(e) = crate::grpc::control::serve(agent, listener, tls, controllers, terminated()).await {
            tracing::error!(error = %e, "control API failed");
        }
    });
    Ok(())
}

/// Receives replication on `addr`, and wherever a ReplicationServer later
/// moves it; it stops with the process.
async fn start_replication(agent: &Arc<Agent>, addr: SocketAddr) -> Result<(), String> {
    let weak = Arc::downgrade(agent);
    let tls = agent.site().certs.as_ref().ok_or("--listen needs --tls-dir")?.replication();
    let serve: crate::site::ServeFn = Box::new(move |listener, stopped| {
        let (Some(agent), tls) = (weak.upgrade(), tls.clone()) else { return };
        tokio::spawn(async move {
            let stop = async {
                tokio::select! {
                    _ = stopped => {}
                    _ = terminated() => {}
                }
            };
            if let Err(e) = crate::grpc::replication::serve(agent, listener, tls, stop).await {
                tracing::error!(error = %e, "replication server failed");
            }
        });
    });
    let listener = Listener::start(addr, serve).await?;
    agent.site().listener.set(listener).map_err(|_| "the replication listener was started twice".to_owned())
}

/// The agent's limits and certificates, from the command line; a renewed
/// certificate in `tls.dir` is picked up while it runs.
fn site(tls: Option<&TlsDir>, defaults: Defaults) -> Result<Arc<Site>, String> {
    let Some(tls) = tls else { return Ok(Site::new(defaults, None)) };
    let certs = Certificates::new(tls.live.clone()).map_err(|e| e.to_string())?;
    let c = certs.clone();
    tls.live.watch_dir(tls.dir.clone(), TLS_RELOAD, move |_| c.own_reloaded());
    Ok(Site::new(defaults, Some(certs)))
}

/// The site's certificates, which an agent needs to speak TLS at all.
fn certs(site: &Site, flag: &str) -> Result<Arc<Certificates>, String> {
    site.certs.clone().ok_or_else(|| format!("{flag} needs --tls-dir"))
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
    site: &Site,
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
    let peer = Peer {
        addr: r.addr.clone(),
        server_name: r.server_name.clone(),
        tls: certs(site, "--replicate-to")?.replication(),
    };
    let shippers = disks
        .iter()
        .map(|d| {
            // A connection per disk: see `Peer::channel`.
            let ch = peer.channel().map_err(|e| format!("replica address {}: {e}", r.addr))?;
            let s = Shipper::new(&opts.vm, d.clone(), ch, r.shipper.clone(), site.limits.clone());
            Ok(Arc::new(s.with_metrics(metrics.clone()).with_peer(peer.clone())))
        })
        .collect::<Result<Vec<Arc<Shipper>>, String>>()?;
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
    // ships and receives: its --disk images, the VMs the controller enables
    // and the replicas it keeps.
    let defaults = Defaults {
        max_transfers: opts.max_transfers,
        bandwidth: opts.bandwidth,
        replica_roots: opts.replica_roots.clone(),
    };
    let site = site(opts.tls.as_ref(), defaults)?;
    metrics.set_limits(site.limits.clone());
    let node = match (&site.certs, opts.control) {
        (Some(certs), Some(_)) => Some(Node::new(
            NodeConfig {
                tls: certs.replication(),
                disk_roots: opts.disk_roots.clone(),
                resolve: opts.resolve.clone(),
                socket: opts.socket.clone(),
                backoff: opts.retry.clone(),
                limits: site.limits.clone(),
                allow_quiesce_commands: opts.allow_quiesce_commands,
            },
            nbd.clone(),
            metrics.clone(),
        )),
        _ => None,
    };
    let (stop, stopped) = watch::channel(false);
    let mut tasks = Vec::new();
    let fixed = fixed_disks_work(&opts, &disks, &site, &metrics, &stopped, &mut tasks)?;
    // Nobody is accepted until the controller pushes the site's rules; the
    // replicas are opened (and recovered) when its first ConfigureSite names
    // their storage.
    let store = opts.receive.map(|_| {
        let store = ReplicaStore::new(SiteConfig::default(), site.limits.clone());
        store.set_retention(opts.receive_retention);
        store.set_metrics(metrics.clone());
        store.set_controller_names(opts.controllers.clone());
        store
    });
    if let (Some(store), Some(every)) = (&store, opts.scrub_every) {
        tasks.push(scrub_every(store.clone(), every, stopped.clone()));
    }
    let agent = Agent::new(node, store, fixed, site.clone());
    if let Some(listen) = opts.receive {
        start_replication(&agent, listen).await?;
    }
    if let Some(addr) = opts.control {
        let own = certs(&site, "--control-listen")?.own.clone();
        spawn_control(agent.clone(), addr, own, opts.controllers.clone()).await?;
    }
    if let Some(a) = &opts.announce {
        let capability = if opts.receive.is_some() { "primary,replica" } else { "primary" };
        let endpoint = site.listener.get().map(Listener::watch);
        tasks.push(announce::announce(a, capability, opts.control, endpoint, stopped.clone()).await?);
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
    let defaults = Defaults {
        max_transfers: opts.max_transfers,
        bandwidth: opts.bandwidth,
        replica_roots: opts.replica_roots.clone(),
    };
    let site = site(Some(&opts.tls), defaults)?;
    let store = ReplicaStore::new(opts.site, site.limits.clone());
    store.set_retention(opts.retention);
    store.set_controller_names(opts.controllers.clone());
    let metrics = metrics_endpoint(opts.metrics).await?;
    metrics.set_limits(site.limits.clone());
    store.set_metrics(metrics);
    let agent = Agent::new(None, Some(store.clone()), Vec::new(), site.clone());
    if let Some(addr) = opts.control {
        let own = certs(&site, "--control-listen")?.own.clone();
        spawn_control(agent.clone(), addr, own, opts.controllers.clone()).await?;
    }
    // Finish what a previous run left: recover and apply received segments.
    let s = store.clone();
    let recovered = tokio::task::spawn_blocking(move || s.recover_all()).await.map_err(|e| e.to_string())?;
    tracing::info!(replicas = recovered.map_err(|e| e.to_string())?, "replicas recovered");
    start_replication(&agent, opts.listen).await?;
    let (stop, stopped) = watch::channel(false);
    let scrub = opts.scrub_every.map(|every| scrub_every(store.clone(), every, stopped.clone()));
    let lease = match &opts.announce {
        Some(a) => {
            let endpoint = site.listener.get().map(Listener::watch);
            Some(announce::announce(a, "replica", opts.control, endpoint, stopped).await?)
        }
        None => None,
    };
    println!("ready");
    terminated().await;
    let _ = stop.send(true);
    if let Some(l) = site.listener.get() {
        l.stop().await;
    }
    if let Some(l) = lease {
        let _ = l.await;
    }
    if let Some(s) = scrub {
        let _ = s.await;
    }
    Ok(())
}

/// Scrubs every replica of `store` each `every`, the first one `every` after
/// the start, until `stop`.
fn scrub_every(
    store: Arc<ReplicaStore>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.changed() => return,
            }
            let s = store.clone();
            let _ = tokio::task::spawn_blocking(move || s.scrub_all()).await;
        }
    })
}
