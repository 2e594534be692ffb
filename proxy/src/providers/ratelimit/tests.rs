//! Header and time-format parsing.

use super::*;
use http::HeaderValue;

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.insert(*name, HeaderValue::from_str(value).unwrap());
    }
    map
}

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

#[test]
fn go_durations() {
    assert_eq!(parse_go_duration("6m0s"), Some(Duration::from_secs(360)));
    assert_eq!(parse_go_duration("1s"), Some(Duration::from_secs(1)));
    assert_eq!(parse_go_duration("20ms"), Some(Duration::from_millis(20)));
    assert_eq!(
        parse_go_duration("1h2m3.5s"),
        Some(Duration::from_millis(3_723_500))
    );
    assert_eq!(parse_go_duration("soon"), None);
    assert_eq!(parse_go_duration(""), None);
}

#[test]
fn dates() {
    // 784111777 is 1994-11-06T08:49:37Z, the example of RFC 9110.
    assert_eq!(
        parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
        Some(at(784_111_777))
    );
    assert_eq!(parse_rfc3339("1994-11-06T08:49:37Z"), Some(at(784_111_777)));
    assert_eq!(
        parse_rfc3339("1994-11-06T09:49:37+01:00"),
        Some(at(784_111_777))
    );
    assert_eq!(
        parse_rfc3339("1994-11-06T08:49:37.250Z"),
        Some(at(784_111_777) + Duration::from_millis(250))
    );
    assert_eq!(parse_rfc3339("yesterday"), None);
}

/// Found by `make fuzz` (fuzz/regressions/ratelimit_headers): years and offsets beyond what
/// the formats allow overflowed the arithmetic (a panic with overflow checks, a wrong
/// instant without). They are not dates.
#[test]
fn out_of_range_years_and_offsets_are_not_dates() {
    assert_eq!(parse_rfc3339("20888888888824-11-14T22:13:50Z"), None);
    assert_eq!(parse_rfc3339("-9999999999999999-11-14T22:13:50Z"), None);
    assert_eq!(
        parse_http_date("Sun, 06 Nov 99999999999999999 08:49:37 GMT"),
        None
    );
    assert_eq!(
        parse_rfc3339("1994-11-06T08:49:37+9999999999999999:00"),
        None
    );
    assert_eq!(parse_rfc3339("1994-11-06T08:49:37+24:00"), None);
    assert_eq!(parse_rfc3339("1994-11-06T08:49:37-00:60"), None);
    assert_eq!(
        parse_rfc3339("9999-12-31T23:59:59Z"),
        Some(at(253_402_300_799))
    );
    assert_eq!(parse_rfc3339("0000-01-01T00:00:00+00:00"), None); // before 1970
}

#[test]
fn retry_after_forms() {
    let now = at(784_111_700);
    assert_eq!(
        retry_after(&headers(&[("retry-after", "30")]), now),
        Some(Duration::from_secs(30))
    );
    assert_eq!(
        retry_after(
            &headers(&[("retry-after", "Sun, 06 Nov 1994 08:49:37 GMT")]),
            now
        ),
        Some(Duration::from_secs(77))
    );
    assert_eq!(
        retry_after(
            &headers(&[("retry-after-ms", "1500"), ("retry-after", "9")]),
            now
        ),
        Some(Duration::from_millis(1500))
    );
    assert_eq!(
        retry_after(&headers(&[("retry-after", "later")]), now),
        None
    );
}

#[test]
fn openai_rate_limit_headers() {
    let h = headers(&[
        ("x-ratelimit-limit-requests", "60"),
        ("x-ratelimit-remaining-requests", "0"),
        ("x-ratelimit-reset-requests", "6m0s"),
        ("x-ratelimit-remaining-tokens", "149984"),
        ("x-ratelimit-reset-tokens", "6ms"),
    ]);
    let info = openai_headers(&h, at(0));
    assert_eq!(info.requests_remaining, Some(0));
    assert_eq!(info.requests_reset, Some(Duration::from_secs(360)));
    assert_eq!(info.tokens_remaining, Some(149_984));
    assert_eq!(info.tokens_reset, Some(Duration::from_millis(6)));
    assert_eq!(info.wait_hint(), Some(Duration::from_secs(360)));
}

#[test]
fn anthropic_rate_limit_headers() {
    let h = headers(&[
        ("anthropic-ratelimit-requests-limit", "50"),
        ("anthropic-ratelimit-requests-remaining", "49"),
        ("anthropic-ratelimit-requests-reset", "1994-11-06T08:49:37Z"),
        ("anthropic-ratelimit-tokens-remaining", "0"),
        ("anthropic-ratelimit-tokens-reset", "1994-11-06T08:50:00Z"),
        ("retry-after", "12"),
    ]);
    let info = anthropic_headers(&h, at(784_111_777));
    assert_eq!(info.requests_remaining, Some(49));
    assert_eq!(info.requests_reset, Some(Duration::ZERO));
    assert_eq!(info.tokens_remaining, Some(0));
    assert_eq!(info.tokens_reset, Some(Duration::from_secs(23)));
    assert_eq!(info.retry_after, Some(Duration::from_secs(12)));
    assert_eq!(info.wait_hint(), Some(Duration::from_secs(12)));
    assert!(retry_after_only(&HeaderMap::new(), at(0)).is_empty());
}
