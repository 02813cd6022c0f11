//! The VMs an agent protects because the controller asked it to, as the
//! node's own operations (no gRPC here: [`crate::grpc::control`] adapts them).
//!
//! ```text
//!  enable(spec) ─▶ check ─▶ open disks ─▶ NBD exports "<vm>/<disk>"
//!                                    └─▶ shippers ─▶ cycle task (unless suspended, prepared or fenced)
//!  same uid + generation again: nothing changes    new generation: apply the difference
//!  remove ─▶ stop the cycle ─▶ drop exports ─▶ clean shutdown ─▶ forget the logs
//!  prepare_failover ─▶ read-only ─▶ last seal ─▶ ship ─▶ Finalize at the replica
//!  adopt(promoted images) ─▶ served as the VM's disks, logging under the new epoch
//! ```
//! Every refusal says what to fix and leaves what ran before untouched.
//! Extended replication of replicas held here is [`extended`].
//!
//! One file, about 510 lines, on purpose: the VM lifecycle (enable, update,
//! remove, prepare, adopt) reads as one state machine; specs, disks and
//! extended replication are the sibling modules.

pub mod disks;
pub mod extended;
pub mod spec;

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use disks::{export_name, fresh_log, open_disks, retire};
use spec::{DiskSpec, FinalDisk, ProtectedVm, Served, VmSpec, check_spec, quiesce};
use tokio::sync::{Mutex, watch};
use vmreplica_api::tls::{LiveTls, Peer};

use crate::{
    disk::{ProtectedDisk, log_dir_for},
    limits::Limits,
    metrics::Metrics,
    nbd::NbdServer,
    replication::{
        cycle::{QuiesceStatus, VmReplication},
        shipper::{History, Shipper, ShipperConfig},
    },
};

/// How this agent protects VMs for the controller.
#[derive(Clone)]
pub struct NodeConfig {
    /// The certificate replication uses (renewals take effect at the next connection).
    pub tls: Arc<LiveTls>,
    /// Disk images must lie under one of these (after resolving symlinks).
    pub disk_roots: Vec<PathBuf>,
    /// Host names resolved here instead of by DNS (as `curl --resolve`).
    pub resolve: BTreeMap<String, IpAddr>,
    /// The NBD unix socket, for the export URIs in replies.
    pub socket: Option<PathBuf>,
    pub backoff: Vec<Duration>,
    /// The agent's bandwidth budget and transfer limit, shared with
    /// everything else it ships.
    pub limits: Arc<Limits>,
    /// Whether a VMReplication may name freeze/thaw commands to run on this
    /// node (whoever may create VMReplications could run them as the agent).
    pub allow_quiesce_commands: bool,
}

struct Managed {
    /// Prepared for a planned failover: disks read-only, no cycle.
    prepared: bool,
    /// The epoch its shippers send: 0 for a VM never failed over, else the
    /// epoch of the promotion that made this node its primary.
    epoch: u64,
    /// Per disk, the first sequence of this epoch's log (a promotion
    /// continues the numbering of the log the replica applied); none: 1.
    log_starts: BTreeMap<String, u64>,
    spec: VmSpec,
    disks: Vec<Arc<ProtectedDisk>>,
    shippers: Vec<Arc<Shipper>>,
    running: Option<(watch::Sender<bool>, tokio::task::JoinHandle<()>)>,
    /// The newer epoch that fenced this VM (0: not fenced): a replica refused
    /// this side's epoch, so its disks are read-only and it replicates no more.
    fenced: Arc<AtomicU64>,
    /// What became of its application-consistent points since its cycle
    /// last started (a new spec starts afresh).
    quiesce: Arc<std::sync::Mutex<QuiesceStatus>>,
}

impl Managed {
    fn new(
        spec: VmSpec,
        disks: Vec<Arc<ProtectedDisk>>,
        epoch: u64,
        log_starts: BTreeMap<String, u64>,
    ) -> Self {
        Self {
            prepared: false,
            epoch,
            log_starts,
            spec,
            disks,
            shippers: Vec::new(),
            running: None,
            fenced: Arc::default(),
            quiesce: Arc::default(),
        }
    }

    /// Whether `disks` (name, resolved path) are exactly the disks served,
    /// in any order.
    fn serves(&self, disks: &[(String, PathBuf)]) -> bool {
        let mut served: Vec<(String, PathBuf)> =
            self.disks.iter().map(|d| (d.name().to_owned(), d.path().to_owned())).collect();
        let mut asked = disks.to_vec();
        served.sort();
        asked.sort();
        served == asked
    }

