//! The revocation feed's route, in process on both backends: what each change feeds (and
//! what it does not), paging with `after`, the window, who may read it, bad queries; and
//! a reader started afresh finds the same events.

use std::time::Duration;

use axum::http::StatusCode;
use metlo_shared::KeyHash;
use serde_json::{json, Value};

use crate::db::Backend;
use crate::service::feed::RevocationFeed;
use crate::test_util::{on_both_backends, TestApp};

on_both_backends!(
    changes_that_stop_or_change_a_secret_are_fed_in_order,
    the_feed_is_for_the_edge_and_refuses_bad_queries,
    a_feed_that_is_not_current_is_not_served,
    rows_pruned_before_a_reader_saw_them_make_it_start_over,
    revocations_answer_by_when_every_edge_location_refuses,
);

fn hash(key: &str) -> String {
    KeyHash::of_text(key).to_hex()
}

/// (hash, refused?, the record's `expires`) of each event.
fn events(page: &Value) -> Vec<(String, bool, Value)> {
    page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["hash"].as_str().unwrap().to_owned(),
                e["record"].is_null(),
                e["record"]["expires"].clone(),
            )
        })
        .collect()
}

async fn changes_that_stop_or_change_a_secret_are_fed_in_order(backend: Backend) {
    let app = TestApp::on(backend).build().await;
    let keys: Vec<String> = {
        let mut keys = vec![];
        for name in ["deleted", "disabled", "rolled", "rolled-now", "expiring"] {
            keys.push(app.create_key(name, "GENERIC").await);
        }
        keys
    };
    let start = app.feed_page("").await;
    assert!(
        start["events"].as_array().unwrap().is_empty(),
        "creates feed nothing: {start}"
    );
    let s0 = start["seq"].as_i64().unwrap();

    assert_eq!(
        app.delete("deleted", Some(&app.admin_key)).await.0,
        StatusCode::OK
    );
    assert_eq!(
        app.patch("disabled", json!({"enabled": false})).await.0,
        StatusCode::OK
    );
    assert_eq!(
        app.patch("disabled", json!({"enabled": true})).await.0,
        StatusCode::OK
    );
    let (status, rolled) = app
        .roll("rolled", Some(json!({"overlapSeconds": 3600})))
        .await;
    assert_eq!(status, StatusCode::OK, "{rolled}");
    assert_eq!(app.roll("rolled-now", None).await.0, StatusCode::OK);
    let soon = crate::clock::iso8601((crate::clock::now_ms() / 1000 + 600) * 1000);
    assert_eq!(
        app.patch("expiring", json!({"expiresAt": soon})).await.0,
        StatusCode::OK
    );
    // Keys that do not serve traffic never put a hash in the feed.
    let (status, admin) = app
        .create(json!({"name": "an-admin", "role": "admin"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{admin}");
    assert_eq!(
        app.delete("an-admin", Some(&app.admin_key)).await.0,
        StatusCode::OK
    );

    let page = app.feed_page(&format!("?after={s0}")).await;
    let got = events(&page);
    let expected: Vec<(String, bool)> = vec![
        (hash(&keys[0]), true),  // deleted
        (hash(&keys[1]), true),  // disabled
        (hash(&keys[1]), false), // enabled again: its record
        (hash(&keys[2]), false), // rolled with an overlap: its record, ending
        (hash(&keys[3]), true),  // rolled without one
        (hash(&keys[4]), false), // an expiry brought forward
    ];
    assert_eq!(
        got.iter()
            .map(|(h, r, _)| (h.clone(), *r))
            .collect::<Vec<_>>(),
        expected,
        "{page}"
    );
    assert!(
        got[3].2.as_u64().is_some(),
        "the rolled-away secret's end: {page}"
    );
    assert!(got[5].2.as_u64().is_some(), "the new expiry: {page}");
    let seqs: Vec<i64> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_i64().unwrap())
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "numbered without gaps: {seqs:?}"
    );
    assert_eq!(page["seq"].as_i64(), seqs.last().copied());

    // Nothing after the last one; the whole window without `after`.
    let last = page["seq"].as_i64().unwrap();
    assert!(app.feed_page(&format!("?after={last}")).await["events"]
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(events(&app.feed_page("").await).len(), 6);

    // A reader started afresh (another replica, a restart) finds the same events.
    let fresh = RevocationFeed::new(Duration::from_secs(120));
    fresh.refresh(app.app().store()).await.unwrap();
    let again = serde_json::to_value(fresh.page(Some(s0)).unwrap()).unwrap();
    assert_eq!(events(&again), got);

    // Past the window the events are forgotten; `from` says so to a reader behind it.
    app.advance(Duration::from_secs(121));
    let later = app.feed_page(&format!("?after={s0}")).await;
    assert!(later["events"].as_array().unwrap().is_empty(), "{later}");
    assert_eq!(later["from"], later["seq"]);
    assert!(
        later["from"].as_i64().unwrap() > s0,
        "the reader at {s0} must start over"
    );
}

async fn the_feed_is_for_the_edge_and_refuses_bad_queries(backend: Backend) {
    let app = TestApp::on(backend).build().await;
    app.flush().await;
    let path = "/api/v1/revocations";
    assert_eq!(
        app.anonymous().get(path).await.status,
        StatusCode::UNAUTHORIZED
    );
    for caller in [app.as_admin(), app.as_client()] {
        caller
            .get(path)
            .await
            .assert_error(StatusCode::FORBIDDEN, "forbidden", "not the edge");
    }
    for bad in ["?after=-1", "?after=x", "?after=1&other=2"] {
        app.as_edge()
            .get(&format!("{path}{bad}"))
            .await
            .assert_error(StatusCode::BAD_REQUEST, "bad_request", bad);
    }
    assert_eq!(
        app.as_edge().get(&format!("{path}?after=0")).await.status,
        StatusCode::OK
    );
}

/// Before its first read, and when it has not read for seconds (the database away), a
/// replica answers 503 rather than a page a reader would take for the whole feed.
async fn a_feed_that_is_not_current_is_not_served(backend: Backend) {
    let app = TestApp::on(backend).build().await;
    let path = "/api/v1/revocations";
    app.as_edge().get(path).await.assert_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "not read yet",
    );
    app.flush().await;
    assert_eq!(app.as_edge().get(path).await.status, StatusCode::OK);
    // The page says how old this replica's read is, as a duration (no clocks compared).
    app.advance(Duration::from_millis(1500));
    let page: Value = app.as_edge().get(path).await.json();
    let age = page["ageMs"].as_u64().unwrap();
    assert!(
        (1500..5000).contains(&age),
        "1.5 s simulated, plus the test's own time: {page}"
    );
    app.advance(Duration::from_millis(4500));
    app.as_edge().get(path).await.assert_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "not read for 6 s",
    );
    app.flush().await;
    assert_eq!(app.as_edge().get(path).await.status, StatusCode::OK);
}

