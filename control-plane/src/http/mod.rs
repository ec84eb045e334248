//! The REST API: one router per resource, merged here with the layers every request
//! goes through (auth on `/api/v1/*`, metrics, body limit, tracing), and the server that
//! runs it until SIGTERM / Ctrl-C (the accept loop bounds each request's head and time).
//!
//! Handlers only translate: HTTP in (extractors, DTOs), a `service` call, HTTP out
//! ([`error::ApiError`] for every failure).

mod assertion_keys;
#[cfg(test)]
mod assertion_keys_tests;
pub mod audit;
#[cfg(test)]
mod audit_tests;
mod auth;
#[cfg(test)]
mod auth_tests;
mod client_ip;
mod conn_timer;
mod console;
pub(crate) mod context;
#[cfg(test)]
mod credits_tests;
pub mod error;
pub mod extract;
mod feed;
#[cfg(test)]
mod feed_tests;
mod identities;
#[cfg(test)]
mod identities_tests;
#[cfg(test)]
mod key_lists_tests;
#[cfg(test)]
mod key_rolls_tests;
#[cfg(test)]
mod key_updates_tests;
pub mod keys;
#[cfg(test)]
mod keys_tests;
mod leaks;
pub mod limits;
mod metrics;
mod openapi;
mod ops;
#[cfg(test)]
mod permissions_tests;
mod policy;
#[cfg(test)]
mod policy_tests;
pub mod server;
pub mod state;
pub mod usage;
#[cfg(test)]
mod usage_tests;

use axum::body::Bytes;
use axum::http::header;
use axum::routing::get;
use axum::Router;
use tower::ServiceBuilder;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use error::ApiError;
use state::AppState;

pub use extract::decode_json;

/// The whole HTTP service.
pub fn app(state: AppState) -> Router {
    // Each `layer` call boxes every route again (a clone and a boxed future more per
    // request), so every route gets exactly one: the key check and the metrics in one
    // stack (outermost first) where a key is required, the metrics alone elsewhere.
    // (The head-size limit and the request timeout are the accept loop's: `server.rs`.)
    let (router, mut doc) = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .merge(keys::router())
        .merge(audit::router())
        .merge(usage::router())
        .merge(feed::router())
        .merge(policy::router())
        .merge(assertion_keys::router())
        .merge(identities::router())
        .layer(
            ServiceBuilder::new()
                .layer(metrics::TrackRequestsLayer)
                .layer(auth::RequireKeyLayer(state.clone())),
        )
        .merge(
            ops::api_router()
                .merge(leaks::router())
                .merge(assertion_keys::public_router())
                .layer(metrics::TrackRequestsLayer),
        )
        .split_for_parts();
    openapi::add_limit_responses(&mut doc);
    openapi::document_updates(&mut doc);
    // Serialised once: the document never changes while the process runs.
    let doc = Bytes::from(serde_json::to_vec(&doc).expect("the OpenAPI document serialises"));
    let rest = Router::new()
        .route(
            "/openapi.json",
            get(move || async move { ([(header::CONTENT_TYPE, "application/json")], doc) }),
        )
        .merge(console::router(&state))
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .layer(metrics::TrackRequestsLayer);
    let router = router.merge(rest);
    // A span and two events per request, wanted only when debugging
    // (`RUST_LOG=tower_http=debug`): left out otherwise, not merely filtered.
    let router = if tracing::enabled!(target: "tower_http::trace", tracing::Level::DEBUG) {
        router.layer(TraceLayer::new_for_http())
    } else {
        router
    };
    router.with_state(state)
}

/// The ops port's service: health, readiness, metrics (no key; keep it off the network).
pub fn ops_app(state: AppState) -> Router {
    ops::ops_router()
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .with_state(state)
}

/// Serves the API on `listen_addr` and the ops routes on `ops_addr` until SIGTERM or
/// Ctrl-C, then finishes in-flight requests on both.
pub async fn serve(
    listen_addr: &str,
    ops_addr: &str,
    limits: server::ConnectionLimits,
    state: AppState,
    api: Router,
    ops: Router,
) -> anyhow::Result<()> {
    let listener = bind(listen_addr).await?;
    let ops_listener = bind(ops_addr).await?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    });
    let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    tracing::info!(
        "ops routes (readyz, metrics) on http://{}",
        ops_listener.local_addr()?
    );
    tracing::info!(cache = state.cache.kind(), backend = ?state.store.backend(), "listening on http://{}", listener.local_addr()?);
    let ops = server::serve(ops_listener, ops, limits, until_stopped(stopped.clone()));
    let api = server::serve(listener, api, limits, until_stopped(stopped));
    tokio::join!(api, ops);
    Ok(())
}

async fn bind(addr: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down: finishing in-flight requests");
}
