//! Request metrics: a count and a duration per route template, method and status.

use std::collections::HashMap;
use std::sync::{LazyLock, RwLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;

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
