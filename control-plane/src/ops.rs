//! Operational routes: liveness, readiness, metrics, the OpenAPI document.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use utoipa::openapi::security::{ApiKey as ApiKeyScheme, ApiKeyValue, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(prometheus))
        .route("/openapi.json", get(openapi))
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Metlo API keys", description = "Metlo-compatible API-key control plane"),
    paths(
        crate::keys::create, crate::keys::list, crate::keys::onboarding, crate::keys::remove,
        crate::keys::roll, crate::keys::verify, crate::keys::by_hash, crate::audit::list,
        crate::usage::report, healthz, readyz
    ),
    modifiers(&KeyAuth)
)]
pub struct ApiDoc;

struct KeyAuth;

impl Modify for KeyAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKeyScheme::Header(ApiKeyValue::with_description(
                "Authorization",
                "A Metlo API key, bare or as `Bearer <key>`",
            ))),
        );
    }
}

/// Liveness: the process is serving.
#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200, body = String)))]
async fn healthz() -> &'static str {
    "ok"
}

/// Readiness: the database answers (Redis is reported but optional: without it the
/// service verifies through the database).
#[utoipa::path(get, path = "/readyz", tag = "ops",
    responses((status = 200, description = "Ready"), (status = 503, description = "Database unreachable")))]
async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let db = state.store.ping().await.is_ok();
    let cache = match state.cache.ping().await {
        None => "memory",
        Some(true) => "ok",
        Some(false) => "unreachable",
    };
    let status = if db {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = json!({ "database": if db { "ok" } else { "unreachable" }, "cache": cache });
    if let Some(sync) = &state.kv_sync {
        let (depth, oldest) = state.store.outbox_depth().await.unwrap_or((-1, None));
        let age =
            oldest.map(|ms| (chrono::Utc::now().timestamp_millis() - ms).max(0) as f64 / 1000.0);
        body["kvSync"] = json!({
            "outboxDepth": depth,
            "oldestAgeSeconds": age,
            "lastError": *sync.last_error.lock().unwrap(),
        });
    }
    (status, Json(body))
}

async fn prometheus(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
