//! Key policies through the real binary on SQLite and PostgreSQL: a disabled key refused
//! once its cache entry expires too, the CLI's `update` / `disable` / `enable`, and
//! per-key rate limits in Redis shared by two replicas. The rules of `meta`, of `PATCH`
//! (validation, audit, admin-only, the last admin) and of an in-process rate limit on
//! `/api/v1/verify` are tested in process: `control-plane/src/http/key_updates_tests.rs`.

use std::time::{Duration, Instant};

use metlo_shared::ApiKey;
use metlo_tests::{
    on_both_backends, run_cli, Backend, ControlPlane, Redis, StackBuilder, StatusCode,
};
use serde_json::{json, Value};

on_both_backends!(
    a_disabled_key_is_refused_like_an_unknown_one_until_enabled,
    the_cli_updates_disables_and_enables,
);

/// One-second cache TTL: a tombstone left by a disable is gone a second later.
async fn start(backend: Backend) -> ControlPlane {
    ControlPlane::start_with(StackBuilder::new(backend).env("CACHE_TTL_SECONDS", 1)).await
}

async fn a_disabled_key_is_refused_like_an_unknown_one_until_enabled(backend: Backend) {
    let cp = start(backend).await;
    let key = cp.create_key("switch", "GENERIC").await;
    assert_eq!(cp.verify(&key).await, StatusCode::OK);
    let hash = ApiKey::parse(&key).unwrap().hash().to_hex();
    let by_hash = format!("/api/v1/keys/by-hash/{hash}");
    assert_eq!(cp.get(&by_hash, Some(&cp.edge_key)).await.0, StatusCode::OK);

    let (status, body) = cp.patch("switch", json!({"enabled": false})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["enabled"], false);
    assert_eq!(cp.listed("switch").await["enabled"], false);
    // At once on this process, with the body an unknown key gets.
    let (status, _, refused) = cp.get("/api/v1/verify", Some(&key)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let made_up = ApiKey::generate().unwrap();
    let (_, _, unknown) = cp
        .get("/api/v1/verify", Some(made_up.expose_secret()))
        .await;
    assert_eq!(refused, unknown, "a disabled key looks like an unknown one");
    assert_eq!(
        cp.get(&by_hash, Some(&cp.edge_key)).await.0,
        StatusCode::NOT_FOUND
    );
    // Still disabled once its cache entry is gone: the database says so too.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(cp.verify(&key).await, StatusCode::UNAUTHORIZED);
    assert_eq!(
        cp.get(&by_hash, Some(&cp.edge_key)).await.0,
        StatusCode::NOT_FOUND
    );

    let (status, body) = cp.patch("switch", json!({"enabled": true})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["enabled"], true);
    // Back within the cache TTL (the refusal just cached expires), then for good.
    let deadline = Instant::now() + Duration::from_secs(5);
    while cp.verify(&key).await != StatusCode::OK {
        assert!(Instant::now() < deadline, "an enabled key works again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(cp.get(&by_hash, Some(&cp.edge_key)).await.0, StatusCode::OK);
    // Disabling twice keeps it disabled; enabling an enabled key changes nothing.
    assert_eq!(
        cp.patch("switch", json!({"enabled": true})).await.0,
        StatusCode::OK
    );
    assert_eq!(cp.verify(&key).await, StatusCode::OK);
    cp.assert_log_has_no_secrets();
}

async fn the_cli_updates_disables_and_enables(backend: Backend) {
    let cp = start(backend).await;
    let key = cp.create_key("by-cli", "GENERIC").await;
    let log = tempfile::NamedTempFile::new().unwrap();
    let remote = |args: &[&str]| {
        let env = vec![("METLO_API_KEY".to_owned(), cp.admin_key.clone())];
        let mut full = vec!["keys", "--url", cp.url.as_str()];
        full.extend_from_slice(args);
        run_cli(&env, &full, log.path())
    };
    remote(&["disable", "by-cli"]).unwrap();
    assert_eq!(cp.listed("by-cli").await["enabled"], false);
    assert_eq!(cp.verify(&key).await, StatusCode::UNAUTHORIZED);
    remote(&["enable", "by-cli"]).unwrap();
    assert_eq!(cp.listed("by-cli").await["enabled"], true);
    let out = remote(&["update", "by-cli", "--meta", r#"{"tenant":"c"}"#, "--json"]).unwrap();
    let body: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(body["meta"], json!({"tenant": "c"}));
    let err = remote(&["update", "by-cli", "--meta", "not json"]).unwrap_err();
    assert!(err.contains("--meta must be JSON"), "{err}");
    let err = remote(&["update", "by-cli"]).unwrap_err();
    assert!(err.contains("nothing to change"), "{err}");
    let err = remote(&["update", "by-cli", "--enable", "--disable"]).unwrap_err();
    assert!(err.contains("cannot be used with"), "{err}");
    // On the database too (no --url): the same service.
    let local = cp.cli(&["keys", "update", "by-cli", "--no-meta", "--disable"]);
    assert!(local.is_ok(), "{local:?}");
    let listed = cp.listed("by-cli").await;
    assert_eq!(
        (listed["enabled"].clone(), listed["meta"].clone()),
        (json!(false), Value::Null)
    );
    let table = remote(&["list"]).unwrap();
    assert!(table.lines().next().unwrap().contains("ENABLED"), "{table}");

    // Permissions: set at create (repeated or comma-separated), replaced, removed.
    let made = remote(&[
        "create",
        "--name",
        "scoped-cli",
        "--permission",
        "orders:write",
        "--permission",
        "orders:read,billing:read",
        "--json",
    ])
    .unwrap();
    let made: Value = serde_json::from_str(&made).unwrap();
    assert_eq!(
        made["permissions"],
        json!(["billing:read", "orders:read", "orders:write"])
    );
    cp.secrets
        .lock()
        .unwrap()
        .push(made["apiKey"].as_str().unwrap().to_owned());
    let out = remote(&[
        "update",
        "scoped-cli",
        "--permission",
        "orders:read",
        "--json",
    ])
    .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["permissions"],
        json!(["orders:read"])
    );
    let err = remote(&["update", "scoped-cli", "--permission", "not valid!"]).unwrap_err();
    assert!(err.contains("invalid permission"), "{err}");
    let local = cp.cli(&["keys", "update", "scoped-cli", "--no-permissions"]);
    assert!(local.is_ok(), "{local:?}");
    assert_eq!(cp.listed("scoped-cli").await["permissions"], json!([]));
    let table = remote(&["list"]).unwrap();
    assert!(
        table.lines().next().unwrap().contains("PERMISSIONS"),
        "{table}"
    );
}

/// With Redis, replicas share one count: 4 requests spread over two replicas of a key
/// limited to 3 get three 200s and one 429. Redis down: 503, never an uncounted 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_in_redis_are_shared_by_replicas_and_fail_closed() {
    let mut redis = Redis::start();
    let a = ControlPlane::start_with(StackBuilder::new(Backend::Postgres).redis(redis.url())).await;
    let b = a.replica().await;
    let (status, body) = a
        .create(json!({"name": "shared", "rateLimit": {"requests": 3, "periodSeconds": 60}}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let key = body["apiKey"].as_str().unwrap().to_owned();
    let mut statuses = vec![];
    for cp in [&a, &b, &a, &b] {
        statuses.push(cp.verify(&key).await);
    }
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    let free = a.create_key("free", "GENERIC").await;
    redis.stop();
    let (status, headers, body) = b.get("/api/v1/verify", Some(&key)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(headers.get("retry-after").is_some());
    // Keys without a limit do not need Redis for this.
    assert_eq!(b.verify(&free).await, StatusCode::OK);
}
