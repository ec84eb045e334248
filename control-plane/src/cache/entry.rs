//! What a cache entry is, shared by both kinds of cache.

use std::sync::Arc;
use std::time::Duration;

use metlo_shared::KeyRecord;

/// What the cache knows about a hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cached {
    /// Shared: a cache hit clones a pointer, not the record's strings.
    Valid(Arc<KeyRecord>),
    /// Unknown or deleted: refuse.
    Absent,
    /// Disabled: refuse, but only for the cache TTL, and a record may replace it (the key
    /// may be enabled again; a tombstone is for good).
    Disabled,
}

/// Tombstones outlive any in-flight verification by a wide margin. Keys are random, so a
/// deleted key's hash never becomes valid again: a long tombstone is always right.
pub(super) const TOMBSTONE_TTL: Duration = Duration::from_secs(3600);

/// Tombstones live long; replaced records as long as any verification result.
pub(super) fn ttl_for(value: &Cached, ttl: Duration) -> Duration {
    match value {
        Cached::Absent => TOMBSTONE_TTL,
        Cached::Valid(_) | Cached::Disabled => ttl,
    }
}

/// A background task a cache needs (run by the composition root for as long as the
/// process lives).
pub type Task = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
