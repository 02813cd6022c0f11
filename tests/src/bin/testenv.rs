//! Runs one control plane for a whole test run (or a local session): starts
//! etcd + kube-apiserver, installs the CRDs, writes the kubeconfig to the path
//! given, and tears everything down on SIGTERM or SIGINT, so a script can run it
//! in the background and stop it from a trap.
use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use vmreplica_tests::{ControlPlane, client_for, install_crds};

/// Runs etcd and kube-apiserver on loopback with vmreplica's CRDs installed,
/// until SIGTERM or SIGINT. The binaries come from $KUBEBUILDER_ASSETS
/// (`hack/test-deps.sh` prints such a directory).
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Where to write the kubeconfig once the control plane is ready (removed on stop).
    kubeconfig_out: PathBuf,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let out = Args::parse().kubeconfig_out;
    let cp = match ControlPlane::start().await {
        Ok(cp) => cp,
        Err(e) => {
            eprintln!("vmreplica-testenv: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let setup = async {
        install_crds(&client_for(&cp.kubeconfig_path()).await?).await?;
        // Write to a temp name first: whoever waits for `out` sees it complete.
        let tmp = out.with_extension("tmp");
        std::fs::copy(cp.kubeconfig_path(), &tmp)?;
        std::fs::rename(&tmp, &out)?;
        anyhow::Ok(())
    };
    if let Err(e) = setup.await {
        eprintln!("vmreplica-testenv: {e:#}");
        return ExitCode::FAILURE;
    }
    eprintln!("vmreplica-testenv: control plane at {} (kubeconfig {})", cp.url, out.display());
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    let _ = std::fs::remove_file(&out);
    drop(cp);
    ExitCode::SUCCESS
}
