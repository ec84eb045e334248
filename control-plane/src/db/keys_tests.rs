//! Tests of `keys.rs`: keys, rolls, deletes, roles, on `sqlite::memory:`.

use std::time::Duration;

use metlo_shared::{ApiKey, KeyHash, KeyType, Role};

use super::keys::fixtures::{audit, insert_legacy, key, roll};
use crate::clock::now_ms;
use crate::db::rows::StoredKey;
use crate::db::{Store, StoreError};

fn hash(hex: &str) -> KeyHash {
    KeyHash::from_hex(hex).unwrap()
}

#[tokio::test]
async fn insert_list_find_and_the_limit() {
    let store = Store::memory().await;
    let a = key("a", KeyType::Generic);
    let mut b = key("b", KeyType::Onboarding);
    b.created_at_ms += 1;
    store
        .insert_key(&a, 2, &audit("key.create", "a"))
        .await
        .unwrap();
    store
        .insert_key(&b, 2, &audit("key.create", "b"))
        .await
        .unwrap();
    // Names are unique; the limit is exact (and checked first).
    let again = key("a", KeyType::Generic);
    assert!(matches!(
        store.insert_key(&again, 3, &audit("key.create", "a")).await,
        Err(StoreError::DuplicateName)
    ));
    assert!(matches!(
        store
            .insert_key(&key("c", KeyType::Generic), 2, &audit("key.create", "c"))
            .await,
        Err(StoreError::LimitReached(2))
    ));
    let all = store.list_keys(None).await.unwrap();
    assert_eq!(
        all.iter().map(|k| k.name.as_str()).collect::<Vec<_>>(),
        ["b", "a"],
        "newest first"
    );
    assert!(all[0].id > 0, "ids are assigned by the database");
    let onboarding = store.list_keys(Some(KeyType::Onboarding)).await.unwrap();
    assert_eq!(onboarding.len(), 1);
    assert_eq!(onboarding[0].name, "b");
    let found = store
        .find_by_hash(&hash(&a.key_hash))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (found.name.as_str(), found.key_type),
        ("a", KeyType::Generic)
    );
    let unknown = ApiKey::generate().unwrap().hash();
    assert_eq!(store.find_by_hash(&unknown).await.unwrap(), None);
}

#[tokio::test]
async fn roll_keeps_the_old_secret_for_its_overlap_only() {
    let store = Store::memory().await;
    let mut k = key("k", KeyType::Aws);
    k.expires_at_ms = Some((now_ms() / 1000 + 3600) * 1000);
    store
        .insert_key(&k, 10, &audit("key.create", "k"))
        .await
        .unwrap();
    let (new, rolled) = roll(&store, "k", Duration::from_secs(60)).await;
    let rolled = rolled.unwrap();
    assert_eq!(rolled.key.key_hash, new.hash().to_hex());
    assert_eq!(rolled.key.key_type, KeyType::Aws);
    assert_eq!(rolled.retired.len(), 1);
    let end = rolled.retired[0].retires_at_ms;
    assert_eq!(end % 1000, 0, "a whole second");
    assert!(end >= now_ms() + 59_000);
    // The old secret still finds the key, with its own identifier and end.
    let old = store
        .find_by_hash(&hash(&k.key_hash))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(old.identifier, k.identifier);
    assert_eq!(old.expires_at_ms, Some(end));
    // A roll without overlap ends every older secret at once.
    let (newer, rolled) = roll(&store, "k", Duration::ZERO).await;
    let rolled = rolled.unwrap();
    assert_eq!(
        rolled.retired.len(),
        2,
        "the replaced secret and the one in overlap"
    );
    assert!(rolled.retired.iter().all(|s| s.retires_at_ms <= now_ms()));
    assert_eq!(store.find_by_hash(&hash(&k.key_hash)).await.unwrap(), None);
    assert_eq!(store.find_by_hash(&new.hash()).await.unwrap(), None);
    assert!(store.find_by_hash(&newer.hash()).await.unwrap().is_some());
    assert!(roll(&store, "nope", Duration::ZERO).await.1.is_none());
}

