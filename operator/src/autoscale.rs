//! Autoscaling of LocalModelDeployments on the gateway's demand for them.
//!
//! **Signal.** Every proxy replica publishes, per local model, the requests waiting for it,
//! those it is answering and the p95 of its answer times (`floodgate_proxy::demand`, layout
//! in [`floodgate_crds::redis_keys`]); [`UsageReader::demand`] sums the live replicas'.
//!
//! **Policy** ([`decide`]), with `spec.autoscaling` (`T` = `queueDepth`, per replica):
//! - *up x2* (at most `maxReplicas`) when more than `T` requests per current replica wait
//!   (counting the requests that spilled over to another target in the last 30 s), or the
//!   p95 latency is over `latencyMs`; not while the last scale-up's replicas are still
//!   turning ready (a new Ollama replica pulls its model first: doubling again on the same
//!   queue would overshoot);
//! - *down x0.5* (rounded up, at least `minReplicas`) when the queue would still be at most
//!   half of `T` per replica at the smaller size, nothing spilled over in the last 30 s, the
//!   requests in flight fit the smaller
//!   size's slots (`numParallel` per replica), and the latency (if bounded) is under half of
//!   its bound (hysteresis: a latency just under the bound after a scale-up must not halve
//!   the replicas back over it), once `cooldownSeconds` have passed since the last change;
//! - back within `minReplicas..maxReplicas` at once if the bounds moved.
//!
//! The change is written through the scale subresource (`spec.replicas`), recorded in status
//! (`lastScaleTime`, `lastScaleReason`) and announced by an Event (`ScaledUp`/`ScaledDown`).
//! The time of the last change is kept per object on tokio's clock (so the cooldown can be
//! tested exactly on a paused clock) and taken from `status.lastScaleTime` after a restart.

use crate::error::Result;
use crate::usage::UsageReader;
use floodgate_crds::local_model::Autoscaling;
use floodgate_crds::redis_keys::ReplicaKeys;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// How often a LocalModelDeployment with autoscaling reads its demand again.
pub const DEMAND_REFRESH: Duration = Duration::from_secs(5);

/// Requests one Ollama replica serves at once when `ollama.numParallel` is not set: the
/// gateway's own default for its concurrency gate (`floodgate_proxy::routing::plan`).
pub const DEFAULT_NUM_PARALLEL: u32 = 4;

/// Where local models' demand is read.
#[derive(Debug)]
pub enum DemandSource {
    /// No Redis configured (`--redis-url`): demand is not read and autoscaling does not act;
    /// every LocalModelDeployment that asks for autoscaling says so in a condition.
    Unconfigured,
    /// The gateway's Redis, by the demand contract ([`UsageReader::demand`]).
    Redis(Arc<UsageReader>),
    /// Figures set in the process per `namespace/name`: demand without a gateway (the
    /// reconciler tests). A model with no entry reads as no reporter.
    Fixed(Mutex<HashMap<String, Demand>>),
}

impl DemandSource {
    /// A [`DemandSource::Fixed`] with `figures` per `namespace/name`.
    pub fn fixed(figures: impl IntoIterator<Item = (String, Demand)>) -> Self {
        Self::Fixed(Mutex::new(figures.into_iter().collect()))
    }

    /// Sets the figures of `namespace/name` (a [`DemandSource::Fixed`] only).
    pub fn set(&self, namespace: &str, name: &str, demand: Demand) {
        if let Self::Fixed(figures) = self {
            figures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(format!("{namespace}/{name}"), demand);
        }
    }

    /// Whether demand is read at all.
    pub fn is_configured(&self) -> bool {
        !matches!(self, Self::Unconfigured)
    }

    /// The demand for LocalModelDeployment `namespace/name`; `None` when unconfigured.
    pub async fn read(&self, namespace: &str, name: &str) -> Option<Result<Demand>> {
        match self {
            Self::Unconfigured => None,
            Self::Redis(reader) => Some(reader.demand(namespace, name).await),
            Self::Fixed(figures) => Some(Ok(figures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&format!("{namespace}/{name}"))
                .copied()
                .unwrap_or_default())),
        }
    }
}

