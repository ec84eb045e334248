//! Signing in and out, and the layer that lets a session stand in for its admin key.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, Extensions, HeaderMap, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use metlo_shared::{ApiKey, KeyHash, KeyRecord, Role};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::clock::{now_ms, unix_seconds};
use crate::http::auth::{authenticate, refuse, Refusals};
use crate::http::client_ip::client_ip;
use crate::http::context::RequestContext;
use crate::http::error::ApiError;
use crate::http::extract::{route, Admins, Allowed, Audited, Caller, JsonBody};
use crate::http::state::AppState;
use crate::service::audit::{Actor, FailureReason};
use crate::service::console::{self, Session};
use crate::service::{self, verify};

const COOKIE: &str = "metlo_console";

/// The session of a signed-in request (put there by [`require_session`]).
#[derive(Clone)]
pub struct SignedIn {
    token: Arc<str>,
    csrf_token: Arc<str>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignIn {
    key: String,
}

/// What the page knows of its session.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionInfo {
    name: String,
    role: metlo_shared::Role,
    csrf_token: String,
    idle_timeout_seconds: u64,
}

fn info(record: &KeyRecord, csrf_token: &str, state: &AppState) -> SessionInfo {
    SessionInfo {
        name: record.name.clone(),
        role: record.role,
        csrf_token: csrf_token.to_owned(),
        idle_timeout_seconds: state.console.idle.as_secs(),
    }
}

/// `POST /console/sign-in` `{"key": "…"}`: an admin key → a session cookie. Every failure
/// is audited and spends the source's failed-authentication budget, like a bad key on the
/// API (so sign-in is no faster a way to guess keys).
pub async fn sign_in(
    State(state): State<AppState>,
    headers: HeaderMap,
    extensions: Extensions,
    JsonBody(SignIn { key }): JsonBody<SignIn>,
) -> Result<Response, ApiError> {
    let (state, extensions, headers) = (&state, &extensions, &headers);
    if !same_origin(state, extensions, headers) {
        return Err(cross_site());
    }
    const SAY: Refusals = Refusals {
        missing: "enter an admin key",
        malformed: "this is not an API key: check that it was copied whole",
        invalid: "invalid API key: unknown, deleted, disabled or expired",
    };
    let (record, hash) = authenticate(state, extensions, headers, Some(key.trim()), &SAY).await?;
    let now = now_ms();
    let ip = client_ip(extensions, headers, &state.trusted_proxies);
    if !Admins::ROLES.contains(&record.role) {
        state.auth_failures.record_forbidden(
            ip.map(|ip| ip.to_string()),
            route(extensions),
            &record,
            Admins::ROLES,
        );
        state.failure_limiter.failed(ip)?;
        return Err(service::Error::Forbidden(format!(
            "only an admin key can sign in to the console; this key's role is {}",
            record.role.as_str()
        ))
        .into());
    }
    // Audited first: a session is never open without its entry.
    let actor = Actor {
        name: Some(record.name.clone()),
        ip: ip.map(|ip| ip.to_string()),
        role: Some(record.role),
        unconfirmed_session: false,
    };
    state
        .store
        .append_audit(&[actor.entry("console.sign_in", &record.name, json!({}))])
        .await
        .map_err(service::Error::from)?;
    let opened = console::open(&state.store, &state.console, &hash, now).await?;
    let cookie = format!(
        "{COOKIE}={}{}",
        opened.token,
        cookie_attributes(state, extensions, headers)
    );
    let mut response = Json(info(&record, &opened.csrf_token, state)).into_response();
    set_cookie(&mut response, &cookie);
    Ok(response)
}

/// `GET /console/session`: who is signed in, and the CSRF token for the page's changes.
pub async fn current(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Extension(signed_in): Extension<SignedIn>,
) -> Json<SessionInfo> {
    Json(info(&caller, &signed_in.csrf_token, &state))
}

/// `POST /console/sign-out`: ends the session and clears the cookie.
pub async fn sign_out(
    State(state): State<AppState>,
    headers: HeaderMap,
    extensions: Extensions,
    Audited(actor): Audited,
    Extension(signed_in): Extension<SignedIn>,
) -> Result<Response, ApiError> {
    console::end(&state.store, &signed_in.token).await?;
    let name = actor.name.clone().unwrap_or_default();
    state
        .store
        .append_audit(&[actor.entry("console.sign_out", &name, json!({}))])
        .await
        .map_err(service::Error::from)?;
    let mut response = Json(json!({"status": "OK"})).into_response();
    set_cookie(
        &mut response,
        &format!(
            "{COOKIE}={}; Max-Age=0",
            cookie_attributes(&state, &extensions, &headers)
        ),
    );
    Ok(response)
}

