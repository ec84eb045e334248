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
                if db.code().is_some_and(|c| c.starts_with("57") || c.starts_with("08")) =>
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
                std::fs::create_dir_all(data_dir)
                    .map_err(|e| anyhow::anyhow!("cannot create data dir {}: {e}", data_dir.display()))?;
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
            .acquire_timeout(Duration::from_secs(3))
            .max_connections(match backend {
                Backend::Postgres => 16,
                // SQLite has one writer; a few connections serve concurrent reads in WAL mode.
                Backend::Sqlite => 4,
            });
        let options = match backend {
            Backend::Postgres => options,
            Backend::Sqlite => options.after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::query("PRAGMA journal_mode = WAL").execute(&mut *conn).await?;
                    sqlx::query("PRAGMA synchronous = NORMAL").execute(&mut *conn).await?;
                    sqlx::query("PRAGMA busy_timeout = 10000").execute(&mut *conn).await?;
                    Ok(())
                })
            }),
        };
        let pool = options
            .connect(&url)
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to the database: {e}"))?;
        Ok(Store { pool, backend })
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
        let reserved = sqlx::query("UPDATE key_quota SET used = used + 1 WHERE id = 1 AND used < $1")
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
        tx.commit().await?;
        Ok(())
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
        Ok(rows.iter().map(StoredKey::from_row).collect::<Result<_, _>>()?)
    }

    pub async fn find_by_hash(&self, hash: &KeyHash) -> Result<Option<StoredKey>, StoreError> {
        let row = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = $1"))
            .bind(hash.to_hex())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(StoredKey::from_row).transpose()?)
    }

    /// Deletes a key by name; returns it, or `None` if there was no such key.
    pub async fn delete_key(&self, name: &str) -> Result<Option<StoredKey>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(&format!("DELETE FROM api_keys WHERE name = $1 RETURNING {KEY_COLUMNS}"))
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let deleted = StoredKey::from_row(&row)?;
        sqlx::query("UPDATE key_quota SET used = used - 1 WHERE id = 1").execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(Some(deleted))
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}
