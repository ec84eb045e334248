//! Key uses reported by the edge Worker, for `lastUsed`.

use axum::extract::{DefaultBodyLimit, State};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

use super::error::{ApiError, ErrorBody};
use super::extract::{Authorized, EdgeWorkers, JsonBody};
use super::limits::MAX_REPORT_BYTES;
use super::state::AppState;
use crate::clock::now_ms;
use crate::service::usage::{self, UsageReport};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(report).layer(DefaultBodyLimit::max(MAX_REPORT_BYTES)))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UsageAccepted {
    /// Uses of existing keys, taken.
    pub accepted: usize,
    /// Hashes that name no key (deleted meanwhile, or made up), ignored.
    pub unknown: usize,
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
    let used = report.validate(now_ms())?;
    let (accepted, unknown) = usage::report(&state.store, &state.usage, used).await?;
    Ok(Json(UsageAccepted { accepted, unknown }))
}
