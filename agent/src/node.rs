//! The VMs an agent protects because the controller asked it to
//! (`EnableReplication` / `RemoveReplication` on the control API).
//!
//! ```text
//!  EnableReplication(spec) ─▶ check ─▶ open disks ─▶ NBD exports "<vm>/<disk>"
//!                                               └─▶ shippers ─▶ cycle task (unless suspended)
//!  same uid + generation again: nothing changes    new generation: apply the difference
//!  RemoveReplication ─▶ stop the cycle ─▶ drop exports ─▶ clean shutdown ─▶ forget the logs
//! ```
//! Every refusal says what to fix and leaves what ran before untouched.
//!
//! At a replica site the node also runs extended replication (A→B→C): the
//! segments its replicas of a VM applied are forwarded to a third site
//! (`ExtendReplication`), by a forwarding shipper per disk on its own interval.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{Mutex, Semaphore, watch};

use crate::{
    control::proto::{EnableReply, ExtendRequest, ProtectedVm, VmReplicationSpec},
    disk::{ProtectedDisk, log_dir_for},
    metrics::Metrics,
    nbd::NbdServer,
    quiesce::Quiesce,
    replica::{ReplicaDisk, names},
    replication::{
        cycle::VmReplication,
        shipper::{Peer, RateLimiter, Shipper, ShipperConfig},
        tls::TlsMaterial,
    },
};

/// How this agent protects VMs for the controller.
#[derive(Clone)]
pub struct NodeConfig {
    pub tls: TlsMaterial,
    /// Disk images must lie under one of these (after resolving symlinks).
    pub disk_roots: Vec<PathBuf>,
    /// Host names resolved here instead of by DNS (as `curl --resolve`).
    pub resolve: BTreeMap<String, IpAddr>,
    /// The NBD unix socket, for the export URIs in replies.
    pub socket: Option<PathBuf>,
    pub backoff: Vec<Duration>,
    /// The agent's bandwidth budget and transfer limit, shared with
    /// everything else it ships.
    pub limiter: Option<Arc<RateLimiter>>,
    pub transfers: Arc<Semaphore>,
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
    spec: VmReplicationSpec,
    disks: Vec<Arc<ProtectedDisk>>,
    shippers: Vec<Arc<Shipper>>,
    running: Option<(watch::Sender<bool>, tokio::task::JoinHandle<()>)>,
    /// The newer epoch that fenced this VM (0: not fenced): a replica refused
    /// this side's epoch, so its disks are read-only and it replicates no more.
    fenced: Arc<AtomicU64>,
}

impl Managed {
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
}

/// The VMs protected on this node.
pub struct Node {
    cfg: NodeConfig,
    nbd: Arc<NbdServer>,
    metrics: Arc<Metrics>,
    vms: Mutex<BTreeMap<String, Managed>>,
    /// Extended replication of replicas held here, by VM id.
    extended: Mutex<BTreeMap<String, Extended>>,
}

/// One VM's extended replication: a forwarding shipper per replica disk.
struct Extended {
    uid: String,
    generation: i64,
    shippers: Vec<Arc<Shipper>>,
    running: (watch::Sender<bool>, tokio::task::JoinHandle<()>),
}

impl Extended {
    async fn stop(self) -> Vec<Arc<Shipper>> {
        let (stop, task) = self.running;
        let _ = stop.send(true);
        let _ = task.await;
        self.shippers
    }
}

fn export_name(vm: &str, disk: &str) -> String {
    format!("{vm}/{disk}")
}

