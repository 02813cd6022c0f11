//! The control API (`vmreplica.control.v1.Control`) over [`crate::agent::Agent`]:
//! the controller reads statistics, sequence positions and recovery points
//! here, configures the site, and enables, updates and removes the
//! replication of VMs. Only the controller's identity may call it
//! ([`authorize_controller`]); the wire types end here.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use vmreplica_api::{
    control::{
        AgentStatus, ConfigureReply, DeleteMaterializedReply, DeleteMaterializedRequest, EnableReply,
        ExtendRequest, FinalDisk, GetStatusRequest, MaterializeReply, MaterializeRequest, PrepareReply,
        PrimaryDisk, PromoteRequest, ProtectedVm, RecoveryPoint, RemoveReplicaRequest, RemoveReply,
        RemoveRequest, ReplicaDisk, ResyncProgress, SiteConfiguration, SiteInForce, VmReplicationSpec,
        control_server::Control,
    },
    tls::{LiveTls, TlsMaterial},
};

use crate::{
    agent::{Agent, ControlError},
    node::spec::{DiskSpec, ExtendSpec, Served, VmSpec},
    replication::{
        authz::{Entry, SiteConfig},
        shipper::{InitialMethod, ResyncPolicy, Shipper},
    },
    site::{InForce, Settings},
};

/// Checks a pushed site configuration and turns it into the agent's rules;
/// the error says what to fix.
pub fn site_config(c: &SiteConfiguration) -> Result<(SiteConfig, crate::replica::retention::Policy), String> {
    let absolute = |what: &str, p: &str| {
        let path = std::path::Path::new(p);
        if path.is_absolute() && !path.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
            Ok(path.to_path_buf())
        } else {
            Err(format!("{what} {p:?} is not an absolute path without '..'"))
        }
    };
    let mut entries = Vec::new();
    for r in &c.rules {
        let pattern = r.allowed_primary_server.to_ascii_lowercase();
        let label_ok = |l: &str| {
            !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        let body = pattern.strip_prefix("*.").unwrap_or(&pattern);
        if !body.split('.').all(label_ok) {
            return Err(format!(
                "AuthorizationEntry {}: allowedPrimaryServer {:?} is not a DNS name or *.suffix",
                r.name, r.allowed_primary_server
            ));
        }
        entries.push(Entry {
            name: r.name.clone(),
            allowed_primary_server: pattern,
            storage: absolute(&format!("AuthorizationEntry {}: replicaStorageLocation", r.name), &r.storage)?,
            trust_group: r.trust_group.clone(),
        });
    }
    let default_storage = match c.default_storage.as_str() {
        "" if c.allow_any_server => {
            return Err(
                "allowAnyServer is on but defaultStorageLocation is empty: set where those replicas go"
                    .into(),
            );
        }
        "" => None,
        p => Some(absolute("defaultStorageLocation", p)?),
    };
    let default_trust_group =
        if c.default_trust_group.is_empty() { "default".to_owned() } else { c.default_trust_group.clone() };
    if c.window_seconds > 86_400 {
        return Err(format!(
            "a continuous recovery window of {}s is more than the 86400s (one day) allowed",
            c.window_seconds
        ));
    }
    let policy = crate::replica::retention::Policy {
        window_ms: if c.window_seconds == 0 { 3_600_000 } else { c.window_seconds * 1000 },
        hourly: c.hourly_points.min(168),
    };
    Ok((
        SiteConfig { allow_any_server: c.allow_any_server, default_storage, default_trust_group, entries },
        policy,
    ))
}

/// The ReplicationServer's settings of a pushed configuration, checked.
pub fn site_settings(c: &SiteConfiguration) -> Result<Settings, String> {
    let port = match u16::try_from(c.port) {
        Ok(0) => None,
        Ok(p) => Some(p),
        Err(_) => return Err(format!("port {} is not a TCP port (1-65535)", c.port)),
    };
    if c.max_active_transfers > 1024 {
        return Err(format!("maxActiveTransfers {} is more than the 1024 allowed", c.max_active_transfers));
    }
    Ok(Settings {
        port,
        max_transfers: (c.max_active_transfers > 0).then_some(c.max_active_transfers as usize),
        bandwidth: c.bandwidth_limit_bytes_per_second,
        tls: c.tls.as_ref().map(|t| TlsMaterial {
            cert_pem: t.cert_pem.clone(),
            key_pem: t.key_pem.clone(),
            ca_pem: t.ca_pem.clone(),
        }),
    })
}

