//! The controller refuses to run against a cluster without its CRDs, says which
//! are missing and how to install them, and never installs them itself.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{Api, api::ListParams};
use vmreplica_controller::preflight::{Error, check_crds};
use vmreplica_tests::{ControlPlane, client, client_for};

#[tokio::test]
async fn controller_names_missing_crds_and_installs_nothing() {
    // A cluster of its own: the shared one has the CRDs installed.
    let bare = ControlPlane::start().await.expect("control plane");
    let client = client_for(&bare.kubeconfig_path()).await.unwrap();
    let err = check_crds(&client).await.expect_err("no CRDs are installed");
    let Error::CrdsMissing(missing) = &err else { panic!("unexpected error {err}") };
    assert_eq!(missing.len(), 4, "{missing:?}");
    let text = err.to_string();
    assert!(text.contains("vmreplications.vmreplica.io") && text.contains("kubectl apply"), "{text}");
    let crds = Api::<CustomResourceDefinition>::all(client).list(&ListParams::default()).await.unwrap();
    assert!(crds.items.is_empty(), "the check must not install anything");
}

#[tokio::test]
async fn controller_accepts_a_cluster_with_crds() {
    check_crds(&client().await).await.expect("shared control plane has the CRDs");
}
