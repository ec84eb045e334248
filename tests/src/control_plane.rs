//! The control plane as a real process: its binary, started with its own database (and
//! Redis when asked), its CLI, its log (scanned for keys on drop), and HTTP helpers.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::client::encode_path_segment;
use crate::process::{fresh_postgres_database, unsafe_kill, workspace_root};
use crate::stack::StackBuilder;
use crate::{Backend, StatusCode};

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
        Self::start_with(StackBuilder::new(backend)).await
    }

    pub async fn start_with(opts: StackBuilder) -> Self {
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

    /// The port the API listens on.
    pub fn port(&self) -> u16 {
        self.url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("the API's port")
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
