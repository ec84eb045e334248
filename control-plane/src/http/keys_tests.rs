//! The keys routes' own rules, in process on both backends (moved from
//! `tests/tests/roles.rs` and `control_plane.rs`): the last admin key stays, names that
//! could impersonate another are refused, bad bodies are JSON 400s and long ones 413s.

use axum::http::StatusCode;
use serde_json::json;

use crate::db::Backend;
use crate::test_util::{encode_segment, on_both_backends, TestApp};

on_both_backends!(
    the_last_admin_key_stays,
    names_that_could_impersonate_are_refused,
    bad_requests_are_400_json,
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

#[tokio::test]
async fn a_key_is_refused_from_its_expiry_on_with_the_clock_moved() {
    let app = TestApp::new().await;
    // Whole seconds, as expiries are kept.
    let expires = crate::clock::iso8601((crate::clock::now_ms() / 1000 + 60) * 1000);
    let reply = app
        .as_admin()
        .post(
            "/api/v1/keys/create",
            json!({"name": "short-lived", "expiresAt": expires}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let key = reply.json()["apiKey"].as_str().unwrap().to_owned();
    assert_eq!(
        app.with_key(&key).get("/api/v1/verify").await.status,
        StatusCode::OK
    );
    // Cached as valid now; its expiry still holds once the clock passes it.
    app.advance(std::time::Duration::from_secs(61));
    let reply = app.with_key(&key).get("/api/v1/verify").await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text);
    // Still listed (and counted) until deleted.
    assert_eq!(
        app.listed("short-lived").await["expiresAt"],
        expires.as_str()
    );
}
