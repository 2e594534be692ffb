//! The proxy's configuration: Floodgate resources (from manifest files in standalone mode, from
//! the API server in cluster mode), validated with the CRD rules and resolved into types that
//! cannot hold bad values.
//!
//! Two steps, as at every edge: [`load`] parses and validates raw documents into
//! [`Resources`]; [`Config::resolve`] turns them, with their secrets, into a [`Config`].

pub mod cluster;
pub mod load;
pub mod secrets;
pub mod watch;

use crate::secret::{KeyDigest, SecretString};
use floodgate_crds::pool::{Model, Provider};
use floodgate_crds::{
    AIProviderPool, CachePolicy, LocalModelDeployment, ProviderType, RoutingPolicy, Tenant,
    TierQueue,
};
use secrets::SecretLookup;
use std::collections::HashSet;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;

/// Where a resource came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// File the document was read from (or `cluster` for the API server).
    pub file: PathBuf,
    /// 1-based index of the document in the file.
    pub document: usize,
}

/// A problem with the configuration, naming the file, document, resource and field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where the offending document is.
    pub origin: Option<Origin>,
    /// `Kind/name` of the resource, when known.
    pub resource: Option<String>,
    /// Field path inside the resource; empty for the whole document.
    pub field: String,
    /// What is wrong. Never contains secret values.
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(origin) = &self.origin {
            write!(f, "{}", origin.file.display())?;
            if origin.document > 0 {
                write!(f, ": document {}", origin.document)?;
            }
            if let Some(resource) = &self.resource {
                write!(f, " ({resource})")?;
            }
            f.write_str(": ")?;
        } else if let Some(resource) = &self.resource {
            write!(f, "{resource}: ")?;
        }
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration ({} problem(s)):\n  {}", .0.len(), .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
pub struct ConfigErrors(pub Vec<ConfigError>);

/// A validated resource and where it came from.
#[derive(Debug, Clone)]
pub struct Sourced<T> {
    /// The resource, with schema defaults applied.
    pub resource: T,
    /// Where it was read.
    pub origin: Option<Origin>,
}

/// The Floodgate resources of one configuration, each already valid on its own.
#[derive(Debug, Clone, Default)]
pub struct Resources {
    /// Provider pools.
    pub pools: Vec<Sourced<AIProviderPool>>,
    /// Tier queues.
    pub tier_queues: Vec<Sourced<TierQueue>>,
    /// Cache policies.
    pub cache_policies: Vec<Sourced<CachePolicy>>,
    /// Local models.
    pub local_models: Vec<Sourced<LocalModelDeployment>>,
    /// Tenants.
    pub tenants: Vec<Sourced<Tenant>>,
    /// Routing policies (at most one).
    pub routing_policies: Vec<Sourced<RoutingPolicy>>,
    /// The namespace the resources come from, in cluster mode: tenants are then named
    /// `<namespace>/<name>`; standalone, by their name alone.
    pub namespace: Option<String>,
}

/// The resolved configuration every request reads.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// Provider pools with their keys resolved.
    pub pools: Vec<PoolConfig>,
    /// Tiers, when configured.
    pub tier_queue: Option<TierQueue>,
    /// Caching, when configured.
    pub cache_policy: Option<CachePolicy>,
    /// Self-hosted models.
    pub local_models: Vec<LocalModelDeployment>,
    /// Tenants with their client keys hashed, in name order. Empty: the gateway is open
    /// (every caller is served without a client key).
    pub tenants: Vec<Arc<TenantConfig>>,
    /// The RoutingPolicy compiled against the pools and local models (no rules, the default
    /// classifier, when there is none).
    pub routing: Arc<crate::routing::plan::Plan>,
    /// Webhook signing secrets by tier name (the TierQueue's
    /// `tiers[].async.webhook.signingSecretRef`), for the jobs' notifications.
    pub webhook_secrets: std::collections::HashMap<String, SecretString>,
    /// SMTP settings by tier name (the TierQueue's `tiers[].async.email`, its Secrets
    /// resolved), for the jobs' email notifications.
    pub email: std::collections::HashMap<String, crate::jobs::email::Smtp>,
}

