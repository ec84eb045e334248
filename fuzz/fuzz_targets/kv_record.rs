//! The KV record decoder (what the edge reads from KV) never panics, accepts only the
//! current version, and what it accepts re-encodes to an equal record.
#![no_main]
use libfuzzer_sys::fuzz_target;
use metlo_shared::{KeyRecord, RECORD_VERSION};

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = KeyRecord::from_json(data) {
        assert!((record.min_version()..=RECORD_VERSION).contains(&record.v));
        let again = KeyRecord::from_json(record.to_json().as_bytes()).unwrap();
        assert_eq!(again, record);
    }
});
