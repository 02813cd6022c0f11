//! Failover, decided: from the request (`spec.failover`), where the last one
//! stands (`status.lastFailover`) and one observation, the next step as a
//! [`Plan`] — what to write, which actions to take, what the status becomes
//! once they succeed, and when to look again. Pure: the act layer
//! (`super::act`) carries plans out; a step that waits (a VM stopping, the
//! other side's part) is a requeue, never a sleep.
//!
//! ```text
//!  Test        new id ─▶ PreparingDisks: delete old test VM, materialise "<name>-test", test VM ─▶ Completed
//!              removed ─▶ delete test VM and copies ─▶ Cancelled
//!  Planned     primary part:  new id ─▶ StoppingVM (stop) ─▶ stopped? ─▶ SyncingFinalLog (prepare) ─▶ Completed
//!              target side:   Pending (wait for the primary's final log) ─▶ PreparingDisks: promote, network,
//!                             [start], [reverse | resume to the extended replica] ─▶ Completed (took over)
//!  Unplanned   Pending (split-brain guard) ─▶ PreparingDisks: materialise "<name>-failover", serve it, [start]
//!              ─▶ WaitingCompletion ─▶ complete: true ─▶ Completed   |   request removed ─▶ Cancelled
//!  afterwards  the agent serves nothing (it restarted) ─▶ promote again, replicate again
//! ```

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::ResourceExt;
use vmreplica_api::control::ReplicaDisk;
use vmreplica_crds::{
    FailoverPhase, FailoverRequest, FailoverStatus, FailoverType, ReplicationState, Role, VMReplication,
};

use super::{observe::Located, replica::REPLICA_OF};
use crate::power::PowerState;

mod finish;
mod planned;
mod points;
mod unplanned;

pub use self::{
    finish::{Outcome, finish},
    planned::STOP_TIMEOUT_MS,
    points::{choose_points, data_loss_window},
    unplanned::PRIMARY_ALIVE_MS,
};
use self::{
    planned::{planned_back, planned_target, primary_part},
    unplanned::unplanned,
};

/// How often a waiting step looks again.
const SOON: Duration = Duration::from_secs(1);

/// What a decision reads.
pub struct Facts<'a> {
    pub vmr: &'a VMReplication,
    pub now: Timestamp,
    /// This VM's replicas on this site's agents.
    pub replica: Option<&'a Located>,
    /// Primary role: whether an agent serves the VM's disks here.
    pub primary_agent: bool,
    /// Primary role: whether that agent reports this VM among those it
    /// protects (it does not after giving the VM away, nor when restarted).
    pub serves_vm: bool,
    /// The VM's power, when it was read (a planned failover stopping it).
    pub power: Option<PowerState>,
    pub poll: Duration,
}

/// A side effect, carried out in order by the act layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Writes the status with this phase and message (progress).
    Progress(FailoverPhase, String),
    StopVm,
    StartVm,
    /// Hands the VM this site's TCP/IP settings.
    SetNetwork,
    /// Planned failover, primary part, on the primary agent.
    PrepareFailover,
    DeleteTestVms,
    /// Writes each disk at its point (`per_disk`) as copy `name`.
    Materialize {
        name: String,
        per_disk: BTreeMap<String, u64>,
    },
    /// The test VM on the copies just materialised.
    CreateTestVm,
    DeleteCopies {
        name: String,
    },
    /// Serves the replica (`copy` empty) or copy `copy` as the VM's disks.
    Promote {
        copy: String,
        complete: bool,
    },
    /// Replicates the promoted disks to `to`; `what` prefixes a failure.
    ReplicateTo {
        to: String,
        what: &'static str,
    },
    RemoveReplication,
    /// Fails with this message (a step that cannot be carried out).
    Refuse(String),
}

/// What the status becomes once every action succeeded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Done {
    /// Nothing more to write.
    Nothing,
    Failed {
        why: String,
        reason: &'static str,
    },
    /// Planned failover, primary part done: Completed.
    Prepared,
    TestReady {
        point: String,
    },
    TestCleaned,
    /// Planned failover to this side: Completed, took over.
    TookOver {
        reverse: String,
        reversed_to: Option<String>,
    },
    UnplannedWaiting {
        point: String,
        window: Option<u64>,
        last_replicated_ms: Option<u64>,
    },
    /// Unplanned failover completed; replication reversed to this server
    /// when it was asked for.
    UnplannedCompleted {
        reversed_to: Option<String>,
    },
    /// Replication reversed after a completed unplanned failover.
    Reversed {
        to: String,
    },
    UnplannedCancelled,
    /// Served again after the agent restarted: an Event, no status change.
    ServedAgain {
        reversed_to: Option<String>,
    },
}

