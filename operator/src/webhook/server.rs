//! The webhook's HTTPS server: `POST /mutate` (an AdmissionReview of a Pod that opts in
//! itself), `POST /mutate/namespace` (of a pod in a namespace that opted in) and `GET
//! /healthz`, with a certificate that can be swapped while serving ([`CertSlot`]).

use super::mutate::{self, Scope, Sidecar};
use axum::Json;
use axum::routing::{get, post};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a client has to finish the TLS handshake: one that connects and says nothing
/// must not hold a task (or shutdown) for ever.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for the reviews in flight once it has asked every connection to
/// close (the API server keeps its connections open between reviews); then they are dropped.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long the webhook keeps answering after shutdown is asked for, new connections
/// included. `/readyz` fails at once, but the pod leaves the webhook Service's endpoints only
/// once the endpoint controller and the API server have seen that (or the pod's deletion):
/// closing the listener before then gets reviews refused, and with `failurePolicy: Ignore`
/// annotated pods admitted without their sidecar. The chart's `terminationGracePeriodSeconds`
/// (30 s) covers this and [`SHUTDOWN_GRACE`].
pub const DRAIN: Duration = Duration::from_secs(10);

/// The certificate the server presents; replaced on rotation.
#[derive(Debug, Default)]
pub struct CertSlot(RwLock<Option<Arc<CertifiedKey>>>);

impl CertSlot {
    /// Serves `key` from now on.
    pub fn set(&self, key: CertifiedKey) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(key));
    }

    /// Whether a certificate is loaded.
    pub fn is_set(&self) -> bool {
        self.0.read().unwrap_or_else(|p| p.into_inner()).is_some()
    }
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A rustls key from PEM certificate chain and private key.
pub fn certified_key(cert_pem: &str, key_pem: &str) -> Result<CertifiedKey, super::CertError> {
    let pem = |e: rustls::pki_types::pem::Error| super::CertError::Pem(e.to_string());
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(pem)?;
    let signer = any_supported_type(&key).map_err(|e| super::CertError::Pem(e.to_string()))?;
    Ok(CertifiedKey::new(chain, signer))
}

/// Serves the webhook on `listener` with the certificate in `certs` until `drain` after
/// `shutdown` (new connections included), then closes every connection once its review in
/// flight is answered (waiting at most [`SHUTDOWN_GRACE`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    certs: Arc<CertSlot>,
    sidecar: Sidecar,
    shutdown: CancellationToken,
    drain: Duration,
) {
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map(|b| b.with_no_client_auth().with_cert_resolver(certs));
    let tls = match tls.as_mut() {
        Ok(config) => {
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            Arc::new(config.clone())
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot set up the webhook's TLS");
            return;
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let sidecar = Arc::new(sidecar);
    let route = |scope: Scope| {
        let sidecar = sidecar.clone();
        post(move |Json(review): Json<AdmissionReview<Pod>>| {
            let sidecar = sidecar.clone();
            async move { Json(review_pod(review, &sidecar, scope)) }
        })
    };
    // One path per webhook entry of the configuration: pods that opt in themselves, and every
    // pod of a namespace that opted in.
    let app = axum::Router::new()
        .route("/mutate", route(Scope::Pod))
        .route("/mutate/namespace", route(Scope::Namespace))
        .route("/healthz", get(|| async { "ok" }));
    let tasks = TaskTracker::new();
    // Cancelled at the end of the drain: connections close, handshakes in progress end.
    let closing = CancellationToken::new();
    let drained = async {
        shutdown.cancelled().await;
        tracing::info!(
            drain = ?drain,
            "webhook draining: answering until the API server stops sending reviews here"
        );
        tokio::time::sleep(drain).await;
    };
    tokio::pin!(drained);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut drained => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "webhook accept failed");
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(app.clone());
        let closing = closing.clone();
        tasks.spawn(async move {
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream));
            let stream = tokio::select! {
                () = closing.cancelled() => return,
                done = handshake => match done {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "webhook TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "webhook TLS handshake timed out");
                        return;
                    }
                },
            };
            let builder = auto::Builder::new(TokioExecutor::new());
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let served = tokio::select! {
                served = connection.as_mut() => served,
                () = closing.cancelled() => {
                    // Finish the review in flight, then close; an idle keep-alive closes now.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "webhook connection ended");
            }
        });
    }
    drop(listener);
    closing.cancel();
    tasks.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            connections = tasks.len(),
            "webhook connections still open after the shutdown grace; dropping them"
        );
    }
}

/// The answer to one review: the sidecar as a JSON patch, or allowed unchanged; a review that
/// cannot be read is refused naming why (the API server then applies the failure policy).
pub fn review_pod(
    review: AdmissionReview<Pod>,
    sidecar: &Sidecar,
    scope: Scope,
) -> AdmissionReview<DynamicObject> {
    let request: AdmissionRequest<Pod> = match review.try_into() {
        Ok(request) => request,
        Err(e) => {
            return AdmissionResponse::invalid(format!("not an admission request: {e}"))
                .into_review();
        }
    };
    let response = AdmissionResponse::from(&request);
    let Some(pod) = request.object.as_ref() else {
        return response.into_review();
    };
    let injected = match mutate::inject(pod, sidecar, scope) {
        Ok(Some(injected)) => injected,
        Ok(None) => return response.into_review(),
        Err(refusal) => {
            tracing::warn!(
                namespace = request.namespace.as_deref().unwrap_or_default(),
                pod = pod_name(pod),
                %refusal,
                "refusing a pod that asks for the sidecar"
            );
            return response.deny(refusal.to_string()).into_review();
        }
    };
    let patch = match (serde_json::to_value(pod), serde_json::to_value(&injected)) {
        (Ok(before), Ok(after)) => json_patch::diff(&before, &after),
        (Err(e), _) | (_, Err(e)) => {
            return response
                .deny(format!("cannot encode the pod: {e}"))
                .into_review();
        }
    };
    tracing::info!(
        namespace = request.namespace.as_deref().unwrap_or_default(),
        pod = pod_name(pod),
        "injecting the floodgate-proxy sidecar"
    );
    match response.clone().with_patch(patch) {
        Ok(patched) => patched.into_review(),
        Err(e) => response
            .deny(format!("cannot encode the patch: {e}"))
            .into_review(),
    }
}

/// The pod's name, or its generated name's prefix (a ReplicaSet's pods have no name yet).
fn pod_name(pod: &Pod) -> &str {
    pod.metadata
        .name
        .as_deref()
        .or(pod.metadata.generate_name.as_deref())
        .unwrap_or_default()
}

/// Binds `addr` for the webhook.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests;
