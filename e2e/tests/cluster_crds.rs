//! The generated CRDs on a real kube-apiserver: they install and become Established (so the
//! server accepts their structural schema and the cost of their CEL rules), the server keeps
//! them as generated, a broken schema is refused, the 500-RPM example applies and reads back
//! with the same defaults our own validation applies, and `kubectl get` shows the printer
//! columns from a status written through the status subresource.

// Helpers below unwrap freely: clippy allows that in `cfg(test)` code only.
#![cfg(test)]

use floodgate_crds::validate::validate_object;
use floodgate_crds::{
    AIProviderPool, AIProviderPoolStatus, CachePolicy, Condition, ConditionStatus, Kind,
    LocalModelDeployment, Tenant, TierQueue,
};
use floodgate_e2e::cluster::{Cluster, TestNamespace};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::path::Path;

async fn setup(test: &str) -> (&'static Cluster, TestNamespace) {
    let cluster = Cluster::get().await.unwrap();
    cluster.install_crds().await.unwrap();
    let ns = cluster.namespace(test).await.unwrap();
    (cluster, ns)
}

#[tokio::test]
#[ignore = "needs a Kubernetes API server: `make e2e` (see e2e/src/cluster.rs)"]
async fn the_generated_crds_install_and_become_established() {
    let cluster = Cluster::get().await.unwrap();
    // install_crds applies crds/manifests/ server-side and waits for Established: a schema the
    // server refuses (structure, CEL syntax or cost budget) fails right here.
    let mut installed = cluster.install_crds().await.unwrap();
    installed.sort();
    let mut expected: Vec<String> = Kind::ALL
        .iter()
        .map(|k| k.crd().metadata.name.unwrap())
        .collect();
    expected.sort();
    assert_eq!(installed, expected);

    let crds: Api<CustomResourceDefinition> = Api::all(cluster.client().await.unwrap());
    for kind in Kind::ALL {
        let generated = kind.crd();
        let served = crds
            .get(generated.metadata.name.as_deref().unwrap())
            .await
            .unwrap();
        let conditions = served
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        for wanted in ["Established", "NamesAccepted"] {
            assert!(
                conditions
                    .iter()
                    .any(|c| c.type_ == wanted && c.status == "True"),
                "{kind}: {wanted} is not True: {conditions:?}"
            );
        }
        // The server holds exactly what the types generate: the committed manifests are not
        // stale, and the server dropped or rewrote nothing (rules, defaults, columns).
        let (served, generated) = (&served.spec.versions[0], &generated.spec.versions[0]);
        let diff = difference(
            &to_value(&served.schema),
            &to_value(&generated.schema),
            String::new(),
        );
        assert_eq!(
            diff, None,
            "{kind}: the served schema differs from the generated one"
        );
        let diff = difference(
            &to_value(&served.additional_printer_columns),
            &to_value(&generated.additional_printer_columns),
            String::new(),
        );
        assert_eq!(diff, None, "{kind}: printer columns");
        assert!(
            served
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{kind}: no status subresource"
        );
    }
}

