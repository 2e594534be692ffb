//! Active health checks (a pool's `healthCheck`): every `intervalSeconds`, providers whose
//! circuit is open and keys the provider refused (401/403) are probed with a cheap listing
//! call in the provider's own format (`GET /v1/models`, `/v1beta/models`, `/api/tags`) and
//! the key's headers, so recovery does not wait for live traffic to fail again. A probe that
//! answers 2xx closes the circuit and puts the key back; anything else changes nothing (the
//! circuit's own timer still runs).

use crate::providers::Adapter;
use crate::route::runtime::ProviderRt;
use crate::route::{Dispatcher, View};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The listing URL a probe of a provider speaking `adapter` at `base_url` calls.
pub fn probe_url(adapter: Adapter, base_url: &str) -> String {
    let base = base_url.trim_end_matches('/');
    match adapter {
        Adapter::OpenAi | Adapter::Anthropic => {
            if base.ends_with("/v1") {
                format!("{base}/models")
            } else {
                format!("{base}/v1/models")
            }
        }
        Adapter::Gemini => format!("{base}/v1beta/models"),
        Adapter::Ollama => format!("{base}/api/tags"),
    }
}

/// What one round of probes found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// Probes sent.
    pub probed: usize,
    /// Circuits closed.
    pub circuits_closed: usize,
    /// Keys put back.
    pub keys_restored: usize,
}

/// Whether `provider` (of a pool with a health check) has something to probe now.
fn needs_probe(provider: &ProviderRt, now: Instant) -> bool {
    provider.breaker.open_until(now).is_some() || provider.keys.iter().any(|k| k.budget.is_failed())
}

/// Probes, once, every provider of `view`'s pools with a `healthCheck` that has an open
/// circuit or a refused key.
pub async fn probe_once(view: &View, http: &reqwest::Client) -> Round {
    let mut round = Round::default();
    let checked: Vec<&str> = view
        .config
        .pools
        .iter()
        .filter(|p| p.spec.health_check.is_some())
        .map(|p| p.name.as_str())
        .collect();
    for provider in &view.runtime.providers {
        if !checked.contains(&provider.pool.as_str()) || !needs_probe(provider, Instant::now()) {
            continue;
        }
        let url = probe_url(provider.adapter, &provider.base_url);
        let open = provider.breaker.open_until(Instant::now()).is_some();
        // An open circuit: one probe with the first usable key. Refused keys: each its own.
        for (i, key) in provider.keys.iter().enumerate() {
            let failed = key.budget.is_failed();
            if !(failed || (open && i == 0)) {
                continue;
            }
            let Ok(headers) = &key.headers else { continue };
            round.probed += 1;
            let answer = http
                .get(&url)
                .headers(headers.clone())
                .timeout(PROBE_TIMEOUT)
                .send()
                .await;
            let ok = matches!(&answer, Ok(r) if r.status().is_success());
            super::metrics::routing_metrics()
                .health_probes
                .get_or_create(&super::metrics::ProbeLabels {
                    pool: provider.pool.clone(),
                    provider: provider.name.to_string(),
                    outcome: if ok { "ok" } else { "failed" },
                })
                .inc();
            tracing::info!(pool = %provider.pool, provider = %provider.name, key = %key.name, ok, "health probe");
            if !ok {
                continue;
            }
            if failed {
                key.budget.restore();
                round.keys_restored += 1;
            }
            if provider.breaker.open_until(Instant::now()).is_some() {
                provider.breaker.success();
                round.circuits_closed += 1;
            }
        }
    }
    round
}

/// The interval of the next round: the shortest `intervalSeconds` of the pools that have a
/// health check, `None` when none has.
pub fn interval(view: &View) -> Option<Duration> {
    view.config
        .pools
        .iter()
        .filter_map(|p| p.spec.health_check.as_ref())
        .map(|h| Duration::from_secs(u64::from(h.interval_seconds)))
        .min()
}

/// Runs rounds of probes until `cancel`, every [`interval`] of the configuration serving at
/// the time (looking again every 30 s while no pool has a health check).
pub async fn run(dispatcher: Arc<Dispatcher>, cancel: CancellationToken) {
    // No redirects: a probe carries a provider key, which must not follow to another host.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap_or_default();
    loop {
        let wait = interval(&dispatcher.view()).unwrap_or(Duration::from_secs(30));
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        let view = dispatcher.view();
        if interval(&view).is_some() {
            let round = probe_once(&view, &http).await;
            if round.circuits_closed + round.keys_restored > 0 {
                dispatcher.budgets().signal().pulse();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::load_config;
    use crate::config::secrets::SecretSources;
    use crate::route::DispatcherOptions;

    fn probes(pool: &str) -> u64 {
        ["ok", "failed"]
            .iter()
            .map(|outcome| {
                super::super::metrics::routing_metrics()
                    .health_probes
                    .get_or_create(&super::super::metrics::ProbeLabels {
                        pool: pool.into(),
                        provider: "openai".into(),
                        outcome,
                    })
                    .get()
            })
            .sum()
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_circuit_is_probed_at_each_interval_exactly() {
        let yaml = "apiVersion: v1\nkind: Secret\nmetadata: {name: keys}\nstringData: {a: key-a}\n---\n\
                    apiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {name: paused-health}\nspec:\n\
                    \x20 healthCheck: {intervalSeconds: 30}\n  circuitBreaker: {failureThreshold: 1, openSeconds: 3600}\n  providers:\n\
                    \x20 - {name: openai, type: openai, baseUrl: \"http://127.0.0.1:9\", models: [{name: m}], keys: [{secretRef: {name: keys, key: a}, rpm: 10}]}\n";
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("g.yaml"), yaml).unwrap();
        let (config, _) = load_config(&[dir.path().to_owned()], SecretSources::default()).unwrap();
        let d = Arc::new(
            Dispatcher::with_options(DispatcherOptions::new(
                Duration::from_secs(60),
                Duration::from_secs(1),
            ))
            .unwrap(),
        );
        d.apply(Arc::new(config));
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(d.clone(), cancel.clone()));
        tokio::task::yield_now().await;
        // A closed circuit is not probed.
        tokio::time::advance(Duration::from_secs(30)).await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(probes("paused-health"), 0);
        d.view().runtime.providers[0]
            .breaker
            .failure(Instant::now());
        // Open: not before the next interval (at 60 s), then once.
        tokio::time::advance(Duration::from_millis(29_999)).await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(probes("paused-health"), 0);
        tokio::time::advance(Duration::from_millis(1)).await;
        for _ in 0..1000 {
            if probes("paused-health") > 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(probes("paused-health"), 1);
        cancel.cancel();
        task.await.unwrap();
    }

    #[test]
    fn probes_list_models_in_each_format() {
        assert_eq!(
            probe_url(Adapter::OpenAi, "http://x:1/"),
            "http://x:1/v1/models"
        );
        assert_eq!(
            probe_url(Adapter::OpenAi, "http://x:1/v1"),
            "http://x:1/v1/models"
        );
        assert_eq!(
            probe_url(Adapter::Anthropic, "https://a"),
            "https://a/v1/models"
        );
        assert_eq!(
            probe_url(Adapter::Gemini, "https://g"),
            "https://g/v1beta/models"
        );
        assert_eq!(
            probe_url(Adapter::Ollama, "http://o:11434"),
            "http://o:11434/api/tags"
        );
    }
}
