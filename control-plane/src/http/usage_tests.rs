//! Edge usage reports, in process on both backends (moved from `tests/tests/abuse.rs`):
//! only hashes of existing keys are taken, and flushes never fail a create beside them;
//! and `lastUsed` (moved from `tests/tests/lifecycle.rs`): many uses between two flushes
//! are one write, the latest use wins and never moves back, the future is now; uses older
//! than 48 hours are not counted (each hour a key is counted in is a row).

use axum::http::StatusCode;
use metlo_shared::ApiKey;
use serde_json::{json, Map, Value};

use crate::db::Backend;
use crate::test_util::{on_both_backends, TestApp};

on_both_backends!(
    usage_reports_take_only_existing_keys,
    last_used_is_coalesced,
    uses_older_than_two_days_are_not_counted,
    refusals_are_counted_by_outcome_per_key_and_identity
);

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
    assert_eq!(
        reply.json(),
        json!({"accepted": 1, "unknown": 999, "stale": 0})
    );
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
        let (reply, _) = tokio::join!(create, app.flush());
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "a create beside a flush: {}",
            reply.text
        );
    }
    assert!(app.listed("k299").await["lastUsed"].is_string());
}

/// The largest report an edge sends — 1,000 keys, each admitted and refused for every
/// reason at the largest counts — is taken, not refused as too large (a refused report is
/// one the edge could never deliver). One backend: the limit is the route's.
#[tokio::test]
async fn a_full_report_is_within_the_size_limit() {
    let app = TestApp::new().await;
    let now = crate::clock::now_ms();
    let cap = crate::service::usage::MAX_REPORTED_COUNT;
    let hashes: Vec<String> = (0..crate::service::usage::MAX_REPORT_ENTRIES)
        .map(|_| ApiKey::generate().unwrap().hash().to_hex())
        .collect();
    let map = |value: Value| -> Map<String, Value> {
        hashes.iter().map(|h| (h.clone(), value.clone())).collect()
    };
    let report = json!({
        "used": map(json!(now)),
        "counts": map(json!(cap)),
        "refused": map(json!({"at": now, "rateLimited": cap, "creditsExhausted": cap,
                              "forbidden": cap, "disabled": cap, "expired": cap})),
    });
    let size = report.to_string().len();
    assert!(
        size > 128 * 1024,
        "the old limit was too small: {size} bytes"
    );
    let reply = app.as_edge().post("/api/v1/usage", report).await;
    assert_eq!(reply.status, StatusCode::OK, "{size} bytes: {}", reply.text);
}

fn ms_of(iso: &Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(iso.as_str().expect("a date-time string"))
        .unwrap()
        .timestamp_millis()
}

