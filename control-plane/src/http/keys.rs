//! The keys resource: Metlo's routes, paths and JSON field names, exactly; and the two
//! routes the edge Worker and Metlo's ingestors call (`by-hash`, `verify`).

use axum::extract::{Path, RawQuery, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch};
use axum::Json;
use metlo_shared::permissions::Expression;
use metlo_shared::{KeyHash, KeyRecord, KeyType};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ErrorBody};
use super::extract::{Admins, Audited, Authorized, Caller, Clients, EdgeWorkers, JsonBody};
use super::state::AppState;
use crate::clock::now_ms;
use crate::service::credits::TopUp;
use crate::service::key_lists::{self, KeyPage};
use crate::service::key_updates::{self, UpdateKeyRequest, UpdatedKey};
use crate::service::keys::{
    self, CreateKeyRequest, CreatedKey, KeyInfo, RollKeyRequest, RolledKey,
};
use crate::service::verify;

pub fn router() -> OpenApiRouter<AppState> {
    let mut router = OpenApiRouter::new()
        .routes(routes!(create))
        .routes(routes!(list))
        .routes(routes!(onboarding))
        .routes(routes!(remove))
        .routes(routes!(end_sessions))
        .routes(routes!(roll))
        .routes(routes!(update))
        .routes(routes!(add_credits))
        .routes(routes!(show))
        .routes(routes!(by_hash))
        .routes(routes!(verify));
    // A fixed path wins over `{name}`, so keys named like one (Metlo allowed these names)
    // get their PATCH here, next to the fixed route's own method (and `create` its GET;
    // GET of `list` and `onboarding` are the lists).
    for name in ["create", "list", "onboarding"] {
        router = router.route(
            &format!("/api/v1/keys/{name}"),
            patch(
                move |who: Authorized<Admins>, state: State<AppState>, actor: Audited, body| {
                    update(who, state, actor, Path(name.to_owned()), body)
                },
            ),
        );
    }
    router.route(
        "/api/v1/keys/create",
        get(|who: Authorized<Admins>, state: State<AppState>| {
            show(who, state, Path("create".to_owned()))
        }),
    )
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StatusOk {
    #[schema(example = "OK")]
    pub status: &'static str,
}

/// Metlo's answer to a delete, and the edge's promise.
#[derive(Debug, Serialize, ToSchema)]
pub struct Deleted {
    #[schema(example = "OK")]
    pub status: &'static str,
    /// ISO 8601: by when every edge location refuses the key (the edge's revocation
    /// bound after the delete).
    #[serde(rename = "refusedEverywhereBy")]
    pub refused_everywhere_by: String,
}

/// Create a key. The response is the only time the full key is shown.
#[utoipa::path(post, path = "/api/v1/keys/create", tag = "keys", request_body = CreateKeyRequest,
    responses(
        (status = 200, body = CreatedKey),
        (status = 400, description = "Missing, too long or duplicate name, invalid type, bad JSON, or limit reached", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The key's role may not call this route", body = ErrorBody),
        (status = 413, description = "Body larger than 16 KiB", body = ErrorBody),
        (status = 503, body = ErrorBody),
    ), security(("api_key" = ["admin"])))]
async fn create(
    _: Authorized<Admins>,
    State(state): State<AppState>,
    Audited(actor): Audited,
    JsonBody(body): JsonBody<Option<CreateKeyRequest>>,
) -> Result<Json<CreatedKey>, ApiError> {
    let new = body.unwrap_or_default().validate(now_ms())?;
    Ok(Json(
        keys::create_key(&state.store, &new, state.max_api_keys, &actor).await?,
    ))
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
        (status = 401, body = ErrorBody),
        (status = 403, description = "The key's role may not call this route", body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 503, body = ErrorBody),
    ), security(("api_key" = ["admin"])))]
async fn roll(
    _: Authorized<Admins>,
    State(state): State<AppState>,
    Audited(actor): Audited,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<Option<RollKeyRequest>>,
) -> Result<Json<RolledKey>, ApiError> {
    let overlap = body.unwrap_or_default().overlap()?;
    Ok(Json(
        keys::roll_key(&state.store, &state.cache, &name, overlap, &actor).await?,
    ))
}

/// Change a key without re-issuing it: `enabled`, `expiresAt`, `meta` (only the fields
/// given; null clears `expiresAt` and `meta`). A disabled key is refused everywhere like
/// an unknown key (the edge within its revocation bound) until enabled again; every
/// change reaches KV through the outbox and the audit log with before and after.
#[utoipa::path(patch, path = "/api/v1/keys/{name}", tag = "keys",
    params(("name" = String, Path, description = "Key name, URL-encoded")),
    request_body = UpdateKeyRequest,
    responses(
        (status = 200, body = UpdatedKey),
        (status = 400, description = "Bad JSON, unknown field, nothing to change, invalid expiresAt or meta, or disabling the last admin key", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The key's role may not call this route", body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 503, body = ErrorBody),
    ), security(("api_key" = ["admin"])))]
