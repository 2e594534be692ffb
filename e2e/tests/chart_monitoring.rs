//! The chart's monitoring: the alerts pass `promtool test rules` (promtool from Debian's
//! `prometheus` package, unpacked into the cache by e2e/promtool.sh), the PrometheusRule the
//! chart renders carries exactly those rules, and every metric the alerts and the Grafana
//! dashboard query is one the gateway exports.

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

#[test]
fn alerts_and_dashboard_query_metrics_the_gateway_exports() {
    let exported = [
        "proxy/src/metrics.rs",
        "proxy/src/cache/metrics.rs",
        "proxy/src/routing/metrics.rs",
    ]
    .iter()
    .map(|f| std::fs::read_to_string(root().join(f)).unwrap())
    .collect::<String>();
    let objects = rendered();
    let dashboard = objects
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && o["data"]["floodgate.json"].is_string())
        .unwrap();
    let dashboard: Value =
        serde_json::from_str(dashboard["data"]["floodgate.json"].as_str().unwrap()).unwrap();
    let mut exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .map(|t| t["expr"].as_str().unwrap().to_owned())
        .collect();
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
    // The cost panel shows cost per tenant (the routing stage's metric, which has the
    // tenant), as the issue asks, not the per-model counter that has none.
    assert!(
        exprs
            .iter()
            .any(|e| e.contains("by (tenant)") && e.contains("floodgate_request_cost_usd_total")),
        "no cost-by-tenant query: {exprs:?}"
    );
    // The cost panel shows cost per tenant (the routing stage's metric, which has the
    // tenant), as the issue asks, not the per-model counter that has none.
    assert!(
        exprs
            .iter()
            .any(|e| e.contains("by (tenant)") && e.contains("floodgate_request_cost_usd_total")),
        "no cost-by-tenant query: {exprs:?}"
    );
    let rule = objects
        .iter()
        .find(|o| o["kind"] == "PrometheusRule")
        .unwrap();
    exprs.extend(
        rule["spec"]["groups"][0]["rules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["expr"].as_str().unwrap().to_owned()),
    );
    let mut checked = 0;
    for name in exprs.iter().flat_map(|e| metrics_of(e)) {
        assert!(
            exported.contains(&format!("\"{name}\"")),
            "{name} is not a metric the gateway registers (proxy/src/metrics.rs, cache/metrics.rs, routing/metrics.rs)"
        );
        checked += 1;
    }
    assert!(checked >= 8, "{checked}");
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
