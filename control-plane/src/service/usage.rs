//! When each key was last used, without a database write per request: verifications
//! here and reports from the edge only update an in-memory map (latest time per key), and
//! a background task writes it out every `LAST_USED_FLUSH_SECONDS` (default 60), in short
//! statements of 500 uses — at most one write per key per interval, however busy the key.
//! Edge reports are taken only for hashes of existing keys, and the map holds at most
//! twice `MAX_API_KEYS` keys: made-up hashes cannot grow it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metlo_shared::KeyHash;
use serde::Deserialize;
use utoipa::ToSchema;

use super::Error;
use crate::db::Store;

type Pending = HashMap<KeyHash, i64, foldhash::fast::RandomState>;

/// Most entries one usage report may carry.
pub const MAX_REPORT_ENTRIES: usize = 1000;

/// Last-use times not yet written, by secret hash; at most `capacity` keys (uses of
/// other keys past it are dropped and counted in `metlo_usage_dropped_total`). Hashed
/// with foldhash (seeded per process): SipHash over 32 bytes was a measurable part of a
/// cached verification.
pub struct Usage {
    pending: Mutex<Pending>,
    enabled: bool,
    capacity: usize,
}

impl Usage {
    /// `capacity`: keys pending at most (the instance's key limit, with room for secrets
    /// in a roll's overlap, is enough).
    pub fn new(enabled: bool, capacity: usize) -> Self {
        Usage {
            pending: Mutex::new(Pending::default()),
            enabled,
            capacity,
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// A successful verification at `now_ms` (the caller's clock reading: one per request).
    pub fn used(&self, hash: &KeyHash, now_ms: i64) {
        if self.enabled {
            self.used_at(&[(*hash, now_ms)]);
        }
    }

    /// Uses at the given times (from the edge); keeps the latest per key.
    pub fn used_at(&self, uses: &[(KeyHash, i64)]) {
        if !self.enabled {
            return;
        }
        let mut dropped = 0;
        let mut pending = self.pending.lock().unwrap();
        for (hash, at_ms) in uses {
            let full = pending.len() >= self.capacity;
            match pending.get_mut(hash) {
                Some(t) => *t = (*t).max(*at_ms),
                None if full => dropped += 1,
                None => {
                    pending.insert(*hash, *at_ms);
                }
            }
        }
        drop(pending);
        if dropped > 0 {
            metrics::counter!("metlo_usage_dropped_total").increment(dropped);
        }
    }

    /// Everything pending, emptying the map in one step (a use recorded meanwhile lands
    /// in the next batch, never in neither).
    fn take(&self) -> Vec<(KeyHash, i64)> {
        std::mem::take(&mut *self.pending.lock().unwrap())
            .into_iter()
            .collect()
    }
}

/// Writes pending last-use times every `every`, for as long as the process runs; a failed
/// write is put back and retried.
pub async fn flush_forever(store: Store, usage: Arc<Usage>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let batch = usage.take();
        if batch.is_empty() {
            continue;
        }
        let rows: Vec<(String, i64)> = batch.iter().map(|(h, t)| (h.to_hex(), *t)).collect();
        match store.record_usage(&rows).await {
            Ok(()) => {
                metrics::counter!("metlo_last_used_writes_total").increment(rows.len() as u64)
            }
            Err(e) => {
                tracing::warn!(error = %e, keys = rows.len(), "recording last use failed; will retry");
                usage.used_at(&batch);
            }
        }
    }
}

/// Takes an edge report's uses of keys that exist (one query); returns how many were
/// taken and how many named no key.
pub async fn report(
    store: &Store,
    usage: &Usage,
    uses: Vec<(KeyHash, i64)>,
) -> Result<(usize, usize), Error> {
    let hexes: Vec<String> = uses.iter().map(|(h, _)| h.to_hex()).collect();
    let known = store.known_hashes(&hexes).await?;
    let taken: Vec<(KeyHash, i64)> = uses
        .into_iter()
        .zip(&hexes)
        .filter(|(_, hex)| known.contains(*hex))
        .map(|(use_, _)| use_)
        .collect();
    usage.used_at(&taken);
    Ok((taken.len(), hexes.len() - taken.len()))
}

/// A batch of key uses seen by an edge Worker.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UsageReport {
    /// SHA-256 (64 lowercase hex characters) of each key used → the last time it was
    /// used, in milliseconds since the epoch. At most 1,000 entries.
    #[schema(value_type = HashMap<String, u64>)]
    pub used: HashMap<String, i64>,
}

impl UsageReport {
    /// The uses reported, or what is wrong with the report: every hash well-formed,
    /// every time a non-negative integer (times in the future count as now).
    pub fn validate(self, now_ms: i64) -> Result<Vec<(KeyHash, i64)>, Error> {
        if self.used.len() > MAX_REPORT_ENTRIES {
            return Err(Error::invalid(format!(
                "at most {MAX_REPORT_ENTRIES} entries per report"
            )));
        }
        self.used
            .into_iter()
            .map(|(hash, at)| {
                let hash = KeyHash::from_hex(&hash).map_err(|_| {
                    Error::invalid("every key of `used` must be a SHA-256 in lowercase hex")
                })?;
                if at < 0 {
                    return Err(Error::invalid("times must be milliseconds since the epoch"));
                }
                Ok((hash, at.min(now_ms)))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metlo_shared::ApiKey;

    #[test]
    fn keeps_the_latest_use_and_takes_everything_once() {
        let usage = Usage::new(true, 10);
        let a = ApiKey::generate().unwrap().hash();
        usage.used_at(&[(a, 20), (a, 10)]);
        assert_eq!(usage.take(), vec![(a, 20)]);
        assert!(usage.take().is_empty());
        let off = Usage::new(false, 10);
        off.used(&a, 30);
        assert!(off.take().is_empty());
    }

    #[test]
    fn bounded_keys_already_pending_still_move() {
        let usage = Usage::new(true, 2);
        let keys: Vec<KeyHash> = (0..3).map(|_| ApiKey::generate().unwrap().hash()).collect();
        usage.used_at(&[(keys[0], 1), (keys[1], 1), (keys[2], 1)]);
        usage.used_at(&[(keys[0], 5)]);
        let mut taken = usage.take();
        taken.sort_by_key(|(h, _)| *h != keys[0]);
        assert_eq!(taken.len(), 2, "the third was dropped");
        assert_eq!(taken[0], (keys[0], 5));
    }
}