async fn update(
    _: Authorized<Admins>,
    State(state): State<AppState>,
    Audited(actor): Audited,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<UpdateKeyRequest>,
) -> Result<Json<UpdatedKey>, ApiError> {
    let changes = body.resolve(&state.store, now_ms()).await?;
    Ok(Json(
        key_updates::update_key(&state.store, &state.cache, &name, &changes, &actor).await?,
    ))
}

/// Add credits to a key that has some (a top-up): concurrent top-ups all count, once
/// each, at the edge as on the control plane. Audited as a `key.update` of `credits`.
#[utoipa::path(post, path = "/api/v1/keys/{name}/credits", tag = "keys",
    params(("name" = String, Path, description = "Key name, URL-encoded")),
    request_body = TopUp,
    responses(
        (status = 200, body = UpdatedKey),
        (status = 400, description = "Bad JSON, unknown field, or `add` out of range", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The key's role may not call this route", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "The key has no credits (set them with PATCH first)", body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 503, body = ErrorBody),
    ), security(("api_key" = ["admin"])))]
async fn add_credits(
    _: Authorized<Admins>,
    State(state): State<AppState>,
    Audited(actor): Audited,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<TopUp>,
) -> Result<Json<UpdatedKey>, ApiError> {
    Ok(Json(
        key_updates::add_credits(&state.store, &state.cache, &name, body, &actor).await?,
    ))
}

/// One key's metadata (never the key). A key named `list` or `onboarding` is read from
/// the lists: those paths are theirs.
#[utoipa::path(get, path = "/api/v1/keys/{name}", tag = "keys",
    params(("name" = String, Path, description = "Key name, URL-encoded")),
    responses((status = 200, body = KeyInfo), (status = 401, body = ErrorBody),
        (status = 403, description = "The key's role may not call this route", body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("api_key" = ["admin"])))]
async fn show(
    _: Authorized<Admins>,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<KeyInfo>, ApiError> {
    Ok(Json(key_lists::key_info(&state.store, &name).await?))
}

/// `?limit=&cursor=` of the list routes.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Keys per page, 1–1000 (default 100). Given (or `cursor` given), the answer is a
    /// page `{keys, nextCursor}`; neither given, Metlo's plain array.
    #[param(value_type = Option<i64>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
    /// The previous page's `nextCursor`, as it is.
    cursor: Option<String>,
    /// Only keys whose name contains this (ASCII letters in any case). Given, the answer
    /// is a page.
    name: Option<String>,
    /// Only keys of this type. Given, the answer is a page.
    #[serde(rename = "type")]
    #[param(value_type = Option<KeyType>)]
    key_type: Option<String>,
}

/// Every key (Metlo's plain array, without `limit` and `cursor`), or one page of them.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum KeyList {
    All(Vec<KeyInfo>),
    Page(KeyPage),
}

async fn list_response(
    state: &AppState,
    only: Option<KeyType>,
    query: Option<&str>,
) -> Result<Json<KeyList>, ApiError> {
    let q: ListQuery = serde_urlencoded::from_str(query.unwrap_or(""))
        .map_err(|e| ApiError::BadRequest(format!("invalid query: {e}")))?;
    let only = match q.key_type.as_deref().map(str::trim) {
        None => only,
        Some(t) => {
            let wanted = t.parse::<KeyType>().map_err(|_| {
                ApiError::BadRequest("type must be GENERIC, ONBOARDING, GCP or AWS".into())
            })?;
            if only.is_some_and(|o| o != wanted) {
                return Err(ApiError::BadRequest(
                    "type: the onboarding list has ONBOARDING keys only".into(),
                ));
            }
            Some(wanted)
        }
    };
    let name = q.name.as_deref().filter(|n| !n.is_empty());
    let filtered = name.is_some() || q.key_type.is_some();
    if q.limit.is_none() && q.cursor.is_none() && !filtered {
        let all = key_lists::list_unpaged(&state.store, only, state.list_unpaged_max).await?;
        return Ok(Json(KeyList::All(all)));
    }
    let limit = match q.limit {
        None => key_lists::DEFAULT_LIST_PAGE,
        Some(v) => v.trim().parse().map_err(|_| {
            ApiError::BadRequest(format!(
                "limit must be a whole number from 1 to {}",
                key_lists::MAX_LIST_PAGE
            ))
        })?,
    };
    // An empty cursor is the first page.
    let cursor = q.cursor.as_deref().filter(|c| !c.is_empty());
    let page = key_lists::list_page(&state.store, only, name, limit, cursor).await?;
    Ok(Json(KeyList::Page(page)))
}

