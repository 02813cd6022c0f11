//! The replica's gRPC service (`vmreplica.replication.v1.Replication`).
//!
//! Every call: the client certificate's DNS names are authorised against the
//! site's rules (nothing is created or written before that), names from the
//! wire are checked before they become paths, and chunk and decompressed sizes
//! are bounded. A segment is acknowledged only once durable and verified;
//! applying it happens after, in the background.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
};

use prost::Message;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status, Streaming};

use super::{
    authz::{Denied, SiteConfig},
    proto::{
        CopyAck, CopyChunk, DiskRef, FinalizeRequest, OpenReply, OpenRequest, RefusalKind, RemoveAck,
        SegmentAck, SegmentChunk, replication_server::Replication,
    },
    tls::dns_names,
};
use crate::{
    metrics::Metrics,
    replica::{
        Incoming, ReplicaDisk, ReplicaError, ReplicaState,
        disk::{check_disk_size, check_epoch},
        names,
        retention::Policy,
    },
};

/// Largest chunk, raw or compressed, a sender may send.
pub const MAX_CHUNK: usize = 4 << 20;
/// Largest gRPC message accepted (a chunk plus its envelope).
pub const MAX_FRAME: usize = MAX_CHUNK + (64 << 10);

/// The replica side of one agent.
pub struct ReplicaService {
    site: RwLock<SiteConfig>,
    /// Open replicas by directory.
    disks: Mutex<HashMap<PathBuf, Arc<ReplicaDisk>>>,
    /// Hyper-V's MaximumActiveTransfers: streams beyond it wait.
    transfers: Semaphore,
    max_transfers: usize,
    /// Recovery history kept for every replica of this site.
    retention: RwLock<Policy>,
    metrics: RwLock<Option<Arc<Metrics>>>,
    /// The VMs this agent serves as primary, when it does both roles: a
    /// VM prepared for a planned failover becomes the replica of its
    /// promoted side here (reverse replication).
    node: std::sync::OnceLock<Arc<crate::node::Node>>,
    /// One reverse-replication decision at a time: the Opens of a VM's
    /// disks arrive together, and the first one converts them all.
    reversing: tokio::sync::Mutex<()>,
    /// Certificate names of the controller, refused here.
    controllers: RwLock<Vec<String>>,
}

fn denied(d: Denied) -> Status {
    Status::permission_denied(d.to_string())
}

/// The gRPC status for a replica error: what the sender should do differs per kind.
pub fn status(e: ReplicaError) -> Status {
    let msg = e.to_string();
    if let ReplicaError::StaleEpoch { current, .. } = e {
        let refusal = super::proto::Refusal { kind: RefusalKind::StaleEpoch as i32, current_epoch: current };
        return Status::with_details(tonic::Code::FailedPrecondition, msg, refusal.encode_to_vec().into());
    }
    match e {
        ReplicaError::Verification { .. } => Status::data_loss(msg),
        ReplicaError::OutOfOrder { .. } | ReplicaError::ChunkOutOfOrder { .. } => Status::out_of_range(msg),
        ReplicaError::StaleEpoch { .. } | ReplicaError::NoInitialCopy => Status::failed_precondition(msg),
        ReplicaError::Mismatch { .. } | ReplicaError::Invalid { .. } => Status::invalid_argument(msg),
        ReplicaError::TooLarge { .. } => Status::resource_exhausted(msg),
        ReplicaError::NoSuchPoint(_) => Status::not_found(msg),
        ReplicaError::Io { .. } | ReplicaError::BadState { .. } => Status::internal(msg),
    }
}

fn peer_names<T>(req: &Request<T>) -> Vec<String> {
    req.peer_certs().and_then(|c| c.first().map(|c| dns_names(c.as_ref()))).unwrap_or_default()
}

