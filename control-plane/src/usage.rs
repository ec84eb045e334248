//! When each key was last used, without a database write per request: verifications
//! here and reports from the edge only update an in-memory map (latest time per key), and
//! a background task writes it out every `LAST_USED_FLUSH_SECONDS` (default 60), in one
//! transaction — at most one write per key per interval, however busy the key.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::routing::post;
use axum::{Json, Router};
use dashmap::DashMap;
use metlo_shared::KeyHash;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{body_bytes, ApiError, ErrorBody};
use crate::store::Store;
use crate::AppState;

/// Most entries one usage report may carry.
pub const MAX_REPORT_ENTRIES: usize = 1000;
/// A report of 1,000 entries is about 85 KB.
const MAX_REPORT_BYTES: usize = 128 * 1024;

pub fn router() -> Router<AppState> {
    Router::new().route(
        "/api/v1/usage",
        post(report).layer(DefaultBodyLimit::max(MAX_REPORT_BYTES)),
    )
}

/// Last-use times not yet written, by secret hash.
pub struct Usage {
    pending: DashMap<KeyHash, i64>,
    enabled: bool,
}

impl Usage {
    pub fn new(enabled: bool) -> Self {
        Usage {
            pending: DashMap::new(),
            enabled,
        }
    }

    /// A successful verification, now.
    pub fn used(&self, hash: &KeyHash) {
        if self.enabled {
            self.pending
                .insert(*hash, chrono::Utc::now().timestamp_millis());
        }
    }

    /// A use at `at_ms` (from the edge); keeps the latest.
    pub fn used_at(&self, hash: &KeyHash, at_ms: i64) {
        if !self.enabled {
            return;
        }
        self.pending
            .entry(*hash)
            .and_modify(|t| *t = (*t).max(at_ms))
            .or_insert(at_ms);
    }

    fn take(&self) -> Vec<(KeyHash, i64)> {
        let hashes: Vec<KeyHash> = self.pending.iter().map(|e| *e.key()).collect();
        hashes
            .into_iter()
            .filter_map(|h| self.pending.remove(&h))
            .collect()
    }
}

/// Writes pending last-use times every `every`; a failed write is put back and retried.
pub fn spawn_flusher(store: Store, usage: Arc<Usage>, every: Duration) {
    if !usage.enabled {
        return;
    }
    tokio::spawn(async move {
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
                    for (hash, at) in batch {
                        usage.used_at(&hash, at);
                    }
                }
            }
        }
    });
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

#[derive(Debug, Serialize, ToSchema)]
pub struct UsageAccepted {
    pub accepted: usize,
}

/// Decodes a usage report: every hash well-formed, every time a non-negative integer
/// (times in the future count as now).
pub fn parse_usage_report(body: &[u8], now_ms: i64) -> Result<Vec<(KeyHash, i64)>, ApiError> {
    let report: UsageReport = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))?;
    if report.used.len() > MAX_REPORT_ENTRIES {
        return Err(ApiError::BadRequest(format!(
            "at most {MAX_REPORT_ENTRIES} entries per report"
        )));
    }
    report
        .used
        .into_iter()
        .map(|(hash, at)| {
            let hash = KeyHash::from_hex(&hash).map_err(|_| {
                ApiError::BadRequest(
                    "every key of `used` must be a SHA-256 in lowercase hex".into(),
                )
            })?;
            if at < 0 {
                return Err(ApiError::BadRequest(
                    "times must be milliseconds since the epoch".into(),
                ));
            }
            Ok((hash, at.min(now_ms)))
        })
        .collect()
}

/// Report key uses seen at the edge (the Worker sends these in batches), for `lastUsed`.
#[utoipa::path(post, path = "/api/v1/usage", tag = "edge", request_body = UsageReport,
    responses((status = 200, body = UsageAccepted), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 413, body = ErrorBody)),
    security(("api_key" = [])))]
async fn report(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<UsageAccepted>, ApiError> {
    let body = body_bytes(body, MAX_REPORT_BYTES)?;
    let used = parse_usage_report(&body, chrono::Utc::now().timestamp_millis())?;
    for (hash, at) in &used {
        state.usage.used_at(hash, *at);
    }
    Ok(Json(UsageAccepted {
        accepted: used.len(),
    }))
}
