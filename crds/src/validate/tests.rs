//! Each bad manifest is refused with an error that names the offending field.

use super::*;
use crate::{AIProviderPool, CachePolicy, LocalModelDeployment, Tenant, TierQueue};
use serde_json::json;

fn pool() -> Value {
    json!({
        "apiVersion": "floodgate.dev/v1alpha1",
        "kind": "AIProviderPool",
        "metadata": {"name": "premium"},
        "spec": {
            "providers": [
                {"name": "claude", "type": "anthropic",
                 "models": [{"name": "claude-sonnet-4", "alias": "smart"}],
                 "keys": [{"secretRef": {"name": "claude-keys", "key": "key1"}, "rpm": 20}]},
                {"name": "llama", "type": "ollama", "models": [{"name": "llama3.1:8b"}]}
            ],
            "fallback": ["claude", "llama"]
        }
    })
}

fn tiers() -> Value {
    json!({
        "apiVersion": "floodgate.dev/v1alpha1",
        "kind": "TierQueue",
        "metadata": {"name": "tiers"},
        "spec": {"tiers": [
            {"name": "enterprise", "class": "priority", "weight": 10, "maxWaitMs": 1000},
            {"name": "free", "class": "batch", "weight": 1, "maxWaitMs": 300000,
             "batch": {"size": 10, "intervalSeconds": 60}}
        ]}
    })
}

fn cache() -> Value {
    json!({
        "apiVersion": "floodgate.dev/v1alpha1",
        "kind": "CachePolicy",
        "metadata": {"name": "cache"},
        "spec": {"exact": {"ttlSeconds": 3600}, "semantic": {"ttlSeconds": 1800, "threshold": 0.95}}
    })
}

fn local_model() -> Value {
    json!({
        "apiVersion": "floodgate.dev/v1alpha1",
        "kind": "LocalModelDeployment",
        "metadata": {"name": "llama"},
        "spec": {"model": "llama3.1:8b", "classes": ["simple"],
                 "autoscaling": {"minReplicas": 2, "maxReplicas": 20}}
    })
}

fn tenant() -> Value {
    json!({
        "apiVersion": "floodgate.dev/v1alpha1",
        "kind": "Tenant",
        "metadata": {"name": "acme"},
        "spec": {"tier": "enterprise",
                 "keys": [{"name": "main", "secretRef": {"name": "acme-keys", "key": "main"}},
                          {"name": "next", "secretRef": {"name": "acme-keys", "key": "next"}}],
                 "limits": {"rpm": 600, "tpm": 100000, "concurrent": 20},
                 "models": ["smart", "gpt-4o-mini"]}
    })
}

fn routing() -> Value {
    json!({
        "apiVersion": "floodgate.dev/v1alpha1",
        "kind": "RoutingPolicy",
        "metadata": {"name": "hybrid"},
        "spec": {
            "premiumPool": "premium",
            "rules": [
                {"name": "free-simple", "match": {"tiers": ["free"], "classes": ["simple"]},
                 "targets": [{"localModel": "mistral"}, {"pool": "premium", "model": "smart"}]},
                {"name": "rest", "targets": [{"pool": "premium"}]}
            ],
            "budgets": {"tenants": [{"name": "acme", "monthlyUSD": 100.0}]}
        }
    })
}

/// Sets `pointer` in `value` (creating nothing: the parent must exist).
fn with(mut value: Value, pointer: &str, new: Value) -> Value {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let parent = value.pointer_mut(parent).unwrap();
    match parent {
        Value::Object(map) => {
            map.insert(key.to_owned(), new);
        }
        Value::Array(items) => items[key.parse::<usize>().unwrap()] = new,
        _ => panic!("{pointer} has no container parent"),
    }
    value
}

fn without(mut value: Value, pointer: &str) -> Value {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    value
        .pointer_mut(parent)
        .unwrap()
        .as_object_mut()
        .unwrap()
        .remove(key);
    value
}

