//! Unplanned failover, replica side: the split-brain guard, the copy of the
//! chosen point the VM runs on, then Complete or Cancel.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use vmreplica_api::control::ReplicaDisk;
use vmreplica_crds::{FailoverPhase, FailoverStatus, FailoverType, Role};

use super::{
    Action, Done, Facts, Note, OnError, Plan, Run, begin, choose_points, data_loss_window, ended,
    failover_copy_name, last_of, note, request_of, with,
};

/// A primary that opened its replica this recently is taken to be running.
pub const PRIMARY_ALIVE_MS: u64 = 60_000;
/// Unplanned failover, replica side: refuse while the primary looks alive
/// (unless forced), run the VM on a copy of the chosen point and wait for
/// Complete or Cancel.
pub(super) fn unplanned(f: &Facts) -> Plan {
    let vmr = f.vmr;
    let last = last_of(vmr).filter(|l| l.failover_type == FailoverType::Unplanned);
    let uid = vmr.uid().unwrap_or_default();
    let copy = failover_copy_name(vmr);
    let Some(r) = request_of(vmr, FailoverType::Unplanned) else { return cancel(f, last, copy) };
    let same = last.filter(|l| l.id == r.id);
    // Completed, and reverse replication asked for since: back to the old
    // primary's own disks, by resync.
    if let Some(l) = same.filter(|l| l.phase == FailoverPhase::Completed) {
        if !r.reverse_replication || l.reversed_to.is_some() {
            return Plan::Idle;
        }
        if f.replica.is_none() {
            return Plan::NoAgent("reverse replication");
        }
        let mut actions = Vec::new();
        let done = match reverse(f, r, &mut actions) {
            Ok(to) => Done::Reversed { to },
            Err(why) => Done::Failed { why, reason: "ReverseReplicationFailed" },
        };
        let status = l.clone();
        return Plan::Run(Box::new(Run {
            status,
            write_first: false,
            note: None,
            actions,
            done,
            on_error: OnError::Retry,
            again: None,
        }));
    }
    if same.is_some_and(ended) {
        return Plan::Idle;
    }
    let Some(loc) = f.replica else { return Plan::NoAgent("carry out the unplanned failover") };
    let refs: Vec<&ReplicaDisk> = loc.status.replicas.iter().collect();
    let run = |status, write_first, note, actions, done| {
        Plan::Run(Box::new(Run {
            status,
            write_first,
            note,
            actions,
            done,
            on_error: OnError::Retry,
            again: None,
        }))
    };
    if let Some(l) = same.filter(|l| l.phase == FailoverPhase::WaitingCompletion) {
        if !r.complete {
            return Plan::Idle;
        }
        let mut actions = vec![Action::Promote { copy, complete: true }];
        if !r.reverse_replication
            && let Some(to) = super::extended_server(vmr).filter(|_| vmr.spec.role == Role::Replica)
        {
            // The extended replica follows this site now; a resync brings it
            // to the chosen point's history (what it held beyond is kept there).
            actions.push(Action::ReplicateTo { to: to.clone(), what: "resuming to the extended replica" });
            return run(l.clone(), false, None, actions, Done::UnplannedCompleted { reversed_to: Some(to) });
        }
        let reversed_to = match r.reverse_replication.then(|| reverse(f, r, &mut actions)) {
            Some(Err(why)) => {
                return run(
                    l.clone(),
                    false,
                    None,
                    Vec::new(),
                    Done::Failed { why, reason: "ReverseReplicationFailed" },
                );
            }
            Some(Ok(to)) => Some(to),
            None => None,
        };
        return run(l.clone(), false, None, actions, Done::UnplannedCompleted { reversed_to });
    }
    let started = same.and_then(|l| l.start_time.clone()).unwrap_or(Time(f.now));
    let mut status = begin(r, FailoverPhase::Pending, started);
    status.forced = r.force;
    // The VM already runs here (an earlier failover took it over): another
    // copy promoted, or the one it runs on rewritten, would lose its writes.
    if loc.serves(&uid) && !same.is_some_and(|l| l.phase == FailoverPhase::PreparingDisks) {
        let by = last_of(vmr).map_or("an earlier failover".to_owned(), |l| format!("failover {}", l.id));
        let why = format!(
            "refused: the VM already runs at this site, on the disks of {by}; another unplanned failover would \
             replace them under it. Remove this request (a planned failover moves the VM back)"
        );
        return run(
            status,
            false,
            None,
            Vec::new(),
            Done::Failed { why, reason: "UnplannedFailoverRefused" },
        );
    }
    let mut serve = vec![Action::Promote { copy: copy.clone(), complete: false }, Action::SetNetwork];
    if r.start_vm {
        serve.push(Action::StartVm);
    }
    let waiting = |point: String| {
        let (window, last_replicated_ms) = data_loss_window(&refs, &point);
        Done::UnplannedWaiting { point, window, last_replicated_ms }
    };
    // A controller stopped after the promotion (status still says
    // PreparingDisks): the copy is the VM's disk now, and choosing a point
    // again or rewriting the copy under the running VM would lose its writes.
    let chosen =
        same.filter(|l| l.phase == FailoverPhase::PreparingDisks).and_then(|l| l.recovery_point.clone());
    if let Some(point) = chosen.filter(|_| loc.serves(&uid)) {
        status.phase = FailoverPhase::PreparingDisks;
        status.recovery_point = Some(point.clone());
        return run(status, false, None, serve, waiting(point));
    }
    if !r.force
        && let Some(ago) = primary_alive(f, &refs)
    {
        let message = format!(
            "refused: the primary replicated {ago} s ago, so it is probably running (two running copies would \
             diverge). Stop it, or set force: true to fail over anyway"
        );
        let status = with(status, FailoverPhase::Pending, message.clone());
        let note = note(true, "UnplannedFailoverRefused", message);
        return Plan::Wait { status: Some(status), note, again: Duration::from_secs(5) };
    }
    match choose_points(&refs, &r.recovery_point) {
        Err(why) => {
            run(status, false, None, Vec::new(), Done::Failed { why, reason: "UnplannedFailoverFailed" })
        }
        Ok((point, per_disk)) => {
            status.recovery_point = Some(point.clone());
            let status = with(status, FailoverPhase::PreparingDisks, format!("rolling to point {point}"));
            let forced = r.force.then(|| Note {
                warning: true,
                reason: "UnplannedFailoverForced",
                text: "force: true overrides the split-brain guard".into(),
            });
            let mut actions = vec![Action::Materialize { name: copy, per_disk }];
            actions.extend(serve);
            run(status, true, forced, actions, waiting(point))
        }
    }
}

