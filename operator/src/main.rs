//! `floodgate-operator`: runs the controllers of every Floodgate resource against the cluster
//! of the in-cluster service account or of `KUBECONFIG`, until SIGTERM or Ctrl-C.

use anyhow::Context as _;
use clap::Parser;
use floodgate_operator::health::Readiness;
use floodgate_operator::leader::LeaseLock;
use floodgate_operator::{Config, Metrics};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Floodgate operator.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Watch only this namespace (default: every namespace).
    #[arg(long, env = "FLOODGATE_OPERATOR_NAMESPACE")]
    namespace: Option<String>,
    /// Name reported in Events, usually the pod name.
    #[arg(long, env = "POD_NAME")]
    instance: Option<String>,
    /// The Redis the gateway shares rate budgets in (`redis://host:port`), for pools' live
    /// usage (`usedRpm`); without it usage is not read.
    #[arg(long, env = "FLOODGATE_REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// Without `--redis-url`: scrape pools' usage and circuits from the `/metrics` of the
    /// Ready gateway pods matching this label selector in `--lease-namespace` (the
    /// operator's own), e.g. `app.kubernetes.io/component=gateway`.
    #[arg(long, env = "FLOODGATE_GATEWAY_METRICS_SELECTOR")]
    gateway_metrics_selector: Option<String>,
    /// The gateway pods' `--admin-listen` port.
    #[arg(long, default_value_t = 9090)]
    gateway_metrics_port: u16,
    /// Without `--redis-url`: scrape these gateway replicas (`http://host:port`, one per
    /// replica) instead of finding pods.
    #[arg(long = "gateway-metrics-url", value_delimiter = ',')]
    gateway_metrics_urls: Vec<String>,
    /// Run the controllers only while holding the Lease `--lease-name` in `--lease-namespace`,
    /// so that several replicas are safe.
    #[arg(long, env = "FLOODGATE_LEADER_ELECT")]
    leader_elect: bool,
    /// Namespace of the leader Lease (in a pod: its own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, default_value = "floodgate-operator")]
    lease_name: String,
    /// Serve Prometheus metrics at `/metrics` (and `/healthz`, `/readyz`) on this address, e.g.
    /// `0.0.0.0:9090`; not served when unset.
    #[arg(long, env = "FLOODGATE_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Serve the sidecar injection webhook (HTTPS, `POST /mutate`) on this address, e.g.
    /// `0.0.0.0:9443`; not served when unset. Every replica serves it, leader or not.
    #[arg(long, env = "FLOODGATE_WEBHOOK_LISTEN")]
    webhook_listen: Option<std::net::SocketAddr>,
    /// Names (or addresses) the operator-made webhook certificate is valid for: the webhook
    /// Service's DNS names, e.g. `floodgate-webhook.floodgate.svc`.
    #[arg(
        long = "webhook-host",
        env = "FLOODGATE_WEBHOOK_HOSTS",
        value_delimiter = ','
    )]
    webhook_hosts: Vec<String>,
    /// The Secret (in `--lease-namespace`, the pod's namespace) holding the operator-made
    /// webhook certificate.
    #[arg(long, default_value = "floodgate-webhook-tls")]
    webhook_secret: String,
    /// The MutatingWebhookConfiguration whose `caBundle` the operator writes.
    #[arg(long, default_value = "floodgate-sidecar-injector")]
    webhook_configuration: String,
    /// Read the webhook certificate (`tls.crt`, `tls.key`) from this directory instead of
    /// making it (cert-manager); `caBundle` is then left to cert-manager.
    #[arg(long, env = "FLOODGATE_WEBHOOK_CERT_DIR")]
    webhook_cert_dir: Option<std::path::PathBuf>,
    /// The proxy image the sidecar runs.
    #[arg(
        long,
        env = "FLOODGATE_SIDECAR_IMAGE",
        default_value = "ghcr.io/floodgate-dev/floodgate-proxy:0.1.0"
    )]
    sidecar_image: String,
    /// The loopback port the sidecar listens on, its probe listener taking the next one (a
    /// pod's annotation `floodgate.dev/port` overrides it); a pod whose containers declare
    /// either is refused.
    #[arg(long, default_value_t = floodgate_operator::webhook::mutate::DEFAULT_PORT)]
    sidecar_port: u16,
    /// The ConfigMap with the sidecar's `config.yaml` when a pod names none
    /// (`floodgate.dev/config`).
    #[arg(long, default_value = "floodgate-sidecar")]
    sidecar_config_map: String,
    /// Log as JSON lines.
    #[arg(long, env = "FLOODGATE_LOG_JSON")]
    log_json: bool,
    /// Export a span per reconcile with OTLP over HTTP/protobuf to this collector
    /// (`http://collector:4318`, or the full `.../v1/traces` URL), as the gateway does. The
    /// service name comes from `OTEL_SERVICE_NAME` (default `floodgate-operator`).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Before the runtime, and dropped after it (flushing the last spans): the exporter's
    // HTTP client blocks.
    let _telemetry =
        floodgate_operator::telemetry::init(args.log_json, args.otlp_endpoint.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let result = runtime.block_on(run(args));
    drop(runtime);
    result
}