#[tokio::test]
async fn delete_returns_the_key_and_its_rolled_secrets_and_frees_the_slot() {
    let store = Store::memory().await;
    let k = key("k", KeyType::Generic);
    store
        .insert_key(&k, 1, &audit("key.create", "k"))
        .await
        .unwrap();
    let (new, _) = roll(&store, "k", Duration::from_secs(600)).await;
    let (deleted, retired) = store
        .delete_key("k", true, &audit("key.delete", "k"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(deleted.key_hash, new.hash().to_hex());
    assert_eq!(retired, vec![k.key_hash.clone()]);
    assert_eq!(store.find_by_hash(&hash(&k.key_hash)).await.unwrap(), None);
    assert!(store
        .delete_key("k", true, &audit("key.delete", "k"))
        .await
        .unwrap()
        .is_none());
    // The slot is free again (limit 1).
    store
        .insert_key(&key("k2", KeyType::Generic), 1, &audit("key.create", "k2"))
        .await
        .unwrap();
}

#[tokio::test]
async fn the_last_admin_key_cannot_be_deleted_unless_asked() {
    let store = Store::memory().await;
    let admin = StoredKey {
        role: Role::Admin,
        ..key("admin", KeyType::Generic)
    };
    store
        .insert_key(&admin, 10, &audit("key.create", "admin"))
        .await
        .unwrap();
    store
        .insert_key(&key("c", KeyType::Generic), 10, &audit("key.create", "c"))
        .await
        .unwrap();
    assert!(matches!(
        store
            .delete_key("admin", true, &audit("key.delete", "admin"))
            .await,
        Err(StoreError::LastAdmin)
    ));
    // Client keys go freely; a second admin (not expired) makes the first deletable.
    assert!(store
        .delete_key("c", true, &audit("key.delete", "c"))
        .await
        .unwrap()
        .is_some());
    let expired = StoredKey {
        role: Role::Admin,
        expires_at_ms: Some(now_ms() + 1000),
        ..key("soon", KeyType::Generic)
    };
    store
        .insert_key(&expired, 10, &audit("key.create", "soon"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(
        matches!(
            store
                .delete_key("admin", true, &audit("key.delete", "admin"))
                .await,
            Err(StoreError::LastAdmin)
        ),
        "an expired admin key does not count"
    );
    let second = key("old", KeyType::Generic);
    insert_legacy(&store, &second, &audit("key.create", "old")).await;
    assert!(store
        .delete_key("admin", true, &audit("key.delete", "admin"))
        .await
        .unwrap()
        .is_some());
    // The CLI may delete the last one.
    assert!(store
        .delete_key("old", false, &audit("key.delete", "old"))
        .await
        .unwrap()
        .is_some());
    assert_eq!(
        store.list_keys(None).await.unwrap().len(),
        1,
        "only the expired one left"
    );
}

#[tokio::test]
async fn only_traffic_keys_reach_kv_and_a_legacy_role_is_set_once() {
    let store = Store::memory().await.with_outbox(true, Duration::ZERO);
    for (name, role) in [
        ("c", Role::Client),
        ("e", Role::Edge),
        ("a", Role::Admin),
        ("l", Role::Legacy),
    ] {
        let k = StoredKey {
            role,
            ..key(name, KeyType::Generic)
        };
        if role == Role::Legacy {
            insert_legacy(&store, &k, &audit("key.create", name)).await;
            continue;
        }
        store
            .insert_key(&k, 10, &audit("key.create", name))
            .await
            .unwrap();
    }
    let claim = store.claim_outbox(100).await.unwrap();
    let records: Vec<metlo_shared::KeyRecord> = claim
        .rows
        .iter()
        .map(|r| metlo_shared::KeyRecord::from_json(r.value.as_ref().unwrap().as_bytes()).unwrap())
        .collect();
    let mut names: Vec<&str> = records.iter().map(|r| r.name.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        ["c", "l"],
        "admin and edge hashes never leave the control plane"
    );
    assert!(records.iter().all(|r| r.role.serves_traffic()));
    store
        .finish_claim(claim, crate::db::rows::Sent::All)
        .await
        .unwrap();
    // Rolls of an admin key put nothing either.
    roll(&store, "a", Duration::from_secs(60)).await;
    assert!(store.claim_outbox(100).await.unwrap().rows.is_empty());
    // A legacy key gets its role once; leaving traffic, its records leave KV.
    let (k, hashes) = store
        .set_role("l", Role::Admin, &audit("key.set_role", "l"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(k.role, Role::Admin);
    assert!(hashes.is_empty());
    let claim = store.claim_outbox(100).await.unwrap();
    assert_eq!(claim.rows.len(), 1);
    assert_eq!(
        (claim.rows[0].kv_key.as_str(), claim.rows[0].value.is_none()),
        (k.key_hash.as_str(), true)
    );
    assert!(matches!(
        store
            .set_role("l", Role::Client, &audit("key.set_role", "l"))
            .await,
        Err(StoreError::RoleFixed(Role::Admin))
    ));
    assert!(
        matches!(
            store
                .set_role("c", Role::Admin, &audit("key.set_role", "c"))
                .await,
            Err(StoreError::RoleFixed(Role::Client))
        ),
        "no escalation"
    );
    assert!(store
        .set_role("nope", Role::Admin, &audit("key.set_role", "nope"))
        .await
        .unwrap()
        .is_none());
    assert_eq!(store.count_legacy().await.unwrap(), 0);
}

#[tokio::test]
async fn pages_walk_every_key_once_in_list_order_ties_included() {
    let store = Store::memory().await;
    // Three share one creation time: the id breaks the tie.
    for (i, created) in [10, 20, 20, 20, 30, 40, 50].into_iter().enumerate() {
        let kind = if i % 2 == 0 {
            KeyType::Onboarding
        } else {
            KeyType::Generic
        };
        let mut k = key(&format!("k{i}"), kind);
        k.created_at_ms = created;
        store
            .insert_key(&k, 100, &audit("key.create", &k.name))
            .await
            .unwrap();
    }
    for only in [None, Some(KeyType::Onboarding)] {
        let all = store.list_keys(only).await.unwrap();
        let mut walked = vec![];
        let mut after = None;
        loop {
            let page = store.list_keys_page(only, None, after, 2).await.unwrap();
            assert!(page.len() <= 2);
            let Some(last) = page.last() else { break };
            after = Some((last.created_at_ms, last.id));
            walked.extend(page);
        }
        assert_eq!(walked, all, "{only:?}");
    }
    assert_eq!(store.list_keys(None).await.unwrap().len(), 7);
    assert_eq!(
        store
            .list_keys(Some(KeyType::Onboarding))
            .await
            .unwrap()
            .len(),
        4
    );
}

#[tokio::test]
async fn pages_filter_by_a_part_of_the_name() {
    let store = Store::memory().await;
    for (name, kind) in [
        ("Alpha_1", KeyType::Generic),
        ("alpha-2", KeyType::Onboarding),
        ("beta%", KeyType::Generic),
        ("gamma", KeyType::Generic),
        ("x\\y", KeyType::Generic),
    ] {
        let k = key(name, kind);
        store
            .insert_key(&k, 100, &audit("key.create", name))
            .await
            .unwrap();
    }
    let names = |keys: Vec<StoredKey>| {
        let mut names: Vec<String> = keys.into_iter().map(|k| k.name).collect();
        names.sort();
        names
    };
    let find = |only, part| {
        let store = &store;
        async move {
            names(
                store
                    .list_keys_page(only, Some(part), None, 100)
                    .await
                    .unwrap(),
            )
        }
    };
    assert_eq!(
        find(None, "ALPHA").await,
        ["Alpha_1", "alpha-2"],
        "any case"
    );
    assert_eq!(
        find(Some(KeyType::Generic), "alpha").await,
        ["Alpha_1"],
        "and the type"
    );
    // LIKE's wildcards and escape are plain characters here.
    assert_eq!(find(None, "_").await, ["Alpha_1"]);
    assert_eq!(find(None, "%").await, ["beta%"]);
    assert_eq!(find(None, "\\").await, ["x\\y"]);
    assert!(find(None, "delta").await.is_empty());
}
