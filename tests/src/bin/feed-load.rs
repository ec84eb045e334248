//! Revocation-feed load (`make bench`): what edge locations reading the feed cost one
//! control plane. Each location's Worker reads the whole window about once an interval
//! (its isolates share that read through the Cache API; `make bench`'s edge part measures
//! 1.4 reads a second for one location under load: a view is due one interval after the
//! control plane's read it reflects, not after it arrived), so a location is one reader
//! here: its own HTTP connection, a GET of `/api/v1/revocations` every 700 ms. Measured first for
//! one location (server CPU per read, above the idle server's, from reads back to back;
//! bytes per page), multiplied by 300, then checked with 300 simulated locations at once
//! against the same control plane: reads per second, latency, the server's CPU share and
//! RSS, errors; and, under that load, how long after a delete is answered every location
//! has read it. PostgreSQL
//! (scripts/stack.sh), release build; the window holds `FEED_EVENTS` (100) revocations.

use std::sync::Arc;
use std::time::{Duration, Instant};

use metlo_shared::ApiKey;
use metlo_tests::bench::{cpu_ticks, median, mib, rss_kib};
use metlo_tests::{Backend, ControlPlane, StackBuilder};
use tokio::sync::Mutex;

const LOCATIONS: usize = 300;
const SECONDS: u64 = 10;
const READ_EVERY: Duration = Duration::from_millis(700);

/// What one location saw: each read's latency, failures, and when it first read the
/// marked hash (a delete made during the run).
#[derive(Default)]
struct Seen {
    latencies_ms: Vec<f64>,
    failures: u64,
    bytes: u64,
    marked_at: Option<Instant>,
}

/// One location: reads the whole window every second until `until`, each read on its own
/// schedule (starting at `offset`).
async fn location(
    cp_url: String,
    edge_key: String,
    offset: Duration,
    until: Instant,
    mark: Arc<Mutex<Option<String>>>,
) -> Seen {
    let client = reqwest::Client::new();
    let mut seen = Seen::default();
    let start = Instant::now() + offset;
    tokio::time::sleep_until(start.into()).await;
    let mut next = start;
    while next < until {
        let sent = Instant::now();
        let answer = client
            .get(format!("{cp_url}/api/v1/revocations"))
            .header("Authorization", &edge_key)
            .send()
            .await;
        match answer {
            Ok(r) if r.status().is_success() => {
                let body = r.text().await.unwrap_or_default();
                seen.latencies_ms
                    .push(sent.elapsed().as_secs_f64() * 1000.0);
                seen.bytes += body.len() as u64;
                if seen.marked_at.is_none() {
                    if let Some(hash) = mark.lock().await.as_deref() {
                        if body.contains(hash) {
                            seen.marked_at = Some(Instant::now());
                        }
                    }
                }
            }
            _ => seen.failures += 1,
        }
        next += READ_EVERY;
        tokio::time::sleep_until(next.into()).await;
    }
    seen
}

struct Run {
    reads: usize,
    failures: u64,
    seconds: f64,
    cpu_ticks: u64,
    p50: f64,
    p99: f64,
    max: f64,
    bytes_per_read: f64,
    /// After the delete was answered, when the last location had read it.
    all_saw_delete: Option<Duration>,
}

