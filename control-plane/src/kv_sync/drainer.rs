//! The drainer: sends the outbox's KV updates to Workers KV. Runs inside `serve`.
//!
//! Each round claims a batch (on Postgres with `FOR UPDATE SKIP LOCKED`, so replicas
//! never send the same row), keeps the latest update per KV key, sends puts and deletes
//! in bulk, and deletes the rows only after KV accepted them. Failures back off
//! exponentially with jitter (429s honour `Retry-After`) and are recorded on the rows and
//! in [`SyncStatus`]. It wakes at once when this process enqueues (a local notification)
//! or another replica does (Postgres `LISTEN`), and polls as a fallback.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::client::{KvClient, KvError};
use crate::clock::now_ms;
use crate::db::rows::Sent;
use crate::db::rows::OUTBOX_CHANNEL;
use crate::db::Store;

const BATCH: i64 = 1000;
const POLL: Duration = Duration::from_secs(2);
const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Shared by the drainer, the store (which wakes it after committing an outbox write),
/// and `/readyz`.
#[derive(Default)]
pub struct SyncStatus {
    pub wake: Arc<Notify>,
    pub last_error: Mutex<Option<String>>,
}

/// Sends the outbox for as long as the process lives (spawned by the composition root,
/// beside [`listen`] on Postgres).
pub async fn drain_forever(store: Store, client: KvClient, status: Arc<SyncStatus>) {
    let mut backoff = BACKOFF_START;
    loop {
        match drain_once(&store, &client).await {
            Ok(sent) => {
                backoff = BACKOFF_START;
                *status.last_error.lock().unwrap() = None;
                if sent < BATCH as usize {
                    // Caught up: sleep until woken, or poll.
                    let _ = tokio::time::timeout(POLL, status.wake.notified()).await;
                }
            }
            Err((e, retry_after)) => {
                metrics::counter!("metlo_kv_sync_errors_total").increment(1);
                tracing::warn!(error = %e, "KV sync failed; will retry");
                *status.last_error.lock().unwrap() = Some(e);
                let wait = retry_after.unwrap_or(backoff).min(BACKOFF_MAX * 10);
                tokio::time::sleep(with_jitter(wait)).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
        update_depth_metrics(&store).await;
    }
}

/// Sends the whole outbox now, batch after batch, until it is empty or a batch fails
/// (`App::flush`, for tests; the running server has [`drain_forever`]).
pub async fn drain_all(store: &Store, client: &KvClient) {
    loop {
        match drain_once(store, client).await {
            Ok(sent) if sent > 0 => continue,
            Ok(_) => break,
            Err((e, _)) => {
                tracing::warn!(error = %e, "KV sync failed");
                break;
            }
        }
    }
    update_depth_metrics(store).await;
}

/// One batch. Returns how many rows it handled, or the error and an optional wait.
async fn drain_once(store: &Store, client: &KvClient) -> Result<usize, (String, Option<Duration>)> {
    let claim = store
        .claim_outbox(BATCH)
        .await
        .map_err(|e| (e.to_string(), None))?;
    let handled = claim.rows.len();
    if handled == 0 {
        store
            .finish_claim(claim, Sent::All)
            .await
            .map_err(|e| (e.to_string(), None))?;
        return Ok(0);
    }
    // The latest update per key wins (rows arrive in id order).
    let mut latest: HashMap<&str, Option<&str>> = HashMap::new();
    for row in &claim.rows {
        latest.insert(&row.kv_key, row.value.as_deref());
    }
    let mut puts = vec![];
    let mut deletes = vec![];
    for (key, value) in latest {
        match value {
            Some(v) => puts.push((key.to_owned(), v.to_owned())),
            None => deletes.push(key.to_owned()),
        }
    }
    let result = send(client, &puts, &deletes).await;
    let error = match &result {
        Ok(unsent) if unsent.is_empty() => None,
        Ok(unsent) => Some(format!(
            "the KV API did not apply {} of {} updates; they will be sent again",
            unsent.len(),
            puts.len() + deletes.len()
        )),
        Err(e) => Some(e.to_string()),
    };
    let unsent: HashSet<&str> = match &result {
        Ok(unsent) => unsent.iter().map(String::as_str).collect(),
        Err(_) => HashSet::new(),
    };
    let outcome = match (&result, &error) {
        (_, None) => Sent::All,
        (Ok(_), Some(error)) => Sent::Partly {
            unsent: &unsent,
            error,
        },
        (Err(_), Some(error)) => Sent::Failed(error),
    };
    store
        .finish_claim(claim, outcome)
        .await
        .map_err(|e| (e.to_string(), None))?;
    match result {
        Ok(unsent) => {
            let unsent_puts = puts.iter().filter(|(k, _)| unsent.contains(k)).count();
            metrics::counter!("metlo_kv_sync_sent_total", "op" => "put")
                .increment((puts.len() - unsent_puts) as u64);
            metrics::counter!("metlo_kv_sync_sent_total", "op" => "delete")
                .increment(deletes.len().saturating_sub(unsent.len() - unsent_puts) as u64);
            match error {
                // Retried after the usual backoff, like a failed call.
                Some(e) => Err((e, None)),
                None => Ok(handled),
            }
        }
        Err(e) => {
            let retry_after = match &e {
                KvError::RateLimited { retry_after } => {
                    Some(retry_after.unwrap_or(Duration::from_secs(60)))
                }
                _ => None,
            };
            Err((e.to_string(), retry_after))
        }
    }
}

/// Puts, then deletes; the keys the API did not apply.
async fn send(
    client: &KvClient,
    puts: &[(String, String)],
    deletes: &[String],
) -> Result<Vec<String>, KvError> {
    let mut unsent = vec![];
    if !puts.is_empty() {
        unsent.extend(client.bulk_put(puts).await?);
    }
    if !deletes.is_empty() {
        unsent.extend(client.bulk_delete(deletes).await?);
    }
    Ok(unsent)
}

/// Wakes this replica's drainer when any replica enqueues (Postgres `NOTIFY`).
pub async fn listen(url: String, status: Arc<SyncStatus>) {
    loop {
        match sqlx::postgres::PgListener::connect(&crate::db::libpq_compatible(&url)).await {
            Ok(mut listener) => {
                if listener.listen(OUTBOX_CHANNEL).await.is_ok() {
                    while listener.recv().await.is_ok() {
                        status.wake.notify_one();
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "outbox LISTEN connection failed; polling meanwhile")
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

pub async fn update_depth_metrics(store: &Store) {
    if let Ok((depth, oldest)) = store.outbox_depth().await {
        metrics::gauge!("metlo_kv_outbox_depth").set(depth as f64);
        let age = oldest.map(|ms| (now_ms() - ms).max(0) as f64 / 1000.0);
        metrics::gauge!("metlo_kv_outbox_oldest_age_seconds").set(age.unwrap_or(0.0));
    }
}

/// ±25 % so replicas that failed together do not retry in lockstep.
fn with_jitter(d: Duration) -> Duration {
    d.mul_f64(0.75 + fastrand::f64() * 0.5)
}
