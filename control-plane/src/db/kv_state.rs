//! What Workers KV should hold, read from the keys themselves rather than from the outbox
//! (which only carries changes): every live secret's hash → its record. Walked in the byte
//! order of the hashes — the order KV lists its keys in — by `keys kv-resync` (which also
//! keeps its resume point here) and by the reconcile.

use std::collections::HashMap;

use metlo_shared::Role;

use super::policy::POLICY_KV_KEY;
use super::rows::{KvEntry, ResyncCheckpoint, StoredKey};
use super::{Backend, Store, StoreError};
use crate::clock::now_ms;

#[derive(sqlx::FromRow)]
struct EntryRow {
    #[sqlx(flatten)]
    key: StoredKey,
    kv_key: String,
    /// Set for a secret a roll replaced (still in its overlap).
    secret_identifier: Option<String>,
    retires_at_ms: Option<i64>,
}

impl EntryRow {
    fn entry(self) -> KvEntry {
        let record = match (&self.secret_identifier, self.retires_at_ms) {
            (Some(identifier), Some(at)) => self.key.retired_record(identifier, at),
            _ => self.key.record(),
        };
        KvEntry {
            key: self.kv_key,
            value: record.to_json(),
        }
    }
}

impl Store {
    /// `COLLATE "C"` on Postgres, so that text compares bytewise whatever the database's
    /// collation (SQLite's default already does).
    fn bytewise(&self) -> &'static str {
        match self.backend {
            Backend::Postgres => " COLLATE \"C\"",
            Backend::Sqlite => "",
        }
    }

    /// The SQL of the entries KV should hold that pass `keys_where` (on `k.key_hash`) and
    /// `secrets_where` (on `r.key_hash`), in byte order; `$1` is now (ms).
    fn entries_sql(&self, keys_where: &str, secrets_where: &str, page: &str) -> String {
        let c = self.bytewise();
        let columns = super::rows::key_columns_of("k");
        let serving = [Role::Client, Role::Edge, Role::Admin, Role::Legacy]
            .iter()
            .filter(|r| r.serves_traffic())
            .map(|r| format!("'{}'", r.as_str()))
            .collect::<Vec<_>>()
            .join(", ");
        let live = format!(
            "k.role IN ({serving}) AND k.disabled_at_ms IS NULL \
             AND (k.expires_at_ms IS NULL OR k.expires_at_ms > $1)"
        );
        format!(
            "SELECT * FROM (SELECT * FROM (SELECT {columns}, k.key_hash AS kv_key, \
               CAST(NULL AS TEXT) AS secret_identifier, CAST(NULL AS BIGINT) AS retires_at_ms \
               FROM api_keys k WHERE {live} AND {keys_where} ORDER BY k.key_hash{c} {page}) a \
             UNION ALL \
             SELECT * FROM (SELECT {columns}, r.key_hash AS kv_key, \
               r.identifier AS secret_identifier, r.retires_at_ms AS retires_at_ms \
               FROM retired_secrets r JOIN api_keys k ON k.id = r.key_id \
               WHERE {live} AND r.retires_at_ms > $1 AND {secrets_where} \
               ORDER BY r.key_hash{c} {page}) b) u \
             ORDER BY kv_key{c} {page}"
        )
    }

    /// Up to `limit` entries KV should hold whose hash comes after `after` ("" for the
    /// first), in byte order.
    pub async fn kv_entries_after(
        &self,
        after: &str,
        limit: i64,
    ) -> Result<Vec<KvEntry>, StoreError> {
        let c = self.bytewise();
        let sql = self.entries_sql(
            &format!("k.key_hash{c} > $2"),
            &format!("r.key_hash{c} > $2"),
            "LIMIT $3",
        );
        let rows: Vec<EntryRow> = sqlx::query_as(&sql)
            .bind(now_ms())
            .bind(after)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        let mut entries: Vec<KvEntry> = rows.into_iter().map(EntryRow::entry).collect();
        // The policy's entry sorts after every hash: it ends the last page.
        if entries.len() < limit as usize && after < POLICY_KV_KEY {
            if let Some(value) = self.policy_kv_value().await? {
                entries.push(KvEntry {
                    key: POLICY_KV_KEY.to_owned(),
                    value,
                });
            }
        }
        Ok(entries)
    }

    /// What KV should hold under each of `hashes` (those it should not hold are absent).
    pub async fn kv_entries_for(
        &self,
        hashes: &[String],
    ) -> Result<HashMap<String, String>, StoreError> {
        let mut found = HashMap::with_capacity(hashes.len());
        if hashes.iter().any(|h| h == POLICY_KV_KEY) {
            if let Some(value) = self.policy_kv_value().await? {
                found.insert(POLICY_KV_KEY.to_owned(), value);
            }
        }
        for chunk in hashes.chunks(500) {
            let list = (0..chunk.len())
                .map(|i| format!("${}", i + 2))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = self.entries_sql(
                &format!("k.key_hash IN ({list})"),
                &format!("r.key_hash IN ({list})"),
                "",
            );
            let mut query = sqlx::query_as::<_, EntryRow>(&sql).bind(now_ms());
            for hash in chunk {
                query = query.bind(hash);
            }
            for row in query.fetch_all(&self.pool).await? {
                let entry = row.entry();
                found.insert(entry.key, entry.value);
            }
        }
        Ok(found)
    }

    /// How many entries KV should hold (live keys that serve traffic, rolled-away secrets
    /// still in their overlap, and the route policy once one was set).
    pub async fn kv_entry_count(&self) -> Result<i64, StoreError> {
        let sql = format!(
            "SELECT COUNT(*) FROM ({}) t",
            self.entries_sql("1 = 1", "1 = 1", "")
        );
        let keys: i64 = sqlx::query_scalar(&sql)
            .bind(now_ms())
            .fetch_one(&self.pool)
            .await?;
        Ok(keys + i64::from(self.policy_kv_value().await?.is_some()))
    }

    pub async fn resync_checkpoint(&self) -> Result<Option<ResyncCheckpoint>, StoreError> {
        Ok(
            sqlx::query_as("SELECT after_hash, done, started_at_ms FROM kv_resync WHERE id = 1")
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// Records that every entry up to `checkpoint.after_hash` has been written.
    pub async fn save_resync_checkpoint(
        &self,
        checkpoint: &ResyncCheckpoint,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO kv_resync (id, after_hash, done, started_at_ms, updated_at_ms) \
             VALUES (1, $1, $2, $3, $4) ON CONFLICT (id) DO UPDATE SET \
             after_hash = excluded.after_hash, done = excluded.done, \
             started_at_ms = excluded.started_at_ms, updated_at_ms = excluded.updated_at_ms",
        )
        .bind(&checkpoint.after_hash)
        .bind(checkpoint.done)
        .bind(checkpoint.started_at_ms)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn clear_resync_checkpoint(&self) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM kv_resync WHERE id = 1")
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use metlo_shared::KeyType;

    use super::*;
    use crate::db::keys::fixtures::{audit, key, roll};

    #[tokio::test]
    async fn entries_are_the_live_serving_secrets_in_byte_order() {
        let s = Store::memory().await;
        let add = |k: StoredKey| {
            let s = s.clone();
            async move {
                s.insert_key(&k, 100, &audit("key.create", &k.name))
                    .await
                    .unwrap()
            }
        };
        for i in 0..30 {
            add(key(&format!("k{i}"), KeyType::Generic)).await;
        }
        add(StoredKey {
            role: Role::Admin,
            ..key("admin", KeyType::Generic)
        })
        .await;
        add(key("off", KeyType::Generic)).await;
        sqlx::query("UPDATE api_keys SET disabled_at_ms = 1 WHERE name = 'off'")
            .execute(&s.pool)
            .await
            .unwrap();
        add(StoredKey {
            expires_at_ms: Some(now_ms() - 1000),
            ..key("old", KeyType::Generic)
        })
        .await;
        // A roll with an overlap: both secrets belong in KV.
        let (_, rolled) = roll(&s, "k0", Duration::from_secs(600)).await;
        let rolled = rolled.unwrap();

        let mut all = vec![];
        let mut after = String::new();
        loop {
            let page = s.kv_entries_after(&after, 7).await.unwrap();
            let Some(last) = page.last() else { break };
            after = last.key.clone();
            all.extend(page);
        }
        let keys = s.list_keys(None).await.unwrap();
        let mut expected: Vec<String> = keys
            .iter()
            .filter(|k| k.name.starts_with('k'))
            .map(|k| k.key_hash.clone())
            .chain(rolled.retired.iter().map(|r| r.key_hash.clone()))
            .collect();
        expected.sort();
        assert_eq!(
            all.iter().map(|e| e.key.clone()).collect::<Vec<_>>(),
            expected
        );
        assert_eq!(s.kv_entry_count().await.unwrap(), 31);
        let k1 = keys.iter().find(|k| k.name == "k1").unwrap();
        let entry = all.iter().find(|e| e.key == k1.key_hash).unwrap();
        assert_eq!(entry.value, k1.record().to_json());
        let old = &rolled.retired[0];
        let entry = all.iter().find(|e| e.key == old.key_hash).unwrap();
        assert_eq!(
            entry.value,
            rolled
                .key
                .retired_record(&old.identifier, old.retires_at_ms)
                .to_json()
        );

        let admin = keys.iter().find(|k| k.name == "admin").unwrap();
        let asked = vec![k1.key_hash.clone(), admin.key_hash.clone(), "ff".repeat(32)];
        let found = s.kv_entries_for(&asked).await.unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[&k1.key_hash], k1.record().to_json());
    }

    #[tokio::test]
    async fn checkpoint_round_trips() {
        let s = Store::memory().await;
        assert_eq!(s.resync_checkpoint().await.unwrap(), None);
        let c = ResyncCheckpoint {
            after_hash: "ab".into(),
            done: 3,
            started_at_ms: 5,
        };
        s.save_resync_checkpoint(&c).await.unwrap();
        s.save_resync_checkpoint(&ResyncCheckpoint {
            done: 4,
            ..c.clone()
        })
        .await
        .unwrap();
        assert_eq!(s.resync_checkpoint().await.unwrap().unwrap().done, 4);
        s.clear_resync_checkpoint().await.unwrap();
        assert_eq!(s.resync_checkpoint().await.unwrap(), None);
    }
}
