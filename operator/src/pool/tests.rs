use super::*;
use crate::conditions::is_true;
use floodgate_crds::ConditionStatus;

/// A pool with `claude` (keys key1..key3 of Secret `claude-keys`, 20 RPM each) and a keyless
/// `ollama` provider of 100 RPM.
fn spec() -> AIProviderPoolSpec {
    serde_json::from_value(serde_json::json!({
        "providers": [
            {"name": "claude", "type": "anthropic", "models": [{"name": "claude-sonnet-4"}],
             "keys": [
                {"secretRef": {"name": "claude-keys", "key": "key1"}, "rpm": 20},
                {"name": "second", "secretRef": {"name": "claude-keys", "key": "key2"}, "rpm": 20},
                {"secretRef": {"name": "claude-keys", "key": "key3"}, "rpm": 20}]},
            {"name": "local", "type": "ollama", "models": [{"name": "llama3.1:8b"}], "rpm": 100}
        ]
    }))
    .unwrap()
}

fn secrets(keys: &[&str]) -> SecretIndex {
    let mut index = SecretIndex::default();
    index.insert("claude-keys", keys.iter().map(|k| (*k).to_owned()));
    index
}

fn get<'a>(s: &'a AIProviderPoolStatus, type_: &str) -> &'a floodgate_crds::Condition {
    s.conditions.iter().find(|c| c.type_ == type_).unwrap()
}

#[test]
fn all_keys_present_is_ready_with_full_capacity() {
    let s = compute_status(
        &spec(),
        Some(4),
        None,
        &secrets(&["key1", "key2", "key3"]),
        &Live::Unconfigured,
        "t1",
    );
    assert_eq!((s.ready_keys, s.total_keys, s.capacity_rpm), (3, 3, 160));
    assert_eq!(s.keys.as_deref(), Some("3/3"));
    assert_eq!(s.provider_count, 2);
    assert_eq!(s.observed_generation, Some(4));
    for t in [READY, SECRETS_FOUND, KEYS_READY] {
        assert!(is_true(&s.conditions, t), "{t}: {:?}", s.conditions);
    }
    assert!(!is_true(&s.conditions, DEGRADED));
    assert!(
        s.conditions
            .iter()
            .all(|c| c.observed_generation == Some(4))
    );
}

