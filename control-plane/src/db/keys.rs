//! Keys, their rolled-away secrets, and the quota row that makes the key limit exact.

use std::time::Duration;

use metlo_shared::{KeyHash, KeyType, Role};

use super::rows::{AuditEntry, RetiredSecret, Rolled, StoredKey, Tx, KEY_COLUMNS};
use super::{Store, StoreError};
use crate::clock::{ceil_to_second, now_ms};

impl Store {
    /// Inserts a key unless its name is taken or `max_keys` are stored. The quota row is
    /// locked first, so concurrent creates are serialized and the limit is exact.
    /// Stores a new key (its `id` is assigned here), with its KV put and audit row.
    pub async fn insert_key(
        &self,
        key: &StoredKey,
        max_keys: u64,
        audit: &AuditEntry,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let reserved =
            sqlx::query("UPDATE key_quota SET used = used + 1 WHERE id = 1 AND used < $1")
                .bind(i64::try_from(max_keys).unwrap_or(i64::MAX))
                .execute(&mut *tx)
                .await?
                .rows_affected();
        if reserved == 0 {
            return Err(StoreError::LimitReached(max_keys));
        }
        sqlx::query(
            "INSERT INTO api_keys (name, key_hash, identifier, key_type, created_at_ms, expires_at_ms, role) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&key.name)
        .bind(&key.key_hash)
        .bind(&key.identifier)
        .bind(key.key_type.as_str())
        .bind(key.created_at_ms)
        .bind(key.expires_at_ms)
        .bind(key.role.as_str())
        .execute(&mut *tx)
        .await?;
        self.enqueue_put(&mut tx, key, &key.key_hash, key.record())
            .await?;
        self.audit_in(&mut tx, audit).await?;
        self.commit_outbox(tx).await?;
        Ok(())
    }

    /// Gives the key `name` a new secret (`new_hash`, `new_identifier`). Its previous
    /// secret keeps working for `overlap` (its end rounded up to a whole second; zero: it
    /// stops at once), and every older secret still in an overlap stops no later than
    /// that — so a roll with no overlap ends every old secret. `None`: no such key.
    pub async fn roll_key(
        &self,
        name: &str,
        new_hash: &str,
        new_identifier: &str,
        overlap: Duration,
        audit: &AuditEntry,
    ) -> Result<Option<Rolled>, StoreError> {
        let mut tx = self.pool.begin().await?;
        if !Self::lock_key(&mut tx, name).await? {
            return Ok(None);
        }
        let old: StoredKey = sqlx::query_as(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE name = $1"
        ))
        .bind(name)
        .fetch_one(&mut *tx)
        .await?;
        let now = now_ms();
        let end = if overlap.is_zero() {
            now
        } else {
            ceil_to_second(now.saturating_add(overlap.as_millis() as i64))
        };
        let earlier: Vec<RetiredSecret> = sqlx::query_as(
            "SELECT key_hash, identifier, retires_at_ms FROM retired_secrets WHERE key_id = $1",
        )
        .bind(old.id)
        .fetch_all(&mut *tx)
        .await?;
        // Secrets whose end moves earlier: the one being replaced, and older ones that
        // would otherwise outlive this roll's overlap.
        let mut changed = vec![RetiredSecret {
            key_hash: old.key_hash.clone(),
            identifier: old.identifier.clone(),
            retires_at_ms: end,
        }];
        changed.extend(
            earlier
                .into_iter()
                .filter(|s| s.retires_at_ms > end && s.retires_at_ms > now)
                .map(|s| RetiredSecret {
                    retires_at_ms: end,
                    ..s
                }),
        );
        sqlx::query("UPDATE retired_secrets SET retires_at_ms = $1 WHERE key_id = $2 AND retires_at_ms > $1")
            .bind(end)
            .bind(old.id)
            .execute(&mut *tx)
            .await?;
        if end > now {
            sqlx::query(
                "INSERT INTO retired_secrets (key_hash, key_id, identifier, retires_at_ms) VALUES ($1, $2, $3, $4)",
            )
            .bind(&old.key_hash)
            .bind(old.id)
            .bind(&old.identifier)
            .bind(end)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("DELETE FROM retired_secrets WHERE key_id = $1 AND retires_at_ms <= $2")
            .bind(old.id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE api_keys SET key_hash = $1, identifier = $2 WHERE id = $3")
            .bind(new_hash)
            .bind(new_identifier)
            .bind(old.id)
            .execute(&mut *tx)
            .await?;
        let key = StoredKey {
            key_hash: new_hash.to_owned(),
            identifier: new_identifier.to_owned(),
            ..old.clone()
        };
        self.enqueue_put(&mut tx, &key, &key.key_hash, key.record())
            .await?;
        for secret in &changed {
            if secret.retires_at_ms <= now {
                self.enqueue_delete(&mut tx, &secret.key_hash, now).await?;
            } else {
                // KV gets the record with its new end at once (the edge refuses it from
                // then on), and a delete when the overlap is over.
                let record = old.retired_record(&secret.identifier, secret.retires_at_ms);
                self.enqueue_put(&mut tx, &old, &secret.key_hash, record)
                    .await?;
                self.enqueue_delete(&mut tx, &secret.key_hash, secret.retires_at_ms)
                    .await?;
            }
        }
        self.audit_in(&mut tx, audit).await?;
        self.commit_outbox(tx).await?;
        Ok(Some(Rolled {
            key,
            retired: changed,
        }))
    }

    /// Takes the write lock of the key's row (on both databases) before anything else, so
    /// rolls and deletes of one key run one after the other and never take their locks
    /// in opposite orders. False: no such key.
    async fn lock_key(tx: &mut Tx, name: &str) -> Result<bool, StoreError> {
        let locked = sqlx::query("UPDATE api_keys SET name = name WHERE name = $1")
            .bind(name)
            .execute(&mut **tx)
            .await?
            .rows_affected();
        Ok(locked > 0)
    }

    /// All keys, or those of one type; newest first.
    pub async fn list_keys(&self, only: Option<KeyType>) -> Result<Vec<StoredKey>, StoreError> {
        let keys = match only {
            None => {
                sqlx::query_as(&format!("SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at_ms DESC, id DESC"))
                    .fetch_all(&self.pool)
                    .await?
            }
            Some(t) => {
                sqlx::query_as(&format!(
                    "SELECT {KEY_COLUMNS} FROM api_keys WHERE key_type = $1 ORDER BY created_at_ms DESC, id DESC"
                ))
                .bind(t.as_str())
                .fetch_all(&self.pool)
                .await?
            }
        };
        Ok(keys)
    }

    /// The key a secret hash belongs to: its current secret, or one rolled away whose
    /// overlap has not ended (then with that secret's identifier, expiring at its end).
    pub async fn find_by_hash(&self, hash: &KeyHash) -> Result<Option<StoredKey>, StoreError> {
        let hex = hash.to_hex();
        let key = sqlx::query_as(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = $1 \
             UNION ALL \
             SELECT k.id, k.name, r.key_hash, r.identifier, k.key_type, k.created_at_ms, \
               CASE WHEN k.expires_at_ms IS NOT NULL AND k.expires_at_ms < r.retires_at_ms \
                 THEN k.expires_at_ms ELSE r.retires_at_ms END AS expires_at_ms, \
               k.last_used_ms, k.role \
             FROM retired_secrets r JOIN api_keys k ON k.id = r.key_id \
             WHERE r.key_hash = $2 AND r.retires_at_ms > $3"
        ))
        .bind(&hex)
        .bind(&hex)
        .bind(now_ms())
        .fetch_optional(&self.pool)
        .await?;
        Ok(key)
    }

    /// Deletes a key by name, with every secret a roll left in its overlap; returns the
    /// key and the hashes of those secrets, or `None` if there was no such key.
    pub async fn delete_key(
        &self,
        name: &str,
        keep_last_admin: bool,
        audit: &AuditEntry,
    ) -> Result<Option<(StoredKey, Vec<String>)>, StoreError> {
        let mut tx = self.pool.begin().await?;
        // The key's row lock first, as a roll takes it: a roll in progress finishes (and
        // its rolled-away secret is seen below) before this goes on.
        if !Self::lock_key(&mut tx, name).await? {
            return Ok(None);
        }
        // The quota row next (creates take only this one, so the order is the same
        // everywhere): deletes run one at a time, and the last-admin check below cannot
        // race another delete.
        sqlx::query("UPDATE key_quota SET used = used - 1 WHERE id = 1")
            .execute(&mut *tx)
            .await?;
        if keep_last_admin {
            let role: String = sqlx::query_scalar("SELECT role FROM api_keys WHERE name = $1")
                .bind(name)
                .fetch_one(&mut *tx)
                .await?;
            if Role::try_from(role).is_ok_and(Role::administers) {
                let others: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM api_keys WHERE role IN ('admin', 'legacy') AND name <> $1 \
                     AND (expires_at_ms IS NULL OR expires_at_ms > $2)",
                )
                .bind(name)
                .bind(now_ms())
                .fetch_one(&mut *tx)
                .await?;
                if others == 0 {
                    return Err(StoreError::LastAdmin);
                }
            }
        }
        // The rolled-away secrets next: deleting the key would cascade to them unseen.
        let retired: Vec<String> = sqlx::query_scalar(
            "DELETE FROM retired_secrets WHERE key_id IN (SELECT id FROM api_keys WHERE name = $1) RETURNING key_hash",
        )
        .bind(name)
        .fetch_all(&mut *tx)
        .await?;
        let deleted: Option<StoredKey> = sqlx::query_as(&format!(
            "DELETE FROM api_keys WHERE name = $1 RETURNING {KEY_COLUMNS}"
        ))
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(deleted) = deleted else {
            return Ok(None);
        };
        let now = now_ms();
        for hash in std::iter::once(&deleted.key_hash).chain(&retired) {
            self.enqueue_delete(&mut tx, hash, now).await?;
        }
        self.audit_in(&mut tx, audit).await?;
        self.commit_outbox(tx).await?;
        Ok(Some((deleted, retired)))
    }

