//! The signed assertion (issue 30): a compact ES256 JWT in `X-Metlo-Assertion` on every
//! proxied request, saying who called — signed through WebCrypto (the glue's few lines of
//! JS), at most once per key per isolate per half of its lifetime. This module decides
//! when a held token still serves; the token's claims are the key's record's fields.
//!
//! Claims: `iss`, `aud`, `sub` (the key's identifier), `iat`, `exp` (≤ 60 s later),
//! `name`, `type`, `role`, `permissions`, `meta` (the key's meta object) and, for a key
//! of an identity, `identity` (its `externalId`); the header
//! names the signing key's `kid`, published in the control plane's JWKS.

use std::collections::HashMap;

use metlo_shared::{KeyHash, KeyRecord};

/// The request header the origin verifies.
pub const ASSERTION_HEADER: &str = "X-Metlo-Assertion";

/// Tokens this isolate signed, per key.
pub struct AssertionCache {
    tokens: HashMap<KeyHash, Held>,
    capacity: usize,
}

struct Held {
    /// What the claims were made of ([`fingerprint`]): a record that changed is signed again.
    fingerprint: u64,
    /// When the token stops being handed out: half its lifetime after it was signed (ms).
    until_ms: u64,
    token: String,
}

impl AssertionCache {
    pub fn new(capacity: usize) -> Self {
        AssertionCache {
            tokens: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// The token held for `hash`, if it was made of the same record and is still in the
    /// first half of its lifetime.
    pub fn get(&self, hash: &KeyHash, record: &KeyRecord, now_ms: u64) -> Option<&str> {
        self.tokens
            .get(hash)
            .filter(|held| held.fingerprint == fingerprint(record) && now_ms < held.until_ms)
            .map(|held| held.token.as_str())
    }

    /// Keeps `token`, signed at `signed_ms` with a lifetime of `ttl_seconds`. When full,
    /// everything goes (tokens are cheap to make again; memory is bounded).
    pub fn put(
        &mut self,
        hash: KeyHash,
        record: &KeyRecord,
        token: String,
        signed_ms: u64,
        ttl_seconds: u64,
    ) {
        if self.tokens.len() >= self.capacity && !self.tokens.contains_key(&hash) {
            self.tokens.clear();
        }
        self.tokens.insert(
            hash,
            Held {
                fingerprint: fingerprint(record),
                until_ms: signed_ms.saturating_add(ttl_seconds.saturating_mul(500)),
                token,
            },
        );
    }
}

/// A 64-bit FNV-1a of every record field a token's claims hold (and the expiry): equal for
/// the same record, different (but for a 2^-64 chance) for a changed one. Only compared
/// among tokens of one key, so never an identity handed to another key.
pub fn fingerprint(record: &KeyRecord) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes.iter().chain(&[0xff]) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(record.name.as_bytes());
    eat(record.identifier.as_bytes());
    eat(record.key_type.as_str().as_bytes());
    eat(record.role.as_str().as_bytes());
    eat(record.meta.as_deref().unwrap_or("").as_bytes());
    eat(record.identity.as_deref().unwrap_or("").as_bytes());
    eat(&record.expires.unwrap_or(0).to_le_bytes());
    for p in &record.permissions {
        eat(p.as_bytes());
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use metlo_shared::ApiKey;

    #[test]
    fn a_token_serves_for_half_its_lifetime_and_only_its_record() {
        let hash = ApiKey::generate().unwrap().hash();
        let record = KeyRecord::sample();
        let mut cache = AssertionCache::new(10);
        assert_eq!(cache.get(&hash, &record, 0), None);
        cache.put(hash, &record, "t1".into(), 1_000, 60);
        assert_eq!(cache.get(&hash, &record, 1_000), Some("t1"));
        assert_eq!(cache.get(&hash, &record, 30_999), Some("t1"));
        assert_eq!(cache.get(&hash, &record, 31_000), None, "half of 60 s");
        for changed in [
            KeyRecord {
                permissions: vec!["a".into()],
                ..KeyRecord::sample()
            },
            KeyRecord {
                name: "m".into(),
                ..KeyRecord::sample()
            },
            KeyRecord {
                meta: Some("e30".into()),
                ..KeyRecord::sample()
            },
            KeyRecord {
                role: metlo_shared::Role::Legacy,
                ..KeyRecord::sample()
            },
            KeyRecord {
                expires: Some(5),
                ..KeyRecord::sample()
            },
        ] {
            assert_eq!(cache.get(&hash, &changed, 1_000), None, "{changed:?}");
        }
        // Another key never gets this one's token.
        let other = ApiKey::generate().unwrap().hash();
        assert_eq!(cache.get(&other, &record, 1_000), None);
    }

    #[test]
    fn the_cache_is_bounded() {
        let record = KeyRecord::sample();
        let mut cache = AssertionCache::new(3);
        let hashes: Vec<KeyHash> = (0..4).map(|_| ApiKey::generate().unwrap().hash()).collect();
        for h in &hashes {
            cache.put(*h, &record, "t".into(), 0, 60);
        }
        assert!(cache.tokens.len() <= 3);
        assert_eq!(cache.get(&hashes[3], &record, 0), Some("t"));
    }

    #[test]
    fn fingerprints_separate_fields() {
        let a = KeyRecord {
            permissions: vec!["ab".into()],
            ..KeyRecord::sample()
        };
        let b = KeyRecord {
            permissions: vec!["a".into(), "b".into()],
            ..KeyRecord::sample()
        };
        assert_ne!(fingerprint(&a), fingerprint(&b));
        assert_eq!(fingerprint(&a), fingerprint(&a.clone()));
    }
}
