//! Every `/api/v1/*` request carries a key. This module decides whether it is valid:
//! parse (checksum: garbage never reaches the database) → hash → cache → database.

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;
use metlo_shared::{parse_authorization, AuthorizationError, KeyHash, KeyRecord};

use crate::audit::FailureReason;
use crate::cache::Cached;
use crate::error::ApiError;
use crate::AppState;

/// The verified caller, available to handlers as an extension.
#[derive(Debug, Clone)]
pub struct Caller(pub KeyRecord);

pub async fn require_key(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let header = req
        .headers()
        .get(AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or("\u{0}"));
    let key = match parse_authorization(header) {
        Ok(key) => key,
        Err(AuthorizationError::Missing) => {
            record_failure(&state, &req, FailureReason::Missing, None);
            return Err(ApiError::Unauthorized(
                "missing API key: send it in the Authorization header",
            ));
        }
        Err(AuthorizationError::Malformed(_)) => {
            record_failure(&state, &req, FailureReason::Malformed, None);
            return Err(ApiError::Unauthorized("invalid API key"));
        }
    };
    let hash = key.hash();
    // Unknown, deleted and expired keys get the same answer: no hint a key once existed.
    let Some(record) = lookup(&state, &hash)
        .await?
        .filter(|r| !r.is_expired(now_unix_seconds()))
    else {
        record_failure(&state, &req, FailureReason::Invalid, Some(key.identifier()));
        return Err(ApiError::Unauthorized("invalid API key"));
    };
    state.usage.used(&hash);
    req.extensions_mut().insert(Caller(record));
    Ok(next.run(req).await)
}

/// Counts a failed authentication for the audit log (peer IP and route read only here,
/// off the success path).
fn record_failure(
    state: &AppState,
    req: &Request,
    reason: FailureReason,
    identifier: Option<String>,
) {
    state.auth_failures.record(
        req.extensions()
            .get::<ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.ip().to_string()),
        reason,
        identifier,
        req.extensions()
            .get::<MatchedPath>()
            .map(|p| p.as_str().to_owned()),
    );
}

/// The record for a key hash, through the cache. `None`: not a valid key.
pub async fn lookup(state: &AppState, hash: &KeyHash) -> Result<Option<KeyRecord>, ApiError> {
    if let Some(cached) = state.cache.get(hash).await {
        metrics::counter!("metlo_verify_cache_total", "result" => "hit").increment(1);
        return Ok(match cached {
            Cached::Valid(record) => Some(record),
            Cached::Absent => None,
        });
    }
    metrics::counter!("metlo_verify_cache_total", "result" => "miss").increment(1);
    let record = state.store.find_by_hash(hash).await?.map(|k| k.record());
    let entry = match &record {
        Some(r) => Cached::Valid(r.clone()),
        None => Cached::Absent,
    };
    state.cache.add(hash, entry).await;
    Ok(record)
}

fn now_unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
