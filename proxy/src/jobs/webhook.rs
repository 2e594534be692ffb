//! The webhook a job's caller is told by when the job is over.
//!
//! `POST <url>` with a JSON body `{"type": "job.completed" | "job.failed" | "job.cancelled",
//! "job": <the job as GET /v1/jobs/{id} shows it>}` and three headers:
//!
//! | header | value |
//! |--------|-------|
//! | `floodgate-webhook-id` | the notification's id, `<job id>.<re-drives>` ([`Job::notice_id`]): the same on every try and on a re-send by another replica, so a receiver drops an id it has seen; a re-driven job's next outcome has the next id |
//! | `floodgate-webhook-timestamp` | Unix seconds when this try was signed |
//! | `floodgate-webhook-signature` | `v1=` + lower-case hex of HMAC-SHA256(secret, `<timestamp>.<body>`) |
//!
//! The secret is the tier's `async.webhook.signingSecretRef`. A receiver recomputes the
//! signature over the timestamp header, a `.`, and the raw body, compares in constant time,
//! and refuses a timestamp more than [`REPLAY_WINDOW`] from its own clock (a captured
//! request cannot be replayed later). [`verify`] does exactly this.
//!
//! A try that gets no answer, a 429 or a 5xx is retried with the TierQueue's backoff; any
//! other status ends the delivery. Every try is recorded on the job (`deliveries`).
//!
//! A delivery whose end was recorded (a 2xx, or its tries spent) is never sent again. One
//! that was not is sent again by the replica that takes the job over, with the same id:
//! delivery is at least once, and a receiver must drop an id it has seen. A duplicate comes
//! whenever a try reached the receiver and its end was not recorded: its sender killed or
//! shut down (SIGTERM) with the try in flight, its sender stalled or cut from Redis past its
//! lease (replaced, it learns so only at its next renewal), or a try timed out (10 s) and
//! was retried ([`super`] has the details).

use super::retry::Backoff;
use super::{Delivery, Job, now_ms};
use crate::secret::SecretString;
use ring::hmac;
use std::time::Duration;

/// Header: the notification's id ([`Job::notice_id`]).
pub const ID_HEADER: &str = "floodgate-webhook-id";
/// Header: Unix seconds of signing.
pub const TIMESTAMP_HEADER: &str = "floodgate-webhook-timestamp";
/// Header: `v1=<hex hmac>`.
pub const SIGNATURE_HEADER: &str = "floodgate-webhook-signature";
/// How far a timestamp may be from the receiver's clock.
pub const REPLAY_WINDOW: Duration = Duration::from_secs(300);

/// The signature header's value for `body` signed at `timestamp` (Unix seconds).
pub fn sign(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("v1={}", super::hex(ctx.sign().as_ref()))
}

/// Why a receiver refuses a delivery.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// The signature header is not `v1=<hex>`, or the timestamp not a number.
    #[error("malformed signature or timestamp header")]
    Malformed,
    /// The timestamp is outside the replay window.
    #[error("timestamp outside the replay window")]
    Stale,
    /// The signature does not match.
    #[error("signature does not match")]
    Mismatch,
}

