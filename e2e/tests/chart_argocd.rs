//! The Argo CD health check of the Floodgate resources (charts/floodgate/files/argocd-health.lua)
//! run by a real Lua 5.4 (Debian's, unpacked into the cache by e2e/lua.sh) on the status the
//! operator's own code computes: a pool missing a key is Degraded and says which, a complete
//! one Healthy, a model rolling out Progressing, a routing policy naming a missing pool
//! Degraded and Healthy once it exists, a resource the operator has not seen yet (or not at
//! its generation) Progressing.

// Helpers below unwrap freely: clippy allows that in `cfg(test)` code only.
#![cfg(test)]

use floodgate_crds::{AIProviderPoolSpec, LocalModelDeployment};
use floodgate_operator::secrets::SecretIndex;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `value` as a Lua table constructor.
fn lua(value: &Value) -> String {
    match value {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Array(items) => format!(
            "{{{}}}",
            items.iter().map(lua).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(fields) => format!(
            "{{{}}}",
            fields
                .iter()
                .map(|(k, v)| format!("[{k:?}] = {}", lua(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Argo CD's verdict on `obj`: (status, message).
fn health(obj: &Value) -> (String, String) {
    let interpreter = Command::new("bash")
        .arg(root().join("e2e/lua.sh"))
        .output()
        .unwrap();
    assert!(
        interpreter.status.success(),
        "{}",
        String::from_utf8_lossy(&interpreter.stderr)
    );
    let interpreter = String::from_utf8(interpreter.stdout).unwrap();
    let check =
        std::fs::read_to_string(root().join("charts/floodgate/files/argocd-health.lua")).unwrap();
    let program = format!(
        "obj = {}\nlocal function check()\n{check}\nend\nlocal hs = check()\nio.write(hs.status, '\\n', hs.message or '')\n",
        lua(obj)
    );
    let out = Command::new(interpreter.trim())
        .args(["-e", &program])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (status, message) = text.split_once('\n').unwrap();
    (status.to_owned(), message.to_owned())
}

fn pool_spec() -> AIProviderPoolSpec {
    serde_json::from_value(json!({"providers": [{"name": "claude", "type": "anthropic",
        "models": [{"name": "claude-sonnet-4"}],
        "keys": [{"name": "claude-1", "secretRef": {"name": "claude-keys", "key": "key1"}, "rpm": 20},
                 {"name": "claude-2", "secretRef": {"name": "claude-keys", "key": "key2"}, "rpm": 20}]}]}))
    .unwrap()
}

fn object(generation: i64, status: impl serde::Serialize) -> Value {
    json!({"metadata": {"name": "x", "generation": generation}, "status": status})
}

#[test]
fn a_pool_missing_a_key_is_degraded_and_a_complete_one_healthy() {
    let mut one_key = SecretIndex::default();
    one_key.insert("claude-keys", ["key1".to_owned()]);
    let status = floodgate_operator::pool::compute_status(
        &pool_spec(),
        Some(2),
        None,
        &one_key,
        &floodgate_operator::pool::Live::Unconfigured,
        "2026-11-30T00:00:00Z",
    );
    let (verdict, message) = health(&object(2, &status));
    assert_eq!(verdict, "Degraded");
    assert!(
        message.contains(r#"Secret "claude-keys" has no key "key2""#),
        "{message}"
    );

    let mut both = SecretIndex::default();
    both.insert("claude-keys", ["key1".to_owned(), "key2".to_owned()]);
    let status = floodgate_operator::pool::compute_status(
        &pool_spec(),
        Some(2),
        Some(&status),
        &both,
        &floodgate_operator::pool::Live::Unconfigured,
        "2026-11-30T00:01:00Z",
    );
    assert_eq!(health(&object(2, &status)).0, "Healthy");
    // Changed since: the operator has not looked at generation 3 yet.
    let (verdict, message) = health(&object(3, &status));
    assert_eq!(
        (verdict.as_str(), message.as_str()),
        (
            "Progressing",
            "Waiting for the operator to observe generation 3"
        )
    );
    let (verdict, _) = health(&json!({"metadata": {"name": "x", "generation": 1}}));
    assert_eq!(verdict, "Progressing");
}

#[test]
fn a_model_rolling_out_is_progressing_and_one_without_its_claim_degraded() {
    let lmd: LocalModelDeployment = serde_json::from_value(json!({
        "apiVersion": "floodgate.dev/v1alpha1", "kind": "LocalModelDeployment",
        "metadata": {"name": "llama", "namespace": "models", "generation": 4},
        "spec": {"model": "llama3.1:8b", "classes": ["simple"], "replicas": 2}
    }))
    .unwrap();
    let deployment = |ready: i32| -> k8s_openapi::api::apps::v1::Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "llama", "generation": 1},
            "spec": {"replicas": 2, "selector": {}, "template": {}},
            "status": {"observedGeneration": 1, "replicas": 2, "readyReplicas": ready,
                       "updatedReplicas": 2, "availableReplicas": ready}
        }))
        .unwrap()
    };
    let now = "2026-11-30T00:00:00Z";
    let rolling =
        floodgate_operator::local_model::compute_status(&lmd, None, &deployment(1), None, now);
    assert_eq!(health(&object(4, &rolling)).0, "Progressing");
    let done = floodgate_operator::local_model::compute_status(
        &lmd,
        Some(&rolling),
        &deployment(2),
        None,
        now,
    );
    let (verdict, message) = health(&object(4, &done));
    assert_eq!(verdict, "Healthy");
    assert!(message.starts_with("2/2 replicas ready"), "{message}");
    let refused = floodgate_operator::local_model::refused_status(
        &lmd,
        Some(&done),
        "ApplyFailed",
        "Deployment refused".into(),
        now,
    );
    assert_eq!(
        health(&object(4, &refused)),
        ("Degraded".to_owned(), "Deployment refused".to_owned())
    );
}

#[test]
fn a_routing_policy_naming_a_missing_pool_is_degraded_until_it_exists() {
    use floodgate_operator::routing_policy::{TargetKind, compute_status};
    let spec: floodgate_crds::RoutingPolicySpec = serde_json::from_value(json!({
        "rules": [{"name": "local-first", "match": {"classes": ["simple"]},
                   "targets": [{"pool": "premium"}]}]
    }))
    .unwrap();
    let none = std::collections::BTreeSet::new();
    let missing = compute_status(&spec, Some(1), None, &none, "2026-11-30T00:00:00Z");
    let (verdict, message) = health(&object(1, &missing));
    assert_eq!(verdict, "Degraded");
    assert!(message.contains(r#""premium" not found"#), "{message}");
    let found = std::collections::BTreeSet::from([(TargetKind::Pool, "premium".to_owned())]);
    let ready = compute_status(
        &spec,
        Some(1),
        Some(&missing),
        &found,
        "2026-11-30T00:01:00Z",
    );
    assert_eq!(health(&object(1, &ready)).0, "Healthy");
}
