//! Authorization at the edge (issue 30), under real `wrangler dev`: the route policy is
//! enforced by the Worker before the origin is called — a key with `orders:read` reads an
//! order and may not create one, and no spelling of a forbidden path (dot segments,
//! encodings, `//`, case, `;` parameters, a very long path) reaches the origin — and a
//! policy change applies at the edge within the revocation feed's bound; a Worker without
//! the feed reads the policy from KV.

use std::time::{Duration, Instant};

use metlo_tests::{Backend, Stack, StackBuilder, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The revocation feed's bound (twice its 1 s interval): what a policy change promises.
const BOUND: Duration = Duration::from_secs(2);

fn orders_policy() -> Value {
    json!({
        "default": "allow",
        "rules": [
            {"methods": ["GET"], "path": "/v1/orders/*", "require": "orders:read"},
            {"methods": ["POST"], "path": "/v1/orders", "require": "orders:write"},
            {"path": "/admin/**", "require": "admin"},
        ]
    })
}

async fn set_policy(s: &Stack, policy: Value) -> Value {
    let r =
        s.cp.request(
            reqwest::Method::PUT,
            "/api/v1/policy",
            Some(&s.cp.admin_key),
        )
        .json(&policy)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    r.json().await.unwrap()
}

async fn key_with(s: &Stack, name: &str, permissions: &[&str]) -> String {
    let (status, body) =
        s.cp.create(json!({"name": name, "permissions": permissions}))
            .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["apiKey"].as_str().unwrap().to_owned()
}

async fn send(s: &Stack, method: reqwest::Method, path: &str, key: &str) -> reqwest::Response {
    s.edge
        .client
        .request(method, format!("{}{path}", s.edge.url))
        .header("authorization", key)
        .send()
        .await
        .unwrap()
}

/// One request with `target` sent as written (reqwest would normalise it): the status.
async fn raw_status(edge_url: &str, method: &str, target: &str, key: &str) -> u16 {
    let addr = edge_url.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {key}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    // The status line is all this needs: read until it has come (the connection may
    // stay open whatever `Connection: close` says).
    let mut answer = Vec::new();
    let mut buf = [0u8; 512];
    while !answer.windows(2).any(|w| w == b"\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf))
            .await
            .expect("an answer within 20 s")
            .unwrap();
        assert!(n > 0, "closed before a status line for {target}");
        answer.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&answer);
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line for {target}: {text}"))
}

/// Polls until `done` holds; how long it took.
async fn until<F, Fut>(what: &str, limit: Duration, mut done: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if done().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_route_policy_is_enforced_at_the_edge_before_the_origin() {
    let s = StackBuilder::new(Backend::Sqlite)
        .kv()
        .edge(&[])
        .build()
        .await;
    let reader = key_with(&s, "reader", &["orders:read"]).await;
    let writer = key_with(&s, "writer", &["orders:read", "orders:write"]).await;
    s.cp.wait_outbox_drained(Duration::from_secs(10)).await;

    // No policy yet: any valid key reaches every route.
    let r = send(&s, reqwest::Method::POST, "/v1/orders", &reader).await;
    assert_eq!(r.status(), StatusCode::OK);

    // A policy change applies at the edge within the feed's bound.
    let set = set_policy(&s, orders_policy()).await;
    let took = until(
        "the policy at the edge",
        Duration::from_secs(10),
        || async {
            send(&s, reqwest::Method::POST, "/v1/orders", &reader)
                .await
                .status()
                == StatusCode::FORBIDDEN
        },
    )
    .await;
    println!(
        "policy version {} applied at the edge after {took:?}",
        set["version"]
    );
    assert!(took <= BOUND, "applied after {took:?}, promised {BOUND:?}");
    let promised =
        chrono::DateTime::parse_from_rfc3339(set["appliedEverywhereBy"].as_str().unwrap()).unwrap();
    assert!(promised > chrono::Utc::now() - chrono::Duration::seconds(60));

    // What each key may do.
    let r = send(
        &s,
        reqwest::Method::GET,
        "/v1/orders/1?expand=items",
        &reader,
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = send(&s, reqwest::Method::POST, "/v1/orders", &reader).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        r.headers()["www-authenticate"],
        r#"Bearer realm="metlo", error="insufficient_scope", scope="orders:write""#
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "forbidden");
    assert!(body["message"].is_string());
    let r = send(&s, reqwest::Method::POST, "/v1/orders", &writer).await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = send(&s, reqwest::Method::GET, "/elsewhere", &reader).await;
    assert_eq!(r.status(), StatusCode::OK, "the default allows");
    let seen_before_tricks = s.origin.requests().len();
    let last = s.origin.requests().last().unwrap().clone();
    assert_eq!(last.path_and_query, "/elsewhere");

    // Every spelling of a forbidden route is refused, and none reaches the origin.
    let long = format!("/admin/{}", "a".repeat(3000));
    let admin_tricks = [
        "/admin",
        "/admin/",
        "/admin/users",
        "/ADMIN/users",
        "/Admin",
        "/%61dmin",
        "/%41DMIN/x",
        "//admin",
        "/./admin",
        "/public/../admin",
        "/public/%2e%2e/admin",
        "/public/%2E%2E/admin",
        "/public/.%2e/admin",
        "/public/..;/admin",
        "/public;x/..;y/admin",
        "/admin;jsessionid=1",
        "/admin;/x",
        "/;x/admin",
        "/public%2F..%2Fadmin",
        "/public%2f..%2fadmin",
        "/public/%252e%252e/admin",
        "/public/%25%32%65%25%32%65/admin",
        "/admin%00",
        "/../../admin",
        "/a/b/../../admin/x",
        long.as_str(),
    ];
    for target in admin_tricks {
        for method in ["GET", "POST", "DELETE", "PROPFIND"] {
            let status = raw_status(&s.edge.url, method, target, &reader).await;
            assert!(
                [400, 403, 414, 431].contains(&status),
                "{method} {}: {status}",
                &target[..target.len().min(60)]
            );
        }
    }
    for target in [
        "/v1/orders/",
        "//v1/orders",
        "/V1/ORDERS",
        "/v1/x/../orders",
        "/v1/orders;x=1",
        "/v1/%6Frders",
        "/v1/orders/.",
    ] {
        let status = raw_status(&s.edge.url, "POST", target, &reader).await;
        assert_eq!(status, 403, "POST {target}");
    }
    // A method no rule names is refused even where the default allows; a method override
    // header must name an allowed method too.
    assert_eq!(
        raw_status(&s.edge.url, "PROPFIND", "/elsewhere", &reader).await,
        403
    );
    for header in [
        "X-HTTP-Method-Override",
        "x-http-method",
        "X-Method-Override",
    ] {
        let r = s
            .edge
            .client
            .get(format!("{}/v1/orders", s.edge.url))
            .header("authorization", &reader)
            .header(header, "post")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{header}");
    }
    let seen = s.origin.requests();
    assert_eq!(
        seen.len(),
        seen_before_tricks,
        "not one of them reached the origin: {:?}",
        seen[seen_before_tricks..]
            .iter()
            .map(|r| format!("{} {}", r.method, r.path_and_query))
            .collect::<Vec<_>>()
    );
    // What is allowed goes to the origin as it was checked: normalised.
    assert_eq!(
        raw_status(&s.edge.url, "GET", "/v1/x/../orders/%31", &reader).await,
        200
    );
    let last = s.origin.requests().last().unwrap().clone();
    assert_eq!(last.path_and_query, "/v1/orders/1");

    // A policy that denies by default, applied within the bound; then none again.
    set_policy(&s, json!({"default": "deny", "rules": [{"methods": ["GET"], "path": "/v1/orders/*", "require": "orders:read"}]})).await;
    let took = until(
        "default deny at the edge",
        Duration::from_secs(10),
        || async {
            send(&s, reqwest::Method::GET, "/elsewhere", &writer)
                .await
                .status()
                == StatusCode::FORBIDDEN
        },
    )
    .await;
    assert!(took <= BOUND, "{took:?}");
    let r = send(&s, reqwest::Method::GET, "/elsewhere", &writer).await;
    assert_eq!(
        r.headers()["www-authenticate"],
        r#"Bearer realm="metlo", error="insufficient_scope""#
    );
    set_policy(&s, json!({"default": "allow"})).await;
    until("no policy at the edge", Duration::from_secs(10), || async {
        send(&s, reqwest::Method::POST, "/v1/orders", &reader)
            .await
            .status()
            == StatusCode::OK
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_the_feed_reads_the_policy_from_kv() {
    let s = StackBuilder::new(Backend::Sqlite)
        .kv()
        .edge(&[("REVOCATION_FEED_INTERVAL_MS", "0")])
        .build()
        .await;
    let reader = key_with(&s, "reader", &["orders:read"]).await;
    set_policy(&s, orders_policy()).await;
    s.cp.wait_outbox_drained(Duration::from_secs(10)).await;
    assert!(
        s.edge.kv_get("policy").is_some(),
        "the outbox wrote it to KV"
    );
    until("the policy from KV", Duration::from_secs(30), || async {
        send(&s, reqwest::Method::POST, "/v1/orders", &reader)
            .await
            .status()
            == StatusCode::FORBIDDEN
    })
    .await;
    let r = send(&s, reqwest::Method::GET, "/v1/orders/7", &reader).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(s.origin.requests().iter().all(|r| r.method != "POST"));
}
