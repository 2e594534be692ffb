//! The chart's monitoring: the alerts pass `promtool test rules` (promtool from Debian's
//! `prometheus` package, unpacked into the cache by e2e/promtool.sh), the PrometheusRule the
//! chart renders carries exactly those rules, and every metric the alerts and the Grafana
//! dashboard query is one the gateway exports, with the labels they group and match by, as a
//! gateway serving local, premium, cached and tiered traffic exposes them on `/metrics`.

// Helpers below unwrap freely: clippy allows that in `cfg(test)` code only.
#![cfg(test)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn cache() -> PathBuf {
    std::env::var_os("FLOODGATE_CACHE").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/floodgate"),
        PathBuf::from,
    )
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The chart rendered with every monitoring object on, as JSON values.
fn rendered() -> Vec<Value> {
    let home = tempfile::tempdir().unwrap();
    let mut helm = Command::new(cache().join("bin/helm"));
    for var in ["HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"] {
        helm.env(var, home.path());
    }
    let text = run(helm
        .args(["template", "fg"])
        .arg(root().join("charts/floodgate"))
        .args(["--set", "monitoring.serviceMonitor.enabled=true"])
        .args(["--set", "monitoring.prometheusRule.enabled=true"])
        .args(["--set", "monitoring.dashboard.enabled=true"]));
    text.split("\n---")
        .filter_map(|doc| serde_saphyr::from_str::<Option<Value>>(doc).unwrap())
        .collect()
}

#[test]
fn the_alerts_pass_promtool_and_the_chart_renders_them_unchanged() {
    let promtool = run(Command::new("bash").arg(root().join("e2e/promtool.sh")));
    let promtool = promtool.trim();
    let chart = root().join("charts/floodgate");
    run(Command::new(promtool)
        .args(["check", "rules"])
        .arg(chart.join("files/prometheus-rules.yaml")));
    run(Command::new(promtool)
        .args(["test", "rules"])
        .arg(chart.join("tests/alerts_test.yaml")));

    let objects = rendered();
    let rule = objects
        .iter()
        .find(|o| o["kind"] == "PrometheusRule")
        .unwrap();
    let file: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(chart.join("files/prometheus-rules.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(rule["spec"]["groups"], file["groups"]);
    let alerts: Vec<&str> = file["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["alert"].as_str().unwrap())
        .collect();
    assert_eq!(
        alerts,
        [
            "FloodgateQueueDepthHigh",
            "FloodgateKeyBudgetHigh",
            "FloodgateCacheHitRatioLow",
            "FloodgateLocalModelSlow",
            "FloodgateCostBudgetAlert"
        ]
    );
    let monitor = objects
        .iter()
        .find(|o| o["kind"] == "ServiceMonitor")
        .unwrap();
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "admin");
}

/// The metric names an expression uses (`floodgate_*` and `gen_ai_*`), without the suffixes
/// Prometheus adds to counters and histograms.
fn metrics_of(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find(|c: char| c.is_ascii_lowercase()) {
        rest = &rest[at..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let word = &rest[..end];
        if word.starts_with("floodgate_") || word.starts_with("gen_ai_client") {
            let base = ["_total", "_bucket"]
                .iter()
                .find_map(|s| word.strip_suffix(s))
                .unwrap_or(word);
            names.push(base.to_owned());
        }
        rest = &rest[end..];
    }
    names
}

/// `helm template` of the chart with `sets`; its stderr when it refuses.
fn refused(sets: &[&str]) -> String {
    let home = tempfile::tempdir().unwrap();
    let mut helm = Command::new(cache().join("bin/helm"));
    for var in ["HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"] {
        helm.env(var, home.path());
    }
    helm.args(["template", "fg"])
        .arg(root().join("charts/floodgate"));
    for s in sets {
        helm.args(["--set", s]);
    }
    let out = helm.output().unwrap();
    assert!(!out.status.success(), "rendered with {sets:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn values_schema_refuses_typos_and_bad_values_naming_them() {
    let typo = refused(&["gateway.replicaz=2"]);
    assert!(
        typo.contains("/gateway") && typo.contains("replicaz"),
        "{typo}"
    );
    let policy = refused(&["webhook.failurePolicy=Sometimes"]);
    assert!(policy.contains("/webhook/failurePolicy"), "{policy}");
    let port = refused(&["webhook.sidecar.port=70000"]);
    assert!(port.contains("/webhook/sidecar/port"), "{port}");
}

/// Each metric an expression queries (as [`metrics_of`]) with the labels it groups by
/// (`by (...)`, `le` left out: Prometheus' own for histograms) or matches on (`{label...}`).
fn labels_of(expr: &str) -> Vec<(String, Vec<String>)> {
    let words = |list: &str| -> Vec<String> {
        list.split(',')
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty() && l != "le")
            .collect()
    };
    let mut grouped = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("by (") {
        rest = &rest[at + 4..];
        let end = rest.find(')').unwrap();
        grouped.extend(words(&rest[..end]));
    }
    metrics_of(expr)
        .into_iter()
        .map(|name| {
            let mut labels = grouped.clone();
            let mut rest = expr;
            while let Some(at) = rest.find(name.as_str()) {
                rest = &rest[at + name.len()..];
                let rest = rest.trim_start_matches(|c: char| c.is_ascii_alphanumeric() || c == '_');
                if let Some(matchers) = rest.strip_prefix('{') {
                    let end = matchers.find('}').unwrap();
                    labels.extend(
                        matchers[..end]
                            .split(',')
                            .map(|m| m.split(['=', '!', '~']).next().unwrap().trim().to_owned()),
                    );
                }
            }
            labels.sort();
            labels.dedup();
            (name, labels)
        })
        .collect()
}

/// What a `/metrics` exposition declares: each family's name (its `# TYPE` line), and the label
/// names its series carry.
fn families(text: &str) -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
    let mut families =
        std::collections::BTreeMap::<String, std::collections::BTreeSet<String>>::new();
    for line in text.lines() {
        if let Some(declared) = line.strip_prefix("# TYPE ") {
            let name = declared.split_whitespace().next().unwrap();
            families.entry(name.to_owned()).or_default();
        }
    }
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, labels)) = line.split_once('{') else {
            continue;
        };
        let family = families
            .keys()
            .filter(|f| series.starts_with(f.as_str()))
            .max_by_key(|f| f.len())
            .cloned();
        if let Some(family) = family {
            let labels = labels.rsplit_once('}').unwrap().0;
            // Label values here are configured names (no `",` inside).
            let names = labels
                .split("\",")
                .filter_map(|kv| kv.split_once('=').map(|(k, _)| k.trim().to_owned()));
            families.get_mut(&family).unwrap().extend(names);
        }
    }
    families
}

