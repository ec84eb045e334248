//! Key lifecycle beyond Metlo, through HTTP into the real binary on SQLite and
//! PostgreSQL: expiry, roll with overlap (also with Redis and replicas), the CLI over
//! HTTP. (Last use and the audit log are tested in process beside their handlers.)

use metlo_shared::ApiKey;
use metlo_tests::time::{iso, ms_of, now_ms, sleep_until};
use metlo_tests::{
    assert_no_keys_in, on_both_backends, run_cli, Backend, ControlPlane, Redis, StackBuilder,
    StatusCode,
};
use serde_json::{json, Value};

// lastUsed coalescing and the audit log: in process, beside their handlers
// (control-plane/src/http/usage_tests.rs, audit_tests.rs).
on_both_backends!(
    expiry,
    roll_with_overlap,
    roll_twice_during_an_overlap,
    concurrent_rolls,
    delete_racing_a_roll,
    admin_cli_over_http,
);

/// The first whole second at least `ms_from_now` ahead.
fn whole_second_ahead(ms_from_now: i64) -> i64 {
    (now_ms() + ms_from_now + 999) / 1000 * 1000
}

fn secret(body: &Value) -> String {
    body["apiKey"]
        .as_str()
        .expect("a key in the response")
        .to_owned()
}

async fn expiry(backend: Backend) {
    let cp = ControlPlane::start_with(StackBuilder::new(backend).env("MAX_API_KEYS", 6)).await;
    for (bad, why) in [
        (json!("2020-01-01T00:00:00Z"), "in the future"),
        (json!(iso(now_ms() - 1000)), "in the future"),
        (json!("tomorrow"), "RFC 3339"),
        (json!("2030-01-01"), "RFC 3339"),
        (json!("2030-01-01T00:00:00"), "RFC 3339"),
        (json!(1_900_000_000), "invalid JSON"),
    ] {
        let (status, body) = cp.create(json!({"name": "bad", "expiresAt": bad})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert!(
            body["message"].as_str().unwrap().contains(why),
            "{bad}: {body}"
        );
    }
    assert_eq!(cp.list().await.len(), 3, "nothing stored by bad requests");

    let (status, forever) = cp
        .create(json!({"name": "forever", "expiresAt": null}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(forever["expiresAt"], Value::Null);
    // Fractions of a second are cut: expiries are whole seconds everywhere.
    let (status, cut) = cp
        .create(json!({"name": "cut", "expiresAt": "2031-05-06T07:08:09.750+02:00"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{cut}");
    assert_eq!(cut["expiresAt"], "2031-05-06T05:08:09.000Z");

    let end = whole_second_ahead(2500);
    let (status, short) = cp
        .create(json!({"name": "short", "expiresAt": iso(end)}))
        .await;
    assert_eq!(status, StatusCode::OK, "{short}");
    assert_eq!(ms_of(&short["expiresAt"]), end);
    assert_eq!(ms_of(&cp.listed("short").await["expiresAt"]), end);
    let short_key = secret(&short);
    let hash = ApiKey::parse(&short_key).unwrap().hash().to_hex();
    let (_, _, record) = cp
        .get(&format!("/api/v1/keys/by-hash/{hash}"), Some(&cp.edge_key))
        .await;
    let record: Value = serde_json::from_str(&record).unwrap();
    assert_eq!(
        record["expires"],
        end / 1000,
        "the edge's record carries it"
    );

    sleep_until(end - 400).await;
    assert_eq!(cp.verify(&short_key).await, StatusCode::OK, "just before");
    sleep_until(end + 300).await;
    assert_eq!(
        cp.verify(&short_key).await,
        StatusCode::UNAUTHORIZED,
        "just after"
    );

    // Expired keys stay listed and count toward the limit until deleted.
    assert_eq!(cp.list().await.len(), 6);
    let (status, body) = cp.create(json!({"name": "one more"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "limit_reached");
    assert_eq!(
        cp.delete("short", Some(&cp.admin_key)).await.0,
        StatusCode::OK
    );
    assert_eq!(
        cp.create(json!({"name": "one more"})).await.0,
        StatusCode::OK
    );
}

async fn roll_with_overlap(backend: Backend) {
    let cp = ControlPlane::start(backend).await;
    let expires = whole_second_ahead(86_400_000);
    let (_, created) = cp
        .create(json!({"name": "svc", "keyFor": "GCP", "expiresAt": iso(expires)}))
        .await;
    let key1 = secret(&created);

    // No overlap: the old secret stops at once.
    let (status, rolled) = cp.roll("svc", None).await;
    assert_eq!(status, StatusCode::OK, "{rolled}");
    let key2 = secret(&rolled);
    assert_eq!(cp.verify(&key1).await, StatusCode::UNAUTHORIZED);
    assert_eq!(cp.verify(&key2).await, StatusCode::OK);
    assert_eq!(rolled["name"], "svc");
    assert_eq!(rolled["for"], "GCP");
    assert_eq!(rolled["created"], created["created"]);
    assert_eq!(ms_of(&rolled["expiresAt"]), expires);
    assert_eq!(
        rolled["identifier"],
        ApiKey::parse(&key2).unwrap().identifier()
    );
    assert_eq!(rolled["previousIdentifier"], created["identifier"]);
    assert!(ms_of(&rolled["previousValidUntil"]) <= now_ms());
    assert_eq!(cp.listed("svc").await["identifier"], rolled["identifier"]);

    // With an overlap: both work until it ends, to the second; then only the new one.
    let (status, rolled) = cp.roll("svc", Some(json!({"overlapSeconds": 2}))).await;
    assert_eq!(status, StatusCode::OK, "{rolled}");
    let key3 = secret(&rolled);
    let end = ms_of(&rolled["previousValidUntil"]);
    assert_eq!(end % 1000, 0, "ends on a whole second");
    assert!(end >= now_ms() + 1500 && end <= now_ms() + 3100, "{rolled}");
    let hash2 = ApiKey::parse(&key2).unwrap().hash().to_hex();
    let (_, _, record) = cp
        .get(&format!("/api/v1/keys/by-hash/{hash2}"), Some(&cp.edge_key))
        .await;
    let record: Value = serde_json::from_str(&record).unwrap();
    assert_eq!(record["expires"], end / 1000, "{record}");
    assert_eq!(
        record["identifier"],
        ApiKey::parse(&key2).unwrap().identifier()
    );
    assert_eq!(cp.verify(&key3).await, StatusCode::OK);
    sleep_until(end - 400).await;
    assert_eq!(
        cp.verify(&key2).await,
        StatusCode::OK,
        "just before the end"
    );
    sleep_until(end + 300).await;
    assert_eq!(
        cp.verify(&key2).await,
        StatusCode::UNAUTHORIZED,
        "just after"
    );
    assert_eq!(cp.verify(&key3).await, StatusCode::OK);

    // Bad rolls change nothing.
    for bad in [
        json!({"overlapSeconds": -1}),
        json!({"overlapSeconds": 604_801}),
        json!({"overlapSeconds": "5"}),
        json!({"overlapSeconds": 1.5}),
        json!({"overlap": 5}),
        json!([]),
    ] {
        let (status, body) = cp.roll("svc", Some(bad.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert_eq!(body["error"], "bad_request");
    }
    assert_eq!(cp.verify(&key3).await, StatusCode::OK);
    let (status, body) = cp.roll("nope", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    // Deleting a key ends every secret, the ones in an overlap too.
    let (_, rolled) = cp.roll("svc", Some(json!({"overlapSeconds": 60}))).await;
    let key4 = secret(&rolled);
    assert_eq!(cp.verify(&key3).await, StatusCode::OK);
    assert_eq!(
        cp.delete("svc", Some(&cp.admin_key)).await.0,
        StatusCode::OK
    );
    assert_eq!(cp.verify(&key3).await, StatusCode::UNAUTHORIZED);
    assert_eq!(cp.verify(&key4).await, StatusCode::UNAUTHORIZED);
}

/// A second roll caps the secrets still in the first one's overlap: every older secret
/// stops when the newest overlap ends (at once with no overlap — the "it leaked" roll).
async fn roll_twice_during_an_overlap(backend: Backend) {
    let cp = ControlPlane::start(backend).await;
    let key1 = cp.create_key("k", "GENERIC").await;
    let (_, first) = cp.roll("k", Some(json!({"overlapSeconds": 60}))).await;
    let key2 = secret(&first);
    let (_, second) = cp.roll("k", Some(json!({"overlapSeconds": 2}))).await;
    let key3 = secret(&second);
    let end = ms_of(&second["previousValidUntil"]);
    assert!(end < ms_of(&first["previousValidUntil"]));
    sleep_until(end - 400).await;
    for k in [&key1, &key2, &key3] {
        assert_eq!(
            cp.verify(k).await,
            StatusCode::OK,
            "before the second overlap ends"
        );
    }
    sleep_until(end + 300).await;
    assert_eq!(cp.verify(&key1).await, StatusCode::UNAUTHORIZED, "capped");
    assert_eq!(cp.verify(&key2).await, StatusCode::UNAUTHORIZED);
    assert_eq!(cp.verify(&key3).await, StatusCode::OK);

    let (_, third) = cp.roll("k", Some(json!({"overlapSeconds": 60}))).await;
    let key4 = secret(&third);
    assert_eq!(cp.verify(&key3).await, StatusCode::OK, "in its overlap");
    let (_, fourth) = cp.roll("k", None).await;
    let key5 = secret(&fourth);
    assert_eq!(
        cp.verify(&key3).await,
        StatusCode::UNAUTHORIZED,
        "ended at once"
    );
    assert_eq!(
        cp.verify(&key4).await,
        StatusCode::UNAUTHORIZED,
        "ended at once"
    );
    assert_eq!(cp.verify(&key5).await, StatusCode::OK);
}

/// Rolls of one key racing each other run one after the other: each succeeds, every
/// secret they handed out works within its overlap, the key ends with exactly one current
/// secret, and a final roll without overlap ends all the others.
async fn concurrent_rolls(backend: Backend) {
    let cp = ControlPlane::start(backend).await;
    let first = cp.create_key("busy", "GENERIC").await;
    let rolls = futures::future::join_all(
        (0..10).map(|_| cp.roll("busy", Some(json!({"overlapSeconds": 60})))),
    )
    .await;
    let mut keys = vec![first];
    for (status, body) in &rolls {
        assert_eq!(*status, StatusCode::OK, "{body}");
        keys.push(secret(body));
    }
    for k in &keys {
        assert_eq!(cp.verify(k).await, StatusCode::OK);
    }
    let current = cp.listed("busy").await["identifier"].clone();
    let matching = rolls
        .iter()
        .filter(|(_, b)| b["identifier"] == current)
        .count();
    assert_eq!(matching, 1, "one of the rolls' secrets is current");
    let previous: std::collections::HashSet<String> = rolls
        .iter()
        .map(|(_, b)| b["previousIdentifier"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(previous.len(), 10, "each roll replaced a different secret");
    let (_, last) = cp.roll("busy", None).await;
    for k in &keys {
        assert_eq!(cp.verify(k).await, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(cp.verify(&secret(&last)).await, StatusCode::OK);
}

/// A delete racing a roll of the same key: never a 5xx, and once the delete has
/// succeeded every secret — the old one the roll kept in its overlap too — is refused.
async fn delete_racing_a_roll(backend: Backend) {
    let cp = ControlPlane::start(backend).await;
    for round in 0..15 {
        let name = format!("raced-{round}");
        let old = cp.create_key(&name, "GENERIC").await;
        assert_eq!(
            cp.verify(&old).await,
            StatusCode::OK,
            "cached before the race"
        );
        let ((roll_status, rolled), (delete_status, _)) = tokio::join!(
            cp.roll(&name, Some(json!({"overlapSeconds": 60}))),
            cp.delete(&name, Some(&cp.admin_key)),
        );
        assert!(
            matches!(roll_status, StatusCode::OK | StatusCode::NOT_FOUND),
            "{roll_status} {rolled}"
        );
        assert_eq!(delete_status, StatusCode::OK);
        assert_eq!(
            cp.verify(&old).await,
            StatusCode::UNAUTHORIZED,
            "round {round}"
        );
        if roll_status == StatusCode::OK {
            assert_eq!(cp.verify(&secret(&rolled)).await, StatusCode::UNAUTHORIZED);
        }
    }
}

/// The same boundary with the Redis cache and two replicas: the cached record of the old
/// secret is overwritten by the roll, so neither replica accepts it after the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roll_overlap_with_redis_and_two_replicas() {
    let redis = Redis::start();
    let a = ControlPlane::start_with(
        StackBuilder::new(Backend::Postgres)
            .redis(redis.url())
            .env("CACHE_TTL_SECONDS", 60),
    )
    .await;
    let b = a.replica().await;
    let old = a.create_key("cached", "GENERIC").await;
    for cp in [&a, &b] {
        assert_eq!(
            cp.verify(&old).await,
            StatusCode::OK,
            "cached without an end"
        );
    }
    let (_, rolled) = a.roll("cached", Some(json!({"overlapSeconds": 2}))).await;
    let new = secret(&rolled);
    let end = ms_of(&rolled["previousValidUntil"]);
    sleep_until(end - 400).await;
    for cp in [&a, &b] {
        assert_eq!(cp.verify(&old).await, StatusCode::OK);
        assert_eq!(cp.verify(&new).await, StatusCode::OK);
    }
    sleep_until(end + 300).await;
    for cp in [&a, &b] {
        assert_eq!(cp.verify(&old).await, StatusCode::UNAUTHORIZED);
        assert_eq!(cp.verify(&new).await, StatusCode::OK);
    }
}

async fn admin_cli_over_http(backend: Backend) {
    let cp = ControlPlane::start(backend).await;
    let log = tempfile::NamedTempFile::new().unwrap();
    // No database settings at all: only the URL and the key.
    let remote = |key: Option<&str>, args: &[&str]| {
        let mut env = vec![];
        if let Some(k) = key {
            env.push(("METLO_API_KEY".to_owned(), k.to_owned()));
        }
        let mut full = vec!["keys", "--url", cp.url.as_str()];
        full.extend_from_slice(args);
        run_cli(&env, &full, log.path())
    };
    let admin = Some(cp.admin_key.as_str());

    let key = remote(admin, &["create", "--name", "remote", "--type", "AWS"]).unwrap();
    cp.secrets.lock().unwrap().push(key.clone());
    assert_eq!(
        cp.verify(&key).await,
        StatusCode::OK,
        "stdout is the key alone"
    );

    let table = remote(admin, &["list"]).unwrap();
    let header = table.lines().next().unwrap();
    for column in [
        "NAME",
        "IDENTIFIER",
        "TYPE",
        "CREATED",
        "EXPIRES",
        "LAST USED",
    ] {
        assert!(header.contains(column), "{table}");
    }
    let row = table
        .lines()
        .find(|l| l.contains("remote"))
        .expect("listed");
    assert!(row.contains("AWS") && row.contains(&ApiKey::parse(&key).unwrap().identifier()));
    assert!(!table.contains(&key));

    let listed: Value = serde_json::from_str(&remote(admin, &["--json", "list"]).unwrap()).unwrap();
    assert!(listed
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k["name"] == "remote" && k["for"] == "AWS"));

    let rolled = remote(admin, &["roll", "remote", "--overlap-seconds", "60"]).unwrap();
    cp.secrets.lock().unwrap().push(rolled.clone());
    assert_eq!(cp.verify(&rolled).await, StatusCode::OK);
    assert_eq!(cp.verify(&key).await, StatusCode::OK, "in the overlap");

    let audit = remote(admin, &["audit", "--limit", "5"]).unwrap();
    assert!(audit.lines().next().unwrap().contains("ACTION"));
    assert!(
        audit.contains("key.roll") && audit.contains("key.create"),
        "{audit}"
    );
    let page: Value =
        serde_json::from_str(&remote(admin, &["audit", "--json", "--limit", "1"]).unwrap())
            .unwrap();
    assert_eq!(page["entries"].as_array().unwrap().len(), 1);
    assert!(page["nextBefore"].is_i64());

    remote(admin, &["delete", "remote"]).unwrap();
    assert_eq!(cp.verify(&rolled).await, StatusCode::UNAUTHORIZED);
    let err = remote(admin, &["delete", "remote"]).unwrap_err();
    assert!(
        err.contains("404") && err.contains("no API key with this name"),
        "{err}"
    );
    let err = remote(None, &["list"]).unwrap_err();
    assert!(err.contains("METLO_API_KEY"), "{err}");
    let wrong = ApiKey::generate().unwrap();
    let err = remote(Some(wrong.expose_secret()), &["list"]).unwrap_err();
    assert!(err.contains("401"), "{err}");
    let err = remote(
        admin,
        &[
            "create",
            "--name",
            "late",
            "--expires-at",
            "2020-01-01T00:00:00Z",
        ],
    )
    .unwrap_err();
    assert!(
        err.contains("400") && err.contains("in the future"),
        "{err}"
    );

    // The same commands against the database directly.
    let local = cp.cli(&["keys", "create", "--name", "local"]).unwrap();
    cp.secrets.lock().unwrap().push(local.clone());
    let local2 = cp.cli(&["keys", "roll", "local"]).unwrap();
    cp.secrets.lock().unwrap().push(local2.clone());
    assert_eq!(cp.verify(&local2).await, StatusCode::OK);
    let audit = cp.cli(&["keys", "audit"]).unwrap();
    assert!(
        audit.contains("key.roll") && audit.contains("local"),
        "{audit}"
    );
    let log_text = std::fs::read_to_string(log.path()).unwrap();
    assert_no_keys_in(&log_text, "the CLI's stderr");
}
