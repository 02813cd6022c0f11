//! The primary's side of an initial copy by external media: once per disk,
//! the log is cut and the image exported ([`crate::media::export`]); the
//! cycle then waits, saying where the export is, until the replica site
//! imported it — its replica then expects the log from the cut, which was
//! kept meanwhile (or, once it outgrew half the disk, a dirty map that
//! starts exactly there).

use std::path::Path;

use super::{InitialMethod, ShipError, Shipper, Source};
use crate::media;

impl Shipper {
    /// How the replica's first copy comes when it is imported at the
    /// replica site rather than sent (a protected disk's, by external media
    /// or an existing image); `None`: sent over the network.
    pub(super) fn imported_copy(&self) -> Option<&InitialMethod> {
        let imported =
            self.cfg.initial != InitialMethod::Network && matches!(self.source, Source::Protected(_));
        imported.then_some(&self.cfg.initial)
    }

    /// The replica has no copy and `method` brings it: the error the cycle
    /// reports while the import is awaited (exporting first, once, for
    /// external media).
    pub(super) async fn awaiting_import(&self, method: &InitialMethod) -> Result<ShipError, ShipError> {
        match method {
            InitialMethod::ExternalMedia(dir) => self.export_for_import(dir).await,
            _ => Ok(ShipError::AwaitingInitial(format!(
                "waiting for the existing image to be placed at the replica site: there, run `vmreplica-agent \
                 import --existing IMAGE --vm {} --disk {} --storage STORAGE --primary NAME --trust-group GROUP`; \
                 a resynchronisation then sends only what differs",
                self.vm_id, self.disk_id
            ))),
        }
    }

    /// Exports this disk under `root` unless an export of it is there;
    /// returns the error the cycle reports while the import is awaited.
    async fn export_for_import(&self, root: &Path) -> Result<ShipError, ShipError> {
        let invalid =
            |e: media::MediaError| ShipError::AwaitingInitial(format!("exporting for external media: {e}"));
        let dir = media::disk_dir(root, &self.vm_id, &self.disk_id).map_err(invalid)?;
        let size = self.source.size();
        let existing = media::manifest(&dir).map_err(invalid)?;
        let m = match existing.filter(|m| m.disk_size == size && m.epoch == self.epoch) {
            Some(m) => m,
            None => {
                let next_seq = self.source.cut()?;
                let (image, to, ids, epoch) = (
                    self.source.image_path(),
                    dir.clone(),
                    (self.vm_id.clone(), self.disk_id.clone()),
                    self.epoch,
                );
                let source = self.source.clone();
                let m = tokio::task::spawn_blocking(move || {
                    media::export(&image, &to, (&ids.0, &ids.1), epoch, next_seq, || source.next_seq())
                })
                .await
                .map_err(|e| ShipError::AwaitingInitial(e.to_string()))?
                .map_err(invalid)?;
                tracing::info!(vm = %self.vm_id, disk = %self.disk_id, dir = %dir.display(), next_seq, chunks = m.chunks.len(), "exported for external media");
                m
            }
        };
        Ok(ShipError::AwaitingInitial(format!(
            "the initial copy is exported to {} (replication resumes at sequence {}, {} chunks): carry the \
             directory {} to the replica site and run `vmreplica-agent import --from DIR --storage STORAGE \
             --primary NAME --trust-group GROUP` there; writes since are kept and sent after",
            dir.display(),
            m.next_seq,
            m.chunks.len(),
            root.display()
        )))
    }
}
