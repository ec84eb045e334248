//! The control plane pushes key updates to Workers KV through its transactional outbox:
//! real control plane, real PostgreSQL, the local KV API stand-in and the edge under real
//! `wrangler dev`, sharing one local KV.

use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, Instant};

use metlo_shared::{ApiKey, KeyRecord};
use metlo_tests::time::{iso, ms_of, now_ms, sleep_until};
use metlo_tests::{on_both_backends, Backend, ControlPlane, Stack, StackBuilder, StatusCode};
use serde_json::Value;

// The outbox is written in the key's own transaction on both stores.
on_both_backends!(
    created_key_is_in_kv_before_its_first_edge_request,
    kv_outage_loses_nothing_and_resurrects_nothing,
    outbox_survives_sigkill,
    unsuccessful_keys_of_a_bulk_call_are_sent_again,
);

type Full = Stack;

async fn full(backend: Backend, edge_vars: &[(&str, &str)]) -> Full {
    full_with(backend, edge_vars, &[]).await
}

/// `cp_env`: extra control-plane settings.
async fn full_with(backend: Backend, edge_vars: &[(&str, &str)], cp_env: &[(&str, &str)]) -> Full {
    cp_env
        .iter()
        .fold(
            StackBuilder::new(backend).kv().edge(edge_vars),
            |b, (k, v)| b.env(k, v),
        )
        .build()
        .await
}

fn hash(key: &str) -> String {
    ApiKey::parse(key).unwrap().hash().to_hex()
}

/// The hashes of every key the control plane holds, from its own by-hash route.
async fn live_hashes(cp: &ControlPlane, candidates: &[String]) -> BTreeSet<String> {
    let mut live = BTreeSet::new();
    for h in candidates {
        let (status, _, _) = cp
            .get(&format!("/api/v1/keys/by-hash/{h}"), Some(&cp.edge_key))
            .await;
        if status == StatusCode::OK {
            live.insert(h.clone());
        }
    }
    live
}

async fn created_key_is_in_kv_before_its_first_edge_request(backend: Backend) {
    let s = full(backend, &[]).await;
    let key = s.cp.create_key("fresh", "ONBOARDING").await;
    let took = s.cp.wait_outbox_drained(Duration::from_secs(10)).await;
    println!("create → outbox drained in {took:?}");
    let stored = s.edge.kv_get(&hash(&key)).expect("the record is in KV");
    let record = KeyRecord::from_json(stored.as_bytes()).unwrap();
    assert_eq!(record.name, "fresh");
    // With the sync on, the edge may keep what it looks up as long as pushed records live.
    let (_, headers, _) =
        s.cp.get(
            &format!("/api/v1/keys/by-hash/{}", hash(&key)),
            Some(&s.cp.edge_key),
        )
        .await;
    assert_eq!(headers["x-metlo-kv-ttl-seconds"], "86400");
    let calls_before = s.cp.metric("http_requests_total", "by-hash").await;
    let r = s.edge.get("/first", Some(&key)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        s.origin.requests()[0].headers_source(),
        "kv",
        "served from KV"
    );
    assert_eq!(
        s.cp.metric("http_requests_total", "by-hash").await,
        calls_before,
        "no control-plane call"
    );
}