fn errors(kind: Kind, value: &Value) -> Vec<FieldError> {
    let result = match kind {
        Kind::AIProviderPool => validate_object::<AIProviderPool>(kind, value).map(drop),
        Kind::TierQueue => validate_object::<TierQueue>(kind, value).map(drop),
        Kind::CachePolicy => validate_object::<CachePolicy>(kind, value).map(drop),
        Kind::LocalModelDeployment => {
            validate_object::<LocalModelDeployment>(kind, value).map(drop)
        }
        Kind::Tenant => validate_object::<Tenant>(kind, value).map(drop),
        Kind::RoutingPolicy => validate_object::<crate::RoutingPolicy>(kind, value).map(drop),
    };
    result.err().unwrap_or_default()
}

/// Asserts that `value` is refused and that one error names exactly `field`.
#[track_caller]
fn refused_at(kind: Kind, value: Value, field: &str) -> FieldError {
    let errs = errors(kind, &value);
    assert!(
        !errs.is_empty(),
        "expected {field} to be refused, but the manifest was accepted"
    );
    errs.iter()
        .find(|e| e.field == field)
        .cloned()
        .unwrap_or_else(|| panic!("no error names {field}; got {errs:?}"))
}

#[test]
fn good_fixtures_are_accepted() {
    for (kind, value) in [
        (Kind::AIProviderPool, pool()),
        (Kind::TierQueue, tiers()),
        (Kind::CachePolicy, cache()),
        (Kind::LocalModelDeployment, local_model()),
        (Kind::Tenant, tenant()),
        (Kind::RoutingPolicy, routing()),
    ] {
        assert_eq!(errors(kind, &value), vec![], "{kind}");
    }
}

#[test]
fn defaults_are_applied() {
    let pool: AIProviderPool = validate_object(Kind::AIProviderPool, &pool()).unwrap();
    assert_eq!(pool.spec.circuit_breaker.failure_threshold, 5);
    assert_eq!(pool.spec.circuit_breaker.open_seconds, 60);
    assert_eq!(pool.spec.max_attempts, 3);
    assert_eq!(pool.spec.providers[0].weight, 1);
    let tq: TierQueue = validate_object(Kind::TierQueue, &tiers()).unwrap();
    assert_eq!(tq.spec.retry.max_attempts, 3);
    assert_eq!(tq.spec.tiers[0].max_queue_depth, 1000);
}

#[test]
fn negative_rpm() {
    let bad = with(pool(), "/spec/providers/0/keys/0/rpm", json!(-5));
    let e = refused_at(Kind::AIProviderPool, bad, "spec.providers[0].keys[0].rpm");
    assert!(e.message.contains("greater than or equal to 1"), "{e}");
}

#[test]
fn zero_rpm() {
    let bad = with(pool(), "/spec/providers/0/keys/0/rpm", json!(0));
    refused_at(Kind::AIProviderPool, bad, "spec.providers[0].keys[0].rpm");
}

#[test]
fn threshold_above_one() {
    let bad = with(cache(), "/spec/semantic/threshold", json!(1.5));
    refused_at(Kind::CachePolicy, bad, "spec.semantic.threshold");
}

#[test]
fn threshold_zero_is_outside_the_open_interval() {
    let bad = with(cache(), "/spec/semantic/threshold", json!(0.0));
    let e = refused_at(Kind::CachePolicy, bad, "spec.semantic.threshold");
    assert!(e.message.contains("greater than 0"), "{e}");
    let ok = with(cache(), "/spec/semantic/threshold", json!(1));
    assert_eq!(errors(Kind::CachePolicy, &ok), vec![]);
}

#[test]
fn min_replicas_above_max() {
    let bad = with(local_model(), "/spec/autoscaling/minReplicas", json!(30));
    let e = refused_at(
        Kind::LocalModelDeployment,
        bad,
        "spec.autoscaling.minReplicas",
    );
    assert!(
        e.message
            .contains("minReplicas must not exceed maxReplicas"),
        "{e}"
    );
}