#[test]
fn a_missing_key_is_named_and_the_pool_is_degraded_not_ready() {
    let s = compute_status(
        &spec(),
        Some(1),
        None,
        &secrets(&["key1", "key3"]),
        &Live::Unconfigured,
        "t1",
    );
    assert_eq!((s.ready_keys, s.total_keys, s.capacity_rpm), (2, 3, 140));
    let ready = get(&s, READY);
    assert_eq!(ready.status, ConditionStatus::False);
    assert_eq!(ready.reason, "KeyNotFound");
    assert!(
        ready
            .message
            .contains(r#"Secret "claude-keys" has no key "key2""#)
            && ready.message.contains("(claude/second)"),
        "{}",
        ready.message
    );
    assert!(is_true(&s.conditions, SECRETS_FOUND));
    assert!(!is_true(&s.conditions, KEYS_READY));
    assert!(is_true(&s.conditions, DEGRADED));
}

#[test]
fn a_missing_secret_is_named_and_default_key_names_count_from_zero() {
    let s = compute_status(
        &spec(),
        Some(1),
        None,
        &SecretIndex::default(),
        &Live::Unconfigured,
        "t1",
    );
    let found = get(&s, SECRETS_FOUND);
    assert_eq!(found.status, ConditionStatus::False);
    assert!(
        found
            .message
            .contains(r#"Secret "claude-keys" not found (claude/claude-0)"#),
        "{}",
        found.message
    );
    assert_eq!(get(&s, READY).reason, "SecretNotFound");
    // The keyless provider still serves: 100 RPM of capacity, so degraded rather than down.
    assert_eq!(s.capacity_rpm, 100);
    assert!(is_true(&s.conditions, DEGRADED));
}

#[test]
fn fixing_the_secret_turns_ready_and_a_rerun_changes_nothing() {
    let broken = compute_status(
        &spec(),
        Some(1),
        None,
        &secrets(&["key1"]),
        &Live::Unconfigured,
        "t1",
    );
    let fixed = compute_status(
        &spec(),
        Some(1),
        Some(&broken),
        &secrets(&["key1", "key2", "key3"]),
        &Live::Unconfigured,
        "t2",
    );
    assert!(is_true(&fixed.conditions, READY));
    assert_eq!(get(&fixed, READY).last_transition_time, "t2");
    // SecretsFound was True throughout: its time stays.
    assert_eq!(get(&fixed, SECRETS_FOUND).last_transition_time, "t1");
    let again = compute_status(
        &spec(),
        Some(1),
        Some(&fixed),
        &secrets(&["key1", "key2", "key3"]),
        &Live::Unconfigured,
        "t3",
    );
    assert_eq!(again, fixed);
}

/// What a gateway replica with `claude` open reports, with 12 and 5 requests of the minute.
fn read() -> Live {
    use crate::usage::CircuitUsage;
    Live::Read(
        ProviderUsage::from([("claude".to_owned(), 12), ("local".to_owned(), 5)]),
        PoolCircuits::from([(
            "claude".to_owned(),
            CircuitUsage {
                worst: "open",
                replicas: 3,
                open: 2,
            },
        )]),
    )
}

#[test]
fn live_usage_fills_providers_and_total_and_a_failed_read_clears_them() {
    let s = compute_status(&spec(), Some(1), None, &secrets(&["key1"]), &read(), "t1");
    assert_eq!(s.used_rpm, 17);
    assert_eq!((s.providers[0].used_rpm, s.providers[1].used_rpm), (12, 5));
    assert_eq!(get(&s, USAGE_TRACKED).status, ConditionStatus::True);
    // Redis unreachable on the next pass: not the last figures (a pool gone quiet, or its
    // circuit closed again, would show them for ever), but 0, unknown, and why.
    let failed = Live::Failed {
        reason: "UsageUnreadable",
        why: "Connection refused (os error 111)".into(),
    };
    let again = compute_status(
        &spec(),
        Some(1),
        Some(&s),
        &secrets(&["key1"]),
        &failed,
        "t2",
    );
    assert_eq!(again.used_rpm, 0);
    assert_eq!(again.providers[0].used_rpm, 0);
    assert_eq!(
        (
            again.providers[0].circuit.as_str(),
            again.providers[0].circuit_open_replicas
        ),
        ("unknown", 0)
    );
    assert_eq!(again.open_circuits, None);
    let tracked = get(&again, USAGE_TRACKED);
    assert_eq!(
        (tracked.status, tracked.reason.as_str()),
        (ConditionStatus::False, "UsageUnreadable")
    );
    assert!(
        tracked.message.contains("Connection refused"),
        "{}",
        tracked.message
    );
    assert_eq!(tracked.last_transition_time, "t2");
    // Health is not usage: Ready stays as it was.
    assert_eq!(get(&again, READY).last_transition_time, "t1");
}

#[test]
fn circuits_show_the_worst_state_and_the_open_replicas_and_unknown_when_unreported() {
    let s = compute_status(&spec(), Some(1), None, &secrets(&["key1"]), &read(), "t1");
    let claude = &s.providers[0];
    assert_eq!(
        (
            claude.circuit.as_str(),
            claude.circuit_replicas,
            claude.circuit_open_replicas
        ),
        ("open", 3, 2)
    );
    assert_eq!(
        (
            s.providers[1].circuit.as_str(),
            s.providers[1].circuit_replicas
        ),
        ("unknown", 0)
    );
    assert_eq!(s.open_circuits, Some(1));
    // A fresh read with no replica reporting: unknown again.
    let quiet = Live::Read(ProviderUsage::new(), PoolCircuits::new());
    let cleared = compute_status(
        &spec(),
        Some(1),
        Some(&s),
        &secrets(&["key1"]),
        &quiet,
        "t2",
    );
    assert_eq!(
        (
            cleared.providers[0].circuit.as_str(),
            cleared.providers[0].circuit_open_replicas
        ),
        ("unknown", 0)
    );
    assert_eq!(cleared.open_circuits, None, "nothing reported: not 0 open");
}
