//! One agent: the VMs it protects ([`Node`]) and the replicas it keeps
//! ([`ReplicaStore`]), and what needs both — a promotion (a replica becomes a
//! served disk) and reverse replication (a prepared VM's disks become the
//! replicas of the side that took it over). The gRPC adapters in
//! [`crate::grpc`] translate the wire to these calls; nothing here speaks it.
//!
//! ```text
//!  grpc::control ─┐                      ┌─▶ node::Node          (primary role)
//!                 ├─▶ agent::Agent ──────┤
//!  grpc::replication ┘                   └─▶ replica::ReplicaStore (replica role)
//! ```

use std::{path::PathBuf, sync::Arc};

use crate::{
    node::{
        Node,
        spec::{ExtendSpec, FinalDisk, ProtectedVm, Served, VmSpec},
    },
    replica::{
        Lifecycle, ReplicaDisk, ReplicaError, ReplicaState,
        retention::Policy,
        store::{ReplicaStore, StoreError, replica_dir},
    },
    replication::{
        authz::{Grant, SiteConfig},
        shipper::Shipper,
    },
    site::{InForce, Settings, Site},
};

/// Why a control call failed; each is one kind of answer.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The request was refused; the controller reports the reason.
    #[error("{0}")]
    Refused(String),
    /// This agent does not play the role the call needs.
    #[error("{0}")]
    Unsupported(&'static str),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Failed(String),
    #[error("{0}")]
    Internal(String),
}

impl From<tokio::task::JoinError> for ControlError {
    fn from(e: tokio::task::JoinError) -> Self {
        Self::Internal(e.to_string())
    }
}

impl From<ReplicaError> for ControlError {
    fn from(e: ReplicaError) -> Self {
        Self::Internal(e.to_string())
    }
}

/// What an Open answers: where the sender resumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Opened {
    pub needs_initial_copy: bool,
    /// A resync began and did not finish: the image is not consistent.
    pub needs_resync: bool,
    pub next_seq: u64,
    pub epoch: u64,
}

/// What an Open of one disk says about it and its primary.
#[derive(Clone, Debug)]
pub struct OpenArgs {
    pub vm_id: String,
    pub disk_id: String,
    pub disk_size: u64,
    pub epoch: u64,
    /// The VM's recovery history (`None`: the site's).
    pub history: Option<Policy>,
    /// The primary's replication interval (0: not said).
    pub interval_seconds: u32,
    /// The copy is imported at this site: make no replica on this Open.
    pub import_awaited: bool,
}

/// Everything the control API reports on, as the agent holds it.
pub struct Snapshot {
    pub primaries: Vec<Arc<Shipper>>,
    pub replicas: Vec<Arc<ReplicaDisk>>,
    pub vms: Vec<ProtectedVm>,
    pub extended: Vec<Arc<Shipper>>,
}

/// One agent's roles: either or both may be absent (`serve` without
/// `--listen` keeps no replicas; `receive` protects no VMs).
pub struct Agent {
    node: Option<Arc<Node>>,
    store: Option<Arc<ReplicaStore>>,
    /// Shippers of the fixed `--disk` images (`serve --replicate-to`).
    fixed: Vec<Arc<Shipper>>,
    /// Limits, certificates and listener a ReplicationServer sets.
    site: Arc<Site>,
    /// One reverse-replication decision at a time: the Opens of a VM's
    /// disks arrive together, and the first one converts them all.
    reversing: tokio::sync::Mutex<()>,
}

impl Agent {
    pub fn new(
        node: Option<Arc<Node>>,
        store: Option<Arc<ReplicaStore>>,
        fixed: Vec<Arc<Shipper>>,
        site: Arc<Site>,
    ) -> Arc<Self> {
        Arc::new(Self { node, store, fixed, site, reversing: tokio::sync::Mutex::new(()) })
    }

    pub fn site(&self) -> &Arc<Site> {
        &self.site
    }

    /// What the ReplicationServer set that is in force.
    pub async fn site_in_force(&self) -> InForce {
        self.site.in_force().await
    }