/// `<root>/<vm>/<disk>`, refusing names that are not plain labels and any
/// component that is a symlink (it could lead out of the storage location).
pub fn replica_dir(root: &Path, vm: &str, disk: &str, create: bool) -> Result<PathBuf, Status> {
    names::check("VM id", vm).map_err(|e| Status::invalid_argument(e.to_string()))?;
    names::check("disk id", disk).map_err(|e| Status::invalid_argument(e.to_string()))?;
    if !root.is_absolute() {
        return Err(Status::failed_precondition(format!(
            "storage location {} is not absolute",
            root.display()
        )));
    }
    let mut dir = root.to_path_buf();
    for part in [vm, disk] {
        dir.push(part);
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.file_type().is_dir() => {}
            Ok(_) => {
                return Err(Status::permission_denied(format!(
                    "{} is not a plain directory (a symlink could escape the storage location {})",
                    dir.display(),
                    root.display()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                fs::create_dir_all(&dir).map_err(|e| Status::internal(format!("{}: {e}", dir.display())))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Status::not_found("no replica"));
            }
            Err(e) => return Err(Status::internal(format!("{}: {e}", dir.display()))),
        }
    }
    Ok(dir)
}

impl ReplicaService {
    pub fn new(site: SiteConfig, max_transfers: usize) -> Arc<Self> {
        Arc::new(Self {
            site: RwLock::new(site),
            disks: Mutex::default(),
            transfers: Semaphore::new(max_transfers.max(1)),
            max_transfers: max_transfers.max(1),
            retention: RwLock::new(Policy::default()),
            metrics: RwLock::new(None),
            node: std::sync::OnceLock::new(),
            reversing: tokio::sync::Mutex::new(()),
            controllers: RwLock::new(Vec::new()),
        })
    }

    /// Lets the promoted side of a planned failover replicate back onto
    /// the VMs `node` prepared (reverse replication).
    pub fn set_node(&self, node: Arc<crate::node::Node>) {
        let _ = self.node.set(node);
    }

    /// Reverse replication: when this agent prepared `vm` for a planned
    /// failover, its disks stop being served and become replicas of the
    /// promoted side (whose images equal them), each kept under the
    /// grant's storage and applying onto the disk itself. `None` when `vm` is not prepared here.
    async fn reverse_onto_prepared(
        &self,
        vm: &str,
        grant: &super::authz::Grant,
        epoch: u64,
    ) -> Result<Option<Vec<Arc<ReplicaDisk>>>, Status> {
        let Some(node) = self.node.get() else { return Ok(None) };
        let Some(disks) = node.release_prepared(vm).await else { return Ok(None) };
        let mut out = Vec::new();
        for (disk_id, path, through) in disks {
            let size = std::fs::metadata(&path)
                .map_err(|e| Status::internal(format!("{}: {e}", path.display())))?
                .len();
            let dir = replica_dir(&grant.storage, vm, &disk_id, true)?;
            let init = {
                let (vm, disk_id, path, grant) =
                    (vm.to_owned(), disk_id.clone(), path.clone(), grant.clone());
                move || ReplicaState {
                    vm_id: vm,
                    disk_id,
                    disk_size: size,
                    epoch,
                    trust_group: grant.trust_group,
                    primary: grant.primary,
                    has_copy: true,
                    received_through: through,
                    applied_through: through,
                    image: Some(path),
                    ..Default::default()
                }
            };
            let replica = self.open_dir(&dir, init)?;
            if replica.state().image.as_deref() != Some(path.as_path()) {
                // A replica of another direction was left here: take it over.
                replica
                    .reverse(
                        epoch,
                        grant.primary.clone(),
                        grant.trust_group.clone(),
                        Some(path.clone()),
                        through,
                    )
                    .map_err(status)?;
            }
            tracing::info!(vm, disk = %disk_id, image = %path.display(), epoch, "reverse replication onto the old primary's disk");
            out.push(replica);
        }
        Ok(Some(out))
    }

    /// Refuses these certificate names on the replication API: the
    /// controller's identity may call the control API only.
    pub fn set_controller_names(&self, names: Vec<String>) {
        *self.controllers.write().unwrap_or_else(|p| p.into_inner()) =
            names.into_iter().map(|n| n.to_ascii_lowercase()).collect();
    }

    /// Authorises a caller presenting `names` under `site`'s rules; the
    /// controller's identity is refused whatever the rules say.
    fn admit(&self, site: &SiteConfig, names: &[String]) -> Result<super::authz::Grant, Status> {
        let controllers = self.controllers.read().unwrap_or_else(|p| p.into_inner());
        let theirs: Vec<&String> = names.iter().filter(|n| controllers.contains(n)).collect();
        if !theirs.is_empty() {
            let names = theirs.iter().map(|n| n.as_str()).collect::<Vec<_>>().join(", ");
            return Err(denied(Denied::ControllerIdentity { names }));
        }
        site.authorize(names).map_err(denied)
    }

    /// Also reports to these Prometheus metrics.
    pub fn set_metrics(&self, metrics: Arc<Metrics>) {
        *self.metrics.write().unwrap_or_else(|p| p.into_inner()) = Some(metrics);
    }

    fn metrics(&self) -> Option<Arc<Metrics>> {
        self.metrics.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Counts a refusal by its gRPC code (a bounded label).
    fn counted<T>(&self, r: Result<T, Status>) -> Result<T, Status> {
        if let (Err(s), Some(m)) = (&r, self.metrics()) {
            m.refused.with_label_values(&[&format!("{:?}", s.code())]).inc();
        }
        r
    }

    /// Transfers running now (at most the limit given to [`Self::new`]).
    pub fn active_transfers(&self) -> usize {
        self.max_transfers - self.transfers.available_permits()
    }

    /// Sets the recovery history kept for this site's replicas.
    pub fn set_retention(&self, policy: Policy) {
        *self.retention.write().unwrap_or_else(|p| p.into_inner()) = policy;
    }

    fn apply_and_retain(&self, replica: &ReplicaDisk) -> Result<(), ReplicaError> {
        replica.apply_pending()?;
        let site = *self.retention.read().unwrap_or_else(|p| p.into_inner());
        let policy = replica.state().history.unwrap_or(site);
        replica.apply_retention(&policy, crate::replica::disk::now_ms())?;
        if let Some(m) = self.metrics() {
            let s = replica.state();
            let l = [s.vm_id.as_str(), s.disk_id.as_str()];
            m.replica_applied.with_label_values(&l).set(s.applied_through as i64);
            m.replica_points.with_label_values(&l).set(s.points.len() as i64);
        }
        Ok(())
    }

    /// Replaces the site's rules (the controller pushes these); whether its
    /// storage locations changed (replicas there may not be open yet).
    pub fn set_site(&self, site: SiteConfig) -> bool {
        let mut current = self.site.write().unwrap_or_else(|p| p.into_inner());
        let moved = storage_roots(&current) != storage_roots(&site);
        *current = site;
        moved
    }

    fn site(&self) -> SiteConfig {
        self.site.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Every open replica, in directory order.
    pub fn replicas(&self) -> Vec<Arc<ReplicaDisk>> {
        let disks = self.disks.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<(PathBuf, Arc<ReplicaDisk>)> =
            disks.iter().map(|(k, d)| (k.clone(), d.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v.into_iter().map(|(_, d)| d).collect()
    }

    /// The replica of `vm`/`disk` if one is open (tests, control API).
    pub fn replica(&self, vm: &str, disk: &str) -> Option<Arc<ReplicaDisk>> {
        let disks = self.disks.lock().unwrap_or_else(|p| p.into_inner());
        disks.values().find(|d| d.state().vm_id == vm && d.state().disk_id == disk).cloned()
    }

    /// The existing replica this authorised primary may write to, if any.
    fn existing(&self, names: &[String], vm: &str, disk: &str) -> Result<Option<Arc<ReplicaDisk>>, Status> {
        let site = self.site();
        // Where it could be: every storage location a rule matching these names
        // points at (whatever its trust group), and the default one.
        let mut roots: Vec<PathBuf> = site
            .entries
            .iter()
            .filter(|e| names.iter().any(|n| super::authz::matches(&e.allowed_primary_server, n)))
            .map(|e| e.storage.clone())
            .collect();
        roots.extend(site.default_storage.clone().filter(|_| site.allow_any_server));
        for root in roots {
            let dir = match replica_dir(&root, vm, disk, false) {
                Ok(d) => d,
                Err(s) if s.code() == tonic::Code::NotFound => continue,
                Err(s) => return Err(s),
            };
            if !dir.join("replica.json").exists() {
                continue;
            }
            let replica = self.open_dir(&dir, || unreachable!("replica.json exists"))?;
            site.authorize_for(names, &replica.state().trust_group).map_err(denied)?;
            return Ok(Some(replica));
        }
        Ok(None)
    }

    fn open_dir(&self, dir: &Path, init: impl FnOnce() -> ReplicaState) -> Result<Arc<ReplicaDisk>, Status> {
        let mut disks = self.disks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = disks.get(dir) {
            return Ok(d.clone());
        }
        let d = Arc::new(ReplicaDisk::open(dir, init).map_err(status)?);
        disks.insert(dir.to_owned(), d.clone());
        Ok(d)
    }

    fn require(&self, names: &[String], vm: &str, disk: &str) -> Result<Arc<ReplicaDisk>, Status> {
        if names.is_empty() {
            return Err(denied(Denied::NoDnsName));
        }
        // Refuse strangers before saying whether anything exists.
        let site = self.site();
        self.admit(&site, names)?;
        let replica = self.existing(names, vm, disk)?.ok_or_else(|| {
            Status::failed_precondition(format!("no replica of {vm}/{disk} here: call Open first"))
        })?;
        if replica.state().removed {
            return Err(Status::failed_precondition(format!(
                "replication of {vm}/{disk} was removed by its primary: call Open to start over"
            )));
        }
        Ok(replica)
    }

    #[tracing::instrument(skip_all, fields(vm, disk))]
    async fn finalize_inner(&self, req: Request<FinalizeRequest>) -> Result<Response<RemoveAck>, Status> {
        let names = peer_names(&req);
        let r = req.into_inner();
        let d = r.disk.ok_or_else(|| Status::invalid_argument("disk is required"))?;
        let replica = self.require(&names, &d.vm_id, &d.disk_id)?;
        if r.last_seq > crate::log::format::MAX_SEQ {
            return Err(status(ReplicaError::Invalid {
                field: "last_seq",
                value: r.last_seq,
                why: "sequence numbers run from 1 to 2^62",
            }));
        }
        let s = replica.state().clone();
        if s.received_through < r.last_seq {
            return Err(Status::failed_precondition(format!(
                "the replica holds through {}, not the final {}: ship the rest first",
                s.received_through, r.last_seq
            )));
        }
        replica.set_final(Some(r.last_seq)).map_err(status)?;
        tracing::info!(vm = %d.vm_id, disk = %d.disk_id, last = r.last_seq, "the primary finished: ready for a planned failover");
        Ok(Response::new(RemoveAck { removed: true }))
    }

    #[tracing::instrument(skip_all, fields(vm, disk))]
    async fn remove_inner(&self, req: Request<DiskRef>) -> Result<Response<RemoveAck>, Status> {
        let names = peer_names(&req);
        let d = req.into_inner();
        tracing::Span::current().record("vm", &d.vm_id).record("disk", &d.disk_id);
        names::check("VM id", &d.vm_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        names::check("disk id", &d.disk_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.admit(&self.site(), &names)?;
        let Some(replica) = self.existing(&names, &d.vm_id, &d.disk_id)? else {
            return Ok(Response::new(RemoveAck { removed: false }));
        };
        if replica.state().promoted {
            // The VM runs on this copy now: the old primary cannot take it away.
            return Ok(Response::new(RemoveAck { removed: false }));
        }
        replica.mark_removed().map_err(status)?;
        tracing::info!("replication removed by the primary; the replica's disk stays");
        Ok(Response::new(RemoveAck { removed: true }))
    }
}

fn decode_chunk(data: Vec<u8>, compressed: bool, raw_len: u32) -> Result<Vec<u8>, Status> {
    let raw_len = raw_len as usize;
    if raw_len > MAX_CHUNK || data.len() > MAX_CHUNK {
        return Err(Status::resource_exhausted(format!(
            "chunk of {raw_len} bytes exceeds the {MAX_CHUNK}-byte limit"
        )));
    }
    if !compressed {
        if data.len() != raw_len {
            return Err(Status::invalid_argument("chunk length differs from its raw_len"));
        }
        return Ok(data);
    }
    // Decompression into a buffer of the announced size: a frame that would
    // expand beyond it (a zstd bomb) fails instead of allocating.
    let out = zstd::bulk::decompress(&data, raw_len).map_err(|e| {
        Status::resource_exhausted(format!(
            "compressed chunk does not decompress to its announced {raw_len} bytes: {e}"
        ))
    })?;
    if out.len() != raw_len {
        return Err(Status::invalid_argument(format!(
            "chunk decompressed to {} bytes, {raw_len} announced",
            out.len()
        )));
    }
    Ok(out)
}

#[tonic::async_trait]
impl Replication for Arc<ReplicaService> {
    async fn open(&self, req: Request<OpenRequest>) -> Result<Response<OpenReply>, Status> {
        let r = self.open_inner(req).await;
        self.counted(r)
    }

    async fn push_segment(
        &self,
        req: Request<Streaming<SegmentChunk>>,
    ) -> Result<Response<SegmentAck>, Status> {
        let r = self.push_segment_inner(req).await;
        self.counted(r)
    }

    async fn push_initial_copy(
        &self,
        req: Request<Streaming<CopyChunk>>,
    ) -> Result<Response<CopyAck>, Status> {
        let r = self.push_initial_copy_inner(req).await;
        self.counted(r)
    }

    async fn remove(&self, req: Request<DiskRef>) -> Result<Response<RemoveAck>, Status> {
        let r = self.remove_inner(req).await;
        self.counted(r)
    }

    async fn finalize(&self, req: Request<FinalizeRequest>) -> Result<Response<RemoveAck>, Status> {
        let r = self.finalize_inner(req).await;
        self.counted(r)
    }
}

impl ReplicaService {
    #[tracing::instrument(skip_all, fields(vm, disk))]
    async fn open_inner(&self, req: Request<OpenRequest>) -> Result<Response<OpenReply>, Status> {
        let names = peer_names(&req);
        let r = req.into_inner();
        let d = r.disk.ok_or_else(|| Status::invalid_argument("disk is required"))?;
        tracing::Span::current().record("vm", &d.vm_id).record("disk", &d.disk_id);
        names::check("VM id", &d.vm_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        names::check("disk id", &d.disk_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let grant = self.admit(&self.site(), &names)?;
        check_epoch(r.epoch).and_then(|()| check_disk_size(r.disk_size)).map_err(status)?;
        // Only a promoted side (epoch > 0) may reverse onto this one.
        let _reversing = if r.epoch > 0 { Some(self.reversing.lock().await) } else { None };
        let replica = match self.existing(&names, &d.vm_id, &d.disk_id)? {
            // The VM was failed over to the sender and back; a newer
            // promotion than ours and our VM prepared mean: reverse again.
            Some(x) if x.state().promoted && r.epoch > x.state().epoch => {
                let current = x.state().epoch;
                let Some(node) = self.node.get() else {
                    return Err(status(ReplicaError::StaleEpoch { current, found: r.epoch }));
                };
                let Some(released) = node.release_prepared(&d.vm_id).await else {
                    return Err(Status::failed_precondition(format!(
                        "{} runs here (promoted at epoch {current}) and was not failed over back: a planned \
                         failover must first stop it here",
                        d.vm_id
                    )));
                };
                for other in self.replicas().into_iter().filter(|o| o.state().vm_id == d.vm_id) {
                    let image = other.state().image.clone();
                    let disk = other.state().disk_id.clone();
                    // What this side logged while it ran the VM, up to the end.
                    let through = released
                        .iter()
                        .find(|(name, ..)| *name == disk)
                        .map(|(.., last)| *last)
                        .ok_or_else(|| Status::internal(format!("{} served no disk {disk}", d.vm_id)))?;
                    other
                        .reverse(r.epoch, grant.primary.clone(), grant.trust_group.clone(), image, through)
                        .map_err(status)?;
                }
                tracing::info!(primary = %grant.primary, epoch = r.epoch, "failed back: replicating the other way again");
                x
            }
            Some(x) => x,
            None => {
                let reversed = if r.epoch > 0 {
                    self.reverse_onto_prepared(&d.vm_id, &grant, r.epoch).await?
                } else {
                    None
                };
                match reversed {
                    Some(disks) => disks
                        .into_iter()
                        .find(|x| x.state().disk_id == d.disk_id)
                        .ok_or_else(|| Status::not_found(format!("{} has no disk {}", d.vm_id, d.disk_id)))?,
                    None => self.new_replica(&grant, &d, r.disk_size, r.epoch)?,
                }
            }
        };
        if replica.state().promoted {
            return Err(status(ReplicaError::StaleEpoch { current: replica.state().epoch, found: r.epoch }));
        }
        if replica.state().removed_at_replica {
            return Err(Status::failed_precondition(format!(
                "replication of {}/{} was removed at the replica site (its Replica object was deleted); \
                 to replicate again, delete the primary's VMReplication and create it again",
                d.vm_id, d.disk_id
            )));
        }
        if replica.state().removed {
            tracing::info!("replication was removed before: starting over with an initial copy");
            replica.restart_after_removal().map_err(status)?;
        }
        replica.touch();
        // An Open means the primary replicates: any planned-failover final is withdrawn.
        replica.set_final(None).map_err(status)?;
        let history = r.history.map(|h| Policy {
            window_ms: h.window_seconds.min(86_400) * 1000,
            hourly: h.hourly_points.min(168),
        });
        replica.set_history(history).map_err(status)?;
        if r.interval_seconds != 0 && replica.state().primary_interval_seconds != r.interval_seconds {
            replica.set_primary_interval(r.interval_seconds).map_err(status)?;
        }
        let s = replica.state().clone();
        if s.disk_size != r.disk_size {
            return Err(Status::failed_precondition(format!(
                "the replica is {} bytes, the primary disk {}: resize is not supported",
                s.disk_size, r.disk_size
            )));
        }
        if r.epoch < s.epoch {
            return Err(status(ReplicaError::StaleEpoch { current: s.epoch, found: r.epoch }));
        }
        Ok(Response::new(OpenReply {
            needs_initial_copy: !s.has_copy,
            next_seq: s.received_through + 1,
            epoch: s.epoch,
        }))
    }

    /// A new replica for an authorised primary, waiting for its initial copy.
    fn new_replica(
        &self,
        grant: &super::authz::Grant,
        d: &DiskRef,
        disk_size: u64,
        epoch: u64,
    ) -> Result<Arc<ReplicaDisk>, Status> {
        let dir = replica_dir(&grant.storage, &d.vm_id, &d.disk_id, true)?;
        tracing::info!(primary = %grant.primary, rule = %grant.rule, dir = %dir.display(), "new replica");
        let (grant, vm_id, disk_id) = (grant.clone(), d.vm_id.clone(), d.disk_id.clone());
        self.open_dir(&dir, move || ReplicaState {
            vm_id,
            disk_id,
            disk_size,
            epoch,
            trust_group: grant.trust_group,
            primary: grant.primary,
            ..Default::default()
        })
    }

    /// Reads a stream's first chunk and its start, authorises the sender for
    /// the replica it names, and waits for a transfer slot.
    async fn begin_stream<C, S>(
        &self,
        names: &[String],
        stream: &mut Streaming<C>,
        start_of: impl Fn(&C) -> Option<S>,
        disk_of: impl Fn(&S) -> Option<DiskRef>,
    ) -> Result<(C, S, Arc<ReplicaDisk>, tokio::sync::SemaphorePermit<'_>), Status> {
        let first = stream.message().await?.ok_or_else(|| Status::invalid_argument("empty stream"))?;
        let start =
            start_of(&first).ok_or_else(|| Status::invalid_argument("the first chunk must carry start"))?;
        let d = disk_of(&start).ok_or_else(|| Status::invalid_argument("start.disk is required"))?;
        let replica = self.require(names, &d.vm_id, &d.disk_id)?;
        let permit = self.transfers.acquire().await.map_err(|_| Status::unavailable("shutting down"))?;
        Ok((first, start, replica, permit))
    }

    #[tracing::instrument(skip_all)]
    async fn push_segment_inner(
        self: &Arc<Self>,
        req: Request<Streaming<SegmentChunk>>,
    ) -> Result<Response<SegmentAck>, Status> {
        let names = peer_names(&req);
        let mut stream = req.into_inner();
        let (first, start, replica, _permit) =
            self.begin_stream(&names, &mut stream, |c| c.start.clone(), |s| s.disk.clone()).await?;
        let r = replica.clone();
        let incoming = tokio::task::spawn_blocking(move || {
            r.begin_segment(start.first_seq, start.last_seq, start.epoch, start.length)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(status)?;
        let mut seg = match incoming {
            Incoming::Duplicate { durable_through } => {
                return Ok(Response::new(SegmentAck { durable_through, bytes_written: 0 }));
            }
            Incoming::New(seg) => seg,
        };
        let mut chunk = Some(first);
        let mut written = 0u64;
        while let Some(c) = chunk.take() {
            let step = decode_chunk(c.data, c.compressed, c.raw_len)
                .and_then(|raw| seg.write_chunk(c.offset, &raw).map(|()| raw.len()).map_err(status));
            match step {
                Ok(n) => written += n as u64,
                Err(e) => {
                    seg.discard();
                    return Err(e);
                }
            }
            match stream.message().await {
                Ok(next) => chunk = next,
                Err(e) => {
                    seg.discard();
                    return Err(e);
                }
            }
        }
        let r = replica.clone();
        let durable_through = tokio::task::spawn_blocking(move || r.finish_segment(seg))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(status)?;
        // Apply after acknowledging: the segment is already durable and verified.
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = this.apply_and_retain(&replica) {
                tracing::error!(error = %e, "applying received segments failed");
            }
        });
        Ok(Response::new(SegmentAck { durable_through, bytes_written: written }))
    }

    #[tracing::instrument(skip_all)]
    async fn push_initial_copy_inner(
        &self,
        req: Request<Streaming<CopyChunk>>,
    ) -> Result<Response<CopyAck>, Status> {
        let names = peer_names(&req);
        let mut stream = req.into_inner();
        let (first, start, replica, _permit) =
            self.begin_stream(&names, &mut stream, |c| c.start.clone(), |s| s.disk.clone()).await?;
        let mut copy = replica.begin_copy(start.disk_size, start.epoch, start.next_seq).map_err(status)?;
        let mut chunk = Some(first);
        let mut received = 0u64;
        let mut consistent_from = None;
        while let Some(c) = chunk.take() {
            let step = decode_chunk(c.data, c.compressed, c.raw_len)
                .and_then(|raw| copy.write_range(c.offset, &raw).map(|()| raw.len()).map_err(status));
            match step {
                Ok(n) => received += n as u64,
                Err(e) => {
                    copy.discard();
                    return Err(e);
                }
            }
            if c.last {
                consistent_from = Some(c.consistent_from);
                break;
            }
            chunk = match stream.message().await {
                Ok(next) => next,
                Err(e) => {
                    copy.discard();
                    return Err(e);
                }
            };
        }
        let Some(consistent_from) = consistent_from else {
            copy.discard();
            return Err(Status::aborted("the initial copy ended before its last chunk; send it again"));
        };
        let next_seq = start.next_seq;
        tokio::task::spawn_blocking(move || replica.finish_copy(copy, consistent_from))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(status)?;
        Ok(Response::new(CopyAck { bytes_received: received, next_seq }))
    }
}

/// Serves `service` with mutual TLS on `listener` until `shutdown` completes.
pub async fn serve(
    service: Arc<ReplicaService>,
    listener: tokio::net::TcpListener,
    tls: &super::tls::TlsMaterial,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let svc = super::proto::replication_server::ReplicationServer::new(service)
        .max_decoding_message_size(MAX_FRAME)
        .max_encoding_message_size(MAX_FRAME);
    tonic::transport::Server::builder()
        .tls_config(tls.server())?
        .add_service(svc)
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown)
        .await
}

/// Every storage location of `site`'s rules, sorted, once each.
fn storage_roots(site: &SiteConfig) -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = site.entries.iter().map(|e| e.storage.clone()).collect();
    roots.extend(site.default_storage.clone());
    roots.sort();
    roots.dedup();
    roots
}

impl ReplicaService {
    /// Opens every replica under the site's storage locations (recovering any
    /// crash) and applies what they received but had not applied; returns how
    /// many replicas were found.
    pub fn recover_all(&self) -> Result<usize, ReplicaError> {
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
                    let replica =
                        self.open_dir(&dir, || unreachable!("replica.json exists")).map_err(|s| {
                            ReplicaError::BadState { path: dir.clone(), why: s.message().to_owned() }
                        })?;
                    self.apply_and_retain(&replica)?;
                    found += 1;
                }
            }
        }
        Ok(found)
    }
}
