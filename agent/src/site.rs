//! What a replica site's ReplicationServer sets on its agents besides the
//! authorisation rules: the port replication is received on, the transfer
//! and bandwidth limits this agent's transfers share, and the certificate
//! replication uses in both directions. The controller pushes them with the
//! rules (ConfigureSite); each takes effect at once, without a restart, and
//! what is in force is reported back (GetStatus) for the ReplicationServer's
//! status. A field the server leaves unset falls back to the command line.
//!
//! ```text
//!  ConfigureSite ─▶ Settings ─ check (certificate) ─▶ bind port (refused: nothing changes)
//!                                                     └▶ limits, certificate, old listener closed
//!  --tls-dir (watched) ─▶ Certificates.own ─▶ control API, and replication when no Secret is named
//! ```

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, OnceLock},
};

use tokio::{net::TcpListener, sync::watch};
use vmreplica_api::tls::{CertSummary, LiveTls, TlsError, TlsMaterial};

use crate::limits::Limits;

/// The ReplicationServer's part of a ConfigureSite, checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Listen for replication on this port (`None`: where the agent listens now).
    pub port: Option<u16>,
    pub max_transfers: Option<usize>,
    /// Bytes per second, 0 unlimited (`None`: the command line's).
    pub bandwidth: Option<u64>,
    /// The certificate for replication (`None`: the agent's own, `--tls-dir`).
    pub tls: Option<TlsMaterial>,
}

/// What is in force, as reported.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InForce {
    pub listening: Option<SocketAddr>,
    pub max_transfers: usize,
    pub active_transfers: usize,
    pub peak_transfers: usize,
    pub bandwidth: u64,
    pub certificate: CertSummary,
    /// Whether the certificate is the one the ReplicationServer named.
    pub certificate_from_site: bool,
}

/// The command line's values, used where the server says nothing.
#[derive(Clone, Debug, Default)]
pub struct Defaults {
    pub max_transfers: usize,
    pub bandwidth: Option<u64>,
    /// Replica storage must lie under one of these (none: anywhere).
    pub replica_roots: Vec<PathBuf>,
}

/// The certificates of one agent.
pub struct Certificates {
    /// `--tls-dir`: the control API's, and replication's unless the site names one.
    pub own: Arc<LiveTls>,
    /// What replication uses in both directions.
    pub replication: Arc<LiveTls>,
    from_site: Mutex<bool>,
}

impl Certificates {
    pub fn new(own: Arc<LiveTls>) -> Result<Arc<Self>, TlsError> {
        let replication = LiveTls::new(own.material())?;
        Ok(Arc::new(Self { own, replication, from_site: Mutex::new(false) }))
    }

    /// The replication certificate's holder, for channels and listeners.
    pub fn replication(&self) -> Arc<LiveTls> {
        self.replication.clone()
    }

    /// After `own` was reloaded: replication follows it unless the site named a certificate.
    pub fn own_reloaded(&self) {
        let from_site = self.from_site.lock().unwrap_or_else(|p| p.into_inner());
        if !*from_site && let Err(e) = self.replication.replace(self.own.material()) {
            tracing::warn!(error = %e, "the reloaded certificate cannot be used for replication");
        }
    }

    fn set_site(&self, material: Option<TlsMaterial>) -> Result<(), TlsError> {
        let mut from_site = self.from_site.lock().unwrap_or_else(|p| p.into_inner());
        self.replication.replace(material.clone().unwrap_or_else(|| self.own.material()))?;
        *from_site = material.is_some();
        Ok(())
    }
}

/// Starts the replication server on a listener; it stops when the receiver fires.
pub type ServeFn = Box<dyn Fn(TcpListener, tokio::sync::oneshot::Receiver<()>) + Send + Sync>;

/// The replication server's listener, which a ReplicationServer can move.
pub struct Listener {
    ip: IpAddr,
    serve: ServeFn,
    running: tokio::sync::Mutex<Option<(SocketAddr, tokio::sync::oneshot::Sender<()>)>>,
    announced: watch::Sender<Option<SocketAddr>>,
}

impl Listener {
    /// Listens on `addr` at once (the command line's `--listen`).
    pub async fn start(addr: SocketAddr, serve: ServeFn) -> Result<Self, String> {
        let l = Self { ip: addr.ip(), serve, running: Default::default(), announced: watch::channel(None).0 };
        l.listen(addr.port()).await?;
        Ok(l)
    }

