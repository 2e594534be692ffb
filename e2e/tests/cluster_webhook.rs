//! The sidecar injection webhook, served by the operator's code in-process over TLS with a
//! certificate left by an earlier operator and due for rotation, called by the real
//! kube-apiserver: the operator stages a replacement and publishes its CA beside the served
//! one in the MutatingWebhookConfiguration's caBundle (it serves the new pair only once the
//! configuration has carried that CA for a while: `webhook::rotation`'s unit tests), and a pod
//! annotated
//! `floodgate.dev/inject: "true"` is admitted with the proxy sidecar and its apps pointed at it,
//! while a pod without the annotation is admitted unchanged.

// Helpers below unwrap freely: clippy allows that in `cfg(test)` code only.
#![cfg(test)]

use floodgate_e2e::cluster::{Cluster, wait_for};
use floodgate_operator::webhook::{self, CertSource, mutate::Sidecar};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use serde_json::json;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);

/// A cluster-scoped webhook configuration for one test, deleted when dropped.
struct TestWebhookConfiguration {
    cluster: &'static Cluster,
    name: String,
}

impl Drop for TestWebhookConfiguration {
    fn drop(&mut self) {
        let _ = std::process::Command::new(self.cluster.bin_dir().join("kubectl"))
            .arg("--kubeconfig")
            .arg(self.cluster.kubeconfig())
            .args([
                "delete",
                "mutatingwebhookconfiguration",
                &self.name,
                "--wait=false",
                "--ignore-not-found",
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

fn pod(name: &str, annotations: serde_json::Value) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]}
    }))
    .unwrap()
}

fn env(pod: &Pod, container: &str, name: &str) -> Option<String> {
    let c = pod
        .spec
        .as_ref()?
        .containers
        .iter()
        .find(|c| c.name == container)?;
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == name)?
        .value
        .clone()
}

