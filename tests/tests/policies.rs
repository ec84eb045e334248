//! Key policies on the control plane, through HTTP into the real binary on SQLite and
//! PostgreSQL: `meta` (stored, validated, listed) and updates without re-issuing
//! (`PATCH /api/v1/keys/{name}`: disable / enable, expiry, meta), their audit entries,
//! the last-admin rule, the CLI's `update` / `disable` / `enable`, and per-key rate
//! limits on `/api/v1/verify` (in process, and in Redis shared by two replicas).

use std::time::{Duration, Instant};

use metlo_shared::ApiKey;
use metlo_tests::{
    on_both_backends, run_cli, Backend, ControlPlane, Redis, StackBuilder, StatusCode,
};
use serde_json::{json, Value};

on_both_backends!(
    meta_is_validated_stored_and_listed,
    a_disabled_key_is_refused_like_an_unknown_one_until_enabled,
    updates_change_only_what_is_given_and_are_audited,
    updates_are_admin_only_and_keep_an_admin,
    the_cli_updates_disables_and_enables,
    a_rate_limited_key_gets_exactly_its_limit_on_verify,
    rate_limits_are_validated,
);

/// One-second cache TTL: a tombstone left by a disable is gone a second later.
async fn start(backend: Backend) -> ControlPlane {
    ControlPlane::start_with(StackBuilder::new(backend).env("CACHE_TTL_SECONDS", 1)).await
}

