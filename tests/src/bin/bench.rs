//! `make bench`: the control plane's throughput and memory, as ratios against a bare axum
//! handler measured in the same run (the machine is shared and noisy: absolute figures
//! wander, ratios much less). Load comes from `wrk` in a separate process.

use std::process::{Command, Stdio};
use std::time::Duration;

use metlo_tests::bench::{
    median, mib, rss_kib, with_peak_rss, wrk, wrk_with_cpu, CONNECTIONS, SECONDS,
};
use metlo_tests::{free_port, wait_for_port, Backend, ControlPlane, Redis, StackBuilder};

/// Five: with three, one slow stretch of the shared machine moved a median by 10 %.
const ROUNDS: usize = 5;

#[tokio::main]
async fn main() {
    let bare_port = free_port();
    let bare_bin = std::env::current_exe().unwrap().with_file_name("bare-axum");
    let mut bare = Command::new(bare_bin)
        .arg(format!("127.0.0.1:{bare_port}"))
        .stderr(Stdio::null())
        .spawn()
        .expect("bare-axum");
    wait_for_port(bare_port, Duration::from_secs(10));
    let bare_url = format!("http://127.0.0.1:{bare_port}/api/v1/verify");

    let redis = Redis::start();
    let memory = ControlPlane::start_with(StackBuilder::new(Backend::Sqlite)).await;
    let shared =
        ControlPlane::start_with(StackBuilder::new(Backend::Sqlite).redis(redis.url())).await;
    // The same as `memory` without last-use tracking and request counting: what they cost
    // verification.
    let untracked = ControlPlane::start_with(
        StackBuilder::new(Backend::Sqlite).env("TRACK_LAST_USED", "false"),
    )
    .await;
    // Another build (METLO_BASELINE_BIN, e.g. the previous commit's: scripts/bench.sh
    // builds it from BENCH_BASELINE), measured interleaved with this one.
    let baseline = match std::env::var("METLO_BASELINE_BIN") {
        Ok(bin) => Some(
            ControlPlane::start_with(
                StackBuilder::new(Backend::Sqlite).env("METLO_CONTROL_PLANE_BIN", bin),
            )
            .await,
        ),
        Err(_) => None,
    };
    let idle_rss = rss_kib(memory.pid());
    for cp in [&memory, &shared, &untracked]
        .into_iter()
        .chain(baseline.as_ref())
    {
        assert_eq!(
            cp.verify(&cp.client_key).await,
            reqwest::StatusCode::OK,
            "warm the cache"
        );
    }

    println!("verify throughput: wrk -t1 -c{CONNECTIONS} -d{SECONDS}s, {ROUNDS} interleaved rounds, medians");
    let (mut floor, mut mem, mut red) = (vec![], vec![], vec![]);
    let (mut tracked, mut plain, mut tracked_cpu, mut plain_cpu) = (vec![], vec![], vec![], vec![]);
    let (mut base, mut base_cpu) = (vec![], vec![]);
    let mut peak_rss = 0;
    for round in 1..=ROUNDS {
        floor.push(wrk(&bare_url, None, None).0);
        let ((rps, bad), peak) = with_peak_rss(memory.pid(), || {
            wrk(
                &format!("{}/api/v1/verify", memory.url),
                Some(&memory.client_key),
                None,
            )
        });
        assert_eq!(bad, 0, "every verification must succeed");
        peak_rss = peak_rss.max(peak);
        mem.push(rps);
        let (rps, bad) = wrk(
            &format!("{}/api/v1/verify", shared.url),
            Some(&shared.client_key),
            None,
        );
        assert_eq!(bad, 0, "every verification must succeed");
        red.push(rps);
        let (rps, cpu) = wrk_with_cpu(
            memory.pid(),
            &format!("{}/api/v1/verify", memory.url),
            &memory.client_key,
        );
        tracked.push(rps);
        tracked_cpu.push(cpu);
        let (rps, cpu) = wrk_with_cpu(
            untracked.pid(),
            &format!("{}/api/v1/verify", untracked.url),
            &untracked.client_key,
        );
        plain.push(rps);
        plain_cpu.push(cpu);
        if let Some(cp) = &baseline {
            let (rps, cpu) = wrk_with_cpu(
                cp.pid(),
                &format!("{}/api/v1/verify", cp.url),
                &cp.client_key,
            );
            base.push(rps);
            base_cpu.push(cpu);
            println!(
                "  round {round}: baseline build {rps:>9.0} req/s, {cpu:.1} µs CPU/req | this build {:>9.0} req/s, {:.1} µs CPU/req",
                tracked[round - 1],
                tracked_cpu[round - 1]
            );
        }
        println!(
            "  round {round}: last-use tracking + counting on {:>9.0} req/s, {:.1} µs CPU/req | off {:>9.0} req/s, {:.1} µs CPU/req",
            tracked[round - 1],
            tracked_cpu[round - 1],
            plain[round - 1],
            plain_cpu[round - 1]
        );
        println!(
            "  round {round}: bare axum {:>9.0} req/s | in-process cache {:>9.0} | Redis cache {:>9.0}",
            floor[round - 1],
            mem[round - 1],
            red[round - 1]
        );
    }
    // Each round's ratio against the floor measured just before it, then their median:
    // the machine's load drifts between rounds, and a ratio of two medians taken from
    // different rounds carries that drift.
    let paired = |runs: &[f64]| median(runs.iter().zip(&floor).map(|(r, f)| r / f).collect());
    let (mem_ratio, red_ratio) = (paired(&mem), paired(&red));
    let (floor, mem, red) = (median(floor), median(mem), median(red));
    println!("  bare axum handler (floor):      {floor:>9.0} req/s");
    println!(
        "  verify, in-process cache:       {mem:>9.0} req/s  ratio {mem_ratio:.2}  (target >= 0.80; median of each round's ratio)"
    );
    println!(
        "  verify, Redis cache:            {red:>9.0} req/s  ratio {red_ratio:.2}  (target >= 0.80; median of each round's ratio)"
    );
    let (tracked, plain) = (median(tracked), median(plain));
    let (tracked_cpu, plain_cpu) = (median(tracked_cpu), median(plain_cpu));
    println!(
        "  last-use tracking + hourly counts: on {tracked:.0} vs off {plain:.0} req/s, ratio {:.3}; CPU per request ratio off/on {:.3}  (target: within 3 %)",
        tracked / plain,
        plain_cpu / tracked_cpu
    );
    if let Some(cp) = baseline {
        let (base, base_cpu) = (median(base), median(base_cpu));
        println!(
            "  this build vs baseline: {tracked:.0} vs {base:.0} req/s, ratio {:.3}; CPU per request ratio baseline/this {:.3}",
            tracked / base,
            base_cpu / tracked_cpu
        );
        drop(cp);
    }
    drop(untracked);
    println!("server RSS (in-process cache): idle {}, peak under load {}  (targets <= 25 MiB / <= 60 MiB)", mib(idle_rss), mib(peak_rss));
    drop(memory);
    drop(shared);

    // Creates on PostgreSQL (durable: scripts/bench.sh runs it with fsync on).
    let pg = ControlPlane::start_with(
        StackBuilder::new(Backend::Postgres).env("MAX_API_KEYS", 100_000_000),
    )
    .await;
    let script = std::env::temp_dir().join(format!("metlo-create-{}.lua", std::process::id()));
    std::fs::write(
        &script,
        r#"counter = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  counter = counter + 1
  return wrk.format(nil, nil, nil, '{"name":"bench-' .. counter .. '"}')
end
"#,
    )
    .unwrap();
    let (rps, bad) = wrk(
        &format!("{}/api/v1/keys/create", pg.url),
        Some(&pg.admin_key),
        Some(script.to_str().unwrap()),
    );
    let _ = std::fs::remove_file(&script);
    let stored = pg.count_keys().await;
    println!(
        "key creates on PostgreSQL (fsync on): {:.0} creates/s  (target >= 1000/s); {} non-2xx, {} keys stored",
        rps * (1.0 - bad as f64 / (rps * SECONDS as f64)).max(0.0),
        bad,
        stored
    );
    let _ = bare.kill();
    let _ = bare.wait();
}