/// What to do when an action fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnError {
    /// Record the failover as Failed (with the reason's Event).
    Fail(&'static str),
    /// Return the error: the pass is retried with back-off.
    Retry,
}

/// An Event a plan emits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub warning: bool,
    pub reason: &'static str,
    pub text: String,
}

/// A step with side effects.
#[derive(Clone, Debug, PartialEq)]
pub struct Run {
    pub status: FailoverStatus,
    /// Write `status` before the actions.
    pub write_first: bool,
    pub note: Option<Note>,
    pub actions: Vec<Action>,
    pub done: Done,
    pub on_error: OnError,
    pub again: Option<Duration>,
}

/// The next step.
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    /// No failover concerns this pass.
    Idle,
    /// A planned failover holds the VM (primary role): report this state.
    Hold(ReplicationState, FailoverStatus),
    /// Write `status` if it differs from the last (emitting `note` then) and
    /// look again after `again`.
    Wait {
        status: Option<FailoverStatus>,
        note: Option<Note>,
        again: Duration,
    },
    /// The replica agent this needs is not reachable: an error, retried.
    NoAgent(&'static str),
    Run(Box<Run>),
}

pub(super) fn note(warning: bool, reason: &'static str, text: impl Into<String>) -> Option<Note> {
    Some(Note { warning, reason, text: text.into() })
}

/// The name of the test copy of a VM's disks.
pub fn test_copy_name(vmr: &VMReplication) -> String {
    format!("{}-test", vmr.name_any())
}

/// The name of the copy an unplanned failover runs the VM on.
pub fn failover_copy_name(vmr: &VMReplication) -> String {
    format!("{}-failover", vmr.name_any())
}

/// The test VM made from VM object `vm`.
pub fn test_vm_name(vm: &str) -> String {
    format!("{vm}-test")
}

/// The status of request `f` as it starts (or resumes) in `phase`.
pub fn begin(f: &FailoverRequest, phase: FailoverPhase, started: Time) -> FailoverStatus {
    FailoverStatus {
        id: f.id.clone(),
        failover_type: f.failover_type,
        phase,
        recovery_point: None,
        start_time: Some(started),
        end_time: None,
        data_loss_window_seconds: None,
        forced: false,
        took_over: false,
        reversed_to: None,
        served_copy: None,
        message: None,
    }
}

pub(super) fn with(
    mut s: FailoverStatus,
    phase: FailoverPhase,
    message: impl Into<String>,
) -> FailoverStatus {
    s.phase = phase;
    s.message = Some(message.into());
    s
}

/// The VMReplication at the other site of this one, as an operator finds it:
/// a Replica object's primary is `<namespace>/<name>` at its primary server;
/// a Primary object's replica has its name at the replica server (in the
/// namespace the AuthorizationEntry there names).
pub fn other_side(vmr: &VMReplication) -> String {
    if vmr.spec.role == Role::Primary {
        let server = vmr.spec.replica_server.as_ref().map_or("the replica site", |r| r.name.as_str());
        return format!(
            "the Replica object {} at {server} (in the namespace its AuthorizationEntry names)",
            vmr.name_any()
        );
    }
    let object = vmr
        .labels()
        .get(REPLICA_OF)
        .and_then(|id| id.split_once('.'))
        .map_or_else(|| vmr.name_any(), |(ns, name)| format!("{ns}/{name}"));
    let server = vmr.spec.primary_server.as_deref().unwrap_or("the primary site");
    format!("the Primary object {object} at {server}")
}

/// The server address of `spec.extendedReplica`.
pub fn extended_server(vmr: &VMReplication) -> Option<String> {
    vmr.spec.extended_replica.as_ref().map(|e| format!("{}:{}", e.replica_server.name, e.replica_server.port))
}

pub(super) fn request_of(vmr: &VMReplication, t: FailoverType) -> Option<&FailoverRequest> {
    vmr.spec.failover.as_ref().filter(|f| f.failover_type == t)
}

pub(super) fn last_of(vmr: &VMReplication) -> Option<&FailoverStatus> {
    vmr.status.as_ref().and_then(|s| s.last_failover.as_ref())
}

pub(super) fn ended(l: &FailoverStatus) -> bool {
    matches!(l.phase, FailoverPhase::Completed | FailoverPhase::Failed)
}