/// The install test above fails when a schema is broken. Shown here by offering the API server
/// broken variants of the pool CRD (under another group, dry run, so nothing is installed): the
/// first is the pool type as first written, whose CEL uniqueness rules exceeded the cost budget.
#[tokio::test]
#[ignore = "needs a Kubernetes API server: `make e2e` (see e2e/src/cluster.rs)"]
async fn a_broken_crd_schema_is_refused_by_the_api_server() {
    let cluster = Cluster::get().await.unwrap();
    let renamed = {
        let mut crd = to_value(&Kind::AIProviderPool.crd());
        crd["metadata"]["name"] = json!("aiproviderpools.broken.e2e.floodgate.dev");
        crd["spec"]["group"] = json!("broken.e2e.floodgate.dev");
        crd
    };
    let provider =
        "/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/providers/items";

    // Control: renamed but intact, it is accepted, so the refusals below are the mutations'.
    let out = dry_run_create(cluster, &renamed).await;
    assert!(out.success(), "the intact CRD was refused: {}", out.stderr);

    let mut too_costly = renamed.clone();
    *too_costly
        .pointer_mut(&format!("{provider}/properties/keys/maxItems"))
        .unwrap() = json!(64);
    let out = dry_run_create(cluster, &too_costly).await;
    assert!(
        !out.success(),
        "a CEL rule over the cost budget was accepted"
    );
    assert!(
        out.stderr.contains("x-kubernetes-validations")
            && out.stderr.contains("estimated rule cost exceeds budget"),
        "{}",
        out.stderr
    );

    let mut bad_rule = renamed.clone();
    *bad_rule
        .pointer_mut(&format!("{provider}/x-kubernetes-validations/0/rule"))
        .unwrap() = json!("size(self.kees) > 0");
    let out = dry_run_create(cluster, &bad_rule).await;
    assert!(
        !out.success(),
        "a CEL rule naming an unknown field was accepted"
    );
    assert!(
        out.stderr.contains("compilation failed") && out.stderr.contains("kees"),
        "{}",
        out.stderr
    );

    let mut not_structural = renamed;
    let keys = not_structural
        .pointer_mut(&format!("{provider}/properties/keys"))
        .unwrap();
    keys.as_object_mut().unwrap().remove("type");
    let out = dry_run_create(cluster, &not_structural).await;
    assert!(!out.success(), "a non-structural schema was accepted");
    assert!(
        out.stderr.contains("properties[keys].type: Required value"),
        "{}",
        out.stderr
    );
}

async fn dry_run_create(cluster: &Cluster, crd: &Value) -> floodgate_e2e::cluster::Output {
    cluster
        .kubectl_stdin(["create", "--dry-run=server", "-f", "-"], &crd.to_string())
        .await
        .unwrap()
}

#[tokio::test]
#[ignore = "needs a Kubernetes API server: `make e2e` (see e2e/src/cluster.rs)"]
async fn the_500rpm_example_applies_and_reads_back_with_defaults() {
    let (cluster, ns) = setup("example").await;
    let dir = cluster.repo_root().join("examples/scaling-500rpm");
    let out = cluster
        .kubectl(["apply", "-n", ns.name(), "-f", dir.to_str().unwrap()])
        .await
        .unwrap()
        .ok()
        .unwrap();
    assert_eq!(
        out.stdout
            .lines()
            .filter(|l| l.ends_with(" created"))
            .count(),
        13,
        "{}",
        out.stdout
    );

    // Defaults the file leaves out were applied by the server and stored.
    let premium = get_json(cluster, &ns, "aiproviderpool/premium").await;
    assert_eq!(
        premium.pointer("/spec/providers/0/weight"),
        Some(&json!(1)),
        "{premium}"
    );
    let tiers = get_json(cluster, &ns, "tierqueue/tiers").await;
    assert_eq!(
        tiers.pointer("/spec/tiers/0/maxQueueDepth"),
        Some(&json!(1000)),
        "{tiers}"
    );

    // Every object reads back exactly as our own validation (the same schema and defaults)
    // turns the file's document into.
    let client = cluster.client().await.unwrap();
    let mut compared = 0;
    for doc in example_documents(&dir) {
        let Some(kind) = doc["kind"].as_str().and_then(Kind::parse) else {
            continue;
        };
        let name = doc["metadata"]["name"].as_str().unwrap().to_owned();
        let (served, ours) = match kind {
            Kind::AIProviderPool => {
                served_and_ours::<AIProviderPool>(&client, &ns, kind, &name, &doc).await
            }
            Kind::TierQueue => served_and_ours::<TierQueue>(&client, &ns, kind, &name, &doc).await,
            Kind::CachePolicy => {
                served_and_ours::<CachePolicy>(&client, &ns, kind, &name, &doc).await
            }
            Kind::LocalModelDeployment => {
                served_and_ours::<LocalModelDeployment>(&client, &ns, kind, &name, &doc).await
            }
            Kind::Tenant => served_and_ours::<Tenant>(&client, &ns, kind, &name, &doc).await,
            Kind::RoutingPolicy => {
                served_and_ours::<floodgate_crds::RoutingPolicy>(&client, &ns, kind, &name, &doc)
                    .await
            }
        };
        assert_eq!(
            served["spec"], ours["spec"],
            "{kind}/{name}: the server's defaults differ from ours"
        );
        compared += 1;
    }
    assert_eq!(compared, 8);
}

