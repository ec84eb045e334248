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

/// A stored key: everything but the secret. (Looked up by a rolled-away secret, it
/// carries that secret's hash and identifier, and expires when its overlap ends.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    pub id: i64,
    pub name: String,
    pub key_hash: String,
    pub identifier: String,
    pub key_type: KeyType,
    pub created_at_ms: i64,
    /// Whole seconds (in ms); `None`: never expires.
    pub expires_at_ms: Option<i64>,
    pub last_used_ms: Option<i64>,
}

impl StoredKey {
    fn from_row(row: &AnyRow) -> Result<Self, sqlx::Error> {
        let key_type: String = row.try_get("key_type")?;
        Ok(StoredKey {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            key_hash: row.try_get("key_hash")?,
            identifier: row.try_get("identifier")?,
            key_type: KeyType::from_str(&key_type).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
            created_at_ms: row.try_get("created_at_ms")?,
            expires_at_ms: row.try_get("expires_at_ms")?,
            last_used_ms: row.try_get("last_used_ms")?,
        })
    }
}

/// One audit-log entry. Never holds a secret.
#[derive(Debug, Clone)]
pub struct AuditEntry {
    /// The calling key's name; `None`: unauthenticated, or the local CLI.
    pub actor: Option<String>,
    /// `key.create`, `key.delete`, `key.roll` or `auth.failed`.
    pub action: &'static str,
    /// The key acted on.
    pub target: Option<String>,
    pub ip: Option<String>,
    pub detail: serde_json::Value,
}

/// A stored audit-log row.
#[derive(Debug, Clone)]
pub struct AuditRow {
    pub id: i64,
    pub at_ms: i64,
    pub actor: Option<String>,
    pub action: String,
    pub target: Option<String>,
    pub ip: Option<String>,
    /// A JSON object.
    pub detail: String,
}

/// A secret that a roll replaced, and when it stops working (ms; at or before the roll's
/// time: at once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetiredSecret {
    pub key_hash: String,
    pub identifier: String,
    pub retires_at_ms: i64,
}

