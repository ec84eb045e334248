//! Identities (issue 31): `/api/v1/identities`, admins only. An identity owns keys and
//! may carry credits and named rate limits all of them share at the edge.

use axum::extract::{Path, RawQuery, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ErrorBody};
use super::extract::{Admins, Audited, Authorized, JsonBody};
use super::state::AppState;
use crate::service::credits::TopUp;
use crate::service::identities::{
    self, CreateIdentityRequest, IdentityInfo, IdentityPage, UpdateIdentityRequest,
};
use crate::service::keys::KeyInfo;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create, list))
        .routes(routes!(show, update, remove))
        .routes(routes!(add_credits))
        .routes(routes!(keys))
}

/// Makes an identity. 409 if its `externalId` is taken.
#[utoipa::path(post, path = "/api/v1/identities", tag = "identities",
    request_body = CreateIdentityRequest,
    responses((status = 200, body = IdentityInfo),
        (status = 400, description = "Bad JSON, unknown field, missing or invalid externalId, meta, credits or rateLimits", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The key's role may not call this route", body = ErrorBody),
        (status = 409, description = "An identity with this externalId exists", body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("api_key" = ["admin"])))]
async fn create(
    _: Authorized<Admins>,
    State(state): State<AppState>,
    Audited(actor): Audited,
    JsonBody(body): JsonBody<CreateIdentityRequest>,
) -> Result<Json<IdentityInfo>, ApiError> {
    Ok(Json(identities::create(&state.store, body, &actor).await?))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Identities per page, 1–1000 (default 100).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
    /// The previous page's `nextCursor`, as it is.
    cursor: Option<String>,
}

/// Identities, oldest first, a page at a time.
#[utoipa::path(get, path = "/api/v1/identities", tag = "identities", params(PageQuery),
    responses((status = 200, body = IdentityPage), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The key's role may not call this route", body = ErrorBody),
        (status = 503, body = ErrorBody)),
    security(("api_key" = ["admin"])))]
async fn list(
    _: Authorized<Admins>,
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Json<IdentityPage>, ApiError> {
    let q: PageQuery = serde_urlencoded::from_str(query.as_deref().unwrap_or(""))
        .map_err(|e| ApiError::BadRequest(format!("invalid query: {e}")))?;
    let limit = q
        .limit
        .map(|l| {
            l.trim().parse::<i64>().map_err(|_| {
                ApiError::BadRequest("limit must be a whole number from 1 to 1000".into())
            })
        })
        .transpose()?;
    Ok(Json(
        identities::list(&state.store, limit, q.cursor.as_deref()).await?,
    ))
}

/// One identity.
#[utoipa::path(get, path = "/api/v1/identities/{externalId}", tag = "identities",
    params(("externalId" = String, Path, description = "URL-encoded")),
    responses((status = 200, body = IdentityInfo), (status = 401, body = ErrorBody),
        (status = 403, description = "The key's role may not call this route", body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("api_key" = ["admin"])))]
async fn show(
    _: Authorized<Admins>,
    State(state): State<AppState>,
    Path(external_id): Path<String>,
) -> Result<Json<IdentityInfo>, ApiError> {
    let identity = identities::get(&state.store, &external_id).await?;
    Ok(Json(IdentityInfo::from(&identity)))
}

/// Changes an identity: `meta`, `credits` (set anew), `rateLimits` (replaced). Every key
/// of the identity gets the change at the edge (through KV and the revocation feed).
#[utoipa::path(patch, path = "/api/v1/identities/{externalId}", tag = "identities",
    params(("externalId" = String, Path, description = "URL-encoded")),
    request_body = UpdateIdentityRequest,
    responses((status = 200, body = IdentityInfo),
        (status = 400, description = "Bad JSON, unknown field, nothing to change, or an invalid value", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The key's role may not call this route", body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 503, body = ErrorBody)),
    security(("api_key" = ["admin"])))]
async fn update(
    _: Authorized<Admins>,
    State(state): State<AppState>,
    Audited(actor): Audited,
    Path(external_id): Path<String>,
    JsonBody(body): JsonBody<UpdateIdentityRequest>,
) -> Result<Json<IdentityInfo>, ApiError> {
    let changes = body.validate()?;
    Ok(Json(
        identities::update(&state.store, &state.cache, &external_id, &changes, &actor).await?,
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// `true`: delete the identity's keys too (each as its own delete would).
    #[param(value_type = Option<bool>)]
    cascade: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Removed {
    #[schema(example = "OK")]
    pub status: &'static str,
}

/// Deletes an identity: 409 while keys belong to it, unless `?cascade=true`.
#[utoipa::path(delete, path = "/api/v1/identities/{externalId}", tag = "identities",
    params(("externalId" = String, Path, description = "URL-encoded"), DeleteQuery),
    responses((status = 200, body = Removed), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The key's role may not call this route", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "Keys belong to the identity (and no cascade)", body = ErrorBody),
        (status = 503, body = ErrorBody)),
    security(("api_key" = ["admin"])))]
async fn remove(
    _: Authorized<Admins>,
    State(state): State<AppState>,
    Audited(actor): Audited,
    Path(external_id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<Removed>, ApiError> {
    let q: DeleteQuery = serde_urlencoded::from_str(query.as_deref().unwrap_or(""))
        .map_err(|e| ApiError::BadRequest(format!("invalid query: {e}")))?;
    let cascade = match q.cascade.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(ApiError::BadRequest("cascade must be true or false".into())),
    };
    identities::delete(&state.store, &state.cache, &external_id, cascade, &actor).await?;
    Ok(Json(Removed { status: "OK" }))
}

/// Adds credits to an identity that has some (shared by all its keys); concurrent
/// top-ups all count, once each.
#[utoipa::path(post, path = "/api/v1/identities/{externalId}/credits", tag = "identities",
    params(("externalId" = String, Path, description = "URL-encoded")),
    request_body = TopUp,
    responses((status = 200, body = IdentityInfo),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, description = "The key's role may not call this route", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "The identity has no credits (set them with PATCH first)", body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("api_key" = ["admin"])))]
async fn add_credits(
    _: Authorized<Admins>,
    State(state): State<AppState>,
    Audited(actor): Audited,
    Path(external_id): Path<String>,
    JsonBody(body): JsonBody<TopUp>,
) -> Result<Json<IdentityInfo>, ApiError> {
    Ok(Json(
        identities::add_credits(&state.store, &state.cache, &external_id, body, &actor).await?,
    ))
}

/// The identity's keys.
#[derive(Debug, Serialize, ToSchema)]
pub struct IdentityKeys {
    pub keys: Vec<KeyInfo>,
}

/// The keys that belong to an identity.
#[utoipa::path(get, path = "/api/v1/identities/{externalId}/keys", tag = "identities",
    params(("externalId" = String, Path, description = "URL-encoded")),
    responses((status = 200, body = IdentityKeys), (status = 401, body = ErrorBody),
        (status = 403, description = "The key's role may not call this route", body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("api_key" = ["admin"])))]
async fn keys(
    _: Authorized<Admins>,
    State(state): State<AppState>,
    Path(external_id): Path<String>,
) -> Result<Json<IdentityKeys>, ApiError> {
    let identity = identities::get(&state.store, &external_id).await?;
    let keys = state
        .store
        .keys_of_identity(identity.id)
        .await
        .map_err(crate::service::Error::from)?;
    Ok(Json(IdentityKeys {
        keys: keys.into_iter().map(KeyInfo::from).collect(),
    }))
}
