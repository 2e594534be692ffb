//! Injected faults: chosen by the model name (STYLE item 9) or set globally per provider.

use std::fmt;
use std::str::FromStr;
use std::sync::{PoisonError, RwLock};
use std::time::Duration;

use super::Provider;

/// A failure the mock injects instead of (or before) a normal answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this HTTP status and the provider's error body for it (`error-<code>`).
    Status(u16),
    /// Anthropic's 529 `overloaded_error`; 503 with the overload body elsewhere
    /// (`overloaded-529`).
    Overloaded,
    /// 429 with `retry-after` and the provider's rate-limit body, whatever the key's budget
    /// (`ratelimited`).
    RateLimited,
    /// Wait this long before sending response headers (`slow-<ms>`).
    Slow(Duration),
    /// Streams send their first text chunk and then nothing until the client goes away (or the
    /// mock shuts down); non-streaming calls never get headers (`stall`).
    Stall,
    /// Streams end cleanly but half-way, without their terminal event; non-streaming bodies
    /// are cut and the connection aborted (`truncate`).
    Truncate,
    /// 200 with invalid JSON: a cut body, or one invalid event in a stream (`malformed`).
    Malformed,
    /// Streams send every event but their terminal one (the finish reason included: the
    /// answer is whole), then the connection is aborted, as a connection lost at the very
    /// end; non-streaming bodies as with `truncate` (`abort`).
    Abort,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Status(code) => write!(f, "error-{code}"),
            Self::Overloaded => f.write_str("overloaded-529"),
            Self::RateLimited => f.write_str("ratelimited"),
            Self::Slow(delay) => write!(f, "slow-{}", delay.as_millis()),
            Self::Stall => f.write_str("stall"),
            Self::Truncate => f.write_str("truncate"),
            Self::Malformed => f.write_str("malformed"),
            Self::Abort => f.write_str("abort"),
        }
    }
}

impl FromStr for Fault {
    type Err = ParseError;

    /// Parses exactly one token, as written by `Display` (`error-500`, `slow-250`, `stall`…).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fault = match s {
            "overloaded-529" | "overloaded" => Some(Self::Overloaded),
            "ratelimited" => Some(Self::RateLimited),
            "stall" => Some(Self::Stall),
            "truncate" => Some(Self::Truncate),
            "malformed" => Some(Self::Malformed),
            "abort" => Some(Self::Abort),
            _ => None,
        };
        if let Some(fault) = fault {
            return Ok(fault);
        }
        if let Some(ms) = s.strip_prefix("slow-").and_then(|n| n.parse::<u64>().ok()) {
            return Ok(Self::Slow(Duration::from_millis(ms)));
        }
        if let Some(code) = s.strip_prefix("error-").and_then(parse_status) {
            return Ok(Self::Status(code));
        }
        Err(ParseError::new(format!(
            "unknown fault `{s}` (expected error-<400..599>, overloaded-529, ratelimited, \
             slow-<ms>, stall, truncate, malformed or abort)"
        )))
    }
}

/// An unknown fault or provider name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError(String);

impl ParseError {
    pub(super) fn new(message: String) -> Self {
        Self(message)
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ParseError {}

/// What one call will do: an optional delay before headers, then an optional fault.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Behavior {
    /// Wait before sending headers.
    pub delay: Option<Duration>,
    /// Fail this way instead of answering normally.
    pub fault: Option<Fault>,
}

impl Behavior {
    /// Reads the behaviour from a model name: `slow-<ms>` anywhere adds a delay, and the first
    /// of `stall`, `truncate`, `malformed`, `abort`, `ratelimited`, `overloaded-529`, `error-<code>`
    /// found chooses the fault. `gpt-4o-slow-200-error-503` waits 200 ms, then answers 503.
    pub fn from_model(model: &str) -> Self {
        let delay = number_after(model, "slow-").map(Duration::from_millis);
        let fault = if model.contains("stall") {
            Some(Fault::Stall)
        } else if model.contains("truncate") {
            Some(Fault::Truncate)
        } else if model.contains("malformed") {
            Some(Fault::Malformed)
        } else if model.contains("abort") {
            Some(Fault::Abort)
        } else if model.contains("ratelimited") {
            Some(Fault::RateLimited)
        } else if model.contains("overloaded-529") {
            Some(Fault::Overloaded)
        } else {
            number_after(model, "error-")
                .and_then(|n| u16::try_from(n).ok())
                .filter(|code| (400..=599).contains(code))
                .map(Fault::Status)
        };
        Self { delay, fault }
    }

