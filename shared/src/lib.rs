//! The Metlo API-key format, in one place for the control plane and the edge Worker.
//!
//! A key is `metlo.` followed by a fixed-length base62 body: [`RANDOM_LEN`] characters
//! from a CSPRNG and a [`CHECKSUM_LEN`]-character base62 CRC32 of them (the scheme
//! GitHub uses for its tokens). The checksum lets anyone refuse a mistyped or made-up
//! key without a lookup; the fixed length and prefix let secret scanners find leaked
//! keys with [`SCANNER_REGEX`].
//!
//! Only the SHA-256 of a key is ever stored ([`KeyHash`]). Keys carry ≥ 192 random bits,
//! so a fast hash is the right choice; slow password hashes protect low-entropy secrets.
//!
//! No I/O and no async: this crate compiles natively and for `wasm32-unknown-unknown`.

mod authorization;
mod base62;
pub mod credits;
pub mod identity;
mod key;
pub mod permissions;
pub mod policy;
mod rate_limit;
mod record;
pub mod whole;

pub use authorization::{parse_authorization, AuthorizationError};
pub use key::{
    ApiKey, ApiKeyRef, KeyHash, KeyHashError, ParseKeyError, CHECKSUM_LEN, KEY_LEN, PREFIX,
    RANDOM_LEN,
};
pub use rate_limit::{
    Outcome as RateLimitOutcome, RateLimit, RateLimitError, Window as RateLimitWindow,
    MAX_PERIOD_SECONDS, MAX_REQUESTS, RATELIMIT_HEADER, RATELIMIT_POLICY_HEADER,
};
pub use record::{
    KeyRecord, KeyType, KeyTypeError, RecordError, Role, RoleError, META_HEADER, RECORD_VERSION,
};

/// A regular expression that matches a Metlo API key anywhere in text, for secret
/// scanners (GitHub secret scanning custom patterns, gitleaks, trufflehog). It matches
/// the shape; confirm a hit by parsing it with [`ApiKey::parse`], which checks the CRC32.
pub const SCANNER_REGEX: &str = r"\bmetlo\.[0-9A-Za-z]{42}\b";
