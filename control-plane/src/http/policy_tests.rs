//! The route policy's routes, in process on both backends: none at first; replaced as a
//! whole, checked (400 naming the rule), versioned (`ETag`, `If-Match` → 412, old versions
//! readable), audited, admin-only; and carried to the edge — on the revocation feed's
//! pages (every whole-window page, and pages after a change) and in KV's expected entries.

use axum::http::{Method, StatusCode};
use metlo_shared::policy::RoutePolicy;
use serde_json::{json, Value};

use crate::db::policy::POLICY_KV_KEY;
use crate::db::Backend;
use crate::service::feed::RevocationFeed;
use crate::test_util::{on_both_backends, Reply, TestApp};

on_both_backends!(
    no_policy_until_one_is_set,
    a_policy_is_checked_versioned_and_audited,
    if_match_makes_a_change_conditional,
    only_administrators_read_or_change_it,
    the_feed_carries_the_policy_to_the_edge,
    kv_holds_the_current_policy,
);

fn orders() -> Value {
    json!({
        "default": "deny",
        "rules": [
            {"methods": ["GET"], "path": "/v1/orders/*", "require": "orders:read"},
            {"methods": ["POST"], "path": "/v1/orders", "require": "orders:write"},
            {"path": "/admin/**", "require": "admin  AND  (ops OR root)"},
        ]
    })
}

async fn put(app: &TestApp, body: Value, if_match: Option<&str>) -> Reply {
    let mut caller = app.as_admin();
    if let Some(tag) = if_match {
        caller = caller.header("if-match", tag);
    }
    caller.send(Method::PUT, "/api/v1/policy", Some(body)).await
}

async fn no_policy_until_one_is_set(backend: Backend) {
    let app = TestApp::on(backend).build().await;
    let reply = app.as_admin().get("/api/v1/policy").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.header("etag"), Some("\"0\""));
    let body = reply.json();
    assert_eq!(body["version"], 0);
    assert_eq!(body["default"], "allow");
    assert_eq!(body["rules"], json!([]));
}

async fn a_policy_is_checked_versioned_and_audited(backend: Backend) {
    let app = TestApp::on(backend).build().await;
    let reply = put(&app, orders(), None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.header("etag"), Some("\"1\""));
    let set = reply.json();
    assert_eq!(set["version"], 1);
    assert!(set["appliedEverywhereBy"].is_string(), "{set}");
    assert!(set["updatedAt"].is_string());
    // Read back canonical: methods left out are "*", expressions in one spelling.
    let shown = app.as_admin().get("/api/v1/policy").await.json();
    assert_eq!(shown["rules"][2]["require"], "admin AND (ops OR root)");
    assert!(shown["rules"][2].get("methods").is_none(), "{shown}");
    assert_eq!(shown["default"], "deny");

    let too_many: Vec<Value> = (0..201)
        .map(|i| json!({"path": format!("/r{i}"), "require": "a"}))
        .collect();
    for (bad, says) in [
        (
            json!({"rules": [{"path": "/ok", "require": "a"}, {"path": "nope", "require": "a"}]}),
            "rule 1",
        ),
        (
            json!({"rules": [{"path": "/a", "require": "a AND"}]}),
            "rule 0",
        ),
        (
            json!({"rules": [{"path": "/a", "require": "a", "methods": ["FETCH"]}]}),
            "FETCH",
        ),
        (
            json!({"rules": [{"path": "/a/**/b", "require": "a"}]}),
            "rule 0",
        ),
        (
            json!({"rules": [{"path": "/a", "requires": "a"}]}),
            "unknown field",
        ),
        (json!({"default": "maybe"}), "default"),
        (json!({"rules": too_many}), "200"),
    ] {
        let reply = put(&app, bad.clone(), None).await;
        reply.assert_error(StatusCode::BAD_REQUEST, "bad_request", says);
        assert!(
            reply.json()["message"].as_str().unwrap().contains(says),
            "{says}: {}",
            reply.text
        );
    }
    assert_eq!(
        app.as_admin().get("/api/v1/policy").await.json()["version"],
        1,
        "nothing stored"
    );

    let reply = put(&app, json!({"default": "allow"}), None).await;
    assert_eq!(reply.json()["version"], 2);
    // Every version stays readable.
    let v1 = app.as_admin().get("/api/v1/policy/versions/1").await.json();
    assert_eq!(v1["rules"], shown["rules"]);
    assert_eq!(
        app.as_admin().get("/api/v1/policy/versions/0").await.json()["rules"],
        json!([])
    );
    app.as_admin()
        .get("/api/v1/policy/versions/9")
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found", "no version 9");
    app.as_admin()
        .get("/api/v1/policy/versions/-1")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "bad_request", "a negative version");

    let page = app
        .as_admin()
        .get("/api/v1/audit?action=policy.update")
        .await
        .json();
    let entries = page["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{page}");
    let first = entries
        .iter()
        .find(|e| e["detail"]["version"] == 1)
        .unwrap();
    assert_eq!(first["detail"]["before"], Value::Null);
    assert_eq!(first["detail"]["after"]["rules"], shown["rules"]);
    assert!(first["detail"]["appliedEverywhereBy"].is_string());
    let second = entries
        .iter()
        .find(|e| e["detail"]["version"] == 2)
        .unwrap();
    assert_eq!(second["detail"]["before"]["default"], "deny");
    assert_eq!(second["detail"]["after"]["default"], "allow");
    assert_eq!(second["actor"], first["actor"]);
}

