//! The chart's sidecar webhook, rendered by `helm template`: pods opt in by label (an
//! objectSelector, so that other pods cost no admission call), and the sidecar's port is not
//! one applications commonly use.

// Helpers below unwrap freely: clippy allows that in `cfg(test)` code only.
#![cfg(test)]

use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;

fn cache() -> PathBuf {
    std::env::var_os("FLOODGATE_CACHE").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/floodgate"),
        PathBuf::from,
    )
}

/// The chart rendered with the webhook on and `sets`, as JSON values.
fn rendered(sets: &[&str]) -> Vec<Value> {
    let home = tempfile::tempdir().unwrap();
    let mut helm = Command::new(cache().join("bin/helm"));
    for var in ["HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"] {
        helm.env(var, home.path());
    }
    helm.args(["template", "fg"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/floodgate"))
        .args(["--set", "webhook.enabled=true"]);
    for s in sets {
        helm.args(["--set", s]);
    }
    let out = helm.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split("\n---")
        .filter_map(|doc| serde_saphyr::from_str::<Option<Value>>(doc).unwrap())
        .collect()
}

fn webhooks(docs: &[Value]) -> Vec<Value> {
    let config = docs
        .iter()
        .find(|d| d["kind"] == "MutatingWebhookConfiguration")
        .unwrap();
    config["webhooks"].as_array().unwrap().clone()
}

fn object_selector(docs: &[Value]) -> Value {
    webhooks(docs)[0]["objectSelector"].clone()
}

#[test]
fn pods_opt_in_by_label_unless_the_chart_is_told_otherwise() {
    let selector = object_selector(&rendered(&[]));
    assert_eq!(
        selector["matchLabels"],
        json!({"floodgate.dev/inject": "true"})
    );
    // The release's own pods stay out either way.
    let own = json!([{"key": "app.kubernetes.io/instance", "operator": "NotIn", "values": ["fg"]}]);
    assert_eq!(selector["matchExpressions"], own);

    let every_pod = object_selector(&rendered(&["webhook.optInLabel=false"]));
    assert_eq!(every_pod.get("matchLabels"), None);
    assert_eq!(every_pod["matchExpressions"], own);
}

#[test]
fn the_sidecar_port_is_not_8080_by_default() {
    let docs = rendered(&[]);
    let operator = docs
        .iter()
        .find(|d| {
            d["kind"] == "Deployment"
                && d["metadata"]["name"].as_str().unwrap().contains("operator")
        })
        .unwrap();
    let args: Vec<&str> = operator["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let at = args.iter().position(|a| *a == "--sidecar-port").unwrap();
    assert_eq!(args[at + 1], "14080");
}

#[test]
fn namespaces_opt_in_by_label_through_an_entry_of_their_own() {
    let docs = rendered(&[]);
    let entries = webhooks(&docs);
    assert_eq!(entries.len(), 2);
    let (pods, namespaces) = (&entries[0], &entries[1]);
    // The per-pod entry leaves opted-in namespaces to the other: one call per pod.
    let excluded =
        json!({"key": "floodgate.dev/inject", "operator": "NotIn", "values": ["enabled"]});
    assert!(
        pods["namespaceSelector"]["matchExpressions"]
            .as_array()
            .unwrap()
            .contains(&excluded),
        "{pods}"
    );
    assert_eq!(
        namespaces["clientConfig"]["service"]["path"],
        "/mutate/namespace"
    );
    assert_eq!(
        namespaces["namespaceSelector"],
        json!({"matchLabels": {"floodgate.dev/inject": "enabled"}})
    );
    assert_eq!(
        namespaces["objectSelector"]["matchExpressions"][0],
        json!({"key": "floodgate.dev/inject", "operator": "NotIn", "values": ["false"]})
    );

    let off = rendered(&["webhook.namespaceOptIn=false"]);
    assert_eq!(webhooks(&off).len(), 1);
}