/// A model's demand over every live gateway replica.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Demand {
    /// Requests waiting for the model.
    pub queued: u64,
    /// Requests it is answering.
    pub in_flight: u64,
    /// The largest p95 answer time any replica reports (ms); 0 with none.
    pub latency_p95_ms: u64,
    /// Requests that spilled over to another target over the last 30 s (the model was
    /// saturated): demand it could not take.
    pub spilled: u64,
    /// Gateway replicas whose figures count.
    pub reporters: u32,
}

/// What the autoscaler does about one model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Keep the replicas; why (for logs).
    Hold(String),
    /// Change to `to` replicas, for `reason`.
    Scale {
        /// The new replica count.
        to: i32,
        /// A sentence naming the signal and threshold, for status and the Event.
        reason: String,
    },
}

impl UsageReader {
    /// The demand for LocalModelDeployment `namespace/name`, summed over the replicas whose
    /// figures have not expired.
    pub async fn demand(&self, namespace: &str, name: &str) -> Result<Demand> {
        let hashes = self
            .replica_hashes(&ReplicaKeys::demand(namespace, name))
            .await?;
        let mut demand = Demand::default();
        for hash in hashes {
            // A field absent (older proxies publish no `spilled`) or not a number is nothing;
            // a replica without both counts is not a reporter.
            let field = |f: &str| hash.get(f).and_then(|v| v.parse::<u64>().ok());
            let (Some(queued), Some(in_flight)) = (field("queued"), field("inFlight")) else {
                continue;
            };
            demand.queued += queued;
            demand.in_flight += in_flight;
            demand.spilled += field("spilled").unwrap_or(0);
            demand.latency_p95_ms = demand
                .latency_p95_ms
                .max(field("latencyP95Ms").unwrap_or(0));
            demand.reporters += 1;
        }
        Ok(demand)
    }
}

