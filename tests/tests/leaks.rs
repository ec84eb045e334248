//! Leaked keys revoke themselves: GitHub's secret-scanning reports, signed with P-256
//! keys generated at run time and served by a local stand-in for GitHub's keys endpoint,
//! POSTed to the real control plane (and the edge under real `wrangler dev` refusing the
//! revoked key); `keys leaked-check` on stdin.

use std::time::{Duration, Instant};

use metlo_shared::{ApiKey, KeyHash};
use metlo_tests::github::{report, GitHubKey, GitHubKeysEndpoint, TOKEN_TYPE as TYPE};
use metlo_tests::{on_both_backends, Backend, ControlPlane, StackBuilder, StatusCode};
use serde_json::{json, Value};

on_both_backends!(a_batch_of_ten_thousand_tokens_is_handled_in_one_pass);

fn token_hash(token: &str) -> String {
    KeyHash::of_text(token).to_hex()
}

/// POSTs `body` with these headers (`None`: header left out).
async fn post(
    cp: &ControlPlane,
    body: Vec<u8>,
    key_id: Option<&str>,
    signature: Option<&str>,
) -> (StatusCode, Value, reqwest::header::HeaderMap) {
    let mut request = cp
        .request(reqwest::Method::POST, "/api/v1/leaks/github", None)
        .header("content-type", "application/json")
        .body(body);
    if let Some(id) = key_id {
        request = request.header("Github-Public-Key-Identifier", id);
    }
    if let Some(s) = signature {
        request = request.header("Github-Public-Key-Signature", s);
    }
    let r = request.send().await.unwrap();
    let status = r.status();
    let headers = r.headers().clone();
    (status, r.json().await.unwrap_or(Value::Null), headers)
}

async fn signed(cp: &ControlPlane, key: &GitHubKey, body: Vec<u8>) -> (StatusCode, Value) {
    let signature = key.sign(&body);
    let (status, value, _) = post(cp, body, Some(&key.id), Some(&signature)).await;
    (status, value)
}

async fn leak_audits(cp: &ControlPlane) -> Vec<Value> {
    let (status, _, text) = cp
        .get("/api/v1/audit?limit=1000", Some(&cp.admin_key))
        .await;
    assert_eq!(status, StatusCode::OK);
    let page: Value = serde_json::from_str(&text).unwrap();
    page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "key.leaked")
        .cloned()
        .collect()
}