/// What a ReplicationServer set that is in force here, on the wire.
pub fn in_force(f: &InForce) -> SiteInForce {
    let n = |x: usize| u32::try_from(x).unwrap_or(u32::MAX);
    SiteInForce {
        port: f.listening.map_or(0, |a| u32::from(a.port())),
        max_active_transfers: n(f.max_transfers),
        active_transfers: n(f.active_transfers),
        peak_active_transfers: n(f.peak_transfers),
        bandwidth_limit_bytes_per_second: f.bandwidth,
        certificate_serial: f.certificate.serial.clone(),
        certificate_not_after_unix: f.certificate.not_after_unix,
        certificate_from_site: f.certificate_from_site,
    }
}

/// The gRPC status of a failed control call (a refusal is a reply, not this).
fn failed(e: ControlError) -> Status {
    match e {
        ControlError::Unsupported(m) => Status::failed_precondition(m),
        ControlError::Invalid(m) => Status::invalid_argument(m),
        ControlError::NotFound(m) => Status::not_found(m),
        ControlError::Refused(m) | ControlError::Failed(m) => Status::failed_precondition(m),
        ControlError::Internal(m) => Status::internal(m),
    }
}

/// The reply to a call that serves disks: accepted with the exports, or
/// refused with the reason.
fn enable_reply(r: Result<Served, ControlError>, generation: i64) -> Result<Response<EnableReply>, Status> {
    Ok(Response::new(match r {
        Ok(s) => EnableReply {
            accepted: true,
            message: String::new(),
            generation: s.generation,
            exports: s.exports,
            epoch: s.epoch,
        },
        Err(ControlError::Refused(message)) => {
            EnableReply { accepted: false, message, generation, ..Default::default() }
        }
        Err(e) => return Err(failed(e)),
    }))
}

fn vm_spec(s: VmReplicationSpec) -> Result<VmSpec, String> {
    Ok(VmSpec {
        vm_id: s.vm_id,
        uid: s.uid,
        generation: s.generation,
        disks: s.disks.into_iter().map(|d| DiskSpec { name: d.name, path: d.path }).collect(),
        replica_address: s.replica_address,
        interval_seconds: s.interval_seconds,
        compression: s.compression,
        suspended: s.suspended,
        initial_replication_at_unix_ms: s.initial_replication_at_unix_ms,
        app_consistent_interval_seconds: s.app_consistent_interval_seconds,
        freeze_command: s.freeze_command,
        thaw_command: s.thaw_command,
        guest_agent_socket: s.guest_agent_socket,
        history_window_seconds: s.history_window_seconds,
        history_hourly_points: s.history_hourly_points,
        resync: ResyncPolicy {
            automatic: !s.resync_manual_only,
            window: (s.resync_window_start_minute != s.resync_window_end_minute).then(|| {
                let m = |x: u32| (x % 1440) as u16;
                (m(s.resync_window_start_minute), m(s.resync_window_end_minute))
            }),
            requested: Some(s.resync_request_id).filter(|id| !id.is_empty()),
            verify: Some(s.verify_request_id).filter(|id| !id.is_empty()),
        },
        initial: initial_method(&s.initial_method, &s.initial_directory)?,
    })
}

/// `spec.initialReplication` as the shippers use it; an error names what is wrong.
fn initial_method(method: &str, dir: &str) -> Result<InitialMethod, String> {
    match method {
        "" | "Network" => Ok(InitialMethod::Network),
        "ExistingImage" => Ok(InitialMethod::ExistingImage),
        "ExternalMedia" => {
            let d = std::path::Path::new(dir);
            if !d.is_absolute() || d.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
                return Err(format!(
                    "initialReplication.directory {dir:?}: ExternalMedia needs an absolute directory without `..`"
                ));
            }
            Ok(InitialMethod::ExternalMedia(d.to_owned()))
        }
        other => Err(format!("initialReplication.method {other:?}: Network, ExternalMedia or ExistingImage")),
    }
}

