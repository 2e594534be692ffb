//! Upstream failures, classified so that `route` can decide what to do without reading
//! message text: retry elsewhere, cool a key, fail a key, open a circuit, or answer the caller.
//!
//! Each provider module parses its own error JSON (`openai::classify`, ...) and reduces it to
//! an `UpstreamError`; `UpstreamError::classify` then applies the rules every provider
//! shares (status code first, provider hints second).

use std::time::Duration;

/// How long a key rests after a 429 that said nothing about when to come back.
pub const DEFAULT_RATE_LIMIT_COOLDOWN: Duration = Duration::from_secs(15);

/// Longest upstream message kept in an error (upstream bodies can be whole HTML pages).
const MAX_MESSAGE_CHARS: usize = 300;

/// `Result` with [`ProviderError`] as the default error.
pub type Result<T, E = ProviderError> = std::result::Result<T, E>;

/// Whose fault a failure is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The provider (or our use of it: keys, quota, configuration).
    Upstream,
    /// The caller: the request can never succeed as sent.
    Downstream,
}

/// When the upstream closed the connection (see [`ProviderError::Closed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClosedWhen {
    /// After the request was sent, before any response headers.
    BeforeResponse,
    /// After the response headers, before the end of its body.
    MidResponse,
}

impl std::fmt::Display for ClosedWhen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ClosedWhen::BeforeResponse => "before answering",
            ClosedWhen::MidResponse => "mid-response",
        })
    }
}

/// A classified upstream failure. Messages are sanitised: they never hold API keys.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// 429: this key is over its rate limit for now.
    #[error("upstream rate limited (retry after {retry_after:?}): {message}")]
    RateLimited {
        /// When the provider said to come back, if it did.
        retry_after: Option<Duration>,
        /// Upstream message.
        message: String,
    },
    /// The key has no quota or credit left (OpenAI `insufficient_quota`); waiting won't help.
    #[error("upstream quota exhausted: {message}")]
    QuotaExhausted {
        /// Upstream message.
        message: String,
    },
    /// 401/403, or a key the provider called invalid: this key does not work.
    #[error("upstream rejected the API key ({status}): {message}")]
    Unauthorized {
        /// Upstream status (0 when the key was refused before sending).
        status: u16,
        /// Upstream message.
        message: String,
    },
    /// 400/404/413/422...: the request cannot succeed as sent.
    #[error("upstream rejected the request ({status}): {message}")]
    BadRequest {
        /// Upstream status (400 when Floodgate refused to translate the request).
        status: u16,
        /// Upstream message.
        message: String,
    },
    /// 503/529 or an `overloaded_error`: the provider is shedding load.
    #[error("upstream overloaded ({status}): {message}")]
    Overloaded {
        /// Upstream status.
        status: u16,
        /// When the provider said to come back, if it did.
        retry_after: Option<Duration>,
        /// Upstream message.
        message: String,
    },
    /// Other 5xx.
    #[error("upstream server error ({status}): {message}")]
    ServerError {
        /// Upstream status.
        status: u16,
        /// Upstream message.
        message: String,
    },
    /// No answer within the pool's `requestSeconds` (no response headers, or a whole
    /// answer's body not complete), or a 408/504 from upstream.
    #[error("upstream did not answer in time")]
    Timeout,
    /// The routing chain's step ran out of time before the target began answering (response
    /// headers, and a stream's first chunk): the chain moves on to its next step. Not held
    /// against the provider's circuit: a late start may be a long answer, not a sick
    /// provider (its own `requestSeconds` still bounds calls that are the chain's last step).
    #[error("upstream did not begin answering within the routing step's deadline")]
    StepDeadline,
    /// A stream that sent nothing for longer than the pool's `streamIdleSeconds`.
    #[error("upstream stream stalled: nothing received for {}s", .idle.as_secs())]
    Stalled {
        /// The idle time allowed.
        idle: Duration,
    },
    /// No TCP connection (refused, unreachable, DNS, or no connection within `connectMs`).
    #[error("could not connect to upstream: {0}")]
    Connect(String),
    /// A TCP connection, but the TLS handshake failed (certificate, protocol, or a server that
    /// does not speak TLS).
    #[error("TLS handshake with upstream failed: {0}")]
    Tls(String),
    /// The upstream closed or reset the connection after the request was sent: before the
    /// response headers, or in the middle of the response body.
    #[error("upstream closed the connection {0}")]
    Closed(ClosedWhen),
    /// A body that is not the provider's documented format.
    #[error("upstream response could not be parsed: {0}")]
    Malformed(String),
    /// A stream that ended before its terminal event: the answer is incomplete.
    #[error("upstream stream ended before its terminal event")]
    Truncated,
}

