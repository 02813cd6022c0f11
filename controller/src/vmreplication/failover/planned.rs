//! Planned failover: the primary's part (stop the VM, ship the last log
//! with the disks read-only), failing back from a side that took over, and
//! the target's part (promote, start, reverse or resume).

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use vmreplica_crds::{
    FailoverPhase, FailoverRequest, FailoverStatus, FailoverType, ReplicationState, Role, VMReplication,
};

use super::{
    Action, Done, Facts, OnError, Plan, Run, SOON, begin, ended, extended_server, in_primary_part, last_of,
    note, other_side, request_of, serve_again, served_copy, with,
};
use crate::power::PowerState;

/// How long a VM may take to stop before a planned failover gives up.
pub const STOP_TIMEOUT_MS: i64 = 60_000;
/// Planned failover, primary part (Hyper-V's "prepare"): stop the VM, then
/// make its disks read-only and ship the last log.
pub(super) fn primary_part(f: &Facts, r: &FailoverRequest, last: Option<&FailoverStatus>) -> Plan {
    let same = last.filter(|l| l.id == r.id);
    let held = |l: &FailoverStatus| {
        let state = if l.phase == FailoverPhase::Completed {
            ReplicationState::SyncedReplicationComplete
        } else {
            ReplicationState::Error
        };
        Plan::Hold(state, l.clone())
    };
    match same {
        // This side took the VM over (failed back here): it is the primary.
        Some(l) if l.took_over => Plan::Idle,
        Some(l) if ended(l) => held(l),
        Some(l) if l.phase == FailoverPhase::StoppingVM => stopping(f, l),
        Some(l) if l.phase == FailoverPhase::SyncingFinalLog => prepare(l),
        _ => {
            let mut status = begin(r, FailoverPhase::StoppingVM, Time(f.now));
            status.recovery_point = Some("latest".into());
            status.message = Some("stopping the VM".into());
            Plan::Run(Box::new(Run {
                status,
                write_first: true,
                note: note(false, "PlannedFailoverStarted", "stopping the VM"),
                actions: vec![Action::StopVm],
                done: Done::Nothing,
                on_error: OnError::Fail("PlannedFailoverFailed"),
                again: Some(SOON),
            }))
        }
    }
}

/// Waiting for the VM to stop.
fn stopping(f: &Facts, l: &FailoverStatus) -> Plan {
    match f.power.unwrap_or(PowerState::Missing) {
        PowerState::Stopped | PowerState::Missing => prepare(l),
        _ if l
            .start_time
            .as_ref()
            .is_some_and(|t| f.now.as_millisecond() - t.0.as_millisecond() > STOP_TIMEOUT_MS) =>
        {
            Plan::Run(Box::new(Run {
                status: l.clone(),
                write_first: false,
                note: None,
                actions: Vec::new(),
                done: Done::Failed {
                    why: "the VM did not stop within 60 s; nothing was failed over".into(),
                    reason: "PlannedFailoverFailed",
                },
                on_error: OnError::Retry,
                again: None,
            }))
        }
        // Started again meanwhile (or never told): ask again.
        PowerState::Running => Plan::Run(Box::new(Run {
            status: l.clone(),
            write_first: false,
            note: None,
            actions: vec![Action::StopVm],
            done: Done::Nothing,
            on_error: OnError::Fail("PlannedFailoverFailed"),
            again: Some(SOON),
        })),
        PowerState::Transitioning => Plan::Wait { status: None, note: None, again: SOON },
    }
}

/// The VM is stopped: ship the last log with the disks read-only.
fn prepare(l: &FailoverStatus) -> Plan {
    Plan::Run(Box::new(Run {
        status: with(
            l.clone(),
            FailoverPhase::SyncingFinalLog,
            "shipping the last log with the disks read-only",
        ),
        write_first: true,
        note: None,
        actions: vec![Action::PrepareFailover],
        done: Done::Prepared,
        on_error: OnError::Fail("PlannedFailoverFailed"),
        again: Some(SOON),
    }))
}

/// A Replica object whose side took the VM over and reversed replication is
/// the VM's primary: a new planned request fails the VM back, and this side
/// does the primary's part.
pub(super) fn planned_back(f: &Facts) -> Plan {
    let (Some(r), Some(l)) = (request_of(f.vmr, FailoverType::Planned), last_of(f.vmr)) else {
        return Plan::Idle;
    };
    let starting = l.took_over && l.phase == FailoverPhase::Completed && l.id != r.id;
    let resuming = l.id == r.id && in_primary_part(l);
    if !(starting || resuming) {
        return Plan::Idle;
    }
    let Some(loc) = f.replica else {
        return Plan::NoAgent("do the primary's part of failing back");
    };
    // What this side serves and where it replicates to: from the failover
    // that brought the VM here, kept in this part's status.
    let (copy, reversed_to) = (served_copy(f.vmr, l), l.reversed_to.clone());
    // An agent restarted since serves nothing until asked: its part ships
    // the last log of the disks it serves, so it serves them again first.
    // (Its part done, the disks are prepared and stay unserved: the other
    // side takes them over; that is neither starting nor resuming.)
    if !loc.serves(&kube::ResourceExt::uid(f.vmr).unwrap_or_default()) {
        return serve_again(f, l.clone(), copy, reversed_to);
    }
    match primary_part(f, r, Some(l).filter(|l| l.failover_type == FailoverType::Planned)) {
        Plan::Idle | Plan::Hold(..) => Plan::Wait { status: None, note: None, again: f.poll },
        Plan::Run(mut run) => {
            run.status.served_copy = copy;
            run.status.reversed_to = reversed_to;
            Plan::Run(run)
        }
        p => p,
    }
}

