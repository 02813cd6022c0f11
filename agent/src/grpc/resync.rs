//! The replica side of a `Resync` stream: the primary's hashes in, this
//! replica's verdicts out, the differing bytes into batches applied with
//! undo ([`crate::replica::resync`]). Everything from the wire is checked
//! before use: hashes are counted, data must be exactly the leaves asked for,
//! sizes are bounded. In a dirty-map resync the primary offers the dirty
//! blocks' leaf hashes straight away, and this side hashes just those blocks.
//!
//! ```text
//!  Start ─▶ begin_resync (Resyncing, durable) ─▶ Accepted
//!  Window{w,h} ─▶ own hash of w (hasher thread, in order) ─▶ WindowVerdict
//!  HashList{w} ─▶ BlockVerdict   LeafHashes{w} ─▶ LeafVerdict   Data ─▶ batch ─▶ apply
//!  Finish ─▶ last batch applied, finish_resync ─▶ Done
//!  verify: the replica must hold exactly through next_seq - 1 (applied);
//!  verdicts only, no data, nothing changes ─▶ Done
//! ```

use std::sync::Arc;

use tokio::sync::mpsc;
use tonic::{Status, Streaming};
use vmreplica_api::replication::{
    BlockVerdict, LeafVerdict, ResyncAccepted, ResyncDone, ResyncDown, ResyncStart, ResyncUp, WindowVerdict,
    resync_down::Msg as Down, resync_up::Msg as Up,
};

use super::replication::{ReplicationService, decode_chunk, labels, status};
use crate::replica::{
    ReplicaDisk,
    resync::{BATCH_BYTES, Comparison, ResyncBatch},
};

type Out = mpsc::Sender<Result<ResyncDown, Status>>;

async fn send(tx: &Out, msg: Down) -> Result<(), Status> {
    tx.send(Ok(ResyncDown { msg: Some(msg) })).await.map_err(|_| Status::cancelled("the primary went away"))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::replica::ReplicaError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Status::internal(e.to_string()))?.map_err(status)
}

