//! The control plane as a real process, on SQLite and PostgreSQL: verify and by-hash
//! (with the process's metrics), the accept loop's head limits and a chunked body over
//! TCP, the key limit through the CLI, a deleted key refused at once with Redis, the CLI,
//! the ops listener. The routes' own rules (shapes, names, 400s, racing creates, the key
//! limit, a deleted key with the in-process cache) are tested in process:
//! `control-plane/src/http/keys_tests.rs`.

use std::time::Duration;

use metlo_shared::ApiKey;
use metlo_tests::{
    on_both_backends, run_cli, Backend, ControlPlane, Redis, StackBuilder, StatusCode,
};
use reqwest::Method;
use serde_json::{json, Value};

on_both_backends!(
    verify_and_by_hash,
    oversized_heads_and_chunked_bodies,
    the_cli_obeys_the_key_limit,
    deleted_key_is_refused_at_once_with_redis,
    cli_manages_keys,
    cli_manages_identities,
    ops_routes,
);

async fn verify_and_by_hash(backend: Backend) {
    let cp = ControlPlane::start(backend).await;
    let (status, headers, body) = cp.get("/api/v1/verify", Some(&cp.client_key)).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "OK"));
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    // Bearer form works too.
    assert_eq!(
        cp.verify(&format!("Bearer {}", cp.client_key)).await,
        StatusCode::OK
    );

    let key = cp.create_key("edge-client", "AWS").await;
    let parsed = ApiKey::parse(&key).unwrap();
    let hash = parsed.hash().to_hex();
    let (status, headers, body) = cp
        .get(&format!("/api/v1/keys/by-hash/{hash}"), Some(&cp.edge_key))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(headers["cache-control"], "no-store");
    let record = metlo_shared::KeyRecord::from_json(body.as_bytes()).expect("a v1 KV record");
    assert_eq!(record.name, "edge-client");
    assert_eq!(record.key_type, metlo_shared::KeyType::Aws);
    assert_eq!(record.identifier, parsed.identifier());
    assert!(record.expires.is_none());
    assert!(!body.contains(&key));

    let unknown = ApiKey::generate().unwrap().hash().to_hex();
    let (status, _, body) = cp
        .get(
            &format!("/api/v1/keys/by-hash/{unknown}"),
            Some(&cp.edge_key),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    for bad in [
        "abc",
        &hash.to_uppercase(),
        &format!("{hash}0"),
        &"g".repeat(64),
    ] {
        let (status, _, body) = cp
            .get(&format!("/api/v1/keys/by-hash/{bad}"), Some(&cp.edge_key))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
    // Deleted → 404 at once.
    cp.delete("edge-client", Some(&cp.admin_key)).await;
    let (status, _, _) = cp
        .get(&format!("/api/v1/keys/by-hash/{hash}"), Some(&cp.edge_key))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

async fn oversized_heads_and_chunked_bodies(backend: Backend) {
    let cp = ControlPlane::start(backend).await;
    // (The 400s of bad bodies and the 413 of a long one are tested in process:
    // control-plane/src/http/keys_tests.rs.)
    // Chunked (no length announced): refused once the body passes the limit.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = cp.url.trim_start_matches("http://").to_owned();
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let chunk = "x".repeat(4096);
        let mut raw = format!(
            "POST /api/v1/keys/create HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {}\r\n\
             Transfer-Encoding: chunked\r\n\r\n",
            cp.admin_key
        );
        for _ in 0..5 {
            raw.push_str(&format!("{:x}\r\n{chunk}\r\n", chunk.len()));
        }
        raw.push_str("0\r\n\r\n");
        stream.write_all(raw.as_bytes()).await.unwrap();
        let mut answer = vec![0u8; 512];
        let n = stream.read(&mut answer).await.unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(answer.contains("payload_too_large"), "{answer}");
    }
    // Oversized request heads: a JSON 431 from our limit (16 KiB), and hyper's own 431
    // for far more than that; a big but acceptable head still works.
    let head_with = |bytes: usize| {
        cp.request(Method::POST, "/api/v1/keys/create", Some(&cp.admin_key))
            .header("connection", "close")
            .header("x-padding", "p".repeat(bytes))
            .json(&json!({"name": format!("padded-{bytes}")}))
    };
    let r = head_with(20 * 1024).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "headers_too_large"
    );
    let r = head_with(1024 * 1024).send().await;
    assert!(
        r.as_ref().map_or(true, |r| r.status()
            == StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
        "{r:?}"
    );
    let r = head_with(12 * 1024).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        cp.delete("padded-12288", Some(&cp.admin_key)).await.0,
        StatusCode::OK
    );
    // Nothing was stored but the acceptable padded create, deleted above.
    let (_, _, text) = cp.get("/api/v1/keys/list", Some(&cp.admin_key)).await;
    assert_eq!(
        serde_json::from_str::<Vec<Value>>(&text).unwrap().len(),
        3,
        "{text}"
    );
}

