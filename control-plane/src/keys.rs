//! The keys resource: Metlo's routes, paths and JSON field names, exactly.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use chrono::{SecondsFormat, TimeZone, Utc};
use metlo_shared::{ApiKey, KeyHash, KeyRecord, KeyType, RECORD_VERSION};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use crate::audit::Actor;
use crate::auth::lookup;
use crate::cache::VerifyCache;
use crate::error::{body_bytes, ApiError, ErrorBody};
use crate::server::MAX_BODY_BYTES;
use crate::store::{Rolled, Store, StoredKey};
use crate::AppState;

/// Longest accepted key name, in characters.
pub const MAX_NAME_CHARS: usize = 128;
/// Longest overlap a roll may give the old secret: 7 days.
pub const MAX_OVERLAP_SECONDS: u64 = 7 * 24 * 3600;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/keys/create", post(create))
        .route("/api/v1/keys/list", get(list))
        .route("/api/v1/keys/onboarding", get(onboarding))
        .route("/api/v1/keys/{name}/delete", delete(remove))
        .route("/api/v1/keys/{name}/roll", post(roll))
        .route("/api/v1/keys/by-hash/{hash}", get(by_hash))
        .route("/api/v1/verify", get(verify))
}

#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct CreateKeyRequest {
    /// Unique name: 1–128 characters, not only whitespace, no control characters, not
    /// `.` or `..`. (Deserialized as optional so a missing name gets our own 400.)
    #[schema(value_type = String, required = true, min_length = 1, max_length = 128,
        pattern = r"^(?!\.{1,2}$)(?=[\s\S]*\S)[^\x00-\x1f\x7f-\x9f]+$", example = "ingestor-prod")]
    pub name: Option<String>,
    /// Key type; `GENERIC` when omitted.
    #[serde(rename = "keyFor")]
    #[schema(value_type = Option<KeyFor>, example = "GENERIC")]
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

/// Unknown fields are refused: a misspelt overlap must not silently end the old secret.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollKeyRequest {
    /// How long the previous secret keeps working, in seconds (0–604800, i.e. up to 7
    /// days; default 0: it stops at once). The end is rounded up to a whole second.
    #[serde(rename = "overlapSeconds")]
    #[schema(value_type = Option<u64>, minimum = 0, maximum = 604800)]
    pub overlap_seconds: Option<serde_json::Number>,
}

/// Metlo's key types.
#[derive(ToSchema)]
#[allow(dead_code, clippy::upper_case_acronyms)]
pub enum KeyFor {
    GENERIC,
    ONBOARDING,
    GCP,
    AWS,
}

/// Returned once, at creation: the only time the full key is ever shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedKey {
    #[serde(rename = "apiKey")]
    pub api_key: String,
    #[serde(flatten)]
    pub info: KeyInfo,
}

/// Key metadata; never the key.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyInfo {
    pub name: String,
    pub identifier: String,
    /// ISO 8601.
    pub created: String,
    #[serde(rename = "for")]
    #[schema(value_type = KeyFor, example = "GENERIC")]
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
#[derive(Debug, Serialize, ToSchema)]
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

#[derive(Debug, Serialize, ToSchema)]
pub struct StatusOk {
    #[schema(example = "OK")]
    pub status: &'static str,
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

impl StoredKey {
    /// The record the edge caches in KV for this key.
    pub fn record(&self) -> KeyRecord {
        KeyRecord {
            v: RECORD_VERSION,
            name: self.name.clone(),
            key_type: self.key_type,
            identifier: self.identifier.clone(),
            created: iso8601(self.created_at_ms),
            expires: self.expires_at_ms.map(unix_seconds),
        }
    }