    fn node(&self) -> Result<&Arc<Node>, ControlError> {
        self.node.as_ref().ok_or(ControlError::Unsupported(
            "this agent does not protect VMs (it was started with `receive` or with fixed --disk)",
        ))
    }

    pub fn store(&self) -> Result<&Arc<ReplicaStore>, ControlError> {
        self.store.as_ref().ok_or(ControlError::Unsupported(
            "this agent does not receive replication (it was not started with --listen)",
        ))
    }

    fn both(&self) -> Result<(&Arc<Node>, &Arc<ReplicaStore>), ControlError> {
        match (&self.node, &self.store) {
            (Some(n), Some(s)) => Ok((n, s)),
            _ => Err(ControlError::Unsupported(
                "this needs an agent in both roles (serve --listen): this one cannot serve a replica's disks",
            )),
        }
    }

    /// What the control API reports.
    pub async fn snapshot(&self) -> Snapshot {
        let mut primaries = self.fixed.clone();
        let (mut vms, mut extended) = (Vec::new(), Vec::new());
        if let Some(node) = &self.node {
            primaries.extend(node.all_shippers().await);
            vms = node.protected().await;
            extended = node.extended_shippers().await;
        }
        let replicas = self.store.as_ref().map(|s| s.replicas()).unwrap_or_default();
        Snapshot { primaries, replicas, vms, extended }
    }

    /// Replaces the site's rules and settings (port, limits, certificate:
    /// refused with nothing changed when one cannot be put in force);
    /// replicas under new storage locations (all of them, the first time
    /// after a restart) are opened, so that they are reported and can be
    /// promoted before any primary opens them.
    pub async fn configure_site(
        &self,
        site: SiteConfig,
        retention: Policy,
        settings: Settings,
    ) -> Result<(), ControlError> {
        let store = self.store()?.clone();
        for storage in site.entries.iter().map(|e| &e.storage).chain(&site.default_storage) {
            self.site.check_storage(storage).map_err(ControlError::Refused)?;
        }
        self.site.apply(&settings).await.map_err(ControlError::Refused)?;
        tracing::info!(rules = site.entries.len(), allow_any = site.allow_any_server, "site configured");
        let moved = store.set_site(site);
        store.set_retention(retention);
        if moved {
            tokio::task::spawn_blocking(move || store.recover_all())
                .await?
                .map_err(|e| ControlError::Refused(format!("opening the replicas: {e}")))?;
        }
        Ok(())
    }

    pub async fn enable(&self, spec: VmSpec) -> Result<Served, ControlError> {
        let node = self.node()?;
        // A disk that receives the other side's logs (replication reversed
        // onto it) is that side's replica: writing it here would corrupt it.
        if let Some(store) = &self.store {
            let canonical = |p: &std::path::Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
            for d in &spec.disks {
                let asked = canonical(std::path::Path::new(&d.path));
                let receiving = store.of_vm(&spec.vm_id).into_iter().find(|r| {
                    let s = r.state();
                    !s.promoted() && s.image.as_deref().is_some_and(|i| canonical(i) == asked)
                });
                if let Some(r) = receiving {
                    return Err(ControlError::Refused(format!(
                        "disk {} ({}) receives replication from {} (reversed onto this site after a failover): \
                         it is that side's replica now; fail the VM back to replicate from here",
                        d.name,
                        d.path,
                        r.state().primary
                    )));
                }
            }
        }
        node.enable(spec).await.map_err(ControlError::Refused)
    }

    pub async fn remove_replication(&self, vm_id: &str, uid: &str) -> bool {
        match &self.node {
            Some(node) => node.remove(vm_id, uid).await,
            None => false,
        }
    }

    pub async fn prepare_failover(&self, vm_id: &str, uid: &str) -> Result<Vec<FinalDisk>, ControlError> {
        self.node()?.prepare_failover(vm_id, uid).await.map_err(ControlError::Refused)
    }

    /// The replica of `vm`/`disk` here, for a copy called `name`.
    fn replica_for(&self, vm: &str, disk: &str, name: &str) -> Result<Arc<ReplicaDisk>, ControlError> {
        crate::replica::names::check("copy name", name).map_err(|e| ControlError::Invalid(e.to_string()))?;
        self.store()?
            .replica(vm, disk)
            .ok_or_else(|| ControlError::NotFound(format!("no replica of {vm}/{disk} on this agent")))
    }

