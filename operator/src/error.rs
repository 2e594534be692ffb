//! The operator's errors, classified for the error policy's backoff and for metric labels.

/// What a reconcile can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the Kubernetes API failed (network, conflict, refused object).
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[from] kube::Error),
    /// A resource came without a namespace (all Floodgate resources are namespaced).
    #[error("{0} has no namespace")]
    NoNamespace(String),
    /// Redis (live usage) failed; never fatal to a reconcile.
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// A gateway replica's `/metrics` could not be scraped (live usage without Redis); never
    /// fatal to a reconcile.
    #[error("cannot scrape the gateway's metrics: {0}")]
    Scrape(String),
    /// No pod matches the gateway's metrics selector: a wrong `--gateway-metrics-selector`,
    /// or no gateway running there (not "no use").
    #[error("no pod in namespace {namespace:?} matches the gateway selector {selector:?}")]
    NoGatewayPods {
        /// The namespace listed.
        namespace: String,
        /// The label selector that matched nothing.
        selector: String,
    },
    /// Pods match the gateway's metrics selector but none is Ready (with an IP) to scrape.
    #[error(
        "{matched} pod(s) in namespace {namespace:?} match the gateway selector {selector:?} but none is Ready"
    )]
    NoReadyGatewayPods {
        /// The namespace listed.
        namespace: String,
        /// The label selector.
        selector: String,
        /// How many pods it matched.
        matched: usize,
    },
    /// Another replica took the leader Lease, or it could not be renewed.
    #[error("lost the leader Lease")]
    LeaseLost,
    /// A call about the leader Lease took longer than its own timeout.
    #[error("a Lease API call took longer than {0:?}")]
    LeaseCallTimeout(std::time::Duration),
    /// An object could not be turned into JSON for an apply patch.
    #[error("cannot encode an apply patch: {0}")]
    Encode(#[from] serde_json::Error),
}

impl Error {
    /// A low-cardinality label for logs and metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube_api",
            Error::NoNamespace(_) => "no_namespace",
            Error::Encode(_) => "encode",
            Error::Redis(_) => "redis",
            Error::Scrape(_) => "scrape",
            Error::NoGatewayPods { .. } => "no_gateway_pods",
            Error::NoReadyGatewayPods { .. } => "no_ready_gateway_pods",
            Error::LeaseLost => "lease_lost",
            Error::LeaseCallTimeout(_) => "lease_timeout",
        }
    }
}

/// Result with the operator's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
