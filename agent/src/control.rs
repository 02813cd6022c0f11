//! The agent's control API (`vmreplica.control.v1.Control`), served with the
//! same mutual TLS as replication: the controller reads statistics, sequence
//! positions and recovery points here, configures the site, and enables,
//! updates and removes the replication of VMs (see [`crate::node`]).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::replication::{service::ReplicaService, shipper::Shipper};

/// Generated from `agent/proto/control.proto`.
pub mod proto {
    tonic::include_proto!("vmreplica.control.v1");
}

use proto::{
    AgentStatus, ConfigureReply, DeleteMaterializedReply, DeleteMaterializedRequest, EnableReply,
    ExtendRequest, FinalDisk, GetStatusRequest, MaterializeReply, MaterializeRequest, PrepareReply,
    PrimaryDisk, PromoteRequest, RecoveryPoint, RemoveReplicaRequest, RemoveReply, RemoveRequest,
    ReplicaDisk, SiteConfiguration, VmReplicationSpec, control_server::Control,
};

use crate::replication::authz::{Entry, SiteConfig};

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

/// What the control API reports on.
#[derive(Default)]
pub struct ControlService {
    pub shippers: Vec<Arc<Shipper>>,
    pub replicas: Option<Arc<ReplicaService>>,
    /// VMs protected on the controller's request.
    pub node: Option<Arc<crate::node::Node>>,
}

impl ControlService {
    /// The replica of `vm`/`disk` on this agent, for a copy called `name`.
    fn replica_for(
        &self,
        vm: &str,
        disk: &str,
        name: &str,
    ) -> Result<Arc<crate::replica::disk::ReplicaDisk>, Status> {
        crate::replica::names::check("copy name", name)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let svc = self
            .replicas
            .as_ref()
            .ok_or_else(|| Status::failed_precondition("this agent keeps no replicas"))?;
        svc.replica(vm, disk)
            .ok_or_else(|| Status::not_found(format!("no replica of {vm}/{disk} on this agent")))
    }

