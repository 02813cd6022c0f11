//! What `vmreplica-agent serve` and `receive` are told to do.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use vmreplica_api::tls::LiveTls;

use super::announce::Announce;
use crate::{
    quiesce::Quiesce,
    replica::retention::Policy,
    replication::{authz::SiteConfig, shipper::ShipperConfig},
};

/// Where a primary's `--disk` images replicate to (with the agent's
/// certificates, bandwidth limit and transfer limit).
pub struct ReplicateTo {
    pub addr: String,
    pub server_name: String,
    pub shipper: ShipperConfig,
}

/// The agent's own certificate (`--tls-dir`), loaded and checked, and the
/// directory it is re-read from when renewed.
pub struct TlsDir {
    pub dir: PathBuf,
    pub live: Arc<LiveTls>,
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
    pub tls: Option<TlsDir>,
    /// Where images the controller names may lie.
    pub disk_roots: Vec<PathBuf>,
    /// Host names resolved without DNS.
    pub resolve: std::collections::BTreeMap<String, std::net::IpAddr>,
    pub retry: Vec<Duration>,
    pub bandwidth: Option<u64>,
    pub max_transfers: usize,
    /// VMReplications may name freeze/thaw commands to run on this node.
    pub allow_quiesce_commands: bool,
    /// Replica storage must lie under one of these (none: anywhere).
    pub replica_roots: Vec<PathBuf>,
    /// The controller's certificate names: the only callers of the control
    /// API, and refused on the replication API.
    pub controllers: Vec<String>,
    /// Also receive replication here (one agent per node serves both roles:
    /// what reverse replication needs). Its rules come from the controller.
    pub receive: Option<SocketAddr>,
    pub receive_retention: Policy,
    /// How often replicas held here are scrubbed (`None`: never).
    pub scrub_every: Option<Duration>,
}

/// A replica site's options.
pub struct ReceiveOptions {
    pub listen: SocketAddr,
    pub tls: TlsDir,
    pub site: SiteConfig,
    pub max_transfers: usize,
    pub bandwidth: Option<u64>,
    pub replica_roots: Vec<PathBuf>,
    pub retention: Policy,
    /// Serve Prometheus metrics here.
    pub metrics: Option<SocketAddr>,
    /// Serve the control API (mutual TLS) here.
    pub control: Option<SocketAddr>,
    /// Keep a Lease announcing this agent.
    pub announce: Option<Announce>,
    /// The controller's certificate names (see [`ServeOptions::controllers`]).
    pub controllers: Vec<String>,
    /// How often replicas are scrubbed (`None`: never).
    pub scrub_every: Option<Duration>,
}
