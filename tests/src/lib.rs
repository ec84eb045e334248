//! Harness for end-to-end tests and benchmarks: starts the real control-plane binary,
//! throwaway Redis servers and databases, and talks to them over HTTP.
//!
//! PostgreSQL comes from `scripts/stack.sh` (it exports `METLO_TEST_PG_URL`); every test
//! gets its own database in it. Redis servers are started per test, so a test can stop
//! and restart its own.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod bench;
pub mod browser;
pub mod edge;
pub mod github;

pub use reqwest::StatusCode;

/// Which key store a control plane runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The binary a control plane with this environment runs: `METLO_CONTROL_PLANE_BIN` in
/// it (the benchmark's baseline build), else [`control_plane_bin`].
fn control_plane_bin_for(env: &[(String, String)]) -> PathBuf {
    env.iter()
        .find(|(k, _)| k == "METLO_CONTROL_PLANE_BIN")
        .map_or_else(control_plane_bin, |(_, bin)| PathBuf::from(bin))
}

/// The control-plane binary, built by `make test` before the tests run.
pub fn control_plane_bin() -> PathBuf {
    if let Ok(p) = std::env::var("METLO_CONTROL_PLANE_BIN") {
        return PathBuf::from(p);
    }
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let path = workspace_root()
        .join("target")
        .join(profile)
        .join("metlo-control-plane");
    assert!(
        path.exists(),
        "{} not built: run `make test` (it builds it first)",
        path.display()
    );
    path
}

/// A port for a server a test starts. It is taken below the kernel's ephemeral range:
/// a port the kernel hands out (`bind(0)`) can be given again at once to any outgoing
/// connection, and then the server (wrangler, started seconds later) fails to bind
/// it. Below that range only explicit binds compete, and this process counts its own.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    const LOW: u32 = 10_000;
    let span = ephemeral_low.saturating_sub(LOW).max(1);
    let start = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let port = LOW + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
    panic!("no free port below the ephemeral range");
}

/// A fresh, empty PostgreSQL database for one test; returns its URL.
pub async fn fresh_postgres_database() -> String {
    let base = std::env::var("METLO_TEST_PG_URL")
        .expect("METLO_TEST_PG_URL is not set: run the tests with `make test` (scripts/stack.sh starts PostgreSQL)");
    let name = format!("t_{}", unique_suffix());
    let status = Command::new("psql")
        .args([
            base.as_str(),
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            &format!("CREATE DATABASE {name}"),
        ])
        .stdout(Stdio::null())
        .status()
        .expect("psql");
    assert!(status.success(), "could not create database {name}");
    let (prefix, _) = base.rsplit_once('/').unwrap();
    format!("{prefix}/{name}")
}

pub fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{}_{}_{}",
        std::process::id(),
        nanos,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A PostgreSQL server of the test's own (initdb in a temporary directory, as the
/// `postgres` user when running as root), so a test can stop and restart it.
pub struct Postgres {
    pub port: u16,
    dir: tempfile::TempDir,
    bindir: PathBuf,
}

impl Postgres {
    pub fn start() -> Self {
        let bindir = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL not installed: run scripts/install-deps.sh")
            .filter_map(|e| Some(e.ok()?.path().join("bin")))
            .filter(|p| p.join("initdb").exists())
            .max()
            .expect("no PostgreSQL bin directory");
        let dir = tempfile::tempdir().unwrap();
        let pg = Postgres {
            port: free_port(),
            dir,
            bindir,
        };
        if is_root() {
            Command::new("chown")
                .args(["-R", "postgres"])
                .arg(pg.dir.path())
                .status()
                .unwrap();
        }
        let data = pg.dir.path().join("data");
        let out = pg
            .as_pg("initdb")
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "-D"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg.restart();
        pg
    }

