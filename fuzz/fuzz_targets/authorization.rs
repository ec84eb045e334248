//! `Authorization` parsing never panics, and a key it returns is a valid key found in the
//! header (bare or after a Bearer scheme).
#![no_main]
use libfuzzer_sys::fuzz_target;
use metlo_shared::{parse_authorization, ApiKey};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(key) = parse_authorization(Some(s)) {
        assert!(s.contains(key.expose_secret()));
        assert!(ApiKey::parse(key.expose_secret()).is_ok());
    }
});
