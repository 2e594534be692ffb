//! Loading standalone manifests: good files load, bad ones are refused naming the file, the
//! document, the resource and the field, and secret values never appear in errors.

use super::load::{load_config, load_paths};
use super::secrets::{SecretSources, env_var_name};
use super::*;
use std::collections::HashMap;
use std::io::Write;

const POOL: &str = r#"
apiVersion: floodgate.dev/v1alpha1
kind: AIProviderPool
metadata: {name: main}
spec:
  providers:
  - name: openai
    type: openai
    models: [{name: gpt-4o, alias: smart}]
    keys:
    - {secretRef: {name: keys, key: openai}, rpm: 100, tpm: 1000}
    - {name: backup, secretRef: {name: keys, key: openai2}, rpm: 50}
  - name: local
    type: ollama
    models: [{name: "llama3.1:8b", alias: smart}]
"#;

const SECRET: &str = r#"
apiVersion: v1
kind: Secret
metadata: {name: keys}
data:
  openai: c2stZnJvbS1kYXRh
stringData:
  openai2: sk-from-string-data
"#;

fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::File::create(path)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    dir
}

fn load(dir: &tempfile::TempDir) -> Result<Config, ConfigErrors> {
    load_config(&[dir.path().to_owned()], SecretSources::default()).map(|(c, _)| c)
}

#[test]
fn loads_a_pool_with_secrets_from_manifests() {
    let dir = dir_with(&[("pool.yaml", POOL), ("secrets/keys.yml", SECRET)]);
    let config = load(&dir).unwrap();
    let openai = &config.pools[0].providers[0];
    assert_eq!(openai.base_url, "https://api.openai.com");
    assert_eq!(openai.keys[0].name, "openai-0");
    assert_eq!(openai.keys[0].secret.expose(), "sk-from-data");
    assert_eq!(openai.keys[0].tpm.map(|t| t.get()), Some(1000));
    assert_eq!(openai.keys[1].name, "backup");
    assert_eq!(openai.keys[1].secret.expose(), "sk-from-string-data");
    let ids: Vec<_> = config.models().into_iter().map(|m| m.id).collect();
    assert_eq!(ids, ["gpt-4o", "llama3.1:8b", "smart"]);
}

#[test]
fn environment_overrides_manifest_secrets() {
    let dir = dir_with(&[("pool.yaml", POOL), ("keys.yaml", SECRET)]);
    let env = HashMap::from([(env_var_name("keys", "openai"), "sk-from-env".to_owned())]);
    let secrets = SecretSources {
        env,
        ..Default::default()
    };
    let (config, _) = load_config(&[dir.path().to_owned()], secrets).unwrap();
    assert_eq!(
        config.pools[0].providers[0].keys[0].secret.expose(),
        "sk-from-env"
    );
    assert_eq!(
        env_var_name("claude-keys", "key1"),
        "FLOODGATE_SECRET_CLAUDE_KEYS_KEY1"
    );
}

#[test]
fn secrets_directory_is_read_like_a_mounted_secret() {
    let dir = dir_with(&[("pool.yaml", POOL)]);
    let secrets_dir = dir_with(&[("keys/openai", "sk-from-file\n"), ("keys/openai2", "sk-2")]);
    let secrets = SecretSources {
        dir: Some(secrets_dir.path().to_owned()),
        ..Default::default()
    };
    let (config, _) = load_config(&[dir.path().to_owned()], secrets).unwrap();
    assert_eq!(
        config.pools[0].providers[0].keys[0].secret.expose(),
        "sk-from-file"
    );
}

#[test]
fn a_missing_secret_names_the_secret_ref_and_not_any_value() {
    let dir = dir_with(&[("pool.yaml", POOL)]);
    let errors = load(&dir).unwrap_err().0;
    assert_eq!(errors.len(), 2);
    assert_eq!(errors[0].field, "spec.providers[0].keys[0].secretRef");
    assert_eq!(errors[0].resource.as_deref(), Some("AIProviderPool/main"));
    assert!(
        errors[0]
            .to_string()
            .contains("FLOODGATE_SECRET_KEYS_OPENAI"),
        "{}",
        errors[0]
    );
}

