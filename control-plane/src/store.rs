//! The key store: one sqlx `Any` code path over Postgres (production) and SQLite (the
//! embedded default). Timestamps are integer milliseconds so both behave the same.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use metlo_shared::{KeyHash, KeyType};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("an API key with this name already exists")]
    DuplicateName,
    #[error("maximum API key limit reached: {0}")]
    LimitReached(u64),
    /// The database could not be reached (down, pool exhausted, timed out): retryable.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("database error: {0}")]
    Other(#[source] sqlx::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::DuplicateName,
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e),
            // Postgres shutting down / not accepting connections (class 57, 08).
            sqlx::Error::Database(db)
                if db
                    .code()
                    .is_some_and(|c| c.starts_with("57") || c.starts_with("08")) =>
            {
                StoreError::Unavailable(e)
            }
            _ => StoreError::Other(e),
        }
    }
}

/// A stored key: everything but the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    pub name: String,
    pub key_hash: String,
    pub identifier: String,
    pub key_type: KeyType,
    pub created_at_ms: i64,
}

impl StoredKey {
    fn from_row(row: &AnyRow) -> Result<Self, sqlx::Error> {
        let key_type: String = row.try_get("key_type")?;
        Ok(StoredKey {
            name: row.try_get("name")?,
            key_hash: row.try_get("key_hash")?,
            identifier: row.try_get("identifier")?,
            key_type: KeyType::from_str(&key_type).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
            created_at_ms: row.try_get("created_at_ms")?,
        })
    }
}

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// Write KV updates to the outbox (only when a KV target is configured: otherwise
    /// nothing would ever drain it).
    outbox: bool,
    /// Every KV delete is sent again this long after the first (0: never).
    delete_echo_ms: i64,
}

/// Postgres channel the outbox writers notify, so every replica's drainer wakes at once.
pub const OUTBOX_CHANNEL: &str = "metlo_kv_outbox";

/// One pending KV update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    pub id: i64,
    pub kv_key: String,
    /// `Some(record JSON)`: put; `None`: delete.
    pub value: Option<String>,
}

/// Rows claimed by one drainer. On Postgres they stay locked (`FOR UPDATE SKIP LOCKED`)
/// until [`Store::finish_claim`], so no other replica sends them meanwhile.
pub struct Claim {
    tx: Option<sqlx::Transaction<'static, sqlx::Any>>,
    pub rows: Vec<OutboxRow>,
}

const KEY_COLUMNS: &str = "name, key_hash, identifier, key_type, created_at_ms";

