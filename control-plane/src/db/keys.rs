//! Keys, their rolled-away secrets, and the quota row that makes the key limit exact.

use std::time::Duration;

use metlo_shared::{KeyHash, KeyType, Role};

use super::rows::{AuditEntry, RetiredSecret, Rolled, StoredKey, Tx, KEY_COLUMNS};
use super::{Store, StoreError};
use crate::clock::{ceil_to_second, now_ms};

/// Rows per INSERT: 17 parameters each stays under SQLite's limit of 32,766 (and
/// Postgres's 65,535).
const ROWS_PER_INSERT: usize = 500;

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
        Self::reserve_quota(&mut tx, 1, max_keys).await?;
        // Its identity as it is now, under the identity's lock (not as read before).
        let mut key = key.clone();
        if let Some(id) = key.identity_id {
            key.identity_record = Some(Self::lock_identity_part(&mut tx, id).await?);
        }
        let key = &key;
        Self::insert_rows(&mut tx, std::slice::from_ref(key)).await?;
        self.enqueue_put(&mut tx, key, &key.key_hash, key.record())
            .await?;
        self.audit_in(&mut tx, audit).await?;
        self.commit_outbox(tx).await?;
        Ok(())
    }

    /// Takes `n` places of the key quota (its row locked until the transaction ends, so
    /// the limit is exact), or refuses with `LimitReached`.
    pub(super) async fn reserve_quota(
        tx: &mut Tx,
        n: i64,
        max_keys: u64,
    ) -> Result<(), StoreError> {
        let reserved =
            sqlx::query("UPDATE key_quota SET used = used + $1 WHERE id = 1 AND used + $1 <= $2")
                .bind(n)
                .bind(i64::try_from(max_keys).unwrap_or(i64::MAX))
                .execute(&mut **tx)
                .await?
                .rows_affected();
        if reserved == 0 {
            return Err(StoreError::LimitReached(max_keys));
        }
        Ok(())
    }

    /// Inserts new keys' rows, [`ROWS_PER_INSERT`] per statement.
    pub(super) async fn insert_rows(tx: &mut Tx, keys: &[StoredKey]) -> Result<(), StoreError> {
        for chunk in keys.chunks(ROWS_PER_INSERT) {
            let values = (0..chunk.len())
                .map(|i| {
                    let p: Vec<String> = (1..=17).map(|j| format!("${}", i * 17 + j)).collect();
                    format!("({})", p.join(", "))
                })
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "INSERT INTO api_keys (name, key_hash, identifier, key_type, created_at_ms, expires_at_ms, role, meta, rate_limit_requests, rate_limit_period_seconds, permissions, credits_set, credits_to, credits_added, credits_refill, identity_id, identity_record) VALUES {values}"
            );
            let mut query = sqlx::query(&sql);
            for key in chunk {
                query = query
                    .bind(&key.name)
                    .bind(&key.key_hash)
                    .bind(&key.identifier)
                    .bind(key.key_type.as_str())
                    .bind(key.created_at_ms)
                    .bind(key.expires_at_ms)
                    .bind(key.role.as_str())
                    .bind(key.meta.as_deref())
                    .bind(key.rate_limit_requests)
                    .bind(key.rate_limit_period_seconds)
                    .bind(key.permissions.as_deref())
                    .bind(key.credits.credits_set)
                    .bind(key.credits.credits_to)
                    .bind(key.credits.credits_added)
                    .bind(key.credits.credits_refill.as_deref())
                    .bind(key.identity_id)
                    .bind(key.identity_record.as_deref());
            }
            query.execute(&mut **tx).await?;
        }
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
        let Some(old) = Self::lock_and_read_key(&mut tx, name).await? else {
            return Ok(None);
        };
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
                self.feed_refused(&mut tx, &old, &[&secret.key_hash])
                    .await?;
                self.enqueue_delete(&mut tx, &secret.key_hash, now).await?;
            } else {
                // The feed and KV get the record with its new end at once (the edge
                // refuses it from then on), and KV a delete when the overlap is over.
                let record = old.retired_record(&secret.identifier, secret.retires_at_ms);
                self.enqueue_changed_put(&mut tx, &old, &secret.key_hash, record)
                    .await?;
                self.enqueue_delete(&mut tx, &secret.key_hash, secret.retires_at_ms)
                    .await?;
            }
        }
        let ended: Vec<String> = changed.iter().map(|s| s.key_hash.clone()).collect();
        Self::end_sessions_in(&mut tx, &ended).await?;
        self.audit_in(&mut tx, audit).await?;
        self.commit_outbox(tx).await?;
        Ok(Some(Rolled {
            key,
            retired: changed,
        }))
    }

    /// Refuses (`LastAdmin`) unless a key other than `name` can administer: enabled and
    /// not expired. The caller holds the quota row's lock, so two such checks never race.
    pub(super) async fn ensure_another_admin(tx: &mut Tx, name: &str) -> Result<(), StoreError> {
        let others: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM api_keys WHERE role IN ('admin', 'legacy') AND name <> $1 \
             AND disabled_at_ms IS NULL AND (expires_at_ms IS NULL OR expires_at_ms > $2)",
        )
        .bind(name)
        .bind(now_ms())
        .fetch_one(&mut **tx)
        .await?;
        if others == 0 {
            return Err(StoreError::LastAdmin);
        }
        Ok(())
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

    /// [`Self::lock_key`], then the key as it is under that lock. `None`: no such key.
    pub(super) async fn lock_and_read_key(
        tx: &mut Tx,
        name: &str,
    ) -> Result<Option<StoredKey>, StoreError> {
        if !Self::lock_key(tx, name).await? {
            return Ok(None);
        }
        let key = sqlx::query_as(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE name = $1"
        ))
        .bind(name)
        .fetch_one(&mut **tx)
        .await?;
        Ok(Some(key))
    }

    /// The key with this name (its metadata; never shown its secret).
    pub async fn key_by_name(&self, name: &str) -> Result<Option<StoredKey>, StoreError> {
        Ok(sqlx::query_as(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE name = $1"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// All keys, or those of one type; newest first.
    pub async fn list_keys(&self, only: Option<KeyType>) -> Result<Vec<StoredKey>, StoreError> {
        self.list_keys_page(only, None, None, i64::MAX).await
    }

    /// At most `limit` keys (all, or of one type, or whose name contains `name_part`,
    /// ASCII letters in any case), newest first — by `(created_at_ms, id)` descending —
    /// starting after `after` (the last key of the previous page). A key made or deleted
    /// during a walk never makes another one be skipped or repeated.
    pub async fn list_keys_page(
        &self,
        only: Option<KeyType>,
        name_part: Option<&str>,
        after: Option<(i64, i64)>,
        limit: i64,
    ) -> Result<Vec<StoredKey>, StoreError> {
        let mut sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE 1 = 1");
        let mut n = 0;
        let mut next = || {
            n += 1;
            format!("${n}")
        };
        if only.is_some() {
            sql += &format!(" AND key_type = {}", next());
        }
        if name_part.is_some() {
            sql += &format!(" AND LOWER(name) LIKE {} ESCAPE '\\'", next());
        }
        if after.is_some() {
            sql += &format!(" AND (created_at_ms, id) < ({}, {})", next(), next());
        }
        sql += &format!(" ORDER BY created_at_ms DESC, id DESC LIMIT {}", next());
        let mut query = sqlx::query_as(&sql);
        if let Some(t) = only {
            query = query.bind(t.as_str());
        }
        if let Some(part) = name_part {
            // LIKE's own characters taken literally.
            let escaped: String = part
                .to_ascii_lowercase()
                .chars()
                .flat_map(|c| match c {
                    '%' | '_' | '\\' => vec!['\\', c],
                    c => vec![c],
                })
                .collect();
            query = query.bind(format!("%{escaped}%"));
        }
        if let Some((created, id)) = after {
            query = query.bind(created).bind(id);
        }
        Ok(query.bind(limit).fetch_all(&self.pool).await?)
    }

    /// The enabled key a secret hash belongs to: its current secret, or one rolled away
    /// whose overlap has not ended (then with that secret's identifier, expiring at its
    /// end). A disabled key's secrets belong to no key, as a deleted one's.
    pub async fn find_by_hash(&self, hash: &KeyHash) -> Result<Option<StoredKey>, StoreError> {
        let hex = hash.to_hex();
        let key = sqlx::query_as(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = $1 AND disabled_at_ms IS NULL \
             UNION ALL \
             SELECT k.id, k.name, r.key_hash, r.identifier, k.key_type, k.created_at_ms, \
               CASE WHEN k.expires_at_ms IS NOT NULL AND k.expires_at_ms < r.retires_at_ms \
                 THEN k.expires_at_ms ELSE r.retires_at_ms END AS expires_at_ms, \
               k.last_used_ms, k.role, k.disabled_at_ms, k.meta, k.rate_limit_requests, k.rate_limit_period_seconds, k.permissions, \
               k.credits_set, k.credits_to, k.credits_added, k.credits_refill, \
               k.identity_id, k.identity_record \
             FROM retired_secrets r JOIN api_keys k ON k.id = r.key_id \
             WHERE r.key_hash = $2 AND r.retires_at_ms > $3 AND k.disabled_at_ms IS NULL"
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
        self.delete_key_with(name, None, keep_last_admin, audit)
            .await
    }

    /// [`Self::delete_key`], only while the key's current secret is `secret_hash` (what
    /// a caller that found the key by a secret means to delete): `None` as well when the
    /// key was rolled, or deleted and made again under the same name, meanwhile.
    pub async fn delete_key_with(
        &self,
        name: &str,
        secret_hash: Option<&str>,
        keep_last_admin: bool,
        audit: &AuditEntry,
    ) -> Result<Option<(StoredKey, Vec<String>)>, StoreError> {
        let mut tx = self.pool.begin().await?;
        // The key's row lock first, as a roll takes it: a roll in progress finishes (and
        // its rolled-away secret is seen below) before this goes on.
        if !Self::lock_key(&mut tx, name).await? {
            return Ok(None);
        }
        if let Some(expected) = secret_hash {
            let current: String =
                sqlx::query_scalar("SELECT key_hash FROM api_keys WHERE name = $1")
                    .bind(name)
                    .fetch_one(&mut *tx)
                    .await?;
            if current != expected {
                return Ok(None);
            }
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
                Self::ensure_another_admin(&mut tx, name).await?;
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
        let hashes: Vec<&str> = std::iter::once(&deleted.key_hash)
            .chain(&retired)
            .map(String::as_str)
            .collect();
        self.feed_refused(&mut tx, &deleted, &hashes).await?;
        for hash in std::iter::once(&deleted.key_hash).chain(&retired) {
            self.enqueue_delete(&mut tx, hash, now).await?;
            Self::record_revoked(&mut tx, hash, now).await?;
        }
        let ended: Vec<String> = std::iter::once(deleted.key_hash.clone())
            .chain(retired.iter().cloned())
            .collect();
        Self::end_sessions_in(&mut tx, &ended).await?;
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
        let Some(key) = Self::lock_and_read_key(&mut tx, name).await? else {
            return Ok(None);
        };
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
        let before = key.clone();
        let key = StoredKey { role, ..key };
        if !role.serves_traffic() {
            let now = now_ms();
            let hashes: Vec<&str> = std::iter::once(&key.key_hash)
                .chain(&retired)
                .map(String::as_str)
                .collect();
            self.feed_refused(&mut tx, &before, &hashes).await?;
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

    /// Inserts `key` as a key made before roles (no key is inserted with the legacy
    /// role since migration 0017: made as a client key, then given the old default).
    pub(crate) async fn insert_legacy(store: &Store, key: &StoredKey, audit: &AuditEntry) {
        let client = StoredKey {
            role: Role::Client,
            ..key.clone()
        };
        store.insert_key(&client, 10, audit).await.unwrap();
        sqlx::query("UPDATE api_keys SET role = 'legacy' WHERE name = $1")
            .bind(&key.name)
            .execute(&store.pool)
            .await
            .unwrap();
    }

    /// A new key's row (its secret is dropped: tests work with hashes).
    pub(crate) fn key(name: &str, key_type: KeyType) -> StoredKey {
        let secret = ApiKey::generate().unwrap();
        StoredKey::new(&secret, name.to_owned(), key_type, Role::Client, now_ms())
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
