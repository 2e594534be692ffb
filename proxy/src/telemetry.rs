//! Logs and traces: the `tracing` subscriber, and OTLP export of the request path's spans.
//!
//! Two spans follow a request, both on the [`TARGET`] target so that one directive turns them
//! on or off as a whole:
//! - `chat` (`server/chat.rs`), kind server: the inbound request, from the body read to the
//!   response headers. `gen_ai.operation.name`, `gen_ai.request.model` (as requested),
//!   `http.response.status_code`, `error.type`, `floodgate.{provider,attempts}`. Its name
//!   stays `chat`: an OpenTelemetry span is named once its first child starts, before the
//!   model is known to be configured, and a caller's arbitrary model must not name spans.
//! - `upstream` (`route/upstream.rs`), one per attempt, a child of `chat`: OpenTelemetry name
//!   `chat {upstream model}`, kind client, `gen_ai.provider.name`, `gen_ai.request.model`,
//!   `server.address` (host only), `floodgate.{provider,key}` (the key's display name),
//!   `error.type`, and `gen_ai.usage.{input,output}_tokens` once known. A stream's span ends
//!   with the stream, when its usage is recorded.
//!
//! Spans carry configured names (provider, key display name, model ids), never a secret, a
//! prompt or a completion.
//!
//! Cost: without `--otlp-endpoint` the subscriber is exactly the fmt layer, and its filter
//! turns [`TARGET`] off (unless `RUST_LOG` names it), so the span callsites are disabled once
//! and for all: a request pays a cached interest check per span, and the fields are never
//! evaluated. With an endpoint, the fmt layer still ignores the spans (per-layer filters), and
//! the OpenTelemetry layer hands finished spans to the SDK's batch processor, which exports
//! them from its own thread. Most of that cost is building the spans in the layer, so
//! sampling (`OTEL_TRACES_SAMPLER`) happens before the layer, in `RequestSampler`.

use std::sync::atomic::{AtomicU64, Ordering};
use tracing::subscriber::Interest;
use tracing::{Metadata, Subscriber};
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::{Context, Filter, SubscriberExt as _};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{Layer as _, Registry};

/// The `tracing` target of the request path's spans.
pub const TARGET: &str = "floodgate::trace";

/// The name of the root span of a request, the one sampling decides on.
pub const REQUEST_SPAN: &str = "chat";

/// Service name exported when `OTEL_SERVICE_NAME` is unset.
pub const DEFAULT_SERVICE_NAME: &str = "floodgate-proxy";

/// The log filter used when `RUST_LOG` is unset or invalid.
const DEFAULT_LOG_FILTER: &str = "info,tower_http=warn";

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

/// Logging options.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Log as JSON lines instead of text.
    pub json: bool,
    /// OTLP/HTTP collector base URL (`http://collector:4318`), or the full `.../v1/traces`
    /// URL; `None` exports nothing.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans.
    pub service_name: String,
}

/// Keeps the trace exporter; dropping it flushes the spans not yet exported.
pub type Telemetry = floodgate_telemetry::Exporter;

/// Installs the global subscriber: the fmt layer on stderr (filtered by `RUST_LOG`), and,
/// with an OTLP endpoint, the OpenTelemetry layer exporting the [`TARGET`] spans.
pub fn init(options: Options) -> Result<Telemetry, Error> {
    let filter = log_filter();
    use std::io::IsTerminal as _;
    let ansi = std::io::stderr().is_terminal();
    let endpoint = options.otlp_endpoint.filter(|e| !e.trim().is_empty());
    let Some(endpoint) = endpoint else {
        // Exactly the subscriber the proxy had before traces: a global filter, so the
        // disabled span callsites cost nothing per request.
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(ansi)
            .with_writer(std::io::stderr);
        if options.json {
            builder.json().finish().try_init()?;
        } else {
            builder.finish().try_init()?;
        }
        return Ok(Telemetry::new(None));
    };
    let provider = floodgate_telemetry::tracer_provider(
        &floodgate_telemetry::traces_url(&endpoint)?,
        options.service_name,
    )?;
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let fmt = if options.json {
        fmt.json().with_filter(filter).boxed()
    } else {
        fmt.with_filter(filter).boxed()
    };
    let otel = floodgate_telemetry::layer(&provider, "floodgate-proxy")
        .with_filter(RequestSampler::from_env());
    Registry::default().with(fmt).with(otel).try_init()?;
    Ok(Telemetry::new(Some(provider)))
}

/// `RUST_LOG` (else [`DEFAULT_LOG_FILTER`]), with the [`TARGET`] spans off unless it names
/// them: formatting their fields for log lines costs far more than exporting them, so a plain
/// `RUST_LOG=info` must not turn that on.
fn log_filter() -> EnvFilter {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let names_spans = std::env::var(EnvFilter::DEFAULT_ENV).is_ok_and(|spec| spec.contains(TARGET));
    match format!("{TARGET}=off").parse() {
        Ok(off) if !names_spans => filter.add_directive(off),
        _ => filter,
    }
}

/// What the OpenTelemetry layer sees: the spans of one request in `every` (head sampling), and
/// the proxy's warnings and errors within them (as span events).
///
/// Sampling here rather than in the SDK: most of the cost of a traced request is building its
/// spans in the layer, which an SDK sampler only decides on afterwards; a request left out
/// here creates no span at all. `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` choose the
/// share (`always_on`, `always_off`, `traceidratio` and their `parentbased_` forms; without
/// trace context propagation they are the same), applied as one request in N; the SDK then
/// keeps every span it is given.
#[derive(Debug)]
struct RequestSampler {
    targets: Targets,
    /// Trace one request in `every`; `0`: none.
    every: u64,
    requests: AtomicU64,
}