    fn as_pg(&self, tool: &str) -> Command {
        let bin = self.bindir.join(tool);
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(bin);
            c
        } else {
            Command::new(bin)
        }
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn restart(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let out = self
            .as_pg("pg_ctl")
            .args(["-w", "-t", "60", "-l"])
            .arg(self.dir.path().join("postgres.log"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-o", &opts, "start"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops the server at once (`-m immediate`: connections are cut, as in a crash).
    pub fn stop(&self) {
        let _ = self
            .as_pg("pg_ctl")
            .args(["-m", "immediate", "-D"])
            .arg(self.dir.path().join("data"))
            .arg("stop")
            .output();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

/// A throwaway `redis-server` on its own port, stoppable and restartable on that port.
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Redis {
    pub fn start() -> Self {
        let mut r = Redis {
            port: free_port(),
            child: None,
            dir: tempfile::tempdir().unwrap(),
        };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "redis already running");
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server not found: run scripts/install-deps.sh");
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(10));
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Number of keys in Redis (via the RESP protocol, no client crate needed).
    pub fn dbsize(&self) -> i64 {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.write_all(b"DBSIZE\r\n").unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap();
        let line = std::str::from_utf8(&buf[..n]).unwrap();
        line.trim().trim_start_matches(':').parse().unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A TCP proxy that can cut the network between the control plane and a server: while
/// cut, every connection through it is closed as soon as it carries anything, and what it
/// carried is dropped — a partition in which requests are lost, not merely delayed (a
/// SIGSTOPped server would still execute what was sent once it resumes).
pub struct PartitionProxy {
    pub port: u16,
    cut: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl PartitionProxy {
    pub async fn start(target_port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cut_flag = cut.clone();
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if cut_flag.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let cut = cut_flag.clone();
                tokio::spawn(async move {
                    let Ok(outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                    else {
                        return;
                    };
                    let (client_read, client_write) = inbound.into_split();
                    let (server_read, server_write) = outbound.into_split();
                    // Either direction ending (or the cut) closes both.
                    tokio::select! {
                        _ = forward(client_read, server_write, cut.clone()) => {}
                        _ = forward(server_read, client_write, cut) => {}
                    }
                });
            }
        });
        PartitionProxy { port, cut, task }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn heal(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for PartitionProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    cut: Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if cut.load(std::sync::atomic::Ordering::SeqCst) || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

pub fn wait_for_port(port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nothing listening on port {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How to start a control plane.
#[derive(Debug, Clone)]
pub struct Options {
    pub backend: Backend,
    pub redis_url: Option<String>,
    pub env: Vec<(String, String)>,
}

impl Options {
    pub fn new(backend: Backend) -> Self {
        Options {
            backend,
            redis_url: None,
            env: Vec::new(),
        }
    }
    pub fn redis(mut self, url: String) -> Self {
        self.redis_url = Some(url);
        self
    }
    pub fn env(mut self, k: &str, v: impl ToString) -> Self {
        self.env.push((k.to_owned(), v.to_string()));
        self
    }
}

/// A running control plane (the real binary) with its own database and an admin key.
/// On drop it is stopped, and its log is checked: no key it handed out may appear there.
pub struct ControlPlane {
    pub url: String,
    pub admin_key: String,
    /// A key with the edge role (the Worker's credential: by-hash and usage reports).
    pub edge_key: String,
    /// A key with the client role (traffic: the edge and `/api/v1/verify`).
    pub client_key: String,
    /// The ops listener (`/readyz` with details, `/metrics`).
    pub ops_url: String,
    pub client: reqwest::Client,
    child: Child,
    log_path: PathBuf,
    env: Vec<(String, String)>,
    _dir: tempfile::TempDir,
    /// Every full key seen by this test, to check the logs against.
    pub secrets: Arc<Mutex<Vec<String>>>,
}

impl ControlPlane {
    pub async fn start(backend: Backend) -> Self {
        Self::start_with(Options::new(backend)).await
    }

    pub async fn start_with(opts: Options) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut env: Vec<(String, String)> = vec![
            ("LOG_FORMAT".into(), "text".into()),
            ("RUST_LOG".into(), "info".into()),
            ("OPS_LISTEN_ADDR".into(), "127.0.0.1:0".into()),
        ];
        match opts.backend {
            Backend::Sqlite => env.push((
                "DATA_DIR".into(),
                dir.path().join("data").display().to_string(),
            )),
            Backend::Postgres => {
                let url = match opts.env.iter().find(|(k, _)| k == "DATABASE_URL") {
                    Some((_, url)) => url.clone(),
                    None => fresh_postgres_database().await,
                };
                env.push(("DATABASE_URL".into(), url));
            }
        }
        if let Some(url) = &opts.redis_url {
            env.push(("REDIS_URL".into(), url.clone()));
        }
        env.extend(opts.env.iter().cloned());
        let log_path = dir.path().join("control-plane.log");

        // The first keys are made the way an operator makes them: with the CLI.
        let admin_key = cli_key(&env, "admin", "admin", &log_path);
        let edge_key = cli_key(&env, "edge-worker", "edge", &log_path);
        let client_key = cli_key(&env, "client", "client", &log_path);
        let child = spawn_server(&env, &log_path, "127.0.0.1:0");
        let url = wait_for_listening(&log_path, Duration::from_secs(30));
        // A baseline build from before the ops listener serves those routes on the API port.
        let ops_url = find_url(&std::fs::read_to_string(&log_path).unwrap(), OPS_LINE)
            .unwrap_or_else(|| url.clone());
        ControlPlane {
            url,
            ops_url,
            admin_key: admin_key.clone(),
            edge_key: edge_key.clone(),
            client_key: client_key.clone(),
            // Idle connections are dropped before the server's own idle close (its
            // header-read timeout, 10 s by default): reusing one just as the server closes
            // it fails the request.
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(256)
                .pool_idle_timeout(Duration::from_secs(5))
                .build()
                .unwrap(),
            child,
            log_path,
            env,
            _dir: dir,
            secrets: Arc::new(Mutex::new(vec![admin_key, edge_key, client_key])),
        }
    }

    /// One of the settings it runs with.
    pub fn setting(&self, name: &str) -> Option<String> {
        self.env
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }

    /// The embedded SQLite database file (on the SQLite backend).
    pub fn sqlite_file(&self) -> PathBuf {
        self._dir.path().join("data/metlo.db")
    }

    /// Another server process on the same database and cache (a second replica). It must
    /// not outlive `self`, whose temporary directory may hold the database.
    pub async fn replica(&self) -> ControlPlane {
        self.replica_with(&[]).await
    }

    /// A replica with some settings changed (e.g. no verification cache).
    pub async fn replica_with(&self, changes: &[(&str, &str)]) -> ControlPlane {
        let mut env = self.env.clone();
        env.retain(|(k, _)| !changes.iter().any(|(c, _)| c == k));
        env.extend(changes.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("replica.log");
        let child = spawn_server(&env, &log_path, "127.0.0.1:0");
        let url = wait_for_listening(&log_path, Duration::from_secs(30));
        // A baseline build from before the ops listener serves those routes on the API port.
        let ops_url = find_url(&std::fs::read_to_string(&log_path).unwrap(), OPS_LINE)
            .unwrap_or_else(|| url.clone());
        ControlPlane {
            url,
            ops_url,
            admin_key: self.admin_key.clone(),
            edge_key: self.edge_key.clone(),
            client_key: self.client_key.clone(),
            client: self.client.clone(),
            child,
            log_path,
            env,
            _dir: dir,
            secrets: self.secrets.clone(),
        }
    }

    /// Runs the CLI against this control plane's database, returning stdout.
    pub fn cli(&self, args: &[&str]) -> Result<String, String> {
        run_cli(&self.env, args, &self.log_path)
    }

    /// What [`run_cli`] needs to run the CLI from another thread: the settings and the log.
    pub fn cli_env(&self) -> (Vec<(String, String)>, PathBuf) {
        (self.env.clone(), self.log_path.clone())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts the server again (same database, same settings) after [`kill`](Self::kill).
    pub fn restart(&mut self) {
        let before = self.log().len();
        self.child = spawn_server(&self.env, &self.log_path, "127.0.0.1:0");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = self.log();
            if let Some(url) = find_url(&log[before..], API_LINE) {
                self.url = url;
                self.ops_url =
                    find_url(&log[before..], OPS_LINE).unwrap_or_else(|| self.url.clone());
                return;
            }
            assert!(
                Instant::now() < deadline,
                "control plane did not restart:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A GET on the ops listener (`/readyz`, `/metrics`): status and body.
    pub async fn ops_get(&self, path: &str) -> (StatusCode, String) {
        let r = self
            .client
            .get(format!("{}{}", self.ops_url, path))
            .send()
            .await
            .unwrap();
        (r.status(), r.text().await.unwrap())
    }

    /// Waits until the KV outbox is empty (as `/readyz` reports it); returns how long it took.
    pub async fn wait_outbox_drained(&self, timeout: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let (_, body) = self.ops_get("/readyz").await;
            let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            if v["kvSync"]["outboxDepth"] == 0 {
                return started.elapsed();
            }
            assert!(started.elapsed() < timeout, "outbox not drained: {body}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the process to exit; returns whether it exited cleanly.
    pub fn terminate(&mut self) -> bool {
        unsafe_kill(self.child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
    ) -> reqwest::RequestBuilder {
        let mut rb = self.client.request(method, format!("{}{}", self.url, path));
        if let Some(k) = key {
            rb = rb.header("Authorization", k);
        }
        rb
    }

    /// `POST /api/v1/keys/create` with the admin key; returns status and body.
    pub async fn create(&self, body: Value) -> (StatusCode, Value) {
        self.create_as(&self.admin_key, body).await
    }

    /// [`Self::create`] with another key.
    pub async fn create_as(&self, key: &str, body: Value) -> (StatusCode, Value) {
        let r = self
            .request(reqwest::Method::POST, "/api/v1/keys/create", Some(key))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        if let Some(k) = body.get("apiKey").and_then(Value::as_str) {
            self.secrets.lock().unwrap().push(k.to_owned());
        }
        (status, body)
    }

    /// A POST with a JSON body (or none) and the admin key; returns status and body, and
    /// remembers any key in the response (to check logs against).
    pub async fn post(&self, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.post_as(&self.admin_key, path, body).await
    }

    /// [`Self::post`] with another key.
    pub async fn post_as(&self, key: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut rb = self.request(reqwest::Method::POST, path, Some(key));
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.unwrap();
        let status = r.status();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        if let Some(k) = body.get("apiKey").and_then(Value::as_str) {
            self.secrets.lock().unwrap().push(k.to_owned());
        }
        (status, body)
    }

    /// `POST /api/v1/keys/{name}/roll`.
    pub async fn roll(&self, name: &str, body: Option<Value>) -> (StatusCode, Value) {
        let path = format!("/api/v1/keys/{}/roll", encode_path_segment(name));
        self.post(&path, body).await
    }

    /// `PATCH /api/v1/keys/{name}` with `key`; returns status and body.
    pub async fn patch_as(&self, key: &str, name: &str, body: &Value) -> (StatusCode, Value) {
        let path = format!("/api/v1/keys/{}", encode_path_segment(name));
        let r = self
            .request(reqwest::Method::PATCH, &path, Some(key))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// [`Self::patch_as`] with the admin key.
    pub async fn patch(&self, name: &str, body: Value) -> (StatusCode, Value) {
        self.patch_as(&self.admin_key, name, &body).await
    }

    /// `GET /api/v1/keys/list` as JSON.
    pub async fn list(&self) -> Vec<Value> {
        let (status, _, text) = self.get("/api/v1/keys/list", Some(&self.admin_key)).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        serde_json::from_str(&text).unwrap()
    }

    /// The list entry of one key.
    /// How many keys there are, walking the paged list (past `LIST_UNPAGED_MAX` the
    /// plain list is refused).
    pub async fn count_keys(&self) -> usize {
        let mut count = 0;
        let mut path = "/api/v1/keys/list?limit=1000".to_owned();
        loop {
            let (status, _, body) = self.get(&path, Some(&self.admin_key)).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            let page: Value = serde_json::from_str(&body).unwrap();
            count += page["keys"].as_array().unwrap().len();
            match page["nextCursor"].as_str() {
                Some(c) => path = format!("/api/v1/keys/list?limit=1000&cursor={c}"),
                None => return count,
            }
        }
    }

    pub async fn listed(&self, name: &str) -> Value {
        self.list()
            .await
            .into_iter()
            .find(|k| k["name"] == name)
            .unwrap_or_else(|| panic!("{name} not listed"))
    }

    /// Creates a key and returns the full key.
    pub async fn create_key(&self, name: &str, key_for: &str) -> String {
        let (status, body) = self
            .create(serde_json::json!({"name": name, "keyFor": key_for}))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["apiKey"].as_str().unwrap().to_owned()
    }

    pub async fn get(
        &self,
        path: &str,
        key: Option<&str>,
    ) -> (StatusCode, reqwest::header::HeaderMap, String) {
        let r = self
            .request(reqwest::Method::GET, path, key)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let headers = r.headers().clone();
        (status, headers, r.text().await.unwrap())
    }

    pub async fn delete(&self, name: &str, key: Option<&str>) -> (StatusCode, Value) {
        let path = format!("/api/v1/keys/{}/delete", encode_path_segment(name));
        let r = self
            .request(reqwest::Method::DELETE, &path, key)
            .send()
            .await
            .unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn verify(&self, key: &str) -> StatusCode {
        self.get("/api/v1/verify", Some(key)).await.0
    }

    /// A Prometheus counter's value (summed over label sets matching `filter`).
    pub async fn metric(&self, name: &str, filter: &str) -> f64 {
        let (_, text) = self.ops_get("/metrics").await;
        text.lines()
            .filter(|l| l.starts_with(name) && l.contains(filter))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Asserts that no full key handed out during the test appears in the log.
    pub fn assert_log_has_no_secrets(&self) {
        let log = self.log();
        assert_no_keys_in(&log, "the control plane's log");
        for secret in self.secrets.lock().unwrap().iter() {
            assert!(
                !log.contains(secret.as_str()),
                "a full API key appears in the control plane's log"
            );
            // Not even the secret part on its own.
            assert!(
                !log.contains(&secret[14..]),
                "a key's secret part appears in the log"
            );
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            self.assert_log_has_no_secrets();
        }
    }
}

/// Asserts that `text` holds nothing a secret scanner would flag as a valid key (the
/// scanner pattern, confirmed by the checksum), whoever's key it is.
pub fn assert_no_keys_in(text: &str, what: &str) {
    static SCANNER: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let scanner = SCANNER.get_or_init(|| regex::Regex::new(metlo_shared::SCANNER_REGEX).unwrap());
    let leaked = scanner
        .find_iter(text)
        .filter(|m| metlo_shared::ApiKey::parse(m.as_str()).is_ok())
        .count();
    assert_eq!(leaked, 0, "{leaked} API key(s) appear in {what}");
}

fn unsafe_kill(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args(["-s", signal, &pid.to_string()])
        .status();
}

pub fn encode_path_segment(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn log_file(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap()
}

/// A key made with the CLI on the database, with a role. (A baseline build from before
/// roles, which the benchmark may run, takes no `--role`: its keys can do everything.)
fn cli_key(env: &[(String, String)], name: &str, role: &str, log_path: &Path) -> String {
    match run_cli(
        env,
        &["keys", "create", "--name", name, "--role", role],
        log_path,
    ) {
        Ok(key) => key,
        Err(e) if e.contains("'--role'") => {
            run_cli(env, &["keys", "create", "--name", name], log_path)
                .unwrap_or_else(|e| panic!("create {name} key: {e}"))
        }
        Err(e) => panic!("create {name} key: {e}"),
    }
}

/// Runs a CLI command; stdout on success, stderr on failure. Stderr is also appended to
/// the log so the secret check sees it.
pub fn run_cli(env: &[(String, String)], args: &[&str], log_path: &Path) -> Result<String, String> {
    let out = Command::new(control_plane_bin_for(env))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env_remove("LISTEN_ADDR")
        .output()
        .expect("run control plane CLI");
    std::io::Write::write_all(&mut log_file(log_path), &out.stderr).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

pub fn spawn_server(env: &[(String, String)], log_path: &Path, listen: &str) -> Child {
    Command::new(control_plane_bin_for(env))
        .args(["serve", "--listen-addr", listen])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(log_file(log_path))
        .stderr(log_file(log_path))
        .spawn()
        .expect("spawn control plane")
}

/// The log lines that give the API's and the ops listener's URLs (the ops one is
/// written first, so the API's line means the server is ready).
const API_LINE: &str = "listening on http://";
const OPS_LINE: &str = "ops routes (readyz, metrics) on http://";

/// The URL in the last `line` of `log`.
fn find_url(log: &str, line: &str) -> Option<String> {
    let i = log.rfind(line)?;
    let rest = &log[i + line.len() - "http://".len()..];
    let end = rest
        .find(|c: char| c.is_whitespace() || c == '"')
        .unwrap_or(rest.len());
    Some(rest[..end].to_owned())
}

/// Waits for the "listening on http://…" line and returns the URL.
pub fn wait_for_listening(log_path: &Path, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let log = std::fs::read_to_string(log_path).unwrap_or_default();
        if let Some(url) = find_url(&log, API_LINE) {
            return url;
        }
        assert!(
            Instant::now() < deadline,
            "control plane did not start; log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `f` for both backends (for use in `#[tokio::test]` functions).
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$name($crate::Backend::Sqlite).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::$name($crate::Backend::Postgres).await
                }
            }
        )*
    };
}

#[cfg(test)]
mod tests {
    use super::assert_no_keys_in;

    #[test]
    fn key_scan_finds_a_leaked_key_and_ignores_lookalikes() {
        let key = metlo_shared::ApiKey::generate().unwrap();
        let secret = key.expose_secret();
        let mut corrupted = secret.to_owned();
        corrupted.replace_range(10..11, if &secret[10..11] == "a" { "b" } else { "a" });
        assert_no_keys_in(&format!("GET /x {corrupted} 401"), "a log line");
        let leak = format!("Authorization: Bearer {secret}\n");
        let caught = std::panic::catch_unwind(|| assert_no_keys_in(&leak, "a log line"));
        assert!(caught.is_err(), "a leaked key is caught");
    }
}
