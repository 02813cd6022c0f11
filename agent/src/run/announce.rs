//! How an agent announces itself in the cluster: a Lease per node that the
//! controller finds agents by (see [`crate::lease`]).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use tokio::sync::watch;

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
pub async fn announce(
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
