//! The revocation feed's rows: written in the transaction of each change that stops or
//! changes a secret at the edge, numbered in commit order (see migration 0018); read in
//! order by `service::feed`, which serves them from memory; pruned past the window.

use metlo_shared::KeyRecord;

use super::rows::{FeedRow, StoredKey, Tx, FEED_CHANNEL};
use super::{Store, StoreError};
use crate::clock::now_ms;

impl Store {
    /// Feeds that each of `hashes` (secrets of `key`) is refused from now on. Only for
    /// keys whose role serves traffic: other keys' hashes never leave the control plane.
    pub(super) async fn feed_refused(
        &self,
        tx: &mut Tx,
        key: &StoredKey,
        hashes: &[&str],
    ) -> Result<(), StoreError> {
        if !key.serves_traffic() {
            return Ok(());
        }
        for hash in hashes {
            self.feed_in(tx, hash, None).await?;
        }
        Ok(())
    }

    /// Feeds the record the secret `hash` of `key` has from now on (an expiry brought
    /// forward, a limit added, the key enabled again).
    pub(super) async fn feed_record(
        &self,
        tx: &mut Tx,
        key: &StoredKey,
        hash: &str,
        record: &KeyRecord,
    ) -> Result<(), StoreError> {
        if !key.serves_traffic() {
            return Ok(());
        }
        self.feed_in(tx, hash, Some(&record.to_json())).await?;
        Ok(())
    }

    /// Writes one event; its number.
    pub(super) async fn feed_in(
        &self,
        tx: &mut Tx,
        hash: &str,
        record: Option<&str>,
    ) -> Result<i64, StoreError> {
        // The counter row stays locked until this transaction commits: the next writer
        // gets the next number only then, so numbers follow commit order, without gaps.
        let seq: i64 =
            sqlx::query_scalar("UPDATE feed_counter SET seq = seq + 1 WHERE id = 1 RETURNING seq")
                .fetch_one(&mut **tx)
                .await?;
        sqlx::query(
            "INSERT INTO revocation_feed (seq, key_hash, record, at_ms) VALUES ($1, $2, $3, $4)",
        )
        .bind(seq)
        .bind(hash)
        .bind(record)
        .bind(now_ms())
        .execute(&mut **tx)
        .await?;
        // Wakes the feed's readers on every replica once this commits (PostgreSQL folds
        // the notifications of one transaction into one; on SQLite the one process is
        // woken by the store after its commit).
        self.notify_at_commit(tx, FEED_CHANNEL).await?;
        Ok(seq)
    }

    /// Up to `limit` feed rows after `seq`, in order.
    pub async fn feed_after(&self, seq: i64, limit: i64) -> Result<Vec<FeedRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT seq, key_hash, record, at_ms FROM revocation_feed WHERE seq > $1 \
             ORDER BY seq LIMIT $2",
        )
        .bind(seq)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The last number given out.
    pub async fn feed_head(&self) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT seq FROM feed_counter WHERE id = 1")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Deletes feed rows written before `before_ms`; how many.
    pub async fn prune_feed(&self, before_ms: i64) -> Result<u64, StoreError> {
        Ok(sqlx::query("DELETE FROM revocation_feed WHERE at_ms < $1")
            .bind(before_ms)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }
}