#[test]
fn unknown_provider_type() {
    let bad = with(pool(), "/spec/providers/0/type", json!("cohere"));
    let e = refused_at(Kind::AIProviderPool, bad, "spec.providers[0].type");
    assert!(e.message.contains("\"anthropic\""), "{e}");
}

#[test]
fn missing_secret_ref() {
    let bad = without(pool(), "/spec/providers/0/keys/0/secretRef");
    let e = refused_at(
        Kind::AIProviderPool,
        bad,
        "spec.providers[0].keys[0].secretRef",
    );
    assert_eq!(e.message, "Required value");
}

#[test]
fn inline_key_is_refused_without_echoing_it() {
    let bad = with(
        pool(),
        "/spec/providers/0/keys/0/apiKey",
        json!("sk-ant-SECRET123"),
    );
    let e = refused_at(
        Kind::AIProviderPool,
        bad,
        "spec.providers[0].keys[0].apiKey",
    );
    assert!(e.message.contains("secretRef"), "{e}");
    let all = format!(
        "{:?}",
        errors(
            Kind::AIProviderPool,
            &with(
                pool(),
                "/spec/providers/0/keys/0/apiKey",
                json!("sk-ant-SECRET123")
            )
        )
    );
    assert!(
        !all.contains("SECRET123"),
        "the key leaked into the error: {all}"
    );
}

#[test]
fn duplicate_tier_names() {
    let bad = with(tiers(), "/spec/tiers/1/name", json!("enterprise"));
    let e = refused_at(Kind::TierQueue, bad, "spec.tiers");
    assert!(e.message.contains("unique"), "{e}");
}

#[test]
fn duplicate_provider_names() {
    let bad = with(pool(), "/spec/providers/1/name", json!("claude"));
    refused_at(Kind::AIProviderPool, bad, "spec.providers");
}

#[test]
fn fallback_names_an_unknown_provider() {
    let bad = with(pool(), "/spec/fallback", json!(["claude", "gpt4"]));
    refused_at(Kind::AIProviderPool, bad, "spec.fallback");
}

#[test]
fn optional_lists_may_be_left_out() {
    let ok = without(pool(), "/spec/fallback");
    assert_eq!(errors(Kind::AIProviderPool, &ok), vec![]);
    let ok = without(tiers(), "/spec/tiers/1/batch");
    let ok = with(ok, "/spec/tiers/1/class", json!("standard"));
    assert_eq!(errors(Kind::TierQueue, &ok), vec![]);
}

#[test]
fn zero_weight() {
    let bad = with(tiers(), "/spec/tiers/0/weight", json!(0));
    refused_at(Kind::TierQueue, bad, "spec.tiers[0].weight");
}

#[test]
fn batch_class_without_batch_settings() {
    let bad = without(tiers(), "/spec/tiers/1/batch");
    refused_at(Kind::TierQueue, bad, "spec.tiers[1].batch");
}

#[test]
fn batch_settings_on_a_priority_tier() {
    let bad = with(
        tiers(),
        "/spec/tiers/0/batch",
        json!({"size": 10, "intervalSeconds": 60}),
    );
    refused_at(Kind::TierQueue, bad, "spec.tiers[0].batch");
}

#[test]
fn hosted_provider_without_keys() {
    let bad = with(pool(), "/spec/providers/0/keys", json!([]));
    refused_at(Kind::AIProviderPool, bad, "spec.providers[0].keys");
    // Ollama needs none: the fixture's second provider has no keys and is accepted.
}