    /// Gives a legacy key (made before roles) its one role; a key's role is fixed once
    /// set. A key whose new role does not serve traffic leaves KV (every secret of it).
    /// Returns the key and the hashes of its secrets; `None`: no such key.
    pub async fn set_role(
        &self,
        name: &str,
        role: Role,
        audit: &AuditEntry,
    ) -> Result<Option<(StoredKey, Vec<String>)>, StoreError> {
        let mut tx = self.pool.begin().await?;
        if !Self::lock_key(&mut tx, name).await? {
            return Ok(None);
        }
        let key: StoredKey = sqlx::query_as(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE name = $1"
        ))
        .bind(name)
        .fetch_one(&mut *tx)
        .await?;
        if key.role != Role::Legacy {
            return Err(StoreError::RoleFixed(key.role));
        }
        sqlx::query("UPDATE api_keys SET role = $1 WHERE id = $2")
            .bind(role.as_str())
            .bind(key.id)
            .execute(&mut *tx)
            .await?;
        let retired: Vec<String> =
            sqlx::query_scalar("SELECT key_hash FROM retired_secrets WHERE key_id = $1")
                .bind(key.id)
                .fetch_all(&mut *tx)
                .await?;
        let key = StoredKey { role, ..key };
        if !role.serves_traffic() {
            let now = now_ms();
            for hash in std::iter::once(&key.key_hash).chain(&retired) {
                self.enqueue_delete(&mut tx, hash, now).await?;
            }
        }
        self.audit_in(&mut tx, audit).await?;
        self.commit_outbox(tx).await?;
        Ok(Some((key, retired)))
    }

    /// How many keys still have the legacy role (every power, from before roles).
    pub async fn count_legacy(&self) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT COUNT(*) FROM api_keys WHERE role = 'legacy'")
                .fetch_one(&self.pool)
                .await?,
        )
    }
}