/// The decision for a model running `current` replicas (of which `ready` are ready, each
/// serving `parallel` requests at once) under `policy`, given `demand` and the time since its
/// last scale change (`None`: never).
pub fn decide(
    current: i32,
    ready: i32,
    parallel: u32,
    policy: &Autoscaling,
    demand: &Demand,
    since_change: Option<Duration>,
) -> Decision {
    let (min, max) = (
        policy.min_replicas,
        policy.max_replicas.max(policy.min_replicas),
    );
    if current < min {
        return Decision::Scale {
            to: min,
            reason: format!("{current} replicas is under minReplicas {min}"),
        };
    }
    if current > max {
        return Decision::Scale {
            to: max,
            reason: format!("{current} replicas is over maxReplicas {max}"),
        };
    }
    if demand.reporters == 0 {
        // No gateway replica publishes demand for this model: no figure is not a figure of
        // zero, and scaling down on it would halve a model that may be busy.
        return Decision::Hold("no gateway replica publishes demand for this model".to_owned());
    }
    let threshold = u64::from(policy.queue_depth);
    let capacity = threshold.saturating_mul(u64::try_from(current).unwrap_or(0));
    let slow = policy
        .latency_ms
        .filter(|bound| demand.latency_p95_ms > u64::from(*bound));
    // Requests that spilled over waited nowhere here, but wanted this model: they count as
    // waiting, so that a model whose overflow goes to a premium pool still grows.
    let wanting = demand.queued.saturating_add(demand.spilled);
    let why_up = if wanting > capacity {
        Some(if demand.spilled > 0 {
            format!(
                "{} requests waiting and {} spilled over in 30 s, over {threshold} per replica x {current}",
                demand.queued, demand.spilled
            )
        } else {
            format!(
                "{} requests waiting, over {threshold} per replica x {current}",
                demand.queued
            )
        })
    } else {
        slow.map(|bound| {
            format!(
                "p95 latency {} ms over latencyMs {bound}",
                demand.latency_p95_ms
            )
        })
    };
    if let Some(why) = why_up {
        if current >= max {
            return Decision::Hold(format!("{why}, but at maxReplicas {max}"));
        }
        if ready < current {
            return Decision::Hold(format!(
                "{why}, but only {ready}/{current} replicas are ready yet"
            ));
        }
        let to = current.saturating_mul(2).clamp(1, max);
        return Decision::Scale {
            to,
            reason: format!("scaled up {current} -> {to}: {why}"),
        };
    }
    let half = ((current + 1) / 2).max(min);
    if half >= current {
        return Decision::Hold(format!("demand within bounds at minReplicas {min}"));
    }
    if demand.spilled > 0 {
        return Decision::Hold(format!(
            "{} requests spilled over in 30 s: the model is saturated at times",
            demand.spilled
        ));
    }
    let room = threshold.saturating_mul(u64::try_from(half).unwrap_or(0)) / 2;
    if demand.queued > room {
        return Decision::Hold(format!(
            "{} requests waiting: more than half of {threshold} per replica at {half} replicas",
            demand.queued
        ));
    }
    // The replicas left must hold the requests being answered now: removing a replica cuts
    // the answers it is streaming, and the rest would queue behind the survivors.
    let slots = u64::from(parallel).saturating_mul(u64::try_from(half).unwrap_or(0));
    if demand.in_flight > slots {
        return Decision::Hold(format!(
            "{} requests in flight: more than {half} replicas x {parallel} parallel hold",
            demand.in_flight
        ));
    }
    // Hysteresis: up over the bound, down only under half of it, so that a latency just
    // under the bound after a scale-up does not halve the replicas back into it.
    if let Some(bound) = policy.latency_ms {
        let calm = u64::from(bound) / 2;
        if demand.latency_p95_ms > calm {
            return Decision::Hold(format!(
                "p95 latency {} ms is over half of latencyMs {bound}: not low enough to scale down",
                demand.latency_p95_ms
            ));
        }
    }
    let cooldown = Duration::from_secs(u64::from(policy.cooldown_seconds));
    if let Some(since) = since_change.filter(|since| *since < cooldown) {
        return Decision::Hold(format!(
            "demand is low, but the cooldown has {} ms left",
            (cooldown - since).as_millis()
        ));
    }
    let latency = match policy.latency_ms {
        Some(bound) => format!(
            ", p95 latency {} ms within half of {bound}",
            demand.latency_p95_ms
        ),
        None => String::new(),
    };
    Decision::Scale {
        to: half,
        reason: format!(
            "scaled down {current} -> {half}: {} requests waiting, at most half of {threshold} per replica, {} in flight{latency}, for {}s of cooldown",
            demand.queued, demand.in_flight, policy.cooldown_seconds
        ),
    }
}

/// When each model's replicas last changed, on tokio's clock.
#[derive(Debug, Default)]
pub struct Autoscaler {
    last_change: Mutex<HashMap<String, Instant>>,
}

impl Autoscaler {
    /// Time since object `key` last changed scale: from this process's record, else from
    /// `status_time` (`status.lastScaleTime`, RFC 3339) left by an earlier operator, else none.
    pub fn since_change(&self, key: &str, status_time: Option<&str>) -> Option<Duration> {
        let known = self
            .last_change
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .copied();
        if let Some(at) = known {
            return Some(at.elapsed());
        }
        let then: k8s_openapi::jiff::Timestamp = status_time?.parse().ok()?;
        let elapsed = k8s_openapi::jiff::Timestamp::now().duration_since(then);
        Some(Duration::try_from(elapsed).unwrap_or(Duration::ZERO))
    }

    /// Records that object `key` changed scale now.
    pub fn changed(&self, key: &str) {
        self.last_change
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_owned(), Instant::now());
    }

    /// Forgets every object whose key `keep` rejects (deleted).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.last_change
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|key, _| keep(key));
    }
}

#[cfg(test)]
mod tests;
