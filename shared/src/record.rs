//! What the edge needs to know about a valid key: the record stored in Workers KV under
//! the key's hash, and returned by the control plane's `by-hash` route.

use core::fmt;
use core::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::credits::Grant;
use crate::identity::NamedLimits;
use crate::rate_limit::RateLimit;

/// The newest record version, bumped when the record's meaning changes; readers refuse
/// versions they don't know (fail closed) so an old Worker never misreads a newer record.
/// Version 2 added `rateLimit`: a record is written as 2 only when it carries one (see
/// [`KeyRecord::min_version`]), so Workers from before limits keep reading every other
/// record and refuse — rather than admit unlimited — a limited key. Version 3 added
/// `permissions`, written only when a key has some: a Worker from before permissions
/// refuses such a key rather than admit it past a route policy it cannot check. Version 4
/// added `credits`, likewise: an older Worker refuses a metered key rather than admit it
/// without spending.
pub const RECORD_VERSION: u32 = 4;

/// Metlo's key types (`keyFor` on create, `for` in responses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[serde(rename_all = "UPPERCASE")]
pub enum KeyType {
    Generic,
    Onboarding,
    Gcp,
    Aws,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid key type: expected one of GENERIC, ONBOARDING, GCP, AWS")]
pub struct KeyTypeError;

impl KeyType {
    pub const ALL: [KeyType; 4] = [
        KeyType::Generic,
        KeyType::Onboarding,
        KeyType::Gcp,
        KeyType::Aws,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::Generic => "GENERIC",
            KeyType::Onboarding => "ONBOARDING",
            KeyType::Gcp => "GCP",
            KeyType::Aws => "AWS",
        }
    }
}

impl FromStr for KeyType {
    type Err = KeyTypeError;

    /// Exact, upper-case names, as Metlo's API takes them.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KeyType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or(KeyTypeError)
    }
}

impl TryFrom<String> for KeyType {
    type Error = KeyTypeError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a key may do. Every key has exactly one role, set when it is made and never
/// changed by a roll; each control-plane route says which roles may call it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// API traffic: accepted at the edge and on `GET /api/v1/verify`, nothing else.
    #[default]
    Client,
    /// The edge Worker's own credential: looks keys up by hash and reports their use.
    /// Never accepted at the edge for traffic.
    Edge,
    /// Manages keys and reads the audit log. Never accepted at the edge for traffic.
    Admin,
    /// A key made before roles existed: keeps every power it had (client, edge and
    /// admin) until an operator gives it one role (`keys set-role`).
    Legacy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid role: expected one of client, edge, admin")]
pub struct RoleError;

impl Role {
    pub const ALL: [Role; 4] = [Role::Client, Role::Edge, Role::Admin, Role::Legacy];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Edge => "edge",
            Role::Admin => "admin",
            Role::Legacy => "legacy",
        }
    }

    /// May this key's traffic pass the edge? (Only these keys' records ever reach KV.)
    pub fn serves_traffic(self) -> bool {
        matches!(self, Role::Client | Role::Legacy)
    }

    /// May this key manage keys?
    pub fn administers(self) -> bool {
        matches!(self, Role::Admin | Role::Legacy)
    }
}

impl FromStr for Role {
    type Err = RoleError;

    /// Exact, lower-case names.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or(RoleError)
    }
}

impl TryFrom<String> for Role {
    type Error = RoleError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The KV record for a key, keyed by its SHA-256 hex. Field names follow Metlo's JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct KeyRecord {
    /// Record format version: [`RECORD_VERSION`] (1) when written by this version.
    pub v: u32,
    pub name: String,
    #[serde(rename = "for")]
    pub key_type: KeyType,
    pub identifier: String,
    /// ISO 8601 creation time, as in Metlo's responses.
    pub created: String,
    /// Unix time in seconds after which the key is no longer valid; absent: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<u64>,
    /// The key's role; absent (records written before roles): `client`. The edge admits
    /// only keys whose role serves traffic.
    #[serde(default)]
    pub role: Role,
    /// The key's `meta` JSON object, as the edge forwards it to the origin in
    /// [`META_HEADER`]: base64url without padding of its compact JSON (header values
    /// must be visible ASCII; JSON may hold any Unicode and quotes). Encoded once, by
    /// the control plane, so the Worker only copies it. Absent: no metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<String>,
    /// The key's rate limit; absent: none. Only in version-2 records and later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// The key's permissions, sorted, no duplicates ([`crate::permissions`]); absent:
    /// none. Only in version-3 records.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub permissions: Vec<String>,
    /// The key's credits as granted ([`crate::credits`]); absent: unmetered. Only in
    /// version-4 records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "utoipa", schema(value_type = Option<String>, example = "1/1000/0/0/0/0"))]
    pub credits: Option<Grant>,
    /// The `externalId` of the identity the key belongs to ([`crate::identity`]); absent:
    /// none. Only in version-4 records, with the identity's credits and named limits,
    /// which all its keys share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "utoipa", schema(value_type = Option<String>))]
    pub identity_credits: Option<Grant>,
    #[serde(default, skip_serializing_if = "NamedLimits::is_empty")]
    #[cfg_attr(feature = "utoipa", schema(value_type = Option<String>, example = "requests=100/60"))]
    pub identity_limits: NamedLimits,
}

