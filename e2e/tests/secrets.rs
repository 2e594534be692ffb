//! Secrets and access: a full scenario through the `floodgate-proxy` binary (answers from
//! three providers, a stream, a key the provider refuses with 401, upstream 500s, a tenant's
//! key on every request and a wrong one refused with 401, a configuration reload that
//! rotates a key, budgets in a Redis that needs a password, an async job whose webhook is
//! signed and whose email goes out over SMTP with a login, the admin endpoints called with the
//! admin token and with a wrong one, traces exported, logs at `debug`), after which no log
//! line, no metric and no exported span holds a secret's value. Admin endpoints are served
//! only on the admin listener.
#![expect(clippy::unwrap_used, reason = "test helpers outside #[test] functions")]

use axum::http::HeaderMap;
use axum::routing::post;
use base64::Engine as _;
use bytes::Bytes;
use floodgate_e2e::cluster::wait_for;
use floodgate_e2e::mock::{MockConfig, MockProviders};
use floodgate_e2e::proxy::ProxyProcess;
use floodgate_e2e::redis::RedisServer;
use floodgate_e2e::smtp::{SinkOptions, SmtpSink};
use floodgate_proxy::jobs::webhook;
use std::ffi::OsStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const OPENAI: &str = "sk-secret-openai-5b1f0c77d2";
const ROTATED: &str = "sk-secret-rotated-9e4a12c3b8";
const REVOKED: &str = "sk-secret-revoked-3c8d51e0aa";
const ANTHROPIC: &str = "sk-ant-secret-anthropic-71f2d9";
const GEMINI: &str = "AIzaSecretGemini0b3e6f9a2d4c";
/// The tenant's key, which callers send.
const CLIENT: &str = "sk-client-secret-c4d7e2a91f";
/// A key no tenant has (a caller's typo, or someone else's key): refused, never shown.
const WRONG_CLIENT: &str = "sk-client-wrong-8d02b6e4c1";
const ADMIN: &str = "admin-secret-token-6a9f03d2e7";
const WRONG_ADMIN: &str = "admin-wrong-token-1c5e8b7f40";
const REDIS_PASSWORD: &str = "redis-secret-pw-4e7b90a1c3";
const SIGNING: &str = "whsec-secret-signing-2f8c61d9b5";
const SMTP_PASSWORD: &str = "smtp-secret-pw-93b1e07a4f";
const WAIT: Duration = Duration::from_secs(20);

/// Every secret's value, and the forms the SMTP login sends the password in (base64 alone
/// for AUTH LOGIN, `\0user\0password` for AUTH PLAIN).
fn secrets() -> Vec<String> {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let mut all: Vec<String> = [
        OPENAI,
        ROTATED,
        REVOKED,
        ANTHROPIC,
        GEMINI,
        CLIENT,
        WRONG_CLIENT,
        ADMIN,
        WRONG_ADMIN,
        REDIS_PASSWORD,
        SIGNING,
        SMTP_PASSWORD,
    ]
    .map(str::to_owned)
    .to_vec();
    all.push(b64(SMTP_PASSWORD));
    all.push(b64(&format!("\0mailer\0{SMTP_PASSWORD}")));
    all
}

/// The pool, a tier whose async jobs are signed and emailed (through `smtp`, its CA
/// trusted, to `hook`) and a tenant of it.
fn manifests(base: &str, openai_key: &str, hook: &str, smtp: &SmtpSink) -> String {
    let ca: String = smtp
        .ca_pem()
        .lines()
        .map(|l| format!("    {l}\n"))
        .collect();
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: keys}}\nstringData:\n  openai: {openai_key}\n  revoked: {REVOKED}\n  anthropic: {ANTHROPIC}\n  gemini: {GEMINI}\n\
         ---\napiVersion: v1\nkind: Secret\nmetadata: {{name: clients}}\nstringData:\n  acme: {CLIENT}\n  signing: {SIGNING}\n\
         ---\napiVersion: v1\nkind: Secret\nmetadata: {{name: smtp}}\nstringData:\n  login: \"mailer:{SMTP_PASSWORD}\"\n  ca: |\n{ca}\
         ---\napiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {{name: pool}}\nspec:\n  providers:\n\
         \x20 - {{name: openai, type: openai, baseUrl: \"{base}\", models: [{{name: gpt-4o}}, {{name: gpt-4o-error-500}}], keys: [{{name: main, secretRef: {{name: keys, key: openai}}, rpm: 1000}}]}}\n\
         \x20 - {{name: revoked, type: openai, baseUrl: \"{base}\", models: [{{name: gpt-4o-revoked}}], keys: [{{name: old, secretRef: {{name: keys, key: revoked}}, rpm: 1000}}]}}\n\
         \x20 - {{name: claude, type: anthropic, baseUrl: \"{base}\", models: [{{name: claude-sonnet-4}}], keys: [{{name: c, secretRef: {{name: keys, key: anthropic}}, rpm: 1000}}]}}\n\
         \x20 - {{name: gemini, type: gemini, baseUrl: \"{base}\", models: [{{name: gemini-2.5-flash}}], keys: [{{name: g, secretRef: {{name: keys, key: gemini}}, rpm: 1000}}]}}\n\
         ---\napiVersion: floodgate.dev/v1alpha1\nkind: TierQueue\nmetadata: {{name: tiers}}\nspec:\n  defaultTier: std\n  tiers:\n\
         \x20 - name: std\n    class: standard\n    maxWaitMs: 20000\n    async:\n      notify: [webhook, email]\n\
         \x20     webhook: {{url: \"{hook}\", signingSecretRef: {{name: clients, key: signing}}}}\n\
         \x20     email: {{from: \"floodgate@example.com\", to: \"ops@example.com\", smtpServer: \"{server}\", credentialsSecretRef: {{name: smtp, key: login}}, caSecretRef: {{name: smtp, key: ca}}}}\n\
         ---\napiVersion: floodgate.dev/v1alpha1\nkind: Tenant\nmetadata: {{name: acme}}\nspec: {{tier: std, keys: [{{name: main, secretRef: {{name: clients, key: acme}}}}]}}\n",
        server = smtp.server(),
    )
}