/// The gateway behind a real `/metrics`: a local model, a priced premium pool, a tier, a
/// tenant, a routing policy and an exact cache.
fn traffic_manifests(base: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Secret
metadata: {{name: keys}}
stringData: {{a: key-a, acme: client-acme}}
---
apiVersion: floodgate.dev/v1alpha1
kind: LocalModelDeployment
metadata:
  name: llama
  annotations: {{floodgate.dev/endpoint: "{base}"}}
spec: {{model: "llama3.1:8b", classes: [simple], replicas: 1}}
---
apiVersion: floodgate.dev/v1alpha1
kind: AIProviderPool
metadata: {{name: local}}
spec:
  providers:
  - {{name: llama, type: ollama, localModel: llama, models: [{{name: "llama3.1:8b"}}]}}
---
apiVersion: floodgate.dev/v1alpha1
kind: AIProviderPool
metadata: {{name: premium}}
spec:
  providers:
  - name: openai
    type: openai
    baseUrl: "{base}"
    models: [{{name: gpt-4o, alias: smart, inputPer1M: 2.5, outputPer1M: 10}}]
    keys: [{{name: main, secretRef: {{name: keys, key: a}}, rpm: 1000}}]
---
apiVersion: floodgate.dev/v1alpha1
kind: TierQueue
metadata: {{name: tiers}}
spec:
  defaultTier: pro
  tiers: [{{name: pro, class: standard, maxWaitMs: 10000}}]
---
apiVersion: floodgate.dev/v1alpha1
kind: Tenant
metadata: {{name: acme}}
spec:
  tier: pro
  keys: [{{name: main, secretRef: {{name: keys, key: acme}}}}]
---
apiVersion: floodgate.dev/v1alpha1
kind: RoutingPolicy
metadata: {{name: routes}}
spec:
  premiumPool: premium
  rules:
  - name: simple-local
    match: {{classes: [simple]}}
    targets: [{{localModel: llama}}, {{pool: premium, model: smart}}]
  # A budget, so that the budget gauges the cost alert reads have series.
  budgets:
    alertAt: 0.8
    tenants: [{{name: acme, monthlyUSD: 100}}]
---
apiVersion: floodgate.dev/v1alpha1
kind: CachePolicy
metadata: {{name: cache}}
spec:
  exact: {{ttlSeconds: 3600}}
"#
    )
}

