use super::*;
use crate::autoscale::DemandSource;
use crate::fixtures;

/// What a gateway replica serves, less the metrics read here beyond one other.
const EXPOSITION: &str = r#"# HELP floodgate_key_budget_utilization Share of the key's request budget in use.
# TYPE floodgate_key_budget_utilization gauge
floodgate_key_budget_utilization{pool="premium",provider="claude",key="claude-0"} 0.25
floodgate_key_budget_utilization{pool="premium",provider="claude",key="second"} 0.5
floodgate_key_budget_utilization{pool="premium",provider="local",key="local"} 0.03
floodgate_key_budget_utilization{pool="other",provider="claude",key="claude-0"} 1.0
# HELP floodgate_circuit_state 0 closed, 1 half-open, 2 open.
# TYPE floodgate_circuit_state gauge
floodgate_circuit_state{pool="premium",provider="claude"} 2
floodgate_circuit_state{pool="premium",provider="local"} 0
floodgate_requests_total{tier="default",provider="claude",model="a \"quoted\", {odd} model",outcome="ok"} 7
# EOF
"#;

fn spec() -> AIProviderPoolSpec {
    serde_json::from_value(serde_json::json!({"providers": [
        {"name": "claude", "type": "anthropic", "models": [{"name": "claude-sonnet-4"}], "keys": [
            {"secretRef": {"name": "claude-keys", "key": "key1"}, "rpm": 20},
            {"name": "second", "secretRef": {"name": "claude-keys", "key": "key2"}, "rpm": 40}]},
        {"name": "local", "type": "ollama", "models": [{"name": "llama3.1:8b"}], "rpm": 100},
        {"name": "idle", "type": "openai", "models": [{"name": "gpt-4o"}], "keys": [
            {"secretRef": {"name": "openai-keys", "key": "key1"}, "rpm": 20}]}
    ]}))
    .unwrap()
}

#[test]
fn an_exposition_gives_each_keys_utilization_and_each_circuit() {
    let figures = parse(EXPOSITION);
    let key = |pool: &str, provider: &str, key: &str| {
        figures
            .utilization
            .get(&(pool.to_owned(), provider.to_owned(), key.to_owned()))
            .copied()
    };
    assert_eq!(key("premium", "claude", "second"), Some(0.5));
    assert_eq!(key("other", "claude", "claude-0"), Some(1.0));
    assert_eq!(figures.utilization.len(), 4);
    assert_eq!(figures.circuits["premium"]["claude"], "open");
    assert_eq!(figures.circuits["premium"]["local"], "closed");
    // A label value with quotes, commas and braces does not derail the line.
    assert_eq!(
        sample(r#"m{a="x \"y\", {z}",b="2"} 7 1700000000"#),
        Some((
            "m",
            vec![
                ("a".into(), "x \"y\", {z}".into()),
                ("b".into(), "2".into())
            ],
            7.0
        ))
    );
    assert_eq!(sample("plain 3.5"), Some(("plain", vec![], 3.5)));
    assert_eq!(sample("broken{a=\"1\" 3"), None);
}

#[test]
fn usage_is_each_keys_share_times_its_rpm_over_the_replicas_and_circuits_the_worst() {
    let a = parse(EXPOSITION);
    let mut b = ReplicaFigures::default();
    b.utilization
        .insert(("premium".into(), "claude".into(), "claude-0".into()), 0.5);
    b.circuits
        .entry("premium".into())
        .or_default()
        .insert("claude".into(), "closed".into());
    let (usage, circuits) = pool_figures(&[a, b], "premium", &spec());
    // claude: (0.25 + 0.5) x 20 + 0.5 x 40 = 35; local (keyless): 0.03 x 100 = 3.
    assert_eq!(
        usage,
        ProviderUsage::from([
            ("claude".to_owned(), 35),
            ("idle".to_owned(), 0),
            ("local".to_owned(), 3)
        ])
    );
    let claude = circuits["claude"];
    assert_eq!((claude.worst, claude.replicas, claude.open), ("open", 2, 1));
    assert_eq!(circuits["local"].replicas, 1);
    assert!(!circuits.contains_key("idle"), "unreported: unknown");
    // No replica at all: no use, nothing reported.
    let (usage, circuits) = pool_figures(&[], "premium", &spec());
    assert_eq!(usage.values().sum::<u64>(), 0);
    assert!(circuits.is_empty());
}

/// Serves `body` at `/metrics` on loopback; returns the port.
async fn serve_metrics(body: &'static str) -> u16 {
    let app =
        axum::Router::new().route("/metrics", axum::routing::get(move || async move { body }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

fn pod(name: &str, ip: &str, ready: bool) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "floodgate"},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
    })
}

