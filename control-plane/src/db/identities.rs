//! Identities (issue 31): made, read, listed, changed and deleted. A change rewrites what
//! its keys' records carry of it (`api_keys.identity_record`) and sends those records to
//! the edge, in the same transaction.

use super::rows::{
    AuditEntry, CreditsChange, RetiredSecret, StoredIdentity, StoredKey, IDENTITY_COLUMNS,
    KEY_COLUMNS,
};
use super::{Store, StoreError, Tx};
use metlo_shared::identity::NamedLimits;

/// Changes to an identity: only the fields given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentityChanges {
    /// `Some(None)`: no metadata.
    pub meta: Option<Option<String>>,
    pub limits: Option<NamedLimits>,
    pub credits: Option<CreditsChange>,
}

impl IdentityChanges {
    pub fn is_empty(&self) -> bool {
        *self == IdentityChanges::default()
    }
}

impl Store {
    /// Stores a new identity; [`StoreError::DuplicateName`] if its `externalId` is taken.
    pub async fn insert_identity(
        &self,
        row: &StoredIdentity,
        audit: &AuditEntry,
    ) -> Result<StoredIdentity, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO identities (external_id, meta, created_at_ms, rate_limits, credits_set, \
             credits_to, credits_added, credits_refill) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&row.external_id)
        .bind(row.meta.as_deref())
        .bind(row.created_at_ms)
        .bind(&row.rate_limits)
        .bind(row.credits.credits_set)
        .bind(row.credits.credits_to)
        .bind(row.credits.credits_added)
        .bind(row.credits.credits_refill.as_deref())
        .execute(&mut *tx)
        .await?;
        let stored = Self::read_identity(&mut tx, &row.external_id)
            .await?
            .ok_or(StoreError::Other(sqlx::Error::RowNotFound))?;
        self.audit_in(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(stored)
    }

    async fn read_identity(
        tx: &mut Tx,
        external_id: &str,
    ) -> Result<Option<StoredIdentity>, StoreError> {
        Ok(sqlx::query_as(&format!(
            "SELECT {IDENTITY_COLUMNS} FROM identities WHERE external_id = $1"
        ))
        .bind(external_id)
        .fetch_optional(&mut **tx)
        .await?)
    }

    /// What a key's record carries of the identity `id`, read under the identity's row
    /// lock: a change of the identity committing meanwhile either comes first (and is
    /// read here) or waits (and rewrites this key with the others).
    /// [`StoreError::IdentityGone`] if it was deleted meanwhile.
    pub(super) async fn lock_identity_part(tx: &mut Tx, id: i64) -> Result<String, StoreError> {
        sqlx::query("UPDATE identities SET external_id = external_id WHERE id = $1")
            .bind(id)
            .execute(&mut **tx)
            .await?;
        let identity: Option<StoredIdentity> = sqlx::query_as(&format!(
            "SELECT {IDENTITY_COLUMNS} FROM identities WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?;
        identity
            .map(|i| i.part_json())
            .ok_or(StoreError::IdentityGone)
    }

    /// The identity with this `externalId`.
    pub async fn identity(&self, external_id: &str) -> Result<Option<StoredIdentity>, StoreError> {
        Ok(sqlx::query_as(&format!(
            "SELECT {IDENTITY_COLUMNS} FROM identities WHERE external_id = $1"
        ))
        .bind(external_id)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Up to `limit` identities in the order they were made, after `after` (its
    /// `(created_at_ms, id)`).
    pub async fn identities_page(
        &self,
        after: Option<(i64, i64)>,
        limit: i64,
    ) -> Result<Vec<StoredIdentity>, StoreError> {
        let (at, id) = after.unwrap_or((i64::MIN, i64::MIN));
        Ok(sqlx::query_as(&format!(
            "SELECT {IDENTITY_COLUMNS} FROM identities \
             WHERE created_at_ms > $1 OR (created_at_ms = $2 AND id > $3) \
             ORDER BY created_at_ms, id LIMIT $4"
        ))
        .bind(at)
        .bind(at)
        .bind(id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The keys of the identity `id`.
    pub async fn keys_of_identity(&self, id: i64) -> Result<Vec<StoredKey>, StoreError> {
        Ok(sqlx::query_as(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE identity_id = $1 ORDER BY id"
        ))
        .bind(id)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Applies `changes` to the identity `external_id` under its row's lock (concurrent
    /// top-ups all count), rewrites its keys' records and sends them to the edge. The
    /// identity after, and its keys with their secrets still in a roll's overlap (whose
    /// records changed too); `None`: no such identity.
    pub async fn update_identity(
        &self,
        external_id: &str,
        changes: &IdentityChanges,
        audit: impl FnOnce(&StoredIdentity, &StoredIdentity) -> AuditEntry,
    ) -> Result<Option<(StoredIdentity, Vec<(StoredKey, Vec<RetiredSecret>)>)>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let locked =
            sqlx::query("UPDATE identities SET external_id = external_id WHERE external_id = $1")
                .bind(external_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        if locked == 0 {
            return Ok(None);
        }
        let Some(before) = Self::read_identity(&mut tx, external_id).await? else {
            return Ok(None);
        };
        let mut after = before.clone();
        if let Some(meta) = &changes.meta {
            after.meta = meta.clone();
        }
        if let Some(limits) = &changes.limits {
            after.rate_limits = limits.encode();
        }
        if let Some(change) = changes.credits {
            after.credits.apply(change)?;
        }
        sqlx::query(
            "UPDATE identities SET meta = $1, rate_limits = $2, credits_set = $3, credits_to = $4, \
             credits_added = $5, credits_refill = $6 WHERE id = $7",
        )
        .bind(after.meta.as_deref())
        .bind(&after.rate_limits)
        .bind(after.credits.credits_set)
        .bind(after.credits.credits_to)
        .bind(after.credits.credits_added)
        .bind(after.credits.credits_refill.as_deref())
        .bind(after.id)
        .execute(&mut *tx)
        .await?;
        let part = after.part_json();
        sqlx::query("UPDATE api_keys SET identity_record = $1 WHERE identity_id = $2")
            .bind(&part)
            .bind(after.id)
            .execute(&mut *tx)
            .await?;
        let keys: Vec<StoredKey> = sqlx::query_as(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE identity_id = $1 ORDER BY id"
        ))
        .bind(after.id)
        .fetch_all(&mut *tx)
        .await?;
        let changed = part != before.part_json();
        let mut published = Vec::with_capacity(keys.len());
        let now = crate::clock::now_ms();
        for key in keys {
            let retired = if changed {
                self.republish(&mut tx, &key, now).await?
            } else {
                Vec::new()
            };
            published.push((key, retired));
        }
        self.audit_in(&mut tx, &audit(&before, &after)).await?;
        self.commit_outbox(tx).await?;
        Ok(Some((after, published)))
    }

    /// Sends `key`'s records (its secret's, and those of secrets still in a roll's
    /// overlap) to the edge again; the latter secrets.
    async fn republish(
        &self,
        tx: &mut Tx,
        key: &StoredKey,
        now_ms: i64,
    ) -> Result<Vec<RetiredSecret>, StoreError> {
        self.enqueue_changed_put(tx, key, &key.key_hash, key.record())
            .await?;
        let retired: Vec<RetiredSecret> = sqlx::query_as(
            "SELECT key_hash, identifier, retires_at_ms FROM retired_secrets \
             WHERE key_id = $1 AND retires_at_ms > $2",
        )
        .bind(key.id)
        .bind(now_ms)
        .fetch_all(&mut **tx)
        .await?;
        for secret in &retired {
            let record = key.retired_record(&secret.identifier, secret.retires_at_ms);
            self.enqueue_changed_put(tx, key, &secret.key_hash, record)
                .await?;
        }
        Ok(retired)
    }

    /// Deletes the identity `external_id` if no key belongs to it
    /// ([`StoreError::IdentityHasKeys`] otherwise). `None`: no such identity.
    pub async fn delete_identity(
        &self,
        external_id: &str,
        audit: &AuditEntry,
    ) -> Result<Option<StoredIdentity>, StoreError> {
        let mut tx = self.pool.begin().await?;
        // The identity's row lock first, as a key joining it takes it: a join either
        // commits before (and its key is counted below) or waits and finds it gone.
        sqlx::query("UPDATE identities SET external_id = external_id WHERE external_id = $1")
            .bind(external_id)
            .execute(&mut *tx)
            .await?;
        let Some(identity) = Self::read_identity(&mut tx, external_id).await? else {
            return Ok(None);
        };
        let keys: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM api_keys WHERE identity_id = $1")
            .bind(identity.id)
            .fetch_one(&mut *tx)
            .await?;
        if keys > 0 {
            return Err(StoreError::IdentityHasKeys(keys));
        }
        sqlx::query("DELETE FROM identities WHERE id = $1")
            .bind(identity.id)
            .execute(&mut *tx)
            .await?;
        self.audit_in(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(Some(identity))
    }
}
