//! The verification cache: hash → "valid, with this record" or "not a key". Redis when
//! `REDIS_URL` is set (shared by replicas), an in-process moka cache otherwise.
//!
//! A delete writes a long-lived `Absent` entry (a tombstone) that overwrites anything
//! cached, and verification only ever *adds* entries (`SET NX`). So a verification that
//! read the database just before a delete cannot re-cache the deleted key afterwards:
//! a deleted key is refused at once, with no TTL window.
//!
//! Records in Redis are tagged (HMAC-SHA256 under a secret kept in the database, never in
//! Redis): a value someone else wrote there is ignored, never taken for a key's record.
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

mod entry;
mod memory;
mod redis;

use std::sync::Arc;
use std::time::Duration;

use metlo_shared::{KeyHash, KeyRecord};

pub use self::redis::{client as redis_client, RecordKey, REVOKED_CHANNEL};

pub use self::entry::{Cached, Task};

#[derive(Clone)]
pub struct VerifyCache {
    ttl: Duration,
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    Memory(memory::Memory),
    Redis(std::sync::Arc<redis::RedisCache>),
}

impl VerifyCache {
    pub fn memory(ttl: Duration) -> Self {
        VerifyCache {
            ttl,
            inner: Inner::Memory(memory::Memory::new()),
        }
    }

    /// Does not connect yet: the service must start (and verify through the database)
    /// even when Redis is down. A server runs [`Self::background_tasks`]; the CLI, which
    /// only revokes, does not (and so never trusts a near cache).
    /// Records in Redis carry a tag made with `record_key` ([`RecordKey`]).
    pub fn redis(client: ::redis::Client, ttl: Duration, record_key: RecordKey) -> Self {
        VerifyCache {
            ttl,
            inner: Inner::Redis(std::sync::Arc::new(redis::RedisCache::new(
                client, ttl, record_key,
            ))),
        }
    }

    /// What a server must run beside this cache: with Redis, rewriting the tombstones it
    /// missed and following revocations (which turns the near cache on).
    pub fn background_tasks(&self) -> Vec<Task> {
        match &self.inner {
            Inner::Memory(_) => Vec::new(),
            Inner::Redis(r) => redis::background_tasks(r),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self.inner {
            Inner::Memory(_) => "memory",
            Inner::Redis(_) => "redis",
        }
    }

    pub async fn get(&self, hash: &KeyHash) -> Option<Cached> {
        match self.get_local(hash) {
            Some(v) => Some(v),
            None => self.get_shared(hash).await,
        }
    }

    /// What this process knows without a round trip: the in-process cache, or Redis's
    /// near cache (and the tombstones not yet written to Redis). Synchronous, so a cache
    /// hit on the request path awaits nothing.
    pub fn get_local(&self, hash: &KeyHash) -> Option<Cached> {
        match &self.inner {
            Inner::Memory(c) => c.get(hash),
            Inner::Redis(r) => r.local(hash),
        }
    }

    /// What the shared cache holds (Redis; nothing for the in-process cache), for a hash
    /// [`Self::get_local`] did not know.
    pub async fn get_shared(&self, hash: &KeyHash) -> Option<Cached> {
        match &self.inner {
            Inner::Memory(_) => None,
            // Boxed: the round trip's future is large.
            Inner::Redis(r) => Box::pin(r.fetch(hash)).await,
        }
    }

    /// Caches a verification result unless something is cached already (so a tombstone
    /// written by a concurrent delete wins).
    pub async fn add(&self, hash: &KeyHash, value: Cached) {
        match &self.inner {
            Inner::Memory(c) => c.add(hash, value, self.ttl),
            Inner::Redis(r) => r.add(hash, value).await,
        }
    }

    /// Marks a hash as deleted, overwriting any cached verification, here and (through
    /// Redis pub/sub) in every replica's near cache. Returns false when the shared
    /// cache could not be told (Redis unreachable); a server keeps retrying, and answers
    /// "absent" for the hash meanwhile.
    pub async fn revoke(&self, hash: &KeyHash) -> bool {
        self.overwrite(hash, Cached::Absent).await
    }

    /// Marks a hash as disabled, here and in every replica's near cache, overwriting any
    /// cached verification — for the cache TTL only, and a later [`Self::replace`] (the
    /// key enabled again) overwrites it. False: Redis could not be told (as `revoke`).
    pub async fn disable(&self, hash: &KeyHash) -> bool {
        self.overwrite(hash, Cached::Disabled).await
    }

    /// Overwrites what is cached for a hash with a new record (a secret whose end a roll
    /// moved), like [`Self::revoke`] does with a tombstone.
    pub async fn replace(&self, hash: &KeyHash, record: KeyRecord) -> bool {
        self.overwrite(hash, Cached::Valid(Arc::new(record))).await
    }

    /// Writes `value` over what is cached, except that nothing replaces a tombstone:
    /// a deleted key's secrets never come back, so a roll's late `replace` can never undo
    /// a delete that committed after it.
    async fn overwrite(&self, hash: &KeyHash, value: Cached) -> bool {
        match &self.inner {
            Inner::Memory(c) => {
                c.overwrite(hash, value, self.ttl);
                true
            }
            Inner::Redis(r) => r.overwrite(hash, value).await,
        }
    }

    /// For `/readyz`: `Some(ok)` for Redis, `None` for the in-process cache.
    pub async fn ping(&self) -> Option<bool> {
        match &self.inner {
            Inner::Memory(_) => None,
            Inner::Redis(r) => Some(r.ping().await),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metlo_shared::ApiKey;

    fn record() -> Arc<KeyRecord> {
        Arc::new(KeyRecord::sample())
    }

    #[tokio::test]
    async fn tombstone_beats_a_late_add() {
        let cache = VerifyCache::memory(Duration::from_secs(5));
        let hash = ApiKey::generate().unwrap().hash();
        cache.revoke(&hash).await;
        cache.add(&hash, Cached::Valid(record())).await;
        assert_eq!(cache.get(&hash).await, Some(Cached::Absent));
        // Not even an enable brings a deleted key's hash back.
        cache.replace(&hash, KeyRecord::sample()).await;
        assert_eq!(cache.get(&hash).await, Some(Cached::Absent));
    }

    #[tokio::test]
    async fn a_disable_is_undone_by_a_record_and_expires() {
        let cache = VerifyCache::memory(Duration::from_millis(50));
        let hash = ApiKey::generate().unwrap().hash();
        cache.add(&hash, Cached::Valid(record())).await;
        cache.disable(&hash).await;
        assert_eq!(cache.get(&hash).await, Some(Cached::Disabled));
        cache.replace(&hash, KeyRecord::sample()).await;
        assert_eq!(cache.get(&hash).await, Some(Cached::Valid(record())));
        cache.disable(&hash).await;
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert_eq!(
            cache.get(&hash).await,
            None,
            "a disable lasts the cache TTL only"
        );
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
}