/// The CLI obeys the key limit (the HTTP side is tested in process: `keys_tests.rs`).
async fn the_cli_obeys_the_key_limit(backend: Backend) {
    // The harness's three keys (admin, edge, client) and two more.
    let cp = ControlPlane::start_with(StackBuilder::new(backend).env("MAX_API_KEYS", 5)).await;
    cp.create_key("two", "GENERIC").await;
    cp.create_key("three", "GENERIC").await;
    let err = cp.cli(&["keys", "create", "--name", "cli"]).unwrap_err();
    assert!(err.contains("Maximum API Key Limit Reached: 5"), "{err}");
}

/// With the Redis cache, shared by replicas (the in-process cache's case is tested in
/// process: `keys_tests.rs`).
async fn deleted_key_is_refused_at_once_with_redis(backend: Backend) {
    let mut redis = Redis::start();
    let cp = ControlPlane::start_with(StackBuilder::new(backend).redis(redis.url())).await;
    for round in 0..5 {
        let name = format!("short-lived-{round}");
        let key = cp.create_key(&name, "GENERIC").await;
        // Warm the cache: the key is now cached as valid.
        for _ in 0..3 {
            assert_eq!(cp.verify(&key).await, StatusCode::OK);
        }
        assert_eq!(
            cp.delete(&name, Some(&cp.admin_key)).await.0,
            StatusCode::OK
        );
        assert_eq!(
            cp.verify(&key).await,
            StatusCode::UNAUTHORIZED,
            "deleted key refused immediately"
        );
        let hash = ApiKey::parse(&key).unwrap().hash().to_hex();
        let (status, _, _) = cp
            .get(&format!("/api/v1/keys/by-hash/{hash}"), Some(&cp.edge_key))
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
    // A deleted caller cannot act either.
    let (_, made) = cp
        .create(json!({"name": "self-deleting", "role": "admin"}))
        .await;
    let key = made["apiKey"].as_str().unwrap().to_owned();
    assert_eq!(
        cp.delete("self-deleting", Some(&key)).await.0,
        StatusCode::OK
    );
    assert_eq!(
        cp.get("/api/v1/keys/list", Some(&key)).await.0,
        StatusCode::UNAUTHORIZED
    );
    redis.stop();
}

async fn cli_manages_keys(backend: Backend) {
    let cp = ControlPlane::start(backend).await;
    let out = cp
        .cli(&[
            "keys",
            "create",
            "--name",
            "from cli",
            "--type",
            "ONBOARDING",
        ])
        .unwrap();
    // stdout is the key alone, on its own line.
    assert_eq!(out.lines().count(), 1);
    let key = ApiKey::parse(out.trim()).expect("stdout is exactly the key");
    cp.secrets.lock().unwrap().push(out.trim().to_owned());
    assert_eq!(cp.verify(key.expose_secret()).await, StatusCode::OK);
    let listed = cp.cli(&["keys", "list"]).unwrap();
    assert!(
        listed.contains("from cli")
            && listed.contains(&key.identifier())
            && listed.contains("ONBOARDING")
    );
    assert!(!listed.contains(key.expose_secret()));
    assert!(cp
        .cli(&["keys", "create", "--name", "from cli"])
        .unwrap_err()
        .contains("already exists"));
    assert!(cp
        .cli(&["keys", "create", "--name", "x", "--type", "NOPE"])
        .is_err());
    assert!(cp.cli(&["keys", "create", "--name", ""]).is_err());
    cp.cli(&["keys", "delete", "from cli"]).unwrap();
    assert!(cp
        .cli(&["keys", "delete", "from cli"])
        .unwrap_err()
        .contains("no API key with this name"));
    assert!(!cp.cli(&["keys", "list"]).unwrap().contains("from cli"));
}

/// `identities` on the database and through the API (`--url`): made, shown with their
/// keys, topped up, listed, deleted (refused while keys belong, unless cascading).
async fn cli_manages_identities(backend: Backend) {
    let cp = ControlPlane::start(backend).await;
    let made: Value = serde_json::from_str(
        &cp.cli(&["identities", "create", "acme", "--credits", "10"])
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        (
            made["externalId"].as_str(),
            made["credits"]["granted"].as_u64()
        ),
        (Some("acme"), Some(10))
    );
    assert!(cp
        .cli(&["identities", "create", "acme"])
        .unwrap_err()
        .contains("already exists"));
    let key = cp
        .cli(&[
            "keys",
            "create",
            "--name",
            "acme-1",
            "--identity",
            "acme",
            "--credits",
            "5",
        ])
        .unwrap();
    cp.secrets.lock().unwrap().push(key);
    let log = tempfile::NamedTempFile::new().unwrap();
    let remote = |args: &[&str]| {
        let env = vec![("METLO_API_KEY".to_owned(), cp.admin_key.clone())];
        let mut full = vec!["identities", "--url", cp.url.as_str()];
        full.extend_from_slice(args);
        run_cli(&env, &full, log.path())
    };
    let shown: Value = serde_json::from_str(&remote(&["show", "acme"]).unwrap()).unwrap();
    assert_eq!(shown["keys"][0]["name"], "acme-1");
    assert_eq!(shown["keys"][0]["credits"]["granted"], 5);
    let topped: Value =
        serde_json::from_str(&remote(&["add-credits", "acme", "7"]).unwrap()).unwrap();
    assert_eq!(topped["credits"]["granted"], 17);
    // A key joins and leaves an identity, and its credits are set anew, by `keys update`.
    cp.cli(&[
        "keys",
        "update",
        "acme-1",
        "--no-identity",
        "--credits",
        "3",
    ])
    .unwrap();
    let shown: Value = serde_json::from_str(&remote(&["show", "acme"]).unwrap()).unwrap();
    assert_eq!(shown["keys"], json!([]));
    assert_eq!(cp.listed("acme-1").await["credits"]["granted"], 3);
    cp.cli(&[
        "keys",
        "update",
        "acme-1",
        "--identity",
        "acme",
        "--no-credits",
    ])
    .unwrap();
    assert!(cp.listed("acme-1").await.get("credits").is_none());
    assert_eq!(cp.listed("acme-1").await["identity"], "acme");
    // Changed on the database and through the API.
    let changed: Value = serde_json::from_str(
        &cp.cli(&[
            "identities",
            "update",
            "acme",
            "--limit",
            "per-minute=600/60",
            "--meta",
            r#"{"plan":"pro"}"#,
        ])
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        changed["rateLimits"],
        json!([{"name": "per-minute", "requests": 600, "periodSeconds": 60}])
    );
    assert_eq!(changed["meta"], json!({"plan": "pro"}));
    let changed: Value = serde_json::from_str(
        &remote(&["update", "acme", "--no-limits", "--credits", "4"]).unwrap(),
    )
    .unwrap();
    assert_eq!(changed["rateLimits"], json!([]));
    assert_eq!(changed["credits"]["granted"], 4);
    assert!(cp
        .cli(&["identities", "update", "acme", "--limit", "nope"])
        .unwrap_err()
        .contains("NAME=REQUESTS/SECONDS"));
    remote(&["create", "other"]).unwrap();
    let listed: Value = serde_json::from_str(&cp.cli(&["identities", "list"]).unwrap()).unwrap();
    assert_eq!(listed["identities"].as_array().unwrap().len(), 2);
    assert!(remote(&["delete", "acme"]).unwrap_err().contains("409"));
    assert!(cp
        .cli(&["identities", "delete", "acme"])
        .unwrap_err()
        .contains("belong to this identity"));
    remote(&["delete", "acme", "--cascade"]).unwrap();
    assert!(!cp.cli(&["keys", "list"]).unwrap().contains("acme-1"));
    cp.cli(&["identities", "delete", "other"]).unwrap();
    assert!(cp
        .cli(&["identities", "show", "other"])
        .unwrap_err()
        .contains("no identity"));
}

async fn ops_routes(backend: Backend) {
    let cp = ControlPlane::start(backend).await;
    assert_eq!(cp.get("/healthz", None).await.0, StatusCode::OK);
    let (status, body) = cp.ops_get("/readyz").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["database"],
        "ok"
    );

    cp.verify(&cp.client_key).await;
    cp.verify(&cp.client_key).await;
    cp.verify("nope").await;
    // Routes outside the key check are counted too, and an unknown path as one label.
    let (status, _, _) = cp.get("/healthz", None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = cp.get("/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = cp.get("/no/such/route", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, metrics) = cp.ops_get("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    for counted in [
        // (The harness polled /healthz while waiting for the server.)
        r#"http_requests_total{method="GET",route="/healthz",status="200"} "#,
        r#"http_requests_total{method="GET",route="/openapi.json",status="200"} 1"#,
        r#"http_requests_total{method="GET",route="unmatched",status="404"} 1"#,
    ] {
        assert!(metrics.contains(counted), "{counted} in {metrics}");
    }
    assert!(
        metrics
            .contains(r#"http_requests_total{method="GET",route="/api/v1/verify",status="200"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"route="/api/v1/verify",status="401"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("http_request_duration_seconds_bucket"),
        "{metrics}"
    );
    assert!(cp.metric("metlo_verify_cache_total", "hit").await >= 1.0);
    assert!(cp.metric("metlo_verify_cache_total", "miss").await >= 1.0);

    let (status, _, doc) = cp.get("/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK);
    let doc: Value = serde_json::from_str(&doc).unwrap();
    for path in [
        "/api/v1/keys/create",
        "/api/v1/keys/list",
        "/api/v1/keys/onboarding",
        "/api/v1/keys/{name}/delete",
        "/api/v1/verify",
        "/api/v1/keys/by-hash/{hash}",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} documented");
    }
    let created = doc["components"]["schemas"]["CreatedKey"].to_string();
    assert!(
        created.contains("apiKey") && created.contains("KeyInfo"),
        "{created}"
    );
}

/// Whoever can write to Redis cannot make up a caller: a record written there for a
/// made-up key — copied from a real one's, its role raised to admin — is not taken
/// (the control plane tags its records with a secret Redis never sees).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_written_into_redis_by_someone_else_is_not_a_key() {
    let redis = Redis::start();
    let cp =
        ControlPlane::start_with(StackBuilder::new(Backend::Postgres).redis(redis.url())).await;
    let real = cp.create_key("real", "GENERIC").await;
    let real_hash = ApiKey::parse(&real).unwrap().hash().to_hex();
    let (status, _, record) = cp
        .get(
            &format!("/api/v1/keys/by-hash/{real_hash}"),
            Some(&cp.edge_key),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let made_up = ApiKey::generate().unwrap();
    let mut forged: Value = serde_json::from_str(&record).unwrap();
    forged["role"] = json!("admin");
    forged["identifier"] = json!(made_up.identifier());
    forged["name"] = json!("intruder");
    let forged = forged.to_string();
    let hash = made_up.hash().to_hex();
    assert_eq!(
        redis.command(&["SET", &format!("metlo:verify:{hash}"), &forged]),
        "+OK"
    );
    let (status, _, _) = cp
        .get("/api/v1/keys/list", Some(made_up.expose_secret()))
        .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "a forged record was taken"
    );
    // The same for a real key's entry copied whole (its tag binds it to that key).
    let genuine = redis
        .get(&format!("metlo:verify:{real_hash}"))
        .expect("the real key is cached in Redis");
    let other = ApiKey::generate().unwrap();
    let other_entry = format!("metlo:verify:{}", other.hash().to_hex());
    assert_eq!(redis.command(&["SET", &other_entry, &genuine]), "+OK");
    assert_eq!(
        cp.verify(other.expose_secret()).await,
        StatusCode::UNAUTHORIZED,
        "a copied record was taken"
    );
    let (_, metrics) = cp.ops_get("/metrics").await;
    assert!(metrics.contains("metlo_cache_forged_total"), "{metrics}");
    assert_eq!(cp.verify(&real).await, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_falls_back_to_the_database() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let mut redis = Redis::start();
        let cp = ControlPlane::start_with(StackBuilder::new(backend).redis(redis.url())).await;
        let key = cp.create_key("verified", "GENERIC").await;
        assert_eq!(cp.verify(&key).await, StatusCode::OK);
        assert!(
            redis.dbsize() >= 1,
            "verification results are cached in Redis"
        );
        let (_, ready) = cp.ops_get("/readyz").await;
        assert!(ready.contains(r#""cache":"ok""#), "{ready}");

        redis.stop();
        let doomed = cp.create_key("doomed", "GENERIC").await;
        let unknown = ApiKey::generate().unwrap();
        for _ in 0..20 {
            assert_eq!(cp.verify(&key).await, StatusCode::OK);
            assert_eq!(cp.verify(&cp.client_key).await, StatusCode::OK);
            assert_eq!(
                cp.verify(unknown.expose_secret()).await,
                StatusCode::UNAUTHORIZED
            );
        }
        assert_eq!(cp.verify(&doomed).await, StatusCode::OK);
        assert_eq!(
            cp.delete("doomed", Some(&cp.admin_key)).await.0,
            StatusCode::OK
        );
        assert_eq!(cp.verify(&doomed).await, StatusCode::UNAUTHORIZED);
        let (status, ready) = cp.ops_get("/readyz").await;
        assert_eq!(status, StatusCode::OK, "Redis is optional for readiness");
        assert!(ready.contains(r#""cache":"unreachable""#), "{ready}");
        let log = cp.log();
        assert!(log.contains("Redis unavailable"), "a warning is logged");
        assert!(
            cp.metric("http_requests_total", "status=\"5").await == 0.0,
            "no 5xx during the outage"
        );

        redis.restart();
        // The client reconnects; once it has, verifications are served from Redis again.
        // Redis then holds two entries: the tombstone of the key deleted during the outage
        // (rewritten once Redis answered) and the live key's verification.
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            assert_eq!(cp.verify(&key).await, StatusCode::OK);
            if redis.dbsize() >= 2 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "Redis not used again after restart"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let hits_before = cp.metric("metlo_verify_cache_total", "hit").await;
        for _ in 0..10 {
            assert_eq!(cp.verify(&key).await, StatusCode::OK);
        }
        let hits_after = cp.metric("metlo_verify_cache_total", "hit").await;
        assert!(
            hits_after >= hits_before + 10.0,
            "{hits_before} -> {hits_after}\n{}\n{}",
            cp.ops_get("/metrics").await.1,
            cp.log()
        );
        assert_eq!(cp.metric("http_requests_total", "status=\"5").await, 0.0);
    }
}

/// Two replicas share PostgreSQL and Redis: a delete on one is refused by the other
/// at once, although the other had the key in its near cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_on_one_replica_is_refused_by_another() {
    let redis = Redis::start();
    let a = ControlPlane::start_with(StackBuilder::new(Backend::Postgres).redis(redis.url())).await;
    let b = a.replica().await;
    let mut waits = vec![];
    for round in 0..20 {
        let name = format!("shared-{round}");
        let key = a.create_key(&name, "GENERIC").await;
        for _ in 0..5 {
            assert_eq!(b.verify(&key).await, StatusCode::OK);
            assert_eq!(a.verify(&key).await, StatusCode::OK);
        }
        assert_eq!(a.delete(&name, Some(&a.admin_key)).await.0, StatusCode::OK);
        let deleted_at = std::time::Instant::now();
        // Pub/sub delivery is asynchronous: poll. Without it, b's near cache would accept
        // the key for up to ~1 s more; with it, it takes about a millisecond on loopback, so
        // 250 ms is a wide margin for a noisy machine (the figure printed is the real one).
        loop {
            match b.verify(&key).await {
                StatusCode::UNAUTHORIZED => break,
                StatusCode::OK => assert!(
                    deleted_at.elapsed() < Duration::from_millis(250),
                    "replica still accepts"
                ),
                other => panic!("unexpected {other}"),
            }
        }
        waits.push(deleted_at.elapsed());
        assert_eq!(a.verify(&key).await, StatusCode::UNAUTHORIZED);
    }
    waits.sort();
    println!(
        "replica refused a deleted key after: median {:?}, max {:?}",
        waits[waits.len() / 2],
        waits[waits.len() - 1]
    );
    // Hot keys are served from the near cache, not a Redis round trip each.
    let hits = b.metric("metlo_verify_cache_total", "hit").await;
    assert!(hits > 0.0);
}

#[tokio::test]
async fn graceful_shutdown_on_sigterm() {
    let mut cp = ControlPlane::start(Backend::Sqlite).await;
    assert_eq!(cp.verify(&cp.client_key).await, StatusCode::OK);
    assert!(cp.terminate(), "exits 0 on SIGTERM");
    assert!(cp.log().contains("stopped"));
}

#[tokio::test]
async fn json_logs() {
    let cp = ControlPlane::start_with(StackBuilder::new(Backend::Sqlite).env("LOG_FORMAT", "json"))
        .await;
    cp.create_key("json-logged", "GENERIC").await;
    let log = cp.log();
    let line = log
        .lines()
        .find(|l| l.contains("json-logged"))
        .expect("creation logged");
    let v: Value = serde_json::from_str(line).expect("a JSON log line");
    assert_eq!(v["message"], "key created");
    assert_eq!(v["name"], "json-logged");
}

/// Issue 29: the revocation feed is current on every replica. Two replicas on one
/// PostgreSQL: keys deleted through one appear in the other's feed (which it serves from
/// memory), in commit order, woken by `NOTIFY` (the figure printed is the delay).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_revocation_feed_is_current_on_every_replica() {
    let a = ControlPlane::start_with(StackBuilder::new(Backend::Postgres)).await;
    let b = a.replica().await;
    // A replica serves its feed once it has read it (503 before, for a moment at start).
    let feed = |cp: &ControlPlane, after: i64| {
        let request = cp.request(
            reqwest::Method::GET,
            &format!("/api/v1/revocations?after={after}"),
            Some(&cp.edge_key),
        );
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                let r = request.try_clone().unwrap().send().await.unwrap();
                if r.status() == StatusCode::OK {
                    let mut page = r.json::<serde_json::Value>().await.unwrap();
                    // How old the replica's read is differs from one answer to the next.
                    assert!(
                        page["ageMs"].as_u64().is_some_and(|age| age < 5000),
                        "{page}"
                    );
                    page.as_object_mut().unwrap().remove("ageMs");
                    return page;
                }
                assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
                assert!(
                    std::time::Instant::now() < deadline,
                    "the feed is never read"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    let start = feed(&b, 0).await["seq"].as_i64().unwrap();
    let mut waits = vec![];
    let mut hashes = vec![];
    for round in 0..10 {
        let name = format!("fed-{round}");
        let key = a.create_key(&name, "GENERIC").await;
        let hash = metlo_shared::KeyHash::of_text(&key).to_hex();
        assert_eq!(a.delete(&name, Some(&a.admin_key)).await.0, StatusCode::OK);
        let deleted_at = std::time::Instant::now();
        loop {
            let page = feed(&b, start).await;
            let seen = page["events"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["hash"] == hash.as_str() && e["record"].is_null());
            if seen {
                break;
            }
            assert!(
                deleted_at.elapsed() < Duration::from_secs(10),
                "replica b never fed the delete: {page}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        waits.push(deleted_at.elapsed());
        hashes.push(hash);
    }
    let page = feed(&b, start).await;
    let fed: Vec<&str> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["hash"].as_str().unwrap())
        .collect();
    assert_eq!(fed, hashes, "in commit order, nothing else");
    // Replica a's own reader is woken by its commits; both serve the same feed.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while feed(&a, start).await != page {
        assert!(
            std::time::Instant::now() < deadline,
            "a never served b's page"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // b was woken by PostgreSQL's NOTIFY (not only by its quarter-second tick).
    assert!(
        b.metric("metlo_revocation_feed_reads_total", "notify")
            .await
            > 0.0,
        "b never woken by NOTIFY"
    );
    waits.sort();
    println!(
        "replica b fed a delete made on a after: median {:?}, max {:?}",
        waits[waits.len() / 2],
        waits[waits.len() - 1]
    );
}
