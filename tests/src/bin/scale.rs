//! `make bench`, scale section: the control plane on PostgreSQL (`SCALE_BACKEND=sqlite`:
//! SQLite) with 1,000 and with 1,000,000 (`SCALE_KEYS`) keys (seeded with `keys seed`), measured interleaved in one run: verification
//! throughput from the cache (hits) and through the database (a replica with no cache:
//! every verification a miss), list-page latency, create/roll/delete latency, and RSS.
//! Ratios of the large instance to the small one, not absolute figures, are the result.

use std::time::Instant;

use metlo_tests::bench::{median, mib, rss_kib, with_peak_rss, wrk_p99, SECONDS};
use metlo_tests::{Backend, ControlPlane, StackBuilder, StatusCode};
use serde_json::json;

const ROUNDS: usize = 3;
/// Keys the verification load cycles through (all cached after warm-up).
const HOT_KEYS: usize = 1000;

struct Instance {
    keys: usize,
    cp: ControlPlane,
    /// The same database, no verification cache.
    uncached: ControlPlane,
    script: std::path::PathBuf,
    seed_seconds: f64,
    idle_rss: u64,
}

/// A wrk script sending each request with the next of `keys`.
fn rotation_script(keys: &[String], path: &std::path::Path) {
    let list = keys
        .iter()
        .map(|k| format!("\"{k}\""))
        .collect::<Vec<_>>()
        .join(",\n");
    std::fs::write(
        path,
        format!(
            "keys = {{\n{list}\n}}\ni = 0\nrequest = function()\n  i = i % #keys + 1\n  \
             wrk.headers[\"Authorization\"] = keys[i]\n  return wrk.format(nil)\nend\n"
        ),
    )
    .unwrap();
}

async fn instance(keys: usize, dir: &std::path::Path, backend: Backend) -> Instance {
    let cp = ControlPlane::start_with(
        StackBuilder::new(backend)
            .env("MAX_API_KEYS", keys + 10_000)
            .env("LIST_UNPAGED_MAX", 1000),
    )
    .await;
    let file = dir.join(format!("keys-{keys}"));
    let started = Instant::now();
    cp.cli(&[
        "keys",
        "seed",
        "--count",
        &keys.to_string(),
        "--prefix",
        "scale",
        "--keys-file",
        file.to_str().unwrap(),
    ])
    .expect("seed");
    let seed_seconds = started.elapsed().as_secs_f64();
    let text = std::fs::read_to_string(&file).unwrap();
    // Spread over the whole key space: every `step`-th key.
    let step = (keys / HOT_KEYS).max(1);
    let hot: Vec<String> = text
        .lines()
        .step_by(step)
        .take(HOT_KEYS)
        .map(str::to_owned)
        .collect();
    drop(text);
    let _ = std::fs::remove_file(&file);
    let script = dir.join(format!("rotate-{keys}.lua"));
    rotation_script(&hot, &script);
    let uncached = cp.replica_with(&[("CACHE_TTL_SECONDS", "0")]).await;
    for k in &hot {
        assert_eq!(cp.verify(k).await, StatusCode::OK, "warm the cache");
    }
    let idle_rss = rss_kib(cp.pid());
    Instance {
        keys,
        cp,
        uncached,
        script,
        seed_seconds,
        idle_rss,
    }
}

