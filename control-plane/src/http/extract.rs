//! What handlers take from a request: the verified caller (the auth layer,
//! [`super::auth`], puts it there), the [`Actor`] for the audit log, and JSON bodies
//! whose every rejection is our JSON error.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, MatchedPath, Request};
use axum::http::header::CONTENT_LENGTH;
use axum::http::request::Parts;
use axum::http::Extensions;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use metlo_shared::{KeyRecord, Role};
use serde::de::DeserializeOwned;

use super::client_ip::client_ip;
use super::context::RequestContext;
use super::error::ApiError;
use super::limits::MAX_BODY_BYTES;
use super::state::AppState;
use crate::service::audit::Actor;

/// The verified caller (the key check or the console's session put it in the request's
/// context). Without one the request is refused: fail closed.
#[derive(Debug, Clone)]
pub struct Caller(pub Arc<KeyRecord>);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        RequestContext::caller(&parts.extensions)
            .map(|caller| Caller(caller.clone()))
            .ok_or(ApiError::Unauthorized("invalid API key"))
    }
}

/// Who is making a request, for the audit log: the verified key's name and the client IP.
/// (A wrapper, not an extractor impl on `Actor`: that would make the service's type
/// depend on the HTTP state.)
pub struct Audited(pub Actor);

impl FromRequestParts<AppState> for Audited {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let caller = RequestContext::caller(&parts.extensions);
        Ok(Audited(Actor {
            name: caller.map(|c| c.name.clone()),
            ip: client_ip(&parts.extensions, &parts.headers, &state.trusted_proxies)
                .map(|ip| ip.to_string()),
            role: caller.map(|c| c.role),
            unconfirmed_session: RequestContext::unconfirmed_session(&parts.extensions),
        }))
    }
}

/// The route template (never the raw path: it may hold names), for the audit log.
pub(super) fn route(extensions: &Extensions) -> Option<String> {
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

/// Proof that the caller's key (verified by [`super::auth`]) has a role the route
/// allows. Otherwise 403, counted in the audit log like a failed authentication.
/// Zero-sized: checking costs a comparison, no copy of the caller.
pub struct Authorized<A: Allowed>(std::marker::PhantomData<A>);

impl<A: Allowed> FromRequestParts<AppState> for Authorized<A> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        // The auth layer runs first on every /api/v1 route; without it, refuse (fail closed).
        let Some(caller) = RequestContext::caller(&parts.extensions) else {
            return Err(ApiError::Unauthorized("invalid API key"));
        };
        if A::ROLES.contains(&caller.role) {
            return Ok(Authorized(std::marker::PhantomData));
        }
        state.auth_failures.record_forbidden(
            client_ip(&parts.extensions, &parts.headers, &state.trusted_proxies)
                .map(|ip| ip.to_string()),
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
/// body. `LIMIT` is the route's body limit: a longer body is answered 413.
pub struct JsonBody<T, const LIMIT: usize = MAX_BODY_BYTES>(pub T);

impl<T: DeserializeOwned, S: Send + Sync, const LIMIT: usize> FromRequest<S>
    for JsonBody<T, LIMIT>
{
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<Self, ApiError> {
        decode_json(&read_body(req, LIMIT).await?).map(JsonBody)
    }
}

/// The whole body, at most `limit` bytes (413 past it). Each route that reads a body says
/// its limit here, rather than a `DefaultBodyLimit` layer that would put its setting in
/// the extensions of every request, bodiless or not. A body announced as longer is
/// refused before a byte of it is read; a chunked or lying one when it reaches the limit.
pub async fn read_body(req: Request, limit: usize) -> Result<Bytes, ApiError> {
    let announced = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::PayloadTooLarge(limit));
    }
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(body) => Ok(body.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(ApiError::PayloadTooLarge(limit)),
        Err(e) => Err(ApiError::BadRequest(format!(
            "could not read the request body: {e}"
        ))),
    }
}

/// Decodes a JSON body as [`JsonBody`] does (public for the fuzz targets).
pub fn decode_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"null"
    } else {
        body
    };
    // Every body is an object (or empty / null where a route allows it); serde would
    // also take a struct from an array, by position.
    if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        return Err(ApiError::BadRequest(
            "invalid JSON body: expected an object, not an array".into(),
        ));
    }
    // With the field's path, so a bad nested value says where it is.
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        match path.as_str() {
            "." => ApiError::BadRequest(format!("invalid JSON body: {}", e.inner())),
            _ => ApiError::BadRequest(format!("invalid JSON body at {path}: {}", e.inner())),
        }
    })?;
    de.end()
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))?;
    Ok(value)
}
