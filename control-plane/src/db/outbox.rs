//! The transactional outbox: KV updates written in the same transaction as the key
//! change they follow, claimed and deleted by the drainer once Workers KV took them.

use metlo_shared::KeyRecord;

use super::rows::{Claim, OutboxRow, Sent, StoredKey, Tx, OUTBOX_CHANNEL};
use super::{Backend, Store, StoreError};
use crate::clock::now_ms;

impl Store {
    /// A KV put of `record` under `kv_key` (a secret of `key`), only for keys whose role
    /// serves traffic: admin and edge key hashes never leave the control plane.
    pub(super) async fn enqueue_put(
        &self,
        tx: &mut Tx,
        key: &StoredKey,
        kv_key: &str,
        record: KeyRecord,
    ) -> Result<(), StoreError> {
        if !key.serves_traffic() {
            return Ok(());
        }
        self.enqueue(tx, kv_key, Some(record.to_json()), 0).await
    }

    /// A KV put that changes a record the edge may already hold (an update): fed to the
    /// revocation feed, sent now, and again one echo later. An edge that looked the key up just before the change
    /// writes the old record into KV itself, and that write can land after ours; the
    /// echo overwrites it, so a stale record lasts one echo, not the edge's KV TTL.
    pub(super) async fn enqueue_changed_put(
        &self,
        tx: &mut Tx,
        key: &StoredKey,
        kv_key: &str,
        record: KeyRecord,
    ) -> Result<(), StoreError> {
        if !key.serves_traffic() {
            return Ok(());
        }
        self.feed_record(tx, key, kv_key, &record).await?;
        let json = record.to_json();
        self.enqueue(tx, kv_key, Some(json.clone()), 0).await?;
        if self.delete_echo_ms > 0 {
            let echo_at = now_ms() + self.delete_echo_ms;
            self.enqueue(tx, kv_key, Some(json), echo_at).await?;
        }
        Ok(())
    }

    /// A KV delete at `at_ms` (or at once when that has passed), and its echo.
    pub(super) async fn enqueue_delete(
        &self,
        tx: &mut Tx,
        kv_key: &str,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        let at = if at_ms <= now_ms() { 0 } else { at_ms };
        self.enqueue(tx, kv_key, None, at).await?;
        if self.delete_echo_ms > 0 {
            let echo_at = at.max(now_ms()) + self.delete_echo_ms;
            self.enqueue(tx, kv_key, None, echo_at).await?;
        }
        Ok(())
    }

