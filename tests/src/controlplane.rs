//! A real control plane on loopback: etcd and kube-apiserver as child processes,
//! envtest-style.
//!
//! ```text
//!   ControlPlane::start()
//!     ├─ etcd            127.0.0.1:<free>   data in a temp dir
//!     ├─ kube-apiserver  https://127.0.0.1:<free>
//!     │    serving cert signed by a throw-away CA, token auth, RBAC,
//!     │    service-account keys generated at start
//!     └─ kubeconfig      (CA file + bearer token of a system:masters user)
//!   drop(ControlPlane)   kills both and removes the temp dir
//! ```
//!
//! Binaries come from `KUBEBUILDER_ASSETS` (a directory holding `kube-apiserver`
//! and `etcd`), else from the cache `hack/test-deps.sh` fills. Children are spawned
//! with `PR_SET_PDEATHSIG`, so a test process that dies (panic, kill -9) takes its
//! control plane with it.

use std::{
    env, fs,
    net::TcpListener,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use kube::{
    Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
};

use crate::pki::Ca;

/// A running etcd + kube-apiserver pair.
pub struct ControlPlane {
    dir: tempfile::TempDir,
    etcd: Child,
    apiserver: Child,
    /// `https://127.0.0.1:<port>`.
    pub url: String,
}

/// Where `kube-apiserver` and `etcd` are found.
pub fn assets_dir() -> PathBuf {
    if let Some(dir) = env::var_os("KUBEBUILDER_ASSETS") {
        return PathBuf::from(dir);
    }
    let cache = env::var_os("VMREPLICA_CACHE").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache/vmreplica")
    });
    cache.join("assets")
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Spawns `bin` with output to `<dir>/<name>.log`, killed if this process dies.
fn spawn(dir: &Path, name: &str, bin: &Path, args: &[String]) -> Result<Child> {
    let log = fs::File::create(dir.join(format!("{name}.log")))?;
    let mut cmd = Command::new(bin);
    cmd.args(args).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn().with_context(|| format!("cannot start {}", bin.display()))
}

fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver and waits until `/readyz` answers ok.
    pub async fn start() -> Result<Self> {
        let assets = assets_dir();
        let (etcd_bin, apiserver_bin) = (assets.join("etcd"), assets.join("kube-apiserver"));
        for bin in [&etcd_bin, &apiserver_bin] {
            if !bin.exists() {
                bail!(
                    "{} is missing: run `hack/test-deps.sh` (builds and caches it) or set \
                     KUBEBUILDER_ASSETS to a directory holding kube-apiserver and etcd",
                    bin.display()
                );
            }
        }
        let dir = tempfile::Builder::new().prefix("vmreplica-cp-").tempdir()?;
        let d = dir.path();

        let (client_port, peer_port) = (free_port()?, free_port()?);
        let etcd_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd = spawn(
            d,
            "etcd",
            &etcd_bin,
            &[
                format!("--data-dir={}", d.join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=default={peer_url}"),
                // Test data is thrown away; fsync only slows the suite down.
                "--unsafe-no-fsync".into(),
            ],
        )?;

        let ca = Ca::new("vmreplica-test-apiserver-ca")?;
        let serving = ca.leaf("kube-apiserver", &["127.0.0.1", "localhost"])?;
        fs::write(d.join("ca.crt"), &ca.cert_pem)?;
        fs::write(d.join("apiserver.crt"), &serving.cert_pem)?;
        fs::write(d.join("apiserver.key"), &serving.key_pem)?;
        let token = random_token()?;
        fs::write(d.join("tokens.csv"), format!("{token},vmreplica-admin,1,\"system:masters\"\n"))?;
        let sa_key = d.join("sa.key");
        let status = Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&sa_key)
            .arg("2048")
            .stderr(Stdio::null())
            .status()
            .context("openssl is needed to generate the service-account key")?;
        if !status.success() {
            bail!("openssl genrsa failed: {status}");
        }

        let port = free_port()?;
        let p = |name: &str| d.join(name).display().to_string();
        let mut planes = Self {
            apiserver: spawn(
                d,
                "kube-apiserver",
                &apiserver_bin,
                &[
                    format!("--etcd-servers={etcd_url}"),
                    format!("--secure-port={port}"),
                    "--bind-address=127.0.0.1".into(),
                    "--advertise-address=127.0.0.1".into(),
                    format!("--cert-dir={}", p("certs")),
                    format!("--tls-cert-file={}", p("apiserver.crt")),
                    format!("--tls-private-key-file={}", p("apiserver.key")),
                    format!("--token-auth-file={}", p("tokens.csv")),
                    "--authorization-mode=RBAC".into(),
                    "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                    format!("--service-account-key-file={}", p("sa.key")),
                    format!("--service-account-signing-key-file={}", p("sa.key")),
                    "--service-cluster-ip-range=10.96.0.0/24".into(),
                    "--insecure-port=0".into(),
                    "--allow-privileged=true".into(),
                ],
            )?,
            etcd,
            dir,
            url: format!("https://127.0.0.1:{port}"),
        };
        write_kubeconfig(&planes.kubeconfig_path(), &planes.url, &planes.dir.path().join("ca.crt"), &token)?;
        planes.wait_ready().await?;
        Ok(planes)
    }

    /// The kubeconfig file of the admin user (for `kubectl --kubeconfig`).
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(90);
        let client = client_for(&self.kubeconfig_path()).await?;
        loop {
            for (name, child) in [("etcd", &mut self.etcd), ("kube-apiserver", &mut self.apiserver)] {
                if let Some(status) = child.try_wait()? {
                    let log = self.dir.path().join(format!("{name}.log"));
                    bail!("{name} exited ({status}) while starting:\n{}", tail(&log));
                }
            }
            let req = http::Request::get("/readyz").body(Vec::new())?;
            match client.request_text(req).await {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                _ if Instant::now() > deadline => {
                    let log = self.dir.path().join("kube-apiserver.log");
                    bail!("kube-apiserver not ready after 90s:\n{}", tail(&log));
                }
                _ => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for child in [&mut self.apiserver, &mut self.etcd] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn random_token() -> Result<String> {
    let mut bytes = [0u8; 24];
    fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn write_kubeconfig(path: &Path, url: &str, ca: &Path, token: &str) -> Result<()> {
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "vmreplica-test", "cluster": {"server": url, "certificate-authority": ca}}],
        "users": [{"name": "admin", "user": {"token": token}}],
        "contexts": [{"name": "vmreplica-test", "context": {"cluster": "vmreplica-test", "user": "admin"}}],
        "current-context": "vmreplica-test",
    });
    fs::write(path, serde_yaml::to_string(&doc)?)?;
    Ok(())
}

/// A client for the cluster a kubeconfig file points at.
pub async fn client_for(kubeconfig: &Path) -> Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig)?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}
