//! Writes the CRD YAML of every vmreplica kind.
//!
//! `crdgen` prints them all to stdout as one multi-document stream;
//! `crdgen <dir>` writes one `<name>.yaml` per CRD into `<dir>` (the chart's
//! `charts/vmreplica/crds/`), which is what is committed.
use std::{env, fs, io::Write, path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let crds = vmreplica_crds::crds();
    match env::args_os().nth(1).map(PathBuf::from) {
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
