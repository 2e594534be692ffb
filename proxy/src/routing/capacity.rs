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
    /// A local model.
    Local,
    /// A paid provider.
    Premium,
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    epoch: u64,
    local: u64,
    premium: u64,
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
        match served {
            Served::Local => b.local += 1,
            Served::Premium => b.premium += 1,
        }
    }

    /// (local, premium) answered within the window ending now.
    pub fn totals(&self) -> (u64, u64) {
        let now = self.epoch(Instant::now());
        let buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        buckets
            .iter()
            .filter(|b| b.epoch + (BUCKETS as u64) > now && b.epoch <= now)
            .fold((0, 0), |(l, p), b| (l + b.local, p + b.premium))
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
    /// Share answered by the cache: `null` until the cache is built.
    pub cache_share: Option<f64>,
    /// Share that joined an identical request in flight: `null` until dedup is built.
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
    let (local_n, premium_n) = recent.totals();
    let requests = local_n + premium_n;
    let share = |n: u64| {
        if requests == 0 {
            0.0
        } else {
            n as f64 / requests as f64
        }
    };
    let local_share = share(local_n);
    let offloaded = local_share.min(0.99);
    let effective = total as f64 / (1.0 - offloaded);
    Report {
        window_seconds: (BUCKET * BUCKETS as u32).as_secs(),
        raw_rpm: RawRpm { total, pools },
        requests,
        local_share,
        cache_share: None,
        dedup_share: None,
        premium_share: share(premium_n),
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
        assert_eq!(recent.totals(), (2, 1));
        // Just inside the window: still counted; one bucket later: gone.
        tokio::time::advance(Duration::from_secs(299)).await;
        recent.record(Served::Premium);
        assert_eq!(recent.totals(), (2, 2));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(recent.totals(), (0, 1));
    }
}
