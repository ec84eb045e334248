//! One error type for the HTTP API. Every error is JSON with a human message; nothing
//! here ever includes a key.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use metlo_shared::Role;

use super::limits::MAX_HEADER_BYTES;
use crate::service;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("request headers are larger than {MAX_HEADER_BYTES} bytes")]
    HeadersTooLarge,
    /// The request (its body, or the work it asked for) took longer than allowed.
    #[error("the request took longer than {0} s")]
    RequestTimeout(u64),
    /// A valid key whose role may not call the route.
    #[error(
        "this key's role ({role}) may not call this route; it needs a key with the role {}",
        required_roles(required)
    )]
    Forbidden {
        role: Role,
        required: &'static [Role],
    },
    /// A valid key whose permissions do not satisfy what was asked (the expression, canonical).
    #[error("this key's permissions do not satisfy {0}")]
    InsufficientPermission(String),
    /// A conditional change (`If-Match`) whose condition no longer holds.
    #[error("{0}")]
    PreconditionFailed(String),
    /// The key's rate limit is spent; the window ends in this many seconds.
    #[error("this key's rate limit is spent; retry in {0} s")]
    RateLimited(u64),
    /// A signed request (a leak report) whose signature does not hold.
    #[error("{0}")]
    BadSignature(String),
    /// Something this request needs from elsewhere is unavailable (e.g. GitHub's keys):
    /// retry later.
    #[error("{0}")]
    DependencyUnavailable(String),
    /// What the service refused or could not do, said in its own words.
    #[error(transparent)]
    Service(#[from] service::Error),
}

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// Machine-readable code, e.g. `unauthorized`, `bad_request`, `not_found`.
    pub error: &'static str,
    /// What went wrong, for humans.
    pub message: String,
}

/// The roles a route needs, for people: legacy (every power, from before roles) is
/// implied and not named.
fn required_roles(roles: &[Role]) -> String {
    let named: Vec<&str> = roles
        .iter()
        .filter(|r| **r != Role::Legacy)
        .map(|r| r.as_str())
        .collect();
    named.join(" or ")
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        use service::Error as E;
        match self {
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::BadSignature(_) => (StatusCode::UNAUTHORIZED, "bad_signature"),
            ApiError::DependencyUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::BadRequest(_) | ApiError::Service(E::Invalid(_) | E::DuplicateName) => {
                (StatusCode::BAD_REQUEST, "bad_request")
            }
            ApiError::NotFound(_) | ApiError::Service(E::NotFound(_)) => {
                (StatusCode::NOT_FOUND, "not_found")
            }
            ApiError::Service(E::LimitReached(_)) => (StatusCode::BAD_REQUEST, "limit_reached"),
            ApiError::Forbidden { .. }
            | ApiError::InsufficientPermission(_)
            | ApiError::Service(E::Forbidden(_)) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::Service(E::Conflict(_)) => (StatusCode::CONFLICT, "conflict"),
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::HeadersTooLarge => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
            ),
            ApiError::RequestTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            ApiError::Service(E::Unavailable | E::Busy | E::LimiterUnavailable) => {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            }
            ApiError::Service(E::TooManyFailures(_)) => {
                (StatusCode::TOO_MANY_REQUESTS, "too_many_requests")
            }
            ApiError::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::PreconditionFailed(_) => {
                (StatusCode::PRECONDITION_FAILED, "precondition_failed")
            }
            ApiError::Service(E::Internal(_)) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if let ApiError::Service(service::Error::Internal(e)) = &self {
            tracing::error!(error = ?e, "request failed");
        }
        let body = ErrorBody {
            error: code,
            message: self.to_string(),
        };
        let mut response = (status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        match self {
            ApiError::Unauthorized(_) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(r#"Bearer realm="metlo", error="invalid_token""#),
                );
            }
            ApiError::Forbidden { .. } => {
                // RFC 6750: a valid token without the scope the resource needs.
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(r#"Bearer realm="metlo", error="insufficient_scope""#),
                );
            }
            ApiError::InsufficientPermission(scope) => {
                // Canonical expressions hold no quote or backslash: a valid quoted string.
                if let Ok(value) = HeaderValue::from_str(&format!(
                    r#"Bearer realm="metlo", error="insufficient_scope", scope="{scope}""#
                )) {
                    headers.insert(header::WWW_AUTHENTICATE, value);
                }
            }
            ApiError::Service(
                service::Error::Unavailable
                | service::Error::Busy
                | service::Error::LimiterUnavailable,
            ) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ApiError::Service(service::Error::TooManyFailures(wait)) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(wait.as_secs()));
            }
            ApiError::RateLimited(wait) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(wait));
            }
            ApiError::DependencyUnavailable(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
            }
            _ => {}
        }
        response
    }
}
