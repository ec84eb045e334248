//! Abuse resistance: what an attacker without an admin key can do to the service, each
//! answered with a bounded cost and the right status. Real control-plane binary over HTTP.

use std::time::{Duration, Instant};

use metlo_tests::{Backend, ControlPlane, StackBuilder, StatusCode};
use serde_json::json;
use sqlx::Connection;

/// SQLite's writer lock held by someone else past the busy timeout is an overload: 503
/// with `Retry-After` (it was a 500), and the create goes through once the lock is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_busy_is_503_with_retry_after() {
    let cp = ControlPlane::start_with(
        StackBuilder::new(Backend::Sqlite).env("SQLITE_BUSY_TIMEOUT_MS", 300),
    )
    .await;
    let url = format!("sqlite://{}", cp.sqlite_file().display());
    let mut other = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut other)
        .await
        .unwrap();
    let started = Instant::now();
    let r = cp
        .client
        .post(format!("{}/api/v1/keys/create", cp.url))
        .header("Authorization", &cp.admin_key)
        .json(&json!({"name": "waits", "keyFor": "GENERIC"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers()["retry-after"], "1");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "unavailable", "{body}");
    assert!(started.elapsed() < Duration::from_secs(5));
    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
    let (status, body) = cp
        .create(json!({"name": "waits", "keyFor": "GENERIC"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// Concurrent cache misses of one key share one database lookup: a burst of 200 calls
/// with the admin key on a cold cache costs one lookup, and none of them is refused at
/// the lookup bound (without sharing, 200 lookups queued behind 2 slots and some got 503).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_with_one_key_on_a_cold_cache_costs_one_lookup() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let cp =
            ControlPlane::start_with(StackBuilder::new(backend).env("MAX_CONCURRENT_LOOKUPS", 2))
                .await;
        assert_eq!(
            cp.metric("metlo_verify_lookups_total", "").await,
            0.0,
            "the admin key is not cached yet"
        );
        let list = format!("{}/api/v1/keys/list", cp.url);
        let statuses = futures::future::join_all((0..200).map(|_| {
            let request = cp.client.get(&list).header("Authorization", &cp.admin_key);
            async move { request.send().await.unwrap().status() }
        }))
        .await;
        assert!(
            statuses.iter().all(|s| *s == StatusCode::OK),
            "{backend:?}: {statuses:?}"
        );
        assert_eq!(
            cp.metric("metlo_verify_lookups_total", "").await,
            1.0,
            "{backend:?}: one lookup for the whole burst"
        );
    }
}

fn made_up_key() -> String {
    metlo_shared::ApiKey::generate()
        .unwrap()
        .expose_secret()
        .to_owned()
}

/// `GET /api/v1/verify` with a fresh made-up key, forwarded for `xff` (when given).
async fn verify_made_up(
    client: reqwest::Client,
    verify: String,
    xff: Option<String>,
) -> reqwest::Response {
    let mut request = client.get(&verify).header("Authorization", made_up_key());
    if let Some(xff) = xff {
        request = request.header("X-Forwarded-For", xff);
    }
    request.send().await.unwrap()
}

/// A client bound to another loopback address: another source, as far as the server
/// can tell.
fn client_from(ip: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(Some(ip.parse().unwrap()))
        .build()
        .unwrap()
}

/// Checksum-valid made-up keys: each source may fail `AUTH_FAILURES_PER_MINUTE` times,
/// then gets 429 with `Retry-After` and costs no lookup; another source, and a valid key
/// served from the cache, are not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_keys_are_limited_per_source() {
    let cp = ControlPlane::start_with(
        StackBuilder::new(Backend::Sqlite).env("AUTH_FAILURES_PER_MINUTE", 10),
    )
    .await;
    assert_eq!(cp.verify(&cp.client_key).await, StatusCode::OK);
    let verify = format!("{}/api/v1/verify", cp.url);
    for _ in 0..10 {
        let r = cp
            .client
            .get(&verify)
            .header("Authorization", made_up_key())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
    let misses = cp.metric("metlo_verify_cache_total", "miss").await;
    let lookups = cp.metric("metlo_verify_lookups_total", "").await;
    assert!(
        lookups >= 10.0,
        "each of the first ten was looked up: {lookups}"
    );
    for _ in 0..50 {
        let r = cp
            .client
            .get(&verify)
            .header("Authorization", made_up_key())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        let wait: u64 = r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=6).contains(&wait), "a token per 6 s at 10/min: {wait}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"], "too_many_requests");
    }
    // Bad shapes spend the same budget: no free failures.
    let r = cp.client.get(&verify).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        cp.metric("metlo_verify_cache_total", "miss").await - misses,
        50.0,
        "each made-up key missed the cache"
    );
    assert_eq!(
        cp.metric("metlo_auth_limited_total", "").await,
        51.0,
        "and none reached the database"
    );
    assert_eq!(
        cp.metric("metlo_verify_lookups_total", "").await,
        lookups,
        "no database lookup past the budget"
    );
    // The valid key, from the cache, from the limited source: untouched.
    assert_eq!(cp.verify(&cp.client_key).await, StatusCode::OK);
    // Past its cache entry it is looked up again: a key valid lately skips the budget.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(cp.verify(&cp.client_key).await, StatusCode::OK);
    // A valid key not seen lately, from this source, waits for the budget like the rest.
    assert_eq!(
        cp.verify(&cp.admin_key).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Another source has its own budget.
    let other = client_from("127.0.0.2");
    let r = other
        .get(&verify)
        .header("Authorization", made_up_key())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

/// `X-Forwarded-For` names the source only when the peer is a trusted proxy; from any
/// other peer a forged header changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_is_believed_only_from_trusted_proxies() {
    let cp = ControlPlane::start_with(
        StackBuilder::new(Backend::Sqlite)
            .env("AUTH_FAILURES_PER_MINUTE", 5)
            .env("TRUSTED_PROXIES", "127.0.0.1/32, ::1"),
    )
    .await;
    let verify = format!("{}/api/v1/verify", cp.url);
    let fail = |client: reqwest::Client, xff: &'static str| {
        let verify = verify.clone();
        async move {
            verify_made_up(client, verify, Some(xff.to_owned()))
                .await
                .status()
        }
    };
    // Through the trusted proxy: one budget per forwarded client.
    for _ in 0..5 {
        assert_eq!(
            fail(cp.client.clone(), "203.0.113.5").await,
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(
        fail(cp.client.clone(), "203.0.113.5").await,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        fail(cp.client.clone(), "198.51.100.1, 203.0.113.5").await,
        StatusCode::TOO_MANY_REQUESTS,
        "what the client prepends is not its address"
    );
    assert_eq!(
        fail(cp.client.clone(), "203.0.113.6").await,
        StatusCode::UNAUTHORIZED
    );
    // From an untrusted peer, a fresh forged address every time does not help.
    let untrusted = client_from("127.0.0.3");
    let forged = [
        "192.0.2.1",
        "192.0.2.2",
        "192.0.2.3",
        "192.0.2.4",
        "192.0.2.5",
        "192.0.2.6",
    ];
    let mut statuses = vec![];
    for xff in forged {
        statuses.push(fail(untrusted.clone(), xff).await);
    }
    assert_eq!(statuses[..5], [StatusCode::UNAUTHORIZED; 5]);
    assert_eq!(statuses[5], StatusCode::TOO_MANY_REQUESTS);
}

/// At most `MAX_CONCURRENT_LOOKUPS` lookups of uncached keys at once: with the one
/// allowed stuck (its table locked), a flood from many sources gets fast 503s instead
/// of queueing on the pool, and a valid key from the cache still passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_lookups_are_bounded() {
    let db = metlo_tests::fresh_postgres_database().await;
    let cp = ControlPlane::start_with(
        StackBuilder::new(Backend::Postgres)
            .env("DATABASE_URL", &db)
            .env("MAX_CONCURRENT_LOOKUPS", 1)
            .env("TRUSTED_PROXIES", "127.0.0.1"),
    )
    .await;
    assert_eq!(cp.verify(&cp.client_key).await, StatusCode::OK);
    // A key the edge has not asked for yet: its `by-hash` lookup will miss the cache.
    // (The edge's own key is known: the Worker calls all the time.)
    let uncached = cp.create_key("not cached", "GENERIC").await;
    let made_up_hash = metlo_shared::ApiKey::generate().unwrap().hash().to_hex();
    let (status, _, _) = cp
        .get(
            &format!("/api/v1/keys/by-hash/{made_up_hash}"),
            Some(&cp.edge_key),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let uncached_hash = metlo_shared::ApiKey::parse(&uncached)
        .unwrap()
        .hash()
        .to_hex();
    let mut locker = sqlx::PgConnection::connect(&db).await.unwrap();
    sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
    sqlx::query("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE")
        .execute(&mut locker)
        .await
        .unwrap();
    let verify = format!("{}/api/v1/verify", cp.url);
    // The one lookup allowed, stuck behind the lock.
    let stuck = tokio::spawn({
        let (client, verify) = (cp.client.clone(), verify.clone());
        async move {
            client
                .get(&verify)
                .header("Authorization", made_up_key())
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    // Time for the slow lookups to be sent and take the gate's slots (nothing to watch
    // from outside: they are in flight by design).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let flood = (0..20).map(|i| {
        verify_made_up(
            cp.client.clone(),
            verify.clone(),
            Some(format!("198.51.100.{i}")),
        )
    });
    for r in futures::future::join_all(flood).await {
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()["retry-after"], "1");
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused after a short wait, not queued: {:?}",
        started.elapsed()
    );
    assert_eq!(cp.verify(&cp.client_key).await, StatusCode::OK, "cached");
    assert_eq!(cp.metric("metlo_lookups_refused_total", "").await, 20.0);
    // The edge's lookups have a gate of their own: with the public one full, a KV miss
    // at the edge waits for the database (locked here) instead of getting a 503.
    let lookups_before = cp.metric("metlo_verify_lookups_total", "").await;
    let by_hash = tokio::spawn({
        let (client, url, key) = (
            cp.client.clone(),
            format!("{}/api/v1/keys/by-hash/{uncached_hash}", cp.url),
            cp.edge_key.clone(),
        );
        async move {
            client
                .get(&url)
                .header("Authorization", key)
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    // Until it is past the gate and waiting on the lock (counted), or answered (a 503).
    let deadline = Instant::now() + Duration::from_secs(10);
    while cp.metric("metlo_verify_lookups_total", "").await <= lookups_before
        && !by_hash.is_finished()
    {
        assert!(Instant::now() < deadline, "the edge's lookup went nowhere");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    assert_eq!(stuck.await.unwrap(), StatusCode::UNAUTHORIZED);
    assert_eq!(by_hash.await.unwrap(), StatusCode::OK);
}

// Failed authentications filed by network, and edge usage reports: in process, in
// control-plane/src/http/auth_tests.rs and usage_tests.rs.

metlo_tests::on_both_backends!(slow_clients_cannot_hold_connections);

/// One whole HTTP/1.1 response (head and its `Content-Length` body) from `stream`.
async fn read_response(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if got.len() >= end + 4 + length {
                return text;
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("an answer within 5 s")
            .expect("read");
        assert!(n > 0, "closed before a whole answer: {text}");
        got.extend_from_slice(&buf[..n]);
    }
}

/// A client sending its request head slowly, or nothing at all, is dropped after
/// `HEADER_READ_TIMEOUT_SECONDS` (both used to hold their connection for as long as they
/// liked), one sending its body slowly is answered 408 after `REQUEST_TIMEOUT_SECONDS`,
/// and past `MAX_CONNECTIONS` new connections wait to be accepted until one closes.
async fn slow_clients_cannot_hold_connections(backend: Backend) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cp = ControlPlane::start_with(
        StackBuilder::new(backend)
            .env("HEADER_READ_TIMEOUT_SECONDS", 1)
            .env("REQUEST_TIMEOUT_SECONDS", 2)
            .env("MAX_CONNECTIONS", 4),
    )
    .await;
    let addr = cp.url.trim_start_matches("http://").to_owned();

    // Slowloris: a header line every 300 ms, never the blank line that ends the head.
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let closed = loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if slow.write_all(b"X-Slow: 1\r\n").await.is_err() {
            break started.elapsed();
        }
        let mut buf = [0u8; 512];
        match tokio::time::timeout(Duration::from_millis(1), slow.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break started.elapsed(),
            Ok(Ok(_)) => {} // a 408 before the close is fine
            Err(_) => {}
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a slow client still holds its connection"
        );
    };
    assert!(closed >= Duration::from_millis(900), "{closed:?}");

    // The header timeout is per request head, not per connection: a keep-alive client
    // asking every 600 ms is served for longer than the timeout, and a slow head on that
    // same connection afterwards still gets its whole second (the connection's timer,
    // armed for an earlier head, is carried forward, not fired early or forgotten).
    let mut kept = tokio::net::TcpStream::connect(&addr).await.unwrap();
    for i in 0..6 {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
        kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let answer = read_response(&mut kept).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "request {i}: {answer}");
    }
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 512];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), kept.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => {} // a 408 before the close is fine
            Err(_) => panic!("a slow head on a kept-alive connection was never timed out"),
        }
    }
    let closed = started.elapsed();
    assert!(
        closed >= Duration::from_millis(900) && closed < Duration::from_secs(3),
        "{closed:?}"
    );

    // A whole head, then a body that trickles: past `REQUEST_TIMEOUT_SECONDS` a JSON 408
    // (the header timeout no longer applies once the head is read).
    let mut trickle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /api/v1/keys/create HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{",
        cp.admin_key
    );
    trickle.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    while started.elapsed() < Duration::from_secs(6) {
        let _ = trickle.write_all(b" ").await;
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(Duration::from_millis(300), trickle.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
        if answer.ends_with(b"}") {
            break;
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""error":"request_timeout""#), "{answer}");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1900), "{took:?}");
    drop(trickle);

    // Four connections that send nothing fill the cap; a fifth request waits until the
    // timeout frees them, then is served.
    let mut idle = vec![];
    for _ in 0..4 {
        idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let r = reqwest::Client::new()
        .get(format!("{}/healthz", cp.url))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(500),
        "served at once although every slot was taken: {waited:?}"
    );
    drop(idle);
}