/// One tenant, ready to identify callers.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantConfig {
    /// `<namespace>/<name>` in cluster mode, `<name>` standalone.
    pub name: Arc<str>,
    /// Its tier (a tier of the TierQueue), or the TierQueue's default tier; `None` when
    /// neither names one.
    pub tier: Option<Arc<str>>,
    /// Its client keys: names and digests, never the keys.
    pub keys: Vec<ClientKeyConfig>,
    /// Its own limits per window.
    pub limits: TenantLimits,
    /// Models it may call; `None`: every model.
    pub models: Option<HashSet<String>>,
}

/// One client key of a tenant, as the gateway keeps it.
#[derive(Debug, Clone)]
pub struct ClientKeyConfig {
    /// The key's name (logs); never the key.
    pub name: Arc<str>,
    /// SHA-256 of the key.
    pub digest: KeyDigest,
}

impl PartialEq for ClientKeyConfig {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.digest.matches(&other.digest)
    }
}

/// A tenant's own limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TenantLimits {
    /// Requests per window.
    pub rpm: Option<NonZeroU32>,
    /// Tokens per window.
    pub tpm: Option<NonZeroU32>,
    /// Requests being answered at once.
    pub concurrent: Option<NonZeroU32>,
}

/// One pool, ready to serve.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// `metadata.name`.
    pub name: String,
    /// The pool's spec (strategy, fallback, breaker, timeouts).
    pub spec: floodgate_crds::AIProviderPoolSpec,
    /// Providers in spec order, keys resolved.
    pub providers: Vec<ProviderConfig>,
}

/// One provider, ready to serve.
#[derive(Debug, Clone)]
pub struct ProviderConfig {
    /// Name within the pool.
    pub name: String,
    /// Wire format.
    pub provider_type: ProviderType,
    /// Endpoint (the provider's public one unless overridden).
    pub base_url: String,
    /// Models offered.
    pub models: Vec<Model>,
    /// Keys with their secrets.
    pub keys: Vec<KeyConfig>,
    /// The LocalModelDeployment it serves, if it references one.
    pub local_model: Option<String>,
    /// Share under the weighted strategy.
    pub weight: NonZeroU32,
    /// Provider-wide RPM (keyless providers).
    pub rpm: Option<NonZeroU32>,
}

/// One API key, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyConfig {
    /// Display name (`<provider>-<index>` unless named); never the key.
    pub name: String,
    /// Where the key comes from, `<secret>/<key>`: the identity of its rate budget (a
    /// reference, not the secret itself).
    pub secret_ref: String,
    /// The key.
    pub secret: SecretString,
    /// Requests per minute.
    pub rpm: NonZeroU32,
    /// Tokens per minute.
    pub tpm: Option<NonZeroU32>,
}

/// A model as listed by `/v1/models`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ModelInfo {
    /// Model id or alias a caller may send.
    pub id: String,
    /// Provider type (or `floodgate` for aliases spanning providers).
    pub owned_by: String,
}

impl Config {
    /// Resolves validated resources and their secrets into a configuration, or names every
    /// reference that cannot be resolved.
    pub fn resolve(
        resources: Resources,
        secrets: &dyn SecretLookup,
    ) -> Result<Config, ConfigErrors> {
        let mut errors = Vec::new();
        check_singletons(&resources.tier_queues, "TierQueue", &mut errors);
        check_singletons(&resources.cache_policies, "CachePolicy", &mut errors);
        check_singletons(&resources.routing_policies, "RoutingPolicy", &mut errors);
        let mut pools = Vec::new();
        for pool in &resources.pools {
            let cluster = resources.namespace.is_some();
            match resolve_pool(pool, &resources.local_models, cluster, secrets) {
                Ok(p) => pools.push(p),
                Err(mut e) => errors.append(&mut e),
            }
        }
        let tier_queue = resources.tier_queues.first().map(|s| &s.resource);
        let namespace = resources.namespace.as_deref();
        let mut tenants = Vec::new();
        for tenant in &resources.tenants {
            match resolve_tenant(tenant, namespace, tier_queue, secrets) {
                Ok(t) => tenants.push(Arc::new(t)),
                Err(mut e) => errors.append(&mut e),
            }
        }
        tenants.sort_by(|a, b| a.name.cmp(&b.name));
        check_client_keys(&resources.tenants, &tenants, &mut errors);
        let routing = crate::routing::plan::Plan::compile(
            resources.routing_policies.first(),
            &pools,
            &resources.local_models,
            namespace,
        )
        .unwrap_or_else(|mut e| {
            errors.append(&mut e);
            crate::routing::plan::Plan::default()
        });
        let webhook_secrets = resources
            .tier_queues
            .first()
            .map(|tq| resolve_webhook_secrets(tq, secrets, &mut errors))
            .unwrap_or_default();
        let email = resources
            .tier_queues
            .first()
            .map(|tq| resolve_email(tq, secrets, &mut errors))
            .unwrap_or_default();
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        Ok(Config {
            tenants,
            webhook_secrets,
            email,
            pools,
            tier_queue: resources.tier_queues.into_iter().next().map(|s| s.resource),
            cache_policy: resources
                .cache_policies
                .into_iter()
                .next()
                .map(|s| s.resource),
            local_models: resources
                .local_models
                .into_iter()
                .map(|s| s.resource)
                .collect(),
            routing: Arc::new(routing),
        })
    }

