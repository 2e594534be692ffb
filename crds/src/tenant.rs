//! Tenant: a customer of the gateway, its tier, its client API keys and its own limits.

use crate::common::{Condition, SecretKeyRef};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// A customer of the gateway: which tier its requests queue in, the client API keys it calls
/// with (by Secret reference; the gateway keeps only a hash of each), and optional limits of
/// its own, enforced before its requests queue.
#[derive(CustomResource, KubeSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "floodgate.dev",
    version = "v1alpha1",
    kind = "Tenant",
    plural = "tenants",
    shortname = "tn",
    category = "floodgate",
    namespaced,
    derive = "PartialEq",
    status = "TenantStatus",
    doc = "A customer of the gateway: its tier, client API keys (secretRef), limits and allowed models.",
    printcolumn(name = "Tier", type_ = "string", json_path = ".spec.tier"),
    printcolumn(name = "RPM Limit", type_ = "integer", json_path = ".spec.limits.rpm"),
    printcolumn(name = "Used RPM", type_ = "integer", json_path = ".status.usedRpm"),
    printcolumn(name = "TPM Limit", type_ = "integer", json_path = ".spec.limits.tpm"),
    printcolumn(name = "Used TPM", type_ = "integer", json_path = ".status.usedTpm"),
    printcolumn(name = "Last Seen", type_ = "date", json_path = ".status.lastSeen"),
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
    validation = Rule::new("self.keys.all(k, self.keys.exists_one(j, j.name == k.name))").message("client key names must be unique within a tenant").field_path(".keys"),
    validation = Rule::new("self.keys.all(k, self.keys.exists_one(j, j.secretRef.name == k.secretRef.name && j.secretRef.key == k.secretRef.key))").message("each client key must reference a different secret key").field_path(".keys"),
    validation = Rule::new("!has(self.models) || self.models.all(m, self.models.exists_one(n, n == m))").message("allowed models must be unique").field_path(".models")
)]
pub struct TenantSpec {
    /// The tier its requests queue in: a tier name of the TierQueue. Unset: the TierQueue's
    /// `defaultTier`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub tier: Option<String>,
    /// Client API keys, sent as `Authorization: Bearer <key>` or `x-api-key: <key>`. At least
    /// one; several allow a rotation without downtime. At most 16, for the API server's CEL
    /// cost budget of the uniqueness rules.
    #[schemars(length(min = 1, max = 16))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub keys: Vec<ClientKey>,
    /// Limits of this tenant over all its keys, enforced before its requests queue (429 with
    /// `retry-after` past them). Unset: none of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<TenantLimits>,
    /// Model ids or aliases this tenant may call; empty: every model of the gateway.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 256)))]
    pub models: Vec<String>,
}

/// One client API key of a tenant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientKey {
    /// A name for the key (logs and status); never the key itself.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Where the key is stored.
    pub secret_ref: SecretKeyRef,
}

/// Limits of one tenant, over the same window as the provider keys' budgets (a minute).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantLimits {
    /// Requests per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub rpm: Option<u32>,
    /// Tokens per minute (input + output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tpm: Option<u32>,
    /// Requests answered at the same time (a stream counts until it ends), on each gateway
    /// replica: with N replicas a tenant may have up to N times this many (rpm and tpm are
    /// shared through Redis; this count is not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub concurrent: Option<u32>,
}

/// Observed use of a tenant.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantStatus {
    /// The `metadata.generation` last reconciled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, SecretsFound, KeysReady, Degraded and UsageTracked (see the operator's `tenant`
    /// controller).
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Requests in the current window, over all gateway replicas (tracked with `limits.rpm`).
    #[serde(default)]
    pub used_rpm: u64,
    /// Tokens in the current window, over all gateway replicas (tracked with `limits.tpm`).
    #[serde(default)]
    pub used_tpm: u64,
    /// When a request of this tenant was last seen (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
}
