//! Key parsing never panics; whatever it accepts round-trips and has the documented shape.
#![no_main]
use libfuzzer_sys::fuzz_target;
use metlo_shared::{ApiKey, KeyHash, KEY_LEN};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(key) = ApiKey::parse(s) {
        assert_eq!(key.expose_secret(), s);
        assert_eq!(s.len(), KEY_LEN);
        assert!(s.starts_with("metlo."));
        assert!(key.identifier().len() == 14);
        assert_eq!(KeyHash::from_hex(&key.hash().to_hex()).unwrap(), key.hash());
    }
    let _ = KeyHash::from_hex(s);
});
