//! Request metrics: a count and a duration per route template, method and status.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{LazyLock, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::response::Response;
use tower::{Layer, Service};

/// Counts requests by route template (never the raw path: it may hold names) and status,
/// and times them. A tower layer rather than `from_fn`: no boxed future, no boxed
/// `Next` per request.
#[derive(Debug, Clone, Copy)]
pub struct TrackRequestsLayer;

impl<S> Layer<S> for TrackRequestsLayer {
    type Service = TrackRequests<S>;

    fn layer(&self, inner: S) -> TrackRequests<S> {
        TrackRequests(inner)
    }
}

#[derive(Debug, Clone)]
pub struct TrackRequests<S>(S);

impl<S: Service<Request, Response = Response>> Service<Request> for TrackRequests<S> {
    type Response = Response;
    type Error = S::Error;
    type Future = Tracked<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let route = req.extensions().get::<MatchedPath>().cloned();
        let method = method_label(req.method());
        Tracked {
            inner: self.0.call(req),
            route,
            method,
            started: Instant::now(),
        }
    }
}

pin_project_lite::pin_project! {
    /// A request's response, counted and timed when it is ready.
    pub struct Tracked<F> {
        #[pin]
        inner: F,
        route: Option<MatchedPath>,
        method: &'static str,
        started: Instant,
    }
}

impl<F: Future<Output = Result<Response, E>>, E> Future for Tracked<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        if let Ok(response) = &result {
            let route = this.route.as_ref().map_or("unmatched", |r| r.as_str());
            let (count, duration) = request_metrics(route, this.method, response.status().as_u16());
            count.increment(1);
            duration.record(this.started.elapsed().as_secs_f64());
        }
        Poll::Ready(result)
    }
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
type HandleMap = HashMap<
    (&'static str, &'static str, u16),
    &'static RequestHandles,
    foldhash::fast::RandomState,
>;

/// Metric handles per (route template, method, status), made once: a request then costs
/// a lookup in its thread's own map (no lock, no cache line shared with the other
/// workers) instead of label strings allocated and a registry key built for each metric
/// (and handles lent, not cloned: no reference counts touched). The set is bounded:
/// routes are the router's templates, methods the standard ones, statuses three digits.
fn request_metrics(route: &str, method: &'static str, status: u16) -> &'static RequestHandles {
    thread_local! {
        static NEAR: RefCell<HandleMap> = RefCell::default();
    }
    NEAR.with(|near| {
        let found = {
            let map = near.borrow();
            let map: &HashMap<(&str, &str, u16), &'static RequestHandles, _> = &map;
            map.get(&(route, method, status)).copied()
        };
        found.unwrap_or_else(|| {
            let (route, handles) = shared_request_metrics(route, method, status);
            near.borrow_mut().insert((route, method, status), handles);
            handles
        })
    })
}

/// The process's one set of handles (a thread's first request of a kind): its route
/// template leaked once, with the handles.
fn shared_request_metrics(
    route: &str,
    method: &'static str,
    status: u16,
) -> (&'static str, &'static RequestHandles) {
    type Shared =
        HashMap<(&'static str, &'static str, u16), (&'static str, &'static RequestHandles)>;
    static SHARED: LazyLock<Mutex<Shared>> = LazyLock::new(Default::default);
    let mut map = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    let found = {
        let map: &HashMap<(&str, &str, u16), (&'static str, &'static RequestHandles)> = &map;
        map.get(&(route, method, status)).copied()
    };
    found.unwrap_or_else(|| {
        let route: &'static str = Box::leak(route.to_owned().into_boxed_str());
        let handles: &'static RequestHandles = Box::leak(Box::new((
            metrics::counter!("http_requests_total", "method" => method, "route" => route, "status" => status.to_string()),
            metrics::histogram!("http_request_duration_seconds", "method" => method, "route" => route),
        )));
        map.insert((route, method, status), (route, handles));
        (route, handles)
    })
}
