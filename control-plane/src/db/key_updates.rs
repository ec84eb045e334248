//! Changes to a key that keep its secret: enable or disable, expiry, metadata. Each
//! commits the row, its KV updates and its audit row in one transaction.

use super::rows::{AuditEntry, KeyChanges, RetiredSecret, StoredKey};
use super::{Store, StoreError};

impl Store {
    /// Applies `changes` to the key `name` and republishes it: while it serves traffic
    /// afterwards, KV gets its records (the current secret, and those still in a roll's
    /// overlap, deleted again when it ends); once it stops (disabled), KV deletes them.
    /// `audit` makes the audit row from the key before and after. Disabling the last key
    /// that can administer is refused. Returns the key after the change and its secrets
    /// in overlap; `None`: no such key.
    pub async fn update_key(
        &self,
        name: &str,
        changes: &KeyChanges,
        now_ms: i64,
        audit: impl FnOnce(&StoredKey, &StoredKey) -> AuditEntry,
    ) -> Result<Option<(StoredKey, Vec<RetiredSecret>)>, StoreError> {
        let mut tx = self.pool.begin().await?;
        // A key joining an identity: the identity as it is now, under its lock, taken
        // before the key's (the order an identity's own change takes them in).
        let joined = match &changes.identity {
            Some(Some(identity)) => Some(Self::lock_identity_part(&mut tx, identity.id).await?),
            _ => None,
        };
        let Some(before) = Self::lock_and_read_key(&mut tx, name).await? else {
            return Ok(None);
        };
        let mut after = changes.apply(&before, now_ms);
        if joined.is_some() {
            after.identity_record = joined;
        }
        if after.permissions.is_some()
            && after.permissions != before.permissions
            && !after.role.serves_traffic()
        {
            return Err(StoreError::NoTraffic(after.role));
        }
        if (after.credits.credits_to.is_some() && before.credits.credits_to.is_none()
            || after.identity_id.is_some() && after.identity_id != before.identity_id)
            && !after.role.serves_traffic()
        {
            return Err(StoreError::NoTraffic(after.role));
        }
        if let Some(change) = changes.credits {
            // Checked on the row as read under its lock: concurrent top-ups add up, none is
            // lost or counted twice.
            before.credits.clone().apply(change)?;
        }
        // Disabled, or given an expiry (or an earlier one): it will stop administering.
        let ends_sooner = match (before.expires_at_ms, after.expires_at_ms) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(b), Some(a)) => a < b,
        };
        if before.role.administers()
            && before.disabled_at_ms.is_none()
            && (after.disabled_at_ms.is_some() || ends_sooner)
        {
            // The quota row serializes last-admin checks with deletes (same lock order).
            sqlx::query("UPDATE key_quota SET used = used WHERE id = 1")
                .execute(&mut *tx)
                .await?;
            Self::ensure_another_admin(&mut tx, name).await?;
        }
        sqlx::query(
            "UPDATE api_keys SET disabled_at_ms = $1, expires_at_ms = $2, meta = $3, \
             rate_limit_requests = $4, rate_limit_period_seconds = $5, permissions = $6, \
             credits_set = $7, credits_to = $8, credits_added = $9, credits_refill = $10, \
             identity_id = $11, identity_record = $12 WHERE id = $13",
        )
        .bind(after.disabled_at_ms)
        .bind(after.expires_at_ms)
        .bind(after.meta.as_deref())
        .bind(after.rate_limit_requests)
        .bind(after.rate_limit_period_seconds)
        .bind(after.permissions.as_deref())
        .bind(after.credits.credits_set)
        .bind(after.credits.credits_to)
        .bind(after.credits.credits_added)
        .bind(after.credits.credits_refill.as_deref())
        .bind(after.identity_id)
        .bind(after.identity_record.as_deref())
        .bind(after.id)
        .execute(&mut *tx)
        .await?;
        let retired: Vec<RetiredSecret> = sqlx::query_as(
            "SELECT key_hash, identifier, retires_at_ms FROM retired_secrets \
             WHERE key_id = $1 AND retires_at_ms > $2",
        )
        .bind(after.id)
        .bind(now_ms)
        .fetch_all(&mut *tx)
        .await?;
        if after.serves_traffic() {
            self.enqueue_changed_put(&mut tx, &after, &after.key_hash, after.record())
                .await?;
            for secret in &retired {
                let record = after.retired_record(&secret.identifier, secret.retires_at_ms);
                self.enqueue_changed_put(&mut tx, &after, &secret.key_hash, record)
                    .await?;
                self.enqueue_delete(
                    &mut tx,
                    &secret.key_hash,
                    after.secret_end(secret.retires_at_ms),
                )
                .await?;
            }
        } else if before.serves_traffic() {
            let hashes: Vec<&str> = std::iter::once(after.key_hash.as_str())
                .chain(retired.iter().map(|r| r.key_hash.as_str()))
                .collect();
            self.feed_refused(&mut tx, &before, &hashes).await?;
            for hash in hashes {
                self.enqueue_delete(&mut tx, hash, now_ms).await?;
            }
        }
        let had_expired = before.expires_at_ms.is_some_and(|t| t <= now_ms);
        if after.disabled_at_ms.is_some() || had_expired {
            // Disabled, or expired (enabling or extending it later does not bring its
            // sessions back, whether or not one was used while it was refused).
            let ended: Vec<String> = std::iter::once(after.key_hash.clone())
                .chain(retired.iter().map(|r| r.key_hash.clone()))
                .collect();
            Self::end_sessions_in(&mut tx, &ended).await?;
        }
        self.audit_in(&mut tx, &audit(&before, &after)).await?;
        self.commit_outbox(tx).await?;
        Ok(Some((after, retired)))
    }
}
