//! Key lists, in process on both backends (moved from `tests/tests/lists.rs`): a walk
//! with `?limit=&cursor=` sees every key once while keys are made and deleted during it;
//! without parameters the answer stays Metlo's plain array, up to `LIST_UNPAGED_MAX`,
//! past which it is a 400 that says to page; bad parameters are 400s; filters by name
//! and type.

use std::collections::{BTreeSet, HashMap};

use axum::http::StatusCode;
use serde_json::Value;

use crate::db::Backend;
use crate::test_util::{on_both_backends, TestApp};

on_both_backends!(
    a_walk_sees_every_key_once_while_keys_come_and_go,
    unpaged_lists_stay_arrays_up_to_their_limit,
    bad_paging_parameters_are_400,
    lists_filter_by_name_and_type,
);

async fn start(backend: Backend, unpaged_max: u32) -> TestApp {
    TestApp::on(backend)
        .env("MAX_API_KEYS", 1000)
        .env("LIST_UNPAGED_MAX", unpaged_max)
        .build()
        .await
}

async fn page(app: &TestApp, route: &str, query: &str) -> (StatusCode, Value) {
    let reply = app
        .as_admin()
        .get(&format!("/api/v1/keys/{route}?{query}"))
        .await;
    (
        reply.status,
        serde_json::from_str(&reply.text).unwrap_or(Value::Null),
    )
}

fn names(keys: &Value) -> Vec<String> {
    keys.as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap().to_owned())
        .collect()
}

async fn a_walk_sees_every_key_once_while_keys_come_and_go(backend: Backend) {
    let app = start(backend, 1000).await;
    for i in 0..60 {
        let kind = if i % 3 == 0 { "ONBOARDING" } else { "GENERIC" };
        app.create_key(&format!("before-{i:02}"), kind).await;
    }
    let admin_and_edge: Vec<String> = names(&Value::Array(app.list().await))
        .into_iter()
        .filter(|n| !n.starts_with("before-"))
        .collect();

    // Walk 7 at a time; between pages, make two keys and delete one made before the walk.
    let mut seen: Vec<String> = vec![];
    let mut deleted = BTreeSet::new();
    let (mut cursor, mut pages, mut made) = (None::<String>, 0, 0);
    loop {
        let query = match &cursor {
            None => "limit=7".to_owned(),
            Some(c) => format!("limit=7&cursor={c}"),
        };
        let (status, body) = page(&app, "list", &query).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let got = names(&body["keys"]);
        assert!(got.len() <= 7);
        seen.extend(got);
        pages += 1;
        for _ in 0..2 {
            app.create_key(&format!("during-{made:02}"), "GENERIC")
                .await;
            made += 1;
        }
        let victim = format!("before-{:02}", pages * 5 % 60);
        if deleted.insert(victim.clone()) {
            let reply = app
                .as_admin()
                .delete(&format!("/api/v1/keys/{victim}/delete"))
                .await;
            assert_eq!(reply.status, StatusCode::OK);
        }
        match body["nextCursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for n in &seen {
        *counts.entry(n).or_default() += 1;
    }
    assert!(
        counts.values().all(|c| *c == 1),
        "a key seen twice: {counts:?}"
    );
    for i in 0..60 {
        let name = format!("before-{i:02}");
        if !deleted.contains(&name) {
            assert!(
                counts.contains_key(name.as_str()),
                "{name} missed ({pages} pages)"
            );
        }
    }
    for n in &admin_and_edge {
        assert!(counts.contains_key(n.as_str()), "{n} missed");
    }
    assert!(
        !seen.iter().any(|n| n.starts_with("during-")),
        "keys made during the walk are newer than the cursor"
    );
    // The same order as the plain list.
    let all = names(&Value::Array(app.list().await));
    let walked_still_there: Vec<&String> = seen.iter().filter(|n| all.contains(n)).collect();
    let all_from_before: Vec<&String> = all.iter().filter(|n| seen.contains(n)).collect();
    assert_eq!(walked_still_there, all_from_before);

    // Onboarding pages hold only onboarding keys.
    let (status, body) = page(&app, "onboarding", "limit=1000").await;
    assert_eq!(status, StatusCode::OK);
    assert!(body["keys"]
        .as_array()
        .unwrap()
        .iter()
        .all(|k| k["for"] == "ONBOARDING"));
    assert_eq!(body["nextCursor"], Value::Null);
    println!("walked {} keys in {pages} pages of 7", seen.len());
}

async fn unpaged_lists_stay_arrays_up_to_their_limit(backend: Backend) {
    // Three keys exist from the start (the admin, edge and client keys).
    let app = start(backend, 5).await;
    for i in 0..2 {
        app.create_key(&format!("k{i}"), "GENERIC").await;
    }
    let (status, body) = page(&app, "list", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body.as_array().map(Vec::len),
        Some(5),
        "Metlo's plain array: {body}"
    );
    app.create_key("k2", "ONBOARDING").await;
    let (status, body) = page(&app, "list", "").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("limit") && message.contains("cursor"),
        "{message}"
    );
    // Paged, all six are there; the onboarding list (one key) is still an array.
    let (status, body) = page(&app, "list", "limit=1000").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["keys"].as_array().unwrap().len(), 6);
    let (status, body) = page(&app, "onboarding", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.as_array().map(Vec::len), Some(1));
}

async fn bad_paging_parameters_are_400(backend: Backend) {
    let app = start(backend, 1000).await;
    for query in [
        "limit=0",
        "limit=1001",
        "limit=-1",
        "limit=ten",
        "cursor=%21%21",
        "limit=5&cursor=abc",
    ] {
        let (status, body) = page(&app, "list", query).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert_eq!(body["error"], "bad_request");
    }
}

async fn lists_filter_by_name_and_type(backend: Backend) {
    let app = start(backend, 1000).await;
    for (name, kind) in [
        ("Tenant_A", "GENERIC"),
        ("tenant-b", "ONBOARDING"),
        ("tenantXc", "GCP"),
        ("other", "GENERIC"),
    ] {
        app.create_key(name, kind).await;
    }
    let sorted = |v: &Value| {
        let mut n = names(&v["keys"]);
        n.sort();
        n
    };
    // A filter answers a page, even without `limit`.
    let (status, body) = page(&app, "list", "name=TENANT").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(sorted(&body), ["Tenant_A", "tenant-b", "tenantXc"]);
    assert!(body["nextCursor"].is_null());
    // `_` is a character, not LIKE's wildcard.
    let (_, body) = page(&app, "list", "name=t_").await;
    assert_eq!(sorted(&body), ["Tenant_A"]);
    let (_, body) = page(&app, "list", "name=tenant&type=GENERIC").await;
    assert_eq!(sorted(&body), ["Tenant_A"]);
    let (_, body) = page(&app, "onboarding", "name=tenant").await;
    assert_eq!(sorted(&body), ["tenant-b"]);
    // Paged through a filter: two keys a page, each once.
    let (_, first) = page(&app, "list", "name=tenant&limit=2").await;
    let cursor = first["nextCursor"].as_str().unwrap().to_owned();
    let (_, second) = page(
        &app,
        "list",
        &format!("name=tenant&limit=2&cursor={cursor}"),
    )
    .await;
    let mut walked = [names(&first["keys"]), names(&second["keys"])].concat();
    walked.sort();
    assert_eq!(walked, ["Tenant_A", "tenant-b", "tenantXc"]);
    for (route, query) in [
        ("list", "type=generic"),
        ("list", "type="),
        ("onboarding", "type=GCP"),
    ] {
        let (status, body) = page(&app, route, query).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{route}?{query}: {body}");
    }
}
