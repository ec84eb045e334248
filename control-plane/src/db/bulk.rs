//! Many keys in one statement: the seeding path for benchmarks and load tests
//! (`keys seed`), not one HTTP call and transaction per key.

use super::rows::{AuditEntry, StoredKey};
use super::{Store, StoreError};

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
        Self::reserve_quota(&mut tx, keys.len() as i64, max_keys).await?;
        Self::insert_rows(&mut tx, keys).await?;
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