/// Planned failover, the side taking the VM over: once the primary's part is
/// done (its final log is here), promote, start, and reverse or resume.
pub(super) fn planned_target(f: &Facts) -> Plan {
    let vmr = f.vmr;
    let Some(r) = request_of(vmr, FailoverType::Planned) else { return Plan::Idle };
    let last = last_of(vmr);
    if last.is_some_and(|l| l.id == r.id && ended(l)) {
        return Plan::Idle;
    }
    let started = last.filter(|l| l.id == r.id).and_then(|l| l.start_time.clone());
    let mut status = begin(r, FailoverPhase::Pending, started.unwrap_or(Time(f.now)));
    status.recovery_point = Some("latest".into());
    let Some(loc) = f.replica else {
        let status = with(status, FailoverPhase::Pending, "no live replica agent holds this VM");
        return Plan::Wait { status: Some(status), note: None, again: Duration::from_secs(5) };
    };
    let finished = loc
        .status
        .replicas
        .iter()
        .all(|d| d.promoted || (d.primary_finished && d.received_through >= d.primary_final_seq));
    if !finished {
        let message = format!(
            "waiting for the other side's part: request the planned failover on {}, with the same id (it stops \
             the VM and ships the last log)",
            other_side(vmr)
        );
        return Plan::Wait {
            status: Some(with(status, FailoverPhase::Pending, message)),
            note: None,
            again: Duration::from_secs(3),
        };
    }
    let mut actions = vec![Action::Promote { copy: String::new(), complete: false }, Action::SetNetwork];
    if r.start_vm {
        actions.push(Action::Progress(FailoverPhase::StartingVM, "starting the VM".into()));
        actions.push(Action::StartVm);
    }
    let (reverse, reversed_to) = reverse_or_resume(vmr, r, &mut actions);
    Plan::Run(Box::new(Run {
        status: with(status, FailoverPhase::PreparingDisks, "promoting the replica"),
        write_first: true,
        note: None,
        actions,
        done: Done::TookOver { reverse, reversed_to },
        on_error: OnError::Fail("PlannedFailoverFailed"),
        again: None,
    }))
}

/// After a planned promotion: where the VM replicates from here (actions
/// appended), and what the status says about it.
fn reverse_or_resume(
    vmr: &VMReplication,
    r: &FailoverRequest,
    actions: &mut Vec<Action>,
) -> (String, Option<String>) {
    let extended = extended_server(vmr).filter(|_| vmr.spec.role == Role::Replica);
    if let (false, Some(to)) = (r.reverse_replication, &extended) {
        // Extended replication: the third site follows this one now.
        actions.push(Action::Progress(
            FailoverPhase::Reversing,
            format!("resuming replication to the extended replica {to}"),
        ));
        actions.push(Action::ReplicateTo { to: to.clone(), what: "resuming to the extended replica" });
        let text =
            format!(" Replication resumed to the extended replica {to}: no copy, it continues the same log.");
        return (text, Some(to.clone()));
    }
    if !r.reverse_replication {
        return (" Not replicated now: request reverseReplication to protect it again.".into(), None);
    }
    actions.push(Action::Progress(FailoverPhase::Reversing, "reversing replication".into()));
    let to = if vmr.spec.role == Role::Primary {
        // Failing back: the Primary object replicates to spec.replicaServer as usual.
        vmr.spec
            .replica_server
            .as_ref()
            .map(|s| format!("{}:{}", s.name, s.port))
            .ok_or("spec.replicaServer is not set")
    } else {
        reverse_target(vmr, r)
    };
    let to = match to {
        Ok(to) => to,
        Err(why) => {
            actions.push(Action::Refuse(format!("reversing replication: {why}")));
            return (String::new(), None);
        }
    };
    if vmr.spec.role == Role::Replica {
        actions.push(Action::ReplicateTo { to: to.clone(), what: "reversing replication" });
    }
    let mut text = format!(" Replication reversed to {to}: no resync, both sides hold the same bytes.");
    if let Some(c) = extended {
        text.push_str(&format!(" The extended replica {c} receives nothing more (orphaned)."));
    }
    (text, Some(to))
}

/// Where a Replica object reverses to: the old primary site's replication
/// server (HOST:PORT).
pub(super) fn reverse_target(vmr: &VMReplication, r: &FailoverRequest) -> Result<String, &'static str> {
    match (&r.reverse_replica_server, &vmr.spec.primary_server) {
        (Some(s), _) => Ok(format!("{}:{}", s.name, s.port)),
        (None, Some(name)) => Ok(format!("{name}:9443")),
        (None, None) => Err("no server to reverse to: set spec.failover.reverseReplicaServer"),
    }
}
