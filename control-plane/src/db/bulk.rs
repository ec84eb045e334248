//! Many keys in one statement: the seeding path for benchmarks and load tests
//! (`keys seed`), not one HTTP call and transaction per key.

use super::rows::{AuditEntry, StoredKey};
use super::{Store, StoreError};

/// Rows per INSERT: 10 parameters each stays under SQLite's limit of 32,766 (and
/// Postgres's 65,535).
const ROWS_PER_INSERT: usize = 500;

impl Store {
    /// Inserts `keys` in one transaction, with one audit row for all of them, within the
    /// quota like single creates. Nothing goes to the outbox: KV gets seeded keys from
    /// `keys kv-resync` (or from the edge's lookups).
    pub async fn insert_keys_bulk(
        &self,
        keys: &[StoredKey],
        max_keys: u64,
        audit: &AuditEntry,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let n = keys.len() as i64;
        let reserved =
            sqlx::query("UPDATE key_quota SET used = used + $1 WHERE id = 1 AND used + $1 <= $2")
                .bind(n)
                .bind(i64::try_from(max_keys).unwrap_or(i64::MAX))
                .execute(&mut *tx)
                .await?
                .rows_affected();
        if reserved == 0 {
            return Err(StoreError::LimitReached(max_keys));
        }
        for chunk in keys.chunks(ROWS_PER_INSERT) {
            let values = (0..chunk.len())
                .map(|i| {
                    let p = (1..=10)
                        .map(|j| format!("${}", i * 10 + j))
                        .collect::<Vec<_>>();
                    format!("({})", p.join(", "))
                })
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "INSERT INTO api_keys (name, key_hash, identifier, key_type, created_at_ms, expires_at_ms, role, meta, rate_limit_requests, rate_limit_period_seconds) VALUES {values}"
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
                    .bind(key.rate_limit_period_seconds);
            }
            query.execute(&mut *tx).await?;
        }
        self.audit_in(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use metlo_shared::KeyType;

    use super::*;
    use crate::db::keys::fixtures::{audit, key};

    #[tokio::test]
    async fn bulk_inserts_count_against_the_quota_all_or_nothing() {
        let s = Store::memory().await;
        let keys: Vec<StoredKey> = (0..1200)
            .map(|i| key(&format!("seed-{i}"), KeyType::Generic))
            .collect();
        s.insert_keys_bulk(&keys, 1500, &audit("key.seed", "seed"))
            .await
            .unwrap();
        assert_eq!(s.list_keys(None).await.unwrap().len(), 1200);
        // Past the quota: refused whole.
        let more: Vec<StoredKey> = (0..301)
            .map(|i| key(&format!("more-{i}"), KeyType::Generic))
            .collect();
        assert!(matches!(
            s.insert_keys_bulk(&more, 1500, &audit("key.seed", "more"))
                .await,
            Err(StoreError::LimitReached(1500))
        ));
        // A taken name: refused whole, quota untouched.
        let clash = vec![
            key("new", KeyType::Generic),
            key("seed-7", KeyType::Generic),
        ];
        assert!(matches!(
            s.insert_keys_bulk(&clash, 1500, &audit("key.seed", "clash"))
                .await,
            Err(StoreError::DuplicateName)
        ));
        s.insert_keys_bulk(&more[..300], 1500, &audit("key.seed", "more"))
            .await
            .unwrap();
        assert_eq!(s.list_keys(None).await.unwrap().len(), 1500);
    }
}
