//! Console sessions: opened at sign-in, read and touched on every console request,
//! ended by sign-out, the idle timeout or the absolute lifetime.

use super::rows::{AuditEntry, SessionRow, Tx};
use super::{Store, StoreError};

impl Store {
    /// Ends every console session opened with any secret of the key `name` ("sign out
    /// everywhere"), audited in the same transaction; how many. `None`: no such key.
    pub async fn end_sessions_of_key(
        &self,
        name: &str,
        audit: &AuditEntry,
    ) -> Result<Option<u64>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let Some(key) = Self::lock_and_read_key(&mut tx, name).await? else {
            return Ok(None);
        };
        let mut hashes: Vec<String> =
            sqlx::query_scalar("SELECT key_hash FROM retired_secrets WHERE key_id = $1")
                .bind(key.id)
                .fetch_all(&mut *tx)
                .await?;
        hashes.push(key.key_hash);
        let ended = Self::end_sessions_in(&mut tx, &hashes).await?;
        self.audit_in(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(Some(ended))
    }

    /// Ends, in `tx`, every session opened with one of these secrets (a roll, a delete or
    /// a disable of their key: a session never outlives the secret it was opened with
    /// being replaced or stopped, overlap or not).
    pub(super) async fn end_sessions_in(
        tx: &mut Tx,
        key_hashes: &[String],
    ) -> Result<u64, StoreError> {
        let mut ended = 0;
        for hash in key_hashes {
            ended += sqlx::query("DELETE FROM console_sessions WHERE key_hash = $1")
                .bind(hash)
                .execute(&mut **tx)
                .await?
                .rows_affected();
        }
        Ok(ended)
    }

    /// Stores a new session; also deletes every session idle since `stale_before_ms` or
    /// opened before `born_before_ms` (sign-ins are rare, so this keeps the table small).
    pub async fn open_session(
        &self,
        token_hash: &str,
        row: &SessionRow,
        stale_before_ms: i64,
        born_before_ms: i64,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM console_sessions WHERE last_seen_ms < $1 OR created_ms < $2")
            .bind(stale_before_ms)
            .bind(born_before_ms)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO console_sessions (token_hash, key_hash, csrf_token, created_ms, last_seen_ms) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(token_hash)
        .bind(&row.key_hash)
        .bind(&row.csrf_token)
        .bind(row.created_ms)
        .bind(row.last_seen_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn session(&self, token_hash: &str) -> Result<Option<SessionRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT key_hash, csrf_token, created_ms, last_seen_ms FROM console_sessions WHERE token_hash = $1",
        )
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Moves the session's last use forward to `now_ms`.
    pub async fn touch_session(&self, token_hash: &str, now_ms: i64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE console_sessions SET last_seen_ms = $2 WHERE token_hash = $1 AND last_seen_ms < $2",
        )
        .bind(token_hash)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Ends a session; whether there was one.
    pub async fn end_session(&self, token_hash: &str) -> Result<bool, StoreError> {
        Ok(
            sqlx::query("DELETE FROM console_sessions WHERE token_hash = $1")
                .bind(token_hash)
                .execute(&self.pool)
                .await?
                .rows_affected()
                > 0,
        )
    }
}

#[cfg(test)]
mod tests {
    use crate::db::rows::SessionRow;
    use crate::db::Store;

    fn row(key: &str, at: i64) -> SessionRow {
        SessionRow {
            key_hash: key.into(),
            csrf_token: format!("csrf-{key}"),
            created_ms: at,
            last_seen_ms: at,
        }
    }

    #[tokio::test]
    async fn sessions_open_touch_end_and_old_ones_go_at_the_next_sign_in() {
        let store = Store::memory().await;
        store
            .open_session("a", &row("k1", 1_000), 0, 0)
            .await
            .unwrap();
        store
            .open_session("b", &row("k2", 2_000), 0, 0)
            .await
            .unwrap();
        assert_eq!(store.session("a").await.unwrap(), Some(row("k1", 1_000)));
        store.touch_session("a", 5_000).await.unwrap();
        store.touch_session("a", 4_000).await.unwrap();
        assert_eq!(
            store.session("a").await.unwrap().unwrap().last_seen_ms,
            5_000,
            "never back"
        );
        // "b" idle since 2 000: gone when "c" opens with a cutoff of 3 000.
        store
            .open_session("c", &row("k3", 6_000), 3_000, 0)
            .await
            .unwrap();
        assert_eq!(store.session("b").await.unwrap(), None);
        assert!(store.session("a").await.unwrap().is_some());
        // "a" was opened at 1 000: gone past an absolute cutoff of 1 500.
        store
            .open_session("d", &row("k4", 7_000), 0, 1_500)
            .await
            .unwrap();
        assert_eq!(store.session("a").await.unwrap(), None);
        assert!(store.end_session("c").await.unwrap());
        assert!(!store.end_session("c").await.unwrap());
        assert_eq!(store.session("c").await.unwrap(), None);
    }
}