impl ProviderError {
    /// Whether trying again — on another key or provider — may succeed.
    pub fn retryable(&self) -> bool {
        !matches!(self, ProviderError::BadRequest { .. })
    }

    /// Whose fault the failure is.
    pub fn fault(&self) -> Fault {
        match self {
            ProviderError::BadRequest { .. } => Fault::Downstream,
            _ => Fault::Upstream,
        }
    }

    /// The status to answer the caller with when no retry is left.
    pub fn http_status(&self) -> u16 {
        match self {
            ProviderError::RateLimited { .. } => 429,
            ProviderError::BadRequest { status, .. } if (400..500).contains(status) => *status,
            ProviderError::BadRequest { .. } => 400,
            ProviderError::Overloaded { .. } | ProviderError::QuotaExhausted { .. } => 503,
            ProviderError::Timeout
            | ProviderError::StepDeadline
            | ProviderError::Stalled { .. } => 504,
            ProviderError::Unauthorized { .. }
            | ProviderError::ServerError { .. }
            | ProviderError::Connect(_)
            | ProviderError::Tls(_)
            | ProviderError::Closed(_)
            | ProviderError::Malformed(_)
            | ProviderError::Truncated => 502,
        }
    }

    /// Low-cardinality label for metrics (`reason="..."`).
    pub fn metric_label(&self) -> &'static str {
        match self {
            ProviderError::RateLimited { .. } => "rate_limited",
            ProviderError::QuotaExhausted { .. } => "quota_exhausted",
            ProviderError::Unauthorized { .. } => "unauthorized",
            ProviderError::BadRequest { .. } => "bad_request",
            ProviderError::Overloaded { .. } => "overloaded",
            ProviderError::ServerError { .. } => "server_error",
            ProviderError::Timeout => "timeout",
            ProviderError::StepDeadline => "step_deadline",
            ProviderError::Stalled { .. } => "stalled",
            ProviderError::Connect(_) => "connect",
            ProviderError::Tls(_) => "tls",
            ProviderError::Closed(_) => "upstream_closed",
            ProviderError::Malformed(_) => "malformed",
            ProviderError::Truncated => "truncated",
        }
    }

    /// Whether the failure counts against the provider's circuit breaker: the provider
    /// itself is unwell, as opposed to one key (rate limits, bad keys) or the caller.
    pub fn opens_circuit(&self) -> bool {
        matches!(
            self,
            ProviderError::Overloaded { .. }
                | ProviderError::ServerError { .. }
                | ProviderError::Timeout
                | ProviderError::Stalled { .. }
                | ProviderError::Connect(_)
                | ProviderError::Tls(_)
                | ProviderError::Closed(_)
                | ProviderError::Malformed(_)
                | ProviderError::Truncated
        )
    }

    /// How long the key that was used should rest before it is chosen again.
    pub fn cools_key(&self) -> Option<Duration> {
        match self {
            ProviderError::RateLimited { retry_after, .. } => {
                Some(retry_after.unwrap_or(DEFAULT_RATE_LIMIT_COOLDOWN))
            }
            _ => None,
        }
    }

    /// Whether the key that was used is broken until an operator acts (revoked, no credit).
    pub fn fails_key(&self) -> bool {
        matches!(
            self,
            ProviderError::Unauthorized { .. } | ProviderError::QuotaExhausted { .. }
        )
    }

    /// The provider's retry hint, if it gave one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::RateLimited { retry_after, .. }
            | ProviderError::Overloaded { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// A request Floodgate cannot translate for this provider: the caller's fault.
    pub(crate) fn unsupported(message: impl Into<String>) -> Self {
        ProviderError::BadRequest {
            status: 400,
            message: message.into(),
        }
    }

    /// A body that could not be parsed; `what` names what was expected.
    pub(crate) fn malformed(what: &str, err: &serde_json::Error) -> Self {
        ProviderError::Malformed(format!("{what}: {err}"))
    }
}