impl ReplicationService {
    /// Runs one resync of `replica` from `start` on: reads `inbound`, answers on `tx`.
    pub(super) async fn run_resync(
        &self,
        replica: Arc<ReplicaDisk>,
        start: ResyncStart,
        mut inbound: Streaming<ResyncUp>,
        tx: &Out,
    ) -> Result<(), Status> {
        let store = self.agent.store().map_err(|e| Status::failed_precondition(e.to_string()))?.clone();
        let _slot = store.transfer().await;
        let r = replica.clone();
        if start.verify {
            // Compare only: the replica must stand exactly where the primary says.
            let (size, at) = (start.disk_size, start.next_seq);
            blocking(move || r.check_verifiable(size, at)).await?;
            tracing::info!(id = %start.id, next_seq = start.next_seq, "verification began");
        } else {
            blocking(move || r.begin_resync(start.disk_size, start.epoch, start.next_seq)).await?;
            tracing::info!(id = %start.id, dirty_map = start.dirty_map, next_seq = start.next_seq, "resync began");
        }
        let size = replica.state().disk_size;
        let mut own = (!start.dirty_map).then(|| replica.hash_windows());
        let mut cmp = Comparison::default();
        let (vm, disk) = labels(&replica);
        send(tx, Down::Accepted(ResyncAccepted { replica_bytes: size })).await?;
        let mut batch: Option<ResyncBatch> = None;
        let mut received = 0u64;
        let bad = |why: String| Status::invalid_argument(format!("resync {}: {why}", start.id));
        let result = async {
            loop {
                let up = inbound
                    .message()
                    .await?
                    .and_then(|m| m.msg)
                    .ok_or_else(|| Status::aborted("the resync stream ended before its finish"))?;
                match up {
                    Up::Window(w) => {
                        let own = own.as_mut().ok_or_else(|| bad("hashes in a dirty-map resync".into()))?;
                        let mine = own
                            .recv()
                            .await
                            .ok_or_else(|| bad(format!("window {} is past the end of the disk", w.index)))?
                            .map_err(|e| Status::internal(format!("reading the replica image: {e}")))?;
                        if mine.index != w.index {
                            return Err(bad(format!("window {} came where {} was due", w.index, mine.index)));
                        }
                        let differs = cmp.window(mine, &w.hash).map_err(bad)?;
                        send(tx, Down::Window(WindowVerdict { index: w.index, differs })).await?;
                    }
                    Up::Blocks(h) => {
                        let blocks = cmp.blocks(h.window, &h.hashes).map_err(bad)?;
                        send(tx, Down::Blocks(BlockVerdict { window: h.window, blocks })).await?;
                    }
                    Up::Leaves(l) => {
                        if start.dirty_map {
                            // Offered straight away: this side hashes just those blocks.
                            let (r, w, bs) = (replica.clone(), l.window, l.blocks.clone());
                            let mine = tokio::task::spawn_blocking(move || r.hash_blocks(w, &bs))
                                .await
                                .map_err(|e| Status::internal(e.to_string()))?
                                .map_err(|e| bad(format!("window {w}: {e}")))?;
                            cmp.offer(mine).map_err(bad)?;
                        }
                        let masks = cmp.leaves(l.window, &l.blocks, &l.hashes).map_err(bad)?;
                        if start.verify {
                            // Nothing will come for them: counted by the primary.
                            cmp.forget(l.window);
                        }
                        send(tx, Down::Leaves(LeafVerdict { window: l.window, blocks: l.blocks, masks }))
                            .await?;
                    }
                    Up::Data(_) if start.verify => return Err(bad("data in a verification".into())),
                    Up::Data(d) => {
                        self.throttle(d.data.len(), &vm, &disk).await;
                        let raw =
                            if d.zero { None } else { Some(decode_chunk(d.data, d.compressed, d.raw_len)?) };
                        let len = raw.as_ref().map_or(u64::from(d.raw_len), |r| r.len() as u64);
                        cmp.received(d.offset, len, size).map_err(bad)?;
                        let b = match batch.as_mut() {
                            Some(b) => b,
                            None => batch.insert(replica.resync_batch().map_err(status)?),
                        };
                        match raw {
                            Some(bytes) => b.write(d.offset, &bytes).map_err(status)?,
                            None => b.zero(d.offset, len).map_err(status)?,
                        }
                        received += len;
                        if b.bytes >= BATCH_BYTES {
                            let (r, full) = (replica.clone(), batch.take().expect("just filled"));
                            blocking(move || r.apply_resync_batch(full)).await?;
                        }
                    }
                    Up::Finish(f) => {
                        if !cmp.settled() {
                            return Err(bad("finished before every window asked for was answered".into()));
                        }
                        if start.verify {
                            tracing::info!(
                                id = %start.id, compared = cmp.windows_compared, differing = cmp.windows_differing,
                                leaves = cmp.leaves_wanted, "verification finished"
                            );
                            let next_seq = start.next_seq;
                            return send(tx, Down::Done(ResyncDone { bytes_received: 0, next_seq })).await;
                        }
                        if let Some(last) = batch.take() {
                            let r = replica.clone();
                            blocking(move || r.apply_resync_batch(last)).await?;
                        }
                        let r = replica.clone();
                        let next_seq = blocking(move || r.finish_resync(f.consistent_from)).await?;
                        tracing::info!(
                            id = %start.id, received, compared = cmp.windows_compared,
                            differing = cmp.windows_differing, leaves = cmp.leaves_wanted, "resync finished"
                        );
                        return send(tx, Down::Done(ResyncDone { bytes_received: received, next_seq })).await;
                    }
                    Up::Start(_) => return Err(bad("a second start".into())),
                }
            }
        }
        .await;
        // A batch not made durable never counted: its bytes come again.
        if let Some(b) = batch {
            b.discard();
        }
        result
    }
}
