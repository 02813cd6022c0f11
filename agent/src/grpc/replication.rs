//! The replication API (`vmreplica.replication.v1.Replication`) over the
//! agent's replica role: the wire in, [`crate::agent::Agent`] calls out.
//!
//! Every call: the client certificate's DNS names are what it is authorised
//! by (nothing is created or written before that), and chunk and
//! decompressed sizes are bounded. A segment is acknowledged only once
//! durable and verified; applying it happens after, in the background.
//! Refusals are gRPC codes a sender acts on, with a typed [`Refusal`] in the
//! details where the sender must do something particular (a stale epoch).

use std::sync::Arc;

use prost::{Message, bytes::Bytes};
use tonic::{Request, Response, Status, Streaming};
use vmreplica_api::{
    MAX_CHUNK, MAX_FRAME,
    replication::{
        CopyAck, CopyChunk, DiskRef, FinalizeRequest, OpenReply, OpenRequest, Refusal, RefusalKind,
        RemoveAck, ResyncDown, ResyncUp, SegmentAck, SegmentChunk, replication_server::Replication,
        resync_up::Msg as Up,
    },
    tls::{LiveTls, dns_names},
};

use crate::{
    agent::{Agent, OpenArgs},
    limits::TransferPermit,
    replica::{
        Incoming, ReplicaDisk, ReplicaError,
        retention::Policy,
        store::{ReplicaStore, StoreError},
    },
};

/// The gRPC status for a replica error: what the sender should do differs per kind.
pub fn status(e: ReplicaError) -> Status {
    let msg = e.to_string();
    if let ReplicaError::StaleEpoch { current, .. } = e {
        let refusal = Refusal { kind: RefusalKind::StaleEpoch as i32, current_epoch: current };
        return Status::with_details(tonic::Code::FailedPrecondition, msg, refusal.encode_to_vec().into());
    }
    match e {
        ReplicaError::Verification { .. } => Status::data_loss(msg),
        ReplicaError::OutOfOrder { .. } | ReplicaError::ChunkOutOfOrder { .. } => Status::out_of_range(msg),
        ReplicaError::StaleEpoch { .. }
        | ReplicaError::NoInitialCopy
        | ReplicaError::Precondition(_)
        | ReplicaError::InUse(_) => Status::failed_precondition(msg),
        ReplicaError::Mismatch { .. } | ReplicaError::Invalid { .. } => Status::invalid_argument(msg),
        ReplicaError::TooLarge { .. } => Status::resource_exhausted(msg),
        ReplicaError::NoSuchPoint(_) => Status::not_found(msg),
        ReplicaError::Io { .. } | ReplicaError::BadState { .. } => Status::internal(msg),
    }
}

/// The gRPC status for a store refusal.
fn refused(e: StoreError) -> Status {
    let msg = e.to_string();
    match e {
        StoreError::Denied(_) | StoreError::NotPlainDirectory { .. } => Status::permission_denied(msg),
        StoreError::BadName(_) => Status::invalid_argument(msg),
        StoreError::Precondition(_) => Status::failed_precondition(msg),
        StoreError::NotFound(_) => Status::not_found(msg),
        StoreError::Io { .. } => Status::internal(msg),
        StoreError::Replica(r) => status(r),
    }
}

fn peer_names<T>(req: &Request<T>) -> Vec<String> {
    req.peer_certs().and_then(|c| c.first().map(|c| dns_names(c.as_ref()))).unwrap_or_default()
}

/// The replication API of one agent.
pub struct ReplicationService {
    pub(super) agent: Arc<Agent>,
}

impl ReplicationService {
    pub fn new(agent: Arc<Agent>) -> Self {
        Self { agent }
    }

