//! GitHub's secret-scanning signatures: the public keys GitHub signs its reports with
//! (fetched from `GITHUB_KEYS_URL`, cached), and the check of a report's signature — an
//! ECDSA P-256 / SHA-256 signature over the raw body bytes, DER, base64 in
//! `Github-Public-Key-Signature`, by the key named in `Github-Public-Key-Identifier`.
//! Verified with RustCrypto's `p256`, as crates.io does, over a digest the route computes
//! while it reads the body (so the headers and the key are checked before any body byte).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::DecodePublicKey;
use serde::Deserialize;

/// GitHub's keys endpoint.
pub const GITHUB_KEYS_URL: &str = "https://api.github.com/meta/public_keys/secret_scanning";
/// How long fetched keys are used before they are fetched again.
const KEYS_TTL: Duration = Duration::from_secs(30 * 60);
/// Least time between two fetches after a failure or for an unknown identifier, so that
/// reports naming made-up identifiers cannot make us hammer the endpoint.
const REFETCH_MIN: Duration = Duration::from_secs(10);
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("the Github-Public-Key-Identifier header is missing or not text")]
    MissingKeyId,
    #[error("the Github-Public-Key-Signature header is missing or not text")]
    MissingSignature,
    #[error("the signature is not base64")]
    NotBase64,
    #[error("the signature is not a DER-encoded ECDSA P-256 signature")]
    NotDer,
    #[error("no GitHub secret-scanning key has this identifier")]
    UnknownKey,
    #[error("the signature does not match the body")]
    Mismatch,
    /// GitHub's keys could not be fetched (GitHub retries on a 5xx).
    #[error("GitHub's secret-scanning keys are unavailable: {0}")]
    KeysUnavailable(String),
}

impl SignatureError {
    /// For metrics: what kind of failure.
    pub fn kind(&self) -> &'static str {
        match self {
            SignatureError::MissingKeyId | SignatureError::MissingSignature => "missing_header",
            SignatureError::NotBase64 | SignatureError::NotDer => "malformed_signature",
            SignatureError::UnknownKey => "unknown_key",
            SignatureError::Mismatch => "mismatch",
            SignatureError::KeysUnavailable(_) => "keys_unavailable",
        }
    }
}

/// The signature header's value, decoded (no key needed: checked first, for nothing).
pub fn parse_signature(header: &str) -> Result<Signature, SignatureError> {
    let der = STANDARD
        .decode(header.trim())
        .map_err(|_| SignatureError::NotBase64)?;
    Signature::from_der(&der).map_err(|_| SignatureError::NotDer)
}

/// A report's signature and the GitHub key that must have made it.
pub struct ExpectedSignature {
    key: VerifyingKey,
    signature: Signature,
}

impl ExpectedSignature {
    /// Whether the body whose SHA-256 is `digest` (hashed as it was read) is what was
    /// signed: ECDSA P-256 over SHA-256, the digest computed by the caller.
    pub fn matches(&self, digest: &[u8]) -> Result<(), SignatureError> {
        self.key
            .verify_prehash(digest, &self.signature)
            .map_err(|_| SignatureError::Mismatch)
    }
}

#[derive(Deserialize)]
struct KeysResponse {
    public_keys: Vec<PublicKeyEntry>,
}

#[derive(Deserialize)]
struct PublicKeyEntry {
    key_identifier: String,
    key: String,
    #[serde(default)]
    is_current: bool,
}

/// One of GitHub's keys.
#[derive(Clone)]
struct GitHubKey {
    key: VerifyingKey,
    is_current: bool,
}

#[derive(Default)]
struct Cached {
    keys: HashMap<String, GitHubKey>,
    fetched_at: Option<Instant>,
    attempted_at: Option<Instant>,
    last_error: Option<String>,
}

/// What `/readyz` shows of the key cache.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeysStatus {
    pub keys: usize,
    pub fetched_seconds_ago: Option<u64>,
    pub last_error: Option<String>,
}

/// GitHub's keys, fetched on first use and kept [`KEYS_TTL`]; fetched again at once for
/// an identifier not among them (at most once per [`REFETCH_MIN`]).
pub struct GitHubKeys {
    http: reqwest::Client,
    url: String,
    cached: tokio::sync::Mutex<Cached>,
}

