//! The agent's presence in the cluster: a `coordination.k8s.io/v1` Lease per
//! node, renewed every third of its duration, whose annotations say where the
//! agent listens and what it can do. The controller finds agents, and tells
//! live ones from dead ones, by these Leases; it works the same for agents in
//! a DaemonSet and for agents run as plain processes (tests, `hack/local-up.sh`).

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{
    api::{
        coordination::v1::{Lease, LeaseSpec},
        core::v1::Node,
    },
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams},
};
use tokio::sync::watch;

/// Label every agent Lease carries (the controller lists by it).
pub const LEASE_LABEL: &str = "app.kubernetes.io/component";
pub const LEASE_LABEL_VALUE: &str = "vmreplica-agent";
/// Annotation: `host:port` of the agent's control API.
pub const CONTROL_ENDPOINT: &str = "vmreplica.io/control-endpoint";
/// Annotation: `host:port` of the agent's replication server.
pub const REPLICATION_ENDPOINT: &str = "vmreplica.io/replication-endpoint";
/// Annotation: comma-separated capabilities (`primary`, `replica`).
pub const CAPABILITIES: &str = "vmreplica.io/capabilities";
/// Annotation: the name the controller verifies the agent's certificate as.
pub const SERVER_NAME: &str = "vmreplica.io/server-name";
/// How often the Node's labels are read again (`--labels-from-node`).
const NODE_LABELS_EVERY: Duration = Duration::from_secs(60);

/// What an agent announces.
#[derive(Clone, Debug)]
pub struct Presence {
    pub namespace: String,
    pub node: String,
    pub annotations: BTreeMap<String, String>,
    /// Extra labels (the node's, when the agent is not on a Kubernetes node).
    pub labels: BTreeMap<String, String>,
    /// The Node whose own labels are copied (read at start and every
    /// minute), and those labels; `labels` win where both set a key.
    pub labels_from: Option<String>,
    pub node_labels: Option<BTreeMap<String, String>>,
    pub duration: Duration,
    /// The host peers reach the agent at, and where its replication server
    /// listens now (a ReplicationServer may move it).
    pub replication: Option<(String, watch::Receiver<Option<std::net::SocketAddr>>)>,
    /// When this agent process started: the Lease's `acquireTime`, which a
    /// restart changes and a renewal does not. The controller configures an
    /// agent whose acquireTime changed at once (it starts with no site
    /// configuration) instead of at its next periodic look.
    pub started: Timestamp,
}

/// The Lease name of a node's agent.
pub fn lease_name(node: &str) -> String {
    format!("vmreplica-agent-{node}")
}

impl Presence {
    fn lease(&self) -> Lease {
        let mut labels = self.node_labels.clone().unwrap_or_default();
        labels.extend(self.labels.clone());
        labels.insert(LEASE_LABEL.into(), LEASE_LABEL_VALUE.into());
        let mut annotations = self.annotations.clone();
        if let Some((host, addr)) = &self.replication
            && let Some(addr) = *addr.borrow()
        {
            annotations.insert(REPLICATION_ENDPOINT.into(), format!("{host}:{}", addr.port()));
        }
        Lease {
            metadata: ObjectMeta {
                name: Some(lease_name(&self.node)),
                namespace: Some(self.namespace.clone()),
                labels: Some(labels),
                annotations: Some(annotations),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.node.clone()),
                lease_duration_seconds: Some(self.duration.as_secs().max(1) as i32),
                renew_time: Some(MicroTime(Timestamp::now())),
                acquire_time: Some(MicroTime(self.started)),
                ..Default::default()
            }),
        }
    }
}

async fn renew(api: &Api<Lease>, presence: &Presence) -> Result<(), kube::Error> {
    let pp = PatchParams::apply("vmreplica-agent").force();
    api.patch(&lease_name(&presence.node), &pp, &Patch::Apply(presence.lease())).await.map(|_| ())
}

/// Writes the Lease once (so an agent that says it is ready has announced
/// itself, and a bad kubeconfig or missing RBAC stops it with a clear error),
/// then keeps renewing it in the background until `stop` fires, and deletes it
/// so the controller sees a clean departure at once.
pub async fn announce(
    client: Client,
    mut presence: Presence,
    stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, kube::Error> {
    let nodes: Api<Node> = Api::all(client.clone());
    if let Some(node) = &presence.labels_from {
        presence.node_labels = Some(node_labels(&nodes, node).await?);
    }
    let api: Api<Lease> = Api::namespaced(client, &presence.namespace);
    renew(&api, &presence).await?;
    Ok(tokio::spawn(keep(api, nodes, presence, stop)))
}

/// The labels of Node `name`.
async fn node_labels(nodes: &Api<Node>, name: &str) -> Result<BTreeMap<String, String>, kube::Error> {
    Ok(nodes.get(name).await?.metadata.labels.unwrap_or_default())
}

async fn keep(api: Api<Lease>, nodes: Api<Node>, mut presence: Presence, mut stop: watch::Receiver<bool>) {
    let name = lease_name(&presence.node);
    let mut labels_read = tokio::time::Instant::now();
    let mut moved = presence.replication.as_ref().map(|(_, r)| r.clone());
    let endpoint_moved = async |m: &mut Option<watch::Receiver<_>>| {
        let Some(r) = m else { return std::future::pending().await };
        if r.changed().await.is_err() {
            // The listener is gone (the agent is stopping): nothing more to announce.
            *m = None;
        }
    };
    loop {
        // A moved replication endpoint is announced at once.
        tokio::select! {
            _ = tokio::time::sleep(presence.duration / 3) => {}
            _ = endpoint_moved(&mut moved) => {}
            _ = stop.changed() => break,
        }
        if let Some(node) = presence.labels_from.clone()
            && labels_read.elapsed() >= NODE_LABELS_EVERY
        {
            labels_read = tokio::time::Instant::now();
            match node_labels(&nodes, &node).await {
                Ok(l) => presence.node_labels = Some(l),
                Err(e) => tracing::warn!(%node, error = %e, "reading the node's labels failed"),
            }
        }
        // Failed renewals are retried at the next tick; the Lease's duration
        // is three ticks, so one failure does not make the agent look dead.
        if let Err(e) = renew(&api, &presence).await {
            tracing::warn!(lease = %name, error = %e, "renewing the agent lease failed");
        }
    }
    if let Err(e) = api.delete(&name, &DeleteParams::default()).await {
        tracing::warn!(lease = %name, error = %e, "releasing the agent lease failed");
    }
}
