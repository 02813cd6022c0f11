//! Standard conditions, with `lastTransitionTime` moving only when the status
//! really changes (so writing the same status twice is not a change).

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};

/// A condition's new state.
pub struct Update<'a> {
    pub type_: &'a str,
    pub status: bool,
    pub reason: &'a str,
    pub message: String,
}

/// Sets a condition in `conditions`, keeping the previous transition time when
/// its status did not change.
pub fn set(
    conditions: &mut Vec<Condition>,
    previous: &[Condition],
    update: Update<'_>,
    generation: Option<i64>,
    now: Timestamp,
) {
    let Update { type_, status, reason, message } = update;
    let status = if status { "True" } else { "False" }.to_owned();
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    conditions.retain(|c| c.type_ != type_);
    conditions.push(Condition {
        type_: type_.to_owned(),
        status,
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_on_a_transition() {
        let t0 = Timestamp::from_second(1_000).unwrap();
        let t1 = Timestamp::from_second(2_000).unwrap();
        let mut first = Vec::new();
        let up =
            |status, reason: &'static str| Update { type_: "Ready", status, reason, message: reason.into() };
        set(&mut first, &[], up(true, "Accepted"), Some(1), t0);
        let mut again = Vec::new();
        set(&mut again, &first, up(true, "Accepted"), Some(2), t1);
        assert_eq!(again[0].last_transition_time, Time(t0), "same status: time kept");
        let mut flipped = Vec::new();
        set(&mut flipped, &again, up(false, "Refused"), Some(2), t1);
        assert_eq!(flipped[0].last_transition_time, Time(t1), "new status: time moves");
    }
}
