//! What the `vmreplica-agent` binary runs: `serve` (a primary: NBD export,
//! log, and optionally shipping to a replica) and `receive` (a replica site's
//! replication server). The controller drives the same pieces later through
//! the control API; these entry points let an agent run on its own.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use tokio::sync::{Semaphore, watch};

use crate::{
    control::ControlService,
    disk::ProtectedDisk,
    metrics::Metrics,
    nbd::NbdServer,
    quiesce::Quiesce,
    replica::retention::Policy,
    replication::{
        authz::SiteConfig,
        cycle::VmReplication,
        service::{ReplicaService, serve as serve_replication},
        shipper::{Peer, RateLimiter, Shipper, ShipperConfig},
        tls::TlsMaterial,
    },
};

/// Where a primary's `--disk` images replicate to (with the agent's
/// certificates, bandwidth limit and transfer limit).
pub struct ReplicateTo {
    pub addr: String,
    pub server_name: String,
    pub shipper: ShipperConfig,
}

/// A primary agent's options.
pub struct ServeOptions {
    pub vm: String,
    pub disks: Vec<(String, PathBuf)>,
    pub socket: Option<PathBuf>,
    pub tcp: Option<SocketAddr>,
    /// What one NBD client may hold of the agent.
    pub nbd_limits: crate::nbd::server::Limits,
    /// Seal (and ship, when replicating) this often.
    pub interval: Option<Duration>,
    /// Quiesce the guest for an application-consistent point this often.
    pub app_consistent: Option<(Quiesce, Duration)>,
    /// Serve Prometheus metrics here.
    pub metrics: Option<SocketAddr>,
    /// Serve the control API (mutual TLS) here.
    pub control: Option<SocketAddr>,
    pub replicate: Option<ReplicateTo>,
    /// Keep a Lease announcing this agent.
    pub announce: Option<Announce>,
    /// Certificates for the control API and for replication the controller enables.
    pub tls: Option<TlsMaterial>,
    /// Where images the controller names may lie.
    pub disk_roots: Vec<PathBuf>,
    /// Host names resolved without DNS.
    pub resolve: std::collections::BTreeMap<String, std::net::IpAddr>,
    pub retry: Vec<Duration>,
    pub bandwidth: Option<u64>,
    pub max_transfers: usize,
    /// VMReplications may name freeze/thaw commands to run on this node.
    pub allow_quiesce_commands: bool,
    /// The controller's certificate names: the only callers of the control
    /// API, and refused on the replication API.
    pub controllers: Vec<String>,
    /// Also receive replication here (one agent per node serves both roles:
    /// what reverse replication needs). Its rules come from the controller.
    pub receive: Option<SocketAddr>,
    pub receive_retention: Policy,
}

/// How an agent announces itself in the cluster (see [`crate::lease`]).
#[derive(Clone, Debug)]
pub struct Announce {
    pub kubeconfig: Option<PathBuf>,
    pub namespace: String,
    pub node: String,
    pub labels: std::collections::BTreeMap<String, String>,
    /// Host the controller and peers reach this agent at.
    pub host: String,
}

/// Starts renewing this agent's Lease; the returned handle deletes it on stop.
async fn announce(
    a: &Announce,
    capability: &str,
    control: Option<SocketAddr>,
    replication: Option<SocketAddr>,
    stopped: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let client = match &a.kubeconfig {
        Some(path) => {
            let kc =
                kube::config::Kubeconfig::read_from(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| e.to_string())?;
            kube::Client::try_from(cfg).map_err(|e| e.to_string())?
        }
        None => kube::Client::try_default()
            .await
            .map_err(|e| format!("no kubeconfig or in-cluster config: {e}"))?,
    };
    let mut annotations = std::collections::BTreeMap::new();
    annotations.insert(crate::lease::CAPABILITIES.to_owned(), capability.to_owned());
    for (key, addr) in
        [(crate::lease::CONTROL_ENDPOINT, control), (crate::lease::REPLICATION_ENDPOINT, replication)]
    {
        if let Some(addr) = addr {
            annotations.insert(key.to_owned(), format!("{}:{}", a.host, addr.port()));
        }
    }
    let presence = crate::lease::Presence {
        namespace: a.namespace.clone(),
        node: a.node.clone(),
        annotations,
        labels: a.labels.clone(),
        duration: Duration::from_secs(15),
    };
    crate::lease::announce(client, presence, stopped)
        .await
        .map_err(|e| format!("cannot write the agent Lease in namespace {}: {e}", a.namespace))
}

