//! Soak: the whole stack (control plane on PostgreSQL with Redis and KV sync, edge under
//! `wrangler dev`, origin, local KV API) under mixed traffic for SOAK_SECONDS (default
//! 300): verifications through the edge and the control plane (valid, deleted, unknown,
//! garbage keys), creates, rolls, deletes, lists and audit pages, beside a background
//! flood of made-up keys from another address. Reports responses by
//! class, wrong decisions, p50/p99 latency per kind, and the control plane's RSS at start
//! and end.
//! Run it with `make soak` (scripts/soak.sh starts PostgreSQL).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metlo_shared::ApiKey;
use metlo_tests::bench::rss_kib;
use metlo_tests::edge::Edge;
use metlo_tests::Stack;
use metlo_tests::{Backend, Redis, StackBuilder, StatusCode};

#[derive(Default)]
struct Tally {
    /// (kind, status class) → count
    responses: BTreeMap<(String, String), u64>,
    /// kind → latencies
    latencies: BTreeMap<String, Vec<Duration>>,
    /// Decisions that must never happen (a 200 for a bad key, a 5xx…), with examples.
    wrong: Vec<String>,
}

impl Tally {
    fn record(
        &mut self,
        kind: &str,
        status: Option<StatusCode>,
        took: Duration,
        acceptable: &[u16],
    ) {
        let class = match status {
            Some(s) => format!("{}xx", s.as_u16() / 100),
            None => "transport error".into(),
        };
        *self.responses.entry((kind.into(), class)).or_default() += 1;
        self.latencies.entry(kind.into()).or_default().push(took);
        let ok = status.is_some_and(|s| acceptable.contains(&s.as_u16()));
        if !ok && self.wrong.len() < 20 {
            self.wrong.push(format!("{kind}: {status:?}"));
        }
    }
}

/// One part of the shared stack, cloned into each task.
struct Part<T: 'static>(Arc<Stack>, fn(&Stack) -> &T);

impl<T> Clone for Part<T> {
    fn clone(&self) -> Self {
        Part(self.0.clone(), self.1)
    }
}

impl<T> std::ops::Deref for Part<T> {
    type Target = T;
    fn deref(&self) -> &T {
        (self.1)(&self.0)
    }
}

/// One request through the edge on the churn path, tallied.
async fn churn_at_edge(edge: &Edge, tally: &Mutex<Tally>, kind: &str, key: &str, ok: &[u16]) {
    let t = Instant::now();
    let status = edge
        .get("/churn", Some(key))
        .send()
        .await
        .ok()
        .map(|r| r.status());
    tally.lock().unwrap().record(kind, status, t.elapsed(), ok);
}

