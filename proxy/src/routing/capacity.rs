//! The capacity report (`GET /admin/capacity`): raw provider RPM, the share of recent
//! requests answered by local models (and by the cache and dedup, once built), and the
//! effective RPM those shares imply — the seed's capacity table, measured instead of assumed.
//!
//! Effective RPM: every request not answered by the cache, dedup or a local model spends one
//! request of raw provider capacity, so `raw / (1 - offloaded share)`.

use crate::route::View;
use serde::{Deserialize, Serialize};
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Width of one bucket of the recent window.
const BUCKET: Duration = Duration::from_secs(5);
/// Buckets in the window: 5 minutes.
const BUCKETS: usize = 60;

/// Who answered a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// The cache: an exact or stale answer, or a template.
    Cache,
    /// An identical request in flight (dedup).
    Dedup,
    /// A local model.
    Local,
    /// A paid provider.
    Premium,
}

/// Answers counted, by who gave them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// By the cache.
    pub cache: u64,
    /// By dedup.
    pub dedup: u64,
    /// By local models.
    pub local: u64,
    /// By paid providers.
    pub premium: u64,
}

impl Totals {
    fn all(&self) -> u64 {
        self.cache + self.dedup + self.local + self.premium
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    epoch: u64,
    counts: Totals,
}

/// Counts a request the cache stage answered without routing it (a hit, or a follower of
/// an identical request in flight), by what `ctx` says the cache did.
pub fn record_unrouted(recent: &Recent, ctx: &crate::pipeline::RequestCtx) {
    use crate::cache::Outcome;
    match ctx.cache.outcome {
        Some(Outcome::Dedup) => recent.record(Served::Dedup),
        Some(_) => recent.record(Served::Cache),
        None => {}
    }
}

/// Answered requests over the last five minutes, in 5 s buckets.
#[derive(Debug)]
pub struct Recent {
    origin: Instant,
    buckets: Mutex<[Bucket; BUCKETS]>,
}

impl Default for Recent {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            buckets: Mutex::new([Bucket::default(); BUCKETS]),
        }
    }
}

impl Recent {
    fn epoch(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.origin).as_millis() / BUCKET.as_millis()) as u64
    }

    /// Counts one request answered by `served` now.
    pub fn record(&self, served: Served) {
        let epoch = self.epoch(Instant::now());
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let b = &mut buckets[(epoch as usize) % BUCKETS];
        if b.epoch != epoch {
            *b = Bucket {
                epoch,
                ..Bucket::default()
            };
        }
        let c = &mut b.counts;
        match served {
            Served::Cache => c.cache += 1,
            Served::Dedup => c.dedup += 1,
            Served::Local => c.local += 1,
            Served::Premium => c.premium += 1,
        }
    }

    /// Answers within the window ending now.
    pub fn totals(&self) -> Totals {
        let now = self.epoch(Instant::now());
        let buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        buckets
            .iter()
            .filter(|b| b.epoch + (BUCKETS as u64) > now && b.epoch <= now)
            .fold(Totals::default(), |t, b| Totals {
                cache: t.cache + b.counts.cache,
                dedup: t.dedup + b.counts.dedup,
                local: t.local + b.counts.local,
                premium: t.premium + b.counts.premium,
            })
    }
}

/// The capacity report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    /// Seconds of history the shares are measured over.
    pub window_seconds: u64,
    /// Requests per minute the paid providers' keys allow, per pool and in total.
    pub raw_rpm: RawRpm,
    /// Requests answered in the window.
    pub requests: u64,
    /// Share answered by local models.
    pub local_share: f64,
    /// Share answered by the cache (exact and stale answers, templates).
    pub cache_share: Option<f64>,
    /// Share that joined an identical request in flight (dedup).
    pub dedup_share: Option<f64>,
    /// Share answered by paid providers.
    pub premium_share: f64,
    /// `raw_rpm.total / (1 - offloaded share)`: what the raw capacity serves at these shares.
    pub effective_rpm: f64,
    /// `effective_rpm / raw_rpm.total`.
    pub multiplier: f64,
}

/// Raw RPM per pool.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RawRpm {
    /// Every paid provider's keys together.
    pub total: u64,
    /// By pool name.
    pub pools: std::collections::BTreeMap<String, u64>,
}