    /// Counts a refusal by its gRPC code (a bounded label).
    /// Counts a refusal, and says it in this site's log too: a replica that
    /// cannot store what it is sent (a full disk, a failing one) or refuses
    /// a caller is news to its operator, not only to the primary's.
    fn counted<T>(&self, r: Result<T, Status>) -> Result<T, Status> {
        if let Err(s) = &r {
            if let Some(m) = self.agent.store().ok().and_then(|s| s.metrics()) {
                m.refused.with_label_values(&[&format!("{:?}", s.code())]).inc();
            }
            use tonic::Code::*;
            match s.code() {
                // The protocol's own answers (resume elsewhere, a stale epoch).
                FailedPrecondition | OutOfRange | AlreadyExists | NotFound | Cancelled => {
                    tracing::debug!(code = ?s.code(), "refused: {}", s.message())
                }
                _ => tracing::warn!(code = ?s.code(), "refused: {}", s.message()),
            }
        }
        r
    }

    /// A replica holding received segments it has not applied (an apply
    /// that never started, whatever the reason) applies them now: a primary
    /// opening it is the moment it is sure to come back to.
    fn apply_behind(&self, vm: &str, disk: &str) {
        let Ok(store) = self.agent.store().cloned() else { return };
        let Some(replica) = store.replica(vm, disk) else { return };
        let behind = {
            let s = replica.state();
            s.received_through > s.applied_through
        };
        if behind {
            spawn_apply(&tokio::runtime::Handle::current(), store, replica);
        }
    }

    fn require(&self, names: &[String], vm: &str, disk: &str) -> Result<Arc<ReplicaDisk>, Status> {
        let store = self.agent.store().map_err(|e| Status::failed_precondition(e.to_string()))?;
        store.require(names, vm, disk).map_err(refused)
    }

    /// Waits until `n` more bytes fit the agent's bandwidth limit (shared
    /// with what it sends): a slow reader slows the sender through TCP.
    pub(super) async fn throttle(&self, n: usize, vm: &str, disk: &str) {
        if let Ok(store) = self.agent.store() {
            store.limits().bandwidth.acquire(n).await;
            if let Some(m) = store.metrics() {
                m.received_bytes.with_label_values(&[vm, disk]).inc_by(n as u64);
            }
        }
    }

    /// Reads a stream's first chunk and its start, authorises the sender for
    /// the replica it names, and waits for a transfer slot.
    async fn begin_stream<C, S>(
        &self,
        names: &[String],
        stream: &mut Streaming<C>,
        start_of: impl Fn(&C) -> Option<S>,
        disk_of: impl Fn(&S) -> Option<DiskRef>,
    ) -> Result<(C, S, Arc<ReplicaDisk>, TransferPermit<'_>), Status> {
        let first = stream.message().await?.ok_or_else(|| Status::invalid_argument("empty stream"))?;
        let start =
            start_of(&first).ok_or_else(|| Status::invalid_argument("the first chunk must carry start"))?;
        let d = disk_of(&start).ok_or_else(|| Status::invalid_argument("start.disk is required"))?;
        let replica = self.require(names, &d.vm_id, &d.disk_id)?;
        let store = self.agent.store().map_err(|e| Status::failed_precondition(e.to_string()))?;
        let permit = store.transfer().await;
        Ok((first, start, replica, permit))
    }

