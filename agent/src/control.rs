//! The agent's control API (`vmreplica.control.v1.Control`), served with the
//! same mutual TLS as replication: the controller reads statistics, sequence
//! positions and recovery points here. Read-only for now; the controller adds
//! the calls that configure the agent.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::replication::{service::ReplicaService, shipper::Shipper};

/// Generated from `agent/proto/control.proto`.
pub mod proto {
    tonic::include_proto!("vmreplica.control.v1");
}

use proto::{
    AgentStatus, GetStatusRequest, PrimaryDisk, RecoveryPoint, ReplicaDisk, control_server::Control,
};

/// What the control API reports on.
#[derive(Default)]
pub struct ControlService {
    pub shippers: Vec<Arc<Shipper>>,
    pub replicas: Option<Arc<ReplicaService>>,
}

impl ControlService {
    /// The status of every disk and replica, as the controller reads it.
    pub fn status(&self) -> AgentStatus {
        let primaries = self
            .shippers
            .iter()
            .map(|s| {
                let st = s.stats();
                let log = s.disk().log_status();
                let ms = |d: std::time::Duration| d.as_millis() as u64;
                PrimaryDisk {
                    vm_id: s.vm_id().to_owned(),
                    disk_id: s.disk().name().to_owned(),
                    pending_bytes: log.pending_bytes,
                    next_seq: log.next_seq,
                    resync_required: log.resync_required,
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
                    durable_through: st.durable_through,
                    initial_copy_bytes: st.initial_copy_bytes,
                }
            })
            .collect();
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
        AgentStatus { primaries, replicas }
    }
}

#[tonic::async_trait]
impl Control for Arc<ControlService> {
    async fn get_status(&self, _req: Request<GetStatusRequest>) -> Result<Response<AgentStatus>, Status> {
        Ok(Response::new(self.status()))
    }
}

/// Serves the control API with mutual TLS on `listener` until `shutdown` completes.
pub async fn serve(
    service: Arc<ControlService>,
    listener: tokio::net::TcpListener,
    tls: &crate::replication::tls::TlsMaterial,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .tls_config(tls.server())?
        .add_service(proto::control_server::ControlServer::new(service))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown)
        .await
}
