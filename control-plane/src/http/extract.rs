//! What handlers take from a request: the verified caller (the auth middleware puts it
//! there), the [`Actor`] for the audit log, and JSON bodies whose every rejection is our
//! JSON error.

use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, MatchedPath, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::Extensions;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use metlo_shared::{parse_authorization, AuthorizationError, KeyRecord, Role};
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::limits::MAX_BODY_BYTES;
use super::state::AppState;
use crate::clock::now_unix_seconds;
use crate::service::audit::{Actor, FailureReason};
use crate::service::keys::lookup;

/// The verified caller, available to handlers as an extension.
#[derive(Debug, Clone)]
pub struct Caller(pub KeyRecord);

/// Every `/api/v1/*` request carries a key: parse (checksum: garbage never reaches the
/// database) → hash → cache → database. Unknown, deleted and expired keys get the same
/// answer: no hint a key once existed.
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
    let Some(record) = lookup(&state.store, &state.cache, &hash)
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
        peer_ip(req.extensions()),
        reason,
        identifier,
        route(req.extensions()),
    );
}

/// Who is making a request: the verified key's name and the peer IP.
impl<S: Send + Sync> FromRequestParts<S> for Actor {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let caller = parts.extensions.get::<Caller>();
        Ok(Actor {
            name: caller.map(|c| c.0.name.clone()),
            ip: peer_ip(&parts.extensions),
            role: caller.map(|c| c.0.role),
        })
    }
}

/// The TCP peer's address, for the audit log.
fn peer_ip(extensions: &Extensions) -> Option<String> {
    extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string())
}

/// The route template (never the raw path: it may hold names), for the audit log.
fn route(extensions: &Extensions) -> Option<String> {
    extensions
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
}

/// Which roles may call a route: every handler under `/api/v1` takes an
/// [`Authorized`] of one of these as its first argument, so its signature says who may
/// call it.
pub trait Allowed: Send + Sync + 'static {
    const ROLES: &'static [Role];
}

/// Key management and the audit log.
pub struct Admins;
/// The edge Worker's lookups and usage reports.
pub struct EdgeWorkers;
/// API traffic (Metlo's ingestors ping `verify`).
pub struct Clients;

impl Allowed for Admins {
    const ROLES: &'static [Role] = &[Role::Admin, Role::Legacy];
}
impl Allowed for EdgeWorkers {
    const ROLES: &'static [Role] = &[Role::Edge, Role::Legacy];
}
impl Allowed for Clients {
    const ROLES: &'static [Role] = &[Role::Client, Role::Legacy];
}

/// Proof that the caller's key (verified by [`require_key`]) has a role the route
/// allows. Otherwise 403, counted in the audit log like a failed authentication.
/// Zero-sized: checking costs a comparison, no copy of the caller.
pub struct Authorized<A: Allowed>(std::marker::PhantomData<A>);

impl<A: Allowed> FromRequestParts<AppState> for Authorized<A> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        // `require_key` runs first on every /api/v1 route; without it, refuse (fail closed).
        let Some(Caller(caller)) = parts.extensions.get::<Caller>() else {
            return Err(ApiError::Unauthorized("invalid API key"));
        };
        if A::ROLES.contains(&caller.role) {
            return Ok(Authorized(std::marker::PhantomData));
        }
        state.auth_failures.record_forbidden(
            peer_ip(&parts.extensions),
            route(&parts.extensions),
            caller,
            A::ROLES,
        );
        Err(ApiError::Forbidden {
            role: caller.role,
            required: A::ROLES,
        })
    }
}

/// A JSON body, whatever the Content-Type (Metlo's clients do not all send one), whose
/// rejections are JSON errors like every other (axum's own `Json` answers 415/422 in
/// plain text). An empty body reads as `null`, so `JsonBody<Option<T>>` takes an empty
/// body. `LIMIT` is the route's body limit (its `DefaultBodyLimit`), for the 413's message.
pub struct JsonBody<T, const LIMIT: usize = MAX_BODY_BYTES>(pub T);

impl<T: DeserializeOwned, S: Send + Sync, const LIMIT: usize> FromRequest<S>
    for JsonBody<T, LIMIT>
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let body = Bytes::from_request(req, state)
            .await
            .map_err(|e| match e.status() {
                StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge(LIMIT),
                _ => ApiError::BadRequest(format!("could not read the request body: {e}")),
            })?;
        decode_json(&body).map(JsonBody)
    }
}

/// Decodes a JSON body as [`JsonBody`] does (public for the fuzz targets).
pub fn decode_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"null"
    } else {
        body
    };
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}
