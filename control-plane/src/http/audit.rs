//! The audit log, read a page at a time.

use axum::extract::{RawQuery, State};
use axum::Json;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ErrorBody};
use super::extract::{Admins, Authorized};
use super::state::AppState;
use crate::db::rows::AuditFilter;
use crate::service::audit::{self, AuditPage, DEFAULT_PAGE};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Entries per page, 1–1000 (default 50).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
    /// Only entries with an id below this (the previous page's `nextBefore`).
    #[param(value_type = Option<i64>, minimum = 1)]
    before: Option<String>,
    /// Only entries of this action (`key.create`, `auth.failed`, …).
    action: Option<String>,
    /// Only entries by this actor (a key's name).
    actor: Option<String>,
}

/// Parses `limit`, `before`, `action` and `actor` (by hand, so a bad value is a JSON 400).
pub fn parse_audit_query(query: Option<&str>) -> Result<(i64, Option<i64>, AuditFilter), ApiError> {
    let q: AuditQuery = serde_urlencoded::from_str(query.unwrap_or(""))
        .map_err(|e| ApiError::BadRequest(format!("invalid query: {e}")))?;
    let number = |name: &str, v: Option<String>| -> Result<Option<i64>, ApiError> {
        v.map(|v| {
            v.trim()
                .parse::<i64>()
                .map_err(|_| ApiError::BadRequest(format!("{name} must be a whole number")))
        })
        .transpose()
    };
    let (limit, before) = audit::check_page(
        number("limit", q.limit)?.unwrap_or(DEFAULT_PAGE),
        number("before", q.before)?,
    )?;
    // An empty filter field (a form's blank input) filters nothing.
    let given = |v: Option<String>| v.filter(|v| !v.trim().is_empty());
    let filter = AuditFilter {
        action: given(q.action),
        actor: given(q.actor),
    };
    Ok((limit, before, filter))
}

/// The audit log, newest first, a page at a time; filtered by action and by actor.
#[utoipa::path(get, path = "/api/v1/audit", tag = "audit", params(AuditQuery),
    responses((status = 200, body = AuditPage), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The key's role may not call this route", body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("api_key" = ["admin"])))]
async fn list(
    _: Authorized<Admins>,
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Json<AuditPage>, ApiError> {
    let (limit, before, filter) = parse_audit_query(query.as_deref())?;
    Ok(Json(
        audit::page(&state.store, limit, before, &filter).await?,
    ))
}
