//! The in-process test app: the whole service built by [`app::build`] (the same router,
//! state and layers the binary serves), driven without a socket through
//! `tower::ServiceExt::oneshot`. One [`TestApp`] per test, on embedded SQLite (a fresh
//! file in memory under `/dev/shm` where there is one) or on a fresh database of the
//! PostgreSQL server `scripts/stack.sh` starts (`METLO_TEST_PG_URL`), with Redis when
//! [`TestAppBuilder::redis`] names one. Callers ([`TestApp::as_admin`],
//! [`TestApp::as_edge`], [`TestApp::as_client`], [`TestApp::anonymous`],
//! [`TestApp::with_key`]) send requests and get one reply type, [`Reply`].
//!
//! Periodic work is not waited for: [`TestApp::flush`] runs it to completion, and
//! [`TestApp::advance`] moves the clock (`clock::advance`) for expiries. Models:
//! crates.io's `src/tests/util/`, Unkey's test harness.
// A harness: not every helper is used by today's tests.
#![allow(dead_code)]

use std::net::SocketAddr;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode};
use clap::Parser;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::app::{self, App};
use crate::config::Config;
use crate::db::Backend;
use crate::http::context::RequestContext;

/// The peer every in-process request comes from, unless a test names another.
pub const PEER: &str = "127.0.0.1:40000";

/// Runs each named `async fn(Backend)` as two tests, `sqlite` and `postgres`.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test]
                async fn sqlite() {
                    super::$name($crate::db::Backend::Sqlite).await
                }
                #[tokio::test]
                async fn postgres() {
                    super::$name($crate::db::Backend::Postgres).await
                }
            }
        )*
    };
}
pub(crate) use on_both_backends;

#[derive(Parser)]
struct Settings {
    #[command(flatten)]
    config: Config,
}

/// How to build a [`TestApp`]: a backend and settings, as environment names
/// (`MAX_API_KEYS`) with their values, passed to the same parser the binary uses.
pub struct TestAppBuilder {
    backend: Backend,
    settings: Vec<(String, String)>,
    redis_url: Option<String>,
}

impl TestAppBuilder {
    /// One setting, by its environment name (`LIST_UNPAGED_MAX`, `CACHE_TTL_SECONDS`…).
    pub fn env(mut self, name: &str, value: impl ToString) -> Self {
        self.settings.push((name.to_owned(), value.to_string()));
        self
    }

    pub fn redis(mut self, url: impl Into<String>) -> Self {
        self.redis_url = Some(url.into());
        self
    }

    pub async fn build(self) -> TestApp {
        let dir = scratch_dir();
        let mut args = vec!["test-app".to_owned()];
        for (name, value) in &self.settings {
            args.push(format!(
                "--{}={value}",
                name.to_lowercase().replace('_', "-")
            ));
        }
        let mut config = Settings::try_parse_from(&args)
            .unwrap_or_else(|e| panic!("test settings {:?}: {e}", self.settings))
            .config;
        config.data_dir = dir.path().join("data");
        config.database_url = match self.backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(fresh_postgres_database().await),
        };
        config.redis_url = self.redis_url;
        // The settings given here, never the developer's shell: no KV target unless asked.
        if !self
            .settings
            .iter()
            .any(|(k, _)| k == "CLOUDFLARE_API_TOKEN")
        {
            config.kv.cloudflare_api_token = None;
        }
        let app = app::build(&config).await.expect("the app builds");
        let mut test_app = TestApp {
            app,
            backend: self.backend,
            database_url: config.database_url.clone(),
            admin_key: String::new(),
            edge_key: String::new(),
            client_key: String::new(),
            _dir: dir,
        };
        // The first keys are made as an operator makes them: by the CLI's path (no actor).
        test_app.admin_key = test_app.seed_key("admin", "admin").await;
        test_app.edge_key = test_app.seed_key("edge-worker", "edge").await;
        test_app.client_key = test_app.seed_key("client", "client").await;
        test_app
    }
}

/// The service, in process, with an admin, an edge and a client key.
pub struct TestApp {
    app: App,
    pub backend: Backend,
    /// The PostgreSQL database's URL (None on SQLite): for a test that holds a lock.
    pub database_url: Option<String>,
    pub admin_key: String,
    pub edge_key: String,
    pub client_key: String,
    _dir: tempfile::TempDir,
}

impl TestApp {
    /// Embedded SQLite, default settings.
    pub async fn new() -> TestApp {
        Self::on(Backend::Sqlite).build().await
    }

    /// A builder on `backend`.
    pub fn on(backend: Backend) -> TestAppBuilder {
        TestAppBuilder {
            backend,
            settings: Vec::new(),
            redis_url: None,
        }
    }

    async fn seed_key(&self, name: &str, role: &str) -> String {
        use crate::service::keys::{create_key, CreateKeyRequest};
        let new = CreateKeyRequest {
            name: Some(name.to_owned()),
            role: Some(role.to_owned()),
            ..Default::default()
        }
        .validate(crate::clock::now_ms())
        .unwrap();
        let actor = crate::service::audit::Actor::cli();
        create_key(&self.app.state.store, &new, u64::MAX, &actor)
            .await
            .unwrap()
            .api_key
    }

