//! The route policy's versions: each change a new row, written with its revocation-feed
//! event (which carries it to the edge) and its KV entry (what a Worker reads when the
//! feed cannot be), in one transaction.

use super::rows::{AuditEntry, PolicyRow, Tx};
use super::{Store, StoreError};
use crate::clock::now_ms;

/// The KV key of the policy's entry. Hashes are 64 hex characters, so it never meets one;
/// it sorts after every hash, so KV's listing gives it last.
pub const POLICY_KV_KEY: &str = "policy";

const POLICY_COLUMNS: &str = "version, document, lines, created_at_ms, actor, feed_seq";

impl Store {
    /// The current policy; `None`: none was ever set.
    pub async fn current_policy(&self) -> Result<Option<PolicyRow>, StoreError> {
        Ok(sqlx::query_as(&format!(
            "SELECT {POLICY_COLUMNS} FROM route_policy ORDER BY version DESC LIMIT 1"
        ))
        .fetch_optional(&self.pool)
        .await?)
    }

    /// One version of the policy.
    pub async fn policy_version(&self, version: i64) -> Result<Option<PolicyRow>, StoreError> {
        Ok(sqlx::query_as(&format!(
            "SELECT {POLICY_COLUMNS} FROM route_policy WHERE version = $1"
        ))
        .bind(version)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Sets a new version of the policy (`document` and `lines` made for version
    /// `expected + 1`), unless the current version is no longer `expected` (then
    /// `Ok(Err(current))`). `lines` must start with that version: the caller makes them.
    pub async fn replace_policy(
        &self,
        expected: i64,
        document: &str,
        lines: &str,
        audit: &AuditEntry,
    ) -> Result<Result<PolicyRow, i64>, StoreError> {
        let mut tx = self.pool.begin().await?;
        // The feed's counter row, locked until the commit, also serialises policy writers:
        // the version is read under it.
        let feed_seq = self.feed_policy(&mut tx, lines).await?;
        let current: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM route_policy")
            .fetch_one(&mut *tx)
            .await?;
        if current != expected {
            return Ok(Err(current));
        }
        let row = PolicyRow {
            version: expected + 1,
            document: document.to_owned(),
            lines: lines.to_owned(),
            created_at_ms: now_ms(),
            actor: audit.actor.clone(),
            feed_seq,
        };
        sqlx::query(&format!(
            "INSERT INTO route_policy ({POLICY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6)"
        ))
        .bind(row.version)
        .bind(&row.document)
        .bind(&row.lines)
        .bind(row.created_at_ms)
        .bind(&row.actor)
        .bind(row.feed_seq)
        .execute(&mut *tx)
        .await?;
        self.enqueue(&mut tx, POLICY_KV_KEY, Some(row.lines.clone()), 0)
            .await?;
        self.audit_in(&mut tx, audit).await?;
        self.commit_outbox(tx).await?;
        Ok(Ok(row))
    }

    /// The KV entry of the current policy, if there is one (for the resync and the
    /// reconcile, which compare KV with what it should hold).
    pub(super) async fn policy_kv_value(&self) -> Result<Option<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT lines FROM route_policy ORDER BY version DESC LIMIT 1")
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// Feeds a new policy (`lines`) to the edge; the event's number.
    async fn feed_policy(&self, tx: &mut Tx, lines: &str) -> Result<i64, StoreError> {
        self.feed_in(tx, POLICY_FEED_HASH, Some(lines)).await
    }
}

/// What a policy's feed row holds in place of a hash: the reader serves it as the page's
/// `policy`, never as an event.
pub const POLICY_FEED_HASH: &str = "policy";
