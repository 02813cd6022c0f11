//! Finding agents: every agent keeps a Lease (label
//! `app.kubernetes.io/component=vmreplica-agent`) renewed, with its endpoints
//! and capabilities in annotations. An agent is live while its Lease's
//! `renewTime + leaseDurationSeconds` is in the future. Time is a parameter so
//! liveness is testable without waiting.

use std::collections::BTreeMap;

use k8s_openapi::{api::coordination::v1::Lease, jiff::Timestamp};
use kube::{Api, Client, api::ListParams};

/// One agent as its Lease describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Agent {
    pub node: String,
    pub control_endpoint: Option<String>,
    pub replication_endpoint: Option<String>,
    pub capabilities: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub live: bool,
    /// The name its certificate is verified as (default: the endpoint's host).
    pub server_name: Option<String>,
}

impl Agent {
    /// `host:port` of its control API and the name to verify its certificate as.
    pub fn control(&self) -> Option<(&str, &str)> {
        let endpoint = self.control_endpoint.as_deref()?;
        let host = endpoint.rsplit_once(':').map_or(endpoint, |(h, _)| h);
        Some((endpoint, self.server_name.as_deref().unwrap_or(host)))
    }
}

/// Whether a Lease was renewed recently enough at `now`.
pub fn is_live(lease: &Lease, now: Timestamp) -> bool {
    let Some(spec) = &lease.spec else { return false };
    match (&spec.renew_time, spec.lease_duration_seconds) {
        (Some(renewed), Some(secs)) if secs > 0 => {
            renewed.0.as_millisecond() + i64::from(secs) * 1000 > now.as_millisecond()
        }
        _ => false,
    }
}

/// The label selector of the agents' Leases.
pub const LEASE_SELECTOR: &str = "app.kubernetes.io/component=vmreplica-agent";

/// The agents announced in `namespace`, live or not, by node name.
pub async fn discover(client: &Client, namespace: &str, now: Timestamp) -> Result<Vec<Agent>, kube::Error> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), namespace);
    let lp = ListParams::default().labels(LEASE_SELECTOR);
    let mut agents: Vec<Agent> = leases
        .list(&lp)
        .await?
        .items
        .into_iter()
        .filter_map(|l| {
            let node = l.spec.as_ref()?.holder_identity.clone()?;
            let ann = l.metadata.annotations.clone().unwrap_or_default();
            let mut labels = l.metadata.labels.clone().unwrap_or_default();
            labels.remove("app.kubernetes.io/component");
            Some(Agent {
                live: is_live(&l, now),
                control_endpoint: ann.get("vmreplica.io/control-endpoint").cloned(),
                replication_endpoint: ann.get("vmreplica.io/replication-endpoint").cloned(),
                capabilities: ann
                    .get("vmreplica.io/capabilities")
                    .map(|c| c.split(',').map(str::to_owned).collect())
                    .unwrap_or_default(),
                labels,
                server_name: ann.get("vmreplica.io/server-name").cloned(),
                node,
            })
        })
        .collect();
    agents.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(agents)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{api::coordination::v1::LeaseSpec, apimachinery::pkg::apis::meta::v1::MicroTime};

    use super::*;

    fn lease(renewed_ms: i64, secs: i32) -> Lease {
        Lease {
            spec: Some(LeaseSpec {
                holder_identity: Some("n1".into()),
                renew_time: Some(MicroTime(Timestamp::from_millisecond(renewed_ms).unwrap())),
                lease_duration_seconds: Some(secs),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn live_until_the_lease_runs_out() {
        let at = |ms| Timestamp::from_millisecond(ms).unwrap();
        assert!(is_live(&lease(1_000_000, 15), at(1_014_999)));
        assert!(!is_live(&lease(1_000_000, 15), at(1_015_000)));
        assert!(!is_live(&lease(1_000_000, 0), at(1_000_000)), "a zero duration is never live");
        assert!(!is_live(&Lease::default(), at(0)), "no spec, not live");
    }
}
