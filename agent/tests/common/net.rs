//! Two agents on loopback: a replica service with mutual TLS, and primaries
//! with certificates from the same (or another) CA.
#![allow(dead_code)]

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use tokio::sync::oneshot;
use vmreplica_agent::{
    agent::Agent,
    disk::ProtectedDisk,
    grpc::replication::serve,
    limits::Limits,
    replica::store::ReplicaStore,
    replication::{
        authz::{Entry, SiteConfig},
        shipper::{Peer, Shipper, ShipperConfig},
    },
    site::{Defaults, Site as AgentSite},
};
use vmreplica_api::tls::{LiveTls, TlsMaterial};
use vmreplica_tests::pki::Ca;

pub const REPLICA_NAME: &str = "replica.site-b.example.com";

pub struct Site {
    pub ca: Ca,
    pub storage: tempfile::TempDir,
    /// The replicas this site keeps.
    pub service: Arc<ReplicaStore>,
    /// The agent they belong to (replica role only).
    pub agent: Arc<Agent>,
    pub addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

pub fn material(ca: &Ca, names: &[&str]) -> Arc<LiveTls> {
    let leaf = ca.leaf(names[0], names).unwrap();
    LiveTls::new(TlsMaterial { cert_pem: leaf.cert_pem, key_pem: leaf.key_pem, ca_pem: ca.cert_pem.clone() })
        .unwrap()
}

/// An agent's limits and no certificate (tests give theirs to the listeners directly).
pub fn agent_site(max_transfers: usize) -> Arc<AgentSite> {
    AgentSite::new(Defaults { max_transfers, ..Default::default() }, None)
}

/// Site B: accepts `*.site-a.example.com` into trust group finance, and
/// `*.hr.example.com` into trust group hr, both under the same storage.
pub async fn replica_site() -> Site {
    replica_site_with(6).await
}

/// [`replica_site`] with another limit on concurrent transfers.
pub async fn replica_site_with(max_transfers: usize) -> Site {
    let ca = Ca::new("vmreplica-test-ca").unwrap();
    let storage = tempfile::tempdir().unwrap();
    let root: PathBuf = storage.path().join("replicas");
    let site = SiteConfig {
        entries: vec![
            Entry {
                name: "site-a-finance".into(),
                allowed_primary_server: "*.site-a.example.com".into(),
                storage: root.clone(),
                trust_group: "finance".into(),
            },
            Entry {
                name: "hr".into(),
                allowed_primary_server: "*.hr.example.com".into(),
                storage: root,
                trust_group: "hr".into(),
            },
        ],
        ..Default::default()
    };
    let agent_site = agent_site(max_transfers);
    let service = ReplicaStore::new(site, agent_site.limits.clone());
    let agent = Agent::new(None, Some(service.clone()), Vec::new(), agent_site);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = material(&ca, &[REPLICA_NAME, "127.0.0.1"]);
    let (stop, stopped) = oneshot::channel::<()>();
    let svc = agent.clone();
    tokio::spawn(async move {
        serve(svc, listener, tls, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    Site { ca, storage, service, agent, addr, _stop: stop }
}

pub fn shipper(
    site: &Site,
    tls: &Arc<LiveTls>,
    disk: Arc<ProtectedDisk>,
    cfg: ShipperConfig,
    limit: Option<u64>,
) -> Shipper {
    shipper_for("vm1", site, tls, disk, cfg, limit)
}

/// [`shipper`] for VM `vm`.
pub fn shipper_for(
    vm: &str,
    site: &Site,
    tls: &Arc<LiveTls>,
    disk: Arc<ProtectedDisk>,
    cfg: ShipperConfig,
    limit: Option<u64>,
) -> Shipper {
    let peer = Peer { addr: site.addr.to_string(), server_name: REPLICA_NAME.into(), tls: tls.clone() };
    let ch = peer.channel().unwrap();
    Shipper::new(vm, disk, ch, cfg, Limits::new(6, limit)).with_peer(peer)
}

/// Waits until the replica has applied everything through `seq`.
pub async fn applied(site: &Site, seq: u64) -> Arc<vmreplica_agent::replica::ReplicaDisk> {
    for _ in 0..400 {
        if let Some(r) = site.service.replica("vm1", "root").filter(|r| r.state().applied_through >= seq) {
            return r;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("replica never applied through {seq}");
}