#[cfg(test)]
pub(crate) mod fixtures {
    use std::time::Duration;

    use metlo_shared::{ApiKey, KeyType, Role};

    use crate::clock::now_ms;
    use crate::db::rows::{AuditEntry, Rolled, StoredKey};
    use crate::db::Store;

    /// Rolls `name` to a fresh secret; returns it and what the store answered.
    pub(crate) async fn roll(
        store: &Store,
        name: &str,
        overlap: Duration,
    ) -> (ApiKey, Option<Rolled>) {
        let new = ApiKey::generate().unwrap();
        let rolled = store
            .roll_key(
                name,
                &new.hash().to_hex(),
                &new.identifier(),
                overlap,
                &audit("key.roll", name),
            )
            .await
            .unwrap();
        (new, rolled)
    }

    /// A new key's row (its secret is dropped: tests work with hashes).
    pub(crate) fn key(name: &str, key_type: KeyType) -> StoredKey {
        let secret = ApiKey::generate().unwrap();
        StoredKey {
            id: 0,
            name: name.to_owned(),
            key_hash: secret.hash().to_hex(),
            identifier: secret.identifier(),
            key_type,
            created_at_ms: now_ms(),
            expires_at_ms: None,
            last_used_ms: None,
            role: Role::Client,
        }
    }

    pub(crate) fn audit(action: &'static str, target: &str) -> AuditEntry {
        AuditEntry {
            actor: Some("tester".into()),
            action,
            target: Some(target.to_owned()),
            ip: Some("127.0.0.1".into()),
            detail: serde_json::json!({}),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use metlo_shared::{ApiKey, KeyHash, KeyType, Role};

    use super::fixtures::{audit, key, roll};
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
        let second = StoredKey {
            role: Role::Legacy,
            ..key("old", KeyType::Generic)
        };
        store
            .insert_key(&second, 10, &audit("key.create", "old"))
            .await
            .unwrap();
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
            store
                .insert_key(&k, 10, &audit("key.create", name))
                .await
                .unwrap();
        }
        let claim = store.claim_outbox(100).await.unwrap();
        let records: Vec<metlo_shared::KeyRecord> = claim
            .rows
            .iter()
            .map(|r| {
                metlo_shared::KeyRecord::from_json(r.value.as_ref().unwrap().as_bytes()).unwrap()
            })
            .collect();
        let mut names: Vec<&str> = records.iter().map(|r| r.name.as_str()).collect();
        names.sort();
        assert_eq!(
            names,
            ["c", "l"],
            "admin and edge hashes never leave the control plane"
        );
        assert!(records.iter().all(|r| r.role.serves_traffic()));
        store.finish_claim(claim, Ok(())).await.unwrap();
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
}
