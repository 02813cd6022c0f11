//! RecoveryPlan: validated and reported here; running a plan's failover comes
//! with the failover work. A plan is Ready when every VMReplication it names
//! exists in its namespace, none is named twice, every hook is a valid
//! `batch/v1` JobTemplateSpec with a container, and every member is a
//! Primary or Replica that can be failed over (not Error).

use std::{collections::BTreeMap, sync::Arc};

use futures::StreamExt;
use k8s_openapi::api::batch::v1::JobTemplateSpec;
use kube::{
    Api, ResourceExt,
    api::ListParams,
    runtime::{Controller, controller::Action, reflector::ObjectRef, watcher},
};
use vmreplica_crds::{RecoveryPlan, RecoveryPlanStatus, ReplicationState, VMReplication};

use crate::{
    Error, conditions,
    context::Shared,
    status::{MANAGER, apply_status},
};

/// What is wrong with a plan, one sentence per problem; empty when valid.
pub fn problems(plan: &RecoveryPlan, members: &BTreeMap<String, VMReplication>) -> Vec<String> {
    let ns = plan.namespace().unwrap_or_default();
    let mut out = Vec::new();
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for g in &plan.spec.groups {
        for name in &g.vm_replications {
            if let Some(first) = seen.insert(name, &g.name) {
                out.push(format!(
                    "VMReplication {name} is in groups {first} and {}: a VM fails over once",
                    g.name
                ));
            }
            match members.get(name) {
                None => out
                    .push(format!("group {}: VMReplication {name} does not exist in namespace {ns}", g.name)),
                Some(v) if v.status.as_ref().is_some_and(|s| s.state == ReplicationState::Error) => out
                    .push(format!("group {}: VMReplication {name} is in state Error; fix it first", g.name)),
                Some(_) => {}
            }
        }
        for (which, hook) in [("preHook", &g.pre_hook), ("postHook", &g.post_hook)] {
            let Some(hook) = hook else { continue };
            match serde_json::from_value::<JobTemplateSpec>(hook.job_template.clone()) {
                Err(e) => out.push(format!(
                    "group {}: {which}.jobTemplate is not a batch/v1 JobTemplateSpec: {e}",
                    g.name
                )),
                Ok(t) => {
                    let containers = t.spec.and_then(|s| s.template.spec).map_or(0, |p| p.containers.len());
                    if containers == 0 {
                        out.push(format!("group {}: {which}.jobTemplate has no container to run", g.name));
                    }
                }
            }
        }
    }
    out
}

/// A one-line summary of the members' states, e.g. `3 VMReplications: 2 Replicating, 1 Suspended`.
pub fn summary(plan: &RecoveryPlan, members: &BTreeMap<String, VMReplication>) -> String {
    let mut by_state: BTreeMap<String, usize> = BTreeMap::new();
    let mut total = 0;
    for name in plan.spec.groups.iter().flat_map(|g| &g.vm_replications) {
        total += 1;
        if let Some(v) = members.get(name) {
            let state = v.status.as_ref().map(|s| s.state).unwrap_or_default();
            *by_state.entry(format!("{state:?}")).or_default() += 1;
        }
    }
    let parts: Vec<String> = by_state.iter().map(|(s, n)| format!("{n} {s}")).collect();
    format!("{} groups, {total} VMReplications: {}", plan.spec.groups.len(), parts.join(", "))
}

async fn reconcile(plan: Arc<RecoveryPlan>, ctx: Arc<Shared>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let result = reconcile_inner(plan, &ctx).await;
    ctx.metrics.observe("RecoveryPlan", started, result.as_ref().err().map(Error::label));
    result
}

