//! Operational routes, no key needed: liveness on the API port; liveness, detailed
//! readiness and metrics on the ops port (`OPS_LISTEN_ADDR`, loopback by default), which
//! should not be reachable from the edge or the internet.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::state::AppState;
use crate::clock::now_ms;

/// On the API port: liveness only.
pub fn api_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(healthz))
}

/// The ops port: liveness, readiness with details (outbox depth, last KV error), metrics.
pub fn ops_router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(prometheus))
}

/// Liveness: the process is serving.
#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200, body = String)))]
async fn healthz() -> &'static str {
    "ok"
}

/// Readiness (ops port): the database answers (Redis is reported but optional: without
/// it the service verifies through the database).
async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let db = state.store.ping().await.is_ok();
    let cache = match state.cache.ping().await {
        None => "memory",
        Some(true) => "ok",
        Some(false) => "unreachable",
    };
    // The edge must never take this replica's feed for the whole one: not ready until
    // it is current.
    let feed = state.feed.age_ms();
    let status = if db && feed.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = json!({ "database": if db { "ok" } else { "unreachable" }, "cache": cache });
    body["revocationFeed"] = match feed {
        Ok(age_ms) => json!({ "current": true, "ageMs": age_ms }),
        Err(e) => json!({ "current": false, "error": e.to_string() }),
    };
    // Off: nothing deletes records at the edge, so the Worker keeps none (see by-hash).
    body["kvSync"] = json!("off");
    if let Some(sync) = &state.kv_sync {
        let (depth, oldest) = state.store.outbox_depth().await.unwrap_or((-1, None));
        let age = oldest.map(|ms| (now_ms() - ms).max(0) as f64 / 1000.0);
        body["kvSync"] = json!({
            "outboxDepth": depth,
            "oldestAgeSeconds": age,
            "lastError": *sync.last_error.lock().unwrap(),
        });
    }
    body["kvReconcile"] = match &state.kv_reconcile {
        None => json!("off"),
        Some(r) => {
            let mut v = json!({ "intervalSeconds": r.interval.as_secs() });
            if let Some(last) = r.last() {
                v["last"] = json!({
                    "at": crate::clock::iso8601(last.at_ms),
                    "report": last.report,
                    "error": last.error,
                });
            }
            v
        }
    };
    body["leakRevocation"] = match state.leak_mode {
        crate::service::leaks::LeakMode::Off => json!("off"),
        mode => json!({
            "mode": mode,
            "githubKeysUrl": state.github_keys.url(),
            "githubKeys": state.github_keys.status(),
        }),
    };
    (status, Json(body))
}

async fn prometheus(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;
    use serde_json::json;

    use crate::db::Backend;
    use crate::test_util::{on_both_backends, TestApp};

    on_both_backends!(ops_routes_are_off_the_api_port);

    // Moved from `tests/tests/roles.rs`.
    async fn ops_routes_are_off_the_api_port(backend: Backend) {
        let app = TestApp::on(backend).build().await;
        // Not ready until this replica's revocation feed is current.
        let reply = app.ops_get("/readyz").await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(reply.json()["revocationFeed"]["current"], false);
        app.flush().await;
        assert_eq!(app.anonymous().get("/healthz").await.status, StatusCode::OK);
        for path in ["/readyz", "/metrics"] {
            let reply = app.anonymous().get(path).await;
            assert_eq!(
                reply.status,
                StatusCode::NOT_FOUND,
                "{path} on the API port"
            );
            assert_eq!(
                app.ops_get(path).await.status,
                StatusCode::OK,
                "{path} on ops"
            );
        }
        assert_eq!(app.ops_get("/healthz").await.status, StatusCode::OK);
        let readyz = app.ops_get("/readyz").await.json();
        assert_eq!(readyz["database"], "ok");
        assert_eq!(readyz["kvSync"], "off");
        assert_eq!(readyz["revocationFeed"]["current"], true);
        let doc = app.anonymous().get("/openapi.json").await.json();
        assert!(doc["paths"].get("/readyz").is_none());
        assert_eq!(
            doc["paths"]["/api/v1/keys/create"]["post"]["security"][0]["api_key"],
            json!(["admin"])
        );
        assert_eq!(
            doc["paths"]["/api/v1/verify"]["get"]["security"][0]["api_key"],
            json!(["client"])
        );
        assert!(doc["components"]["schemas"]["Role"].is_object());
    }
}