#[tokio::test]
#[ignore = "needs a Kubernetes API server: `make e2e` (see e2e/src/cluster.rs)"]
async fn the_api_server_admits_an_annotated_pod_with_the_sidecar() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cluster = Cluster::get().await.unwrap();
    let ns = cluster.namespace("webhook").await.unwrap();
    let client = cluster.client().await.unwrap();
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let configuration = ns.name().to_owned();
    // A certificate left by an earlier operator, due for rotation (it expires in 20 days):
    // the operator must replace it, and trust both CAs while replicas may still serve it.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let old = webhook::certs::generate(
        &["127.0.0.1".into()],
        now - 345 * 86_400,
        webhook::certs::VALIDITY,
    )
    .unwrap();
    assert!(webhook::certs::needs_rotation(old.not_after, now));
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns.name());
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "floodgate-webhook-tls",
                             "annotations": {webhook::NOT_AFTER: old.not_after.to_string()}},
                "type": "kubernetes.io/tls",
                "stringData": {"tls.crt": old.cert_pem, "tls.key": old.key_pem, "ca.crt": old.ca_pem}
            }))
            .unwrap(),
        )
        .await
        .unwrap();

    let webhook::Started { addr, .. } = webhook::start(
        client.clone(),
        "127.0.0.1:0".parse().unwrap(),
        CertSource::Operator {
            namespace: ns.name().to_owned(),
            secret: "floodgate-webhook-tls".into(),
            hosts: vec!["127.0.0.1".into()],
            configuration: configuration.clone(),
        },
        Sidecar::default(),
        shutdown.clone(),
    )
    .await
    .unwrap();

    // As the chart installs it, but reaching the in-process webhook by URL, for this test's
    // namespace only, and failing closed so that a webhook not called fails the test.
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let _guard = TestWebhookConfiguration {
        cluster,
        name: configuration.clone(),
    };
    let started = Instant::now();
    configs
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
                "metadata": {"name": configuration},
                "webhooks": [{
                    "name": "sidecar.floodgate.dev",
                    "clientConfig": {"url": format!("https://{addr}/mutate")},
                    "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                               "resources": ["pods"]}],
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns.name()}},
                    "sideEffects": "None", "admissionReviewVersions": ["v1"],
                    "failurePolicy": "Fail", "timeoutSeconds": 5,
                    "reinvocationPolicy": "IfNeeded"
                }]
            }))
            .unwrap(),
        )
        .await
        .unwrap();

    // The operator makes the certificate, keeps it in its Secret and writes the CA.
    let config = wait_for("caBundle written", WAIT, || async {
        let c = configs.get(&configuration).await?;
        let written = c.webhooks.as_ref().unwrap()[0]
            .client_config
            .ca_bundle
            .is_some();
        Ok(written.then_some(c))
    })
    .await
    .unwrap();
    let ca = String::from_utf8(
        config.webhooks.unwrap()[0]
            .client_config
            .ca_bundle
            .clone()
            .unwrap()
            .0,
    )
    .unwrap();
    // The due certificate is staged, not served yet: its CA is published beside the served
    // one first, and the old pair stays in use until the API server has the new CA.
    let secret = secrets.get("floodgate-webhook-tls").await.unwrap();
    let data = secret.data.as_ref().unwrap();
    let new_ca = String::from_utf8(data["next-ca.crt"].0.clone()).unwrap();
    assert_ne!(new_ca, old.ca_pem, "a replacement was made");
    assert_eq!(
        data["ca.crt"].0,
        old.ca_pem.as_bytes(),
        "the old pair is still the served one"
    );
    assert_eq!(
        ca,
        format!("{}{new_ca}", old.ca_pem),
        "the caBundle holds the served CA, then the staged one"
    );
    let not_after: i64 = secret.metadata.annotations.as_ref().unwrap()
        [webhook::rotation::NEXT_NOT_AFTER]
        .parse()
        .unwrap();
    assert!(!webhook::certs::needs_rotation(not_after, now));

    // The API server's webhook cache may lag the caBundle by a moment: with failurePolicy Fail
    // a create fails until then, so retry until one is admitted.
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    let injected = wait_for("an annotated pod admitted", WAIT, || async {
        match pods
            .create(
                &PostParams::default(),
                &pod(
                    "app",
                    json!({"floodgate.dev/inject": "true", "floodgate.dev/secrets": "claude-keys"}),
                ),
            )
            .await
        {
            Ok(p) => Ok(Some(p)),
            Err(kube::Error::Api(e)) if e.message.contains("failed calling webhook") => {
                eprintln!("not yet: {}", e.message);
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    })
    .await
    .unwrap();
    eprintln!(
        "annotated pod admitted with the sidecar {:?} after the webhook configuration was created",
        started.elapsed()
    );
    let spec = injected.spec.as_ref().unwrap();
    let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["app"]);
    // A native sidecar, which the API server accepted as such.
    let inits = spec.init_containers.as_ref().unwrap();
    assert_eq!(
        (inits[0].name.as_str(), inits[0].restart_policy.as_deref()),
        ("floodgate-proxy", Some("Always"))
    );
    // Its probes, on the probe-only listener's named port, accepted and kept as sent.
    let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        let get = p.as_ref().and_then(|p| p.http_get.as_ref()).unwrap();
        (get.path.clone().unwrap(), get.port.clone())
    };
    let probe_port = k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(
        webhook::mutate::PROBE_PORT_NAME.into(),
    );
    assert_eq!(
        probe_path(&inits[0].readiness_probe),
        ("/readyz".to_owned(), probe_port.clone())
    );
    assert_eq!(
        probe_path(&inits[0].liveness_probe),
        ("/healthz".to_owned(), probe_port)
    );
    assert!(
        inits[0].ports.iter().flatten().any(|p| {
            p.name.as_deref() == Some(webhook::mutate::PROBE_PORT_NAME)
                && p.container_port == i32::from(webhook::mutate::DEFAULT_PORT) + 1
        }),
        "{:?}",
        inits[0].ports
    );
    // The keys' Secret, mounted into the sidecar for its --secrets-dir.
    assert!(
        inits[0]
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.mount_path == "/etc/floodgate/secrets/claude-keys"),
        "{:?}",
        inits[0].volume_mounts
    );
    assert!(spec.volumes.iter().flatten().any(|v| {
        v.secret
            .as_ref()
            .is_some_and(|s| s.secret_name.as_deref() == Some("claude-keys"))
    }));
    assert_eq!(
        env(&injected, "app", "OPENAI_BASE_URL").as_deref(),
        Some(format!("http://127.0.0.1:{}/v1", webhook::mutate::DEFAULT_PORT).as_str())
    );
    assert_eq!(
        injected
            .spec
            .as_ref()
            .unwrap()
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "floodgate-config")
            .and_then(|v| v.config_map.as_ref())
            .map(|c| c.name.as_str()),
        Some("floodgate-sidecar")
    );

    let plain = pods
        .create(&PostParams::default(), &pod("plain", json!({})))
        .await
        .unwrap();
    assert_eq!(plain.spec.as_ref().unwrap().containers.len(), 1);
    assert_eq!(env(&plain, "app", "FLOODGATE_URL"), None);
    let _ = pods.delete("app", &DeleteParams::default()).await;
}

#[tokio::test]
#[ignore = "needs a Kubernetes API server: `make e2e` (see e2e/src/cluster.rs)"]
async fn the_charts_webhook_objects_are_accepted_by_the_api_server() {
    let cluster = Cluster::get().await.unwrap();
    let ns = cluster.namespace("webhook-chart").await.unwrap();
    let home = tempfile::tempdir().unwrap();
    let chart = cluster.repo_root().join("charts/floodgate");
    let mut helm = tokio::process::Command::new(cluster.bin_dir().join("helm"));
    for var in ["HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"] {
        helm.env(var, home.path());
    }
    let rendered = helm
        .args(["template", "fg", &chart.to_string_lossy(), "-n", ns.name()])
        .args([
            "--set",
            "webhook.enabled=true",
            "--set",
            "webhook.failurePolicy=Fail",
        ])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&rendered.stdout);
    assert!(
        rendered.status.success(),
        "{}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    for kind in [
        "kind: MutatingWebhookConfiguration",
        "kind: ClusterRole",
        "--webhook-listen",
        "failurePolicy: Fail",
    ] {
        assert!(text.contains(kind), "{kind} not rendered:\n{text}");
    }
    // Server-side dry run: every object valid as the API server sees it, nothing created.
    cluster
        .kubectl_stdin(
            ["apply", "--dry-run=server", "-n", ns.name(), "-f", "-"],
            &text,
        )
        .await
        .unwrap()
        .ok()
        .unwrap();
}
