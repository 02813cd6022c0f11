//! The status a run ends in once its actions succeeded: each [`Done`] as the
//! sentence an operator reads, and the Event that carries it.

use std::collections::BTreeMap;

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use vmreplica_crds::{FailoverPhase, FailoverStatus, Role, VMReplication};

use super::{Done, Note, Run, note, other_side};

/// What carrying out a plan's actions produced, for its final status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The VM's disks as served (Promote).
    pub exports: Vec<String>,
    /// The epoch they are served under (Promote).
    pub epoch: Option<u64>,
    /// Each disk's copy (Materialize).
    pub copies: Vec<String>,
    /// Replica image path → its copy (Materialize), for the test VM.
    pub copy_of: BTreeMap<String, String>,
    /// The test VM made (CreateTestVm): its name and network.
    pub test_vm: Option<String>,
    /// Each disk's final sequence (PrepareFailover).
    pub finals: Vec<(String, u64)>,
    /// The node of the agent acted on.
    pub node: String,
}

/// The status (and Event, and epoch written with it) once a run's actions
/// succeeded; `None` status: nothing to write.
pub fn finish(
    vmr: &VMReplication,
    run: &Run,
    out: &Outcome,
    now: Time,
) -> (Option<FailoverStatus>, Option<Note>, Option<u64>) {
    use FailoverPhase::*;
    let Some((message, reason, warning)) = sentence(vmr, &run.done, out) else { return (None, None, None) };
    let event = note(warning, reason, message.clone());
    let mut s = run.status.clone();
    // The phase it ends in, whether that ends the failover, the epoch it moved the VM to.
    let (phase, ends, epoch) = match &run.done {
        Done::Nothing | Done::ServedAgain { .. } => return (None, event, None),
        Done::Failed { .. } => (Failed, true, None),
        Done::Prepared => {
            s.data_loss_window_seconds = Some(0);
            (Completed, true, None)
        }
        Done::TestReady { point } => {
            s.recovery_point = Some(point.clone());
            (Completed, true, None)
        }
        Done::TestCleaned => (Cancelled, false, None),
        Done::TookOver { reversed_to, .. } => {
            s.took_over = true;
            s.reversed_to = reversed_to.clone();
            s.data_loss_window_seconds = Some(0);
            (Completed, true, out.epoch)
        }
        Done::UnplannedWaiting { window, .. } => {
            s.data_loss_window_seconds = *window;
            (WaitingCompletion, false, None)
        }
        Done::UnplannedCompleted { reversed_to } => {
            // This side runs the VM now: a planned failover back starts here.
            s.took_over = true;
            s.reversed_to = reversed_to.clone();
            (Completed, true, out.epoch)
        }
        Done::Reversed { to } => {
            s.reversed_to = Some(to.clone());
            (Completed, false, None)
        }
        Done::UnplannedCancelled => (Cancelled, true, None),
    };
    s.phase = phase;
    s.message = Some(message);
    if ends {
        s.end_time = Some(now);
    }
    (Some(s), event, epoch)
}

/// What an operator reads once `done` is reached: the message, the Event's
/// reason, and whether it is a warning.
fn sentence(vmr: &VMReplication, done: &Done, out: &Outcome) -> Option<(String, &'static str, bool)> {
    let exports = out.exports.join(", ");
    Some(match done {
        Done::Nothing => return None,
        Done::Failed { why, reason } => (why.clone(), *reason, true),
        Done::Prepared => {
            let finals: Vec<String> = out.finals.iter().map(|(d, last)| format!("{d} through {last}")).collect();
            let message = format!(
                "primary side done: VM stopped, disks read-only, the replica holds every write ({}); now request the \
                 planned failover on {}, with the same id{}",
                finals.join(", "),
                other_side(vmr),
                if vmr.spec.role == Role::Primary { "" } else { " and reverseReplication: true" },
            );
            (message, "PlannedFailoverPrepared", false)
        }
        Done::TestReady { point } => {
            let vm = out.test_vm.as_ref().map(|v| format!("; test VM {v}")).unwrap_or_default();
            let message = format!(
                "test disks at point {point} (replication continues): {}{vm}; remove spec.failover to delete them",
                out.copies.join(", ")
            );
            (message, "TestFailoverReady", false)
        }
        Done::TestCleaned => {
            ("test failover stopped: its test VM and disks were deleted".into(), "TestFailoverCleanedUp", false)
        }
        Done::TookOver { reverse, .. } => (
            format!("failed over with no loss: the VM's disks are served at {exports}.{reverse}"),
            "PlannedFailoverCompleted",
            false,
        ),
        Done::UnplannedWaiting { point, window, last_replicated_ms } => {
            let last_replicated = last_replicated_ms
                .and_then(|ms| Timestamp::from_millisecond(ms as i64).ok())
                .map_or_else(|| "never".to_owned(), |t| t.to_string());
            let message = format!(
                "the VM runs on point {point} at {exports}; set complete: true to keep it (the other points are folded \
                 away), or remove the request to cancel. Data-loss window: {}s of replicated writes after the point; \
                 the primary's last write to reach this site was sealed at {last_replicated}, anything it wrote after \
                 that never arrived",
                window.unwrap_or(0)
            );
            (message, "UnplannedFailoverWaitingCompletion", false)
        }
        Done::UnplannedCompleted { reversed_to } => {
            let protection = match reversed_to {
                Some(to) if super::extended_server(vmr).as_deref() == Some(to.as_str()) => format!(
                    " Replication resumed to the extended replica {to}: it is resynchronised (only what differs \
                     is sent), and what it held beyond the chosen point is kept there as a diverged point"
                ),
                Some(to) => reversed_text(to),
                None => " It is not protected now: set reverseReplication: true on this request to replicate back to \
                          the old primary's own disks by resync (only what differs is sent)"
                    .to_owned(),
            };
            let message = format!(
                "completed: the other recovery points are folded away and the old primary is refused; the VM's disks \
                 are {exports}.{protection}"
            );
            (message, "UnplannedFailoverCompleted", false)
        }
        Done::Reversed { to } => {
            (format!("completed earlier; now{}", reversed_text(to)), "ReplicationReversed", false)
        }
        Done::UnplannedCancelled => (
            "cancelled: the failover copy was deleted; this is a replica again, and another point may be chosen".into(),
            "UnplannedFailoverCancelled",
            false,
        ),
        Done::ServedAgain { reversed_to } => {
            let text = format!(
                "the agent on {} served nothing (it restarted): the VM's disks are served again at {exports}{}",
                out.node,
                reversed_to.as_deref().map(|to| format!(", replicating to {to}")).unwrap_or_default()
            );
            (text, "DisksServedAgain", true)
        }
    })
}

/// What an operator reads once replication is reversed after an unplanned failover.
fn reversed_text(to: &str) -> String {
    format!(
        " Replication reversed to {to}: once the VM there is stopped (a running one is fenced and stopped), its \
         disks are resynchronised by block hash, only what differs being sent, and what they held that never \
         reached this side is kept there as a diverged point (status.divergedPoint of the Primary object)"
    )
}
