//! The shared cache (several replicas): Redis, with a near cache per replica that is
//! trusted only while the revocation subscription is live, and tombstones that Redis
//! missed kept and rewritten until it takes them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use metlo_shared::{KeyHash, KeyRecord};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::OnceCell;

use super::entry::{ttl_for, Cached, Task, TOMBSTONE_TTL};
use super::memory::{local_cache, LocalCache};

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

pub(super) struct RedisCache {
    client: redis::Client,
    record_key: RecordKey,
    last_forged_warning_ms: AtomicU64,
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

/// The tasks a server runs for a Redis cache; they end when the cache is dropped.
pub(super) fn background_tasks(cache: &Arc<RedisCache>) -> Vec<Task> {
    let mut tasks: Vec<Task> = vec![Box::pin(retry_tombstones(Arc::downgrade(cache)))];
    if !cache.near_ttl.is_zero() {
        tasks.push(Box::pin(follow_revocations(Arc::downgrade(cache))));
    }
    tasks
}

/// A Redis client for `url` (`redis://` or `rediss://`, with `user:password@` for AUTH):
/// over TLS, the server's certificate is checked against `ca_pem` (PEM) when given, the
/// public roots otherwise. Does not connect.
pub fn client(url: &str, ca_pem: Option<&[u8]>) -> anyhow::Result<redis::Client> {
    // The one TLS provider of this build (ring); redis asks for the process default.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Some(pem) = ca_pem else {
        return redis::Client::open(url).map_err(|e| anyhow::anyhow!("invalid REDIS_URL: {e}"));
    };
    if !url.starts_with("rediss://") {
        anyhow::bail!("REDIS_CA_FILE is set, so REDIS_URL must be rediss:// (Redis over TLS)");
    }
    // redis takes an empty set of roots without complaint, then refuses every server.
    if !String::from_utf8_lossy(pem).contains("-----BEGIN CERTIFICATE-----") {
        anyhow::bail!("REDIS_CA_FILE holds no PEM certificate");
    }
    let certificates = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem.to_vec()),
    };
    redis::Client::build_with_tls(url, certificates)
        .map_err(|e| anyhow::anyhow!("invalid REDIS_URL or REDIS_CA_FILE: {e}"))
}

/// Authenticates the records kept in Redis: whoever can write to Redis, without this
/// key, cannot make a record that is taken for one of ours.
#[derive(Clone)]
pub struct RecordKey([u8; 32]);

impl RecordKey {
    pub fn new(key: [u8; 32]) -> Self {
        RecordKey(key)
    }

    /// HMAC-SHA256 of the entry's Redis key and value, hex.
    fn tag(&self, redis_key: &str, value: &str) -> String {
        use hmac::Mac;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.0)
            .expect("HMAC takes a key of any length");
        mac.update(redis_key.as_bytes());
        mac.update(b"\n");
        mac.update(value.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    fn verify(&self, redis_key: &str, value: &str, tag: &str) -> bool {
        use subtle::ConstantTimeEq;
        self.tag(redis_key, value)
            .as_bytes()
            .ct_eq(tag.as_bytes())
            .into()
    }
}

impl RedisCache {
    pub(super) fn new(client: redis::Client, ttl: Duration, record_key: RecordKey) -> Self {
        RedisCache {
            client,
            record_key,
            last_forged_warning_ms: AtomicU64::new(0),
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
        }
    }

    /// What this replica knows without asking Redis (a write not yet in Redis, the near
    /// cache).
    pub(super) fn local(&self, hash: &KeyHash) -> Option<Cached> {
        if let Some(value) = self.unwritten_value(hash) {
            return Some(value);
        }
        if self.near_usable() {
            if let Some((v, _)) = self.near.get(hash) {
                return Some(v);
            }
        }
        None
    }

