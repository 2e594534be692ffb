//! Prompt-cache affinity: providers discount a repeated prompt prefix (Anthropic and OpenAI
//! prompt caching) only when the same key serves it. A request whose shared prefix (system
//! and developer messages, and tools) is long enough to be cached carries the prefix's hash
//! ([`prefix_hash`]); the attempt (`route::attempt`) starts with the provider that served
//! that prefix last and prefers its key when that key has budget and its class may take it,
//! and falls back to the pool's order and strategy otherwise (busy, out of budget, refused):
//! in a pool of several providers a prefix stays with its provider, not only its key.

use crate::providers::types::{ChatRequest, Role};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

/// Characters of shared prefix below which a prompt is not worth caching: about the 1,024
/// tokens both providers require, at ~4 characters a token.
pub const MIN_PREFIX_CHARS: usize = 4096;

/// Prefixes remembered at most; the table starts afresh past it.
const CAPACITY: usize = 10_000;

/// The hash of `req`'s shared prefix (system and developer messages, tools), if it is long
/// enough to be cached by the provider.
pub fn prefix_hash(req: &ChatRequest) -> Option<u64> {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let mut chars = 0;
    for m in &req.messages {
        if matches!(m.role, Role::System | Role::Developer) {
            let text = m.text();
            chars += text.len();
            text.hash(&mut hasher);
        }
    }
    if let Some(tools) = &req.tools
        && let Ok(json) = serde_json::to_string(tools)
    {
        chars += json.len();
        json.hash(&mut hasher);
    }
    (chars >= MIN_PREFIX_CHARS).then(|| hasher.finish())
}

/// Key names by (prefix hash, provider).
type Last = HashMap<(u64, Arc<str>), Arc<str>>;

/// The key that served each prefix last, by (prefix hash, provider), and the provider.
#[derive(Debug, Default)]
pub struct Affinity {
    last: Mutex<Last>,
    providers: Mutex<HashMap<u64, Arc<str>>>,
}

impl Affinity {
    /// The provider that served prefix `hash` last.
    pub fn provider(&self, hash: u64) -> Option<Arc<str>> {
        let providers = self.providers.lock().unwrap_or_else(|p| p.into_inner());
        providers.get(&hash).cloned()
    }

    /// The key of `provider` that served prefix `hash` last.
    pub fn preferred(&self, hash: u64, provider: &Arc<str>) -> Option<Arc<str>> {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.get(&(hash, provider.clone())).cloned()
    }

    /// Key `key` of `provider` served prefix `hash`.
    pub fn record(&self, hash: u64, provider: &Arc<str>, key: &Arc<str>) {
        {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            if last.len() >= CAPACITY {
                last.clear();
            }
            last.insert((hash, provider.clone()), key.clone());
        }
        let mut providers = self.providers.lock().unwrap_or_else(|p| p.into_inner());
        if providers.len() >= CAPACITY {
            providers.clear();
        }
        providers.insert(hash, provider.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(system: &str, user: &str) -> ChatRequest {
        serde_json::from_value(serde_json::json!({"model": "m", "messages": [
            {"role": "system", "content": system}, {"role": "user", "content": user}
        ]}))
        .unwrap()
    }

    #[test]
    fn a_long_shared_prefix_has_one_hash_whatever_the_question() {
        let long = "x".repeat(MIN_PREFIX_CHARS);
        let a = prefix_hash(&req(&long, "one"));
        assert!(a.is_some());
        assert_eq!(a, prefix_hash(&req(&long, "two")));
        assert_ne!(a, prefix_hash(&req(&format!("{long}y"), "one")));
        // Too short to be cached: no affinity.
        assert_eq!(
            prefix_hash(&req(&"x".repeat(MIN_PREFIX_CHARS - 1), "one")),
            None
        );
    }
}