async fn meta_is_validated_stored_and_listed(backend: Backend) {
    let cp = start(backend).await;
    let meta = json!({"tenant": "ačme \"quoted\" ✓", "plan": {"tier": 3, "tags": ["a", "b"]}});
    let (status, body) = cp.create(json!({"name": "tenant-a", "meta": meta})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["meta"], meta);
    assert_eq!(body["enabled"], true);
    let listed = cp.listed("tenant-a").await;
    assert_eq!(listed["meta"], meta);
    assert_eq!(listed["enabled"], true);
    // A key without meta lists null.
    cp.create_key("plain", "GENERIC").await;
    assert_eq!(cp.listed("plain").await["meta"], Value::Null);

    for (bad, why) in [
        (json!([1, 2]), "an array"),
        (json!("tenant"), "a string"),
        (json!(7), "a number"),
        (json!({"a": "x".repeat(1100)}), "over 1 KB"),
    ] {
        let (status, body) = cp.create(json!({"name": "bad-meta", "meta": bad})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{why}: {body}");
        assert!(body["message"].as_str().unwrap().contains("meta"), "{body}");
    }
    assert!(
        cp.list().await.iter().all(|k| k["name"] != "bad-meta"),
        "nothing stored"
    );
    cp.assert_log_has_no_secrets();
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

async fn updates_change_only_what_is_given_and_are_audited(backend: Backend) {
    let cp = start(backend).await;
    let meta = json!({"tenant": "a"});
    let (status, _) = cp
        .create(json!({"name": "u", "meta": meta, "keyFor": "AWS"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let later = chrono::Utc::now() + chrono::Duration::days(30);
    let at = later.format("%Y-%m-%dT%H:%M:%SZ").to_string();

    let (status, body) = cp.patch("u", json!({"expiresAt": at})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["meta"], meta, "meta untouched");
    assert_eq!(body["for"], "AWS");
    assert!(
        body["expiresAt"].as_str().unwrap().starts_with(&at[..19]),
        "{body}"
    );
    let (status, body) = cp
        .patch("u", json!({"meta": {"tenant": "b"}, "expiresAt": null}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["meta"], json!({"tenant": "b"}));
    assert_eq!(body["expiresAt"], Value::Null);
    let (status, body) = cp.patch("u", json!({"meta": null})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(cp.listed("u").await["meta"], Value::Null);

    for (bad, why) in [
        (json!({}), "nothing to change"),
        (json!({"enabled": "no"}), "not a boolean"),
        (json!({"rateLimit": {"requests": 1}}), "unknown field"),
        (json!({"expiresAt": "2001-01-01T00:00:00Z"}), "in the past"),
        (json!({"expiresAt": "soon"}), "not a date"),
        (json!({"meta": [1]}), "not an object"),
    ] {
        let (status, body) = cp.patch("u", bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{why}: {body}");
        assert!(body["message"].is_string(), "{body}");
    }
    assert_eq!(
        cp.patch("nobody", json!({"enabled": false})).await.0,
        StatusCode::NOT_FOUND
    );
    // Names that are also route segments under /api/v1/keys/ can be updated too.
    for name in ["list", "onboarding", "create"] {
        cp.create_key(name, "GENERIC").await;
        let (status, body) = cp.patch(name, json!({"meta": {"n": name}})).await;
        assert_eq!(status, StatusCode::OK, "{name}: {body}");
        assert_eq!(body["name"], name);
    }

    let (status, _, text) = cp
        .get("/api/v1/audit?limit=1000", Some(&cp.admin_key))
        .await;
    assert_eq!(status, StatusCode::OK);
    let page: Value = serde_json::from_str(&text).unwrap();
    let updates: Vec<&Value> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "key.update" && e["target"] == "u")
        .collect();
    assert_eq!(
        updates.len(),
        3,
        "one entry per update that happened: {updates:?}"
    );
    // Newest first: meta cleared; meta and expiry; expiry set.
    assert_eq!(
        updates[0]["detail"]["before"],
        json!({"meta": {"tenant": "b"}})
    );
    assert_eq!(updates[0]["detail"]["after"], json!({"meta": null}));
    assert_eq!(updates[1]["detail"]["after"]["expiresAt"], Value::Null);
    assert_eq!(updates[1]["detail"]["before"]["meta"], meta);
    assert_eq!(updates[2]["detail"]["before"], json!({"expiresAt": null}));
    assert_eq!(updates[2]["actor"], "admin");
    cp.assert_log_has_no_secrets();
}

async fn updates_are_admin_only_and_keep_an_admin(backend: Backend) {
    let cp = start(backend).await;
    for key in [&cp.client_key, &cp.edge_key] {
        let (status, body) = cp.patch_as(key, "client", &json!({"enabled": false})).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    }
    let (status, _) = cp
        .patch_as("garbage", "client", &json!({"enabled": false}))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        cp.verify(&cp.client_key).await,
        StatusCode::OK,
        "nothing changed"
    );

    // The only admin key cannot be disabled (nobody could manage keys any more) …
    let (status, body) = cp.patch("admin", json!({"enabled": false})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("last admin key"),
        "{body}"
    );
    // … once there is another, it can; then that one is the last.
    let (status, body) = cp.create(json!({"name": "admin-2", "role": "admin"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let second = body["apiKey"].as_str().unwrap().to_owned();
    assert_eq!(
        cp.patch("admin", json!({"enabled": false})).await.0,
        StatusCode::OK
    );
    assert_eq!(
        cp.get("/api/v1/keys/list", Some(&cp.admin_key)).await.0,
        StatusCode::UNAUTHORIZED,
        "a disabled admin key administers nothing"
    );
    let (status, body) = cp
        .patch_as(&second, "admin-2", &json!({"enabled": false}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = cp
        .patch_as(&second, "admin", &json!({"enabled": true}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
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
}

/// `requests` verifications of `key`: their statuses and the last one's headers.
async fn verify_n(
    cp: &ControlPlane,
    key: &str,
    n: usize,
) -> (Vec<StatusCode>, reqwest::header::HeaderMap, Value) {
    let mut statuses = vec![];
    let mut last = (Default::default(), Value::Null);
    for _ in 0..n {
        let (status, headers, body) = cp.get("/api/v1/verify", Some(key)).await;
        statuses.push(status);
        last = (headers, serde_json::from_str(&body).unwrap_or(Value::Null));
    }
    (statuses, last.0, last.1)
}

fn header<'a>(headers: &'a reqwest::header::HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header in {headers:?}"))
        .to_str()
        .unwrap()
}

async fn a_rate_limited_key_gets_exactly_its_limit_on_verify(backend: Backend) {
    let cp = start(backend).await;
    let limit = json!({"requests": 3, "periodSeconds": 2});
    let (status, body) = cp
        .create(json!({"name": "limited", "rateLimit": limit}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["rateLimit"], limit);
    assert_eq!(cp.listed("limited").await["rateLimit"], limit);
    let key = body["apiKey"].as_str().unwrap().to_owned();
    let free = cp.create_key("unlimited", "GENERIC").await;

    let started = Instant::now();
    let (statuses, _, _) = verify_n(&cp, &key, 3).await;
    assert_eq!(statuses, [StatusCode::OK; 3]);
    let (status, headers, body) = cp.get("/api/v1/verify", Some(&key)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "rate_limited");
    let retry: u64 = header(&headers, "retry-after").parse().unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    assert_eq!(header(&headers, "ratelimit-policy"), r#""key";q=3;w=2"#);
    assert_eq!(
        header(&headers, "ratelimit"),
        format!(r#""key";r=0;t={retry}"#)
    );
    // The unlimited key is untouched, and carries no rate-limit headers.
    let (status, headers, _) = cp.get("/api/v1/verify", Some(&free)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers.get("ratelimit").is_none());

    // The window ends two seconds after its first request, within Retry-After: a new
    // one admits 3 again.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the test was too slow to tell"
    );
    tokio::time::sleep(Duration::from_secs(retry)).await;
    let (status, headers, _) = cp.get("/api/v1/verify", Some(&key)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(header(&headers, "ratelimit"), r#""key";r=2;t=2"#);

    // A changed limit applies at once (a new window); removing it lifts it.
    let (status, body) = cp
        .patch(
            "limited",
            json!({"rateLimit": {"requests": 1, "periodSeconds": 60}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (statuses, headers, _) = verify_n(&cp, &key, 2).await;
    assert_eq!(statuses, [StatusCode::OK, StatusCode::TOO_MANY_REQUESTS]);
    assert_eq!(header(&headers, "ratelimit-policy"), r#""key";q=1;w=60"#);
    let (status, body) = cp.patch("limited", json!({"rateLimit": null})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["rateLimit"], Value::Null);
    let (statuses, _, _) = verify_n(&cp, &key, 5).await;
    assert_eq!(statuses, [StatusCode::OK; 5]);
    let (_, _, text) = cp
        .get("/api/v1/audit?limit=1000", Some(&cp.admin_key))
        .await;
    let page: Value = serde_json::from_str(&text).unwrap();
    let audit = page["entries"].as_array().unwrap();
    let update = audit
        .iter()
        .find(|e| {
            e["action"] == "key.update"
                && e["detail"]["after"]["rateLimit"].is_null()
                && e["detail"]["before"]["rateLimit"]["requests"] == 1
        })
        .unwrap_or_else(|| panic!("no audit entry for removing the limit: {audit:?}"));
    assert_eq!(update["target"], "limited");
    cp.assert_log_has_no_secrets();
}

async fn rate_limits_are_validated(backend: Backend) {
    let cp = start(backend).await;
    for (bad, why) in [
        (json!({"requests": 0, "periodSeconds": 60}), "no requests"),
        (json!({"requests": 5, "periodSeconds": 0}), "no period"),
        (json!({"requests": 5, "periodSeconds": 86401}), "over a day"),
        (json!({"requests": -1, "periodSeconds": 60}), "negative"),
        (json!({"requests": 1.5, "periodSeconds": 60}), "fraction"),
        (json!({"requests": 5}), "no period given"),
        (
            json!({"requests": 5, "periodSeconds": 60, "burst": 2}),
            "unknown field",
        ),
        (json!([5, 60]), "not an object"),
    ] {
        let (status, body) = cp
            .create(json!({"name": "bad-limit", "rateLimit": bad}))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{why}: {body}");
        assert!(
            body["message"].as_str().unwrap().contains("rateLimit")
                || body["message"].as_str().unwrap().contains("requests")
                || body["message"].as_str().unwrap().contains("period"),
            "{why}: {body}"
        );
        cp.create_key("target", "GENERIC").await;
        let (status, body) = cp.patch("target", json!({"rateLimit": bad})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{why}: {body}");
        cp.delete("target", Some(&cp.admin_key)).await;
    }
    assert!(cp.list().await.iter().all(|k| k["name"] != "bad-limit"));
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
