//! The verification cache: hash → "valid, with this record" or "not a key". Redis when
//! `REDIS_URL` is set (shared by replicas), an in-process moka cache otherwise.
//!
//! A delete writes a long-lived `Absent` entry (a tombstone) that overwrites anything
//! cached, and verification only ever *adds* entries (`SET NX`). So a verification that
//! read the database just before a delete cannot re-cache the deleted key afterwards:
//! a deleted key is refused at once, with no TTL window.
//!
//! With Redis, each replica also keeps a small near cache (≤ 1 s) so a hot key costs no
//! network round trip. A delete publishes the hash on [`REVOKED_CHANNEL`]; every replica
//! evicts it from its near cache. The near cache is used only while that subscription is
//! live, so a lost subscription can never leave a revoked key valid for long.
//!
//! Cache failures are never errors for the caller: a Redis outage means verification
//! goes to the database (and a warning is logged, at most every few seconds). A delete
//! whose tombstone cannot be written (Redis unreachable, not restarted: its entries are
//! still there) is remembered: this replica answers "absent" for it and rewrites the
//! tombstone as soon as Redis answers again, so a flapping Redis cannot serve the deleted
//! key's old entry back. Other replicas are bounded by the entry's TTL until then.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
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
/// How long lookups skip Redis after a failure (any success ends it sooner).
const REDIS_BACKOFF: Duration = Duration::from_millis(500);
/// Longest a near-cache entry lives, whatever the cache TTL.
const NEAR_TTL_MAX: Duration = Duration::from_secs(1);
/// How often tombstones that could not be written are retried.
const TOMBSTONE_RETRY: Duration = Duration::from_millis(200);
/// Redis pub/sub channel carrying the hex hashes of deleted keys.
pub const REVOKED_CHANNEL: &str = "metlo:revoked";

type LocalCache = moka::future::Cache<KeyHash, (Cached, Duration)>;

fn local_cache() -> LocalCache {
    moka::future::Cache::builder()
        .max_capacity(100_000)
        .expire_after(PerEntryTtl)
        .build()
}

#[derive(Clone)]
pub struct VerifyCache {
    ttl: Duration,
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    Memory(LocalCache),
    Redis(Arc<RedisCache>),
}

/// Each entry carries its own time to live (verifications vs tombstones).
struct PerEntryTtl;

impl Expiry<KeyHash, (Cached, Duration)> for PerEntryTtl {
    fn expire_after_create(
        &self,
        _: &KeyHash,
        value: &(Cached, Duration),
        _: Instant,
    ) -> Option<Duration> {
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
    near: LocalCache,
    near_ttl: Duration,
    /// True while the revocation subscription is up: only then is `near` trusted.
    near_live: AtomicBool,
    /// Bumped by every revocation, so a lookup that raced one does not keep its result.
    generation: AtomicU64,
    /// Revocations and replacements not in Redis yet (it was unreachable): answered from
    /// here until written.
    unwritten: Mutex<HashMap<KeyHash, Cached>>,
    has_unwritten: AtomicBool,
    ttl: Duration,
    /// Serialises overwrites and their retries.
    write_lock: tokio::sync::Mutex<()>,
}

impl VerifyCache {
    pub fn memory(ttl: Duration) -> Self {
        VerifyCache {
            ttl,
            inner: Inner::Memory(local_cache()),
        }
    }

