//! Bad manifests are refused by the API server with a message naming the field, and our own
//! `floodgate_crds::validate::validate_object` refuses each of them naming the same field: one
//! implementation of the rules (the generated schema and its CEL rules), agreeing with the
//! server that enforces it.

// Helpers below unwrap freely: clippy allows that in `cfg(test)` code only.
#![cfg(test)]

use floodgate_crds::validate::{FieldError, validate_object};
use floodgate_crds::{AIProviderPool, CachePolicy, Kind, LocalModelDeployment, Tenant, TierQueue};
use floodgate_e2e::cluster::Cluster;
use serde_json::{Value, json};

fn pool() -> Value {
    json!({
        "apiVersion": "floodgate.dev/v1alpha1",
        "kind": "AIProviderPool",
        "metadata": {"name": "pool"},
        "spec": {
            "providers": [
                {"name": "claude", "type": "anthropic",
                 "models": [{"name": "claude-sonnet-4", "alias": "smart"}],
                 "keys": [{"secretRef": {"name": "claude-keys", "key": "key1"}, "rpm": 20},
                          {"secretRef": {"name": "claude-keys", "key": "key2"}, "rpm": 20}]},
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
        "spec": {"defaultTier": "free", "tiers": [
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
                 "limits": {"rpm": 600, "concurrent": 20},
                 "models": ["smart"]}
    })
}

/// `value` with `pointer` set to `new` (the parent must exist).
fn with(mut value: Value, pointer: &str, new: Value) -> Value {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    match value.pointer_mut(parent).unwrap() {
        Value::Object(map) => {
            map.insert(key.to_owned(), new);
        }
        Value::Array(items) => items[key.parse::<usize>().unwrap()] = new,
        other => panic!("{pointer}: parent is {other}"),
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

/// One bad manifest and the field both the server and our validation must name.
struct Case {
    what: &'static str,
    manifest: Value,
    field: &'static str,
    /// The field is checked by a CEL rule: the server then prints our rule's message verbatim.
    cel: bool,
}

fn case(what: &'static str, manifest: Value, field: &'static str) -> Case {
    Case {
        what,
        manifest,
        field,
        cel: false,
    }
}

fn cel(what: &'static str, manifest: Value, field: &'static str) -> Case {
    Case {
        what,
        manifest,
        field,
        cel: true,
    }
}

fn cases() -> Vec<Case> {
    let key0 = "/spec/providers/0/keys/0";
    vec![
        case(
            "negative rpm",
            with(pool(), &format!("{key0}/rpm"), json!(-5)),
            "spec.providers[0].keys[0].rpm",
        ),
        case(
            "zero rpm",
            with(pool(), &format!("{key0}/rpm"), json!(0)),
            "spec.providers[0].keys[0].rpm",
        ),
        case(
            "threshold 1.5",
            with(cache(), "/spec/semantic/threshold", json!(1.5)),
            "spec.semantic.threshold",
        ),
        cel(
            "minReplicas > maxReplicas",
            with(local_model(), "/spec/autoscaling/minReplicas", json!(30)),
            "spec.autoscaling.minReplicas",
        ),
        case(
            "unknown provider type",
            with(pool(), "/spec/providers/0/type", json!("bedrock")),
            "spec.providers[0].type",
        ),
        cel(
            "duplicate tier names",
            with(tiers(), "/spec/tiers/1/name", json!("enterprise")),
            "spec.tiers",
        ),
        cel(
            "fallback names an unknown provider",
            with(pool(), "/spec/fallback/1", json!("gpt4")),
            "spec.fallback",
        ),
        case(
            "inline apiKey",
            with(
                pool(),
                &format!("{key0}/apiKey"),
                json!("sk-live-do-not-echo"),
            ),
            "spec.providers[0].keys[0].apiKey",
        ),
        case(
            "missing secretRef",
            without(pool(), &format!("{key0}/secretRef")),
            "spec.providers[0].keys[0].secretRef",
        ),
        cel(
            "duplicate provider names",
            with(pool(), "/spec/providers/1/name", json!("claude")),
            "spec.providers",
        ),
        cel(
            "the same secret key twice",
            with(
                pool(),
                "/spec/providers/0/keys/1/secretRef/key",
                json!("key1"),
            ),
            "spec.providers[0].keys",
        ),
        cel(
            "anthropic without keys",
            with(pool(), "/spec/providers/0/keys", json!([])),
            "spec.providers[0].keys",
        ),
        case(
            "provider name not a DNS label",
            with(pool(), "/spec/providers/0/name", json!("Claude_1")),
            "spec.providers[0].name",
        ),
        case(
            "tier weight 0",
            with(tiers(), "/spec/tiers/0/weight", json!(0)),
            "spec.tiers[0].weight",
        ),
        case(
            "unknown queue class",
            with(tiers(), "/spec/tiers/0/class", json!("urgent")),
            "spec.tiers[0].class",
        ),
        cel(
            "batch class without batch settings",
            without(tiers(), "/spec/tiers/1/batch"),
            "spec.tiers[1].batch",
        ),
        cel(
            "defaultTier names no tier",
            with(tiers(), "/spec/defaultTier", json!("gold")),
            "spec.defaultTier",
        ),
        case(
            "negative maxReplicas",
            with(local_model(), "/spec/autoscaling/maxReplicas", json!(-1)),
            "spec.autoscaling.maxReplicas",
        ),
        case(
            "tenant without keys",
            with(tenant(), "/spec/keys", json!([])),
            "spec.keys",
        ),
        cel(
            "tenant key names repeated",
            with(tenant(), "/spec/keys/1/name", json!("main")),
            "spec.keys",
        ),
        case(
            "tenant rpm limit 0",
            with(tenant(), "/spec/limits/rpm", json!(0)),
            "spec.limits.rpm",
        ),
        case(
            "tenant inline client key",
            with(tenant(), "/spec/keys/0/key", json!("sk-live-do-not-echo")),
            "spec.keys[0].key",
        ),
    ]
}

fn ours(manifest: &Value) -> Result<(), Vec<FieldError>> {
    let kind = manifest["kind"].as_str().and_then(Kind::parse).unwrap();
    match kind {
        Kind::AIProviderPool => validate_object::<AIProviderPool>(kind, manifest).map(drop),
        Kind::TierQueue => validate_object::<TierQueue>(kind, manifest).map(drop),
        Kind::CachePolicy => validate_object::<CachePolicy>(kind, manifest).map(drop),
        Kind::LocalModelDeployment => {
            validate_object::<LocalModelDeployment>(kind, manifest).map(drop)
        }
        Kind::Tenant => validate_object::<Tenant>(kind, manifest).map(drop),
        Kind::RoutingPolicy => {
            validate_object::<floodgate_crds::RoutingPolicy>(kind, manifest).map(drop)
        }
    }
}

#[tokio::test]
#[ignore = "needs a Kubernetes API server: `make e2e` (see e2e/src/cluster.rs)"]
async fn bad_manifests_are_refused_by_the_api_server_and_by_our_validation_naming_the_same_field() {
    let cluster = Cluster::get().await.unwrap();
    cluster.install_crds().await.unwrap();
    let ns = cluster.namespace("validation").await.unwrap();

    // Control: the good manifests the cases start from are accepted by both, so each refusal
    // below is the mutation's doing.
    for good in [pool(), tiers(), cache(), local_model(), tenant()] {
        assert_eq!(ours(&good), Ok(()), "{good}");
        let out = cluster
            .kubectl_stdin(["apply", "-n", ns.name(), "-f", "-"], &good.to_string())
            .await
            .unwrap();
        assert!(
            out.success(),
            "the server refused a good manifest: {}\n{good}",
            out.stderr
        );
    }

    let mut failures = Vec::new();
    let cases = cases();
    for (i, case) in cases.iter().enumerate() {
        let manifest = with(
            case.manifest.clone(),
            "/metadata/name",
            json!(format!("bad-{i}")),
        );
        let server = cluster
            .kubectl_stdin(["apply", "-n", ns.name(), "-f", "-"], &manifest.to_string())
            .await
            .unwrap();
        let mut problems = Vec::new();
        if server.success() {
            problems.push(format!(
                "the API server accepted it: {}",
                server.stdout.trim()
            ));
        } else if !server.stderr.contains(case.field) {
            problems.push(format!(
                "the API server's message does not name {}: {}",
                case.field,
                server.stderr.trim()
            ));
        }
        match ours(&manifest) {
            Ok(()) => problems.push("validate_object accepted it".to_owned()),
            Err(errors) => match errors.iter().find(|e| e.field == case.field) {
                None => problems.push(format!(
                    "validate_object does not name {}: {errors:?}",
                    case.field
                )),
                Some(e) if case.cel && !server.stderr.contains(&e.message) => {
                    problems.push(format!(
                        "the CEL message differs: ours {:?}, the server's {}",
                        e.message,
                        server.stderr.trim()
                    ))
                }
                Some(_) => {}
            },
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{} ({}):\n    {}",
                case.what,
                case.field,
                problems.join("\n    ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases disagree:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );

    // Nothing bad was stored.
    let out = cluster
        .kubectl([
            "get",
            "aiproviderpools,tierqueues,cachepolicies,localmodeldeployments,tenants",
            "-n",
            ns.name(),
            "-o",
            "name",
        ])
        .await
        .unwrap()
        .ok()
        .unwrap();
    assert!(!out.stdout.contains("/bad-"), "{}", out.stdout);
}
