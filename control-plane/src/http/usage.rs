//! Key use: reported by the edge Worker (for `lastUsed` and the hourly counts), and read
//! back per key.

use axum::extract::{Path, RawQuery, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ErrorBody};
use super::extract::{Admins, Authorized, EdgeWorkers, JsonBody};
use super::limits::MAX_REPORT_BYTES;
use super::state::AppState;
use crate::clock::now_ms;
use crate::service::usage::{self, IdentityUsage, KeyUsage, UsageReport};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(report))
        .routes(routes!(key_usage))
        .routes(routes!(identity_usage))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// The window's start, RFC 3339 (default: 23 hours before `to`).
    #[param(format = DateTime)]
    from: Option<String>,
    /// The window's end, RFC 3339 (default: now). At most 31 days after `from`.
    #[param(format = DateTime)]
    to: Option<String>,
}

/// A key's requests per hour (verifications here and requests let through at the edge,
/// counted up to the last flush of `LAST_USED_FLUSH_SECONDS`), and those the edge refused,
/// by why (rate limit, credits, route policy, disabled, expired).
#[utoipa::path(get, path = "/api/v1/keys/{name}/usage", tag = "keys",
    params(("name" = String, Path, description = "Key name, URL-encoded"), UsageQuery),
    responses((status = 200, body = KeyUsage), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The key's role may not call this route", body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("api_key" = ["admin"])))]
async fn key_usage(
    _: Authorized<Admins>,
    State(state): State<AppState>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<KeyUsage>, ApiError> {
    let q: UsageQuery = serde_urlencoded::from_str(query.as_deref().unwrap_or(""))
        .map_err(|e| ApiError::BadRequest(format!("invalid query: {e}")))?;
    let (first, last) = usage::usage_window(q.from.as_deref(), q.to.as_deref(), now_ms())?;
    let name = crate::service::keys::normalize_name(&name);
    Ok(Json(
        usage::key_usage(&state.store, &name, first, last).await?,
    ))
}

/// An identity's requests per hour, admitted and refused by why: those of the keys that
/// belong to it now.
#[utoipa::path(get, path = "/api/v1/identities/{externalId}/usage", tag = "identities",
    params(("externalId" = String, Path, description = "URL-encoded"), UsageQuery),
    responses((status = 200, body = IdentityUsage), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The key's role may not call this route", body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("api_key" = ["admin"])))]
async fn identity_usage(
    _: Authorized<Admins>,
    State(state): State<AppState>,
    Path(external_id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<IdentityUsage>, ApiError> {
    let q: UsageQuery = serde_urlencoded::from_str(query.as_deref().unwrap_or(""))
        .map_err(|e| ApiError::BadRequest(format!("invalid query: {e}")))?;
    let (first, last) = usage::usage_window(q.from.as_deref(), q.to.as_deref(), now_ms())?;
    Ok(Json(
        usage::identity_usage(&state.store, &external_id, first, last).await?,
    ))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UsageAccepted {
    /// Uses of existing keys, taken.
    pub accepted: usize,
    /// Hashes that name no key (deleted meanwhile, or made up), ignored.
    pub unknown: usize,
    /// Uses older than 48 hours, not counted.
    pub stale: usize,
}

/// Report key uses seen at the edge (the Worker sends these in batches), for `lastUsed`.
#[utoipa::path(post, path = "/api/v1/usage", tag = "edge", request_body = UsageReport,
    responses((status = 200, body = UsageAccepted), (status = 400, body = ErrorBody), (status = 503, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The key's role may not call this route", body = ErrorBody), (status = 413, body = ErrorBody)),
    security(("api_key" = ["edge"])))]
async fn report(
    _: Authorized<EdgeWorkers>,
    State(state): State<AppState>,
    JsonBody(report): JsonBody<UsageReport, MAX_REPORT_BYTES>,
) -> Result<Json<UsageAccepted>, ApiError> {
    let now = now_ms();
    let used = report.validate(now)?;
    let (accepted, unknown, stale) = usage::report(&state.store, &state.usage, used, now).await?;
    Ok(Json(UsageAccepted {
        accepted,
        unknown,
        stale,
    }))
}
