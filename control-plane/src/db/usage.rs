//! Last-use times, written in batches by the usage flusher.

use super::{Store, StoreError};

/// Uses per statement (two parameters each): one short statement per batch, so a flush
/// never holds SQLite's writer lock (or Postgres row locks) for long.
pub const USAGE_BATCH: usize = 500;

impl Store {
    /// Records when keys were last used, given by secret hash (current or rolled away), one
    /// statement per [`USAGE_BATCH`] uses, each committed on its own; a time never moves
    /// backwards. Unknown hashes change nothing.
    pub async fn record_usage(&self, used: &[(String, i64)]) -> Result<(), StoreError> {
        let mut used = used.to_vec();
        // Hash order, so two replicas flushing at once rarely lock rows in opposite orders
        // (a deadlock victim's batch is retried with the next flush).
        used.sort_unstable();
        for batch in used.chunks(USAGE_BATCH) {
            let values: Vec<String> = (0..batch.len())
                .map(|i| format!("(${}, ${})", 2 * i + 1, 2 * i + 2))
                .collect();
            let sql = format!(
                "WITH used (h, t) AS (VALUES {}), \
                 hit (id, t) AS ( \
                   SELECT k.id, u.t FROM used u JOIN api_keys k ON k.key_hash = u.h \
                   UNION ALL \
                   SELECT r.key_id, u.t FROM used u JOIN retired_secrets r ON r.key_hash = u.h), \
                 latest (id, t) AS (SELECT id, MAX(t) FROM hit GROUP BY id) \
                 UPDATE api_keys SET last_used_ms = (SELECT t FROM latest WHERE latest.id = api_keys.id) \
                 WHERE id IN (SELECT id FROM latest) \
                 AND (last_used_ms IS NULL OR last_used_ms < (SELECT t FROM latest WHERE latest.id = api_keys.id))",
                values.join(", ")
            );
            let mut q = sqlx::query(&sql);
            for (hash, at_ms) in batch {
                q = q.bind(hash).bind(*at_ms);
            }
            q.execute(&self.pool).await?;
        }
        Ok(())
    }

    /// Which of these secret hashes belong to a key (current or rolled away, still in its
    /// overlap): one query for a whole usage report.
    pub async fn known_hashes(
        &self,
        hashes: &[String],
    ) -> Result<std::collections::HashSet<String>, StoreError> {
        let mut known = std::collections::HashSet::new();
        for batch in hashes.chunks(USAGE_BATCH) {
            let list: Vec<String> = (1..=batch.len()).map(|i| format!("${i}")).collect();
            let list = list.join(", ");
            let sql = format!(
                "SELECT key_hash FROM api_keys WHERE key_hash IN ({list}) \
                 UNION SELECT key_hash FROM retired_secrets WHERE key_hash IN ({list})"
            );
            let mut q = sqlx::query_scalar::<_, String>(&sql);
            for h in batch {
                q = q.bind(h);
            }
            known.extend(q.fetch_all(&self.pool).await?);
        }
        Ok(known)
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
        // Unknown hashes change nothing, and are not known.
        let unknown = ApiKey::generate().unwrap().hash().to_hex();
        store
            .record_usage(&[(unknown.clone(), 9_000)])
            .await
            .unwrap();
        assert_eq!(last_used(&store, "k").await, Some(3_000));
        let current = store.list_keys(None).await.unwrap()[0].key_hash.clone();
        let known = store
            .known_hashes(&[unknown, k.key_hash.clone(), current.clone()])
            .await
            .unwrap();
        assert_eq!(known, [k.key_hash.clone(), current].into_iter().collect());
    }

    /// Many uses in a few statements: the latest per key wins, across batches too.
    #[tokio::test]
    async fn large_flushes_go_in_batches() {
        let store = Store::memory().await;
        let keys: Vec<_> = (0..3)
            .map(|i| key(&format!("k{i}"), KeyType::Generic))
            .collect();
        for k in &keys {
            store
                .insert_key(k, 10, &audit("key.create", &k.name))
                .await
                .unwrap();
        }
        let mut used: Vec<(String, i64)> = (0..2 * super::USAGE_BATCH)
            .map(|i| (ApiKey::generate().unwrap().hash().to_hex(), i as i64))
            .collect();
        used.push((keys[0].key_hash.clone(), 5_000));
        used.push((keys[1].key_hash.clone(), 6_000));
        store.record_usage(&used).await.unwrap();
        assert_eq!(last_used(&store, "k0").await, Some(5_000));
        assert_eq!(last_used(&store, "k1").await, Some(6_000));
        assert_eq!(last_used(&store, "k2").await, None);
    }
}
