//! RoutingPolicy: how prompts are classified, which tier and class of prompt goes to which
//! pool or local model (ordered rules, each with a fallback chain), and monthly cost budgets.
//!
//! A resource of its own rather than pool or tier fields: a rule reads the tier (TierQueue),
//! the prompt class, the requested model and the tenant, and names targets in several pools
//! and local models. Spread over pools, the rules' order (the first match wins) would have
//! no single place to be read or reviewed.

use crate::common::Condition;
use crate::local_model::PromptClass;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Ordered routing rules (tier, prompt class, model, tenant -> a chain of targets), the
/// prompt classifier's settings, and monthly cost budgets.
#[derive(CustomResource, KubeSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "floodgate.dev",
    version = "v1alpha1",
    kind = "RoutingPolicy",
    plural = "routingpolicies",
    shortname = "rp",
    category = "floodgate",
    namespaced,
    derive = "PartialEq",
    status = "RoutingPolicyStatus",
    doc = "Routing rules by tier, prompt class, model and tenant to pools and local models, with the classifier's settings and monthly cost budgets.",
    printcolumn(name = "Rules", type_ = "integer", json_path = ".status.ruleCount"),
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
    validation = Rule::new("self.rules.all(r, self.rules.exists_one(s, s.name == r.name))").message("rule names must be unique").field_path(".rules")
)]
pub struct RoutingPolicySpec {
    /// How prompts are classified (simple, medium, complex, code).
    #[serde(default)]
    pub classifier: Classifier,
    /// Rules in order: the first whose match holds routes the request. A request no rule
    /// matches goes where its model name says (the pools that offer it).
    #[serde(default)]
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub rules: Vec<RoutingRule>,
    /// The pool all traffic would go to without routing: the cost of each request there is
    /// the counterfactual of `floodgate_cost_savings_usd_total`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub premium_pool: Option<String>,
    /// Monthly budgets (calendar month, UTC) in US dollars.
    #[serde(default)]
    pub budgets: Budgets,
}

/// The prompt classifier's settings. Defaults: shorter than `simpleMaxChars` without code
/// -> simple; code fences or code-like lines -> code; multi-step wording or design vocabulary
/// -> complex; otherwise medium.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Classifier {
    /// Prompts shorter than this many characters (without code) are simple.
    #[serde(default = "default_simple_max_chars")]
    #[schemars(range(min = 1, max = 100000))]
    pub simple_max_chars: u32,
    /// Prompts longer than this many characters are complex whatever their wording.
    #[serde(default = "default_complex_min_chars")]
    #[schemars(range(min = 1, max = 10000000))]
    pub complex_min_chars: u32,
    /// Words or phrases (lower case) that mark a complex prompt, added to the defaults.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub complex_terms: Vec<String>,
    /// Words or phrases (lower case) that mark code, added to the defaults.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub code_terms: Vec<String>,
}

impl Default for Classifier {
    fn default() -> Self {
        Self {
            simple_max_chars: default_simple_max_chars(),
            complex_min_chars: default_complex_min_chars(),
            complex_terms: Vec::new(),
            code_terms: Vec::new(),
        }
    }
}

fn default_simple_max_chars() -> u32 {
    100
}

fn default_complex_min_chars() -> u32 {
    4000
}

/// One routing rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.targets.all(t, has(t.pool) != has(t.localModel))").message("each target names exactly one of pool or localModel").field_path(".targets")
)]
pub struct RoutingRule {
    /// Name, echoed in `x-floodgate-route` and in metrics.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// What the request must be; an empty list matches anything.
    #[serde(default, rename = "match")]
    pub match_: Match,
    /// Where it goes, in order: the next is tried when one cannot serve (cross-pool
    /// fallback), or, from a busy local model, by tiers that may spill over.
    #[schemars(length(min = 1, max = 8))]
    pub targets: Vec<Target>,
}

/// What a rule matches; every list that is not empty must contain the request's value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Match {
    /// Tiers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub tiers: Vec<String>,
    /// Prompt classes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4))]
    pub classes: Vec<PromptClass>,
    /// Model names or aliases as requested.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub models: Vec<String>,
    /// Tenant names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub tenants: Vec<String>,
}

/// A target of a rule: a pool or a local model, and optionally the model to ask it for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    /// An AIProviderPool by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub pool: Option<String>,
    /// A LocalModelDeployment by name: the pool provider that references it serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub local_model: Option<String>,
    /// The model (name or alias in the target) to ask for; the requested one when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub model: Option<String>,
}

/// Monthly budgets in US dollars.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Budgets {
    /// Share of a budget (0..1) at which `floodgate_cost_budget_alert` turns 1.
    #[serde(default = "default_alert_at")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub alert_at: f64,
    /// Per tenant.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub tenants: Vec<Budget>,
    /// Per pool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub pools: Vec<Budget>,
}

impl Default for Budgets {
    fn default() -> Self {
        Self {
            alert_at: default_alert_at(),
            tenants: Vec::new(),
            pools: Vec::new(),
        }
    }
}

fn default_alert_at() -> f64 {
    0.8
}

/// One monthly budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Budget {
    /// The tenant's or pool's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// US dollars per calendar month (UTC).
    #[serde(rename = "monthlyUSD")]
    #[schemars(range(min = 0.0))]
    pub monthly_usd: f64,
}

/// Observed state of a routing policy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoutingPolicyStatus {
    /// The `metadata.generation` last reconciled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Number of rules.
    #[serde(default)]
    pub rule_count: u32,
}
