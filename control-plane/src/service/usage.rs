//! When each key was last used, without a database write per request: verifications
//! here and reports from the edge only update an in-memory map (latest time per key), and
//! a background task writes it out every `LAST_USED_FLUSH_SECONDS` (default 60), in one
//! transaction — at most one write per key per interval, however busy the key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metlo_shared::KeyHash;
use serde::Deserialize;
use utoipa::ToSchema;

use super::Error;
use crate::clock::now_ms;
use crate::db::Store;

/// Most entries one usage report may carry.
pub const MAX_REPORT_ENTRIES: usize = 1000;

/// Last-use times not yet written, by secret hash.
pub struct Usage {
    pending: Mutex<HashMap<KeyHash, i64>>,
    enabled: bool,
}

impl Usage {
    pub fn new(enabled: bool) -> Self {
        Usage {
            pending: Mutex::new(HashMap::new()),
            enabled,
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// A successful verification, now.
    pub fn used(&self, hash: &KeyHash) {
        if self.enabled {
            let now = now_ms();
            self.pending.lock().unwrap().insert(*hash, now);
        }
    }

    /// Uses at the given times (from the edge); keeps the latest per key.
    pub fn used_at(&self, uses: &[(KeyHash, i64)]) {
        if !self.enabled {
            return;
        }
        let mut pending = self.pending.lock().unwrap();
        for (hash, at_ms) in uses {
            pending
                .entry(*hash)
                .and_modify(|t| *t = (*t).max(*at_ms))
                .or_insert(*at_ms);
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
        let usage = Usage::new(true);
        let a = ApiKey::generate().unwrap().hash();
        usage.used_at(&[(a, 20), (a, 10)]);
        assert_eq!(usage.take(), vec![(a, 20)]);
        assert!(usage.take().is_empty());
        let off = Usage::new(false);
        off.used(&a);
        assert!(off.take().is_empty());
    }
}