/// Starts the control API on `addr`; it stops with the process.
async fn spawn_control(
    control: ControlService,
    addr: SocketAddr,
    tls: TlsMaterial,
    controllers: Vec<String>,
) -> Result<(), String> {
    let listener =
        tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    tracing::info!(addr = %listener.local_addr().map_err(|e| e.to_string())?, "serving the control API");
    tokio::spawn(async move {
        if let Err(e) =
            crate::control::serve(Arc::new(control), listener, &tls, controllers, terminated()).await
        {
            tracing::error!(error = %e, "control API failed");
        }
    });
    Ok(())
}

/// Completes on SIGTERM or SIGINT.
pub async fn terminated() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Runs a primary until SIGTERM/SIGINT, then shuts its disks down cleanly.
pub async fn serve(opts: ServeOptions) -> Result<(), String> {
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
    let metrics = metrics_endpoint(opts.metrics).await?;
    // One bandwidth budget and one transfer limit for everything this agent
    // ships: its --disk images and the VMs the controller enables.
    let limiter = opts.bandwidth.map(|b| Arc::new(RateLimiter::new(b)));
    let transfers = Arc::new(Semaphore::new(opts.max_transfers.max(1)));
    let mut control = ControlService::default();
    if let (Some(tls), Some(_)) = (&opts.tls, opts.control) {
        let cfg = crate::node::NodeConfig {
            tls: tls.clone(),
            disk_roots: opts.disk_roots.clone(),
            resolve: opts.resolve.clone(),
            socket: opts.socket.clone(),
            backoff: opts.retry.clone(),
            limiter: limiter.clone(),
            transfers: transfers.clone(),
            allow_quiesce_commands: opts.allow_quiesce_commands,
        };
        control.node = Some(crate::node::Node::new(cfg, server.clone(), metrics.clone()));
    }
    let node = control.node.clone();
    let (stop, stopped) = watch::channel(false);
    let mut tasks = Vec::new();
    match (&opts.replicate, opts.interval) {
        (Some(r), interval) => {
            let interval = interval.unwrap_or(Duration::from_secs(300));
            let tls = opts.tls.as_ref().ok_or("--replicate-to needs --tls-dir")?;
            let peer = Peer { addr: r.addr.clone(), server_name: r.server_name.clone(), tls: tls.clone() };
            let ch = peer.channel().map_err(|e| format!("replica address {}: {e}", r.addr))?;
            let shippers = disks
                .iter()
                .map(|d| {
                    Shipper::new(
                        &opts.vm,
                        d.clone(),
                        ch.clone(),
                        r.shipper.clone(),
                        limiter.clone(),
                        transfers.clone(),
                    )
                    .with_metrics(metrics.clone())
                    .with_peer(peer.clone())
                })
                .map(Arc::new)
                .collect::<Vec<_>>();
            control.shippers = shippers.clone();
            let vm = VmReplication::new(
                shippers,
                interval,
                r.shipper.backoff.clone(),
                opts.app_consistent.clone(),
            );
            let stopped = stopped.clone();
            tasks.push(tokio::spawn(async move {
                vm.run(stopped).await;
            }));
            tracing::info!(replica = %r.addr, ?interval, "replicating");
        }
        (None, Some(interval)) => {
            for d in disks.clone() {
                let mut stopped = stopped.clone();
                tasks.push(tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            _ = tokio::time::sleep(interval) => {}
                            _ = stopped.changed() => return,
                        }
                        let d = d.clone();
                        match tokio::task::spawn_blocking(move || d.seal()).await {
                            Ok(Ok(Some(s))) => {
                                tracing::info!(first = s.first_seq, last = s.last_seq, "sealed")
                            }
                            Ok(Ok(None)) => {}
                            Ok(Err(e)) => tracing::error!(error = %e, "sealing failed"),
                            Err(e) => tracing::error!(error = %e, "sealing panicked"),
                        }
                    }
                }));
            }
        }
        (None, None) => {}
    }
    if let Some(listen) = opts.receive {
        let tls = opts.tls.clone().ok_or("--listen needs --tls-dir")?;
        // Nobody is accepted until the controller pushes the site's rules.
        let site = SiteConfig {
            allow_any_server: false,
            default_storage: None,
            default_trust_group: "default".into(),
            entries: Vec::new(),
        };
        let service = ReplicaService::new(site, opts.max_transfers);
        service.set_retention(opts.receive_retention);
        service.set_metrics(metrics.clone());
        service.set_controller_names(opts.controllers.clone());
        if let Some(n) = &node {
            service.set_node(n.clone());
        }
        // With no rules there is no storage location yet: the replicas are
        // opened (and recovered) when the controller's first ConfigureSite
        // names them.
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        tracing::info!(addr = %listener.local_addr().map_err(|e| e.to_string())?, "receiving replication");
        control.replicas = Some(service.clone());
        tokio::spawn(async move {
            if let Err(e) = serve_replication(service, listener, &tls, terminated()).await {
                tracing::error!(error = %e, "replication server failed");
            }
        });
    }
    if let Some(addr) = opts.control {
        let tls = opts.tls.clone().ok_or("--control-listen needs --tls-dir")?;
        spawn_control(control, addr, tls, opts.controllers.clone()).await?;
    }
    if let Some(a) = &opts.announce {
        let capability = if opts.receive.is_some() { "primary,replica" } else { "primary" };
        tasks.push(announce(a, capability, opts.control, opts.receive, stopped.clone()).await?);
    }
    println!("ready");
    terminated().await;
    let _ = stop.send(true);
    for t in tasks {
        let _ = t.await;
    }
    if let Some(node) = node {
        node.shutdown().await;
    }
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

