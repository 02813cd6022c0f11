//! The site: a ReplicationServer and every AuthorizationEntry become one
//! configuration pushed to each agent the ReplicationServer selects, and the
//! ReplicationServer's status says which agents accepted it.
//!
//! ```text
//!  observe: RS, all AuthorizationEntries, agent Leases, the RS's TLS Secret
//!  decide:  site_configuration() and selected()            (pure)
//!  act:     Control.ConfigureSite on every selected live agent
//!  report:  status.agents (with what each enforces) / agentsSummary / Ready
//!           — written only when changed
//! ```
//! The Secret is read at every pass (every 30 s), so a renewed certificate
//! reaches the agents within that; it is never written anywhere but to the
//! agents' control APIs (mutual TLS).

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, ResourceExt,
    api::ListParams,
    runtime::{Controller, controller::Action, reflector::ObjectRef, watcher},
};
use vmreplica_api::{
    control::{
        AuthorizationRule, PemMaterial, SiteConfiguration, SiteInForce, control_client::ControlClient,
    },
    tls::{LiveTls, channel},
};
use vmreplica_crds::{
    AgentAcceptance, AgentSettings, AuthorizationEntry, ReplicationServer, ReplicationServerStatus,
};

use crate::{
    Error,
    agents::Agent,
    conditions,
    context::Shared,
    status::{MANAGER, apply_status},
};

/// The configuration every agent of `rs` gets: its rules and all entries,
/// its port and limits, and the certificate its Secret holds (`tls`).
pub fn site_configuration(
    rs: &ReplicationServer,
    entries: &[AuthorizationEntry],
    tls: Option<PemMaterial>,
) -> SiteConfiguration {
    let mut rules: Vec<AuthorizationRule> = entries
        .iter()
        .map(|e| AuthorizationRule {
            name: e.name_any(),
            allowed_primary_server: e.spec.allowed_primary_server.clone(),
            storage: e.spec.replica_storage_location.clone(),
            trust_group: e.spec.trust_group.clone(),
        })
        .collect();
    rules.sort_by(|a, b| a.name.cmp(&b.name));
    // What was sent, for the agent to echo: every object's UID and generation.
    let mut revision = format!("{}/{}", rs.uid().unwrap_or_default(), rs.metadata.generation.unwrap_or(0));
    for e in entries {
        revision += &format!(",{}/{}", e.uid().unwrap_or_default(), e.metadata.generation.unwrap_or(0));
    }
    SiteConfiguration {
        allow_any_server: rs.spec.allow_any_server,
        default_storage: rs.spec.default_storage_location.clone().unwrap_or_default(),
        default_trust_group: rs.spec.default_trust_group.clone(),
        rules,
        window_seconds: 0,
        hourly_points: 24,
        revision,
        port: u32::from(rs.spec.port),
        max_active_transfers: rs.spec.max_active_transfers,
        // Unset is unlimited, not the agent's own default.
        bandwidth_limit_bytes_per_second: Some(rs.spec.bandwidth_limit_bytes_per_second.unwrap_or(0)),
        tls,
    }
}

/// Why the ReplicationServer's certificate cannot be handed to its agents.
#[derive(Debug, PartialEq, Eq)]
pub struct SecretProblem {
    pub reason: &'static str,
    pub message: String,
}

/// The PEM material of `name` in `namespace`: `tls.crt`, `tls.key` and `ca.crt`.
pub fn pem_material(
    secret: Option<&Secret>,
    namespace: &str,
    name: &str,
) -> Result<PemMaterial, SecretProblem> {
    let Some(secret) = secret else {
        return Err(SecretProblem {
            reason: "TLSSecretNotFound",
            message: format!(
                "Secret {namespace}/{name} (tlsSecretName) does not exist: create it with tls.crt, tls.key and \
                 ca.crt (a cert-manager Certificate, or kubectl create secret generic), or unset \
                 tlsSecretName to use each agent's own certificate; the agents keep their previous settings"
            ),
        });
    };
    let data = secret.data.clone().unwrap_or_default();
    let field = |key: &str| -> Result<String, SecretProblem> {
        let bytes = data.get(key).ok_or_else(|| SecretProblem {
            reason: "TLSSecretInvalid",
            message: format!("Secret {namespace}/{name} has no {key}: it needs tls.crt, tls.key and ca.crt"),
        })?;
        String::from_utf8(bytes.0.clone()).map_err(|_| SecretProblem {
            reason: "TLSSecretInvalid",
            message: format!("Secret {namespace}/{name}: {key} is not PEM text"),
        })
    };
    Ok(PemMaterial { cert_pem: field("tls.crt")?, key_pem: field("tls.key")?, ca_pem: field("ca.crt")? })
}