/// Median wall time of `n` calls of `f`, in milliseconds.
async fn median_ms<F, Fut>(n: usize, mut f: F) -> f64
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut times = vec![];
    for i in 0..n {
        let t = Instant::now();
        f(i).await;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    median(times)
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    // SCALE_BACKEND=sqlite: the same on the embedded database (how far it goes).
    let backend = match std::env::var("SCALE_BACKEND").as_deref() {
        Ok("sqlite") => Backend::Sqlite,
        _ => Backend::Postgres,
    };
    let small = instance(1_000, dir.path(), backend).await;
    let large_keys: usize = std::env::var("SCALE_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let large = instance(large_keys, dir.path(), backend).await;
    let sizes = [&small, &large];
    println!("scale: {backend:?}, {} vs {} keys", small.keys, large.keys);
    for i in sizes {
        println!(
            "  seeding {:>9} keys with `keys seed`: {:.1} s ({:.0} keys/s)",
            i.keys,
            i.seed_seconds,
            i.keys as f64 / i.seed_seconds
        );
    }

    // Verification, interleaved rounds: hits (cache) and misses (the database).
    let mut hits = [vec![], vec![]];
    let mut misses = [vec![], vec![]];
    let mut miss_p99 = [vec![], vec![]];
    let mut peak = [0u64, 0u64];
    for _ in 0..ROUNDS {
        for (n, i) in sizes.iter().enumerate() {
            let url = format!("{}/api/v1/verify", i.cp.url);
            let ((rps, bad, _), p) = with_peak_rss(i.cp.pid(), || {
                wrk_p99(&url, None, Some(i.script.to_str().unwrap()))
            });
            assert_eq!(bad, 0, "every verification must succeed");
            hits[n].push(rps);
            peak[n] = peak[n].max(p);
            let url = format!("{}/api/v1/verify", i.uncached.url);
            let (rps, bad, p99) = wrk_p99(&url, None, Some(i.script.to_str().unwrap()));
            assert_eq!(bad, 0, "every verification must succeed");
            misses[n].push(rps);
            miss_p99[n].push(p99);
        }
    }
    let hit = hits.map(median);
    let miss = misses.map(median);
    let p99 = miss_p99.map(median);
    println!(
        "  verify, cache hits ({HOT_KEYS} keys rotated, wrk -c32 -d{SECONDS}s, median of {ROUNDS}): \
         {:.0} vs {:.0} req/s, ratio {:.2}  (target >= 0.90)",
        hit[0], hit[1], hit[1] / hit[0]
    );
    println!(
        "  verify, cache misses (no cache: each one an index lookup): {:.0} vs {:.0} req/s, \
         ratio {:.2}; p99 {:.2} ms vs {:.2} ms",
        miss[0],
        miss[1],
        miss[1] / miss[0],
        p99[0],
        p99[1]
    );

    // Listing: the first page and the tenth.
    for i in sizes {
        let first = "/api/v1/keys/list?limit=100".to_owned();
        let mut deep = first.clone();
        for _ in 0..9 {
            let (_, _, body) = i.cp.get(&deep, Some(&i.cp.admin_key)).await;
            let page: serde_json::Value = serde_json::from_str(&body).unwrap();
            match page["nextCursor"].as_str() {
                Some(c) => deep = format!("/api/v1/keys/list?limit=100&cursor={c}"),
                None => break,
            }
        }
        let mut line = format!("  list page of 100 at {:>9} keys:", i.keys);
        for (what, path) in [("first", &first), ("10th", &deep)] {
            let (rps, bad, p99) =
                wrk_p99(&format!("{}{path}", i.cp.url), Some(&i.cp.admin_key), None);
            assert_eq!(bad, 0);
            line += &format!(" {what} {rps:.0} req/s, p99 {p99:.2} ms;");
        }
        println!("{}", line.trim_end_matches(';'));
    }

    // Changes one at a time (each a transaction with its outbox and audit rows).
    for i in sizes {
        let create = median_ms(50, |n| {
            let cp = &i.cp;
            async move {
                let (s, _) = cp.create(json!({"name": format!("timed-{n}")})).await;
                assert_eq!(s, StatusCode::OK);
            }
        })
        .await;
        let roll = median_ms(50, |n| {
            let cp = &i.cp;
            async move {
                let (s, _) = cp.roll(&format!("timed-{n}"), None).await;
                assert_eq!(s, StatusCode::OK);
            }
        })
        .await;
        let delete = median_ms(50, |n| {
            let cp = &i.cp;
            async move {
                let (s, _) = cp.delete(&format!("timed-{n}"), Some(&cp.admin_key)).await;
                assert_eq!(s, StatusCode::OK);
            }
        })
        .await;
        println!(
            "  at {:>9} keys: create {create:.2} ms, roll {roll:.2} ms, delete {delete:.2} ms (medians of 50)",
            i.keys
        );
    }
    for i in sizes {
        println!(
            "  database at {:>9} keys: {}",
            i.keys,
            database_size(&i.cp).await
        );
    }
    println!(
        "  control-plane RSS: idle {} vs {}, peak under verification {} vs {}  \
         (the verification cache is bounded: RSS must not grow with the key count)",
        mib(small.idle_rss),
        mib(large.idle_rss),
        mib(peak[0]),
        mib(peak[1])
    );
}

/// The key table with its indexes (PostgreSQL), or the database file (SQLite).
async fn database_size(cp: &ControlPlane) -> String {
    let bytes = match cp.setting("DATABASE_URL") {
        Some(url) => {
            let pool = sqlx::PgPool::connect(&url).await.expect("connect");
            let n: i64 = sqlx::query_scalar("SELECT pg_total_relation_size('api_keys')")
                .fetch_one(&pool)
                .await
                .expect("size");
            n as u64
        }
        None => std::fs::metadata(cp.sqlite_file()).map_or(0, |m| m.len()),
    };
    format!("{:.0} MB", bytes as f64 / 1e6)
}
