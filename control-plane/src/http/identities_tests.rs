//! Identities, in process on both backends: made, read, listed a page at a time, changed
//! and deleted (409 while keys belong to one — one joining meanwhile included —, unless
//! cascading); keys join and leave one;
//! the keys' edge records carry the identity's externalId, credits and named limits and
//! follow its changes; concurrent top-ups all count; everything audited.

use axum::http::StatusCode;
use metlo_shared::credits::Grant;
use serde_json::{json, Value};

use crate::db::Backend;
use crate::test_util::{on_both_backends, TestApp};

on_both_backends!(
    identities_are_made_read_listed_and_validated,
    keys_carry_their_identity_to_the_edge,
    deleting_an_identity_refuses_while_keys_belong_to_it,
    identity_top_ups_add_once_each,
);

/// A key joining an identity (its row locked, the key's `identity_id` set, not yet
/// committed) while the identity is deleted: the delete waits for the join and refuses
/// with 409 — never a foreign-key error (500). PostgreSQL only: SQLite runs one writer
/// at a time.
#[tokio::test]
async fn a_delete_waits_for_a_key_joining_and_refuses() {
    use sqlx::{Connection, PgConnection};

    let cp = start(Backend::Postgres).await;
    let admin = cp.as_admin();
    let reply = admin
        .post("/api/v1/identities", json!({"externalId": "racy"}))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    cp.create_key("joiner", "GENERIC").await;
    let url = cp.database_url.clone().unwrap();
    let mut joining = PgConnection::connect(&url).await.unwrap();
    let mut watcher = PgConnection::connect(&url).await.unwrap();
    let mut join = joining.begin().await.unwrap();
    // What a key's join does in its transaction (`db::identities::lock_identity_part`).
    sqlx::query("UPDATE identities SET external_id = external_id WHERE external_id = 'racy'")
        .execute(&mut *join)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE api_keys SET identity_id = (SELECT id FROM identities WHERE external_id = 'racy') \
         WHERE name = 'joiner'",
    )
    .execute(&mut *join)
    .await
    .unwrap();
    let commit_once_the_delete_waits = async {
        loop {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&mut watcher)
            .await
            .unwrap();
            if waiting > 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        join.commit().await.unwrap();
    };
    let (deleted, ()) = tokio::join!(
        admin.delete("/api/v1/identities/racy"),
        commit_once_the_delete_waits
    );
    assert_eq!(deleted.status, StatusCode::CONFLICT, "{}", deleted.text);
    let reply = admin.get("/api/v1/identities/racy/keys").await;
    assert_eq!(reply.json()["keys"][0]["name"], json!("joiner"));
}

async fn start(backend: Backend) -> TestApp {
    TestApp::on(backend).build().await
}

