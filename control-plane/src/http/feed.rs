//! `GET /api/v1/revocations`: the revocation feed, for the edge Worker (issue 29). Served
//! from memory (`service::feed`): no database query per request.

use axum::extract::{RawQuery, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ErrorBody};
use super::extract::{Authorized, EdgeWorkers};
use super::state::AppState;
use crate::service::feed::FeedPage;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(revocations))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct FeedQuery {
    /// The `seq` of the last page read; left out: every event in the window.
    #[param(minimum = 0)]
    after: Option<i64>,
}

/// The events of the feed's window after `after`: each a secret refused from now on
/// (`record` null), or given a new record (narrowed, or enabled again). `seq` is the
/// number to ask after next time (at once when `more`: the page was full); a reader whose
/// `after` is below `from` missed events that left the window and must start over from
/// this page. 503 while this replica's view is not current (not read since its start, or
/// not for 5 s): a reader must not take it for the whole feed.
#[utoipa::path(get, path = "/api/v1/revocations", tag = "edge", params(FeedQuery),
    responses((status = 200, body = FeedPage),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The key's role may not call this route", body = ErrorBody),
        (status = 503, description = "This replica's feed is not current", body = ErrorBody)),
    security(("api_key" = ["edge"])))]
async fn revocations(
    _: Authorized<EdgeWorkers>,
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<impl IntoResponse, ApiError> {
    let q: FeedQuery = serde_urlencoded::from_str(query.as_deref().unwrap_or(""))
        .map_err(|e| ApiError::BadRequest(format!("invalid query: {e}")))?;
    if q.after.is_some_and(|a| a < 0) {
        return Err(ApiError::BadRequest("after must be at least 0".into()));
    }
    let page = state.feed.page(q.after).map_err(|e| {
        tracing::warn!(error = %e, "revocation feed refused");
        ApiError::Service(crate::service::Error::Unavailable)
    })?;
    Ok(([(header::CACHE_CONTROL, "no-store")], Json(page)))
}
