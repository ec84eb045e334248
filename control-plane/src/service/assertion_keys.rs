//! The keys the edge signs its assertions with (issue 30): ES256 (ECDSA on P-256, what
//! WebCrypto signs with in the Worker and every JWT library verifies). The control plane
//! makes a key pair, keeps only the public half and shows the private half once (as a JWK,
//! for the Worker's `ASSERTION_SIGNING_KEY` secret); it publishes the public halves as a
//! JWKS until each is retired.
//!
//! Rotation that fails no request: make a new key (published at once) → wait for origins'
//! JWKS caches (`JWKS_MAX_AGE_SECONDS`) → switch the Worker's secret → wait until the old
//! key's last assertion has expired (`ASSERTION_TTL_SECONDS`, at most 60) → retire it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use p256::ecdsa::SigningKey;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;

use super::audit::Actor;
use super::Error;
use crate::clock::{iso8601, now_ms};
use crate::db::rows::AssertionKeyRow;
use crate::db::Store;

/// The one algorithm.
pub const ALG: &str = "ES256";
/// Most keys published at once: a rotation needs two; a few spare.
pub const MAX_PUBLISHED: i64 = 5;
/// How long origins may cache the JWKS (`Cache-Control: max-age`).
pub const JWKS_MAX_AGE_SECONDS: u64 = 300;
/// How long a replica serves the JWKS it read before reading it again (a made or retired
/// key is seen at once by the replica that did it).
const JWKS_REREAD: Duration = Duration::from_secs(5);

/// A new key: its private half is in this answer only.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NewAssertionKey {
    pub kid: String,
    pub alg: &'static str,
    /// ISO 8601.
    pub created_at: String,
    /// The public JWK, as the JWKS publishes it.
    #[schema(value_type = Object)]
    pub public_jwk: Value,
    /// The private JWK: set it as the Worker's `ASSERTION_SIGNING_KEY` secret. Shown only
    /// this once; never stored.
    #[schema(value_type = Object)]
    pub private_jwk: Value,
}

/// A key as listed (never its private half).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AssertionKey {
    pub kid: String,
    pub alg: String,
    /// ISO 8601.
    pub created_at: String,
    /// ISO 8601; null: published in the JWKS.
    pub retired_at: Option<String>,
}

impl From<AssertionKeyRow> for AssertionKey {
    fn from(row: AssertionKeyRow) -> Self {
        AssertionKey {
            kid: row.kid,
            alg: row.alg,
            created_at: iso8601(row.created_at_ms),
            retired_at: row.retired_at_ms.map(iso8601),
        }
    }
}

/// A fresh P-256 key from the OS's randomness.
fn random_signing_key() -> Result<SigningKey, Error> {
    loop {
        let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
        getrandom::fill(bytes.as_mut())
            .map_err(|e| Error::Internal(anyhow::anyhow!("no randomness: {e}")))?;
        // Out of range (about 2^-32 of draws): draw again.
        if let Ok(key) = SigningKey::from_slice(bytes.as_ref()) {
            return Ok(key);
        }
    }
}

/// The public JWK of `key` under `kid`.
fn public_jwk(key: &SigningKey, kid: &str) -> Value {
    let point = key.verifying_key().to_sec1_point(false);
    let xy = &point.as_bytes()[1..];
    json!({
        "kty": "EC",
        "crv": "P-256",
        "x": URL_SAFE_NO_PAD.encode(&xy[..32]),
        "y": URL_SAFE_NO_PAD.encode(&xy[32..]),
        "kid": kid,
        "alg": ALG,
        "use": "sig",
    })
}