/// The report of `view` with the answers counted in `recent`.
pub fn report(view: &View, recent: &Recent) -> Report {
    let mut pools = std::collections::BTreeMap::new();
    let local: Vec<(&str, &str)> = view
        .config
        .pools
        .iter()
        .flat_map(|p| p.providers.iter().map(move |q| (p, q)))
        .filter(|(_, q)| q.keys.is_empty())
        .map(|(p, q)| (p.name.as_str(), q.name.as_str()))
        .collect();
    for provider in &view.runtime.providers {
        // Keyless self-hosted providers are local capacity, not raw provider RPM.
        if local.contains(&(provider.pool.as_str(), &*provider.name)) {
            continue;
        }
        let rpm: u64 = provider
            .keys
            .iter()
            .filter_map(|k| k.budget.rpm())
            .map(u64::from)
            .sum();
        *pools.entry(provider.pool.clone()).or_insert(0) += rpm;
    }
    let total = pools.values().sum();
    let counts = recent.totals();
    let requests = counts.all();
    let share = |n: u64| {
        if requests == 0 {
            0.0
        } else {
            n as f64 / requests as f64
        }
    };
    let offloaded = if requests == 0 {
        0.0
    } else {
        (1.0 - share(counts.premium)).min(0.99)
    };
    let effective = total as f64 / (1.0 - offloaded);
    Report {
        window_seconds: (BUCKET * BUCKETS as u32).as_secs(),
        raw_rpm: RawRpm { total, pools },
        requests,
        local_share: share(counts.local),
        cache_share: Some(share(counts.cache)),
        dedup_share: Some(share(counts.dedup)),
        premium_share: share(counts.premium),
        effective_rpm: effective,
        multiplier: if total == 0 {
            0.0
        } else {
            effective / total as f64
        },
    }
}

/// The report as a table, for the CLI.
pub fn render(r: &Report) -> String {
    let pct = |x: f64| format!("{:.1}%", x * 100.0);
    let opt = |x: Option<f64>| x.map_or_else(|| "not built".to_owned(), pct);
    let mut out = String::new();
    out.push_str(&format!("raw provider RPM      {}\n", r.raw_rpm.total));
    for (pool, rpm) in &r.raw_rpm.pools {
        out.push_str(&format!("  pool {pool:<16} {rpm}\n"));
    }
    out.push_str(&format!(
        "requests (last {} s)  {}\n",
        r.window_seconds, r.requests
    ));
    out.push_str(&format!("  cache               {}\n", opt(r.cache_share)));
    out.push_str(&format!("  dedup               {}\n", opt(r.dedup_share)));
    out.push_str(&format!("  local models        {}\n", pct(r.local_share)));
    out.push_str(&format!("  premium providers   {}\n", pct(r.premium_share)));
    out.push_str(&format!(
        "effective RPM         {:.0} ({:.2}x raw)\n",
        r.effective_rpm, r.multiplier
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_window_keeps_five_minutes_of_answers() {
        let recent = Recent::default();
        recent.record(Served::Local);
        recent.record(Served::Premium);
        recent.record(Served::Local);
        let lp = |t: Totals| (t.local, t.premium);
        assert_eq!(lp(recent.totals()), (2, 1));
        // Just inside the window: still counted; one bucket later: gone.
        tokio::time::advance(Duration::from_secs(299)).await;
        recent.record(Served::Premium);
        assert_eq!(lp(recent.totals()), (2, 2));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(lp(recent.totals()), (0, 1));
    }

    #[tokio::test]
    async fn the_cache_and_dedup_shares_raise_the_effective_rpm() {
        // The seed's table: 30% cache, 15% of the rest dedup, 40% of what is left local:
        // premium answers 0.7 x 0.85 x 0.6 = 35.7% of requests, 2.8x the raw capacity.
        let recent = Recent::default();
        for (served, n) in [
            (Served::Cache, 300),
            (Served::Dedup, 105),
            (Served::Local, 238),
            (Served::Premium, 357),
        ] {
            (0..n).for_each(|_| recent.record(served));
        }
        let yaml = "apiVersion: v1\nkind: Secret\nmetadata: {name: keys}\nstringData: {a: key-a}\n---\n\
                    apiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {name: p}\nspec:\n  providers:\n\
                    \x20 - {name: openai, type: openai, models: [{name: m}], keys: [{secretRef: {name: keys, key: a}, rpm: 100}]}\n";
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("g.yaml"), yaml).unwrap();
        let (config, _) = crate::config::load::load_config(
            &[dir.path().to_owned()],
            crate::config::secrets::SecretSources::default(),
        )
        .unwrap();
        let d = crate::route::Dispatcher::with_options(crate::route::DispatcherOptions::new(
            Duration::from_secs(60),
            Duration::from_secs(1),
        ))
        .unwrap();
        d.apply(std::sync::Arc::new(config));
        let r = report(&d.view(), &recent);
        assert_eq!(r.requests, 1000);
        assert_eq!(r.cache_share, Some(0.3));
        assert_eq!(r.dedup_share, Some(0.105));
        assert_eq!(r.premium_share, 0.357);
        assert_eq!(r.raw_rpm.total, 100);
        assert!(
            (r.multiplier - 1.0 / 0.357).abs() < 1e-9,
            "{}",
            r.multiplier
        );
        let rendered = render(&r);
        assert!(rendered.contains("cache               30.0%"), "{rendered}");
    }
}