/// How the guest is quiesced for application-consistent points, if ever.
pub fn quiesce(
    spec: &VmReplicationSpec,
    allow_commands: bool,
) -> Result<Option<(Quiesce, Duration)>, String> {
    if spec.app_consistent_interval_seconds == 0 {
        return Ok(None);
    }
    let every = Duration::from_secs(u64::from(spec.app_consistent_interval_seconds));
    match (spec.freeze_command.is_empty(), spec.thaw_command.is_empty(), spec.guest_agent_socket.as_str()) {
        (false, false, _) if !allow_commands => Err(
            "freeze/thaw commands are not allowed on this node (start the agent with --allow-quiesce-commands, \
             or use the guest agent socket)"
                .into(),
        ),
        (false, false, _) => {
            Ok(Some((Quiesce::Command { freeze: spec.freeze_command.clone(), thaw: spec.thaw_command.clone() }, every)))
        }
        (true, true, socket) if Path::new(socket).is_absolute() => {
            Ok(Some((Quiesce::GuestAgent { socket: PathBuf::from(socket) }, every)))
        }
        (true, true, "") => Err("an application-consistent interval needs a way to quiesce: freeze and thaw \
                                 commands, or the guest agent socket"
            .into()),
        (true, true, socket) => Err(format!("guest agent socket {socket:?} is not an absolute path")),
        _ => Err("give both a freeze and a thaw command".into()),
    }
}