    /// The record of a secret a roll replaced: the key's, with that secret's identifier,
    /// expiring when its overlap ends (or the key expires, if sooner).
    pub fn retired_record(&self, identifier: &str, retires_at_ms: i64) -> KeyRecord {
        let end = self
            .expires_at_ms
            .map_or(retires_at_ms, |e| e.min(retires_at_ms));
        KeyRecord {
            identifier: identifier.to_owned(),
            expires: Some(unix_seconds(end)),
            ..self.record()
        }
    }
}

impl RolledKey {
    pub fn new(key: ApiKey, rolled: Rolled) -> Self {
        let previous = &rolled.retired[0];
        // The previous secret stops at its overlap's end, or when the key expires if sooner.
        let until = rolled
            .key
            .expires_at_ms
            .map_or(previous.retires_at_ms, |e| e.min(previous.retires_at_ms));
        RolledKey {
            api_key: key.expose_secret().to_owned(),
            previous_identifier: previous.identifier.clone(),
            previous_valid_until: iso8601(until),
            info: rolled.key.into(),
        }
    }
}

/// Whole seconds since the epoch (expiries are whole seconds; never before the epoch).
fn unix_seconds(ms: i64) -> u64 {
    ms.div_euclid(1000).max(0) as u64
}

pub fn iso8601(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Checks a name the way every entry point (HTTP and CLI) must.
pub fn validate_name(name: Option<&str>) -> Result<&str, ApiError> {
    let name = name.unwrap_or_default();
    if name.trim().is_empty() {
        return Err(ApiError::BadRequest("name is required".into()));
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(ApiError::BadRequest(format!(
            "name must be at most {MAX_NAME_CHARS} characters"
        )));
    }
    // `.` and `..` are removed from URLs by clients, so DELETE could never address them.
    if name == "." || name == ".." {
        return Err(ApiError::BadRequest(
            "name must not be \".\" or \"..\"".into(),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(
            "name must not contain control characters".into(),
        ));
    }
    Ok(name)
}

pub fn parse_key_type(key_for: Option<&str>) -> Result<KeyType, ApiError> {
    match key_for {
        None => Ok(KeyType::Generic),
        Some(s) => s
            .parse()
            .map_err(|e: metlo_shared::KeyTypeError| ApiError::BadRequest(e.to_string())),
    }
}

/// An `expiresAt`: RFC 3339, cut to whole seconds, after `now_ms`.
pub fn parse_expires_at(value: &str, now_ms: i64) -> Result<i64, ApiError> {
    let at = chrono::DateTime::parse_from_rfc3339(value.trim()).map_err(|_| {
        ApiError::BadRequest(
            "expiresAt must be an RFC 3339 date-time with a time zone, e.g. 2030-01-01T00:00:00Z"
                .into(),
        )
    })?;
    let ms = at.timestamp().saturating_mul(1000);
    if ms <= now_ms {
        return Err(ApiError::BadRequest(
            "expiresAt must be in the future".into(),
        ));
    }
    Ok(ms)
}

/// A JSON body, or the 400 to answer; an empty body or `null` is `T::default()`. Parsed
/// by hand so a bad body is always a JSON 400 (axum's extractor would answer 415/422 in
/// plain text, and Metlo clients do not all send a Content-Type).
fn json_body<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice::<Option<T>>(body)
        .map(Option::unwrap_or_default)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

/// Decodes and validates a create body: name, type and expiry, or the 400 to answer.
/// An empty body is a missing name.
pub fn parse_create_request(body: &[u8], now_ms: i64) -> Result<NewKey, ApiError> {
    let req: CreateKeyRequest = json_body(body)?;
    Ok(NewKey {
        name: validate_name(req.name.as_deref())?.to_owned(),
        key_type: parse_key_type(req.key_for.as_deref())?,
        expires_at_ms: req
            .expires_at
            .map(|v| parse_expires_at(&v, now_ms))
            .transpose()?,
    })
}

/// Decodes a roll body (empty: no overlap) into the overlap, or the 400 to answer.
pub fn parse_roll_request(body: &[u8]) -> Result<std::time::Duration, ApiError> {
    let req: RollKeyRequest = json_body(body)?;
    let out_of_range = || {
        ApiError::BadRequest(format!(
            "overlapSeconds must be a whole number of seconds from 0 to {MAX_OVERLAP_SECONDS} (7 days)"
        ))
    };
    // A whole number, also when written as one (`60.0` is an integer to JSON Schema).
    let seconds = match req.overlap_seconds {
        None => 0,
        Some(n) => match (n.as_u64(), n.as_f64()) {
            (Some(s), _) => s,
            (None, Some(f))
                if f.fract() == 0.0 && (0.0..=MAX_OVERLAP_SECONDS as f64).contains(&f) =>
            {
                f as u64
            }
            _ => return Err(out_of_range()),
        },
    };
    if seconds > MAX_OVERLAP_SECONDS {
        return Err(out_of_range());
    }
    Ok(std::time::Duration::from_secs(seconds))
}

fn generate_key() -> Result<ApiKey, ApiError> {
    ApiKey::generate().map_err(|e| ApiError::Internal(anyhow::anyhow!("no randomness: {e}")))
}

/// Makes a key and stores its hash. Shared by the HTTP route and the CLI.
pub async fn create_key(
    store: &Store,
    new: &NewKey,
    max_keys: u64,
    actor: &Actor,
) -> Result<(ApiKey, StoredKey), ApiError> {
    let key = generate_key()?;
    let stored = StoredKey {
        id: 0,
        name: new.name.clone(),
        key_hash: key.hash().to_hex(),
        identifier: key.identifier(),
        key_type: new.key_type,
        created_at_ms: Utc::now().timestamp_millis(),
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
    Ok((key, stored))
}

/// Gives a key a new secret; the previous one works for `overlap` more. Updates the
/// verification cache for every secret whose end moved. Shared by the route and the CLI.
pub async fn roll_key(
    store: &Store,
    cache: &VerifyCache,
    name: &str,
    overlap: std::time::Duration,
    actor: &Actor,
) -> Result<(ApiKey, Rolled), ApiError> {
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
        .ok_or_else(|| ApiError::NotFound("no API key with this name".into()))?;
    let now = Utc::now().timestamp_millis();
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
    Ok((key, rolled))
}

/// Create a key. The response is the only time the full key is shown.
#[utoipa::path(post, path = "/api/v1/keys/create", tag = "keys", request_body = CreateKeyRequest,
    responses(
        (status = 200, body = CreatedKey),
        (status = 400, description = "Missing, too long or duplicate name, invalid type, bad JSON, or limit reached", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 413, description = "Body larger than 16 KiB", body = ErrorBody),
        (status = 503, body = ErrorBody),
    ), security(("api_key" = [])))]
async fn create(
    State(state): State<AppState>,
    actor: Actor,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<CreatedKey>, ApiError> {
    let body = body_bytes(body, MAX_BODY_BYTES)?;
    let new = parse_create_request(&body, Utc::now().timestamp_millis())?;
    let (key, stored) = create_key(&state.store, &new, state.max_api_keys, &actor).await?;
    Ok(Json(CreatedKey {
        api_key: key.expose_secret().to_owned(),
        info: stored.into(),
    }))
}

/// Roll a key: a new secret under the same name, type and expiry, returned once. The
/// previous secret keeps working for `overlapSeconds` (default 0), then is refused
/// everywhere; a roll also ends, by then at the latest, any older secret still in an
/// earlier roll's overlap.
#[utoipa::path(post, path = "/api/v1/keys/{name}/roll", tag = "keys",
    params(("name" = String, Path, description = "Key name, URL-encoded")),
    request_body(content = Option<RollKeyRequest>, description = "Optional; empty: no overlap"),
    responses(
        (status = 200, body = RolledKey),
        (status = 400, description = "Bad JSON or overlap out of range", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 503, body = ErrorBody),
    ), security(("api_key" = [])))]
async fn roll(
    State(state): State<AppState>,
    actor: Actor,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<RolledKey>, ApiError> {
    let body = body_bytes(body, MAX_BODY_BYTES)?;
    let overlap = parse_roll_request(&body)?;
    let (key, rolled) = roll_key(&state.store, &state.cache, &name, overlap, &actor).await?;
    Ok(Json(RolledKey::new(key, rolled)))
}

/// List all keys (metadata only), newest first.
#[utoipa::path(get, path = "/api/v1/keys/list", tag = "keys",
    responses((status = 200, body = [KeyInfo]), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("api_key" = [])))]
