//! Sidecar injection: a mutating admission webhook that adds the proxy to pods annotated
//! `floodgate.dev/inject: "true"` ([`mutate`]), served over TLS ([`server`]).
//!
//! **Certificates.** By default the operator makes them ([`certs`]): it reads the Secret
//! `--webhook-secret` (`tls.crt`, `tls.key`, `ca.crt`), creates it when missing, replaces it
//! 30 days before the serving certificate expires, and writes the CA into the `caBundle` of every
//! webhook of the MutatingWebhookConfiguration `--webhook-configuration`, followed by the CA the
//! last rotation replaced (kept in the Secret as `ca-previous.crt`, so that the overlap survives
//! a failure between the two writes). Every replica runs this loop every [`RELOAD_EVERY`]: the webhook is
//! served by every operator replica, leader or not, and all of them converge on the Secret's
//! certificate. With `--webhook-cert-dir` (cert-manager) the operator only reads `tls.crt` and
//! `tls.key` from that directory, again every [`RELOAD_EVERY`], and leaves `caBundle` to
//! cert-manager's CA injector.
//!
//! **Failure policy.** The chart installs the webhook with `failurePolicy: Ignore` by default:
//! while no operator replica answers, pods are admitted without the sidecar (their apps then
//! fail to reach `FLOODGATE_URL`, visibly) rather than blocking every pod creation in the
//! selected namespaces. `webhook.failurePolicy: Fail` trades that for never running an
//! annotated pod without its sidecar.

pub mod certs;
pub mod mutate;
pub mod server;

pub use certs::{Bundle, CertError};

use crate::error::Result;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use kube::{Api, Client};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often the certificate is checked (rotation, a changed Secret or files).
pub const RELOAD_EVERY: Duration = Duration::from_secs(60);

/// Where the webhook's certificate comes from.
#[derive(Debug, Clone)]
pub enum CertSource {
    /// Made and rotated by the operator, kept in Secret `secret` of `namespace`, for `hosts`
    /// (the Service's DNS names, or an address); the CA goes into `configuration`'s caBundle.
    Operator {
        /// Namespace of the Secret.
        namespace: String,
        /// Name of the Secret.
        secret: String,
        /// Names and addresses the certificate is valid for.
        hosts: Vec<String>,
        /// The MutatingWebhookConfiguration whose caBundle is patched.
        configuration: String,
    },
    /// `tls.crt` and `tls.key` in this directory (cert-manager's Secret mounted).
    Files(PathBuf),
}

