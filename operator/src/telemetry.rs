//! Logs and traces of the operator: the `tracing` subscriber, and OTLP export of one span per
//! reconcile, set up as the proxy's ([`floodgate_telemetry`]: `--otlp-endpoint` /
//! `OTEL_EXPORTER_OTLP_ENDPOINT`, OTLP over HTTP/protobuf, `OTEL_SERVICE_NAME`, default
//! [`DEFAULT_SERVICE_NAME`]).
//!
//! **Spans.** [`reconcile_span`]: `reconcile {kind}`, with `kind`, `namespace` and `name` of
//! the object, and `error.type` (the error's class) and an error status when it fails. Within
//! it, the operator's warnings become span events, and each Kubernetes API call made with the
//! in-cluster client is a child span (kube's `HTTP` span: method, URL path, status code).
//! Names and paths only: a Secret's value never enters a span.
//!
//! Without an endpoint the subscriber is the fmt layer alone, as before traces; with one, the
//! fmt layer keeps `RUST_LOG`'s filter and the export layer sees only the spans above.

use crate::context::Context;
use crate::error::Result;
use kube::Resource;
use kube::runtime::controller::Action;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::future::Future;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{Layer as _, Registry};

/// Service name exported when `OTEL_SERVICE_NAME` is unset.
pub const DEFAULT_SERVICE_NAME: &str = "floodgate-operator";

/// Errors setting up logs and traces.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The OTLP endpoint is not an `http(s)://` URL, or the exporter could not be built.
    #[error(transparent)]
    Otlp(#[from] floodgate_telemetry::Error),
    /// A global subscriber was already installed.
    #[error("cannot install the tracing subscriber: {0}")]
    Subscriber(#[from] tracing_subscriber::util::TryInitError),
}

/// Installs the global subscriber ([`subscriber`]): the fmt layer on stderr (filtered by
/// `RUST_LOG`, default `info`; JSON lines with `json`), and with `otlp_endpoint` the export of
/// the reconcile spans. Call it before starting a tokio runtime, and drop what it returns
/// after the runtime.
pub fn init(
    json: bool,
    otlp_endpoint: Option<&str>,
) -> Result<floodgate_telemetry::Exporter, Error> {
    let provider = match otlp_endpoint.filter(|e| !e.trim().is_empty()) {
        None => None,
        Some(endpoint) => Some(floodgate_telemetry::tracer_provider(
            &floodgate_telemetry::traces_url(endpoint)?,
            floodgate_telemetry::service_name(DEFAULT_SERVICE_NAME),
        )?),
    };
    subscriber(json, provider.as_ref()).try_init()?;
    Ok(floodgate_telemetry::Exporter::new(provider))
}

/// The operator's subscriber, as [`init`] installs it (and the OTLP test runs a reconcile in
/// it): the fmt layer on stderr with `RUST_LOG`'s filter (its own: it does not limit the
/// export), and with `provider` the export layer, seeing only [`exported`]'s spans.
fn subscriber(
    json: bool,
    provider: Option<&SdkTracerProvider>,
) -> impl tracing::Subscriber + Send + Sync + 'static {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json().with_filter(filter).boxed()
    } else {
        fmt.with_filter(filter).boxed()
    };
    let otel = provider
        .map(|p| floodgate_telemetry::layer(p, DEFAULT_SERVICE_NAME).with_filter(exported()));
    Registry::default().with(fmt).with(otel)
}

/// What the export layer sees: the operator's spans and its warnings (as span events), and
/// kube's API call spans (debug level) within them.
fn exported() -> Targets {
    Targets::new()
        .with_target("floodgate_operator", LevelFilter::INFO)
        .with_target("kube_client::client::builder", LevelFilter::DEBUG)
}

/// The span of one reconcile of `obj`.
pub fn reconcile_span<K: Resource<DynamicType = ()>>(obj: &K) -> tracing::Span {
    let kind = K::kind(&());
    tracing::info_span!(
        "reconcile",
        otel.name = %format_args!("reconcile {kind}"),
        kind = %kind,
        namespace = obj.meta().namespace.as_deref().unwrap_or_default(),
        name = obj.meta().name.as_deref().unwrap_or_default(),
        error.type = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    )
}

/// `pending`, a reconcile of `obj`, in its [`reconcile_span`], aborted when `lost` is
/// cancelled (the Lease lost: [`crate::leader::fenced`]), and counted in the metrics.
pub(crate) fn traced<K, Fut>(
    obj: &K,
    pending: Fut,
    ctx: Arc<Context>,
    lost: CancellationToken,
) -> impl Future<Output = Result<Action>> + Send + 'static + use<K, Fut>
where
    K: Resource<DynamicType = ()>,
    Fut: Future<Output = Result<Action>> + Send + 'static,
{
    let span = reconcile_span(obj);
    let kind = K::kind(&()).into_owned();
    let recorded = span.clone();
    async move {
        let started = std::time::Instant::now();
        let result = crate::leader::fenced(lost, pending).await;
        let error = result.as_ref().err().map(crate::Error::metric_label);
        if let Some(error) = error {
            recorded.record("error.type", error);
            recorded.record("otel.status_code", "ERROR");
        }
        ctx.metrics.observe(&kind, error, started.elapsed());
        result
    }
    .instrument(span)
}

#[cfg(test)]
mod tests;
