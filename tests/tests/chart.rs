//! The Helm chart, with Helm's own code (hack/helm: the helm-python-sdk's
//! Helm v4), on the real one-node cluster hack/test.sh starts (kubelet +
//! containerd, the images hack/images.sh built): installed with two agent
//! pools as two sites on the one node, a VMReplication applied with kubectl
//! replicates a disk between the pods byte for byte, an upgrade rolls every
//! pod and replication goes on, least-privilege RBAC is checked verb by
//! verb, bad values are refused by the schema, and an uninstall leaves the
//! disks and replicas. Without the cluster (`cargo test` alone) these tests
//! fail and say how to run them.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use k8s_openapi::api::{
    authentication::v1::TokenRequest,
    authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
    core::v1::{Namespace, Pod, Secret, ServiceAccount},
};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use vmreplica_crds::{ReplicationServer, ReplicationState, VMReplication};
use vmreplica_tests::{
    FIELD_MANAGER, client_for,
    pki::Ca,
    procs::{free_port, material, presented_serial, serial_of, wait_secs, write_tls},
    repo_root, tls_secret,
};

/// The release: fixed, so names in the rendered chart are known; the
/// cluster is fresh for every run of hack/test.sh.
const RELEASE: &str = "vmr";

/// The one-node cluster's admin kubeconfig (hack/test.sh exports it).
fn cluster_kubeconfig() -> PathBuf {
    std::env::var_os("VMREPLICA_CLUSTER_KUBECONFIG").map(PathBuf::from).expect(
        "VMREPLICA_CLUSTER_KUBECONFIG is not set: the chart tests run on the one-node cluster that \
         hack/test.sh starts (hack/cluster-up.sh), with the images hack/images.sh imports",
    )
}

