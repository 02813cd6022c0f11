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
    /// The name in its certificate the controller verifies it as.
    pub server_name: String,
    /// Copy this Node's own labels onto the Lease too.
    pub labels_from_node: Option<String>,
}

/// Starts renewing this agent's Lease; the returned handle deletes it on
/// stop. The replication endpoint follows `replication` (a
/// ReplicationServer may move the port).
pub async fn announce(
    a: &Announce,
    capability: &str,
    control: Option<SocketAddr>,
    replication: Option<watch::Receiver<Option<SocketAddr>>>,
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
    annotations.insert(crate::lease::SERVER_NAME.to_owned(), a.server_name.clone());
    if let Some(addr) = control {
        annotations.insert(crate::lease::CONTROL_ENDPOINT.to_owned(), format!("{}:{}", a.host, addr.port()));
    }
    let presence = crate::lease::Presence {
        namespace: a.namespace.clone(),
        node: a.node.clone(),
        annotations,
        labels: a.labels.clone(),
        labels_from: a.labels_from_node.clone(),
        node_labels: None,
        duration: Duration::from_secs(15),
        replication: replication.map(|r| (a.host.clone(), r)),
        started: k8s_openapi::jiff::Timestamp::now(),
    };
    crate::lease::announce(client, presence, stopped)
        .await
        .map_err(|e| format!("cannot write the agent Lease in namespace {}: {e}", a.namespace))
}