impl GitHubKeys {
    pub fn new(url: &str) -> anyhow::Result<Self> {
        Ok(GitHubKeys {
            http: reqwest::Client::builder()
                .timeout(FETCH_TIMEOUT)
                .user_agent(concat!("metlo-edge-auth/", env!("CARGO_PKG_VERSION")))
                .build()?,
            url: url.to_owned(),
            cached: tokio::sync::Mutex::new(Cached::default()),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// What the two headers' values promise, matched with one of GitHub's keys: all that
    /// can be checked before a byte of the body is read. A listed key that is no longer
    /// GitHub's current one is accepted (logged): GitHub lists keys it still signs with
    /// while it rotates them, and a report must never be lost to a rotation.
    pub async fn expect(
        &self,
        key_id: Option<&str>,
        signature: Option<&str>,
    ) -> Result<ExpectedSignature, SignatureError> {
        let key_id = key_id.ok_or(SignatureError::MissingKeyId)?;
        let signature = parse_signature(signature.ok_or(SignatureError::MissingSignature)?)?;
        let key = self.key(key_id).await?;
        if !key.is_current {
            tracing::info!(
                key_id,
                "report signed with a GitHub key that is no longer current"
            );
        }
        Ok(ExpectedSignature {
            key: key.key,
            signature,
        })
    }

    async fn key(&self, id: &str) -> Result<GitHubKey, SignatureError> {
        let mut cached = self.cached.lock().await;
        let stale = cached.fetched_at.is_none_or(|t| t.elapsed() >= KEYS_TTL);
        let unknown = !cached.keys.contains_key(id);
        let may_retry = cached
            .attempted_at
            .is_none_or(|t| t.elapsed() >= REFETCH_MIN);
        // Stale keys are refreshed whenever the last attempt succeeded; after a failure,
        // and for unknown identifiers, once a minute at most.
        let last_failed = cached.last_error.is_some();
        if (stale && (!last_failed || may_retry)) || (unknown && may_retry) {
            cached.attempted_at = Some(Instant::now());
            match self.fetch().await {
                Ok(keys) => {
                    metrics::counter!("metlo_github_keys_fetches_total", "result" => "ok")
                        .increment(1);
                    cached.keys = keys;
                    cached.fetched_at = Some(Instant::now());
                    cached.last_error = None;
                }
                Err(e) => {
                    metrics::counter!("metlo_github_keys_fetches_total", "result" => "error")
                        .increment(1);
                    tracing::warn!(url = %self.url, error = %e, "could not fetch GitHub's secret-scanning keys");
                    cached.last_error = Some(e);
                }
            }
        }
        match cached.keys.get(id) {
            Some(key) => Ok(key.clone()),
            // Without a fresh list we cannot say the identifier is unknown: GitHub retries.
            None => match &cached.last_error {
                Some(e) => Err(SignatureError::KeysUnavailable(e.clone())),
                None => Err(SignatureError::UnknownKey),
            },
        }
    }

    async fn fetch(&self) -> Result<HashMap<String, GitHubKey>, String> {
        let response = self
            .http
            .get(&self.url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| e.without_url().to_string())?;
        if !response.status().is_success() {
            return Err(format!("{} answered {}", self.url, response.status()));
        }
        let body: KeysResponse = response
            .json()
            .await
            .map_err(|e| format!("unexpected answer: {}", e.without_url()))?;
        let mut keys = HashMap::new();
        for entry in body.public_keys {
            match VerifyingKey::from_public_key_pem(&entry.key) {
                Ok(key) => {
                    keys.insert(
                        entry.key_identifier,
                        GitHubKey {
                            key,
                            is_current: entry.is_current,
                        },
                    );
                }
                Err(_) => tracing::warn!(
                    key_id = %entry.key_identifier,
                    "a GitHub secret-scanning key is not a P-256 public key in PEM; skipped"
                ),
            }
        }
        if keys.is_empty() {
            return Err("the answer lists no usable key".into());
        }
        Ok(keys)
    }

    /// `None` while a fetch is under way (readiness never waits for GitHub).
    pub fn status(&self) -> Option<KeysStatus> {
        let cached = self.cached.try_lock().ok()?;
        Some(KeysStatus {
            keys: cached.keys.len(),
            fetched_seconds_ago: cached.fetched_at.map(|t| t.elapsed().as_secs()),
            last_error: cached.last_error.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_headers_are_checked_before_any_key() {
        assert_eq!(
            parse_signature("not base64!").unwrap_err(),
            SignatureError::NotBase64
        );
        assert_eq!(parse_signature("AAAA").unwrap_err(), SignatureError::NotDer);
    }

    /// The digest the route computes while streaming checks out exactly as the whole
    /// body would with `Verifier::verify`.
    #[test]
    fn a_streamed_digest_checks_the_signature_of_the_body() {
        use p256::ecdsa::signature::Signer;
        use p256::ecdsa::SigningKey;
        use sha2::{Digest, Sha256};
        let signing = SigningKey::from_slice(&[7u8; 32]).unwrap();
        let body = br#"[{"token":"t","type":"metlo_api_key"}]"#;
        let signature: Signature = signing.sign(body);
        let expected = ExpectedSignature {
            key: *signing.verifying_key(),
            signature,
        };
        let mut hasher = Sha256::new();
        for chunk in body.chunks(5) {
            hasher.update(chunk);
        }
        assert_eq!(expected.matches(&hasher.finalize()), Ok(()));
        let other = Sha256::digest(b"[]");
        assert_eq!(expected.matches(&other), Err(SignatureError::Mismatch));
    }
}
