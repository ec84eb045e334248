//! Keys: the rules a name, type, expiry and overlap must follow, and the operations on
//! keys — create, roll, delete, list, and verification through the cache — with the
//! shapes they return, which are Metlo's JSON (paths and field names exactly).

use std::time::Duration;

use metlo_shared::{ApiKey, KeyHash, KeyRecord, KeyType};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use super::audit::Actor;
use super::Error;
use crate::cache::{Cached, VerifyCache};
use crate::clock::{iso8601, now_ms};
use crate::db::rows::{Rolled, StoredKey};
use crate::db::Store;

/// Longest accepted key name, in characters.
pub const MAX_NAME_CHARS: usize = 128;
/// Longest overlap a roll may give the old secret: 7 days.
pub const MAX_OVERLAP_SECONDS: u64 = 7 * 24 * 3600;

/// The body of a create (Metlo's `{name, keyFor}`, plus `expiresAt`).
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct CreateKeyRequest {
    /// Unique name: 1–128 characters, not only whitespace, no control characters, not
    /// `.` or `..`. (Deserialized as optional so a missing name gets our own 400.)
    #[schema(value_type = String, required = true, min_length = 1, max_length = 128,
        pattern = r"^(?!\.{1,2}$)(?=[\s\S]*\S)[^\x00-\x1f\x7f-\x9f]+$", example = "ingestor-prod")]
    pub name: Option<String>,
    /// Key type; `GENERIC` when omitted.
    #[serde(rename = "keyFor")]
    #[schema(value_type = Option<KeyType>, example = "GENERIC")]
    pub key_for: Option<String>,
    /// When the key stops working: RFC 3339 (ISO 8601 with a time zone), in the future,
    /// cut to whole seconds. Absent or null: never.
    #[serde(rename = "expiresAt")]
    #[schema(value_type = Option<String>, format = DateTime, example = "2030-01-01T00:00:00Z")]
    pub expires_at: Option<String>,
}

/// A validated create request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewKey {
    pub name: String,
    pub key_type: KeyType,
    /// Whole seconds, in the future.
    pub expires_at_ms: Option<i64>,
}

impl CreateKeyRequest {
    /// The key to make, or what is wrong with the request.
    pub fn validate(self, now_ms: i64) -> Result<NewKey, Error> {
        Ok(NewKey {
            name: validate_name(self.name.as_deref())?.to_owned(),
            key_type: parse_key_type(self.key_for.as_deref())?,
            expires_at_ms: self
                .expires_at
                .map(|v| parse_expires_at(&v, now_ms))
                .transpose()?,
        })
    }
}

/// The body of a roll. Unknown fields are refused: a misspelt overlap must not silently
/// end the old secret.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollKeyRequest {
    /// How long the previous secret keeps working, in seconds (0–604800, i.e. up to 7
    /// days; default 0: it stops at once). The end is rounded up to a whole second.
    #[serde(rename = "overlapSeconds")]
    #[schema(value_type = Option<u64>, minimum = 0, maximum = 604800)]
    pub overlap_seconds: Option<serde_json::Number>,
}

impl RollKeyRequest {
    /// The overlap asked for, or what is wrong with it.
    pub fn overlap(&self) -> Result<Duration, Error> {
        // A whole number, also when written as one (`60.0` is an integer to JSON Schema).
        let seconds = match &self.overlap_seconds {
            None => 0,
            Some(n) => match (n.as_u64(), n.as_f64()) {
                (Some(s), _) => s,
                (None, Some(f))
                    if f.fract() == 0.0 && (0.0..=MAX_OVERLAP_SECONDS as f64).contains(&f) =>
                {
                    f as u64
                }
                _ => return Err(overlap_out_of_range()),
            },
        };
        overlap(seconds)
    }
}

/// An overlap of `seconds`, if within the rules.
pub fn overlap(seconds: u64) -> Result<Duration, Error> {
    if seconds > MAX_OVERLAP_SECONDS {
        return Err(overlap_out_of_range());
    }
    Ok(Duration::from_secs(seconds))
}

fn overlap_out_of_range() -> Error {
    Error::invalid(format!(
        "overlapSeconds must be a whole number of seconds from 0 to {MAX_OVERLAP_SECONDS} (7 days)"
    ))
}

/// Returned once, at creation: the only time the full key is ever shown.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedKey {
    #[serde(rename = "apiKey")]
    pub api_key: String,
    #[serde(flatten)]
    pub info: KeyInfo,
}