/// A replica site's options.
pub struct ReceiveOptions {
    pub listen: SocketAddr,
    pub tls: TlsMaterial,
    pub site: SiteConfig,
    pub max_transfers: usize,
    pub retention: Policy,
    /// Serve Prometheus metrics here.
    pub metrics: Option<SocketAddr>,
    /// Serve the control API (mutual TLS) here.
    pub control: Option<SocketAddr>,
    /// Keep a Lease announcing this agent.
    pub announce: Option<Announce>,
    /// The controller's certificate names (see [`ServeOptions::controllers`]).
    pub controllers: Vec<String>,
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

/// Runs a replica site's replication server until SIGTERM/SIGINT.
pub async fn receive(opts: ReceiveOptions) -> Result<(), String> {
    let service = ReplicaService::new(opts.site, opts.max_transfers);
    service.set_retention(opts.retention);
    service.set_controller_names(opts.controllers.clone());
    service.set_metrics(metrics_endpoint(opts.metrics).await?);
    if let Some(addr) = opts.control {
        let control = ControlService { replicas: Some(service.clone()), ..Default::default() };
        spawn_control(control, addr, opts.tls.clone(), opts.controllers.clone()).await?;
    }
    // Finish what a previous run left: recover and apply received segments.
    let s = service.clone();
    let recovered = tokio::task::spawn_blocking(move || s.recover_all()).await.map_err(|e| e.to_string())?;
    tracing::info!(replicas = recovered.map_err(|e| e.to_string())?, "replicas recovered");
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", opts.listen))?;
    tracing::info!(addr = %listener.local_addr().map_err(|e| e.to_string())?, "receiving replication");
    let (stop, stopped) = watch::channel(false);
    let lease = match &opts.announce {
        Some(a) => Some(announce(a, "replica", opts.control, Some(opts.listen), stopped).await?),
        None => None,
    };
    println!("ready");
    let served =
        serve_replication(service, listener, &opts.tls, terminated()).await.map_err(|e| e.to_string());
    let _ = stop.send(true);
    if let Some(l) = lease {
        let _ = l.await;
    }
    served
}
