//! The webhook's HTTPS server: `POST /mutate` (an AdmissionReview of a Pod) and `GET
//! /healthz`, with a certificate that can be swapped while serving ([`CertSlot`]).

use super::mutate::{self, Sidecar};
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
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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

/// Serves the webhook on `listener` with the certificate in `certs` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    certs: Arc<CertSlot>,
    sidecar: Sidecar,
    shutdown: CancellationToken,
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
    let app = axum::Router::new()
        .route(
            "/mutate",
            post(move |Json(review): Json<AdmissionReview<Pod>>| {
                let sidecar = sidecar.clone();
                async move { Json(review_pod(review, &sidecar)) }
            }),
        )
        .route("/healthz", get(|| async { "ok" }));
    let tasks = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
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
        tasks.spawn(async move {
            let stream = match acceptor.accept(stream).await {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "webhook TLS handshake failed");
                    return;
                }
            };
            let served = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "webhook connection ended");
            }
        });
    }
    tasks.close();
    tasks.wait().await;
}

/// The answer to one review: the sidecar as a JSON patch, or allowed unchanged; a review that
/// cannot be read is refused naming why (the API server then applies the failure policy).
pub fn review_pod(
    review: AdmissionReview<Pod>,
    sidecar: &Sidecar,
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
    let Some(injected) = mutate::inject(pod, sidecar) else {
        return response.into_review();
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
        pod = pod
            .metadata
            .name
            .as_deref()
            .or(pod.metadata.generate_name.as_deref())
            .unwrap_or_default(),
        "injecting the floodgate-proxy sidecar"
    );
    match response.clone().with_patch(patch) {
        Ok(patched) => patched.into_review(),
        Err(e) => response
            .deny(format!("cannot encode the patch: {e}"))
            .into_review(),
    }
}

/// Binds `addr` for the webhook.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