#[test]
fn a_bad_document_names_file_document_resource_and_field() {
    let bad = POOL.replace("rpm: 100", "rpm: -1");
    let dir = dir_with(&[
        ("a.yaml", SECRET),
        ("b.yaml", &format!("{SECRET}\n---\n{bad}")),
    ]);
    let errors = load(&dir).unwrap_err();
    let e = errors.0.iter().find(|e| e.field.ends_with("rpm")).unwrap();
    assert_eq!(e.origin.as_ref().unwrap().file, dir.path().join("b.yaml"));
    assert_eq!(e.origin.as_ref().unwrap().document, 2);
    assert_eq!(e.field, "spec.providers[0].keys[0].rpm");
    let text = e.to_string();
    assert!(
        text.contains("b.yaml: document 2 (AIProviderPool/main): spec.providers[0].keys[0].rpm:"),
        "{text}"
    );
}

#[test]
fn inline_keys_are_refused_and_never_echoed() {
    let bad = POOL.replace(
        "{secretRef: {name: keys, key: openai}, rpm: 100, tpm: 1000}",
        "{apiKey: sk-live-VERYSECRET, rpm: 100}",
    );
    let dir = dir_with(&[("pool.yaml", &bad), ("keys.yaml", SECRET)]);
    let errors = load(&dir).unwrap_err();
    let text = errors.to_string();
    assert!(text.contains("spec.providers[0].keys[0].apiKey"), "{text}");
    assert!(
        text.contains("spec.providers[0].keys[0].secretRef: Required value"),
        "{text}"
    );
    assert!(!text.contains("VERYSECRET"), "{text}");
}

#[test]
fn yaml_syntax_errors_name_the_file_without_quoting_it() {
    let dir = dir_with(&[(
        "broken.yaml",
        "apiVersion: v1\nkind: Secret\nstringData: {a: sk-TOPSECRET\n",
    )]);
    let text = load(&dir).unwrap_err().to_string();
    assert!(text.contains("broken.yaml"), "{text}");
    assert!(text.contains("not valid YAML"), "{text}");
    assert!(!text.contains("TOPSECRET"), "{text}");
}

#[test]
fn every_problem_is_reported_together() {
    let bad_pool = POOL.replace("type: openai", "type: cohere");
    let bad_cache = "apiVersion: floodgate.dev/v1alpha1\nkind: CachePolicy\nmetadata: {name: c}\nspec: {semantic: {ttlSeconds: 1, threshold: 1.5}}\n";
    let dir = dir_with(&[
        ("pool.yaml", &bad_pool),
        ("cache.yaml", bad_cache),
        ("keys.yaml", SECRET),
    ]);
    let fields: Vec<String> = load(&dir)
        .unwrap_err()
        .0
        .into_iter()
        .map(|e| e.field)
        .collect();
    assert!(
        fields.contains(&"spec.providers[0].type".to_owned()),
        "{fields:?}"
    );
    assert!(
        fields.contains(&"spec.semantic.threshold".to_owned()),
        "{fields:?}"
    );
}

#[test]
fn duplicate_resources_are_refused() {
    let dir = dir_with(&[("a.yaml", POOL), ("b.yaml", POOL), ("keys.yaml", SECRET)]);
    let errors = load(&dir).unwrap_err().0;
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].field, "metadata.name");
    assert_eq!(
        errors[0].origin.as_ref().unwrap().file,
        dir.path().join("b.yaml")
    );
}

#[test]
fn unknown_floodgate_kinds_and_versions_are_refused_but_other_kinds_are_skipped() {
    let docs = "apiVersion: floodgate.dev/v1alpha1\nkind: Gateway\nmetadata: {name: g}\n---\n\
                apiVersion: floodgate.dev/v2\nkind: CachePolicy\nmetadata: {name: c}\nspec: {}\n---\n\
                apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n";
    let dir = dir_with(&[("x.yaml", docs)]);
    let errors = load_paths(&[dir.path().to_owned()]).unwrap_err().0;
    let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, ["kind", "apiVersion"]);
    let ok = dir_with(&[
        (
            "d.yaml",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n",
        ),
        ("p.yaml", POOL),
        ("k.yaml", SECRET),
    ]);
    let (_, warnings) = load_config(&[ok.path().to_owned()], SecretSources::default()).unwrap();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
}

