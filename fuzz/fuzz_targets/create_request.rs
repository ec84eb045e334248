//! The control plane's request-body decoding never panics, and what it accepts obeys the
//! rules: names (1–128 characters, not blank, no control characters, not `.`/`..`),
//! expiries in the future, roll overlaps within 7 days, usage reports of at most 1,000
//! entries with no time in the future, audit pages of 1–1000 entries.
#![no_main]
use libfuzzer_sys::fuzz_target;
use metlo_control_plane::audit::{parse_audit_query, MAX_PAGE};
use metlo_control_plane::keys::{
    parse_create_request, parse_roll_request, MAX_NAME_CHARS, MAX_OVERLAP_SECONDS,
};
use metlo_control_plane::usage::{parse_usage_report, MAX_REPORT_ENTRIES};

const NOW_MS: i64 = 1_800_000_000_000;

fuzz_target!(|data: &[u8]| {
    if let Ok(new) = parse_create_request(data, NOW_MS) {
        let chars = new.name.chars().count();
        assert!((1..=MAX_NAME_CHARS).contains(&chars));
        assert!(!new.name.trim().is_empty());
        assert!(!new.name.chars().any(char::is_control));
        assert!(new.name != "." && new.name != "..");
        if let Some(at) = new.expires_at_ms {
            assert!(at > NOW_MS && at % 1000 == 0);
        }
    }
    if let Ok(overlap) = parse_roll_request(data) {
        assert!(overlap.as_secs() <= MAX_OVERLAP_SECONDS);
    }
    if let Ok(used) = parse_usage_report(data, NOW_MS) {
        assert!(used.len() <= MAX_REPORT_ENTRIES);
        assert!(used.iter().all(|(_, at)| (0..=NOW_MS).contains(at)));
    }
    if let Ok(query) = std::str::from_utf8(data) {
        if let Ok((limit, before)) = parse_audit_query(Some(query)) {
            assert!((1..=MAX_PAGE).contains(&limit));
            assert!(before.is_none_or(|b| b >= 1));
        }
    }
});