/// `delete`: a key's name and hash, deleted halfway through.
async fn run(cp: &ControlPlane, locations: usize, delete: Option<(&str, String)>) -> Run {
    let mark = Arc::new(Mutex::new(None));
    let until = Instant::now() + Duration::from_secs(SECONDS) + READ_EVERY;
    let pid = cp.pid();
    let ticks = cpu_ticks(pid);
    let started = Instant::now();
    let tasks: Vec<_> = (0..locations)
        .map(|i| {
            // Spread over the second, as independent locations would be.
            let offset = READ_EVERY * i as u32 / locations as u32;
            tokio::spawn(location(
                cp.url.clone(),
                cp.edge_key.clone(),
                offset,
                until,
                mark.clone(),
            ))
        })
        .collect();
    let mut deleted = None;
    if let Some((name, hash)) = delete {
        tokio::time::sleep(Duration::from_secs(SECONDS / 2)).await;
        assert_eq!(
            cp.delete(name, Some(&cp.admin_key)).await.0,
            reqwest::StatusCode::OK
        );
        deleted = Some(Instant::now());
        *mark.lock().await = Some(hash);
    }
    let mut all: Vec<Seen> = vec![];
    for t in tasks {
        all.push(t.await.unwrap());
    }
    // The readers' window (the last read is scheduled before `until`).
    let seconds = until.saturating_duration_since(started).as_secs_f64();
    let cpu = cpu_ticks(pid) - ticks;
    let mut latencies: Vec<f64> = all.iter().flat_map(|s| s.latencies_ms.clone()).collect();
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    let all_saw_delete = deleted.and_then(|d| {
        all.iter()
            .map(|s| s.marked_at.map(|t| t.saturating_duration_since(d)))
            .collect::<Option<Vec<_>>>()
            .and_then(|v| v.into_iter().max())
    });
    Run {
        reads: latencies.len(),
        failures: all.iter().map(|s| s.failures).sum(),
        seconds,
        cpu_ticks: cpu,
        p50: at(0.5),
        p99: at(0.99),
        max: latencies[latencies.len() - 1],
        bytes_per_read: all.iter().map(|s| s.bytes).sum::<u64>() as f64 / latencies.len() as f64,
        all_saw_delete,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let events: usize = std::env::var("FEED_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let cp = StackBuilder::new(Backend::Postgres)
        .env("MAX_API_KEYS", events + 100)
        .start_control_plane()
        .await;
    // The window's content: `events` revocations, and a key to delete under load.
    for i in 0..events {
        cp.create_key(&format!("revoked-{i}"), "GENERIC").await;
        cp.delete(&format!("revoked-{i}"), Some(&cp.admin_key))
            .await;
    }
    let doomed = cp.create_key("deleted-under-load", "GENERIC").await;
    let doomed_hash = ApiKey::parse(&doomed).unwrap().hash().to_hex();

    println!(
        "revocation feed load: one control plane (PostgreSQL, release), {events} events in the window, each location reading it every {} ms for {SECONDS} s",
        READ_EVERY.as_millis()
    );
    // The idle server's own CPU (its feed reader, drainers, metrics), then one reader's
    // reads back to back: what a read costs above idle.
    let pid = cp.pid();
    let idle_ticks_per_s = {
        let before = cpu_ticks(pid);
        tokio::time::sleep(Duration::from_secs(SECONDS)).await;
        (cpu_ticks(pid) - before) as f64 / SECONDS as f64
    };
    let mut per_read = vec![];
    let mut bytes = 0;
    let client = reqwest::Client::new();
    for _ in 0..3 {
        let (before, started, mut reads) = (cpu_ticks(pid), Instant::now(), 0u32);
        while started.elapsed() < Duration::from_secs(3) {
            let r = client
                .get(format!("{}/api/v1/revocations", cp.url))
                .header("Authorization", &cp.edge_key)
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success());
            bytes = r.text().await.unwrap().len();
            reads += 1;
        }
        let busy =
            (cpu_ticks(pid) - before) as f64 - idle_ticks_per_s * started.elapsed().as_secs_f64();
        per_read.push(busy.max(0.0) * 10.0 / f64::from(reads));
    }
    let per_read_ms = median(per_read);
    println!(
        "  one location: {:.1} KiB a page, server CPU {per_read_ms:.3} ms a read above idle (reads back to back, median of 3 runs of 3 s); idle server {:.1} % of one core",
        bytes as f64 / 1024.0,
        idle_ticks_per_s
    );
    let rate = LOCATIONS as f64 / READ_EVERY.as_secs_f64();
    println!(
        "  × {LOCATIONS} locations, estimated: {rate:.0} reads/s, {:.1} % of one core ({:.1} % with the idle server), {:.1} MiB/s out",
        per_read_ms * rate / 10.0,
        per_read_ms * rate / 10.0 + idle_ticks_per_s,
        bytes as f64 * rate / (1024.0 * 1024.0)
    );
    let rss_before = rss_kib(cp.pid());
    let many = run(&cp, LOCATIONS, Some(("deleted-under-load", doomed_hash))).await;
    println!(
        "  {LOCATIONS} locations, measured: {:.0} reads/s ({} reads, {} failed), server CPU {:.1} % of one core ({:.3} ms a read with idle included), latency p50 {:.1} / p99 {:.1} / max {:.1} ms, {:.1} KiB a page, RSS {} → {}",
        many.reads as f64 / many.seconds,
        many.reads,
        many.failures,
        many.cpu_ticks as f64 / many.seconds,
        many.cpu_ticks as f64 * 10.0 / many.reads as f64,
        many.p50,
        many.p99,
        many.max,
        many.bytes_per_read / 1024.0,
        mib(rss_before),
        mib(rss_kib(cp.pid()))
    );
    match many.all_saw_delete {
        Some(d) => println!(
            "  a delete made under that load was in every location's next read: the last read it {} ms after the answer (one read every {} ms)",
            d.as_millis(),
            READ_EVERY.as_millis()
        ),
        None => println!("  a delete made under that load was NOT read by every location"),
    }
    assert_eq!(many.failures, 0, "every read answered");
}