async fn if_match_makes_a_change_conditional(backend: Backend) {
    let app = TestApp::on(backend).build().await;
    assert_eq!(
        put(&app, orders(), Some("\"0\"")).await.status,
        StatusCode::OK
    );
    // Made from version 0, but someone set version 1 meanwhile.
    put(&app, json!({"default": "allow"}), Some("\"0\""))
        .await
        .assert_error(
            StatusCode::PRECONDITION_FAILED,
            "precondition_failed",
            "stale",
        );
    assert_eq!(
        app.as_admin().get("/api/v1/policy").await.json()["default"],
        "deny"
    );
    assert_eq!(
        put(&app, json!({"default": "allow"}), Some("\"1\""))
            .await
            .status,
        StatusCode::OK
    );
    for bad in ["one", "2", "\"2", "*"] {
        put(&app, json!({}), Some(bad)).await.assert_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            bad,
        );
    }
    // If-Match compares strongly (RFC 9110): a weak tag never matches.
    put(&app, json!({}), Some("W/\"2\"")).await.assert_error(
        StatusCode::PRECONDITION_FAILED,
        "precondition_failed",
        "weak",
    );
}

async fn only_administrators_read_or_change_it(backend: Backend) {
    let app = TestApp::on(backend).build().await;
    for caller in [app.as_client(), app.as_edge()] {
        caller
            .get("/api/v1/policy")
            .await
            .assert_error(StatusCode::FORBIDDEN, "forbidden", "read");
        caller
            .send(Method::PUT, "/api/v1/policy", Some(orders()))
            .await
            .assert_error(StatusCode::FORBIDDEN, "forbidden", "replace");
    }
    app.anonymous()
        .send(Method::PUT, "/api/v1/policy", Some(orders()))
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthorized", "no key");
    assert_eq!(
        app.as_admin().get("/api/v1/policy").await.json()["version"],
        0
    );
}

/// The policy on a page, as the edge reads it.
fn policy_on(page: &Value) -> Option<RoutePolicy> {
    let text = page.get("policy")?["text"].as_str()?;
    Some(RoutePolicy::from_lines(text).expect("the edge can read it"))
}

