//! The key store: one sqlx `Any` code path over Postgres (production) and SQLite (the
//! embedded default). Timestamps are integer milliseconds so both behave the same.
//!
//! One [`Store`] type; its SQL is split one file per aggregate: `keys` (keys, their
//! rolled-away secrets and the quota), `outbox` (KV updates waiting to be sent), `audit`
//! `usage`, `sessions` (the console's), and `kv_state` (what Workers KV should hold); the row types they share are in `rows`. Each file's tests run in-crate on
//! `sqlite::memory:`.

pub mod assertion_keys;
pub mod audit;
pub mod bulk;
pub mod feed;
pub mod identities;
pub mod key_updates;
pub mod keys;
#[cfg(test)]
mod keys_tests;
pub mod kv_state;
pub mod outbox;
pub mod policy;
pub mod revocations;
pub mod rows;
pub mod secrets;
pub mod sessions;
pub mod usage;

use std::path::Path;
use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::AnyPool;

use rows::Tx;

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// A PostgreSQL URL as libpq would read it, for sqlx: `sslmode=require` with an
/// `sslrootcert` checks the server's certificate against that CA in libpq (it then acts
/// as `verify-ca`), where sqlx would check nothing. Other URLs are returned as given.
pub fn libpq_compatible(url: &str) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return url.to_owned();
    };
    let Ok(mut pairs) = serde_urlencoded::from_str::<Vec<(String, String)>>(query) else {
        return url.to_owned();
    };
    let root_cert = pairs
        .iter()
        .any(|(k, _)| matches!(k.as_str(), "sslrootcert" | "ssl-root-cert" | "ssl-ca"));
    let mut changed = false;
    for (name, value) in &mut pairs {
        if matches!(name.as_str(), "sslmode" | "ssl-mode") && value == "require" && root_cert {
            *value = "verify-ca".to_owned();
            changed = true;
        }
    }
    match serde_urlencoded::to_string(&pairs) {
        Ok(query) if changed => format!("{base}?{query}"),
        _ => url.to_owned(),
    }
}

/// Whether a connection failed in TLS (a certificate refused, TLS required or refused).
fn tls_failure(e: &sqlx::Error) -> bool {
    let text = e.to_string();
    matches!(e, sqlx::Error::Tls(_))
        || ["certificate", "TLS", "SSL", "no encryption"]
            .iter()
            .any(|word| text.contains(word))
}

impl From<rows::CreditsRefused> for StoreError {
    fn from(refused: rows::CreditsRefused) -> Self {
        match refused {
            rows::CreditsRefused::NoCredits => StoreError::NoCredits,
            rows::CreditsRefused::TooMany => StoreError::TooManyCredits,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("an API key with this name already exists")]
    DuplicateName,
    #[error("maximum API key limit reached: {0}")]
    LimitReached(u64),
    /// Deleting this key would leave no key that can administer.
    #[error("this is the last admin key")]
    LastAdmin,
    /// Only a legacy key's role may be set.
    #[error("the key's role is already {0}")]
    RoleFixed(metlo_shared::Role),
    /// Permissions given to a key whose role does not serve traffic.
    #[error("permissions and credits are for client keys; a {0} key cannot carry them")]
    NoTraffic(metlo_shared::Role),
    #[error("this key has no credits to add to: set them first (PATCH with credits)")]
    NoCredits,
    #[error("credits granted would pass 1000000000000")]
    TooManyCredits,
    #[error("{0} keys belong to this identity: delete them first, or delete with ?cascade=true")]
    IdentityHasKeys(i64),
    #[error("the identity was deleted meanwhile")]
    IdentityGone,
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
            // Postgres shutting down / not accepting connections (class 57, 08), or SQLite's
            // writer lock still held after the busy timeout: overload, not a fault.
            sqlx::Error::Database(db) if db.code().is_some_and(|c| is_overload_code(&c)) => {
                StoreError::Unavailable(e)
            }
            _ => StoreError::Other(e),
        }
    }
}

