//! The audit log: appended in the transaction of the change it records, or in batches
//! (failed authentications); read newest first; pruned past its retention.

use super::rows::{AuditEntry, AuditFilter, AuditRow, Tx};
use super::{Store, StoreError};
use crate::clock::now_ms;

impl Store {
    pub(super) async fn audit_in(&self, tx: &mut Tx, entry: &AuditEntry) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO audit_log (at_ms, actor, action, target, ip, detail) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(now_ms())
        .bind(&entry.actor)
        .bind(entry.action)
        .bind(&entry.target)
        .bind(&entry.ip)
        .bind(entry.detail.to_string())
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Appends audit entries (failed authentications, batched) in one transaction.
    pub async fn append_audit(&self, entries: &[AuditEntry]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for entry in entries {
            self.audit_in(&mut tx, entry).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Deletes up to `limit` audit rows older than `before_ms` (oldest first); returns how
    /// many. Bounded so one statement never holds the table (or SQLite's writer lock) for
    /// long: the caller repeats it until fewer than `limit` go.
    pub async fn prune_audit(&self, before_ms: i64, limit: i64) -> Result<u64, StoreError> {
        Ok(sqlx::query(
            "DELETE FROM audit_log WHERE id IN \
             (SELECT id FROM audit_log WHERE at_ms < $1 ORDER BY at_ms LIMIT $2)",
        )
        .bind(before_ms)
        .bind(limit)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// Audit rows, newest first, with ids below `before` when given, that pass `filter`
    /// (an index each: `(action, id)`, `(actor, id)`).
    pub async fn list_audit(
        &self,
        limit: i64,
        before: Option<i64>,
        filter: &AuditFilter,
    ) -> Result<Vec<AuditRow>, StoreError> {
        let mut sql = String::from(
            "SELECT id, at_ms, actor, action, target, ip, detail FROM audit_log WHERE id < $1",
        );
        let mut n = 1;
        for (column, value) in [("action", &filter.action), ("actor", &filter.actor)] {
            if value.is_some() {
                n += 1;
                sql.push_str(&format!(" AND {column} = ${n}"));
            }
        }
        sql.push_str(&format!(" ORDER BY id DESC LIMIT ${}", n + 1));
        let mut q = sqlx::query_as(&sql).bind(before.unwrap_or(i64::MAX));
        for value in [&filter.action, &filter.actor].into_iter().flatten() {
            q = q.bind(value);
        }
        Ok(q.bind(limit).fetch_all(&self.pool).await?)
    }

    /// Bytes the audit log takes on disk, its indexes included (for the tests' figures).
    #[cfg(test)]
    pub async fn audit_bytes(&self) -> Result<i64, StoreError> {
        let sql = match self.backend {
            super::Backend::Postgres => "SELECT pg_total_relation_size('audit_log')::BIGINT",
            super::Backend::Sqlite => {
                "SELECT CAST(COALESCE(SUM(pgsize), 0) AS BIGINT) FROM dbstat \
                 WHERE name IN (SELECT name FROM sqlite_master WHERE tbl_name = 'audit_log')"
            }
        };
        Ok(sqlx::query_scalar(sql).fetch_one(&self.pool).await?)
    }
}

#[cfg(test)]
mod tests {
    use metlo_shared::KeyType;

    use crate::clock::now_ms;
    use crate::db::keys::fixtures::{audit, key};
    use crate::db::rows::AuditFilter;
    use crate::db::Store;

    /// Retention deletes by `at_ms`: through an index, not a scan.
    #[tokio::test]
    async fn retention_deletes_through_an_index() {
        let store = Store::memory().await;
        let plan: Vec<(i64, i64, i64, String)> = sqlx::query_as(
            "EXPLAIN QUERY PLAN SELECT id FROM audit_log WHERE at_ms < 5 ORDER BY at_ms LIMIT 10",
        )
        .fetch_all(&store.pool)
        .await
        .unwrap();
        let plan: Vec<&str> = plan.iter().map(|r| r.3.as_str()).collect();
        assert!(
            plan.iter()
                .any(|step| step.contains("USING INDEX audit_log_by_time")
                    || step.contains("USING COVERING INDEX audit_log_by_time")),
            "{plan:?}"
        );
    }

    #[tokio::test]
    async fn entries_are_appended_paged_newest_first_and_pruned() {
        let store = Store::memory().await;
        // One written with a change, in its transaction; two appended in a batch.
        store
            .insert_key(&key("k", KeyType::Generic), 10, &audit("key.create", "k"))
            .await
            .unwrap();
        store
            .append_audit(&[audit("auth.failed", "x"), audit("auth.failed", "y")])
            .await
            .unwrap();
        let all = store
            .list_audit(10, None, &AuditFilter::default())
            .await
            .unwrap();
        assert_eq!(
            all.iter()
                .map(|r| r.target.as_deref().unwrap())
                .collect::<Vec<_>>(),
            ["y", "x", "k"]
        );
        assert_eq!(all[2].action, "key.create");
        assert_eq!(all[2].actor.as_deref(), Some("tester"));
        assert_eq!(all[2].detail, "{}");
        let page = store
            .list_audit(1, Some(all[0].id), &AuditFilter::default())
            .await
            .unwrap();
        assert_eq!(page.len(), 1);
        assert_eq!(page[0].id, all[1].id);
        let only = |action: Option<&str>, actor: Option<&str>| AuditFilter {
            action: action.map(str::to_owned),
            actor: actor.map(str::to_owned),
        };
        let targets = |rows: Vec<crate::db::rows::AuditRow>| {
            rows.into_iter()
                .map(|r| r.target.unwrap())
                .collect::<Vec<_>>()
        };
        let failed = store
            .list_audit(10, None, &only(Some("auth.failed"), None))
            .await
            .unwrap();
        assert_eq!(targets(failed), ["y", "x"]);
        let failed = store
            .list_audit(10, Some(all[0].id), &only(Some("auth.failed"), None))
            .await
            .unwrap();
        assert_eq!(targets(failed), ["x"], "filtered and paged");
        let by_tester = store
            .list_audit(10, None, &only(None, Some("tester")))
            .await
            .unwrap();
        assert_eq!(targets(by_tester).len(), 3);
        let none = store
            .list_audit(10, None, &only(Some("key.create"), Some("someone else")))
            .await
            .unwrap();
        assert!(none.is_empty(), "both filters apply");
        assert_eq!(store.prune_audit(now_ms() - 60_000, 10).await.unwrap(), 0);
        assert_eq!(
            store.prune_audit(now_ms() + 1, 2).await.unwrap(),
            2,
            "bounded"
        );
        assert_eq!(store.prune_audit(now_ms() + 1, 2).await.unwrap(), 1);
        assert!(store
            .list_audit(10, None, &AuditFilter::default())
            .await
            .unwrap()
            .is_empty());
    }
}