/// Whether a planned failover is in its primary's part (stopping the VM,
/// shipping the last log); the target's part runs through the other
/// phases before it ends.
pub(super) fn in_primary_part(l: &FailoverStatus) -> bool {
    matches!(l.phase, FailoverPhase::StoppingVM | FailoverPhase::SyncingFinalLog)
}

/// The next step for a Replica object.
pub fn replica_plan(f: &Facts) -> Plan {
    for plan in [test(f), planned_back(f), planned_target(f), unplanned(f)] {
        if plan != Plan::Idle {
            return plan;
        }
    }
    keep_serving(f)
}

/// The next step for a Primary object: its part of a planned failover, or
/// (failing back) the target side's, or nothing (it replicates as usual).
pub fn primary_plan(f: &Facts) -> Plan {
    let request = request_of(f.vmr, FailoverType::Planned);
    let last = last_of(f.vmr).filter(|l| l.failover_type == FailoverType::Planned);
    let governs = request.is_some() || last.is_some_and(|l| l.phase == FailoverPhase::Completed);
    // An unplanned failover elsewhere reversed replication onto this side's
    // disks: they are the other side's replica (the replica-site report
    // shows it) until a planned failover brings the VM back.
    let reversed = f.replica.is_some_and(|l| l.status.replicas.iter().any(|d| d.reverse && !d.promoted));
    if !governs && reversed && f.primary_agent {
        return Plan::Wait { status: None, note: None, again: f.poll };
    }
    if !governs || !f.primary_agent {
        return Plan::Idle;
    }
    // Replication reversed onto this side: it is the VM's replica now (the
    // replica-site report shows it), or it is taking the VM back.
    if let Some(loc) = f.replica.filter(|l| l.status.replicas.iter().any(|d| d.reverse)) {
        // Taken back, and then this request's primary's part of moving it
        // away again is under way or done here: that is this side's part,
        // not the target's (which would "complete" at once, this side
        // serving the disks already). A previous move's part, done here
        // before the VM was taken back, does not count.
        let own_part = |l: &FailoverStatus| {
            (l.took_over && l.phase == FailoverPhase::Completed)
                || !l.took_over
                    && request.is_some_and(|r| r.id == l.id)
                    && (in_primary_part(l) || l.phase == FailoverPhase::Completed)
        };
        let taken_back = loc.status.replicas.iter().all(|d| d.promoted) && last.is_some_and(own_part);
        if !taken_back {
            return match planned_target(f) {
                Plan::Idle => Plan::Wait { status: None, note: None, again: f.poll },
                p => p,
            };
        }
    }
    // This request's take-back is under way here (its target's part), and
    // the agent's report of the reversed disks is missing (it restarted):
    // that is no new move to begin, whose first step would stop the VM.
    let taking_back = last.is_some_and(|l| {
        request.is_some_and(|r| r.id == l.id)
            && !in_primary_part(l)
            && !ended(l)
            && l.phase != FailoverPhase::Cancelled
    });
    // This side gave the VM away (its part of an earlier move completed)
    // and its agent no longer protects the VM: a new request can only take
    // it back, which needs the agent's report of the reversed disks (missing
    // until a restarted agent is configured again). A side still holding
    // the VM (never taken over) does its part again instead.
    let gave_away = last.is_some_and(|l| {
        !l.took_over && l.phase == FailoverPhase::Completed && request.is_some_and(|r| r.id != l.id)
    }) && !f.serves_vm;
    if (taking_back || gave_away) && f.replica.is_none() {
        return Plan::Wait { status: None, note: None, again: SOON };
    }
    match (request, last) {
        (Some(r), last) => primary_part(f, r, last),
        // This side took the VM over (failed back here): it is the primary.
        (None, Some(l)) if l.took_over => Plan::Idle,
        // Prepared earlier and the request since removed: the disks stay
        // read-only until the object is deleted (or the failover resumed).
        (None, Some(l)) if l.phase == FailoverPhase::Completed => {
            Plan::Hold(ReplicationState::SyncedReplicationComplete, l.clone())
        }
        (None, _) => Plan::Idle,
    }
}