/// List keys (metadata only), newest first: all of them as Metlo's plain array (up to
/// `LIST_UNPAGED_MAX`, past which a 400 says to page), or a page with `?limit=&cursor=`.
#[utoipa::path(get, path = "/api/v1/keys/list", tag = "keys", params(ListQuery),
    responses((status = 200, body = KeyList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, description = "The key's role may not call this route", body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("api_key" = ["admin"])))]
async fn list(
    _: Authorized<Admins>,
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Json<KeyList>, ApiError> {
    list_response(&state, None, query.as_deref()).await
}

/// List ONBOARDING keys only, newest first; paged as `/api/v1/keys/list`.
#[utoipa::path(get, path = "/api/v1/keys/onboarding", tag = "keys", params(ListQuery),
    responses((status = 200, body = KeyList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, description = "The key's role may not call this route", body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("api_key" = ["admin"])))]
async fn onboarding(
    _: Authorized<Admins>,
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Json<KeyList>, ApiError> {
    list_response(&state, Some(KeyType::Onboarding), query.as_deref()).await
}

/// Delete a key by name. It is refused everywhere on the control plane at once.
#[utoipa::path(delete, path = "/api/v1/keys/{name}/delete", tag = "keys",
    params(("name" = String, Path, description = "Key name, URL-encoded")),
    responses((status = 200, body = Deleted), (status = 401, body = ErrorBody),
        (status = 403, description = "The key's role may not call this route", body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("api_key" = ["admin"])))]
async fn remove(
    _: Authorized<Admins>,
    State(state): State<AppState>,
    Audited(actor): Audited,
    Path(name): Path<String>,
) -> Result<Json<Deleted>, ApiError> {
    let refused_everywhere_by =
        keys::delete_key(&state.store, &state.cache, &name, true, &actor).await?;
    Ok(Json(Deleted {
        status: "OK",
        refused_everywhere_by,
    }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SessionsEnded {
    /// Console sessions ended.
    pub ended: u64,
}

/// Sign out everywhere: end every console session opened with this key (any of its
/// secrets). For a session cookie that may have leaked; the key itself keeps working.
#[utoipa::path(delete, path = "/api/v1/keys/{name}/sessions", tag = "keys",
    params(("name" = String, Path, description = "Key name, URL-encoded")),
    responses((status = 200, body = SessionsEnded), (status = 401, body = ErrorBody),
        (status = 403, description = "The key's role may not call this route", body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("api_key" = ["admin"])))]
async fn end_sessions(
    _: Authorized<Admins>,
    State(state): State<AppState>,
    Audited(actor): Audited,
    Path(name): Path<String>,
) -> Result<Json<SessionsEnded>, ApiError> {
    let ended = keys::end_sessions(&state.store, &name, &actor).await?;
    Ok(Json(SessionsEnded { ended }))
}

/// The query of `/api/v1/verify`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct VerifyQuery {
    /// A permission expression the key must satisfy (`orders:read AND (a OR b)`); 403
    /// when it does not.
    #[param(min_length = 1, max_length = 512)]
    permission: Option<String>,
}

/// Answers 200 `OK` when the request's key is valid (Metlo's ingestors ping this); with
/// `Accept: application/json`, the key's name, identifier, type, role, permissions and
/// meta instead. `?permission=` checks an expression of the key's permissions: 403
/// `insufficient_scope` when it does not hold (checked before the rate limit counts). A key
/// with a rate limit is counted here (apart from the edge's count): past it, 429 with
/// `Retry-After`; its answers carry `RateLimit-Policy` and `RateLimit`.
#[utoipa::path(get, path = "/api/v1/verify", tag = "keys", params(VerifyQuery),
    responses((status = 200, content((String = "text/plain"), (VerifiedKey = "application/json")), headers(
            ("RateLimit-Policy" = String, description = "Keys with a rate limit: `\"key\";q=<requests>;w=<seconds>`"),
            ("RateLimit" = String, description = "Keys with a rate limit: `\"key\";r=<remaining>;t=<seconds to the window's end>`"))),
        (status = 400, description = "A malformed permission expression", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The key's role may not call this route, or its permissions do not satisfy `permission`", body = ErrorBody),
        (status = 429, description = "The key's rate limit is spent until the window ends (`Retry-After`)", body = ErrorBody),
        (status = 503, body = ErrorBody)),
    security(("api_key" = ["client"])))]