    /// Writes point `seq` (0: the newest) of `vm`/`disk` as copy `name`.
    pub async fn materialize(
        &self,
        vm: &str,
        disk: &str,
        seq: u64,
        name: &str,
    ) -> Result<(PathBuf, u64), ControlError> {
        let replica = self.replica_for(vm, disk, name)?;
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || replica.materialize_named(seq, &name))
            .await?
            .map_err(|e| ControlError::Failed(e.to_string()))
    }

    /// Writes the disk's diverged point as copy `name`: its path, and the
    /// sequence it ends in its own history.
    pub async fn materialize_diverged(
        &self,
        vm: &str,
        disk: &str,
        name: &str,
    ) -> Result<(PathBuf, u64), ControlError> {
        let replica = self.replica_for(vm, disk, name)?;
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || replica.materialize_diverged_named(&name))
            .await?
            .map_err(|e| ControlError::Failed(e.to_string()))
    }

    /// Discards the disk's diverged point; whether there was one.
    pub async fn discard_diverged(&self, vm: &str, disk: &str) -> Result<bool, ControlError> {
        let replica = self.replica_for(vm, disk, "diverged")?;
        tokio::task::spawn_blocking(move || replica.discard_diverged())
            .await?
            .map_err(|e| ControlError::Failed(e.to_string()))
    }

    pub fn delete_materialized(&self, vm: &str, disk: &str, name: &str) -> Result<bool, ControlError> {
        Ok(self.replica_for(vm, disk, name)?.delete_materialized(name)?)
    }

    /// Removes replication at this replica site: the disk and points stay.
    pub fn remove_replica(&self, vm: &str, disk: &str) -> Result<bool, ControlError> {
        let Some(replica) = self.store.as_ref().and_then(|s| s.replica(vm, disk)) else { return Ok(false) };
        replica.mark_removed_at_replica()?;
        tracing::info!(vm, disk, "replication removed at the replica site; the disk stays");
        Ok(true)
    }

    pub async fn extend(&self, spec: ExtendSpec) -> Result<(), ControlError> {
        let (node, store) = self.both()?;
        let replicas = store.of_vm(&spec.vm_id);
        node.extend(spec, replicas).await.map_err(ControlError::Refused)
    }

    /// Serves the VM's replicas here as its disks. Planned failover (no
    /// `copy_name`): once the primary finished, every disk is applied and
    /// its epoch moves on. Unplanned: the materialised copies `copy_name`
    /// are served (`complete` also ends the failover: the old primary is
    /// refused, the other points folded away). Idempotent.
    pub async fn promote(
        &self,
        vm_id: &str,
        uid: &str,
        copy_name: &str,
        complete: bool,
    ) -> Result<Served, ControlError> {
        let (node, store) = self.both()?;
        let disks = store.of_vm(vm_id);
        if disks.is_empty() {
            return Err(ControlError::Refused(format!("no replica of {vm_id} on this agent")));
        }
        // An extended replica gets what was kept for it first, so that it
        // can follow the promoted log (a failover without reverse resumes to it).
        if !node.finish_extended(vm_id).await {
            tracing::warn!(vm = %vm_id, "the extended replica did not get everything before the promotion: it will need a resynchronisation");
        }
        let mut images = Vec::new();
        if !copy_name.is_empty() {
            for d in disks {
                let (path, seq) = (d.materialized_path(copy_name), d.materialized_seq(copy_name));
                let Some(seq) = seq.filter(|_| path.exists()) else {
                    return Err(ControlError::Refused(format!(
                        "disk {}: no copy {copy_name} to serve: materialise the recovery point first",
                        d.state().disk_id
                    )));
                };
                if complete {
                    let d = d.clone();
                    tokio::task::spawn_blocking(move || d.complete_unplanned()).await??;
                }
                images.push((d.state().disk_id.clone(), path, seq + 1));
            }
            if complete {
                // Served since the failover began, under the old epoch.
                node.raise_epoch(vm_id, store.epoch_of(vm_id)).await.map_err(ControlError::Refused)?;
            }
        } else {
            for d in &disks {
                let s = d.state().clone();
                if !s.promoted() && s.primary_final_seq().is_none_or(|f| s.received_through < f) {
                    return Err(ControlError::Refused(format!(
                        "disk {}: the primary has not finished its part (its final log is not here): request the \
                         planned failover on the primary first",
                        s.disk_id
                    )));
                }
            }
            for d in disks {
                let d2 = d.clone();
                let path = tokio::task::spawn_blocking(move || d2.promote()).await??;
                let (disk_id, next) = {
                    let s = d.state();
                    (s.disk_id.clone(), s.applied_through + 1)
                };
                images.push((disk_id, path, next));
            }
        }
        node.adopt(vm_id, uid, images, store.epoch_of(vm_id)).await.map_err(ControlError::Refused)
    }

    /// Opens, or re-opens after a break, replication of one disk for the
    /// primary presenting `names`: where it resumes, or why it may not.
    pub async fn open(&self, names: &[String], a: OpenArgs) -> Result<Opened, StoreError> {
        let store = self.store.as_ref().ok_or_else(no_store)?;
        crate::replica::names::check("VM id", &a.vm_id)?;
        crate::replica::names::check("disk id", &a.disk_id)?;
        let grant = store.admit(names)?;
        crate::replica::check_epoch(a.epoch).and_then(|()| crate::replica::check_disk_size(a.disk_size))?;
        // Only a promoted side (epoch > 0) may reverse onto this one.
        let _reversing = if a.epoch > 0 { Some(self.reversing.lock().await) } else { None };
        let replica = match store.existing(names, &a.vm_id, &a.disk_id)? {
            // The VM was failed over to the sender and back; a newer
            // promotion than ours and our VM prepared mean: reverse again.
            Some(x) if x.state().promoted() && a.epoch > x.state().epoch => {
                self.fail_back_onto_promoted(store, &grant, &a).await?;
                x
            }
            Some(x) => x,
            None => match self.reverse_onto_own(store, &a.vm_id, &grant, a.epoch).await? {
                Some(disks) => disks
                    .into_iter()
                    .find(|x| x.state().disk_id == a.disk_id)
                    .ok_or_else(|| StoreError::NotFound(format!("{} has no disk {}", a.vm_id, a.disk_id)))?,
                // The copy is to be imported here (`vmreplica-agent import`):
                // none made now, which would hold the directory.
                None if a.import_awaited => {
                    return Ok(Opened {
                        needs_initial_copy: true,
                        needs_resync: false,
                        next_seq: 1,
                        epoch: 0,
                    });
                }
                None => store.new_replica(&grant, &a.vm_id, &a.disk_id, a.disk_size, a.epoch)?,
            },
        };
        accept_open(&replica, &a)
    }

    /// The sender promoted its copy after this side took the VM over and
    /// failed it back: this side's VM, prepared, becomes a replica again.
    async fn fail_back_onto_promoted(
        &self,
        store: &ReplicaStore,
        grant: &Grant,
        a: &OpenArgs,
    ) -> Result<(), StoreError> {
        let current = store.epoch_of(&a.vm_id);
        let Some(node) = &self.node else {
            return Err(ReplicaError::StaleEpoch { current, found: a.epoch }.into());
        };
        // Its disks are these replicas' images (one state lock at a time:
        // image() takes it too).
        let disk = |r: &Arc<ReplicaDisk>| r.state().disk_id.clone();
        let images = store.of_vm(&a.vm_id).iter().map(|r| (disk(r), r.image())).collect();
        let Some(released) = node.release_prepared(&a.vm_id, Some(images)).await else {
            return Err(StoreError::Precondition(format!(
                "{} runs here (promoted at epoch {current}) and was not failed over back: a planned failover must \
                 first stop it here",
                a.vm_id
            )));
        };
        for other in store.of_vm(&a.vm_id) {
            let disk = other.state().disk_id.clone();
            // What this side logged while it ran the VM, up to the end, on
            // the image it ran on (after an unplanned failover, the copy of
            // the chosen point, not the replica's own image).
            let (served, through) = released
                .iter()
                .find(|(name, ..)| *name == disk)
                .map(|(_, path, last)| (path.clone(), *last))
                .ok_or_else(|| StoreError::NotFound(format!("{} served no disk {disk}", a.vm_id)))?;
            let image = (served != other.dir().join("disk.img")).then_some(served);
            other.reverse(a.epoch, grant.primary.clone(), grant.trust_group.clone(), image, through)?;
        }
        tracing::info!(primary = %grant.primary, epoch = a.epoch, "failed back: replicating the other way again");
        Ok(())
    }

    /// Reverse replication: when this agent prepared `vm` for a planned
    /// failover, its disks stop being served and become replicas of the
    /// promoted side (whose images equal them), each kept under the grant's
    /// storage and applying onto the disk itself. `None` when `vm` is not
    /// prepared here (or the sender was never promoted).
    async fn reverse_onto_prepared(
        &self,
        store: &ReplicaStore,
        vm: &str,
        grant: &Grant,
        epoch: u64,
    ) -> Result<Option<Vec<Arc<ReplicaDisk>>>, StoreError> {
        let Some(node) = self.node.as_ref().filter(|_| epoch > 0) else { return Ok(None) };
        let Some(disks) = node.release_prepared(vm, None).await else { return Ok(None) };
        let mut out = Vec::new();
        for (disk_id, path, through) in disks {
            let (size, dir) = home_of(&path, grant, vm, &disk_id)?;
            let init = || ReplicaState {
                lifecycle: Lifecycle::Receiving,
                received_through: through,
                applied_through: through,
                image: Some(path.clone()),
                ..ReplicaState::new(vm, &disk_id, size, epoch, &grant.trust_group, &grant.primary)
            };
            let replica = store.open_dir(&dir, init)?;
            if replica.state().image.as_deref() != Some(path.as_path()) {
                // A replica of another direction was left here: take it over.
                replica.reverse(
                    epoch,
                    grant.primary.clone(),
                    grant.trust_group.clone(),
                    Some(path.clone()),
                    through,
                )?;
            }
            tracing::info!(vm, disk = %disk_id, image = %path.display(), epoch, "reverse replication onto the old primary's disk");
            out.push(replica);
        }
        Ok(Some(out))
    }

    /// Reverse replication onto the disks this node serves as the VM's:
    /// prepared for a planned failover (both sides hold the same bytes), or
    /// still held as its primary under an older epoch after an unplanned
    /// failover (what they hold is set aside as a diverged point and a
    /// resync follows). `None`: neither (a new replica is made).
    async fn reverse_onto_own(
        &self,
        store: &ReplicaStore,
        vm: &str,
        grant: &Grant,
        epoch: u64,
    ) -> Result<Option<Vec<Arc<ReplicaDisk>>>, StoreError> {
        if let Some(disks) = self.reverse_onto_prepared(store, vm, grant, epoch).await? {
            return Ok(Some(disks));
        }
        let Some(node) = self.node.as_ref().filter(|_| epoch > 0) else { return Ok(None) };
        let Some(disks) = node.release_diverged(vm, epoch).await.map_err(StoreError::Precondition)? else {
            return Ok(None);
        };
        let mut out = Vec::new();
        for (disk_id, path, through, own_epoch) in disks {
            let (size, dir) = home_of(&path, grant, vm, &disk_id)?;
            let init = || ReplicaState {
                image: Some(path.clone()),
                ..ReplicaState::new(vm, &disk_id, size, own_epoch, &grant.trust_group, &grant.primary)
            };
            let replica = store.open_dir(&dir, init)?;
            replica.set_aside(
                own_epoch,
                grant.primary.clone(),
                grant.trust_group.clone(),
                path.clone(),
                through,
            )?;
            tracing::info!(vm, disk = %disk_id, image = %path.display(), through, "the old primary's disk becomes a replica; what it holds is kept as a diverged point");
            out.push(replica);
        }
        Ok(Some(out))
    }

    /// Planned failover: the primary stopped writing and everything through
    /// `last_seq` is durable here; the replica may be promoted.
    pub fn finalize(&self, names: &[String], vm: &str, disk: &str, last_seq: u64) -> Result<(), StoreError> {
        let replica = self.store.as_ref().ok_or_else(no_store)?.require(names, vm, disk)?;
        if last_seq > crate::log::format::MAX_SEQ {
            let why = "sequence numbers run from 1 to 2^62";
            return Err(ReplicaError::Invalid { field: "last_seq", value: last_seq, why }.into());
        }
        let through = replica.state().received_through;
        if through < last_seq {
            return Err(StoreError::Precondition(format!(
                "the replica holds through {through}, not the final {last_seq}: ship the rest first"
            )));
        }
        replica.set_final(Some(last_seq))?;
        tracing::info!(vm, disk, last = last_seq, "the primary finished: ready for a planned failover");
        Ok(())
    }

    /// The primary removed replication of this disk: the replica keeps its
    /// disk and points and accepts nothing more. Whether there was one to
    /// remove (a promoted copy is the VM's disk now: it is not taken away).
    pub fn remove(&self, names: &[String], vm: &str, disk: &str) -> Result<bool, StoreError> {
        let store = self.store.as_ref().ok_or_else(no_store)?;
        crate::replica::names::check("VM id", vm)?;
        crate::replica::names::check("disk id", disk)?;
        store.admit(names)?;
        let Some(replica) = store.existing(names, vm, disk)? else { return Ok(false) };
        if replica.state().promoted() {
            return Ok(false);
        }
        replica.mark_removed()?;
        tracing::info!(vm, disk, "replication removed by the primary; the replica's disk stays");
        Ok(true)
    }

    /// Shuts every protected disk down cleanly.
    pub async fn shutdown(&self) {
        if let Some(node) = &self.node {
            node.shutdown().await;
        }
    }
}