/// What an error response said, reduced to what classification needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct UpstreamError {
    /// HTTP status.
    pub status: u16,
    /// The provider's error type or code (`rate_limit_error`, `RESOURCE_EXHAUSTED`, ...).
    pub kind: Option<String>,
    /// Human-readable message (sanitised by [`sanitize`] when the error is built).
    pub message: String,
    /// Retry hint from headers or body.
    pub retry_after: Option<Duration>,
}

impl UpstreamError {
    /// Applies the shared rules: provider error kinds that say more than the status first,
    /// then the status.
    pub fn classify(self) -> ProviderError {
        let UpstreamError {
            status,
            kind,
            message,
            retry_after,
        } = self;
        let message = sanitize(&message);
        match kind.as_deref() {
            Some("insufficient_quota") => return ProviderError::QuotaExhausted { message },
            Some("overloaded_error") => {
                return ProviderError::Overloaded {
                    status,
                    retry_after,
                    message,
                };
            }
            Some("rate_limit_error" | "rate_limit_exceeded") => {
                return ProviderError::RateLimited {
                    retry_after,
                    message,
                };
            }
            Some("authentication_error" | "permission_error" | "invalid_api_key")
                if status < 500 =>
            {
                return ProviderError::Unauthorized { status, message };
            }
            _ => {}
        }
        match status {
            429 => ProviderError::RateLimited {
                retry_after,
                message,
            },
            401 | 403 => ProviderError::Unauthorized { status, message },
            408 | 504 => ProviderError::Timeout,
            400..=499 => ProviderError::BadRequest { status, message },
            503 | 529 => ProviderError::Overloaded {
                status,
                retry_after,
                message,
            },
            _ => ProviderError::ServerError { status, message },
        }
    }
}

/// Makes an upstream message safe to log and return: strips anything that looks like an API
/// key (OpenAI echoes part of a rejected key) and caps the length. Words are split at any
/// whitespace, so a key at the start of a line is found too.
pub(crate) fn sanitize(message: &str) -> String {
    let mut out = String::with_capacity(message.len().min(MAX_MESSAGE_CHARS));
    for piece in message.split_inclusive(char::is_whitespace) {
        let word = piece.trim_end_matches(char::is_whitespace);
        if looks_like_key(word) {
            out.push_str("[redacted]");
        } else {
            out.push_str(word);
        }
        out.push_str(&piece[word.len()..]);
    }
    if out.chars().count() > MAX_MESSAGE_CHARS {
        out = out.chars().take(MAX_MESSAGE_CHARS).collect();
        out.push('…');
    }
    out
}

/// Key prefixes of the providers Floodgate speaks to, plus long opaque tokens.
fn looks_like_key(word: &str) -> bool {
    let word = word.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    const PREFIXES: [&str; 4] = ["sk-", "sk_", "AIza", "ya29."];
    if PREFIXES.iter().any(|p| word.starts_with(p)) && word.len() > 8 {
        return true;
    }
    // A long run of key characters with digits and letters mixed is a token, not prose.
    word.len() >= 32
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '*' | '.'))
        && word.chars().any(|c| c.is_ascii_digit())
        && word.chars().any(|c| c.is_ascii_alphabetic())
}