    /// What this configuration asks for that the gateway accepts but does not act on yet,
    /// one line each, to be logged whenever the configuration is applied: silent acceptance
    /// would look done when it is not.
    pub fn not_acted_on(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(tq) = &self.tier_queue {
            let name = kube::ResourceExt::name_any(tq);
            for (i, t) in tq.spec.tiers.iter().enumerate() {
                let Some(a) = t.async_.as_ref() else { continue };
                let emails = a
                    .notify
                    .contains(&floodgate_crds::tier::NotifyChannel::Email);
                let to = a.email.as_ref().and_then(|e| e.to.as_ref());
                if emails && to.is_none() {
                    out.push(format!(
                        "TierQueue/{name}: spec.tiers[{i}].async.notify lists email, but async.email.to is not set: only jobs that give `notify.email` are emailed"
                    ));
                }
                if !emails && to.is_some() {
                    out.push(format!(
                        "TierQueue/{name}: spec.tiers[{i}].async.email.to is set, but async.notify does not list email: nobody is emailed there"
                    ));
                }
                if a.webhook
                    .as_ref()
                    .is_some_and(|w| w.signing_secret_ref.is_none())
                {
                    out.push(format!(
                        "TierQueue/{name}: spec.tiers[{i}].async.webhook has no signingSecretRef: its webhooks go out unsigned (no floodgate-webhook-signature header), so a receiver cannot tell them from forged ones"
                    ));
                }
            }
        }
        if let Some(cp) = &self.cache_policy {
            let name = kube::ResourceExt::name_any(cp);
            for note in crate::cache::Policy::new(&cp.spec).1 {
                out.push(format!("CachePolicy/{name}: {note}"));
            }
        }
        for lm in &self.local_models {
            let name = kube::ResourceExt::name_any(lm);
            let referenced = self
                .pools
                .iter()
                .flat_map(|p| &p.providers)
                .any(|p| p.local_model.as_deref() == Some(name.as_str()));
            if !referenced {
                out.push(format!(
                    "LocalModelDeployment/{name}: no pool provider references it (providers[].localModel), so the gateway does not send it requests"
                ));
            }
        }
        out
    }

    /// Every model id and alias callers may use, sorted, without duplicates.
    pub fn models(&self) -> Vec<ModelInfo> {
        let mut out: Vec<ModelInfo> = Vec::new();
        for provider in self.pools.iter().flat_map(|p| &p.providers) {
            for model in &provider.models {
                out.push(ModelInfo {
                    id: model.name.clone(),
                    owned_by: provider.provider_type.as_str().to_owned(),
                });
                if let Some(alias) = &model.alias {
                    out.push(ModelInfo {
                        id: alias.clone(),
                        owned_by: "floodgate".to_owned(),
                    });
                }
            }
        }
        out.sort();
        out.dedup_by(|a, b| a.id == b.id);
        out
    }
}

fn check_singletons<T: kube::ResourceExt>(
    items: &[Sourced<T>],
    kind: &str,
    errors: &mut Vec<ConfigError>,
) {
    for extra in items.iter().skip(1) {
        errors.push(ConfigError {
            origin: extra.origin.clone(),
            resource: Some(format!("{kind}/{}", extra.resource.name_any())),
            field: String::new(),
            message: format!(
                "only one {kind} is allowed per gateway; another one is already configured"
            ),
        });
    }
}