    /// The status of every disk and replica, as the controller reads it.
    pub async fn status(&self) -> AgentStatus {
        let mut shippers = self.shippers.clone();
        let mut vms = Vec::new();
        if let Some(node) = &self.node {
            shippers.extend(node.all_shippers().await);
            vms = node.protected().await;
        }
        let primaries = shippers.iter().map(|s| shipped(s)).collect();
        let replicas = self
            .replicas
            .as_ref()
            .map(|svc| {
                svc.replicas()
                    .iter()
                    .map(|r| {
                        let s = r.state().clone();
                        ReplicaDisk {
                            vm_id: s.vm_id,
                            disk_id: s.disk_id,
                            primary: s.primary,
                            trust_group: s.trust_group,
                            epoch: s.epoch,
                            has_copy: s.has_copy,
                            disk_size: s.disk_size,
                            image_path: r.image().display().to_string(),
                            removed: s.removed,
                            segments_applied: s.stats.segments,
                            bytes_applied: s.stats.bytes,
                            max_segment_bytes: s.stats.max_segment_bytes,
                            last_applied_sealed_unix_ms: s.stats.last_sealed_unix_ms,
                            last_contact_unix_ms: r.last_contact_ms(),
                            removed_at_replica: s.removed_at_replica,
                            primary_final_seq: s.primary_final_seq.unwrap_or(0),
                            primary_finished: s.primary_final_seq.is_some(),
                            reverse: s.image.is_some(),
                            primary_interval_seconds: s.primary_interval_seconds,
                            promoted: s.promoted,
                            received_through: s.received_through,
                            applied_through: s.applied_through,
                            points: s
                                .points
                                .iter()
                                .map(|p| RecoveryPoint {
                                    seq: p.seq,
                                    time_unix_ms: p.time_ms,
                                    kind: format!("{:?}", p.kind),
                                })
                                .collect(),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        let extended = match &self.node {
            Some(node) => node.extended_shippers().await.iter().map(|s| shipped(s)).collect(),
            None => Vec::new(),
        };
        AgentStatus { primaries, replicas, vms, extended }
    }
}

/// A shipper's numbers as the control API reports them.
fn shipped(s: &Shipper) -> PrimaryDisk {
    let st = s.stats();
    let resync_required = s.disk().is_some_and(|d| d.log_status().resync_required);
    let copy = s.copy_progress();
    let ms = |d: std::time::Duration| d.as_millis() as u64;
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
        last_error_code: st.last_error_code.unwrap_or_default(),
        copy_sent_bytes: copy.0,
        copy_total_bytes: copy.1,
        durable_through: st.durable_through,
        initial_copy_bytes: st.initial_copy_bytes,
        disk_size: s.disk_size(),
        epoch: s.epoch(),
    }
}

#[tonic::async_trait]
impl Control for Arc<ControlService> {
    async fn get_status(&self, _req: Request<GetStatusRequest>) -> Result<Response<AgentStatus>, Status> {
        Ok(Response::new(self.status().await))
    }

    async fn configure_site(
        &self,
        req: Request<SiteConfiguration>,
    ) -> Result<Response<ConfigureReply>, Status> {
        let c = req.into_inner();
        let reply =
            |accepted, message: String| ConfigureReply { accepted, message, revision: c.revision.clone() };
        let Some(svc) = &self.replicas else {
            return Ok(Response::new(reply(
                false,
                "this agent does not receive replication (it was not started with `receive`)".into(),
            )));
        };
        Ok(Response::new(match site_config(&c) {
            Ok((site, policy)) => {
                tracing::info!(rules = site.entries.len(), allow_any = site.allow_any_server, revision = %c.revision, "site configured");
                let moved = svc.set_site(site);
                svc.set_retention(policy);
                // Replicas under new storage locations (all of them, the first
                // time after a restart) are opened, so that they are reported
                // and can be promoted before any primary opens them.
                if !moved {
                    return Ok(Response::new(reply(true, String::new())));
                }
                let s = svc.clone();
                match tokio::task::spawn_blocking(move || s.recover_all()).await {
                    Ok(Ok(_)) => reply(true, String::new()),
                    Ok(Err(e)) => reply(false, format!("opening the replicas: {e}")),
                    Err(e) => reply(false, e.to_string()),
                }
            }
            Err(why) => reply(false, why),
        }))
    }

    async fn enable_replication(
        &self,
        req: Request<VmReplicationSpec>,
    ) -> Result<Response<EnableReply>, Status> {
        let Some(node) = &self.node else {
            return Err(Status::failed_precondition(
                "this agent does not protect VMs (it was started with `receive` or with fixed --disk)",
            ));
        };
        Ok(Response::new(node.enable(req.into_inner()).await))
    }

    async fn materialize_point(
        &self,
        req: Request<MaterializeRequest>,
    ) -> Result<Response<MaterializeReply>, Status> {
        let r = req.into_inner();
        let replica = self.replica_for(&r.vm_id, &r.disk_id, &r.name)?;
        let (path, seq) = tokio::task::spawn_blocking(move || {
            replica.materialize_named(r.seq, &r.name).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(Status::failed_precondition)?;
        Ok(Response::new(MaterializeReply { path: path.display().to_string(), seq }))
    }

    async fn delete_materialized(
        &self,
        req: Request<DeleteMaterializedRequest>,
    ) -> Result<Response<DeleteMaterializedReply>, Status> {
        let r = req.into_inner();
        let replica = self.replica_for(&r.vm_id, &r.disk_id, &r.name)?;
        let deleted = replica.delete_materialized(&r.name).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(DeleteMaterializedReply { deleted }))
    }

    async fn prepare_failover(&self, req: Request<RemoveRequest>) -> Result<Response<PrepareReply>, Status> {
        let r = req.into_inner();
        let Some(node) = &self.node else {
            return Err(Status::failed_precondition("this agent does not protect VMs"));
        };
        Ok(Response::new(match node.prepare_failover(&r.vm_id, &r.uid).await {
            Ok(disks) => {
                let synced = disks.iter().all(|(_, last, durable)| durable >= last);
                PrepareReply {
                    synced,
                    message: String::new(),
                    disks: disks
                        .into_iter()
                        .map(|(disk_id, last_seq, durable_through)| FinalDisk {
                            disk_id,
                            last_seq,
                            durable_through,
                        })
                        .collect(),
                }
            }
            Err(message) => PrepareReply { synced: false, message, disks: Vec::new() },
        }))
    }

    async fn promote(&self, req: Request<PromoteRequest>) -> Result<Response<EnableReply>, Status> {
        let r = req.into_inner();
        let (Some(node), Some(svc)) = (&self.node, &self.replicas) else {
            return Err(Status::failed_precondition(
                "promotion needs an agent in both roles (serve --listen): this one cannot serve the disks",
            ));
        };
        let refuse = |message: String| EnableReply { accepted: false, message, ..Default::default() };
        let mut disks: Vec<_> = svc.replicas().into_iter().filter(|d| d.state().vm_id == r.vm_id).collect();
        if disks.is_empty() {
            return Ok(Response::new(refuse(format!("no replica of {} on this agent", r.vm_id))));
        }
        // An extended replica gets what was kept for it first, so that it
        // can follow the promoted log (a failover without reverse resumes to it).
        if !node.finish_extended(&r.vm_id).await {
            tracing::warn!(vm = %r.vm_id, "the extended replica did not get everything before the promotion: it will need a resynchronisation");
        }
        disks.sort_by_key(|d| d.state().disk_id.clone());
        if !r.copy_name.is_empty() {
            let mut images = Vec::new();
            for d in disks {
                let path = d.materialized_path(&r.copy_name);
                let seq = d.materialized_seq(&r.copy_name);
                let Some(seq) = seq.filter(|_| path.exists()) else {
                    return Ok(Response::new(refuse(format!(
                        "disk {}: no copy {} to serve: materialise the recovery point first",
                        d.state().disk_id,
                        r.copy_name
                    ))));
                };
                if r.complete {
                    let d2 = d.clone();
                    tokio::task::spawn_blocking(move || d2.complete_unplanned())
                        .await
                        .map_err(|e| Status::internal(e.to_string()))?
                        .map_err(|e| Status::internal(e.to_string()))?;
                }
                images.push((d.state().disk_id.clone(), path, seq + 1));
            }
            return Ok(Response::new(node.adopt(&r.vm_id, &r.uid, images, epoch(svc, &r.vm_id)).await));
        }
        for d in &disks {
            let s = d.state().clone();
            match s.primary_final_seq {
                _ if s.promoted => {}
                Some(f) if s.received_through >= f => {}
                _ => {
                    return Ok(Response::new(refuse(format!(
                        "disk {}: the primary has not finished its part (its final log is not here): request the \
                         planned failover on the primary first",
                        s.disk_id
                    ))));
                }
            }
        }
        let mut images = Vec::new();
        for d in disks {
            let name = d.state().disk_id.clone();
            let d2 = d.clone();
            let path = tokio::task::spawn_blocking(move || d2.promote())
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| Status::internal(e.to_string()))?;
            images.push((name, path, d.state().applied_through + 1));
        }
        Ok(Response::new(node.adopt(&r.vm_id, &r.uid, images, epoch(svc, &r.vm_id)).await))
    }

    async fn extend_replication(&self, req: Request<ExtendRequest>) -> Result<Response<EnableReply>, Status> {
        let (Some(node), Some(svc)) = (&self.node, &self.replicas) else {
            return Err(Status::failed_precondition(
                "extended replication needs an agent in both roles (serve --listen): this one cannot send",
            ));
        };
        let r = req.into_inner();
        let mut replicas: Vec<_> =
            svc.replicas().into_iter().filter(|d| d.state().vm_id == r.vm_id).collect();
        replicas.sort_by_key(|d| d.state().disk_id.clone());
        Ok(Response::new(node.extend(r, replicas).await))
    }

    async fn remove_replica(
        &self,
        req: Request<RemoveReplicaRequest>,
    ) -> Result<Response<RemoveReply>, Status> {
        let r = req.into_inner();
        let Some(replica) = self.replicas.as_ref().and_then(|svc| svc.replica(&r.vm_id, &r.disk_id)) else {
            return Ok(Response::new(RemoveReply { removed: false }));
        };
        replica.mark_removed_at_replica().map_err(|e| Status::internal(e.to_string()))?;
        tracing::info!(vm = %r.vm_id, disk = %r.disk_id, "replication removed at the replica site; the disk stays");
        Ok(Response::new(RemoveReply { removed: true }))
    }

    async fn remove_replication(&self, req: Request<RemoveRequest>) -> Result<Response<RemoveReply>, Status> {
        let r = req.into_inner();
        let removed = match &self.node {
            Some(node) => node.remove(&r.vm_id, &r.uid).await,
            None => false,
        };
        Ok(Response::new(RemoveReply { removed }))
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
    service: Arc<ControlService>,
    listener: tokio::net::TcpListener,
    tls: &crate::replication::tls::TlsMaterial,
    controllers: Vec<String>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let check = move |req: Request<()>| {
        let names = req
            .peer_certs()
            .and_then(|c| c.first().map(|c| crate::replication::tls::dns_names(c.as_ref())))
            .unwrap_or_default();
        authorize_controller(&names, &controllers).map(|()| req)
    };
    tonic::transport::Server::builder()
        .tls_config(tls.server())?
        .add_service(proto::control_server::ControlServer::with_interceptor(service, check))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown)
        .await
}

/// The epoch a VM's replicas here have reached (the newest promotion's).
fn epoch(svc: &ReplicaService, vm_id: &str) -> u64 {
    svc.replicas().iter().filter(|d| d.state().vm_id == vm_id).map(|d| d.state().epoch).max().unwrap_or(0)
}
