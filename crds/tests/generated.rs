//! The committed CRD YAML is exactly what the types generate, carries the printer columns and
//! CEL rules, and every example manifest round-trips YAML -> type -> YAML.
#![expect(
    clippy::unwrap_used,
    clippy::panic,
    reason = "test helpers outside #[test] functions"
)]

use floodgate_crds::validate::validate_object;
use floodgate_crds::{
    AIProviderPool, CachePolicy, Kind, LocalModelDeployment, Tenant, TierQueue, crd_yaml,
};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn committed_crds_match_the_types() {
    for dir in ["crds/manifests", "charts/floodgate/crds"] {
        for kind in Kind::ALL {
            let path = root().join(dir).join(kind.manifest_file_name());
            let committed = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}; run `make crds`", path.display()));
            assert!(
                committed == crd_yaml(kind).unwrap(),
                "{} differs from what the types generate; run `make crds` and commit the result",
                path.display()
            );
        }
    }
}

fn committed(kind: Kind) -> Value {
    let path = root()
        .join("crds/manifests")
        .join(kind.manifest_file_name());
    serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn rules(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::Array(rs)) = map.get("x-kubernetes-validations") {
                out.extend(rs.iter().map(|r| r["rule"].as_str().unwrap().to_owned()));
            }
            map.values().for_each(|v| rules(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| rules(v, out)),
        _ => {}
    }
}

#[test]
fn printer_columns_and_cel_rules_are_in_the_yaml() {
    let expected: [(Kind, &[&str], &[&str]); 5] = [
        (
            Kind::AIProviderPool,
            &[
                "Providers",
                "Keys",
                "Capacity RPM",
                "Used RPM",
                "Open Circuits",
                "Ready",
                "Age",
            ],
            &[
                "self.providers.exists_one",
                "self.fallback.all",
                "size(self.keys) > 0",
            ],
        ),
        (
            Kind::TierQueue,
            &[
                "Tiers",
                "Queued",
                "Oldest Wait Ms",
                "Dead Letters",
                "Ready",
                "Age",
            ],
            &["self.tiers.exists_one", "has(self.batch)"],
        ),
        (
            Kind::CachePolicy,
            &[
                "Exact TTL",
                "Semantic",
                "Backend",
                "Hit Ratio",
                "Semantic Hits",
                "Dedup Hits",
                "Entries",
                "Bytes",
                "Ready",
                "Age",
            ],
            &["self.items.exists_one"],
        ),
        (
            Kind::LocalModelDeployment,
            &[
                "Model",
                "Replicas",
                "Ready Replicas",
                "Queue",
                "Ready",
                "Age",
            ],
            &["self.minReplicas <= self.maxReplicas"],
        ),
        (
            Kind::Tenant,
            &[
                "Tier",
                "RPM Limit",
                "Used RPM",
                "TPM Limit",
                "Used TPM",
                "Last Seen",
                "Ready",
                "Age",
            ],
            &["self.keys.exists_one", "self.models.exists_one"],
        ),
    ];
    for (kind, columns, rule_parts) in expected {
        let crd = committed(kind);
        let version = &crd["spec"]["versions"][0];
        let names: Vec<&str> = version["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, columns, "{kind}");
        assert!(
            version["subresources"]["status"].is_object(),
            "{kind} has no status subresource"
        );
        let mut found = Vec::new();
        rules(version, &mut found);
        for part in rule_parts {
            assert!(
                found.iter().any(|r| r.contains(part)),
                "{kind}: no CEL rule containing {part}: {found:?}"
            );
        }
    }
    let lmd = committed(Kind::LocalModelDeployment);
    assert_eq!(
        lmd["spec"]["versions"][0]["subresources"]["scale"]["specReplicasPath"],
        ".spec.replicas"
    );
}

fn example_documents() -> Vec<(PathBuf, Value)> {
    let mut out = Vec::new();
    for dir in ["examples/scaling-500rpm", "examples/standalone"] {
        let mut files: Vec<_> = std::fs::read_dir(root().join(dir))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for file in files {
            let docs: Vec<Value> =
                serde_saphyr::from_multiple(&std::fs::read_to_string(&file).unwrap()).unwrap();
            out.extend(
                docs.into_iter()
                    .filter(|d| !d.is_null())
                    .map(|d| (file.clone(), d)),
            );
        }
    }
    out
}

/// Parses, validates, serializes and re-parses one resource; the typed values must agree.
fn round_trip<T>(kind: Kind, doc: &Value) -> usize
where
    T: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug,
{
    let typed: T = validate_object(kind, doc).unwrap_or_else(|e| panic!("{kind} invalid: {e:?}"));
    let yaml = serde_saphyr::to_string(&typed).unwrap();
    let back: T = serde_saphyr::from_str(&yaml).unwrap();
    assert_eq!(typed, back, "{kind} changed in a YAML round trip");
    let revalidated: T = validate_object(kind, &serde_json::to_value(&back).unwrap()).unwrap();
    assert_eq!(typed, revalidated);
    1
}

#[test]
fn every_example_resource_round_trips() {
    let mut seen = [0usize; Kind::ALL.len()];
    for (file, doc) in example_documents() {
        let Some(kind) = doc["kind"].as_str().and_then(Kind::parse) else {
            assert_eq!(doc["kind"], "Secret", "{}: unexpected kind", file.display());
            continue;
        };
        seen[kind as usize] += match kind {
            Kind::AIProviderPool => round_trip::<AIProviderPool>(kind, &doc),
            Kind::TierQueue => round_trip::<TierQueue>(kind, &doc),
            Kind::CachePolicy => round_trip::<CachePolicy>(kind, &doc),
            Kind::LocalModelDeployment => round_trip::<LocalModelDeployment>(kind, &doc),
            Kind::Tenant => round_trip::<Tenant>(kind, &doc),
            Kind::RoutingPolicy => round_trip::<floodgate_crds::RoutingPolicy>(kind, &doc),
        };
    }
    assert!(
        seen.iter().all(|&n| n > 0),
        "every kind appears in the examples: {seen:?}"
    );
}

#[test]
fn the_scaling_example_has_760_rpm_of_provider_capacity() {
    let total: u64 = example_documents()
        .into_iter()
        .filter(|(f, d)| {
            f.to_string_lossy().contains("scaling-500rpm") && d["kind"] == "AIProviderPool"
        })
        .map(|(_, d)| validate_object::<AIProviderPool>(Kind::AIProviderPool, &d).unwrap())
        .flat_map(|p| p.spec.providers)
        .flat_map(|p| p.keys)
        .map(|k| u64::from(k.rpm))
        .sum();
    assert_eq!(total, 3 * 20 + 5 * 60 + 2 * 200);
}