/// The size of the old primary's disk `image` and the directory its
/// replica state is kept in, under the grant's storage.
fn home_of(
    image: &std::path::Path,
    grant: &Grant,
    vm: &str,
    disk_id: &str,
) -> Result<(u64, PathBuf), StoreError> {
    let size =
        std::fs::metadata(image).map_err(|source| StoreError::Io { path: image.to_owned(), source })?.len();
    Ok((size, replica_dir(&grant.storage, vm, disk_id, true)?))
}

fn no_store() -> StoreError {
    StoreError::Precondition("this agent keeps no replicas".into())
}

/// The checks and updates of an Open on the replica it names.
fn accept_open(replica: &ReplicaDisk, a: &OpenArgs) -> Result<Opened, StoreError> {
    if replica.state().promoted() {
        return Err(ReplicaError::StaleEpoch { current: replica.state().epoch, found: a.epoch }.into());
    }
    if replica.state().removed_at_replica() {
        return Err(StoreError::Precondition(format!(
            "replication of {}/{} was removed at the replica site (its Replica object was deleted); to replicate \
             again, delete the primary's VMReplication and create it again",
            a.vm_id, a.disk_id
        )));
    }
    if replica.state().removed() {
        tracing::info!("replication was removed before: starting over with an initial copy");
        replica.restart_after_removal()?;
    }
    replica.touch();
    // An Open means the primary replicates: any planned-failover final is withdrawn.
    replica.set_final(None)?;
    replica.set_history(a.history)?;
    if a.interval_seconds != 0 && replica.state().primary_interval_seconds != a.interval_seconds {
        replica.set_primary_interval(a.interval_seconds)?;
    }
    let s = replica.state().clone();
    if s.disk_size != a.disk_size {
        return Err(StoreError::Precondition(format!(
            "the replica is {} bytes, the primary disk {}: resize is not supported",
            s.disk_size, a.disk_size
        )));
    }
    if a.epoch < s.epoch {
        return Err(ReplicaError::StaleEpoch { current: s.epoch, found: a.epoch }.into());
    }
    Ok(Opened {
        needs_initial_copy: !s.has_copy(),
        needs_resync: matches!(s.lifecycle, Lifecycle::Resyncing { .. }) || s.resync_wanted,
        next_seq: s.received_through + 1,
        epoch: s.epoch,
    })
}
