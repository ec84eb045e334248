//! Bulk writes for the resync and the reconcile, which write outside the outbox: retried
//! through rate limits and passing failures, and checked against the database afterwards
//! so that a key changed or deleted meanwhile never keeps an old record in KV.

use std::collections::HashMap;
use std::time::Duration;

use super::client::{KvClient, KvError};
use crate::db::rows::KvEntry;
use crate::db::Store;

/// Failed attempts (429s aside) per write before the run stops (a resync resumes where it
/// stopped).
const ATTEMPTS: u32 = 8;
/// 429s waited out per write before the run stops.
const RATE_LIMITED_ATTEMPTS: u32 = 100;
/// Waits after a 429 without `Retry-After`.
const RATE_LIMIT_WAIT: Duration = Duration::from_secs(10);
const BACKOFF_START: Duration = Duration::from_millis(500);
/// Rounds of "re-read the database, fix what changed" after a write.
const CHECK_ROUNDS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("the KV API: {0}")]
    Kv(#[from] KvError),
    #[error("the database: {0}")]
    Store(#[from] crate::db::StoreError),
    #[error("the KV API left {0} updates unapplied after {ATTEMPTS} attempts")]
    Unapplied(usize),
}

/// What a write sent.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub puts: u64,
    pub deletes: u64,
    /// API calls answered 429 (each waited out).
    pub rate_limited: u64,
}

/// Writes `puts` and deletes `deletes`, then makes sure each still matches the database:
/// a key created, changed or deleted while the write was in flight may have had its own
/// update sent by the outbox before this older one landed. Whatever differs is written
/// again, until nothing does (at most [`CHECK_ROUNDS`] rounds).
pub async fn write_checked(
    store: &Store,
    client: &KvClient,
    mut puts: Vec<KvEntry>,
    mut deletes: Vec<String>,
) -> Result<Sent, WriteError> {
    let mut sent = Sent::default();
    for _ in 0..CHECK_ROUNDS {
        if puts.is_empty() && deletes.is_empty() {
            break;
        }
        write(client, &puts, &deletes, &mut sent).await?;
        let written: Vec<String> = puts
            .iter()
            .map(|e| e.key.clone())
            .chain(deletes.iter().cloned())
            .collect();
        let mut now = store.kv_entries_for(&written).await?;
        let mut wrote: HashMap<String, Option<String>> =
            deletes.drain(..).map(|k| (k, None)).collect();
        wrote.extend(puts.drain(..).map(|e| (e.key, Some(e.value))));
        for (key, value) in wrote {
            match (value, now.remove(&key)) {
                (Some(v), Some(current)) if v == current => {}
                (None, None) => {}
                (_, Some(current)) => puts.push(KvEntry {
                    key,
                    value: current,
                }),
                (Some(_), None) => deletes.push(key),
            }
        }
    }
    if !puts.is_empty() || !deletes.is_empty() {
        // Keys changing faster than they can be written: the outbox carries their latest
        // update anyway.
        tracing::warn!(
            left = puts.len() + deletes.len(),
            "keys kept changing during the KV write; the outbox sends their latest state"
        );
    }
    Ok(sent)
}

/// One write of `puts` then `deletes`, re-sending what the API left unapplied and
/// retrying 429s (after `Retry-After`) and passing failures.
async fn write(
    client: &KvClient,
    puts: &[KvEntry],
    deletes: &[String],
    sent: &mut Sent,
) -> Result<(), WriteError> {
    let mut puts: Vec<(String, String)> = puts
        .iter()
        .map(|e| (e.key.clone(), e.value.clone()))
        .collect();
    let mut deletes = deletes.to_vec();
    let mut backoff = BACKOFF_START;
    let (mut failures, mut limited) = (0, 0);
    loop {
        let result = async {
            if !puts.is_empty() {
                let unsent = client.bulk_put(&puts).await?;
                sent.puts += (puts.len() - unsent.len()) as u64;
                puts.retain(|(k, _)| unsent.contains(k));
            }
            if !deletes.is_empty() {
                let unsent = client.bulk_delete(&deletes).await?;
                sent.deletes += (deletes.len() - unsent.len()) as u64;
                deletes.retain(|k| unsent.contains(k));
            }
            Ok::<_, KvError>(())
        }
        .await;
        let wait = match result {
            Ok(()) if puts.is_empty() && deletes.is_empty() => return Ok(()),
            Ok(()) => {
                failures += 1;
                if failures == ATTEMPTS {
                    return Err(WriteError::Unapplied(puts.len() + deletes.len()));
                }
                backoff
            }
            Err(KvError::RateLimited { retry_after }) => {
                sent.rate_limited += 1;
                limited += 1;
                metrics::counter!("metlo_kv_sync_rate_limited_total").increment(1);
                if limited == RATE_LIMITED_ATTEMPTS {
                    return Err(KvError::RateLimited { retry_after }.into());
                }
                retry_after.unwrap_or(RATE_LIMIT_WAIT)
            }
            Err(e @ KvError::Rejected { .. }) => return Err(e.into()),
            Err(e) => {
                failures += 1;
                if failures == ATTEMPTS {
                    return Err(e.into());
                }
                tracing::warn!(error = %e, failures, "KV write failed; retrying");
                backoff
            }
        };
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}