/// A short, sanitised excerpt of a body that is not the provider's error JSON
/// (an HTML page from a proxy, plain text).
pub(crate) fn body_excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(4 * MAX_MESSAGE_CHARS)]);
    sanitize(text.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(status: u16, kind: Option<&str>) -> ProviderError {
        UpstreamError {
            status,
            kind: kind.map(str::to_owned),
            message: "m".into(),
            retry_after: Some(Duration::from_secs(3)),
        }
        .classify()
    }

    #[test]
    fn status_codes_map_to_classes() {
        assert!(matches!(err(429, None), ProviderError::RateLimited { .. }));
        assert!(matches!(err(401, None), ProviderError::Unauthorized { .. }));
        assert!(matches!(err(403, None), ProviderError::Unauthorized { .. }));
        for s in [400, 404, 413, 422] {
            assert!(
                matches!(err(s, None), ProviderError::BadRequest { .. }),
                "{s}"
            );
        }
        assert!(matches!(err(529, None), ProviderError::Overloaded { .. }));
        assert!(matches!(err(503, None), ProviderError::Overloaded { .. }));
        assert!(matches!(err(500, None), ProviderError::ServerError { .. }));
        assert_eq!(err(504, None), ProviderError::Timeout);
    }

    #[test]
    fn provider_kinds_override_the_status() {
        assert!(matches!(
            err(500, Some("overloaded_error")),
            ProviderError::Overloaded { .. }
        ));
        assert!(matches!(
            err(429, Some("insufficient_quota")),
            ProviderError::QuotaExhausted { .. }
        ));
    }

    #[test]
    fn policy_flags() {
        let limited = err(429, None);
        assert!(limited.retryable());
        assert!(!limited.opens_circuit());
        assert_eq!(limited.cools_key(), Some(Duration::from_secs(3)));
        assert_eq!(limited.http_status(), 429);

        let bad = err(422, None);
        assert!(!bad.retryable());
        assert_eq!(bad.fault(), Fault::Downstream);
        assert_eq!(bad.http_status(), 422);

        let auth = err(401, None);
        assert!(auth.fails_key() && auth.retryable() && !auth.opens_circuit());
        assert_eq!(auth.http_status(), 502);

        assert!(err(500, None).opens_circuit());
        assert!(ProviderError::Truncated.opens_circuit());
        let transport = [
            ProviderError::Connect("refused".into()),
            ProviderError::Tls("bad certificate".into()),
            ProviderError::Timeout,
            ProviderError::Stalled {
                idle: Duration::from_secs(5),
            },
            ProviderError::Closed(ClosedWhen::MidResponse),
        ];
        let labels: Vec<_> = transport.iter().map(ProviderError::metric_label).collect();
        assert_eq!(
            labels,
            ["connect", "tls", "timeout", "stalled", "upstream_closed"]
        );
        assert!(transport.iter().all(ProviderError::opens_circuit));
        assert_eq!(ProviderError::Truncated.metric_label(), "truncated");
    }

    #[test]
    fn sanitize_redacts_keys_and_caps_length() {
        let msg = "Incorrect API key provided: sk-proj-abc123def456. You can find your key";
        let clean = sanitize(msg);
        assert!(!clean.contains("abc123"), "{clean}");
        assert!(clean.contains("[redacted]"));
        assert!(!sanitize("key AIzaSyA1234567890abcdefghijklmnop").contains("AIza"));
        // Found by `make fuzz` (fuzz/regressions/provider_response): a key after a line
        // break, with no space before it, was kept.
        let clean = sanitize("{\"object\": \"x\",\nsk-proj-abc123def456\tAIzaSyA12345678\r\nok");
        assert!(
            !clean.contains("sk-proj") && !clean.contains("AIza"),
            "{clean}"
        );
        assert_eq!(clean, "{\"object\": \"x\",\n[redacted]\t[redacted]\r\nok");
        assert!(sanitize(&"x".repeat(1000)).chars().count() <= MAX_MESSAGE_CHARS + 1);
    }
}
