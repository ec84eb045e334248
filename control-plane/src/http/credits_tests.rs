//! Credits on keys, in process on both backends: set at create and by PATCH (client keys
//! only, validated), topped up by `POST /api/v1/keys/{name}/credits` (409 without credits;
//! concurrent top-ups all count, once), audited, and carried in the edge's record as a
//! version-4 grant. What is spent is the edge's (the Durable Object; tests under
//! `wrangler dev` in tests/tests/credits.rs).

use axum::http::StatusCode;
use metlo_shared::credits::Grant;
use serde_json::json;

use crate::db::Backend;
use crate::test_util::{on_both_backends, TestApp};

on_both_backends!(
    credits_are_set_validated_and_listed,
    top_ups_add_once_each_under_concurrency,
    the_edge_record_carries_the_grant_as_version_4,
    verify_on_the_control_plane_neither_spends_nor_checks_credits,
);

/// One pool: credits are spent only at the edge. `/api/v1/verify` admits a metered key
/// with no credits left (what it checks is the key), and changes no grant.
async fn verify_on_the_control_plane_neither_spends_nor_checks_credits(backend: Backend) {
    let cp = start(backend).await;
    let (_, body) = cp
        .create(json!({"name": "empty", "credits": {"remaining": 0}}))
        .await;
    let key = body["apiKey"].as_str().unwrap().to_owned();
    let before = cp.edge_record(&key).await;
    for _ in 0..3 {
        assert_eq!(cp.verify(&key).await, StatusCode::OK);
    }
    assert_eq!(cp.edge_record(&key).await["credits"], before["credits"]);
    assert_eq!(cp.listed("empty").await["credits"]["granted"], 0);
}

async fn start(backend: Backend) -> TestApp {
    TestApp::on(backend).build().await
}