/// Every metric the alerts and the dashboard query is on a serving gateway's `/metrics`, with
/// every label they group or match by on its series (a renamed label, not just a renamed
/// metric, fails here).
#[tokio::test]
async fn alerts_and_dashboard_query_metrics_and_labels_the_gateway_exposes() {
    use floodgate_e2e::gateway::Gateway;
    use floodgate_e2e::mock::{MockConfig, MockProviders};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let gw = Gateway::start(
        &traffic_manifests(&mock.base_url()),
        std::time::Duration::from_secs(60),
        std::time::Duration::from_secs(10),
    )
    .await
    .unwrap();
    let http = reqwest::Client::new();
    let chat = async |model: &str, text: &str| {
        let response = http
            .post(format!("{}/v1/chat/completions", gw.url()))
            .bearer_auth("client-acme")
            .json(&serde_json::json!({"model": model, "messages": [{"role": "user", "content": text}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            200,
            "{model}: {}",
            response.text().await.unwrap()
        );
    };
    // A simple prompt to the local model, twice (the second from the cache), and a priced
    // premium call.
    chat("smart", "hi").await;
    chat("smart", "hi").await;
    chat(
        "smart",
        "Write a detailed, step by step analysis of the trade-offs between three database designs \
         for a multi-tenant billing system, with code.",
    )
    .await;
    let text = http
        .get(format!("{}/metrics", gw.admin_url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let exposed = families(&text);

    let objects = rendered();
    let dashboard = objects
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && o["data"]["floodgate.json"].is_string())
        .unwrap();
    let dashboard: Value =
        serde_json::from_str(dashboard["data"]["floodgate.json"].as_str().unwrap()).unwrap();
    let rule = objects
        .iter()
        .find(|o| o["kind"] == "PrometheusRule")
        .unwrap();
    let titles: Vec<&str> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for wanted in [
        "Requests",
        "Queue wait",
        "Budget use per key",
        "Cache hit",
        "Cost",
    ] {
        assert!(
            titles.iter().any(|t| t.starts_with(wanted)),
            "no {wanted} panel: {titles:?}"
        );
    }
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .map(|t| t["expr"].as_str().unwrap().to_owned())
        .chain(
            rule["spec"]["groups"][0]["rules"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["expr"].as_str().unwrap().to_owned()),
        )
        .collect();
    // The cost panel shows cost per tenant (the routing stage's metric, which has the
    // tenant), as the issue asks, not the per-model counter that has none.
    assert!(
        exprs
            .iter()
            .any(|e| e.contains("by (tenant)") && e.contains("floodgate_request_cost_usd_total")),
        "no cost-by-tenant query: {exprs:?}"
    );
    let mut checked = Vec::new();
    for (metric, labels) in exprs.iter().flat_map(|e| labels_of(e)) {
        let Some(carried) = exposed.get(&metric) else {
            panic!("{metric} is not on the gateway's /metrics:\n{text}");
        };
        for label in &labels {
            assert!(
                carried.contains(label),
                "{metric} is queried by {label:?}, but its series carry {carried:?}"
            );
        }
        checked.push((metric, labels));
    }
    assert!(checked.len() >= 8, "{checked:?}");
    // The labels the alerts' annotations name ($labels.pool, .provider, .key, .local_model)
    // are among those checked.
    for (metric, label) in [
        ("floodgate_key_budget_utilization", "key"),
        ("floodgate_local_model_duration_seconds", "local_model"),
        ("floodgate_request_cost_usd", "tenant"),
        ("floodgate_queue_wait_seconds", "tier"),
    ] {
        assert!(
            checked
                .iter()
                .any(|(m, ls)| m == metric && ls.iter().any(|l| l == label)),
            "{metric} by {label} not checked: {checked:?}"
        );
    }
}
