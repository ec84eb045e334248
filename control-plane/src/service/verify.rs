//! Verification: a secret hash's record through the cache, the database only on a miss
//! (and then only within the caller's failure budget and the bound on concurrent lookups).

use std::sync::{Arc, LazyLock};

use metlo_shared::{KeyHash, KeyRecord};

use super::abuse::LookupGate;
use super::Error;
use crate::cache::{Cached, VerifyCache};
use crate::db::Store;

/// The record for a secret hash, through the cache. `None`: not a key (unknown, deleted
/// or past its roll overlap). Expiry is the caller's to check: the record carries it.
/// A cache miss asks `may_query` first (the caller's per-source limit), then the `gate`
/// (concurrent lookups; busy past it).
pub async fn lookup(
    store: &Store,
    cache: &VerifyCache,
    gate: &LookupGate,
    hash: &KeyHash,
    may_query: impl FnOnce() -> Result<(), Error>,
) -> Result<Option<Arc<KeyRecord>>, Error> {
    // Handles made once (the recorder is installed before the first request): a
    // registry lookup per verification was measurable.
    static HIT: LazyLock<metrics::Counter> =
        LazyLock::new(|| metrics::counter!("metlo_verify_cache_total", "result" => "hit"));
    static MISS: LazyLock<metrics::Counter> =
        LazyLock::new(|| metrics::counter!("metlo_verify_cache_total", "result" => "miss"));
    if let Some(cached) = cache.get(hash).await {
        HIT.increment(1);
        return Ok(match cached {
            Cached::Valid(record) => Some(record),
            Cached::Absent => None,
        });
    }
    MISS.increment(1);
    may_query()?;
    // Boxed: the query's future is large, and a cache hit should not carry its size.
    Box::pin(look_up_uncached(store, cache, gate, hash)).await
}

async fn look_up_uncached(
    store: &Store,
    cache: &VerifyCache,
    gate: &LookupGate,
    hash: &KeyHash,
) -> Result<Option<Arc<KeyRecord>>, Error> {
    static LOOKUPS: LazyLock<metrics::Counter> =
        LazyLock::new(|| metrics::counter!("metlo_verify_lookups_total"));
    let permit = gate.enter().await?;
    LOOKUPS.increment(1);
    let record = store
        .find_by_hash(hash)
        .await?
        .map(|k| Arc::new(k.record()));
    drop(permit);
    let entry = match &record {
        Some(r) => Cached::Valid(r.clone()),
        None => Cached::Absent,
    };
    cache.add(hash, entry).await;
    Ok(record)
}
