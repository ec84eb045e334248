//! GitHub's secret-scanning reports: `POST /api/v1/leaks/github`. Not API-key
//! authenticated (mounted outside the key layer): the signature over the raw body, by one
//! of GitHub's published keys, is the only credential. Everything is checked before
//! anything changes.

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ErrorBody};
use super::extract::{read_body, Audited};
use super::limits::MAX_LEAK_REPORT_BYTES;
use super::state::AppState;
use crate::service::github_keys::SignatureError;
use crate::service::leaks::{self, LeakAlert, LeakFeedback, LeakMode};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(github))
}

/// A GitHub secret-scanning report (partner program): tokens matching this service's key
/// pattern, found in public places. Each one that is a secret of ours is revoked (or, with
/// `LEAK_REVOCATION=notify`, audited only); the answer labels every token.
#[utoipa::path(post, path = "/api/v1/leaks/github", tag = "leaks", request_body = Vec<LeakAlert>,
    params(
        ("Github-Public-Key-Identifier" = String, Header, description = "Which of GitHub's keys signed the body"),
        ("Github-Public-Key-Signature" = String, Header, description = "Base64 of the DER ECDSA P-256/SHA-256 signature of the raw body"),
    ),
    responses(
        (status = 200, description = "Feedback for every token, in order", body = Vec<LeakFeedback>),
        (status = 400, description = "A header or the body is malformed", body = ErrorBody),
        (status = 401, description = "Unknown key identifier, or the signature does not match", body = ErrorBody),
        (status = 404, description = "Leak reports are off (LEAK_REVOCATION=off)", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 503, description = "GitHub's keys cannot be fetched (GitHub retries)", body = ErrorBody),
    ),
    security(()))]
async fn github(
    State(state): State<AppState>,
    Audited(actor): Audited,
    headers: HeaderMap,
    request: Request,
) -> Result<Json<Vec<LeakFeedback>>, ApiError> {
    if state.leak_mode == LeakMode::Off {
        return Err(ApiError::NotFound(
            "leak reports are off (LEAK_REVOCATION=off)".into(),
        ));
    }
    let body = read_body(request, MAX_LEAK_REPORT_BYTES).await?;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let checked = state
        .github_keys
        .verify(
            header("github-public-key-identifier"),
            header("github-public-key-signature"),
            &body,
        )
        .await;
    if let Err(e) = checked {
        metrics::counter!("metlo_leak_reports_total", "result" => e.kind()).increment(1);
        tracing::warn!(reason = %e, ip = ?actor.ip, "leak report refused");
        return Err(match e {
            SignatureError::UnknownKey | SignatureError::Mismatch => {
                ApiError::BadSignature(e.to_string())
            }
            // The reason (with GITHUB_KEYS_URL) is in the log and /readyz, not public.
            SignatureError::KeysUnavailable(_) => ApiError::DependencyUnavailable(
                "GitHub's secret-scanning keys are unavailable: retry later".into(),
            ),
            _ => ApiError::BadRequest(e.to_string()),
        });
    }
    let alerts = leaks::parse_report(&body).inspect_err(|_| {
        metrics::counter!("metlo_leak_reports_total", "result" => "malformed_body").increment(1);
    })?;
    let feedback = leaks::handle_report(
        &state.store,
        &state.cache,
        &alerts,
        state.leak_mode,
        actor.ip,
    )
    .await?;
    metrics::counter!("metlo_leak_reports_total", "result" => "ok").increment(1);
    Ok(Json(feedback))
}