/// What an agent reports it enforces, as status shows it.
pub fn settings(f: &SiteInForce) -> AgentSettings {
    let not_after = k8s_openapi::jiff::Timestamp::from_second(f.certificate_not_after_unix).ok();
    AgentSettings {
        port: u16::try_from(f.port).ok().filter(|p| *p > 0),
        max_active_transfers: f.max_active_transfers,
        bandwidth_limit_bytes_per_second: Some(f.bandwidth_limit_bytes_per_second).filter(|b| *b > 0),
        certificate_serial: Some(f.certificate_serial.clone()).filter(|s| !s.is_empty()),
        certificate_not_after: not_after.filter(|_| f.certificate_not_after_unix > 0).map(|t| t.to_string()),
        certificate_source: (!f.certificate_serial.is_empty())
            .then(|| if f.certificate_from_site { "ReplicationServer" } else { "Agent" }.to_owned()),
    }
}

/// Whether `rs`'s nodeSelector matches `agent`'s node labels.
pub fn selects(rs: &ReplicationServer, agent: &Agent) -> bool {
    rs.spec.node_selector.iter().all(|(k, v)| agent.labels.get(k) == Some(v))
}

/// The agents `rs` selects: replica-capable, with every nodeSelector label.
pub fn selected<'a>(rs: &ReplicationServer, agents: &'a [Agent]) -> Vec<&'a Agent> {
    agents
        .iter()
        .filter(|a| a.capabilities.iter().any(|c| c == "replica"))
        .filter(|a| selects(rs, a))
        .collect()
}

async fn push(agent: &Agent, cfg: &SiteConfiguration, tls: &Arc<LiveTls>) -> AgentAcceptance {
    let refuse = |message: String| AgentAcceptance {
        node: agent.node.clone(),
        accepted: false,
        message: Some(message),
        in_force: None,
    };
    if !agent.live {
        return refuse("the agent's Lease expired: it is not running or cannot reach the apiserver".into());
    }
    let Some((endpoint, server_name)) = agent.control() else {
        return refuse("the agent announces no control endpoint (start it with --control-listen)".into());
    };
    let call = async {
        let ch = channel(endpoint, server_name, tls).map_err(|e| e.to_string())?;
        let reply =
            ControlClient::new(ch).configure_site(cfg.clone()).await.map_err(|s| s.message().to_owned())?;
        Ok::<_, String>(reply.into_inner())
    };
    match tokio::time::timeout(Duration::from_secs(10), call).await {
        Ok(Ok(r)) => AgentAcceptance {
            node: agent.node.clone(),
            accepted: r.accepted,
            message: (!r.accepted).then(|| format!("the agent refused the configuration: {}", r.message)),
            in_force: r.in_force.as_ref().map(settings),
        },
        Ok(Err(e)) => refuse(format!("cannot reach the agent's control API at {endpoint}: {e}")),
        Err(_) => refuse(format!("the agent's control API at {endpoint} did not answer within 10s")),
    }
}

/// Reconciles one ReplicationServer, recording it in the metrics.
#[tracing::instrument(skip_all, fields(name = %rs.name_any()))]
pub async fn reconcile(rs: Arc<ReplicationServer>, ctx: Arc<Shared>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let result = reconcile_inner(rs, ctx.clone()).await;
    let class = result.as_ref().err().map(Error::label);
    ctx.metrics.observe("ReplicationServer", started, class);
    result
}

