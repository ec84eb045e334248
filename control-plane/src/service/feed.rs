//! The revocation feed (issue 29), as the edge reads it: the last `REVOCATION_FEED_WINDOW`
//! of events — a secret refused, or given a new record — held in memory and served with
//! no database query per request. A reader task keeps it current: woken by this
//! process's commits, by PostgreSQL `NOTIFY` for other replicas' commits, and once a
//! second whatever happens; it reads the rows after the last number it holds (numbers
//! follow commit order without gaps, migration 0018), so it never skips one.

use std::collections::VecDeque;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::Error;
use crate::clock::now_ms;
use crate::db::rows::FEED_CHANNEL;
use crate::db::Store;

/// Rows read per query while catching up.
const BATCH: i64 = 1000;
/// The reader reads at least this often, even without a wake-up.
const POLL: Duration = Duration::from_secs(1);

/// One event: the secret `hash` is refused from now on (`record` null), or has `record`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FeedEvent {
    pub seq: i64,
    /// SHA-256 of the secret, lowercase hex.
    pub hash: String,
    /// The secret's record from now on (what KV will hold); null: refused.
    #[schema(value_type = Option<Object>)]
    pub record: Option<Value>,
    /// When it was written, ms since the epoch.
    pub at: i64,
}

/// What `GET /api/v1/revocations` answers.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FeedPage {
    /// The last event's number: pass it as `after` next time.
    pub seq: i64,
    /// Every event after `from` is here (those after `after`, when given). A reader whose
    /// `after` is below `from` missed events that left the window: it must start over
    /// from this whole page.
    pub from: i64,
    pub window_seconds: u64,
    pub events: Vec<FeedEvent>,
}

#[derive(Default)]
struct Held {
    /// Whether the first read (which finds where the stored rows begin) was done.
    started: bool,
    events: VecDeque<FeedEvent>,
    /// The last number read.
    head: i64,
    /// Every event after this number is held.
    from: i64,
}

pub struct RevocationFeed {
    window: Duration,
    held: RwLock<Held>,
}

impl RevocationFeed {
    pub fn new(window: Duration) -> Self {
        RevocationFeed {
            window,
            held: RwLock::default(),
        }
    }

    /// The events after `after` (all that are held when `None`, or when `after` is
    /// before what is held).
    pub fn page(&self, after: Option<i64>) -> FeedPage {
        let held = self.held.read().unwrap_or_else(|e| e.into_inner());
        let after = after.filter(|a| *a >= held.from).unwrap_or(held.from);
        FeedPage {
            seq: held.head,
            from: held.from,
            window_seconds: self.window.as_secs(),
            events: held
                .events
                .iter()
                .filter(|e| e.seq > after)
                .cloned()
                .collect(),
        }
    }

    /// Reads what was committed since the last read, and forgets what left the window.
    /// How many events were read.
    pub async fn refresh(&self, store: &Store) -> Result<usize, Error> {
        let mut read = 0;
        let started = self.held.read().unwrap_or_else(|e| e.into_inner()).started;
        if !started {
            // Rows before the oldest one still stored were pruned: the feed is whole only
            // from there (or from where the numbers stand, when none is stored).
            let oldest = store.feed_after(0, 1).await?;
            let start = match oldest.first() {
                Some(row) => row.seq - 1,
                None => store.feed_head().await?,
            };
            let mut held = self.held.write().unwrap_or_else(|e| e.into_inner());
            held.head = start;
            held.from = start;
            held.started = true;
        }
        loop {
            let after = self.held.read().unwrap_or_else(|e| e.into_inner()).head;
            let rows = store.feed_after(after, BATCH).await?;
            let n = rows.len();
            let mut held = self.held.write().unwrap_or_else(|e| e.into_inner());
            for row in rows {
                if row.seq <= held.head {
                    continue; // read meanwhile by another refresh
                }
                held.head = row.seq;
                held.events.push_back(FeedEvent {
                    seq: row.seq,
                    hash: row.key_hash,
                    record: row.record.and_then(|r| serde_json::from_str(&r).ok()),
                    at: row.at_ms,
                });
            }
            read += n;
            if n < BATCH as usize {
                break;
            }
        }
        self.forget_before(now_ms() - self.window.as_millis() as i64);
        Ok(read)
    }

    fn forget_before(&self, before_ms: i64) {
        let mut held = self.held.write().unwrap_or_else(|e| e.into_inner());
        while held.events.front().is_some_and(|e| e.at < before_ms) {
            let gone = held.events.pop_front().expect("checked");
            held.from = gone.seq;
        }
        if held.events.is_empty() {
            held.from = held.head;
        }
    }

    /// Keeps the feed current for as long as the process lives: on `wake` (this process's
    /// commits), on PostgreSQL `NOTIFY` (`database_url`: other replicas'), and every
    /// second; deletes rows past twice the window once a minute.
    pub async fn run(
        self: Arc<Self>,
        store: Store,
        wake: Arc<tokio::sync::Notify>,
        database_url: Option<String>,
    ) {
        let notified = Arc::new(tokio::sync::Notify::new());
        if let Some(url) = database_url {
            tokio::spawn(listen(url, notified.clone()));
        }
        let mut last_prune = tokio::time::Instant::now();
        loop {
            if let Err(e) = self.refresh(&store).await {
                tracing::warn!(error = %e, "revocation feed: read failed; will retry");
            }
            if last_prune.elapsed() >= Duration::from_secs(60) {
                last_prune = tokio::time::Instant::now();
                let before = now_ms() - 2 * self.window.as_millis() as i64;
                if let Err(e) = store.prune_feed(before).await {
                    tracing::warn!(error = %e, "revocation feed: prune failed; will retry");
                }
            }
            tokio::select! {
                _ = wake.notified() => {}
                _ = notified.notified() => {}
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }
}

/// Wakes `notified` on every PostgreSQL notification of the feed's channel (reconnecting
/// after a failure; the one-second poll covers the gap).
async fn listen(url: String, notified: Arc<tokio::sync::Notify>) {
    loop {
        match sqlx::postgres::PgListener::connect(&crate::db::libpq_compatible(&url)).await {
            Ok(mut listener) => {
                if listener.listen(FEED_CHANNEL).await.is_ok() {
                    while listener.recv().await.is_ok() {
                        notified.notify_one();
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "revocation feed: LISTEN failed; polling"),
        }
        tokio::time::sleep(POLL).await;
    }
}
