//! The edge's assertion-signing keys (issue 30): made, listed and retired by
//! administrators; the public halves published as a JWKS for origins, without a key.

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ErrorBody};
use super::extract::{Admins, Audited, Authorized, JsonBody};
use super::state::AppState;
use crate::service::assertion_keys::{self, AssertionKey, NewAssertionKey, JWKS_MAX_AGE_SECONDS};

/// The routes that need an admin key.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create, list))
        .routes(routes!(retire))
}

/// The public JWKS (no key: origins fetch it).
pub fn public_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(jwks))
}

/// Makes a new ES256 key pair and publishes its public half in the JWKS at once. The
/// answer holds the private JWK — set it as the Worker's `ASSERTION_SIGNING_KEY` secret —
/// and is the only time it is shown: the control plane keeps the public half only.
#[utoipa::path(post, path = "/api/v1/assertion-keys", tag = "assertions",
    responses((status = 200, body = NewAssertionKey),
        (status = 409, description = "Five keys are published: retire one first", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The key's role may not call this route", body = ErrorBody),
        (status = 503, body = ErrorBody)),
    security(("api_key" = ["admin"])))]
async fn create(
    _: Authorized<Admins>,
    State(state): State<AppState>,
    Audited(actor): Audited,
) -> Result<Response, ApiError> {
    let made = assertion_keys::create(&state.store, &actor).await?;
    state.jwks.changed();
    Ok(([(header::CACHE_CONTROL, "no-store")], Json(made)).into_response())
}

/// Every assertion key, newest first, and whether it is still published.
#[utoipa::path(get, path = "/api/v1/assertion-keys", tag = "assertions",
    responses((status = 200, body = Vec<AssertionKey>), (status = 401, body = ErrorBody),
        (status = 403, description = "The key's role may not call this route", body = ErrorBody),
        (status = 503, body = ErrorBody)),
    security(("api_key" = ["admin"])))]
async fn list(
    _: Authorized<Admins>,
    State(state): State<AppState>,
) -> Result<Json<Vec<AssertionKey>>, ApiError> {
    Ok(Json(assertion_keys::list(&state.store).await?))
}

/// The body of a retire.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetireRequest {
    /// Retire even the newest published key (the one the Worker should be signing with:
    /// every assertion then fails to verify).
    #[serde(default)]
    force: bool,
}

/// Takes a key out of the JWKS: origins refuse what it signed once their copy of the JWKS
/// is renewed. Retire a key only after the Worker signs with a newer one and the old one's
/// last assertion has expired.
#[utoipa::path(post, path = "/api/v1/assertion-keys/{kid}/retire", tag = "assertions",
    params(("kid" = String, Path, description = "The key's id")),
    request_body(content = Option<RetireRequest>),
    responses((status = 200, body = AssertionKey),
        (status = 400, body = ErrorBody),
        (status = 409, description = "The newest published key, without force", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The key's role may not call this route", body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("api_key" = ["admin"])))]
async fn retire(
    _: Authorized<Admins>,
    State(state): State<AppState>,
    Audited(actor): Audited,
    Path(kid): Path<String>,
    JsonBody(body): JsonBody<Option<RetireRequest>>,
) -> Result<Json<AssertionKey>, ApiError> {
    let force = body.unwrap_or_default().force;
    let retired = assertion_keys::retire(&state.store, &kid, force, &actor).await?;
    state.jwks.changed();
    Ok(Json(retired))
}

/// The public keys that verify the edge's `X-Metlo-Assertion` JWTs (RFC 7517), cacheable
/// for five minutes. No key needed: origins fetch it.
#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "assertions",
    responses((status = 200, description = "`{\"keys\": [JWK…]}`", content_type = "application/jwk-set+json",
            headers(("Cache-Control" = String))),
        (status = 503, body = ErrorBody)))]
async fn jwks(State(state): State<AppState>) -> Result<Response, ApiError> {
    let doc = state.jwks.document(&state.store).await?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/jwk-set+json".to_owned()),
            (
                header::CACHE_CONTROL,
                format!("public, max-age={JWKS_MAX_AGE_SECONDS}"),
            ),
        ],
        doc.to_string(),
    )
        .into_response())
}
