//! A node's protected disks as files: opening them with their logs away from
//! the async runtime, retiring them (clean shutdown, then the log goes once
//! nothing can write to it), and the log a promotion starts.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::disk::{ProtectedDisk, log_dir_for};

pub fn export_name(vm: &str, disk: &str) -> String {
    format!("{vm}/{disk}")
}

/// Opens `images` (name, path) as VM `vm_id`'s protected disks, with their
/// logs, away from the async runtime.
pub async fn open_disks(
    vm_id: &str,
    images: Vec<(String, PathBuf)>,
) -> Result<Vec<Arc<ProtectedDisk>>, String> {
    let vm = vm_id.to_owned();
    tokio::task::spawn_blocking(move || {
        images
            .iter()
            .map(|(name, path)| {
                ProtectedDisk::open(&vm, name, path)
                    .map(|(d, _)| Arc::new(d))
                    .map_err(|e| format!("disk {name}: {e}"))
            })
            .collect()
    })
    .await
    .map_err(|e| format!("opening the disks failed: {e}"))?
}

/// Shuts disks no longer served down cleanly and deletes their logs. A
/// client still connected keeps a disk (and its log) alive; the log is
/// deleted only when nothing can write to it any more.
pub async fn retire(disks: Vec<Arc<ProtectedDisk>>) {
    for d in disks {
        let d2 = d.clone();
        let _ = tokio::task::spawn_blocking(move || d2.shutdown()).await;
        match Arc::try_unwrap(d) {
            Ok(d) => {
                let dir = log_dir_for(d.path());
                drop(d);
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    tracing::warn!(dir = %dir.display(), error = %e, "removing the log");
                }
            }
            Err(d) => tracing::warn!(
                disk = d.name(),
                "a client is still connected: its log stays until the agent restarts"
            ),
        }
    }
}

/// Replaces any log of `image` with an empty one whose segments carry
/// `epoch` (that of the promotion now serving it) and whose first record
/// will be `first_seq`.
pub fn fresh_log(vm_id: &str, disk_id: &str, image: &Path, epoch: u64, first_seq: u64) -> Result<(), String> {
    let dir = log_dir_for(image);
    let io = |e: std::io::Error| e.to_string();
    let size = std::fs::metadata(image).map_err(io)?.len();
    // This promotion's own log, left by an earlier run of this agent: it
    // may hold writes not yet shipped, and is reopened (and recovered) as is.
    if crate::log::dirty::JournalState::load(&dir, size).is_ok_and(|s| s.epoch == epoch) && dir.exists() {
        return Ok(());
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io)?;
    }
    std::fs::create_dir_all(&dir).map_err(io)?;
    let mut state = crate::log::dirty::JournalState::new(size);
    state.epoch = epoch;
    state.store(&dir).map_err(io)?;
    crate::log::Journal::start_at(&dir, vm_id, disk_id, epoch, first_seq).map_err(|e| e.to_string())
}
