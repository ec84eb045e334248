//! Rebuilding and reconciling Workers KV from the database (`keys kv-resync`,
//! `keys kv-reconcile`, `KV_RECONCILE_INTERVAL`): real control plane CLI and server, the
//! local KV API stand-in under `wrangler dev`, and the edge writing KV on a lookup.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use metlo_shared::{ApiKey, KeyRecord};
use metlo_tests::{on_both_backends, Backend, ControlPlane, StackBuilder, StatusCode};
use serde_json::{json, Value};

on_both_backends!(reconcile_fixes_drift_and_leaves_a_correct_kv_untouched);

fn hash(key: &str) -> String {
    ApiKey::parse(key).unwrap().hash().to_hex()
}

fn cli_json(cp: &ControlPlane, args: &[&str]) -> Value {
    let out = cp
        .cli(args)
        .unwrap_or_else(|e| panic!("{args:?} failed: {e}"));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?} printed {out:?}: {e}"))
}

/// The record the control plane serves for a hash (what KV should hold under it).
async fn record(cp: &ControlPlane, hash: &str) -> Option<String> {
    let (status, _, body) = cp
        .get(&format!("/api/v1/keys/by-hash/{hash}"), Some(&cp.edge_key))
        .await;
    (status == StatusCode::OK).then(|| KeyRecord::from_json(body.as_bytes()).unwrap().to_json())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_fills_an_empty_namespace_with_exactly_the_database_and_resumes() {
    // Enough for three bulk calls before the fault and three after it (the two 429s land
    // on the third): the shape of a rebuild of any size. `make bench`'s scale run
    // (`target/release/scale`) is where size itself is measured.
    const SEEDED: usize = 50_000;
    // No delete echo: the disabled key's echo, 60 s on, would land among the injected
    // faults on a slow run and take one of them (the counts below are exact). A long KV
    // timeout: the stand-in takes about 7 s per 10,000-key call on an idle machine, so
    // under load one passed the default 10 s and its retry took a fault meant for later.
    let stack = StackBuilder::new(Backend::Sqlite)
        .kv()
        .env("MAX_API_KEYS", SEEDED + 100)
        .env("KV_SYNC_DELETE_ECHO_SECONDS", 0)
        .env("KV_SYNC_TIMEOUT_MS", 120_000)
        .build()
        .await;
    let state = stack.kv_state().to_owned();
    let kv = &stack.kv;
    let cp = &stack.cp;
    let keys_file = state.join("seeded-keys");
    let seeded = cli_json(
        cp,
        &[
            "keys",
            "seed",
            "--count",
            &SEEDED.to_string(),
            "--prefix",
            "bulk",
            "--keys-file",
            keys_file.to_str().unwrap(),
            "--json",
        ],
    );
    assert_eq!(seeded["seeded"], SEEDED);
    let text = std::fs::read_to_string(&keys_file).unwrap();
    let seeded_hashes: Vec<String> = text.lines().map(hash).collect();
    assert_eq!(seeded_hashes.len(), SEEDED);
    // Seeded keys are real keys.
    let first = text.lines().next().unwrap();
    assert_eq!(cp.verify(first).await, StatusCode::OK);
    // A key in a roll's overlap (both secrets belong in KV), a disabled one (none).
    let rolled_old = cp.create_key("rolled", "GENERIC").await;
    let (status, body) = cp
        .roll("rolled", Some(json!({"overlapSeconds": 3600})))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let rolled_new = body["apiKey"].as_str().unwrap().to_owned();
    let disabled = cp.create_key("disabled", "GENERIC").await;
    let (status, _) = cp.patch("disabled", json!({"enabled": false})).await;
    assert_eq!(status, StatusCode::OK);
    cp.wait_outbox_drained(Duration::from_secs(30)).await;

    // Empty the namespace (a new environment), then rebuild it, failing part way first.
    let before: Vec<String> = kv.list_all().await.into_iter().map(|(k, _)| k).collect();
    kv.delete_raw(&before).await;
    assert!(kv.list_all().await.is_empty());
    kv.inject_faults_after(3, 400, 1).await;
    let failed = cp.cli(&["keys", "kv-resync", "--json"]).unwrap_err();
    assert!(failed.contains("Run it again to resume"), "{failed}");
    let partial = kv.list_all().await.len();
    assert_eq!(
        partial, 30_000,
        "three bulk calls of 10,000 landed before the fault"
    );

    // Two 429s on the way (the stand-in sends Retry-After: 1): waited out, not fatal.
    kv.inject_faults_after(2, 429, 2).await;
    let done = cli_json(cp, &["keys", "kv-resync", "--json"]);
    assert_eq!(done["resumedAfter"], 30_000, "{done}");
    assert_eq!(done["rateLimited"], 2, "{done}");
    // The seeded keys, both secrets of the roll, the harness's client key.
    let expected_total = SEEDED + 3;
    assert_eq!(done["written"], (expected_total - 30_000) as u64, "{done}");
    println!(
        "kv-resync into the local stand-in: {} records in {:.1} s = {:.0} keys/s",
        done["written"],
        done["seconds"].as_f64().unwrap(),
        done["keysPerSecond"].as_f64().unwrap()
    );

    let held: BTreeMap<String, Option<String>> = kv.list_all().await.into_iter().collect();
    let mut expected: BTreeSet<String> = seeded_hashes.iter().cloned().collect();
    expected.insert(hash(&rolled_old));
    expected.insert(hash(&rolled_new));
    let held_names: BTreeSet<String> = held.keys().cloned().collect();
    assert!(held_names.is_superset(&expected));
    assert_eq!(held_names.len(), expected_total);
    for h in held_names.difference(&expected) {
        assert!(
            record(cp, h).await.is_some(),
            "{h} is the harness's live client key"
        );
    }
    assert!(!held.contains_key(&hash(&disabled)));
    // Values and their digests are the control plane's records (a sample, and the roll).
    let sample = seeded_hashes
        .iter()
        .step_by(SEEDED / 200)
        .cloned()
        .chain([hash(&rolled_old), hash(&rolled_new)]);
    for h in sample {
        let want = record(cp, &h).await.expect("a live key");
        assert_eq!(kv.value(&h).await.as_deref(), Some(want.as_str()));
        assert_eq!(held[&h].as_deref(), Some(KeyRecord::digest(&want).as_str()));
    }
    cp.assert_log_has_no_secrets();
}

async fn reconcile_fixes_drift_and_leaves_a_correct_kv_untouched(backend: Backend) {
    let stack = StackBuilder::new(backend).kv().build().await;
    let kv = &stack.kv;
    let cp = &stack.cp;
    let mut keys = vec![];
    for i in 0..20 {
        keys.push(cp.create_key(&format!("k{i}"), "GENERIC").await);
    }
    let (_, body) = cp.roll("k0", Some(json!({"overlapSeconds": 3600}))).await;
    let k0_new = body["apiKey"].as_str().unwrap().to_owned();
    let gone = cp.create_key("gone", "GENERIC").await;
    let (status, _) = cp.delete("gone", Some(&cp.admin_key)).await;
    assert_eq!(status, StatusCode::OK);
    cp.wait_outbox_drained(Duration::from_secs(30)).await;
    // What the outbox pushed: these keys, and the harness's own client keys.
    let expected: BTreeSet<String> = kv.list_all().await.into_iter().map(|(k, _)| k).collect();
    let ours: BTreeSet<String> = keys.iter().chain([&k0_new]).map(|k| hash(k)).collect();
    assert!(expected.is_superset(&ours));
    for h in &expected {
        assert!(record(cp, h).await.is_some(), "{h} is a live key's");
    }

    // The edge writes KV on a lookup (a key KV lost): with the same digest, so that entry
    // is as current as a pushed one.
    let (origin, edge) = stack.another_edge(&[]).await;
    kv.delete_raw(&[hash(&keys[5])]).await;
    let r = edge.get("/", Some(&keys[5])).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let seen = origin.requests();
    assert_eq!(
        seen.last().unwrap().headers["x-metlo-edge-source"],
        "control-plane"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while kv.value(&hash(&keys[5])).await.is_none() {
        assert!(Instant::now() < deadline, "the edge wrote no KV entry");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A correct KV: nothing to fix, nothing written.
    kv.reset_stats().await;
    let report = cli_json(cp, &["keys", "kv-reconcile", "--json"]);
    assert_eq!(
        report["drift"],
        json!({"strays": 0, "missing": 0, "stale": 0, "wrongValues": 0}),
        "{report}"
    );
    assert_eq!(report["writes"], 0);
    assert_eq!(report["expected"], expected.len());
    let stats = kv.stats().await;
    assert_eq!(
        (
            stats["putRequests"].clone(),
            stats["deleteRequests"].clone()
        ),
        (json!(0), json!(0))
    );

    // Drift: two strays (a deleted key's record back, a name that is no key), three
    // missing, two stale (an old record with a digest of its own, one without metadata).
    let stray_record =
        KeyRecord::from_json(record(cp, &hash(&keys[1])).await.unwrap().as_bytes()).unwrap();
    let gone_value = KeyRecord {
        name: "gone".into(),
        ..stray_record.clone()
    }
    .to_json();
    let stale_value = KeyRecord {
        name: "renamed".into(),
        ..stray_record.clone()
    }
    .to_json();
    kv.put_raw(&[
        (
            hash(&gone),
            gone_value.clone(),
            Some(json!({"d": KeyRecord::digest(&gone_value)})),
        ),
        ("not-a-key".into(), "x".into(), None),
        (
            hash(&keys[2]),
            stale_value.clone(),
            Some(json!({"d": KeyRecord::digest(&stale_value)})),
        ),
        (
            hash(&keys[3]),
            record(cp, &hash(&keys[3])).await.unwrap(),
            None,
        ),
    ])
    .await;
    kv.delete_raw(&[hash(&keys[6]), hash(&keys[7]), hash(&k0_new)])
        .await;

    let dry = cli_json(cp, &["keys", "kv-reconcile", "--dry-run", "--json"]);
    assert_eq!(
        dry["drift"],
        json!({"strays": 2, "missing": 3, "stale": 2, "wrongValues": 0}),
        "{dry}"
    );
    assert_eq!(dry["writes"], 0);
    assert_eq!(
        kv.list_all().await.len(),
        expected.len() + 2 - 3,
        "a dry run writes nothing"
    );

    // The put call (after one list call) leaves a key unapplied, as Cloudflare may: sent again.
    kv.set_faults(json!({"unsuccessful": 1, "count": 1, "after": 1}))
        .await;
    let fixed = cli_json(cp, &["keys", "kv-reconcile", "--json"]);
    assert_eq!(
        fixed["drift"],
        json!({"strays": 2, "missing": 3, "stale": 2, "wrongValues": 0}),
        "{fixed}"
    );
    assert_eq!(fixed["writes"], 7);
    let held: BTreeMap<String, Option<String>> = kv.list_all().await.into_iter().collect();
    assert_eq!(held.keys().cloned().collect::<BTreeSet<_>>(), expected);
    for h in &expected {
        let want = record(cp, h).await.unwrap();
        assert_eq!(kv.value(h).await.as_deref(), Some(want.as_str()), "{h}");
        assert_eq!(held[h].as_deref(), Some(KeyRecord::digest(&want).as_str()));
    }
    kv.reset_stats().await;
    let again = cli_json(cp, &["keys", "kv-reconcile", "--json"]);
    assert_eq!(again["writes"], 0, "{again}");
    let stats = kv.stats().await;
    assert_eq!(
        (
            stats["putRequests"].clone(),
            stats["deleteRequests"].clone()
        ),
        (json!(0), json!(0))
    );

    // A value changed behind our back with its metadata left alone (what a holder of a KV
    // token could do): the listing shows nothing wrong; reading the values does.
    let forged_value = KeyRecord {
        role: metlo_shared::Role::Admin,
        ..KeyRecord::from_json(record(cp, &hash(&keys[4])).await.unwrap().as_bytes()).unwrap()
    }
    .to_json();
    let honest_digest = held[&hash(&keys[4])].clone().unwrap();
    kv.put_raw(&[(
        hash(&keys[4]),
        forged_value,
        Some(json!({"d": honest_digest})),
    )])
    .await;
    let listed_only = cli_json(cp, &["keys", "kv-reconcile", "--dry-run", "--json"]);
    assert_eq!(listed_only["drift"]["wrongValues"], 0, "{listed_only}");
    let read = cli_json(cp, &["keys", "kv-reconcile", "--verify-values", "--json"]);
    assert_eq!(
        read["drift"],
        json!({"strays": 0, "missing": 0, "stale": 0, "wrongValues": 1}),
        "{read}"
    );
    assert_eq!(read["writes"], 1);
    let want = record(cp, &hash(&keys[4])).await.unwrap();
    assert_eq!(
        kv.value(&hash(&keys[4])).await.as_deref(),
        Some(want.as_str())
    );

    // A resync rewrites every entry, and each finished one leaves no resume point.
    for _ in 0..2 {
        let resync = cli_json(cp, &["keys", "kv-resync", "--json"]);
        assert_eq!(resync["resumedAfter"], 0, "{resync}");
        assert_eq!(resync["written"], expected.len(), "{resync}");
    }
    let after: BTreeSet<String> = kv.list_all().await.into_iter().map(|(k, _)| k).collect();
    assert_eq!(after, expected);
    drop(edge);
    cp.assert_log_has_no_secrets();
}

/// `KV_RECONCILE_INTERVAL`: the server reconciles on its own and reports the drift it
/// found in `/readyz` and `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_reconcile_reports_drift() {
    let stack = StackBuilder::new(Backend::Sqlite)
        .kv()
        .env("KV_RECONCILE_INTERVAL", "2s")
        .build()
        .await;
    let kv = &stack.kv;
    let cp = &stack.cp;
    let key = cp.create_key("k", "GENERIC").await;
    cp.wait_outbox_drained(Duration::from_secs(30)).await;
    kv.put_raw(&[("stray".into(), "x".into(), None)]).await;
    kv.delete_raw(&[hash(&key)]).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let last = loop {
        let (status, body) = cp.ops_get("/readyz").await;
        assert_eq!(status, StatusCode::OK);
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["kvReconcile"]["intervalSeconds"], 2);
        let last = &body["kvReconcile"]["last"];
        if last["report"]["drift"]["strays"] == 1 {
            break last.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no reconcile reported drift: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        last["report"]["drift"],
        json!({"strays": 1, "missing": 1, "stale": 0, "wrongValues": 0}),
        "{last}"
    );
    assert_eq!(last["error"], Value::Null);
    assert_eq!(cp.metric("metlo_kv_drift_fixed_total", "stray").await, 1.0);
    let held: Vec<String> = kv.list_all().await.into_iter().map(|(k, _)| k).collect();
    assert!(
        held.contains(&hash(&key)) && !held.contains(&"stray".to_owned()),
        "{held:?}"
    );
    // The next run finds nothing.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, body) = cp.ops_get("/readyz").await;
        let body: Value = serde_json::from_str(&body).unwrap();
        if body["kvReconcile"]["last"]["report"]["drift"]["strays"] == 0 {
            assert_eq!(cp.metric("metlo_kv_drift{", "stray").await, 0.0);
            break;
        }
        assert!(Instant::now() < deadline, "no second reconcile: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A key deleted while a resync's write of it is in flight: the outbox's delete lands
/// first, the slow write after it — and the resync, reading the key back, deletes it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_never_resurrects_a_key_deleted_meanwhile() {
    let stack = StackBuilder::new(Backend::Sqlite)
        .kv()
        .env("KV_SYNC_DELETE_ECHO_SECONDS", 0)
        .build()
        .await;
    let kv = &stack.kv;
    let cp = &stack.cp;
    let doomed = cp.create_key("doomed", "GENERIC").await;
    let kept = cp.create_key("kept", "GENERIC").await;
    cp.wait_outbox_drained(Duration::from_secs(30)).await;
    // The resync's one bulk put waits 3 s, then applies the write.
    kv.inject_delay(Duration::from_secs(3), 1).await;
    let env_cp = cp.cli_env();
    let resync = std::thread::spawn(move || {
        metlo_tests::run_cli(&env_cp.0, &["keys", "kv-resync", "--json"], &env_cp.1)
    });
    // Until the resync's delayed bulk put is in flight (the stand-in holds it 3 s).
    metlo_tests::time::wait_for("the resync's bulk put", Duration::from_secs(30), || async {
        (kv.stats().await["delayed"].as_u64().unwrap_or(0) > 0).then_some(())
    })
    .await;
    let (status, _) = cp.delete("doomed", Some(&cp.admin_key)).await;
    assert_eq!(status, StatusCode::OK);
    cp.wait_outbox_drained(Duration::from_secs(30)).await;
    let out = resync.join().unwrap().expect("resync");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["written"], 3, "{report}");
    let held: BTreeSet<String> = kv.list_all().await.into_iter().map(|(k, _)| k).collect();
    assert!(held.contains(&hash(&kept)));
    assert!(!held.contains(&hash(&doomed)), "the late write was undone");
    let stats = kv.stats().await;
    assert!(stats["deletes"].as_array().unwrap().len() >= 2, "{stats}");
}