/// Makes a key pair; stores the public half; returns both (the private half only here).
pub async fn create(store: &Store, actor: &Actor) -> Result<NewAssertionKey, Error> {
    let key = random_signing_key()?;
    let mut id = [0u8; 8];
    getrandom::fill(&mut id).map_err(|e| Error::Internal(anyhow::anyhow!("no randomness: {e}")))?;
    let created_at_ms = now_ms();
    let kid = format!("{}-{}", &iso8601(created_at_ms)[..10], hex::encode(id));
    let public = public_jwk(&key, &kid);
    let row = AssertionKeyRow {
        kid: kid.clone(),
        alg: ALG.to_owned(),
        public_jwk: public.to_string(),
        created_at_ms,
        retired_at_ms: None,
    };
    let audit = actor.entry("assertion_key.create", &kid, json!({"alg": ALG}));
    let Some(created_at_ms) = store
        .insert_assertion_key(&row, MAX_PUBLISHED, &audit)
        .await?
    else {
        return Err(Error::Conflict(format!(
            "{MAX_PUBLISHED} assertion keys are published already: retire one first"
        )));
    };
    tracing::info!(kid, "assertion key made");
    let mut private = public.clone();
    private["d"] = URL_SAFE_NO_PAD.encode(key.to_bytes()).into();
    Ok(NewAssertionKey {
        kid,
        alg: ALG,
        created_at: iso8601(created_at_ms),
        public_jwk: public,
        private_jwk: private,
    })
}

pub async fn list(store: &Store) -> Result<Vec<AssertionKey>, Error> {
    Ok(store
        .assertion_keys()
        .await?
        .into_iter()
        .map(AssertionKey::from)
        .collect())
}

/// Takes `kid` out of the JWKS. The newest published key is the one the Worker should be
/// signing with: retiring it fails every assertion, so only with `force`.
pub async fn retire(
    store: &Store,
    kid: &str,
    force: bool,
    actor: &Actor,
) -> Result<AssertionKey, Error> {
    let keys = store.assertion_keys().await?;
    let newest = keys.iter().find(|k| k.retired_at_ms.is_none());
    if !force && newest.is_some_and(|k| k.kid == kid) {
        return Err(Error::Conflict(
            "this is the newest published assertion key, which the Worker should be signing \
             with: make a new one and switch the Worker to it first (or retire with force)"
                .into(),
        ));
    }
    let audit = actor.entry("assertion_key.retire", kid, json!({"force": force}));
    let row = store
        .retire_assertion_key(kid, now_ms(), &audit)
        .await?
        .ok_or(Error::NotFound("no assertion key with this kid"))?;
    tracing::info!(kid, "assertion key retired");
    Ok(row.into())
}

/// The JWKS of the published keys, as served: read again at most every few seconds.
#[derive(Default)]
pub struct Jwks {
    held: Mutex<Option<(Instant, std::sync::Arc<str>)>>,
}

impl Jwks {
    /// The JWKS document (`{"keys": [...]}`).
    pub async fn document(&self, store: &Store) -> Result<std::sync::Arc<str>, Error> {
        if let Some((at, doc)) = self.held.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            if at.elapsed() < JWKS_REREAD {
                return Ok(doc.clone());
            }
        }
        let keys: Vec<Value> = store
            .assertion_keys()
            .await?
            .into_iter()
            .filter(|k| k.retired_at_ms.is_none())
            .filter_map(|k| serde_json::from_str(&k.public_jwk).ok())
            .collect();
        let doc = std::sync::Arc::<str>::from(json!({ "keys": keys }).to_string());
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), doc.clone()));
        Ok(doc)
    }

    /// Forgets what was read (a key made or retired by this replica).
    pub fn changed(&self) {
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_public_jwk_is_the_signing_keys() {
        let key = random_signing_key().unwrap();
        let jwk = public_jwk(&key, "k1");
        let x = URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap();
        let y = URL_SAFE_NO_PAD.decode(jwk["y"].as_str().unwrap()).unwrap();
        let mut sec1 = vec![4u8];
        sec1.extend(x);
        sec1.extend(y);
        let verifying = p256::ecdsa::VerifyingKey::from_sec1_bytes(&sec1).unwrap();
        assert_eq!(&verifying, key.verifying_key());
        assert_eq!(jwk["kid"], "k1");
        assert!(jwk.get("d").is_none());
    }
}