/// Test failover: materialise the point as test disks (and a test VM);
/// removing the request cleans up.
fn test(f: &Facts) -> Plan {
    let vmr = f.vmr;
    let last = last_of(vmr);
    match request_of(vmr, FailoverType::Test) {
        // Done already: re-applying the same request changes nothing.
        Some(r) if last.is_some_and(|l| l.id == r.id) => Plan::Idle,
        Some(r) => {
            let Some(loc) = f.replica else { return Plan::NoAgent("carry out the test failover") };
            let status = with(
                begin(r, FailoverPhase::PreparingDisks, Time(f.now)),
                FailoverPhase::PreparingDisks,
                "materialising the recovery point as test disks",
            );
            let refs: Vec<&ReplicaDisk> = loc.status.replicas.iter().collect();
            let (actions, done, on_error) = match choose_points(&refs, &r.recovery_point) {
                Ok((point, per_disk)) => (
                    vec![
                        // An earlier test's VM runs on the disks about to be replaced.
                        Action::DeleteTestVms,
                        Action::Materialize { name: test_copy_name(vmr), per_disk },
                        Action::CreateTestVm,
                    ],
                    Done::TestReady { point },
                    OnError::Fail("TestFailoverFailed"),
                ),
                Err(why) => (
                    vec![Action::DeleteTestVms],
                    Done::Failed { why, reason: "TestFailoverFailed" },
                    OnError::Retry,
                ),
            };
            Plan::Run(Box::new(Run {
                status,
                write_first: true,
                note: None,
                actions,
                done,
                on_error,
                again: None,
            }))
        }
        None => match last
            .filter(|l| l.failover_type == FailoverType::Test && l.phase != FailoverPhase::Cancelled)
        {
            // Test copies have one name per VM, so whatever the last test
            // request left (completed, failed, or interrupted) is found and deleted.
            // Without the replica agent the test VM still goes at once; its
            // disks are deleted (and the test ends) once the agent is back.
            Some(l) => Plan::Run(Box::new(Run {
                status: l.clone(),
                write_first: false,
                note: None,
                actions: vec![
                    Action::DeleteTestVms,
                    match f.replica {
                        Some(_) => Action::DeleteCopies { name: test_copy_name(vmr) },
                        None => Action::Refuse(
                            "deleting the test disks: no live replica agent holds this VM".into(),
                        ),
                    },
                ],
                done: Done::TestCleaned,
                on_error: OnError::Retry,
                again: None,
            })),
            None => Plan::Idle,
        },
    }
}

/// After a failover to this side: the agent keeps serving the VM's disks;
/// one that restarted serves nothing until asked again.
fn keep_serving(f: &Facts) -> Plan {
    let vmr = f.vmr;
    let Some(l) = last_of(vmr) else { return Plan::Idle };
    let unplanned = l.failover_type == FailoverType::Unplanned
        && matches!(l.phase, FailoverPhase::WaitingCompletion | FailoverPhase::Completed);
    let planned =
        l.failover_type == FailoverType::Planned && l.phase == FailoverPhase::Completed && l.took_over;
    if !(planned || unplanned) || vmr.spec.role == Role::Primary {
        return Plan::Idle;
    }
    let idle = Plan::Wait { status: None, note: None, again: f.poll };
    let Some(loc) = f.replica else { return idle };
    if loc.serves(&vmr.uid().unwrap_or_default()) {
        return idle;
    }
    serve_again(f, l.clone(), served_copy(vmr, l), l.reversed_to.clone())
}

/// The copy a side that took the VM over (`l`) serves as the VM's disks:
/// after an unplanned failover, the chosen point's materialised copy; after a
/// planned one, none (the promoted replicas themselves); during its part of
/// failing back, the one that part's status kept.
pub(super) fn served_copy(vmr: &VMReplication, l: &FailoverStatus) -> Option<String> {
    match l.failover_type {
        FailoverType::Unplanned => Some(failover_copy_name(vmr)),
        _ => l.served_copy.clone(),
    }
}

/// Tells an agent that restarted (and so serves nothing until asked) to
/// serve the VM's disks again — `copy`, or the promoted replicas — and
/// to replicate them to `reversed_to`; `status` is left as it is.
pub(super) fn serve_again(
    f: &Facts,
    status: FailoverStatus,
    copy: Option<String>,
    reversed_to: Option<String>,
) -> Plan {
    let mut actions = vec![Action::Promote { copy: copy.unwrap_or_default(), complete: false }];
    if let Some(to) = &reversed_to {
        actions.push(Action::ReplicateTo { to: to.clone(), what: "replicating again" });
    }
    Plan::Run(Box::new(Run {
        status,
        write_first: false,
        note: None,
        actions,
        done: Done::ServedAgain { reversed_to },
        on_error: OnError::Retry,
        again: Some(f.poll.min(SOON)),
    }))
}

#[cfg(test)]
mod tests;