#[tokio::test]
async fn the_gateways_ready_pods_are_found_by_their_labels_and_scraped() {
    let port = serve_metrics(EXPOSITION).await;
    let (ctx, mut api) = fixtures::context(DemandSource::Unconfigured);
    let scraper = Scraper::new(
        ctx.client.clone(),
        Targets::Pods {
            namespace: "floodgate".into(),
            selector: "app.kubernetes.io/component=gateway".into(),
            port,
        },
    );
    let script = async move {
        let call = api
            .expect(http::Method::GET, "/api/v1/namespaces/floodgate/pods")
            .await;
        assert!(
            call.query
                .contains("labelSelector=app.kubernetes.io%2Fcomponent%3Dgateway"),
            "{}",
            call.query
        );
        call.ok(&serde_json::json!({
            "apiVersion": "v1", "kind": "PodList", "metadata": {},
            // Not ready: not scraped (nothing listens there).
            "items": [pod("gw-a", "127.0.0.1", true), pod("gw-b", "127.0.0.2", false)]
        }));
        api
    };
    let (usage, circuits) = fixtures::run(scraper.pool_live("premium", &spec()), script)
        .await
        .unwrap();
    assert_eq!(usage["claude"], 25);
    assert_eq!(circuits["claude"].worst, "open");
}

#[tokio::test]
async fn a_replica_that_refuses_the_connection_fails_the_read_naming_it() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let live = format!("http://127.0.0.1:{}", serve_metrics(EXPOSITION).await);
    let (ctx, _api) = fixtures::context(DemandSource::Unconfigured);
    let scraper = Scraper::new(ctx.client.clone(), Targets::Urls(vec![live, dead.clone()]));
    match scraper.pool_live("premium", &spec()).await {
        Err(Error::Scrape(why)) => assert!(why.starts_with(&dead), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_replica_that_accepts_and_never_answers_fails_the_read_at_the_scrape_timeout() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stuck = format!("http://{}", listener.local_addr().unwrap());
    let (accepted, connected) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (socket, _) = listener.accept().await.unwrap();
        let _ = accepted.send(());
        // Holds the connection open, reading nothing and answering nothing.
        std::future::pending::<()>().await;
        drop(socket);
    });
    let live = format!("http://127.0.0.1:{}", serve_metrics(EXPOSITION).await);
    let (ctx, _api) = fixtures::context(DemandSource::Unconfigured);
    let scraper = Scraper::new(ctx.client.clone(), Targets::Urls(vec![live, stuck.clone()]));
    let start = tokio::time::Instant::now();
    let read = tokio::spawn(async move { scraper.scrape().await });
    connected.await.unwrap();
    tokio::time::sleep_until(start + SCRAPE_TIMEOUT - Duration::from_millis(1)).await;
    assert!(!read.is_finished(), "gave up before {SCRAPE_TIMEOUT:?}");
    // Without a timeout the read would wait for ever (and the pool's reconcile with it).
    let outcome = tokio::time::timeout(SCRAPE_TIMEOUT, read)
        .await
        .expect("the read still waits for the stuck replica")
        .unwrap();
    assert_eq!(start.elapsed(), SCRAPE_TIMEOUT);
    match outcome {
        Err(Error::Scrape(why)) => assert_eq!(why, format!("{stuck}: no answer within 2s")),
        other => panic!("{other:?}"),
    }
}

/// Scrapes the gateway's pods when the API server lists `pods` for its selector.
async fn scrape_listing(pods: Vec<serde_json::Value>) -> Result<Vec<ReplicaFigures>> {
    let (ctx, mut api) = fixtures::context(DemandSource::Unconfigured);
    let scraper = Scraper::new(
        ctx.client.clone(),
        Targets::Pods {
            namespace: "floodgate".into(),
            selector: "app=gateway".into(),
            port: 9090,
        },
    );
    let script = async move {
        api.expect(http::Method::GET, "/api/v1/namespaces/floodgate/pods")
            .await
            .ok(&serde_json::json!({
                "apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": pods
            }));
        api
    };
    fixtures::run(scraper.scrape(), script).await
}

#[tokio::test]
async fn a_selector_matching_no_pod_fails_the_read_naming_it_and_its_namespace() {
    match scrape_listing(vec![]).await {
        Err(e @ Error::NoGatewayPods { .. }) => assert_eq!(
            e.to_string(),
            r#"no pod in namespace "floodgate" matches the gateway selector "app=gateway""#
        ),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn pods_none_of_them_ready_fail_the_read_apart_from_no_pods() {
    let pods = vec![
        pod("gw-a", "127.0.0.1", false),
        pod("gw-b", "127.0.0.2", false),
    ];
    match scrape_listing(pods).await {
        Err(e @ Error::NoReadyGatewayPods { matched: 2, .. }) => assert_eq!(
            e.to_string(),
            r#"2 pod(s) in namespace "floodgate" match the gateway selector "app=gateway" but none is Ready"#
        ),
        other => panic!("{other:?}"),
    }
}
