//! The operator-made webhook certificate, kept in a Secret that every replica reads, and its
//! rotation in two steps so that the API server never meets a certificate it does not trust:
//!
//! 1. **Stage** ([`RENEW_BEFORE`](super::certs::RENEW_BEFORE) before expiry): a new CA and
//!    certificate go into the Secret as `next-*` keys; the `caBundle` gets the new CA beside
//!    the served one. Every replica keeps serving the current certificate.
//! 2. **Promote**, once the webhook configuration has carried the new CA for at least
//!    [`PROMOTE_AFTER`] (so that the API server's cached copy has it too): the staged pair
//!    becomes the served one, and the CA it replaces stays in the bundle (`ca-previous.crt`)
//!    for the replicas that have not reloaded yet.
//!
//! A missing or expired certificate is replaced at once: nothing trusts what is served anyway.

use super::certs::{self, Bundle};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use kube::{Api, Client};
use std::time::Duration;

/// The annotation holding the serving certificate's expiry (Unix seconds).
pub const NOT_AFTER: &str = "floodgate.dev/not-after";
/// The annotation holding the staged certificate's expiry (Unix seconds).
pub const NEXT_NOT_AFTER: &str = "floodgate.dev/next-not-after";
/// The annotation holding when the staged certificate was made (Unix seconds).
pub const NEXT_STAGED: &str = "floodgate.dev/next-staged";
/// The key of the CA a rotation replaced, in the webhook's Secret.
pub const PREVIOUS_CA: &str = "ca-previous.crt";
/// How long the configuration must have carried a staged CA before it is served: the API
/// server's webhook cache follows the configuration within moments; this is ample.
pub const PROMOTE_AFTER: Duration = Duration::from_secs(60);

/// What the webhook's Secret holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stored {
    /// The certificate served.
    pub current: Option<Bundle>,
    /// A certificate staged to replace it, and when it was made (Unix seconds).
    pub next: Option<(Bundle, i64)>,
    /// The CA the last promotion replaced.
    pub previous_ca: Option<String>,
}

/// What one pass does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing to change.
    Keep,
    /// No usable certificate: make one and serve it now.
    Replace,
    /// The served certificate is due: make the next one and publish its CA only.
    Stage,
    /// The staged certificate's CA has been published long enough: serve it.
    Promote,
}

/// The step for `stored` at `now` (Unix seconds), given the CAs the webhook configuration
/// carries now (`published`).
pub fn plan(stored: &Stored, now: i64, published: &str) -> Step {
    let Some(current) = &stored.current else {
        return Step::Replace;
    };
    if now >= current.not_after {
        return Step::Replace;
    }
    match &stored.next {
        None if certs::needs_rotation(current.not_after, now) => Step::Stage,
        None => Step::Keep,
        Some((next, staged)) => {
            let waited = now.saturating_sub(*staged);
            let promote_after = i64::try_from(PROMOTE_AFTER.as_secs()).unwrap_or(i64::MAX);
            if published.contains(next.ca_pem.trim()) && waited >= promote_after {
                Step::Promote
            } else {
                Step::Keep
            }
        }
    }
}

/// `stored` after `step`, with `fresh` the pair made for [`Step::Replace`] or [`Step::Stage`].
pub fn apply(stored: &Stored, step: Step, fresh: Option<Bundle>, now: i64) -> Stored {
    let current_ca = stored.current.as_ref().map(|b| b.ca_pem.clone());
    match step {
        Step::Keep => stored.clone(),
        Step::Replace => Stored {
            current: fresh,
            next: None,
            previous_ca: current_ca.or_else(|| stored.previous_ca.clone()),
        },
        Step::Stage => Stored {
            next: fresh.map(|b| (b, now)),
            ..stored.clone()
        },
        Step::Promote => Stored {
            current: stored.next.as_ref().map(|(b, _)| b.clone()),
            next: None,
            previous_ca: current_ca,
        },
    }
}

/// The `caBundle` for `stored`: the served CA, the staged one, then the one last replaced.
pub fn ca_bundle(stored: &Stored) -> String {
    let mut bundle = String::new();
    let cas = [
        stored.current.as_ref().map(|b| b.ca_pem.as_str()),
        stored.next.as_ref().map(|(b, _)| b.ca_pem.as_str()),
        stored.previous_ca.as_deref(),
    ];
    for ca in cas.into_iter().flatten() {
        if !bundle.contains(ca.trim()) {
            bundle.push_str(ca);
        }
    }
    bundle
}

