//! AIProviderPool: the providers, their API keys and rate limits, and how traffic is spread
//! over them.

use crate::common::{Condition, SecretKeyRef};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A pool of AI providers and API keys that the gateway spreads requests over without ever
/// exceeding a key's rate limit.
#[derive(CustomResource, KubeSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "floodgate.dev",
    version = "v1alpha1",
    kind = "AIProviderPool",
    plural = "aiproviderpools",
    shortname = "aipp",
    category = "floodgate",
    namespaced,
    derive = "PartialEq",
    status = "AIProviderPoolStatus",
    doc = "A pool of AI providers (Claude, Gemini, OpenAI, Ollama, OpenAI-compatible) and their rate-limited API keys.",
    printcolumn(
        name = "Providers",
        type_ = "integer",
        json_path = ".status.providerCount"
    ),
    printcolumn(
        name = "Keys",
        type_ = "string",
        json_path = ".status.keys",
        description = "ready keys / total keys"
    ),
    printcolumn(
        name = "Capacity RPM",
        type_ = "integer",
        json_path = ".status.capacityRpm"
    ),
    printcolumn(name = "Used RPM", type_ = "integer", json_path = ".status.usedRpm"),
    printcolumn(
        name = "Open Circuits",
        type_ = "integer",
        json_path = ".status.openCircuits",
        description = "providers whose circuit is open on some gateway replica"
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
    validation = Rule::new("self.providers.all(p, self.providers.exists_one(q, q.name == p.name))").message("provider names must be unique within a pool").field_path(".providers"),
    validation = Rule::new("!has(self.fallback) || self.fallback.all(f, self.providers.exists(p, p.name == f))").message("every fallback entry must name a provider of this pool").field_path(".fallback")
)]
pub struct AIProviderPoolSpec {
    /// How a key is chosen among those with free budget.
    #[serde(default)]
    pub strategy: Strategy,
    /// The providers of this pool.
    #[schemars(length(min = 1, max = 32))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub providers: Vec<Provider>,
    /// Provider names in the order traffic falls over to when a provider fails. Providers not
    /// listed come after, in the order of `providers`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub fallback: Vec<String>,
    /// When a provider is cut off after repeated failures.
    #[serde(default)]
    pub circuit_breaker: CircuitBreaker,
    /// Timeouts for calls to providers.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Attempts per request over keys and providers before the caller gets an error.
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 1, max = 10))]
    pub max_attempts: u32,
    /// Active health checks of each provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
}

fn default_max_attempts() -> u32 {
    3
}

/// Key selection strategy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// The key with the most remaining budget (default).
    #[default]
    LeastLoaded,
    /// Keys in turn.
    RoundRobin,
    /// In proportion to each provider's `weight`.
    Weighted,
    /// The cheapest model first.
    Cheapest,
}

/// Wire format spoken by a provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ProviderType {
    /// Anthropic Messages API.
    Anthropic,
    /// OpenAI chat completions.
    Openai,
    /// Google Gemini generateContent.
    Gemini,
    /// Ollama `/api/chat`.
    Ollama,
    /// Any server speaking OpenAI chat completions (vLLM, llama.cpp, ...).
    OpenaiCompatible,
}

impl ProviderType {
    /// Name used in manifests, logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderType::Anthropic => "anthropic",
            ProviderType::Openai => "openai",
            ProviderType::Gemini => "gemini",
            ProviderType::Ollama => "ollama",
            ProviderType::OpenaiCompatible => "openai-compatible",
        }
    }

    /// Whether this provider type can run without API keys (self-hosted servers).
    pub fn keys_optional(self) -> bool {
        matches!(self, ProviderType::Ollama | ProviderType::OpenaiCompatible)
    }

    /// The public endpoint used when `baseUrl` is not set.
    pub fn default_base_url(self) -> &'static str {
        match self {
            ProviderType::Anthropic => "https://api.anthropic.com",
            ProviderType::Openai => "https://api.openai.com",
            ProviderType::Gemini => "https://generativelanguage.googleapis.com",
            ProviderType::Ollama => "http://127.0.0.1:11434",
            ProviderType::OpenaiCompatible => "http://127.0.0.1:8000",
        }
    }
}

/// One provider of a pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.type in ['ollama', 'openai-compatible'] || size(self.keys) > 0").message("at least one API key (keys[].secretRef) is required for this provider type").field_path(".keys"),
    validation = Rule::new("self.keys.all(k, self.keys.exists_one(j, j.secretRef.name == k.secretRef.name && j.secretRef.key == k.secretRef.key))").message("each key must reference a different secret key: the same key twice would double its rate limit").field_path(".keys"),
    validation = Rule::new("self.models.all(m, self.models.exists_one(n, n.name == m.name))").message("model names must be unique within a provider").field_path(".models"),
    validation = Rule::new("!has(self.localModel) || self.type in ['ollama', 'openai-compatible']").message("localModel needs type ollama or openai-compatible").field_path(".localModel"),
    validation = Rule::new("!has(self.localModel) || !has(self.baseUrl)").message("localModel and baseUrl exclude each other: the local model's Service is the endpoint").field_path(".localModel")
)]
pub struct Provider {
    /// Name of the provider within the pool (used in fallback, metrics and headers).
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Wire format.
    #[serde(rename = "type")]
    pub type_: ProviderType,
    /// Overrides the provider's public endpoint (mocks, corporate proxies, vLLM, Ollama).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = "^https?://[^\\s]+$"))]
    pub base_url: Option<String>,
    /// A LocalModelDeployment (by name, same namespace) this provider speaks to: its endpoint
    /// is the model's Service (its `status.endpoint`, written by the operator) in cluster
    /// mode, and its `floodgate.dev/endpoint` annotation standalone. Its concurrency
    /// (`ollama.numParallel` per ready replica) bounds the calls in flight instead of an RPM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub local_model: Option<String>,
    /// Models offered by this provider. At most 32: the API server bounds the estimated cost
    /// of the CEL uniqueness rule (O(n^2) per provider, times 32 providers); 64 exceeded it.
    #[schemars(length(min = 1, max = 32))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub models: Vec<Model>,
    /// API keys and their limits. Optional for ollama and openai-compatible. At most 32, for
    /// the same CEL cost budget as `models`.
    #[serde(default)]
    #[schemars(length(max = 32))]
    pub keys: Vec<ApiKey>,
    /// Relative share of traffic under the `weighted` strategy.
    #[serde(default = "default_weight")]
    #[schemars(range(min = 1, max = 1000))]
    pub weight: u32,
    /// Requests per minute for the whole provider, for keyless self-hosted servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub rpm: Option<u32>,
}

