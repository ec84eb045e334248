//! The keys routes' own rules, in process on both backends (moved from
//! `tests/tests/roles.rs` and `control_plane.rs`): Metlo's create, list, onboarding and
//! delete shapes; any name, by path; one winner of 200 racing creates of a name or of
//! the last slot; the last admin key stays, names that could impersonate another are
//! refused, bad bodies are JSON 400s and long ones 413s; the key limit's message is
//! Metlo's; a deleted key (cached as valid) is refused at once, as a caller too.

use std::time::Duration;

use axum::http::StatusCode;
use metlo_shared::ApiKey;
use serde_json::{json, Value};

use crate::db::Backend;
use crate::test_util::{encode_segment, on_both_backends, TestApp};

on_both_backends!(
    create_list_onboarding_delete,
    names_with_spaces_slashes_and_unicode,
    concurrent_creates_with_one_name,
    concurrent_creates_at_the_limit,
    the_last_admin_key_stays,
    names_that_could_impersonate_are_refused,
    bad_requests_are_400_json,
    limit_reached_has_metlo_message,
    deleted_key_is_refused_at_once,
);

fn delete_path(name: &str) -> String {
    format!("/api/v1/keys/{}/delete", encode_segment(name))
}

async fn the_last_admin_key_stays(backend: Backend) {
    let app = TestApp::on(backend).build().await;
    let reply = app.as_admin().delete(&delete_path("admin")).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text);
    assert!(reply.json()["message"]
        .as_str()
        .unwrap()
        .contains("last admin key"));
    assert_eq!(
        app.as_admin().get("/api/v1/keys/list").await.status,
        StatusCode::OK
    );
    // With a second admin, the first can go — and then the second is the last.
    let body = app
        .as_admin()
        .post(
            "/api/v1/keys/create",
            json!({"name": "admin-2", "role": "admin"}),
        )
        .await
        .json();
    let admin2 = body["apiKey"].as_str().unwrap().to_owned();
    assert_eq!(
        app.with_key(&admin2)
            .delete(&delete_path("admin"))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        app.with_key(&admin2)
            .delete(&delete_path("admin-2"))
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    // Two admins deleting each other at once: one wins, one admin key is left.
    let body = app
        .with_key(&admin2)
        .post(
            "/api/v1/keys/create",
            json!({"name": "admin-3", "role": "admin"}),
        )
        .await
        .json();
    let admin3 = body["apiKey"].as_str().unwrap().to_owned();
    let (as2, as3) = (app.with_key(&admin2), app.with_key(&admin3));
    let (del3, del2) = (delete_path("admin-3"), delete_path("admin-2"));
    let (a, b) = tokio::join!(as2.delete(&del3), as3.delete(&del2));
    let oks = [a.status, b.status]
        .iter()
        .filter(|s| **s == StatusCode::OK)
        .count();
    assert_eq!(oks, 1, "{a:?} {b:?}");
    let survivor = if a.status == StatusCode::OK {
        &admin2
    } else {
        &admin3
    };
    let list: Vec<serde_json::Value> =
        serde_json::from_value(app.with_key(survivor).get("/api/v1/keys/list").await.json())
            .unwrap();
    assert_eq!(
        list.iter().filter(|k| k["role"] == "admin").count(),
        1,
        "{list:?}"
    );
}

async fn names_that_could_impersonate_are_refused(backend: Backend) {
    let app = TestApp::on(backend).build().await;
    let create = |name: &str| {
        let body = json!({ "name": name });
        let app = &app;
        async move { app.as_admin().post("/api/v1/keys/create", body).await }
    };
    for (name, why) in [
        ("admin\u{202e}", "format"),
        ("ad\u{200b}min", "format"),
        ("\u{feff}admin", "format"),
        ("\u{2066}x\u{2069}", "format"),
        ("ad\u{3164}min", "drawn as nothing"),
        ("admin\u{2028}x", "line separators"),
        ("admin\u{fe0f}", "drawn as nothing"),
        (" admin", "whitespace"),
        ("admin ", "whitespace"),
        ("admin\u{a0}", "whitespace"),
        ("by-hash", "path"),
    ] {
        let reply = create(name).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{name:?}: {}",
            reply.text
        );
        assert!(
            reply.json()["message"].as_str().unwrap().contains(why),
            "{name:?}: {}",
            reply.text
        );
    }
    // Names are stored in NFC: "é" typed decomposed is the same name as precomposed.
    let decomposed = "caf\u{65}\u{301}";
    let precomposed = "caf\u{e9}";
    let reply = create(decomposed).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.json()["name"], precomposed);
    let reply = create(precomposed).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text);
    assert!(reply.json()["message"]
        .as_str()
        .unwrap()
        .contains("already exists"));
    // Deleting by either spelling finds it.
    assert_eq!(
        app.as_admin().delete(&delete_path(decomposed)).await.status,
        StatusCode::OK
    );
    assert_eq!(
        app.as_admin()
            .delete(&delete_path(precomposed))
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    // Names that are route words elsewhere still work end to end.
    for name in ["create", "list", "onboarding", "verify", "roll", "delete"] {
        app.create_key(name, "GENERIC").await;
        let reply = app.as_admin().delete(&delete_path(name)).await;
        assert_eq!(reply.status, StatusCode::OK, "{name}: {}", reply.text);
    }
}

