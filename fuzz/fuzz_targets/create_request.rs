//! The control plane's create-body decoding never panics, and what it accepts obeys the
//! name rules (1–128 characters, not blank, no control characters, not `.`/`..`).
#![no_main]
use libfuzzer_sys::fuzz_target;
use metlo_control_plane::keys::{parse_create_request, MAX_NAME_CHARS};

fuzz_target!(|data: &[u8]| {
    if let Ok((name, _key_type)) = parse_create_request(data) {
        let chars = name.chars().count();
        assert!((1..=MAX_NAME_CHARS).contains(&chars));
        assert!(!name.trim().is_empty());
        assert!(!name.chars().any(char::is_control));
        assert!(name != "." && name != "..");
    }
});
