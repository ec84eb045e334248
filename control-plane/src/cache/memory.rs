//! The in-process cache (one replica): moka, each entry with its own time to live.

use std::time::{Duration, Instant};

use metlo_shared::KeyHash;
use moka::Expiry;

use super::entry::{ttl_for, Cached};

/// moka's sync cache: a hit is a plain call, no future to build and poll (every cached
/// verification goes through here). Hashed with foldhash, seeded per process: SipHash,
/// moka's default, cost about 1 % of a verification; a SHA-256 taken raw would let
/// anyone grind keys into one bucket.
pub(super) type LocalCache =
    moka::sync::Cache<KeyHash, (Cached, Duration), foldhash::fast::RandomState>;

/// Also the near cache in front of Redis.
pub(super) fn local_cache() -> LocalCache {
    moka::sync::Cache::builder()
        .max_capacity(100_000)
        .expire_after(PerEntryTtl)
        .build_with_hasher(foldhash::fast::RandomState::default())
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

#[derive(Clone)]
pub(super) struct Memory(LocalCache);

impl Memory {
    pub(super) fn new() -> Self {
        Memory(local_cache())
    }

    pub(super) fn get(&self, hash: &KeyHash) -> Option<Cached> {
        self.0.get(hash).map(|(v, _)| v)
    }

    pub(super) fn add(&self, hash: &KeyHash, value: Cached, ttl: Duration) {
        self.0.entry(*hash).or_insert((value, ttl));
    }

    /// Puts `value` unless a tombstone is there (checked and set atomically).
    pub(super) fn overwrite(&self, hash: &KeyHash, value: Cached, ttl: Duration) {
        let ttl = ttl_for(&value, ttl);
        self.0.entry(*hash).and_compute_with(|current| {
            let tombstoned = current.is_some_and(|e| e.value().0 == Cached::Absent);
            if tombstoned {
                moka::ops::compute::Op::Nop
            } else {
                moka::ops::compute::Op::Put((value, ttl))
            }
        });
    }
}