async fn reconcile_inner(plan: Arc<RecoveryPlan>, ctx: &Shared) -> Result<Action, Error> {
    let ns = plan.namespace().unwrap_or_default();
    let members: BTreeMap<String, VMReplication> = Api::<VMReplication>::namespaced(ctx.client.clone(), &ns)
        .list(&ListParams::default())
        .await
        .map_err(Error::read("VMReplications"))?
        .items
        .into_iter()
        .map(|v| (v.name_any(), v))
        .collect();
    let found = problems(&plan, &members);
    let previous = plan.status.clone().unwrap_or_default();
    let (ready, reason, message) = if found.is_empty() {
        (true, "Valid", summary(&plan, &members))
    } else {
        (false, "Invalid", found.join("; "))
    };
    let mut status = RecoveryPlanStatus {
        observed_generation: plan.metadata.generation,
        group_count: plan.spec.groups.len() as u32,
        phase: previous.phase.clone().or(Some("Idle".into())),
        current_group: previous.current_group.clone(),
        conditions: Vec::new(),
    };
    let update = conditions::Update { type_: "Ready", status: ready, reason, message };
    conditions::set(
        &mut status.conditions,
        &previous.conditions,
        update,
        plan.metadata.generation,
        (ctx.now)(),
    );
    if status != previous {
        let api = Api::<RecoveryPlan>::namespaced(ctx.client.clone(), &ns);
        apply_status(&api, &plan.name_any(), MANAGER, &status).await?;
    }
    Ok(Action::await_change())
}

fn error_policy(_p: Arc<RecoveryPlan>, e: &Error, _ctx: Arc<Shared>) -> Action {
    tracing::warn!(error = %e, "reconciling a RecoveryPlan failed");
    e.action()
}

/// Runs the RecoveryPlan controller until `shutdown` completes; a change to
/// a VMReplication reconciles the plans of its namespace that name it.
pub async fn run(
    ctx: Arc<Shared>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let (plans, vmrs) = match &namespace {
        Some(ns) => (
            Api::<RecoveryPlan>::namespaced(ctx.client.clone(), ns),
            Api::<VMReplication>::namespaced(ctx.client.clone(), ns),
        ),
        None => (Api::all(ctx.client.clone()), Api::all(ctx.client.clone())),
    };
    let controller = Controller::new(plans, watcher::Config::default());
    let store = controller.store();
    controller
        .watches(vmrs, watcher::Config::default(), move |v: VMReplication| {
            let (ns, name) = (v.namespace(), v.name_any());
            store
                .state()
                .iter()
                .filter(|p| {
                    p.namespace() == ns && p.spec.groups.iter().any(|g| g.vm_replications.contains(&name))
                })
                .map(|p| ObjectRef::from_obj(p.as_ref()))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(crate::log_result)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(groups: serde_json::Value) -> RecoveryPlan {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "vmreplica.io/v1alpha1", "kind": "RecoveryPlan",
            "metadata": {"name": "p", "namespace": "fin"}, "spec": {"groups": groups},
        }))
        .unwrap()
    }

    fn vmr(name: &str, state: &str) -> (String, VMReplication) {
        let v: VMReplication = serde_json::from_value(serde_json::json!({
            "apiVersion": "vmreplica.io/v1alpha1", "kind": "VMReplication", "metadata": {"name": name, "namespace": "fin"},
            "spec": {"disks": [{"name": "root", "path": "/d/root.img"}]}, "status": {"state": state},
        }))
        .unwrap();
        (name.to_owned(), v)
    }

    #[test]
    fn a_plan_names_what_is_wrong() {
        let members: BTreeMap<_, _> = [vmr("db", "Replicating"), vmr("app", "Error")].into();
        let job = serde_json::json!({"spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "t", "image": "busybox"}]}}}});
        let good = plan(
            serde_json::json!([{"name": "g1", "vmReplications": ["db"], "postHook": {"jobTemplate": job}}]),
        );
        assert!(problems(&good, &members).is_empty(), "{:?}", problems(&good, &members));
        assert_eq!(summary(&good, &members), "1 groups, 1 VMReplications: 1 Replicating");

        let bad = plan(serde_json::json!([
            {"name": "g1", "vmReplications": ["db", "missing"], "preHook": {"jobTemplate": {"spec": {"template": {"spec": {"containers": []}}}}}},
            {"name": "g2", "vmReplications": ["db", "app"], "postHook": {"jobTemplate": {"spec": {"template": 5}}}},
        ]));
        let p = problems(&bad, &members).join("\n");
        assert!(p.contains("VMReplication missing does not exist in namespace fin"), "{p}");
        assert!(p.contains("VMReplication db is in groups g1 and g2"), "{p}");
        assert!(p.contains("VMReplication app is in state Error"), "{p}");
        assert!(p.contains("g1: preHook.jobTemplate has no container"), "{p}");
        assert!(p.contains("g2: postHook.jobTemplate is not a batch/v1 JobTemplateSpec"), "{p}");
    }
}