/// Key metadata; never the key.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyInfo {
    pub name: String,
    pub identifier: String,
    /// ISO 8601.
    pub created: String,
    #[serde(rename = "for")]
    #[schema(example = "GENERIC")]
    pub key_for: KeyType,
    /// ISO 8601; null: never expires. An expired key is refused but still listed (and
    /// counts toward the limit) until deleted.
    #[serde(rename = "expiresAt")]
    pub expires_at: Option<String>,
    /// ISO 8601; null: never used. Updated at most once a minute.
    #[serde(rename = "lastUsed")]
    pub last_used: Option<String>,
}

/// Returned by a roll: the new key (shown only this once) and when the previous one stops.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RolledKey {
    #[serde(rename = "apiKey")]
    pub api_key: String,
    #[serde(flatten)]
    pub info: KeyInfo,
    /// The identifier of the secret this roll replaced.
    #[serde(rename = "previousIdentifier")]
    pub previous_identifier: String,
    /// ISO 8601: the previous secret is refused from this instant on.
    #[serde(rename = "previousValidUntil")]
    pub previous_valid_until: String,
}

impl From<StoredKey> for KeyInfo {
    fn from(k: StoredKey) -> Self {
        KeyInfo {
            created: iso8601(k.created_at_ms),
            name: k.name,
            identifier: k.identifier,
            key_for: k.key_type,
            expires_at: k.expires_at_ms.map(iso8601),
            last_used: k.last_used_ms.map(iso8601),
        }
    }
}

impl RolledKey {
    fn new(key: ApiKey, rolled: Rolled) -> Self {
        let previous = &rolled.retired[0];
        // The previous secret stops at its overlap's end, or when the key expires if sooner.
        let until = rolled.key.secret_end(previous.retires_at_ms);
        RolledKey {
            api_key: key.expose_secret().to_owned(),
            previous_identifier: previous.identifier.clone(),
            previous_valid_until: iso8601(until),
            info: rolled.key.into(),
        }
    }
}

/// Checks a name the way every entry point (HTTP and CLI) must.
pub fn validate_name(name: Option<&str>) -> Result<&str, Error> {
    let name = name.unwrap_or_default();
    if name.trim().is_empty() {
        return Err(Error::invalid("name is required"));
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(Error::invalid(format!(
            "name must be at most {MAX_NAME_CHARS} characters"
        )));
    }
    // `.` and `..` are removed from URLs by clients, so DELETE could never address them.
    if name == "." || name == ".." {
        return Err(Error::invalid("name must not be \".\" or \"..\""));
    }
    if name.chars().any(char::is_control) {
        return Err(Error::invalid("name must not contain control characters"));
    }
    Ok(name)
}

pub fn parse_key_type(key_for: Option<&str>) -> Result<KeyType, Error> {
    match key_for {
        None => Ok(KeyType::Generic),
        Some(s) => s
            .parse()
            .map_err(|e: metlo_shared::KeyTypeError| Error::invalid(e.to_string())),
    }
}

/// An `expiresAt`: RFC 3339, cut to whole seconds, after `now_ms`.
pub fn parse_expires_at(value: &str, now_ms: i64) -> Result<i64, Error> {
    let at = chrono::DateTime::parse_from_rfc3339(value.trim()).map_err(|_| {
        Error::invalid(
            "expiresAt must be an RFC 3339 date-time with a time zone, e.g. 2030-01-01T00:00:00Z",
        )
    })?;
    let ms = at.timestamp().saturating_mul(1000);
    if ms <= now_ms {
        return Err(Error::invalid("expiresAt must be in the future"));
    }
    Ok(ms)
}

fn generate_key() -> Result<ApiKey, Error> {
    ApiKey::generate().map_err(|e| Error::Internal(anyhow::anyhow!("no randomness: {e}")))
}

