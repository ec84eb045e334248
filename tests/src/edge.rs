//! The edge under test: `wrangler dev` (real workerd, local KV) serving the built Worker,
//! and an echo origin that records what reaches it.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde_json::{json, Value};

use crate::{free_port, workspace_root};

/// The Worker's settings that are secrets, never `[vars]`.
pub const SECRETS: [&str; 3] = [
    "CONTROL_PLANE_KEY",
    "ORIGIN_SECRET",
    "ASSERTION_SIGNING_KEY",
];

/// Not a `[vars]` entry: the `MISS_LIMITER` binding's limit per client and minute
/// (default [`DEFAULT_MISS_LIMIT`]: high, so only tests that ask for it meet it).
pub const MISS_LIMIT: &str = "MISS_LIMIT";
pub const DEFAULT_MISS_LIMIT: u32 = 10_000;

/// A request as the origin saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Seen {
    /// Where the edge found the key (`X-Metlo-Edge-Source`, sent when DECISION_HEADER is on).
    pub fn headers_source(&self) -> String {
        self.headers
            .get("x-metlo-edge-source")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    }
}

/// An HTTP origin that answers every request with a JSON echo of it. A request header
/// `x-echo-status: N` sets the status; `x-echo-body: text` sets the body instead.
pub struct Origin {
    pub url: String,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Origin {
    pub async fn start() -> Self {
        Self::start_on(free_port()).await
    }

    pub async fn start_on(port: u16) -> Self {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let app = axum::Router::new().fallback(echo).with_state(seen.clone());
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port)))
            .await
            .unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Origin { url, seen, task }
    }

    pub fn port(&self) -> u16 {
        self.url.rsplit(':').next().unwrap().parse().unwrap()
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn echo(State(seen): State<Arc<Mutex<Vec<Seen>>>>, req: Request) -> impl IntoResponse {
    let (parts, body) = req.into_parts();
    let body: Bytes = axum::body::to_bytes(body, 64 << 20)
        .await
        .unwrap_or_default();
    let record = Seen {
        method: parts.method.to_string(),
        path_and_query: parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        headers: parts.headers.clone(),
        body: body.to_vec(),
    };
    seen.lock().unwrap().push(record.clone());
    let status = parts
        .headers
        .get("x-echo-status")
        .and_then(|v| v.to_str().ok()?.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let body = match parts.headers.get("x-echo-body") {
        Some(b) => b.to_str().unwrap_or_default().to_owned(),
        None => {
            let header = |n: &str| {
                parts
                    .headers
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            json!({
                "method": record.method,
                "pathAndQuery": record.path_and_query,
                "bodyLength": record.body.len(),
                "keyName": header("x-metlo-key-name"),
                "keyType": header("x-metlo-key-type"),
                "keyIdentifier": header("x-metlo-key-identifier"),
                "authorizationForwarded": parts.headers.contains_key("authorization"),
            })
            .to_string()
        }
    };
    (status, [("x-origin", "echo")], body)
}

/// The built Worker's entry point (`make worker` / scripts/build-worker.sh builds it).
pub fn worker_main() -> PathBuf {
    let main = workspace_root().join("edge/build/index.js");
    assert!(
        main.exists(),
        "{} not built: run `make test` (it builds the Worker first)",
        main.display()
    );
    main
}

/// `wrangler dev` serving the Worker on a free port with its own throwaway KV state.
pub struct Edge {
    pub url: String,
    pub client: reqwest::Client,
    child: Child,
    dir: tempfile::TempDir,
    state: PathBuf,
    log_path: PathBuf,
}

/// The KV namespace id the test Workers bind as KEYS.
pub const KV_NAMESPACE: &str = "metlo-keys-test";
/// The API token the local KV API accepts.
pub const KV_API_TOKEN: &str = "test-token";

/// `wrangler dev` for the config in `dir`, serving on `port`, local state in `state`,
/// in its own process group (stopping it stops the workerd it starts).
fn spawn_wrangler_dev(
    dir: &std::path::Path,
    state: &std::path::Path,
    port: u16,
    log_path: &std::path::Path,
) -> Child {
    let log = std::fs::File::create(log_path).unwrap();
    Command::new(workspace_root().join("node_modules/.bin/wrangler"))
        .args([
            "dev",
            "--local",
            "--ip",
            "127.0.0.1",
            "--port",
            &port.to_string(),
        ])
        .args([
            "--inspector-port",
            &free_port().to_string(),
            "--show-interactive-dev-session=false",
        ])
        .arg("--persist-to")
        .arg(state)
        .current_dir(dir)
        .env("CI", "true")
        .env("WRANGLER_SEND_METRICS", "false")
        .env("CLOUDFLARE_CF_FETCH_ENABLED", "false")
        .env("XDG_CONFIG_HOME", dir.join("xdg"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .process_group(0)
        .spawn()
        .expect("wrangler: run scripts/install-edge-tools.sh")
}

fn stop_group(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .status();
    let _ = child.kill();
    let _ = child.wait();
}

/// The development stand-in for Cloudflare's KV REST API (`dev/kv-api`), writing the
/// local KV in `state` — the same one an [`Edge`] started on that state reads.
pub struct KvApi {
    pub url: String,
    port: u16,
    dir: tempfile::TempDir,
    state: PathBuf,
    child: Option<Child>,
}

impl KvApi {
    pub async fn start(state: &std::path::Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "name = \"metlo-kv-api-test\"\nmain = {main:?}\ncompatibility_date = \"2025-09-01\"\n\n\
             [[kv_namespaces]]\nbinding = \"KEYS\"\nid = \"{KV_NAMESPACE}\"\n\n\
             [vars]\nNAMESPACE_ID = \"{KV_NAMESPACE}\"\nAPI_TOKEN = \"{KV_API_TOKEN}\"\n\n\
             [[durable_objects.bindings]]\nname = \"HELD\"\nclass_name = \"HeldWrites\"\n\n\
             [[migrations]]\ntag = \"v1\"\nnew_sqlite_classes = [\"HeldWrites\"]\n",
            main = workspace_root().join("dev/kv-api/worker.js").display().to_string(),
        );
        std::fs::write(dir.path().join("wrangler.toml"), config).unwrap();
        let port = free_port();
        let mut api = KvApi {
            url: format!("http://127.0.0.1:{port}"),
            port,
            dir,
            state: state.to_path_buf(),
            child: None,
        };
        api.restart().await;
        api
    }

    /// The env a control plane needs to push to this target.
    pub fn control_plane_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("KV_API_URL", format!("{}/client/v4", self.url)),
            ("CLOUDFLARE_ACCOUNT_ID", "local".into()),
            ("KV_NAMESPACE_ID", KV_NAMESPACE.into()),
            ("CLOUDFLARE_API_TOKEN", KV_API_TOKEN.into()),
        ]
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_group(&mut c);
        }
    }

    pub async fn restart(&mut self) {
        let _guard = START_LOCK.lock().await;
        assert!(self.child.is_none());
        let log = self.dir.path().join("wrangler.log");
        self.child = Some(spawn_wrangler_dev(
            self.dir.path(),
            &self.state,
            self.port,
            &log,
        ));
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = client.get(format!("{}/__stats", self.url)).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "KV API did not start:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Makes the next `count` API calls fail with `status`.
    pub async fn inject_faults(&self, status: u16, count: u32) {
        self.set_faults(json!({"status": status, "count": count}))
            .await;
    }

    /// Sets the stand-in's faults (`dev/kv-api/worker.js` lists them).
    pub async fn set_faults(&self, faults: Value) {
        let r = reqwest::Client::new()
            .post(format!("{}/__faults", self.url))
            .json(&faults)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }

    /// The next `count` API calls wait `delay` before applying their write and answering
    /// (and apply it even if the caller gave up).
    pub async fn inject_delay(&self, delay: Duration, count: u32) {
        self.set_faults(json!({"delayMs": delay.as_millis() as u64, "count": count}))
            .await;
    }

    /// From now on, every write is answered at once and visible to the Worker only `delay`
    /// later (KV's propagation in production); zero: at once again.
    pub async fn set_propagation_delay(&self, delay: Duration) {
        let r = reqwest::Client::new()
            .post(format!("{}/__propagation", self.url))
            .json(&json!({"delayMs": delay.as_millis() as u64}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }

    /// Writes answered but not yet visible to the Worker.
    pub async fn held_writes(&self) -> u64 {
        let r: Value = reqwest::Client::new()
            .get(format!("{}/__propagation", self.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        r["held"].as_u64().unwrap()
    }

    /// The next `count` API calls succeed as a whole but leave out the first `keys` keys
    /// of their body, listed in `unsuccessful_keys`.
    pub async fn inject_unsuccessful(&self, keys: u32, count: u32) {
        self.set_faults(json!({"unsuccessful": keys, "count": count}))
            .await;
    }

    fn api(&self, suffix: &str) -> String {
        format!(
            "{}/client/v4/accounts/local/storage/kv/namespaces/{KV_NAMESPACE}/{suffix}",
            self.url
        )
    }

    /// Every entry, through the API's paged list: (name, metadata digest if any).
    pub async fn list_all(&self) -> Vec<(String, Option<String>)> {
        let client = reqwest::Client::new();
        let mut all = vec![];
        let mut cursor = String::new();
        loop {
            let mut request = client.get(self.api("keys")).bearer_auth(KV_API_TOKEN);
            if !cursor.is_empty() {
                request = request.query(&[("cursor", &cursor)]);
            }
            let page: Value = request.send().await.unwrap().json().await.unwrap();
            assert_eq!(page["success"], true, "{page}");
            for k in page["result"].as_array().unwrap() {
                all.push((
                    k["name"].as_str().unwrap().to_owned(),
                    k["metadata"]["d"].as_str().map(str::to_owned),
                ));
            }
            cursor = page["result_info"]["cursor"]
                .as_str()
                .unwrap_or("")
                .to_owned();
            if cursor.is_empty() {
                return all;
            }
        }
    }

    /// One value, through the API (`None`: no such key).
    pub async fn value(&self, key: &str) -> Option<String> {
        let r = reqwest::Client::new()
            .get(self.api(&format!("values/{key}")))
            .bearer_auth(KV_API_TOKEN)
            .send()
            .await
            .unwrap();
        match r.status().as_u16() {
            200 => Some(r.text().await.unwrap()),
            404 => None,
            s => panic!("value {key}: {s}"),
        }
    }

    /// Writes entries behind the control plane's back (drift): `(key, value, metadata)`.
    pub async fn put_raw(&self, items: &[(String, String, Option<Value>)]) {
        let body: Vec<Value> = items
            .iter()
            .map(|(k, v, m)| match m {
                Some(m) => json!({"key": k, "value": v, "metadata": m}),
                None => json!({"key": k, "value": v}),
            })
            .collect();
        let r = reqwest::Client::new()
            .put(self.api("bulk"))
            .bearer_auth(KV_API_TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }

    /// Deletes entries behind the control plane's back (drift).
    pub async fn delete_raw(&self, keys: &[String]) {
        let r = reqwest::Client::new()
            .post(self.api("bulk/delete"))
            .bearer_auth(KV_API_TOKEN)
            .json(keys)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }

    /// Makes the calls after the next `after` fail with `status`, `count` times.
    pub async fn inject_faults_after(&self, after: u32, status: u16, count: u32) {
        self.set_faults(json!({"status": status, "count": count, "after": after}))
            .await;
    }

    /// Clears what `stats` reports.
    pub async fn reset_stats(&self) {
        reqwest::Client::new()
            .post(format!("{}/__stats", self.url))
            .send()
            .await
            .unwrap();
    }

    /// Every key in the local KV it writes.
    pub fn kv_keys(&self) -> Vec<String> {
        local_kv_keys(self.dir.path(), &self.state)
    }

    pub fn kv_get(&self, key: &str) -> Option<String> {
        local_kv_get(self.dir.path(), &self.state, key)
    }

    /// What the target received: `{putRequests, deleteRequests, puts: [key…], deletes: [key…]}`.
    pub async fn stats(&self) -> Value {
        reqwest::get(format!("{}/__stats", self.url))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

impl Drop for KvApi {
    fn drop(&mut self) {
        self.stop();
        if !std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.path().join("wrangler.log"));
            crate::assert_no_keys_in(&log.unwrap_or_default(), "the KV API's log");
        }
    }
}

/// Starting many workerd processes at once overloads a 2-core machine: one at a time.
static START_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl Edge {
    /// Starts the Worker with these `[vars]` (on top of the defaults in the repo's
    /// wrangler.toml) and the control-plane key as its secret.
    pub async fn start(
        control_plane_url: &str,
        control_plane_key: &str,
        origin_url: &str,
        vars: &[(&str, &str)],
    ) -> Self {
        Self::start_on_state(None, control_plane_url, control_plane_key, origin_url, vars).await
    }

    /// Like [`Edge::start`], with the local KV kept in `state` (shared with a [`KvApi`]).
    /// Of `vars`, the Worker's secrets ([`SECRETS`]) are given as secrets, the rest as `[vars]`.
    pub async fn start_on_state(
        state: Option<&std::path::Path>,
        control_plane_url: &str,
        control_plane_key: &str,
        origin_url: &str,
        vars: &[(&str, &str)],
    ) -> Self {
        let _guard = START_LOCK.lock().await;
        let dir = tempfile::tempdir().unwrap();
        let state = state
            .map(|p| p.to_path_buf())
            .unwrap_or_else(|| dir.path().join("state"));
        let mut all_vars: Vec<(String, String)> = vec![
            ("ORIGIN_URL".into(), origin_url.into()),
            ("CONTROL_PLANE_URL".into(), control_plane_url.into()),
            ("DECISION_HEADER".into(), "true".into()),
        ];
        // Secrets go to `.dev.vars` (what `wrangler secret put` holds in production).
        let mut secrets = format!("CONTROL_PLANE_KEY = {control_plane_key:?}\n");
        let mut miss_limit = DEFAULT_MISS_LIMIT;
        for (k, v) in vars {
            if *k == MISS_LIMIT {
                miss_limit = v.parse().expect("MISS_LIMIT is a number");
                continue;
            }
            if SECRETS.contains(k) {
                // Single quotes are literal in `.dev.vars` (a JWK's double quotes stay).
                assert!(!v.contains(['\'', '\n']), "a secret the test can quote");
                secrets.push_str(&format!("{k} = '{v}'\n"));
                continue;
            }
            all_vars.retain(|(name, _)| name != k);
            all_vars.push((k.to_string(), v.to_string()));
        }
        let vars_toml: String = all_vars
            .iter()
            .map(|(k, v)| format!("{k} = {v:?}\n"))
            .collect();
        // The same Worker and bindings as the repo's wrangler.toml, without its build
        // hook (the tests build once, before they start).
        let config = format!(
            "name = \"metlo-edge-test\"\nmain = {main:?}\ncompatibility_date = \"2025-09-01\"\n\n\
             [[kv_namespaces]]\nbinding = \"KEYS\"\nid = \"{KV_NAMESPACE}\"\n\n\
             [[durable_objects.bindings]]\nname = \"KEY_LIMITER\"\nclass_name = \"KeyLimiter\"\n\n\
             [[migrations]]\ntag = \"v1\"\nnew_sqlite_classes = [\"KeyLimiter\"]\n\n\
             [[ratelimits]]\nname = \"MISS_LIMITER\"\nnamespace_id = \"1001\"\n\
             simple = {{ limit = {miss_limit}, period = 60 }}\n\n[vars]\n{vars_toml}",
            main = worker_main().display().to_string(),
        );
        std::fs::write(dir.path().join("wrangler.toml"), config).unwrap();
        std::fs::write(dir.path().join(".dev.vars"), secrets).unwrap();
        let port = free_port();
        let log_path = dir.path().join("wrangler.log");
        let child = spawn_wrangler_dev(dir.path(), &state, port, &log_path);
        let edge = Edge {
            url: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            child,
            dir,
            state,
            log_path,
        };
        edge.wait_ready().await;
        edge
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = self
                .client
                .get(format!("{}/__ready", self.url))
                .send()
                .await
            {
                // Any answer from the Worker itself (a 401: no key) means it is serving.
                if r.headers().contains_key("x-metlo-edge-source") {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "wrangler dev did not start:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn get(&self, path: &str, key: Option<&str>) -> reqwest::RequestBuilder {
        let rb = self.client.get(format!("{}{}", self.url, path));
        match key {
            Some(k) => rb.header("Authorization", k),
            None => rb,
        }
    }

    /// The KV value under `key`, if any (read through wrangler from the local KV).
    pub fn kv_get(&self, key: &str) -> Option<String> {
        local_kv_get(self.dir.path(), &self.state, key)
    }

    /// Every key in the local KV.
    pub fn kv_keys(&self) -> Vec<String> {
        local_kv_keys(self.dir.path(), &self.state)
    }

    pub fn kv_put(&self, key: &str, value: &str) {
        local_kv(self.dir.path(), &self.state, &["put", key, value]).expect("wrangler kv key put");
    }
}

/// Runs `wrangler kv key …` with the config in `dir` against the local KV in `state`.
fn local_kv(
    dir: &std::path::Path,
    state: &std::path::Path,
    args: &[&str],
) -> Result<String, String> {
    let out = Command::new(workspace_root().join("node_modules/.bin/wrangler"))
        .args(["kv", "key"])
        .args(args)
        .args(["--binding", "KEYS", "--local", "--persist-to"])
        .arg(state)
        .current_dir(dir)
        .env("CI", "true")
        .env("WRANGLER_SEND_METRICS", "false")
        .env("XDG_CONFIG_HOME", dir.join("xdg"))
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn local_kv_get(dir: &std::path::Path, state: &std::path::Path, key: &str) -> Option<String> {
    let v = local_kv(dir, state, &["get", key, "--text"]).ok()?;
    let v = v.trim();
    (!v.is_empty() && v != "Value not found").then(|| v.to_owned())
}

fn local_kv_keys(dir: &std::path::Path, state: &std::path::Path) -> Vec<String> {
    let out = local_kv(dir, state, &["list"]).unwrap_or_default();
    let list: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
    list.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

impl Drop for Edge {
    fn drop(&mut self) {
        stop_group(&mut self.child);
        if !std::thread::panicking() {
            crate::assert_no_keys_in(&self.log(), "the edge's (wrangler dev) log");
        }
    }
}