#[test]
fn an_empty_directory_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    assert!(load_paths(&[dir.path().to_owned()]).is_err());
    assert!(load_paths(&[dir.path().join("missing")]).is_err());
}

#[test]
fn a_second_tier_queue_is_refused() {
    let tq = "apiVersion: floodgate.dev/v1alpha1\nkind: TierQueue\nmetadata: {name: NAME}\nspec:\n  tiers: [{name: a, class: standard, maxWaitMs: 1000}]\n";
    let dir = dir_with(&[
        ("a.yaml", &tq.replace("NAME", "one")),
        ("b.yaml", &tq.replace("NAME", "two")),
    ]);
    let errors = load(&dir).unwrap_err().0;
    assert_eq!(errors[0].resource.as_deref(), Some("TierQueue/two"));
}

const TIERS: &str = r#"
apiVersion: floodgate.dev/v1alpha1
kind: TierQueue
metadata: {name: tiers}
spec:
  defaultTier: basic
  tiers:
  - {name: pro, class: priority, maxWaitMs: 2000}
  - {name: basic, class: standard, maxWaitMs: 5000}
"#;

fn tenant_doc(name: &str, tier: Option<&str>, key: &str) -> String {
    let tier = tier.map_or(String::new(), |t| format!("  tier: {t}\n"));
    format!(
        "apiVersion: floodgate.dev/v1alpha1\nkind: Tenant\nmetadata: {{name: {name}}}\nspec:\n{tier}  keys:\n  - {{name: main, secretRef: {{name: clients, key: {key}}}}}\n  limits: {{rpm: 60, concurrent: 2}}\n  models: [smart]\n"
    )
}

const CLIENTS: &str = r#"
apiVersion: v1
kind: Secret
metadata: {name: clients}
stringData: {a: sk-client-a, b: sk-client-b, empty: ""}
"#;

#[test]
fn tenants_resolve_with_hashed_keys_and_their_tier() {
    let acme = tenant_doc("acme", Some("pro"), "a");
    let globex = tenant_doc("globex", None, "b");
    let dir = dir_with(&[
        ("pool.yaml", POOL),
        ("s.yaml", SECRET),
        ("tiers.yaml", TIERS),
        ("clients.yaml", CLIENTS),
        ("acme.yaml", &acme),
        ("globex.yaml", &globex),
    ]);
    let config = load(&dir).unwrap();
    let names: Vec<&str> = config.tenants.iter().map(|t| &*t.name).collect();
    assert_eq!(names, ["acme", "globex"]);
    let acme = &config.tenants[0];
    assert_eq!(acme.tier.as_deref(), Some("pro"));
    assert!(acme.keys[0].digest.matches(&KeyDigest::of("sk-client-a")));
    assert_eq!(acme.limits.rpm.map(NonZeroU32::get), Some(60));
    assert_eq!(acme.limits.concurrent.map(NonZeroU32::get), Some(2));
    assert!(acme.models.as_ref().unwrap().contains("smart"));
    // No tier of its own: the TierQueue's default.
    assert_eq!(config.tenants[1].tier.as_deref(), Some("basic"));
    // The key is nowhere in what the gateway keeps.
    assert!(!format!("{config:?}").contains("sk-client-a"));
}

#[test]
fn a_tenant_tier_must_name_a_tier_of_the_tier_queue() {
    let bad = tenant_doc("acme", Some("gold"), "a");
    let dir = dir_with(&[("tiers.yaml", TIERS), ("c.yaml", CLIENTS), ("t.yaml", &bad)]);
    let errors = load(&dir).unwrap_err().to_string();
    assert!(
        errors.contains("t.yaml: document 1 (Tenant/acme): spec.tier: names no tier of TierQueue/tiers; its tiers are pro, basic"),
        "{errors}"
    );
    // Without a TierQueue a tier cannot be honoured: refused too.
    let named = tenant_doc("acme", Some("pro"), "a");
    let dir = dir_with(&[("c.yaml", CLIENTS), ("t.yaml", &named)]);
    let errors = load(&dir).unwrap_err().to_string();
    assert!(
        errors.contains("(Tenant/acme): spec.tier: names a tier, but no TierQueue is configured"),
        "{errors}"
    );
    // Without either, the tenant has no tier.
    let plain = tenant_doc("acme", None, "a");
    let dir = dir_with(&[("c.yaml", CLIENTS), ("t.yaml", &plain)]);
    assert_eq!(load(&dir).unwrap().tenants[0].tier, None);
}