async fn run(args: Args) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = kube::Client::try_default()
        .await
        .context("cannot reach the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!(
            "shutting down: finishing the reconciles in flight; the webhook, if served, keeps answering for its drain"
        );
        signal.cancel();
    });
    let identity = args
        .instance
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("floodgate-operator-{}", std::process::id()));
    let config = Config {
        namespace: args.namespace,
        instance: args.instance,
        redis_url: args.redis_url,
        gateway_metrics: if args.gateway_metrics_urls.is_empty() {
            args.gateway_metrics_selector.map(|selector| {
                floodgate_operator::gateway::Targets::Pods {
                    namespace: args.lease_namespace.clone(),
                    selector,
                    port: args.gateway_metrics_port,
                }
            })
        } else {
            Some(floodgate_operator::gateway::Targets::Urls(
                args.gateway_metrics_urls.clone(),
            ))
        },
    };
    let metrics = Arc::new(Metrics::default());
    let webhook = match args.webhook_listen {
        Some(listen) => {
            let source = match &args.webhook_cert_dir {
                Some(dir) => floodgate_operator::webhook::CertSource::Files(dir.clone()),
                None => {
                    anyhow::ensure!(
                        !args.webhook_hosts.is_empty(),
                        "--webhook-listen needs --webhook-host (the webhook Service's DNS name) \
                         or --webhook-cert-dir"
                    );
                    floodgate_operator::webhook::CertSource::Operator {
                        namespace: args.lease_namespace.clone(),
                        secret: args.webhook_secret.clone(),
                        hosts: args.webhook_hosts.clone(),
                        configuration: args.webhook_configuration.clone(),
                    }
                }
            };
            let sidecar = floodgate_operator::webhook::mutate::Sidecar {
                image: args.sidecar_image.clone(),
                port: args.sidecar_port,
                default_config_map: args.sidecar_config_map.clone(),
            };
            let started = floodgate_operator::webhook::start(
                client.clone(),
                listen,
                source,
                sidecar,
                shutdown.clone(),
            )
            .await
            .with_context(|| format!("cannot listen on {listen} for the webhook"))?;
            Some(started)
        }
        None => None,
    };
    let readiness = Readiness::new(
        webhook.as_ref().map(|w| w.certificate.clone()),
        shutdown.clone(),
    );
    let server = match args.metrics_listen {
        Some(addr) => {
            Some(serve_metrics(addr, metrics.clone(), readiness, shutdown.clone()).await?)
        }
        None => None,
    };
    let webhook = webhook.map(|w| w.task);
    let result = if args.leader_elect {
        let lock = LeaseLock::new(
            client.clone(),
            &args.lease_namespace,
            &args.lease_name,
            &identity,
        );
        floodgate_operator::run_leader_elected(client, config, lock, metrics, shutdown.clone())
            .await
    } else {
        floodgate_operator::run(client, config, metrics, shutdown.clone()).await
    };
    shutdown.cancel();
    if let Some(server) = server {
        let _ = server.await;
    }
    if let Some(webhook) = webhook {
        let _ = webhook.await;
    }
    Ok(result?)
}

/// Serves `/metrics`, `/healthz` (the process answers) and `/readyz` (it should get traffic:
/// the webhook's certificate is loaded, and it is not stopping) on `addr` until `shutdown`.
async fn serve_metrics(
    addr: std::net::SocketAddr,
    metrics: Arc<Metrics>,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for metrics"))?;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics.encode(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let checked = readiness.check();
                async move {
                    match checked {
                        Ok(()) => (axum::http::StatusCode::OK, "ok"),
                        Err(why) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, why),
                    }
                }
            }),
        );
    tracing::info!(%addr, "serving metrics");
    Ok(tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "metrics server failed");
        }
    }))
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