fn replica_disk(r: &crate::replica::ReplicaDisk) -> ReplicaDisk {
    let s = r.state().clone();
    ReplicaDisk {
        has_copy: s.has_copy(),
        removed: s.removed(),
        removed_at_replica: s.removed_at_replica(),
        primary_final_seq: s.primary_final_seq().unwrap_or(0),
        primary_finished: s.primary_final_seq().is_some(),
        promoted: s.promoted(),
        // The old primary's own disk (an image outside the replica's
        // directory), not a copy of a point the VM ran on here.
        reverse: s.image.as_ref().is_some_and(|i| !i.starts_with(r.dir())),
        diverged: s.diverged.as_ref().map(|d| vmreplica_api::control::DivergedPoint {
            seq: d.seq,
            epoch: d.epoch,
            time_unix_ms: d.time_ms,
        }),
        image_path: r.image().display().to_string(),
        last_contact_unix_ms: r.last_contact_ms(),
        segments_applied: s.stats.segments,
        bytes_applied: s.stats.bytes,
        max_segment_bytes: s.stats.max_segment_bytes,
        last_applied_sealed_unix_ms: s.stats.last_sealed_unix_ms,
        primary_interval_seconds: s.primary_interval_seconds,
        received_through: s.received_through,
        applied_through: s.applied_through,
        points: s
            .points
            .iter()
            .map(|p| RecoveryPoint { seq: p.seq, time_unix_ms: p.time_ms, kind: format!("{:?}", p.kind) })
            .collect(),
        vm_id: s.vm_id,
        disk_id: s.disk_id,
        primary: s.primary,
        trust_group: s.trust_group,
        epoch: s.epoch,
        disk_size: s.disk_size,
    }
}

/// A shipper's numbers as the control API reports them.
fn shipped(s: &Shipper) -> PrimaryDisk {
    let st = s.stats();
    let copy = s.copy_progress();
    let ms = |d: std::time::Duration| d.as_millis() as u64;
    let unix_ms = |t: Option<std::time::SystemTime>| {
        t.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, ms)
    };
    let resync = s.resync_progress().map(|r| ResyncProgress {
        id: r.id,
        dirty_map: r.dirty_map,
        done_bytes: r.done_bytes,
        total_bytes: r.total_bytes,
        wire_bytes: r.wire_bytes,
        data_bytes: r.data_bytes,
        started_unix_ms: unix_ms(r.started),
        duration_ms: 0,
        changed_bytes: r.changed_bytes,
    });
    let last_resync = st.last_resync.as_ref().map(|r| ResyncProgress {
        id: r.id.clone(),
        dirty_map: r.dirty_map,
        done_bytes: 0,
        total_bytes: 0,
        wire_bytes: r.wire_bytes,
        data_bytes: r.data_bytes,
        started_unix_ms: 0,
        duration_ms: (r.seconds * 1000.0) as u64,
        changed_bytes: r.changed_bytes,
    });
    // Needed and not running: the log overflowed, or a cycle found it needed.
    let resync_required = resync.is_none()
        && (st.resync_waiting.is_some() || s.disk().is_some_and(|d| d.log_status().resync_required));
    PrimaryDisk {
        vm_id: s.vm_id().to_owned(),
        disk_id: s.disk_id().to_owned(),
        pending_bytes: s.pending_bytes(),
        next_seq: s.next_seq(),
        resync_required,
        segments_sent: st.segments_sent,
        raw_bytes_sent: st.raw_bytes_sent,
        wire_bytes_sent: st.wire_bytes_sent,
        average_segment_bytes: st.raw_bytes_sent.checked_div(st.segments_sent).unwrap_or(0),
        max_segment_bytes: st.max_segment_bytes,
        average_latency_ms: ms(st.total_latency).checked_div(st.segments_sent).unwrap_or(0),
        errors: st.errors,
        successful_cycles: st.successful_cycles,
        missed_cycles: st.missed_cycles,
        last_replication_unix_ms: st
            .last_replication
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, ms),
        last_error: st.last_error.unwrap_or_default(),
        failure_kind: st.last_failure as i32,
        copy_sent_bytes: copy.0,
        copy_total_bytes: copy.1,
        durable_through: st.durable_through,
        initial_copy_bytes: st.initial_copy_bytes,
        disk_size: s.disk_size(),
        epoch: s.epoch(),
        resync,
        last_resync,
        resync_waiting: st.resync_waiting.unwrap_or_default(),
        last_verify: st.last_verify.as_ref().map(|v| vmreplica_api::control::VerifyResult {
            id: v.id.clone(),
            seq: v.seq,
            differing_bytes: v.differing_bytes,
            in_flight_bytes: v.in_flight_bytes,
            compared_bytes: v.compared_bytes,
            finished_unix_ms: unix_ms(v.finished),
            duration_ms: v.duration_ms,
        }),
    }
}

