//! Expiry and rolls, in process on both backends (moved from `tests/tests/lifecycle.rs`):
//! an expiry's validation and its end to the second, a roll with and without overlap, a
//! second roll capping the first's overlap, racing rolls, a delete racing a roll. The
//! clock is moved ([`TestApp::advance_to`]) instead of waited for.

use axum::http::StatusCode;
use metlo_shared::ApiKey;
use serde_json::{json, Value};

use crate::clock::{iso8601, now_ms};
use crate::db::Backend;
use crate::test_util::{on_both_backends, TestApp};

on_both_backends!(
    expiry,
    roll_with_overlap,
    roll_twice_during_an_overlap,
    concurrent_rolls,
    delete_racing_a_roll,
    rolling_a_disabled_key_keeps_every_secret_refused,
);

/// How far before an end "just before" is: the real clock goes on too, and a request
/// must not cross the end before it is answered.
const JUST_BEFORE_MS: i64 = 500;

/// The first whole second at least `ms_from_now` ahead.
fn whole_second_ahead(ms_from_now: i64) -> i64 {
    (now_ms() + ms_from_now + 999) / 1000 * 1000
}

/// A timestamp as the API writes it, in milliseconds.
fn ms_of(value: &Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(value.as_str().expect("a timestamp"))
        .expect("RFC 3339")
        .timestamp_millis()
}

fn secret(body: &Value) -> String {
    body["apiKey"]
        .as_str()
        .unwrap_or_else(|| panic!("a key in the response: {body}"))
        .to_owned()
}

/// The record the edge gets for `key` from `by-hash`.
async fn edge_record(app: &TestApp, key: &str) -> Value {
    let hash = ApiKey::parse(key).unwrap().hash().to_hex();
    let reply = app
        .as_edge()
        .get(&format!("/api/v1/keys/by-hash/{hash}"))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    reply.json()
}