/// Runs Helm (`hack/helm`); `Ok(stdout)` or `Err(stderr)`.
fn helm(args: &[&str]) -> Result<String, String> {
    let out = Command::new(repo_root().join("hack/helm"))
        .args(args)
        .env("KUBECONFIG", cluster_kubeconfig())
        .output()
        .expect("running hack/helm");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn chart() -> String {
    repo_root().join("charts/vmreplica").display().to_string()
}

/// `kubectl apply -f -` of `yaml`, as a user does.
fn kubectl_apply(yaml: &str) {
    use std::io::Write;
    let mut child = Command::new("kubectl")
        .args(["apply", "-f", "-"])
        .env("KUBECONFIG", cluster_kubeconfig())
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(yaml.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "kubectl apply of:\n{yaml}");
}

/// Whether `a` and `b` hold the same bytes (`qemu-img compare`, sharing the
/// agents' image locks).
fn identical(a: &Path, b: &Path) -> bool {
    Command::new("qemu-img")
        .args(["compare", "-U", "-q", "-f", "raw", "-F", "raw"])
        .args([a, b])
        .status()
        .is_ok_and(|s| s.success())
}

fn qemu_io_write(socket: &Path, export: &str, cmds: &[String]) {
    let url = format!("nbd+unix:///{export}?socket={}", socket.display());
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    let out = cmd.arg(&url).output().unwrap();
    assert!(out.status.success(), "qemu-io {cmds:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The pods of the release, once `count` are Ready (none of them `not`).
async fn ready_pods(pods: &Api<Pod>, count: usize, not: &[String]) -> Vec<Pod> {
    wait_secs(180, "the release's pods to be Ready", async || {
        let lp = ListParams::default().labels(&format!("app.kubernetes.io/instance={RELEASE}"));
        let list = pods.list(&lp).await.ok()?.items;
        let ready = |p: &Pod| {
            p.metadata.deletion_timestamp.is_none()
                && !not.contains(&p.uid().unwrap_or_default())
                && p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        };
        let live: Vec<Pod> = list.into_iter().filter(|p| p.metadata.deletion_timestamp.is_none()).collect();
        (live.len() == count && live.iter().all(ready)).then_some(live)
    })
    .await
}

/// What a ServiceAccount may do, asked of the apiserver's own authorizer.
async fn allowed(
    client: &Client,
    sa: &str,
    ns: &str,
    verb: &str,
    group: &str,
    resource: &str,
    in_ns: Option<&str>,
) -> bool {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(format!("system:serviceaccount:{ns}:{sa}")),
            groups: Some(vec!["system:serviceaccounts".into(), format!("system:serviceaccounts:{ns}")]),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.split('/').next().unwrap().into()),
                subresource: resource.split('/').nth(1).map(Into::into),
                namespace: in_ns.map(Into::into),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let r = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .unwrap();
    r.status.is_some_and(|s| s.allowed)
}

#[test]
fn bad_values_are_refused_by_the_schema_with_the_path_and_nothing_is_installed() {
    for (set, path) in [
        ("controller.replicas=0", "/controller/replicas"),
        ("agents.pools[0].roles={backup}", "/agents/pools/0/roles/0"),
        ("agents.pools[0].diskRoots={../etc}", "/agents/pools/0/diskRoots/0"),
        ("controller.metricsPort=70000", "/controller/metricsPort"),
        ("certManager.agentDnsNames={not_a_name}", "/certManager/agentDnsNames/0"),
        ("controlerr.replicas=1", "additional properties 'controlerr' not allowed"),
    ] {
        let err = helm(&["template", RELEASE, &chart(), "--set", set]).unwrap_err();
        assert!(err.contains(path), "--set {set}: {err}");
    }
    // Install refuses the same way, before anything reaches the cluster.
    let ns = format!("vmr-schema-{}", std::process::id());
    let err = helm(&[
        "install",
        RELEASE,
        &chart(),
        "-n",
        &ns,
        "--create-namespace",
        "--set",
        "controller.replicas=0",
    ])
    .unwrap_err();
    assert!(err.contains("/controller/replicas"), "{err}");
    let listed = Command::new("kubectl")
        .args(["get", "deploy,ds,sa", "-n", &ns, "-o", "name"])
        .env("KUBECONFIG", cluster_kubeconfig())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&listed.stdout).trim(), "", "nothing installed");
}

