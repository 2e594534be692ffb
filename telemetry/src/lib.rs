//! OTLP trace export shared by `floodgate-proxy` and `floodgate-operator`: the collector URL
//! from `--otlp-endpoint` (`OTEL_EXPORTER_OTLP_ENDPOINT` semantics), the SDK's batch span
//! processor over an OTLP HTTP/protobuf exporter, and the `tracing` layer that feeds it. What
//! each binary traces, and how it samples, stays in the binary.
//!
//! OTLP over HTTP/protobuf only: no gRPC, no TLS stack of its own (the exporter's reqwest is
//! the workspace's, with ring as the one crypto provider).

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, Tracer};
use std::time::Duration;
use tracing::Subscriber;
use tracing_opentelemetry::OpenTelemetryLayer;
use tracing_subscriber::registry::LookupSpan;

/// The OTLP/HTTP path of traces, appended to the collector's base URL.
pub const TRACES_PATH: &str = "/v1/traces";

/// How long shutdown waits for the last spans to be exported.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors setting up the trace export.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The OTLP endpoint is not an `http(s)://` URL.
    #[error("--otlp-endpoint {0:?} is not an http:// or https:// URL")]
    Endpoint(String),
    /// The OTLP exporter could not be built.
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// The OTLP/HTTP traces URL for a collector's base URL (`OTEL_EXPORTER_OTLP_ENDPOINT`
/// semantics: `/v1/traces` is appended unless the URL already names it).
pub fn traces_url(endpoint: &str) -> Result<String, Error> {
    let endpoint = endpoint.trim();
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|_| Error::Endpoint(endpoint.to_owned()))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err(Error::Endpoint(endpoint.to_owned()));
    }
    let base = endpoint.trim_end_matches('/');
    Ok(if base.ends_with(TRACES_PATH) {
        base.to_owned()
    } else {
        format!("{base}{TRACES_PATH}")
    })
}

/// The SDK's batch span processor (its own export thread, so it does not depend on which
/// runtime is current; `OTEL_BSP_*` tune it) over an OTLP HTTP/protobuf exporter to `url`,
/// keeping every span it is given (a binary samples before its layer, if at all).
///
/// The exporter's HTTP client is reqwest's blocking one: the stable batch processor calls the
/// exporter from its thread, where an async client would find no tokio reactor. Build it
/// before starting a tokio runtime, and drop it outside one.
pub fn tracer_provider(url: &str, service_name: String) -> Result<SdkTracerProvider, Error> {
    // reqwest is built with `rustls-no-provider`: an https collector needs ring installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url)
        .build()?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::AlwaysOn)
        .with_resource(Resource::builder().with_service_name(service_name).build())
        .build())
}

/// The `tracing` layer handing finished spans to `provider`'s tracer `scope`. Attributes
/// beyond the spans' own fields (code location, thread, target) cost per span and are left
/// out; filter it per layer for what it should see.
pub fn layer<S>(provider: &SdkTracerProvider, scope: &'static str) -> OpenTelemetryLayer<S, Tracer>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(scope))
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_tracked_inactivity(false)
        .with_context_activation(false)
}

/// The `service.name` to export: `OTEL_SERVICE_NAME` when set and not blank, else `default`.
pub fn service_name(default: &str) -> String {
    std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|name| !name.trim().is_empty())
        .unwrap_or_else(|| default.to_owned())
}

/// Keeps a trace exporter; dropping it flushes the spans not yet exported (drop it outside a
/// tokio runtime: the exporter's client blocks).
#[derive(Debug)]
#[must_use = "dropping the guard shuts the trace exporter down"]
pub struct Exporter {
    provider: Option<SdkTracerProvider>,
}

impl Exporter {
    /// Keeps `provider` (none: nothing exported).
    pub fn new(provider: Option<SdkTracerProvider>) -> Self {
        Self { provider }
    }

    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans still buffered and stops the exporter (also done on drop).
    pub fn shutdown(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT)
        {
            tracing::warn!(error = %e, "the trace exporter did not shut down cleanly");
        }
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_traces_path_is_appended_to_a_base_url_once() {
        let url = |e: &str| traces_url(e).ok();
        assert_eq!(
            url("http://collector:4318").as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        assert_eq!(
            url("http://collector:4318/").as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        assert_eq!(
            url("https://c.example/otlp/v1/traces").as_deref(),
            Some("https://c.example/otlp/v1/traces")
        );
        assert!(matches!(
            traces_url("collector:4318"),
            Err(Error::Endpoint(_))
        ));
        assert!(matches!(traces_url("not a url"), Err(Error::Endpoint(_))));
    }
}