/// The webhook signing secret of each tier of `tq` that names one.
fn resolve_webhook_secrets(
    tq: &Sourced<TierQueue>,
    secrets: &dyn SecretLookup,
    errors: &mut Vec<ConfigError>,
) -> std::collections::HashMap<String, SecretString> {
    let mut out = std::collections::HashMap::new();
    for (i, tier) in tq.resource.spec.tiers.iter().enumerate() {
        let Some(r) = tier
            .async_
            .as_ref()
            .and_then(|a| a.webhook.as_ref())
            .and_then(|w| w.signing_secret_ref.as_ref())
        else {
            continue;
        };
        match secrets.lookup(&r.name, &r.key) {
            Some(secret) => {
                out.insert(tier.name.clone(), secret);
            }
            None => errors.push(ConfigError {
                origin: tq.origin.clone(),
                resource: Some(format!("TierQueue/{}", kube::ResourceExt::name_any(&tq.resource))),
                field: format!("spec.tiers[{i}].async.webhook.signingSecretRef"),
                message: format!(
                    "Secret {:?} has no key {:?} (looked in Secret manifests, {}, and the secrets directory)",
                    r.name,
                    r.key,
                    secrets::env_var_name(&r.name, &r.key),
                ),
            }),
        }
    }
    out
}

/// The SMTP settings of each tier of `tq` that has `async.email`, with their Secrets.
fn resolve_email(
    tq: &Sourced<TierQueue>,
    secrets: &dyn SecretLookup,
    errors: &mut Vec<ConfigError>,
) -> std::collections::HashMap<String, crate::jobs::email::Smtp> {
    use crate::jobs::email;
    let mut out = std::collections::HashMap::new();
    let resource = Some(format!(
        "TierQueue/{}",
        kube::ResourceExt::name_any(&tq.resource)
    ));
    for (i, tier) in tq.resource.spec.tiers.iter().enumerate() {
        let Some(e) = tier.async_.as_ref().and_then(|a| a.email.as_ref()) else {
            continue;
        };
        let mut error = |field: &str, message: String| {
            errors.push(ConfigError {
                origin: tq.origin.clone(),
                resource: resource.clone(),
                field: format!("spec.tiers[{i}].async.email.{field}"),
                message,
            })
        };
        let missing = |r: &floodgate_crds::common::SecretKeyRef| {
            format!(
                "Secret {:?} has no key {:?} (looked in Secret manifests, {}, and the secrets directory)",
                r.name,
                r.key,
                secrets::env_var_name(&r.name, &r.key),
            )
        };
        let server = email::host_port(&e.smtp_server);
        if server.is_none() {
            error(
                "smtpServer",
                format!("{:?} is not host:port", e.smtp_server),
            );
        }
        if !email::valid_address(&e.from) {
            error("from", format!("{:?} is not an email address", e.from));
        }
        if let Some(to) = &e.to
            && !email::valid_address(to)
        {
            error("to", format!("{to:?} is not an email address"));
        }
        let credentials = match &e.credentials_secret_ref {
            None => None,
            Some(r) => match secrets.lookup(&r.name, &r.key) {
                None => {
                    error("credentialsSecretRef", missing(r));
                    None
                }
                Some(value) => {
                    let split = email::credentials(&value);
                    if split.is_none() {
                        // The value itself is never shown.
                        error(
                            "credentialsSecretRef",
                            format!("Secret {:?} key {:?} is not `user:password`", r.name, r.key),
                        );
                    }
                    split
                }
            },
        };
        let ca_pem = match &e.ca_secret_ref {
            None => None,
            Some(r) => match secrets.lookup(&r.name, &r.key) {
                None => {
                    error("caSecretRef", missing(r));
                    None
                }
                Some(pem) if !pem.expose().contains("-----BEGIN CERTIFICATE-----") => {
                    error(
                        "caSecretRef",
                        format!(
                            "Secret {:?} key {:?} is not a PEM certificate",
                            r.name, r.key
                        ),
                    );
                    None
                }
                Some(pem) => Some(pem.expose().to_owned()),
            },
        };
        if let Some((host, port)) = server {
            out.insert(
                tier.name.clone(),
                email::Smtp {
                    host,
                    port,
                    from: e.from.clone(),
                    credentials,
                    ca_pem,
                },
            );
        }
    }
    out
}