#[tokio::main]
async fn main() {
    let seconds: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let redis = Redis::start();
    let stack = Arc::new(
        StackBuilder::new(Backend::Postgres)
            .redis(redis.url())
            .env("MAX_API_KEYS", 1_000_000)
            .kv()
            .edge(&[])
            .build()
            .await,
    );
    let cp = Part(stack.clone(), |s| &s.cp);
    let edge = Part(stack.clone(), |s| &*s.edge);
    let valid: Vec<String> = {
        let mut v = vec![];
        for i in 0..20 {
            v.push(cp.create_key(&format!("hot-{i}"), "GENERIC").await);
        }
        v
    };
    // Verified once before the refused traffic starts: keys valid lately keep passing from
    // 127.0.0.1 once its failure budget is spent (the refused keys below spend it).
    for key in &valid {
        assert_eq!(cp.verify(key).await, StatusCode::OK);
    }
    let deleted = cp.create_key("revoked", "GENERIC").await;
    cp.delete("revoked", Some(&cp.admin_key)).await;
    cp.wait_outbox_drained(Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_start = rss_kib(cp.pid());

    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = vec![];
    // Edge traffic: 4 workers.
    for w in 0..4 {
        let (edge, tally, stop, valid, deleted) = (
            edge.clone(),
            tally.clone(),
            stop.clone(),
            valid.clone(),
            deleted.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let (kind, key, ok): (&str, String, &[u16]) = match i % 10 {
                    0 => ("edge garbage", "garbage".into(), &[401]),
                    1 => (
                        "edge unknown",
                        ApiKey::generate().unwrap().expose_secret().to_owned(),
                        &[401],
                    ),
                    2 => ("edge deleted", deleted.clone(), &[401]),
                    _ => ("edge valid", valid[i % valid.len()].clone(), &[200]),
                };
                let t = Instant::now();
                let status = edge
                    .get("/soak", Some(&key))
                    .send()
                    .await
                    .ok()
                    .map(|r| r.status());
                tally.lock().unwrap().record(kind, status, t.elapsed(), ok);
            }
        }));
    }
    // Background flood: checksum-valid made-up keys from another address (127.0.0.2), as
    // fast as 4 connections go; refused with 401, then 429 once its budget is spent, or
    // 503 when lookups are saturated — never a 200 or a 500.
    let flood_client = reqwest::Client::builder()
        .local_address(Some("127.0.0.2".parse().unwrap()))
        .build()
        .unwrap();
    for _ in 0..4 {
        let (client, url, tally, stop) = (
            flood_client.clone(),
            format!("{}/api/v1/verify", cp.url),
            tally.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let key = ApiKey::generate().unwrap().expose_secret().to_owned();
                let t = Instant::now();
                let status = client
                    .get(&url)
                    .header("Authorization", key)
                    .send()
                    .await
                    .ok()
                    .map(|r| r.status());
                tally.lock().unwrap().record(
                    "flood (made up)",
                    status,
                    t.elapsed(),
                    &[401, 429, 503],
                );
            }
        }));
    }
    // Control-plane verifications: 2 workers.
    for w in 0..2 {
        let (cp, tally, stop, valid, deleted) = (
            cp.clone(),
            tally.clone(),
            stop.clone(),
            valid.clone(),
            deleted.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                // Refused keys from one address soon spend its failed-authentication
                // budget: 429 is as right a refusal as 401.
                let (kind, key, ok): (&str, String, &[u16]) = match i % 5 {
                    0 => ("cp deleted", deleted.clone(), &[401, 429]),
                    1 => (
                        "cp unknown",
                        ApiKey::generate().unwrap().expose_secret().to_owned(),
                        &[401, 429],
                    ),
                    _ => ("cp valid", valid[i % valid.len()].clone(), &[200]),
                };
                let t = Instant::now();
                let status = cp
                    .request(reqwest::Method::GET, "/api/v1/verify", Some(&key))
                    .send()
                    .await
                    .ok()
                    .map(|r| r.status());
                tally.lock().unwrap().record(kind, status, t.elapsed(), ok);
            }
        }));
    }
    // Churn: create a key, use it at the edge, roll it, delete it, check both secrets are
    // refused; read the list (with lastUsed) and a page of the audit log now and then.
    {
        let (cp, edge, tally, stop) = (cp.clone(), edge.clone(), tally.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let name = format!("churn-{n}");
                let t = Instant::now();
                let (status, body) = cp.create(serde_json::json!({"name": name})).await;
                tally
                    .lock()
                    .unwrap()
                    .record("create", Some(status), t.elapsed(), &[200]);
                let Some(key) = body["apiKey"].as_str().map(str::to_owned) else {
                    continue;
                };
                churn_at_edge(&edge, &tally, "edge new key", &key, &[200]).await;
                let t = Instant::now();
                let (status, rolled) = cp.roll(&name, None).await;
                tally
                    .lock()
                    .unwrap()
                    .record("roll", Some(status), t.elapsed(), &[200]);
                let rolled_key = rolled["apiKey"].as_str().map(str::to_owned);
                if let Some(rolled_key) = &rolled_key {
                    churn_at_edge(&edge, &tally, "edge rolled key", rolled_key, &[200]).await;
                }
                for (kind, path) in [
                    ("list", "/api/v1/keys/list"),
                    ("audit page", "/api/v1/audit?limit=50"),
                ] {
                    let t = Instant::now();
                    let (status, _, _) = cp.get(path, Some(&cp.admin_key)).await;
                    tally
                        .lock()
                        .unwrap()
                        .record(kind, Some(status), t.elapsed(), &[200]);
                }
                let t = Instant::now();
                let (status, _) = cp.delete(&name, Some(&cp.admin_key)).await;
                tally
                    .lock()
                    .unwrap()
                    .record("delete", Some(status), t.elapsed(), &[200]);
                tokio::time::sleep(Duration::from_millis(1200)).await; // past the edge's isolate window
                churn_at_edge(&edge, &tally, "edge after delete", &key, &[401]).await;
                if let Some(rolled_key) = &rolled_key {
                    churn_at_edge(&edge, &tally, "edge after delete", rolled_key, &[401]).await;
                }
            }
        }));
    }
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let rss_end = rss_kib(cp.pid());

    let mut tally = tally.lock().unwrap();
    println!("soak: {seconds} s of mixed traffic");
    for ((kind, class), n) in &tally.responses {
        println!("  {kind:<18} {class:<16} {n:>8}");
    }
    for (kind, lat) in tally.latencies.iter_mut() {
        lat.sort();
        let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
        println!(
            "  {kind:<18} p50 {:>9.2?}  p99 {:>9.2?}  (n = {})",
            p(0.5),
            p(0.99),
            lat.len()
        );
    }
    println!(
        "  control plane RSS: start {:.1} MiB, end {:.1} MiB",
        rss_start as f64 / 1024.0,
        rss_end as f64 / 1024.0
    );
    if tally.wrong.is_empty() {
        println!("  wrong decisions: 0");
    } else {
        println!(
            "  WRONG DECISIONS (first {}): {:?}",
            tally.wrong.len(),
            tally.wrong
        );
        std::process::exit(1);
    }
}
