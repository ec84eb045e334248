//! Credits and leased rate limits under `wrangler dev` (real workerd, the key's Durable
//! Object, KV): a metered key is refused with 429 `credits_exhausted` once its balance is
//! spent, without an origin call; 50 concurrent clients on 1,000 credits get exactly
//! 1,000 admitted once every lease has settled; top-ups under load count once each; a
//! refill restores the balance on schedule; and leases never let a window admit more
//! than its limit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use metlo_tests::{Backend, Stack, StackBuilder, StatusCode};
use serde_json::{json, Value};

async fn stack() -> Stack {
    StackBuilder::new(Backend::Sqlite)
        .kv()
        .edge(&[])
        .build()
        .await
}

async fn metered(s: &Stack, name: &str, credits: Value) -> String {
    let (status, body) = s.cp.create(json!({"name": name, "credits": credits})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["apiKey"].as_str().unwrap().to_owned()
}

/// Sends requests with `key` from `clients` concurrent clients until each has seen a
/// refusal; the number admitted (200s).
async fn spend_until_refused(s: &Stack, key: &str, clients: usize) -> u64 {
    let admitted = AtomicU64::new(0);
    futures::future::join_all((0..clients).map(|_| async {
        loop {
            let r = s.edge.get("/spend", Some(key)).send().await.unwrap();
            match r.status() {
                StatusCode::OK => {
                    admitted.fetch_add(1, Ordering::Relaxed);
                }
                StatusCode::TOO_MANY_REQUESTS => {
                    let body: Value = r.json().await.unwrap();
                    assert_eq!(body["error"], "credits_exhausted", "{body}");
                    return;
                }
                other => panic!("unexpected {other}: {}", r.text().await.unwrap()),
            }
        }
    }))
    .await;
    admitted.into_inner()
}

/// Concurrent spending, then one client until refused: a refusal to a lone client comes
/// only once no lease holds a credit (the isolate gives its lease back on each ask).
async fn spend_all(s: &Stack, key: &str, clients: usize) -> u64 {
    spend_until_refused(s, key, clients).await + spend_until_refused(s, key, 1).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credits_are_exact_under_concurrency_and_top_ups() {
    let s = stack().await;
    let key = metered(&s, "thousand", json!({"remaining": 1000})).await;
    s.cp.wait_outbox_drained(Duration::from_secs(10)).await;
    let reached = s.origin.requests().len();
    let admitted = spend_all(&s, &key, 50).await;
    assert_eq!(
        admitted,
        1000,
        "exactly the balance, with 50 clients\n{}",
        s.edge.log()
    );
    assert_eq!(
        s.origin.requests().len() - reached,
        1000,
        "refused requests never reach the origin"
    );
    let r = s.edge.get("/spend", Some(&key)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(
        r.headers().get("retry-after").is_none(),
        "no refill, no Retry-After"
    );

    // Top-ups while 20 clients spend: each counts once.
    let topped = metered(&s, "topped", json!({"remaining": 200})).await;
    s.cp.wait_outbox_drained(Duration::from_secs(10)).await;
    let spending = async {
        let mut total = 0;
        let started = Instant::now();
        // Until the last top-up has reached the edge and been spent.
        while total < 700 {
            total += spend_until_refused(&s, &topped, 20).await;
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{total} admitted so far"
            );
        }
        total
    };
    let topping = async {
        for _ in 0..10 {
            let (status, body) =
                s.cp.post("/api/v1/keys/topped/credits", Some(json!({"add": 50})))
                    .await;
            assert_eq!(status, StatusCode::OK, "{body}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        s.cp.wait_outbox_drained(Duration::from_secs(10)).await;
    };
    let (total, ()) = tokio::join!(spending, topping);
    let total = total + spend_all(&s, &topped, 5).await;
    assert_eq!(total, 700, "200 + 10 × 50, none lost or counted twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_credits_refill_on_schedule() {
    let s = stack().await;
    let key = metered(
        &s,
        "refilled",
        json!({"remaining": 3, "refill": {"amount": 4, "interval": "seconds", "periodSeconds": 3}}),
    )
    .await;
    s.cp.wait_outbox_drained(Duration::from_secs(10)).await;
    // Spend at the start of a refill period (waiting for the wall clock's refill instant),
    // so no refill falls in the middle of spending: 3, or 4 once a refill came.
    after_next_refill_instant(3).await;
    let first = spend_all(&s, &key, 1).await;
    assert!(
        first == 3 || first == 4,
        "3, or 4 if a refill came meanwhile: {first}"
    );
    let r = s.edge.get("/spend", Some(&key)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=3).contains(&retry), "until the next refill: {retry}");
    // Waiting for the refill instant itself (the wall clock), then the new balance.
    tokio::time::sleep(Duration::from_secs(retry)).await;
    let started = Instant::now();
    let refilled = loop {
        let n = spend_until_refused(&s, &key, 1).await;
        if n > 0 {
            break n;
        }
        assert!(started.elapsed() < Duration::from_secs(4), "no refill");
    };
    assert!(
        refilled == 4 || refilled == 8,
        "a refill sets the balance to 4: {refilled}"
    );
}

/// Returns just after the wall clock passes the next multiple of `period` seconds since
/// the epoch (a refill instant of `"interval": "seconds"`).
async fn after_next_refill_instant(period: u64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let period_ms = period * 1000;
    tokio::time::sleep(Duration::from_millis(period_ms - now % period_ms + 100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leased_rate_limits_never_exceed_a_window() {
    let s = stack().await;
    let (status, body) =
        s.cp.create(json!({"name": "limited", "rateLimit": {"requests": 40, "periodSeconds": 2}}))
            .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let key = body["apiKey"].as_str().unwrap().to_owned();
    s.cp.wait_outbox_drained(Duration::from_secs(10)).await;
    // 20 clients for 6 s. A window starts at the first request after the previous one
    // ended, so at most three start within 6 s of the first request: at most 3 × 40
    // admitted, however the leases were spread.
    let admitted = AtomicU64::new(0);
    let refused = AtomicU64::new(0);
    let started = Instant::now();
    futures::future::join_all((0..20).map(|_| async {
        while started.elapsed() < Duration::from_secs(6) {
            let r = s.edge.get("/limited", Some(&key)).send().await.unwrap();
            match r.status() {
                StatusCode::OK => admitted.fetch_add(1, Ordering::Relaxed),
                StatusCode::TOO_MANY_REQUESTS => refused.fetch_add(1, Ordering::Relaxed),
                other => panic!("unexpected {other}"),
            };
        }
    }))
    .await;
    let (admitted, refused) = (admitted.into_inner(), refused.into_inner());
    assert!(refused > 0, "the clients asked for more than the limit");
    assert!(
        admitted <= 3 * 40,
        "{admitted} admitted in three windows of 40"
    );
    assert!(
        admitted >= 2 * 40,
        "leases do not starve the key: {admitted}"
    );
}

/// Sends requests alternating between `keys` until each has been refused once; how many
/// were admitted, and the refusals' error codes.
async fn alternate_until_refused(s: &Stack, keys: &[&str]) -> (u64, Vec<String>) {
    let mut admitted = 0;
    let mut refused = vec![None; keys.len()];
    while refused.iter().any(Option::is_none) {
        for (i, key) in keys.iter().enumerate() {
            let r = s.edge.get("/shared", Some(key)).send().await.unwrap();
            match r.status() {
                StatusCode::OK => admitted += 1,
                StatusCode::TOO_MANY_REQUESTS => {
                    let body: Value = r.json().await.unwrap();
                    refused[i] = Some(body["error"].as_str().unwrap().to_owned());
                }
                other => panic!("unexpected {other}: {}", r.text().await.unwrap()),
            }
        }
    }
    (admitted, refused.into_iter().flatten().collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identitys_keys_share_one_balance_and_one_limit() {
    let s = stack().await;
    let (status, body) =
        s.cp.post(
            "/api/v1/identities",
            Some(json!({"externalId": "acme", "credits": {"remaining": 20}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut keys = vec![];
    for name in ["acme-1", "acme-2"] {
        let (status, body) = s.cp.create(json!({"name": name, "identity": "acme"})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        keys.push(body["apiKey"].as_str().unwrap().to_owned());
    }
    s.cp.wait_outbox_drained(Duration::from_secs(10)).await;
    let reached = s.origin.requests().len();
    let (admitted, refusals) = alternate_until_refused(&s, &[&keys[0], &keys[1]]).await;
    assert_eq!(admitted, 20, "one balance for both keys\n{}", s.edge.log());
    assert_eq!(refusals, ["credits_exhausted", "credits_exhausted"]);
    let seen = s.origin.requests();
    assert_eq!(seen.len() - reached, 20);
    assert!(
        seen[reached..].iter().all(|r| r
            .headers
            .get("x-metlo-identity")
            .is_some_and(|v| v == "acme")),
        "the origin is told the identity"
    );

    // A named limit instead of credits: both keys count against it.
    let r = s
        .cp
        .request(reqwest::Method::PATCH, "/api/v1/identities/acme", Some(&s.cp.admin_key))
        .json(&json!({"credits": null, "rateLimits": [{"name": "per-minute", "requests": 12, "periodSeconds": 60}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{:?}", r.text().await);
    s.cp.wait_outbox_drained(Duration::from_secs(10)).await;
    // The edge reads the new records within the revocation feed's bound; until then the
    // old ones admit nothing (their credits are spent), so every admission counts.
    let started = Instant::now();
    let mut admitted = 0;
    loop {
        let (n, refusals) = alternate_until_refused(&s, &[&keys[0], &keys[1]]).await;
        admitted += n;
        if refusals.iter().all(|e| e == "rate_limited") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "{refusals:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(admitted, 12, "one limit for both keys");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_costs_what_the_policy_names() {
    let s = stack().await;
    let r =
        s.cp.request(
            reqwest::Method::PUT,
            "/api/v1/policy",
            Some(&s.cp.admin_key),
        )
        .json(&json!({"default": "allow", "rules": [
            {"path": "/v1/search", "require": "search", "cost": 5},
            {"path": "/v1/free", "require": "search", "cost": 0},
            {"path": "/deny", "require": "nobody"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{:?}", r.text().await);
    let plain = s.cp.create_key("plain", "GENERIC").await;
    s.cp.wait_outbox_drained(Duration::from_secs(10)).await;
    let started = Instant::now();
    while s
        .edge
        .get("/deny", Some(&plain))
        .send()
        .await
        .unwrap()
        .status()
        != StatusCode::FORBIDDEN
    {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the policy never came"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) =
        s.cp.create(
            json!({"name": "searcher", "permissions": ["search"], "credits": {"remaining": 12}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let key = body["apiKey"].as_str().unwrap().to_owned();
    s.cp.wait_outbox_drained(Duration::from_secs(10)).await;
    let mut seen = vec![];
    for path in [
        "/v1/search",
        "/v1/search",
        "/v1/search",
        "/v1/free",
        "/v1/other",
        "/v1/other",
        "/v1/other",
    ] {
        seen.push((
            path,
            s.edge
                .get(path, Some(&key))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
        ));
    }
    assert_eq!(
        seen,
        [
            ("/v1/search", 200),
            ("/v1/search", 200),
            ("/v1/search", 429), // 2 left: not enough for 5
            ("/v1/free", 200),
            ("/v1/other", 200),
            ("/v1/other", 200),
            ("/v1/other", 429),
        ]
    );
}

/// The edge reports what it refused with the usage it already reports: a key's hourly
/// counts show its admitted and its refused requests by why, exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_reported_by_outcome() {
    let s = StackBuilder::new(Backend::Sqlite)
        .kv()
        .edge(&[("USAGE_REPORT_MS", "100")])
        .env("LAST_USED_FLUSH_SECONDS", "1")
        .build()
        .await;
    let key = metered(&s, "counted", json!({"remaining": 2})).await;
    let other = s.cp.create_key("other", "GENERIC").await;
    s.cp.wait_outbox_drained(Duration::from_secs(10)).await;
    let mut statuses = vec![];
    for _ in 0..4 {
        statuses.push(
            s.edge
                .get("/x", Some(&key))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
        );
    }
    assert_eq!(statuses, [200, 200, 429, 429]);
    // Requests of another key make the isolate send its report once it is due; the
    // control plane writes it within its flush interval.
    let started = Instant::now();
    loop {
        s.edge.get("/x", Some(&other)).send().await.unwrap();
        let (status, _, body) =
            s.cp.get("/api/v1/keys/counted/usage", Some(&s.cp.admin_key))
                .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let usage: Value = serde_json::from_str(&body).unwrap();
        if usage["refused"]["creditsExhausted"] == 2 {
            assert_eq!(usage["total"], 2, "{usage}");
            assert_eq!(usage["refused"]["rateLimited"], 0, "{usage}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "never reported: {usage}"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}
