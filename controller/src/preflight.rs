//! Start-up checks that turn a misconfigured cluster into one clear message.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{Api, Client};

/// Why the controller cannot start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Some vmreplica CRDs are not installed.
    #[error(
        "the vmreplica CRDs are not installed: {} missing. Install them with \
         `kubectl apply --server-side -f charts/vmreplica/crds/` (or the Helm chart); \
         the controller never installs CRDs itself",
        .0.join(", ")
    )]
    CrdsMissing(Vec<String>),
    /// The apiserver could not be asked.
    #[error("cannot read CustomResourceDefinitions from the apiserver")]
    Lookup(#[source] kube::Error),
}

/// Checks that every CRD the controller watches is installed and established.
pub async fn check_crds(client: &Client) -> Result<(), Error> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut missing = Vec::new();
    for crd in vmreplica_crds::crds() {
        let name = crd.metadata.name.unwrap_or_default();
        let established = api.get_opt(&name).await.map_err(Error::Lookup)?.is_some_and(|c| {
            c.status
                .and_then(|s| s.conditions)
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Established" && c.status == "True"))
        });
        if !established {
            missing.push(name);
        }
    }
    if missing.is_empty() { Ok(()) } else { Err(Error::CrdsMissing(missing)) }
}
