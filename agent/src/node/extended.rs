//! Extended replication (A→B→C), at the replica site B: the segments this
//! agent's replicas of a VM applied are forwarded to a third site by a
//! forwarding shipper per disk, on B's own interval, which may not be
//! shorter than the primary's.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;

use super::{Node, spec::ExtendSpec};
use crate::{
    replica::ReplicaDisk,
    replication::{
        cycle::VmReplication,
        shipper::{History, Shipper, ShipperConfig},
    },
};

/// One VM's extended replication: a forwarding shipper per replica disk.
pub(super) struct Extended {
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

/// Why extended replication of `replicas` cannot start, if it cannot.
fn refusal(r: &ExtendSpec, replicas: &[Arc<ReplicaDisk>]) -> Option<String> {
    if replicas.is_empty() {
        return Some(format!("no replica of {} on this agent", r.vm_id));
    }
    if replicas.iter().any(|d| d.state().promoted()) {
        return Some(format!(
            "{} was failed over to this site: it replicates as a primary now (a planned failover without \
             reverseReplication resumes to the extended replica)",
            r.vm_id
        ));
    }
    if replicas.iter().any(|d| !d.state().has_copy()) {
        return Some(format!(
            "the replica of {} has no initial copy yet: extended replication starts after it",
            r.vm_id
        ));
    }
    let primary = replicas.iter().map(|d| d.state().primary_interval_seconds).max().unwrap_or(0);
    if r.interval_seconds == 0 || r.interval_seconds < primary {
        return Some(format!(
            "extended replication every {}s is more often than the primary replicates (every {primary}s): \
             forward at least {primary}s apart",
            r.interval_seconds
        ));
    }
    None
}

impl Node {
    /// Forwards what `replicas` (this agent's replicas of the VM) apply to
    /// `r.replica_address`, or stops that (`r.remove`, which deletes what was
    /// kept for it). Idempotent per uid and generation.
    pub async fn extend(&self, r: ExtendSpec, replicas: Vec<Arc<ReplicaDisk>>) -> Result<(), String> {
        let mut extended = self.extended.lock().await;
        if r.remove {
            if let Some(e) = extended.remove(&r.vm_id) {
                e.stop().await;
                tracing::info!(vm = %r.vm_id, "extended replication removed; the extended replica keeps its disks");
            }
            for d in replicas {
                tokio::task::spawn_blocking(move || d.set_forward(false))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("dropping what was kept for it: {e}"))?;
            }
            return Ok(());
        }
        if let Some(why) = refusal(&r, &replicas) {
            return Err(why);
        }
        if extended.get(&r.vm_id).is_some_and(|e| e.uid == r.uid && e.generation >= r.generation) {
            return Ok(());
        }
        let peer = self.replica_peer(&r.replica_address).await?;
        let cfg = ShipperConfig {
            compression: r.compression,
            backoff: self.cfg.backoff.clone(),
            history: Some(History {
                window_seconds: r.history_window_seconds,
                hourly_points: r.history_hourly_points,
            }),
            interval_seconds: r.interval_seconds,
            ..Default::default()
        };
        let shippers = replicas
            .into_iter()
            .map(|d| {
                // A connection per disk: see `Peer::channel`.
                let ch = peer.channel().map_err(|e| format!("extended replica server {}: {e}", peer.addr))?;
                let s = Shipper::forwarding(d, ch, cfg.clone(), self.cfg.limits.clone());
                Ok(Arc::new(s.with_metrics(self.metrics.clone()).with_peer(peer.clone())))
            })
            .collect::<Result<Vec<Arc<Shipper>>, String>>()?;
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
        Ok(())
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
}
