//! The accept loop (hyper-util, as `axum::serve` does it), with what `axum::serve` cannot
//! set: a header-read timeout, so a client that sends its request head slowly (slowloris)
//! is dropped instead of holding a connection, and a cap on open connections per
//! process — at the cap the loop stops accepting (new clients wait in the kernel's
//! backlog) until one closes. HTTP/1.1 only: what Cloudflare's fetch to an origin and
//! proxies speak, and cleartext HTTP/2 would need a protocol sniff that waits for a
//! silent client's first byte with no timeout at all. Hyper's header timeout also closes
//! a keep-alive connection idle that long between requests, but does not run before a
//! connection's first byte: that wait is bounded here, once per connection. Its timer is
//! one per connection (`conn_timer.rs`), not a timer-wheel entry per request.
//!
//! Each request's own bounds are here too, before the router: its head's size (a JSON
//! 431) and its time (a JSON 408); and a handler that panics is answered with a JSON 500
//! (no panic is known, but a bug should cost a request, not a silent reset). The timer is made only when the request's first poll
//! does not answer it, so a cached verification never makes one (tower-http's
//! `TimeoutLayer` arms one for every request; even an unarmed `tokio::time::timeout`
//! reads the clock and the runtime handle and drops a timer entry: about 2 % of a
//! verification).

use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use axum::response::IntoResponse;
use axum::Router;
use futures_util::FutureExt;
use hyper::body::Incoming;
use hyper::server::conn::http1::Builder;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower_service::Service;

use super::conn_timer::ConnectionTimer;
use super::context::RequestContext;
use super::error::ApiError;
use super::limits::MAX_HEADER_BYTES;
use crate::service;

/// How long in-flight requests may take to finish after a stop signal.
const DRAIN_FOR: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Longest wait for a request's whole head (request line and headers), HTTP/1.
    pub header_read_timeout: Duration,
    /// Open connections at most.
    pub max_connections: usize,
    /// Longest a request may take after its head (body and handler), answered 408.
    pub request_timeout: Duration,
}

/// Serves `router` on `listener` until `stop` resolves, then lets open requests finish
/// (up to 30 s). Each request carries its peer in its [`RequestContext`].
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    stop: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut builder = Builder::new();
    builder.header_read_timeout(limits.header_read_timeout);
    let graceful = GracefulShutdown::new();
    let mut stop = std::pin::pin!(stop);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("never closed"),
            () = &mut stop => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        metrics::gauge!("metlo_open_connections")
            .set((limits.max_connections - slots.available_permits()) as f64);
        let router = router.clone();
        let request_timeout = limits.request_timeout;
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            let mut router = router.clone();
            async move {
                if head_size(&req) > MAX_HEADER_BYTES {
                    return Ok::<_, Infallible>(ApiError::HeadersTooLarge.into_response());
                }
                req.extensions_mut().insert(RequestContext::from_peer(peer));
                let answer = AssertUnwindSafe(within(request_timeout, router.call(req)));
                Ok(match answer.catch_unwind().await {
                    Ok(Some(response)) => response.unwrap_or_else(|e| match e {}),
                    Ok(None) => ApiError::RequestTimeout(request_timeout.as_secs()).into_response(),
                    // The panic hook has printed it; without this the client would see the
                    // connection drop with no answer.
                    Err(_) => ApiError::Service(service::Error::Internal(anyhow::anyhow!(
                        "the request's handler panicked"
                    )))
                    .into_response(),
                })
            }
        });
        let (mut builder, watcher) = (builder.clone(), graceful.watcher());
        builder.timer(ConnectionTimer::new());
        let header_timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            // A connection that never sends a first byte is bounded like a slow head.
            // (`peek` waits for a byte; readiness alone may be reported before one.)
            let mut first = [0u8; 1];
            if tokio::time::timeout(header_timeout, stream.peek(&mut first))
                .await
                .is_err()
            {
                return;
            }
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            // Timeouts and resets end here; nothing to report per connection.
            let _ = watcher.watch(conn).await;
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_FOR, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("stopped with requests still in flight after 30 s");
    }
}

/// `fut`'s output, or `None` past `limit`; the timer is made only if the first poll is
/// pending (the limit then counts from there: a first poll is not a wait).
async fn within<F: Future>(limit: Duration, fut: F) -> Option<F::Output> {
    let mut fut = pin!(fut);
    if let Poll::Ready(out) = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await {
        return Some(out);
    }
    tokio::time::timeout(limit, fut).await.ok()
}

/// The request head's size as limited: target URI plus every header's name and value
/// (hyper's own caps, 100 headers and ~400 KB of buffer, stay as the outer bound).
fn head_size<B>(req: &hyper::Request<B>) -> usize {
    req.uri().path_and_query().map_or(0, |pq| pq.as_str().len())
        + req
            .headers()
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len())
            .sum::<usize>()
}

#[cfg(test)]
mod tests {
    use axum::routing::get;

    use super::*;

    /// A handler's panic is answered (a JSON 500), and the server goes on serving, on
    /// the same connection too.
    #[tokio::test]
    async fn a_panicking_handler_gets_a_500_not_a_dropped_connection() {
        let router = Router::new()
            .route("/boom", get(|| async { panic!("a bug") as &'static str }))
            .route("/ok", get(|| async { "fine" }));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let limits = ConnectionLimits {
            header_read_timeout: Duration::from_secs(5),
            max_connections: 8,
            request_timeout: Duration::from_secs(5),
        };
        tokio::spawn(serve(listener, router, limits, std::future::pending()));
        // One connection for both calls: a panic must not close it either.
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(1)
            .build()
            .unwrap();
        let boom = client.get(format!("{base}/boom")).send().await.unwrap();
        assert_eq!(boom.status(), 500);
        let body: serde_json::Value = boom.json().await.unwrap();
        assert_eq!(body["error"], "internal");
        let ok = client.get(format!("{base}/ok")).send().await.unwrap();
        assert_eq!(ok.status(), 200);
        assert_eq!(ok.text().await.unwrap(), "fine");
    }
}
