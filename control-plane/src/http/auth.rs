//! The auth layer: every `/api/v1/*` request carries a key. Parse (checksum: garbage
//! never reaches the database) → hash → cache → database; the verified [`Caller`] goes
//! into the request's extensions for the handlers' [`super::extract::Authorized`].
//!
//! A tower layer rather than `from_fn`, for its fast path: a key this process's cache
//! knows as valid is checked synchronously in `call` and the route is called directly —
//! no boxed future, no boxed `Next`, no clone of the route. Everything else (a miss, a
//! Redis round trip, every failure) takes the slow path, one boxed future.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::Request;
use axum::http::header::AUTHORIZATION;
use axum::http::{Extensions, HeaderMap};
use axum::response::{IntoResponse, Response};
use futures_util::future::Either;
use metlo_shared::{parse_authorization, AuthorizationError, KeyHash, KeyRecord};
use tower::{Layer, Service};

use super::client_ip::client_ip;
use super::context::RequestContext;
use super::error::ApiError;
use super::extract::route;
use super::state::AppState;
use crate::clock::{now_ms, unix_seconds};
use crate::service;
use crate::service::audit::FailureReason;
use crate::service::verify;

#[derive(Clone)]
pub struct RequireKeyLayer(pub AppState);

impl<S> Layer<S> for RequireKeyLayer {
    type Service = RequireKey<S>;

    fn layer(&self, inner: S) -> RequireKey<S> {
        RequireKey {
            inner,
            state: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RequireKey<S> {
    inner: S,
    state: AppState,
}

type SlowPath = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

impl<S> Service<Request> for RequireKey<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<S::Future, SlowPath>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        if let Some(record) = cached_valid(&self.state, &req) {
            RequestContext::set_caller(req.extensions_mut(), record);
            return Either::Left(self.inner.call(req));
        }
        // The route that was made ready is the one called; a clone stays for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let state = self.state.clone();
        Either::Right(Box::pin(async move {
            match require_key(&state, req).await {
                Ok(req) => inner.call(req).await,
                Err(e) => Ok(e.into_response()),
            }
        }))
    }
}

/// The fast path: a well-formed key that this process's cache holds as valid and not
/// expired (its use recorded). `None` for anything else, which [`require_key`] decides.
fn cached_valid(state: &AppState, req: &Request) -> Option<Arc<KeyRecord>> {
    let header = req.headers().get(AUTHORIZATION)?.to_str().ok()?;
    let hash = parse_authorization(Some(header)).ok()?.hash();
    let record = verify::cached(&state.cache, &hash)??;
    let now = now_ms();
    if record.is_expired(unix_seconds(now)) {
        return None;
    }
    state.usage.used(&hash, now);
    Some(record)
}

/// The slow path: unknown, deleted and expired keys get the same answer (no hint a key
/// once existed); a source past its failure budget gets 429 instead (and no lookup).
async fn require_key(state: &AppState, mut req: Request) -> Result<Request, ApiError> {
    const SAY: Refusals = Refusals {
        missing: "missing API key: send it in the Authorization header",
        malformed: "invalid API key",
        invalid: "invalid API key",
    };
    let header = req
        .headers()
        .get(AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or("\u{0}"));
    let (record, hash) = authenticate(state, req.extensions(), req.headers(), header, &SAY).await?;
    state.usage.used(&hash, now_ms());
    RequestContext::set_caller(req.extensions_mut(), record);
    Ok(req)
}

/// What a refused key is told, by the entry point that refused it.
pub(super) struct Refusals {
    pub missing: &'static str,
    pub malformed: &'static str,
    pub invalid: &'static str,
}

/// The key check every entry point shares (the API's key layer, the console's sign-in):
/// parse (checksum: garbage never reaches the database) → hash → cache → database under
/// the source's failure budget (skipped for a key valid lately); every refusal audited
/// and counted. The valid, unexpired record and its hash.
pub(super) async fn authenticate(
    state: &AppState,
    extensions: &Extensions,
    headers: &HeaderMap,
    presented: Option<&str>,
    say: &Refusals,
) -> Result<(Arc<KeyRecord>, KeyHash), ApiError> {
    let key = match parse_authorization(presented) {
        Ok(key) => key,
        Err(AuthorizationError::Missing) => {
            let reason = FailureReason::Missing;
            return Err(refuse(
                state,
                extensions,
                headers,
                reason,
                None,
                say.missing,
            ));
        }
        Err(AuthorizationError::Malformed(_)) => {
            let reason = FailureReason::Malformed;
            return Err(refuse(
                state,
                extensions,
                headers,
                reason,
                None,
                say.malformed,
            ));
        }
    };
    let hash = key.hash();
    let queried = AtomicBool::new(false);
    // A key valid lately skips the budget and takes the gate public traffic cannot fill.
    let trusted = state.recently_valid.contains(&hash);
    let gate = if trusted {
        &state.trusted_lookups
    } else {
        &state.lookups
    };
    let found = verify::lookup(&state.store, &state.cache, gate, &hash, || {
        queried.store(true, Ordering::Relaxed);
        if trusted {
            return Ok(());
        }
        let ip = client_ip(extensions, headers, &state.trusted_proxies);
        state.failure_limiter.check(ip)
    })
    .await;
    let found = match found {
        Err(limited @ service::Error::TooManyFailures(_)) => {
            state
                .auth_failures
                .record_past_budget(FailureReason::Limited);
            return Err(limited.into());
        }
        found => found?,
    };
    let Some(record) = found.filter(|r| !r.is_expired(unix_seconds(now_ms()))) else {
        let (reason, id) = (FailureReason::Invalid, Some(key.identifier()));
        return Err(refuse(state, extensions, headers, reason, id, say.invalid));
    };
    if queried.load(Ordering::Relaxed) {
        state.recently_valid.saw(&hash);
    }
    Ok((record, hash))
}

/// A failed authentication: spent from the source's budget (client IP and route read
/// only here, off the success path) and itemised for the audit log — 401; or, once the
/// budget is spent, 429 and only counted (a source past its budget writes no rows).
pub(super) fn refuse(
    state: &AppState,
    extensions: &Extensions,
    headers: &HeaderMap,
    reason: FailureReason,
    identifier: Option<String>,
    message: &'static str,
) -> ApiError {
    let ip = client_ip(extensions, headers, &state.trusted_proxies);
    match state.failure_limiter.failed(ip) {
        Ok(()) => {
            state.auth_failures.record(
                ip.map(|ip| ip.to_string()),
                reason,
                identifier,
                route(extensions),
            );
            ApiError::Unauthorized(message)
        }
        Err(limited) => {
            state.auth_failures.record_past_budget(reason);
            limited.into()
        }
    }
}
