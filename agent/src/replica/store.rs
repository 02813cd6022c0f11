//! The replicas one agent keeps, under the storage locations its site's
//! rules name: who may create or write to which replica (authorisation
//! entries, trust groups, and never the controller's identity), where a
//! replica lives (names from the wire become paths only as plain labels, no
//! symlinked directory is followed), and the transfer limit and recovery
//! history they share. No gRPC here: [`crate::grpc::replication`] adapts it.
//!
//! ```text
//!  <storage>/<vm>/<disk>/   one ReplicaDisk each, opened once, kept by directory
//! ```

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
};

use super::{ReplicaDisk, ReplicaError, ReplicaState, names, now_ms, retention::Policy};
use crate::{
    limits::{Limits, TransferPermit},
    metrics::Metrics,
    replication::authz::{Denied, Grant, SiteConfig},
};

/// Why a caller was refused or a replica could not be reached. Each variant
/// is one kind of answer a sender acts on differently.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Denied(#[from] Denied),
    #[error(transparent)]
    BadName(#[from] names::BadName),
    #[error("{dir} is not a plain directory (a symlink could escape the storage location {root})")]
    NotPlainDirectory { dir: PathBuf, root: PathBuf },
    #[error("{0}")]
    Precondition(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Replica(#[from] ReplicaError),
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The replica side of one agent.
pub struct ReplicaStore {
    site: RwLock<SiteConfig>,
    /// Open replicas by directory.
    disks: Mutex<HashMap<PathBuf, Arc<ReplicaDisk>>>,
    /// Hyper-V's MaximumActiveTransfers (streams beyond it wait) and the
    /// bandwidth limit, shared with what this agent sends.
    limits: Arc<Limits>,
    /// Recovery history kept for every replica of this site.
    retention: RwLock<Policy>,
    metrics: RwLock<Option<Arc<Metrics>>>,
    /// Certificate names of the controller, refused here.
    controllers: RwLock<Vec<String>>,
}

/// `<root>/<vm>/<disk>`, refusing names that are not plain labels and any
/// component that is a symlink (it could lead out of the storage location).
pub fn replica_dir(root: &Path, vm: &str, disk: &str, create: bool) -> Result<PathBuf> {
    names::check("VM id", vm)?;
    names::check("disk id", disk)?;
    if !root.is_absolute() {
        return Err(StoreError::Precondition(format!("storage location {} is not absolute", root.display())));
    }
    let mut dir = root.to_path_buf();
    for part in [vm, disk] {
        dir.push(part);
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.file_type().is_dir() => {}
            Ok(_) => return Err(StoreError::NotPlainDirectory { dir, root: root.to_owned() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                fs::create_dir_all(&dir).map_err(|source| StoreError::Io { path: dir.clone(), source })?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound("no replica".into()));
            }
            Err(source) => return Err(StoreError::Io { path: dir, source }),
        }
    }
    Ok(dir)
}

/// Every storage location of `site`'s rules, sorted, once each.
fn storage_roots(site: &SiteConfig) -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = site.entries.iter().map(|e| e.storage.clone()).collect();
    roots.extend(site.default_storage.clone());
    roots.sort();
    roots.dedup();
    roots
}

impl ReplicaStore {
    pub fn new(site: SiteConfig, limits: Arc<Limits>) -> Arc<Self> {
        Arc::new(Self {
            site: RwLock::new(site),
            disks: Mutex::default(),
            limits,
            retention: RwLock::new(Policy::default()),
            metrics: RwLock::new(None),
            controllers: RwLock::new(Vec::new()),
        })
    }

    /// Refuses these certificate names: the controller's identity may call
    /// the control API only.
    pub fn set_controller_names(&self, names: Vec<String>) {
        *self.controllers.write().unwrap_or_else(|p| p.into_inner()) =
            names.into_iter().map(|n| n.to_ascii_lowercase()).collect();
    }

    /// Also reports to these Prometheus metrics.
    pub fn set_metrics(&self, metrics: Arc<Metrics>) {
        *self.metrics.write().unwrap_or_else(|p| p.into_inner()) = Some(metrics);
    }

    pub fn metrics(&self) -> Option<Arc<Metrics>> {
        self.metrics.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Sets the recovery history kept for this site's replicas.
    pub fn set_retention(&self, policy: Policy) {
        *self.retention.write().unwrap_or_else(|p| p.into_inner()) = policy;
    }

    /// Replaces the site's rules (the controller pushes these); whether its
    /// storage locations changed (replicas there may not be open yet).
    pub fn set_site(&self, site: SiteConfig) -> bool {
        let mut current = self.site.write().unwrap_or_else(|p| p.into_inner());
        let moved = storage_roots(&current) != storage_roots(&site);
        *current = site;
        moved
    }

    pub fn site(&self) -> SiteConfig {
        self.site.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn limits(&self) -> &Arc<Limits> {
        &self.limits
    }

    /// Waits for a transfer slot.
    pub async fn transfer(&self) -> TransferPermit<'_> {
        self.limits.transfers.acquire().await
    }

    /// Authorises a caller presenting `names` under the site's rules; the
    /// controller's identity is refused whatever the rules say.
    pub fn admit(&self, names: &[String]) -> Result<Grant> {
        let controllers = self.controllers.read().unwrap_or_else(|p| p.into_inner());
        let theirs: Vec<&str> =
            names.iter().filter(|n| controllers.contains(n)).map(String::as_str).collect();
        if !theirs.is_empty() {
            return Err(Denied::ControllerIdentity { names: theirs.join(", ") }.into());
        }
        Ok(self.site().authorize(names)?)
    }

    /// Every open replica, in directory order.
    pub fn replicas(&self) -> Vec<Arc<ReplicaDisk>> {
        let disks = self.disks.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<(PathBuf, Arc<ReplicaDisk>)> =
            disks.iter().map(|(k, d)| (k.clone(), d.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v.into_iter().map(|(_, d)| d).collect()
    }

    /// The open replicas of VM `vm`, by disk id.
    pub fn of_vm(&self, vm: &str) -> Vec<Arc<ReplicaDisk>> {
        let mut v: Vec<_> = self.replicas().into_iter().filter(|d| d.state().vm_id == vm).collect();
        v.sort_by_key(|d| d.state().disk_id.clone());
        v
    }

    /// The replica of `vm`/`disk` if one is open.
    pub fn replica(&self, vm: &str, disk: &str) -> Option<Arc<ReplicaDisk>> {
        let disks = self.disks.lock().unwrap_or_else(|p| p.into_inner());
        disks.values().find(|d| d.state().vm_id == vm && d.state().disk_id == disk).cloned()
    }

    /// The epoch a VM's replicas here have reached (the newest promotion's).
    pub fn epoch_of(&self, vm: &str) -> u64 {
        self.of_vm(vm).iter().map(|d| d.state().epoch).max().unwrap_or(0)
    }

    /// The existing replica this authorised primary may write to, if any.
    pub fn existing(&self, names: &[String], vm: &str, disk: &str) -> Result<Option<Arc<ReplicaDisk>>> {
        let site = self.site();
        // Where it could be: every storage location a rule matching these names
        // points at (whatever its trust group), and the default one.
        let mut roots: Vec<PathBuf> = site
            .entries
            .iter()
            .filter(|e| names.iter().any(|n| vmreplica_api::names::matches(&e.allowed_primary_server, n)))
            .map(|e| e.storage.clone())
            .collect();
        roots.extend(site.default_storage.clone().filter(|_| site.allow_any_server));
        for root in roots {
            let dir = match replica_dir(&root, vm, disk, false) {
                Ok(d) => d,
                Err(StoreError::NotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            if !dir.join("replica.json").exists() {
                continue;
            }
            let replica = self.open_dir(&dir, || unreachable!("replica.json exists"))?;
            site.authorize_for(names, &replica.state().trust_group)?;
            return Ok(Some(replica));
        }
        Ok(None)
    }

    /// The replica in `dir`, opened (and recovered) on first use.
    pub fn open_dir(&self, dir: &Path, init: impl FnOnce() -> ReplicaState) -> Result<Arc<ReplicaDisk>> {
        let mut disks = self.disks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = disks.get(dir) {
            return Ok(d.clone());
        }
        let d = Arc::new(ReplicaDisk::open(dir, init)?);
        disks.insert(dir.to_owned(), d.clone());
        Ok(d)
    }

    /// A new replica for an authorised primary, waiting for its initial copy.
    pub fn new_replica(
        &self,
        grant: &Grant,
        vm: &str,
        disk: &str,
        size: u64,
        epoch: u64,
    ) -> Result<Arc<ReplicaDisk>> {
        let dir = replica_dir(&grant.storage, vm, disk, true)?;
        tracing::info!(primary = %grant.primary, rule = %grant.rule, dir = %dir.display(), "new replica");
        self.open_dir(&dir, || ReplicaState::new(vm, disk, size, epoch, &grant.trust_group, &grant.primary))
    }

    /// The replica an authorised primary presenting `names` writes to; it
    /// must exist and accept writes.
    pub fn require(&self, names: &[String], vm: &str, disk: &str) -> Result<Arc<ReplicaDisk>> {
        // Refuse strangers before saying whether anything exists.
        self.admit(names)?;
        let replica = self.existing(names, vm, disk)?.ok_or_else(|| {
            StoreError::Precondition(format!("no replica of {vm}/{disk} here: call Open first"))
        })?;
        if replica.state().removed() {
            return Err(StoreError::Precondition(format!(
                "replication of {vm}/{disk} was removed by its primary: call Open to start over"
            )));
        }
        Ok(replica)
    }

    /// Applies what `replica` received and prunes it by its recovery history.
    pub fn apply_and_retain(&self, replica: &ReplicaDisk) -> Result<(), ReplicaError> {
        replica.apply_pending()?;
        let site = *self.retention.read().unwrap_or_else(|p| p.into_inner());
        let policy = replica.state().history.unwrap_or(site);
        replica.apply_retention(&policy, now_ms())?;
        if let Some(m) = self.metrics() {
            let s = replica.state();
            let l = [s.vm_id.as_str(), s.disk_id.as_str()];
            m.replica_applied.with_label_values(&l).set(s.applied_through as i64);
            m.replica_points.with_label_values(&l).set(s.points.len() as i64);
        }
        Ok(())
    }

    /// Scrubs every replica (see [`super::scrub`]); the files found damaged.
    pub fn scrub_all(&self) -> usize {
        let mut damaged = 0;
        for r in self.replicas() {
            let (vm, disk) = {
                let s = r.state();
                (s.vm_id.clone(), s.disk_id.clone())
            };
            match r.scrub() {
                Ok(report) => {
                    damaged += report.damaged.len();
                    if let Some(m) = self.metrics() {
                        m.scrub_damaged.with_label_values(&[&vm, &disk]).inc_by(report.damaged.len() as u64);
                    }
                    tracing::info!(%vm, %disk, files = report.files, damaged = report.damaged.len(), "scrubbed");
                }
                Err(e) => tracing::error!(%vm, %disk, error = %e, "scrub failed"),
            }
        }
        damaged
    }

    /// Opens every replica under the site's storage locations (recovering any
    /// crash) and applies what they received but had not applied; returns how
    /// many replicas were found.
    pub fn recover_all(&self) -> Result<usize> {
        let mut found = 0;
        for root in storage_roots(&self.site()) {
            let Ok(vms) = fs::read_dir(&root) else { continue };
            for vm in vms.flatten() {
                let Ok(disks) = fs::read_dir(vm.path()) else { continue };
                for disk in disks.flatten() {
                    let dir = disk.path();
                    // Only plain directories holding a replica count.
                    if !fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir())
                        || !dir.join("replica.json").exists()
                    {
                        continue;
                    }
                    let replica = match self.open_dir(&dir, || unreachable!("replica.json exists")) {
                        Err(StoreError::Replica(ReplicaError::InUse(dir))) => {
                            tracing::warn!(dir = %dir.display(), "replica held by another agent process: left to it");
                            continue;
                        }
                        // One replica that cannot be opened (damaged, its
                        // image gone) must not keep the others closed: they
                        // would go unreported, and could not be failed over.
                        Err(e) => {
                            tracing::error!(dir = %dir.display(), error = %e, "replica cannot be opened: left closed");
                            continue;
                        }
                        Ok(r) => r,
                    };
                    if let Err(e) = self.apply_and_retain(&replica) {
                        tracing::error!(dir = %dir.display(), error = %e, "applying what the replica received failed");
                    }
                    found += 1;
                }
            }
        }
        Ok(found)
    }
}