    /// Where it listens, and every change of it (for the agent's Lease).
    pub fn watch(&self) -> watch::Receiver<Option<SocketAddr>> {
        self.announced.subscribe()
    }

    /// Moves to `port`: the new socket is bound before the old one closes, so
    /// a port in use is refused with nothing changed. Transfers in flight on
    /// the old socket finish.
    pub async fn listen(&self, port: u16) -> Result<SocketAddr, String> {
        let mut running = self.running.lock().await;
        if let Some((addr, _)) = running.as_ref()
            && (addr.port() == port || port == 0)
        {
            return Ok(*addr);
        }
        let want = SocketAddr::new(self.ip, port);
        let listener = TcpListener::bind(want).await.map_err(|e| match e.kind() {
            std::io::ErrorKind::AddrInUse => format!(
                "port {port} is in use on this node ({}): another process listens there; choose another \
                 port in the ReplicationServer",
                self.ip
            ),
            _ => format!("cannot listen for replication on {want}: {e}"),
        })?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        (self.serve)(listener, stopped);
        if let Some((old, stop_old)) = running.replace((addr, stop)) {
            tracing::info!(%old, new = %addr, "replication moved to another port");
            let _ = stop_old.send(());
        } else {
            tracing::info!(%addr, "receiving replication");
        }
        self.announced.send_replace(Some(addr));
        Ok(addr)
    }

    pub async fn addr(&self) -> Option<SocketAddr> {
        self.running.lock().await.as_ref().map(|(a, _)| *a)
    }

    /// Stops listening (the process ends).
    pub async fn stop(&self) {
        if let Some((_, stop)) = self.running.lock().await.take() {
            let _ = stop.send(());
        }
    }
}

/// One agent's site settings: limits, certificates and (replica role) the listener.
pub struct Site {
    pub limits: Arc<Limits>,
    /// None for an agent that only serves NBD (no `--tls-dir`).
    pub certs: Option<Arc<Certificates>>,
    pub listener: OnceLock<Listener>,
    defaults: Defaults,
}

impl Site {
    /// Refuses storage outside the agent's replica roots (a pod sees only those).
    pub fn check_storage(&self, storage: &Path) -> Result<(), String> {
        let roots = &self.defaults.replica_roots;
        if roots.is_empty() || roots.iter().any(|r| storage.starts_with(r)) {
            return Ok(());
        }
        let list: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
        Err(format!(
            "replica storage {} is not under this agent's replica roots ({}): it cannot store replicas there; \
             choose a location under one of them, or add it to the agent pool's replicaRoots",
            storage.display(),
            list.join(", ")
        ))
    }

    pub fn new(defaults: Defaults, certs: Option<Arc<Certificates>>) -> Arc<Self> {
        Arc::new(Self {
            limits: Limits::new(defaults.max_transfers, defaults.bandwidth),
            certs,
            listener: OnceLock::new(),
            defaults,
        })
    }

    /// Puts `s` in force, or refuses it with the reason and changes nothing.
    pub async fn apply(&self, s: &Settings) -> Result<(), String> {
        // Checked first: a bad certificate must not move the port.
        let bad = |e: TlsError| format!("the ReplicationServer's TLS Secret: {e}");
        if let Some(m) = &s.tls {
            LiveTls::new(m.clone()).map_err(bad)?;
        }
        if let (Some(port), Some(l)) = (s.port, self.listener.get()) {
            l.listen(port).await?;
        }
        if let Some(c) = &self.certs {
            c.set_site(s.tls.clone()).map_err(bad)?;
        }
        self.limits.transfers.set_max(s.max_transfers.unwrap_or(self.defaults.max_transfers));
        self.limits.bandwidth.set_rate(s.bandwidth.or(self.defaults.bandwidth).unwrap_or(0));
        Ok(())
    }

    pub async fn in_force(&self) -> InForce {
        let slots = self.limits.transfers.slots();
        let listening = match self.listener.get() {
            Some(l) => l.addr().await,
            None => None,
        };
        InForce {
            listening,
            max_transfers: slots.max,
            active_transfers: slots.active,
            peak_transfers: slots.peak,
            bandwidth: self.limits.bandwidth.rate(),
            certificate: self.certs.as_ref().map(|c| c.replication.summary()).unwrap_or_default(),
            certificate_from_site: self
                .certs
                .as_ref()
                .is_some_and(|c| *c.from_site.lock().unwrap_or_else(|p| p.into_inner())),
        }
    }
}