/// Waits until `key` gets `want` at the edge; returns how long that took.
async fn edge_until(s: &Full, key: &str, want: StatusCode, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let status = s.edge.get("/", Some(key)).send().await.unwrap().status();
        if status == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() <= within,
            "still {status} at the edge after {within:?}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `meta` the origin got with the latest request: the header decoded.
fn origin_meta(s: &Full) -> Option<String> {
    use base64::Engine;
    let seen = s.origin.requests();
    let header = seen.last()?.headers.get("x-metlo-key-meta")?.clone();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .expect("base64url without padding");
    Some(String::from_utf8(bytes).expect("UTF-8 JSON"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_and_disable_reach_the_edge() {
    let s = full(Backend::Postgres, &[]).await;
    let meta =
        serde_json::json!({"tenant": "ačme \"quoted\" ✓ 日本", "plan": {"tier": 3}, "q": "a'b\\c"});
    let (status, body) =
        s.cp.create(serde_json::json!({"name": "tenant", "meta": meta}))
            .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let key = body["apiKey"].as_str().unwrap().to_owned();
    s.cp.wait_outbox_drained(Duration::from_secs(10)).await;
    edge_until(&s, &key, StatusCode::OK, Duration::ZERO).await;
    // Byte-exact: the compact JSON the control plane stored and lists.
    let forwarded = origin_meta(&s).expect("meta forwarded");
    assert_eq!(forwarded, serde_json::to_string(&meta).unwrap());
    assert_eq!(serde_json::from_str::<Value>(&forwarded).unwrap(), meta);
    // A client cannot forge it: its own header is dropped, and a key without meta sends none.
    let plain = s.cp.create_key("plain", "GENERIC").await;
    s.cp.wait_outbox_drained(Duration::from_secs(10)).await;
    let r = s
        .edge
        .get("/", Some(&plain))
        .header("X-Metlo-Key-Meta", "eyJ0ZW5hbnQiOiJldmlsIn0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(origin_meta(&s), None, "no meta, and the client's dropped");

    // A change of meta reaches the origin without a new key.
    let (status, _) =
        s.cp.patch("tenant", serde_json::json!({"meta": {"tenant": "b"}}))
            .await;
    assert_eq!(status, StatusCode::OK);
    let started = Instant::now();
    loop {
        edge_until(&s, &key, StatusCode::OK, Duration::ZERO).await;
        if origin_meta(&s).as_deref() == Some(r#"{"tenant":"b"}"#) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "new meta not at the edge"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("meta change → at the origin in {:?}", started.elapsed());

    // Disable: refused within the revocation bound, as a deleted key is; the KV record goes.
    let (status, _) =
        s.cp.patch("tenant", serde_json::json!({"enabled": false}))
            .await;
    assert_eq!(status, StatusCode::OK);
    let took = edge_until(&s, &key, StatusCode::UNAUTHORIZED, Duration::from_secs(1)).await;
    println!("disable → 401 at the edge in {took:?}");
    s.cp.wait_outbox_drained(Duration::from_secs(10)).await;
    assert!(s.edge.kv_get(&hash(&key)).is_none(), "KV record deleted");
    // Enable: back once the edge's memory of the refusal (ISOLATE_MISS_MS, 5 s) is over.
    let (status, _) =
        s.cp.patch("tenant", serde_json::json!({"enabled": true}))
            .await;
    assert_eq!(status, StatusCode::OK);
    let took = edge_until(&s, &key, StatusCode::OK, Duration::from_secs(8)).await;
    println!("enable → 200 at the edge in {took:?}");
    s.cp.wait_outbox_drained(Duration::from_secs(10)).await;
    assert!(s.edge.kv_get(&hash(&key)).is_some(), "KV record back");
}

/// A key limited to 3 per 2 s, through `wrangler dev` (its record from KV, its count in
/// the key's Durable Object): exactly 3 requests reach the origin, then 429 with
/// `Retry-After`, `RateLimit-Policy` and `RateLimit` and no origin call; after
/// `Retry-After`, a new window. An unlimited key is unaffected and gets no such headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_at_the_edge() {
    let s = full(Backend::Postgres, &[]).await;
    let (status, body) = s
        .cp
        .create(serde_json::json!({"name": "metered", "rateLimit": {"requests": 3, "periodSeconds": 2}}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let key = body["apiKey"].as_str().unwrap().to_owned();
    let free = s.cp.create_key("free", "GENERIC").await;
    s.cp.wait_outbox_drained(Duration::from_secs(10)).await;
    let record = s
        .edge
        .kv_get(&hash(&key))
        .expect("the limited key's record in KV");
    assert!(
        record.contains(r#""v":2"#) && record.contains(r#""rateLimit""#),
        "{record}"
    );

    let header = |r: &reqwest::Response, name: &str| {
        r.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let reached = s.origin.requests().len();
    let mut seen = vec![];
    let mut last = None;
    for _ in 0..5 {
        let r = s.edge.get("/metered", Some(&key)).send().await.unwrap();
        seen.push((r.status(), header(&r, "ratelimit")));
        last = Some(r);
    }
    let last = last.unwrap();
    assert_eq!(
        seen.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::TOO_MANY_REQUESTS
        ],
        "{seen:?}\n{}",
        s.edge.log()
    );
    assert_eq!(
        s.origin.requests().len() - reached,
        3,
        "refused requests never reach the origin"
    );
    for (i, (_, rate)) in seen.iter().take(3).enumerate() {
        let rate = rate.as_deref().expect("RateLimit on the origin's answers");
        assert!(
            rate.starts_with(&format!(r#""key";r={};t="#, 2 - i)),
            "{rate}"
        );
    }
    let retry: u64 = header(&last, "retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    assert_eq!(
        header(&last, "ratelimit-policy").unwrap(),
        r#""key";q=3;w=2"#
    );
    assert_eq!(
        header(&last, "ratelimit").unwrap(),
        format!(r#""key";r=0;t={retry}"#)
    );
    assert_eq!(header(&last, "content-type").unwrap(), "application/json");
    let body: Value = last.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited");

    for _ in 0..8 {
        let r = s.edge.get("/free", Some(&free)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert!(r.headers().get("ratelimit").is_none());
    }

    tokio::time::sleep(Duration::from_secs(retry)).await;
    let r = s.edge.get("/metered", Some(&key)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "a new window");
    assert!(header(&r, "ratelimit")
        .unwrap()
        .starts_with(r#""key";r=2;"#));
}

/// A flood of checksum-valid made-up keys through `wrangler dev` from one client, while a
/// valid key (in KV) keeps calling from the same client: the valid key never fails, the
/// control plane sees at most MISS_LIMITER's limit of lookups from that client, and the
/// rest are 429s answered at the edge. Another client keeps its own budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_key_flood_costs_the_client_not_the_control_plane() {
    const LIMIT: usize = 20;
    const FLOOD: usize = 300;
    let s = full(Backend::Postgres, &[("MISS_LIMIT", &LIMIT.to_string())]).await;
    let valid = s.cp.create_key("steady", "GENERIC").await;
    s.cp.wait_outbox_drained(Duration::from_secs(10)).await;
    // The local rate-limit binding counts in fixed windows of the epoch's minutes: a flood
    // across a window's end would get two budgets. Start it well inside one.
    let into_minute = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        % 60_000;
    if into_minute > 40_000 {
        tokio::time::sleep(Duration::from_millis((60_000 - into_minute + 200) as u64)).await;
    }
    let lookups_before = s.cp.metric("metlo_verify_lookups_total", "").await;
    let attacker = "203.0.113.7";

    let flood = async {
        let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
        let started = Instant::now();
        for chunk in (0..FLOOD).collect::<Vec<_>>().chunks(10) {
            let answers = futures::future::join_all(chunk.iter().map(|_| {
                let key = ApiKey::generate().unwrap();
                s.edge
                    .get("/flood", Some(key.expose_secret()))
                    .header("CF-Connecting-IP", attacker)
                    .send()
            }))
            .await;
            for r in answers {
                *statuses.entry(r.unwrap().status().as_u16()).or_default() += 1;
            }
        }
        (statuses, started.elapsed())
    };
    let steady = async {
        let mut results = vec![];
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(3) || results.len() < 50 {
            let r = s
                .edge
                .get("/steady", Some(&valid))
                .header("CF-Connecting-IP", attacker)
                .send()
                .await
                .unwrap();
            results.push(r.status());
        }
        results
    };
    let ((statuses, took), steady) = tokio::join!(flood, steady);
    let lookups = s.cp.metric("metlo_verify_lookups_total", "").await - lookups_before;
    let ok = steady.iter().filter(|s| **s == StatusCode::OK).count();
    println!(
        "flood of {FLOOD} made-up keys in {took:?}: {statuses:?}; valid key {ok}/{} OK; \
         control-plane lookups {lookups} (limit {LIMIT})",
        steady.len()
    );
    assert_eq!(ok, steady.len(), "the valid key never fails: {steady:?}");
    // (One more: the Worker's own key, the first time it authenticates.)
    assert!(
        lookups <= LIMIT as f64 + 1.0,
        "{lookups} lookups for a limit of {LIMIT}"
    );
    // Within the budget: looked up (401), or refused by the isolate's bound on lookups in
    // flight (503: ten at a time against a bound of eight).
    let count = |status: u16| statuses.get(&status).copied().unwrap_or(0);
    assert_eq!(count(401) + count(503), LIMIT, "{statuses:?}");
    assert_eq!(count(429), FLOOD - LIMIT, "{statuses:?}");

    let r = s
        .edge
        .get("/flood", Some(ApiKey::generate().unwrap().expose_secret()))
        .header("CF-Connecting-IP", attacker)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.headers()["retry-after"], "60");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "too_many_requests");
    let other = s
        .edge
        .get("/flood", Some(ApiKey::generate().unwrap().expose_secret()))
        .header("CF-Connecting-IP", "198.51.100.9")
        .send()
        .await
        .unwrap();
    assert_eq!(
        other.status(),
        StatusCode::UNAUTHORIZED,
        "another client has its own budget"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_key_is_refused_at_the_edge_within_a_second() {
    // Default settings: keys in active use sit in the isolate cache for up to 500 ms, so
    // the whole path — drain, KV delete, isolate expiry — stays inside one second.
    let s = full(Backend::Postgres, &[]).await;
    let mut times = vec![];
    for trial in 0..50 {
        let name = format!("trial-{trial}");
        let key = s.cp.create_key(&name, "GENERIC").await;
        s.cp.wait_outbox_drained(Duration::from_secs(10)).await;
        assert_eq!(
            s.edge.get("/", Some(&key)).send().await.unwrap().status(),
            StatusCode::OK
        );
        assert_eq!(
            s.cp.delete(&name, Some(&s.cp.admin_key)).await.0,
            StatusCode::OK
        );
        let deleted = Instant::now();
        loop {
            let status = s.edge.get("/", Some(&key)).send().await.unwrap().status();
            if status == StatusCode::UNAUTHORIZED {
                break;
            }
            assert_eq!(status, StatusCode::OK);
            assert!(
                deleted.elapsed() <= Duration::from_secs(1),
                "trial {trial}: still accepted after 1 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        times.push(deleted.elapsed());
    }
    times.sort();
    let pct = |p: f64| times[((times.len() as f64 * p).ceil() as usize).saturating_sub(1)];
    println!(
        "revocation at the edge over {} trials (DELETE response → first 401): p50 {:?}, p99 {:?}, max {:?}",
        times.len(),
        pct(0.50),
        pct(0.99),
        times[times.len() - 1]
    );
    assert!(times.iter().all(|t| *t <= Duration::from_secs(1)));
}

async fn kv_outage_loses_nothing_and_resurrects_nothing(backend: Backend) {
    let mut s = full(backend, &[]).await;
    let mut all = vec![hash(&s.cp.client_key)];
    let mut keys = vec![];
    for i in 0..6 {
        let key = s.cp.create_key(&format!("before-{i}"), "GENERIC").await;
        all.push(hash(&key));
        keys.push(key);
    }
    s.cp.wait_outbox_drained(Duration::from_secs(10)).await;

    // The target refuses connections for a while; creates and deletes go on.
    s.kv.stop();
    for i in 0..6 {
        let key = s.cp.create_key(&format!("during-{i}"), "GENERIC").await;
        all.push(hash(&key));
    }
    for name in ["before-0", "before-1", "during-0", "during-1"] {
        assert_eq!(
            s.cp.delete(name, Some(&s.cp.admin_key)).await.0,
            StatusCode::OK
        );
    }
    // Until the drainer has tried and failed (its error is shown).
    let ready = metlo_tests::time::wait_for(
        "the KV error in /readyz",
        Duration::from_secs(10),
        || async {
            let (_, ready) = s.cp.ops_get("/readyz").await;
            let ready: Value = serde_json::from_str(&ready).unwrap();
            ready["kvSync"]["lastError"].is_string().then_some(ready)
        },
    )
    .await;
    assert!(
        ready["kvSync"]["outboxDepth"].as_i64().unwrap() > 0,
        "{ready}"
    );
    assert!(
        ready["kvSync"]["lastError"].is_string(),
        "the failure is reported: {ready}"
    );

    // Back, but answering 5xx and 429 for a while.
    s.kv.restart().await;
    s.kv.inject_faults(503, 3).await;
    s.cp.wait_outbox_drained(Duration::from_secs(60)).await;
    s.kv.inject_faults(429, 1).await;
    s.cp.create_key("after", "GENERIC").await;
    s.cp.wait_outbox_drained(Duration::from_secs(60)).await;

    let worker = s.edge.kv_keys();
    let kv: BTreeSet<String> = worker.into_iter().collect();
    let mut candidates = all.clone();
    candidates.extend(kv.iter().cloned());
    let live = live_hashes(&s.cp, &candidates).await;
    assert_eq!(kv, live, "KV holds exactly the live keys");
    for name in ["before-0", "during-1"] {
        let (status, _) = s.cp.delete(name, Some(&s.cp.admin_key)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{name} stays deleted");
    }
    let errors = s.cp.metric("metlo_kv_sync_errors_total", "").await;
    assert!(errors >= 2.0, "failures were retried ({errors})");
}

/// The KV API answers too slowly: requests time out and are retried, and nothing is lost.
/// A timed-out put may still be applied by the API *after* the key's delete (the stand-in
/// does so on purpose); the delete's echo removes it again, so KV ends with exactly the
/// live keys and the edge refuses the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_kv_target_times_out_and_late_writes_are_undone() {
    let s = full_with(
        Backend::Postgres,
        &[],
        &[
            ("KV_SYNC_TIMEOUT_MS", "500"),
            ("KV_SYNC_DELETE_ECHO_SECONDS", "4"),
        ],
    )
    .await;
    s.cp.wait_outbox_drained(Duration::from_secs(10)).await;
    let mut all = vec![hash(&s.cp.client_key)];

    // The first put hangs for 3 s (then lands anyway); the retry goes through.
    s.kv.inject_delay(Duration::from_secs(3), 1).await;
    let doomed = s.cp.create_key("doomed", "GENERIC").await;
    let doomed_hash = hash(&doomed);
    all.push(doomed_hash.clone());
    for i in 0..3 {
        all.push(hash(
            &s.cp.create_key(&format!("slow-{i}"), "GENERIC").await,
        ));
    }
    s.cp.wait_outbox_drained(Duration::from_secs(20)).await;
    assert!(s.edge.kv_get(&doomed_hash).is_some());
    assert!(
        s.cp.log().contains("KV API did not answer in time"),
        "the timeout is logged"
    );
    assert_eq!(
        s.cp.delete("doomed", Some(&s.cp.admin_key)).await.0,
        StatusCode::OK
    );
    let deleted_at = Instant::now();

    // Wait for the hung put to land (the stand-in counts it when it does).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = s.kv.stats().await;
        let puts = stats["puts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| h.as_str() == Some(doomed_hash.as_str()))
            .count();
        if puts >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the late put never landed: {stats}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Whether it landed before or after the first delete, the echo leaves KV without it.
    let deadline = deleted_at + Duration::from_secs(10);
    while s.edge.kv_get(&doomed_hash).is_some() {
        assert!(Instant::now() < deadline, "a late put outlived the delete");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "slow KV target: deleted key gone from KV {:?} after its delete (echo after 4 s)",
        deleted_at.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    let r = s.edge.get("/", Some(&doomed)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    s.cp.wait_outbox_drained(Duration::from_secs(20)).await;
    let kv: BTreeSet<String> = s.edge.kv_keys().into_iter().collect();
    let mut candidates = all.clone();
    candidates.extend(kv.iter().cloned());
    assert_eq!(kv, live_hashes(&s.cp, &candidates).await, "nothing lost");
    assert!(s.cp.metric("metlo_kv_sync_errors_total", "").await >= 1.0);
}

/// Cloudflare's bulk calls may succeed as a whole while listing `unsuccessful_keys`:
/// those updates stay in the outbox and are sent again (they used to be dropped).
async fn unsuccessful_keys_of_a_bulk_call_are_sent_again(backend: Backend) {
    let s = full(backend, &[]).await;
    s.cp.wait_outbox_drained(Duration::from_secs(10)).await;
    s.kv.inject_unsuccessful(1, 1).await;
    let key = s.cp.create_key("partly", "GENERIC").await;
    s.cp.wait_outbox_drained(Duration::from_secs(10)).await;
    assert!(
        s.kv.kv_get(&hash(&key)).is_some(),
        "the put left out once was sent again"
    );
    let stats = s.kv.stats().await;
    let puts = stats["puts"].as_array().unwrap();
    assert_eq!(
        puts.iter().filter(|k| **k == hash(&key)).count(),
        1,
        "applied once: {stats}"
    );
    assert!(stats["putRequests"].as_u64().unwrap() >= 3, "{stats}");
    let (_, metrics) = s.cp.ops_get("/metrics").await;
    assert!(
        metrics.contains("metlo_kv_sync_errors_total"),
        "counted as an error"
    );

    s.kv.inject_unsuccessful(1, 1).await;
    let (status, _) = s.cp.delete("partly", Some(&s.cp.admin_key)).await;
    assert_eq!(status, StatusCode::OK);
    s.cp.wait_outbox_drained(Duration::from_secs(10)).await;
    assert!(
        s.kv.kv_get(&hash(&key)).is_none(),
        "the delete was sent again"
    );
}

async fn outbox_survives_sigkill(backend: Backend) {
    let mut s = full(backend, &[]).await;
    s.cp.wait_outbox_drained(Duration::from_secs(10)).await;
    s.kv.stop();
    let mut created = vec![hash(&s.cp.client_key)];
    for i in 0..5 {
        created.push(hash(&s.cp.create_key(&format!("pending-{i}"), "AWS").await));
    }
    s.cp.delete("pending-0", Some(&s.cp.admin_key)).await;
    let (_, ready) = s.cp.ops_get("/readyz").await;
    assert!(!ready.contains(r#""outboxDepth":0"#), "{ready}");

    s.cp.kill();
    s.kv.restart().await;
    s.cp.restart();
    s.cp.wait_outbox_drained(Duration::from_secs(30)).await;
    let kv: BTreeSet<String> = s.edge.kv_keys().into_iter().collect();
    let mut candidates = created.clone();
    candidates.extend(kv.iter().cloned());
    assert_eq!(kv, live_hashes(&s.cp, &candidates).await);
    assert!(
        !kv.contains(&created[1]),
        "the deleted key's record is gone"
    );
    assert!(kv.contains(&created[2]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_send_every_update_exactly_once() {
    let s = StackBuilder::new(Backend::Postgres).kv().build().await;
    let (kv, a) = (&s.kv, &s.cp);
    let b = a.replica().await;
    a.wait_outbox_drained(Duration::from_secs(10)).await;
    reqwest::Client::new()
        .post(format!("{}/__stats", kv.url))
        .send()
        .await
        .unwrap();

    let names: Vec<String> = (0..60).map(|i| format!("k{i}")).collect();
    let created = futures::future::join_all(names.iter().enumerate().map(|(i, n)| {
        let cp = if i % 2 == 0 { a } else { &b };
        async move { hash(&cp.create_key(n, "GENERIC").await) }
    }))
    .await;
    futures::future::join_all(names.iter().take(30).enumerate().map(|(i, n)| {
        let cp = if i % 2 == 0 { &b } else { a };
        async move { assert_eq!(cp.delete(n, Some(&cp.admin_key)).await.0, StatusCode::OK) }
    }))
    .await;
    a.wait_outbox_drained(Duration::from_secs(30)).await;

    let stats = kv.stats().await;
    let puts: Vec<String> = stats["puts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    let deletes: Vec<String> = stats["deletes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    let unique_puts: HashSet<&String> = puts.iter().collect();
    let unique_deletes: HashSet<&String> = deletes.iter().collect();
    assert_eq!(unique_puts.len(), puts.len(), "no put sent twice");
    assert_eq!(unique_deletes.len(), deletes.len(), "no delete sent twice");
    // A key deleted before its put was sent may be coalesced to the delete alone.
    for (i, h) in created.iter().enumerate() {
        if i < 30 {
            assert!(deletes.contains(h), "delete of k{i} sent");
        } else {
            assert!(puts.contains(h), "put of k{i} sent");
        }
    }
    assert!(puts.len() + deletes.len() <= 90);
    let drained_by_both = a.metric("metlo_kv_sync_sent_total", "").await
        + b.metric("metlo_kv_sync_sent_total", "").await;
    println!(
        "two replicas: {} put and {} delete requests, {} keys put, {} deleted; sent by A+B: {drained_by_both}",
        stats["putRequests"],
        stats["deleteRequests"],
        puts.len(),
        deletes.len()
    );
    let kv_keys: BTreeSet<String> = kv.kv_keys().into_iter().collect();
    let mut candidates = created.clone();
    candidates.push(hash(&a.client_key));
    candidates.extend(kv_keys.iter().cloned());
    assert_eq!(kv_keys, live_hashes(a, &candidates).await);
}

async fn edge_status(s: &Full, key: &str) -> StatusCode {
    s.edge.get("/", Some(key)).send().await.unwrap().status()
}

/// An expiring key: its KV entry's TTL never outlives it, and the edge refuses it from
/// the second it expires (the record carries the expiry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_at_the_edge() {
    let s = full(Backend::Postgres, &[]).await;
    let end = (now_ms() + 3000 + 999) / 1000 * 1000;
    let (status, short) =
        s.cp.create(serde_json::json!({"name": "short", "expiresAt": iso(end)}))
            .await;
    assert_eq!(status, StatusCode::OK, "{short}");
    let hour = (now_ms() + 3_600_000) / 1000 * 1000;
    let (_, long) =
        s.cp.create(serde_json::json!({"name": "long", "expiresAt": iso(hour)}))
            .await;
    let forever = s.cp.create_key("forever", "GENERIC").await;
    s.cp.wait_outbox_drained(Duration::from_secs(10)).await;
    let short_key = short["apiKey"].as_str().unwrap().to_owned();
    let ttls = s.kv.stats().await["ttls"].clone();
    let ttl = |key: &str| ttls[hash(key)].as_i64().unwrap();
    assert_eq!(
        ttl(&short_key),
        60,
        "KV's minimum; the record's expiry covers the rest"
    );
    let long_ttl = ttl(long["apiKey"].as_str().unwrap());
    assert!(
        (3590..=3600).contains(&long_ttl),
        "cut to the key's hour: {long_ttl}"
    );
    assert_eq!(ttl(&forever), 86_400, "the configured TTL");

    sleep_until(end - 400).await;
    assert_eq!(
        edge_status(&s, &short_key).await,
        StatusCode::OK,
        "just before"
    );
    sleep_until(end + 300).await;
    assert_eq!(
        edge_status(&s, &short_key).await,
        StatusCode::UNAUTHORIZED,
        "just after"
    );
}

/// A roll with an overlap at the edge: both secrets work until the end, to the second;
/// then the old one is refused, and its KV record is deleted when the overlap ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roll_overlap_at_the_edge() {
    let s = full(Backend::Postgres, &[]).await;
    let key1 = s.cp.create_key("rolling", "GENERIC").await;
    s.cp.wait_outbox_drained(Duration::from_secs(10)).await;
    assert_eq!(edge_status(&s, &key1).await, StatusCode::OK);

    let (status, rolled) =
        s.cp.roll("rolling", Some(serde_json::json!({"overlapSeconds": 3})))
            .await;
    assert_eq!(status, StatusCode::OK, "{rolled}");
    let key2 = rolled["apiKey"].as_str().unwrap().to_owned();
    let end = ms_of(&rolled["previousValidUntil"]);
    s.cp.wait_outbox_drained(Duration::from_secs(10)).await;
    assert_eq!(edge_status(&s, &key2).await, StatusCode::OK);
    let old = KeyRecord::from_json(s.edge.kv_get(&hash(&key1)).unwrap().as_bytes()).unwrap();
    assert_eq!(
        old.expires,
        Some((end / 1000) as u64),
        "KV has the old secret's end"
    );
    sleep_until(end - 400).await;
    assert_eq!(
        edge_status(&s, &key1).await,
        StatusCode::OK,
        "just before the end"
    );
    assert_eq!(edge_status(&s, &key2).await, StatusCode::OK);
    sleep_until(end + 300).await;
    assert_eq!(
        edge_status(&s, &key1).await,
        StatusCode::UNAUTHORIZED,
        "just after"
    );
    assert_eq!(edge_status(&s, &key2).await, StatusCode::OK);
    // The delete scheduled for the end of the overlap removes the old record.
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.edge.kv_get(&hash(&key1)).is_some() {
        assert!(Instant::now() < deadline, "old record still in KV");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // No overlap: the old secret is refused at the edge within the isolate window.
    let (_, rolled) = s.cp.roll("rolling", None).await;
    let key3 = rolled["apiKey"].as_str().unwrap().to_owned();
    let rolled_at = Instant::now();
    loop {
        match edge_status(&s, &key2).await {
            StatusCode::UNAUTHORIZED => break,
            StatusCode::OK => assert!(rolled_at.elapsed() < Duration::from_secs(1)),
            other => panic!("unexpected {other}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(edge_status(&s, &key3).await, StatusCode::OK);
}

/// Keys used only at the edge (served from KV, never verified by the control plane) get
/// a lastUsed from the Worker's batched usage reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_reports_usage_for_last_used() {
    let s = full_with(
        Backend::Postgres,
        &[("USAGE_REPORT_MS", "300")],
        &[("LAST_USED_FLUSH_SECONDS", "1")],
    )
    .await;
    let key = s.cp.create_key("edge-only", "GENERIC").await;
    s.cp.wait_outbox_drained(Duration::from_secs(10)).await;
    assert_eq!(s.cp.listed("edge-only").await["lastUsed"], Value::Null);
    let by_hash_before = s.cp.metric("http_requests_total", "by-hash").await;
    let first_use = now_ms();
    for _ in 0..20 {
        assert_eq!(edge_status(&s, &key).await, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let last_use = now_ms();
    // The report goes out with the first request after the interval; then a flush.
    let deadline = Instant::now() + Duration::from_secs(10);
    let used = loop {
        let entry = s.cp.listed("edge-only").await;
        if !entry["lastUsed"].is_null() {
            break ms_of(&entry["lastUsed"]);
        }
        assert!(Instant::now() < deadline, "no lastUsed from the edge");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        used >= first_use - 5 && used <= last_use + 5,
        "{used} in [{first_use}, {last_use}]"
    );
    assert_eq!(
        s.cp.metric("http_requests_total", "by-hash").await,
        by_hash_before,
        "the key was never looked up by the control plane: lastUsed came from the report"
    );
    let reports = s.cp.metric("http_requests_total", "/api/v1/usage").await;
    assert!(
        (1.0..=5.0).contains(&reports),
        "{reports} reports for 20 requests"
    );
}

/// Requests per hour are exact: N through the edge (reported with counts) and M verified
/// by the control plane are N + M in the key's usage once flushed, and stay so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_counts_are_exact() {
    let s = full_with(
        Backend::Sqlite,
        &[("USAGE_REPORT_MS", "300")],
        &[("LAST_USED_FLUSH_SECONDS", "1")],
    )
    .await;
    let key = s.cp.create_key("counted", "GENERIC").await;
    s.cp.wait_outbox_drained(Duration::from_secs(10)).await;
    let (edge_n, cp_n) = (23, 11);
    for _ in 0..edge_n {
        assert_eq!(edge_status(&s, &key).await, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    for _ in 0..cp_n {
        assert_eq!(s.cp.verify(&key).await, StatusCode::OK);
    }
    // Refusals are not uses.
    assert_eq!(s.cp.verify("metlo.nope").await, StatusCode::UNAUTHORIZED);
    // The last edge use is reported with the first request after the interval.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let other = s.cp.create_key("other", "GENERIC").await;
    s.cp.wait_outbox_drained(Duration::from_secs(10)).await;
    assert_eq!(edge_status(&s, &other).await, StatusCode::OK);
    let usage = |name: &'static str| {
        let cp = &s.cp;
        async move {
            let (status, _, body) = cp
                .get(&format!("/api/v1/keys/{name}/usage"), Some(&cp.admin_key))
                .await;
            assert_eq!(status, StatusCode::OK, "{body}");
            serde_json::from_str::<Value>(&body).unwrap()
        }
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let u = usage("counted").await;
        if u["total"] == edge_n + cp_n {
            let hours = u["hours"].as_array().unwrap();
            assert_eq!(hours.len(), 24, "{u}");
            assert_eq!(
                hours[23]["requests"].as_u64().unwrap() + hours[22]["requests"].as_u64().unwrap(),
                (edge_n + cp_n) as u64
            );
            break;
        }
        assert!(
            u["total"].as_u64().unwrap() <= (edge_n + cp_n) as u64,
            "counted more than made: {u}"
        );
        assert!(Instant::now() < deadline, "not counted: {u}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A negative check, so time must pass: two more flushes (LAST_USED_FLUSH_SECONDS=1,
    // the shortest) would have shown a use counted twice.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        usage("counted").await["total"],
        edge_n + cp_n,
        "no use counted twice"
    );
    // Bad windows are 400s; an unknown key a 404.
    for q in [
        "?from=yesterday",
        "?from=2026-01-01T00:00:00Z&to=2025-01-01T00:00:00Z",
        "?from=2020-01-01T00:00:00Z&to=2026-01-01T00:00:00Z",
    ] {
        let (status, _, _) =
            s.cp.get(
                &format!("/api/v1/keys/counted/usage{q}"),
                Some(&s.cp.admin_key),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{q}");
    }
    let (status, _, _) =
        s.cp.get("/api/v1/keys/nope/usage", Some(&s.cp.admin_key))
            .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = s.cp.get("/api/v1/keys/counted/usage", Some(&key)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

/// Deletes scheduled for the end of a long overlap do not hold back what is due now: a
/// key deleted during a one-hour overlap, and a key rolled again without overlap, leave
/// KV at once (on PostgreSQL the drainer orders each key's updates).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_deletes_do_not_block_later_updates() {
    let s = full(Backend::Postgres, &[]).await;
    let a1 = s.cp.create_key("a", "GENERIC").await;
    let b1 = s.cp.create_key("b", "GENERIC").await;
    let (_, a2) =
        s.cp.roll("a", Some(serde_json::json!({"overlapSeconds": 3600})))
            .await;
    let (_, b2) =
        s.cp.roll("b", Some(serde_json::json!({"overlapSeconds": 3600})))
            .await;
    let a2 = a2["apiKey"].as_str().unwrap().to_owned();
    let b2 = b2["apiKey"].as_str().unwrap().to_owned();
    s.cp.wait_outbox_drained(Duration::from_secs(10)).await;
    for k in [&a1, &a2, &b1, &b2] {
        assert!(s.edge.kv_get(&hash(k)).is_some());
        assert_eq!(edge_status(&s, k).await, StatusCode::OK);
    }
    assert_eq!(
        s.cp.delete("a", Some(&s.cp.admin_key)).await.0,
        StatusCode::OK
    );
    let (_, b3) = s.cp.roll("b", None).await;
    let b3 = b3["apiKey"].as_str().unwrap().to_owned();
    s.cp.wait_outbox_drained(Duration::from_secs(10)).await;
    for k in [&a1, &a2, &b1, &b2] {
        assert!(s.edge.kv_get(&hash(k)).is_none(), "removed from KV at once");
    }
    tokio::time::sleep(Duration::from_millis(600)).await; // the isolate window
    for k in [&a1, &a2, &b1, &b2] {
        assert_eq!(edge_status(&s, k).await, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(edge_status(&s, &b3).await, StatusCode::OK);
}

/// The KV stand-in's propagation delay (what production KV does between locations; 10 s
/// here): a delete is answered at once but reaches the Worker only after the delay, so a
/// Worker without the revocation feed keeps admitting the deleted key from KV meanwhile,
/// and refuses it once the held write is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_propagation_delay_is_reproduced_locally() {
    // Without the revocation feed, which would refuse the key within its interval
    // (tests/tests/revocations.rs): here KV alone decides, as it did before the feed.
    let s = full(Backend::Sqlite, &[("REVOCATION_FEED_INTERVAL_MS", "0")]).await;
    let kv = &*s.kv;
    let key = s.cp.create_key("delayed", "GENERIC").await;
    s.cp.wait_outbox_drained(Duration::from_secs(10)).await;
    assert_eq!(
        s.edge.get("/", Some(&key)).send().await.unwrap().status(),
        StatusCode::OK
    );

    kv.set_propagation_delay(Duration::from_secs(10)).await;
    assert_eq!(
        s.cp.delete("delayed", Some(&s.cp.admin_key)).await.0,
        StatusCode::OK
    );
    s.cp.wait_outbox_drained(Duration::from_secs(10)).await;
    // The KV API took the delete; the Worker's KV does not have it yet.
    assert_eq!(kv.held_writes().await, 1);
    let deleted = Instant::now();
    // Once the isolate's entry expires the key comes from KV again: still there.
    loop {
        let r = s.edge.get("/", Some(&key)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "admitted during the delay");
        // The edge tells the origin where the record came from.
        if s.origin.requests().last().unwrap().headers_source() == "kv" {
            break;
        }
        assert!(
            deleted.elapsed() < Duration::from_secs(8),
            "never served from KV"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Once the held delete lands, the edge refuses the key.
    let deadline = Instant::now() + Duration::from_secs(40);
    while kv.held_writes().await > 0 {
        assert!(Instant::now() < deadline, "the held delete never landed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    edge_until(&s, &key, StatusCode::UNAUTHORIZED, Duration::from_secs(5)).await;
    println!(
        "the delete reached the Worker's KV {:?} after it was answered",
        deleted.elapsed()
    );
    assert!(
        deleted.elapsed() >= Duration::from_secs(8),
        "held for the delay"
    );
    kv.set_propagation_delay(Duration::ZERO).await;
}
