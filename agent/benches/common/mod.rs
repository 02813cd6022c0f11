//! What the benchmarks share: a replica site in this process (the real
//! replica service on loopback with mutual TLS), and its client certificate.
#![allow(dead_code)]

use std::{
    fs,
    io::Read,
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio::sync::oneshot;
use vmreplica_agent::{
    agent::Agent,
    grpc::replication::serve,
    replica::store::ReplicaStore,
    replication::authz::{Entry, SiteConfig},
    site::{Defaults, Site as AgentSite},
};
use vmreplica_api::tls::{LiveTls, TlsMaterial};
use vmreplica_tests::pki::Ca;

/// A replica site: its replicas, its address, and a primary's certificate for it.
pub struct Site {
    pub service: Arc<ReplicaStore>,
    pub addr: String,
    pub client_tls: Arc<LiveTls>,
    _stop: oneshot::Sender<()>,
}

/// Site B, accepting `*.site-a.example.com` into `storage`.
pub async fn site(storage: &Path) -> Site {
    let (server_tls, client_tls) = tls_pair();
    let cfg = SiteConfig {
        entries: vec![Entry {
            name: "bench".into(),
            allowed_primary_server: "*.site-a.example.com".into(),
            storage: storage.to_owned(),
            trust_group: "bench".into(),
        }],
        ..Default::default()
    };
    let agent_site = AgentSite::new(Defaults { max_transfers: 6, ..Default::default() }, None);
    let service = ReplicaStore::new(cfg, agent_site.limits.clone());
    let agent = Agent::new(None, Some(service.clone()), Vec::new(), agent_site);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        serve(agent, listener, server_tls, async {
            let _ = stopped.await;
        })
        .await
        .unwrap()
    });
    Site { service, addr, client_tls, _stop: stop }
}

/// Site B's server certificate (`replica.site-b.example.com`) and a site A
/// primary's client certificate (`host1.site-a.example.com`), one CA.
pub fn tls_pair() -> (Arc<LiveTls>, Arc<LiveTls>) {
    let ca = Ca::new("bench-ca").unwrap();
    let leaf = |names: &[&str]| {
        let l = ca.leaf(names[0], names).unwrap();
        LiveTls::new(TlsMaterial { cert_pem: l.cert_pem, key_pem: l.key_pem, ca_pem: ca.cert_pem.clone() })
            .unwrap()
    };
    (leaf(&["replica.site-b.example.com"]), leaf(&["host1.site-a.example.com"]))
}

/// `len` bytes of real file contents from /usr (compressible as a VM disk's are).
pub fn real_data(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut stack = vec![PathBuf::from("/usr/share"), PathBuf::from("/usr/lib")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else { continue };
        let mut entries: Vec<_> = entries.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                if let Ok(f) = fs::File::open(e.path()) {
                    let _ = f.take((len - out.len()) as u64).read_to_end(&mut out);
                }
                if out.len() >= len {
                    return out;
                }
            }
        }
    }
    assert!(out.len() >= len / 2, "not enough files under /usr for the benchmark");
    let n = out.len();
    out.extend_from_within(..len - n);
    out
}
