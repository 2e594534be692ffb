//! Sidecar injection: a mutating admission webhook that adds the proxy to pods annotated
//! `floodgate.dev/inject: "true"` ([`mutate`]), served over TLS ([`server`]).
//!
//! **Certificates.** By default the operator makes them ([`certs`]) and rotates them in two
//! steps so that the API server never meets a certificate it does not trust yet ([`rotation`]):
//! a new CA is first published in the `caBundle` beside the served one, and served only once
//! the configuration has carried it for a while. Every replica runs this loop every
//! [`RELOAD_EVERY`]: the webhook is served by every operator replica, leader or not, and all
//! of them converge on the Secret's certificate. With `--webhook-cert-dir` (cert-manager) the operator only reads `tls.crt` and
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
pub mod rotation;
pub mod server;

pub use certs::{Bundle, CertError};
pub use rotation::{NOT_AFTER, PREVIOUS_CA};

use kube::Client;
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
            CertSource::Operator {
                namespace,
                secret,
                hosts,
                configuration,
            } => {
                let now = k8s_openapi::jiff::Timestamp::now().as_second();
                rotation::ensure(&client, namespace, secret, hosts, configuration, now).await
            }
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

/// A started webhook.
#[derive(Debug)]
pub struct Started {
    /// The bound address (port 0 picks one).
    pub addr: std::net::SocketAddr,
    /// The serving task; ends [`server::DRAIN`] after `shutdown`, and its connections' grace.
    pub task: tokio::task::JoinHandle<()>,
    /// The certificate served; empty until the first one is loaded (readiness).
    pub certificate: Arc<server::CertSlot>,
}

/// Runs the webhook: binds `listen`, keeps its certificate, serves until [`server::DRAIN`]
/// after `shutdown`. Returns once listening.
pub async fn start(
    client: Client,
    listen: std::net::SocketAddr,
    source: CertSource,
    sidecar: mutate::Sidecar,
    shutdown: CancellationToken,
) -> std::io::Result<Started> {
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
    Ok(Started {
        addr,
        task: tokio::spawn(server::serve(
            listener,
            slot.clone(),
            sidecar,
            shutdown,
            server::DRAIN,
        )),
        certificate: slot,
    })
}
