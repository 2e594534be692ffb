//! TierQueue: customer tiers, the queue class of each, and how waiting work is delivered.

use crate::common::{Condition, SecretKeyRef};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Customer tiers and their queues: who goes first, how long each may wait, and how batch
/// work is delivered.
#[derive(CustomResource, KubeSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "floodgate.dev",
    version = "v1alpha1",
    kind = "TierQueue",
    plural = "tierqueues",
    shortname = "tq",
    category = "floodgate",
    namespaced,
    derive = "PartialEq",
    status = "TierQueueStatus",
    doc = "Customer tiers mapped to priority, standard and batch queues with weights, waits and async delivery.",
    printcolumn(name = "Tiers", type_ = "integer", json_path = ".status.tierCount"),
    printcolumn(name = "Queued", type_ = "integer", json_path = ".status.queued"),
    printcolumn(
        name = "Oldest Wait Ms",
        type_ = "integer",
        json_path = ".status.oldestWaitMs"
    ),
    printcolumn(
        name = "Dead Letters",
        type_ = "integer",
        json_path = ".status.deadLetters"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.tiers.all(t, self.tiers.exists_one(u, u.name == t.name))").message("tier names must be unique").field_path(".tiers"),
    validation = Rule::new("!has(self.defaultTier) || self.tiers.exists(t, t.name == self.defaultTier)").message("defaultTier must name one of the tiers").field_path(".defaultTier")
)]
pub struct TierQueueSpec {
    /// The tiers, e.g. enterprise, pro, basic, free.
    #[schemars(length(min = 1, max = 16))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub tiers: Vec<Tier>,
    /// Tier of callers whose identity names none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_tier: Option<String>,
    /// Retries of queued and async work.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Where work goes once its retries are spent.
    #[serde(default)]
    pub dead_letter: DeadLetter,
    /// The share of a key's rate window each queue class needs free to take from it, so that
    /// lower classes leave room for higher ones, also across replicas sharing budgets. Once a
    /// request has waited half its `maxWaitMs` its class needs half of its own headroom or
    /// half of the smallest headroom set, whichever is less: the reserve shrinks but never
    /// goes, and past half their waits the lower classes share what they may take by weight.
    #[serde(default)]
    pub class_headroom: ClassHeadroom,
}

/// Percent of a key's request window that must still be free for a class to take a request
/// from it: with 50 for batch, batch work stops when a key is half used and leaves the rest to
/// the interactive classes. Decided inside the same admission as the limit itself (in Redis
/// when budgets are shared).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClassHeadroom {
    /// Class priority.
    #[serde(default)]
    #[schemars(range(max = 99))]
    pub priority: u32,
    /// Class standard.
    #[serde(default = "default_standard_headroom")]
    #[schemars(range(max = 99))]
    pub standard: u32,
    /// Class batch.
    #[serde(default = "default_batch_headroom")]
    #[schemars(range(max = 99))]
    pub batch: u32,
}

impl ClassHeadroom {
    /// The headroom of `class`, in percent.
    pub fn of(&self, class: QueueClass) -> u32 {
        match class {
            QueueClass::Priority => self.priority,
            QueueClass::Standard => self.standard,
            QueueClass::Batch => self.batch,
        }
    }
}

impl Default for ClassHeadroom {
    fn default() -> Self {
        Self {
            priority: 0,
            standard: default_standard_headroom(),
            batch: default_batch_headroom(),
        }
    }
}

fn default_standard_headroom() -> u32 {
    20
}

fn default_batch_headroom() -> u32 {
    50
}

/// Queue class of a tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum QueueClass {
    /// Served first, interactive.
    Priority,
    /// Interactive, after priority.
    Standard,
    /// Collected and sent in batches; answered asynchronously.
    Batch,
}

impl QueueClass {
    /// Name used in manifests and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueClass::Priority => "priority",
            QueueClass::Standard => "standard",
            QueueClass::Batch => "batch",
        }
    }
}

