//! Key roles through the real binary's command line, on SQLite and PostgreSQL: the CLI
//! shows roles, refuses to change one, warns about plain http:// to another host, and
//! may delete the last admin key (root on the database). Who may call which route, and
//! the API's role rules, are tested in process beside the handlers
//! (`control-plane/src/http/auth_tests.rs`, `keys_tests.rs`, `ops.rs`).

use metlo_tests::{on_both_backends, Backend, ControlPlane, StatusCode};
use serde_json::json;

on_both_backends!(
    the_cli_shows_and_guards_roles,
    the_cli_may_delete_the_last_admin_key
);

async fn the_cli_shows_and_guards_roles(backend: Backend) {
    let cp = ControlPlane::start(backend).await;
    let (status, body) = cp.create(json!({"name": "new-edge", "role": "edge"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let table = cp.cli(&["keys", "list"]).unwrap();
    let header = table.lines().next().unwrap();
    assert!(header.contains("ROLE"), "{table}");
    let row = table
        .lines()
        .find(|l| l.split_whitespace().next() == Some("new-edge"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(row.split_whitespace().any(|w| w == "edge"), "{row}");
    assert!(cp
        .cli(&["keys", "create", "--name", "x", "--role", "legacy"])
        .is_err());
    let err = cp
        .cli(&["keys", "set-role", "new-edge", "admin"])
        .unwrap_err();
    assert!(err.contains("set once"), "{err}");
    // Plain http:// to another host: warned about (here the host does not even resolve).
    let env = vec![
        ("METLO_API_KEY".to_owned(), cp.admin_key.clone()),
        (
            "METLO_URL".to_owned(),
            "http://metlo-control-plane.invalid".to_owned(),
        ),
    ];
    let log = tempfile::NamedTempFile::new().unwrap();
    let err = metlo_tests::run_cli(&env, &["keys", "list"], log.path()).unwrap_err();
    assert!(
        err.contains("warning:") && err.contains("plain http://"),
        "{err}"
    );
    let env = vec![
        ("METLO_API_KEY".to_owned(), cp.admin_key.clone()),
        ("METLO_URL".to_owned(), cp.url.clone()),
    ];
    let out = metlo_tests::run_cli(&env, &["keys", "list"], log.path()).unwrap();
    assert!(out.contains("new-edge"));
    let stderr = std::fs::read_to_string(log.path()).unwrap();
    assert_eq!(
        stderr.matches("warning:").count(),
        1,
        "no warning for loopback: {stderr}"
    );
}

async fn the_cli_may_delete_the_last_admin_key(backend: Backend) {
    let cp = ControlPlane::start(backend).await;
    let (status, _) = cp.delete("admin", Some(&cp.admin_key)).await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "the API keeps the last admin key"
    );
    let admins = cp.cli(&["keys", "list"]).unwrap();
    assert_eq!(
        admins.lines().filter(|l| l.contains(" admin ")).count(),
        1,
        "{admins}"
    );
    // The CLI on the database may delete the last one.
    cp.cli(&["keys", "delete", "admin"]).unwrap();
    let left = cp.cli(&["keys", "list"]).unwrap();
    assert_eq!(
        left.lines().filter(|l| l.contains(" admin ")).count(),
        0,
        "{left}"
    );
}
