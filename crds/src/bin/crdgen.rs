//! Writes the CRD YAML of every vmreplica kind.
//!
//! `crdgen` prints them all to stdout as one multi-document stream;
//! `crdgen <dir>` writes one `<name>.yaml` per CRD into `<dir>` (the chart's
//! `charts/vmreplica/crds/`), which is what is committed.
use std::{fs, io::Write, path::PathBuf, process::ExitCode};

use clap::Parser;

/// Prints the CRDs of every vmreplica kind, or writes them into a directory.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Write one `<name>.yaml` per CRD here (e.g. charts/vmreplica/crds) instead of printing them.
    dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    let crds = vmreplica_crds::crds();
    match Args::parse().dir {
        None => {
            let mut out = std::io::stdout().lock();
            for crd in &crds {
                // A closed pipe (`crdgen | head`) is not an error worth a panic.
                if write!(out, "---\n{}", vmreplica_crds::crd_yaml(crd)).is_err() {
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
        Some(dir) => {
            for crd in &crds {
                let path = dir.join(vmreplica_crds::crd_file_name(crd));
                if let Err(e) = fs::write(&path, vmreplica_crds::crd_yaml(crd)) {
                    eprintln!("crdgen: cannot write {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
                eprintln!("crdgen: wrote {}", path.display());
            }
            ExitCode::SUCCESS
        }
    }
}