async fn served_and_ours<T>(
    client: &kube::Client,
    ns: &TestNamespace,
    kind: Kind,
    name: &str,
    doc: &Value,
) -> (Value, Value)
where
    T: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let served: T = Api::<T>::namespaced(client.clone(), ns.name())
        .get(name)
        .await
        .unwrap();
    let ours: T = validate_object(kind, doc).unwrap();
    (to_value(&served), to_value(&ours))
}

#[tokio::test]
#[ignore = "needs a Kubernetes API server: `make e2e` (see e2e/src/cluster.rs)"]
async fn kubectl_get_shows_the_pool_printer_columns() {
    let (cluster, ns) = setup("columns").await;
    let pools = cluster
        .repo_root()
        .join("examples/scaling-500rpm/10-pools.yaml");
    cluster
        .kubectl(["apply", "-n", ns.name(), "-f", pools.to_str().unwrap()])
        .await
        .unwrap()
        .ok()
        .unwrap();
    let api: Api<AIProviderPool> = Api::namespaced(cluster.client().await.unwrap(), ns.name());
    let status = AIProviderPoolStatus {
        observed_generation: Some(1),
        conditions: vec![Condition {
            type_: "Ready".into(),
            status: ConditionStatus::True,
            reason: "KeysReady".into(),
            message: "9 of 10 keys ready".into(),
            last_transition_time: "2026-01-01T00:00:00Z".into(),
            observed_generation: Some(1),
        }],
        provider_count: 3,
        ready_keys: 9,
        total_keys: 10,
        keys: Some("9/10".into()),
        capacity_rpm: 740,
        used_rpm: 123,
        open_circuits: Some(2),
        providers: Vec::new(),
    };
    let written = api
        .patch_status(
            "premium",
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await
        .unwrap();
    assert_eq!(
        written.status.as_ref(),
        Some(&status),
        "the server changed the status it was given"
    );
    assert_eq!(
        written.metadata.generation,
        Some(1),
        "a status write must not bump the generation"
    );

    let out = cluster
        .kubectl(["get", "aiproviderpools", "-n", ns.name()])
        .await
        .unwrap()
        .ok()
        .unwrap();
    let table = Table::parse(&out.stdout);
    assert_eq!(
        table.header,
        [
            "NAME",
            "PROVIDERS",
            "KEYS",
            "CAPACITY RPM",
            "USED RPM",
            "OPEN CIRCUITS",
            "READY",
            "AGE"
        ],
        "{}",
        out.stdout
    );
    let premium = table
        .row("premium")
        .unwrap_or_else(|| panic!("no premium row:\n{}", out.stdout));
    assert_eq!(
        premium[..7],
        ["premium", "3", "9/10", "740", "123", "2", "True"],
        "{}",
        out.stdout
    );
    assert!(!premium[7].is_empty(), "AGE is empty:\n{}", out.stdout);
    let local = table.row("local").unwrap();
    assert_eq!(
        local[1..7],
        ["", "", "", "", "", ""],
        "a pool without status shows empty cells:\n{}",
        out.stdout
    );

    // With the status subresource on, a status in a write to the main resource is ignored.
    api.patch(
        "premium",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"usedRpm": 999}})),
    )
    .await
    .unwrap();
    assert_eq!(
        api.get("premium").await.unwrap().status.unwrap().used_rpm,
        123
    );
}

