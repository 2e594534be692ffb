//! Whether the operator pod should get traffic (`/readyz`): the chart's readiness probe, so
//! that the webhook Service sends admission reviews only to replicas that can answer them.

use crate::webhook::server::CertSlot;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// What the readiness of one operator process depends on.
#[derive(Debug, Clone)]
pub struct Readiness {
    /// The webhook's certificate slot, when this process serves the webhook.
    webhook: Option<Arc<CertSlot>>,
    /// Cancelled on shutdown: a stopping replica takes no new traffic.
    shutdown: CancellationToken,
}

impl Readiness {
    /// Readiness of a process serving the webhook with `webhook` (none: no webhook), stopping
    /// at `shutdown`.
    pub fn new(webhook: Option<Arc<CertSlot>>, shutdown: CancellationToken) -> Self {
        Self { webhook, shutdown }
    }

    /// `Ok` when ready; otherwise why not. The webhook's listener is bound before the process
    /// serves `/readyz`, and serves until shutdown, so a loaded certificate means it answers.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.shutdown.is_cancelled() {
            return Err("shutting down");
        }
        match &self.webhook {
            Some(slot) if !slot.is_set() => Err("the webhook certificate is not loaded yet"),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhook::certs::generate;
    use crate::webhook::server::certified_key;

    #[test]
    fn ready_only_once_the_webhook_certificate_is_loaded_and_not_while_stopping() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let shutdown = CancellationToken::new();
        let slot = Arc::new(CertSlot::default());
        let ready = Readiness::new(Some(slot.clone()), shutdown.clone());
        assert_eq!(
            ready.check(),
            Err("the webhook certificate is not loaded yet")
        );
        let now = k8s_openapi::jiff::Timestamp::now().as_second();
        let bundle = generate(
            &["127.0.0.1".to_owned()],
            now,
            std::time::Duration::from_secs(86_400),
        )
        .unwrap_or_else(|e| panic!("a certificate: {e}"));
        slot.set(
            certified_key(&bundle.cert_pem, &bundle.key_pem)
                .unwrap_or_else(|e| panic!("a usable certificate: {e}")),
        );
        assert_eq!(ready.check(), Ok(()));
        shutdown.cancel();
        assert_eq!(ready.check(), Err("shutting down"));
        // Without the webhook, nothing to wait for.
        let plain = Readiness::new(None, CancellationToken::new());
        assert_eq!(plain.check(), Ok(()));
    }
}
