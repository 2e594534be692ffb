//! The Helm chart (charts/floodgate) on a real API server with RBAC authorization: it lints and
//! renders what its values ask for, the server accepts the rendering, `helm install` grants the
//! gateway's service account exactly get/list/watch on the four Floodgate kinds and Secrets of
//! its namespace and nothing more, and the real proxy in cluster mode, authenticated with that
//! service account's token, becomes ready and serves the example's models.
//!
//! No pod runs (kwok fakes the nodes): the proxy runs here as a child process, with a
//! kubeconfig holding the service account's token instead of the cluster admin's.

// Helpers below unwrap freely: clippy allows that in `cfg(test)` code only.
#![cfg(test)]

mod support;

use floodgate_e2e::cluster::{Cluster, Output, TestNamespace, wait_for};
use floodgate_e2e::proxy::ProxyProcess;
use floodgate_proxy::config::load::load_config;
use floodgate_proxy::config::secrets::SecretSources;
use serde_json::Value;
use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use support::{get, model_ids};

/// Generous bound for waits.
const SLOW: Duration = Duration::from_secs(30);
/// The release name the tests install under; the gateway's objects are `<release>-gateway`.
const RELEASE: &str = "floodgate";
/// The name of the gateway's ServiceAccount, Role, RoleBinding, Deployment and Service.
const GATEWAY: &str = "floodgate-gateway";
/// The name of the operator's ServiceAccount, Role, RoleBinding and Deployment.
const OPERATOR: &str = "floodgate-operator";
/// The Floodgate kinds the gateway watches, as `kubectl auth can-i` names them.
const KINDS: [&str; 5] = [
    "aiproviderpools.floodgate.dev",
    "tierqueues.floodgate.dev",
    "cachepolicies.floodgate.dev",
    "localmodeldeployments.floodgate.dev",
    "tenants.floodgate.dev",
];

async fn setup(test: &str) -> (&'static Cluster, TestNamespace) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cluster = Cluster::get().await.unwrap();
    cluster.install_crds().await.unwrap();
    let ns = cluster.namespace(test).await.unwrap();
    (cluster, ns)
}

fn chart(cluster: &Cluster) -> PathBuf {
    cluster.repo_root().join("charts/floodgate")
}

/// Runs helm with its state in `home` (nothing read from or written to the user's helm
/// config), against the cluster; panics with its output when it fails.
async fn helm(cluster: &Cluster, home: &Path, args: &[&OsStr]) -> String {
    let out = tokio::process::Command::new(cluster.bin_dir().join("helm"))
        .args(args)
        .arg("--kubeconfig")
        .arg(cluster.kubeconfig())
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), out)
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "helm {args:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `helm template` of the chart into `ns` with extra `args`; every rendered object.
async fn template(cluster: &Cluster, home: &Path, ns: &str, args: &[&OsStr]) -> Vec<Value> {
    let chart = chart(cluster);
    let mut all: Vec<&OsStr> = vec![
        OsStr::new("template"),
        OsStr::new(RELEASE),
        chart.as_os_str(),
        OsStr::new("--namespace"),
        OsStr::new(ns),
    ];
    all.extend_from_slice(args);
    let rendered = helm(cluster, home, &all).await;
    serde_saphyr::from_multiple::<Value>(&rendered)
        .unwrap()
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

/// The one gateway object of `kind` (the operator's objects, rendered next to them, are
/// checked apart).
fn object<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == kind && !is_operator(o))
        .collect();
    assert_eq!(found.len(), 1, "one {kind} expected: {objects:#?}");
    found[0]
}