/// Rows pruned before this replica read them (another replica's pruner, a clock far
/// off): the numbers jump, and the reader's view starts over from the rows there are —
/// `from` moves, so a reader behind it starts over too.
async fn rows_pruned_before_a_reader_saw_them_make_it_start_over(backend: Backend) {
    let app = TestApp::on(backend).build().await;
    for name in ["a", "b", "c"] {
        app.create_key(name, "GENERIC").await;
    }
    let seen = app.feed_page("").await["seq"].as_i64().unwrap();
    assert_eq!(
        app.delete("a", Some(&app.admin_key)).await.0,
        StatusCode::OK
    );
    // Pruned before this replica read it.
    app.app().store().prune_feed(i64::MAX).await.unwrap();
    assert_eq!(
        app.delete("b", Some(&app.admin_key)).await.0,
        StatusCode::OK
    );
    let page = app.feed_page(&format!("?after={seen}")).await;
    assert_eq!(page["from"].as_i64(), Some(seen + 1), "{page}");
    assert_eq!(events(&page).len(), 1, "only what there is: {page}");
}

fn ms(iso: &Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(iso.as_str().expect("an ISO 8601 time"))
        .unwrap()
        .timestamp_millis()
}

/// Delete, disable, roll and leak revocation say by when every edge location refuses the
/// secret (twice the edge's feed interval after the answer, or the secret's own end when
/// later), in the answer and in the audit entry; other changes promise nothing.
async fn revocations_answer_by_when_every_edge_location_refuses(backend: Backend) {
    let app = TestApp::on(backend).build().await;
    for name in [
        "deleted",
        "disabled",
        "rolled",
        "overlapped",
        "expiring",
        "renamed-meta",
    ] {
        app.create_key(name, "GENERIC").await;
    }
    let bound = 2000; // twice the default EDGE_REVOCATION_FEED_INTERVAL_MS
    let now = crate::clock::now_ms();
    // The answer keeps the audit entry's promise, made before the commit with a second's
    // margin for it (later, were the commit slower).
    let expected = now + bound..now + bound + 1000 + 1000;

    let (status, deleted) = app.delete("deleted", Some(&app.admin_key)).await;
    assert_eq!((status, &deleted["status"]), (StatusCode::OK, &json!("OK")));
    let by = ms(&deleted["refusedEverywhereBy"]);
    assert!(expected.contains(&by), "{deleted}");

    let (_, disabled) = app.patch("disabled", json!({"enabled": false})).await;
    assert!(expected.contains(&ms(&disabled["refusedEverywhereBy"])));
    assert_eq!(disabled["enabled"], false, "the key as before: {disabled}");
    let (_, enabled) = app.patch("disabled", json!({"enabled": true})).await;
    assert!(enabled.get("refusedEverywhereBy").is_none(), "{enabled}");
    let (_, meta) = app.patch("renamed-meta", json!({"meta": {"a": 1}})).await;
    assert!(meta.get("refusedEverywhereBy").is_none(), "{meta}");
    // An expiry set: the record itself refuses from then on (whole seconds).
    let soon = chrono::DateTime::from_timestamp_millis((now + 500_000) / 1000 * 1000)
        .unwrap()
        .to_rfc3339();
    let (_, expiring) = app.patch("expiring", json!({"expiresAt": soon})).await;
    assert_eq!(ms(&expiring["refusedEverywhereBy"]), ms(&json!(soon)));

    let (_, rolled) = app.roll("rolled", None).await;
    assert!(expected.contains(&ms(&rolled["refusedEverywhereBy"])));
    let (_, overlapped) = app
        .roll("overlapped", Some(json!({"overlapSeconds": 60})))
        .await;
    assert_eq!(
        overlapped["refusedEverywhereBy"], overlapped["previousValidUntil"],
        "refused by its own record at its end"
    );

    let audit: Value = app.as_admin().get("/api/v1/audit?limit=100").await.json();
    let promised = |action: &str, target: &str| {
        audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == action && e["target"] == target)
            .filter_map(|e| e["detail"].get("refusedEverywhereBy").map(ms))
            .next_back()
    };
    // The audit entries promise what the answers did (the commits took under the margin).
    for (action, target, answer) in [
        ("key.delete", "deleted", &deleted),
        ("key.update", "disabled", &disabled),
        ("key.roll", "rolled", &rolled),
        ("key.update", "expiring", &expiring),
    ] {
        let by = promised(action, target).unwrap_or_else(|| panic!("{action} {target}: {audit}"));
        assert_eq!(by, ms(&answer["refusedEverywhereBy"]), "{action} {target}");
    }
}
