//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go does it:
//! one controller replica holds the Lease and acts, the others wait. A holder
//! renews every third of the duration; the others take over when the record
//! has not changed for a whole duration *by their own clock* (so clock skew
//! between nodes cannot make a live leader look dead). A leader that cannot
//! renew within the duration stops acting before anyone can take over.

use std::time::{Duration, Instant};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};

/// One candidate for leadership.
pub struct Election {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// The last record seen and when (this process's clock) it was first seen.
    observed: Option<(Option<LeaseSpec>, Instant)>,
}

impl Election {
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str, duration: Duration) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity: identity.to_owned(),
            duration,
            observed: None,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn spec(&self, previous: Option<&LeaseSpec>) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        let ours = previous.and_then(|p| p.holder_identity.as_deref()) == Some(self.identity.as_str());
        let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs().max(1) as i32),
            acquire_time: if ours {
                previous.and_then(|p| p.acquire_time.clone())
            } else {
                Some(now.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(if ours || previous.is_none() { transitions } else { transitions + 1 }),
            ..Default::default()
        }
    }

    /// One attempt to take or renew the Lease; whether this process holds it.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
                spec: Some(self.spec(None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let record = lease.spec.clone();
        let holder = record.as_ref().and_then(|s| s.holder_identity.clone()).filter(|h| !h.is_empty());
        let ours = holder.as_deref() == Some(self.identity.as_str());
        if !ours {
            // Expired only if the record stayed the same for a whole duration here.
            let seen_at = match &self.observed {
                Some((r, at)) if *r == record => *at,
                _ => {
                    self.observed = Some((record.clone(), Instant::now()));
                    Instant::now()
                }
            };
            let duration = record
                .as_ref()
                .and_then(|s| s.lease_duration_seconds)
                .map_or(self.duration, |s| Duration::from_secs(s.max(1) as u64));
            if holder.is_some() && seen_at.elapsed() < duration {
                return Ok(false);
            }
        }
        lease.spec = Some(self.spec(record.as_ref()));
        // The replace carries the resourceVersion read above: if another
        // candidate wrote in between, it fails with a conflict and we lost.
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this process holds the Lease.
    pub async fn acquire(&mut self) {
        let mut waiting_logged = false;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    tracing::info!(identity = %self.identity, lease = %self.name, "acquired leadership");
                    return;
                }
                Ok(false) if !waiting_logged => {
                    tracing::info!(identity = %self.identity, lease = %self.name, "another replica leads; waiting");
                    waiting_logged = true;
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "leader election"),
            }
            tokio::time::sleep(self.duration / 3).await;
        }
    }

    /// Renews the Lease until a renewal has not succeeded for a whole
    /// duration (minus one retry), then returns: leadership is lost.
    pub async fn hold(&mut self) {
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(self.duration / 3).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => renewed = Instant::now(),
                Ok(false) => {
                    tracing::error!(identity = %self.identity, "another replica took the lease");
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "renewing the leader lease"),
            }
            if renewed.elapsed() + self.duration / 3 >= self.duration {
                tracing::error!(identity = %self.identity, "could not renew the leader lease in time");
                return;
            }
        }
    }

    /// Gives the Lease up (an empty holder) so a standby takes over at once.
    pub async fn release(&self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await
            && let Some(spec) = lease.spec.as_mut()
            && spec.holder_identity.as_deref() == Some(self.identity.as_str())
        {
            spec.holder_identity = None;
            if let Err(e) = self.api.replace(&self.name, &PostParams::default(), &lease).await {
                tracing::warn!(error = %e, "releasing the leader lease");
            }
        }
    }
}
