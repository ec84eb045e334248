//! Key use, written in batches by the usage flusher: last-use times, requests per hour,
//! and refused requests per hour and outcome.

use super::rows::{Uses, OUTCOMES};
use super::{Store, StoreError};

/// Requests per hour: admitted `(hour, n)`, refused `(hour, outcome, n)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HourlyCounts {
    pub admitted: Vec<(i64, i64)>,
    pub refused: Vec<(i64, String, i64)>,
}

/// Keys per transaction: short statements, so a flush never holds SQLite's writer lock
/// (or Postgres row locks) for long.
pub const USAGE_BATCH: usize = 500;

/// (key, hour) counts per statement: 3 parameters each.
const PAIRS_PER_STATEMENT: usize = 5_000;

impl Store {
    /// Records the uses of keys given by secret hash (current or rolled away), in one
    /// transaction: each key's last-use time (never moving backwards), its requests per
    /// hour and its refused ones per hour and outcome (added). Unknown hashes change
    /// nothing.
    pub async fn record_usage(&self, used: &[(String, Uses)]) -> Result<(), StoreError> {
        if used.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        // Keys only refused since the last flush were not used: their lastUsed stays.
        let touched: Vec<&(String, Uses)> = used.iter().filter(|(_, u)| u.last_ms > 0).collect();
        let values: Vec<String> = (0..touched.len())
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
        if !touched.is_empty() {
            let mut q = sqlx::query(&sql);
            for (hash, uses) in touched {
                q = q.bind(hash).bind(uses.last_ms);
            }
            q.execute(&mut *tx).await?;
        }
        let counted: Vec<(&String, i64, i64)> = used
            .iter()
            .flat_map(|(hash, uses)| {
                uses.hours
                    .iter()
                    .map(move |(hour, n)| (hash, *hour, i64::try_from(*n).unwrap_or(i64::MAX)))
            })
            .collect();
        // Statements of at most PAIRS_PER_STATEMENT (three parameters each): under
        // SQLite's 32,766 and PostgreSQL's 65,535 bound parameters, however many hours the
        // batch's keys were used in.
        for counted in counted.chunks(PAIRS_PER_STATEMENT) {
            let values: Vec<String> = (0..counted.len())
                .map(|i| format!("(${}, ${}, ${})", 3 * i + 1, 3 * i + 2, 3 * i + 3))
                .collect();
            // (`WHERE true`: SQLite needs it to tell the upsert's ON from a join's.)
            let sql = format!(
                "WITH counted (h, hour, n) AS (VALUES {}), \
                 secrets (id, h) AS (SELECT id, key_hash FROM api_keys \
                   UNION ALL SELECT key_id, key_hash FROM retired_secrets) \
                 INSERT INTO key_usage (key_id, hour, requests) \
                 SELECT s.id, c.hour, SUM(c.n) FROM counted c JOIN secrets s ON s.h = c.h \
                 WHERE true GROUP BY s.id, c.hour \
                 ON CONFLICT (key_id, hour) DO UPDATE SET requests = key_usage.requests + excluded.requests",
                values.join(", ")
            );
            let mut q = sqlx::query(&sql);
            for (hash, hour, n) in counted {
                q = q.bind(*hash).bind(*hour).bind(*n);
            }
            q.execute(&mut *tx).await?;
        }
        let refused: Vec<(&String, i64, &str, i64)> = used
            .iter()
            .flat_map(|(hash, uses)| {
                uses.refused.iter().map(move |(hour, outcome, n)| {
                    (
                        hash,
                        *hour,
                        OUTCOMES[*outcome],
                        i64::try_from(*n).unwrap_or(i64::MAX),
                    )
                })
            })
            .collect();
        for refused in refused.chunks(PAIRS_PER_STATEMENT * 3 / 4) {
            let values: Vec<String> = (0..refused.len())
                .map(|i| {
                    format!(
                        "(${}, ${}, ${}, ${})",
                        4 * i + 1,
                        4 * i + 2,
                        4 * i + 3,
                        4 * i + 4
                    )
                })
                .collect();
            let sql = format!(
                "WITH counted (h, hour, outcome, n) AS (VALUES {}), \
                 secrets (id, h) AS (SELECT id, key_hash FROM api_keys \
                   UNION ALL SELECT key_id, key_hash FROM retired_secrets) \
                 INSERT INTO key_outcomes (key_id, hour, outcome, requests) \
                 SELECT s.id, c.hour, c.outcome, SUM(c.n) FROM counted c JOIN secrets s ON s.h = c.h \
                 WHERE true GROUP BY s.id, c.hour, c.outcome \
                 ON CONFLICT (key_id, hour, outcome) DO UPDATE SET requests = key_outcomes.requests + excluded.requests",
                values.join(", ")
            );
            let mut q = sqlx::query(&sql);
            for (hash, hour, outcome, n) in refused {
                q = q.bind(*hash).bind(*hour).bind(*outcome).bind(*n);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The key `name`'s requests per hour from `from_hour` to `to_hour` (both included;
    /// hours without requests left out); `None`: no such key.
    pub async fn key_usage(
        &self,
        name: &str,
        from_hour: i64,
        to_hour: i64,
    ) -> Result<Option<HourlyCounts>, StoreError> {
        let id: Option<i64> = sqlx::query_scalar("SELECT id FROM api_keys WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        let Some(id) = id else { return Ok(None) };
        Ok(Some(
            self.hourly("key_id = $1", id, from_hour, to_hour).await?,
        ))
    }

    /// The requests of the keys that belong to identity `id` now, per hour.
    pub async fn identity_usage(
        &self,
        id: i64,
        from_hour: i64,
        to_hour: i64,
    ) -> Result<HourlyCounts, StoreError> {
        self.hourly(
            "key_id IN (SELECT id FROM api_keys WHERE identity_id = $1)",
            id,
            from_hour,
            to_hour,
        )
        .await
    }

    /// Admitted requests per hour, and refused ones per hour and outcome, of the keys
    /// `keys` (a condition on `key_id` with `$1` = `id`) summed.
    async fn hourly(
        &self,
        keys: &str,
        id: i64,
        from_hour: i64,
        to_hour: i64,
    ) -> Result<HourlyCounts, StoreError> {
        let admitted: Vec<(i64, i64)> = sqlx::query_as(&format!(
            "SELECT hour, CAST(SUM(requests) AS BIGINT) FROM key_usage \
             WHERE {keys} AND hour >= $2 AND hour <= $3 GROUP BY hour ORDER BY hour"
        ))
        .bind(id)
        .bind(from_hour)
        .bind(to_hour)
        .fetch_all(&self.pool)
        .await?;
        let refused: Vec<(i64, String, i64)> = sqlx::query_as(&format!(
            "SELECT hour, outcome, CAST(SUM(requests) AS BIGINT) FROM key_outcomes \
             WHERE {keys} AND hour >= $2 AND hour <= $3 GROUP BY hour, outcome ORDER BY hour"
        ))
        .bind(id)
        .bind(from_hour)
        .bind(to_hour)
        .fetch_all(&self.pool)
        .await?;
        Ok(HourlyCounts { admitted, refused })
    }

    /// Deletes hourly counts older than `before_hour`, at most `limit` rows of each
    /// table; how many (the more of the two).
    pub async fn prune_usage(&self, before_hour: i64, limit: i64) -> Result<u64, StoreError> {
        let admitted = sqlx::query(
            "DELETE FROM key_usage WHERE (key_id, hour) IN \
             (SELECT key_id, hour FROM key_usage WHERE hour < $1 LIMIT $2)",
        )
        .bind(before_hour)
        .bind(limit)
        .execute(&self.pool)
        .await?
        .rows_affected();
        let refused = sqlx::query(
            "DELETE FROM key_outcomes WHERE (key_id, hour, outcome) IN \
             (SELECT key_id, hour, outcome FROM key_outcomes WHERE hour < $1 LIMIT $2)",
        )
        .bind(before_hour)
        .bind(limit)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(admitted.max(refused))
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
    use crate::db::rows::{Uses, HOUR_MS};
    use crate::db::Store;

    /// A use at `t` that counts no request.
    fn at(t: i64) -> Uses {
        Uses {
            last_ms: t,
            ..Uses::default()
        }
    }

    #[tokio::test]
    async fn requests_add_up_per_hour_by_either_secret_and_are_pruned() {
        let store = Store::memory().await;
        let k = key("k", KeyType::Generic);
        store
            .insert_key(&k, 10, &audit("key.create", "k"))
            .await
            .unwrap();
        let mut a = Uses::default();
        a.add(5 * HOUR_MS + 1, 3);
        a.add(6 * HOUR_MS + 1, 2);
        store
            .record_usage(&[(k.key_hash.clone(), a)])
            .await
            .unwrap();
        // A roll: the old secret's requests count for the same key.
        let (new, _) = roll(&store, "k", Duration::from_secs(60)).await;
        let mut old = Uses::default();
        old.add(6 * HOUR_MS + 2, 4);
        let mut current = Uses::default();
        current.add(6 * HOUR_MS + 3, 1);
        store
            .record_usage(&[(k.key_hash.clone(), old), (new.hash().to_hex(), current)])
            .await
            .unwrap();
        let admitted = |hours: Vec<(i64, i64)>| {
            Some(super::HourlyCounts {
                admitted: hours,
                refused: vec![],
            })
        };
        assert_eq!(
            store.key_usage("k", 0, 100).await.unwrap(),
            admitted(vec![(5, 3), (6, 7)])
        );
        assert_eq!(
            store.key_usage("k", 6, 6).await.unwrap(),
            admitted(vec![(6, 7)])
        );
        assert_eq!(store.key_usage("nope", 0, 100).await.unwrap(), None);
        assert_eq!(store.prune_usage(6, 100).await.unwrap(), 1);
        assert_eq!(
            store.key_usage("k", 0, 100).await.unwrap(),
            admitted(vec![(6, 7)])
        );
        // Refusals by outcome, both secrets, and pruned alike; a refusal is not a use.
        let mut refused = Uses::default();
        refused.add_refused(6 * HOUR_MS + 5, [1, 0, 2, 0, 0]);
        refused.add_refused(7 * HOUR_MS, [0, 0, 0, 0, 3]);
        let mut again = Uses::default();
        again.add_refused(6 * HOUR_MS + 9, [4, 0, 0, 0, 0]);
        store
            .record_usage(&[(k.key_hash.clone(), refused), (new.hash().to_hex(), again)])
            .await
            .unwrap();
        let counted = store.key_usage("k", 0, 100).await.unwrap().unwrap();
        assert_eq!(
            counted.refused,
            vec![
                (6, "forbidden".to_owned(), 2),
                (6, "rateLimited".to_owned(), 5),
                (7, "expired".to_owned(), 3)
            ]
        );
        assert_eq!(store.prune_usage(7, 100).await.unwrap(), 2);
        assert_eq!(
            store
                .key_usage("k", 0, 100)
                .await
                .unwrap()
                .unwrap()
                .refused
                .len(),
            1
        );
    }

    /// A whole batch of keys each counted in 49 hours (two days of an edge's reports):
    /// 73,500 parameters in one statement would pass both SQLite's and PostgreSQL's
    /// bound, and the flush would fail and be retried for ever.
    #[tokio::test]
    async fn a_full_batch_of_keys_over_two_days_is_written() {
        let store = Store::memory().await;
        let k = key("k", KeyType::Generic);
        store
            .insert_key(&k, 10, &audit("key.create", "k"))
            .await
            .unwrap();
        let mut rows = vec![];
        for i in 0..super::USAGE_BATCH {
            let mut uses = Uses::default();
            for hour in 0..49 {
                uses.add(hour * HOUR_MS, 1);
            }
            let hash = if i == 0 {
                k.key_hash.clone()
            } else {
                ApiKey::generate().unwrap().hash().to_hex()
            };
            rows.push((hash, uses));
        }
        store.record_usage(&rows).await.unwrap();
        let counted = store
            .key_usage("k", 0, 100)
            .await
            .unwrap()
            .unwrap()
            .admitted;
        assert_eq!(counted.len(), 49);
        assert!(counted.iter().all(|(_, n)| *n == 1));
    }

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
            .record_usage(&[(k.key_hash.clone(), at(2_000))])
            .await
            .unwrap();
        assert_eq!(last_used(&store, "k").await, Some(2_000));
        store
            .record_usage(&[(k.key_hash.clone(), at(1_000))])
            .await
            .unwrap();
        assert_eq!(last_used(&store, "k").await, Some(2_000), "never backwards");
        // After a roll, a use of the old secret (in its overlap) still counts.
        roll(&store, "k", Duration::from_secs(60)).await;
        store
            .record_usage(&[(k.key_hash.clone(), at(3_000))])
            .await
            .unwrap();
        assert_eq!(last_used(&store, "k").await, Some(3_000));
        // Unknown hashes change nothing, and are not known.
        let unknown = ApiKey::generate().unwrap().hash().to_hex();
        store
            .record_usage(&[(unknown.clone(), at(9_000))])
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
        let mut used: Vec<(String, Uses)> = (0..super::USAGE_BATCH - 2)
            .map(|i| (ApiKey::generate().unwrap().hash().to_hex(), at(i as i64)))
            .collect();
        used.push((keys[0].key_hash.clone(), at(5_000)));
        used.push((keys[1].key_hash.clone(), at(6_000)));
        store.record_usage(&used).await.unwrap();
        assert_eq!(last_used(&store, "k0").await, Some(5_000));
        assert_eq!(last_used(&store, "k1").await, Some(6_000));
        assert_eq!(last_used(&store, "k2").await, None);
    }
}
