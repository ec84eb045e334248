//! Last-use times, written in batches by the usage flusher.

use super::{Store, StoreError};

impl Store {
    /// Records when keys were last used, given by secret hash (current or rolled away),
    /// in one transaction; a time never moves backwards. Updated in hash order, so two
    /// replicas flushing at once rarely lock rows in opposite orders (a deadlock victim's
    /// batch is retried with the next flush).
    pub async fn record_usage(&self, used: &[(String, i64)]) -> Result<(), StoreError> {
        if used.is_empty() {
            return Ok(());
        }
        let mut used = used.to_vec();
        used.sort_unstable();
        let mut tx = self.pool.begin().await?;
        for (hash, at_ms) in &used {
            sqlx::query(
                "UPDATE api_keys SET last_used_ms = $1 \
                 WHERE (key_hash = $2 OR id IN (SELECT key_id FROM retired_secrets WHERE key_hash = $2)) \
                 AND (last_used_ms IS NULL OR last_used_ms < $1)",
            )
            .bind(*at_ms)
            .bind(hash)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use metlo_shared::{ApiKey, KeyType};

    use crate::db::keys::fixtures::{audit, key, roll};
    use crate::db::Store;

    async fn last_used(store: &Store, name: &str) -> Option<i64> {
        let keys = store.list_keys(None).await.unwrap();
        keys.into_iter()
            .find(|k| k.name == name)
            .unwrap()
            .last_used_ms
    }

    #[tokio::test]
    async fn uses_by_current_or_rolled_secret_and_never_backwards() {
        let store = Store::memory().await;
        let k = key("k", KeyType::Generic);
        store
            .insert_key(&k, 10, &audit("key.create", "k"))
            .await
            .unwrap();
        store.record_usage(&[]).await.unwrap();
        store
            .record_usage(&[(k.key_hash.clone(), 2_000)])
            .await
            .unwrap();
        assert_eq!(last_used(&store, "k").await, Some(2_000));
        store
            .record_usage(&[(k.key_hash.clone(), 1_000)])
            .await
            .unwrap();
        assert_eq!(last_used(&store, "k").await, Some(2_000), "never backwards");
        // After a roll, a use of the old secret (in its overlap) still counts.
        roll(&store, "k", Duration::from_secs(60)).await;
        store
            .record_usage(&[(k.key_hash.clone(), 3_000)])
            .await
            .unwrap();
        assert_eq!(last_used(&store, "k").await, Some(3_000));
        // Unknown hashes change nothing.
        let unknown = ApiKey::generate().unwrap().hash().to_hex();
        store.record_usage(&[(unknown, 9_000)]).await.unwrap();
        assert_eq!(last_used(&store, "k").await, Some(3_000));
    }
}