    /// Applies a provider-wide fault on top: `Slow` replaces the delay, any other fault
    /// replaces the model's fault.
    pub fn with_global(mut self, global: Option<Fault>) -> Self {
        match global {
            Some(Fault::Slow(delay)) => self.delay = Some(delay),
            Some(fault) => self.fault = Some(fault),
            None => {}
        }
        self
    }
}

/// The digits right after `prefix` in `s`, if any.
fn number_after(s: &str, prefix: &str) -> Option<u64> {
    let start = s.find(prefix)? + prefix.len();
    let rest = &s[start..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

fn parse_status(s: &str) -> Option<u16> {
    s.parse::<u16>()
        .ok()
        .filter(|code| (400..=599).contains(code))
}

/// Provider-wide faults set at runtime (handle or admin endpoint).
#[derive(Debug, Default)]
pub(super) struct FaultTable {
    // A plain RwLock: reads are one uncontended atomic on the hot path.
    slots: RwLock<[Option<Fault>; 4]>,
}

impl FaultTable {
    pub(super) fn get(&self, provider: Provider) -> Option<Fault> {
        self.slots.read().unwrap_or_else(PoisonError::into_inner)[provider.index()]
    }

    pub(super) fn set(&self, provider: Provider, fault: Option<Fault>) {
        self.slots.write().unwrap_or_else(PoisonError::into_inner)[provider.index()] = fault;
    }

    pub(super) fn clear_all(&self) {
        *self.slots.write().unwrap_or_else(PoisonError::into_inner) = [None; 4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_choose_behaviour() {
        assert_eq!(Behavior::from_model("gpt-4o"), Behavior::default());
        assert_eq!(
            Behavior::from_model("claude-error-500").fault,
            Some(Fault::Status(500))
        );
        assert_eq!(Behavior::from_model("x-error-999").fault, None);
        assert_eq!(
            Behavior::from_model("overloaded-529").fault,
            Some(Fault::Overloaded)
        );
        let slow = Behavior::from_model("gpt-slow-250-error-503");
        assert_eq!(slow.delay, Some(Duration::from_millis(250)));
        assert_eq!(slow.fault, Some(Fault::Status(503)));
        assert_eq!(Behavior::from_model("m-stall").fault, Some(Fault::Stall));
    }

    #[test]
    fn fault_tokens_round_trip() {
        for fault in [
            Fault::Status(502),
            Fault::Overloaded,
            Fault::RateLimited,
            Fault::Slow(Duration::from_millis(40)),
            Fault::Stall,
            Fault::Truncate,
            Fault::Malformed,
            Fault::Abort,
        ] {
            assert_eq!(fault.to_string().parse::<Fault>(), Ok(fault));
        }
        assert!("error-200".parse::<Fault>().is_err());
        assert!("nope".parse::<Fault>().is_err());
    }

    #[test]
    fn global_fault_overrides_model() {
        let b = Behavior::from_model("slow-10-truncate").with_global(Some(Fault::Status(500)));
        assert_eq!(b.delay, Some(Duration::from_millis(10)));
        assert_eq!(b.fault, Some(Fault::Status(500)));
        let b = Behavior::from_model("error-500").with_global(Some(Fault::Slow(Duration::ZERO)));
        assert_eq!(b.fault, Some(Fault::Status(500)));
        assert_eq!(b.delay, Some(Duration::ZERO));
    }
}