/// The control API of one agent.
pub struct ControlService {
    agent: Arc<Agent>,
}

impl ControlService {
    pub fn new(agent: Arc<Agent>) -> Self {
        Self { agent }
    }

    /// The status of every disk and replica, as the controller reads it.
    pub async fn status(&self) -> AgentStatus {
        let s = self.agent.snapshot().await;
        AgentStatus {
            primaries: s.primaries.iter().map(|x| shipped(x)).collect(),
            replicas: s.replicas.iter().map(|r| replica_disk(r)).collect(),
            vms: s
                .vms
                .into_iter()
                .map(|v| ProtectedVm {
                    vm_id: v.vm_id,
                    uid: v.uid,
                    generation: v.generation,
                    suspended: v.suspended,
                    prepared: v.prepared,
                    fenced_epoch: v.fenced_epoch,
                    last_app_consistent_unix_ms: v.quiesce.last_point_unix_ms,
                    quiesce_error: v.quiesce.error,
                    quiesce_error_unix_ms: v.quiesce.error_unix_ms,
                    thaw_pending: v.quiesce.thaw_pending,
                    disks: v
                        .disks
                        .into_iter()
                        .map(|d| vmreplica_api::control::DiskSpec { name: d.name, path: d.path })
                        .collect(),
                })
                .collect(),
            extended: s.extended.iter().map(|x| shipped(x)).collect(),
            site: Some(in_force(&self.agent.site_in_force().await)),
        }
    }
}

#[tonic::async_trait]
impl Control for ControlService {
    async fn get_status(&self, _req: Request<GetStatusRequest>) -> Result<Response<AgentStatus>, Status> {
        Ok(Response::new(self.status().await))
    }

    async fn configure_site(
        &self,
        req: Request<SiteConfiguration>,
    ) -> Result<Response<ConfigureReply>, Status> {
        let c = req.into_inner();
        let result = match site_config(&c).and_then(|(s, p)| Ok((s, p, site_settings(&c)?))) {
            Ok((site, policy, settings)) => self.agent.configure_site(site, policy, settings).await,
            Err(why) => Err(ControlError::Refused(why)),
        };
        let now = Some(in_force(&self.agent.site_in_force().await));
        let reply = |accepted, message: String| ConfigureReply {
            accepted,
            message,
            revision: c.revision.clone(),
            in_force: now.clone(),
        };
        Ok(Response::new(match result {
            Ok(()) => reply(true, String::new()),
            Err(ControlError::Unsupported(_)) => reply(
                false,
                "this agent does not receive replication (it was not started with `receive`)".into(),
            ),
            Err(e) => reply(false, e.to_string()),
        }))
    }

    async fn enable_replication(
        &self,
        req: Request<VmReplicationSpec>,
    ) -> Result<Response<EnableReply>, Status> {
        let req = req.into_inner();
        let generation = req.generation;
        match vm_spec(req) {
            Ok(spec) => enable_reply(self.agent.enable(spec).await, generation),
            Err(why) => enable_reply(Err(ControlError::Refused(why)), generation),
        }
    }

    async fn materialize_point(
        &self,
        req: Request<MaterializeRequest>,
    ) -> Result<Response<MaterializeReply>, Status> {
        let r = req.into_inner();
        let (path, seq) = if r.diverged {
            self.agent.materialize_diverged(&r.vm_id, &r.disk_id, &r.name).await.map_err(failed)?
        } else {
            self.agent.materialize(&r.vm_id, &r.disk_id, r.seq, &r.name).await.map_err(failed)?
        };
        Ok(Response::new(MaterializeReply { path: path.display().to_string(), seq }))
    }

    async fn discard_diverged_point(
        &self,
        req: Request<DeleteMaterializedRequest>,
    ) -> Result<Response<DeleteMaterializedReply>, Status> {
        let r = req.into_inner();
        let deleted = self.agent.discard_diverged(&r.vm_id, &r.disk_id).await.map_err(failed)?;
        Ok(Response::new(DeleteMaterializedReply { deleted }))
    }

    async fn delete_materialized(
        &self,
        req: Request<DeleteMaterializedRequest>,
    ) -> Result<Response<DeleteMaterializedReply>, Status> {
        let r = req.into_inner();
        let deleted = self.agent.delete_materialized(&r.vm_id, &r.disk_id, &r.name).map_err(failed)?;
        Ok(Response::new(DeleteMaterializedReply { deleted }))
    }