#[test]
fn every_optional_part_renders_and_lints() {
    assert!(helm(&["lint", &chart()]).is_ok(), "helm lint");
    let all = helm(&[
        "template",
        RELEASE,
        &chart(),
        "-n",
        "dr",
        "--set",
        "certManager.enabled=true",
        "--set",
        "certManager.agentDnsNames={host1.site-a.example.com}",
        "--set",
        "podMonitor.enabled=true",
        "--set",
        "prometheusRule.enabled=true",
    ])
    .unwrap();
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&all)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for k in [
        "Deployment",
        "DaemonSet",
        "PodDisruptionBudget",
        "Issuer",
        "Certificate",
        "PodMonitor",
        "PrometheusRule",
    ] {
        assert!(kinds.contains(&k), "{k} missing from {kinds:?}");
    }
    // The agents' certificate names what the agents announce and what the
    // other site matches; it lands in the Secret the pods mount.
    let cert = docs
        .iter()
        .find(|d| d["kind"] == "Certificate" && d["metadata"]["name"] == "vmr-vmreplica-agent")
        .unwrap();
    let names: Vec<&str> =
        cert["spec"]["dnsNames"].as_sequence().unwrap().iter().filter_map(|v| v.as_str()).collect();
    assert_eq!(names, ["vmr-vmreplica-agent.dr.svc", "host1.site-a.example.com"]);
    assert_eq!(cert["spec"]["secretName"], "vmr-vmreplica-agent-tls");
    let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    let args = ds["spec"]["template"]["spec"]["containers"][0]["args"].as_sequence().unwrap();
    assert!(args.iter().any(|a| a == "--server-name=vmr-vmreplica-agent.dr.svc"), "{args:?}");
    assert_eq!(
        ds["spec"]["template"]["spec"]["volumes"][0]["secret"]["secretName"],
        "vmr-vmreplica-agent-tls"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_installs_replicates_upgrades_and_uninstalls_keeping_the_replicas() {
    let client = client_for(&cluster_kubeconfig()).await.unwrap();
    let ns = format!("vmr-chart-{}", std::process::id());
    let dr = format!("{ns}-dr");
    for n in [&ns, &dr] {
        let obj: Namespace = serde_json::from_value(json!({"metadata": {"name": n}})).unwrap();
        Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &obj).await.unwrap();
    }
    let dir = tempfile::Builder::new().prefix("vmreplica-chart-").tempdir().unwrap();
    let root = dir.path();
    let ca = Ca::new("chart-ca").unwrap();
    let server = format!("{RELEASE}-vmreplica-agent.{ns}.svc");
    tls_secret(&client, &ns, "vmr-vmreplica-controller-tls", &material(&ca, &["vmreplica-controller"])).await;
    tls_secret(&client, &ns, "agent-a-tls", &material(&ca, &[&server, "host1.site-a.test", "127.0.0.1"]))
        .await;
    tls_secret(&client, &ns, "agent-b-tls", &material(&ca, &[&server, "replica.site-b.test", "127.0.0.1"]))
        .await;

    // Two pools on the one node, as two sites: A serves disks, B receives.
    let (a_run, b_run, disks, replicas) =
        (root.join("a-run"), root.join("b-run"), root.join("disks"), root.join("replicas"));
    let pool = |name: &str, roles: &[&str], tls: &str, run: &Path| {
        json!({"name": name, "roles": roles, "agentName": format!("site-{name}"), "advertiseHost": "127.0.0.1",
               "listenAddress": "127.0.0.1", "controlPort": free_port(), "replicationPort": free_port(),
               "metricsPort": free_port(), "socketDir": run, "tlsSecretName": tls,
               "diskRoots": [disks], "replicaRoots": [replicas], "resolve": ["replica.site-b.test=127.0.0.1"]})
    };
    let values = json!({
        "image": {"registry": "localhost/vmreplica", "tag": "dev", "pullPolicy": "Never"},
        "apiServer": {"host": "127.0.0.1", "port": "16443"},
        "controller": {"replicas": 1, "hostNetwork": true, "metricsPort": free_port(), "pollSeconds": 2},
        "agents": {"pools": [pool("a", &["primary"], "agent-a-tls", &a_run), pool("b", &["replica"], "agent-b-tls", &b_run)]},
    });
    let values_file = root.join("values.yaml");
    std::fs::write(&values_file, serde_yaml::to_string(&values).unwrap()).unwrap();
    let vf = values_file.display().to_string();
    helm(&["install", RELEASE, &chart(), "-n", &ns, "-f", &vf]).unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let first = ready_pods(&pods, 3, &[]).await;
    for p in &first {
        let sa = p.spec.as_ref().unwrap().service_account_name.clone().unwrap();
        let want =
            if p.labels()["app.kubernetes.io/component"] == "controller" { "controller" } else { "agent" };
        assert_eq!(
            sa,
            format!("{RELEASE}-vmreplica-{want}"),
            "{} runs under the chart's account",
            p.name_any()
        );
    }

    // Site B: a ReplicationServer on another port than the pool's first, with
    // the pool's Secret, selecting by the pool and by a label of the Node
    // itself (the agents copy their Node's labels); an entry for site A.
    let port = free_port();
    kubectl_apply(&format!(
        "apiVersion: vmreplica.io/v1alpha1\nkind: ReplicationServer\nmetadata: {{name: chart-{ns}}}\n\
         spec: {{nodeSelector: {{vmreplica.io/pool: b, kubernetes.io/hostname: 127.0.0.1}}, port: {port},\n\
         tlsSecretName: agent-b-tls}}\n---\n\
         apiVersion: vmreplica.io/v1alpha1\nkind: AuthorizationEntry\nmetadata: {{name: chart-{ns}}}\n\
         spec: {{allowedPrimaryServer: '*.site-a.test', replicaStorageLocation: {}, trustGroup: chart, replicaNamespace: {dr}}}\n",
        replicas.join("site-a").display()
    ));
    let servers: Api<ReplicationServer> = Api::all(client.clone());
    wait_secs(60, "the ReplicationServer to be Ready", async || {
        let s = servers.get(&format!("chart-{ns}")).await.ok()?.status?;
        s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True").then_some(())
    })
    .await;

    // A VM's disk at site A, protected with kubectl.
    std::fs::create_dir_all(&disks).unwrap();
    let image = disks.join("vm1.img");
    assert!(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "raw"])
            .arg(&image)
            .arg("16M")
            .status()
            .unwrap()
            .success()
    );
    kubectl_apply(&format!(
        "apiVersion: vmreplica.io/v1alpha1\nkind: VMReplication\nmetadata: {{name: vm1, namespace: {ns}}}\n\
         spec: {{node: site-a, disks: [{{name: root, path: {}}}], replicationFrequencySeconds: 2,\n\
         replicaServer: {{name: replica.site-b.test, port: {port}}}}}\n",
        image.display()
    ));
    let vmrs: Api<VMReplication> = Api::namespaced(client.clone(), &ns);
    wait_secs(90, "the VM to replicate", async || {
        (vmrs.get("vm1").await.ok()?.status?.state == ReplicationState::Replicating).then_some(())
    })
    .await;
    let socket = a_run.join("nbd.sock");
    let export = format!("{ns}.vm1/root");
    qemu_io_write(&socket, &export, &["write -P 0x11 0 1M".into(), "write -P 0x22 5M 64k".into()]);
    let replica = replicas.join("site-a").join(format!("{ns}.vm1")).join("root").join("disk.img");
    wait_secs(60, "the replica to equal the disk", async || identical(&image, &replica).then_some(())).await;

    // An upgrade with a changed value rolls every pod; replication goes on.
    let mut values = values;
    values["controller"]["logLevel"] = json!("info,vmreplica=debug");
    for p in values["agents"]["pools"].as_array_mut().unwrap() {
        p["maxTransfers"] = json!(4);
    }
    std::fs::write(&values_file, serde_yaml::to_string(&values).unwrap()).unwrap();
    helm(&["upgrade", RELEASE, &chart(), "-n", &ns, "-f", &vf]).unwrap();
    let old: Vec<String> = first.iter().map(|p| p.uid().unwrap()).collect();
    ready_pods(&pods, 3, &old).await;
    qemu_io_write(&socket, &export, &["write -P 0x33 9M 2M".into()]);
    wait_secs(90, "the replica to follow after the upgrade", async || {
        identical(&image, &replica).then_some(())
    })
    .await;

    // A renewed certificate in the ReplicationServer's Secret (what
    // cert-manager does): served on the replication port without a restart.
    let renewed = material(&ca, &[&server, "replica.site-b.test", "127.0.0.1"]);
    tls_secret(&client, &ns, "agent-b-tls", &renewed).await;
    let client_dir = root.join("client-tls");
    write_tls(&client_dir, &material(&ca, &["host1.site-a.test"]));
    let want = serial_of(&renewed);
    wait_secs(60, "the renewed certificate on the replication port", async || {
        (presented_serial(port, &client_dir, "replica.site-b.test")? == want).then_some(())
    })
    .await;
    let b_pod = pods
        .list(&ListParams::default().labels("vmreplica.io/pool=b"))
        .await
        .unwrap()
        .items
        .into_iter()
        .next()
        .unwrap();
    let restarts = b_pod.status.unwrap().container_statuses.unwrap()[0].restart_count;
    assert_eq!(restarts, 0, "the agent was not restarted for it");

    // Least privilege, asked of the apiserver's authorizer: what each
    // component does is allowed, the rest is not.
    let (ctl, agent) = (format!("{RELEASE}-vmreplica-controller"), format!("{RELEASE}-vmreplica-agent"));
    let here = Some(ns.as_str());
    for (sa, verb, group, resource, in_ns, want) in [
        (&ctl, "patch", "vmreplica.io", "vmreplications/status", Some("anywhere"), true),
        (&ctl, "watch", "vmreplica.io", "replicationservers", None, true),
        (&ctl, "watch", "coordination.k8s.io", "leases", here, true),
        (&ctl, "watch", "coordination.k8s.io", "leases", Some("kube-system"), false),
        (&ctl, "get", "", "secrets", here, true),
        (&ctl, "list", "", "secrets", here, false),
        (&ctl, "get", "", "secrets", Some("kube-system"), false),
        (&ctl, "delete", "vmreplica.io", "vmreplications", Some("anywhere"), false),
        (&ctl, "create", "", "pods", here, false),
        (&agent, "patch", "coordination.k8s.io", "leases", here, true),
        (&agent, "get", "", "nodes", None, true),
        (&agent, "get", "", "secrets", here, false),
        (&agent, "list", "vmreplica.io", "vmreplications", Some("anywhere"), false),
        (&agent, "patch", "coordination.k8s.io", "leases", Some("kube-system"), false),
    ] {
        let got = allowed(&client, sa, &ns, verb, group, resource, in_ns).await;
        assert_eq!(got, want, "{sa} {verb} {group}/{resource} in {in_ns:?}");
    }
    // And a real request outside the grant, with the controller's own token.
    let tr: TokenRequest =
        serde_json::from_value(json!({"spec": {"audiences": [], "expirationSeconds": 600}})).unwrap();
    let token = Api::<ServiceAccount>::namespaced(client.clone(), &ns)
        .create_subresource::<TokenRequest, TokenRequest>("token", &ctl, &PostParams::default(), &tr)
        .await
        .unwrap()
        .status
        .unwrap()
        .token;
    let mut cfg = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(cluster_kubeconfig()).unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    cfg.auth_info = kube::config::AuthInfo { token: Some(token.into()), ..Default::default() };
    let as_controller = Client::try_from(cfg).unwrap();
    let err =
        Api::<Secret>::namespaced(as_controller.clone(), &ns).list(&ListParams::default()).await.unwrap_err();
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 403), "listing secrets as the controller: {err}");
    Api::<Secret>::namespaced(as_controller, &ns)
        .get("agent-b-tls")
        .await
        .expect("getting one by name is granted");

    // Uninstall: the pods go, the disk and the replica stay, byte for byte.
    helm(&["uninstall", RELEASE, "-n", &ns]).unwrap();
    wait_secs(120, "the pods to go", async || {
        let lp = ListParams::default().labels(&format!("app.kubernetes.io/instance={RELEASE}"));
        pods.list(&lp).await.ok()?.items.is_empty().then_some(())
    })
    .await;
    assert!(replica.exists() && identical(&image, &replica), "the replica outlives the release");

    // The objects the controller no longer serves keep their finalizer; a
    // user removes it (docs/install.md) before deleting them.
    let unfinalize = PatchParams::apply(FIELD_MANAGER);
    for api in [vmrs.clone(), Api::namespaced(client.clone(), &dr)] {
        for v in api.list(&ListParams::default()).await.unwrap() {
            let _ = api
                .patch(&v.name_any(), &unfinalize, &Patch::Merge(json!({"metadata": {"finalizers": null}})))
                .await;
            let _ = api.delete(&v.name_any(), &Default::default()).await;
        }
    }
    let _ = servers.delete(&format!("chart-{ns}"), &Default::default()).await;
    let _ = Api::<vmreplica_crds::AuthorizationEntry>::all(client.clone())
        .delete(&format!("chart-{ns}"), &Default::default())
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
}
