//! The chart's sidecar webhook, rendered by `helm template`: pods opt in by label (an
//! objectSelector, so that other pods cost no admission call), the sidecar's port is not
//! one applications commonly use, and cert-manager's Certificate, Issuer and CA injection fit
//! the webhook; and the gateway's HPA mode.

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

/// `helm template` of the chart as release `fg` with `sets`, helm's state in a fresh folder.
fn template(sets: &[&str]) -> std::process::Output {
    let home = tempfile::tempdir().unwrap();
    let mut helm = Command::new(cache().join("bin/helm"));
    for var in ["HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"] {
        helm.env(var, home.path());
    }
    helm.args(["template", "fg"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/floodgate"));
    for s in sets {
        helm.args(["--set", s]);
    }
    helm.output().unwrap()
}

/// The chart rendered with the webhook on and `sets`, as JSON values.
fn rendered(sets: &[&str]) -> Vec<Value> {
    let out = template(&[&["webhook.enabled=true"], sets].concat());
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

/// The one object of `kind` named `name`.
fn named<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}: {docs:#?}"))
}

/// With cert-manager the certificate comes from a Certificate whose Secret the operator mounts
/// and reads, for the names the API server calls, and cert-manager's CA injector (not the
/// operator) fills the caBundle.
#[test]
fn with_cert_manager_a_certificate_serves_the_webhook_and_the_ca_injector_fills_its_bundle() {
    let docs = rendered(&["webhook.certManager.enabled=true"]);
    let issuer = named(&docs, "Issuer", "fg-floodgate-operator-webhook");
    assert_eq!(issuer["apiVersion"], "cert-manager.io/v1");
    assert_eq!(issuer["spec"], json!({"selfSigned": {}}));
    let cert = named(&docs, "Certificate", "fg-floodgate-operator-webhook");
    assert_eq!(cert["apiVersion"], "cert-manager.io/v1");
    assert_eq!(
        cert["spec"]["issuerRef"],
        json!({"kind": "Issuer", "name": "fg-floodgate-operator-webhook"})
    );
    // The names the API server calls: the webhook entries' Service.
    let config = named(
        &docs,
        "MutatingWebhookConfiguration",
        "fg-floodgate-sidecar-injector",
    );
    for entry in webhooks(&docs) {
        let service = &entry["clientConfig"]["service"];
        let dns = format!(
            "{}.{}.svc",
            service["name"].as_str().unwrap(),
            service["namespace"].as_str().unwrap()
        );
        assert_eq!(
            cert["spec"]["dnsNames"],
            json!([dns, format!("{dns}.cluster.local")])
        );
        named(&docs, "Service", service["name"].as_str().unwrap());
        // No bundle in the chart: the CA injector writes it.
        assert_eq!(entry["clientConfig"].get("caBundle"), None, "{entry}");
    }
    assert_eq!(
        config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        "default/fg-floodgate-operator-webhook"
    );
    // The operator serves the Certificate's Secret from files, and makes none of its own.
    let operator = named(&docs, "Deployment", "fg-floodgate-operator");
    let pod = &operator["spec"]["template"]["spec"];
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["secret"]["secretName"] == cert["spec"]["secretName"])
        .unwrap();
    let mount = pod["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == volume["name"])
        .unwrap();
    let args: Vec<&str> = pod["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let at = args
        .iter()
        .position(|a| *a == "--webhook-cert-dir")
        .unwrap();
    assert_eq!(args[at + 1], mount["mountPath"]);
    for own in ["--webhook-secret", "--webhook-configuration"] {
        assert!(!args.contains(&own), "{args:?}");
    }
    assert!(
        docs.iter().all(|d| d["kind"] != "ClusterRole"),
        "no right to patch the caBundle is granted"
    );

    // A cluster's own issuer instead of the release's self-signed one.
    let docs = rendered(&[
        "webhook.certManager.enabled=true",
        "webhook.certManager.issuerRef.kind=ClusterIssuer",
        "webhook.certManager.issuerRef.name=corp-ca",
    ]);
    assert!(docs.iter().all(|d| d["kind"] != "Issuer"));
    let cert = named(&docs, "Certificate", "fg-floodgate-operator-webhook");
    assert_eq!(
        cert["spec"]["issuerRef"],
        json!({"kind": "ClusterIssuer", "name": "corp-ca"})
    );

    // Without cert-manager: no Certificate, the operator's own certificate and caBundle.
    let own = rendered(&[]);
    assert!(own.iter().all(|d| d["kind"] != "Certificate"));
    assert_eq!(
        named(
            &own,
            "MutatingWebhookConfiguration",
            "fg-floodgate-sidecar-injector"
        )["metadata"]
            .get("annotations"),
        None
    );
}

/// HPA mode: an HPA on CPU for the gateway's Deployment, which then leaves its replica count
/// to it; the replicas hint covers the most the HPA may run; no Redis, no HPA.
#[test]
fn the_gateway_hpa_scales_the_gateway_deployment_on_cpu() {
    let docs = rendered(&[
        "gateway.autoscaling.enabled=true",
        "gateway.autoscaling.maxReplicas=6",
        "gateway.redis.existingSecret=gateway-redis",
    ]);
    let hpa = named(&docs, "HorizontalPodAutoscaler", "fg-floodgate-gateway");
    assert_eq!(hpa["apiVersion"], "autoscaling/v2");
    let deployment = named(&docs, "Deployment", "fg-floodgate-gateway");
    assert_eq!(
        hpa["spec"]["scaleTargetRef"],
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]})
    );
    assert_eq!(
        (&hpa["spec"]["minReplicas"], &hpa["spec"]["maxReplicas"]),
        (&json!(2), &json!(6))
    );
    assert_eq!(
        hpa["spec"]["metrics"],
        json!([{"type": "Resource", "resource": {"name": "cpu",
            "target": {"type": "Utilization", "averageUtilization": 70}}}])
    );
    assert_eq!(deployment["spec"].get("replicas"), None, "the HPA's to set");
    let env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap();
    let hint = env
        .iter()
        .find(|e| e["name"] == "FLOODGATE_REPLICAS_HINT")
        .unwrap();
    assert_eq!(hint["value"], "6");

    let fixed = rendered(&[]);
    assert!(fixed.iter().all(|d| d["kind"] != "HorizontalPodAutoscaler"));
    assert_eq!(
        named(&fixed, "Deployment", "fg-floodgate-gateway")["spec"]["replicas"],
        1
    );

    // Replicas without shared budgets would together exceed every key's limit: refused.
    let out = template(&["gateway.autoscaling.enabled=true"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("gateway.autoscaling") && stderr.contains("gateway.redis.existingSecret"),
        "{stderr}"
    );
}