async fn the_feed_carries_the_policy_to_the_edge(backend: Backend) {
    let app = TestApp::on(backend).build().await;
    // None set: a reader starting over learns there is none.
    let page = app.feed_page("").await;
    let none = policy_on(&page).expect("every whole-window page says");
    assert_eq!((none.version, none.is_active()), (0, false));
    let seen = page["seq"].as_i64().unwrap();
    assert!(policy_on(&app.feed_page(&format!("?after={seen}")).await).is_none());

    assert_eq!(put(&app, orders(), None).await.status, StatusCode::OK);
    let page = app.feed_page(&format!("?after={seen}")).await;
    let carried = policy_on(&page).expect("a reader that has not seen the change gets it");
    assert_eq!(carried.version, 1);
    assert_eq!(carried.rules.len(), 3);
    assert_eq!(page["events"], json!([]), "a policy is not a key's event");
    let after_change = page["seq"].as_i64().unwrap();
    assert!(after_change > seen);
    assert!(policy_on(&app.feed_page(&format!("?after={after_change}")).await).is_none());
    assert_eq!(policy_on(&app.feed_page("").await).unwrap().version, 1);

    // A reader started afresh (another replica, a restart) serves the same.
    let fresh = RevocationFeed::new(std::time::Duration::from_secs(120));
    fresh.refresh(app.app().store()).await.unwrap();
    let page = fresh.page(Some(seen)).unwrap();
    assert_eq!(page.policy.as_ref().map(|p| p.seq), Some(after_change));
    let page = fresh.page(Some(after_change)).unwrap();
    assert!(page.policy.is_none());
    // A reader whose next rows were pruned before it read them (the policy's change among
    // them) starts over, and reads the policy again.
    let behind = RevocationFeed::new(std::time::Duration::from_secs(120));
    behind.refresh(app.app().store()).await.unwrap();
    let mut newer = orders();
    newer["default"] = json!("allow");
    assert_eq!(put(&app, newer, None).await.status, StatusCode::OK);
    app.app().store().prune_feed(i64::MAX).await.unwrap();
    app.create_key("after-the-gap", "GENERIC").await;
    assert_eq!(
        app.delete("after-the-gap", Some(&app.admin_key)).await.0,
        StatusCode::OK
    );
    behind.refresh(app.app().store()).await.unwrap();
    let page = behind.page(None).unwrap();
    let text = page.policy.unwrap().text;
    assert_eq!(RoutePolicy::from_lines(&text).unwrap().version, 2, "{text}");
    assert_eq!(
        put(&app, orders(), Some("\"2\"")).await.status,
        StatusCode::OK
    );
    // …also once the change's own row has left the feed.
    app.app().store().prune_feed(i64::MAX).await.unwrap();
    let pruned = RevocationFeed::new(std::time::Duration::from_secs(120));
    pruned.refresh(app.app().store()).await.unwrap();
    let page = pruned.page(None).unwrap();
    let current = RoutePolicy::from_lines(&page.policy.unwrap().text).unwrap();
    assert_eq!((current.version, &current.rules), (3, &carried.rules));
}

async fn kv_holds_the_current_policy(backend: Backend) {
    let app = TestApp::on(backend).build().await;
    let store = app.app().store();
    let last = |entries: Vec<crate::db::rows::KvEntry>| entries.last().map(|e| e.key.clone());
    assert_ne!(
        last(store.kv_entries_after("", 1000).await.unwrap()),
        Some(POLICY_KV_KEY.into())
    );
    let before = store.kv_entry_count().await.unwrap();
    assert_eq!(put(&app, orders(), None).await.status, StatusCode::OK);
    let entries = store.kv_entries_after("", 1000).await.unwrap();
    let policy = entries.last().unwrap();
    assert_eq!(policy.key, POLICY_KV_KEY, "after every hash");
    assert_eq!(RoutePolicy::from_lines(&policy.value).unwrap().version, 1);
    assert_eq!(store.kv_entry_count().await.unwrap(), before + 1);
    let held = store
        .kv_entries_for(&[POLICY_KV_KEY.to_owned()])
        .await
        .unwrap();
    assert_eq!(held.get(POLICY_KV_KEY), Some(&policy.value));
    // A page that ends past it does not repeat it.
    assert!(store
        .kv_entries_after(POLICY_KV_KEY, 1000)
        .await
        .unwrap()
        .is_empty());
}
