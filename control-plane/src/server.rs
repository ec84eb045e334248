//! Assembles the HTTP service and runs it until SIGTERM / Ctrl-C.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::{from_fn, from_fn_with_state, Next};
use axum::response::Response;
use axum::Router;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::error::ApiError;
use crate::{audit, auth, keys, ops, telemetry, usage, AppState};

/// Largest request body accepted; key requests are tiny.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// Largest request head (target URI plus every header's name and value) accepted. hyper's
/// own caps (100 headers, ~400 KB of buffer) stay as the outer bound.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

pub fn app(state: AppState) -> Router {
    let api = keys::router()
        .merge(audit::router())
        .merge(usage::router())
        .layer(from_fn_with_state(state.clone(), auth::require_key));
    ops::router()
        .merge(api)
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .layer(from_fn(telemetry::track_requests))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(from_fn(limit_header_size))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(30),
        ))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// Refuses oversized request heads with a JSON 431 before anything reads them.
async fn limit_header_size(req: Request, next: Next) -> Result<Response, ApiError> {
    let size = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len())
        + req
            .headers()
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len())
            .sum::<usize>();
    if size > MAX_HEADER_BYTES {
        return Err(ApiError::HeadersTooLarge);
    }
    Ok(next.run(req).await)
}

pub async fn serve(listen_addr: &str, state: AppState) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen_addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen_addr}: {e}"))?;
    let store = state.store.clone();
    tracing::info!(cache = state.cache.kind(), backend = ?store.backend(), "listening on http://{}", listener.local_addr()?);
    axum::serve(
        listener,
        app(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown_signal())
    .await?;
    store.close().await;
    tracing::info!("stopped");
    Ok(())
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