impl RequestSampler {
    fn new(every: u64) -> Self {
        Self {
            targets: Targets::new()
                .with_target(TARGET, LevelFilter::INFO)
                .with_target("floodgate_proxy", LevelFilter::WARN),
            every,
            requests: AtomicU64::new(0),
        }
    }

    fn from_env() -> Self {
        let sampler = std::env::var("OTEL_TRACES_SAMPLER").unwrap_or_default();
        let ratio = std::env::var("OTEL_TRACES_SAMPLER_ARG")
            .ok()
            .and_then(|arg| arg.trim().parse::<f64>().ok());
        Self::new(every(&sampler, ratio))
    }

    fn sample(&self) -> bool {
        match self.every {
            0 => false,
            1 => true,
            n => self
                .requests
                .fetch_add(1, Ordering::Relaxed)
                .is_multiple_of(n),
        }
    }
}

/// One request in how many is traced, from the `OTEL_TRACES_SAMPLER` variables.
fn every(sampler: &str, ratio: Option<f64>) -> u64 {
    match sampler.trim() {
        "always_off" | "parentbased_always_off" => 0,
        "traceidratio" | "parentbased_traceidratio" => match ratio {
            Some(r) if (0.0..=1.0).contains(&r) => {
                if r == 0.0 {
                    0
                } else {
                    // In 1..=u64::MAX for r in (0, 1]; `as` saturates.
                    (1.0 / r).round() as u64
                }
            }
            _ => 1,
        },
        _ => 1,
    }
}

impl<S> Filter<S> for RequestSampler
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn enabled(&self, meta: &Metadata<'_>, cx: &Context<'_, S>) -> bool {
        if !self.targets.would_enable(meta.target(), meta.level()) {
            return false;
        }
        if meta.is_span() && meta.target() == TARGET && meta.name() == REQUEST_SPAN {
            return self.sample();
        }
        // Anything else only within a sampled request.
        cx.lookup_current().is_some()
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        if self.every != 0 && self.targets.would_enable(meta.target(), meta.level()) {
            // Decided per span: sampling and the enclosing request.
            Interest::sometimes()
        } else {
            Interest::never()
        }
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::INFO)
    }
}

/// The host of a URL (`server.address`): no scheme, credentials, port or path.
pub fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if let Some(v6) = host_port.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6);
    }
    host_port.split(':').next().unwrap_or(host_port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sampler_variables_give_one_request_in_n() {
        assert_eq!(every("", None), 1);
        assert_eq!(every("always_on", None), 1);
        assert_eq!(every("parentbased_always_off", None), 0);
        assert_eq!(every("traceidratio", Some(0.1)), 10);
        assert_eq!(every("parentbased_traceidratio", Some(0.3)), 3);
        assert_eq!(every("traceidratio", Some(0.0)), 0);
        assert_eq!(every("traceidratio", Some(1e-30)), u64::MAX);
        assert_eq!(every("traceidratio", Some(2.0)), 1);
        assert_eq!(every("traceidratio", None), 1);
    }

    /// Counts the spans and events a layer behind `sampler` sees.
    #[derive(Debug, Default, Clone)]
    struct Seen(std::sync::Arc<std::sync::Mutex<Vec<&'static str>>>);

    impl<S: Subscriber> tracing_subscriber::Layer<S> for Seen {
        fn on_new_span(
            &self,
            attrs: &tracing::span::Attributes<'_>,
            _: &tracing::span::Id,
            _: Context<'_, S>,
        ) {
            self.0.lock().unwrap().push(attrs.metadata().name());
        }

        fn on_event(&self, _: &tracing::Event<'_>, _: Context<'_, S>) {
            self.0.lock().unwrap().push("event");
        }
    }

    fn requests(sampler: RequestSampler, n: usize) -> Vec<&'static str> {
        let seen = Seen::default();
        let subscriber = Registry::default().with(seen.clone().with_filter(sampler));
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..n {
                let request = tracing::info_span!(target: TARGET, "chat");
                let _in = request.enter();
                let attempt = tracing::info_span!(target: TARGET, "upstream");
                let _in = attempt.enter();
                tracing::warn!(target: "floodgate_proxy::route", "upstream broke");
                tracing::info!(target: "floodgate_proxy::route", "not a warning");
            }
            tracing::warn!(target: "floodgate_proxy::route", "outside any request");
            tracing::info_span!(target: TARGET, "upstream").in_scope(|| {});
        });
        seen.0.lock().unwrap().clone()
    }

    #[test]
    fn one_request_in_n_is_traced_whole() {
        let all = requests(RequestSampler::new(1), 2);
        assert_eq!(
            all,
            ["chat", "upstream", "event", "chat", "upstream", "event"]
        );
        assert_eq!(
            requests(RequestSampler::new(3), 7),
            ["chat", "upstream", "event"].repeat(3)
        );
        assert!(requests(RequestSampler::new(0), 5).is_empty());
    }

    #[test]
    fn server_address_is_the_bare_host() {
        assert_eq!(host_of("https://api.openai.com/v1"), "api.openai.com");
        assert_eq!(host_of("http://127.0.0.1:4000"), "127.0.0.1");
        assert_eq!(
            host_of("http://user:secret@llm.internal:8080/x"),
            "llm.internal"
        );
        assert_eq!(host_of("http://[::1]:11434/api"), "::1");
        assert_eq!(host_of("ollama:11434"), "ollama");
    }
}
