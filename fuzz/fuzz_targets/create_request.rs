//! The control plane's request-body decoding never panics, and what it accepts obeys the
//! rules: names (1–128 characters, not blank, no control characters, not `.`/`..`),
//! expiries in the future, `meta` a JSON object of at most 1 KB, roll overlaps within 7
//! days, rate limits within their bounds (1–10⁹ requests per 1–86,400 s), updates that
//! change something, usage reports of at most 1,000 entries with no
//! time in the future, audit pages of 1–1000 entries.
#![no_main]
use libfuzzer_sys::fuzz_target;
use metlo_control_plane::http::audit::parse_audit_query;
use metlo_control_plane::http::decode_json;
use metlo_control_plane::service::audit::MAX_PAGE;
use metlo_control_plane::service::key_updates::UpdateKeyRequest;
use metlo_control_plane::service::meta::MAX_META_BYTES;
use metlo_control_plane::service::keys::{
    CreateKeyRequest, RollKeyRequest, MAX_NAME_CHARS, MAX_OVERLAP_SECONDS,
};
use metlo_control_plane::service::usage::{UsageReport, MAX_REPORTED_COUNT, MAX_REPORT_ENTRIES};

const NOW_MS: i64 = 1_800_000_000_000;

// Each body is decoded as the route's extractor does, then validated by the service.
fuzz_target!(|data: &[u8]| {
    let create = decode_json::<Option<CreateKeyRequest>>(data)
        .ok()
        .and_then(|r| r.unwrap_or_default().validate(NOW_MS).ok());
    if let Some(new) = create {
        let chars = new.name.chars().count();
        assert!((1..=MAX_NAME_CHARS).contains(&chars));
        assert!(!new.name.trim().is_empty());
        assert!(!new.name.chars().any(char::is_control));
        assert!(new.name != "." && new.name != "..");
        if let Some(at) = new.expires_at_ms {
            assert!(at > NOW_MS && at % 1000 == 0);
        }
        assert_meta(new.meta.as_deref());
        assert_rate_limit(new.rate_limit);
    }
    let update = decode_json::<UpdateKeyRequest>(data)
        .ok()
        .and_then(|r| r.validate(NOW_MS).ok());
    if let Some(changes) = update {
        assert!(!changes.is_empty());
        if let Some(Some(at)) = changes.expires_at_ms {
            assert!(at > NOW_MS && at % 1000 == 0);
        }
        if let Some(meta) = &changes.meta {
            assert_meta(meta.as_deref());
        }
        if let Some(limit) = changes.rate_limit {
            assert_rate_limit(limit);
        }
    }
    let roll = decode_json::<Option<RollKeyRequest>>(data)
        .ok()
        .and_then(|r| r.unwrap_or_default().overlap().ok());
    if let Some(overlap) = roll {
        assert!(overlap.as_secs() <= MAX_OVERLAP_SECONDS);
    }
    let usage = decode_json::<UsageReport>(data)
        .ok()
        .and_then(|r| r.validate(NOW_MS).ok());
    if let Some(used) = usage {
        assert!(used.len() <= MAX_REPORT_ENTRIES);
        assert!(used.iter().all(|(_, at, _)| (0..=NOW_MS).contains(at)));
        assert!(used.iter().all(|(_, _, n)| *n <= MAX_REPORTED_COUNT));
    }
    if let Ok(query) = std::str::from_utf8(data) {
        if let Ok((limit, before, filter)) = parse_audit_query(Some(query)) {
            assert!((1..=MAX_PAGE).contains(&limit));
            assert!(before.is_none_or(|b| b >= 1));
            let blank = |v: &Option<String>| v.as_ref().is_some_and(|v| v.trim().is_empty());
            assert!(!blank(&filter.action) && !blank(&filter.actor));
        }
    }
});

/// A rate limit within its bounds, and one that round-trips through its JSON.
fn assert_rate_limit(limit: Option<metlo_shared::RateLimit>) {
    if let Some(l) = limit {
        assert!((1..=metlo_shared::MAX_REQUESTS).contains(&l.requests));
        assert!((1..=metlo_shared::MAX_PERIOD_SECONDS).contains(&l.period_seconds));
        let again: metlo_shared::RateLimit =
            serde_json::from_str(&serde_json::to_string(&l).unwrap()).unwrap();
        assert_eq!(again, l);
    }
}

/// Stored meta: a JSON object, compact, at most 1 KB.
fn assert_meta(meta: Option<&str>) {
    if let Some(m) = meta {
        assert!(m.len() <= MAX_META_BYTES);
        let v: serde_json::Value = serde_json::from_str(m).unwrap();
        assert!(v.is_object());
        assert_eq!(v.to_string(), m);
    }
}
