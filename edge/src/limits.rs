//! Per-key rate limits at the edge: one Durable Object per key name counts the key's
//! fixed window ([`metlo_shared::RateLimitWindow`]), so the count is exact across
//! isolates and locations. This module holds what the Worker and the object exchange
//! (the limit in the object's URL, the outcome in its answer), the window as stored, and
//! the responses; the wasm glue only moves them.

use metlo_shared::{RateLimit, RateLimitOutcome, RateLimitWindow};

use crate::decision::PlainResponse;

/// The Durable Object namespace binding (`[[durable_objects.bindings]]`).
pub const LIMITER_BINDING: &str = "KEY_LIMITER";

/// The URL the Worker asks a key's object with: the limit travels in the path, so the
/// object needs no copy of the record (and a changed limit applies at once).
pub fn limiter_url(limit: RateLimit) -> String {
    format!(
        "https://key-limiter/{}/{}",
        limit.requests, limit.period_seconds
    )
}

/// The limit in a [`limiter_url`]; `None` for anything else.
pub fn parse_limiter_url(url: &str) -> Option<RateLimit> {
    let path = url.strip_prefix("https://key-limiter/")?;
    let (requests, period) = path.split_once('/')?;
    RateLimit::new(requests.parse().ok()?, period.parse().ok()?).ok()
}

/// A window as the object stores it: `start_ms:count:requests:period`. The limit it was
/// counted under is kept so a changed limit starts a new window, as on the control plane.
pub fn encode_window(window: RateLimitWindow, limit: RateLimit) -> String {
    format!(
        "{}:{}:{}:{}",
        window.start_ms, window.count, limit.requests, limit.period_seconds
    )
}

/// The stored window if it was counted under `limit`; a fresh one otherwise.
pub fn decode_window(stored: &str, limit: RateLimit) -> RateLimitWindow {
    let mut parts = stored.split(':').map(str::parse::<u64>);
    match (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) {
        (Some(Ok(start_ms)), Some(Ok(count)), Some(Ok(requests)), Some(Ok(period)), None)
            if requests == u64::from(limit.requests)
                && period == u64::from(limit.period_seconds) =>
        {
            RateLimitWindow {
                start_ms,
                count: u32::try_from(count).unwrap_or(u32::MAX),
            }
        }
        _ => RateLimitWindow::default(),
    }
}

/// The object's answer body: `allowed remaining reset_seconds`.
pub fn encode_outcome(outcome: RateLimitOutcome) -> String {
    format!(
        "{} {} {}",
        u8::from(outcome.allowed),
        outcome.remaining,
        outcome.reset_seconds
    )
}

/// The outcome in an object's answer; `None` (the Worker fails closed) if garbled.
pub fn decode_outcome(body: &str) -> Option<RateLimitOutcome> {
    let mut parts = body.split(' ');
    let allowed = match parts.next()? {
        "1" => true,
        "0" => false,
        _ => return None,
    };
    let remaining = parts.next()?.parse().ok()?;
    let reset_seconds = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some(RateLimitOutcome {
        allowed,
        remaining,
        reset_seconds,
    })
}

/// 429 for a key past its limit: the origin is not called. The body is the control
/// plane's for the same case.
pub fn rate_limited_response(limit: RateLimit, outcome: RateLimitOutcome) -> PlainResponse {
    let mut headers = vec![
        ("Content-Type", "application/json".to_owned()),
        ("Retry-After", outcome.reset_seconds.to_string()),
    ];
    headers.extend(outcome.headers(limit));
    PlainResponse {
        status: 429,
        headers,
        body: r#"{"error":"rate_limited","message":"this key's rate limit is spent; retry after Retry-After seconds"}"#,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(requests: u32, period: u32) -> RateLimit {
        RateLimit::new(requests, period).unwrap()
    }

    #[test]
    fn the_limit_travels_in_the_url() {
        let l = limit(100, 60);
        assert_eq!(limiter_url(l), "https://key-limiter/100/60");
        assert_eq!(parse_limiter_url(&limiter_url(l)), Some(l));
        for bad in [
            "https://key-limiter/0/60",
            "https://key-limiter/5/0",
            "https://key-limiter/5",
            "https://key-limiter/5/60/1",
            "https://other/5/60",
            "https://key-limiter/-1/60",
        ] {
            assert_eq!(parse_limiter_url(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_stored_window_counts_only_under_its_own_limit() {
        let l = limit(3, 10);
        let w = RateLimitWindow {
            start_ms: 1_700_000_000_000,
            count: 2,
        };
        assert_eq!(decode_window(&encode_window(w, l), l), w);
        assert_eq!(
            decode_window(&encode_window(w, l), limit(4, 10)),
            RateLimitWindow::default()
        );
        for garbage in ["", "1:2", "a:b:c:d", "1:2:3:10:5x"] {
            assert_eq!(decode_window(garbage, l), RateLimitWindow::default());
        }
    }

    #[test]
    fn outcomes_round_trip_and_garbage_is_refused() {
        let o = RateLimitOutcome {
            allowed: false,
            remaining: 0,
            reset_seconds: 42,
        };
        assert_eq!(encode_outcome(o), "0 0 42");
        assert_eq!(decode_outcome(&encode_outcome(o)), Some(o));
        for bad in ["", "1", "2 0 1", "1 x 1", "1 0 1 9", "1 0 -1"] {
            assert_eq!(decode_outcome(bad), None, "{bad}");
        }
    }

    #[test]
    fn refusal_carries_retry_after_and_the_draft_headers() {
        let l = limit(5, 60);
        let o = RateLimitOutcome {
            allowed: false,
            remaining: 0,
            reset_seconds: 17,
        };
        let r = rate_limited_response(l, o);
        assert_eq!(r.status, 429);
        let get = |name: &str| {
            r.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("retry-after"), Some("17"));
        assert_eq!(get("ratelimit-policy"), Some(r#""key";q=5;w=60"#));
        assert_eq!(get("ratelimit"), Some(r#""key";r=0;t=17"#));
        assert!(r.body.contains("rate_limited"));
    }
}