    /// Adds a KV update to the outbox inside the caller's transaction, to be sent at once
    /// or not before `not_before_ms` (ms since the epoch).
    pub(super) async fn enqueue(
        &self,
        tx: &mut Tx,
        kv_key: &str,
        value: Option<String>,
        not_before_ms: i64,
    ) -> Result<(), StoreError> {
        if !self.outbox {
            return Ok(());
        }
        self.drop_superseded_echoes(tx, kv_key, value.is_some(), not_before_ms)
            .await?;
        let op = if value.is_some() { "put" } else { "delete" };
        sqlx::query(
            "INSERT INTO kv_outbox (kv_key, op, value, created_at_ms, not_before_ms) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(kv_key)
        .bind(op)
        .bind(value)
        .bind(now_ms())
        .bind(not_before_ms)
        .execute(&mut **tx)
        .await?;
        // Delivered at commit: wakes the drainers of every replica.
        self.notify_at_commit(tx, OUTBOX_CHANNEL).await
    }

    /// Echoed puts (the only puts ever scheduled) still waiting for `kv_key` that the
    /// update being enqueued makes wrong: any, before a new put (the echo would bring
    /// back the older record); those due at or after a delete (they would bring back a
    /// deleted key). Rows a drainer is sending right now are left to it (PostgreSQL's
    /// `SKIP LOCKED`, so a key change never waits for a KV call): they have lower ids, so
    /// they reach KV before the update enqueued here.
    async fn drop_superseded_echoes(
        &self,
        tx: &mut Tx,
        kv_key: &str,
        put: bool,
        not_before_ms: i64,
    ) -> Result<(), StoreError> {
        let from_ms = if put { 1 } else { not_before_ms.max(now_ms()) };
        let lock = match self.backend {
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        sqlx::query(&format!(
            "DELETE FROM kv_outbox WHERE id IN (SELECT id FROM kv_outbox \
             WHERE kv_key = $1 AND op = 'put' AND not_before_ms >= $2{lock})"
        ))
        .bind(kv_key)
        .bind(from_ms)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Claims up to `limit` due updates, oldest first. Rows whose key has an older
    /// pending update (held by another drainer, or not due yet) are left for later, so
    /// updates of one key are always sent in order (a delete is never overtaken by its put).
    pub async fn claim_outbox(&self, limit: i64) -> Result<Claim, StoreError> {
        let columns = "id, kv_key, value";
        let now = now_ms();
        match self.backend {
            Backend::Sqlite => {
                // One process owns an SQLite file: no other drainer to race with.
                let rows = sqlx::query_as(&format!(
                    "SELECT {columns} FROM kv_outbox WHERE not_before_ms <= $1 ORDER BY id LIMIT $2"
                ))
                .bind(now)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
                Ok(Claim { tx: None, rows })
            }
            Backend::Postgres => {
                let mut tx = self.pool.begin().await?;
                let mut rows: Vec<OutboxRow> = sqlx::query_as(&format!(
                    "SELECT {columns} FROM kv_outbox WHERE not_before_ms <= $1 ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED"
                ))
                .bind(now)
                .bind(limit)
                .fetch_all(&mut *tx)
                .await?;
                if !rows.is_empty() {
                    let mut keys: Vec<&str> = rows.iter().map(|r| r.kv_key.as_str()).collect();
                    keys.sort_unstable();
                    keys.dedup();
                    // Among due rows only: a delete scheduled for later (a roll's overlap
                    // end, an echo) must not hold back what is due now. Besides deletes,
                    // only echoed puts are scheduled, and those are dropped by any later
                    // update that would make them wrong, so letting due rows pass them
                    // keeps every key's end state right.
                    let placeholders: Vec<String> =
                        (2..=keys.len() + 1).map(|i| format!("${i}")).collect();
                    let sql = format!(
                        "SELECT kv_key, MIN(id) AS first FROM kv_outbox WHERE not_before_ms <= $1 AND kv_key IN ({}) GROUP BY kv_key",
                        placeholders.join(", ")
                    );
                    let mut q = sqlx::query_as(&sql).bind(now);
                    for k in &keys {
                        q = q.bind(*k);
                    }
                    let firsts: Vec<(String, i64)> = q.fetch_all(&mut *tx).await?;
                    let mine: std::collections::HashSet<i64> = rows.iter().map(|r| r.id).collect();
                    // Keep a row only if the oldest pending row of its key is one of ours.
                    rows.retain(|r| {
                        firsts
                            .iter()
                            .find(|(k, _)| *k == r.kv_key)
                            .is_none_or(|(_, first)| mine.contains(first))
                    });
                }
                Ok(Claim { tx: Some(tx), rows })
            }
        }
    }

    /// Ends a claim: the rows KV took are deleted, the others stay (with the error
    /// recorded) for a later round.
    pub async fn finish_claim(&self, claim: Claim, outcome: Sent<'_>) -> Result<(), StoreError> {
        let Claim { tx, rows } = claim;
        if rows.is_empty() {
            if let Some(tx) = tx {
                tx.rollback().await?;
            }
            return Ok(());
        }
        let (kept, done): (Vec<&OutboxRow>, Vec<&OutboxRow>) = match &outcome {
            Sent::All => (vec![], rows.iter().collect()),
            Sent::Failed(_) => (rows.iter().collect(), vec![]),
            Sent::Partly { unsent, .. } => rows
                .iter()
                .partition(|r| unsent.contains(r.kv_key.as_str())),
        };
        let list = |first: usize, n: usize| {
            (first..first + n)
                .map(|i| format!("${i}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut statements = vec![];
        if !done.is_empty() {
            let sql = format!(
                "DELETE FROM kv_outbox WHERE id IN ({})",
                list(1, done.len())
            );
            statements.push((sql, None, done));
        }
        if let Sent::Failed(e) | Sent::Partly { error: e, .. } = outcome {
            if !kept.is_empty() {
                let sql = format!(
                    "UPDATE kv_outbox SET attempts = attempts + 1, last_error = $1 WHERE id IN ({})",
                    list(2, kept.len())
                );
                statements.push((sql, Some(e.chars().take(500).collect::<String>()), kept));
            }
        }
        let mut tx = match tx {
            Some(tx) => tx,
            None => self.pool.begin().await?,
        };
        for (sql, error, rows) in statements {
            let mut q = sqlx::query(&sql);
            if let Some(e) = error {
                q = q.bind(e);
            }
            for r in rows {
                q = q.bind(r.id);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Due updates and since when the oldest has been due, for metrics and readiness.
    pub async fn outbox_depth(&self) -> Result<(i64, Option<i64>), StoreError> {
        let depth = sqlx::query_as(
            "SELECT COUNT(*) AS depth, \
             MIN(CASE WHEN not_before_ms > created_at_ms THEN not_before_ms ELSE created_at_ms END) AS oldest \
             FROM kv_outbox WHERE not_before_ms <= $1",
        )
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await?;
        Ok(depth)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use metlo_shared::KeyType;

    use crate::clock::now_ms;
    use crate::db::keys::fixtures::{audit, key};
    use crate::db::rows::Sent;
    use crate::db::Store;

    #[tokio::test]
    async fn nothing_is_enqueued_without_a_kv_target() {
        let store = Store::memory().await;
        let k = key("k", KeyType::Generic);
        store
            .insert_key(&k, 10, &audit("key.create", "k"))
            .await
            .unwrap();
        assert_eq!(store.outbox_depth().await.unwrap(), (0, None));
        assert!(store.claim_outbox(10).await.unwrap().rows.is_empty());
    }

    #[tokio::test]
    async fn changes_are_enqueued_claimed_in_order_and_deleted_once_sent() {
        let wake = Arc::new(tokio::sync::Notify::new());
        let store = Store::memory()
            .await
            .with_outbox(true, Duration::from_secs(60))
            .with_outbox_wake(wake.clone());
        let k = key("k", KeyType::Generic);
        store
            .insert_key(&k, 10, &audit("key.create", "k"))
            .await
            .unwrap();
        // The commit woke the drainer (a stored permit: this returns at once).
        tokio::time::timeout(Duration::from_secs(1), wake.notified())
            .await
            .expect("woken");
        store
            .delete_key("k", true, &audit("key.delete", "k"))
            .await
            .unwrap();
        // Put, delete now, and the delete's echo a minute later (not due yet).
        let (depth, oldest) = store.outbox_depth().await.unwrap();
        assert_eq!(depth, 2);
        assert!(oldest.unwrap() <= now_ms());
        let claim = store.claim_outbox(10).await.unwrap();
        let ops: Vec<(&str, bool)> = claim
            .rows
            .iter()
            .map(|r| (r.kv_key.as_str(), r.value.is_some()))
            .collect();
        assert_eq!(
            ops,
            [(k.key_hash.as_str(), true), (k.key_hash.as_str(), false)]
        );
        let record =
            metlo_shared::KeyRecord::from_json(claim.rows[0].value.as_ref().unwrap().as_bytes())
                .unwrap();
        assert_eq!(record.name, "k");
        // A failed send keeps the rows (and says why); a good one deletes them.
        store
            .finish_claim(claim, Sent::Failed("KV down"))
            .await
            .unwrap();
        let claim = store.claim_outbox(10).await.unwrap();
        assert_eq!(claim.rows.len(), 2, "kept after a failure");
        store.finish_claim(claim, Sent::All).await.unwrap();
        assert_eq!(store.outbox_depth().await.unwrap().0, 0);
        assert!(
            store.claim_outbox(10).await.unwrap().rows.is_empty(),
            "the echo is not due yet"
        );
    }

    /// KV wrote some keys of a bulk call and listed the rest as unsuccessful: only the
    /// rows of those stay.
    #[tokio::test]
    async fn only_the_unsuccessful_keys_stay_after_a_partial_write() {
        let store = Store::memory()
            .await
            .with_outbox(true, Duration::from_secs(60));
        let (a, b) = (key("a", KeyType::Generic), key("b", KeyType::Generic));
        for k in [&a, &b] {
            store
                .insert_key(k, 10, &audit("key.create", &k.name))
                .await
                .unwrap();
        }
        let claim = store.claim_outbox(10).await.unwrap();
        assert_eq!(claim.rows.len(), 2);
        let unsent = std::collections::HashSet::from([b.key_hash.as_str()]);
        store
            .finish_claim(
                claim,
                Sent::Partly {
                    unsent: &unsent,
                    error: "1 key not written",
                },
            )
            .await
            .unwrap();
        let left = store.claim_outbox(10).await.unwrap();
        assert_eq!(left.rows.len(), 1);
        assert_eq!(left.rows[0].kv_key, b.key_hash);
    }

    /// A change to a key's record is put into KV now and again one echo later (an edge
    /// write of the record it looked up just before cannot outlast the echo); a newer
    /// change replaces the echo, and a delete drops it (it would bring the key back).
    #[tokio::test]
    async fn a_changed_record_is_put_again_later_unless_something_newer_came() {
        use crate::db::rows::KeyChanges;
        let store = Store::memory()
            .await
            .with_outbox(true, Duration::from_secs(60));
        let k = key("k", KeyType::Generic);
        store
            .insert_key(&k, 10, &audit("key.create", "k"))
            .await
            .unwrap();
        let sent = store.claim_outbox(10).await.unwrap();
        store.finish_claim(sent, Sent::All).await.unwrap();
        let update = |meta: &str| KeyChanges {
            meta: Some(Some(meta.to_owned())),
            ..KeyChanges::default()
        };
        let pending = || async {
            let rows: Vec<(String, Option<String>, i64)> =
                sqlx::query_as("SELECT op, value, not_before_ms FROM kv_outbox ORDER BY id")
                    .fetch_all(&store.pool)
                    .await
                    .unwrap();
            rows
        };
        for meta in ["{\"v\":1}", "{\"v\":2}"] {
            store
                .update_key("k", &update(meta), now_ms(), |_, _| {
                    audit("key.update", "k")
                })
                .await
                .unwrap()
                .unwrap();
        }
        let rows = pending().await;
        let meta_of = |value: &Option<String>| {
            metlo_shared::KeyRecord::from_json(value.as_ref().unwrap().as_bytes())
                .unwrap()
                .meta
        };
        // The first change's put, the second's, and one echo: the second's, a minute on.
        assert_eq!(rows.len(), 3, "{rows:?}");
        assert!(rows.iter().all(|(op, _, _)| op == "put"));
        let (_, echo, at) = &rows[2];
        assert!(*at >= now_ms() + 59_000, "{rows:?}");
        assert_eq!(meta_of(echo), meta_of(&rows[1].1));
        assert_ne!(meta_of(echo), meta_of(&rows[0].1));
        crate::clock::advance(Duration::from_secs(61));
        let claim = store.claim_outbox(10).await.unwrap();
        assert_eq!(claim.rows.len(), 3, "the echo is due a minute later");
        store.finish_claim(claim, Sent::All).await.unwrap();

        // A delete drops a pending echo.
        store
            .update_key("k", &update("{\"v\":3}"), now_ms(), |_, _| {
                audit("key.update", "k")
            })
            .await
            .unwrap()
            .unwrap();
        store
            .delete_key("k", true, &audit("key.delete", "k"))
            .await
            .unwrap();
        let ops: Vec<(String, bool)> = pending()
            .await
            .into_iter()
            .map(|(op, _, at)| (op, at > now_ms()))
            .collect();
        let expected = [("put", false), ("delete", false), ("delete", true)];
        assert_eq!(
            ops,
            expected.map(|(op, later)| (op.to_owned(), later)),
            "the put, the delete and its echo; no put after the delete"
        );
    }
}