    /// Asks Redis (after [`Self::local`] had nothing).
    pub(super) async fn fetch(&self, hash: &KeyHash) -> Option<Cached> {
        if self.is_down() {
            return None;
        }
        let generation = self.generation.load(Ordering::SeqCst);
        let raw: String = self
            .run::<Option<String>>(redis::cmd("GET").arg(redis_key(hash)))
            .await
            .flatten()?;
        let value = match decode(&self.record_key, hash, &raw) {
            Decoded::Value(value) => value,
            Decoded::Unreadable => return None,
            Decoded::Forged => {
                self.forged();
                return None;
            }
        };
        self.remember(hash, &value, generation);
        Some(value)
    }

    /// `SET NX`: a tombstone written by a concurrent delete wins.
    pub(super) async fn add(&self, hash: &KeyHash, value: Cached) {
        if self.is_down() {
            return;
        }
        let cmd = redis::cmd("SET")
            .arg(redis_key(hash))
            .arg(encode(&self.record_key, hash, &value))
            .arg("NX")
            .arg("PX")
            .arg(self.ttl.as_millis() as u64)
            .to_owned();
        let _: Option<Option<String>> = self.run(&cmd).await;
    }

    /// False: Redis could not be told; the value is kept here and rewritten later.
    pub(super) async fn overwrite(&self, hash: &KeyHash, value: Cached) -> bool {
        // One overwrite at a time, retries included, so an older value can never
        // land after a newer one.
        let _serial = self.write_lock.lock().await;
        self.generation.fetch_add(1, Ordering::SeqCst);
        match &value {
            Cached::Absent => self.near.insert(*hash, (Cached::Absent, TOMBSTONE_TTL)),
            Cached::Disabled => self.near.insert(*hash, (Cached::Disabled, self.near_ttl)),
            Cached::Valid(_) => self.near.invalidate(hash),
        }
        let unwritten = |pending: Option<Cached>| {
            let mut map = self.unwritten.lock().unwrap();
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
            self.has_unwritten.store(!map.is_empty(), Ordering::SeqCst);
        };
        if self.write_entry(hash, &value).await {
            unwritten(None);
            return true;
        }
        unwritten(Some(value));
        false
    }

