//! What the benchmark binaries share: `wrk` as the load generator (run in its own
//! process), and a server's RSS and CPU time from /proc.

use std::process::{Command, Stdio};
use std::time::Duration;

pub const SECONDS: u64 = 5;
pub const CONNECTIONS: u32 = 32;

/// Runs wrk (`-t1 -c32 -d5s`, plus `extra` arguments) and returns its output.
fn run_wrk(url: &str, key: Option<&str>, script: Option<&str>, extra: &[&str]) -> String {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t1", &format!("-c{CONNECTIONS}"), &format!("-d{SECONDS}s")]);
    cmd.args(extra);
    if let Some(k) = key {
        cmd.args(["-H", &format!("Authorization: {k}")]);
    }
    if let Some(s) = script {
        cmd.args(["-s", s]);
    }
    let out = cmd
        .arg(url)
        .stderr(Stdio::inherit())
        .output()
        .expect("wrk not found: run scripts/install-deps.sh");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Requests per second and non-2xx responses.
fn parse_wrk(text: &str) -> (f64, u64) {
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("unexpected wrk output:\n{text}"));
    let non2xx = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0);
    (rps, non2xx)
}

/// (req/s, non-2xx responses).
pub fn wrk(url: &str, key: Option<&str>, script: Option<&str>) -> (f64, u64) {
    parse_wrk(&run_wrk(url, key, script, &[]))
}

/// Resident memory in KiB (0 once the process is gone).
pub fn rss_kib(pid: u32) -> u64 {
    crate::process::memory_kib(pid, "VmRSS").unwrap_or(0)
}

/// Runs `f` while sampling `pid`'s RSS; returns f's result and the peak RSS in KiB.
pub fn with_peak_rss<T>(pid: u32, f: impl FnOnce() -> T) -> (T, u64) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_kib(pid));
                std::thread::sleep(Duration::from_millis(50));
            }
            peak
        })
    };
    let result = f();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    (result, sampler.join().unwrap())
}

/// CPU time (user + system) the process has used, in clock ticks (1/100 s).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15; `fields` starts at field 3.
    fields
        .get(11)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
}

/// Runs wrk against a server and returns (req/s, microseconds of server CPU per request):
/// the CPU figure does not depend on how busy the rest of the machine is.
pub fn wrk_with_cpu(pid: u32, url: &str, key: &str) -> (f64, f64) {
    let before = cpu_ticks(pid);
    let (rps, bad) = wrk(url, Some(key), None);
    assert_eq!(bad, 0, "every verification must succeed");
    let ticks = cpu_ticks(pid) - before;
    (rps, ticks as f64 * 10_000.0 / (rps * SECONDS as f64))
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Like [`wrk`], with `--latency`: also the 99th-percentile latency in milliseconds.
pub fn wrk_p99(url: &str, key: Option<&str>, script: Option<&str>) -> (f64, u64, f64) {
    let text = run_wrk(url, key, script, &["--latency"]);
    let (rps, non2xx) = parse_wrk(&text);
    let p99 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .and_then(|v| latency_ms(v.trim()))
        .unwrap_or_else(|| panic!("no 99% latency in wrk output:\n{text}"));
    (rps, non2xx, p99)
}

/// wrk's "1.23ms" / "456.00us" / "1.20s" in milliseconds.
fn latency_ms(v: &str) -> Option<f64> {
    let (number, factor) = if let Some(n) = v.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    number.parse::<f64>().ok().map(|n| n * factor)
}