    /// Does not connect yet: the service must start (and verify through the database)
    /// even when Redis is down. `near_cache` starts the revocation subscriber (servers);
    /// the CLI, which only revokes, passes false.
    pub fn redis(url: &str, ttl: Duration, near_cache: bool) -> anyhow::Result<Self> {
        let client =
            redis::Client::open(url).map_err(|e| anyhow::anyhow!("invalid REDIS_URL: {e}"))?;
        let cache = Arc::new(RedisCache {
            client,
            conn: OnceCell::new(),
            last_warning_ms: AtomicU64::new(0),
            down_until_ms: AtomicU64::new(0),
            started: Instant::now(),
            near: local_cache(),
            near_ttl: ttl.min(NEAR_TTL_MAX),
            near_live: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            unwritten: Mutex::new(HashMap::new()),
            has_unwritten: AtomicBool::new(false),
            ttl,
            write_lock: tokio::sync::Mutex::new(()),
        });
        if near_cache {
            tokio::spawn(retry_tombstones(Arc::downgrade(&cache)));
            if !cache.near_ttl.is_zero() {
                tokio::spawn(follow_revocations(Arc::downgrade(&cache)));
            }
        }
        Ok(VerifyCache {
            ttl,
            inner: Inner::Redis(cache),
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
                if let Some(value) = r.unwritten_value(hash) {
                    return Some(value);
                }
                if r.near_usable() {
                    if let Some((v, _)) = r.near.get(hash).await {
                        return Some(v);
                    }
                }
                if r.is_down() {
                    return None;
                }
                let generation = r.generation.load(Ordering::SeqCst);
                let raw: String = r
                    .run::<Option<String>>(redis::cmd("GET").arg(redis_key(hash)))
                    .await
                    .flatten()?;
                let value = decode(&raw)?;
                r.remember(hash, &value, generation).await;
                Some(value)
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

    /// Marks a hash as deleted, overwriting any cached verification, here and (through
    /// Redis pub/sub) in every replica's near cache. Returns false when the shared
    /// cache could not be told (Redis unreachable); a server keeps retrying, and answers
    /// "absent" for the hash meanwhile.
    pub async fn revoke(&self, hash: &KeyHash) -> bool {
        self.overwrite(hash, Cached::Absent).await
    }

    /// Overwrites what is cached for a hash with a new record (a secret whose end a roll
    /// moved), like [`Self::revoke`] does with a tombstone.
    pub async fn replace(&self, hash: &KeyHash, record: KeyRecord) -> bool {
        self.overwrite(hash, Cached::Valid(record)).await
    }

    /// Writes `value` over what is cached, except that nothing replaces a tombstone:
    /// a deleted key's secrets never come back, so a roll's late `replace` can never undo
    /// a delete that committed after it.
    async fn overwrite(&self, hash: &KeyHash, value: Cached) -> bool {
        match &self.inner {
            Inner::Memory(c) => {
                let ttl = ttl_for(&value, self.ttl);
                c.entry(*hash)
                    .and_compute_with(|current| {
                        let tombstoned = current.is_some_and(|e| e.value().0 == Cached::Absent);
                        std::future::ready(if tombstoned {
                            moka::ops::compute::Op::Nop
                        } else {
                            moka::ops::compute::Op::Put((value, ttl))
                        })
                    })
                    .await;
                true
            }
            Inner::Redis(r) => {
                // One overwrite at a time, retries included, so an older value can never
                // land after a newer one.
                let _serial = r.write_lock.lock().await;
                r.generation.fetch_add(1, Ordering::SeqCst);
                match &value {
                    Cached::Absent => r.near.insert(*hash, (Cached::Absent, TOMBSTONE_TTL)).await,
                    Cached::Valid(_) => r.near.invalidate(hash).await,
                }
                let unwritten = |pending: Option<Cached>| {
                    let mut map = r.unwritten.lock().unwrap();
                    match pending {
                        Some(v) => {
                            // A pending tombstone stays a tombstone.
                            if map.get(hash) != Some(&Cached::Absent) {
                                map.insert(*hash, v);
                            }
                        }
                        None => {
                            map.remove(hash);
                        }
                    }
                    r.has_unwritten.store(!map.is_empty(), Ordering::SeqCst);
                };
                if r.write_entry(hash, &value).await {
                    unwritten(None);
                    return true;
                }
                unwritten(Some(value));
                false
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

impl RedisCache {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn is_down(&self) -> bool {
        self.now_ms() < self.down_until_ms.load(Ordering::Relaxed)
    }

    fn unwritten_value(&self, hash: &KeyHash) -> Option<Cached> {
        if !self.has_unwritten.load(Ordering::SeqCst) {
            return None;
        }
        self.unwritten.lock().unwrap().get(hash).cloned()
    }

    /// Overwrites the hash's entry and tells every replica to drop theirs. The publish
    /// may be lost (a replica resubscribing clears its near cache); the SET must succeed.
    async fn write_entry(&self, hash: &KeyHash, value: &Cached) -> bool {
        if self
            .run::<redis::Value>(&set_command(hash, value, self.ttl))
            .await
            .is_none()
        {
            return false;
        }
        let _: Option<i64> = self
            .run(
                redis::cmd("PUBLISH")
                    .arg(REVOKED_CHANNEL)
                    .arg(hash.to_hex()),
            )
            .await;
        true
    }

    fn near_usable(&self) -> bool {
        self.near_live.load(Ordering::SeqCst) && !self.is_down()
    }

    /// Keeps a Redis answer in the near cache, unless a revocation happened since the
    /// lookup began (checked after inserting too, so no interleaving keeps a stale entry:
    /// a revocation bumps the generation *before* evicting).
    async fn remember(&self, hash: &KeyHash, value: &Cached, generation: u64) {
        if !self.near_usable() || self.generation.load(Ordering::SeqCst) != generation {
            return;
        }
        self.near
            .entry(*hash)
            .or_insert((value.clone(), self.near_ttl))
            .await;
        if self.generation.load(Ordering::SeqCst) != generation {
            self.near.invalidate(hash).await;
        }
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
        self.down_until_ms
            .store(now + REDIS_BACKOFF.as_millis() as u64, Ordering::Relaxed);
        let last = self.last_warning_ms.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= 5_000)
            && self
                .last_warning_ms
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(error, "Redis unavailable; verifying through the database");
        }
    }

    /// Forgets everything in the near cache (used whenever revocations may have been missed).
    fn distrust_near(&self) {
        self.near_live.store(false, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.near.invalidate_all();
    }
}

/// Writes the tombstones (and replacements) that Redis missed, for as long as the cache
/// lives. Each round opens its own connection rather than waiting for the shared one to
/// finish its reconnection backoff: other replicas may read the stale entry until then.
async fn retry_tombstones(cache: std::sync::Weak<RedisCache>) {
    loop {
        tokio::time::sleep(TOMBSTONE_RETRY).await;
        let Some(c) = cache.upgrade() else { return };
        if !c.has_unwritten.load(Ordering::SeqCst) {
            continue;
        }
        let _serial = c.write_lock.lock().await;
        let pending: Vec<(KeyHash, Cached)> = c
            .unwritten
            .lock()
            .unwrap()
            .iter()
            .map(|(h, v)| (*h, v.clone()))
            .collect();
        let written = tokio::time::timeout(REDIS_TIMEOUT, async {
            let mut conn = c.client.get_multiplexed_async_connection().await?;
            let mut pipe = redis::pipe();
            for (hash, value) in &pending {
                pipe.add_command(set_command(hash, value, c.ttl))
                    .ignore()
                    .cmd("PUBLISH")
                    .arg(REVOKED_CHANNEL)
                    .arg(hash.to_hex())
                    .ignore();
            }
            pipe.query_async::<()>(&mut conn).await
        })
        .await;
        if let Ok(Ok(())) = written {
            let mut unwritten = c.unwritten.lock().unwrap();
            for (hash, _) in &pending {
                unwritten.remove(hash);
            }
            c.has_unwritten
                .store(!unwritten.is_empty(), Ordering::SeqCst);
            tracing::info!(
                count = pending.len(),
                "cache overwrites written to Redis after an outage"
            );
        }
    }
}

/// Subscribes to [`REVOKED_CHANNEL`] for as long as the cache lives, reconnecting after
/// failures. Messages missed while disconnected are covered by clearing the near cache.
async fn follow_revocations(cache: std::sync::Weak<RedisCache>) {
    loop {
        let Some(client) = cache.upgrade().map(|c| c.client.clone()) else {
            return;
        };
        let subscribed = tokio::time::timeout(REDIS_TIMEOUT, async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(REVOKED_CHANNEL).await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await;
        if let Ok(Ok(mut pubsub)) = subscribed {
            if let Some(c) = cache.upgrade() {
                c.distrust_near();
                c.near_live.store(true, Ordering::SeqCst);
            }
            let mut messages = pubsub.on_message();
            while let Some(msg) = messages.next().await {
                let Some(c) = cache.upgrade() else { return };
                let payload: String = msg.get_payload().unwrap_or_default();
                match KeyHash::from_hex(&payload) {
                    Ok(hash) => {
                        c.generation.fetch_add(1, Ordering::SeqCst);
                        c.near.invalidate(&hash).await;
                    }
                    Err(_) => c.distrust_near(),
                }
            }
        }
        match cache.upgrade() {
            Some(c) => c.distrust_near(),
            None => return,
        }
        tokio::time::sleep(REDIS_BACKOFF).await;
    }
}

/// Tombstones live long; replaced records as long as any verification result.
fn ttl_for(value: &Cached, ttl: Duration) -> Duration {
    match value {
        Cached::Absent => TOMBSTONE_TTL,
        Cached::Valid(_) => ttl,
    }
}

/// Overwrites the hash's entry (unlike verification's `SET NX`); a record never
/// overwrites a tombstone (checked and set atomically, in a script).
fn set_command(hash: &KeyHash, value: &Cached, ttl: Duration) -> redis::Cmd {
    const SET_UNLESS_TOMBSTONE: &str = "if redis.call('GET', KEYS[1]) == '-' then return 0 end \
         redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1";
    let ttl_ms = ttl_for(value, ttl).as_millis() as u64;
    match value {
        Cached::Absent => redis::cmd("SET")
            .arg(redis_key(hash))
            .arg(encode(value))
            .arg("PX")
            .arg(ttl_ms)
            .to_owned(),
        Cached::Valid(_) => redis::cmd("EVAL")
            .arg(SET_UNLESS_TOMBSTONE)
            .arg(1)
            .arg(redis_key(hash))
            .arg(encode(value))
            .arg(ttl_ms)
            .to_owned(),
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
    use metlo_shared::ApiKey;

    fn record() -> KeyRecord {
        KeyRecord::sample()
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
        assert_eq!(
            decode(&encode(&Cached::Valid(record()))),
            Some(Cached::Valid(record()))
        );
        assert_eq!(decode("garbage"), None);
    }
}