    pub(super) async fn ping(&self) -> bool {
        self.run::<String>(&redis::cmd("PING")).await.is_some()
    }

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
            .run::<redis::Value>(&set_command(&self.record_key, hash, value, self.ttl))
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
    fn remember(&self, hash: &KeyHash, value: &Cached, generation: u64) {
        if !self.near_usable() || self.generation.load(Ordering::SeqCst) != generation {
            return;
        }
        self.near
            .entry(*hash)
            .or_insert((value.clone(), self.near_ttl));
        if self.generation.load(Ordering::SeqCst) != generation {
            self.near.invalidate(hash);
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
        if once_in_5_s(&self.last_warning_ms, now) {
            tracing::warn!(error, "Redis unavailable; verifying through the database");
        }
    }

    /// A value under a key's entry that this service did not write (or that was changed):
    /// a miss, counted, and logged at most every 5 s.
    fn forged(&self) {
        metrics::counter!("metlo_cache_forged_total").increment(1);
        if once_in_5_s(&self.last_forged_warning_ms, self.now_ms()) {
            tracing::warn!(
                "a record in Redis failed its authentication check (written by someone \
                 without this instance's key): ignored, verified through the database"
            );
        }
    }

    /// Forgets everything in the near cache (used whenever revocations may have been missed).
    fn distrust_near(&self) {
        self.near_live.store(false, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.near.invalidate_all();
    }
}

/// Whether a warning last logged at `last` (ms; 0: never) may be logged again at `now`:
/// at most one every 5 s, whichever thread gets there first.
fn once_in_5_s(last: &AtomicU64, now: u64) -> bool {
    let before = last.load(Ordering::Relaxed);
    (before == 0 || now.saturating_sub(before) >= 5_000)
        && last
            .compare_exchange(before, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
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
                pipe.add_command(set_command(&c.record_key, hash, value, c.ttl))
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
                        c.near.invalidate(&hash);
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

/// Overwrites the hash's entry (unlike verification's `SET NX`); a record or a disable
/// never overwrites a tombstone (checked and set atomically, in a script).
fn set_command(key: &RecordKey, hash: &KeyHash, value: &Cached, ttl: Duration) -> redis::Cmd {
    const SET_UNLESS_TOMBSTONE: &str = "if redis.call('GET', KEYS[1]) == '-' then return 0 end \
         redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1";
    let ttl_ms = ttl_for(value, ttl).as_millis() as u64;
    match value {
        Cached::Absent => redis::cmd("SET")
            .arg(redis_key(hash))
            .arg(encode(key, hash, value))
            .arg("PX")
            .arg(ttl_ms)
            .to_owned(),
        Cached::Valid(_) | Cached::Disabled => redis::cmd("EVAL")
            .arg(SET_UNLESS_TOMBSTONE)
            .arg(1)
            .arg(redis_key(hash))
            .arg(encode(key, hash, value))
            .arg(ttl_ms)
            .to_owned(),
    }
}

fn redis_key(hash: &KeyHash) -> String {
    format!("metlo:verify:{}", hash.to_hex())
}

/// A tombstone (`-`) or a disable (`x`) as is (forging one only refuses a key); a record
/// as `<tag>.<json>`, the tag binding it to its entry's key.
fn encode(key: &RecordKey, hash: &KeyHash, value: &Cached) -> String {
    match value {
        Cached::Valid(record) => {
            let json = record.to_json();
            format!("{}.{json}", key.tag(&redis_key(hash), &json))
        }
        Cached::Absent => "-".to_owned(),
        Cached::Disabled => "x".to_owned(),
    }
}

#[derive(Debug, PartialEq)]
enum Decoded {
    Value(Cached),
    /// Not in this version's format (say, written by an older one): a miss.
    Unreadable,
    /// A record whose tag does not match: not written by this instance.
    Forged,
}

fn decode(key: &RecordKey, hash: &KeyHash, raw: &str) -> Decoded {
    match raw {
        "-" => return Decoded::Value(Cached::Absent),
        "x" => return Decoded::Value(Cached::Disabled),
        _ => {}
    }
    let Some((tag, json)) = raw.split_once('.') else {
        return if raw.starts_with('{') {
            Decoded::Forged
        } else {
            Decoded::Unreadable
        };
    };
    if !key.verify(&redis_key(hash), json, tag) {
        return Decoded::Forged;
    }
    match KeyRecord::from_json(json.as_bytes()) {
        Ok(record) => Decoded::Value(Cached::Valid(Arc::new(record))),
        Err(_) => Decoded::Unreadable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_round_trips() {
        let key = RecordKey::new([7; 32]);
        let hash = KeyHash::of_text("a key");
        let record = Arc::new(KeyRecord::sample());
        for value in [
            Cached::Absent,
            Cached::Disabled,
            Cached::Valid(record.clone()),
        ] {
            assert_eq!(
                decode(&key, &hash, &encode(&key, &hash, &value)),
                Decoded::Value(value)
            );
        }
        assert_eq!(decode(&key, &hash, "garbage"), Decoded::Unreadable);
    }

    /// Whoever writes to Redis without the instance's key cannot make a record: a bare
    /// record (the format before tags), a record under another key's tag, a record
    /// tagged with another instance's key, and a changed record are all refused.
    #[test]
    fn records_without_this_instance_tag_are_refused() {
        let key = RecordKey::new([7; 32]);
        let hash = KeyHash::of_text("a key");
        let other_hash = KeyHash::of_text("another key");
        let record = Cached::Valid(Arc::new(KeyRecord::sample()));
        let json = KeyRecord::sample().to_json();
        assert_eq!(decode(&key, &hash, &json), Decoded::Forged);
        let moved = encode(&key, &other_hash, &record);
        assert_eq!(decode(&key, &hash, &moved), Decoded::Forged);
        let foreign = encode(&RecordKey::new([8; 32]), &hash, &record);
        assert_eq!(decode(&key, &hash, &foreign), Decoded::Forged);
        let genuine = encode(&key, &hash, &record);
        let changed = genuine.replacen("\"role\":\"", "\"role\":\"x", 1);
        assert_ne!(changed, genuine);
        assert_eq!(decode(&key, &hash, &changed), Decoded::Forged);
    }
}
