//! Key lifecycle through the real binary: a roll's overlap ending on two replicas that
//! share Redis, and the admin CLI over HTTP (SQLite and PostgreSQL). Expiry, rolls and
//! their races, last use and the audit log are tested in process beside their handlers
//! (`control-plane/src/http/key_rolls_tests.rs`, `usage_tests.rs`, `audit_tests.rs`).

use metlo_shared::ApiKey;
use metlo_tests::time::{ms_of, sleep_until};
use metlo_tests::{
    assert_no_keys_in, on_both_backends, run_cli, Backend, ControlPlane, Redis, StackBuilder,
    StatusCode,
};
use serde_json::{json, Value};

on_both_backends!(admin_cli_over_http);

fn secret(body: &Value) -> String {
    body["apiKey"]
        .as_str()
        .expect("a key in the response")
        .to_owned()
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
