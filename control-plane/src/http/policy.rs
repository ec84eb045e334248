//! The route policy (issue 30): read and replaced by administrators. The edge gets it
//! through the revocation feed and KV, never from these routes.

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use metlo_shared::policy::PolicyDocument;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ErrorBody};
use super::extract::{Admins, Audited, Authorized, JsonBody};
use super::state::AppState;
use crate::service::policy::{self, PolicyAnswer, ReplaceError};

/// Largest policy document: 200 rules of a few hundred bytes.
const MAX_POLICY_BYTES: usize = 128 * 1024;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(show, replace))
        .routes(routes!(show_version))
}

/// The answer, with its version as the `ETag` (for `If-Match`).
fn answer(policy: PolicyAnswer) -> Response {
    let etag = HeaderValue::from_str(&format!("\"{}\"", policy.version)).expect("digits");
    ([(header::ETAG, etag)], Json(policy)).into_response()
}

/// The current route policy: ordered rules `{methods, path, require}` (first match wins)
/// and the `default` for requests no rule matches. Version 0: none was ever set.
#[utoipa::path(get, path = "/api/v1/policy", tag = "policy",
    responses((status = 200, body = PolicyAnswer, headers(("ETag" = String, description = "The version, quoted"))),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The key's role may not call this route", body = ErrorBody),
        (status = 503, body = ErrorBody)),
    security(("api_key" = ["admin"])))]
async fn show(_: Authorized<Admins>, State(state): State<AppState>) -> Result<Response, ApiError> {
    Ok(answer(policy::current(&state.store).await?))
}

/// One version of the route policy, as it was set.
#[utoipa::path(get, path = "/api/v1/policy/versions/{version}", tag = "policy",
    params(("version" = i64, Path, description = "A version number", minimum = 0)),
    responses((status = 200, body = PolicyAnswer), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The key's role may not call this route", body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("api_key" = ["admin"])))]
async fn show_version(
    _: Authorized<Admins>,
    State(state): State<AppState>,
    Path(version): Path<String>,
) -> Result<Response, ApiError> {
    let version = version
        .parse::<i64>()
        .ok()
        .filter(|v| *v >= 0)
        .ok_or_else(|| ApiError::BadRequest("version must be a whole number from 0".into()))?;
    Ok(answer(policy::version(&state.store, version).await?))
}

/// Replaces the route policy as a whole: checked (400 names the rule and what is wrong),
/// stored as the next version, audited (`policy.update`), and applied at every edge
/// location by `appliedEverywhereBy` (the revocation feed's bound). `If-Match: "<version>"`
/// makes the change only if the policy is still at that version (412 otherwise).
#[utoipa::path(put, path = "/api/v1/policy", tag = "policy", request_body = PolicyDocument,
    params(("If-Match" = Option<String>, Header, description = "The version this change was made from, quoted (an ETag)",
        pattern = r#"^"[0-9]{1,18}"$"#)),
    responses((status = 200, body = PolicyAnswer, headers(("ETag" = String, description = "The new version, quoted"))),
        (status = 400, description = "Bad JSON, an unknown field, or a rule that does not hold", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The key's role may not call this route", body = ErrorBody),
        (status = 412, description = "The policy is no longer at the If-Match version", body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("api_key" = ["admin"])))]
async fn replace(
    _: Authorized<Admins>,
    State(state): State<AppState>,
    Audited(actor): Audited,
    headers: HeaderMap,
    JsonBody(doc): JsonBody<PolicyDocument, MAX_POLICY_BYTES>,
) -> Result<Response, ApiError> {
    let if_version = match headers.get(header::IF_MATCH) {
        None => None,
        // Compared strongly (RFC 9110): a weak tag matches no version.
        Some(v) if v.as_bytes().starts_with(b"W/") => Some(-1),
        Some(v) => Some(
            // An entity tag, quoted: `"3"`.
            v.to_str()
                .ok()
                .and_then(|v| v.trim().strip_prefix('"')?.strip_suffix('"'))
                .and_then(|v| v.parse::<i64>().ok())
                .filter(|v| *v >= 0)
                .ok_or_else(|| {
                    ApiError::BadRequest("If-Match must be a version, e.g. \"3\"".into())
                })?,
        ),
    };

    match policy::replace(&state.store, &doc, if_version, &actor).await {
        Ok(policy) => Ok(answer(policy)),
        Err(e @ ReplaceError::Conflict(_)) => Err(ApiError::PreconditionFailed(e.to_string())),
        Err(ReplaceError::Service(e)) => Err(e.into()),
    }
}