/// The request header that carries a key's `meta` to the origin.
pub const META_HEADER: &str = "X-Metlo-Key-Meta";

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("key record is not valid JSON for this version: {0}")]
    Invalid(#[from] serde_json::Error),
    #[error("key record version {0} is not supported")]
    UnsupportedVersion(u32),
}

impl KeyRecord {
    /// The version a record must be written as: the oldest that has all it says.
    pub fn min_version(&self) -> u32 {
        if self.credits.is_some() || self.identity.is_some() {
            4
        } else if !self.permissions.is_empty() {
            3
        } else if self.rate_limit.is_some() {
            2
        } else {
            1
        }
    }

    /// Decodes a record, refusing unknown versions (and a limit in a version-1 record, or
    /// permissions below version 3, which an older Worker would have ignored).
    pub fn from_json(bytes: &[u8]) -> Result<Self, RecordError> {
        let record: KeyRecord = serde_json::from_slice(bytes)?;
        if !(record.min_version()..=RECORD_VERSION).contains(&record.v) {
            return Err(RecordError::UnsupportedVersion(record.v));
        }
        Ok(record)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a KeyRecord always serializes")
    }

    /// What a KV entry's metadata carries (`{"d": …}`) so that a reconcile can tell a
    /// current record from a stale one by listing keys, without reading every value.
    pub fn digest(json: &str) -> String {
        use sha2::{Digest, Sha256};
        hex::encode(&Sha256::digest(json.as_bytes())[..8])
    }

    /// True once `now_unix_seconds` has reached the expiry.
    pub fn is_expired(&self, now_unix_seconds: u64) -> bool {
        self.expires.is_some_and(|e| now_unix_seconds >= e)
    }
}

