//! The verification cache: hash → "valid, with this record" or "not a key". Redis when
//! `REDIS_URL` is set (shared by replicas), an in-process moka cache otherwise.
//!
//! A delete writes a long-lived `Absent` entry (a tombstone) that overwrites anything
//! cached, and verification only ever *adds* entries (`SET NX`). So a verification that
//! read the database just before a delete cannot re-cache the deleted key afterwards:
//! a deleted key is refused at once, with no TTL window.
//!
//! Cache failures are never errors for the caller: a Redis outage means verification
//! goes to the database (and a warning is logged, at most every few seconds).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use metlo_shared::{KeyHash, KeyRecord};
use moka::Expiry;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::OnceCell;

/// What the cache knows about a hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cached {
    Valid(KeyRecord),
    /// Unknown or deleted: refuse.
    Absent,
}

/// Tombstones outlive any in-flight verification by a wide margin. Keys are random, so a
/// deleted key's hash never becomes valid again: a long tombstone is always right.
const TOMBSTONE_TTL: Duration = Duration::from_secs(3600);
/// A Redis call slower than this counts as a failure and falls back to the database.
const REDIS_TIMEOUT: Duration = Duration::from_millis(250);

#[derive(Clone)]
pub struct VerifyCache {
    ttl: Duration,
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    Memory(moka::future::Cache<KeyHash, (Cached, Duration)>),
    Redis(Arc<RedisCache>),
}

struct PerEntryTtl;

impl Expiry<KeyHash, (Cached, Duration)> for PerEntryTtl {
    fn expire_after_create(&self, _: &KeyHash, value: &(Cached, Duration), _: Instant) -> Option<Duration> {
        Some(value.1)
    }
    fn expire_after_update(
        &self,
        _: &KeyHash,
        value: &(Cached, Duration),
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.1)
    }
}

struct RedisCache {
    client: redis::Client,
    conn: OnceCell<ConnectionManager>,
    last_warning_ms: AtomicU64,
    /// After a failure, lookups skip Redis until this time (ms since `started`) or until
    /// any command succeeds, so an outage costs verification little. Revocations always try.
    down_until_ms: AtomicU64,
    started: Instant,
}

impl VerifyCache {
    pub fn memory(ttl: Duration) -> Self {
        let cache = moka::future::Cache::builder().max_capacity(100_000).expire_after(PerEntryTtl).build();
        VerifyCache { ttl, inner: Inner::Memory(cache) }
    }

    /// Does not connect yet: the service must start (and verify through the database)
    /// even when Redis is down.
    pub fn redis(url: &str, ttl: Duration) -> anyhow::Result<Self> {
        let client = redis::Client::open(url).map_err(|e| anyhow::anyhow!("invalid REDIS_URL: {e}"))?;
        Ok(VerifyCache {
            ttl,
            inner: Inner::Redis(Arc::new(RedisCache {
                client,
                conn: OnceCell::new(),
                last_warning_ms: AtomicU64::new(0),
                down_until_ms: AtomicU64::new(0),
                started: Instant::now(),
            })),
        })
    }

    pub fn kind(&self) -> &'static str {
        match self.inner {
            Inner::Memory(_) => "memory",
            Inner::Redis(_) => "redis",
        }
    }

    pub async fn get(&self, hash: &KeyHash) -> Option<Cached> {
        match &self.inner {
            Inner::Memory(c) => c.get(hash).await.map(|(v, _)| v),
            Inner::Redis(r) => {
                if r.is_down() {
                    return None;
                }
                let raw: String = r.run::<Option<String>>(redis::cmd("GET").arg(redis_key(hash))).await.flatten()?;
                decode(&raw)
            }
        }
    }

    /// Caches a verification result unless something is cached already (so a tombstone
    /// written by a concurrent delete wins).
    pub async fn add(&self, hash: &KeyHash, value: Cached) {
        match &self.inner {
            Inner::Memory(c) => {
                c.entry(*hash).or_insert((value, self.ttl)).await;
            }
            Inner::Redis(r) => {
                if r.is_down() {
                    return;
                }
                let cmd = redis::cmd("SET")
                    .arg(redis_key(hash))
                    .arg(encode(&value))
                    .arg("NX")
                    .arg("PX")
                    .arg(self.ttl.as_millis() as u64)
                    .to_owned();
                let _: Option<Option<String>> = r.run(&cmd).await;
            }
        }
    }

    /// Marks a hash as deleted, overwriting any cached verification.
    pub async fn revoke(&self, hash: &KeyHash) {
        match &self.inner {
            Inner::Memory(c) => c.insert(*hash, (Cached::Absent, TOMBSTONE_TTL)).await,
            Inner::Redis(r) => {
                let cmd = redis::cmd("SET")
                    .arg(redis_key(hash))
                    .arg(encode(&Cached::Absent))
                    .arg("PX")
                    .arg(TOMBSTONE_TTL.as_millis() as u64)
                    .to_owned();
                let _: Option<String> = r.run(&cmd).await;
            }
        }
    }

    /// For `/readyz`: `Some(ok)` for Redis, `None` for the in-process cache.
    pub async fn ping(&self) -> Option<bool> {
        match &self.inner {
            Inner::Memory(_) => None,
            Inner::Redis(r) => Some(r.run::<String>(&redis::cmd("PING")).await.is_some()),
        }
    }
}