    async fn prepare_failover(&self, req: Request<RemoveRequest>) -> Result<Response<PrepareReply>, Status> {
        let r = req.into_inner();
        Ok(Response::new(match self.agent.prepare_failover(&r.vm_id, &r.uid).await {
            Ok(disks) => PrepareReply {
                synced: disks.iter().all(|d| d.durable_through >= d.last_seq),
                message: String::new(),
                disks: disks
                    .into_iter()
                    .map(|d| FinalDisk {
                        disk_id: d.disk_id,
                        last_seq: d.last_seq,
                        durable_through: d.durable_through,
                    })
                    .collect(),
            },
            Err(ControlError::Refused(message)) => PrepareReply { synced: false, message, disks: Vec::new() },
            Err(e) => return Err(failed(e)),
        }))
    }

    async fn promote(&self, req: Request<PromoteRequest>) -> Result<Response<EnableReply>, Status> {
        let r = req.into_inner();
        enable_reply(self.agent.promote(&r.vm_id, &r.uid, &r.copy_name, r.complete).await, 0)
    }

    async fn extend_replication(&self, req: Request<ExtendRequest>) -> Result<Response<EnableReply>, Status> {
        let r = req.into_inner();
        let generation = r.generation;
        let spec = ExtendSpec {
            vm_id: r.vm_id,
            uid: r.uid,
            generation: r.generation,
            replica_address: r.replica_address,
            interval_seconds: r.interval_seconds,
            compression: r.compression,
            history_window_seconds: r.history_window_seconds,
            history_hourly_points: r.history_hourly_points,
            remove: r.remove,
        };
        let result = self.agent.extend(spec).await.map(|()| Served { generation, ..Default::default() });
        enable_reply(result, generation)
    }

    async fn remove_replica(
        &self,
        req: Request<RemoveReplicaRequest>,
    ) -> Result<Response<RemoveReply>, Status> {
        let r = req.into_inner();
        let removed = self.agent.remove_replica(&r.vm_id, &r.disk_id).map_err(failed)?;
        Ok(Response::new(RemoveReply { removed }))
    }

    async fn remove_replication(&self, req: Request<RemoveRequest>) -> Result<Response<RemoveReply>, Status> {
        let r = req.into_inner();
        Ok(Response::new(RemoveReply { removed: self.agent.remove_replication(&r.vm_id, &r.uid).await }))
    }
}

/// The certificate name the controller presents when none is configured
/// (`vmreplica-agent --controller-name`).
pub const DEFAULT_CONTROLLER_NAME: &str = "vmreplica-controller";

/// Admits a control call only from a certificate naming one of
/// `controllers`: sites often share a CA (each must trust the other's
/// certificates), and a peer site's agent must not promote, remove or
/// reconfigure anything here.
pub fn authorize_controller(names: &[String], controllers: &[String]) -> Result<(), Status> {
    if names.iter().any(|n| controllers.iter().any(|c| c.eq_ignore_ascii_case(n))) {
        return Ok(());
    }
    let presented = if names.is_empty() { "no DNS name".to_owned() } else { names.join(", ") };
    Err(Status::permission_denied(format!(
        "the control API admits only the controller ({}), and this client certificate names {presented}: \
         an agent of another site may not call it (set --controller-name to the controller's certificate name)",
        controllers.join(", ")
    )))
}

/// Serves the control API with mutual TLS on `listener` until `shutdown`
/// completes, to clients whose certificate names one of `controllers`.
pub async fn serve(
    agent: Arc<Agent>,
    listener: tokio::net::TcpListener,
    tls: Arc<LiveTls>,
    controllers: Vec<String>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let check = move |req: Request<()>| {
        let names = req
            .peer_certs()
            .and_then(|c| c.first().map(|c| vmreplica_api::tls::dns_names(c.as_ref())))
            .unwrap_or_default();
        authorize_controller(&names, &controllers).map(|()| req)
    };
    tonic::transport::Server::builder()
        .add_service(vmreplica_api::control::control_server::ControlServer::with_interceptor(
            ControlService::new(agent),
            check,
        ))
        .serve_with_incoming_shutdown(vmreplica_api::tls::incoming(listener, tls), shutdown)
        .await
}