#[test]
fn client_keys_must_resolve_be_non_empty_and_identify_one_tenant() {
    let missing = tenant_doc("acme", None, "nope");
    let dir = dir_with(&[("c.yaml", CLIENTS), ("t.yaml", &missing)]);
    let errors = load(&dir).unwrap_err().to_string();
    assert!(
        errors.contains(
            "(Tenant/acme): spec.keys[0].secretRef: Secret \"clients\" has no key \"nope\""
        ),
        "{errors}"
    );
    let empty = tenant_doc("acme", None, "empty");
    let dir = dir_with(&[("c.yaml", CLIENTS), ("t.yaml", &empty)]);
    let errors = load(&dir).unwrap_err().to_string();
    assert!(
        errors.contains("spec.keys[0].secretRef: Secret \"clients\" key \"empty\" is empty"),
        "{errors}"
    );
    let (a, b) = (
        tenant_doc("acme", None, "a"),
        tenant_doc("globex", None, "a"),
    );
    let dir = dir_with(&[("c.yaml", CLIENTS), ("a.yaml", &a), ("b.yaml", &b)]);
    let errors = load(&dir).unwrap_err().to_string();
    assert!(
        errors.contains("(Tenant/globex): spec.keys: client key \"main\" has the same value as key \"main\" of Tenant/acme"),
        "{errors}"
    );
    assert!(!errors.contains("sk-client-a"), "{errors}");
}

#[test]
fn tenants_in_cluster_mode_are_named_with_their_namespace() {
    let mut resources = load_paths(&[dir_with(&[("t.yaml", &tenant_doc("acme", None, "a"))])
        .path()
        .to_owned()])
    .unwrap()
    .resources;
    resources.namespace = Some("team-a".into());
    let mut secrets = SecretSources::default();
    secrets.manifests.insert(
        ("clients".into(), "a".into()),
        SecretString::new("sk-client-a"),
    );
    let config = Config::resolve(resources, &secrets).unwrap();
    assert_eq!(&*config.tenants[0].name, "team-a/acme");
}

fn email_tier(email: &str) -> String {
    format!(
        "apiVersion: floodgate.dev/v1alpha1\nkind: TierQueue\nmetadata: {{name: tiers}}\nspec:\n  tiers:\n  - name: free\n    class: batch\n    maxWaitMs: 1000\n    batch: {{size: 1, intervalSeconds: 1}}\n    async: {{email: {email}}}\n"
    )
}

#[test]
fn a_tiers_email_settings_resolve_with_their_secrets() {
    let smtp = "apiVersion: v1\nkind: Secret\nmetadata: {name: smtp}\nstringData: {login: \"mailer:pa:ss-e2e\"}\n";
    let tier = email_tier(
        "{from: a@example.com, smtpServer: \"smtp.example.com:587\", credentialsSecretRef: {name: smtp, key: login}}",
    );
    let dir = dir_with(&[
        ("pool.yaml", POOL),
        ("s.yaml", SECRET),
        ("smtp.yaml", smtp),
        ("t.yaml", &tier),
    ]);
    let config = load(&dir).unwrap();
    let e = &config.email["free"];
    assert_eq!(
        (e.host.as_str(), e.port, e.from.as_str()),
        ("smtp.example.com", 587, "a@example.com")
    );
    let (user, password) = e.credentials.as_ref().unwrap();
    assert_eq!((user.as_str(), password.expose()), ("mailer", "pa:ss-e2e"));
    assert!(e.ca_pem.is_none());
}

