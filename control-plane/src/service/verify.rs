//! Verification: a secret hash's record through the cache, the database only on a miss
//! (and then only within the caller's failure budget and the bound on concurrent lookups).
//! Concurrent misses of one hash share one lookup: a burst of requests with one key on a
//! cold cache (a client starting 200 calls at once) costs one query and one gate slot,
//! not 200 (which would queue at the gate and turn into 503s).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock};

use metlo_shared::{KeyHash, KeyRecord};
use tokio::sync::OnceCell;

use super::abuse::LookupGate;
use super::Error;
use crate::cache::{Cached, VerifyCache};
use crate::db::Store;

type Found = Option<Arc<KeyRecord>>;

/// The database side of verification: the bound on concurrent lookups, the lookups in
/// flight (one per hash), and the hashes lately found to be no key.
pub struct Lookups {
    gate: LookupGate,
    in_flight: Mutex<HashMap<KeyHash, Arc<OnceCell<Found>>>>,
    missed: MissedOnce,
}

impl Lookups {
    pub fn new(max_concurrent: usize) -> Self {
        Lookups {
            gate: LookupGate::new(max_concurrent),
            in_flight: Mutex::new(HashMap::new()),
            missed: MissedOnce::new(),
        }
    }

    /// The lookup in flight for `hash`, joined or begun.
    fn join(&self, hash: &KeyHash) -> Joined<'_> {
        let mut in_flight = self.in_flight.lock().unwrap();
        let flight = in_flight.entry(*hash).or_default().clone();
        Joined {
            lookups: self,
            hash: *hash,
            flight: Some(flight),
        }
    }

    #[cfg(test)]
    fn in_flight(&self) -> usize {
        self.in_flight.lock().unwrap().len()
    }
}

/// Hashes the database lately said were no key, to cache "absent" only for a hash asked
/// about again: a flood of made-up keys (each new) then costs no cache entry (in Redis, no
/// write) and no eviction work, while a client retrying one unknown key is answered from
/// the cache from its third try. A fixed table of fingerprints, one per slot: a newer
/// miss overwrites an older one, so memory stays 128 KiB whatever the flood, and a
/// forgotten miss costs one more lookup (within the caller's failure budget).
/// Tombstones of deleted keys do not come through here: a delete writes its own.
/// Made on the first miss: an idle process does not carry it (made at start, it grew
/// the idle RSS by 3-5 MiB under mimalloc, far more than its size).
struct MissedOnce {
    slots: OnceLock<Box<[AtomicU64]>>,
}

impl MissedOnce {
    const SLOTS: usize = 16 * 1024;

    fn new() -> Self {
        MissedOnce {
            slots: OnceLock::new(),
        }
    }

    /// Records a miss of `hash`; whether it had missed before (and is still remembered).
    /// A SHA-256 is uniform, so its own bytes choose the slot and the fingerprint (a
    /// crafted collision only makes a miss forgotten sooner).
    fn missed_again(&self, hash: &KeyHash) -> bool {
        let bytes = hash.as_bytes();
        let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let slots = self
            .slots
            .get_or_init(|| (0..Self::SLOTS).map(|_| AtomicU64::new(0)).collect());
        let slot = &slots[word(0) as usize % Self::SLOTS];
        let fingerprint = word(8) | 1; // never the empty slot's 0
        slot.swap(fingerprint, Ordering::Relaxed) == fingerprint
    }
}

/// One caller's share of a lookup; the last one out removes it (also when callers are
/// cancelled mid-lookup), so the map holds only lookups someone still waits for.
struct Joined<'a> {
    lookups: &'a Lookups,
    hash: KeyHash,
    flight: Option<Arc<OnceCell<Found>>>,
}

impl Drop for Joined<'_> {
    fn drop(&mut self) {
        let mut in_flight = self.lookups.in_flight.lock().unwrap();
        // Released under the lock, so the count read by the next one out is exact.
        let flight = self.flight.take().expect("taken only here");
        if Arc::strong_count(&flight) == 2 {
            in_flight.remove(&self.hash);
        }
    }
}

static HIT: LazyLock<metrics::Counter> =
    LazyLock::new(|| metrics::counter!("metlo_verify_cache_total", "result" => "hit"));

/// What this process's cache says about a hash, without waiting for anything (the
/// request path's fast path): `None` when it does not know.
pub fn cached(cache: &VerifyCache, hash: &KeyHash) -> Option<Found> {
    let cached = cache.get_local(hash)?;
    HIT.increment(1);
    Some(found(cached))
}

fn found(cached: Cached) -> Found {
    match cached {
        Cached::Valid(record) => Some(record),
        Cached::Absent | Cached::Disabled => None,
    }
}