/// One pass over the Secret `namespace/secret` and the configuration `configuration` at
/// `now` (Unix seconds): returns the certificate and key to serve.
pub async fn ensure(
    client: &Client,
    namespace: &str,
    secret: &str,
    hosts: &[String],
    configuration: &str,
    now: i64,
) -> Result<(String, String), String> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let existing = secrets.get_opt(secret).await.map_err(|e| e.to_string())?;
    let stored = existing.as_ref().map(stored_of).unwrap_or_default();
    let config = configs
        .get(configuration)
        .await
        .map_err(|e| format!("MutatingWebhookConfiguration {configuration:?}: {e}"))?;
    let step = plan(&stored, now, &published(&config));
    let stored = match step {
        Step::Keep => stored,
        step => {
            let fresh = match step {
                Step::Replace | Step::Stage => {
                    Some(certs::generate(hosts, now, certs::VALIDITY).map_err(|e| e.to_string())?)
                }
                Step::Keep | Step::Promote => None,
            };
            let next = apply(&stored, step, fresh, now);
            write_secret(&secrets, secret, existing.as_ref(), &next).await?;
            tracing::info!(secret, ?step, "webhook certificate rotation");
            next
        }
    };
    patch_ca_bundle(&configs, config, &ca_bundle(&stored))
        .await
        .map_err(|e| format!("MutatingWebhookConfiguration {configuration:?}: {e}"))?;
    let current = stored
        .current
        .ok_or_else(|| "no webhook certificate in the Secret".to_owned())?;
    Ok((current.cert_pem, current.key_pem))
}

/// Writes `stored` into the Secret, replacing only the version read: a replica that raced us
/// wins, and we take its certificate on the next pass.
async fn write_secret(
    secrets: &Api<Secret>,
    name: &str,
    existing: Option<&Secret>,
    stored: &Stored,
) -> Result<(), String> {
    let mut obj = secret_of(name, stored);
    let written = match existing {
        Some(old) => {
            obj.metadata.resource_version = old.metadata.resource_version.clone();
            secrets.replace(name, &PostParams::default(), &obj).await
        }
        None => secrets.create(&PostParams::default(), &obj).await,
    };
    match written {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            Err("another replica wrote the certificate first".into())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// The CAs every webhook of `config` carries (the first webhook's bundle; they are written
/// together).
fn published(config: &MutatingWebhookConfiguration) -> String {
    config
        .webhooks
        .iter()
        .flatten()
        .next()
        .and_then(|w| w.client_config.ca_bundle.as_ref())
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .unwrap_or_default()
}

/// Writes `ca` into every webhook of `config`, unless it already carries it.
async fn patch_ca_bundle(
    api: &Api<MutatingWebhookConfiguration>,
    mut config: MutatingWebhookConfiguration,
    ca: &str,
) -> kube::Result<()> {
    let wanted = ByteString(ca.as_bytes().to_vec());
    let webhooks = config.webhooks.get_or_insert_with(Vec::new);
    if webhooks
        .iter()
        .all(|w| w.client_config.ca_bundle.as_ref() == Some(&wanted))
    {
        return Ok(());
    }
    for w in webhooks.iter_mut() {
        w.client_config.ca_bundle = Some(wanted.clone());
    }
    // Replace at the version read (a conflict retries on the next pass): only caBundle changes.
    let name = config.metadata.name.clone().unwrap_or_default();
    api.replace(&name, &PostParams::default(), &config).await?;
    tracing::info!(configuration = name, "webhook caBundle written");
    Ok(())
}

fn stored_of(secret: &Secret) -> Stored {
    let data = secret.data.as_ref();
    let text = |k: &str| String::from_utf8(data?.get(k)?.0.clone()).ok();
    let annotation =
        |k: &str| -> Option<i64> { secret.metadata.annotations.as_ref()?.get(k)?.parse().ok() };
    let bundle = |prefix: &str, not_after: &str| {
        Some(Bundle {
            ca_pem: text(&format!("{prefix}ca.crt"))?,
            cert_pem: text(&format!("{prefix}tls.crt"))?,
            key_pem: text(&format!("{prefix}tls.key"))?,
            not_after: annotation(not_after)?,
        })
    };
    Stored {
        current: bundle("", NOT_AFTER),
        next: bundle("next-", NEXT_NOT_AFTER).zip(annotation(NEXT_STAGED)),
        previous_ca: text(PREVIOUS_CA),
    }
}

fn secret_of(name: &str, stored: &Stored) -> Secret {
    let bytes = |s: &str| ByteString(s.as_bytes().to_vec());
    let mut data = std::collections::BTreeMap::new();
    let mut annotations = std::collections::BTreeMap::new();
    let mut put = |prefix: &str, b: &Bundle| {
        data.insert(format!("{prefix}tls.crt"), bytes(&b.cert_pem));
        data.insert(format!("{prefix}tls.key"), bytes(&b.key_pem));
        data.insert(format!("{prefix}ca.crt"), bytes(&b.ca_pem));
    };
    if let Some(b) = &stored.current {
        put("", b);
        annotations.insert(NOT_AFTER.to_owned(), b.not_after.to_string());
    }
    if let Some((b, staged)) = &stored.next {
        put("next-", b);
        annotations.insert(NEXT_NOT_AFTER.to_owned(), b.not_after.to_string());
        annotations.insert(NEXT_STAGED.to_owned(), staged.to_string());
    }
    if let Some(ca) = &stored.previous_ca {
        data.insert(PREVIOUS_CA.to_owned(), bytes(ca));
    }
    Secret {
        metadata: kube::core::ObjectMeta {
            name: Some(name.to_owned()),
            annotations: Some(annotations),
            labels: Some(
                [(
                    "app.kubernetes.io/managed-by".to_owned(),
                    crate::context::FIELD_MANAGER.to_owned(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests;
