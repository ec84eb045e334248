//! The accept loop (hyper-util, as `axum::serve` does it), with what `axum::serve` cannot
//! set: a header-read timeout, so a client that sends its request head slowly (slowloris)
//! is dropped instead of holding a connection, and a cap on open connections per
//! process — at the cap the loop stops accepting (new clients wait in the kernel's
//! backlog) until one closes. HTTP/1.1 only: what Cloudflare's fetch to an origin and
//! proxies speak, and cleartext HTTP/2 would need a protocol sniff that waits for a
//! silent client's first byte with no timeout at all. Hyper's header timeout also closes
//! a keep-alive connection idle that long between requests, but does not run before a
//! connection's first byte: that wait is bounded here, once per connection.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower_service::Service;

/// How long in-flight requests may take to finish after a stop signal.
const DRAIN_FOR: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Longest wait for a request's whole head (request line and headers), HTTP/1.
    pub header_read_timeout: Duration,
    /// Open connections at most.
    pub max_connections: usize,
}

/// Serves `router` on `listener` until `stop` resolves, then lets open requests finish
/// (up to 30 s). Each request carries its peer's `ConnectInfo<SocketAddr>`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    stop: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut builder = Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
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
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            let mut router = router.clone();
            async move { Ok::<_, Infallible>(router.call(req).await.unwrap_or_else(|e| match e {})) }
        });
        let (builder, watcher) = (builder.clone(), graceful.watcher());
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
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            // Timeouts and resets end here; nothing to report per connection.
            let _ = watcher.watch(conn.into_owned()).await;
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