/// A `kubectl get` table, cut at the header's column offsets (cells may be empty).
struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn parse(text: &str) -> Table {
        let mut lines = text.lines();
        let head = lines.next().unwrap_or_default();
        let mut starts = Vec::new();
        let mut header = Vec::new();
        let mut rest = head;
        while !rest.trim_start().is_empty() {
            let skipped = rest.len() - rest.trim_start().len();
            let start = head.len() - rest.len() + skipped;
            // Column titles are separated by at least two spaces; a title may hold one.
            let title_len = head[start..].find("  ").unwrap_or(head.len() - start);
            header.push(head[start..start + title_len].to_owned());
            starts.push(start);
            rest = &head[start + title_len..];
        }
        let rows = lines
            .map(|line| {
                (0..starts.len())
                    .map(|i| {
                        let end = starts
                            .get(i + 1)
                            .copied()
                            .unwrap_or(line.len())
                            .min(line.len());
                        line.get(starts[i].min(end)..end)
                            .unwrap_or_default()
                            .trim()
                            .to_owned()
                    })
                    .collect()
            })
            .collect();
        Table { header, rows }
    }

    fn row(&self, name: &str) -> Option<&Vec<String>> {
        self.rows
            .iter()
            .find(|r| r.first().is_some_and(|n| n == name))
    }
}

async fn get_json(cluster: &Cluster, ns: &TestNamespace, object: &str) -> Value {
    let out = cluster
        .kubectl(["get", "-n", ns.name(), object, "-o", "json"])
        .await
        .unwrap()
        .ok()
        .unwrap();
    serde_json::from_str(&out.stdout).unwrap()
}

fn example_documents(dir: &Path) -> Vec<Value> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| {
            serde_saphyr::from_multiple::<Value>(&std::fs::read_to_string(f).unwrap()).unwrap()
        })
        .filter(|d| !d.is_null())
        .collect()
}

/// The first place where `a` and `b` differ, as `pointer: a | b`; numbers compare by value
/// (the server may write `1000` where the generator wrote `1000.0`).
fn difference(a: &Value, b: &Value, at: String) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| {
                let (u, v) = (
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                );
                difference(u, v, format!("{at}/{k}"))
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (u, v))| difference(u, v, format!("{at}/{i}"))),
        (Value::Number(x), Value::Number(y)) if x.as_f64() == y.as_f64() => None,
        _ if a == b => None,
        _ => Some(format!("{at}: {a} | {b}")),
    }
}

fn to_value(v: &impl Serialize) -> Value {
    serde_json::to_value(v).unwrap()
}

#[tokio::test]
#[ignore = "needs a Kubernetes API server: `make e2e` (see e2e/src/cluster.rs)"]
async fn status_conditions_are_held_to_the_metav1_condition_schema() {
    let (cluster, ns) = setup("conditions").await;
    let pools = cluster
        .repo_root()
        .join("examples/scaling-500rpm/10-pools.yaml");
    cluster
        .kubectl(["apply", "-n", ns.name(), "-f", pools.to_str().unwrap()])
        .await
        .unwrap()
        .ok()
        .unwrap();
    let api: Api<AIProviderPool> = Api::namespaced(cluster.client().await.unwrap(), ns.name());
    let good = json!({
        "type": "Ready", "status": "True", "reason": "AllKeysReady", "message": "",
        "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1
    });
    let with = |field: &str, value: Value| {
        let mut c = good.clone();
        match value {
            Value::Null => c.as_object_mut().unwrap().remove(field),
            v => c.as_object_mut().unwrap().insert(field.to_owned(), v),
        };
        c
    };
    let write = |condition: Value| {
        let api = api.clone();
        async move {
            api.patch_status(
                "premium",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"conditions": [condition]}})),
            )
            .await
        }
    };
    write(good.clone()).await.unwrap();
    let bad = [
        ("reason", json!("keys ready"), "status.conditions[0].reason"),
        ("reason", json!(""), "status.conditions[0].reason"),
        (
            "reason",
            json!("R".repeat(1025)),
            "status.conditions[0].reason",
        ),
        ("message", Value::Null, "status.conditions[0].message"),
        (
            "message",
            json!("m".repeat(32769)),
            "status.conditions[0].message",
        ),
        (
            "lastTransitionTime",
            json!("yesterday"),
            "status.conditions[0].lastTransitionTime",
        ),
        ("type", json!("not a type!"), "status.conditions[0].type"),
        ("type", json!("T".repeat(317)), "status.conditions[0].type"),
        (
            "observedGeneration",
            json!(-1),
            "status.conditions[0].observedGeneration",
        ),
    ];
    for (field, value, path) in bad {
        let shown = value.to_string().chars().take(40).collect::<String>();
        match write(with(field, value)).await {
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 422, "{field}={shown}: {status:?}");
                assert!(
                    status.message.contains(path),
                    "{field}={shown}: the refusal does not name {path}: {}",
                    status.message
                );
            }
            other => panic!("{field}={shown} was not refused: {other:?}"),
        }
    }
    // A domain-prefixed type is a valid one.
    write(with("type", json!("floodgate.dev/KeysReady")))
        .await
        .unwrap();
}

