//! Per-key rate limits: the limit a key carries, the fixed-window count both the edge
//! (one Durable Object per key) and the control plane (`/api/v1/verify`) keep, and the
//! response headers that describe it (IETF `draft-ietf-httpapi-ratelimit-headers`).
//!
//! A fixed window starts at a key's first request after the previous window ended and
//! admits `requests` within `periodSeconds`. Exact within a window; across a window's
//! edge a client can fit up to 2 × `requests` into one period (the known price of fixed
//! windows, paid for one counter per key and an exact `Retry-After`).

use serde::{Deserialize, Serialize};

/// Longest window: a day.
pub const MAX_PERIOD_SECONDS: u32 = 86_400;
/// Most requests per window.
pub const MAX_REQUESTS: u32 = 1_000_000_000;
/// The policy's name in [`RATELIMIT_POLICY_HEADER`] and [`RATELIMIT_HEADER`].
const POLICY_NAME: &str = "key";
/// Header names in lower case (as HTTP/2 sends them, and as `http` needs them).
pub const RATELIMIT_POLICY_HEADER: &str = "ratelimit-policy";
pub const RATELIMIT_HEADER: &str = "ratelimit";

// Deserialized through `RateLimit::new`: no record or request holds one out of range (a
// zero period would never refuse).
/// At most `requests` per `periodSeconds`, counted in a fixed window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[serde(
    rename_all = "camelCase",
    try_from = "RawRateLimit",
    deny_unknown_fields
)]
pub struct RateLimit {
    /// Requests admitted per window: 1 to 1,000,000,000.
    #[cfg_attr(
        feature = "utoipa",
        schema(minimum = 1, maximum = 1_000_000_000, example = 100)
    )]
    pub requests: u32,
    /// The window, in seconds: 1 to 86,400 (a day).
    #[cfg_attr(
        feature = "utoipa",
        schema(minimum = 1, maximum = 86_400, example = 60)
    )]
    pub period_seconds: u32,
}

/// The object as written; a JSON array (which serde's derive would also take for a
/// struct) is refused.
struct RawRateLimit {
    requests: u32,
    period_seconds: u32,
}

impl<'de> Deserialize<'de> for RawRateLimit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = RawRateLimit;

            fn expecting(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
                f.write_str("an object {\"requests\": n, \"periodSeconds\": s}")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RawRateLimit, A::Error> {
                use serde::de::Error;
                let (mut requests, mut period) = (None, None);
                while let Some(field) = map.next_key::<String>()? {
                    let slot = match field.as_str() {
                        "requests" => &mut requests,
                        "periodSeconds" => &mut period,
                        other => {
                            return Err(A::Error::unknown_field(
                                other,
                                &["requests", "periodSeconds"],
                            ))
                        }
                    };
                    if slot.replace(map.next_value::<Whole>()?.0).is_some() {
                        return Err(A::Error::custom(format_args!("duplicate field `{field}`")));
                    }
                }
                Ok(RawRateLimit {
                    requests: requests.ok_or_else(|| A::Error::missing_field("requests"))?,
                    period_seconds: period
                        .ok_or_else(|| A::Error::missing_field("periodSeconds"))?,
                })
            }
        }
        d.deserialize_map(Fields)
    }
}

impl TryFrom<RawRateLimit> for RateLimit {
    type Error = RateLimitError;

    fn try_from(raw: RawRateLimit) -> Result<Self, RateLimitError> {
        RateLimit::new(raw.requests, raw.period_seconds)
    }
}

/// A whole number, also when written as one (`60.0` is an integer to JSON Schema).
struct Whole(u32);

impl<'de> Deserialize<'de> for Whole {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Number;
        impl<'de> serde::de::Visitor<'de> for Number {
            type Value = Whole;

            fn expecting(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
                f.write_str("a whole number from 0 to 4294967295")
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Whole, E> {
                u32::try_from(v)
                    .map(Whole)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Whole, E> {
                u32::try_from(v)
                    .map(Whole)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
            }

            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Whole, E> {
                if v.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(&v) {
                    Ok(Whole(v as u32))
                } else {
                    Err(E::invalid_value(serde::de::Unexpected::Float(v), &self))
                }
            }
        }
        d.deserialize_any(Number)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RateLimitError {
    #[error("rateLimit.requests must be a whole number from 1 to {MAX_REQUESTS}")]
    Requests,
    #[error("rateLimit.periodSeconds must be a whole number from 1 to {MAX_PERIOD_SECONDS}")]
    Period,
}

impl RateLimit {
    /// The limit if both numbers are in range.
    pub fn new(requests: u32, period_seconds: u32) -> Result<Self, RateLimitError> {
        if !(1..=MAX_REQUESTS).contains(&requests) {
            return Err(RateLimitError::Requests);
        }
        if !(1..=MAX_PERIOD_SECONDS).contains(&period_seconds) {
            return Err(RateLimitError::Period);
        }
        Ok(RateLimit {
            requests,
            period_seconds,
        })
    }

    pub fn period_ms(self) -> u64 {
        u64::from(self.period_seconds) * 1000
    }

    /// `RateLimit-Policy`'s value: `"key";q=<requests>;w=<period>`.
    pub fn policy_header(self) -> String {
        format!(
            "\"{POLICY_NAME}\";q={};w={}",
            self.requests, self.period_seconds
        )
    }
}

/// A key's current window: when it started and how many requests it admitted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Window {
    pub start_ms: u64,
    pub count: u32,
}

/// What a limit said about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub allowed: bool,
    /// Requests left in this window after this one.
    pub remaining: u32,
    /// Whole seconds until the window ends (rounded up, at least 1): `Retry-After` when
    /// refused.
    pub reset_seconds: u64,
}

impl Window {
    /// Counts a request at `now_ms` against `limit` (a refused request is not counted).
    pub fn hit(&mut self, limit: RateLimit, now_ms: u64) -> Outcome {
        let end = self.start_ms.saturating_add(limit.period_ms());
        // A clock that went back also starts afresh rather than refusing for ages.
        if now_ms >= end || now_ms < self.start_ms || self.count == 0 {
            *self = Window {
                start_ms: now_ms,
                count: 0,
            };
        }
        let allowed = self.count < limit.requests;
        if allowed {
            self.count += 1;
        }
        Outcome::new(
            limit,
            allowed,
            self.count,
            self.start_ms + limit.period_ms() - now_ms,
        )
    }
}

impl Outcome {
    /// From a counter: `count` requests seen in this window (this one included), the
    /// window ending in `left_ms`.
    pub fn new(limit: RateLimit, allowed: bool, count: u32, left_ms: u64) -> Self {
        Outcome {
            allowed,
            remaining: limit.requests.saturating_sub(count),
            reset_seconds: left_ms.div_ceil(1000).max(1),
        }
    }

