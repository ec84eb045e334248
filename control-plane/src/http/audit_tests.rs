//! The audit log, in process on both backends (moved from `tests/tests/lifecycle.rs`):
//! who did what, failed authentications counted and folded by source, paging, bad
//! queries, never a secret; and entries past `AUDIT_RETENTION` deleted.

use std::time::Duration;

use axum::http::StatusCode;
use metlo_shared::ApiKey;
use serde_json::{json, Value};

use crate::db::Backend;
use crate::test_util::{on_both_backends, TestApp};

on_both_backends!(
    audit_log_records_who_did_what,
    audit_entries_past_their_retention_are_deleted,
    ten_minutes_of_junk_cost_a_bounded_number_of_rows,
);

async fn audit_log_records_who_did_what(backend: Backend) {
    // 150 failures from one address: what the audit log makes of them, not the
    // failed-authentication budget, is tested here.
    let app = TestApp::on(backend)
        .env("AUTH_FAILURES_PER_MINUTE", 0)
        .build()
        .await;
    let x = app.create_key("x", "AWS").await;
    let admin = app.as_admin();
    let reply = admin
        .post("/api/v1/keys/x/roll", json!({"overlapSeconds": 30}))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let rolled = reply.json()["apiKey"].as_str().unwrap().to_owned();
    assert_eq!(
        admin.delete("/api/v1/keys/x/delete").await.status,
        StatusCode::OK
    );
    let unknown = ApiKey::generate().unwrap();
    for _ in 0..100 {
        let reply = app.with_key("garbage").get("/api/v1/verify").await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    }
    let reply = app
        .with_key(unknown.expose_secret())
        .get("/api/v1/verify")
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    // A spray of well-formed unknown keys, each with its own identifier.
    for _ in 0..49 {
        let k = ApiKey::generate().unwrap();
        let reply = app.with_key(k.expose_secret()).get("/api/v1/verify").await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(
        app.anonymous().get("/api/v1/keys/list").await.status,
        StatusCode::UNAUTHORIZED
    );
    app.flush().await;

    let reply = admin.get("/api/v1/audit?limit=1000").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let text = reply.text.clone();
    let page = reply.json();
    let entries = page["entries"].as_array().unwrap();
    assert_eq!(page["nextBefore"], Value::Null);
    let ids: Vec<i64> = entries.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first: {ids:?}");
    let find = |action: &str| {
        entries
            .iter()
            .filter(|e| e["action"] == action)
            .cloned()
            .collect::<Vec<Value>>()
    };
    for action in ["key.create", "key.roll", "key.delete"] {
        let e = &find(action)[0];
        assert_eq!(e["actor"], "admin", "{e}");
        assert_eq!(e["target"], "x", "{e}");
        assert_eq!(e["ip"], "127.0.0.1", "{e}");
    }
    assert_eq!(find("key.roll")[0]["detail"]["overlapSeconds"], 30);
    assert_eq!(find("key.create")[0]["detail"]["type"], "AWS");
    let failures = find("auth.failed");
    let count = |reason: &str| -> i64 {
        failures
            .iter()
            .filter(|e| e["detail"]["reason"] == reason)
            .map(|e| e["detail"]["count"].as_i64().unwrap())
            .sum()
    };
    let rows = |reason: &str| {
        failures
            .iter()
            .filter(|e| e["detail"]["reason"] == reason)
            .count()
    };
    assert_eq!(
        count("malformed"),
        100,
        "every failure counted: {failures:?}"
    );
    assert_eq!(
        rows("malformed"),
        1,
        "100 failures from one source in one flush: one row"
    );
    assert_eq!(count("invalid"), 50);
    assert_eq!(
        rows("invalid"),
        1,
        "50 different well-formed keys from one source: one row"
    );
    assert_eq!(count("missing"), 1);
    let invalid = failures
        .iter()
        .find(|e| e["detail"]["reason"] == "invalid")
        .unwrap();
    let identifiers = invalid["detail"]["identifiers"].as_array().unwrap();
    assert!(identifiers.len() <= 5, "a sample of identifiers: {invalid}");
    assert!(
        identifiers.contains(&json!(unknown.identifier())),
        "{invalid}"
    );
    assert_eq!(invalid["detail"]["route"], "/api/v1/verify");
    assert_eq!(invalid["actor"], Value::Null);
    assert_eq!(invalid["ip"], "127.0.0.0/24", "filed by network");
    assert_eq!(invalid["detail"]["addresses"], json!(["127.0.0.1"]));

    // Paging with `before` walks the same entries.
    let mut walked = vec![];
    let mut query = "/api/v1/audit?limit=2".to_owned();
    loop {
        let page = admin.get(&query).await.json();
        let got = page["entries"].as_array().unwrap();
        assert!(got.len() <= 2);
        walked.extend(got.iter().map(|e| e["id"].as_i64().unwrap()));
        match page["nextBefore"].as_i64() {
            Some(next) => query = format!("/api/v1/audit?limit=2&before={next}"),
            None => break,
        }
    }
    assert_eq!(walked, ids);
    for bad in [
        "?limit=0",
        "?limit=1001",
        "?limit=abc",
        "?before=0",
        "?before=-5",
        "?limit=1.5",
    ] {
        let reply = admin.get(&format!("/api/v1/audit{bad}")).await;
        reply.assert_error(StatusCode::BAD_REQUEST, "bad_request", bad);
    }

    // Never a secret: no key handed out, nor its secret part, nor a refused one.
    let secrets = [
        &app.admin_key,
        &app.edge_key,
        &app.client_key,
        &x,
        &rolled,
        &unknown.expose_secret().to_owned(),
    ];
    for s in secrets {
        assert!(!text.contains(s.as_str()) && !text.contains(&s[14..]));
    }
}

async fn audit_entries_past_their_retention_are_deleted(backend: Backend) {
    let app = TestApp::on(backend)
        .env("AUDIT_RETENTION", "3s")
        .build()
        .await;
    let targets = || async {
        let reply = app.as_admin().get("/api/v1/audit").await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        reply.json()["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["target"].as_str().unwrap_or_default().to_owned())
            .collect::<Vec<String>>()
    };
    app.create_key("old", "GENERIC").await;
    app.flush().await;
    assert!(
        targets().await.contains(&"old".to_owned()),
        "kept within the retention"
    );
    app.advance(Duration::from_secs(4));
    app.create_key("new", "GENERIC").await;
    app.flush().await;
    let kept = targets().await;
    assert!(kept.contains(&"new".to_owned()), "{kept:?}");
    assert!(
        !kept.contains(&"old".to_owned()),
        "past the retention: {kept:?}"
    );
    // The key itself is not touched by the audit log's retention.
    assert_eq!(app.listed("old").await["name"], "old");
}

/// Issue 28's measurement: ten minutes (simulated) of junk from one IPv4 address
/// cycling missing, malformed and made-up keys over key-guarded routes and the console's
/// sign-in, then from 1,000 IPv6 /64s each sending a made-up key every 20 seconds. Each
/// gets at most the minute's cap of rows plus one summary a minute, and every failure is
/// counted in them. Prints rows and bytes (`--nocapture`).
async fn ten_minutes_of_junk_cost_a_bounded_number_of_rows(backend: Backend) {
    const SECONDS: usize = 600;
    const CAP: u64 = 60;
    let routes = ["/api/v1/verify", "/api/v1/keys/list", "/api/v1/audit"];
    for scenario in ["one IPv4 address", "1,000 IPv6 /64s"] {
        let app = TestApp::on(backend)
            .env("MAX_CONCURRENT_LOOKUPS", 1000)
            .build()
            .await;
        app.advance_to((crate::clock::now_ms() / 60_000 + 1) * 60_000);
        app.flush().await;
        let first_minute = crate::clock::now_ms() / 60_000;
        let bytes_before = app.app().store().audit_bytes().await.unwrap();
        let mut sent = 0u64;
        for second in 0..SECONDS {
            let requests = if scenario == "one IPv4 address" {
                10
            } else {
                50
            };
            for i in 0..requests {
                let made_up = ApiKey::generate().unwrap();
                let reply = if scenario == "one IPv4 address" {
                    let n = second * requests + i;
                    let key = match n % 3 {
                        0 => None,
                        1 => Some("garbage"),
                        _ => Some(made_up.expose_secret()),
                    };
                    let caller = match key {
                        Some(key) => app.with_key(key),
                        None => app.anonymous(),
                    }
                    .peer("198.51.100.7:40000");
                    if n % 4 == 3 {
                        let body = json!({"key": key.unwrap_or("")});
                        caller.post("/console/sign-in", body).await
                    } else {
                        caller.get(routes[n % 4]).await
                    }
                } else {
                    let source = (second * requests + i) % 1000;
                    app.with_key(made_up.expose_secret())
                        .peer(&format!("[2001:db8:0:{source:x}::1]:40000"))
                        .get("/api/v1/verify")
                        .await
                };
                assert!(
                    [StatusCode::UNAUTHORIZED, StatusCode::TOO_MANY_REQUESTS]
                        .contains(&reply.status),
                    "{}",
                    reply.text
                );
                sent += 1;
            }
            // Flushed at the end of each second, as the service does once a second.
            app.flush().await;
            app.advance(Duration::from_secs(1));
        }
        // The minutes the flushes fell in (real time passes too, so maybe one more
        // than ten); the last one's summary is written once it is over.
        let minutes = (crate::clock::now_ms() / 60_000 - first_minute + 1) as u64;
        app.advance(Duration::from_secs(60));
        app.flush().await;
        let mut rows = vec![];
        let mut query = "/api/v1/audit?action=auth.failed&limit=1000".to_owned();
        loop {
            let page = app.as_admin().get(&query).await.json();
            rows.extend(page["entries"].as_array().unwrap().iter().cloned());
            match page["nextBefore"].as_i64() {
                Some(next) => {
                    query = format!("/api/v1/audit?action=auth.failed&limit=1000&before={next}")
                }
                None => break,
            }
        }
        let bytes = app.app().store().audit_bytes().await.unwrap() - bytes_before;
        let summaries = rows
            .iter()
            .filter(|r| r["detail"]["reason"] == "not itemised")
            .count() as u64;
        let counted: u64 = rows
            .iter()
            .map(|r| r["detail"]["count"].as_u64().unwrap())
            .sum();
        println!(
            "{backend:?}, {scenario}: {sent} failed requests in {SECONDS} s -> {} rows \
             ({summaries} summaries), {bytes} bytes on disk",
            rows.len()
        );
        assert_eq!(counted, sent, "every failure counted");
        assert!(minutes <= (SECONDS / 60) as u64 + 1, "{minutes}");
        assert!(summaries <= minutes, "{summaries}");
        assert!(
            rows.len() as u64 <= minutes * (CAP + 1),
            "{} rows in {minutes} minutes",
            rows.len()
        );
    }
}
