//! The rebuild step of cluster mode, on caches filled by hand (the watch itself runs against a
//! real API server in the e2e suite, `e2e/tests/cluster_proxy.rs`).

use super::*;
use k8s_openapi::ByteString;
use serde_json::json;
use std::collections::BTreeMap;

fn pool(name: &str, rpm: i64) -> DynamicObject {
    let value = json!({
        "apiVersion": "floodgate.dev/v1alpha1",
        "kind": "AIProviderPool",
        "metadata": {"name": name, "namespace": "ns", "resourceVersion": "1"},
        "spec": {"providers": [{
            "name": "claude", "type": "anthropic",
            "models": [{"name": format!("model-of-{name}")}],
            "keys": [{"name": "k1", "secretRef": {"name": "claude-keys", "key": "key1"}, "rpm": rpm}]
        }]}
    });
    serde_json::from_value(value).unwrap()
}

fn secret(name: &str, data: &[(&str, &[u8])]) -> Secret {
    let mut secret = Secret::default();
    secret.metadata.name = Some(name.to_owned());
    secret.data = Some(
        data.iter()
            .map(|(k, v)| ((*k).to_owned(), ByteString(v.to_vec())))
            .collect::<BTreeMap<_, _>>(),
    );
    secret
}

/// Caches holding `pools` and `secrets`, as the reflectors would after listing.
fn stores(pools: Vec<DynamicObject>, secrets: Vec<Secret>) -> Stores {
    let mut kinds = HashMap::new();
    for kind in Kind::ALL {
        let mut writer = Writer::new(api_resource(kind));
        if kind == Kind::AIProviderPool {
            for p in &pools {
                writer.apply_watcher_event(&watcher::Event::Apply(p.clone()));
            }
        }
        kinds.insert(kind, writer.as_reader());
    }
    let mut writer = Writer::<Secret>::default();
    for s in &secrets {
        writer.apply_watcher_event(&watcher::Event::Apply(s.clone()));
    }
    // Readers stay valid after their writer is dropped.
    Stores {
        kinds,
        secrets: writer.as_reader(),
    }
}

fn resolve(stores: &Stores) -> Result<Config, ConfigErrors> {
    let resources = collect_resources(stores, &mut HashSet::new());
    let secrets = SecretSources {
        manifests: secret_values(&stores.secrets.state()),
        ..SecretSources::default()
    };
    Config::resolve(resources, &secrets)
}

#[test]
fn a_valid_pool_resolves_with_its_secret() {
    let stores = stores(
        vec![pool("premium", 20)],
        vec![secret("claude-keys", &[("key1", b"sk-1\n")])],
    );
    let config = resolve(&stores).unwrap();
    let key = &config.pools[0].providers[0].keys[0];
    assert_eq!(key.rpm.get(), 20);
    assert_eq!(
        key.secret.expose(),
        "sk-1",
        "the trailing newline of --from-file is dropped"
    );
    // Schema defaults are applied, as on the API server.
    assert_eq!(config.pools[0].spec.max_attempts, 3);
}

#[test]
fn an_invalid_object_is_skipped_and_the_others_kept() {
    let stores = stores(
        vec![pool("bad", 0), pool("good", 20)],
        vec![secret("claude-keys", &[("key1", b"sk-1")])],
    );
    let mut warned = HashSet::new();
    let resources = collect_resources(&stores, &mut warned);
    let names: Vec<String> = resources
        .pools
        .iter()
        .map(|p| p.resource.name_any())
        .collect();
    assert_eq!(names, ["good"]);
    assert_eq!(
        warned.len(),
        1,
        "the invalid object is logged once per version"
    );
    let again = collect_resources(&stores, &mut warned);
    assert_eq!(again.pools.len(), 1);
    assert_eq!(warned.len(), 1);
}

#[test]
fn pools_come_in_name_order() {
    let stores = stores(
        vec![pool("zeta", 1), pool("alpha", 2), pool("mid", 3)],
        vec![secret("claude-keys", &[("key1", b"sk")])],
    );
    let config = resolve(&stores).unwrap();
    let names: Vec<&str> = config.pools.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["alpha", "mid", "zeta"]);
}

#[test]
fn a_missing_secret_fails_resolution_without_quoting_values() {
    let stores = stores(
        vec![pool("premium", 20)],
        vec![secret("other", &[("key1", b"sk-do-not-print")])],
    );
    let errors = resolve(&stores).unwrap_err();
    assert_eq!(errors.0[0].field, "spec.providers[0].keys[0].secretRef");
    assert!(!errors.to_string().contains("sk-do-not-print"));
}

#[test]
fn non_utf8_secret_values_are_left_out() {
    let values = secret_values(&[Arc::new(secret(
        "s",
        &[("bin", &[0xff, 0xfe]), ("text", b"v")],
    ))]);
    assert_eq!(values.len(), 1);
    assert_eq!(values[&("s".to_owned(), "text".to_owned())].expose(), "v");
}

#[test]
fn secret_decoding_errors_are_withheld() {
    let serde_error =
        serde_json::from_str::<Secret>("{\"data\": {\"k\": \"sk-secret-value!\"}}").unwrap_err();
    let error = watcher::Error::WatchFailed(kube::Error::SerdeError(serde_error));
    let text = describe(Source::Secrets, &error);
    assert!(
        !text.contains("sk-secret") && text.contains("withheld"),
        "{text}"
    );
    assert!(describe(Source::Kind(Kind::TierQueue), &error).contains("watch stream failed"));
}

#[test]
fn the_initial_config_serves_nothing() {
    let config = initial_config();
    assert!(config.models().is_empty());
}