/// What a receiver does: checks `signature` over `timestamp` and `body` with `secret`, with
/// `now` (Unix seconds) within [`REPLAY_WINDOW`] of the timestamp.
pub fn verify(
    secret: &[u8],
    timestamp: &str,
    body: &[u8],
    signature: &str,
    now: u64,
) -> Result<(), Rejected> {
    let ts: u64 = timestamp.trim().parse().map_err(|_| Rejected::Malformed)?;
    if now.abs_diff(ts) > REPLAY_WINDOW.as_secs() {
        return Err(Rejected::Stale);
    }
    let hex = signature.strip_prefix("v1=").ok_or(Rejected::Malformed)?;
    let tag = unhex(hex).ok_or(Rejected::Malformed)?;
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut signed = Vec::with_capacity(body.len() + 24);
    signed.extend_from_slice(ts.to_string().as_bytes());
    signed.push(b'.');
    signed.extend_from_slice(body);
    hmac::verify(&key, &signed, &tag).map_err(|_| Rejected::Mismatch)
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The body POSTed for `job`.
pub fn body(job: &Job) -> Vec<u8> {
    let kind = match job.status {
        super::Status::Completed => "job.completed",
        super::Status::Cancelled => "job.cancelled",
        _ => "job.failed",
    };
    serde_json::to_vec(&serde_json::json!({"type": kind, "job": job})).unwrap_or_default()
}

/// Delivers `job`'s outcome to `url`, signed with `secret` (unsigned without one), retrying
/// on `backoff`; every try, in order.
pub async fn deliver(
    http: &reqwest::Client,
    url: &str,
    secret: Option<&SecretString>,
    backoff: Backoff,
    job: &Job,
) -> Vec<Delivery> {
    let mut tries = Vec::new();
    let payload = body(job);
    let id = job.notice_id();
    for attempt in 1..=backoff.max_attempts {
        let timestamp = now_ms() / 1000;
        let mut request = http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(ID_HEADER, &id)
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .timeout(Duration::from_secs(10))
            .body(payload.clone());
        if let Some(secret) = secret {
            request = request.header(
                SIGNATURE_HEADER,
                sign(secret.expose().as_bytes(), timestamp, &payload),
            );
        }
        let (outcome, retry) = match request.send().await {
            Ok(r) if r.status().is_success() => ("delivered".to_owned(), false),
            Ok(r) => {
                let s = r.status();
                (
                    format!("http_{}", s.as_u16()),
                    s.is_server_error() || s.as_u16() == 429,
                )
            }
            Err(_) => ("error".to_owned(), true),
        };
        let delivered = outcome == "delivered";
        super::metrics::get().webhook(if delivered {
            "delivered"
        } else if retry {
            "retried"
        } else {
            "refused"
        });
        tries.push(Delivery {
            at_ms: now_ms(),
            channel: super::Channel::Webhook,
            outcome,
        });
        if delivered {
            return tries;
        }
        match backoff.after(attempt) {
            Some(delay) if retry => tokio::time::sleep(delay).await,
            _ => break,
        }
    }
    tracing::warn!(job = %job.id, "webhook not delivered");
    tries
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_and_any_change_breaks_it() {
        let secret = b"whsec-test";
        let body = br#"{"type":"job.completed"}"#;
        let sig = sign(secret, 1_700_000_000, body);
        assert!(sig.starts_with("v1=") && sig.len() == 3 + 64);
        assert_eq!(
            verify(secret, "1700000000", body, &sig, 1_700_000_010),
            Ok(())
        );
        assert_eq!(
            verify(secret, "1700000000", b"{}", &sig, 1_700_000_010),
            Err(Rejected::Mismatch)
        );
        assert_eq!(
            verify(secret, "1700000001", body, &sig, 1_700_000_010),
            Err(Rejected::Mismatch)
        );
        assert_eq!(
            verify(b"other", "1700000000", body, &sig, 1_700_000_010),
            Err(Rejected::Mismatch)
        );
        assert_eq!(
            verify(secret, "x", body, &sig, 1_700_000_010),
            Err(Rejected::Malformed)
        );
    }

    #[test]
    fn the_replay_window_ends_exactly_at_five_minutes() {
        let secret = b"k";
        let sig = sign(secret, 1000, b"b");
        assert_eq!(verify(secret, "1000", b"b", &sig, 1300), Ok(()));
        assert_eq!(
            verify(secret, "1000", b"b", &sig, 1301),
            Err(Rejected::Stale)
        );
        assert_eq!(verify(secret, "1000", b"b", &sig, 700), Ok(()));
        assert_eq!(
            verify(secret, "1000", b"b", &sig, 699),
            Err(Rejected::Stale)
        );
    }

    #[test]
    fn matches_an_independent_hmac_sha256() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"Jefe");
        let tag = hmac::sign(&key, b"what do ya want for nothing?");
        assert_eq!(
            super::super::hex(tag.as_ref()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Our scheme is that HMAC over "<ts>.<body>".
        let ours = sign(b"Jefe", 12, b"ab");
        let direct = hmac::sign(&key, b"12.ab");
        assert_eq!(ours, format!("v1={}", super::super::hex(direct.as_ref())));
    }
}