/// The layer of every signed-in route: a session in force, acting as an admin key that is
/// still valid, and on every change the session's CSRF token and a same-origin request.
pub async fn require_session(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let mut response = match admit(&state, &mut req).await {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    };
    // Session answers (the CSRF token, keys, the audit log) are never cached.
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn admit(state: &AppState, req: &mut Request) -> Result<(), ApiError> {
    const SIGNED_OUT: &str = "not signed in, or the console session has ended: sign in again";
    let Some(token) = cookie(req.headers()) else {
        return Err(ApiError::Unauthorized(SIGNED_OUT));
    };
    let now = now_ms();
    // A cookie is looked up only within the source's failed-authentication budget (a
    // session in use lately skips it, as a key valid lately does): an unknown cookie —
    // made up, or of a session that ended — is a failed authentication, audited and
    // spent like a bad key, and remembered so it costs no second lookup.
    let token_hash = KeyHash::of_text(&token);
    if state.unknown_sessions.contains_key(&token_hash) {
        return Err(refuse_cookie(state, req));
    }
    if !state.recently_valid.contains(&token_hash) {
        let ip = client_ip(req.extensions(), req.headers(), &state.trusted_proxies);
        state.failure_limiter.check(ip)?;
    }
    let Some(session) = console::find(&state.store, &state.console, &token, now).await? else {
        state.unknown_sessions.insert(token_hash, ());
        return Err(refuse_cookie(state, req));
    };
    state.recently_valid.saw(&token_hash);
    if changes_state(req.method()) {
        if !same_origin(state, req.extensions(), req.headers()) {
            return Err(cross_site());
        }
        if !csrf_sent(req.headers(), &session) {
            return Err(service::Error::Forbidden(
                "missing or wrong X-CSRF-Token: reload the console".into(),
            )
            .into());
        }
    }
    // The key the session acts as, as it is now (cached like any key).
    let record = verify::lookup(
        &state.store,
        &state.cache,
        // A session's key was valid at sign-in: not public traffic's gate.
        &state.trusted_lookups,
        &session.key_hash,
        || Ok(()),
    )
    .await?
    .filter(|r| !r.is_expired(unix_seconds(now)) && Admins::ROLES.contains(&r.role));
    let Some(record) = record else {
        console::end(&state.store, &token).await?;
        return Err(ApiError::Unauthorized(
            "the admin key of this session was deleted, disabled, rolled or has expired: sign in again",
        ));
    };
    state.usage.used(&session.key_hash, now);
    // A session administers, nothing more: a legacy key (every power) signs in with the
    // admin role only, so the console's copy of the edge and client routes refuses it.
    let record = if record.role == Role::Legacy {
        Arc::new(KeyRecord {
            role: Role::Admin,
            ..(*record).clone()
        })
    } else {
        record
    };
    RequestContext::set_caller(req.extensions_mut(), record);
    if !key_confirmed(req.headers(), &session) {
        RequestContext::set_unconfirmed_session(req.extensions_mut());
    }
    req.extensions_mut().insert(SignedIn {
        token: token.into(),
        csrf_token: session.csrf_token.into(),
    });
    Ok(())
}

fn refuse_cookie(state: &AppState, req: &Request) -> ApiError {
    refuse(
        state,
        req.extensions(),
        req.headers(),
        FailureReason::Invalid,
        None,
        "not signed in, or the console session has ended: sign in again",
    )
}

/// Whether the request gives the session's own key again (`X-Metlo-Confirm-Key`), as
/// the console asks before it makes a new admin or edge secret.
fn key_confirmed(headers: &HeaderMap, session: &Session) -> bool {
    headers
        .get("x-metlo-confirm-key")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| ApiKey::parse(v.trim()).ok())
        .is_some_and(|key| key.hash() == session.key_hash)
}

fn changes_state(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

fn csrf_sent(headers: &HeaderMap, session: &Session) -> bool {
    headers
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|sent| session.csrf_matches(sent))
}

/// A browser says where a request comes from (`Sec-Fetch-Site`, `Origin`); whatever it
/// says must be this origin: the `Host`, or the `X-Forwarded-Host` of a trusted proxy
/// (which may rewrite `Host`). A client that says nothing (curl) still needs the token.
fn same_origin(state: &AppState, extensions: &Extensions, headers: &HeaderMap) -> bool {
    let text = |name: &str| headers.get(name).map(|v| v.to_str().unwrap_or(""));
    if text("sec-fetch-site").is_some_and(|site| site != "same-origin") {
        return false;
    }
    let Some(origin) = text("origin") else {
        return true;
    };
    let Some((_, authority)) = origin.split_once("://") else {
        return false;
    };
    text("host") == Some(authority)
        || (from_trusted_proxy(state, extensions)
            && text("x-forwarded-host")
                .is_some_and(|h| h.split(',').next_back().map(str::trim) == Some(authority)))
}

fn from_trusted_proxy(state: &AppState, extensions: &Extensions) -> bool {
    RequestContext::peer(extensions)
        .map(|peer| peer.ip().to_canonical())
        .is_some_and(|ip| state.trusted_proxies.iter().any(|n| n.contains(&ip)))
}

fn cross_site() -> ApiError {
    service::Error::Forbidden("cross-site request refused".into()).into()
}

fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_owned())
        .filter(|value| !value.is_empty())
}

/// The cookie's attributes. `Secure` when configured, when the browser's `Origin` is
/// `https://` (the page came over TLS, whatever the proxies in between), or when a
/// trusted proxy says the client came over TLS.
fn cookie_attributes(
    state: &AppState,
    extensions: &Extensions,
    headers: &HeaderMap,
) -> &'static str {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let secure = state.console.secure_cookie
        || text("origin").is_some_and(|o| o.starts_with("https://"))
        || (from_trusted_proxy(state, extensions)
            && text("x-forwarded-proto").is_some_and(|p| p.trim().eq_ignore_ascii_case("https")));
    if secure {
        "; Path=/console; HttpOnly; SameSite=Strict; Secure"
    } else {
        "; Path=/console; HttpOnly; SameSite=Strict"
    }
}

fn set_cookie(response: &mut Response, cookie: &str) {
    if let Ok(value) = HeaderValue::from_str(cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}
