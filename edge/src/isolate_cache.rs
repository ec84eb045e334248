//! A small, bounded cache that lives as long as the Worker isolate. It spares KV reads
//! for hot keys (hits, briefly) and for repeated unknown keys (misses, a few seconds:
//! keys are random, so an unknown key never becomes valid). Time is passed in, so it is
//! tested natively.

use std::num::NonZeroUsize;

use lru::LruCache;
use metlo_shared::{KeyHash, KeyRecord};

// Most entries are `Valid`: boxing the record would cost an allocation per key for
// nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Valid(KeyRecord),
    Unknown,
}

pub struct IsolateCache {
    entries: LruCache<KeyHash, (Entry, u64)>,
    hit_ms: u64,
    miss_ms: u64,
}

impl IsolateCache {
    pub fn new(capacity: usize, hit_ms: u64, miss_ms: u64) -> Self {
        let capacity = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        IsolateCache {
            entries: LruCache::new(capacity),
            hit_ms,
            miss_ms,
        }
    }

    /// The entry for `hash` if it has not expired at `now_ms`.
    pub fn get(&mut self, hash: &KeyHash, now_ms: u64) -> Option<Entry> {
        match self.entries.get(hash) {
            Some((entry, expires)) if *expires > now_ms => Some(entry.clone()),
            Some(_) => {
                self.entries.pop(hash);
                None
            }
            None => None,
        }
    }

    pub fn put(&mut self, hash: KeyHash, entry: Entry, now_ms: u64) {
        self.put_for(hash, entry, now_ms, u64::MAX);
    }

    /// As [`put`](Self::put), kept at most `max_ms` (what the control plane allows).
    pub fn put_for(&mut self, hash: KeyHash, entry: Entry, now_ms: u64, max_ms: u64) {
        let ttl = match entry {
            Entry::Valid(_) => self.hit_ms,
            Entry::Unknown => self.miss_ms,
        }
        .min(max_ms);
        if ttl > 0 {
            self.entries.put(hash, (entry, now_ms.saturating_add(ttl)));
        }
    }

    /// Forgets `hash` (the revocation feed changed its state).
    pub fn remove(&mut self, hash: &KeyHash) {
        self.entries.pop(hash);
    }

    /// Forgets everything (the revocation feed started over: any entry may be stale).
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metlo_shared::ApiKey;

    fn record() -> KeyRecord {
        KeyRecord::sample()
    }

    #[test]
    fn hits_and_misses_expire_on_their_own_clocks() {
        let mut c = IsolateCache::new(10, 1000, 5000);
        let (a, b) = (
            ApiKey::generate().unwrap().hash(),
            ApiKey::generate().unwrap().hash(),
        );
        c.put(a, Entry::Valid(record()), 0);
        c.put(b, Entry::Unknown, 0);
        assert_eq!(c.get(&a, 999), Some(Entry::Valid(record())));
        assert_eq!(c.get(&a, 1000), None, "hits last at most hit_ms");
        assert_eq!(c.get(&b, 4999), Some(Entry::Unknown));
        assert_eq!(c.get(&b, 5000), None);
        assert!(c.is_empty(), "expired entries are dropped");
    }

    #[test]
    fn bounded() {
        let mut c = IsolateCache::new(3, 1000, 1000);
        for _ in 0..100 {
            c.put(ApiKey::generate().unwrap().hash(), Entry::Unknown, 0);
        }
        assert_eq!(c.len(), 3);
    }

    #[test]
    fn kept_no_longer_than_allowed() {
        let mut c = IsolateCache::new(3, 1000, 1000);
        let a = ApiKey::generate().unwrap().hash();
        c.put_for(a, Entry::Valid(record()), 0, 200);
        assert!(c.get(&a, 199).is_some());
        assert_eq!(c.get(&a, 200), None);
        c.put_for(a, Entry::Valid(record()), 0, 0);
        assert!(c.is_empty(), "not at all");
    }

    #[test]
    fn entries_can_be_forgotten_one_or_all() {
        let mut c = IsolateCache::new(10, 1000, 1000);
        let (a, b) = (
            ApiKey::generate().unwrap().hash(),
            ApiKey::generate().unwrap().hash(),
        );
        c.put(a, Entry::Valid(record()), 0);
        c.put(b, Entry::Unknown, 0);
        c.remove(&a);
        assert_eq!(c.get(&a, 1), None);
        assert_eq!(c.get(&b, 1), Some(Entry::Unknown));
        c.clear();
        assert!(c.is_empty());
    }

    #[test]
    fn zero_ttl_disables() {
        let mut c = IsolateCache::new(3, 0, 0);
        c.put(ApiKey::generate().unwrap().hash(), Entry::Unknown, 0);
        assert!(c.is_empty());
    }
}
