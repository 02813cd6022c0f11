//! Pieces the end-to-end tests share: the workspace's binaries as child
//! processes, certificates on disk, free ports, polling, and a bare HTTP GET.

use std::{
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use vmreplica_api::tls::TlsMaterial;

use crate::pki::Ca;

/// A binary of this workspace, built next to the test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let bin = exe.parent().and_then(|deps| deps.parent()).expect("target/debug").join(name);
    assert!(bin.exists(), "{} is missing: run `cargo build --workspace` first", bin.display());
    bin
}

/// A child process killed (SIGKILL) when dropped.
pub struct Process(pub Child);

impl Process {
    /// Starts `cmd` and waits for it to print `ready`; its stderr goes to `log`.
    pub fn spawn_ready(mut cmd: Command, log: &Path) -> Self {
        let stderr = fs::File::create(log).expect("creating the process log");
        let mut child = cmd.stdout(Stdio::piped()).stderr(stderr).spawn().expect("starting the process");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("piped stdout")).read_line(&mut line).ok();
        if line.trim() != "ready" {
            let _ = child.kill();
            panic!("{cmd:?} did not start: {}", fs::read_to_string(log).unwrap_or_default());
        }
        Self(child)
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The arguments that make an agent announce itself: a Lease for `node` in
/// `namespace`, through the apiserver of `kubeconfig`, reachable on loopback.
pub fn lease_args(namespace: &str, node: &str, kubeconfig: &Path) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> =
        ["--lease-namespace", namespace, "--node", node, "--advertise-host", "127.0.0.1", "--kubeconfig"]
            .iter()
            .map(Into::into)
            .collect();
    args.push(kubeconfig.into());
    args
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A leaf certificate signed by `ca` for `names` (the first is the common name).
pub fn material(ca: &Ca, names: &[&str]) -> TlsMaterial {
    let l = ca.leaf(names[0], names).unwrap();
    TlsMaterial { cert_pem: l.cert_pem, key_pem: l.key_pem, ca_pem: ca.cert_pem.clone() }
}

/// [`material`], checked and ready for connections.
pub fn live(ca: &Ca, names: &[&str]) -> std::sync::Arc<vmreplica_api::tls::LiveTls> {
    vmreplica_api::tls::LiveTls::new(material(ca, names)).expect("a certificate the test CA issued")
}

/// Writes `m` as tls.crt, tls.key and ca.crt under `dir`.
pub fn write_tls(dir: &Path, m: &TlsMaterial) {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("tls.crt"), &m.cert_pem).unwrap();
    fs::write(dir.join("tls.key"), &m.key_pem).unwrap();
    fs::write(dir.join("ca.crt"), &m.ca_pem).unwrap();
}

/// Polls `f` every 200 ms until it returns something, for at most `secs` seconds.
pub async fn wait_secs<T>(secs: u64, what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if std::time::Instant::now() > deadline {
            panic!("timed out after {secs}s waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// [`wait_secs`] with 30 seconds.
pub async fn wait_for<T>(what: &str, f: impl AsyncFnMut() -> Option<T>) -> T {
    wait_secs(30, what, f).await
}

/// The status code of an HTTP response.
pub fn code(response: &str) -> &str {
    response.split_whitespace().nth(1).unwrap_or("")
}

/// GET `path` with a minimal HTTP/1.0 request; returns the whole response.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// The serial number (upper-case hex) of the certificate the server on
/// loopback `port` presents as `server_name`, as `openssl s_client` (a
/// client nobody here wrote) sees it, with the client certificate in
/// `client_dir`; `None` when no handshake completes.
pub fn presented_serial(port: u16, client_dir: &Path, server_name: &str) -> Option<String> {
    let script = format!(
        "openssl s_client -connect 127.0.0.1:{port} -servername {server_name} -cert {d}/tls.crt -key \
         {d}/tls.key -CAfile {d}/ca.crt </dev/null 2>/dev/null | openssl x509 -noout -serial",
        d = client_dir.display()
    );
    let out = std::process::Command::new("sh").args(["-c", &script]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim().strip_prefix("serial=").map(|s| s.to_ascii_uppercase())
}

/// The serial number of `m`'s certificate, as [`presented_serial`] says it.
pub fn serial_of(m: &TlsMaterial) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-serial"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("running openssl");
    child.stdin.take().expect("piped stdin").write_all(m.cert_pem.as_bytes()).expect("writing the PEM");
    let out = child.wait_with_output().expect("openssl's output");
    String::from_utf8_lossy(&out.stdout).trim().trim_start_matches("serial=").to_ascii_uppercase()
}
