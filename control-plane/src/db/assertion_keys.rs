//! The edge's assertion-signing keys (their public halves): made, listed, retired.

use super::rows::{AssertionKeyRow, AuditEntry};
use super::{Store, StoreError};

const COLUMNS: &str = "kid, alg, public_jwk, created_at_ms, retired_at_ms";

impl Store {
    /// Stores a new key's public half, unless `max_published` are published already
    /// (`Ok(None)`); when it was made (ms): `row`'s time, or just after the last key's, so
    /// the newest is always the last made.
    pub async fn insert_assertion_key(
        &self,
        row: &AssertionKeyRow,
        max_published: i64,
        audit: &AuditEntry,
    ) -> Result<Option<i64>, StoreError> {
        let mut tx = self.pool.begin().await?;
        // Serialises makers with each other (the count is read under the lock).
        sqlx::query("UPDATE key_quota SET used = used WHERE id = 1")
            .execute(&mut *tx)
            .await?;
        let published: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM assertion_keys WHERE retired_at_ms IS NULL")
                .fetch_one(&mut *tx)
                .await?;
        if published >= max_published {
            return Ok(None);
        }
        let last: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(created_at_ms), 0) FROM assertion_keys")
                .fetch_one(&mut *tx)
                .await?;
        let created_at_ms = row.created_at_ms.max(last + 1);
        sqlx::query(&format!(
            "INSERT INTO assertion_keys ({COLUMNS}) VALUES ($1, $2, $3, $4, $5)"
        ))
        .bind(&row.kid)
        .bind(&row.alg)
        .bind(&row.public_jwk)
        .bind(created_at_ms)
        .bind(row.retired_at_ms)
        .execute(&mut *tx)
        .await?;
        self.audit_in(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(Some(created_at_ms))
    }

    /// Every key, newest first (retired ones too).
    pub async fn assertion_keys(&self) -> Result<Vec<AssertionKeyRow>, StoreError> {
        Ok(sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM assertion_keys ORDER BY created_at_ms DESC, kid DESC"
        ))
        .fetch_all(&self.pool)
        .await?)
    }

    /// Retires the key `kid` at `now_ms` (once); the row as it is now, `None`: no such key.
    pub async fn retire_assertion_key(
        &self,
        kid: &str,
        now_ms: i64,
        audit: &AuditEntry,
    ) -> Result<Option<AssertionKeyRow>, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE assertion_keys SET retired_at_ms = $1 WHERE kid = $2 AND retired_at_ms IS NULL",
        )
        .bind(now_ms)
        .bind(kid)
        .execute(&mut *tx)
        .await?;
        let row: Option<AssertionKeyRow> = sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM assertion_keys WHERE kid = $1"
        ))
        .bind(kid)
        .fetch_optional(&mut *tx)
        .await?;
        if row.is_some() {
            self.audit_in(&mut tx, audit).await?;
        }
        tx.commit().await?;
        Ok(row)
    }
}