/// Every POST a receiver got: headers and body.
type Posts = Arc<Mutex<Vec<(HeaderMap, Bytes)>>>;

/// A receiver of trace exports (`POST /v1/traces`) and webhooks (`POST /hook`): the bodies
/// of each, and its base URL.
async fn collector() -> (Posts, Posts, String) {
    let (traces, hooks) = (Posts::default(), Posts::default());
    let keep = |posts: &Posts| {
        let posts = posts.clone();
        post(move |headers: HeaderMap, body: Bytes| async move {
            posts.lock().unwrap().push((headers, body));
        })
    };
    let app = axum::Router::new()
        .route("/v1/traces", keep(&traces))
        .route("/hook", keep(&hooks));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (traces, hooks, url)
}

/// One chat as an OpenAI caller with `key`; the status.
async fn chat_as(proxy: &ProxyProcess, key: &str, model: &str, stream: bool) -> u16 {
    let response = reqwest::Client::new()
        .post(proxy.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&serde_json::json!({"model": model, "stream": stream,
            "messages": [{"role": "user", "content": "hello"}]}))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let _ = response.text().await.unwrap();
    status
}

/// One chat as the tenant; the status.
async fn chat(proxy: &ProxyProcess, model: &str, stream: bool) -> u16 {
    chat_as(proxy, CLIENT, model, stream).await
}