async fn control_plane(
    backend: Backend,
    github: &GitHubKeysEndpoint,
    env: &[(&str, &str)],
) -> ControlPlane {
    let options = env.iter().fold(
        StackBuilder::new(backend)
            .env("GITHUB_KEYS_URL", &github.url)
            .env("MAX_API_KEYS", 1000),
        |o, (k, v)| o.env(k, v),
    );
    ControlPlane::start_with(options).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_report_revokes_the_key_everywhere_and_a_replay_changes_nothing() {
    let github_key = GitHubKey::generate("k1", true);
    let github = GitHubKeysEndpoint::start(&[&github_key]).await;
    let stack = StackBuilder::new(Backend::Sqlite)
        .env("GITHUB_KEYS_URL", &github.url)
        .kv()
        .edge(&[])
        .build()
        .await;
    let (kv, cp, edge) = (&stack.kv, &stack.cp, &stack.edge);
    let leaked = cp.create_key("leaky", "GENERIC").await;
    let other = cp.create_key("other", "GENERIC").await;
    cp.wait_outbox_drained(Duration::from_secs(30)).await;
    for k in [&leaked, &other] {
        assert_eq!(
            edge.get("/", Some(k)).send().await.unwrap().status(),
            StatusCode::OK
        );
    }

    let made_up = ApiKey::generate().unwrap();
    let tokens = [leaked.as_str(), "metlo.not-a-key", made_up.expose_secret()];
    let reported = Instant::now();
    let (status, feedback) = signed(cp, &github_key, report(&tokens)).await;
    assert_eq!(status, StatusCode::OK, "{feedback}");
    let expected = json!([
        {"token_hash": token_hash(&leaked), "token_type": TYPE, "label": "true_positive"},
        {"token_hash": token_hash("metlo.not-a-key"), "token_type": TYPE, "label": "false_positive"},
        {"token_hash": token_hash(made_up.expose_secret()), "token_type": TYPE, "label": "false_positive"},
    ]);
    assert_eq!(feedback, expected);

    // Refused by the control plane at once, and by the edge within the revocation bound.
    assert_eq!(cp.verify(&leaked).await, StatusCode::UNAUTHORIZED);
    loop {
        let status = edge.get("/", Some(&leaked)).send().await.unwrap().status();
        if status == StatusCode::UNAUTHORIZED {
            break;
        }
        assert!(
            reported.elapsed() < Duration::from_secs(5),
            "the edge still accepts the leaked key"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "leaked key refused at the edge {} ms after the report",
        reported.elapsed().as_millis()
    );
    assert_eq!(
        edge.get("/", Some(&other)).send().await.unwrap().status(),
        StatusCode::OK
    );
    assert!(!kv
        .list_all()
        .await
        .iter()
        .any(|(k, _)| *k == token_hash(&leaked)));

    let audits = leak_audits(cp).await;
    assert_eq!(audits.len(), 1);
    let a = &audits[0];
    assert_eq!(a["target"], "leaky");
    assert_eq!(a["actor"], "github-secret-scanning");
    assert_eq!(a["detail"]["url"], "https://github.com/o/r/blob/main/x.env");
    assert_eq!(a["detail"]["source"], "content");
    assert_eq!(a["detail"]["action"], "key deleted");
    assert_eq!(
        a["detail"]["identifier"],
        ApiKey::parse(&leaked).unwrap().identifier()
    );

    // The same report again (GitHub retries): the same answer, nothing more done.
    let (status, again) = signed(cp, &github_key, report(&tokens)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again, expected);
    assert_eq!(leak_audits(cp).await.len(), 1);
    assert_eq!(cp.verify(&other).await, StatusCode::OK);
    assert_eq!(cp.metric("metlo_leak_revoked_total", "").await, 1.0);
    cp.assert_log_has_no_secrets();
}

/// What is wrong with a report, its body, key id and signature, and the status it gets.
type Case<'a> = (
    &'a str,
    Vec<u8>,
    Option<&'a str>,
    Option<String>,
    StatusCode,
);

/// Issue 28: the route checks before it reads. 64 concurrent 8 MiB uploads naming a
/// made-up key identifier grow the control plane's peak resident memory by less than
/// 32 MiB (24 grew it by 142 MiB when every body was read first); 64 naming GitHub's
/// real key with a wrong signature, from 64 addresses, are read two at a time, so they
/// cost what two bodies cost, not 64. Uploads that stall hold their slot only: two large
/// ones fill the large pool but a small report still gets through; a source has one
/// report read at a time; 32 small ones fill the small pool. Once they go, reports are
/// read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_reports_cost_memory_only_once_their_headers_check_out() {
    use tokio::io::AsyncWriteExt;
    let github_key = GitHubKey::generate("k1", true);
    let github = GitHubKeysEndpoint::start(&[&github_key]).await;
    let cp = control_plane(
        Backend::Sqlite,
        &github,
        &[("TRUSTED_PROXIES", "127.0.0.1")],
    )
    .await;
    // GitHub's keys fetched once, so that the figures below are the uploads' alone.
    let small = report(&["metlo.x"]);
    let (status, _) = signed(&cp, &github_key, small.clone()).await;
    assert_eq!(status, StatusCode::OK);
    let pid = cp.pid();
    let wrong = github_key.sign(b"something else");
    // Each upload on a connection of its own: the server closes a connection whose body
    // it refused unread, and one left idle in a pool could be picked up again just as it
    // closes (the next request then fails with no answer at all).
    let unpooled = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let upload = |from: String, key_id: &'static str, body: axum::body::Bytes| {
        let request = unpooled
            .post(format!("{}/api/v1/leaks/github", cp.url))
            .header("content-type", "application/json")
            .header("x-forwarded-for", from)
            .header("Github-Public-Key-Identifier", key_id)
            .header("Github-Public-Key-Signature", &wrong)
            .body(body);
        async move { request.send().await.map(|r| r.status()) }
    };

    let big = axum::body::Bytes::from(vec![b' '; 8 * 1024 * 1024]);
    let mut grown = vec![];
    for key_id in ["made-up", "k1"] {
        let before = metlo_tests::memory_kib(pid, "VmRSS").expect("the control plane runs");
        let uploads = (0..64).map(|i| upload(format!("198.51.100.{i}"), key_id, big.clone()));
        // Refused, or cut off while still sending once the answer was given.
        for status in futures::future::join_all(uploads)
            .await
            .into_iter()
            .flatten()
        {
            assert!(
                [StatusCode::UNAUTHORIZED, StatusCode::SERVICE_UNAVAILABLE].contains(&status),
                "{key_id}: {status}"
            );
        }
        let peak = metlo_tests::memory_kib(pid, "VmHWM").expect("the control plane runs");
        grown.push(peak.saturating_sub(before) / 1024);
        println!("{key_id}: RSS {before} KiB before, peak {peak} KiB after 64 uploads of 8 MiB");
    }
    assert!(
        grown[0] < 32,
        "made-up identifier: the peak grew by {} MiB",
        grown[0]
    );
    // Two bodies at once, each 8 MiB plus what the reads cost on the way (measured:
    // 27–31 MiB for two; 14–16 MiB with one slot).
    assert!(
        grown[1] < 48,
        "real identifier: the peak grew by {} MiB",
        grown[1]
    );

    // Uploads that send their head and a byte, then nothing.
    let stall = |from: &str, length: usize| {
        let head = format!(
            "POST /api/v1/leaks/github HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             X-Forwarded-For: {from}\r\nGithub-Public-Key-Identifier: k1\r\n\
             Github-Public-Key-Signature: {wrong}\r\nContent-Length: {length}\r\n\r\n["
        );
        let addr = cp.url.trim_start_matches("http://").to_owned();
        async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream.write_all(head.as_bytes()).await.unwrap();
            stream
        }
    };
    let reading = |pool: &'static str| cp.metric("metlo_leak_reports_reading", pool);
    let wait_reading = |pool: &'static str, want: f64| async move {
        let deadline = Instant::now() + Duration::from_secs(10);
        while reading(pool).await != want {
            assert!(
                Instant::now() < deadline,
                "{pool}: never {want} reports being read"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let small_probe = |from: &str| upload(from.to_owned(), "k1", small.clone().into());
    let mut stalled = vec![];

    // Two large ones fill the large pool; a small report still gets through.
    for (n, from) in ["203.0.113.1", "203.0.113.2"].into_iter().enumerate() {
        stalled.push(stall(from, 8 * 1024 * 1024).await);
        wait_reading("pool=\"large\"", n as f64 + 1.0).await;
    }
    let large_probe = upload("203.0.113.3".into(), "k1", big.clone()).await;
    assert!(large_probe.is_err() || large_probe.unwrap() == StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        small_probe("203.0.113.4").await.unwrap(),
        StatusCode::UNAUTHORIZED
    );

    // One report at a time per source; 32 small ones fill the small pool.
    stalled.push(stall("203.0.113.5", 1000).await);
    wait_reading("pool=\"small\"", 1.0).await;
    assert_eq!(
        small_probe("203.0.113.5").await.unwrap(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        small_probe("203.0.113.6").await.unwrap(),
        StatusCode::UNAUTHORIZED
    );
    for i in 1..32 {
        stalled.push(stall(&format!("192.0.2.{i}"), 1000).await);
    }
    wait_reading("pool=\"small\"", 32.0).await;
    let refused = cp
        .request(reqwest::Method::POST, "/api/v1/leaks/github", None)
        .header("x-forwarded-for", "203.0.113.7")
        .header("Github-Public-Key-Identifier", "k1")
        .header("Github-Public-Key-Signature", &wrong)
        .body(small.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.headers()["retry-after"], "1");

    // …and free them when they go.
    drop(stalled);
    wait_reading("pool=\"small\"", 0.0).await;
    wait_reading("pool=\"large\"", 0.0).await;
    assert_eq!(
        small_probe("203.0.113.7").await.unwrap(),
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_that_do_not_check_out_change_nothing() {
    let github_key = GitHubKey::generate("k1", true);
    let impostor = GitHubKey::generate("k1", true);
    // Still listed, no longer current (GitHub rotating): its reports are accepted.
    let previous = GitHubKey::generate("k0", false);
    let github = GitHubKeysEndpoint::start(&[&github_key, &previous]).await;
    let cp = control_plane(Backend::Sqlite, &github, &[]).await;
    let live = cp.create_key("live", "GENERIC").await;
    let body = report(&[&live]);
    let good = github_key.sign(&body);

    let mut tampered = body.clone();
    let i = tampered.iter().position(|b| *b == b'c').unwrap(); // in "content"
    tampered[i] = b'C';
    let cases: Vec<Case> = vec![
        (
            "signed by another key",
            body.clone(),
            Some("k1"),
            Some(impostor.sign(&body)),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "unknown key id",
            body.clone(),
            Some("k9"),
            Some(good.clone()),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "one byte changed",
            tampered,
            Some("k1"),
            Some(good.clone()),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "signature not base64",
            body.clone(),
            Some("k1"),
            Some("%%%".into()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "signature not DER",
            body.clone(),
            Some("k1"),
            Some("AAAA".into()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "no signature",
            body.clone(),
            Some("k1"),
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            "no key id",
            body.clone(),
            None,
            Some(good.clone()),
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (what, body, id, sig, want) in cases {
        let (status, value, _) = post(&cp, body, id, sig.as_deref()).await;
        assert_eq!(status, want, "{what}: {value}");
        assert_eq!(
            cp.verify(&live).await,
            StatusCode::OK,
            "{what}: the key must still work"
        );
    }
    // Signed, but not a report.
    let not_a_report = br#"{"token": "x"}"#.to_vec();
    let (status, _) = signed(&cp, &github_key, not_a_report).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // Over 8 MiB: refused from its Content-Length, before the body is read (sent by hand:
    // an HTTP client would still be writing the body when the answer comes).
    let addr = cp.url.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /api/v1/leaks/github HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Github-Public-Key-Identifier: k1\r\nGithub-Public-Key-Signature: {good}\r\n\
         Content-Length: {}\r\n\r\n[",
        9 * 1024 * 1024
    );
    tokio::io::AsyncWriteExt::write_all(&mut stream, head.as_bytes())
        .await
        .unwrap();
    let mut answer = vec![0u8; 64];
    let n = tokio::io::AsyncReadExt::read(&mut stream, &mut answer)
        .await
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // A correct report with no live key of ours: all false positives, nothing revoked.
    let made_up = ApiKey::generate().unwrap();
    let (status, feedback) = signed(&cp, &github_key, report(&[made_up.expose_secret()])).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(feedback[0]["label"], "false_positive");
    assert_eq!(cp.verify(&live).await, StatusCode::OK);
    assert!(leak_audits(&cp).await.is_empty());
    let (status, feedback) = signed(&cp, &previous, report(&[made_up.expose_secret()])).await;
    assert_eq!(status, StatusCode::OK, "{feedback}");
    assert!(cp.metric("metlo_leak_reports_total", "mismatch").await >= 2.0);
    cp.assert_log_has_no_secrets();
}

/// GitHub's keys cannot be had: 503 (GitHub retries), nothing revoked. A key GitHub starts
/// signing with later is fetched when a report names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_endpoint_down_is_a_503_and_a_new_key_is_fetched_when_named() {
    let k1 = GitHubKey::generate("k1", true);
    let github = GitHubKeysEndpoint::start(&[&k1]).await;
    github.set_down(true);
    let cp = control_plane(Backend::Sqlite, &github, &[]).await;
    let live = cp.create_key("live", "GENERIC").await;
    let body = report(&[&live]);
    let signature = k1.sign(&body);
    let (status, value, headers) = post(&cp, body.clone(), Some("k1"), Some(&signature)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{value}");
    assert_eq!(headers["retry-after"], "60");
    assert!(
        !value.to_string().contains("127.0.0.1"),
        "the public answer names GITHUB_KEYS_URL ({}): {value}",
        github.url
    );
    assert_eq!(cp.verify(&live).await, StatusCode::OK);
    let (_, ready) = cp.ops_get("/readyz").await;
    let ready: Value = serde_json::from_str(&ready).unwrap();
    assert!(
        ready["leakRevocation"]["githubKeys"]["lastError"].is_string(),
        "{ready}"
    );

    // Up again, with a second key; a report signed with it is fetched for (once the
    // minimum interval has passed) and verified.
    let k2 = GitHubKey::generate("k2", true);
    github.set_keys(&[&k1, &k2]);
    github.set_down(false);
    tokio::time::sleep(Duration::from_secs(11)).await;
    let fetches = github.fetches();
    let (status, feedback) = signed(&cp, &k2, report(&[&live])).await;
    assert_eq!(status, StatusCode::OK, "{feedback}");
    assert_eq!(feedback[0]["label"], "true_positive");
    assert_eq!(github.fetches(), fetches + 1);
    assert_eq!(cp.verify(&live).await, StatusCode::UNAUTHORIZED);
}

async fn a_batch_of_ten_thousand_tokens_is_handled_in_one_pass(backend: Backend) {
    let github_key = GitHubKey::generate("k1", true);
    let github = GitHubKeysEndpoint::start(&[&github_key]).await;
    let cp = control_plane(backend, &github, &[]).await;
    let mut live = vec![];
    for i in 0..10 {
        live.push(cp.create_key(&format!("live-{i}"), "GENERIC").await);
    }
    let spare = cp.create_key("spare", "GENERIC").await;
    let made_up: Vec<ApiKey> = (0..5000).map(|_| ApiKey::generate().unwrap()).collect();
    let mut tokens: Vec<String> = made_up
        .iter()
        .map(|k| k.expose_secret().to_owned())
        .collect();
    tokens.extend((0..4990).map(|i| format!("metlo.garbage{i}")));
    for (i, k) in live.iter().enumerate() {
        tokens.insert(i * 997, k.clone());
    }
    assert_eq!(tokens.len(), 10_000);
    let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let started = Instant::now();
    let (status, feedback) = signed(&cp, &github_key, report(&refs)).await;
    let took = started.elapsed();
    assert_eq!(status, StatusCode::OK);
    println!("10,000-token report ({backend:?}): {} ms", took.as_millis());
    assert!(took < Duration::from_secs(10), "{took:?}");
    let feedback = feedback.as_array().unwrap();
    assert_eq!(feedback.len(), 10_000);
    for (token, f) in tokens.iter().zip(feedback) {
        let ours = live.contains(token);
        assert_eq!(
            f["label"],
            if ours {
                "true_positive"
            } else {
                "false_positive"
            }
        );
        assert_eq!(f["token_hash"], token_hash(token));
    }
    for k in &live {
        assert_eq!(cp.verify(k).await, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(cp.verify(&spare).await, StatusCode::OK);
    assert_eq!(leak_audits(&cp).await.len(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_only_audits_off_has_no_route_and_a_rolled_away_secret_ends_alone() {
    let github_key = GitHubKey::generate("k1", true);
    let github = GitHubKeysEndpoint::start(&[&github_key]).await;
    let notify = control_plane(Backend::Sqlite, &github, &[("LEAK_REVOCATION", "notify")]).await;
    let key = notify.create_key("k", "GENERIC").await;
    let (status, feedback) = signed(&notify, &github_key, report(&[&key])).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(feedback[0]["label"], "true_positive");
    assert_eq!(
        notify.verify(&key).await,
        StatusCode::OK,
        "notify changes nothing"
    );
    let audits = leak_audits(&notify).await;
    assert_eq!(audits.len(), 1);
    assert_eq!(audits[0]["detail"]["action"], "notified");

    let off = control_plane(Backend::Sqlite, &github, &[("LEAK_REVOCATION", "off")]).await;
    let key = off.create_key("k", "GENERIC").await;
    let body = report(&[&key]);
    let signature = github_key.sign(&body);
    let (status, _, _) = post(&off, body, Some("k1"), Some(&signature)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(off.verify(&key).await, StatusCode::OK);
    let (_, ready) = off.ops_get("/readyz").await;
    assert_eq!(
        serde_json::from_str::<Value>(&ready).unwrap()["leakRevocation"],
        "off"
    );

    // A secret a roll replaced (still in its overlap) leaks: that secret ends, the key and
    // its new secret stay.
    let revoke = control_plane(Backend::Sqlite, &github, &[]).await;
    let old = revoke.create_key("rolled", "GENERIC").await;
    let (_, body) = revoke
        .roll("rolled", Some(json!({"overlapSeconds": 3600})))
        .await;
    let new = body["apiKey"].as_str().unwrap().to_owned();
    assert_eq!(revoke.verify(&old).await, StatusCode::OK);
    let (status, feedback) = signed(&revoke, &github_key, report(&[&old])).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(feedback[0]["label"], "true_positive");
    assert_eq!(revoke.verify(&old).await, StatusCode::UNAUTHORIZED);
    assert_eq!(revoke.verify(&new).await, StatusCode::OK);
    assert_eq!(
        leak_audits(&revoke).await[0]["detail"]["action"],
        "rolled-away secret ended"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaked_check_says_which_keys_in_a_text_are_ours() {
    let cp = ControlPlane::start(Backend::Sqlite).await;
    let live = cp.create_key("live", "GENERIC").await;
    let gone = cp.create_key("gone", "GENERIC").await;
    assert_eq!(
        cp.delete("gone", Some(&cp.admin_key)).await.0,
        StatusCode::OK
    );
    let stranger = ApiKey::generate().unwrap();
    let text = format!(
        "log line Authorization: {live}\nexport K={gone} # old\n{} and {live} again, metlo.short\n",
        stranger.expose_secret()
    );
    let (env, log) = cp.cli_env();
    let mut child = std::process::Command::new(metlo_tests::control_plane_bin())
        .args(["keys", "leaked-check", "--json"])
        .envs(env)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = log;
    let found: Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = |k: &str| ApiKey::parse(k).unwrap().identifier();
    assert_eq!(
        found,
        json!([
            {"identifier": id(&live), "status": "live", "name": "live"},
            {"identifier": id(&gone), "status": "revoked", "name": null},
            {"identifier": id(stranger.expose_secret()), "status": "not-ours", "name": null},
        ])
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(!printed.contains(&live), "never the key itself");
}
