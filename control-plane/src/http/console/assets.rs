//! The console's files, embedded at build time (no CDN, no Node at run time): one HTML
//! page for every console path (the script draws the page the path names), its scripts,
//! its style sheet and its icon. Every answer forbids inline script, framing and any
//! request to another origin.

use axum::extract::Path;
use axum::http::{header, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};

use crate::http::error::ApiError;

const INDEX_HTML: &str = include_str!("../../../console/index.html");
const APP_JS: &str = include_str!("../../../console/app.js");
const IDENTITIES_JS: &str = include_str!("../../../console/identities.js");
const APP_CSS: &str = include_str!("../../../console/app.css");
const ICON_SVG: &str = include_str!("../../../console/icon.svg");

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
    connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

fn with_headers(body: &'static str, content_type: &'static str, cache: &'static str) -> Response {
    let headers: [(HeaderName, HeaderValue); 7] = [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (header::CACHE_CONTROL, HeaderValue::from_static(cache)),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (
            HeaderName::from_static("cross-origin-opener-policy"),
            HeaderValue::from_static("same-origin"),
        ),
    ];
    (headers, body).into_response()
}

/// The page (the same document for every console path).
pub async fn page() -> Response {
    with_headers(INDEX_HTML, "text/html; charset=utf-8", "no-store")
}

/// A script, style sheet or icon. (`no-cache`: revalidated, so an upgrade shows at once.)
pub async fn asset(Path(file): Path<String>) -> Response {
    let (body, content_type) = match file.as_str() {
        "app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "identities.js" => (IDENTITIES_JS, "text/javascript; charset=utf-8"),
        "app.css" => (APP_CSS, "text/css; charset=utf-8"),
        "icon.svg" => (ICON_SVG, "image/svg+xml"),
        _ => return ApiError::NotFound("no such console file".into()).into_response(),
    };
    with_headers(body, content_type, "no-cache")
}
