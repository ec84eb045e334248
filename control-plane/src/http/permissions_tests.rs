//! Key permissions, in process on both backends: validated and normalised at create and
//! PATCH (client keys only), listed, audited before/after, carried in the edge's record
//! (version 3), and checked by `/api/v1/verify?permission=` (403 `insufficient_scope`),
//! whose JSON answer says who the key is.

use axum::http::StatusCode;
use serde_json::{json, Value};

use crate::db::Backend;
use crate::test_util::{on_both_backends, TestApp};

on_both_backends!(
    permissions_are_validated_normalised_and_listed,
    permissions_change_by_patch_and_are_audited,
    the_edge_record_carries_permissions_as_version_3,
    verify_checks_a_permission_expression,
    verify_answers_json_when_asked,
);

async fn start(backend: Backend) -> TestApp {
    TestApp::on(backend).build().await
}

async fn permissions_are_validated_normalised_and_listed(backend: Backend) {
    let cp = start(backend).await;
    let (status, body) = cp
        .create(json!({"name": "orders", "permissions": ["orders:write", "orders:read", "orders:read"]}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["permissions"], json!(["orders:read", "orders:write"]));
    assert_eq!(
        cp.listed("orders").await["permissions"],
        json!(["orders:read", "orders:write"])
    );
    cp.create_key("plain", "GENERIC").await;
    assert_eq!(cp.listed("plain").await["permissions"], json!([]));

    let too_many: Vec<String> = (0..51).map(|i| format!("p{i}")).collect();
    for (bad, why) in [
        (
            json!({"name": "b", "permissions": ["orders read"]}),
            "a space",
        ),
        (
            json!({"name": "b", "permissions": [":x"]}),
            "a leading colon",
        ),
        (
            json!({"name": "b", "permissions": ["x".repeat(65)]}),
            "too long",
        ),
        (json!({"name": "b", "permissions": too_many}), "too many"),
        (
            json!({"name": "b", "permissions": "orders:read"}),
            "not a list",
        ),
        (
            json!({"name": "b", "permissions": ["a"], "role": "admin"}),
            "an admin key",
        ),
        (
            json!({"name": "b", "permissions": ["a"], "role": "edge"}),
            "an edge key",
        ),
    ] {
        let (status, body) = cp.create(bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{why}: {body}");
        assert!(body["message"].is_string(), "{why}: {body}");
    }
    assert!(
        cp.list().await.iter().all(|k| k["name"] != "b"),
        "nothing stored"
    );
}

async fn permissions_change_by_patch_and_are_audited(backend: Backend) {
    let cp = start(backend).await;
    let (status, _) = cp
        .create(json!({"name": "k", "permissions": ["a"], "meta": {"t": 1}}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = cp.patch("k", json!({"permissions": ["c", "b"]})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["permissions"], json!(["b", "c"]));
    assert_eq!(body["meta"], json!({"t": 1}), "the rest untouched");
    let (status, body) = cp.patch("k", json!({"meta": null})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["permissions"], json!(["b", "c"]), "absent: untouched");
    let (status, body) = cp.patch("k", json!({"permissions": null})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["permissions"], json!([]));
    let (status, _) = cp.patch("k", json!({"permissions": ["x y"]})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (_, admin) = cp.create(json!({"name": "boss", "role": "admin"})).await;
    assert!(admin["apiKey"].is_string());
    let (status, body) = cp.patch("boss", json!({"permissions": ["a"]})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("client keys"),
        "{body}"
    );

    let page = cp.as_admin().get("/api/v1/audit?limit=1000").await.json();
    let entries = page["entries"].as_array().unwrap();
    let created = entries
        .iter()
        .find(|e| e["action"] == "key.create" && e["target"] == "k")
        .expect("create audited");
    assert_eq!(created["detail"]["permissions"], json!(["a"]));
    for (before, after) in [
        (json!(["a"]), json!(["b", "c"])),
        (json!(["b", "c"]), json!([])),
    ] {
        assert!(
            entries.iter().any(|e| e["action"] == "key.update"
                && e["detail"]["before"]["permissions"] == before
                && e["detail"]["after"]["permissions"] == after),
            "{before} → {after} audited: {entries:?}"
        );
    }
    let meta_cleared = entries
        .iter()
        .find(|e| e["action"] == "key.update" && e["detail"]["after"].get("meta").is_some())
        .expect("the meta change audited");
    assert!(
        meta_cleared["detail"]["after"].get("permissions").is_none(),
        "an unchanged field is not in the entry: {meta_cleared}"
    );
}

async fn the_edge_record_carries_permissions_as_version_3(backend: Backend) {
    let cp = start(backend).await;
    let (_, body) = cp
        .create(json!({"name": "scoped", "permissions": ["orders:read"]}))
        .await;
    let key = body["apiKey"].as_str().unwrap().to_owned();
    let plain = cp.create_key("plain", "GENERIC").await;
    let scoped = cp.edge_record(&key).await;
    assert_eq!(scoped["v"], 3);
    assert_eq!(scoped["permissions"], json!(["orders:read"]));
    let plain = cp.edge_record(&plain).await;
    assert_eq!(
        plain["v"], 1,
        "only keys with permissions need a Worker that reads them"
    );
    assert!(plain.get("permissions").is_none());
}

async fn verify_checks_a_permission_expression(backend: Backend) {
    let cp = start(backend).await;
    let (_, body) = cp
        .create(json!({"name": "scoped", "permissions": ["orders:read", "billing:read"]}))
        .await;
    let key = body["apiKey"].as_str().unwrap().to_owned();
    for (expression, holds) in [
        ("orders:read", true),
        ("orders:write", false),
        ("orders:read AND billing:read", true),
        ("orders:write OR billing:read", true),
        ("orders:read AND (orders:write OR admin)", false),
    ] {
        let path = format!(
            "/api/v1/verify?permission={}",
            crate::test_util::encode_segment(expression)
        );
        let reply = cp.with_key(&key).get(&path).await;
        if holds {
            assert_eq!(reply.status, StatusCode::OK, "{expression}: {}", reply.text);
            assert_eq!(reply.text, "OK");
        } else {
            reply.assert_error(StatusCode::FORBIDDEN, "forbidden", expression);
            let challenge = reply.header("www-authenticate").unwrap();
            assert!(
                challenge.contains(r#"error="insufficient_scope""#),
                "{challenge}"
            );
            assert!(
                challenge.contains(&format!(r#"scope="{expression}""#)),
                "{challenge}"
            );
        }
    }
    for bad in ["orders:read AND", "(", "a b", "", "é"] {
        let path = format!(
            "/api/v1/verify?permission={}",
            crate::test_util::encode_segment(bad)
        );
        let reply = cp.with_key(&key).get(&path).await;
        reply.assert_error(StatusCode::BAD_REQUEST, "bad_request", bad);
    }
    // A key without permissions satisfies no expression; plain verify still answers OK.
    let plain = cp.create_key("plain", "GENERIC").await;
    let reply = cp.with_key(&plain).get("/api/v1/verify?permission=a").await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(cp.verify(&plain).await, StatusCode::OK);
    // An unknown key is still 401, whatever it asks.
    let reply = cp
        .with_key("metlo.nope")
        .get("/api/v1/verify?permission=a")
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
}

async fn verify_answers_json_when_asked(backend: Backend) {
    let cp = start(backend).await;
    let (_, body) = cp
        .create(json!({"name": "who", "keyFor": "AWS", "permissions": ["p"], "meta": {"tenant": "acme ✓"}}))
        .await;
    let key = body["apiKey"].as_str().unwrap().to_owned();
    let identifier = body["identifier"].clone();
    let reply = cp
        .with_key(&key)
        .header("accept", "text/html, application/json;q=0.9")
        .get("/api/v1/verify?permission=p")
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(
        reply.json(),
        json!({"name": "who", "identifier": identifier, "for": "AWS", "role": "client",
               "permissions": ["p"], "meta": {"tenant": "acme ✓"}})
    );
    // Metlo's ingestors send no Accept: they keep the plain answer.
    let reply = cp.with_key(&key).get("/api/v1/verify").await;
    assert_eq!(reply.text, "OK");
    let plain = cp.create_key("plain", "GENERIC").await;
    let reply = cp
        .with_key(&plain)
        .header("accept", "application/json")
        .get("/api/v1/verify")
        .await;
    assert_eq!(reply.json()["meta"], Value::Null);
    assert_eq!(reply.json()["permissions"], json!([]));
}