#[tokio::test]
#[ignore = "needs a Kubernetes API server: `make e2e` (see e2e/src/cluster.rs)"]
async fn two_managers_applying_entries_of_one_keyed_list_both_keep_theirs() {
    let (cluster, ns) = setup("maplists").await;
    let client = cluster.client().await.unwrap();
    let tenants: Api<Tenant> = Api::namespaced(client.clone(), ns.name());
    let policies: Api<floodgate_crds::RoutingPolicy> = Api::namespaced(client, ns.name());
    let key = |name: &str| json!({"name": name, "secretRef": {"name": "acme-keys", "key": name}});
    let tenant = |name: &str| {
        json!({"apiVersion": "floodgate.dev/v1alpha1", "kind": "Tenant",
               "metadata": {"name": "acme"}, "spec": {"keys": [key(name)]}})
    };
    let budgets = |tenant: &str, pool: &str| {
        json!({"apiVersion": "floodgate.dev/v1alpha1", "kind": "RoutingPolicy",
               "metadata": {"name": "routing"}, "spec": {"budgets": {
                   "tenants": [{"name": tenant, "monthlyUSD": 10.0}],
                   "pools": [{"name": pool, "monthlyUSD": 100.0}]}}})
    };
    // Not forced: on an atomic list the second manager's apply is a conflict.
    for (manager, entry) in [("team-a", "a"), ("team-b", "b")] {
        tenants
            .patch(
                "acme",
                &PatchParams::apply(manager),
                &Patch::Apply(tenant(entry)),
            )
            .await
            .unwrap_or_else(|e| panic!("{manager}'s key: {e}"));
        policies
            .patch(
                "routing",
                &PatchParams::apply(manager),
                &Patch::Apply(budgets(
                    &format!("tenant-{entry}"),
                    &format!("pool-{entry}"),
                )),
            )
            .await
            .unwrap_or_else(|e| panic!("{manager}'s budgets: {e}"));
    }
    let names = |v: Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let keys = to_value(&tenants.get("acme").await.unwrap().spec.keys);
    assert_eq!(names(keys), ["a", "b"]);
    let policy = to_value(&policies.get("routing").await.unwrap().spec.budgets);
    assert_eq!(names(policy["tenants"].clone()), ["tenant-a", "tenant-b"]);
    assert_eq!(names(policy["pools"].clone()), ["pool-a", "pool-b"]);

    // Each manager owns its own entry: team-a withdrawing its key leaves team-b's.
    tenants
        .patch(
            "acme",
            &PatchParams::apply("team-a"),
            &Patch::Apply(
                json!({"apiVersion": "floodgate.dev/v1alpha1", "kind": "Tenant",
                                 "metadata": {"name": "acme"}}),
            ),
        )
        .await
        .unwrap();
    let keys = to_value(&tenants.get("acme").await.unwrap().spec.keys);
    assert_eq!(names(keys), ["b"]);
}