async fn list(State(state): State<AppState>) -> Result<Json<Vec<KeyInfo>>, ApiError> {
    Ok(Json(
        state
            .store
            .list_keys(None)
            .await?
            .into_iter()
            .map(KeyInfo::from)
            .collect(),
    ))
}

/// List ONBOARDING keys only, newest first.
#[utoipa::path(get, path = "/api/v1/keys/onboarding", tag = "keys",
    responses((status = 200, body = [KeyInfo]), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("api_key" = [])))]
async fn onboarding(State(state): State<AppState>) -> Result<Json<Vec<KeyInfo>>, ApiError> {
    let keys = state.store.list_keys(Some(KeyType::Onboarding)).await?;
    Ok(Json(keys.into_iter().map(KeyInfo::from).collect()))
}

/// Delete a key by name. It is refused everywhere on the control plane at once.
#[utoipa::path(delete, path = "/api/v1/keys/{name}/delete", tag = "keys",
    params(("name" = String, Path, description = "Key name, URL-encoded")),
    responses((status = 200, body = StatusOk), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("api_key" = [])))]
async fn remove(
    State(state): State<AppState>,
    actor: Actor,
    Path(name): Path<String>,
) -> Result<Json<StatusOk>, ApiError> {
    delete_key(&state.store, &state.cache, &name, &actor).await?;
    Ok(Json(StatusOk { status: "OK" }))
}