#[test]
fn the_same_secret_key_twice() {
    let key = json!({"secretRef": {"name": "claude-keys", "key": "key1"}, "rpm": 20});
    let bad = with(pool(), "/spec/providers/0/keys", json!([key.clone(), key]));
    let e = refused_at(Kind::AIProviderPool, bad, "spec.providers[0].keys");
    assert!(e.message.contains("different secret key"), "{e}");
}

#[test]
fn webhook_notification_without_webhook() {
    let bad = with(
        tiers(),
        "/spec/tiers/1/async",
        json!({"notify": ["webhook"]}),
    );
    refused_at(Kind::TierQueue, bad, "spec.tiers[1].async.webhook");
}

#[test]
fn provider_name_not_a_dns_label() {
    let bad = with(pool(), "/spec/providers/0/name", json!("Claude_Main"));
    refused_at(Kind::AIProviderPool, bad, "spec.providers[0].name");
}

#[test]
fn wrong_type() {
    let bad = with(pool(), "/spec/providers/0/keys/0/rpm", json!("twenty"));
    let e = refused_at(Kind::AIProviderPool, bad, "spec.providers[0].keys[0].rpm");
    assert!(e.message.contains("integer"), "{e}");
}

#[test]
fn no_providers() {
    let bad = with(pool(), "/spec/providers", json!([]));
    refused_at(Kind::AIProviderPool, bad, "spec.providers");
}

#[test]
fn unknown_enum_value_for_class() {
    let bad = with(tiers(), "/spec/tiers/0/class", json!("urgent"));
    refused_at(Kind::TierQueue, bad, "spec.tiers[0].class");
}

#[test]
fn missing_object_name() {
    let bad = without(pool(), "/metadata/name");
    refused_at(Kind::AIProviderPool, bad, "metadata.name");
}

#[test]
fn replicas_outside_the_autoscaling_range() {
    let bad = with(local_model(), "/spec/replicas", json!(50));
    refused_at(Kind::LocalModelDeployment, bad, "spec.replicas");
}

#[test]
fn every_error_is_reported_at_once() {
    let bad = with(pool(), "/spec/providers/0/keys/0/rpm", json!(0));
    let bad = with(bad, "/spec/providers/0/type", json!("cohere"));
    assert_eq!(errors(Kind::AIProviderPool, &bad).len(), 2);
}

#[test]
fn a_wait_target_past_the_wait_limit() {
    let bad = with(tiers(), "/spec/tiers/0/waitTargetMs", json!(1500));
    let e = refused_at(Kind::TierQueue, bad, "spec.tiers[0].waitTargetMs");
    assert!(e.message.contains("must not exceed maxWaitMs"), "{e}");
}

#[test]
fn class_headroom_defaults_and_bounds() {
    let tq: TierQueue = validate_object(Kind::TierQueue, &tiers()).unwrap();
    let h = &tq.spec.class_headroom;
    assert_eq!((h.priority, h.standard, h.batch), (0, 20, 50));
    assert_eq!(
        tq.spec.tiers[1]
            .batch
            .as_ref()
            .unwrap()
            .off_peak_utilization_percent,
        80
    );
    let bad = with(tiers(), "/spec/classHeadroom", json!({"batch": 100}));
    refused_at(Kind::TierQueue, bad, "spec.classHeadroom.batch");
}

#[test]
fn tenant_optional_fields_may_be_left_out() {
    let ok = without(tenant(), "/spec/tier");
    let ok = without(ok, "/spec/limits");
    let ok = without(ok, "/spec/models");
    assert_eq!(errors(Kind::Tenant, &ok), vec![]);
}

#[test]
fn tenant_without_keys() {
    let bad = with(tenant(), "/spec/keys", json!([]));
    refused_at(Kind::Tenant, bad, "spec.keys");
}

#[test]
fn tenant_key_names_must_be_unique() {
    let bad = with(tenant(), "/spec/keys/1/name", json!("main"));
    let e = refused_at(Kind::Tenant, bad, "spec.keys");
    assert!(e.message.contains("unique"), "{e}");
}

