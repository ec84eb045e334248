//! `keys kv-resync`: writes every record KV should hold, from the database, in bulk calls
//! of up to 10,000 — for a new, replaced or emptied namespace. Walks the keys in hash
//! order and saves its place after each call, so an interrupted run resumes where it
//! stopped. (It only writes; deleting what KV should not hold is the reconcile's job.)

use std::time::{Duration, Instant};

use super::client::{KvClient, MAX_BULK};
use super::writer::{write_checked, Sent, WriteError};
use crate::clock::now_ms;
use crate::db::rows::ResyncCheckpoint;
use crate::db::Store;

/// How far a resync has come, for a progress display.
pub trait Progress {
    fn start(&mut self, total: u64, done: u64);
    fn advance(&mut self, done: u64, total: u64);
}

#[derive(Debug, Clone, Copy)]
pub struct ResyncReport {
    /// Records written by this run.
    pub written: u64,
    /// Records an earlier, interrupted run had written (this one resumed after them).
    pub resumed_after: u64,
    pub sent: Sent,
    pub elapsed: Duration,
}

/// Writes every record KV should hold, resuming an interrupted run unless `restart`.
/// On an error the place reached is kept: running it again resumes there.
pub async fn resync(
    store: &Store,
    client: &KvClient,
    restart: bool,
    progress: &mut dyn Progress,
) -> Result<ResyncReport, WriteError> {
    let started = Instant::now();
    if restart {
        store.clear_resync_checkpoint().await?;
    }
    let mut place = store
        .resync_checkpoint()
        .await?
        .unwrap_or(ResyncCheckpoint {
            after_hash: String::new(),
            done: 0,
            started_at_ms: now_ms(),
        });
    let resumed_after = place.done as u64;
    // An estimate: keys come and go while the run goes on.
    let mut total = store.kv_entry_count().await? as u64;
    // Hashes after the resume point (made since) are counted in `total` already.
    total = total.max(resumed_after);
    progress.start(total, resumed_after);
    let mut sent = Sent::default();
    loop {
        let page = store
            .kv_entries_after(&place.after_hash, MAX_BULK as i64)
            .await?;
        let Some(last) = page.last() else { break };
        place.after_hash = last.key.clone();
        let n = page.len() as u64;
        let s = write_checked(store, client, page, vec![]).await?;
        sent.puts += s.puts;
        sent.deletes += s.deletes;
        sent.rate_limited += s.rate_limited;
        place.done += n as i64;
        store.save_resync_checkpoint(&place).await?;
        total = total.max(place.done as u64);
        progress.advance(place.done as u64, total);
        metrics::counter!("metlo_kv_resync_written_total").increment(n);
    }
    store.clear_resync_checkpoint().await?;
    Ok(ResyncReport {
        written: place.done as u64 - resumed_after,
        resumed_after,
        sent,
        elapsed: started.elapsed(),
    })
}