    pub fn app(&self) -> &App {
        &self.app
    }

    pub fn as_admin(&self) -> Caller<'_> {
        self.with_key(&self.admin_key)
    }

    pub fn as_edge(&self) -> Caller<'_> {
        self.with_key(&self.edge_key)
    }

    pub fn as_client(&self) -> Caller<'_> {
        self.with_key(&self.client_key)
    }

    /// No `Authorization` at all.
    pub fn anonymous(&self) -> Caller<'_> {
        Caller {
            app: self,
            authorization: None,
            peer: PEER.parse().unwrap(),
            headers: Vec::new(),
        }
    }

    /// `Authorization: <key>` as given (any string, valid or not).
    pub fn with_key(&self, key: &str) -> Caller<'_> {
        Caller {
            authorization: Some(key.to_owned()),
            ..self.anonymous()
        }
    }

    /// Runs the periodic work now (audit, usage, KV outbox); see [`App::flush`].
    pub async fn flush(&self) -> crate::app::Flushed {
        self.app.flush().await
    }

    /// Moves the clock forward for this test (see `clock::advance`).
    pub fn advance(&self, by: std::time::Duration) {
        crate::clock::advance(by)
    }

    /// Creates a key as the admin; returns the full key.
    pub async fn create_key(&self, name: &str, key_for: &str) -> String {
        let reply = self
            .as_admin()
            .post(
                "/api/v1/keys/create",
                json!({"name": name, "keyFor": key_for}),
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        reply.json()["apiKey"].as_str().unwrap().to_owned()
    }

    /// The plain list, as the admin.
    pub async fn list(&self) -> Vec<Value> {
        let reply = self.as_admin().get("/api/v1/keys/list").await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        serde_json::from_value(reply.json()).unwrap()
    }

    /// One key's list entry.
    pub async fn listed(&self, name: &str) -> Value {
        self.list()
            .await
            .into_iter()
            .find(|k| k["name"] == name)
            .unwrap_or_else(|| panic!("{name} not listed"))
    }

    // Shortcuts named as the end-to-end harness's `ControlPlane` ones, so that a test
    // reads the same in both.

    /// `POST /api/v1/keys/create` as the admin: status and body.
    pub async fn create(&self, body: Value) -> (StatusCode, Value) {
        let reply = self.as_admin().post("/api/v1/keys/create", body).await;
        (reply.status, json_or_null(&reply.text))
    }

    /// `PATCH /api/v1/keys/{name}` as the admin: status and body.
    pub async fn patch(&self, name: &str, body: Value) -> (StatusCode, Value) {
        let key = self.admin_key.clone();
        self.patch_as(&key, name, &body).await
    }

    /// `PATCH /api/v1/keys/{name}` with `key`: status and body.
    pub async fn patch_as(&self, key: &str, name: &str, body: &Value) -> (StatusCode, Value) {
        let path = format!("/api/v1/keys/{}", encode_segment(name));
        let reply = self.with_key(key).patch(&path, body.clone()).await;
        (reply.status, json_or_null(&reply.text))
    }

    /// `DELETE /api/v1/keys/{name}/delete` with `key` (or none): status and body.
    pub async fn delete(&self, name: &str, key: Option<&str>) -> (StatusCode, Value) {
        let path = format!("/api/v1/keys/{}/delete", encode_segment(name));
        let caller = key.map_or_else(|| self.anonymous(), |k| self.with_key(k));
        let reply = caller.delete(&path).await;
        (reply.status, json_or_null(&reply.text))
    }

    /// `POST /api/v1/keys/{name}/roll` as the admin, with `body` (or none): status and body.
    pub async fn roll(&self, name: &str, body: Option<Value>) -> (StatusCode, Value) {
        let path = format!("/api/v1/keys/{}/roll", encode_segment(name));
        let reply = self.as_admin().send(Method::POST, &path, body).await;
        (reply.status, json_or_null(&reply.text))
    }

    /// Moves the clock to `at_ms` (milliseconds since the epoch), unless it is already
    /// there or past it.
    pub fn advance_to(&self, at_ms: i64) {
        let now = crate::clock::now_ms();
        if at_ms > now {
            self.advance(std::time::Duration::from_millis((at_ms - now) as u64));
        }
    }

    /// A GET with `key` (or none): status, headers and body text.
    pub async fn get(&self, path: &str, key: Option<&str>) -> (StatusCode, HeaderMap, String) {
        let caller = key.map_or_else(|| self.anonymous(), |k| self.with_key(k));
        let reply = caller.get(path).await;
        (reply.status, reply.headers, reply.text)
    }

    /// `GET /api/v1/verify` with `key`: the status.
    pub async fn verify(&self, key: &str) -> StatusCode {
        self.with_key(key).get("/api/v1/verify").await.status
    }

    /// The revocation feed's page `GET /api/v1/revocations{query}` as the edge reads it,
    /// after a flush (so the feed has read every commit); asserts a 200 not to be cached.
    pub async fn feed_page(&self, query: &str) -> Value {
        self.flush().await;
        let reply = self
            .as_edge()
            .get(&format!("/api/v1/revocations{query}"))
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        assert_eq!(reply.header("cache-control"), Some("no-store"));
        reply.json()
    }

    /// The record the edge gets for `key` (`GET /api/v1/keys/by-hash/…`); asserts a 200.
    pub async fn edge_record(&self, key: &str) -> Value {
        let hash = metlo_shared::ApiKey::parse(key).unwrap().hash().to_hex();
        let reply = self
            .as_edge()
            .get(&format!("/api/v1/keys/by-hash/{hash}"))
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        reply.json()
    }

    /// A GET on the ops routes (`/readyz`, `/metrics`).
    pub async fn ops_get(&self, path: &str) -> Reply {
        let request = Request::get(path).body(Body::empty()).unwrap();
        send(&self.app.ops_router, request, PEER.parse().unwrap()).await
    }
}