/// Opens `images` (name, path) as VM `vm_id`'s protected disks, with their
/// logs, away from the async runtime.
async fn open_disks(vm_id: &str, images: Vec<(String, PathBuf)>) -> Result<Vec<Arc<ProtectedDisk>>, String> {
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
async fn retire(disks: Vec<Arc<ProtectedDisk>>) {
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

/// Checks a spec before anything is touched; the disks' resolved paths.
pub fn check_spec(spec: &VmReplicationSpec, roots: &[PathBuf]) -> Result<Vec<(String, PathBuf)>, String> {
    names::check("vm id", &spec.vm_id).map_err(|e| e.to_string())?;
    if spec.uid.is_empty() {
        return Err("the request carries no uid".into());
    }
    if spec.disks.is_empty() {
        return Err("no disks to protect".into());
    }
    if !(1..=3600).contains(&spec.interval_seconds) {
        return Err(format!("replication interval {}s is outside 1-3600s", spec.interval_seconds));
    }
    let mut out: Vec<(String, PathBuf)> = Vec::new();
    for d in &spec.disks {
        names::check("disk name", &d.name).map_err(|e| e.to_string())?;
        if out.iter().any(|(n, _)| *n == d.name) {
            return Err(format!("disk {:?} is listed twice", d.name));
        }
        let given = Path::new(&d.path);
        if !given.is_absolute() {
            return Err(format!("disk {}: path {:?} is not absolute", d.name, d.path));
        }
        let real = given.canonicalize().map_err(|e| format!("disk {}: {}: {e}", d.name, d.path))?;
        let inside = roots.iter().filter_map(|r| r.canonicalize().ok()).any(|r| real.starts_with(&r));
        if !inside {
            let roots: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
            return Err(format!(
                "disk {}: {} is outside the directories this agent may serve ({}); move the image or \
                 start the agent with --disk-root for its directory",
                d.name,
                real.display(),
                roots.join(", ")
            ));
        }
        if !real.is_file() {
            return Err(format!("disk {}: {} is not a regular file", d.name, real.display()));
        }
        out.push((d.name.clone(), real));
    }
    Ok(out)
}

impl Node {
    pub fn new(cfg: NodeConfig, nbd: Arc<NbdServer>, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self { cfg, nbd, metrics, vms: Mutex::default(), extended: Mutex::default() })
    }

    /// Where the replica server is, and the name its certificate must carry.
    async fn replica_endpoint(&self, address: &str) -> Result<(String, String), String> {
        let (host, port) = address
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse::<u16>().ok().filter(|p| *p > 0)?)))
            .ok_or_else(|| format!("replica server {address:?} is not HOST:PORT"))?;
        if let Some(ip) = self.cfg.resolve.get(host) {
            return Ok((format!("{ip}:{port}"), host.to_owned()));
        }
        match tokio::net::lookup_host((host, port)).await.map(|mut a| a.next()) {
            Ok(Some(_)) => Ok((address.to_owned(), host.to_owned())),
            Ok(None) => Err(format!("replica server {host} has no address")),
            Err(e) => {
                Err(format!("replica server {host} does not resolve: {e}; check spec.replicaServer.name"))
            }
        }
    }

    fn shippers(
        &self,
        spec: &VmReplicationSpec,
        disks: &[Arc<ProtectedDisk>],
        addr: &str,
        name: &str,
        (epoch, log_starts): (u64, &BTreeMap<String, u64>),
    ) -> Result<Vec<Arc<Shipper>>, String> {
        let peer = Peer { addr: addr.to_owned(), server_name: name.to_owned(), tls: self.cfg.tls.clone() };
        let ch = peer.channel().map_err(|e| format!("replica server {addr}: {e}"))?;
        let history = crate::replication::proto::RecoveryHistory {
            window_seconds: spec.history_window_seconds,
            hourly_points: spec.history_hourly_points,
        };
        let cfg = ShipperConfig {
            interval_seconds: spec.interval_seconds,
            compression: spec.compression,
            backoff: self.cfg.backoff.clone(),
            history: Some(history),
            ..Default::default()
        };
        Ok(disks
            .iter()
            .map(|d| {
                Arc::new(
                    Shipper::new(
                        &spec.vm_id,
                        d.clone(),
                        ch.clone(),
                        cfg.clone(),
                        self.cfg.limiter.clone(),
                        self.cfg.transfers.clone(),
                    )
                    .with_metrics(self.metrics.clone())
                    .with_peer(peer.clone())
                    .with_epoch(epoch)
                    .with_log_start(log_starts.get(d.name()).copied().unwrap_or(1)),
                )
            })
            .collect())
    }

    fn start(&self, m: &mut Managed) {
        if m.spec.suspended || m.prepared || m.running.is_some() || m.fenced.load(Ordering::Acquire) != 0 {
            return;
        }
        let (stop, stopped) = watch::channel(false);
        let vm = VmReplication::new(
            m.shippers.clone(),
            Duration::from_secs(u64::from(m.spec.interval_seconds)),
            self.cfg.backoff.clone(),
            // Checked before the spec was accepted.
            quiesce(&m.spec, self.cfg.allow_quiesce_commands).ok().flatten(),
        )
        .with_fence(m.fenced.clone());
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

    async fn stop(m: &mut Managed) {
        if let Some((stop, task)) = m.running.take() {
            let _ = stop.send(true);
            let _ = task.await;
        }
    }

    fn export_uris(&self, spec: &VmReplicationSpec) -> Vec<String> {
        let socket = self.cfg.socket.as_ref().map(|s| s.display().to_string()).unwrap_or_default();
        spec.disks
            .iter()
            .map(|d| format!("nbd+unix:///{}?socket={socket}", export_name(&spec.vm_id, &d.name)))
            .collect()
    }

    /// Protects and replicates a VM, or brings it to a new generation.
    pub async fn enable(&self, spec: VmReplicationSpec) -> EnableReply {
        let refuse = |message: String| EnableReply {
            accepted: false,
            message,
            generation: spec.generation,
            exports: Vec::new(),
            epoch: 0,
        };
        let paths = match check_spec(&spec, &self.cfg.disk_roots) {
            Ok(p) => p,
            // A promoted replica's images lie in the replica storage, not
            // under the disk roots: the VM already served here may name them.
            Err(why) => match self.served_disks(&spec).await {
                Some(p) => p,
                None => return refuse(why),
            },
        };
        if let Err(why) = quiesce(&spec, self.cfg.allow_quiesce_commands) {
            return refuse(why);
        }
        let (addr, server_name) = match self.replica_endpoint(&spec.replica_address).await {
            Ok(e) => e,
            Err(why) => return refuse(why),
        };
        let mut vms = self.vms.lock().await;
        if let Some(m) = vms.get_mut(&spec.vm_id) {
            if m.spec.uid != spec.uid {
                return refuse(format!(
                    "VM id {} is protected here for another object (uid {}); remove that one first",
                    spec.vm_id, m.spec.uid
                ));
            }
            if m.spec.generation >= spec.generation {
                // Already there (or newer): nothing to do.
                return EnableReply {
                    accepted: true,
                    message: String::new(),
                    generation: m.spec.generation,
                    exports: self.export_uris(&m.spec),
                    epoch: m.epoch,
                };
            }
            if !m.serves(&paths) {
                return refuse(
                    "the disks of a protected VM cannot change: delete the VMReplication and create it again"
                        .into(),
                );
            }
            let rebuild = m.spec.replica_address != spec.replica_address
                || m.spec.compression != spec.compression
                || m.spec.history_window_seconds != spec.history_window_seconds
                || m.spec.history_hourly_points != spec.history_hourly_points;
            let new_shippers = if rebuild {
                match self.shippers(&spec, &m.disks, &addr, &server_name, (m.epoch, &m.log_starts)) {
                    Ok(s) => Some(s),
                    Err(why) => return refuse(why),
                }
            } else {
                None
            };
            Self::stop(m).await;
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
            m.spec = spec;
            self.start(m);
            tracing::info!(vm = %m.spec.vm_id, generation = m.spec.generation, suspended = m.spec.suspended, "replication updated");
            return EnableReply {
                accepted: true,
                message: String::new(),
                generation: m.spec.generation,
                exports: self.export_uris(&m.spec),
                epoch: m.epoch,
            };
        }
        // A disk protected for another VM cannot be taken.
        for (name, path) in &paths {
            if vms.values().flat_map(|m| &m.disks).any(|d| d.path() == path) {
                return refuse(format!(
                    "disk {name}: {} is already protected for another VM",
                    path.display()
                ));
            }
        }
        let disks = match open_disks(&spec.vm_id, paths).await {
            Ok(d) => d,
            Err(why) => return refuse(why),
        };
        // A disk this node took over in a failover and serves again after a
        // restart: its log says under which epoch it ships.
        let epoch = disks.iter().map(|d| d.epoch()).max().unwrap_or(0);
        let shippers = match self.shippers(&spec, &disks, &addr, &server_name, (epoch, &BTreeMap::new())) {
            Ok(s) => s,
            Err(why) => return refuse(why),
        };
        if let Err(why) = self.add_exports(&spec.vm_id, &disks) {
            return refuse(why);
        }
        let exports = self.export_uris(&spec);
        let mut m = Managed {
            prepared: false,
            epoch,
            log_starts: BTreeMap::new(),
            spec,
            disks,
            shippers,
            running: None,
            fenced: Arc::default(),
        };
        self.start(&mut m);
        tracing::info!(vm = %m.spec.vm_id, generation = m.spec.generation, disks = m.disks.len(), suspended = m.spec.suspended, "replication enabled");
        let generation = m.spec.generation;
        vms.insert(m.spec.vm_id.clone(), m);
        EnableReply { accepted: true, message: String::new(), generation, exports, epoch }
    }

    /// Stops replicating `vm_id` (only when `uid` matches) and forgets its logs.
    pub async fn remove(&self, vm_id: &str, uid: &str) -> bool {
        let mut vms = self.vms.lock().await;
        if vms.get(vm_id).is_none_or(|m| m.spec.uid != uid) {
            return false;
        }
        let mut m = vms.remove(vm_id).expect("checked above");
        drop(vms);
        Self::stop(&mut m).await;
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
    /// read-only, ship the last segments; per disk (name, last logged
    /// sequence, sequence durable on the replica).
    pub async fn prepare_failover(&self, vm_id: &str, uid: &str) -> Result<Vec<(String, u64, u64)>, String> {
        let mut vms = self.vms.lock().await;
        let m = vms
            .get_mut(vm_id)
            .filter(|m| m.spec.uid == uid)
            .ok_or_else(|| format!("VM {vm_id} is not protected on this agent"))?;
        Self::stop(m).await;
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
            }
            out.push((name, last, durable));
        }
        tracing::info!(vm = vm_id, disks = ?out, "prepared for a planned failover");
        Ok(out)
    }

    /// Serves promoted replica images as the VM's disks (they were this
    /// agent's replicas, so no --disk-root check), each logging from the
    /// sequence given (the one after what the image holds of the log it
    /// applied) under `epoch`. Replicated once EnableReplication names a
    /// replica server (reverse or extended replication). Idempotent.
    pub async fn adopt(
        &self,
        vm_id: &str,
        uid: &str,
        images: Vec<(String, PathBuf, u64)>,
        epoch: u64,
    ) -> EnableReply {
        let mut vms = self.vms.lock().await;
        let spec = VmReplicationSpec {
            vm_id: vm_id.to_owned(),
            uid: uid.to_owned(),
            suspended: true,
            interval_seconds: 30,
            disks: images
                .iter()
                .map(|(name, path, _)| crate::control::proto::DiskSpec {
                    name: name.clone(),
                    path: path.display().to_string(),
                })
                .collect(),
            ..Default::default()
        };
        if let Some(m) = vms.get(vm_id) {
            return EnableReply {
                accepted: true,
                message: String::new(),
                generation: 0,
                exports: self.export_uris(&spec),
                epoch: m.epoch,
            };
        }
        let refuse =
            |message| EnableReply { accepted: false, message, generation: 0, exports: Vec::new(), epoch: 0 };
        // A log left by an earlier time this image was served belongs to
        // another direction: this promotion's log continues the numbering
        // of what the image holds, where the other side's replicas expect it.
        for (name, path, first_seq) in &images {
            if let Err(e) = fresh_log(vm_id, name, path, epoch, *first_seq) {
                return refuse(format!("starting the log of {}: {e}", path.display()));
            }
        }
        let log_starts = images.iter().map(|(name, _, first)| (name.clone(), *first)).collect();
        let images = images.into_iter().map(|(name, path, _)| (name, path)).collect();
        let disks = match open_disks(vm_id, images).await {
            Ok(d) => d,
            Err(message) => return refuse(message),
        };
        if let Err(message) = self.add_exports(vm_id, &disks) {
            return refuse(message);
        }
        let exports = self.export_uris(&spec);
        tracing::info!(vm = vm_id, disks = disks.len(), "promoted replica served as the VM's disks");
        vms.insert(
            vm_id.to_owned(),
            Managed {
                prepared: false,
                epoch,
                log_starts,
                spec,
                disks,
                shippers: Vec::new(),
                running: None,
                fenced: Arc::default(),
            },
        );
        EnableReply { accepted: true, message: String::new(), generation: 0, exports, epoch }
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
    async fn served_disks(&self, spec: &VmReplicationSpec) -> Option<Vec<(String, PathBuf)>> {
        let vms = self.vms.lock().await;
        let m = vms.get(&spec.vm_id).filter(|m| m.spec.uid == spec.uid)?;
        let named: Vec<(String, PathBuf)> =
            spec.disks.iter().map(|d| (d.name.clone(), PathBuf::from(&d.path))).collect();
        m.serves(&named).then_some(named)
    }

    /// Reverse replication, old primary's side: a VM prepared for a planned
    /// failover stops being served here so that its disks can become
    /// replicas of the promoted side. Its logs (all shipped and durable
    /// there) are deleted; the images stay. `None` when the VM is not
    /// prepared here (it still runs, or this agent restarted since). Per
    /// disk: name, image, and the last sequence logged (what the image holds).
    pub async fn release_prepared(&self, vm_id: &str) -> Option<Vec<(String, PathBuf, u64)>> {
        let mut vms = self.vms.lock().await;
        if !vms.get(vm_id).is_some_and(|m| m.prepared) {
            return None;
        }
        let mut m = vms.remove(vm_id).expect("checked above");
        drop(vms);
        Self::stop(&mut m).await;
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
        tracing::info!(vm = vm_id, "prepared VM released: its disks become replicas of the promoted side");
        Some(out)
    }

    /// Extended replication: forwards what `replicas` (this agent's replicas
    /// of the VM) apply to `r.replica_address`, or stops that (`r.remove`,
    /// which deletes what was kept for it). Idempotent per uid and generation.
    pub async fn extend(&self, r: ExtendRequest, replicas: Vec<Arc<ReplicaDisk>>) -> EnableReply {
        let reply = |accepted, message: String| EnableReply {
            accepted,
            message,
            generation: r.generation,
            exports: Vec::new(),
            epoch: 0,
        };
        let mut extended = self.extended.lock().await;
        if r.remove {
            if let Some(e) = extended.remove(&r.vm_id) {
                e.stop().await;
                tracing::info!(vm = %r.vm_id, "extended replication removed; the extended replica keeps its disks");
            }
            for d in replicas {
                match tokio::task::spawn_blocking(move || d.set_forward(false)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return reply(false, format!("dropping what was kept for it: {e}")),
                    Err(e) => return reply(false, e.to_string()),
                }
            }
            return reply(true, String::new());
        }
        if replicas.is_empty() {
            return reply(false, format!("no replica of {} on this agent", r.vm_id));
        }
        if replicas.iter().any(|d| d.state().promoted) {
            return reply(
                false,
                format!(
                    "{} was failed over to this site: it replicates as a primary now (a planned failover \
                     without reverseReplication resumes to the extended replica)",
                    r.vm_id
                ),
            );
        }
        if replicas.iter().any(|d| !d.state().has_copy) {
            return reply(
                false,
                format!(
                    "the replica of {} has no initial copy yet: extended replication starts after it",
                    r.vm_id
                ),
            );
        }
        let primary = replicas.iter().map(|d| d.state().primary_interval_seconds).max().unwrap_or(0);
        if r.interval_seconds == 0 || r.interval_seconds < primary {
            return reply(
                false,
                format!(
                    "extended replication every {}s is more often than the primary replicates (every {primary}s): \
                     forward at least {primary}s apart",
                    r.interval_seconds
                ),
            );
        }
        if extended.get(&r.vm_id).is_some_and(|e| e.uid == r.uid && e.generation >= r.generation) {
            return reply(true, String::new());
        }
        let (addr, server_name) = match self.replica_endpoint(&r.replica_address).await {
            Ok(e) => e,
            Err(why) => return reply(false, why),
        };
        let peer = Peer { addr: addr.clone(), server_name, tls: self.cfg.tls.clone() };
        let ch = match peer.channel() {
            Ok(c) => c,
            Err(e) => return reply(false, format!("extended replica server {addr}: {e}")),
        };
        let cfg = ShipperConfig {
            compression: r.compression,
            backoff: self.cfg.backoff.clone(),
            history: Some(crate::replication::proto::RecoveryHistory {
                window_seconds: r.history_window_seconds,
                hourly_points: r.history_hourly_points,
            }),
            interval_seconds: r.interval_seconds,
            ..Default::default()
        };
        let shippers: Vec<Arc<Shipper>> = replicas
            .into_iter()
            .map(|d| {
                let s = Shipper::forwarding(
                    d,
                    ch.clone(),
                    cfg.clone(),
                    self.cfg.limiter.clone(),
                    self.cfg.transfers.clone(),
                );
                Arc::new(s.with_metrics(self.metrics.clone()).with_peer(peer.clone()))
            })
            .collect();
        if let Some(old) = extended.remove(&r.vm_id) {
            old.stop().await;
        }
        let (stop, stopped) = watch::channel(false);
        let interval = Duration::from_secs(u64::from(r.interval_seconds));
        // The same cycle as a primary's: with no disks of its own to cut, it
        // only ships (at once, then every interval, on the back-off after a failure).
        let cycle = VmReplication::new(shippers.clone(), interval, self.cfg.backoff.clone(), None);
        let task = tokio::spawn(async move {
            cycle.run(stopped).await;
        });
        tracing::info!(vm = %r.vm_id, to = %r.replica_address, every = ?interval, "extended replication");
        extended.insert(
            r.vm_id.clone(),
            Extended { uid: r.uid.clone(), generation: r.generation, shippers, running: (stop, task) },
        );
        reply(true, String::new())
    }

    /// Before a promotion: forwards what was kept for the extended replica
    /// one last time (so that it can follow the promoted log), then stops
    /// extended replication of `vm_id`. Whether the extended replica holds
    /// everything (`true` also when there was none).
    pub async fn finish_extended(&self, vm_id: &str) -> bool {
        let Some(e) = self.extended.lock().await.remove(vm_id) else { return true };
        let mut complete = true;
        for s in e.stop().await {
            match tokio::time::timeout(Duration::from_secs(30), s.sync_once()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(vm = vm_id, disk = s.disk_id(), error = %e, "last forward before the promotion");
                    complete = false;
                }
                Err(_) => complete = false,
            }
        }
        complete
    }

    /// Every forwarding shipper (extended replication).
    pub async fn extended_shippers(&self) -> Vec<Arc<Shipper>> {
        self.extended.lock().await.values().flat_map(|e| e.shippers.iter().cloned()).collect()
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
            })
            .collect()
    }

    /// Stops every cycle and shuts every disk down cleanly.
    pub async fn shutdown(&self) {
        let mut vms = self.vms.lock().await;
        for m in vms.values_mut() {
            Self::stop(m).await;
            for d in &m.disks {
                let d = d.clone();
                if let Ok(Err(e)) = tokio::task::spawn_blocking(move || d.shutdown()).await {
                    tracing::error!(error = %e, "clean shutdown failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::proto::DiskSpec;

    fn spec(path: &str) -> VmReplicationSpec {
        VmReplicationSpec {
            vm_id: "ns.vm".into(),
            uid: "u1".into(),
            generation: 1,
            disks: vec![DiskSpec { name: "root".into(), path: path.into() }],
            replica_address: "replica:9443".into(),
            interval_seconds: 30,
            compression: true,
            suspended: false,
            initial_replication_at_unix_ms: 0,
            ..Default::default()
        }
    }

    #[test]
    fn quiesce_commands_need_the_agents_consent() {
        let mut s = spec("/x");
        assert_eq!(quiesce(&s, false).unwrap(), None, "no interval, no quiesce");
        s.app_consistent_interval_seconds = 3600;
        assert!(quiesce(&s, true).unwrap_err().contains("needs a way to quiesce"));
        s.freeze_command = vec!["fsfreeze".into(), "-f".into(), "/".into()];
        s.thaw_command = vec!["fsfreeze".into(), "-u".into(), "/".into()];
        assert!(quiesce(&s, false).unwrap_err().contains("--allow-quiesce-commands"));
        assert!(
            matches!(quiesce(&s, true).unwrap(), Some((Quiesce::Command { .. }, d)) if d.as_secs() == 3600)
        );
        s.freeze_command.clear();
        s.thaw_command.clear();
        s.guest_agent_socket = "/run/qga.sock".into();
        assert!(matches!(quiesce(&s, false).unwrap(), Some((Quiesce::GuestAgent { .. }, _))));
        s.guest_agent_socket = "qga.sock".into();
        assert!(quiesce(&s, false).unwrap_err().contains("not an absolute path"));
    }

    #[test]
    fn disk_paths_are_confined_to_the_roots() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let img = root.path().join("root.img");
        std::fs::write(&img, [0u8; 512]).unwrap();
        let escape = outside.path().join("secret.img");
        std::fs::write(&escape, [0u8; 512]).unwrap();
        let roots = vec![root.path().to_owned()];
        assert!(check_spec(&spec(img.to_str().unwrap()), &roots).is_ok());

        let err = check_spec(&spec(escape.to_str().unwrap()), &roots).unwrap_err();
        assert!(err.contains("outside the directories"), "{err}");
        let dotdot = format!(
            "{}/../{}/secret.img",
            root.path().display(),
            outside.path().file_name().unwrap().to_str().unwrap()
        );
        let err = check_spec(&spec(&dotdot), &roots).unwrap_err();
        assert!(err.contains("outside the directories"), "{err}");
        let link = root.path().join("link.img");
        std::os::unix::fs::symlink(&escape, &link).unwrap();
        let err = check_spec(&spec(link.to_str().unwrap()), &roots).unwrap_err();
        assert!(err.contains("outside the directories"), "symlink escape: {err}");
        let err = check_spec(&spec("relative.img"), &roots).unwrap_err();
        assert!(err.contains("not absolute"), "{err}");

        let mut bad = spec(img.to_str().unwrap());
        bad.interval_seconds = 0;
        assert!(check_spec(&bad, &roots).unwrap_err().contains("1-3600"));
        bad = spec(img.to_str().unwrap());
        bad.vm_id = "../x".into();
        assert!(check_spec(&bad, &roots).unwrap_err().contains("is not allowed"));
    }
}