/// How long reads skip Redis after a failure.
const REDIS_BACKOFF: Duration = Duration::from_millis(500);

impl RedisCache {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn is_down(&self) -> bool {
        self.now_ms() < self.down_until_ms.load(Ordering::Relaxed)
    }

    /// Runs a command with a deadline; any failure is logged (rate-limited) and yields `None`.
    async fn run<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Option<T> {
        let result = tokio::time::timeout(REDIS_TIMEOUT, async {
            let conn = self
                .conn
                .get_or_try_init(|| async {
                    let config = ConnectionManagerConfig::new()
                        .set_connection_timeout(REDIS_TIMEOUT)
                        .set_response_timeout(REDIS_TIMEOUT)
                        .set_number_of_retries(1);
                    ConnectionManager::new_with_config(self.client.clone(), config).await
                })
                .await?;
            cmd.query_async::<T>(&mut conn.clone()).await
        })
        .await;
        match result {
            Ok(Ok(v)) => {
                self.down_until_ms.store(0, Ordering::Relaxed);
                Some(v)
            }
            Ok(Err(e)) => {
                self.warn(&format!("{e}"));
                None
            }
            Err(_) => {
                self.warn("timed out");
                None
            }
        }
    }

    fn warn(&self, error: &str) {
        metrics::counter!("metlo_cache_errors_total").increment(1);
        let now = self.now_ms();
        self.down_until_ms.store(now + REDIS_BACKOFF.as_millis() as u64, Ordering::Relaxed);
        let last = self.last_warning_ms.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= 5_000)
            && self.last_warning_ms.compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            tracing::warn!(error, "Redis unavailable; verifying through the database");
        }
    }
}

fn redis_key(hash: &KeyHash) -> String {
    format!("metlo:verify:{}", hash.to_hex())
}

fn encode(value: &Cached) -> String {
    match value {
        Cached::Valid(record) => record.to_json(),
        Cached::Absent => "-".to_owned(),
    }
}

fn decode(raw: &str) -> Option<Cached> {
    if raw == "-" {
        return Some(Cached::Absent);
    }
    // Anything unreadable (say, written by another version) is a miss, not a decision.
    KeyRecord::from_json(raw.as_bytes()).ok().map(Cached::Valid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use metlo_shared::{ApiKey, KeyType, RECORD_VERSION};

    fn record() -> KeyRecord {
        KeyRecord {
            v: RECORD_VERSION,
            name: "n".into(),
            key_type: KeyType::Generic,
            identifier: "metlo.abcdefgh".into(),
            created: "2026-01-01T00:00:00.000Z".into(),
            expires: None,
        }
    }

    #[tokio::test]
    async fn tombstone_beats_a_late_add() {
        let cache = VerifyCache::memory(Duration::from_secs(5));
        let hash = ApiKey::generate().unwrap().hash();
        cache.revoke(&hash).await;
        cache.add(&hash, Cached::Valid(record())).await;
        assert_eq!(cache.get(&hash).await, Some(Cached::Absent));
    }

    #[tokio::test]
    async fn entries_expire_after_ttl() {
        let cache = VerifyCache::memory(Duration::from_millis(50));
        let hash = ApiKey::generate().unwrap().hash();
        cache.add(&hash, Cached::Valid(record())).await;
        assert_eq!(cache.get(&hash).await, Some(Cached::Valid(record())));
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert_eq!(cache.get(&hash).await, None);
    }

    #[test]
    fn encoding_round_trips() {
        assert_eq!(decode(&encode(&Cached::Absent)), Some(Cached::Absent));
        assert_eq!(decode(&encode(&Cached::Valid(record()))), Some(Cached::Valid(record())));
        assert_eq!(decode("garbage"), None);
    }
}
