//! Logs (`tracing`, text or JSON) and Prometheus metrics.

use std::collections::HashMap;
use std::sync::{LazyLock, RwLock};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Logs go to stderr; stdout is kept for command output (such as a new key).
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Installs the global Prometheus recorder. Call once per process.
pub fn init_metrics() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("http_request_duration_seconds".into()),
            &[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ],
        )?
        .install_recorder()?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// Counts requests by route template (never the raw path: it may hold names) and status,
/// and times them.
pub async fn track_requests(req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().cloned();
    let method = method_label(req.method());
    let started = Instant::now();
    let response = next.run(req).await;
    let route = route.as_ref().map_or("unmatched", |r| r.as_str());
    let (count, duration) = request_metrics(route, method, response.status().as_u16());
    count.increment(1);
    duration.record(started.elapsed().as_secs_f64());
    response
}

/// Standard methods by name; anything else is one label, so clients cannot grow the
/// label set.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "OTHER",
    }
}

type RequestHandles = (metrics::Counter, metrics::Histogram);
type HandleMap = HashMap<(&'static str, &'static str, u16), RequestHandles>;

/// Metric handles per (route template, method, status), made once: a request then costs
/// a read-locked lookup instead of label strings allocated and a registry key built for
/// each metric. The set is bounded: routes are the router's templates, methods the
/// standard ones, statuses three digits.
fn request_metrics(route: &str, method: &'static str, status: u16) -> RequestHandles {
    static HANDLES: LazyLock<RwLock<HandleMap>> = LazyLock::new(Default::default);
    {
        let map = HANDLES.read().unwrap_or_else(|e| e.into_inner());
        let map: &HashMap<(&str, &str, u16), RequestHandles> = &map;
        if let Some(handles) = map.get(&(route, method, status)) {
            return handles.clone();
        }
    }
    let mut map = HANDLES.write().unwrap_or_else(|e| e.into_inner());
    let route: &'static str = Box::leak(route.to_owned().into_boxed_str());
    map.entry((route, method, status))
        .or_insert_with(|| {
            let status = status.to_string();
            (
                metrics::counter!("http_requests_total", "method" => method, "route" => route, "status" => status),
                metrics::histogram!("http_request_duration_seconds", "method" => method, "route" => route),
            )
        })
        .clone()
}