/// Reverse replication after an unplanned failover: the copy the VM runs
/// on replicates to the old primary's own disks, which a resync brings to
/// it (actions appended); where to.
fn reverse(
    f: &Facts,
    r: &vmreplica_crds::FailoverRequest,
    actions: &mut Vec<Action>,
) -> Result<String, String> {
    let to =
        super::planned::reverse_target(f.vmr, r).map_err(|why| format!("reversing replication: {why}"))?;
    actions.push(Action::ReplicateTo { to: to.clone(), what: "reversing replication" });
    Ok(to)
}

/// Cancel: the request went while waiting for completion; the copy goes and
/// this is a replica again.
fn cancel(f: &Facts, last: Option<&FailoverStatus>, copy: String) -> Plan {
    let Some(l) = last.filter(|l| l.phase == FailoverPhase::WaitingCompletion) else { return Plan::Idle };
    if f.replica.is_none() {
        return Plan::NoAgent("cancel the unplanned failover");
    }
    Plan::Run(Box::new(Run {
        status: l.clone(),
        write_first: false,
        note: None,
        actions: vec![Action::RemoveReplication, Action::DeleteCopies { name: copy }],
        done: Done::UnplannedCancelled,
        on_error: OnError::Retry,
        again: None,
    }))
}

/// The split-brain guard's evidence: seconds since the primary last opened
/// the replica, when that is recent enough to take it to be running.
fn primary_alive(f: &Facts, disks: &[&ReplicaDisk]) -> Option<u64> {
    let now_ms = f.now.as_millisecond().max(0) as u64;
    let contact = disks.iter().map(|d| d.last_contact_unix_ms).max().unwrap_or(0);
    let ago = now_ms.saturating_sub(contact);
    (contact != 0 && ago < PRIMARY_ALIVE_MS).then_some(ago / 1000)
}