async fn verify(
    _: Authorized<Clients>,
    State(state): State<AppState>,
    Caller(caller): Caller,
    RawQuery(query): RawQuery,
    headers: header::HeaderMap,
) -> Result<Response, ApiError> {
    // A `&str` answers as `text/plain; charset=utf-8` by itself (a header set again
    // from a string would be parsed and inserted for every call).
    const OK: &str = "OK";
    if let Some(query) = query.as_deref().filter(|q| !q.is_empty()) {
        let q: VerifyQuery = serde_urlencoded::from_str(query)
            .map_err(|e| ApiError::BadRequest(format!("invalid query: {e}")))?;
        if let Some(text) = q.permission {
            let required = Expression::parse(&text)
                .map_err(|e| ApiError::BadRequest(format!("permission: {e}")))?;
            if !required.holds(&caller.permissions) {
                return Err(ApiError::InsufficientPermission(required.to_string()));
            }
        }
    }
    let answer = || -> Response {
        if wants_json(&headers) {
            Json(VerifiedKey::from(caller.as_ref())).into_response()
        } else {
            OK.into_response()
        }
    };
    let Some(limit) = caller.rate_limit else {
        return Ok(answer());
    };
    let outcome = state
        .key_limits
        .hit(&caller.name, limit, now_ms().max(0) as u64)
        .await?;
    let mut response = if outcome.allowed {
        answer()
    } else {
        ApiError::RateLimited(outcome.reset_seconds).into_response()
    };
    for (name, value) in outcome.headers(limit) {
        if let Ok(value) = header::HeaderValue::from_str(&value) {
            response
                .headers_mut()
                .insert(header::HeaderName::from_static(name), value);
        }
    }
    Ok(response)
}

/// `/api/v1/verify`'s answer with `Accept: application/json`: who the key is.
#[derive(Debug, Serialize, ToSchema)]
pub struct VerifiedKey {
    pub name: String,
    /// `metlo.<key_identifier>`.
    pub identifier: String,
    #[serde(rename = "for")]
    pub key_for: KeyType,
    pub role: metlo_shared::Role,
    /// Sorted; empty: none.
    pub permissions: Vec<String>,
    /// The key's meta object; null: none.
    #[schema(value_type = Option<Object>)]
    pub meta: Option<serde_json::Value>,
}

impl From<&KeyRecord> for VerifiedKey {
    fn from(r: &KeyRecord) -> Self {
        VerifiedKey {
            name: r.name.clone(),
            identifier: r.identifier.clone(),
            key_for: r.key_type,
            role: r.role,
            permissions: r.permissions.clone(),
            meta: record_meta(r),
        }
    }
}

/// Does the client ask for JSON (`Accept` naming `application/json`)? Metlo's ingestors
/// send no `Accept` and keep their plain `OK`.
fn wants_json(headers: &header::HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("application/json")
        })
}

/// The key's meta as JSON, from the record's base64url (how the edge forwards it).
fn record_meta(r: &KeyRecord) -> Option<serde_json::Value> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(r.meta.as_deref()?)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The response header of `by-hash` saying how long the Worker may keep the record.
pub const KEEP_HEADER: &str = "x-metlo-kv-ttl-seconds";

/// The KV record of the key with this SHA-256 (lowercase hex), for the edge Worker. The
/// raw client key never leaves the edge. `X-Metlo-Kv-Ttl-Seconds` says how long the
/// Worker may keep it (in KV and in its isolate): only the cache TTL when the KV sync is
/// off, as then nothing would delete a record the Worker wrote.
#[utoipa::path(get, path = "/api/v1/keys/by-hash/{hash}", tag = "edge",
    params(("hash" = String, Path, description = "SHA-256 of the key, 64 lowercase hex characters",
        pattern = "^[0-9a-f]{64}$")),
    responses((status = 200, body = KeyRecord, headers(("x-metlo-kv-ttl-seconds" = u64,
            description = "How long the edge may keep this record, in seconds"))),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The key's role may not call this route", body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("api_key" = ["edge"])))]
async fn by_hash(
    _: Authorized<EdgeWorkers>,
    State(state): State<AppState>,
    Path(hash): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let hash = KeyHash::from_hex(&hash).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    // Only traffic keys exist for the edge: an admin or edge key's hash is "not found".
    // The edge is one source for all its clients: no per-source budget here (the Worker
    // limits its own), only the bound on concurrent lookups — its own, which public
    // callers cannot fill.
    let record = verify::lookup(
        &state.store,
        &state.cache,
        &state.trusted_lookups,
        &hash,
        || Ok(()),
    )
    .await?
    .filter(|r| r.role.serves_traffic())
    .ok_or_else(|| ApiError::NotFound("no API key with this hash".into()))?;
    Ok((
        [
            (header::CACHE_CONTROL, "no-store".to_owned()),
            (
                header::HeaderName::from_static(KEEP_HEADER),
                state.edge_keep_seconds.to_string(),
            ),
        ],
        Json(record),
    ))
}
