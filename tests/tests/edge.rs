//! The edge Worker end to end: real `wrangler dev` (workerd, local KV) in front of an
//! echo origin, asking the real control-plane binary on KV misses.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metlo_shared::{ApiKey, KeyRecord, KeyType, RECORD_VERSION};
use metlo_tests::edge::{Edge, Origin};
use metlo_tests::{Backend, Stack, StackBuilder, StatusCode};

async fn stack(vars: &[(&str, &str)]) -> Stack {
    // The Worker's own key (what `wrangler secret put CONTROL_PLANE_KEY` would hold) is
    // the control plane's edge key; no KV sync: every miss asks the control plane.
    StackBuilder::new(Backend::Sqlite).edge(vars).build().await
}

trait ByHashCalls {
    /// How many times the Worker has asked the control plane about a hash.
    async fn by_hash_calls(&self) -> f64;
}

impl ByHashCalls for Stack {
    async fn by_hash_calls(&self) -> f64 {
        self.cp.metric("http_requests_total", "by-hash").await
    }
}

fn source(r: &reqwest::Response) -> String {
    r.headers()
        .get("x-metlo-edge-source")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_key_is_proxied_with_identity_headers() {
    let s = stack(&[]).await;
    let key = s.cp.create_key("ingest ✓/prod", "ONBOARDING").await;
    let identifier = ApiKey::parse(&key).unwrap().identifier();

    let body = "x".repeat(300_000) + "end";
    let r = s
        .edge
        .client
        .post(format!("{}/v1/items/42?q=a%20b&flag", s.edge.url))
        .header("Authorization", format!("Bearer {key}"))
        .header("X-Metlo-Key-Name", "forged")
        .header("X-Custom", "kept")
        .header("x-echo-status", "201")
        .header("x-echo-body", "created by origin")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED, "origin's status unchanged");
    assert_eq!(
        r.headers()["x-origin"],
        "echo",
        "origin's headers unchanged"
    );
    assert_eq!(
        r.text().await.unwrap(),
        "created by origin",
        "origin's body unchanged"
    );

    let seen = s.origin.requests();
    assert_eq!(seen.len(), 1);
    let req = &seen[0];
    assert_eq!(req.method, "POST");
    assert_eq!(req.path_and_query, "/v1/items/42?q=a%20b&flag");
    assert_eq!(req.body, body.as_bytes(), "body intact");
    assert!(
        req.headers.get("authorization").is_none(),
        "Authorization stripped"
    );
    assert_eq!(req.headers["x-metlo-key-name"], "ingest %E2%9C%93/prod");
    assert_eq!(
        req.headers.get_all("x-metlo-key-name").iter().count(),
        1,
        "client's forged header dropped"
    );
    assert_eq!(req.headers["x-metlo-key-type"], "ONBOARDING");
    assert_eq!(req.headers["x-metlo-key-identifier"], identifier.as_str());
    assert_eq!(req.headers["x-custom"], "kept");

    // The bare key (Metlo's form) works too, and GET without a body.
    let r = s.edge.get("/plain", Some(&key)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(s.origin.requests()[1].method, "GET");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_client_keys_pass_and_identity_headers_cannot_be_forged() {
    let s = stack(&[("ORIGIN_SECRET", "origin-shared-secret")]).await;
    // Admin and edge keys are valid on the control plane, never for traffic: the same
    // 401 as an unknown key (the control plane does not even tell the edge about them).
    for key in [&s.cp.admin_key, &s.cp.edge_key] {
        let r = s.edge.get("/x", Some(key)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(source(&r), "control-plane");
    }
    // A KV record claiming another role is refused too, whatever put it there.
    let rogue = ApiKey::generate().unwrap();
    let record = KeyRecord {
        role: metlo_shared::Role::Admin,
        ..kv_record(&rogue, "rogue")
    };
    s.edge.kv_put(&rogue.hash().to_hex(), &record.to_json());
    let r = s
        .edge
        .get("/x", Some(rogue.expose_secret()))
        .send()
        .await
        .unwrap();
    assert_eq!(
        (r.status(), source(&r)),
        (StatusCode::UNAUTHORIZED, "kv".to_owned())
    );
    assert!(s.origin.requests().is_empty(), "nothing reached the origin");

    // A client key passes; every X-Metlo-* header the client sent is gone, whatever its
    // case, and the origin gets the shared secret.
    let r = s
        .edge
        .get("/x", Some(&s.cp.client_key))
        .header("X-Metlo-Key-Role", "admin")
        .header("x-metlo-edge-source", "forged")
        .header("X-METLO-ORIGIN-SECRET", "forged")
        .header("X-Metlo-Tenant", "someone-else")
        .header("X-Metlo-Key-Name", "forged")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let seen = &s.origin.requests()[0];
    let metlo: Vec<(String, String)> = seen
        .headers
        .iter()
        .filter(|(k, _)| k.as_str().starts_with("x-metlo-"))
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
        .collect();
    let mut names: Vec<&str> = metlo.iter().map(|(k, _)| k.as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "x-metlo-edge-source",
            "x-metlo-key-identifier",
            "x-metlo-key-name",
            "x-metlo-key-type",
            "x-metlo-origin-secret"
        ],
        "only the Worker's own: {metlo:?}"
    );
    assert_eq!(seen.headers["x-metlo-key-name"], "client");
    assert_eq!(seen.headers["x-metlo-edge-source"], "control-plane");
    assert_eq!(
        seen.headers["x-metlo-origin-secret"],
        "origin-shared-secret"
    );
    assert!(
        !s.edge.log().contains("origin-shared-secret"),
        "the secret is never logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_authorization_when_configured() {
    let s = stack(&[("FORWARD_AUTHORIZATION", "true")]).await;
    let key = s.cp.create_key("fwd", "GENERIC").await;
    let r = s.edge.get("/x", Some(&key)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        s.origin.requests()[0].headers["authorization"],
        key.as_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_keys_are_refused_malformed_ones_without_any_lookup() {
    let s = stack(&[]).await;
    let valid = ApiKey::generate().unwrap();
    let mut bad_checksum = valid.expose_secret().to_owned();
    let last = bad_checksum.pop().unwrap();
    bad_checksum.push(if last == 'a' { 'b' } else { 'a' });

    for header in [
        None,
        Some("".to_owned()),
        Some("garbage".to_owned()),
        Some("Bearer metlo.short".to_owned()),
        Some(bad_checksum),
    ] {
        let r = s
            .edge
            .get("/anything", header.as_deref())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{header:?}");
        assert!(r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer"));
        assert_eq!(
            source(&r),
            "none",
            "decided from the header alone: no KV read, no control-plane call"
        );
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"], "unauthorized");
    }
    assert_eq!(
        s.by_hash_calls().await,
        0.0,
        "no control-plane call for malformed keys"
    );
    assert!(s.edge.kv_keys().is_empty(), "nothing written to KV");

    // Well-formed but unknown: the control plane is asked once; the miss is remembered
    // in the isolate, never written to KV.
    let unknown = ApiKey::generate().unwrap();
    let r = s
        .edge
        .get("/x", Some(unknown.expose_secret()))
        .send()
        .await
        .unwrap();
    assert_eq!(
        (r.status(), source(&r).as_str()),
        (StatusCode::UNAUTHORIZED, "control-plane")
    );
    let r = s
        .edge
        .get("/x", Some(unknown.expose_secret()))
        .send()
        .await
        .unwrap();
    assert_eq!(
        (r.status(), source(&r).as_str()),
        (StatusCode::UNAUTHORIZED, "isolate")
    );
    assert_eq!(s.by_hash_calls().await, 1.0);
    assert!(s.edge.kv_keys().is_empty(), "a miss is never written to KV");

    // Deleted on the control plane before any edge use → 401, same answer as unknown.
    let key = s.cp.create_key("gone", "GENERIC").await;
    s.cp.delete("gone", Some(&s.cp.admin_key)).await;
    let r = s.edge.get("/x", Some(&key)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let body = r.text().await.unwrap();
    assert!(body.contains("invalid API key"), "{body}");
    assert!(s.origin.requests().is_empty(), "nothing reached the origin");
}

/// Without KV sync (this stack's control plane has no KV target) nothing would ever
/// delete a record the Worker wrote to KV, so the control plane allows it to keep records
/// only for its own cache TTL: none goes to KV, and a deleted key is refused at the edge
/// within a second (it used to pass from KV for the Worker's 300 s TTL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_kv_sync_the_edge_keeps_no_record_in_kv() {
    let s = stack(&[]).await;
    let (_, ready) = s.cp.ops_get("/readyz").await;
    let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
    assert_eq!(ready["kvSync"], "off", "{ready}");
    let key = s.cp.create_key("hot", "GENERIC").await;
    let hash = ApiKey::parse(&key).unwrap().hash().to_hex();
    let (_, headers, _) =
        s.cp.get(
            &format!("/api/v1/keys/by-hash/{hash}"),
            Some(&s.cp.edge_key),
        )
        .await;
    assert_eq!(headers["x-metlo-kv-ttl-seconds"], "5", "the cache TTL");

    let r = s.edge.get("/1", Some(&key)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(s.origin.requests()[0].headers_source(), "control-plane");
    let r = s.edge.get("/2", Some(&key)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(s.origin.requests()[1].headers_source(), "isolate");
    assert!(s.edge.kv_get(&hash).is_none(), "nothing written to KV");
    // After the isolate's 500 ms the control plane is asked again.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let r = s.edge.get("/3", Some(&key)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(s.origin.requests()[2].headers_source(), "control-plane");
    assert_eq!(
        s.by_hash_calls().await,
        3.0,
        "ours above, and the Worker's two"
    );

    let (status, _) = s.cp.delete("hot", Some(&s.cp.admin_key)).await;
    assert_eq!(status, StatusCode::OK);
    let deleted = Instant::now();
    loop {
        let r = s.edge.get("/4", Some(&key)).send().await.unwrap();
        if r.status() == StatusCode::UNAUTHORIZED {
            break;
        }
        assert!(
            deleted.elapsed() < Duration::from_secs(3),
            "a deleted key still passes at the edge"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(s.edge.kv_keys().is_empty(), "{:?}", s.edge.kv_keys());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_down_fails_closed() {
    let mut s = stack(&[("CONTROL_PLANE_TIMEOUT_MS", "1000")]).await;
    let cached = s.cp.create_key("cached", "GENERIC").await;
    let uncached = s.cp.create_key("uncached", "GENERIC").await;
    // The record in KV, as the control plane's KV sync puts it (this stack has none).
    let hash = ApiKey::parse(&cached).unwrap().hash().to_hex();
    let (_, _, record) =
        s.cp.get(
            &format!("/api/v1/keys/by-hash/{hash}"),
            Some(&s.cp.edge_key),
        )
        .await;
    s.edge.kv_put(&hash, &record);
    assert_eq!(
        s.edge
            .get("/", Some(&cached))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );

    s.cp.kill();
    tokio::time::sleep(Duration::from_millis(1100)).await; // past the isolate's hit window
    for _ in 0..3 {
        let r = s.edge.get("/", Some(&cached)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "a key in KV still passes");
        let r = s.edge.get("/", Some(&uncached)).send().await.unwrap();
        assert_eq!(
            r.status(),
            StatusCode::SERVICE_UNAVAILABLE,
            "fail closed, never 200"
        );
        assert!(r.headers().contains_key("retry-after"));
        // A well-formed unknown key: also 503 (it cannot be checked), never 200.
        let r = s
            .edge
            .get("/", Some(ApiKey::generate().unwrap().expose_secret()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        // Garbage is still 401: it needs no control plane.
        assert_eq!(
            s.edge
                .get("/", Some("garbage"))
                .send()
                .await
                .unwrap()
                .status(),
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(
        s.origin.requests().len(),
        4,
        "only the cached key's requests reached the origin"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_record_is_refused() {
    let s = stack(&[]).await;
    let key = ApiKey::generate().unwrap();
    let record = KeyRecord {
        v: RECORD_VERSION,
        name: "expired".into(),
        key_type: KeyType::Generic,
        identifier: key.identifier(),
        created: "2026-01-01T00:00:00.000Z".into(),
        expires: Some(1_700_000_000),
        role: metlo_shared::Role::Client,
        meta: None,
        rate_limit: None,
        permissions: vec![],
        credits: None,
        identity: None,
        identity_credits: None,
        identity_limits: Default::default(),
    };
    s.edge.kv_put(&key.hash().to_hex(), &record.to_json());
    let r = s
        .edge
        .get("/", Some(key.expose_secret()))
        .send()
        .await
        .unwrap();
    assert_eq!(
        (r.status(), source(&r).as_str()),
        (StatusCode::UNAUTHORIZED, "kv")
    );
    // Not yet expired: allowed, straight from KV.
    let key = ApiKey::generate().unwrap();
    let record = KeyRecord {
        expires: Some(4_000_000_000),
        identifier: key.identifier(),
        ..record
    };
    s.edge.kv_put(&key.hash().to_hex(), &record.to_json());
    let r = s
        .edge
        .get("/", Some(key.expose_secret()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(s.by_hash_calls().await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_down_is_502_not_401() {
    let s = stack(&[]).await;
    let key = s.cp.create_key("k", "GENERIC").await;
    s.origin.stop();
    // Until its listener is closed (the aborted task drops it).
    let port = s.origin.port();
    metlo_tests::time::wait_for(
        "the origin's port to close",
        Duration::from_secs(10),
        || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
                .then_some(())
        },
    )
    .await;
    let r = s.edge.get("/", Some(&key)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
}

/// The KV write API used in development lives in a separate Worker (`dev/kv-api`) that is
/// never deployed: the production Worker has no route that writes KV on request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_worker_has_no_kv_write_path() {
    let root = metlo_tests::workspace_root();
    let js = std::fs::read_to_string(root.join("edge/build/index.js")).unwrap();
    let wasm = std::fs::read(root.join("edge/build/index_bg.wasm")).unwrap();
    for needle in ["storage/kv", "bulk/delete", "__faults"] {
        assert!(!js.contains(needle), "{needle} in the Worker's JS");
        assert!(
            !wasm.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "{needle} in the Worker's wasm"
        );
    }

    let s = stack(&[]).await;
    let key = s.cp.create_key("writer", "GENERIC").await;
    let victim = ApiKey::generate().unwrap().hash().to_hex();
    let body = format!(r#"[{{"key":"{victim}","value":"{{\"v\":1}}"}}]"#);
    let path = "/client/v4/accounts/local/storage/kv/namespaces/metlo-keys-test/bulk";
    let r = s
        .edge
        .client
        .put(format!("{}{path}", s.edge.url))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // With a valid key it is just another request, proxied to the origin.
    let r = s
        .edge
        .client
        .put(format!("{}{path}", s.edge.url))
        .header("Authorization", &key)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(s.origin.requests().last().unwrap().path_and_query, path);
    assert!(
        s.edge.kv_get(&victim).is_none(),
        "nothing was written to KV"
    );
}

/// A control plane that accepts connections and reads what it is sent, but never answers.
/// For each connection: what arrived, and when the Worker's side closed it.
struct Silent {
    url: String,
    conns: Arc<Mutex<Vec<SilentConn>>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Clone)]
struct SilentConn {
    /// Everything received, decoded lossily.
    received: String,
    /// When the first bytes arrived.
    first_read: Option<Instant>,
    /// When a read returned 0 (or failed): the peer closed the connection.
    closed: Option<Instant>,
}

impl Silent {
    async fn start() -> Self {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let conns: Arc<Mutex<Vec<SilentConn>>> = Arc::default();
        let all = conns.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let i = {
                    let mut list = all.lock().unwrap();
                    list.push(SilentConn {
                        received: String::new(),
                        first_read: None,
                        closed: None,
                    });
                    list.len() - 1
                };
                let all = all.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = stream.read(&mut buf).await.unwrap_or(0);
                        let mut list = all.lock().unwrap();
                        let conn = &mut list[i];
                        if n == 0 {
                            conn.closed = Some(Instant::now());
                            return;
                        }
                        conn.first_read.get_or_insert_with(Instant::now);
                        conn.received.push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                });
            }
        });
        Silent { url, conns, task }
    }

    fn connections(&self) -> Vec<SilentConn> {
        self.conns.lock().unwrap().clone()
    }

    /// Connection `i` once `done` holds for it, waiting up to `timeout`.
    async fn wait_for(
        &self,
        i: usize,
        timeout: Duration,
        done: impl Fn(&SilentConn) -> bool,
    ) -> Option<SilentConn> {
        let deadline = Instant::now() + timeout;
        loop {
            let conn = self
                .conns
                .lock()
                .unwrap()
                .get(i)
                .filter(|&c| done(c))
                .cloned();
            if conn.is_some() || Instant::now() >= deadline {
                return conn;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Silent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A key record as the control plane would write it to KV.
fn kv_record(key: &ApiKey, name: &str) -> KeyRecord {
    KeyRecord {
        v: RECORD_VERSION,
        name: name.into(),
        key_type: KeyType::Generic,
        identifier: key.identifier(),
        created: "2026-01-01T00:00:00.000Z".into(),
        expires: None,
        role: metlo_shared::Role::Client,
        meta: None,
        rate_limit: None,
        permissions: vec![],
        credits: None,
        identity: None,
        identity_credits: None,
        identity_limits: Default::default(),
    }
}

/// A control plane that takes the lookup and never answers: a well-formed unknown key gets
/// 503 + Retry-After after CONTROL_PLANE_TIMEOUT_MS (fail closed), and the lookup's
/// connection does not outlive the request. (workerd also cancels a finished request's
/// outstanding fetches on its own, so this holds without the Worker's abort too; the
/// usage-report test below is the one that needs the abort.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_control_plane_lookup_fails_closed_and_is_not_left_open() {
    let cp = Silent::start().await;
    let origin = Origin::start().await;
    let edge = Edge::start(
        &cp.url,
        "edge-worker-secret",
        &origin.url,
        &[("CONTROL_PLANE_TIMEOUT_MS", "1000")],
    )
    .await;
    let key = ApiKey::generate().unwrap();

    let sent = Instant::now();
    let r = edge
        .get("/x", Some(key.expose_secret()))
        .send()
        .await
        .unwrap();
    let answered = Instant::now();
    assert_eq!(
        (r.status(), source(&r).as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "control-plane"),
        "fail closed"
    );
    let retry_after: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after > 0);
    let took = answered - sent;
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "503 after {took:?}, CONTROL_PLANE_TIMEOUT_MS is 1000"
    );

    let conns = cp.connections();
    assert_eq!(conns.len(), 1, "one lookup: {conns:?}");
    let lookup = format!("GET /api/v1/keys/by-hash/{} ", key.hash().to_hex());
    assert!(
        conns[0].received.starts_with(&lookup),
        "the control plane was asked: {:?}",
        conns[0].received
    );
    let conn = cp
        .wait_for(
            0,
            (answered + Duration::from_secs(2)).saturating_duration_since(Instant::now()),
            |c| c.closed.is_some(),
        )
        .await;
    assert!(
        conn.is_some(),
        "the lookup's connection is still open 2 s after the 503"
    );
    assert!(origin.requests().is_empty(), "nothing reached the origin");
}

/// An isolate keeps at most MAX_CONCURRENT_LOOKUPS control-plane lookups in flight: with
/// a control plane that never answers and a bound of 2, five new keys at once make two
/// lookups (503 after the timeout) and three immediate 503s, never a queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_in_flight_are_bounded_per_isolate() {
    let cp = Silent::start().await;
    let origin = Origin::start().await;
    let edge = Edge::start(
        &cp.url,
        "edge-worker-secret",
        &origin.url,
        &[
            ("CONTROL_PLANE_TIMEOUT_MS", "2000"),
            ("MAX_CONCURRENT_LOOKUPS", "2"),
        ],
    )
    .await;
    let sent = Instant::now();
    let answers = futures::future::join_all((0..5).map(|_| {
        let key = ApiKey::generate().unwrap();
        let request = edge.get("/x", Some(key.expose_secret())).send();
        async move {
            let r = request.await.unwrap();
            let status = r.status();
            let body: serde_json::Value = r.json().await.unwrap();
            (
                status,
                sent.elapsed(),
                body["message"].as_str().unwrap().to_owned(),
            )
        }
    }))
    .await;
    let (busy, waited): (Vec<_>, Vec<_>) = answers
        .iter()
        .partition(|(_, _, message)| message.contains("in flight"));
    assert!(
        answers
            .iter()
            .all(|(s, _, _)| *s == StatusCode::SERVICE_UNAVAILABLE),
        "{answers:?}"
    );
    assert_eq!((busy.len(), waited.len()), (3, 2), "{answers:?}");
    assert!(
        busy.iter()
            .all(|(_, took, _)| *took < Duration::from_millis(1500)),
        "{answers:?}"
    );
    assert!(
        waited
            .iter()
            .all(|(_, took, _)| *took >= Duration::from_millis(1900)),
        "{answers:?}"
    );
    assert_eq!(
        cp.connections().len(),
        2,
        "only two lookups reached the control plane"
    );
    // The slots come back: the next key is looked up again.
    let key = ApiKey::generate().unwrap();
    let r = edge
        .get("/x", Some(key.expose_secret()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(cp.connections().len(), 3);
}

/// A usage report the control plane never answers is aborted after
/// CONTROL_PLANE_TIMEOUT_MS: its connection is closed (a fetch merely no longer awaited
/// would stay open as long as the `waitUntil`, which local workerd never cuts short), and
/// its batch is kept for the next report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_control_plane_usage_report_is_aborted_and_kept() {
    let cp = Silent::start().await;
    let origin = Origin::start().await;
    let edge = Edge::start(
        &cp.url,
        "edge-worker-secret",
        &origin.url,
        &[
            ("CONTROL_PLANE_TIMEOUT_MS", "1000"),
            ("USAGE_REPORT_MS", "1500"),
            // Only usage reports reach this control plane (the feed's own failure modes,
            // against one that does not answer, are in revocations.rs).
            ("REVOCATION_FEED_INTERVAL_MS", "0"),
        ],
    )
    .await;
    // Keys known from KV: let through without asking the control plane.
    let first = ApiKey::generate().unwrap();
    let second = ApiKey::generate().unwrap();
    edge.kv_put(
        &first.hash().to_hex(),
        &kv_record(&first, "first").to_json(),
    );
    edge.kv_put(
        &second.hash().to_hex(),
        &kv_record(&second, "second").to_json(),
    );
    // The whole report: its JSON body ends the request (or the last chunk, if chunked).
    let complete = |c: &SilentConn| {
        c.received.starts_with("POST ")
            && (c.received.ends_with("}}") || c.received.ends_with("}}\r\n0\r\n\r\n"))
    };

    // A new isolate reports its first use at once, after the response.
    let sent = Instant::now();
    let r = edge
        .get("/1", Some(first.expose_secret()))
        .send()
        .await
        .unwrap();
    let answered = Instant::now();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(origin.requests()[0].headers_source(), "kv");
    assert!(
        answered - sent < Duration::from_millis(900),
        "the response does not wait for the report"
    );
    let report = cp
        .wait_for(0, Duration::from_secs(5), complete)
        .await
        .unwrap_or_else(|| panic!("no usage report: {:?}", cp.connections()));
    assert!(
        report.received.starts_with("POST /api/v1/usage ")
            && report.received.contains(&first.hash().to_hex()),
        "{:?}",
        report.received
    );
    let arrived = report.first_read.unwrap();
    let closed = cp
        .wait_for(0, Duration::from_millis(1000 + 2000), |c| {
            c.closed.is_some()
        })
        .await
        .unwrap_or_else(|| {
            panic!("the unanswered report's connection is still open 2 s after the timeout")
        })
        .closed
        .unwrap();
    assert!(
        closed - arrived >= Duration::from_millis(800),
        "closed by the timeout, {:?} after the report arrived",
        closed - arrived
    );

    // The next report (due USAGE_REPORT_MS after the first) carries the unanswered batch.
    tokio::time::sleep(
        (answered + Duration::from_millis(1700)).saturating_duration_since(Instant::now()),
    )
    .await;
    let r = edge
        .get("/2", Some(second.expose_secret()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let report = cp
        .wait_for(1, Duration::from_secs(5), complete)
        .await
        .unwrap_or_else(|| panic!("no second usage report: {:?}", cp.connections()));
    assert!(
        report.received.contains(&second.hash().to_hex())
            && report.received.contains(&first.hash().to_hex()),
        "the timed-out batch is reported again: {:?}",
        report.received
    );
}

/// Issue 28: the Worker never follows a redirect from the control plane. A stand-in in
/// front of the real control plane answers the by-hash lookup with a same-origin 307 to
/// a path it would forward (with the Worker's key) to the control plane: followed, the
/// key would be admitted from wherever the redirect pointed; not followed, the lookup
/// fails closed (503) and the redirect's target is never asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_from_the_control_plane_is_not_followed() {
    use axum::extract::{Request, State};
    use axum::response::{IntoResponse, Response};
    let cp = StackBuilder::new(Backend::Sqlite).build().await.cp;
    let key = cp.create_key("redirected", "GENERIC").await;
    #[derive(Clone)]
    struct Redirector {
        control_plane: String,
        followed: Arc<Mutex<u32>>,
    }
    async fn answer(State(r): State<Redirector>, request: Request) -> Response {
        let path = request.uri().path().to_owned();
        if let Some(rest) = path.strip_prefix("/followed") {
            *r.followed.lock().unwrap() += 1;
            let mut forwarded = reqwest::Client::new().get(format!("{}{rest}", r.control_plane));
            if let Some(auth) = request.headers().get("authorization") {
                forwarded = forwarded.header("authorization", auth.to_str().unwrap());
            }
            let answer = forwarded.send().await.unwrap();
            let status = answer.status().as_u16();
            let body = answer.bytes().await.unwrap();
            return (axum::http::StatusCode::from_u16(status).unwrap(), body).into_response();
        }
        (
            axum::http::StatusCode::TEMPORARY_REDIRECT,
            [("location", format!("/followed{path}"))],
        )
            .into_response()
    }
    let redirector = Redirector {
        control_plane: cp.url.clone(),
        followed: Arc::new(Mutex::new(0)),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new()
        .fallback(answer)
        .with_state(redirector.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let origin = Origin::start().await;
    let edge = Edge::start(&url, &cp.edge_key, &origin.url, &[]).await;

    let r = edge.get("/x", Some(&key)).send().await.unwrap();
    assert_eq!(
        (r.status(), source(&r).as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "control-plane"),
        "fail closed"
    );
    assert_eq!(
        *redirector.followed.lock().unwrap(),
        0,
        "the redirect was followed"
    );
    assert!(origin.requests().is_empty(), "nothing reached the origin");
}