    #[tracing::instrument(skip_all)]
    async fn push_segment_inner(
        &self,
        req: Request<Streaming<SegmentChunk>>,
    ) -> Result<Response<SegmentAck>, Status> {
        let names = peer_names(&req);
        let mut stream = req.into_inner();
        let (first, start, replica, _permit) =
            self.begin_stream(&names, &mut stream, |c| c.start.clone(), |s| s.disk.clone()).await?;
        let (vm, disk) = labels(&replica);
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
            self.throttle(c.data.len(), &vm, &disk).await;
            let step = match decode_chunk(c.data, c.compressed, c.raw_len) {
                Ok(raw) => {
                    let n = raw.len() as u64;
                    seg.write_chunk_async(c.offset, raw).await.map(|()| n).map_err(status)
                }
                Err(e) => Err(e),
            };
            match step {
                Ok(n) => written += n,
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
        // The apply is started by the task that makes the segment durable,
        // not by this handler after it: a primary that vanishes at that
        // moment drops this future, and the segment, already counted as
        // received, would wait unapplied until the next one came (the chaos
        // suite found an idle VM's replica stuck so). It runs while the
        // acknowledgement goes back.
        let store = self.agent.store().cloned().ok();
        let runtime = tokio::runtime::Handle::current();
        let durable_through = tokio::task::spawn_blocking(move || {
            let through = replica.finish_segment(seg)?;
            if let Some(store) = store {
                spawn_apply(&runtime, store, replica);
            }
            Ok::<_, ReplicaError>(through)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(status)?;
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
        let (vm, disk) = labels(&replica);
        let mut copy = replica.begin_copy(start.disk_size, start.epoch, start.next_seq).map_err(status)?;
        let mut chunk = Some(first);
        let mut received = 0u64;
        let mut consistent_from = None;
        while let Some(c) = chunk.take() {
            self.throttle(c.data.len(), &vm, &disk).await;
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

/// The metric labels of a replica: its VM and disk.
pub(super) fn labels(r: &ReplicaDisk) -> (String, String) {
    let s = r.state();
    (s.vm_id.clone(), s.disk_id.clone())
}

/// Applies what `replica` received, on a blocking thread of `runtime`.
fn spawn_apply(runtime: &tokio::runtime::Handle, store: Arc<ReplicaStore>, replica: Arc<ReplicaDisk>) {
    runtime.spawn_blocking(move || {
        if let Err(e) = store.apply_and_retain(&replica) {
            tracing::error!(error = %e, "applying received segments failed");
        }
    });
}

/// Bytes a primary may send on one stream ahead of what was taken: eight chunks.
const STREAM_WINDOW: u32 = 8 << 20;

pub(super) fn decode_chunk(data: Bytes, compressed: bool, raw_len: u32) -> Result<Bytes, Status> {
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
    thread_local! {
        // One context per thread: a fresh one per chunk allocates its tables again.
        static CONTEXT: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    let out = CONTEXT.with_borrow_mut(|c| match c {
        Some(d) => d.decompress(&data, raw_len),
        None => zstd::bulk::Decompressor::new().and_then(|d| c.insert(d).decompress(&data, raw_len)),
    });
    let out = out.map_err(|e| {
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
    Ok(out.into())
}

#[tonic::async_trait]
impl Replication for ReplicationService {
    #[tracing::instrument(skip_all, fields(vm, disk))]
    async fn open(&self, req: Request<OpenRequest>) -> Result<Response<OpenReply>, Status> {
        let names = peer_names(&req);
        let r = req.into_inner();
        let d = r.disk.ok_or_else(|| Status::invalid_argument("disk is required"));
        let result = async {
            let d = d?;
            tracing::Span::current().record("vm", &d.vm_id).record("disk", &d.disk_id);
            let args = OpenArgs {
                vm_id: d.vm_id,
                disk_id: d.disk_id,
                disk_size: r.disk_size,
                epoch: r.epoch,
                history: r.history.map(|h| Policy {
                    window_ms: h.window_seconds.min(86_400) * 1000,
                    hourly: h.hourly_points.min(168),
                }),
                interval_seconds: r.interval_seconds,
                import_awaited: r.import_awaited,
            };
            let (vm, disk) = (args.vm_id.clone(), args.disk_id.clone());
            let o = self.agent.open(&names, args).await.map_err(refused)?;
            self.apply_behind(&vm, &disk);
            Ok(Response::new(OpenReply {
                needs_initial_copy: o.needs_initial_copy,
                needs_resync: o.needs_resync,
                next_seq: o.next_seq,
                epoch: o.epoch,
            }))
        }
        .await;
        self.counted(result)
    }

    type ResyncStream = tokio_stream::wrappers::ReceiverStream<Result<ResyncDown, Status>>;

    #[tracing::instrument(skip_all, fields(vm, disk))]
    async fn resync(
        &self,
        req: Request<Streaming<ResyncUp>>,
    ) -> Result<Response<Self::ResyncStream>, Status> {
        let names = peer_names(&req);
        let mut inbound = req.into_inner();
        let opened = async {
            let Some(Up::Start(start)) = inbound.message().await?.and_then(|m| m.msg) else {
                return Err(Status::invalid_argument("a resync's first message must be its start"));
            };
            let d = start.disk.clone().ok_or_else(|| Status::invalid_argument("start.disk is required"))?;
            tracing::Span::current().record("vm", &d.vm_id).record("disk", &d.disk_id);
            let replica = self.require(&names, &d.vm_id, &d.disk_id)?;
            replica.touch();
            Ok((replica, start))
        }
        .await;
        let (replica, start) = self.counted(opened)?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let svc = ReplicationService::new(self.agent.clone());
        tokio::spawn(async move {
            if let Err(s) = svc.run_resync(replica, start, inbound, &tx).await {
                tracing::warn!(error = %s.message(), "resync ended early");
                let _ = svc.counted::<()>(Err(s.clone()));
                let _ = tx.send(Err(s)).await;
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
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

    #[tracing::instrument(skip_all, fields(vm, disk))]
    async fn remove(&self, req: Request<DiskRef>) -> Result<Response<RemoveAck>, Status> {
        let names = peer_names(&req);
        let d = req.into_inner();
        tracing::Span::current().record("vm", &d.vm_id).record("disk", &d.disk_id);
        let r = self
            .agent
            .remove(&names, &d.vm_id, &d.disk_id)
            .map(|removed| Response::new(RemoveAck { removed }));
        self.counted(r.map_err(refused))
    }

    #[tracing::instrument(skip_all, fields(vm, disk))]
    async fn finalize(&self, req: Request<FinalizeRequest>) -> Result<Response<RemoveAck>, Status> {
        let names = peer_names(&req);
        let r = req.into_inner();
        let result = async {
            let d = r.disk.ok_or_else(|| Status::invalid_argument("disk is required"))?;
            self.agent.finalize(&names, &d.vm_id, &d.disk_id, r.last_seq).map_err(refused)?;
            Ok(Response::new(RemoveAck { removed: true }))
        }
        .await;
        self.counted(result)
    }
}

/// Serves the replication API of `agent` with mutual TLS on `listener` until `shutdown` completes.
pub async fn serve(
    agent: Arc<Agent>,
    listener: tokio::net::TcpListener,
    tls: Arc<LiveTls>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let svc = vmreplica_api::replication::replication_server::ReplicationServer::new(
        ReplicationService::new(agent),
    )
    .max_decoding_message_size(MAX_FRAME)
    .max_encoding_message_size(MAX_FRAME);
    // HTTP/2 flow-control windows of several chunks, so a primary keeps
    // sending while the previous chunk is written (hyper's default 1 MiB
    // window holds a single 1 MiB chunk and makes the stream stop and go).
    // Pings free what a primary cut off by a partition held (a transfer
    // slot, a half-received segment) instead of keeping it forever.
    // HTTP/2 frames of up to 1 MiB (instead of 16 KiB): a chunk crosses in
    // a few frames, not 64, each one a wakeup and a header to parse on both
    // sides; a connection holds at most one such frame while it is parsed.
    tonic::transport::Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(4 * STREAM_WINDOW)
        .max_frame_size(Some(1 << 20))
        .http2_keepalive_interval(Some(vmreplica_api::tls::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(vmreplica_api::tls::KEEPALIVE_TIMEOUT))
        .add_service(svc)
        .serve_with_incoming_shutdown(vmreplica_api::tls::incoming(listener, tls), shutdown)
        .await
}
