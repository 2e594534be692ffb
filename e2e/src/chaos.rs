//! Saturating load and what the provider saw, for the chaos tests: clients that keep every
//! gateway replica busy, and the measures of a run read from the mock's counters (upstream
//! 429s, the busiest window of each key, and how long capacity went unused after a failure).

use crate::mock::{Counts, KeyCounts};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// What the clients of a [`Load`] got back.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// Answers by HTTP status (0: no answer, the connection failed).
    pub statuses: BTreeMap<u16, u64>,
    /// The first few answers that were not 200: status and body.
    pub failures: Vec<(u16, String)>,
    /// The longest a request took to be answered.
    pub slowest: Duration,
}

impl Tally {
    /// Answers with status 200.
    pub fn ok(&self) -> u64 {
        self.statuses.get(&200).copied().unwrap_or(0)
    }

    /// Answers other than 200.
    pub fn not_ok(&self) -> u64 {
        self.statuses
            .iter()
            .filter(|(s, _)| **s != 200)
            .map(|(_, n)| n)
            .sum()
    }

    fn record(&mut self, status: u16, body: impl FnOnce() -> String) {
        *self.statuses.entry(status).or_default() += 1;
        if status != 200 && self.failures.len() < 10 {
            self.failures.push((status, body()));
        }
    }
}

/// Clients sending chat requests back to back, each to one replica (client `i` to replica
/// `i % replicas`) and for one model (client `i` for model `i % models`), until
/// [`Load::stop`]. With more clients than the keys' limits admit at once, requests wait in
/// the gateway's queue and every key stays saturated. Models the mock answers at different
/// speeds (`slow-<ms>`) spread the requests over the window, as real traffic is, instead of
/// keeping them in phase.
#[derive(Debug)]
pub struct Load {
    stop: CancellationToken,
    tasks: JoinSet<()>,
    tally: Arc<Mutex<Tally>>,
}

impl Load {
    /// Starts `clients` clients on the gateways at `bases` (`http://host:port`), asking for
    /// `models`.
    pub fn start(bases: &[String], clients: usize, models: &[&str]) -> Load {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::new();
        let stop = CancellationToken::new();
        let tally = Arc::new(Mutex::new(Tally::default()));
        let mut tasks = JoinSet::new();
        for c in 0..clients {
            let url = format!("{}/v1/chat/completions", bases[c % bases.len()]);
            let model = models[c % models.len()].to_owned();
            let (http, stop, tally) = (http.clone(), stop.clone(), tally.clone());
            tasks.spawn(async move {
                for i in 0u64.. {
                    let body = json!({"model": model, "messages": [{"role": "user", "content": format!("c{c} q{i}")}]});
                    let sent = http.post(&url).json(&body).send();
                    let start = tokio::time::Instant::now();
                    let answer = tokio::select! {
                        () = stop.cancelled() => return,
                        answer = sent => answer,
                    };
                    let (status, text) = match answer {
                        Ok(r) => {
                            let status = r.status().as_u16();
                            (status, r.text().await.unwrap_or_default())
                        }
                        Err(e) => (0, e.to_string()),
                    };
                    {
                        let mut tally = tally.lock().unwrap_or_else(PoisonError::into_inner);
                        tally.slowest = tally.slowest.max(start.elapsed());
                        tally.record(status, || text);
                    }
                    if status == 0 {
                        // A replica that is gone: do not spin on it.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            });
        }
        Load { stop, tasks, tally }
    }

    /// What the clients got so far.
    pub fn tally(&self) -> Tally {
        self.tally
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Stops every client (requests still waiting are abandoned) and returns the tally.
    pub async fn stop(mut self) -> Tally {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
        self.tally()
    }
}

/// The measures of a run, from the mock's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Requests the mock refused with 429, all keys.
    pub upstream_429s: u64,
    /// Per key: its limit and the most requests the mock received in one window.
    pub worst_window: BTreeMap<String, (u32, u32)>,
    /// Requests received, all keys.
    pub received: u64,
}

impl Report {
    /// Reads the report from `counts`.
    pub fn of(counts: &Counts) -> Report {
        Report {
            upstream_429s: counts.keys.iter().map(|k| k.rate_limited).sum(),
            worst_window: counts
                .keys
                .iter()
                .map(|k| (k.key.clone(), (k.limit.unwrap_or(0), k.max_in_window)))
                .collect(),
            received: counts.total(),
        }
    }

    /// Keys whose busiest window held more than their limit.
    pub fn over_limit(&self) -> Vec<(&str, u32, u32)> {
        self.worst_window
            .iter()
            .filter(|(_, (limit, max))| max > limit)
            .map(|(k, (limit, max))| (k.as_str(), *limit, *max))
            .collect()
    }
}

/// How long `key` went without a request after `from_us` (on the mock's clock) although its
/// window had room: from the first instant at or after `from_us` when fewer than `limit`
/// requests were in the mock's window, to the first request received after it. `None` when
/// no request came at all (the whole rest of the run was lost). Only meaningful for a key
/// kept saturated.
pub fn idle_with_room(
    key: &KeyCounts,
    limit: u32,
    window: Duration,
    from_us: u64,
) -> Option<Duration> {
    let window_us = u64::try_from(window.as_micros()).unwrap_or(u64::MAX);
    let times = &key.timestamps_us;
    // Requests still in the window (from_us - window, from_us].
    let inside: Vec<u64> = times
        .iter()
        .copied()
        .filter(|&t| t + window_us > from_us && t <= from_us)
        .collect();
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let room_at = if inside.len() < limit {
        from_us
    } else {
        // The oldest requests must leave: room when the (n - limit + 1)-th oldest does.
        inside[inside.len() - limit] + window_us
    };
    let next = times.iter().copied().find(|&t| t >= room_at)?;
    Some(Duration::from_micros(next - room_at))
}