fn resolve_pool(
    pool: &Sourced<AIProviderPool>,
    local_models: &[Sourced<LocalModelDeployment>],
    cluster: bool,
    secrets: &dyn SecretLookup,
) -> Result<PoolConfig, Vec<ConfigError>> {
    let name = kube::ResourceExt::name_any(&pool.resource);
    let spec = &pool.resource.spec;
    let mut errors = Vec::new();
    let mut providers = Vec::new();
    for (pi, provider) in spec.providers.iter().enumerate() {
        let mut keys = Vec::new();
        for (ki, key) in provider.keys.iter().enumerate() {
            match secrets.lookup(&key.secret_ref.name, &key.secret_ref.key) {
                Some(secret) => keys.push(KeyConfig {
                    name: key.name.clone().unwrap_or_else(|| format!("{}-{ki}", provider.name)),
                    secret_ref: format!("{}/{}", key.secret_ref.name, key.secret_ref.key),
                    secret,
                    // The schema requires rpm >= 1 and tpm >= 1; fall back to the smallest legal
                    // value rather than panic if a caller skipped validation.
                    rpm: NonZeroU32::new(key.rpm).unwrap_or(NonZeroU32::MIN),
                    tpm: key.tpm.and_then(NonZeroU32::new),
                }),
                None => errors.push(ConfigError {
                    origin: pool.origin.clone(),
                    resource: Some(format!("AIProviderPool/{name}")),
                    field: format!("spec.providers[{pi}].keys[{ki}].secretRef"),
                    message: format!(
                        "Secret {:?} has no key {:?} (looked in Secret manifests, {}, and the secrets directory)",
                        key.secret_ref.name,
                        key.secret_ref.key,
                        secrets::env_var_name(&key.secret_ref.name, &key.secret_ref.key),
                    ),
                }),
            }
        }
        let mut config = provider_config(provider, keys);
        if let Some(local) = &provider.local_model {
            let found = local_models
                .iter()
                .find(|lm| kube::ResourceExt::name_any(&lm.resource) == *local);
            match found.map(|lm| crate::routing::plan::endpoint(&lm.resource, cluster)) {
                Some(Some(endpoint)) => config.base_url = endpoint.trim_end_matches('/').to_owned(),
                // In a cluster the model may be deleted after the pool that names it, or not
                // be created yet: the provider is left out until it exists with an endpoint.
                None | Some(None) if cluster => {
                    tracing::warn!(
                        pool = %name,
                        provider = %provider.name,
                        "LocalModelDeployment/{local} does not exist or has no endpoint yet; the provider is left out until it has one"
                    );
                    continue;
                }
                Some(None) => {
                    // In a cluster the operator writes the endpoint once the Service exists:
                    // until then the provider is left out rather than failing the pool.
                    tracing::warn!(
                        pool = %name,
                        provider = %provider.name,
                        "LocalModelDeployment/{local} has no endpoint yet (status.endpoint, or the {} annotation standalone); the provider is left out until it has one",
                        crate::routing::plan::ENDPOINT_ANNOTATION
                    );
                    continue;
                }
                None => {
                    errors.push(ConfigError {
                        origin: pool.origin.clone(),
                        resource: Some(format!("AIProviderPool/{name}")),
                        field: format!("spec.providers[{pi}].localModel"),
                        message: format!("names no LocalModelDeployment ({local:?})"),
                    });
                    continue;
                }
            }
        }
        providers.push(config);
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(PoolConfig {
        name,
        spec: spec.clone(),
        providers,
    })
}

fn resolve_tenant(
    tenant: &Sourced<Tenant>,
    namespace: Option<&str>,
    tier_queue: Option<&TierQueue>,
    secrets: &dyn SecretLookup,
) -> Result<TenantConfig, Vec<ConfigError>> {
    let name = kube::ResourceExt::name_any(&tenant.resource);
    let spec = &tenant.resource.spec;
    let error = |field: String, message: String| ConfigError {
        origin: tenant.origin.clone(),
        resource: Some(format!("Tenant/{name}")),
        field,
        message,
    };
    let mut errors = Vec::new();
    let tier = match (&spec.tier, tier_queue) {
        (Some(tier), Some(tq)) if tq.spec.tiers.iter().any(|t| &t.name == tier) => {
            Some(Arc::from(tier.as_str()))
        }
        (Some(_), Some(tq)) => {
            let names: Vec<&str> = tq.spec.tiers.iter().map(|t| t.name.as_str()).collect();
            errors.push(error(
                "spec.tier".into(),
                format!(
                    "names no tier of TierQueue/{}; its tiers are {}",
                    kube::ResourceExt::name_any(tq),
                    names.join(", ")
                ),
            ));
            None
        }
        (Some(_), None) => {
            errors.push(error(
                "spec.tier".into(),
                "names a tier, but no TierQueue is configured; add one, or leave the tier out"
                    .into(),
            ));
            None
        }
        (None, tq) => tq
            .and_then(|tq| tq.spec.default_tier.as_deref())
            .map(Arc::from),
    };
    let mut keys = Vec::new();
    for (i, key) in spec.keys.iter().enumerate() {
        match secrets.lookup(&key.secret_ref.name, &key.secret_ref.key) {
            Some(secret) if !secret.expose().is_empty() => keys.push(ClientKeyConfig {
                name: Arc::from(key.name.as_str()),
                digest: KeyDigest::of(secret.expose()),
            }),
            Some(_) => errors.push(error(
                format!("spec.keys[{i}].secretRef"),
                format!(
                    "Secret {:?} key {:?} is empty; a client key must not be",
                    key.secret_ref.name, key.secret_ref.key
                ),
            )),
            None => errors.push(error(
                format!("spec.keys[{i}].secretRef"),
                format!(
                    "Secret {:?} has no key {:?} (looked in Secret manifests, {}, and the secrets directory)",
                    key.secret_ref.name,
                    key.secret_ref.key,
                    secrets::env_var_name(&key.secret_ref.name, &key.secret_ref.key),
                ),
            )),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let limits = spec.limits.clone().unwrap_or_default();
    Ok(TenantConfig {
        name: match namespace {
            Some(ns) => Arc::from(format!("{ns}/{name}")),
            None => Arc::from(name),
        },
        tier,
        keys,
        limits: TenantLimits {
            rpm: limits.rpm.and_then(NonZeroU32::new),
            tpm: limits.tpm.and_then(NonZeroU32::new),
            concurrent: limits.concurrent.and_then(NonZeroU32::new),
        },
        models: (!spec.models.is_empty()).then(|| spec.models.iter().cloned().collect()),
    })
}

/// The same client key (by value) in two tenants, or twice in one, would make a caller's
/// identity depend on lookup order: refused, naming the second place (never the key).
fn check_client_keys(
    sources: &[Sourced<Tenant>],
    tenants: &[Arc<TenantConfig>],
    errors: &mut Vec<ConfigError>,
) {
    let mut seen: Vec<(&KeyDigest, &str, &str)> = Vec::new();
    for tenant in tenants {
        for key in &tenant.keys {
            if let Some((_, owner, other)) = seen.iter().find(|(d, _, _)| d.matches(&key.digest)) {
                let source = sources.iter().find(|s| {
                    tenant
                        .name
                        .rsplit('/')
                        .next()
                        .is_some_and(|n| n == kube::ResourceExt::name_any(&s.resource))
                });
                errors.push(ConfigError {
                    origin: source.and_then(|s| s.origin.clone()),
                    resource: Some(format!("Tenant/{}", tenant.name)),
                    field: "spec.keys".into(),
                    message: format!(
                        "client key {:?} has the same value as key {other:?} of Tenant/{owner}; \
                         every client key must identify one tenant",
                        key.name
                    ),
                });
            } else {
                seen.push((&key.digest, &tenant.name, &key.name));
            }
        }
    }
}

fn provider_config(provider: &Provider, keys: Vec<KeyConfig>) -> ProviderConfig {
    ProviderConfig {
        name: provider.name.clone(),
        provider_type: provider.type_,
        base_url: provider
            .base_url
            .clone()
            .unwrap_or_else(|| provider.type_.default_base_url().to_owned())
            .trim_end_matches('/')
            .to_owned(),
        models: provider.models.clone(),
        keys,
        local_model: provider.local_model.clone(),
        weight: NonZeroU32::new(provider.weight).unwrap_or(NonZeroU32::MIN),
        rpm: provider.rpm.and_then(NonZeroU32::new),
    }
}

#[cfg(test)]
mod tests;