async fn identities_are_made_read_listed_and_validated(backend: Backend) {
    let cp = start(backend).await;
    let admin = cp.as_admin();
    let reply = admin
        .post(
            "/api/v1/identities",
            json!({"externalId": "acme", "meta": {"plan": "pro"}, "credits": {"remaining": 100},
                   "rateLimits": [{"name": "rps", "requests": 5, "periodSeconds": 1}]}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let made = reply.json();
    assert_eq!(made["externalId"], "acme");
    assert_eq!(made["meta"], json!({"plan": "pro"}));
    assert_eq!(made["credits"]["granted"], 100);
    assert_eq!(
        made["rateLimits"],
        json!([{"name": "rps", "requests": 5, "periodSeconds": 1}])
    );
    assert_eq!(admin.get("/api/v1/identities/acme").await.json(), made);

    admin
        .post("/api/v1/identities", json!({"externalId": "acme"}))
        .await
        .assert_error(StatusCode::CONFLICT, "conflict", "a taken externalId");
    for (bad, why) in [
        (json!({}), "no externalId"),
        (json!({"externalId": ""}), "empty"),
        (json!({"externalId": " a"}), "a leading space"),
        (json!({"externalId": "a\nb"}), "a control character"),
        (json!({"externalId": "x".repeat(256)}), "too long"),
        (
            json!({"externalId": "b", "meta": [1]}),
            "meta not an object",
        ),
        (
            json!({"externalId": "b", "rateLimits": [{"name": "A", "requests": 1, "periodSeconds": 1}]}),
            "a bad limit name",
        ),
        (
            json!({"externalId": "b", "rateLimits": [{"name": "a", "requests": 0, "periodSeconds": 1}]}),
            "a zero limit",
        ),
        (
            json!({"externalId": "b", "rateLimits": [{"name": "a", "requests": 1, "periodSeconds": 1}, {"name": "a", "requests": 2, "periodSeconds": 1}]}),
            "a name twice",
        ),
        (
            json!({"externalId": "b", "credits": {"remaining": -1}}),
            "negative credits",
        ),
        (json!({"externalId": "b", "extra": 1}), "an unknown field"),
    ] {
        let reply = admin.post("/api/v1/identities", bad).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{why}: {}",
            reply.text
        );
    }
    assert_eq!(
        admin.get("/api/v1/identities/b").await.status,
        StatusCode::NOT_FOUND
    );

    for i in 0..4 {
        let reply = admin
            .post("/api/v1/identities", json!({"externalId": format!("c{i}")}))
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    }
    let mut seen = vec![];
    let mut path = "/api/v1/identities?limit=2".to_owned();
    loop {
        let page = admin.get(&path).await.json();
        for i in page["identities"].as_array().unwrap() {
            seen.push(i["externalId"].as_str().unwrap().to_owned());
        }
        match page["nextCursor"].as_str() {
            Some(c) => path = format!("/api/v1/identities?limit=2&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(seen, ["acme", "c0", "c1", "c2", "c3"]);
    assert_eq!(
        admin.get("/api/v1/identities?limit=0").await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        admin.get("/api/v1/identities?cursor=zz").await.status,
        StatusCode::BAD_REQUEST
    );

    let reply = admin
        .patch(
            "/api/v1/identities/acme",
            json!({"meta": null, "rateLimits": null}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.json()["meta"], Value::Null);
    assert_eq!(reply.json()["rateLimits"], json!([]));
    assert_eq!(
        admin
            .patch("/api/v1/identities/acme", json!({}))
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        admin
            .patch("/api/v1/identities/none", json!({"meta": null}))
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        cp.as_client().get("/api/v1/identities").await.status,
        StatusCode::FORBIDDEN,
        "admins only"
    );

    let page = admin.get("/api/v1/audit?limit=1000").await.json();
    let actions: Vec<&str> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["target"] == "acme")
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(
        actions.contains(&"identity.create") && actions.contains(&"identity.update"),
        "{actions:?}"
    );
}

async fn keys_carry_their_identity_to_the_edge(backend: Backend) {
    let cp = start(backend).await;
    let admin = cp.as_admin();
    admin
        .post(
            "/api/v1/identities",
            json!({"externalId": "acme", "credits": {"remaining": 100},
               "rateLimits": [{"name": "rps", "requests": 5, "periodSeconds": 1}]}),
        )
        .await;
    let (status, body) = cp.create(json!({"name": "a1", "identity": "acme"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["identity"], "acme");
    let key = body["apiKey"].as_str().unwrap().to_owned();
    let (status, body) = cp.create(json!({"name": "x", "identity": "nobody"})).await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "an unknown identity: {body}"
    );
    let (status, body) = cp
        .create(json!({"name": "x", "identity": "acme", "role": "admin"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "an admin key: {body}");

    let r = cp.edge_record(&key).await;
    assert_eq!(
        (r["v"].as_u64(), r["identity"].as_str()),
        (Some(4), Some("acme"))
    );
    assert_eq!(r["identityLimits"], "rps=5/1");
    let grant = Grant::decode(r["identityCredits"].as_str().unwrap()).unwrap();
    assert_eq!(grant.to, 100);

    // A roll with an overlap: the old secret still belongs to the identity (its record
    // read once here, so cached).
    let (status, rolled) = cp.roll("a1", Some(json!({"overlapSeconds": 600}))).await;
    assert_eq!(status, StatusCode::OK, "{rolled}");
    let new_key = rolled["apiKey"].as_str().unwrap().to_owned();
    assert_eq!(cp.edge_record(&key).await["identityLimits"], "rps=5/1");

    // An identity's change reaches its keys' records: every secret's.
    admin
        .patch(
            "/api/v1/identities/acme",
            json!({"rateLimits": [{"name": "rpm", "requests": 60, "periodSeconds": 60}]}),
        )
        .await;
    admin
        .post("/api/v1/identities/acme/credits", json!({"add": 5}))
        .await;
    for secret in [&new_key, &key] {
        let r = cp.edge_record(secret).await;
        assert_eq!(r["identityLimits"], "rpm=60/60");
        assert_eq!(
            Grant::decode(r["identityCredits"].as_str().unwrap())
                .unwrap()
                .added,
            5
        );
    }

    let keys = admin.get("/api/v1/identities/acme/keys").await.json();
    assert_eq!(keys["keys"].as_array().unwrap().len(), 1);
    cp.create_key("plain", "GENERIC").await;
    let (status, body) = cp.patch("plain", json!({"identity": "acme"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["identity"], "acme");
    let (status, body) = cp.patch("a1", json!({"identity": null})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.get("identity").is_none(), "{body}");
    let r = cp.edge_record(&key).await;
    assert!(
        r.get("identity").is_none() && r.get("identityLimits").is_none(),
        "{r}"
    );
    let keys = admin.get("/api/v1/identities/acme/keys").await.json();
    assert_eq!(keys["keys"][0]["name"], "plain");
    let (status, _) = cp.patch("plain", json!({"identity": "nobody"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

async fn deleting_an_identity_refuses_while_keys_belong_to_it(backend: Backend) {
    let cp = start(backend).await;
    let admin = cp.as_admin();
    admin
        .post("/api/v1/identities", json!({"externalId": "acme"}))
        .await;
    cp.create(json!({"name": "a1", "identity": "acme"})).await;
    cp.create(json!({"name": "a2", "identity": "acme"})).await;
    admin.delete("/api/v1/identities/acme").await.assert_error(
        StatusCode::CONFLICT,
        "conflict",
        "keys belong to it",
    );
    assert_eq!(
        admin
            .delete("/api/v1/identities/acme?cascade=maybe")
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    let reply = admin.delete("/api/v1/identities/acme?cascade=true").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert!(
        cp.list()
            .await
            .iter()
            .all(|k| k["name"] != "a1" && k["name"] != "a2"),
        "its keys are gone"
    );
    assert_eq!(
        admin.get("/api/v1/identities/acme").await.status,
        StatusCode::NOT_FOUND
    );
    admin
        .post("/api/v1/identities", json!({"externalId": "empty"}))
        .await;
    assert_eq!(
        admin.delete("/api/v1/identities/empty").await.status,
        StatusCode::OK
    );
    assert_eq!(
        admin.delete("/api/v1/identities/empty").await.status,
        StatusCode::NOT_FOUND
    );
}

async fn identity_top_ups_add_once_each(backend: Backend) {
    let cp = start(backend).await;
    let admin = cp.as_admin();
    admin
        .post(
            "/api/v1/identities",
            json!({"externalId": "acme", "credits": {"remaining": 10}}),
        )
        .await;
    admin
        .post("/api/v1/identities", json!({"externalId": "bare"}))
        .await;
    admin
        .post("/api/v1/identities/bare/credits", json!({"add": 1}))
        .await
        .assert_error(StatusCode::CONFLICT, "conflict", "no credits to add to");
    let replies = futures_util::future::join_all(
        (0..20).map(|_| admin.post("/api/v1/identities/acme/credits", json!({"add": 3}))),
    )
    .await;
    assert!(replies.iter().all(|r| r.status == StatusCode::OK));
    let info = admin.get("/api/v1/identities/acme").await.json();
    assert_eq!(
        info["credits"],
        json!({"granted": 70, "added": 60, "refill": null})
    );
}