    /// From a shared counter that counts every request (refused ones too): allowed while
    /// `count` ≤ the limit.
    pub fn from_count(limit: RateLimit, count: u64, left_ms: u64) -> Self {
        let allowed = count <= u64::from(limit.requests);
        let count = u32::try_from(count).unwrap_or(u32::MAX);
        Outcome::new(limit, allowed, count, left_ms)
    }

    /// `RateLimit-Policy` and `RateLimit` for this outcome of `limit`: what a limited
    /// key's every answer carries, at the edge and on the control plane.
    pub fn headers(&self, limit: RateLimit) -> [(&'static str, String); 2] {
        [
            (RATELIMIT_POLICY_HEADER, limit.policy_header()),
            (RATELIMIT_HEADER, self.header()),
        ]
    }

    /// `RateLimit`'s value: `"key";r=<remaining>;t=<seconds to reset>`.
    pub fn header(&self) -> String {
        format!(
            "\"{POLICY_NAME}\";r={};t={}",
            self.remaining, self.reset_seconds
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(requests: u32, period_seconds: u32) -> RateLimit {
        RateLimit::new(requests, period_seconds).unwrap()
    }

    #[test]
    fn admits_exactly_the_limit_per_window_then_recovers() {
        let l = limit(3, 10);
        let mut w = Window::default();
        let t0 = 1_000_000;
        let seen: Vec<_> = (0..5).map(|i| w.hit(l, t0 + i * 100)).collect();
        assert_eq!(
            seen.iter().map(|o| o.allowed).collect::<Vec<_>>(),
            [true, true, true, false, false]
        );
        assert_eq!(
            seen.iter().map(|o| o.remaining).collect::<Vec<_>>(),
            [2, 1, 0, 0, 0]
        );
        // The window started at t0: 10 s, of which 400 ms have gone at the fifth.
        assert_eq!(seen[4].reset_seconds, 10);
        assert_eq!(w.hit(l, t0 + 9_001).reset_seconds, 1);
        assert!(!w.hit(l, t0 + 9_999).allowed);
        let next = w.hit(l, t0 + 10_000);
        assert!(next.allowed);
        assert_eq!((next.remaining, next.reset_seconds), (2, 10));
    }

    #[test]
    fn a_clock_going_back_starts_a_new_window() {
        let l = limit(1, 60);
        let mut w = Window::default();
        assert!(w.hit(l, 50_000).allowed);
        assert!(!w.hit(l, 50_001).allowed);
        assert!(w.hit(l, 10_000).allowed);
    }

    #[test]
    fn shared_counters_refuse_past_the_limit() {
        let l = limit(2, 60);
        assert!(Outcome::from_count(l, 2, 59_001).allowed);
        let refused = Outcome::from_count(l, 3, 59_001);
        assert!(!refused.allowed);
        assert_eq!((refused.remaining, refused.reset_seconds), (0, 60));
        assert_eq!(Outcome::from_count(l, 1, 0).reset_seconds, 1);
    }

    #[test]
    fn headers_follow_the_draft() {
        let l = limit(100, 60);
        assert_eq!(l.policy_header(), r#""key";q=100;w=60"#);
        let o = Outcome::new(l, true, 40, 30_000);
        assert_eq!(o.header(), r#""key";r=60;t=30"#);
    }

    #[test]
    fn bounds() {
        assert!(RateLimit::new(0, 60).is_err());
        assert!(RateLimit::new(1, 0).is_err());
        assert!(RateLimit::new(MAX_REQUESTS + 1, 60).is_err());
        assert!(RateLimit::new(1, MAX_PERIOD_SECONDS + 1).is_err());
        assert!(RateLimit::new(MAX_REQUESTS, MAX_PERIOD_SECONDS).is_ok());
        let parsed: Result<RateLimit, _> =
            serde_json::from_str(r#"{"requests":5,"periodSeconds":10,"burst":1}"#);
        assert!(parsed.is_err(), "unknown fields are refused");
        for bad in [
            r#"{"requests":0,"periodSeconds":10}"#,
            r#"{"requests":5,"periodSeconds":0}"#,
            r#"{"requests":5}"#,
            r#"[5,10]"#,
            r#"{"requests":5,"requests":6,"periodSeconds":10}"#,
            r#"{"requests":5.5,"periodSeconds":10}"#,
            r#"{"requests":-5,"periodSeconds":10}"#,
            r#"{"requests":"5","periodSeconds":10}"#,
        ] {
            assert!(serde_json::from_str::<RateLimit>(bad).is_err(), "{bad}");
        }
    }
}