#[test]
fn bad_email_settings_name_their_field_and_never_the_credentials() {
    let smtp = "apiVersion: v1\nkind: Secret\nmetadata: {name: smtp}\nstringData: {login: no-colon-secret-value, ca: not-a-pem}\n";
    let tier = email_tier(
        "{from: a@example.com, smtpServer: \"smtp.example.com:587\", credentialsSecretRef: {name: smtp, key: login}, caSecretRef: {name: smtp, key: ca}}",
    );
    let dir = dir_with(&[
        ("pool.yaml", POOL),
        ("s.yaml", SECRET),
        ("smtp.yaml", smtp),
        ("t.yaml", &tier),
    ]);
    let errors = load(&dir).unwrap_err().0;
    let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "spec.tiers[0].async.email.credentialsSecretRef",
            "spec.tiers[0].async.email.caSecretRef"
        ]
    );
    assert!(
        errors
            .iter()
            .all(|e| !e.to_string().contains("no-colon-secret-value"))
    );
    // A missing Secret names the reference.
    let dir = dir_with(&[("pool.yaml", POOL), ("s.yaml", SECRET), ("t.yaml", &tier)]);
    let errors = load(&dir).unwrap_err().0;
    assert!(
        errors[0]
            .to_string()
            .contains("FLOODGATE_SECRET_SMTP_LOGIN"),
        "{}",
        errors[0]
    );
}

#[test]
fn a_tiers_own_email_recipient_is_validated_and_its_use_is_said() {
    let tier = |email: &str, notify: &str| {
        email_tier(email).replace(
            "async: {email:",
            &format!("async: {{notify: [{notify}], email:"),
        )
    };
    let smtp = "{from: a@example.com, smtpServer: \"smtp.example.com:587\"";
    let load_tier = |yaml: &str| {
        let dir = dir_with(&[("pool.yaml", POOL), ("s.yaml", SECRET), ("t.yaml", yaml)]);
        load(&dir)
    };
    // A recipient, emailed for the tier: nothing to say.
    let config = load_tier(&tier(&format!("{smtp}, to: ops@example.com}}"), "email")).unwrap();
    assert!(
        config.not_acted_on().is_empty(),
        "{:?}",
        config.not_acted_on()
    );
    // No recipient: only jobs naming one are emailed, and that is said.
    let config = load_tier(&tier(&format!("{smtp}}}"), "email")).unwrap();
    assert_eq!(config.not_acted_on().len(), 1);
    assert!(config.not_acted_on()[0].contains("async.email.to is not set"));
    // A recipient the tier never writes to is said too.
    let config = load_tier(&tier(&format!("{smtp}, to: ops@example.com}}"), "")).unwrap();
    assert!(config.not_acted_on()[0].contains("async.notify does not list email"));
    // Not an address: refused, naming the field.
    let errors = load_tier(&tier(&format!("{smtp}, to: \"ops at example\"}}"), "email"))
        .unwrap_err()
        .0;
    assert!(
        errors.iter().any(|e| e.field.ends_with("async.email.to")),
        "{errors:?}"
    );
}

#[test]
fn a_tier_webhook_without_a_signing_secret_is_said_to_go_out_unsigned() {
    let tier = |webhook: &str| {
        format!(
            "apiVersion: floodgate.dev/v1alpha1\nkind: TierQueue\nmetadata: {{name: tiers}}\nspec:\n  tiers:\n  - name: free\n    class: batch\n    maxWaitMs: 1000\n    batch: {{size: 1, intervalSeconds: 1}}\n    async: {{notify: [webhook], webhook: {webhook}}}\n"
        )
    };
    let load_tier = |yaml: &str| {
        let dir = dir_with(&[("pool.yaml", POOL), ("s.yaml", SECRET), ("t.yaml", yaml)]);
        load(&dir).unwrap()
    };
    // Signed: nothing to say.
    let signed = load_tier(&tier(
        "{url: \"https://hooks.example.com/x\", signingSecretRef: {name: keys, key: openai2}}",
    ));
    assert!(
        signed.not_acted_on().is_empty(),
        "{:?}",
        signed.not_acted_on()
    );
    // Unsigned: said, naming the tier's field.
    let unsigned = load_tier(&tier("{url: \"https://hooks.example.com/x\"}"));
    let notes = unsigned.not_acted_on();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].contains("spec.tiers[0].async.webhook has no signingSecretRef")
            && notes[0].contains("unsigned"),
        "{notes:?}"
    );
}
