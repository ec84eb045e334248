//! Which secrets are ours, and revoking one: the lookups of a leak report (many hashes
//! at once) and the end of a rolled-away secret reported as leaked. Deleting a key is in
//! `keys`; both record the revoked hashes here.

use std::collections::HashMap;

use super::rows::{AuditEntry, SecretOwner, StoredKey, Tx, KEY_COLUMNS};
use super::{Store, StoreError};
use crate::clock::now_ms;

/// Hashes per `IN (…)` list.
const CHUNK: usize = 500;

impl Store {
    /// Who owns each of `hashes` (hex); hashes that are not ours are absent.
    pub async fn secret_owners(
        &self,
        hashes: &[String],
    ) -> Result<HashMap<String, SecretOwner>, StoreError> {
        let mut owners = HashMap::new();
        for chunk in hashes.chunks(CHUNK) {
            let list = (1..=chunk.len())
                .map(|i| format!("${i}"))
                .collect::<Vec<_>>()
                .join(", ");
            let keys = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash IN ({list})");
            for key in bind_all(sqlx::query_as::<_, StoredKey>(&keys), chunk)
                .fetch_all(&self.pool)
                .await?
            {
                owners.insert(key.key_hash.clone(), SecretOwner::Current(key));
            }
            let columns = super::rows::key_columns_of("k");
            let rolled = format!(
                "SELECT r.key_hash AS secret_hash, {columns} FROM retired_secrets r \
                 JOIN api_keys k ON k.id = r.key_id WHERE r.key_hash IN ({list})"
            );
            for row in bind_all(sqlx::query_as::<_, RolledRow>(&rolled), chunk)
                .fetch_all(&self.pool)
                .await?
            {
                owners.insert(row.secret_hash, SecretOwner::RolledAway(row.key));
            }
            let revoked =
                format!("SELECT key_hash FROM revoked_secrets WHERE key_hash IN ({list})");
            let mut query = sqlx::query_scalar::<_, String>(&revoked);
            for hash in chunk {
                query = query.bind(hash);
            }
            for hash in query.fetch_all(&self.pool).await? {
                owners.entry(hash).or_insert(SecretOwner::Revoked);
            }
        }
        Ok(owners)
    }

    /// Ends a rolled-away secret at once (its KV record deleted, the hash recorded as
    /// revoked), with `audit`. The key and its current secret stay. `false`: no such
    /// secret (ended meanwhile).
    pub async fn end_rolled_away_secret(
        &self,
        hash: &str,
        audit: &AuditEntry,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        // The owning key's row lock first, as an update takes it before it reads the
        // key's rolled-away secrets: otherwise an update running meanwhile could put the
        // secret's record back into KV after this delete (PostgreSQL, READ COMMITTED).
        let owner: Option<StoredKey> = sqlx::query_as(&format!(
            "UPDATE api_keys SET name = name WHERE id IN \
             (SELECT key_id FROM retired_secrets WHERE key_hash = $1) RETURNING {KEY_COLUMNS}"
        ))
        .bind(hash)
        .fetch_optional(&mut *tx)
        .await?;
        let ended = sqlx::query("DELETE FROM retired_secrets WHERE key_hash = $1")
            .bind(hash)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if ended == 0 {
            return Ok(false);
        }
        let now = now_ms();
        if let Some(owner) = &owner {
            self.feed_refused(&mut tx, owner, &[hash]).await?;
        }
        self.enqueue_delete(&mut tx, hash, now).await?;
        Self::record_revoked(&mut tx, hash, now).await?;
        self.audit_in(&mut tx, audit).await?;
        self.commit_outbox(tx).await?;
        Ok(true)
    }

    /// A report of the secret `hash` that revokes nothing (notify mode): the first one is
    /// audited with `audit`, later ones only counted. True if this was the first.
    pub async fn note_leak(&self, hash: &str, audit: &AuditEntry) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let now = now_ms();
        let reports: i64 = sqlx::query_scalar(
            "INSERT INTO leak_notices (key_hash, first_at_ms, last_at_ms, reports) \
             VALUES ($1, $2, $2, 1) ON CONFLICT (key_hash) DO UPDATE \
             SET last_at_ms = excluded.last_at_ms, reports = leak_notices.reports + 1 \
             RETURNING reports",
        )
        .bind(hash)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let first = reports == 1;
        if first {
            self.audit_in(&mut tx, audit).await?;
        }
        tx.commit().await?;
        Ok(first)
    }

    /// Notes that the secret with this hash was ours and is revoked.
    pub(super) async fn record_revoked(
        tx: &mut Tx,
        hash: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO revoked_secrets (key_hash, revoked_at_ms) VALUES ($1, $2) \
             ON CONFLICT (key_hash) DO NOTHING",
        )
        .bind(hash)
        .bind(now)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

