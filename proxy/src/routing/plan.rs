//! A RoutingPolicy compiled against the pools and local models of one configuration, once
//! when the configuration is applied: rules hold their match sets and resolved targets, so
//! that choosing a route is a scan of a few small vectors (microseconds, no allocation).

use super::classify::Classifier;
use crate::config::{ConfigError, PoolConfig, Sourced};
use floodgate_crds::local_model::PromptClass;
use floodgate_crds::routing::Target;
use floodgate_crds::{LocalModelDeployment, RoutingPolicy};
use std::collections::HashMap;
use std::sync::Arc;

/// The annotation that gives a LocalModelDeployment's endpoint standalone (in a cluster the
/// operator writes `status.endpoint`).
pub const ENDPOINT_ANNOTATION: &str = "floodgate.dev/endpoint";

/// Requests one Ollama replica serves at once when `ollama.numParallel` is not set.
pub const DEFAULT_NUM_PARALLEL: u32 = 4;

/// One step of a rule's chain: a pool-qualified route of the dispatcher.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// `pool:<name>` or `local:<name>`, for headers and metrics.
    pub label: Arc<str>,
    /// The dispatcher route it calls: `<pool>/<model>`.
    pub route: String,
    /// The pool.
    pub pool: Arc<str>,
    /// The local model it is, if it is one (`local_models` key).
    pub local: Option<Arc<str>>,
    /// Whether `route` keeps the requested model (`<pool>/` + the request's model).
    pub keeps_model: bool,
}

/// A compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Its name.
    pub name: Arc<str>,
    tiers: Vec<String>,
    classes: u8,
    models: Vec<String>,
    tenants: Vec<String>,
    /// The chain, in order.
    pub steps: Vec<Step>,
}

impl Rule {
    fn matches(&self, tier: &str, class: PromptClass, model: &str, tenant: &str) -> bool {
        (self.tiers.is_empty() || self.tiers.iter().any(|t| t == tier))
            && (self.classes == 0 || self.classes & bit(class) != 0)
            && (self.models.is_empty() || self.models.iter().any(|m| m == model))
            && (self.tenants.is_empty() || self.tenants.iter().any(|t| t == tenant))
    }
}

fn bit(class: PromptClass) -> u8 {
    match class {
        PromptClass::Simple => 1,
        PromptClass::Medium => 2,
        PromptClass::Complex => 4,
        PromptClass::Code => 8,
    }
}

/// A local model as routing sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalSpec {
    /// `<namespace>/<name>`: the label of its demand metrics.
    pub key: Arc<str>,
    /// Calls in flight at most: `numParallel` per replica.
    pub limit: usize,
    /// Requests waiting above which paid tiers spill over (`autoscaling.queueDepth` per
    /// replica; 100 per replica by default).
    pub queue_threshold: usize,
    /// Latency above which paid tiers spill over (`autoscaling.latencyMs`).
    pub latency_ms: Option<u32>,
    /// The prompt classes it may take (`spec.classes`, a bit per class); 0 takes any.
    pub classes: u8,
}

impl LocalSpec {
    /// Whether the model may take a prompt of `class` (its `spec.classes`, any when empty).
    pub fn takes(&self, class: PromptClass) -> bool {
        self.classes == 0 || self.classes & bit(class) != 0
    }
}

/// Prices of one (pool, provider, model) in USD per million input and output tokens.
pub type Price = (f64, f64);

/// Prices by (provider, requested name), in pool order: `(pool, price)`.
type Prices = HashMap<(String, String), Vec<(Arc<str>, Price)>>;

/// The compiled routing of one configuration.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// The prompt classifier.
    pub classifier: Classifier,
    /// Rules in order.
    pub rules: Vec<Rule>,
    /// Local models by name.
    pub locals: HashMap<String, LocalSpec>,
    /// Prices by (provider, requested name), in pool order: `(pool, price)`.
    prices: Prices,
    /// The premium pool's price for each name it serves, and its first model's.
    premium: Option<(HashMap<String, Price>, Price)>,
    /// Monthly budgets of tenants, in USD.
    pub tenant_budgets: HashMap<String, f64>,
    /// Monthly budgets of pools, in USD.
    pub pool_budgets: HashMap<String, f64>,
    /// Share of a budget at which the alert fires.
    pub alert_at: f64,
}

