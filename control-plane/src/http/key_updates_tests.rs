//! Key updates and policies on the control plane, in process on both backends (moved
//! from `tests/tests/policies.rs`): `meta` validated, stored and listed; `PATCH` changes
//! only what is given and is audited before/after; updates are admin-only and keep an
//! admin; rate limits validated at create and update, and a limited key gets exactly its
//! limit on `/api/v1/verify` (its window ended on the moved clock).

use axum::http::StatusCode;
use serde_json::{json, Value};

use crate::db::Backend;
use crate::test_util::{on_both_backends, Reply, TestApp};

on_both_backends!(
    meta_is_validated_stored_and_listed,
    updates_change_only_what_is_given_and_are_audited,
    updates_are_admin_only_and_keep_an_admin,
    rate_limits_are_validated,
    a_rate_limited_key_gets_exactly_its_limit_on_verify,
);

async fn start(backend: Backend) -> TestApp {
    TestApp::on(backend).build().await
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

    // The only admin key cannot be disabled, nor given an expiry (nobody could manage
    // keys any more) …
    let (status, body) = cp.patch("admin", json!({"enabled": false})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("last admin key"),
        "{body}"
    );
    let soon = crate::clock::iso8601((crate::clock::now_ms() / 1000 + 3600) * 1000);
    let (status, body) = cp.patch("admin", json!({"expiresAt": soon})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("last admin key"),
        "{body}"
    );
    assert_eq!(cp.listed("admin").await["expiresAt"], Value::Null);
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

/// `count` verifications of `key`: their statuses and the last reply.
async fn verify_n(app: &TestApp, key: &str, count: usize) -> (Vec<StatusCode>, Reply) {
    let mut statuses = vec![];
    let mut last = None;
    for _ in 0..count {
        let reply = app.with_key(key).get("/api/v1/verify").await;
        statuses.push(reply.status);
        last = Some(reply);
    }
    (statuses, last.expect("at least one request"))
}

async fn a_rate_limited_key_gets_exactly_its_limit_on_verify(backend: Backend) {
    let app = start(backend).await;
    let limit = json!({"requests": 3, "periodSeconds": 2});
    let (status, body) = app
        .create(json!({"name": "limited", "rateLimit": limit}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["rateLimit"], limit);
    assert_eq!(app.listed("limited").await["rateLimit"], limit);
    let key = body["apiKey"].as_str().unwrap().to_owned();
    let free = app.create_key("unlimited", "GENERIC").await;

    let (statuses, _) = verify_n(&app, &key, 3).await;
    assert_eq!(statuses, [StatusCode::OK; 3]);
    let reply = app.with_key(&key).get("/api/v1/verify").await;
    reply.assert_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "the fourth");
    let retry: u64 = reply.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    assert_eq!(reply.header("ratelimit-policy"), Some(r#""key";q=3;w=2"#));
    assert_eq!(
        reply.header("ratelimit"),
        Some(format!(r#""key";r=0;t={retry}"#).as_str())
    );
    // The unlimited key is untouched, and carries no rate-limit headers.
    let reply = app.with_key(&free).get("/api/v1/verify").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.header("ratelimit").is_none());

    // The window ends two seconds after its first request, within Retry-After: a new
    // one admits 3 again.
    app.advance(std::time::Duration::from_secs(retry));
    let reply = app.with_key(&key).get("/api/v1/verify").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.header("ratelimit"), Some(r#""key";r=2;t=2"#));

    // A changed limit applies at once (a new window); removing it lifts it.
    let (status, body) = app
        .patch(
            "limited",
            json!({"rateLimit": {"requests": 1, "periodSeconds": 60}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (statuses, last) = verify_n(&app, &key, 2).await;
    assert_eq!(statuses, [StatusCode::OK, StatusCode::TOO_MANY_REQUESTS]);
    assert_eq!(last.header("ratelimit-policy"), Some(r#""key";q=1;w=60"#));
    let (status, body) = app.patch("limited", json!({"rateLimit": null})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["rateLimit"], Value::Null);
    let (statuses, _) = verify_n(&app, &key, 5).await;
    assert_eq!(statuses, [StatusCode::OK; 5]);
    let page = app.as_admin().get("/api/v1/audit?limit=1000").await.json();
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
}