async fn reconcile_inner(rs: Arc<ReplicationServer>, ctx: Arc<Shared>) -> Result<Action, Error> {
    let entries = Api::<AuthorizationEntry>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(Error::read("AuthorizationEntries"))?;
    let agents = ctx.agents().await?;
    let chosen = selected(&rs, &agents);
    let previous = rs.status.clone().unwrap_or_default();
    let tls = match &rs.spec.tls_secret_name {
        None => Ok(None),
        Some(name) => {
            let secret = Api::<Secret>::namespaced(ctx.client.clone(), &ctx.agents_namespace)
                .get_opt(name)
                .await
                .map_err(Error::read("the ReplicationServer's TLS Secret"))?;
            pem_material(secret.as_ref(), &ctx.agents_namespace, name).map(Some)
        }
    };
    // Without its certificate the configuration is not pushed at all: the
    // agents keep what they enforce, and the status says why.
    let (results, problem) = match tls {
        Ok(tls) => {
            let cfg = site_configuration(&rs, &entries.items, tls);
            (futures::future::join_all(chosen.iter().map(|a| push(a, &cfg, &ctx.tls))).await, None)
        }
        Err(p) => (previous.agents.clone(), Some(p)),
    };
    let accepted = results.iter().filter(|a| a.accepted).count();
    let (ready, reason, message) = match (chosen.len(), accepted) {
        _ if let Some(p) = problem => (false, p.reason, p.message),
        (0, _) => (
            false,
            "NoAgents",
            "no agent matches nodeSelector: check the selector and that agents run with --lease-namespace"
                .to_owned(),
        ),
        (n, a) if a == n => (true, "Accepted", format!("all {n} agents enforce this configuration")),
        (n, a) => {
            (false, "NotAccepted", format!("{a} of {n} agents accepted the configuration; see status.agents"))
        }
    };
    let mut status = ReplicationServerStatus {
        observed_generation: rs.metadata.generation,
        agents: results,
        agents_summary: Some(format!("{accepted}/{}", chosen.len())),
        conditions: Vec::new(),
    };
    conditions::set(
        &mut status.conditions,
        &previous.conditions,
        conditions::Update { type_: "Ready", status: ready, reason, message },
        rs.metadata.generation,
        (ctx.now)(),
    );
    if status != previous {
        apply_status(&Api::<ReplicationServer>::all(ctx.client.clone()), &rs.name_any(), MANAGER, &status)
            .await?;
    }
    // Agents come and go without an event on this object: look again soon.
    Ok(Action::requeue(Duration::from_secs(30)))
}

/// Reconciles one AuthorizationEntry's status, recording it in the metrics.
#[tracing::instrument(skip_all, fields(name = %entry.name_any()))]
pub async fn reconcile_entry(entry: Arc<AuthorizationEntry>, ctx: Arc<Shared>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let result = report_entries(&ctx, std::slice::from_ref(entry.as_ref())).await;
    ctx.metrics.observe("AuthorizationEntry", started, result.as_ref().err().map(Error::label));
    result.map(|()| Action::await_change())
}

/// An entry is enforced where every ReplicationServer's agents accepted the
/// configuration it is part of: its Ready condition sums them over all servers.
async fn report_entries(ctx: &Shared, entries: &[AuthorizationEntry]) -> Result<(), Error> {
    let servers = Api::<ReplicationServer>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(Error::read("ReplicationServers"))?;
    let (mut accepted, mut selected, mut refusals) = (0usize, 0usize, Vec::new());
    for rs in &servers.items {
        for a in rs.status.iter().flat_map(|s| &s.agents) {
            selected += 1;
            if a.accepted {
                accepted += 1;
            } else {
                refusals.push(format!(
                    "{} ({}): {}",
                    a.node,
                    rs.name_any(),
                    a.message.as_deref().unwrap_or("refused")
                ));
            }
        }
    }
    let (ready, reason, message) = match (selected, accepted) {
        (0, _) => (false, "NoAgents", "no ReplicationServer selects a live agent yet".to_owned()),
        (n, a) if a == n => (true, "Enforced", format!("enforced by all {n} agents")),
        (n, a) => (false, "NotEnforced", format!("{a} of {n} agents enforce it; {}", refusals.join("; "))),
    };
    let api = Api::<AuthorizationEntry>::all(ctx.client.clone());
    for e in entries {
        let previous = e.status.clone().unwrap_or_default();
        let mut status = vmreplica_crds::AuthorizationEntryStatus {
            observed_generation: e.metadata.generation,
            conditions: Vec::new(),
            replica_count: previous.replica_count,
        };
        let update = conditions::Update { type_: "Ready", status: ready, reason, message: message.clone() };
        conditions::set(
            &mut status.conditions,
            &previous.conditions,
            update,
            e.metadata.generation,
            (ctx.now)(),
        );
        if status != previous {
            apply_status(&api, &e.name_any(), MANAGER, &status).await?;
        }
    }
    Ok(())
}

