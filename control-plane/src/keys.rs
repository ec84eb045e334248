//! The keys resource: Metlo's routes, paths and JSON field names, exactly.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use chrono::{SecondsFormat, TimeZone, Utc};
use metlo_shared::{ApiKey, KeyHash, KeyRecord, KeyType, RECORD_VERSION};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::lookup;
use crate::error::{ApiError, ErrorBody};
use crate::store::{Store, StoredKey};
use crate::AppState;

/// Longest accepted key name, in characters.
pub const MAX_NAME_CHARS: usize = 128;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/keys/create", post(create))
        .route("/api/v1/keys/list", get(list))
        .route("/api/v1/keys/onboarding", get(onboarding))
        .route("/api/v1/keys/{name}/delete", delete(remove))
        .route("/api/v1/keys/by-hash/{hash}", get(by_hash))
        .route("/api/v1/verify", get(verify))
}

#[derive(Debug, Deserialize, ToSchema)]
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
            expires: None,
        }
    }
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

/// Decodes and validates a create body: the name and type, or the 400 to answer.
/// Parsed by hand so a bad body is always a JSON 400 (axum's extractor would answer
/// 415/422 in plain text, and Metlo clients do not all send a Content-Type). An empty
/// body is a missing name.
pub fn parse_create_request(body: &[u8]) -> Result<(String, KeyType), ApiError> {
    let req: CreateKeyRequest = if body.iter().all(u8::is_ascii_whitespace) {
        CreateKeyRequest {
            name: None,
            key_for: None,
        }
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))?
    };
    let name = validate_name(req.name.as_deref())?.to_owned();
    let key_type = parse_key_type(req.key_for.as_deref())?;
    Ok((name, key_type))
}

/// Makes a key and stores its hash. Shared by the HTTP route and the CLI.
pub async fn create_key(
    store: &Store,
    name: &str,
    key_type: KeyType,
    max_keys: u64,
) -> Result<(ApiKey, StoredKey), ApiError> {
    let key = ApiKey::generate()
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("no randomness: {e}")))?;
    let stored = StoredKey {
        name: name.to_owned(),
        key_hash: key.hash().to_hex(),
        identifier: key.identifier(),
        key_type,
        created_at_ms: Utc::now().timestamp_millis(),
    };
    store.insert_key(&stored, max_keys).await?;
    tracing::info!(name, identifier = %stored.identifier, key_type = %key_type, "key created");
    Ok((key, stored))
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
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<CreatedKey>, ApiError> {
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
        _ => ApiError::BadRequest(format!("could not read the request body: {e}")),
    })?;
    let (name, key_type) = parse_create_request(&body)?;
    let (key, stored) = create_key(&state.store, &name, key_type, state.max_api_keys).await?;
    state.outbox_written();
    Ok(Json(CreatedKey {
        api_key: key.expose_secret().to_owned(),
        info: stored.into(),
    }))
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
    Path(name): Path<String>,
) -> Result<Json<StatusOk>, ApiError> {
    let deleted = state
        .store
        .delete_key(&name)
        .await?
        .ok_or_else(|| ApiError::NotFound("no API key with this name".into()))?;
    state.outbox_written();
    if let Ok(hash) = KeyHash::from_hex(&deleted.key_hash) {
        // A false return is handled inside the cache (retried, refused here meanwhile).
        let _ = state.cache.revoke(&hash).await;
    }
    tracing::info!(name, identifier = %deleted.identifier, "key deleted");
    Ok(Json(StatusOk { status: "OK" }))
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
