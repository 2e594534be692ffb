//! Status conditions in the shape of `metav1.Condition`: building them, and merging a freshly
//! computed set into the one an object carries so that `lastTransitionTime` moves only when a
//! condition's status changes.

use floodgate_crds::{Condition, ConditionStatus};

/// Condition type every resource carries: the resource does what it says.
pub const READY: &str = "Ready";
/// Every Secret the resource references exists.
pub const SECRETS_FOUND: &str = "SecretsFound";
/// Every API key of a pool resolves to a non-empty Secret value.
pub const KEYS_READY: &str = "KeysReady";
/// Every target a RoutingPolicy names (pools, LocalModelDeployments) exists.
pub const TARGETS_FOUND: &str = "TargetsFound";
/// A rollout is under way (LocalModelDeployment).
pub const PROGRESSING: &str = "Progressing";
/// The resource works, but with less than it asked for.
pub const DEGRADED: &str = "Degraded";
/// The autoscaler can act on the resource: it reads the gateway's demand for it
/// (LocalModelDeployment with `spec.autoscaling`).
pub const AUTOSCALING_ACTIVE: &str = "AutoscalingActive";

/// The live figures the proxies share (a tenant's use, a pool's usage and circuits) are read:
/// when not, the figures do not mean what they say.
pub const USAGE_TRACKED: &str = "UsageTracked";

/// A condition as computed by a reconciler, before [`merge`] gives it its times.
pub fn condition(type_: &str, status: bool, reason: &str, message: impl Into<String>) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if status {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        },
        reason: reason.to_owned(),
        message: bounded(message.into()),
        last_transition_time: String::new(),
        observed_generation: None,
    }
}

/// The longest condition message the API server accepts (metav1.Condition's limit, in
/// characters).
pub const MAX_MESSAGE: usize = 32_768;

/// `message` cut to [`MAX_MESSAGE`] characters, ending in `...` when cut: a status naming a
/// few hundred missing objects must still be written, or it would stay stale while every
/// reconcile fails.
fn bounded(message: String) -> String {
    if message.chars().count() <= MAX_MESSAGE {
        return message;
    }
    let mut cut: String = message.chars().take(MAX_MESSAGE - 3).collect();
    cut.push_str("...");
    cut
}

/// The current time as Kubernetes writes it (RFC 3339, seconds, UTC).
pub fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// Merges `fresh` conditions, computed at `generation`, into `old`: a condition whose status
/// is unchanged keeps its `lastTransitionTime`, any other gets `now`. Conditions of `old` whose
/// type `fresh` lacks are dropped (this operator owns every condition it writes). The result
/// keeps the order of `fresh`, so that merging the same inputs twice gives equal vectors and a
/// reconcile with nothing new writes nothing.
pub fn merge(
    old: &[Condition],
    fresh: Vec<Condition>,
    generation: Option<i64>,
    now: &str,
) -> Vec<Condition> {
    fresh
        .into_iter()
        .map(|mut c| {
            c.observed_generation = generation;
            c.last_transition_time = old
                .iter()
                .find(|o| o.type_ == c.type_ && o.status == c.status)
                .map_or_else(|| now.to_owned(), |o| o.last_transition_time.clone());
            c
        })
        .collect()
}

/// Whether condition `type_` is True in `conditions`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == ConditionStatus::True)
}

/// The conditions of `new` whose status differs from `old` (or that `old` lacks): the
/// transitions worth an Event.
pub fn transitions<'a>(old: &[Condition], new: &'a [Condition]) -> Vec<&'a Condition> {
    new.iter()
        .filter(|c| {
            !old.iter()
                .any(|o| o.type_ == c.type_ && o.status == c.status)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_message_past_the_api_servers_limit_is_cut_to_it() {
        let long = "é".repeat(super::MAX_MESSAGE + 1);
        let c = super::condition("Ready", false, "Missing", long);
        assert_eq!(c.message.chars().count(), super::MAX_MESSAGE);
        assert!(c.message.ends_with("..."));
        let fits = "é".repeat(super::MAX_MESSAGE);
        let c = super::condition("Ready", false, "Missing", fits.clone());
        assert_eq!(c.message, fits);
    }

    use super::*;

    #[test]
    fn transition_time_moves_only_when_the_status_changes() {
        let first = merge(
            &[],
            vec![condition(READY, false, "KeyMissing", "a")],
            Some(1),
            "t1",
        );
        assert_eq!(first[0].last_transition_time, "t1");
        assert_eq!(first[0].observed_generation, Some(1));

        // Same status, new reason and message, later generation: the time stays.
        let same = merge(
            &first,
            vec![condition(READY, false, "SecretNotFound", "b")],
            Some(2),
            "t2",
        );
        assert_eq!(same[0].last_transition_time, "t1");
        assert_eq!(same[0].reason, "SecretNotFound");
        assert_eq!(same[0].observed_generation, Some(2));

        let flipped = merge(
            &same,
            vec![condition(READY, true, "AllKeysReady", "")],
            Some(2),
            "t3",
        );
        assert_eq!(flipped[0].last_transition_time, "t3");
        assert_eq!(transitions(&same, &flipped).len(), 1);
        assert!(is_true(&flipped, READY));
        assert!(!is_true(&same, READY));
    }

    #[test]
    fn merging_the_same_inputs_again_is_equal_so_nothing_is_written() {
        let fresh = || {
            vec![
                condition(READY, true, "Ok", ""),
                condition(DEGRADED, false, "Ok", ""),
            ]
        };
        let once = merge(&[], fresh(), Some(3), "t1");
        let twice = merge(&once, fresh(), Some(3), "t2");
        assert_eq!(once, twice);
        assert!(transitions(&once, &twice).is_empty());
    }

    #[test]
    fn conditions_not_computed_any_more_are_dropped() {
        let old = merge(&[], vec![condition(DEGRADED, true, "X", "")], None, "t1");
        let new = merge(&old, vec![condition(READY, true, "Ok", "")], None, "t2");
        assert_eq!(new.len(), 1);
        assert_eq!(new[0].type_, READY);
    }
}