/// One customer tier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.class == 'batch' ? has(self.batch) : !has(self.batch)").message("batch settings are required for class batch and allowed only there").field_path(".batch"),
    validation = Rule::new("!has(self.waitTargetMs) || self.waitTargetMs <= self.maxWaitMs").message("waitTargetMs must not exceed maxWaitMs").field_path(".waitTargetMs")
)]
pub struct Tier {
    /// Tier name, as carried by virtual keys.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Queue class.
    pub class: QueueClass,
    /// Share of dispatch slots when requests wait: each tier with requests waiting gets its
    /// weight over the sum of their weights (weighted fair queueing), so none starves.
    #[serde(default = "default_weight")]
    #[schemars(range(min = 1, max = 1000))]
    pub weight: u32,
    /// Longest a request may wait in the queue, in milliseconds, before it is answered
    /// (429 with `retry-after`, or async).
    #[schemars(range(min = 1, max = 86400000))]
    pub max_wait_ms: u64,
    /// The wait the tier is promised, in milliseconds (its SLO: attainment is the share of
    /// requests that waited at most this long); `maxWaitMs` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400000))]
    pub wait_target_ms: Option<u64>,
    /// Most requests this tier may have waiting; more are refused with 429.
    #[serde(default = "default_max_queue_depth")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_queue_depth: u32,
    /// Batching, for class batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<Batch>,
    /// Asynchronous delivery of results.
    #[serde(default, rename = "async", skip_serializing_if = "Option::is_none")]
    pub async_: Option<AsyncDelivery>,
}

fn default_weight() -> u32 {
    1
}

fn default_max_queue_depth() -> u32 {
    1000
}

/// Batching of a batch-class tier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Batch {
    /// Requests per batch.
    #[schemars(range(min = 1, max = 1000))]
    pub size: u32,
    /// Seconds between batches.
    #[schemars(range(min = 1, max = 86400))]
    pub interval_seconds: u32,
    /// A released batch waits while the pool's keys are more than this percent used (off-peak
    /// deferral), but never past the tier's `maxWaitMs`.
    #[serde(default = "default_off_peak")]
    #[schemars(range(min = 1, max = 100))]
    pub off_peak_utilization_percent: u32,
}

fn default_off_peak() -> u32 {
    80
}

/// How a result is delivered when the caller does not wait.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!self.notify.exists(n, n == 'webhook') || has(self.webhook)").message("webhook settings are required when notify includes webhook").field_path(".webhook"),
    validation = Rule::new("!self.notify.exists(n, n == 'email') || has(self.email)").message("email settings are required when notify includes email").field_path(".email")
)]
pub struct AsyncDelivery {
    /// Channels notified when a job completes or fails.
    #[serde(default)]
    #[schemars(length(max = 2))]
    pub notify: Vec<NotifyChannel>,
    /// Webhook settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<Webhook>,
    /// Email settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<Email>,
    /// Seconds a finished result is kept for retrieval.
    #[serde(default = "default_result_ttl")]
    #[schemars(range(min = 60, max = 2592000))]
    pub result_ttl_seconds: u32,
}

fn default_result_ttl() -> u32 {
    86400
}

/// A notification channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum NotifyChannel {
    /// HTTP POST to a URL.
    Webhook,
    /// Email through SMTP.
    Email,
}

/// Webhook notification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Webhook {
    /// URL the job result is POSTed to. A job may override it. Each POST carries the whole
    /// job, its request (the prompt) and its answer, for every tenant of the tier whose job
    /// names no webhook of its own (Batch API lines included): point it only at a receiver
    /// trusted with every tenant's prompts and answers.
    #[schemars(length(max = 2048), regex(pattern = "^https?://[^\\s]+$"))]
    pub url: String,
    /// HMAC-SHA256 signing secret, sent as a signature header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_secret_ref: Option<SecretKeyRef>,
}

/// Email notification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Email {
    /// Sender address.
    #[schemars(length(min = 3, max = 254), regex(pattern = "^[^@\\s]+@[^@\\s]+$"))]
    pub from: String,
    /// Recipient of the tier's own notifications when `notify` lists `email`: every job of the
    /// tier that names no `notify.email` of its own is emailed here (Batch API lines
    /// excepted: one mail per line is not what a person wants). A job's own address wins.
    /// Each mail carries the whole job, its request (the prompt) and its answer, whichever
    /// tenant it is of: name only a mailbox trusted with every tenant's prompts and answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 3, max = 254), regex(pattern = "^[^@\\s]+@[^@\\s]+$"))]
    pub to: Option<String>,
    /// SMTP server `host:port` (587 for submission). The gateway always uses STARTTLS and
    /// verifies the server's certificate for this host.
    #[schemars(
        length(min = 3, max = 260),
        regex(pattern = "^(\\[[0-9A-Fa-f:.]+\\]|[^\\s:\\[\\]]+):[0-9]{1,5}$")
    )]
    pub smtp_server: String,
    /// SMTP credentials: a Secret key whose value is `user:password` (split at the first
    /// `:`). Sent only after STARTTLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretKeyRef>,
    /// Extra CA certificates (PEM) trusted for the server's certificate, for a server with a
    /// private CA; the system roots are trusted as well.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
}

