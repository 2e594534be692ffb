//! The context a request carries through the stages.

use crate::identity::Caller;
use axum::http::{HeaderMap, HeaderValue};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::time::Instant;

/// The header a request id is read from and echoed in.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Request header: the longest the caller wants to wait for budget, in milliseconds. It can
/// shorten its tier's wait limit, never lengthen it.
pub const MAX_WAIT_HEADER: &str = "x-floodgate-max-wait-ms";

/// The front door a request came in by, which decides the answer's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Door {
    /// OpenAI `POST /v1/chat/completions`.
    OpenAiChat,
    /// Anthropic `POST /v1/messages`.
    AnthropicMessages,
    /// OpenAI `POST /v1/embeddings`.
    OpenAiEmbeddings,
}

impl Door {
    /// The route, for spans and logs.
    pub fn route(self) -> &'static str {
        match self {
            Door::OpenAiChat => "/v1/chat/completions",
            Door::AnthropicMessages => "/v1/messages",
            Door::OpenAiEmbeddings => "/v1/embeddings",
        }
    }
}

/// A request's id: the caller's `x-request-id` when it sent a usable one, else generated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(HeaderValue);

impl RequestId {
    /// The caller's id from `headers` (set by the request-id layer when missing), or a fresh
    /// one.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        match headers.get(REQUEST_ID_HEADER) {
            Some(v) if !v.is_empty() && v.len() <= 128 && v.to_str().is_ok() => {
                RequestId(v.clone())
            }
            _ => RequestId::generate(),
        }
    }

    /// A fresh id, unique in the process and unlikely to collide across replicas:
    /// `req_` + the process's start time + a counter, in hex.
    pub fn generate() -> Self {
        static PREFIX: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let prefix = *PREFIX.get_or_init(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
                & 0xffff_ffff_ffff
        });
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = format!("req_{prefix:012x}{n:08x}");
        // Hex and an underscore: always a valid header value.
        RequestId(HeaderValue::from_str(&id).unwrap_or(HeaderValue::from_static("req_unknown")))
    }

    /// The id as a header value.
    pub fn header_value(&self) -> &HeaderValue {
        &self.0
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        self.0.to_str().unwrap_or_default()
    }
}

/// What the route stage decided.
#[derive(Debug, Clone)]
pub struct RouteDecision {
    /// The provider that answered.
    pub provider: Arc<str>,
    /// The key's display name.
    pub key: Arc<str>,
    /// Upstream attempts made.
    pub attempts: u32,
    /// The counter a served request of this route and provider counts on.
    pub ok: prometheus_client::metrics::counter::Counter,
}

/// A request's context: who asks, by which door, by when the answer is due, and what the
/// stages decided. Created by the door from the request's headers, before the body is read.
#[derive(Debug, Clone)]
pub struct RequestCtx {
    /// The request id (echoed in `x-request-id`, on the span and in logs).
    pub id: RequestId,
    /// The door it came in by.
    pub door: Door,
    /// When the gateway received it.
    pub received: Instant,
    /// The latest instant it may still be waiting for budget; past it, 429. Set from the
    /// tier's wait limit once the tier is known.
    pub deadline: Instant,
    /// The wait the caller asked for (`x-floodgate-max-wait-ms`), if any.
    pub max_wait_asked: Option<std::time::Duration>,
    /// The caller sent `x-floodgate-max-wait-ms` but not as a whole number of milliseconds
    /// (the door answers 400 rather than ignore a limit the caller relies on).
    pub max_wait_invalid: bool,
    /// Its tier: `default` without a TierQueue.
    pub tier: Arc<str>,
    /// The tier a job runs in when not its tenant's (Batch API lines run in a batch-class
    /// tier); `None`: the caller's tier.
    pub job_tier: Option<Arc<str>>,
    /// How long it waited in the queue for budget, once admitted.
    pub queued: Option<std::time::Duration>,
    /// Where it stands while it waits, when the door reports progress (streaming callers).
    pub progress: Option<Arc<crate::route::wait::Progress>>,
    /// Who calls (stage 1, identity): its tenant, with the tenant's name and tier. `None`
    /// when the gateway is open (no Tenant configured).
    pub caller: Option<Arc<Caller>>,
    /// The route stage's decision, once made.
    pub route: Option<RouteDecision>,
    /// Stages 4, 5 and 8: the cache, what the caller asked of it (`cache-control`), and
    /// what it did.
    pub cache: crate::cache::CacheCtx,
    /// The prompt's class (stage 3) and the routing rule and chain steps taken.
    pub routing: Option<crate::routing::Note>,
}