/// The outcome of a roll: the key with its new secret's hash, and every older secret
/// whose end changed.
#[derive(Debug, Clone)]
pub struct Rolled {
    pub key: StoredKey,
    pub retired: Vec<RetiredSecret>,
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

const KEY_COLUMNS: &str =
    "id, name, key_hash, identifier, key_type, created_at_ms, expires_at_ms, last_used_ms";

/// `ms` rounded up to a whole second (record expiries are whole seconds, so the edge and
/// the control plane agree to the millisecond on when a secret stops working).
pub fn ceil_to_second(ms: i64) -> i64 {
    ms.div_euclid(1000) * 1000 + if ms.rem_euclid(1000) == 0 { 0 } else { 1000 }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

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
            outbox_wake: None,
        })
    }

    /// Turns on outbox writes (done when a KV target is configured). `delete_echo`: send
    /// every delete a second time after this long (zero: not at all).
    pub fn with_outbox(mut self, enabled: bool, delete_echo: Duration) -> Self {
        self.outbox = enabled;
        self.delete_echo_ms = delete_echo.as_millis() as i64;
        self
    }

    /// Wakes `drainer` after each commit that wrote the outbox (other replicas' drainers
    /// are woken by Postgres `NOTIFY`).
    pub fn with_outbox_wake(mut self, drainer: std::sync::Arc<tokio::sync::Notify>) -> Self {
        self.outbox_wake = Some(drainer);
        self
    }

    /// Commits a transaction that wrote the outbox, then wakes the drainer.
    async fn commit_outbox(
        &self,
        tx: sqlx::Transaction<'static, sqlx::Any>,
    ) -> Result<(), StoreError> {
        tx.commit().await?;
        if let Some(wake) = &self.outbox_wake {
            wake.notify_one();
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

    /// Inserts a key unless its name is taken or `max_keys` are stored. The quota row is
    /// locked first, so concurrent creates are serialized and the limit is exact.
    /// Stores a new key (its `id` is assigned here), with its KV put and audit row.
    pub async fn insert_key(
        &self,
        key: &StoredKey,
        max_keys: u64,
        audit: &AuditEntry,
    ) -> Result<(), StoreError> {
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
            "INSERT INTO api_keys (name, key_hash, identifier, key_type, created_at_ms, expires_at_ms) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&key.name)
        .bind(&key.key_hash)
        .bind(&key.identifier)
        .bind(key.key_type.as_str())
        .bind(key.created_at_ms)
        .bind(key.expires_at_ms)
        .execute(&mut *tx)
        .await?;
        self.enqueue(&mut tx, &key.key_hash, Some(key.record().to_json()), 0)
            .await?;
        self.audit_in(&mut tx, audit).await?;
        self.commit_outbox(tx).await?;
        Ok(())
    }

    /// Gives the key `name` a new secret (`new_hash`, `new_identifier`). Its previous
    /// secret keeps working for `overlap` (its end rounded up to a whole second; zero: it
    /// stops at once), and every older secret still in an overlap stops no later than
    /// that — so a roll with no overlap ends every old secret. `None`: no such key.
    pub async fn roll_key(
        &self,
        name: &str,
        new_hash: &str,
        new_identifier: &str,
        overlap: Duration,
        audit: &AuditEntry,
    ) -> Result<Option<Rolled>, StoreError> {
        let mut tx = self.pool.begin().await?;
        if !Self::lock_key(&mut tx, name).await? {
            return Ok(None);
        }
        let row = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE name = $1"
        ))
        .bind(name)
        .fetch_one(&mut *tx)
        .await?;
        let old = StoredKey::from_row(&row)?;
        let now = now_ms();
        let end = if overlap.is_zero() {
            now
        } else {
            ceil_to_second(now.saturating_add(overlap.as_millis() as i64))
        };
        let earlier: Vec<RetiredSecret> = sqlx::query(
            "SELECT key_hash, identifier, retires_at_ms FROM retired_secrets WHERE key_id = $1",
        )
        .bind(old.id)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| {
            Ok(RetiredSecret {
                key_hash: r.try_get("key_hash")?,
                identifier: r.try_get("identifier")?,
                retires_at_ms: r.try_get("retires_at_ms")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()?;
        // Secrets whose end moves earlier: the one being replaced, and older ones that
        // would otherwise outlive this roll's overlap.
        let mut changed = vec![RetiredSecret {
            key_hash: old.key_hash.clone(),
            identifier: old.identifier.clone(),
            retires_at_ms: end,
        }];
        changed.extend(
            earlier
                .into_iter()
                .filter(|s| s.retires_at_ms > end && s.retires_at_ms > now)
                .map(|s| RetiredSecret {
                    retires_at_ms: end,
                    ..s
                }),
        );
        sqlx::query("UPDATE retired_secrets SET retires_at_ms = $1 WHERE key_id = $2 AND retires_at_ms > $1")
            .bind(end)
            .bind(old.id)
            .execute(&mut *tx)
            .await?;
        if end > now {
            sqlx::query(
                "INSERT INTO retired_secrets (key_hash, key_id, identifier, retires_at_ms) VALUES ($1, $2, $3, $4)",
            )
            .bind(&old.key_hash)
            .bind(old.id)
            .bind(&old.identifier)
            .bind(end)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("DELETE FROM retired_secrets WHERE key_id = $1 AND retires_at_ms <= $2")
            .bind(old.id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE api_keys SET key_hash = $1, identifier = $2 WHERE id = $3")
            .bind(new_hash)
            .bind(new_identifier)
            .bind(old.id)
            .execute(&mut *tx)
            .await?;
        let key = StoredKey {
            key_hash: new_hash.to_owned(),
            identifier: new_identifier.to_owned(),
            ..old.clone()
        };
        self.enqueue(&mut tx, &key.key_hash, Some(key.record().to_json()), 0)
            .await?;
        for secret in &changed {
            if secret.retires_at_ms <= now {
                self.enqueue_delete(&mut tx, &secret.key_hash, now).await?;
            } else {
                // KV gets the record with its new end at once (the edge refuses it from
                // then on), and a delete when the overlap is over.
                let record = old.retired_record(&secret.identifier, secret.retires_at_ms);
                self.enqueue(&mut tx, &secret.key_hash, Some(record.to_json()), 0)
                    .await?;
                self.enqueue_delete(&mut tx, &secret.key_hash, secret.retires_at_ms)
                    .await?;
            }
        }
        self.audit_in(&mut tx, audit).await?;
        self.commit_outbox(tx).await?;
        Ok(Some(Rolled {
            key,
            retired: changed,
        }))
    }

    /// Takes the write lock of the key's row (on both databases) before anything else, so
    /// rolls and deletes of one key run one after the other and never take their locks
    /// in opposite orders. False: no such key.
    async fn lock_key(
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        name: &str,
    ) -> Result<bool, StoreError> {
        let locked = sqlx::query("UPDATE api_keys SET name = name WHERE name = $1")
            .bind(name)
            .execute(&mut **tx)
            .await?
            .rows_affected();
        Ok(locked > 0)
    }

    /// A KV delete at `at_ms` (or at once when that has passed), and its echo.
    async fn enqueue_delete(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
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

    async fn audit_in(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        entry: &AuditEntry,
    ) -> Result<(), StoreError> {
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

    /// Deletes audit rows older than `before_ms`; returns how many.
    pub async fn prune_audit(&self, before_ms: i64) -> Result<u64, StoreError> {
        Ok(sqlx::query("DELETE FROM audit_log WHERE at_ms < $1")
            .bind(before_ms)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    /// Audit rows, newest first, with ids below `before` when given.
    pub async fn list_audit(
        &self,
        limit: i64,
        before: Option<i64>,
    ) -> Result<Vec<AuditRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, at_ms, actor, action, target, ip, detail FROM audit_log WHERE id < $1 ORDER BY id DESC LIMIT $2",
        )
        .bind(before.unwrap_or(i64::MAX))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                Ok(AuditRow {
                    id: r.try_get("id")?,
                    at_ms: r.try_get("at_ms")?,
                    actor: r.try_get("actor")?,
                    action: r.try_get("action")?,
                    target: r.try_get("target")?,
                    ip: r.try_get("ip")?,
                    detail: r.try_get("detail")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()?)
    }

    /// Records when keys were last used, given by secret hash (current or rolled away),
    /// in one transaction; a time never moves backwards. Updated in hash order, so two
    /// replicas flushing at once rarely lock rows in opposite orders (a deadlock victim's
    /// batch is retried with the next flush).
    pub async fn record_usage(&self, used: &[(String, i64)]) -> Result<(), StoreError> {
        if used.is_empty() {
            return Ok(());
        }
        let mut used = used.to_vec();
        used.sort_unstable();
        let mut tx = self.pool.begin().await?;
        for (hash, at_ms) in &used {
            sqlx::query(
                "UPDATE api_keys SET last_used_ms = $1 \
                 WHERE (key_hash = $2 OR id IN (SELECT key_id FROM retired_secrets WHERE key_hash = $2)) \
                 AND (last_used_ms IS NULL OR last_used_ms < $1)",
            )
            .bind(*at_ms)
            .bind(hash)
            .execute(&mut *tx)
            .await?;
        }
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
        .bind(now_ms())
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
                    // Among due rows only: a delete scheduled for later (a roll's overlap
                    // end, an echo) must not hold back what is due now. Only deletes are
                    // ever scheduled, and nothing is put for a hash after its deletes, so
                    // letting due rows pass them keeps every key's end state right.
                    let placeholders: Vec<String> =
                        (2..=keys.len() + 1).map(|i| format!("${i}")).collect();
                    let sql = format!(
                        "SELECT kv_key, MIN(id) AS first FROM kv_outbox WHERE not_before_ms <= $1 AND kv_key IN ({}) GROUP BY kv_key",
                        placeholders.join(", ")
                    );
                    let mut q = sqlx::query(&sql).bind(now);
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

    /// The key a secret hash belongs to: its current secret, or one rolled away whose
    /// overlap has not ended (then with that secret's identifier, expiring at its end).
    pub async fn find_by_hash(&self, hash: &KeyHash) -> Result<Option<StoredKey>, StoreError> {
        let hex = hash.to_hex();
        let row = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = $1 \
             UNION ALL \
             SELECT k.id, k.name, r.key_hash, r.identifier, k.key_type, k.created_at_ms, \
               CASE WHEN k.expires_at_ms IS NOT NULL AND k.expires_at_ms < r.retires_at_ms \
                 THEN k.expires_at_ms ELSE r.retires_at_ms END AS expires_at_ms, \
               k.last_used_ms \
             FROM retired_secrets r JOIN api_keys k ON k.id = r.key_id \
             WHERE r.key_hash = $2 AND r.retires_at_ms > $3"
        ))
        .bind(&hex)
        .bind(&hex)
        .bind(now_ms())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(StoredKey::from_row).transpose()?)
    }

    /// Deletes a key by name, with every secret a roll left in its overlap; returns the
    /// key and the hashes of those secrets, or `None` if there was no such key.
    pub async fn delete_key(
        &self,
        name: &str,
        audit: &AuditEntry,
    ) -> Result<Option<(StoredKey, Vec<String>)>, StoreError> {
        let mut tx = self.pool.begin().await?;
        // The key's row lock first, as a roll takes it: a roll in progress finishes (and
        // its rolled-away secret is seen below) before this goes on.
        if !Self::lock_key(&mut tx, name).await? {
            return Ok(None);
        }
        // The rolled-away secrets next: deleting the key would cascade to them unseen.
        let retired: Vec<String> = sqlx::query(
            "DELETE FROM retired_secrets WHERE key_id IN (SELECT id FROM api_keys WHERE name = $1) RETURNING key_hash",
        )
        .bind(name)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.try_get("key_hash"))
        .collect::<Result<_, _>>()?;
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
        let now = now_ms();
        for hash in std::iter::once(&deleted.key_hash).chain(&retired) {
            self.enqueue_delete(&mut tx, hash, now).await?;
        }
        self.audit_in(&mut tx, audit).await?;
        self.commit_outbox(tx).await?;
        Ok(Some((deleted, retired)))
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