/// Makes a key and stores its hash. The response is the only time the key is shown.
pub async fn create_key(
    store: &Store,
    new: &NewKey,
    max_keys: u64,
    actor: &Actor,
) -> Result<CreatedKey, Error> {
    let key = generate_key()?;
    let stored = StoredKey {
        id: 0,
        name: new.name.clone(),
        key_hash: key.hash().to_hex(),
        identifier: key.identifier(),
        key_type: new.key_type,
        created_at_ms: now_ms(),
        expires_at_ms: new.expires_at_ms,
        last_used_ms: None,
    };
    let audit = actor.entry(
        "key.create",
        &new.name,
        json!({
            "identifier": stored.identifier,
            "type": new.key_type.as_str(),
            "expiresAt": new.expires_at_ms.map(iso8601),
        }),
    );
    store.insert_key(&stored, max_keys, &audit).await?;
    tracing::info!(name = %new.name, identifier = %stored.identifier, key_type = %new.key_type, "key created");
    Ok(CreatedKey {
        api_key: key.expose_secret().to_owned(),
        info: stored.into(),
    })
}

/// Gives a key a new secret; the previous one works for `overlap` more. Updates the
/// verification cache for every secret whose end moved.
pub async fn roll_key(
    store: &Store,
    cache: &VerifyCache,
    name: &str,
    overlap: Duration,
    actor: &Actor,
) -> Result<RolledKey, Error> {
    let key = generate_key()?;
    let audit = actor.entry(
        "key.roll",
        name,
        json!({"identifier": key.identifier(), "overlapSeconds": overlap.as_secs()}),
    );
    let rolled = store
        .roll_key(
            name,
            &key.hash().to_hex(),
            &key.identifier(),
            overlap,
            &audit,
        )
        .await?
        .ok_or(Error::NotFound("no API key with this name"))?;
    let now = now_ms();
    let mut all_written = true;
    for secret in &rolled.retired {
        let Ok(hash) = KeyHash::from_hex(&secret.key_hash) else {
            continue;
        };
        all_written &= if secret.retires_at_ms <= now {
            cache.revoke(&hash).await
        } else {
            let record = rolled
                .key
                .retired_record(&secret.identifier, secret.retires_at_ms);
            cache.replace(&hash, record).await
        };
    }
    if !all_written {
        // A server rewrites them when Redis answers (and answers from memory meanwhile).
        tracing::warn!(
            name,
            "Redis unreachable: the old secrets' cache entries are not updated yet"
        );
    }
    tracing::info!(name, identifier = %rolled.key.identifier, overlap_seconds = overlap.as_secs(), "key rolled");
    Ok(RolledKey::new(key, rolled))
}

/// Deletes a key and every secret of it still in a roll's overlap, and revokes them in
/// the verification cache.
pub async fn delete_key(
    store: &Store,
    cache: &VerifyCache,
    name: &str,
    actor: &Actor,
) -> Result<(), Error> {
    let audit = actor.entry("key.delete", name, json!({}));
    let (deleted, retired) = store
        .delete_key(name, &audit)
        .await?
        .ok_or(Error::NotFound("no API key with this name"))?;
    let mut all_revoked = true;
    for hex in std::iter::once(&deleted.key_hash).chain(&retired) {
        if let Ok(hash) = KeyHash::from_hex(hex) {
            all_revoked &= cache.revoke(&hash).await;
        }
    }
    if !all_revoked {
        // A server rewrites them when Redis answers (and refuses the key meanwhile); the
        // CLI can only warn.
        tracing::warn!(
            name,
            "Redis unreachable: the deleted key's cache entries are not overwritten yet"
        );
    }
    tracing::info!(name, identifier = %deleted.identifier, "key deleted");
    Ok(())
}

/// All keys, or those of one type; newest first, metadata only.
pub async fn list_keys(store: &Store, only: Option<KeyType>) -> Result<Vec<KeyInfo>, Error> {
    let keys = store.list_keys(only).await?;
    Ok(keys.into_iter().map(KeyInfo::from).collect())
}

/// The record for a secret hash, through the cache. `None`: not a key (unknown, deleted
/// or past its roll overlap). Expiry is the caller's to check: the record carries it.
pub async fn lookup(
    store: &Store,
    cache: &VerifyCache,
    hash: &KeyHash,
) -> Result<Option<KeyRecord>, Error> {
    if let Some(cached) = cache.get(hash).await {
        metrics::counter!("metlo_verify_cache_total", "result" => "hit").increment(1);
        return Ok(match cached {
            Cached::Valid(record) => Some(record),
            Cached::Absent => None,
        });
    }
    metrics::counter!("metlo_verify_cache_total", "result" => "miss").increment(1);
    let record = store.find_by_hash(hash).await?.map(|k| k.record());
    let entry = match &record {
        Some(r) => Cached::Valid(r.clone()),
        None => Cached::Absent,
    };
    cache.add(hash, entry).await;
    Ok(record)
}