async fn last_used_is_coalesced(backend: Backend) {
    let app = TestApp::on(backend).build().await;
    let now_ms = crate::clock::now_ms;
    let a = app.create_key("a", "GENERIC").await;
    let b = app.create_key("b", "GENERIC").await;
    assert_eq!(app.listed("a").await["lastUsed"], Value::Null, "never used");
    app.flush().await;

    let started = now_ms();
    for _ in 0..300 {
        assert_eq!(
            app.with_key(&a).get("/api/v1/verify").await.status,
            StatusCode::OK
        );
    }
    let finished = now_ms();
    let flushed = app.flush().await;
    assert_eq!(
        flushed.usage_rows, 1,
        "300 verifications of one key: one write"
    );
    let used = ms_of(&app.listed("a").await["lastUsed"]);
    assert!(
        used >= started - 5 && used <= finished + 5,
        "{used} in [{started}, {finished}]"
    );
    assert_eq!(app.listed("b").await["lastUsed"], Value::Null);

    // Reported by the edge (what the Worker sends): latest wins, the future is now.
    let hash_b = ApiKey::parse(&b).unwrap().hash().to_hex();
    let hash_a = ApiKey::parse(&a).unwrap().hash().to_hex();
    let unknown = ApiKey::generate().unwrap().hash().to_hex();
    let earlier = now_ms() - 60_000;
    let reply = app
        .as_edge()
        .post(
            "/api/v1/usage",
            json!({"used": {hash_b.clone(): earlier, hash_a.clone(): earlier, unknown: earlier}}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(
        reply.json(),
        json!({"accepted": 2, "unknown": 1, "stale": 0}),
        "only existing keys are taken"
    );
    app.flush().await;
    assert_eq!(ms_of(&app.listed("b").await["lastUsed"]), earlier);
    assert_eq!(
        ms_of(&app.listed("a").await["lastUsed"]),
        used,
        "never moves back"
    );
    let far_future = now_ms() + 86_400_000;
    let reply = app
        .as_edge()
        .post(
            "/api/v1/usage",
            json!({"used": {hash_b.clone(): far_future}}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    app.flush().await;
    assert!(ms_of(&app.listed("b").await["lastUsed"]) <= now_ms());

    let many: Map<String, Value> = (0..1001)
        .map(|_| (ApiKey::generate().unwrap().hash().to_hex(), json!(1)))
        .collect();
    for bad in [
        json!({"used": {"nothex": 1}}),
        json!({"used": {hash_b.clone(): -1}}),
        json!({"used": {hash_b.to_uppercase(): 1}}),
        json!({"used": []}),
        json!({}),
        json!({"used": {}, "extra": 1}),
        json!({ "used": many }),
    ] {
        let reply = app.as_edge().post("/api/v1/usage", bad).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text);
        assert_eq!(reply.json()["error"], "bad_request");
    }
}

/// An edge key cannot make the control plane count a key in any past hour: uses older
/// than 48 hours are left out (and said to be), newer ones are counted.
async fn uses_older_than_two_days_are_not_counted(backend: Backend) {
    let app = TestApp::on(backend).build().await;
    let key = app.create_key("k", "GENERIC").await;
    let hash = ApiKey::parse(&key).unwrap().hash().to_hex();
    let hour = 3_600_000;
    let now = crate::clock::now_ms();
    for (at, stale) in [(now - 49 * hour, 1), (now - 47 * hour, 0)] {
        let reply = app
            .as_edge()
            .post(
                "/api/v1/usage",
                json!({"used": {&hash: at}, "counts": {&hash: 5}}),
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        assert_eq!(reply.json()["stale"], stale, "{}", reply.text);
        assert_eq!(reply.json()["accepted"], 1 - stale, "{}", reply.text);
    }
    app.flush().await;
    let from = crate::clock::iso8601(now - 72 * hour);
    let reply = app
        .as_admin()
        .get(&format!("/api/v1/keys/k/usage?from={from}"))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(
        reply.json()["total"],
        5,
        "only the use within 48 hours: {}",
        reply.text
    );
}

/// Refusals the edge reports are counted per hour and outcome, for the key and for its
/// identity (summed over its keys); they are not uses (`lastUsed` stays); a refusal of a
/// made-up hash is not taken; a bad report changes nothing.
async fn refusals_are_counted_by_outcome_per_key_and_identity(backend: Backend) {
    let app = TestApp::on(backend).build().await;
    let admin = app.as_admin();
    admin
        .post("/api/v1/identities", json!({"externalId": "acme"}))
        .await;
    let mut hashes = vec![];
    for name in ["a1", "a2"] {
        let (status, body) = app.create(json!({"name": name, "identity": "acme"})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        hashes.push(
            ApiKey::parse(body["apiKey"].as_str().unwrap())
                .unwrap()
                .hash()
                .to_hex(),
        );
    }
    let now = crate::clock::now_ms();
    let made_up = ApiKey::generate().unwrap().hash().to_hex();
    let reply = app
        .as_edge()
        .post(
            "/api/v1/usage",
            json!({
                "used": {&hashes[0]: now},
                "counts": {&hashes[0]: 4},
                "refused": {
                    &hashes[0]: {"at": now, "rateLimited": 2, "forbidden": 1},
                    &hashes[1]: {"at": now, "creditsExhausted": 3, "expired": 1, "disabled": 5},
                    &made_up: {"at": now, "rateLimited": 9},
                },
            }),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(
        reply.json(),
        json!({"accepted": 3, "unknown": 1, "stale": 0})
    );
    for bad in [
        json!({"used": {}, "refused": {"zz": {"at": now}}}),
        json!({"used": {}, "refused": {&hashes[0]: {"at": -1}}}),
        json!({"used": {}, "refused": {&hashes[0]: {"at": now, "other": 1}}}),
        json!({"used": {}, "refused": {&hashes[0]: {"at": now, "rateLimited": 1_000_000_001}}}),
    ] {
        let reply = app.as_edge().post("/api/v1/usage", bad.clone()).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{bad}: {}",
            reply.text
        );
    }
    app.flush().await;

    let a1 = admin.get("/api/v1/keys/a1/usage").await.json();
    assert_eq!(a1["total"], 4);
    assert_eq!(
        a1["refused"],
        json!({"rateLimited": 2, "creditsExhausted": 0, "forbidden": 1, "disabled": 0, "expired": 0})
    );
    let this_hour = a1["hours"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(this_hour["requests"], 4);
    assert_eq!(this_hour["refused"]["rateLimited"], 2);
    let a2 = admin.get("/api/v1/keys/a2/usage").await.json();
    assert_eq!(a2["total"], 0);
    assert_eq!(a2["refused"]["creditsExhausted"], 3);
    assert!(
        app.listed("a2").await["lastUsed"].is_null(),
        "a refusal is not a use"
    );

    let acme = admin.get("/api/v1/identities/acme/usage").await.json();
    assert_eq!(acme["externalId"], "acme");
    assert_eq!(acme["total"], 4);
    assert_eq!(
        acme["refused"],
        json!({"rateLimited": 2, "creditsExhausted": 3, "forbidden": 1, "disabled": 5, "expired": 1})
    );
    assert_eq!(
        admin.get("/api/v1/identities/none/usage").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        app.as_client()
            .get("/api/v1/identities/acme/usage")
            .await
            .status,
        StatusCode::FORBIDDEN
    );
}
