//! What every reconciler shares: the apiserver client, the agents' Lease
//! namespace, the controller's certificate, the clock (injectable, so status
//! and health logic are testable), metrics; and for VMReplications the Event
//! recorder, the poll interval, the per-object memory of monitoring windows
//! and write times, and one control channel per agent.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::jiff::Timestamp;
use kube::{
    Client, Resource,
    runtime::events::{Event, Recorder, Reporter},
};
use vmreplica_api::tls::LiveTls;
use vmreplica_crds::VMReplication;

use crate::{
    Error,
    agents::{Agent, discover},
    status::MANAGER,
};

/// Counters at the start of the current monitoring window.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Baseline {
    pub window_start_ms: i64,
    pub successful: u64,
    pub missed: u64,
    pub errors: u64,
    pub segments: u64,
    pub raw_bytes: u64,
    pub latency_total_ms: u64,
}

/// What the site, plan and VMReplication reconcilers share.
pub struct Shared {
    pub client: Client,
    /// Namespace of the agents' Leases (the controller's own).
    pub agents_namespace: String,
    /// The controller's client certificate for agents' control APIs (a
    /// renewed one is used from the next connection on).
    pub tls: Arc<LiveTls>,
    pub now: fn() -> Timestamp,
    pub metrics: Arc<crate::telemetry::Metrics>,
}

impl Shared {
    /// The site's agents, as their Leases say now.
    pub async fn agents(&self) -> Result<Vec<Agent>, Error> {
        discover(&self.client, &self.agents_namespace, (self.now)())
            .await
            .map_err(Error::read("agent Leases"))
    }
}

/// What the VMReplication reconcilers need.
pub struct Context {
    pub site: Arc<Shared>,
    pub recorder: Recorder,
    /// How often a steady replication is read again; its status is written at
    /// most this often. Unsettled states are read every few seconds.
    pub poll: Duration,
    /// Reconcile only this namespace's objects (all namespaces when `None`).
    pub namespace: Option<String>,
    windows: Mutex<HashMap<String, Baseline>>,
    samples: Mutex<HashMap<String, (i64, u64)>>,
    /// When each object's status was last written (by uid).
    written: Mutex<HashMap<String, Instant>>,
    /// Control API channels by agent endpoint.
    pub(crate) channels: Mutex<HashMap<String, tonic::transport::Channel>>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Context {
    pub fn new(site: Arc<Shared>, poll: Duration, namespace: Option<String>) -> Arc<Self> {
        let reporter = Reporter { controller: MANAGER.into(), instance: std::env::var("POD_NAME").ok() };
        Arc::new(Self {
            recorder: Recorder::new(site.client.clone(), reporter),
            site,
            poll,
            namespace,
            windows: Mutex::default(),
            samples: Mutex::default(),
            written: Mutex::default(),
            channels: Mutex::default(),
        })
    }

    pub fn now(&self) -> Timestamp {
        (self.site.now)()
    }

    /// Whether status was written for `uid` within the last poll interval.
    pub fn written_recently(&self, uid: &str) -> bool {
        locked(&self.written).get(uid).is_some_and(|t| t.elapsed() < self.poll)
    }

    /// Records a status write.
    pub fn wrote(&self, uid: &str) {
        locked(&self.written).insert(uid.to_owned(), Instant::now());
    }

    /// The counters at the start of `uid`'s monitoring window starting at
    /// `start_ms`; `fresh` are the counters now, kept when a window begins.
    pub fn window(&self, uid: &str, start_ms: i64, fresh: Baseline) -> Baseline {
        let mut windows = locked(&self.windows);
        let b = windows
            .entry(uid.to_owned())
            .or_insert(Baseline { window_start_ms: start_ms, ..Default::default() });
        if b.window_start_ms != start_ms {
            *b = Baseline { window_start_ms: start_ms, ..fresh };
        }
        *b
    }

    /// Records `done` bytes at `now_ms` for `uid`; the previous sample.
    pub fn sample(&self, uid: &str, now_ms: i64, done: u64) -> Option<(i64, u64)> {
        locked(&self.samples).insert(uid.to_owned(), (now_ms, done))
    }

    pub fn forget_sample(&self, uid: &str) {
        locked(&self.samples).remove(uid);
    }

    /// Forgets everything kept about `uid` (its object was deleted).
    pub fn forget(&self, uid: &str) {
        locked(&self.windows).remove(uid);
        locked(&self.samples).remove(uid);
        locked(&self.written).remove(uid);
    }

    /// Emits an Event about `vmr`; a failure to do so is only logged.
    pub async fn publish(&self, vmr: &VMReplication, e: Event) {
        if let Err(err) = self.recorder.publish(&e, &vmr.object_ref(&())).await {
            tracing::warn!(error = %err, "publishing an Event");
        }
    }
}