#[derive(sqlx::FromRow)]
struct RolledRow {
    secret_hash: String,
    #[sqlx(flatten)]
    key: StoredKey,
}

fn bind_all<'q, O>(
    mut query: sqlx::query::QueryAs<'q, sqlx::Any, O, sqlx::any::AnyArguments<'q>>,
    hashes: &'q [String],
) -> sqlx::query::QueryAs<'q, sqlx::Any, O, sqlx::any::AnyArguments<'q>> {
    for hash in hashes {
        query = query.bind(hash);
    }
    query
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use metlo_shared::KeyType;

    use super::*;
    use crate::db::keys::fixtures::{audit, key, roll};

    #[tokio::test]
    async fn owners_of_current_rolled_away_and_revoked_secrets() {
        let s = Store::memory().await;
        for name in ["a", "b", "gone"] {
            s.insert_key(&key(name, KeyType::Generic), 10, &audit("key.create", name))
                .await
                .unwrap();
        }
        let keys = s.list_keys(None).await.unwrap();
        let hash_of = |n: &str| keys.iter().find(|k| k.name == n).unwrap().key_hash.clone();
        let (a, gone) = (hash_of("a"), hash_of("gone"));
        let (_, rolled) = roll(&s, "b", Duration::from_secs(600)).await;
        let old_b = rolled.unwrap().retired[0].key_hash.clone();
        s.delete_key("gone", false, &audit("key.delete", "gone"))
            .await
            .unwrap();
        let stranger = "ab".repeat(32);
        let owners = s
            .secret_owners(&[a.clone(), old_b.clone(), gone.clone(), stranger.clone()])
            .await
            .unwrap();
        assert!(matches!(&owners[&a], SecretOwner::Current(k) if k.name == "a"));
        assert!(matches!(&owners[&old_b], SecretOwner::RolledAway(k) if k.name == "b"));
        assert_eq!(owners[&gone], SecretOwner::Revoked);
        assert!(!owners.contains_key(&stranger));

        assert!(s
            .end_rolled_away_secret(&old_b, &audit("key.leaked", "b"))
            .await
            .unwrap());
        assert!(!s
            .end_rolled_away_secret(&old_b, &audit("key.leaked", "b"))
            .await
            .unwrap());
        let owners = s.secret_owners(std::slice::from_ref(&old_b)).await.unwrap();
        assert_eq!(owners[&old_b], SecretOwner::Revoked);
        assert_eq!(s.list_keys(None).await.unwrap().len(), 2, "b itself stays");
    }

    /// Ending a rolled-away secret takes its key's row lock first, as an update does
    /// before it reads the key's rolled-away secrets: with an update holding it, the end
    /// waits (PostgreSQL; SQLite's one writer serializes them anyway). Otherwise the
    /// update could put the ended secret's record back into KV after the end's delete.
    #[tokio::test]
    async fn ending_a_rolled_away_secret_waits_for_an_update_of_its_key() {
        use crate::test_util::TestApp;
        let app = TestApp::on(crate::db::Backend::Postgres).build().await;
        let old = app.create_key("k", "GENERIC").await;
        let (status, body) = app
            .roll("k", Some(serde_json::json!({"overlapSeconds": 3600})))
            .await;
        assert_eq!(status, axum::http::StatusCode::OK, "{body}");
        let store = app.app().store().clone();
        // An update of the key, in progress: its row lock held.
        let mut update = store.pool.begin().await.unwrap();
        sqlx::query("UPDATE api_keys SET name = name WHERE name = 'k'")
            .execute(&mut *update)
            .await
            .unwrap();
        let hash = metlo_shared::KeyHash::of_text(&old).to_hex();
        let ending = tokio::spawn({
            let store = store.clone();
            async move {
                store
                    .end_rolled_away_secret(&hash, &audit("key.leaked", "k"))
                    .await
            }
        });
        // The end waits on the lock (seen by PostgreSQL), not done meanwhile.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&app.app().store().pool)
            .await
            .unwrap();
            if waiting > 0 {
                break;
            }
            assert!(!ending.is_finished(), "the end did not wait for the update");
            assert!(std::time::Instant::now() < deadline, "never waited");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!ending.is_finished());
        update.commit().await.unwrap();
        assert!(
            ending.await.unwrap().unwrap(),
            "ended once the update committed"
        );
    }
}
