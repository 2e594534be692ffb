//! Rate-limit and retry hints in response headers, and the time formats they use:
//! `retry-after` (seconds or an HTTP date), OpenAI's Go-style durations (`6m0s`, `20ms`),
//! Anthropic's RFC 3339 reset instants.
//!
//! Functions that turn an instant into a wait take `now`, so tests need no clock.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderMap;

/// What a response said about the key's remaining budget.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimitInfo {
    /// Requests left in the current window.
    pub requests_remaining: Option<u64>,
    /// Until the request budget is full again.
    pub requests_reset: Option<Duration>,
    /// Tokens left in the current window.
    pub tokens_remaining: Option<u64>,
    /// Until the token budget is full again.
    pub tokens_reset: Option<Duration>,
    /// `retry-after`, when present.
    pub retry_after: Option<Duration>,
}

impl RateLimitInfo {
    /// Whether the response carried no hint at all.
    pub fn is_empty(&self) -> bool {
        *self == RateLimitInfo::default()
    }

    /// The wait until the exhausted budget refills: `retry-after`, else the reset of
    /// whichever budget is at zero.
    pub fn wait_hint(&self) -> Option<Duration> {
        if self.retry_after.is_some() {
            return self.retry_after;
        }
        let requests = self
            .requests_reset
            .filter(|_| self.requests_remaining == Some(0));
        let tokens = self
            .tokens_reset
            .filter(|_| self.tokens_remaining == Some(0));
        requests.max(tokens)
    }
}

/// OpenAI's `x-ratelimit-*` headers (also sent by many OpenAI-compatible servers).
pub(crate) fn openai_headers(headers: &HeaderMap, now: SystemTime) -> RateLimitInfo {
    RateLimitInfo {
        requests_remaining: number(headers, "x-ratelimit-remaining-requests"),
        requests_reset: header(headers, "x-ratelimit-reset-requests").and_then(parse_go_duration),
        tokens_remaining: number(headers, "x-ratelimit-remaining-tokens"),
        tokens_reset: header(headers, "x-ratelimit-reset-tokens").and_then(parse_go_duration),
        retry_after: retry_after(headers, now),
    }
}

/// Anthropic's `anthropic-ratelimit-*` headers.
pub(crate) fn anthropic_headers(headers: &HeaderMap, now: SystemTime) -> RateLimitInfo {
    let reset = |name| header(headers, name).and_then(|v| until(parse_rfc3339(v)?, now));
    RateLimitInfo {
        requests_remaining: number(headers, "anthropic-ratelimit-requests-remaining"),
        requests_reset: reset("anthropic-ratelimit-requests-reset"),
        tokens_remaining: number(headers, "anthropic-ratelimit-tokens-remaining"),
        tokens_reset: reset("anthropic-ratelimit-tokens-reset"),
        retry_after: retry_after(headers, now),
    }
}

/// Only `retry-after` (Gemini and Ollama send no budget headers).
pub(crate) fn retry_after_only(headers: &HeaderMap, now: SystemTime) -> RateLimitInfo {
    RateLimitInfo {
        retry_after: retry_after(headers, now),
        ..RateLimitInfo::default()
    }
}

/// `retry-after-ms` (Azure OpenAI) or `retry-after` as seconds or an HTTP date.
pub(crate) fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    if let Some(ms) = header(headers, "retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        return Duration::try_from_secs_f64(ms / 1000.0).ok();
    }
    let value = header(headers, "retry-after")?;
    if let Ok(secs) = value.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).ok();
    }
    until(parse_http_date(value)?, now)
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name)?.to_str().ok().map(str::trim)
}

fn number(headers: &HeaderMap, name: &str) -> Option<u64> {
    header(headers, name)?.parse().ok()
}

/// The wait from `now` until `instant` (zero when it has passed).
fn until(instant: SystemTime, now: SystemTime) -> Option<Duration> {
    Some(instant.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Parses Go `time.Duration` text as OpenAI sends it: `6m0s`, `1s`, `20ms`, `1h2m3.5s`.
pub(crate) fn parse_go_duration(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = 0.0_f64;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += value * scale;
    }
    Duration::try_from_secs_f64(total).ok()
}

/// Parses an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the only form RFC 9110
/// requires senders to use.
pub(crate) fn parse_http_date(text: &str) -> Option<SystemTime> {
    let mut it = text.split_ascii_whitespace();
    let _weekday = it.next()?;
    let day: u32 = it.next()?.parse().ok()?;
    let month = month_number(it.next()?)?;
    let year: i64 = it.next()?.parse().ok()?;
    let (h, m, s) = parse_hms(it.next()?)?;
    if it.next()? != "GMT" {
        return None;
    }
    instant(year, month, day, h, m, s, 0.0, 0)
}

/// Parses an RFC 3339 timestamp: `2024-05-01T12:00:30Z`, with optional fraction and offset.
pub(crate) fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let text = text.trim();
    let (date, time) = text.split_once(['T', 't', ' '])?;
    let mut ymd = date.splitn(3, '-');
    let year: i64 = ymd.next()?.parse().ok()?;
    let month: u32 = ymd.next()?.parse().ok()?;
    let day: u32 = ymd.next()?.parse().ok()?;
    let (clock, offset_secs) = if let Some(clock) = time.strip_suffix(['Z', 'z']) {
        (clock, 0)
    } else {
        let split = time.rfind(['+', '-'])?;
        let (clock, offset) = time.split_at(split);
        let sign = if offset.starts_with('-') { -1 } else { 1 };
        let (oh, om) = offset[1..].split_once(':')?;
        let (oh, om) = (oh.parse::<i64>().ok()?, om.parse::<i64>().ok()?);
        // RFC 3339 offsets are `hh:mm`; anything larger is not one (and would overflow).
        if !(0..24).contains(&oh) || !(0..60).contains(&om) {
            return None;
        }
        (clock, sign * (oh * 3600 + om * 60))
    };
    let (whole, fraction) = match clock.split_once('.') {
        Some((whole, digits)) => (whole, format!("0.{digits}").parse::<f64>().ok()?),
        None => (clock, 0.0),
    };
    let (h, m, s) = parse_hms(whole)?;
    instant(year, month, day, h, m, s, fraction, offset_secs)
}

fn parse_hms(text: &str) -> Option<(u32, u32, u32)> {
    let mut it = text.splitn(3, ':');
    let h = it.next()?.parse().ok()?;
    let m = it.next()?.parse().ok()?;
    let s = it.next()?.parse().ok()?;
    (h < 24 && m < 60 && s <= 60).then_some((h, m, s))
}

fn month_number(name: &str) -> Option<u32> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let index = MONTHS.iter().position(|m| *m == name)?;
    u32::try_from(index + 1).ok()
}

/// The instant of a UTC civil date and time, shifted by `offset_secs` east of UTC.
#[expect(clippy::too_many_arguments, reason = "the fields of a civil timestamp")]
fn instant(
    year: i64,
    month: u32,
    day: u32,
    h: u32,
    m: u32,
    s: u32,
    fraction: f64,
    offset_secs: i64,
) -> Option<SystemTime> {
    // Both formats write the year in four digits; a larger one is not a date (and would
    // overflow the day count).
    if !(0..=9999).contains(&year) || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + i64::from(h) * 3600 + i64::from(m) * 60 + i64::from(s) - offset_secs;
    let secs = u64::try_from(secs).ok()?;
    let frac = Duration::try_from_secs_f64(fraction).ok()?;
    UNIX_EPOCH.checked_add(Duration::from_secs(secs) + frac)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(month) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests;