async fn expiry(backend: Backend) {
    let app = TestApp::on(backend).env("MAX_API_KEYS", 6).build().await;
    for (bad, why) in [
        (json!("2020-01-01T00:00:00Z"), "in the future"),
        (json!(iso8601(now_ms() - 1000)), "in the future"),
        (json!("tomorrow"), "RFC 3339"),
        (json!("2030-01-01"), "RFC 3339"),
        (json!("2030-01-01T00:00:00"), "RFC 3339"),
        (json!(1_900_000_000), "invalid JSON"),
    ] {
        let (status, body) = app.create(json!({"name": "bad", "expiresAt": bad})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert!(
            body["message"].as_str().unwrap().contains(why),
            "{bad}: {body}"
        );
    }
    assert_eq!(app.list().await.len(), 3, "nothing stored by bad requests");

    let (status, forever) = app
        .create(json!({"name": "forever", "expiresAt": null}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(forever["expiresAt"], Value::Null);
    // Fractions of a second are cut: expiries are whole seconds everywhere.
    let (status, cut) = app
        .create(json!({"name": "cut", "expiresAt": "2031-05-06T07:08:09.750+02:00"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{cut}");
    assert_eq!(cut["expiresAt"], "2031-05-06T05:08:09.000Z");

    let end = whole_second_ahead(60_000);
    let (status, short) = app
        .create(json!({"name": "short", "expiresAt": iso8601(end)}))
        .await;
    assert_eq!(status, StatusCode::OK, "{short}");
    assert_eq!(ms_of(&short["expiresAt"]), end);
    assert_eq!(ms_of(&app.listed("short").await["expiresAt"]), end);
    let short_key = secret(&short);
    assert_eq!(
        edge_record(&app, &short_key).await["expires"],
        end / 1000,
        "the edge's record carries it"
    );

    // Cached as valid just before the end; refused from the end on.
    app.advance_to(end - JUST_BEFORE_MS);
    assert_eq!(app.verify(&short_key).await, StatusCode::OK, "just before");
    app.advance_to(end);
    assert_eq!(
        app.verify(&short_key).await,
        StatusCode::UNAUTHORIZED,
        "at the end"
    );

    // Expired keys stay listed and count toward the limit until deleted.
    assert_eq!(app.list().await.len(), 6);
    let (status, body) = app.create(json!({"name": "one more"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "limit_reached");
    let admin = app.admin_key.clone();
    assert_eq!(app.delete("short", Some(&admin)).await.0, StatusCode::OK);
    assert_eq!(
        app.create(json!({"name": "one more"})).await.0,
        StatusCode::OK
    );
}

async fn roll_with_overlap(backend: Backend) {
    let app = TestApp::on(backend).build().await;
    let expires = whole_second_ahead(86_400_000);
    let (_, created) = app
        .create(json!({"name": "svc", "keyFor": "GCP", "expiresAt": iso8601(expires)}))
        .await;
    let key1 = secret(&created);

    // No overlap: the old secret stops at once.
    let (status, rolled) = app.roll("svc", None).await;
    assert_eq!(status, StatusCode::OK, "{rolled}");
    let key2 = secret(&rolled);
    assert_eq!(app.verify(&key1).await, StatusCode::UNAUTHORIZED);
    assert_eq!(app.verify(&key2).await, StatusCode::OK);
    assert_eq!(rolled["name"], "svc");
    assert_eq!(rolled["for"], "GCP");
    assert_eq!(rolled["created"], created["created"]);
    assert_eq!(ms_of(&rolled["expiresAt"]), expires);
    assert_eq!(
        rolled["identifier"],
        ApiKey::parse(&key2).unwrap().identifier()
    );
    assert_eq!(rolled["previousIdentifier"], created["identifier"]);
    assert!(ms_of(&rolled["previousValidUntil"]) <= now_ms());
    assert_eq!(app.listed("svc").await["identifier"], rolled["identifier"]);

    // With an overlap: both work until it ends, to the second; then only the new one.
    let (status, rolled) = app.roll("svc", Some(json!({"overlapSeconds": 2}))).await;
    assert_eq!(status, StatusCode::OK, "{rolled}");
    let key3 = secret(&rolled);
    let end = ms_of(&rolled["previousValidUntil"]);
    assert_eq!(end % 1000, 0, "ends on a whole second");
    assert!(end >= now_ms() + 1500 && end <= now_ms() + 3100, "{rolled}");
    let record = edge_record(&app, &key2).await;
    assert_eq!(record["expires"], end / 1000, "{record}");
    assert_eq!(
        record["identifier"],
        ApiKey::parse(&key2).unwrap().identifier()
    );
    assert_eq!(app.verify(&key3).await, StatusCode::OK);
    app.advance_to(end - JUST_BEFORE_MS);
    assert_eq!(
        app.verify(&key2).await,
        StatusCode::OK,
        "just before the end"
    );
    app.advance_to(end);
    assert_eq!(
        app.verify(&key2).await,
        StatusCode::UNAUTHORIZED,
        "at the end"
    );
    assert_eq!(app.verify(&key3).await, StatusCode::OK);

    // Bad rolls change nothing.
    for bad in [
        json!({"overlapSeconds": -1}),
        json!({"overlapSeconds": 604_801}),
        json!({"overlapSeconds": "5"}),
        json!({"overlapSeconds": 1.5}),
        json!({"overlap": 5}),
        json!([]),
    ] {
        let (status, body) = app.roll("svc", Some(bad.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert_eq!(body["error"], "bad_request");
    }
    assert_eq!(app.verify(&key3).await, StatusCode::OK);
    let (status, body) = app.roll("nope", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    // Deleting a key ends every secret, the ones in an overlap too.
    let (_, rolled) = app.roll("svc", Some(json!({"overlapSeconds": 60}))).await;
    let key4 = secret(&rolled);
    assert_eq!(app.verify(&key3).await, StatusCode::OK);
    let admin = app.admin_key.clone();
    assert_eq!(app.delete("svc", Some(&admin)).await.0, StatusCode::OK);
    assert_eq!(app.verify(&key3).await, StatusCode::UNAUTHORIZED);
    assert_eq!(app.verify(&key4).await, StatusCode::UNAUTHORIZED);
}

/// A second roll caps the secrets still in the first one's overlap: every older secret
/// stops when the newest overlap ends (at once with no overlap — the "it leaked" roll).
async fn roll_twice_during_an_overlap(backend: Backend) {
    let app = TestApp::on(backend).build().await;
    let key1 = app.create_key("k", "GENERIC").await;
    let (_, first) = app.roll("k", Some(json!({"overlapSeconds": 60}))).await;
    let key2 = secret(&first);
    let (_, second) = app.roll("k", Some(json!({"overlapSeconds": 2}))).await;
    let key3 = secret(&second);
    let end = ms_of(&second["previousValidUntil"]);
    assert!(end < ms_of(&first["previousValidUntil"]));
    app.advance_to(end - JUST_BEFORE_MS);
    for k in [&key1, &key2, &key3] {
        assert_eq!(
            app.verify(k).await,
            StatusCode::OK,
            "before the second overlap ends"
        );
    }
    app.advance_to(end);
    assert_eq!(app.verify(&key1).await, StatusCode::UNAUTHORIZED, "capped");
    assert_eq!(app.verify(&key2).await, StatusCode::UNAUTHORIZED);
    assert_eq!(app.verify(&key3).await, StatusCode::OK);

    let (_, third) = app.roll("k", Some(json!({"overlapSeconds": 60}))).await;
    let key4 = secret(&third);
    assert_eq!(app.verify(&key3).await, StatusCode::OK, "in its overlap");
    let (_, fourth) = app.roll("k", None).await;
    let key5 = secret(&fourth);
    assert_eq!(
        app.verify(&key3).await,
        StatusCode::UNAUTHORIZED,
        "ended at once"
    );
    assert_eq!(
        app.verify(&key4).await,
        StatusCode::UNAUTHORIZED,
        "ended at once"
    );
    assert_eq!(app.verify(&key5).await, StatusCode::OK);
}

/// Rolls of one key racing each other run one after the other: each succeeds, every
/// secret they handed out works within its overlap, the key ends with exactly one current
/// secret, and a final roll without overlap ends all the others.
async fn concurrent_rolls(backend: Backend) {
    let app = TestApp::on(backend).build().await;
    let first = app.create_key("busy", "GENERIC").await;
    let rolls = futures_util::future::join_all(
        (0..10).map(|_| app.roll("busy", Some(json!({"overlapSeconds": 60})))),
    )
    .await;
    let mut keys = vec![first];
    for (status, body) in &rolls {
        assert_eq!(*status, StatusCode::OK, "{body}");
        keys.push(secret(body));
    }
    for k in &keys {
        assert_eq!(app.verify(k).await, StatusCode::OK);
    }
    let current = app.listed("busy").await["identifier"].clone();
    let matching = rolls
        .iter()
        .filter(|(_, b)| b["identifier"] == current)
        .count();
    assert_eq!(matching, 1, "one of the rolls' secrets is current");
    let previous: std::collections::HashSet<String> = rolls
        .iter()
        .map(|(_, b)| b["previousIdentifier"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(previous.len(), 10, "each roll replaced a different secret");
    let (_, last) = app.roll("busy", None).await;
    for k in &keys {
        assert_eq!(app.verify(k).await, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(app.verify(&secret(&last)).await, StatusCode::OK);
}

/// A delete racing a roll of the same key: never a 5xx, and once the delete has
/// succeeded every secret — the old one the roll kept in its overlap too — is refused.
async fn delete_racing_a_roll(backend: Backend) {
    let app = TestApp::on(backend).build().await;
    let admin = app.admin_key.clone();
    for round in 0..15 {
        let name = format!("raced-{round}");
        let old = app.create_key(&name, "GENERIC").await;
        assert_eq!(
            app.verify(&old).await,
            StatusCode::OK,
            "cached before the race"
        );
        let ((roll_status, rolled), (delete_status, _)) = tokio::join!(
            app.roll(&name, Some(json!({"overlapSeconds": 60}))),
            app.delete(&name, Some(&admin)),
        );
        assert!(
            matches!(roll_status, StatusCode::OK | StatusCode::NOT_FOUND),
            "{roll_status} {rolled}"
        );
        assert_eq!(delete_status, StatusCode::OK);
        assert_eq!(
            app.verify(&old).await,
            StatusCode::UNAUTHORIZED,
            "round {round}"
        );
        if roll_status == StatusCode::OK {
            assert_eq!(app.verify(&secret(&rolled)).await, StatusCode::UNAUTHORIZED);
        }
    }
}

/// A roll of a disabled key gives the old secret an overlap, but the key is still
/// disabled: neither secret may work (the cache once took the overlap's record as valid).
async fn rolling_a_disabled_key_keeps_every_secret_refused(backend: Backend) {
    let app = TestApp::on(backend).build().await;
    let old = app.create_key("off", "GENERIC").await;
    assert_eq!(app.verify(&old).await, StatusCode::OK);
    let (status, body) = app.patch("off", json!({"enabled": false})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(app.verify(&old).await, StatusCode::UNAUTHORIZED);
    let (status, rolled) = app.roll("off", Some(json!({"overlapSeconds": 60}))).await;
    assert_eq!(status, StatusCode::OK, "{rolled}");
    assert_eq!(
        app.verify(&old).await,
        StatusCode::UNAUTHORIZED,
        "old secret"
    );
    assert_eq!(
        app.verify(&secret(&rolled)).await,
        StatusCode::UNAUTHORIZED,
        "new secret"
    );
    // Enabled again: the new secret works, the old one within its overlap too.
    let (status, body) = app.patch("off", json!({"enabled": true})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(app.verify(&secret(&rolled)).await, StatusCode::OK);
}