#[test]
fn tenant_the_same_secret_key_twice() {
    let bad = with(
        tenant(),
        "/spec/keys/1/secretRef",
        json!({"name": "acme-keys", "key": "main"}),
    );
    let e = refused_at(Kind::Tenant, bad, "spec.keys");
    assert!(e.message.contains("different secret key"), "{e}");
}

#[test]
fn tenant_inline_key_is_refused_without_echoing_it() {
    let bad = with(tenant(), "/spec/keys/0/key", json!("sk-live-SECRET456"));
    let errs = errors(Kind::Tenant, &bad);
    assert!(
        errs.iter().any(|e| e.field == "spec.keys[0].key"),
        "{errs:?}"
    );
    assert!(!format!("{errs:?}").contains("SECRET456"), "{errs:?}");
}

#[test]
fn tenant_zero_limits() {
    for field in ["rpm", "tpm", "concurrent"] {
        let bad = with(tenant(), &format!("/spec/limits/{field}"), json!(0));
        refused_at(Kind::Tenant, bad, &format!("spec.limits.{field}"));
    }
}

#[test]
fn tenant_tier_not_a_dns_label() {
    let bad = with(tenant(), "/spec/tier", json!("Gold Tier"));
    refused_at(Kind::Tenant, bad, "spec.tier");
}

#[test]
fn tenant_empty_or_duplicate_model() {
    let bad = with(tenant(), "/spec/models/1", json!(""));
    refused_at(Kind::Tenant, bad, "spec.models[1]");
    let bad = with(tenant(), "/spec/models/1", json!("smart"));
    refused_at(Kind::Tenant, bad, "spec.models");
}

#[test]
fn routing_rules_are_checked_naming_the_field() {
    let ok = validate_object::<crate::RoutingPolicy>(Kind::RoutingPolicy, &routing()).unwrap();
    // Defaults: the classifier's thresholds and the alert share.
    assert_eq!(ok.spec.classifier.simple_max_chars, 100);
    assert_eq!(ok.spec.budgets.alert_at, 0.8);
    let both = with(routing(), "/spec/rules/0/targets/0/pool", json!("premium"));
    refused_at(Kind::RoutingPolicy, both, "spec.rules[0].targets");
    let neither = with(
        routing(),
        "/spec/rules/1/targets/0",
        json!({"model": "smart"}),
    );
    refused_at(Kind::RoutingPolicy, neither, "spec.rules[1].targets");
    let twice = with(routing(), "/spec/rules/1/name", json!("free-simple"));
    refused_at(Kind::RoutingPolicy, twice, "spec.rules");
    let class = with(routing(), "/spec/rules/0/match/classes/0", json!("trivial"));
    refused_at(Kind::RoutingPolicy, class, "spec.rules[0].match.classes[0]");
    let negative = with(routing(), "/spec/budgets/tenants/0/monthlyUSD", json!(-1.0));
    refused_at(
        Kind::RoutingPolicy,
        negative,
        "spec.budgets.tenants[0].monthlyUSD",
    );
    let empty = with(routing(), "/spec/rules/1/targets", json!([]));
    refused_at(Kind::RoutingPolicy, empty, "spec.rules[1].targets");
}

#[test]
fn a_local_model_reference_excludes_a_base_url_and_needs_a_self_hosted_type() {
    let local = with(pool(), "/spec/providers/1/localModel", json!("llama"));
    assert_eq!(errors(Kind::AIProviderPool, &local), vec![]);
    let with_url = with(
        local.clone(),
        "/spec/providers/1/baseUrl",
        json!("http://x:1"),
    );
    refused_at(
        Kind::AIProviderPool,
        with_url,
        "spec.providers[1].localModel",
    );
    let hosted = with(pool(), "/spec/providers/0/localModel", json!("llama"));
    refused_at(Kind::AIProviderPool, hosted, "spec.providers[0].localModel");
}