impl Store {
    /// Connects to `database_url`, or to `<data_dir>/metlo.db` (created if missing) when
    /// no URL is given.
    pub async fn connect(database_url: Option<&str>, data_dir: &Path) -> anyhow::Result<Self> {
        sqlx::any::install_default_drivers();
        let url = match database_url {
            Some(url) => url.to_owned(),
            None => {
                std::fs::create_dir_all(data_dir).map_err(|e| {
                    anyhow::anyhow!("cannot create data dir {}: {e}", data_dir.display())
                })?;
                format!("sqlite://{}?mode=rwc", data_dir.join("metlo.db").display())
            }
        };
        let backend = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            anyhow::bail!("DATABASE_URL must start with postgres://, postgresql:// or sqlite:");
        };
        let options = AnyPoolOptions::new()
            // Short: when the database is down or saturated, a quick 503 + Retry-After beats
            // holding the client (and a connection slot) for seconds.
            .acquire_timeout(Duration::from_secs(1))
            .max_connections(match backend {
                Backend::Postgres => 16,
                // SQLite has one writer; a few connections serve concurrent reads in WAL mode.
                Backend::Sqlite => 4,
            });
        let options = match backend {
            Backend::Postgres => options,
            Backend::Sqlite => options.after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::query("PRAGMA journal_mode = WAL")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("PRAGMA synchronous = NORMAL")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("PRAGMA busy_timeout = 10000")
                        .execute(&mut *conn)
                        .await?;
                    Ok(())
                })
            }),
        };
        let pool = options
            .connect(&url)
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to the database: {e}"))?;
        Ok(Store {
            pool,
            backend,
            outbox: false,
            delete_echo_ms: 0,
        })
    }

    /// Turns on outbox writes (done when a KV target is configured). `delete_echo`: send
    /// every delete a second time after this long (zero: not at all).
    pub fn with_outbox(mut self, enabled: bool, delete_echo: Duration) -> Self {
        self.outbox = enabled;
        self.delete_echo_ms = delete_echo.as_millis() as i64;
        self
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub async fn migrate(&self) -> anyhow::Result<()> {
        let migrator = match self.backend {
            Backend::Postgres => &POSTGRES_MIGRATIONS,
            Backend::Sqlite => &SQLITE_MIGRATIONS,
        };
        migrator.run(&self.pool).await?;
        Ok(())
    }

    /// Is the database answering?
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Inserts a key unless its name is taken or `max_keys` are stored. The quota row is
    /// locked first, so concurrent creates are serialized and the limit is exact.
    pub async fn insert_key(&self, key: &StoredKey, max_keys: u64) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let reserved =
            sqlx::query("UPDATE key_quota SET used = used + 1 WHERE id = 1 AND used < $1")
                .bind(i64::try_from(max_keys).unwrap_or(i64::MAX))
                .execute(&mut *tx)
                .await?
                .rows_affected();
        if reserved == 0 {
            return Err(StoreError::LimitReached(max_keys));
        }
        sqlx::query(
            "INSERT INTO api_keys (name, key_hash, identifier, key_type, created_at_ms) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&key.name)
        .bind(&key.key_hash)
        .bind(&key.identifier)
        .bind(key.key_type.as_str())
        .bind(key.created_at_ms)
        .execute(&mut *tx)
        .await?;
        self.enqueue(&mut tx, &key.key_hash, Some(key.record().to_json()), 0)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Adds a KV update to the outbox inside the caller's transaction, to be sent at once
    /// or not before `not_before_ms` (ms since the epoch).
    async fn enqueue(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        kv_key: &str,
        value: Option<String>,
        not_before_ms: i64,
    ) -> Result<(), StoreError> {
        if !self.outbox {
            return Ok(());
        }
        let op = if value.is_some() { "put" } else { "delete" };
        sqlx::query(
            "INSERT INTO kv_outbox (kv_key, op, value, created_at_ms, not_before_ms) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(kv_key)
        .bind(op)
        .bind(value)
        .bind(chrono::Utc::now().timestamp_millis())
        .bind(not_before_ms)
        .execute(&mut **tx)
        .await?;
        if self.backend == Backend::Postgres {
            // Delivered at commit: wakes the drainers of every replica.
            sqlx::query(&format!("SELECT pg_notify('{OUTBOX_CHANNEL}', '')"))
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    /// Claims up to `limit` due updates, oldest first. Rows whose key has an older
    /// pending update (held by another drainer, or not due yet) are left for later, so
    /// updates of one key are always sent in order (a delete is never overtaken by its put).
    pub async fn claim_outbox(&self, limit: i64) -> Result<Claim, StoreError> {
        let columns = "id, kv_key, value";
        let now = chrono::Utc::now().timestamp_millis();
        match self.backend {
            Backend::Sqlite => {
                // One process owns an SQLite file: no other drainer to race with.
                let rows = sqlx::query(&format!(
                    "SELECT {columns} FROM kv_outbox WHERE not_before_ms <= $1 ORDER BY id LIMIT $2"
                ))
                .bind(now)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
                Ok(Claim {
                    tx: None,
                    rows: rows.iter().map(outbox_row).collect::<Result<_, _>>()?,
                })
            }
            Backend::Postgres => {
                let mut tx = self.pool.begin().await?;
                let rows = sqlx::query(&format!(
                    "SELECT {columns} FROM kv_outbox WHERE not_before_ms <= $1 ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED"
                ))
                .bind(now)
                .bind(limit)
                .fetch_all(&mut *tx)
                .await?;
                let mut rows: Vec<OutboxRow> =
                    rows.iter().map(outbox_row).collect::<Result<_, _>>()?;
                if !rows.is_empty() {
                    let mut keys: Vec<&str> = rows.iter().map(|r| r.kv_key.as_str()).collect();
                    keys.sort_unstable();
                    keys.dedup();
                    let placeholders: Vec<String> =
                        (1..=keys.len()).map(|i| format!("${i}")).collect();
                    let sql = format!(
                        "SELECT kv_key, MIN(id) AS first FROM kv_outbox WHERE kv_key IN ({}) GROUP BY kv_key",
                        placeholders.join(", ")
                    );
                    let mut q = sqlx::query(&sql);
                    for k in &keys {
                        q = q.bind(*k);
                    }
                    let firsts: Vec<(String, i64)> = q
                        .fetch_all(&mut *tx)
                        .await?
                        .iter()
                        .map(|r| Ok((r.try_get("kv_key")?, r.try_get("first")?)))
                        .collect::<Result<_, sqlx::Error>>()?;
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

    /// Ends a claim: on success the sent rows are deleted; on failure they stay, with the
    /// attempt counted and the error recorded. Locks are released either way.
    pub async fn finish_claim(
        &self,
        claim: Claim,
        outcome: Result<(), &str>,
    ) -> Result<(), StoreError> {
        let Claim { tx, rows } = claim;
        if rows.is_empty() {
            if let Some(tx) = tx {
                tx.rollback().await?;
            }
            return Ok(());
        }
        let list = |first: usize| {
            (first..first + rows.len())
                .map(|i| format!("${i}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (sql, error) = match outcome {
            Ok(()) => (format!("DELETE FROM kv_outbox WHERE id IN ({})", list(1)), None),
            Err(e) => (
                format!("UPDATE kv_outbox SET attempts = attempts + 1, last_error = $1 WHERE id IN ({})", list(2)),
                Some(e.chars().take(500).collect::<String>()),
            ),
        };
        let mut q = sqlx::query(&sql);
        if let Some(e) = error {
            q = q.bind(e);
        }
        for r in &rows {
            q = q.bind(r.id);
        }
        match tx {
            Some(mut tx) => {
                q.execute(&mut *tx).await?;
                tx.commit().await?;
            }
            None => {
                q.execute(&self.pool).await?;
            }
        }
        Ok(())
    }

    /// Due updates and since when the oldest has been due, for metrics and readiness.
    pub async fn outbox_depth(&self) -> Result<(i64, Option<i64>), StoreError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS depth, \
             MIN(CASE WHEN not_before_ms > created_at_ms THEN not_before_ms ELSE created_at_ms END) AS oldest \
             FROM kv_outbox WHERE not_before_ms <= $1",
        )
        .bind(chrono::Utc::now().timestamp_millis())
        .fetch_one(&self.pool)
        .await?;
        Ok((row.try_get("depth")?, row.try_get("oldest")?))
    }

    /// All keys, or those of one type; newest first.
    pub async fn list_keys(&self, only: Option<KeyType>) -> Result<Vec<StoredKey>, StoreError> {
        let rows = match only {
            None => {
                sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at_ms DESC, id DESC"))
                    .fetch_all(&self.pool)
                    .await?
            }
            Some(t) => {
                sqlx::query(&format!(
                    "SELECT {KEY_COLUMNS} FROM api_keys WHERE key_type = $1 ORDER BY created_at_ms DESC, id DESC"
                ))
                .bind(t.as_str())
                .fetch_all(&self.pool)
                .await?
            }
        };
        Ok(rows
            .iter()
            .map(StoredKey::from_row)
            .collect::<Result<_, _>>()?)
    }

    pub async fn find_by_hash(&self, hash: &KeyHash) -> Result<Option<StoredKey>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = $1"
        ))
        .bind(hash.to_hex())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(StoredKey::from_row).transpose()?)
    }

    /// Deletes a key by name; returns it, or `None` if there was no such key.
    pub async fn delete_key(&self, name: &str) -> Result<Option<StoredKey>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(&format!(
            "DELETE FROM api_keys WHERE name = $1 RETURNING {KEY_COLUMNS}"
        ))
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let deleted = StoredKey::from_row(&row)?;
        sqlx::query("UPDATE key_quota SET used = used - 1 WHERE id = 1")
            .execute(&mut *tx)
            .await?;
        self.enqueue(&mut tx, &deleted.key_hash, None, 0).await?;
        if self.delete_echo_ms > 0 {
            let echo_at = chrono::Utc::now().timestamp_millis() + self.delete_echo_ms;
            self.enqueue(&mut tx, &deleted.key_hash, None, echo_at)
                .await?;
        }
        tx.commit().await?;
        Ok(Some(deleted))
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn outbox_row(row: &AnyRow) -> Result<OutboxRow, sqlx::Error> {
    Ok(OutboxRow {
        id: row.try_get("id")?,
        kv_key: row.try_get("kv_key")?,
        value: row.try_get("value")?,
    })
}
