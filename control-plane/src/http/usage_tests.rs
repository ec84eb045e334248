//! Edge usage reports, in process on both backends (moved from `tests/tests/abuse.rs`):
//! only hashes of existing keys are taken, and flushes never fail a create beside them.

use axum::http::StatusCode;
use metlo_shared::ApiKey;
use serde_json::{json, Map, Value};

use crate::db::Backend;
use crate::test_util::{on_both_backends, TestApp};

on_both_backends!(usage_reports_take_only_existing_keys);

/// Edge usage reports are taken only for hashes of existing keys (made-up ones used to
/// fill an unbounded map, each costing an `UPDATE`), and flushes in short batches never
/// fail a create running beside them.
async fn usage_reports_take_only_existing_keys(backend: Backend) {
    let app = TestApp::on(backend).env("MAX_API_KEYS", 1000).build().await;
    let now = crate::clock::now_ms();
    let client_hash = ApiKey::parse(&app.client_key).unwrap().hash().to_hex();
    let mut used: Map<String, Value> = (0..999)
        .map(|_| (ApiKey::generate().unwrap().hash().to_hex(), json!(now)))
        .collect();
    used.insert(client_hash.clone(), json!(now));
    let reply = app
        .as_edge()
        .post("/api/v1/usage", json!({ "used": used }))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.json(), json!({"accepted": 1, "unknown": 999}));
    assert!(
        app.listed("client").await["lastUsed"].is_null(),
        "not before a flush"
    );
    app.flush().await;
    assert!(app.listed("client").await["lastUsed"].is_string(), "taken");

    // Reports of 300 real keys, each flushed while a create runs beside it: none fails.
    let mut hashes = vec![];
    for i in 0..300 {
        let key = app.create_key(&format!("k{i}"), "GENERIC").await;
        hashes.push(ApiKey::parse(&key).unwrap().hash().to_hex());
    }
    let report: Map<String, Value> = hashes.iter().map(|h| (h.clone(), json!(now))).collect();
    let report = json!({ "used": report });
    for i in 0..5 {
        let reply = app.as_edge().post("/api/v1/usage", report.clone()).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        assert_eq!(reply.json()["accepted"], 300);
        let admin = app.as_admin();
        let create = admin.post(
            "/api/v1/keys/create",
            json!({"name": format!("beside-{i}"), "keyFor": "GENERIC"}),
        );
        let (reply, ()) = tokio::join!(create, app.flush());
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "a create beside a flush: {}",
            reply.text
        );
    }
    assert!(app.listed("k299").await["lastUsed"].is_string());
}