#[cfg(any(test, feature = "test-util"))]
impl KeyRecord {
    /// A well-formed record, for tests (change fields with struct update syntax).
    pub fn sample() -> Self {
        KeyRecord {
            v: 1,
            name: "n".into(),
            key_type: KeyType::Generic,
            identifier: "metlo.abcdefgh".into(),
            created: "2026-01-01T00:00:00.000Z".into(),
            expires: None,
            role: Role::Client,
            meta: None,
            rate_limit: None,
            permissions: Vec::new(),
            credits: None,
            identity: None,
            identity_credits: None,
            identity_limits: NamedLimits::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn digest_tells_records_apart() {
        let a = KeyRecord::sample().to_json();
        let b = KeyRecord {
            name: "m".into(),
            ..KeyRecord::sample()
        }
        .to_json();
        assert_eq!(KeyRecord::digest(&a), KeyRecord::digest(&a));
        assert_ne!(KeyRecord::digest(&a), KeyRecord::digest(&b));
        assert_eq!(KeyRecord::digest(&a).len(), 16);
    }

    use super::*;
    use proptest::prelude::*;

    fn sample() -> KeyRecord {
        KeyRecord {
            v: 1,
            name: "ingest/prod ✓".into(),
            key_type: KeyType::Onboarding,
            identifier: "metlo.AbCd1234".into(),
            created: "2026-11-27T16:03:49.123Z".into(),
            expires: Some(1_900_000_000),
            role: Role::Client,
            meta: None,
            rate_limit: None,
            permissions: Vec::new(),
            credits: None,
            identity: None,
            identity_credits: None,
            identity_limits: NamedLimits::default(),
        }
    }

    #[test]
    fn roles_round_trip_and_default_to_client() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>().unwrap(), role);
            let record = KeyRecord { role, ..sample() };
            assert!(record.to_json().contains(&format!(r#""role":"{role}""#)));
            assert_eq!(
                KeyRecord::from_json(record.to_json().as_bytes()).unwrap(),
                record
            );
        }
        assert!("Admin".parse::<Role>().is_err());
        // A record written before roles existed reads as a client key.
        let old = sample().to_json().replace(r#","role":"client""#, "");
        assert!(!old.contains("role"));
        assert_eq!(
            KeyRecord::from_json(old.as_bytes()).unwrap().role,
            Role::Client
        );
        let unknown = sample()
            .to_json()
            .replace(r#""role":"client""#, r#""role":"root""#);
        assert!(
            KeyRecord::from_json(unknown.as_bytes()).is_err(),
            "fail closed"
        );
        assert!(Role::Client.serves_traffic() && Role::Legacy.serves_traffic());
        assert!(!Role::Admin.serves_traffic() && !Role::Edge.serves_traffic());
    }

    #[test]
    fn round_trips_with_metlo_field_names() {
        let json = sample().to_json();
        assert!(json.contains(r#""for":"ONBOARDING""#), "{json}");
        assert!(json.contains(r#""v":1"#), "{json}");
        assert_eq!(KeyRecord::from_json(json.as_bytes()).unwrap(), sample());
    }

    #[test]
    fn rate_limited_records_are_version_2_and_only_those() {
        let limited = KeyRecord {
            v: 2,
            rate_limit: Some(RateLimit::new(10, 60).unwrap()),
            ..sample()
        };
        let json = limited.to_json();
        assert!(
            json.contains(r#""rateLimit":{"requests":10,"periodSeconds":60}"#),
            "{json}"
        );
        assert_eq!(KeyRecord::from_json(json.as_bytes()).unwrap(), limited);
        // A limit in a version-1 record: a reader from before limits would drop it.
        let as_v1 = json.replace(r#""v":2"#, r#""v":1"#);
        assert!(KeyRecord::from_json(as_v1.as_bytes()).is_err());
        // Version 2 without a limit is fine (the newest version reads everything older).
        let plain = sample().to_json().replace(r#""v":1"#, r#""v":2"#);
        assert!(KeyRecord::from_json(plain.as_bytes()).is_ok());
    }

    #[test]
    fn records_with_permissions_are_version_3_and_only_those() {
        let scoped = KeyRecord {
            v: 3,
            permissions: vec!["orders:read".into(), "orders:write".into()],
            ..sample()
        };
        let json = scoped.to_json();
        assert!(
            json.contains(r#""permissions":["orders:read","orders:write"]"#),
            "{json}"
        );
        assert_eq!(KeyRecord::from_json(json.as_bytes()).unwrap(), scoped);
        // An older Worker would admit the key past any route policy: never below 3.
        for older in [r#""v":1"#, r#""v":2"#] {
            let json = json.replace(r#""v":3"#, older);
            assert!(KeyRecord::from_json(json.as_bytes()).is_err(), "{older}");
        }
        assert!(!sample().to_json().contains("permissions"));
        assert_eq!(scoped.min_version(), 3);
        assert_eq!(sample().min_version(), 1);
    }

    #[test]
    fn records_with_credits_are_version_4_and_only_those() {
        let metered = KeyRecord {
            v: 4,
            credits: Some(Grant {
                set: 2,
                to: 1000,
                added: 50,
                refill: None,
            }),
            ..sample()
        };
        let json = metered.to_json();
        assert!(json.contains(r#""credits":"2/1000/50/0/0/0""#), "{json}");
        assert_eq!(KeyRecord::from_json(json.as_bytes()).unwrap(), metered);
        // An older Worker would admit the key without spending: never below 4.
        let json3 = json.replace(r#""v":4"#, r#""v":3"#);
        assert!(KeyRecord::from_json(json3.as_bytes()).is_err());
        assert_eq!(metered.min_version(), 4);
        let owned = KeyRecord {
            v: 4,
            identity: Some("acme".into()),
            identity_limits: NamedLimits::decode("rps=5/1").unwrap(),
            ..sample()
        };
        let json = owned.to_json();
        assert!(
            json.contains(r#""identity":"acme","identityLimits":"rps=5/1""#),
            "{json}"
        );
        assert_eq!(KeyRecord::from_json(json.as_bytes()).unwrap(), owned);
        let json3 = json.replace(r#""v":4"#, r#""v":3"#);
        assert!(
            KeyRecord::from_json(json3.as_bytes()).is_err(),
            "an older Worker would ignore the identity"
        );
    }

    #[test]
    fn refuses_other_versions_and_garbage() {
        let json = sample().to_json().replace(r#""v":1"#, r#""v":5"#);
        assert!(matches!(
            KeyRecord::from_json(json.as_bytes()),
            Err(RecordError::UnsupportedVersion(5))
        ));
        assert!(KeyRecord::from_json(b"{}").is_err());
        assert!(KeyRecord::from_json(b"").is_err());
        let bad_type = sample().to_json().replace("ONBOARDING", "onboarding");
        assert!(KeyRecord::from_json(bad_type.as_bytes()).is_err());
    }

    #[test]
    fn expiry() {
        let mut r = sample();
        assert!(!r.is_expired(1_899_999_999));
        assert!(r.is_expired(1_900_000_000));
        r.expires = None;
        assert!(!r.is_expired(u64::MAX));
    }

    #[test]
    fn key_types_parse_exactly() {
        for t in KeyType::ALL {
            assert_eq!(t.as_str().parse::<KeyType>().unwrap(), t);
        }
        assert!("generic".parse::<KeyType>().is_err());
        assert!("".parse::<KeyType>().is_err());
    }

    proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = KeyRecord::from_json(&bytes);
        }
    }
}