/// Deletes a key and every secret of it still in a roll's overlap, and revokes them in
/// the verification cache. Shared by the route and the CLI. Returns the deleted key.
pub async fn delete_key(
    store: &Store,
    cache: &VerifyCache,
    name: &str,
    actor: &Actor,
) -> Result<StoredKey, ApiError> {
    let audit = actor.entry("key.delete", name, json!({}));
    let (deleted, retired) = store
        .delete_key(name, &audit)
        .await?
        .ok_or_else(|| ApiError::NotFound("no API key with this name".into()))?;
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
    Ok(deleted)
}

/// Answers 200 `OK` when the request's key is valid (Metlo's ingestors ping this).
#[utoipa::path(get, path = "/api/v1/verify", tag = "keys",
    responses((status = 200, body = String, content_type = "text/plain"), (status = 401, body = ErrorBody),
        (status = 503, body = ErrorBody)),
    security(("api_key" = [])))]
async fn verify() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], "OK")
}

/// The KV record of the key with this SHA-256 (lowercase hex), for the edge Worker. The
/// raw client key never leaves the edge.
#[utoipa::path(get, path = "/api/v1/keys/by-hash/{hash}", tag = "edge",
    params(("hash" = String, Path, description = "SHA-256 of the key, 64 lowercase hex characters",
        pattern = "^[0-9a-f]{64}$")),
    responses((status = 200, body = inline(RecordSchema)), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("api_key" = [])))]
async fn by_hash(
    State(state): State<AppState>,
    Path(hash): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let hash = KeyHash::from_hex(&hash).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let record = lookup(&state, &hash)
        .await?
        .ok_or_else(|| ApiError::NotFound("no API key with this hash".into()))?;
    Ok(([(header::CACHE_CONTROL, "no-store")], Json(record)))
}

/// Schema of [`KeyRecord`] for the OpenAPI document.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct RecordSchema {
    /// Record format version (1).
    v: u32,
    name: String,
    #[schema(rename = "for")]
    key_for: String,
    identifier: String,
    /// ISO 8601.
    created: String,
    /// Unix seconds after which the key is invalid; absent when it never expires.
    expires: Option<u64>,
}