impl Plan {
    /// The first rule that routes a request of `tier` and `class` for `model` by `tenant`.
    pub fn rule(&self, tier: &str, class: PromptClass, model: &str, tenant: &str) -> Option<&Rule> {
        self.rules
            .iter()
            .find(|r| r.matches(tier, class, model, tenant))
    }

    /// Whether a rule's step targets `pool` (its routes are then also registered as
    /// `<pool>/<name>`).
    pub fn names_pool(&self, pool: &str) -> bool {
        self.rules
            .iter()
            .flat_map(|r| &r.steps)
            .any(|s| &*s.pool == pool)
    }

    /// The price of `model` (as requested) at `provider`, in `pool` when known.
    pub fn price(&self, pool: Option<&str>, provider: &str, model: &str) -> Option<Price> {
        let found = self.prices.get(&(provider.to_owned(), model.to_owned()))?;
        match pool {
            Some(pool) => found
                .iter()
                .find(|(p, _)| &**p == pool)
                .map(|(_, price)| *price),
            None => found.first().map(|(_, price)| *price),
        }
    }

    /// The premium pool's price for `model` (its own model of that name or alias, else its
    /// first model), if a premium pool is named.
    pub fn premium_price(&self, model: &str) -> Option<Price> {
        let (by_name, first) = self.premium.as_ref()?;
        Some(by_name.get(model).copied().unwrap_or(*first))
    }

    /// Compiles `policy` (if any) against `pools` and `local_models`, naming every bad
    /// reference.
    pub fn compile(
        policy: Option<&Sourced<RoutingPolicy>>,
        pools: &[PoolConfig],
        local_models: &[Sourced<LocalModelDeployment>],
        namespace: Option<&str>,
    ) -> Result<Plan, Vec<ConfigError>> {
        let mut plan = Plan {
            locals: locals(local_models, namespace),
            prices: prices(pools),
            alert_at: 0.8,
            ..Plan::default()
        };
        let Some(policy) = policy else {
            return Ok(plan);
        };
        let name = kube::ResourceExt::name_any(&policy.resource);
        let spec = &policy.resource.spec;
        let error = |field: String, message: String| ConfigError {
            origin: policy.origin.clone(),
            resource: Some(format!("RoutingPolicy/{name}")),
            field,
            message,
        };
        let mut errors = Vec::new();
        // A prompt long enough to be complex must be too long to be simple.
        if spec.classifier.complex_min_chars <= spec.classifier.simple_max_chars {
            errors.push(error(
                "spec.classifier.complexMinChars".to_owned(),
                format!(
                    "must be greater than simpleMaxChars ({} <= {})",
                    spec.classifier.complex_min_chars, spec.classifier.simple_max_chars
                ),
            ));
        }
        plan.classifier = Classifier::new(&spec.classifier);
        for (ri, rule) in spec.rules.iter().enumerate() {
            let mut steps = Vec::new();
            for (ti, target) in rule.targets.iter().enumerate() {
                let field = format!("spec.rules[{ri}].targets[{ti}]");
                match step(target, pools, &plan.locals) {
                    Ok(Some(s)) => steps.push(s),
                    // In a cluster a local model's endpoint appears once the operator has
                    // created its Service: until then its step is left out of the chain.
                    Ok(None) => tracing::warn!(
                        rule = %rule.name,
                        "{field}: no pool provider serves this local model yet (providers[].localModel, with an endpoint); the step is skipped"
                    ),
                    Err((sub, message)) => errors.push(error(format!("{field}.{sub}"), message)),
                }
            }
            plan.rules.push(Rule {
                name: Arc::from(rule.name.as_str()),
                tiers: rule.match_.tiers.clone(),
                classes: rule.match_.classes.iter().fold(0, |m, c| m | bit(*c)),
                models: rule.match_.models.clone(),
                // Callers are named `<namespace>/<tenant>` in a cluster: so are the tenants
                // a rule names (unless it names the namespace itself).
                tenants: rule
                    .match_
                    .tenants
                    .iter()
                    .map(|t| qualified(t, namespace))
                    .collect(),
                steps,
            });
        }
        if let Some(premium) = &spec.premium_pool {
            match pools.iter().find(|p| &p.name == premium) {
                Some(pool) => plan.premium = premium_prices(pool),
                None => errors.push(error(
                    "spec.premiumPool".into(),
                    format!(
                        "names no AIProviderPool; the pools are {}",
                        pool_names(pools)
                    ),
                )),
            }
        }
        for (i, b) in spec.budgets.pools.iter().enumerate() {
            if !pools.iter().any(|p| p.name == b.name) {
                errors.push(error(
                    format!("spec.budgets.pools[{i}].name"),
                    format!(
                        "names no AIProviderPool; the pools are {}",
                        pool_names(pools)
                    ),
                ));
            }
        }
        plan.alert_at = spec.budgets.alert_at;
        plan.tenant_budgets = budgets(&spec.budgets.tenants, namespace);
        plan.pool_budgets = budgets(&spec.budgets.pools, None);
        if errors.is_empty() {
            return Ok(plan);
        }
        if namespace.is_some() {
            // In a cluster the API server cannot check references between resources, and a
            // pool may be deleted after the policy that names it: the policy then never
            // blocks the configuration; what it names and does not exist is left out.
            for e in &errors {
                tracing::warn!("{e}; left out of routing");
            }
            return Ok(plan);
        }
        Err(errors)
    }
}

