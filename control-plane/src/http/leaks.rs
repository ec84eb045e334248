//! GitHub's secret-scanning reports: `POST /api/v1/leaks/github`. Not API-key
//! authenticated (mounted outside the key layer): the signature over the raw body, by one
//! of GitHub's published keys, is the only credential. The headers (a signature that
//! parses, a key GitHub lists) are checked before the body is read; the body is hashed as
//! it streams, a few reports at a time and one per source (`abuse::ReportSlots`);
//! everything is checked before anything changes.

use axum::extract::{Request, State};
use axum::http::header::CONTENT_LENGTH;
use axum::http::HeaderMap;
use axum::Json;
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::client_ip::client_ip;
use super::error::{ApiError, ErrorBody};
use super::extract::Audited;
use super::limits::{leak_report_read_timeout, MAX_LEAK_REPORT_BYTES, SMALL_LEAK_REPORT_BYTES};
use super::state::AppState;
use crate::service::audit::Actor;
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
        (status = 408, description = "The body took longer than 5 s, plus 1 s per 256 KiB announced, to arrive", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 503, description = "GitHub's keys cannot be fetched, or too many reports (or one from the same source) are being read (GitHub retries)", body = ErrorBody),
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
    // Everything the headers say is checked before a byte of the body is read: a report
    // not signed by a key GitHub lists costs nothing but its head.
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let expected = state
        .github_keys
        .expect(
            header("github-public-key-identifier"),
            header("github-public-key-signature"),
        )
        .await
        .map_err(|e| refused(e, &actor))?;
    // A few reports at once, one per source (GitHub retries a 503): see ReportSlots.
    let announced = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let large = announced.is_none_or(|n| n > SMALL_LEAK_REPORT_BYTES as u64);
    let ip = client_ip(request.extensions(), &headers, &state.trusted_proxies);
    let Some(_slot) = state.leak_reports.take(ip, large) else {
        metrics::counter!("metlo_leak_reports_total", "result" => "busy").increment(1);
        return Err(ApiError::Service(crate::service::Error::Busy));
    };
    let (body, digest) = read_hashed(request).await?;
    expected.matches(&digest).map_err(|e| refused(e, &actor))?;
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

/// A report that does not check out: counted, logged, and the answer GitHub should see.
fn refused(e: SignatureError, actor: &Actor) -> ApiError {
    metrics::counter!("metlo_leak_reports_total", "result" => e.kind()).increment(1);
    tracing::warn!(reason = %e, ip = ?actor.ip, "leak report refused");
    match e {
        SignatureError::UnknownKey | SignatureError::Mismatch => {
            ApiError::BadSignature(e.to_string())
        }
        // The reason (with GITHUB_KEYS_URL) is in the log and /readyz, not public.
        SignatureError::KeysUnavailable(_) => ApiError::DependencyUnavailable(
            "GitHub's secret-scanning keys are unavailable: retry later".into(),
        ),
        _ => ApiError::BadRequest(e.to_string()),
    }
}