fn is_operator(o: &Value) -> bool {
    o["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
}

fn container(deployment: &Value) -> &Value {
    &deployment["spec"]["template"]["spec"]["containers"][0]
}

/// The container's environment as `name -> value or valueFrom`.
fn env(deployment: &Value) -> serde_json::Map<String, Value> {
    container(deployment)["env"]
        .as_array()
        .map(|vars| {
            vars.iter()
                .map(|v| {
                    let value = v.get("valueFrom").or(v.get("value")).unwrap().clone();
                    (v["name"].as_str().unwrap().to_owned(), value)
                })
                .collect()
        })
        .unwrap_or_default()
}

async fn install(cluster: &Cluster, home: &Path, ns: &TestNamespace) -> String {
    let chart = chart(cluster);
    // The CRDs are the suite's, installed by `install_crds` (the chart's copies are the same
    // files, checked by crds/tests/generated.rs).
    helm(
        cluster,
        home,
        &[
            OsStr::new("install"),
            OsStr::new(RELEASE),
            chart.as_os_str(),
            OsStr::new("--namespace"),
            OsStr::new(ns.name()),
            OsStr::new("--skip-crds"),
        ],
    )
    .await
}

async fn kubectl_ok(cluster: &Cluster, args: &[&str]) -> Output {
    cluster.kubectl(args).await.unwrap().ok().unwrap()
}

/// `kubectl auth can-i VERB RESOURCE [--subresource SUB]` as the gateway's service account of
/// `ns`, asked in `in_ns`.
async fn gateway_can(
    cluster: &Cluster,
    ns: &str,
    in_ns: &str,
    verb: &str,
    resource: &str,
    subresource: &str,
) -> bool {
    let user = format!("--as=system:serviceaccount:{ns}:{GATEWAY}");
    let mut args = vec!["auth", "can-i", verb, resource, "-n", in_ns, &user];
    if !subresource.is_empty() {
        args.extend(["--subresource", subresource]);
    }
    let out = cluster.kubectl(&args).await.unwrap();
    // Exit status 0 and "yes", or 1 and "no"; anything else is an error of the question.
    match out.stdout.trim() {
        "yes" if out.success() => true,
        "no" if out.status.code() == Some(1) => false,
        _ => panic!("{}: {}\n{}", out.command, out.stdout, out.stderr),
    }
}

#[tokio::test]
#[ignore = "needs a Kubernetes API server: `make e2e` (see e2e/src/cluster.rs)"]
async fn the_chart_lints_renders_its_values_and_the_api_server_accepts_it() {
    let (cluster, ns) = setup("chart-render").await;
    let home = tempfile::tempdir().unwrap();
    let chart = chart(cluster);
    // Every optional setting on, from a values file (numbers there are floats to helm).
    let values = home.path().join("all-options.yaml");
    std::fs::write(
        &values,
        r#"gateway:
  replicas: 3
  workers: 4
  logJson: false
  logLevel: info,floodgate_proxy=debug
  maxQueueWaitMs: 0
  bodyLimitBytes: 10000000
  redis: {existingSecret: gateway-redis, key: url}
  otlpEndpoint: http://otel-collector.monitoring:4318
  extraEnv: [{name: OTEL_SERVICE_NAME, value: floodgate-gateway}]
  preStopSleepSeconds: 0
  podDisruptionBudget: {enabled: false}
"#,
    )
    .unwrap();
    for args in [vec![], vec![OsStr::new("-f"), values.as_os_str()]] {
        let mut lint = vec![
            OsStr::new("lint"),
            OsStr::new("--strict"),
            chart.as_os_str(),
        ];
        lint.extend(args);
        helm(cluster, home.path(), &lint).await;
    }

    // Replicas without shared budgets would together exceed every key's limit: refused,
    // naming the field.
    let refused = tokio::process::Command::new(cluster.bin_dir().join("helm"))
        .args(["template", RELEASE])
        .arg(&chart)
        .args(["--set", "gateway.replicas=2"])
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "rendered: {stderr}");
    assert!(
        stderr.contains("gateway.replicas") && stderr.contains("gateway.redis.existingSecret"),
        "{stderr}"
    );

    // Defaults: the gateway in cluster mode on the release namespace, locked down, a fixed
    // worker count and nothing else in its environment.
    let defaults = template(cluster, home.path(), ns.name(), &[]).await;
    let kinds: BTreeSet<&str> = defaults
        .iter()
        .map(|o| o["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "Deployment",
            "PodDisruptionBudget",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount"
        ])
    );
    for o in &defaults {
        let name = if is_operator(o) { OPERATOR } else { GATEWAY };
        assert_eq!(o["metadata"]["name"], name, "{o:#?}");
        assert_eq!(o["metadata"]["namespace"], ns.name(), "{o:#?}");
    }
    // The operator: its own image, leader election, the release namespace only.
    let operator: Vec<&Value> = defaults.iter().filter(|o| is_operator(o)).collect();
    let mut operator_kinds: Vec<&str> = operator
        .iter()
        .map(|o| o["kind"].as_str().unwrap())
        .collect();
    operator_kinds.sort_unstable();
    assert_eq!(
        operator_kinds,
        ["Deployment", "Role", "RoleBinding", "ServiceAccount"]
    );
    let operator_deployment = operator.iter().find(|o| o["kind"] == "Deployment").unwrap();
    let c = container(operator_deployment);
    assert_eq!(
        c["image"], "ghcr.io/floodgate-dev/floodgate-operator:0.1.0",
        "{c:#?}"
    );
    // Ready (so in the webhook Service) only once it serves with its certificate loaded.
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz", "{c:#?}");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "metrics", "{c:#?}");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz", "{c:#?}");
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        args,
        [
            "--namespace",
            ns.name(),
            "--leader-elect",
            "--metrics-listen",
            "0.0.0.0:9090",
            "--log-json",
            // No Redis by default: pools' usage is scraped from the gateway's pods.
            "--gateway-metrics-selector",
            "app.kubernetes.io/name=floodgate,app.kubernetes.io/instance=floodgate,app.kubernetes.io/component=gateway",
            "--gateway-metrics-port",
            "9090"
        ]
    );
    let deployment = object(&defaults, "Deployment");
    assert_eq!(deployment["spec"]["replicas"], 1);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], GATEWAY);
    let c = container(deployment);
    assert_eq!(
        c["image"], "ghcr.io/floodgate-dev/floodgate-proxy:0.1.0",
        "{c:#?}"
    );
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        args,
        [
            "--cluster",
            "--namespace",
            ns.name(),
            "--listen",
            "0.0.0.0:8080",
            "--admin-listen",
            "0.0.0.0:9090",
            "--log-json"
        ]
    );
    // A fixed worker count: without a CPU limit the default would be every CPU of the node.
    assert_eq!(
        Value::Object(env(deployment)),
        serde_json::json!({"FLOODGATE_WORKERS": "2"}),
        "{c:#?}"
    );
    assert_eq!(c["ports"][0]["name"], "http");
    assert_eq!(c["ports"][0]["containerPort"], 8080);
    assert_eq!(c["ports"][1]["name"], "admin");
    assert_eq!(c["ports"][1]["containerPort"], 9090);
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true, "{sc:#?}");
    assert_eq!(sc["readOnlyRootFilesystem"], true, "{sc:#?}");
    assert_eq!(sc["allowPrivilegeEscalation"], false, "{sc:#?}");
    assert_eq!(
        sc["capabilities"]["drop"],
        serde_json::json!(["ALL"]),
        "{sc:#?}"
    );
    let service = object(&defaults, "Service");
    assert_eq!(service["spec"]["type"], "ClusterIP");
    assert_eq!(service["spec"]["ports"][0]["port"], 8080);
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "http");
    assert_eq!(
        service["spec"]["selector"],
        deployment["spec"]["selector"]["matchLabels"]
    );

    // Every option reaches the container as the proxy's flag or variable.
    let options = template(
        cluster,
        home.path(),
        ns.name(),
        &[OsStr::new("-f"), values.as_os_str()],
    )
    .await;
    assert!(
        options.iter().all(|o| o["kind"] != "PodDisruptionBudget"),
        "{options:#?}"
    );
    let deployment = object(&options, "Deployment");
    assert_eq!(deployment["spec"]["replicas"], 3);
    assert!(
        !container(deployment)["args"]
            .as_array()
            .unwrap()
            .contains(&Value::from("--log-json"))
    );
    let expected = serde_json::json!({
        "FLOODGATE_WORKERS": "4",
        "RUST_LOG": "info,floodgate_proxy=debug",
        "FLOODGATE_MAX_QUEUE_WAIT_MS": "0",
        "FLOODGATE_BODY_LIMIT_BYTES": "10000000",
        "FLOODGATE_REDIS_URL": {"secretKeyRef": {"name": "gateway-redis", "key": "url"}},
        "FLOODGATE_REPLICAS_HINT": "3",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector.monitoring:4318",
        "OTEL_SERVICE_NAME": "floodgate-gateway",
    });
    assert_eq!(Value::Object(env(deployment)), expected);
    assert!(container(deployment).get("lifecycle").is_none());

    // The API server accepts both renderings (schema, RBAC objects, probes, preStop sleep).
    for objects in [&defaults, &options] {
        let stream: String = objects
            .iter()
            .map(|o| format!("---\n{}\n", serde_json::to_string(o).unwrap()))
            .collect();
        cluster
            .kubectl_stdin(
                [
                    "apply",
                    "--server-side",
                    "--force-conflicts",
                    "--field-manager=floodgate-e2e-chart",
                    "-n",
                    ns.name(),
                    "-f",
                    "-",
                ],
                &stream,
            )
            .await
            .unwrap()
            .ok()
            .unwrap();
    }
    let served = kubectl_ok(
        cluster,
        &["get", "deployment", GATEWAY, "-n", ns.name(), "-o", "json"],
    )
    .await;
    let served: Value = serde_json::from_str(&served.stdout).unwrap();
    assert_eq!(Value::Object(env(&served)), expected);
}