/// Retries of queued and async work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.maxBackoffSeconds >= self.initialBackoffSeconds").message("maxBackoffSeconds must be at least initialBackoffSeconds").field_path(".maxBackoffSeconds")
)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 1, max = 20))]
    pub max_attempts: u32,
    /// Delay before the first retry; doubles each time.
    #[serde(default = "default_initial_backoff")]
    #[schemars(range(min = 1, max = 3600))]
    pub initial_backoff_seconds: u32,
    /// Longest delay between retries.
    #[serde(default = "default_max_backoff")]
    #[schemars(range(min = 1, max = 86400))]
    pub max_backoff_seconds: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: default_max_attempts(),
            initial_backoff_seconds: default_initial_backoff(),
            max_backoff_seconds: default_max_backoff(),
        }
    }
}

fn default_max_attempts() -> u32 {
    3
}

fn default_initial_backoff() -> u32 {
    1
}

fn default_max_backoff() -> u32 {
    60
}

/// Dead-letter settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    /// Keep work whose retries are spent, for inspection and replay.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Seconds dead letters are kept.
    #[serde(default = "default_dead_letter_retention")]
    #[schemars(range(min = 60, max = 2592000))]
    pub retention_seconds: u32,
}

impl Default for DeadLetter {
    fn default() -> Self {
        Self {
            enabled: true,
            retention_seconds: default_dead_letter_retention(),
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_dead_letter_retention() -> u32 {
    604800
}

/// Observed state of the queues.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TierQueueStatus {
    /// The `metadata.generation` last reconciled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready and SecretsFound (webhook signing and SMTP credentials).
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Number of tiers.
    #[serde(default)]
    pub tier_count: u32,
    /// Requests waiting over all tiers, over every gateway replica.
    #[serde(default)]
    pub queued: u64,
    /// How long the request that has waited longest, of any tier, has waited (ms).
    #[serde(default)]
    pub oldest_wait_ms: u64,
    /// Waiting per queue class.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["class"]))]
    pub classes: Vec<ClassStatus>,
    /// Jobs in the dead-letter queue.
    #[serde(default)]
    pub dead_letters: u64,
    /// Per-tier state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub tiers: Vec<TierStatus>,
}

/// Requests waiting in one queue class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClassStatus {
    /// The class.
    pub class: QueueClass,
    /// Requests of its tiers waiting.
    pub queued: u64,
    /// How long the longest-waiting of them has waited (ms).
    #[serde(default)]
    pub oldest_wait_ms: u64,
}

/// Observed state of one tier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TierStatus {
    /// Tier name.
    pub name: String,
    /// Requests waiting.
    pub queued: u64,
    /// How long its longest-waiting request has waited (ms).
    #[serde(default)]
    pub oldest_wait_ms: u64,
    /// p95 of the queue wait of the requests admitted over the last five minutes, over every
    /// gateway replica (ms): the upper bound of the wait histogram's bucket that holds it
    /// (10, 50, 100, 250, 500 ms, 1, 2, 5, 10, 30, 60, 120, 300 s). Absent with no request
    /// admitted, or when the 95th waited longer than 300 s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p95_wait_ms: Option<u64>,
    /// Requests of the tier admitted or refused for time or room over the last five minutes.
    #[serde(default)]
    pub recent_requests: u64,
    /// Of those, the ones admitted within the tier's wait target.
    #[serde(default)]
    pub within_target: u64,
    /// SLO attainment: the share of `recentRequests` within the wait target, in percent with
    /// one decimal (`"99.5"`); absent with no request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slo_attainment_percent: Option<String>,
}
