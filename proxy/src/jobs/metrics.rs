//! The jobs subsystem's metrics, registered in the process's registry
//! ([`crate::metrics::global`]). Counted on the replica where the change happens.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::OnceLock;

/// Labels: a job state.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// `queued`, `running`, `retrying`, `completed`, `failed`, `cancelled`, `redriven`.
    pub state: &'static str,
}

/// Labels: a tier.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabels {
    /// The tier's name.
    pub tier: String,
}

/// Labels: a tier and a tenant.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BacklogLabels {
    /// The tier's name.
    pub tier: String,
    /// The tenant's name (empty when the gateway is open).
    pub tenant: String,
}

/// Labels: a webhook try's outcome.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `delivered`, `retried` (no answer, 429 or 5xx), `refused` (another status).
    pub outcome: &'static str,
}

/// The families.
#[derive(Debug)]
pub struct JobMetrics {
    /// `floodgate_jobs_total{state}`: jobs entering each state.
    pub states: Family<StateLabels, Counter>,
    /// `floodgate_jobs_wait_seconds{tier}`: from queued (or due) to an attempt's start.
    pub wait: Family<TierLabels, Histogram>,
    /// `floodgate_jobs_run_seconds{tier}`: an attempt's run time.
    pub run: Family<TierLabels, Histogram>,
    /// `floodgate_jobs_webhook_deliveries_total{outcome}`.
    pub webhooks: Family<OutcomeLabels, Counter>,
    /// `floodgate_jobs_email_deliveries_total{outcome}`: `delivered`, `failed`.
    pub emails: Family<OutcomeLabels, Counter>,
    /// `floodgate_jobs_dead_letters_total`: jobs sent to the dead letters.
    pub dead_letters: Counter,
    /// `floodgate_jobs_pending{tier, tenant}`: jobs not over yet (queued, running, waiting
    /// for a retry), as the store counts them; with Redis every replica shows the same,
    /// shared count.
    pub pending: Family<BacklogLabels, Gauge>,
}

fn seconds() -> Histogram {
    Histogram::new([
        0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
    ])
}

impl JobMetrics {
    /// Counts a job entering `state`.
    pub fn state(&self, state: &'static str) {
        self.states.get_or_create(&StateLabels { state }).inc();
    }

    /// Counts a webhook try.
    pub fn webhook(&self, outcome: &'static str) {
        self.webhooks
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// Counts an email try.
    pub fn email(&self, outcome: &'static str) {
        self.emails.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    /// Sets the pending gauges to `counts`; pairs no longer counted go to 0.
    pub fn set_pending(&self, counts: &[((String, String), u64)]) {
        let mut seen = std::collections::HashSet::new();
        for ((tier, tenant), n) in counts {
            let labels = BacklogLabels {
                tier: tier.clone(),
                tenant: tenant.clone(),
            };
            self.pending.get_or_create(&labels).set(*n as i64);
            seen.insert(labels);
        }
        let mut gone = Vec::new();
        // Family has no iterator: remember what was set before.
        let known = KNOWN.get_or_init(Default::default);
        let mut known = known.lock().unwrap_or_else(|p| p.into_inner());
        for labels in known.iter() {
            if !seen.contains(labels) {
                gone.push(labels.clone());
            }
        }
        for labels in gone {
            self.pending.get_or_create(&labels).set(0);
        }
        known.extend(seen);
    }

    /// Records an attempt of a `tier` job that waited `wait` and ran `run` seconds.
    pub fn attempt(&self, tier: &str, wait: f64, run: f64) {
        let labels = TierLabels {
            tier: tier.to_owned(),
        };
        self.wait.get_or_create(&labels).observe(wait);
        self.run.get_or_create(&labels).observe(run);
    }
}

/// Every (tier, tenant) pending gauge ever set, to zero those no longer counted.
static KNOWN: OnceLock<std::sync::Mutex<std::collections::HashSet<BacklogLabels>>> =
    OnceLock::new();

/// The process's job metrics.
pub fn get() -> &'static JobMetrics {
    static METRICS: OnceLock<JobMetrics> = OnceLock::new();
    METRICS.get_or_init(|| JobMetrics {
        states: Family::default(),
        wait: Family::new_with_constructor(seconds),
        run: Family::new_with_constructor(seconds),
        webhooks: Family::default(),
        emails: Family::default(),
        dead_letters: Counter::default(),
        pending: Family::default(),
    })
}

/// Registers the families in `registry`.
pub fn register(registry: &mut Registry) {
    let m = get();
    registry.register(
        "floodgate_jobs",
        "Jobs entering each state",
        m.states.clone(),
    );
    registry.register(
        "floodgate_jobs_wait_seconds",
        "Time a job waited from queued (or its retry's due time) to an attempt's start, by tier",
        m.wait.clone(),
    );
    registry.register(
        "floodgate_jobs_run_seconds",
        "Run time of a job's attempt, by tier",
        m.run.clone(),
    );
    registry.register(
        "floodgate_jobs_webhook_deliveries",
        "Webhook delivery tries by outcome",
        m.webhooks.clone(),
    );
    registry.register(
        "floodgate_jobs_email_deliveries",
        "Email delivery tries by outcome",
        m.emails.clone(),
    );
    registry.register(
        "floodgate_jobs_pending",
        "Jobs not over yet (queued, running, waiting for a retry) by tier and tenant; with Redis, the shared count (the same on every replica)",
        m.pending.clone(),
    );
    registry.register(
        "floodgate_jobs_dead_letters",
        "Jobs sent to the dead letters",
        m.dead_letters.clone(),
    );
}