fn error_policy(_rs: Arc<ReplicationServer>, e: &Error, _ctx: Arc<Shared>) -> Action {
    tracing::warn!(error = %e, "reconciling a ReplicationServer failed");
    e.action()
}

/// Runs the ReplicationServer and AuthorizationEntry controllers until
/// `shutdown` completes. Any entry change reconciles every server (their
/// configuration holds all entries); any server change (its status says which
/// agents accepted) reconciles every entry.
pub async fn run(ctx: Arc<Shared>, shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static) {
    let servers = Api::<ReplicationServer>::all(ctx.client.clone());
    let entries = Api::<AuthorizationEntry>::all(ctx.client.clone());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let on_stop = || {
        let mut s = stopped.clone();
        async move {
            let _ = s.changed().await;
        }
    };
    let server_controller = Controller::new(servers.clone(), watcher::Config::default());
    let server_store = server_controller.store();
    let servers_run = server_controller
        .watches(entries.clone(), watcher::Config::default(), move |_entry| {
            server_store.state().iter().map(|rs| ObjectRef::from_obj(rs.as_ref())).collect::<Vec<_>>()
        })
        .reconcile_all_on(agents_started(&ctx))
        .graceful_shutdown_on(on_stop())
        .run(reconcile, error_policy, ctx.clone())
        .for_each(crate::log_result);
    let entry_controller = Controller::new(entries, watcher::Config::default());
    let entry_store = entry_controller.store();
    let entries_run = entry_controller
        .watches(servers, watcher::Config::default(), move |_rs| {
            entry_store.state().iter().map(|e| ObjectRef::from_obj(e.as_ref())).collect::<Vec<_>>()
        })
        .graceful_shutdown_on(on_stop())
        .run(reconcile_entry, entry_error_policy, ctx)
        .for_each(crate::log_result);
    let both = futures::future::join(servers_run, entries_run);
    tokio::pin!(both);
    tokio::select! {
        _ = &mut both => return,
        _ = shutdown => {}
    }
    let _ = stop.send(true);
    both.await;
}

/// One item each time an agent starts (its Lease appears, or its
/// `acquireTime` or endpoints change; renewals do not count). A started
/// agent knows nothing: it has no site configuration until a
/// ReplicationServer is reconciled (else up to 30 s, the periodic look), and
/// serves no VM's disks until its VMReplications are (else up to the poll
/// interval, 60 s by default). Both controllers reconcile everything on it.
pub(crate) fn agents_started(ctx: &Shared) -> impl futures::Stream<Item = ()> + Send + 'static {
    use kube::runtime::{PredicateConfig, WatchStreamExt};
    use std::hash::{DefaultHasher, Hash, Hasher};
    let leases = Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(
        ctx.client.clone(),
        &ctx.agents_namespace,
    );
    let selector = watcher::Config::default().labels(crate::agents::LEASE_SELECTOR);
    let started = |l: &k8s_openapi::api::coordination::v1::Lease| {
        let mut h = DefaultHasher::new();
        l.spec.as_ref().and_then(|s| s.acquire_time.as_ref()).map(|t| t.0.as_millisecond()).hash(&mut h);
        l.metadata.annotations.hash(&mut h);
        Some(h.finish())
    };
    watcher(leases, selector)
        .default_backoff()
        .applied_objects()
        .predicate_filter(started, PredicateConfig::default())
        .filter_map(|l| std::future::ready(l.ok().map(drop)))
}

fn entry_error_policy(_e: Arc<AuthorizationEntry>, e: &Error, _ctx: Arc<Shared>) -> Action {
    tracing::warn!(error = %e, "reconciling an AuthorizationEntry failed");
    e.action()
}