async fn bad_requests_are_400_json(backend: Backend) {
    use axum::body::Body;
    use axum::http::Method;
    let app = TestApp::on(backend).build().await;
    app.create_key("taken", "GENERIC").await;
    let long = "x".repeat(129);
    let cases: Vec<(&str, String)> = vec![
        ("duplicate", json!({"name": "taken"}).to_string()),
        ("missing name", json!({"keyFor": "GENERIC"}).to_string()),
        ("null name", json!({"name": null}).to_string()),
        ("empty name", json!({"name": ""}).to_string()),
        ("blank name", json!({"name": "   "}).to_string()),
        ("control char", json!({"name": "a\u{0007}b"}).to_string()),
        ("long name", json!({"name": long}).to_string()),
        // URLs normalize these path segments away: such a key could never be deleted.
        ("dot name", json!({"name": "."}).to_string()),
        ("dot-dot name", json!({"name": ".."}).to_string()),
        (
            "invalid type",
            json!({"name": "n", "keyFor": "ADMIN"}).to_string(),
        ),
        (
            "lower-case type",
            json!({"name": "n", "keyFor": "generic"}).to_string(),
        ),
        (
            "type not a string",
            json!({"name": "n", "keyFor": 3}).to_string(),
        ),
        ("name not a string", json!({"name": 3}).to_string()),
        ("malformed JSON", "{\"name\": ".to_owned()),
        ("not an object", "[1,2]".to_owned()),
        ("empty body", String::new()),
    ];
    let admin = app.as_admin();
    let raw_create = |body: String| {
        admin
            .request(Method::POST, "/api/v1/keys/create")
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap()
    };
    for (what, body) in cases {
        let reply = admin.send_request(raw_create(body)).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{what}");
        let body = reply.json();
        assert_eq!(body["error"], "bad_request", "{what}: {body}");
        assert!(!body["message"].as_str().unwrap().is_empty());
    }
    // 128 characters (not bytes) is fine.
    let ok = "é".repeat(128);
    let reply = admin
        .post("/api/v1/keys/create", json!({ "name": ok }))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    // Oversized bodies are refused with 413 before parsing.
    let huge = json!({"name": "x".repeat(64 * 1024)}).to_string();
    let reply = admin.send_request(raw_create(huge)).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply.json()["error"], "payload_too_large");
    // Nothing was stored by the bad requests: the three first keys, taken, and é….
    assert_eq!(app.list().await.len(), 5);
    // Unknown routes are JSON 404s.
    let reply = admin.get("/api/v1/nope").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.json()["error"], "not_found");
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ`, as JavaScript's `toISOString` (Metlo's format).
fn is_iso8601_millis(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 24
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'.',
            23 => *c == b'Z',
            _ => c.is_ascii_digit(),
        })
}

async fn create_list_onboarding_delete(backend: Backend) {
    let cp = TestApp::on(backend).build().await;

    let (status, created) = cp
        .create(json!({"name": "ingestor", "keyFor": "GENERIC"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let obj = created.as_object().unwrap();
    let mut fields: Vec<_> = obj.keys().map(String::as_str).collect();
    fields.sort();
    assert_eq!(
        fields,
        [
            "apiKey",
            "created",
            "enabled",
            "expiresAt",
            "for",
            "identifier",
            "lastUsed",
            "meta",
            "name",
            "permissions",
            "rateLimit",
            "role"
        ]
    );
    assert_eq!(created["role"], "client", "Metlo's body makes a client key");
    let key = ApiKey::parse(created["apiKey"].as_str().unwrap()).expect("a well-formed key");
    assert_eq!(created["identifier"], key.identifier());
    assert_eq!(created["name"], "ingestor");
    assert_eq!(created["for"], "GENERIC");
    assert!(
        is_iso8601_millis(created["created"].as_str().unwrap()),
        "{created}"
    );

    // keyFor defaults to GENERIC; every type is accepted.
    let (status, d) = cp.create(json!({"name": "default-type"})).await;
    assert_eq!(
        (status, d["for"].as_str()),
        (StatusCode::OK, Some("GENERIC"))
    );
    for t in ["GCP", "AWS"] {
        let (status, body) = cp
            .create(json!({"name": format!("k-{t}"), "keyFor": t}))
            .await;
        assert_eq!((status, body["for"].as_str()), (StatusCode::OK, Some(t)));
    }
    let mut onboarding_names = vec![];
    for i in 0..3 {
        let name = format!("onboard-{i}");
        cp.create_key(&name, "ONBOARDING").await;
        onboarding_names.push(name);
        cp.advance(Duration::from_millis(5)); // distinct creation times
    }

    let (status, _, text) = cp.get("/api/v1/keys/list", Some(&cp.admin_key)).await;
    assert_eq!(status, StatusCode::OK);
    let list: Vec<Value> = serde_json::from_str(&text).unwrap();
    assert_eq!(list.len(), 10, "the harness's 3 keys and 7: {text}");
    for entry in &list {
        let mut f: Vec<_> = entry
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        f.sort();
        assert_eq!(
            f,
            [
                "created",
                "enabled",
                "expiresAt",
                "for",
                "identifier",
                "lastUsed",
                "meta",
                "name",
                "permissions",
                "rateLimit",
                "role"
            ],
            "list never shows the key"
        );
    }
    assert!(!text.contains(key.expose_secret()));
    let ingestor = list.iter().find(|e| e["name"] == "ingestor").unwrap();
    assert_eq!(ingestor["identifier"], created["identifier"]);
    assert_eq!(ingestor["created"], created["created"]);

    let (status, _, text) = cp.get("/api/v1/keys/onboarding", Some(&cp.admin_key)).await;
    assert_eq!(status, StatusCode::OK);
    let onboarding: Vec<Value> = serde_json::from_str(&text).unwrap();
    let names: Vec<&str> = onboarding
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    onboarding_names.reverse();
    assert_eq!(names, onboarding_names, "ONBOARDING only, newest first");
    assert!(onboarding.iter().all(|e| e["for"] == "ONBOARDING"));

    let (status, deleted) = cp.delete("ingestor", Some(&cp.admin_key)).await;
    assert_eq!(
        (status, &deleted["status"]),
        (StatusCode::OK, &json!("OK")),
        "{deleted}"
    );
    assert!(
        deleted["refusedEverywhereBy"].is_string(),
        "Metlo's answer, and the edge's promise"
    );
    let (status, body) = cp.delete("ingestor", Some(&cp.admin_key)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"], "not_found");
    let (_, _, text) = cp.get("/api/v1/keys/list", Some(&cp.admin_key)).await;
    assert!(!text.contains("\"ingestor\""));
    // The name is free again.
    cp.create_key("ingestor", "GENERIC").await;
}

async fn names_with_spaces_slashes_and_unicode(backend: Backend) {
    let cp = TestApp::on(backend).build().await;
    let names = [
        "with space",
        "a/b/c",
        "ünïcödé ✓ 键",
        "50%?#&=+",
        "...",
        "trailing-dot.",
        "./x",
    ];
    for name in names {
        let key = cp.create_key(name, "GENERIC").await;
        assert_eq!(cp.verify(&key).await, StatusCode::OK);
    }
    let (_, _, text) = cp.get("/api/v1/keys/list", Some(&cp.admin_key)).await;
    let list: Vec<Value> = serde_json::from_str(&text).unwrap();
    let path_of = |name: &str| format!("/api/v1/keys/{}", encode_segment(name));
    for name in names {
        assert!(list.iter().any(|e| e["name"] == name), "{name} listed");
        // One key by name: its listed metadata, exactly.
        let (status, _, one) = cp.get(&path_of(name), Some(&cp.admin_key)).await;
        assert_eq!(status, StatusCode::OK, "GET {name:?}: {one}");
        let one: Value = serde_json::from_str(&one).unwrap();
        assert_eq!(&one, list.iter().find(|e| e["name"] == name).unwrap());
        assert!(one.get("apiKey").is_none(), "never the key");
        assert_eq!(
            cp.delete(name, Some(&cp.admin_key)).await.0,
            StatusCode::OK,
            "delete {name:?}"
        );
    }
    let (_, _, text) = cp.get("/api/v1/keys/list", Some(&cp.admin_key)).await;
    assert_eq!(
        serde_json::from_str::<Vec<Value>>(&text).unwrap().len(),
        3,
        "only the harness's keys left: {text}"
    );
    let (status, _, gone) = cp.get(&path_of("with space"), Some(&cp.admin_key)).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "deleted: {gone}");
    // A key named like the create route is read there (GET of `create` is its).
    cp.create_key("create", "GENERIC").await;
    let (status, _, named) = cp.get("/api/v1/keys/create", Some(&cp.admin_key)).await;
    assert_eq!(status, StatusCode::OK, "{named}");
    assert_eq!(
        serde_json::from_str::<Value>(&named).unwrap()["name"],
        "create"
    );
}

async fn concurrent_creates_with_one_name(backend: Backend) {
    let cp = TestApp::on(backend).env("MAX_API_KEYS", 1000).build().await;
    let results =
        futures_util::future::join_all((0..200).map(|_| cp.create(json!({"name": "same"})))).await;
    let ok = results.iter().filter(|(s, _)| *s == StatusCode::OK).count();
    let dup = results
        .iter()
        .filter(|(s, b)| {
            *s == StatusCode::BAD_REQUEST
                && b["message"].as_str().unwrap().contains("already exists")
        })
        .count();
    assert_eq!(
        (ok, dup),
        (1, 199),
        "{:?}",
        results.iter().map(|r| r.0).collect::<Vec<_>>()
    );
}

async fn concurrent_creates_at_the_limit(backend: Backend) {
    const MAX: usize = 20;
    let cp = TestApp::on(backend).env("MAX_API_KEYS", MAX).build().await;
    for i in 0..MAX - 4 {
        cp.create_key(&format!("pre-{i}"), "GENERIC").await;
    }
    // The harness's 3 + 16 = MAX − 1 keys stored.
    let results = futures_util::future::join_all(
        (0..200).map(|i| cp.create(json!({"name": format!("race-{i}")}))),
    )
    .await;
    let ok = results.iter().filter(|(s, _)| *s == StatusCode::OK).count();
    let limited = results
        .iter()
        .filter(|(s, b)| *s == StatusCode::BAD_REQUEST && b["error"] == "limit_reached")
        .count();
    assert_eq!((ok, limited), (1, 199));
    let (_, _, text) = cp.get("/api/v1/keys/list", Some(&cp.admin_key)).await;
    assert_eq!(
        serde_json::from_str::<Vec<Value>>(&text).unwrap().len(),
        MAX
    );
}

async fn limit_reached_has_metlo_message(backend: Backend) {
    // The three keys every test app has (admin, edge, client) and two more.
    let app = TestApp::on(backend).env("MAX_API_KEYS", 5).build().await;
    app.create_key("two", "GENERIC").await;
    app.create_key("three", "GENERIC").await;
    let (status, body) = app.create(json!({"name": "four"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "limit_reached");
    assert_eq!(
        body["message"],
        "Maximum API Key Limit Reached: 5. Consider deleting any that are not in use."
    );
    // Deleting frees a slot.
    let admin = app.admin_key.clone();
    assert_eq!(app.delete("two", Some(&admin)).await.0, StatusCode::OK);
    app.create_key("four", "GENERIC").await;
    assert_eq!(
        app.create(json!({"name": "five"})).await.0,
        StatusCode::BAD_REQUEST
    );
}

/// With the in-process cache (`deleted_key_is_refused_at_once_with_redis` in
/// `tests/tests/control_plane.rs` has Redis).
async fn deleted_key_is_refused_at_once(backend: Backend) {
    let app = TestApp::on(backend).build().await;
    let admin = app.admin_key.clone();
    for round in 0..5 {
        let name = format!("short-lived-{round}");
        let key = app.create_key(&name, "GENERIC").await;
        // Warm the cache: the key is now cached as valid.
        for _ in 0..3 {
            assert_eq!(app.verify(&key).await, StatusCode::OK);
        }
        assert_eq!(app.delete(&name, Some(&admin)).await.0, StatusCode::OK);
        assert_eq!(
            app.verify(&key).await,
            StatusCode::UNAUTHORIZED,
            "deleted key refused immediately"
        );
        let hash = ApiKey::parse(&key).unwrap().hash().to_hex();
        let reply = app
            .as_edge()
            .get(&format!("/api/v1/keys/by-hash/{hash}"))
            .await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND);
    }
    // A deleted caller cannot act either.
    let (_, made) = app
        .create(json!({"name": "self-deleting", "role": "admin"}))
        .await;
    let key = made["apiKey"].as_str().unwrap().to_owned();
    assert_eq!(
        app.delete("self-deleting", Some(&key)).await.0,
        StatusCode::OK
    );
    assert_eq!(
        app.with_key(&key).get("/api/v1/keys/list").await.status,
        StatusCode::UNAUTHORIZED
    );
}
