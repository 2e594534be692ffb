//! Active health checks (a pool's `healthCheck`): every `intervalSeconds` of its own pool,
//! providers whose circuit is open and keys the provider refused as unauthenticated (401) are
//! probed with a cheap listing call in the provider's own format (`GET /v1/models`,
//! `/v1beta/models`, `/api/tags`) and the key's headers, so recovery does not wait for the
//! circuit's timer or for a configuration change.
//!
//! - An open circuit is probed with a key that is not itself refused; a probe that answers
//!   2xx makes it half-open: the next live request is its probe and closes it (or opens it
//!   again). A listing that answers does not prove that chat calls, whose 5xx opened it, do.
//! - A key refused with 401 is probed with itself; a 2xx puts it back. Keys refused with 403
//!   (no access) or a spent quota are not probed: a listing cannot prove them, and they stay
//!   out until the configuration (the Secret) changes.

use crate::providers::Adapter;
use crate::route::runtime::ProviderRt;
use crate::route::{Dispatcher, View};
use std::collections::HashMap;
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
    /// Open circuits made half-open (the next live request decides).
    pub circuits_half_opened: usize,
    /// Keys put back.
    pub keys_restored: usize,
}

/// Whether `provider` (of a pool with a health check) has something to probe now.
fn needs_probe(provider: &ProviderRt, now: Instant) -> bool {
    provider.breaker.open_until(now).is_some()
        || provider.keys.iter().any(|k| k.budget.is_restorable())
}

/// Probes, once, every provider of `view`'s pools with a `healthCheck` that has an open
/// circuit or a key refused with 401.
pub async fn probe_once(view: &View, http: &reqwest::Client) -> Round {
    let pools: Vec<&str> = view
        .config
        .pools
        .iter()
        .filter(|p| p.spec.health_check.is_some())
        .map(|p| p.name.as_str())
        .collect();
    probe_pools(view, http, &pools).await
}

/// Probes, once, the providers of `pools` that have something to probe.
async fn probe_pools(view: &View, http: &reqwest::Client, pools: &[&str]) -> Round {
    let mut round = Round::default();
    for provider in &view.runtime.providers {
        if !pools.contains(&provider.pool.as_str()) || !needs_probe(provider, Instant::now()) {
            continue;
        }
        let url = probe_url(provider.adapter, &provider.base_url);
        let url = url.as_str();
        // Refused keys: each with itself. An open circuit: with the first key that is not
        // refused (a refused key's answer says nothing of the provider's health).
        let circuit_key = provider.breaker.open_until(Instant::now()).and_then(|_| {
            provider
                .keys
                .iter()
                .position(|k| !k.budget.is_failed() && k.headers.is_ok())
        });
        // The provider's keys are probed at once: a provider with many refused keys costs
        // one probe's time, not one per key.
        let probes = provider.keys.iter().enumerate().filter_map(|(i, key)| {
            let restorable = key.budget.is_restorable();
            let for_circuit = circuit_key == Some(i);
            let headers = key.headers.as_ref().ok()?;
            (restorable || for_circuit).then_some(async move {
                let ok = probe(http, url, headers, provider, &key.name).await;
                (key, restorable, for_circuit, ok)
            })
        });
        for (key, restorable, for_circuit, ok) in futures::future::join_all(probes).await {
            round.probed += 1;
            if !ok {
                continue;
            }
            if restorable {
                key.budget.restore();
                round.keys_restored += 1;
            }
            // A restored key's answer speaks for the provider too.
            if (for_circuit || restorable) && provider.breaker.half_open() {
                round.circuits_half_opened += 1;
            }
        }
    }
    round
}

/// One listing call with `headers`; whether the provider answered 2xx.
async fn probe(
    http: &reqwest::Client,
    url: &str,
    headers: &reqwest::header::HeaderMap,
    provider: &ProviderRt,
    key: &str,
) -> bool {
    let answer = http
        .get(url)
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
    tracing::info!(pool = %provider.pool, provider = %provider.name, key = %key, ok, "health probe");
    ok
}

/// Each pool with a health check and its `intervalSeconds`.
pub fn intervals(view: &View) -> Vec<(String, Duration)> {
    view.config
        .pools
        .iter()
        .filter_map(|p| {
            let h = p.spec.health_check.as_ref()?;
            // At least a second: a configuration file (not checked by the CRD's minimum)
            // with 0 would make every round due at once and the loop spin.
            Some((
                p.name.clone(),
                Duration::from_secs(u64::from(h.interval_seconds.max(1))),
            ))
        })
        .collect()
}

/// When each pool's next round of probes is due.
#[derive(Debug, Default)]
pub struct Schedule {
    due: HashMap<String, Instant>,
}