fn budgets(items: &[floodgate_crds::routing::Budget], ns: Option<&str>) -> HashMap<String, f64> {
    items
        .iter()
        .map(|b| (qualified(&b.name, ns), b.monthly_usd))
        .collect()
}

/// A tenant's name as callers carry it: `<namespace>/<name>` in a cluster, unless it names a
/// namespace already; the name alone standalone.
fn qualified(name: &str, ns: Option<&str>) -> String {
    match ns {
        Some(ns) if !name.contains('/') => format!("{ns}/{name}"),
        _ => name.to_owned(),
    }
}

fn pool_names(pools: &[PoolConfig]) -> String {
    let names: Vec<&str> = pools.iter().map(|p| p.name.as_str()).collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// Resolves one target to a step (`None`: a local model no resolved provider serves yet), or
/// says which of its fields is wrong.
fn step(
    target: &Target,
    pools: &[PoolConfig],
    locals: &HashMap<String, LocalSpec>,
) -> Result<Option<Step>, (&'static str, String)> {
    if let Some(local) = &target.local_model {
        if !locals.contains_key(local) {
            return Err(("localModel", "names no LocalModelDeployment".into()));
        }
        // The pool provider that references the local model serves it.
        let found = pools.iter().find_map(|pool| {
            pool.providers
                .iter()
                .find(|p| p.local_model.as_deref() == Some(local.as_str()))
                .map(|p| (pool, p))
        });
        let Some((pool, provider)) = found else {
            return Ok(None);
        };
        let model = match &target.model {
            Some(m) => {
                if !provider
                    .models
                    .iter()
                    .any(|x| &x.name == m || x.alias.as_ref() == Some(m))
                {
                    return Err((
                        "model",
                        format!("is not a model of the provider serving {local}"),
                    ));
                }
                m.clone()
            }
            None => provider
                .models
                .first()
                .map(|m| m.name.clone())
                .unwrap_or_default(),
        };
        return Ok(Some(Step {
            label: Arc::from(format!("local:{local}")),
            route: format!("{}/{model}", pool.name),
            pool: Arc::from(pool.name.as_str()),
            local: Some(Arc::from(local.as_str())),
            keeps_model: false,
        }));
    }
    let Some(name) = &target.pool else {
        return Err(("pool", "names neither a pool nor a local model".into()));
    };
    let Some(pool) = pools.iter().find(|p| &p.name == name) else {
        return Err((
            "pool",
            format!(
                "names no AIProviderPool; the pools are {}",
                pool_names(pools)
            ),
        ));
    };
    if let Some(m) = &target.model
        && !serves(pool, m)
    {
        return Err(("model", format!("is not a model or alias of pool {name}")));
    }
    Ok(Some(Step {
        label: Arc::from(format!("pool:{name}")),
        route: target
            .model
            .as_ref()
            .map(|m| format!("{name}/{m}"))
            .unwrap_or_default(),
        pool: Arc::from(name.as_str()),
        local: None,
        keeps_model: target.model.is_none(),
    }))
}

fn serves(pool: &PoolConfig, model: &str) -> bool {
    pool.providers
        .iter()
        .flat_map(|p| &p.models)
        .any(|m| m.name == model || m.alias.as_deref() == Some(model))
}

fn locals(
    items: &[Sourced<LocalModelDeployment>],
    namespace: Option<&str>,
) -> HashMap<String, LocalSpec> {
    items
        .iter()
        .map(|s| {
            let lm = &s.resource;
            let name = kube::ResourceExt::name_any(lm);
            let ns = lm
                .metadata
                .namespace
                .as_deref()
                .or(namespace)
                .unwrap_or("default");
            let ready = lm.status.as_ref().map_or(0, |s| s.ready_replicas);
            let replicas = if ready > 0 {
                ready
            } else {
                lm.spec
                    .replicas
                    .or(lm.spec.autoscaling.as_ref().map(|a| a.min_replicas))
                    .unwrap_or(1)
            }
            .max(1) as usize;
            let parallel = lm.spec.ollama.num_parallel.unwrap_or(DEFAULT_NUM_PARALLEL) as usize;
            let per_replica = lm.spec.autoscaling.as_ref().map_or(100, |a| a.queue_depth) as usize;
            let spec = LocalSpec {
                key: Arc::from(format!("{ns}/{name}")),
                limit: parallel * replicas,
                queue_threshold: per_replica * replicas,
                latency_ms: lm.spec.autoscaling.as_ref().and_then(|a| a.latency_ms),
                classes: lm.spec.classes.iter().fold(0, |m, c| m | bit(*c)),
            };
            (name, spec)
        })
        .collect()
}

fn prices(pools: &[PoolConfig]) -> Prices {
    let mut out = Prices::new();
    for pool in pools {
        let pool_name: Arc<str> = Arc::from(pool.name.as_str());
        for p in &pool.providers {
            for m in &p.models {
                let price = (m.input_per_1m, m.output_per_1m);
                for name in std::iter::once(&m.name).chain(m.alias.as_ref()) {
                    for key in [name.clone(), format!("{}/{name}", pool.name)] {
                        out.entry((p.name.clone(), key))
                            .or_default()
                            .push((pool_name.clone(), price));
                    }
                }
            }
        }
    }
    out
}

fn premium_prices(pool: &PoolConfig) -> Option<(HashMap<String, Price>, Price)> {
    let first = pool.providers.first()?.models.first()?;
    let mut by_name = HashMap::new();
    for p in &pool.providers {
        for m in &p.models {
            let price = (m.input_per_1m, m.output_per_1m);
            for name in std::iter::once(&m.name).chain(m.alias.as_ref()) {
                by_name.entry(name.clone()).or_insert(price);
            }
        }
    }
    Some((by_name, (first.input_per_1m, first.output_per_1m)))
}

/// The endpoint of a local model: `status.endpoint` (written by the operator) or, standalone
/// only, the `floodgate.dev/endpoint` annotation. In a cluster the annotation is not read:
/// whoever may edit a LocalModelDeployment could otherwise send every tenant's prompts to
/// any URL; the status is the operator's to write.
pub fn endpoint(lm: &LocalModelDeployment, cluster: bool) -> Option<String> {
    lm.status
        .as_ref()
        .and_then(|s| s.endpoint.clone())
        .or_else(|| {
            if cluster {
                return None;
            }
            lm.metadata
                .annotations
                .as_ref()?
                .get(ENDPOINT_ANNOTATION)
                .cloned()
        })
        .filter(|e| e.starts_with("http://") || e.starts_with("https://"))
}
