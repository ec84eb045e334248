//! Time, in the two units the service stores: integer milliseconds since the epoch
//! (database columns) and whole Unix seconds (record expiries). One place, so every
//! layer agrees on "now" and on rounding.
//!
//! In the crate's own tests the clock can be moved ([`advance`]): the offset is the
//! calling thread's, and in-process tests run the app on a current-thread runtime, so
//! the handlers and the tasks they drive see the moved clock and other tests do not.

use std::time::{SystemTime, UNIX_EPOCH};

use chrono::{SecondsFormat, TimeZone, Utc};

/// Milliseconds since the Unix epoch, now. (`SystemTime` rather than `Utc::now`: no
/// calendar date is built on the verification path.)
pub fn now_ms() -> i64 {
    let system = match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(since) => since.as_millis() as i64,
        Err(before) => -(before.duration().as_millis() as i64),
    };
    system + offset_ms()
}

#[cfg(not(test))]
#[inline(always)]
fn offset_ms() -> i64 {
    0
}

#[cfg(test)]
thread_local! {
    static OFFSET_MS: std::cell::Cell<i64> = const { std::cell::Cell::new(0) };
}

#[cfg(test)]
fn offset_ms() -> i64 {
    OFFSET_MS.with(|o| o.get())
}

/// Moves this thread's clock forward (tests only; see the module's doc).
#[cfg(test)]
pub fn advance(by: std::time::Duration) {
    OFFSET_MS.with(|o| o.set(o.get() + by.as_millis() as i64));
}

/// A monotonic "now" for intervals (rate buckets), moved with [`advance`] in tests.
pub fn instant() -> std::time::Instant {
    std::time::Instant::now() + std::time::Duration::from_millis(offset_ms().max(0) as u64)
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

    #[test]
    fn a_test_moves_its_own_clock() {
        let before = now_ms();
        advance(std::time::Duration::from_secs(3600));
        assert!(now_ms() - before >= 3_600_000);
        let other = std::thread::spawn(now_ms).join().unwrap();
        assert!(
            other < before + 3_600_000,
            "another thread's clock moved too"
        );
    }
}
