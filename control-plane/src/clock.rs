//! Time, in the two units the service stores: integer milliseconds since the epoch
//! (database columns) and whole Unix seconds (record expiries). One place, so every
//! layer agrees on "now" and on rounding.

use std::time::{SystemTime, UNIX_EPOCH};

use chrono::{SecondsFormat, TimeZone, Utc};

/// Milliseconds since the Unix epoch, now. (`SystemTime` rather than `Utc::now`: no
/// calendar date is built on the verification path.)
pub fn now_ms() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(since) => since.as_millis() as i64,
        Err(before) => -(before.duration().as_millis() as i64),
    }
}

/// Whole seconds since the Unix epoch, now.
pub fn now_unix_seconds() -> u64 {
    unix_seconds(now_ms())
}

/// Whole seconds since the epoch (expiries are whole seconds; never before the epoch).
pub fn unix_seconds(ms: i64) -> u64 {
    ms.div_euclid(1000).max(0) as u64
}

/// `ms` rounded up to a whole second (record expiries are whole seconds, so the edge and
/// the control plane agree to the millisecond on when a secret stops working).
pub fn ceil_to_second(ms: i64) -> i64 {
    ms.div_euclid(1000) * 1000 + if ms.rem_euclid(1000) == 0 { 0 } else { 1000 }
}

/// ISO 8601 with milliseconds, UTC, as in Metlo's responses.
pub fn iso8601(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding() {
        assert_eq!(ceil_to_second(1_000), 1_000);
        assert_eq!(ceil_to_second(1_001), 2_000);
        assert_eq!(ceil_to_second(-1), 0);
        assert_eq!(unix_seconds(1_999), 1);
        assert_eq!(unix_seconds(-5), 0);
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
    }
}
