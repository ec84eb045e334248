//! Paged key lists through the real binary's command line, on SQLite and PostgreSQL: the
//! CLI walks the pages on the database and through the API. The HTTP rules of lists
//! (paging, filters, the plain array's limit, 400s) are tested in process beside the
//! handlers (`control-plane/src/http/key_lists_tests.rs`).

use metlo_tests::{on_both_backends, run_cli, Backend, ControlPlane, StackBuilder};
use serde_json::Value;

on_both_backends!(the_cli_walks_the_pages);

async fn the_cli_walks_the_pages(backend: Backend) {
    let cp = ControlPlane::start_with(
        StackBuilder::new(backend)
            .env("MAX_API_KEYS", 1000)
            .env("LIST_UNPAGED_MAX", 5),
    )
    .await;
    // Three keys exist from the start (the admin, edge and client keys).
    for i in 0..2 {
        cp.create_key(&format!("k{i}"), "GENERIC").await;
    }
    cp.create_key("k2", "ONBOARDING").await;
    // Past LIST_UNPAGED_MAX (5) the CLI walks the pages, on the database and through the
    // API.
    let log = tempfile::NamedTempFile::new().unwrap();
    let remote = |args: &[&str]| {
        let env = vec![("METLO_API_KEY".to_owned(), cp.admin_key.clone())];
        let mut full = vec!["keys", "--json", "--url", cp.url.as_str()];
        full.extend_from_slice(args);
        let out = run_cli(&env, &full, log.path()).unwrap();
        serde_json::from_str::<Value>(&out).unwrap()
    };
    let local = |args: &[&str]| {
        let mut full = vec!["keys", "--json"];
        full.extend_from_slice(args);
        serde_json::from_str::<Value>(&cp.cli(&full).unwrap()).unwrap()
    };
    for cli in [&remote as &dyn Fn(&[&str]) -> Value, &local] {
        assert_eq!(cli(&["list"]).as_array().unwrap().len(), 6);
        let one = cli(&["list", "--limit", "4"]);
        assert_eq!(one["keys"].as_array().unwrap().len(), 4);
        let next = one["nextCursor"].as_str().unwrap().to_owned();
        let rest = cli(&["list", "--limit", "4", "--cursor", &next]);
        assert_eq!(rest["keys"].as_array().unwrap().len(), 2);
        assert_eq!(rest["nextCursor"], Value::Null);
    }
}