/// The body (at most [`MAX_LEAK_REPORT_BYTES`], 413 past it; within
/// [`leak_report_read_timeout`], 408 past it) and its SHA-256, hashed as it streams.
async fn read_hashed(request: Request) -> Result<(Vec<u8>, [u8; 32]), ApiError> {
    let announced = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_LEAK_REPORT_BYTES as u64) {
        return Err(ApiError::PayloadTooLarge(MAX_LEAK_REPORT_BYTES));
    }
    let read = async {
        let mut body = request.into_body();
        // Sized once from the announced length (at most the cap; a slot is held): no
        // copy on growth, and pages never written are never resident.
        let mut bytes = Vec::with_capacity(announced.unwrap_or(0) as usize);
        let mut hasher = Sha256::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                ApiError::BadRequest(format!("could not read the request body: {e}"))
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if bytes.len() + data.len() > MAX_LEAK_REPORT_BYTES {
                return Err(ApiError::PayloadTooLarge(MAX_LEAK_REPORT_BYTES));
            }
            hasher.update(&data);
            bytes.extend_from_slice(&data);
        }
        Ok((bytes, hasher.finalize().into()))
    };
    let deadline = leak_report_read_timeout(announced);
    tokio::time::timeout(deadline, read)
        .await
        .map_err(|_| ApiError::RequestTimeout(deadline.as_secs()))?
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use axum::body::{Body, Bytes};
    use axum::http::{Method, StatusCode};

    use super::*;
    use crate::test_util::TestApp;

    /// A body that says whether anything read it.
    fn watched(read: &Arc<AtomicBool>) -> Body {
        let read = read.clone();
        Body::from_stream(futures_util::stream::once(async move {
            read.store(true, Ordering::SeqCst);
            Ok::<_, std::io::Error>(Bytes::from_static(b"[]"))
        }))
    }

    /// Headers that cannot check out, or a key that cannot be known, are answered
    /// without reading a byte of the body.
    #[tokio::test(flavor = "current_thread")]
    async fn a_report_is_refused_on_its_headers_before_its_body_is_read() {
        let app = TestApp::on(crate::db::Backend::Sqlite)
            .env("GITHUB_KEYS_URL", "http://127.0.0.1:9/keys")
            .build()
            .await;
        let signature = "MEUCIQDrRbrDMdn8bpYJbbfBSdNv3qzaaBlqXRPeO7pJ5P5FmAIgMB+c1ZZ6Eu8ZflwdsEQiaMYKnJFuONxNaFvBSE+6eWs=";
        let cases: [(&[(&str, &str)], StatusCode); 4] = [
            (&[], StatusCode::BAD_REQUEST),
            (
                &[("github-public-key-identifier", "k1")],
                StatusCode::BAD_REQUEST,
            ),
            (
                &[
                    ("github-public-key-identifier", "k1"),
                    ("github-public-key-signature", "not base64!"),
                ],
                StatusCode::BAD_REQUEST,
            ),
            // GitHub's keys cannot be fetched: the identifier cannot be known.
            (
                &[
                    ("github-public-key-identifier", "k1"),
                    ("github-public-key-signature", signature),
                ],
                StatusCode::SERVICE_UNAVAILABLE,
            ),
        ];
        for (headers, status) in cases {
            let read = Arc::new(AtomicBool::new(false));
            let caller = app.anonymous();
            let mut request = caller.request(Method::POST, "/api/v1/leaks/github");
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            let reply = caller
                .send_request(request.body(watched(&read)).unwrap())
                .await;
            assert_eq!(reply.status, status, "{headers:?}: {}", reply.text);
            assert!(
                !read.load(Ordering::SeqCst),
                "{headers:?}: the body was read"
            );
        }
    }

    fn request_with(body: Body, length: Option<usize>) -> Request {
        let mut request = Request::builder().method(Method::POST).uri("/");
        if let Some(n) = length {
            request = request.header(CONTENT_LENGTH, n);
        }
        request.body(body).unwrap()
    }

    /// The body is hashed as it streams, to the byte; too long (announced or sent) is
    /// 413; too slow is 408.
    #[tokio::test(flavor = "current_thread")]
    async fn a_report_body_is_hashed_as_it_streams_and_bounded() {
        let chunks: Vec<Result<Bytes, std::io::Error>> = (0..100)
            .map(|i| Ok(Bytes::from(format!("chunk {i};"))))
            .collect();
        let whole: Vec<u8> = (0..100)
            .flat_map(|i| format!("chunk {i};").into_bytes())
            .collect();
        let body = Body::from_stream(futures_util::stream::iter(chunks));
        let (bytes, digest) = read_hashed(request_with(body, None)).await.unwrap();
        assert_eq!(bytes, whole);
        assert_eq!(digest, <[u8; 32]>::from(Sha256::digest(&whole)));

        let announced = request_with(Body::empty(), Some(MAX_LEAK_REPORT_BYTES + 1));
        assert!(matches!(
            read_hashed(announced).await,
            Err(ApiError::PayloadTooLarge(_))
        ));
        let mib = || Ok::<_, std::io::Error>(Bytes::from(vec![b' '; 1 << 20]));
        let endless = Body::from_stream(futures_util::stream::repeat_with(mib));
        assert!(matches!(
            read_hashed(request_with(endless, None)).await,
            Err(ApiError::PayloadTooLarge(_))
        ));

        tokio::time::pause();
        let stalled =
            Body::from_stream(futures_util::stream::pending::<Result<Bytes, std::io::Error>>());
        assert!(matches!(
            read_hashed(request_with(stalled, Some(10))).await,
            Err(ApiError::RequestTimeout(6))
        ));
    }
}
