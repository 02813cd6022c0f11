//! Throw-away certificates for local runs (`hack/local-up.sh`):
//! `vmreplica-devcerts DIR NAME=SAN[,SAN...] ...` writes a CA and, per NAME,
//! `DIR/NAME/{tls.crt,tls.key,ca.crt}` — the layout of a TLS Secret.
use std::{fs, path::PathBuf, process::ExitCode};

use vmreplica_tests::pki::Ca;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((dir, specs)) = args.split_first().filter(|(_, s)| !s.is_empty()) else {
        eprintln!("usage: vmreplica-devcerts DIR NAME=SAN[,SAN...] ...");
        return ExitCode::from(2);
    };
    let run = || -> anyhow::Result<()> {
        let dir = PathBuf::from(dir);
        let ca = Ca::new("vmreplica-dev-ca")?;
        fs::create_dir_all(&dir)?;
        fs::write(dir.join("ca.crt"), &ca.cert_pem)?;
        for spec in specs {
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