/// Postgres SQLSTATE classes 57 (operator intervention) and 08 (connection exception);
/// SQLite's numeric result codes (at most four digits) whose primary code is SQLITE_BUSY
/// (5) or SQLITE_LOCKED (6).
fn is_overload_code(code: &str) -> bool {
    if code.len() == 5 {
        return code.starts_with("57") || code.starts_with("08");
    }
    code.parse::<u32>().is_ok_and(|c| matches!(c & 0xff, 5 | 6))
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
    /// Woken after every commit that wrote the outbox: this process's drainer.
    outbox_wake: Option<std::sync::Arc<tokio::sync::Notify>>,
    /// Woken after the same commits (they are the ones that feed): this process's
    /// revocation-feed reader.
    feed_wake: Option<std::sync::Arc<tokio::sync::Notify>>,
}

impl Store {
    /// Connects to `database_url`, or to `<data_dir>/metlo.db` (created if missing) when
    /// no URL is given. `busy_timeout`: how long an SQLite write waits for the writer lock
    /// before it fails as an overload (503).
    pub async fn connect(
        database_url: Option<&str>,
        data_dir: &Path,
        busy_timeout: Duration,
    ) -> anyhow::Result<Self> {
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
            Backend::Sqlite => options.after_connect(move |conn, _| {
                Box::pin(async move {
                    sqlx::query("PRAGMA journal_mode = WAL")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("PRAGMA synchronous = NORMAL")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query(&format!(
                        "PRAGMA busy_timeout = {}",
                        busy_timeout.as_millis()
                    ))
                    .execute(&mut *conn)
                    .await?;
                    Ok(())
                })
            }),
        };
        let pool = options
            .connect(&libpq_compatible(&url))
            .await
            .map_err(|e| {
                let hint = if tls_failure(&e) {
                    " (TLS: sslrootcert must name the CA that signed the server's certificate, \
                     and the URL's host must be a name in that certificate; sslmode=disable \
                     is refused by a server that only accepts TLS)"
                } else {
                    ""
                };
                anyhow::anyhow!("cannot connect to the database: {e}{hint}")
            })?;
        Ok(Store::from_pool(pool, backend))
    }

    fn from_pool(pool: AnyPool, backend: Backend) -> Self {
        Store {
            pool,
            backend,
            outbox: false,
            delete_echo_ms: 0,
            outbox_wake: None,
            feed_wake: None,
        }
    }

    /// A migrated SQLite database in memory, for in-crate tests: one connection (each
    /// `:memory:` connection would be a database of its own).
    #[cfg(test)]
    pub(crate) async fn memory() -> Self {
        sqlx::any::install_default_drivers();
        let pool = AnyPoolOptions::new()
            .max_connections(1)
            .connect("sqlite::memory:")
            .await
            .unwrap();
        let store = Store::from_pool(pool, Backend::Sqlite);
        store.migrate().await.unwrap();
        store
    }

    /// Turns on outbox writes (done when a KV target is configured). `delete_echo`: send
    /// every delete a second time after this long (zero: not at all).
    pub fn with_outbox(mut self, enabled: bool, delete_echo: Duration) -> Self {
        self.outbox = enabled;
        self.delete_echo_ms = delete_echo.as_millis() as i64;
        self
    }

    /// Wakes `reader` (this process's revocation-feed reader) after every commit that
    /// may have fed (other replicas' readers are woken by Postgres `NOTIFY`).
    pub fn with_feed_wake(mut self, reader: std::sync::Arc<tokio::sync::Notify>) -> Self {
        self.feed_wake = Some(reader);
        self
    }

    /// Wakes `drainer` after each commit that wrote the outbox (other replicas' drainers
    /// are woken by Postgres `NOTIFY`).
    pub fn with_outbox_wake(mut self, drainer: std::sync::Arc<tokio::sync::Notify>) -> Self {
        self.outbox_wake = Some(drainer);
        self
    }

    /// Commits a transaction that wrote the outbox, then wakes the drainer.
    async fn commit_outbox(&self, tx: Tx) -> Result<(), StoreError> {
        tx.commit().await?;
        for wake in [&self.outbox_wake, &self.feed_wake].into_iter().flatten() {
            wake.notify_one();
        }
        Ok(())
    }

    /// A PostgreSQL notification on `channel`, delivered when `tx` commits (PostgreSQL
    /// folds a transaction's identical notifications into one); nothing on SQLite, whose
    /// one process wakes its own readers after the commit.
    async fn notify_at_commit(&self, tx: &mut Tx, channel: &str) -> Result<(), StoreError> {
        if self.backend == Backend::Postgres {
            sqlx::query(&format!("SELECT pg_notify('{channel}', '')"))
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
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

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connects_to_a_file_in_the_data_dir_and_migrates_twice() {
        let dir = std::env::temp_dir().join(format!("metlo-db-test-{}", std::process::id()));
        let store = Store::connect(None, &dir, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(store.backend(), Backend::Sqlite);
        store.migrate().await.unwrap();
        store.migrate().await.unwrap();
        store.ping().await.unwrap();
        store.close().await;
        assert!(dir.join("metlo.db").exists());
        assert!(store.ping().await.is_err(), "closed");
        std::fs::remove_dir_all(&dir).unwrap();
        let err = Store::connect(Some("mysql://x"), &dir, Duration::from_secs(5))
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("DATABASE_URL must start with"));
    }

    #[tokio::test]
    async fn lists_by_type_have_their_paging_index() {
        let store = Store::memory().await;
        let columns: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM pragma_index_info('api_keys_by_type_created') ORDER BY seqno",
        )
        .fetch_all(&store.pool)
        .await
        .unwrap();
        assert_eq!(columns, ["key_type", "created_at_ms", "id"]);
    }

    #[test]
    fn require_with_a_root_certificate_checks_it_as_libpq_does() {
        assert_eq!(
            libpq_compatible("postgres://u@db/x?sslmode=require&sslrootcert=%2Fca.pem"),
            "postgres://u@db/x?sslmode=verify-ca&sslrootcert=%2Fca.pem"
        );
        for unchanged in [
            "postgres://u@db/x?sslmode=require",
            "postgres://u@db/x?sslmode=verify-full&sslrootcert=%2Fca.pem",
            "postgres://u@db/x",
            "sqlite:///data/metlo.db?mode=rwc",
        ] {
            assert_eq!(libpq_compatible(unchanged), unchanged);
        }
    }

    /// An upgrade: keys stored before roles existed become legacy keys, which keep every
    /// power (nobody is locked out) and still reach the edge.
    #[tokio::test]
    async fn keys_from_before_roles_become_legacy() {
        let dir = std::env::temp_dir().join(format!("metlo-pre-roles-{}", std::process::id()));
        let before = dir.join("migrations");
        std::fs::create_dir_all(&before).unwrap();
        let all = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite");
        for entry in std::fs::read_dir(&all).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_owned();
            if name.as_str() < "0005" {
                std::fs::copy(&path, before.join(name)).unwrap();
            }
        }
        let store = Store::connect(None, &dir, Duration::from_secs(5))
            .await
            .unwrap();
        sqlx::migrate::Migrator::new(before.as_path())
            .await
            .unwrap()
            .run(&store.pool)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO api_keys (name, key_hash, identifier, key_type, created_at_ms) \
             VALUES ('old', 'h', 'metlo.old', 'GENERIC', 1)",
        )
        .execute(&store.pool)
        .await
        .unwrap();
        store.migrate().await.unwrap();
        let keys = store.list_keys(None).await.unwrap();
        assert_eq!(keys[0].role, metlo_shared::Role::Legacy);
        assert!(keys[0].record().role.serves_traffic() && keys[0].role.administers());
        assert_eq!(store.count_legacy().await.unwrap(), 1);
        // Once migrated, a row without a role is refused, not given every power (0017:
        // SQLite keeps 0005's DEFAULT 'legacy').
        let refused = sqlx::query(
            "INSERT INTO api_keys (name, key_hash, identifier, key_type, created_at_ms) \
             VALUES ('new', 'h2', 'metlo.new', 'GENERIC', 2)",
        )
        .execute(&store.pool)
        .await
        .unwrap_err();
        assert!(refused.to_string().contains("needs a role"), "{refused}");
        store.close().await;
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn overload_codes_are_told_apart_from_faults() {
        for code in ["57P01", "08006", "5", "517", "6", "262"] {
            assert!(is_overload_code(code), "{code}");
        }
        for code in ["23505", "42P01", "1", "19", "2067", "11"] {
            assert!(!is_overload_code(code), "{code}");
        }
    }

    #[tokio::test]
    async fn memory_store_answers() {
        Store::memory().await.ping().await.unwrap();
    }
}