#[tokio::test]
#[ignore = "needs a Kubernetes API server: `make e2e` (see e2e/src/cluster.rs)"]
async fn helm_install_grants_the_gateway_read_access_to_its_namespace_only() {
    let (cluster, ns) = setup("chart-rbac").await;
    let home = tempfile::tempdir().unwrap();
    let notes = install(cluster, home.path(), &ns).await;
    assert!(notes.contains("STATUS: deployed"), "{notes}");
    for kind in [
        "serviceaccount",
        "role",
        "rolebinding",
        "deployment",
        "service",
        "poddisruptionbudget",
    ] {
        kubectl_ok(cluster, &["get", kind, GATEWAY, "-n", ns.name()]).await;
    }

    let ns = ns.name();
    // (namespace asked in, verb, resource, subresource, allowed)
    let mut cases: Vec<(&str, &str, &str, &str, bool)> = Vec::new();
    for resource in KINDS.iter().copied().chain(["secrets"]) {
        for verb in ["get", "list", "watch"] {
            cases.push((ns, verb, resource, "", true));
        }
        for verb in ["create", "update", "patch", "delete", "deletecollection"] {
            cases.push((ns, verb, resource, "", false));
        }
        // Not in another namespace.
        cases.push(("default", "list", resource, "", false));
        cases.push(("kube-system", "get", resource, "", false));
    }
    // It writes no status and no events, and reads nothing else.
    for resource in KINDS {
        cases.push((ns, "update", resource, "status", false));
        cases.push((ns, "patch", resource, "status", false));
    }
    for (verb, resource, subresource) in [
        ("list", "pods", ""),
        ("get", "configmaps", ""),
        ("list", "serviceaccounts", ""),
        ("create", "serviceaccounts", "token"),
        ("create", "events", ""),
        ("create", "events.events.k8s.io", ""),
        ("list", "deployments.apps", ""),
        ("list", "namespaces", ""),
        ("list", "customresourcedefinitions.apiextensions.k8s.io", ""),
        ("list", "roles.rbac.authorization.k8s.io", ""),
    ] {
        cases.push((ns, verb, resource, subresource, false));
    }
    let mut wrong = Vec::new();
    for (in_ns, verb, resource, subresource, allowed) in cases {
        if gateway_can(cluster, ns, in_ns, verb, resource, subresource).await != allowed {
            wrong.push(format!(
                "{verb} {resource}{}{subresource} in {in_ns}: should be {}",
                if subresource.is_empty() { "" } else { "/" },
                if allowed { "allowed" } else { "denied" }
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "the gateway's RBAC is wrong:\n{}",
        wrong.join("\n")
    );
}

/// A kubeconfig for the cluster's API server (same address and CA as the admin's) that
/// authenticates with `token` alone.
async fn token_kubeconfig(cluster: &Cluster, dir: &Path, token: &str) -> PathBuf {
    let view = |path: &'static str| async move {
        let out = kubectl_ok(
            cluster,
            &[
                "config",
                "view",
                "--raw",
                "--minify",
                "--flatten",
                "-o",
                &format!("jsonpath={{{path}}}"),
            ],
        )
        .await;
        let value = out.stdout.trim().to_owned();
        assert!(
            !value.is_empty(),
            "no {path} in {}",
            cluster.kubeconfig().display()
        );
        value
    };
    let server = view(".clusters[0].cluster.server").await;
    let ca = view(".clusters[0].cluster.certificate-authority-data").await;
    let kubeconfig = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: gateway
  user:
    token: {token}
contexts:
- name: gateway
  context:
    cluster: e2e
    user: gateway
current-context: gateway
"
    );
    let path = dir.join("kubeconfig");
    std::fs::write(&path, kubeconfig).unwrap();
    path
}

/// kubectl with `kubeconfig` instead of the cluster admin's.
async fn kubectl_as(cluster: &Cluster, kubeconfig: &Path, args: &[&str]) -> std::process::Output {
    let out = tokio::process::Command::new(cluster.bin_dir().join("kubectl"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(SLOW, out).await.unwrap().unwrap()
}

#[tokio::test]
#[ignore = "needs a Kubernetes API server: `make e2e` (see e2e/src/cluster.rs)"]
async fn the_proxy_runs_as_the_charts_service_account_and_serves_the_namespace() {
    let (cluster, ns) = setup("chart-proxy").await;
    let home = tempfile::tempdir().unwrap();
    install(cluster, home.path(), &ns).await;
    let example = cluster.repo_root().join("examples/scaling-500rpm");
    kubectl_ok(
        cluster,
        &["apply", "-n", ns.name(), "-f", example.to_str().unwrap()],
    )
    .await;

    // The service account's token (TokenRequest), as the kubelet would mount it in the pod:
    // valid for an hour as the kubelet's are (a 10-minute one expired once while the proxy
    // was still being built on a loaded machine).
    let token = kubectl_ok(
        cluster,
        &["create", "token", GATEWAY, "-n", ns.name(), "--duration=1h"],
    )
    .await
    .stdout
    .trim()
    .to_owned();
    assert!(!token.is_empty());
    let kubeconfig = token_kubeconfig(cluster, home.path(), &token).await;

    // The kubeconfig is the service account's, not the admin's: a test that passed with the
    // admin's rights would prove nothing about the chart's RBAC.
    let whoami = kubectl_as(
        cluster,
        &kubeconfig,
        &[
            "auth",
            "whoami",
            "-o",
            "jsonpath={.status.userInfo.username}",
        ],
    )
    .await;
    assert_eq!(
        String::from_utf8_lossy(&whoami.stdout),
        format!("system:serviceaccount:{}:{GATEWAY}", ns.name()),
        "{}",
        String::from_utf8_lossy(&whoami.stderr)
    );
    let pods = kubectl_as(cluster, &kubeconfig, &["get", "pods", "-n", ns.name()]).await;
    assert!(!pods.status.success(), "the gateway may list pods");
    assert!(
        String::from_utf8_lossy(&pods.stderr).contains("forbidden"),
        "{}",
        String::from_utf8_lossy(&pods.stderr)
    );

    let proxy = ProxyProcess::start(
        ["--cluster", "--namespace", ns.name()],
        &[("KUBECONFIG", kubeconfig.as_os_str())],
    )
    .await
    .unwrap();
    let ready = wait_for("the proxy to be ready", SLOW, || async {
        Ok((get(&proxy, "/readyz").await.0 == 200).then_some(()))
    })
    .await;
    let log = proxy.log();
    assert!(
        ready.is_ok(),
        "{ready:?}; the proxy's log:\n{}",
        log.join("\n")
    );

    // The same models as the standalone proxy loading the same manifests from disk.
    let (standalone, _) = load_config(&[example], SecretSources::default()).unwrap();
    let expected: BTreeSet<String> = standalone.models().into_iter().map(|m| m.id).collect();
    assert!(
        expected.contains("claude-sonnet-4") && expected.contains("local-code"),
        "{expected:?}"
    );
    assert_eq!(model_ids(&proxy).await, expected);

    // It follows a change. Readiness alone does not show that the watches work: the first
    // configuration is applied once every initial list is done, and a refused watch shows only
    // afterwards, as a log line; by the time a change arrives every watch has been started.
    kubectl_ok(
        cluster,
        &[
            "patch", "aiproviderpool", "premium", "-n", ns.name(), "--type=json", "-p",
            r#"[{"op":"add","path":"/spec/providers/0/models/-","value":{"name":"claude-opus-4","alias":"smartest"}}]"#,
        ],
    )
    .await;
    let followed = wait_for("the patched-in model on /v1/models", SLOW, || async {
        Ok(model_ids(&proxy).await.contains("smartest").then_some(()))
    })
    .await;
    assert!(
        followed.is_ok(),
        "{followed:?}; the proxy's log:\n{}",
        proxy.log().join("\n")
    );
    let log = proxy.log();
    assert!(
        log.iter()
            .any(|l| l.contains("first configuration applied")),
        "{log:#?}"
    );
    let refused: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("watch failed") || l.contains("forbidden"))
        .collect();
    assert!(
        refused.is_empty(),
        "the API server refused the gateway's service account:\n{refused:#?}"
    );
    proxy.stop().await.unwrap();
}

/// HPA mode on the API server: the rendered HPA is accepted, and the controller manager's HPA
/// controller acts on its target, the gateway's Deployment, through its scale subresource:
/// it raises it to `minReplicas` (`AbleToScale`). Without a metrics server it cannot read CPU
/// beyond that, which is the cluster's part, not the chart's.
#[tokio::test]
#[ignore = "needs a Kubernetes API server: `make e2e` (see e2e/src/cluster.rs)"]
async fn the_gateways_hpa_is_accepted_and_scales_the_gateway_deployment() {
    let (cluster, ns) = setup("chart-hpa").await;
    let home = tempfile::tempdir().unwrap();
    let objects = template(
        cluster,
        home.path(),
        ns.name(),
        &[
            OsStr::new("--set"),
            OsStr::new("gateway.autoscaling.enabled=true"),
            OsStr::new("--set"),
            OsStr::new("gateway.redis.existingSecret=gateway-redis"),
            OsStr::new("--set"),
            OsStr::new("operator.enabled=false"),
        ],
    )
    .await;
    let hpa = object(&objects, "HorizontalPodAutoscaler");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], GATEWAY);
    let stream: String = objects
        .iter()
        .filter(|o| o["kind"] == "Deployment" || o["kind"] == "HorizontalPodAutoscaler")
        .map(|o| format!("---\n{}\n", serde_json::to_string(o).unwrap()))
        .collect();
    cluster
        .kubectl_stdin(["apply", "-n", ns.name(), "-f", "-"], &stream)
        .await
        .unwrap()
        .ok()
        .unwrap();
    // The Deployment starts at one replica (no count of its own); the HPA controller (every
    // 15 s) raises it to minReplicas through the scale subresource, without any metric.
    let replicas = wait_for(
        "the HPA to raise the gateway to minReplicas",
        SLOW * 2,
        || async {
            let out = kubectl_ok(
                cluster,
                &["get", "deployment", GATEWAY, "-n", ns.name(), "-o", "json"],
            )
            .await;
            let deployment: Value = serde_json::from_str(&out.stdout).unwrap();
            let replicas = deployment["spec"]["replicas"].clone();
            Ok((replicas == 2).then_some(replicas))
        },
    )
    .await
    .unwrap();
    assert_eq!(replicas, hpa["spec"]["minReplicas"]);
    let out = kubectl_ok(
        cluster,
        &["get", "hpa", GATEWAY, "-n", ns.name(), "-o", "json"],
    )
    .await;
    let status = serde_json::from_str::<Value>(&out.stdout).unwrap()["status"].clone();
    let able = status["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "AbleToScale")
        .cloned();
    assert_eq!(
        able.as_ref().map(|c| &c["status"]),
        Some(&Value::from("True")),
        "{status:#?}"
    );
}