/// The status of `GET path` on the admin listener with `token` (none: `None`).
async fn admin_get(proxy: &ProxyProcess, path: &str, token: Option<&str>) -> u16 {
    let mut request = reqwest::Client::new().get(proxy.admin_url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap().status().as_u16()
}

fn leaks(what: &str, text: &[u8]) -> Vec<String> {
    secrets()
        .iter()
        .filter(|s| text.windows(s.len()).any(|w| w == s.as_bytes()))
        .map(|s| format!("{s} in {what}"))
        .collect()
}

#[tokio::test]
async fn no_log_line_metric_or_span_holds_a_secret() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mock = MockProviders::start(
        MockConfig::default().with_valid_keys([OPENAI, ROTATED, ANTHROPIC, GEMINI]),
    )
    .await
    .unwrap();
    let (traces, hooks, collector_url) = collector().await;
    let hook = format!("{collector_url}/hook");
    let smtp = SmtpSink::start(SinkOptions {
        user: "mailer".to_owned(),
        password: SMTP_PASSWORD.to_owned(),
        starttls: true,
    })
    .await
    .unwrap();
    let redis = RedisServer::start_with_password(REDIS_PASSWORD)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pool.yaml");
    let config = |openai_key: &str| manifests(&mock.base_url(), openai_key, &hook, &smtp);
    std::fs::write(&file, config(OPENAI)).unwrap();
    let proxy = ProxyProcess::start(
        [
            "--config",
            dir.path().to_str().unwrap(),
            "--watch-interval-ms",
            "100",
            "--otlp-endpoint",
            &collector_url,
            "--admin-token",
            ADMIN,
            "--redis",
            &redis.url(),
        ],
        &[
            ("RUST_LOG", OsStr::new("debug")),
            ("OTEL_BSP_SCHEDULE_DELAY", OsStr::new("100")),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", OsStr::new("")),
        ],
    )
    .await
    .unwrap();

    assert_eq!(chat(&proxy, "gpt-4o", false).await, 200);
    assert_eq!(chat(&proxy, "gpt-4o", true).await, 200);
    assert_eq!(chat(&proxy, "claude-sonnet-4", false).await, 200);
    assert_eq!(chat(&proxy, "gemini-2.5-flash", true).await, 200);
    assert_eq!(chat(&proxy, "gpt-4o-revoked", false).await, 502);
    assert_eq!(chat(&proxy, "gpt-4o-error-500", false).await, 502);
    assert_eq!(chat_as(&proxy, WRONG_CLIENT, "gpt-4o", false).await, 401);
    let messages = reqwest::Client::new()
        .post(proxy.url("/v1/messages"))
        .header("x-api-key", CLIENT)
        .header("anthropic-version", "2023-06-01")
        .json(
            &serde_json::json!({"model": "claude-sonnet-4", "max_tokens": 64,
            "messages": [{"role": "user", "content": "hello"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(messages.status(), 200);
    // An async job: its webhook is signed with the tier's secret, its email sent with the
    // SMTP login.
    let job = reqwest::Client::new()
        .post(proxy.url("/v1/jobs"))
        .bearer_auth(CLIENT)
        .json(&serde_json::json!({"request": {"model": "gpt-4o",
            "messages": [{"role": "user", "content": "hello"}]}}))
        .send()
        .await
        .unwrap();
    assert_eq!(job.status(), 202);
    wait_for("the job's webhook and email", WAIT, || async {
        Ok((!hooks.lock().unwrap().is_empty() && !smtp.mails().is_empty()).then_some(()))
    })
    .await
    .unwrap();
    // The key is rotated: the watcher applies the new Secret value.
    std::fs::write(&file, config(ROTATED)).unwrap();
    proxy
        .wait_for_log("configuration change applied", WAIT)
        .await
        .unwrap();
    assert_eq!(chat(&proxy, "gpt-4o", false).await, 200);

    // The scenario happened as intended: a 401 from the provider, both keys used, budgets
    // in Redis (logged in), the webhook signed with the secret, the mail sent logged in.
    proxy
        .wait_for_log("the provider refused this key", WAIT)
        .await
        .unwrap();
    let counts = mock.counts();
    assert!(counts.requests(floodgate_e2e::mock::Provider::OpenAi, OPENAI) >= 2);
    assert_eq!(
        counts.requests(floodgate_e2e::mock::Provider::OpenAi, ROTATED),
        1
    );
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let budgets: Vec<String> = redis::cmd("KEYS")
        .arg("floodgate:budget:*")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(!budgets.is_empty(), "no budget in Redis");
    {
        let hooks = hooks.lock().unwrap();
        let (headers, body) = &hooks[0];
        let header = |name: &str| headers.get(name).unwrap().to_str().unwrap().to_owned();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let signed = webhook::verify(
            SIGNING.as_bytes(),
            &header(webhook::TIMESTAMP_HEADER),
            body,
            &header(webhook::SIGNATURE_HEADER),
            now,
        );
        assert_eq!(signed, Ok(()));
    }
    assert!(
        smtp.logins()
            .iter()
            .any(|l| l.user == "mailer" && l.accepted)
    );

    // Admin endpoints: on the admin listener only, and with the admin token.
    let public = reqwest::get(proxy.url("/metrics")).await.unwrap();
    assert_eq!(public.status(), 404);
    let public = reqwest::Client::new()
        .get(proxy.url("/admin/jobs/dead-letters"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(public.status(), 404);
    let dead_letters = "/admin/jobs/dead-letters";
    assert_eq!(admin_get(&proxy, dead_letters, Some(ADMIN)).await, 200);
    assert_eq!(
        admin_get(&proxy, dead_letters, Some(WRONG_ADMIN)).await,
        401
    );
    assert_eq!(admin_get(&proxy, dead_letters, Some(CLIENT)).await, 401);
    let metrics = reqwest::get(proxy.admin_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("outcome=\"unauthorized\""), "{metrics}");

    wait_for("spans at the collector", WAIT, || async {
        Ok((traces.lock().unwrap().len() > 1).then_some(()))
    })
    .await
    .unwrap();
    // The whole log, to the last line written while shutting down.
    let (status, log) = proxy.terminate_with_log(WAIT).await.unwrap();
    assert!(status.success());
    assert!(
        log.iter().any(|l| l.contains("shutting down")),
        "the log read ends before the shutdown"
    );
    assert!(log.len() > 20, "a debug log: {} lines", log.len());

    let mut found = leaks("/metrics", metrics.as_bytes());
    for line in &log {
        found.extend(leaks(&format!("log line {line}"), line.as_bytes()));
    }
    for (_, body) in traces.lock().unwrap().iter() {
        found.extend(leaks("an exported trace", body));
    }
    for (headers, body) in hooks.lock().unwrap().iter() {
        found.extend(leaks("a webhook's body", body));
        for value in headers.values() {
            found.extend(leaks("a webhook's header", value.as_bytes()));
        }
    }
    for mail in smtp.mails() {
        found.extend(leaks("a mail", mail.data.as_bytes()));
    }
    assert!(found.is_empty(), "{found:#?}");
}