impl RequestCtx {
    /// The context of a request that arrived now with `headers` by `door`, waiting at most
    /// `max_wait` for budget.
    pub fn new(door: Door, headers: &HeaderMap, max_wait: std::time::Duration) -> Self {
        let received = Instant::now();
        let asked = headers.get(MAX_WAIT_HEADER).map(|v| {
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(std::time::Duration::from_millis)
        });
        let max_wait_asked = asked.flatten();
        let max_wait_invalid = asked.is_some_and(|a| a.is_none());
        Self {
            id: RequestId::from_headers(headers),
            door,
            received,
            deadline: received + max_wait_asked.map_or(max_wait, |m| m.min(max_wait)),
            max_wait_asked,
            max_wait_invalid,
            tier: Arc::from(crate::route::tiers::DEFAULT_TIER),
            job_tier: None,
            queued: None,
            progress: None,
            caller: None,
            route: None,
            cache: crate::cache::CacheCtx::new(None, headers),
            routing: None,
        }
    }

    /// Places the request in `tier`: its deadline is its tier's wait limit, or the shorter
    /// wait the caller asked for.
    pub fn set_tier(&mut self, tier: &crate::route::tiers::TierRt) {
        let wait = self
            .max_wait_asked
            .map_or(tier.max_wait, |m| m.min(tier.max_wait));
        self.deadline = self.received + wait;
        self.tier = tier.name.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_callers_id_is_kept_and_a_bad_one_replaced() {
        let mut headers = HeaderMap::new();
        headers.insert(REQUEST_ID_HEADER, HeaderValue::from_static("abc-123"));
        assert_eq!(RequestId::from_headers(&headers).as_str(), "abc-123");
        headers.insert(REQUEST_ID_HEADER, HeaderValue::from_static(""));
        assert!(
            RequestId::from_headers(&headers)
                .as_str()
                .starts_with("req_")
        );
        let long = "x".repeat(200);
        headers.insert(REQUEST_ID_HEADER, HeaderValue::from_str(&long).unwrap());
        assert!(
            RequestId::from_headers(&headers)
                .as_str()
                .starts_with("req_")
        );
        assert_ne!(RequestId::generate(), RequestId::generate());
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_asked_for_is_whole_milliseconds_or_refused() {
        let max = std::time::Duration::from_secs(30);
        let ctx = |value: Option<&'static str>| {
            let mut headers = HeaderMap::new();
            if let Some(v) = value {
                headers.insert(MAX_WAIT_HEADER, HeaderValue::from_static(v));
            }
            RequestCtx::new(Door::OpenAiChat, &headers, max)
        };
        let none = ctx(None);
        assert_eq!((none.max_wait_asked, none.max_wait_invalid), (None, false));
        assert_eq!(none.deadline, none.received + max);
        let asked = ctx(Some(" 1500 "));
        assert_eq!(
            asked.max_wait_asked,
            Some(std::time::Duration::from_millis(1500))
        );
        assert_eq!(
            asked.deadline,
            asked.received + std::time::Duration::from_millis(1500)
        );
        assert!(!asked.max_wait_invalid);
        for bad in ["1.5s", "-1", "", "soon"] {
            let c = ctx(Some(bad));
            assert!(c.max_wait_invalid, "{bad:?}");
            assert_eq!(c.max_wait_asked, None);
        }
    }
}