/// The record for a secret hash, through the cache. `None`: not a key (unknown, deleted
/// or past its roll overlap). Expiry is the caller's to check: the record carries it.
/// A cache miss asks `may_query` first (the caller's per-source limit), then the gate
/// (concurrent lookups; busy past it).
pub async fn lookup(
    store: &Store,
    cache: &VerifyCache,
    lookups: &Lookups,
    hash: &KeyHash,
    may_query: impl FnOnce() -> Result<(), Error>,
) -> Result<Found, Error> {
    // Handles made once (the recorder is installed before the first request): a
    // registry lookup per verification was measurable.
    static MISS: LazyLock<metrics::Counter> =
        LazyLock::new(|| metrics::counter!("metlo_verify_cache_total", "result" => "miss"));
    if let Some(found) = cached(cache, hash) {
        return Ok(found);
    }
    if let Some(shared) = cache.get_shared(hash).await {
        HIT.increment(1);
        return Ok(found(shared));
    }
    MISS.increment(1);
    may_query()?;
    // Boxed: the query's future is large, and a cache hit should not carry its size.
    Box::pin(look_up_uncached(store, cache, lookups, hash)).await
}

async fn look_up_uncached(
    store: &Store,
    cache: &VerifyCache,
    lookups: &Lookups,
    hash: &KeyHash,
) -> Result<Found, Error> {
    static LOOKUPS: LazyLock<metrics::Counter> =
        LazyLock::new(|| metrics::counter!("metlo_verify_lookups_total"));
    let joined = lookups.join(hash);
    let flight = joined.flight.as_ref().expect("held until drop");
    // A failed lookup (busy gate, database error) is not shared: the next caller in
    // line tries its own.
    let found = flight
        .get_or_try_init(|| async {
            let permit = lookups.gate.enter().await?;
            LOOKUPS.increment(1);
            let record = store
                .find_by_hash(hash)
                .await?
                .map(|k| Arc::new(k.record()));
            drop(permit);
            let entry = match &record {
                Some(r) => Some(Cached::Valid(r.clone())),
                None if lookups.missed.missed_again(hash) => Some(Cached::Absent),
                None => None,
            };
            if let Some(entry) = entry {
                cache.add(hash, entry).await;
            }
            Ok::<_, Error>(record)
        })
        .await?;
    Ok(found.clone())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use metlo_shared::ApiKey;

    use super::*;

    #[tokio::test]
    async fn lookups_in_flight_are_shared_and_forgotten() {
        let store = Store::memory().await;
        let cache = VerifyCache::memory(Duration::from_secs(60));
        let lookups = Lookups::new(1);
        let hash = ApiKey::generate().unwrap().hash();
        let found = futures_util::future::join_all(
            (0..50).map(|_| look_up_uncached(&store, &cache, &lookups, &hash)),
        )
        .await;
        assert!(found.iter().all(|f| matches!(f, Ok(None))));
        assert_eq!(
            lookups.in_flight(),
            0,
            "the last one out removed the lookup"
        );
        assert_eq!(cache.get(&hash).await, None, "one miss caches nothing");
        assert!(matches!(
            look_up_uncached(&store, &cache, &lookups, &hash).await,
            Ok(None)
        ));
        assert_eq!(
            cache.get(&hash).await,
            Some(Cached::Absent),
            "the second caches the absence"
        );

        // Callers dropped mid-lookup (clients gone) leave nothing behind either.
        let other = ApiKey::generate().unwrap().hash();
        let permit = lookups.gate.enter().await.unwrap(); // the lookups wait on the gate
        let waiting = futures_util::future::join_all(
            (0..3).map(|_| look_up_uncached(&store, &cache, &lookups, &other)),
        );
        assert!(tokio::time::timeout(Duration::from_millis(20), waiting)
            .await
            .is_err());
        drop(permit);
        assert_eq!(lookups.in_flight(), 0);
    }
}

#[cfg(test)]
mod missed_once_tests {
    use metlo_shared::{ApiKey, KeyHash};

    use super::MissedOnce;

    /// `of` with hex digit `at` changed: 1 is in the slot's bits, 20 in the fingerprint.
    fn changed(of: &KeyHash, at: usize) -> KeyHash {
        let mut hex = of.to_hex();
        let digit = if hex.as_bytes()[at] == b'0' { "1" } else { "0" };
        hex.replace_range(at..at + 1, digit);
        KeyHash::from_hex(&hex).unwrap()
    }

    #[test]
    fn a_miss_is_remembered_until_its_slot_is_taken() {
        let missed = MissedOnce::new();
        let a = ApiKey::generate().unwrap().hash();
        let b = changed(&changed(&a, 1), 20); // another slot
        assert!(!missed.missed_again(&a));
        assert!(!missed.missed_again(&b));
        assert!(missed.missed_again(&a));
        assert!(missed.missed_again(&a), "still remembered");
        // Another miss in b's slot: b is forgotten (one more lookup), never confused.
        let other = changed(&b, 20);
        assert!(!missed.missed_again(&other));
        assert!(!missed.missed_again(&b));
        assert!(missed.missed_again(&b));
        assert!(missed.missed_again(&a), "other slots untouched");
    }
}