/// Keeps `slot` loaded with the current certificate until `shutdown`.
pub async fn keep_certificate(
    client: Client,
    source: CertSource,
    slot: Arc<server::CertSlot>,
    shutdown: CancellationToken,
) {
    let mut served: Option<String> = None;
    loop {
        let loaded = match &source {
            CertSource::Operator { .. } => ensure_operator_cert(&client, &source).await,
            CertSource::Files(dir) => read_files(dir).await,
        };
        match loaded {
            Ok((cert, key)) if served.as_ref() != Some(&cert) => {
                match server::certified_key(&cert, &key) {
                    Ok(k) => {
                        slot.set(k);
                        tracing::info!("webhook certificate loaded");
                        served = Some(cert);
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot use the webhook certificate"),
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot load the webhook certificate; retrying"),
        }
        // Until one is served, retry soon.
        let wait = if slot.is_set() {
            RELOAD_EVERY
        } else {
            Duration::from_secs(2)
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

async fn read_files(dir: &std::path::Path) -> Result<(String, String), String> {
    let read = |name: &str| {
        let path = dir.join(name);
        async move {
            tokio::fs::read_to_string(&path)
                .await
                .map_err(|e| format!("{}: {e}", path.display()))
        }
    };
    Ok((read("tls.crt").await?, read("tls.key").await?))
}

/// The certificate and key of the Secret, made or replaced when missing or due, with the CA
/// written into the webhook configuration.
async fn ensure_operator_cert(
    client: &Client,
    source: &CertSource,
) -> Result<(String, String), String> {
    let CertSource::Operator {
        namespace,
        secret,
        hosts,
        configuration,
    } = source
    else {
        return Err("not an operator-made certificate".into());
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    let existing = secrets.get_opt(secret).await.map_err(|e| e.to_string())?;
    let current = existing.as_ref().and_then(bundle_of);
    // The CA a rotation replaced, kept in the Secret: the bundle trusts it until the next
    // rotation, so a replica still serving the old certificate is trusted even if this pass
    // fails between writing the Secret and the caBundle.
    let mut previous_ca = existing.as_ref().and_then(previous_ca_of);
    let bundle = match &current {
        Some(b) if !certs::needs_rotation(b.not_after, now) => b.clone(),
        _ => {
            let fresh = certs::generate(hosts, now, certs::VALIDITY).map_err(|e| e.to_string())?;
            previous_ca = current.as_ref().map(|old| old.ca_pem.clone());
            let mut obj = secret_of(secret, &fresh, previous_ca.as_deref());
            let written = match &existing {
                Some(old) => {
                    // Replace only the version read: a replica that raced us wins, and we
                    // take its certificate on the next pass.
                    obj.metadata.resource_version = old.metadata.resource_version.clone();
                    secrets.replace(secret, &PostParams::default(), &obj).await
                }
                None => secrets.create(&PostParams::default(), &obj).await,
            };
            match written {
                Ok(_) => {
                    tracing::info!(secret = %secret, not_after = fresh.not_after, "webhook certificate made");
                    fresh
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    return Err("another replica wrote the certificate first".into());
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    // The current CA first, then the one it replaced.
    let mut ca_bundle = bundle.ca_pem.clone();
    if let Some(old) = previous_ca.filter(|old| *old != bundle.ca_pem) {
        ca_bundle.push_str(&old);
    }
    patch_ca_bundle(client, configuration, &ca_bundle)
        .await
        .map_err(|e| format!("MutatingWebhookConfiguration {configuration:?}: {e}"))?;
    Ok((bundle.cert_pem, bundle.key_pem))
}

/// Writes `ca` into every webhook of configuration `name`, unless it already carries it.
async fn patch_ca_bundle(client: &Client, name: &str, ca: &str) -> Result<()> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let mut config = api.get(name).await?;
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
    api.replace(name, &PostParams::default(), &config).await?;
    tracing::info!(configuration = name, "webhook caBundle written");
    Ok(())
}

fn bundle_of(secret: &Secret) -> Option<Bundle> {
    let data = secret.data.as_ref()?;
    let text = |k: &str| String::from_utf8(data.get(k)?.0.clone()).ok();
    let not_after = secret
        .metadata
        .annotations
        .as_ref()?
        .get(NOT_AFTER)?
        .parse()
        .ok()?;
    Some(Bundle {
        ca_pem: text("ca.crt")?,
        cert_pem: text("tls.crt")?,
        key_pem: text("tls.key")?,
        not_after,
    })
}

/// The annotation holding the serving certificate's expiry (Unix seconds).
pub const NOT_AFTER: &str = "floodgate.dev/not-after";

/// The key of the CA a rotation replaced, in the webhook's Secret.
pub const PREVIOUS_CA: &str = "ca-previous.crt";

fn previous_ca_of(secret: &Secret) -> Option<String> {
    String::from_utf8(secret.data.as_ref()?.get(PREVIOUS_CA)?.0.clone()).ok()
}

fn secret_of(name: &str, b: &Bundle, previous_ca: Option<&str>) -> Secret {
    let bytes = |s: &str| ByteString(s.as_bytes().to_vec());
    Secret {
        metadata: kube::core::ObjectMeta {
            name: Some(name.to_owned()),
            annotations: Some([(NOT_AFTER.to_owned(), b.not_after.to_string())].into()),
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
        data: Some(
            [
                ("tls.crt".to_owned(), bytes(&b.cert_pem)),
                ("tls.key".to_owned(), bytes(&b.key_pem)),
                ("ca.crt".to_owned(), bytes(&b.ca_pem)),
            ]
            .into_iter()
            .chain(previous_ca.map(|ca| (PREVIOUS_CA.to_owned(), bytes(ca))))
            .collect(),
        ),
        ..Default::default()
    }
}

/// Runs the webhook: binds `listen`, keeps its certificate, serves until `shutdown`. Returns
/// the bound address once listening (port 0 picks one) and the serving task.
pub async fn start(
    client: Client,
    listen: std::net::SocketAddr,
    source: CertSource,
    sidecar: mutate::Sidecar,
    shutdown: CancellationToken,
) -> std::io::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = server::bind(listen).await?;
    let addr = listener.local_addr()?;
    let slot = Arc::new(server::CertSlot::default());
    tokio::spawn(keep_certificate(
        client,
        source,
        slot.clone(),
        shutdown.clone(),
    ));
    tracing::info!(%addr, "serving the sidecar webhook");
    Ok((
        addr,
        tokio::spawn(server::serve(listener, slot, sidecar, shutdown)),
    ))
}
