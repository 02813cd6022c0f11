//! Throw-away certificates for local runs (`hack/local-up.sh`):
//! `vmreplica-devcerts DIR NAME=SAN[,SAN...] ...` writes a CA and, per NAME,
//! `DIR/NAME/{tls.crt,tls.key,ca.crt}` — the layout of a TLS Secret.
use std::{fs, path::PathBuf, process::ExitCode};

use clap::Parser;
use vmreplica_tests::pki::Ca;

/// Writes a throw-away CA and leaf certificates signed by it, for local runs.
/// Not for production: the CA key is not kept.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Directory to write `ca.crt` and one `NAME/{tls.crt,tls.key,ca.crt}` per leaf into.
    dir: PathBuf,
    /// A leaf as NAME=SAN[,SAN...] (DNS names or IP addresses; the first is the common name).
    #[arg(required = true)]
    leaves: Vec<String>,
}

fn main() -> ExitCode {
    let Args { dir, leaves: specs } = Args::parse();
    let run = || -> anyhow::Result<()> {
        let ca = Ca::new("vmreplica-dev-ca")?;
        fs::create_dir_all(&dir)?;
        fs::write(dir.join("ca.crt"), &ca.cert_pem)?;
        for spec in &specs {
            let (name, sans) =
                spec.split_once('=').ok_or_else(|| anyhow::anyhow!("{spec}: expected NAME=SAN[,SAN...]"))?;
            let sans: Vec<&str> = sans.split(',').collect();
            let leaf = ca.leaf(sans[0], &sans)?;
            let d = dir.join(name);
            fs::create_dir_all(&d)?;
            fs::write(d.join("tls.crt"), leaf.cert_pem)?;
            fs::write(d.join("tls.key"), leaf.key_pem)?;
            fs::write(d.join("ca.crt"), &ca.cert_pem)?;
        }
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmreplica-devcerts: {e:#}");
            ExitCode::FAILURE
        }
    }
}