fn default_weight() -> u32 {
    1
}

/// A model offered by a provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Model {
    /// The provider's model id, e.g. `claude-sonnet-4`.
    #[schemars(length(min = 1, max = 256))]
    pub name: String,
    /// A name callers may use instead; several providers may share an alias, which then
    /// resolves to each of them in fallback order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub alias: Option<String>,
    /// USD per million input tokens.
    #[serde(default, rename = "inputPer1M")]
    #[schemars(range(min = 0.0))]
    pub input_per_1m: f64,
    /// USD per million output tokens.
    #[serde(default, rename = "outputPer1M")]
    #[schemars(range(min = 0.0))]
    pub output_per_1m: f64,
}

/// One API key: where to read it and its limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiKey {
    /// A display name (headers, metrics, status); defaults to `<provider>-<index>`. Never the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: Option<String>,
    /// Where the key is stored.
    pub secret_ref: SecretKeyRef,
    /// Requests per minute this key may make.
    #[schemars(range(min = 1))]
    pub rpm: u32,
    /// Tokens per minute this key may use (input + output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tpm: Option<u32>,
}

/// Circuit breaker of a provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreaker {
    /// Consecutive failures (5xx, timeouts) that open the circuit.
    #[serde(default = "default_failure_threshold")]
    #[schemars(range(min = 1, max = 1000))]
    pub failure_threshold: u32,
    /// Seconds the circuit stays open before one half-open probe.
    #[serde(default = "default_open_seconds")]
    #[schemars(range(min = 1, max = 3600))]
    pub open_seconds: u32,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        Self {
            failure_threshold: default_failure_threshold(),
            open_seconds: default_open_seconds(),
        }
    }
}

fn default_failure_threshold() -> u32 {
    5
}

fn default_open_seconds() -> u32 {
    60
}

/// Timeouts for calls to providers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Timeouts {
    /// Milliseconds to establish a connection.
    #[serde(default = "default_connect_ms")]
    #[schemars(range(min = 1, max = 60000))]
    pub connect_ms: u32,
    /// Seconds for a whole non-streaming request.
    #[serde(default = "default_request_seconds")]
    #[schemars(range(min = 1, max = 3600))]
    pub request_seconds: u32,
    /// Seconds a stream may stall between chunks before it is ended with an error event.
    #[serde(default = "default_stream_idle_seconds")]
    #[schemars(range(min = 1, max = 600))]
    pub stream_idle_seconds: u32,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect_ms: default_connect_ms(),
            request_seconds: default_request_seconds(),
            stream_idle_seconds: default_stream_idle_seconds(),
        }
    }
}

fn default_connect_ms() -> u32 {
    2000
}

fn default_request_seconds() -> u32 {
    120
}

fn default_stream_idle_seconds() -> u32 {
    30
}

/// Active health checks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheck {
    /// Seconds between checks.
    #[serde(default = "default_health_interval")]
    #[schemars(range(min = 5, max = 3600))]
    pub interval_seconds: u32,
}

fn default_health_interval() -> u32 {
    30
}

/// Observed state of a pool, written by the operator.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AIProviderPoolStatus {
    /// The `metadata.generation` last reconciled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, SecretsFound and KeysReady (see the operator's `pool` controller).
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Number of providers.
    #[serde(default)]
    pub provider_count: u32,
    /// Keys usable now (secret resolved, not failed).
    #[serde(default)]
    pub ready_keys: u32,
    /// Keys configured.
    #[serde(default)]
    pub total_keys: u32,
    /// `ready/total`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<String>,
    /// Sum of the ready keys' RPM.
    #[serde(default)]
    pub capacity_rpm: u64,
    /// Requests sent in the last minute, over all gateway replicas.
    #[serde(default)]
    pub used_rpm: u64,
    /// Providers whose circuit is open on some gateway replica; unset while no replica
    /// reports its circuits (or the operator has no Redis to read them from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_circuits: Option<u32>,
    /// Per-provider state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub providers: Vec<ProviderStatus>,
}

/// Observed state of one provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProviderStatus {
    /// Provider name.
    pub name: String,
    /// closed, half-open or open: the worst over the gateway replicas that report it;
    /// `unknown` when none does (or the operator has no Redis to read them from).
    pub circuit: String,
    /// Gateway replicas reporting this provider's circuit.
    #[serde(default)]
    pub circuit_replicas: u32,
    /// Of those, the replicas on which it is open.
    #[serde(default)]
    pub circuit_open_replicas: u32,
    /// Keys usable now.
    pub ready_keys: u32,
    /// Keys configured.
    #[serde(default)]
    pub total_keys: u32,
    /// Requests in the last minute.
    pub used_rpm: u64,
}