impl Schedule {
    /// When the next round is due for the pools `every` (each with its interval): a pool
    /// new to the schedule is first due one interval from `now`; pools gone are forgotten.
    /// `None` when no pool has a health check.
    pub fn next(&mut self, every: &[(String, Duration)], now: Instant) -> Option<Instant> {
        self.due
            .retain(|pool, _| every.iter().any(|(p, _)| p == pool));
        for (pool, interval) in every {
            self.due.entry(pool.clone()).or_insert(now + *interval);
        }
        self.due.values().min().copied()
    }

    /// The pools due at `now`, each then due again one interval later.
    pub fn take_due(&mut self, every: &[(String, Duration)], now: Instant) -> Vec<String> {
        let mut ready = Vec::new();
        for (pool, interval) in every {
            if let Some(at) = self.due.get_mut(pool)
                && *at <= now
            {
                *at = now + *interval;
                ready.push(pool.clone());
            }
        }
        ready
    }
}

/// Runs rounds of probes until `cancel`: each pool with a health check every
/// `intervalSeconds` of its own ([`Schedule`]), on the configuration serving at the time
/// (looking again every 30 s while no pool has one).
pub async fn run(dispatcher: Arc<Dispatcher>, cancel: CancellationToken) {
    // No redirects: a probe carries a provider key, which must not follow to another host.
    // Nor a proxy from the environment: the chat calls take none, and the probe should
    // reach the provider the way they do.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .unwrap_or_default();
    let mut schedule = Schedule::default();
    loop {
        let now = Instant::now();
        let next = schedule
            .next(&intervals(&dispatcher.view()), now)
            .unwrap_or(now + Duration::from_secs(30));
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep_until(next) => {}
        }
        let view = dispatcher.view();
        let ready = schedule.take_due(&intervals(&view), Instant::now());
        if ready.is_empty() {
            continue;
        }
        let ready: Vec<&str> = ready.iter().map(String::as_str).collect();
        let round = probe_pools(&view, &http, &ready).await;
        if round.circuits_half_opened + round.keys_restored > 0 {
            dispatcher.budgets().signal().pulse();
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

    #[tokio::test(start_paused = true)]
    async fn each_pool_is_probed_at_its_own_interval() {
        let pool = |name: &str, every: u32| {
            format!(
                "---\napiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {{name: {name}}}\nspec:\n\
                 \x20 healthCheck: {{intervalSeconds: {every}}}\n  circuitBreaker: {{failureThreshold: 1, openSeconds: 3600}}\n  providers:\n\
                 \x20 - {{name: openai, type: openai, baseUrl: \"http://127.0.0.1:9\", models: [{{name: m-{name}}}], keys: [{{secretRef: {{name: keys, key: a}}, rpm: 10}}]}}\n"
            )
        };
        let yaml = format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: keys}}\nstringData: {{a: key-a}}\n{}{}",
            pool("health-every-10", 10),
            pool("health-every-30", 30)
        );
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
        for p in &d.view().runtime.providers {
            p.breaker.failure(Instant::now());
        }
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(d.clone(), cancel.clone()));
        tokio::task::yield_now().await;
        // At 10 s the 10 s pool only (its probe fails: nothing listens). The probes'
        // connections are real (refused at once): the count is awaited, and the exact
        // boundaries are the schedule's own test below.
        tokio::time::advance(Duration::from_secs(10)).await;
        for _ in 0..100_000 {
            if probes("health-every-10") > 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        // Time for a probe of the other pool, were it due (it would be sent next).
        for _ in 0..10_000 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            (probes("health-every-10"), probes("health-every-30")),
            (1, 0)
        );
        cancel.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn the_schedule_keeps_each_pools_interval_exactly() {
        let every = vec![
            ("fast".to_owned(), Duration::from_secs(10)),
            ("slow".to_owned(), Duration::from_secs(30)),
        ];
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut s = Schedule::default();
        assert_eq!(s.next(&every, start), Some(at(10_000)));
        assert!(s.take_due(&every, at(9_999)).is_empty());
        assert_eq!(s.take_due(&every, at(10_000)), ["fast"]);
        assert_eq!(s.next(&every, at(10_000)), Some(at(20_000)));
        assert_eq!(s.take_due(&every, at(20_000)), ["fast"]);
        assert!(s.take_due(&every, at(29_999)).is_empty());
        assert_eq!(s.take_due(&every, at(30_000)), ["fast", "slow"]);
        assert_eq!(s.next(&every, at(30_000)), Some(at(40_000)));
        // A pool whose health check is removed is forgotten; none left: nothing due.
        assert_eq!(s.next(&every[1..], at(30_000)), Some(at(60_000)));
        assert_eq!(s.next(&[], at(30_000)), None);
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