async fn credits_are_set_validated_and_listed(backend: Backend) {
    let cp = start(backend).await;
    let (status, body) = cp
        .create(json!({"name": "metered", "credits": {"remaining": 1000, "refill": {"amount": 1000, "interval": "monthly", "refillDay": 15}}}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["credits"],
        json!({"granted": 1000, "added": 0, "refill": {"amount": 1000, "interval": "monthly", "refillDay": 15}})
    );
    assert_eq!(cp.listed("metered").await["credits"]["granted"], 1000);
    cp.create_key("plain", "GENERIC").await;
    assert!(cp.listed("plain").await.get("credits").is_none());

    for (bad, why) in [
        (
            json!({"name": "b", "credits": {"remaining": -1}}),
            "negative",
        ),
        (
            json!({"name": "b", "credits": {"remaining": 1_000_000_000_001_u64}}),
            "too many",
        ),
        (json!({"name": "b", "credits": {}}), "no remaining"),
        (
            json!({"name": "b", "credits": {"remaining": 1, "extra": 1}}),
            "unknown field",
        ),
        (
            json!({"name": "b", "credits": {"remaining": 1, "refill": {"amount": 0, "interval": "daily"}}}),
            "a refill of 0",
        ),
        (
            json!({"name": "b", "credits": {"remaining": 1, "refill": {"amount": 5, "interval": "weekly"}}}),
            "an unknown interval",
        ),
        (
            json!({"name": "b", "credits": {"remaining": 1, "refill": {"amount": 5, "interval": "seconds"}}}),
            "seconds without periodSeconds",
        ),
        (
            json!({"name": "b", "credits": {"remaining": 1, "refill": {"amount": 5, "interval": "daily", "refillDay": 2}}}),
            "a day for a daily refill",
        ),
        (
            json!({"name": "b", "credits": {"remaining": 1}, "role": "admin"}),
            "an admin key",
        ),
    ] {
        let (status, body) = cp.create(bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{why}: {body}");
    }
    assert!(
        cp.list().await.iter().all(|k| k["name"] != "b"),
        "nothing made"
    );

    // PATCH sets anew (top-ups forgotten) or removes them.
    let reply = cp
        .as_admin()
        .post("/api/v1/keys/metered/credits", json!({"add": 5}))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.json()["credits"]["granted"], 1005);
    let (status, body) = cp
        .patch("metered", json!({"credits": {"remaining": 7}}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["credits"],
        json!({"granted": 7, "added": 0, "refill": null})
    );
    let (status, body) = cp.patch("metered", json!({"credits": null})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.get("credits").is_none(), "{body}");

    let admin = cp.as_admin();
    let reply = admin
        .post("/api/v1/keys/metered/credits", json!({"add": 5}))
        .await;
    reply.assert_error(StatusCode::CONFLICT, "conflict", "a top-up without credits");
    let reply = admin
        .post("/api/v1/keys/nobody/credits", json!({"add": 5}))
        .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", reply.text);
    for bad in [
        json!({"add": 0}),
        json!({"add": -3}),
        json!({}),
        json!({"add": 1, "x": 1}),
    ] {
        let reply = admin.post("/api/v1/keys/plain/credits", bad.clone()).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{bad}: {}",
            reply.text
        );
    }
    let reply = cp
        .as_client()
        .post("/api/v1/keys/plain/credits", json!({"add": 1}))
        .await;
    assert_eq!(
        reply.status,
        StatusCode::FORBIDDEN,
        "admins only: {}",
        reply.text
    );
}

async fn top_ups_add_once_each_under_concurrency(backend: Backend) {
    let cp = start(backend).await;
    let (status, body) = cp
        .create(json!({"name": "m", "credits": {"remaining": 100}}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let admin = cp.as_admin();
    let replies = futures_util::future::join_all(
        (0..20).map(|_| admin.post("/api/v1/keys/m/credits", json!({"add": 7}))),
    )
    .await;
    for r in &replies {
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    }
    assert_eq!(
        cp.listed("m").await["credits"],
        json!({"granted": 240, "added": 140, "refill": null})
    );
    let page = admin.get("/api/v1/audit?limit=1000").await.json();
    let top_ups = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            e["action"] == "key.update" && e["detail"]["after"]["credits"]["added"].is_u64()
        })
        .count();
    assert_eq!(top_ups, 20, "each top-up audited with before and after");
}

async fn the_edge_record_carries_the_grant_as_version_4(backend: Backend) {
    let cp = start(backend).await;
    let (_, body) = cp
        .create(json!({"name": "metered", "credits": {"remaining": 50, "refill": {"amount": 10, "interval": "seconds", "periodSeconds": 60}}}))
        .await;
    let key = body["apiKey"].as_str().unwrap().to_owned();
    let first = cp.edge_record(&key).await;
    assert_eq!(first["v"], 4);
    let grant = Grant::decode(first["credits"].as_str().unwrap()).unwrap();
    assert_eq!((grant.to, grant.added), (50, 0));
    assert_eq!(grant.refill.unwrap().amount, 10);

    cp.as_admin()
        .post("/api/v1/keys/metered/credits", json!({"add": 3}))
        .await;
    let topped = Grant::decode(cp.edge_record(&key).await["credits"].as_str().unwrap()).unwrap();
    assert_eq!(
        (topped.set, topped.added),
        (grant.set, 3),
        "a top-up is not a set"
    );
    cp.patch("metered", json!({"credits": {"remaining": 50}}))
        .await;
    let reset = Grant::decode(cp.edge_record(&key).await["credits"].as_str().unwrap()).unwrap();
    assert!(reset.set > grant.set, "a set gets a new number");
    cp.patch("metered", json!({"credits": null})).await;
    let plain = cp.edge_record(&key).await;
    assert_eq!(plain["v"], 1, "{plain}");
    cp.patch("metered", json!({"credits": {"remaining": 1}}))
        .await;
    let again = Grant::decode(cp.edge_record(&key).await["credits"].as_str().unwrap()).unwrap();
    assert!(
        again.set > reset.set,
        "numbers keep growing across removals"
    );
}
