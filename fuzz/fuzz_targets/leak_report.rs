//! A GitHub leak report's parsing never panics: the signature header (base64 of a DER
//! ECDSA signature, checked before any key is fetched), the body (a JSON array of
//! alerts), and the key pattern + checksum run over any text (`keys leaked-check`).
#![no_main]
use libfuzzer_sys::fuzz_target;
use metlo_control_plane::service::github_keys::{parse_signature, SignatureError};
use metlo_control_plane::service::leaks::{parse_report, KEY_PATTERN};
use metlo_shared::{ApiKey, KeyHash};

static PATTERN: std::sync::LazyLock<regex::Regex> =
    std::sync::LazyLock::new(|| regex::Regex::new(KEY_PATTERN).unwrap());

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        match parse_signature(text) {
            // Whatever decodes is a P-256 signature: it re-encodes to DER.
            Ok(signature) => assert!(!signature.to_der().as_bytes().is_empty()),
            Err(e) => assert!(matches!(e, SignatureError::NotBase64 | SignatureError::NotDer)),
        }
        for m in PATTERN.find_iter(text) {
            if let Ok(key) = ApiKey::parse(m.as_str()) {
                assert_eq!(KeyHash::of_text(m.as_str()), key.hash());
            }
        }
    }
    if let Ok(alerts) = parse_report(data) {
        for alert in alerts {
            // Every token has a feedback hash, well-formed key or not.
            assert_eq!(KeyHash::of_text(&alert.token).to_hex().len(), 64);
        }
    }
});