/// Who sends a request: its `Authorization` and its TCP peer.
#[derive(Clone)]
pub struct Caller<'a> {
    app: &'a TestApp,
    authorization: Option<String>,
    peer: SocketAddr,
    headers: Vec<(String, String)>,
}

impl Caller<'_> {
    /// From another TCP peer (the failure budgets and the audit log go by address).
    pub fn peer(mut self, peer: &str) -> Self {
        self.peer = peer.parse().expect("a socket address");
        self
    }

    /// One more header on every request (`X-Forwarded-For`, `Origin`, `Cookie`…).
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(Method::GET, path, None).await
    }

    pub async fn delete(&self, path: &str) -> Reply {
        self.send(Method::DELETE, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Reply {
        self.send(Method::POST, path, Some(body)).await
    }

    pub async fn patch(&self, path: &str, body: Value) -> Reply {
        self.send(Method::PATCH, path, Some(body)).await
    }

    /// A request with a JSON body (or none).
    pub async fn send(&self, method: Method, path: &str, body: Option<Value>) -> Reply {
        let mut request = self.request(method, path);
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let body = body.map_or_else(Body::empty, |b| Body::from(b.to_string()));
        self.send_request(request.body(body).unwrap()).await
    }

    /// A request builder with this caller's `Authorization` (for other bodies/headers);
    /// send it with [`Caller::send_request`].
    pub fn request(&self, method: Method, path: &str) -> axum::http::request::Builder {
        let mut request = Request::builder().method(method).uri(path);
        for (name, value) in &self.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        if let Some(key) = &self.authorization {
            request = request.header(
                header::AUTHORIZATION,
                HeaderValue::from_str(key).expect("a header value"),
            );
        }
        request
    }

    pub async fn send_request(&self, request: Request<Body>) -> Reply {
        send(&self.app.app.router, request, self.peer).await
    }
}

async fn send(router: &axum::Router, mut request: Request<Body>, peer: SocketAddr) -> Reply {
    // What the accept loop gives every request (`http/server.rs`).
    request
        .extensions_mut()
        .insert(RequestContext::from_peer(peer));
    let response = router.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("the body is read")
        .to_bytes();
    Reply {
        status,
        headers,
        text: String::from_utf8(bytes.to_vec()).expect("a UTF-8 body"),
    }
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub text: String,
}

impl Reply {
    /// The body as JSON (panics, showing the body, if it is not).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    /// Asserts a JSON error answer: this status and this `error` code (`what` names the
    /// case in the message).
    #[track_caller]
    pub fn assert_error(&self, status: StatusCode, error: &str, what: &str) {
        assert_eq!(self.status, status, "{what}: {}", self.text);
        assert_eq!(self.json()["error"], error, "{what}");
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

fn json_or_null(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::Null)
}

/// A name as one path segment (percent-encoded but for letters and digits).
pub fn encode_segment(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A directory for the test's SQLite file: in memory (`/dev/shm`) where there is one.
fn scratch_dir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::Builder::new()
            .prefix("metlo-test")
            .tempdir_in(shm)
        {
            return dir;
        }
    }
    tempfile::tempdir().expect("a temporary directory")
}

/// A fresh, empty database on the PostgreSQL server `scripts/stack.sh` started.
async fn fresh_postgres_database() -> String {
    use sqlx::Connection;
    let base = std::env::var("METLO_TEST_PG_URL").expect(
        "METLO_TEST_PG_URL is not set: run the tests with `make test` or `make test-fast` \
         (scripts/stack.sh starts PostgreSQL)",
    );
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = format!(
        "u_{}_{}_{}",
        std::process::id(),
        crate::clock::now_ms(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let mut conn = sqlx::postgres::PgConnection::connect(&base)
        .await
        .expect("connect to METLO_TEST_PG_URL");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("create a test database");
    let (prefix, _) = base.rsplit_once('/').expect("a database URL");
    format!("{prefix}/{name}")
}