    async fn stop(&mut self) {
        if let Some((stop, task)) = self.running.take() {
            let _ = stop.send(true);
            let _ = task.await;
        }
    }
}

/// The VMs protected on this node.
pub struct Node {
    cfg: NodeConfig,
    nbd: Arc<NbdServer>,
    metrics: Arc<Metrics>,
    vms: Mutex<BTreeMap<String, Managed>>,
    /// Extended replication of replicas held here, by VM id.
    extended: Mutex<BTreeMap<String, extended::Extended>>,
}

impl Node {
    pub fn new(cfg: NodeConfig, nbd: Arc<NbdServer>, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self { cfg, nbd, metrics, vms: Mutex::default(), extended: Mutex::default() })
    }

    /// Where the replica server is, and the name its certificate must carry.
    async fn replica_peer(&self, address: &str) -> Result<Peer, String> {
        let (host, port) = address
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse::<u16>().ok().filter(|p| *p > 0)?)))
            .ok_or_else(|| format!("replica server {address:?} is not HOST:PORT"))?;
        let peer = |addr: String| Peer { addr, server_name: host.to_owned(), tls: self.cfg.tls.clone() };
        if let Some(ip) = self.cfg.resolve.get(host) {
            return Ok(peer(format!("{ip}:{port}")));
        }
        match tokio::net::lookup_host((host, port)).await.map(|mut a| a.next()) {
            Ok(Some(_)) => Ok(peer(address.to_owned())),
            Ok(None) => Err(format!("replica server {host} has no address")),
            Err(e) => {
                Err(format!("replica server {host} does not resolve: {e}; check spec.replicaServer.name"))
            }
        }
    }

    fn shippers(&self, spec: &VmSpec, m: &Managed, peer: &Peer) -> Result<Vec<Arc<Shipper>>, String> {
        let cfg = ShipperConfig {
            interval_seconds: spec.interval_seconds,
            compression: spec.compression,
            backoff: self.cfg.backoff.clone(),
            history: Some(History {
                window_seconds: spec.history_window_seconds,
                hourly_points: spec.history_hourly_points,
            }),
            initial: spec.initial.clone(),
            ..Default::default()
        };
        m.disks
            .iter()
            .map(|d| {
                // A connection per disk: see `Peer::channel`.
                let ch = peer.channel().map_err(|e| format!("replica server {}: {e}", peer.addr))?;
                let s = Shipper::new(&spec.vm_id, d.clone(), ch, cfg.clone(), self.cfg.limits.clone());
                s.set_resync_policy(spec.resync.clone());
                Ok(Arc::new(
                    s.with_metrics(self.metrics.clone())
                        .with_peer(peer.clone())
                        .with_epoch(m.epoch)
                        .with_log_start(m.log_starts.get(d.name()).copied().unwrap_or(1)),
                ))
            })
            .collect()
    }

    fn start(&self, m: &mut Managed) {
        if m.spec.suspended || m.prepared || m.running.is_some() || m.fenced.load(Ordering::Acquire) != 0 {
            return;
        }
        let (stop, stopped) = watch::channel(false);
        m.quiesce = Arc::default();
        let vm = VmReplication::new(
            m.shippers.clone(),
            Duration::from_secs(u64::from(m.spec.interval_seconds)),
            self.cfg.backoff.clone(),
            // Checked before the spec was accepted.
            quiesce(&m.spec, self.cfg.allow_quiesce_commands).ok().flatten(),
        )
        .with_fence(m.fenced.clone())
        .with_quiesce_status(m.quiesce.clone());
        let at = m.spec.initial_replication_at_unix_ms;
        let task = tokio::spawn(async move {
            let mut stopped = stopped;
            // A scheduled initial replication: wait for its time (or a stop).
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            let wait = Duration::from_millis(at).saturating_sub(now);
            if !wait.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stopped.changed() => return,
                }
            }
            vm.run(stopped).await;
        });
        m.running = Some((stop, task));
    }

    fn export_uris(&self, spec: &VmSpec) -> Vec<String> {
        let socket = self.cfg.socket.as_ref().map(|s| s.display().to_string()).unwrap_or_default();
        spec.disks
            .iter()
            .map(|d| format!("nbd+unix:///{}?socket={socket}", export_name(&spec.vm_id, &d.name)))
            .collect()
    }

    fn served(&self, m: &Managed) -> Served {
        Served { generation: m.spec.generation, exports: self.export_uris(&m.spec), epoch: m.epoch }
    }

    /// Protects and replicates a VM, or brings it to a new generation; the
    /// error says what to fix and nothing changed.
    pub async fn enable(&self, spec: VmSpec) -> Result<Served, String> {
        let paths = match check_spec(&spec, &self.cfg.disk_roots) {
            Ok(p) => p,
            // A promoted replica's images lie in the replica storage, not
            // under the disk roots: the VM already served here may name them.
            Err(why) => self.served_disks(&spec).await.ok_or(why)?,
        };
        quiesce(&spec, self.cfg.allow_quiesce_commands)?;
        let peer = self.replica_peer(&spec.replica_address).await?;
        let mut vms = self.vms.lock().await;
        if let Some(m) = vms.get_mut(&spec.vm_id) {
            return self.update(m, spec, &paths, &peer).await;
        }
        // A disk protected for another VM cannot be taken.
        for (name, path) in &paths {
            if vms.values().flat_map(|m| &m.disks).any(|d| d.path() == path) {
                return Err(format!("disk {name}: {} is already protected for another VM", path.display()));
            }
        }
        let disks = open_disks(&spec.vm_id, paths).await?;
        // A disk this node took over in a failover and serves again after a
        // restart: its log says under which epoch it ships.
        let epoch = disks.iter().map(|d| d.epoch()).max().unwrap_or(0);
        let vm_id = spec.vm_id.clone();
        let mut m = Managed::new(spec.clone(), disks, epoch, BTreeMap::new());
        m.shippers = self.shippers(&spec, &m, &peer)?;
        self.add_exports(&vm_id, &m.disks)?;
        self.start(&mut m);
        tracing::info!(vm = %vm_id, generation = spec.generation, disks = m.disks.len(), suspended = spec.suspended, "replication enabled");
        let served = self.served(&m);
        vms.insert(vm_id, m);
        Ok(served)
    }

    /// [`Self::enable`] of a VM already protected here: a newer generation
    /// applies the difference; the same or an older one changes nothing.
    async fn update(
        &self,
        m: &mut Managed,
        spec: VmSpec,
        paths: &[(String, PathBuf)],
        peer: &Peer,
    ) -> Result<Served, String> {
        if m.spec.uid != spec.uid {
            return Err(format!(
                "VM id {} is protected here for another object (uid {}); remove that one first",
                spec.vm_id, m.spec.uid
            ));
        }
        if m.spec.generation >= spec.generation {
            return Ok(self.served(m));
        }
        if !m.serves(paths) {
            return Err(
                "the disks of a protected VM cannot change: delete the VMReplication and create it again"
                    .into(),
            );
        }
        let rebuild = m.spec.replica_address != spec.replica_address
            || m.spec.compression != spec.compression
            || m.spec.history_window_seconds != spec.history_window_seconds
            || m.spec.history_hourly_points != spec.history_hourly_points
            || m.spec.initial != spec.initial;
        let new_shippers = if rebuild { Some(self.shippers(&spec, m, peer)?) } else { None };
        m.stop().await;
        if let Some(s) = new_shippers {
            m.shippers = s;
        }
        if m.prepared {
            // The controller enables only when no planned failover holds
            // the VM: it was cancelled before the VM moved. Writable again.
            m.prepared = false;
            for d in &m.disks {
                d.make_writable();
            }
            tracing::info!(vm = %spec.vm_id, "planned failover cancelled: replicating again");
        }
        for s in &m.shippers {
            s.set_resync_policy(spec.resync.clone());
        }
        m.spec = spec;
        self.start(m);
        tracing::info!(vm = %m.spec.vm_id, generation = m.spec.generation, suspended = m.spec.suspended, "replication updated");
        Ok(self.served(m))
    }

    /// Stops replicating `vm_id` (only when `uid` matches) and forgets its logs.
    pub async fn remove(&self, vm_id: &str, uid: &str) -> bool {
        let mut vms = self.vms.lock().await;
        if vms.get(vm_id).is_none_or(|m| m.spec.uid != uid) {
            return false;
        }
        let mut m = vms.remove(vm_id).expect("checked above");
        drop(vms);
        m.stop().await;
        for d in &m.disks {
            self.nbd.remove_export(&export_name(vm_id, d.name()));
        }
        // Best effort: an unreachable replica site keeps its disk either way,
        // and refuses nothing it would otherwise accept.
        for s in &m.shippers {
            match tokio::time::timeout(Duration::from_secs(5), s.remove_remote()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(vm = vm_id, disk = s.disk_id(), error = %e, "telling the replica")
                }
                Err(_) => {
                    tracing::warn!(vm = vm_id, disk = s.disk_id(), "the replica did not answer the removal")
                }
            }
        }
        drop(m.shippers);
        retire(m.disks).await;
        tracing::info!(vm = vm_id, "replication removed");
        true
    }

    /// Planned failover, primary side: stop the cycle, make the disks
    /// read-only, ship the last segments, and tell the replica each disk's
    /// final sequence once it holds it.
    pub async fn prepare_failover(&self, vm_id: &str, uid: &str) -> Result<Vec<FinalDisk>, String> {
        let mut vms = self.vms.lock().await;
        let m = vms
            .get_mut(vm_id)
            .filter(|m| m.spec.uid == uid)
            .ok_or_else(|| format!("VM {vm_id} is not protected on this agent"))?;
        m.stop().await;
        m.prepared = true;
        for d in &m.disks {
            d.make_read_only();
        }
        let mut out = Vec::new();
        for (d, s) in m.disks.iter().zip(&m.shippers) {
            let name = d.name().to_owned();
            let disk = d.clone();
            let sealed = tokio::task::spawn_blocking(move || disk.seal()).await.map_err(|e| e.to_string())?;
            sealed.map_err(|e| format!("disk {name}: sealing the last segment: {e}"))?;
            let last = d.log_status().next_seq - 1;
            let durable =
                s.sync_once().await.map_err(|e| format!("disk {name}: shipping the last segment: {e}"))?;
            if durable >= last {
                s.finalize(last).await.map_err(|e| format!("disk {name}: telling the replica: {e}"))?;
                d.mark_prepared(last)
                    .map_err(|e| format!("disk {name}: recording the final sequence: {e}"))?;
            }
            out.push(FinalDisk { disk_id: name, last_seq: last, durable_through: durable });
        }
        tracing::info!(vm = vm_id, disks = ?out, "prepared for a planned failover");
        Ok(out)
    }

    /// Serves promoted replica images as the VM's disks (they were this
    /// agent's replicas, so no --disk-root check), each logging from the
    /// sequence given (the one after what the image holds of the log it
    /// applied) under `epoch`. Replicated once enable names a replica server
    /// (reverse or extended replication). Idempotent.
    pub async fn adopt(
        &self,
        vm_id: &str,
        uid: &str,
        images: Vec<(String, PathBuf, u64)>,
        epoch: u64,
    ) -> Result<Served, String> {
        let mut vms = self.vms.lock().await;
        let spec = VmSpec {
            vm_id: vm_id.to_owned(),
            uid: uid.to_owned(),
            suspended: true,
            interval_seconds: 30,
            disks: images
                .iter()
                .map(|(name, path, _)| DiskSpec { name: name.clone(), path: path.display().to_string() })
                .collect(),
            ..Default::default()
        };
        if let Some(m) = vms.get(vm_id) {
            return Ok(Served { generation: 0, ..self.served(m) });
        }
        // A log left by an earlier time this image was served belongs to
        // another direction: this promotion's log continues the numbering
        // of what the image holds, where the other side's replicas expect it.
        for (name, path, first_seq) in &images {
            fresh_log(vm_id, name, path, epoch, *first_seq)
                .map_err(|e| format!("starting the log of {}: {e}", path.display()))?;
        }
        let log_starts = images.iter().map(|(name, _, first)| (name.clone(), *first)).collect();
        let images = images.into_iter().map(|(name, path, _)| (name, path)).collect();
        let disks = open_disks(vm_id, images).await?;
        self.add_exports(vm_id, &disks)?;
        tracing::info!(vm = vm_id, disks = disks.len(), "promoted replica served as the VM's disks");
        let m = Managed::new(spec, disks, epoch, log_starts);
        let served = Served { generation: 0, ..self.served(&m) };
        vms.insert(vm_id.to_owned(), m);
        Ok(served)
    }

    /// Serves `disks` as the exports `<vm>/<disk>`; on a clash, withdraws
    /// the ones it added and says which name was taken.
    fn add_exports(&self, vm_id: &str, disks: &[Arc<ProtectedDisk>]) -> Result<(), String> {
        for (i, d) in disks.iter().enumerate() {
            let name = export_name(vm_id, d.name());
            if !self.nbd.add_export(&name, d.clone()) {
                for added in &disks[..i] {
                    self.nbd.remove_export(&export_name(vm_id, added.name()));
                }
                return Err(format!("export {name} is already served"));
            }
        }
        Ok(())
    }

    /// The disks (name, path) of the VM already served here, when `spec`
    /// names exactly them.
    async fn served_disks(&self, spec: &VmSpec) -> Option<Vec<(String, PathBuf)>> {
        let vms = self.vms.lock().await;
        let m = vms.get(&spec.vm_id).filter(|m| m.spec.uid == spec.uid)?;
        let named: Vec<(String, PathBuf)> =
            spec.disks.iter().map(|d| (d.name.clone(), PathBuf::from(&d.path))).collect();
        m.serves(&named).then_some(named)
    }

    /// Reverse replication, old primary's side: a VM prepared for a planned
    /// failover stops being served here so that its disks can become
    /// replicas of the promoted side. Its logs (all shipped and durable
    /// there) are deleted; the images stay. A VM not served here because
    /// this agent restarted since is known by its disks' prepared marks:
    /// those of `at_rest` (name, image), or with `None` those found under
    /// the disk roots. `None` when the VM is not prepared here (it still
    /// runs). Per disk: name, image, and the last sequence logged (what the
    /// image holds).
    pub async fn release_prepared(
        &self,
        vm_id: &str,
        at_rest: Option<Vec<(String, PathBuf)>>,
    ) -> Option<Vec<(String, PathBuf, u64)>> {
        let mut vms = self.vms.lock().await;
        match vms.get(vm_id) {
            Some(m) if m.prepared => {}
            Some(_) => return None,
            None => {
                drop(vms);
                let disks = match at_rest {
                    Some(d) => d,
                    None => self.prepared_at_rest(vm_id).await,
                };
                return self.release_prepared_at_rest(vm_id, disks).await;
            }
        }
        let m = vms.remove(vm_id).expect("checked above");
        drop(vms);
        let out = self.release(vm_id, m).await;
        tracing::info!(vm = vm_id, "prepared VM released: its disks become replicas of the promoted side");
        Some(out)
    }

    /// The disks (name, image) under this node's disk roots that a planned
    /// failover's primary part left prepared for VM `vm_id` (found by their
    /// marks: this agent may have restarted since).
    async fn prepared_at_rest(&self, vm_id: &str) -> Vec<(String, PathBuf)> {
        let (roots, vm) = (self.cfg.disk_roots.clone(), vm_id.to_owned());
        tokio::task::spawn_blocking(move || crate::disk::prepared_under(&roots, &vm))
            .await
            .unwrap_or_default()
    }

    /// [`Self::release_prepared`] for a VM this agent prepared before it
    /// restarted (so it is not served here now): each of its disks (name,
    /// image) must carry the prepared mark of its final sequence with no
    /// record logged after it (its log is opened, and recovered, to check),
    /// so the promoted side holds every write. Their logs are deleted.
    async fn release_prepared_at_rest(
        &self,
        vm_id: &str,
        disks: Vec<(String, PathBuf)>,
    ) -> Option<Vec<(String, PathBuf, u64)>> {
        let vms = self.vms.lock().await;
        if vms.contains_key(vm_id) || disks.is_empty() {
            return None;
        }
        let vm = vm_id.to_owned();
        let checked = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            for (name, image) in disks {
                let (_, _, last) =
                    crate::disk::prepared_mark(&image).filter(|(v, d, _)| *v == vm && *d == name)?;
                let (disk, _) = ProtectedDisk::open(&vm, &name, &image).ok()?;
                let logged = disk.log_status().next_seq - 1;
                drop(disk);
                if logged != last {
                    tracing::warn!(
                        vm,
                        disk = name,
                        last,
                        logged,
                        "written after it was prepared: not failed back"
                    );
                    return None;
                }
                out.push((name, image, last));
            }
            Some(out)
        })
        .await
        .ok()??;
        for (_, image, _) in &checked {
            let dir = log_dir_for(image);
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "removing the log");
            }
        }
        drop(vms);
        tracing::info!(
            vm = vm_id,
            "VM prepared before this agent restarted released: its disks become replicas"
        );
        Some(checked)
    }

    /// Stops serving and replicating `m` (removed from the VMs already) and
    /// deletes its logs; per disk: name, image, the last sequence logged.
    async fn release(&self, vm_id: &str, mut m: Managed) -> Vec<(String, PathBuf, u64)> {
        m.stop().await;
        for d in &m.disks {
            self.nbd.remove_export(&export_name(vm_id, d.name()));
        }
        drop(m.shippers);
        let out = m
            .disks
            .iter()
            .map(|d| (d.name().to_owned(), d.path().to_owned(), d.log_status().next_seq - 1))
            .collect();
        retire(m.disks).await;
        out
    }

    /// An unplanned failover completed on the copies this node serves: the
    /// VM's disks log, and its shippers send, under the newer `epoch` from
    /// now on (a side still at the old one is refused, and fenced).
    pub async fn raise_epoch(&self, vm_id: &str, epoch: u64) -> Result<(), String> {
        let mut vms = self.vms.lock().await;
        let Some(m) = vms.get_mut(vm_id) else { return Ok(()) };
        for d in &m.disks {
            let d = d.clone();
            tokio::task::spawn_blocking(move || d.raise_epoch(epoch))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("moving the log to epoch {epoch}: {e}"))?;
        }
        m.epoch = m.epoch.max(epoch);
        Ok(())
    }

    /// Failing back after an unplanned failover, old primary's side: the
    /// side that took the VM over (at `epoch`, newer than this side's)
    /// replicates onto the disks this node still holds as the VM's primary.
    /// While a client still uses them the VM is fenced (read-only, its
    /// cycle stopped; its controller stops it) and an error says so. Once
    /// none does, they stop being served and logged — their logs go (the
    /// images hold every write, shipped or not) — and per disk its name,
    /// image, last logged sequence and epoch are returned, to become
    /// replicas that keep what they hold as a diverged point. `Ok(None)`:
    /// no such VM here, or not of an older epoch.
    pub async fn release_diverged(
        &self,
        vm_id: &str,
        epoch: u64,
    ) -> Result<Option<Vec<(String, PathBuf, u64, u64)>>, String> {
        let mut vms = self.vms.lock().await;
        let Some(m) = vms.get_mut(vm_id).filter(|m| m.epoch < epoch) else { return Ok(None) };
        let in_use: Vec<&str> = m
            .disks
            .iter()
            .filter(|d| self.nbd.connections(&export_name(vm_id, d.name())) > 0)
            .map(|d| d.name())
            .collect();
        if !in_use.is_empty() {
            let disks = in_use.join(", ");
            if m.fenced.swap(epoch, Ordering::AcqRel) == 0 {
                for d in &m.disks {
                    d.make_read_only();
                }
                m.stop().await;
                tracing::error!(
                    vm = vm_id,
                    epoch,
                    "fenced: the side that took the VM over replicates back onto it"
                );
            }
            return Err(format!(
                "{vm_id} still runs here (disks {disks} in use) under epoch {}, and an unplanned failover moved it \
                 to epoch {epoch}: it is fenced (read-only) and its controller stops it; its writes since the \
                 failover are kept as a diverged point once it has stopped",
                m.epoch
            ));
        }
        let m = vms.remove(vm_id).expect("found above");
        drop(vms);
        let own = m.epoch;
        let out = self.release(vm_id, m).await.into_iter().map(|(n, p, last)| (n, p, last, own)).collect();
        tracing::info!(
            vm = vm_id,
            epoch,
            "released to the side that took the VM over: its writes since are kept as a diverged point"
        );
        Ok(Some(out))
    }

    /// Every shipper of every protected VM.
    pub async fn all_shippers(&self) -> Vec<Arc<Shipper>> {
        self.vms.lock().await.values().flat_map(|m| m.shippers.iter().cloned()).collect()
    }

    pub async fn protected(&self) -> Vec<ProtectedVm> {
        self.vms
            .lock()
            .await
            .values()
            .map(|m| ProtectedVm {
                vm_id: m.spec.vm_id.clone(),
                uid: m.spec.uid.clone(),
                generation: m.spec.generation,
                suspended: m.spec.suspended,
                prepared: m.prepared,
                fenced_epoch: m.fenced.load(Ordering::Acquire),
                quiesce: m.quiesce.lock().expect("not poisoned").clone(),
                disks: m
                    .disks
                    .iter()
                    .map(|d| DiskSpec { name: d.name().into(), path: d.path().display().to_string() })
                    .collect(),
            })
            .collect()
    }

    /// Stops every cycle and shuts every disk down cleanly.
    pub async fn shutdown(&self) {
        let mut vms = self.vms.lock().await;
        for m in vms.values_mut() {
            m.stop().await;
            for d in &m.disks {
                let d = d.clone();
                if let Ok(Err(e)) = tokio::task::spawn_blocking(move || d.shutdown()).await {
                    tracing::error!(error = %e, "clean shutdown failed");
                }
            }
        }
    }
}
