//! The control plane on managed-style PostgreSQL and Redis: servers that take only TLS
//! (certificates made at run time), the URL's `sslmode` read as libpq reads it, Redis
//! over TLS with a password and a least-privilege ACL user.

use metlo_tests::tls::{Ca, TlsRedis};
use metlo_tests::{run_cli, Backend, ControlPlane, Postgres, StackBuilder, StatusCode};
use serde_json::json;

/// `metlo-control-plane migrate` against `url`: its stdout, or its stderr if it failed.
fn migrate(url: &str, log: &std::path::Path) -> Result<String, String> {
    run_cli(&[("DATABASE_URL".into(), url.into())], &["migrate"], log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_tls_as_libpq_reads_sslmode() {
    let ca = Ca::new("metlo test CA");
    let other_ca = Ca::new("someone else's CA");
    let (cert, key) = ca.issue(&["localhost"]);
    let pg = Postgres::start_tls(&cert, &key);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("cli.log");
    let ca_file = ca.write(dir.path(), "ca.pem");
    let other_file = other_ca.write(dir.path(), "other.pem");
    let with = |host: &str, mode: &str, root: Option<&std::path::Path>| {
        let root = root.map_or(String::new(), |p| format!("&sslrootcert={}", p.display()));
        pg.url_with(host, &format!("sslmode={mode}{root}"))
    };

    // verify-full with the right CA and host name: a whole control plane runs on it.
    let good = with("localhost", "verify-full", Some(&ca_file));
    let cp =
        ControlPlane::start_with(StackBuilder::new(Backend::Postgres).env("DATABASE_URL", &good))
            .await;
    let key = cp.create_key("over tls", "GENERIC").await;
    assert_eq!(cp.verify(&key).await, StatusCode::OK);
    let (status, _) = cp.create(json!({"name": "over tls"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "the database answers");
    drop(cp);

    // A certificate from another CA, or for another name: refused, saying why.
    let err = migrate(&with("localhost", "verify-full", Some(&other_file)), &log).unwrap_err();
    assert!(
        err.contains("UnknownIssuer") && err.contains("sslrootcert"),
        "{err}"
    );
    let err = migrate(&with("127.0.0.1", "verify-full", Some(&ca_file)), &log).unwrap_err();
    assert!(err.contains("not valid for name"), "{err}");
    // verify-ca checks the chain (and, with sqlx 0.8 on rustls, the name too).
    migrate(&with("localhost", "verify-ca", Some(&ca_file)), &log).unwrap();
    let err = migrate(&with("localhost", "verify-ca", Some(&other_file)), &log).unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");

    // require: encrypted, the certificate unchecked — unless a root certificate is
    // named, which libpq then checks (as verify-ca).
    migrate(&with("127.0.0.1", "require", None), &log).unwrap();
    let err = migrate(&with("localhost", "require", Some(&other_file)), &log).unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");
    // prefer: TLS when the server has it, as here.
    migrate(&with("127.0.0.1", "prefer", None), &log).unwrap();

    // disable: the server takes no plain connection.
    let err = migrate(&with("127.0.0.1", "disable", None), &log).unwrap_err();
    assert!(
        err.contains("no pg_hba.conf entry") && err.contains("no encryption"),
        "{err}"
    );
}

/// The ACL user the README's Production section gives the control plane: its own keys
/// and channel, the commands it sends (and those its scripts call), nothing else.
const CONTROL_PLANE_ACL: &str = "metlo on >control-plane-password resetkeys ~metlo:* \
     resetchannels &metlo:revoked -@all +get +set +eval +publish +subscribe +ping +incr \
     +pexpire +pttl";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_with_a_least_privilege_user() {
    let ca = Ca::new("metlo test CA");
    let redis = TlsRedis::start(&ca, &["localhost"], "admin-password", &[CONTROL_PLANE_ACL]);
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write(dir.path(), "ca.pem");
    let cp = ControlPlane::start_with(
        StackBuilder::new(Backend::Postgres)
            .redis(redis.url("localhost", "metlo", "control-plane-password"))
            .env("REDIS_CA_FILE", ca_file.display()),
    )
    .await;

    // Verification is cached in Redis, and a rate limit is counted there (with Redis
    // out of reach a limited key gets 503, never an uncounted 200).
    let (status, body) = cp
        .create(json!({"name": "limited", "rateLimit": {"requests": 2, "periodSeconds": 60}}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let key = body["apiKey"].as_str().unwrap().to_owned();
    let hash = metlo_shared::ApiKey::parse(&key).unwrap().hash().to_hex();
    assert_eq!(cp.verify(&key).await, StatusCode::OK);
    assert_eq!(cp.verify(&key).await, StatusCode::OK);
    assert_eq!(cp.verify(&key).await, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(redis.cli(&["EXISTS", &format!("metlo:verify:{hash}")]), "1");
    let (_, metrics) = cp.ops_get("/metrics").await;
    assert!(
        !metrics.contains("metlo_cache_errors_total"),
        "Redis refused something: {metrics}"
    );
    // A delete reaches Redis too (its tombstone).
    assert_eq!(
        cp.delete("limited", Some(&cp.admin_key)).await.0,
        StatusCode::OK
    );
    assert_eq!(redis.cli(&["GET", &format!("metlo:verify:{hash}")]), "-");
    assert_eq!(cp.verify(&key).await, StatusCode::UNAUTHORIZED);
    drop(cp);

    // A wrong password or CA: the service still starts and verifies (through the
    // database), counting the cache's failures.
    let other_ca = Ca::new("someone else's CA");
    let other_file = other_ca.write(dir.path(), "other.pem");
    for (url, ca) in [
        (redis.url("localhost", "metlo", "wrong"), &ca_file),
        (
            redis.url("localhost", "metlo", "control-plane-password"),
            &other_file,
        ),
    ] {
        let cp = ControlPlane::start_with(
            StackBuilder::new(Backend::Postgres)
                .redis(url)
                .env("REDIS_CA_FILE", ca.display()),
        )
        .await;
        let key = cp.create_key("k", "GENERIC").await;
        assert_eq!(cp.verify(&key).await, StatusCode::OK);
        let (_, metrics) = cp.ops_get("/metrics").await;
        assert!(metrics.contains("metlo_cache_errors_total"), "{metrics}");
    }
}
