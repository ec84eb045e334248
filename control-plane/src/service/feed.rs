//! The revocation feed (issue 29), as the edge reads it: the last `REVOCATION_FEED_WINDOW`
//! of events — a secret refused, or given a new record — held in memory and served with
//! no database query per request. A reader task keeps it current: woken by this
//! process's commits, by PostgreSQL `NOTIFY` for other replicas' commits, and once a
//! quarter second whatever happens; it reads the rows after the last number it holds (numbers
//! follow commit order without gaps, migration 0018), so it never skips one.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use metlo_shared::policy::RoutePolicy;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::Error;
use crate::clock::{iso8601, now_ms};
use crate::db::policy::POLICY_FEED_HASH;
use crate::db::rows::FEED_CHANNEL;
use crate::db::Store;

/// Rows read per query while catching up.
const BATCH: i64 = 1000;
/// The reader reads at least this often, even without a wake-up (a commit by another
/// process on SQLite, a notification lost while `LISTEN` reconnects): what a page's
/// `ageMs` stays below, and so what it adds to the edge's view (a cheap indexed read).
const POLL: Duration = Duration::from_millis(250);
/// A feed not read successfully for this long is not served (503): a reader must never
/// take a replica's stale view for the whole feed.
const STALE_AFTER: Duration = Duration::from_secs(5);
/// Most events one page carries; a reader asks again after the page's `seq`.
pub const MAX_PAGE: usize = 10_000;

/// The edge Worker's feed interval (`EDGE_REVOCATION_FEED_INTERVAL_MS`), for the promise
/// revocations answer with.
static EDGE_INTERVAL_MS: AtomicU64 = AtomicU64::new(1000);
/// KV's own bound, for a Worker that does not read the feed: its read cache (30 s), its
/// propagation between locations (60 s) and the isolate cache (500 ms).
const KV_BOUND_MS: u64 = 90_500;

pub fn set_edge_interval(ms: u64) {
    EDGE_INTERVAL_MS.store(ms, Ordering::Relaxed);
}

/// When every edge location refuses a secret revoked (committed) at `at_ms` — or refused
/// by its own record from `until_ms`, when later — under the configured bounds: twice the
/// Worker's feed interval (a Worker admits only on a view younger than that, and the view
/// holds every event committed before it), or KV's without the feed.
fn refused_everywhere_by(at_ms: i64, until_ms: Option<i64>) -> i64 {
    let bound = match EDGE_INTERVAL_MS.load(Ordering::Relaxed) {
        0 => KV_BOUND_MS,
        interval => interval.saturating_mul(2),
    };
    let by = at_ms.saturating_add(bound as i64);
    until_ms.map_or(by, |until| until.max(by))
}

/// An audit entry is written inside the revocation's transaction, before its commit time
/// is known: it promises as if the commit came within this much.
const COMMIT_MARGIN_MS: i64 = 1000;

/// The edge's promise for a revocation (`refusedEverywhereBy`): what its audit entry says,
/// and what the answer says once the change has committed.
#[derive(Debug, Clone, Copy)]
pub struct Promise {
    until_ms: Option<i64>,
    in_audit_ms: i64,
}

impl Promise {
    /// Before the transaction; `until_ms`: when the secret's own record refuses it (a
    /// roll's overlap, an expiry), if that is the later.
    pub fn before_commit(until_ms: Option<i64>) -> Self {
        Promise {
            until_ms,
            in_audit_ms: refused_everywhere_by(now_ms().saturating_add(COMMIT_MARGIN_MS), until_ms),
        }
    }

    /// The same promise, with the secret's own end as it turned out (a roll's overlap cut
    /// short by the key's expiry, rounded up to a second).
    pub fn until(self, until_ms: i64) -> Self {
        Promise {
            until_ms: Some(until_ms),
            ..self
        }
    }

    /// ISO 8601, for the audit entry.
    pub fn in_audit(&self) -> String {
        iso8601(self.in_audit_ms)
    }

    /// ISO 8601, for the answer (called after the commit): the audit's promise, or later
    /// if the commit took longer than the margin.
    pub fn answered(&self) -> String {
        iso8601(
            self.in_audit_ms
                .max(refused_everywhere_by(now_ms(), self.until_ms)),
        )
    }
}

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
    /// More events follow `seq` already (the page was full): ask again at once.
    pub more: bool,
    /// How long ago (ms) this replica last read the database: the page holds every event
    /// committed until then. A duration, so a reader's clock need not agree with ours.
    pub age_ms: u64,
    /// The route policy, when the reader has not seen it: on every page that starts
    /// from `from` (a reader starting over), and on pages after a change (`seq` is the
    /// change's event). Absent: the reader's policy stands.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<FeedPolicy>,
}

/// The route policy on a feed page.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FeedPolicy {
    /// The feed event that carried it (0: no policy was ever set).
    pub seq: i64,
    /// The policy as the edge reads it (`RoutePolicy::to_lines`): `version default`, then
    /// `methods pattern expression` per rule, one per line.
    pub text: String,
}

/// The feed cannot be served: not read yet since the start, or not for a while.
#[derive(Debug, thiserror::Error)]
#[error("the revocation feed is not current on this replica: {0}")]
pub struct NotCurrent(&'static str);

#[derive(Default)]
struct Held {
    /// Whether the first read (which finds where the stored rows begin) was done.
    started: bool,
    /// When the last read succeeded (ms, this process's clock).
    read_ok_ms: i64,
    /// Events, each with when this process received it (what the window is kept by: a
    /// writer's clock may differ from ours).
    events: VecDeque<(FeedEvent, i64)>,
    /// The last number read.
    head: i64,
    /// Every event after this number is held.
    from: i64,
    /// The current route policy, and the event that carried it (`None`: none ever set).
    policy: Option<FeedPolicy>,
}

pub struct RevocationFeed {
    window: Duration,
    held: RwLock<Held>,
    /// One read at a time (the task's, and `App::flush`'s in tests).
    reading: tokio::sync::Mutex<()>,
}

impl RevocationFeed {
    pub fn new(window: Duration) -> Self {
        RevocationFeed {
            window,
            held: RwLock::default(),
            reading: tokio::sync::Mutex::new(()),
        }
    }

    /// The events after `after` (all that are held when `None`, or when `after` is
    /// before what is held), at most [`MAX_PAGE`]; refused while the feed is not current.
    pub fn page(&self, after: Option<i64>) -> Result<FeedPage, NotCurrent> {
        let held = self.held.read().unwrap_or_else(|e| e.into_inner());
        let age_ms = Self::current(&held)?;
        let whole = after.is_none_or(|a| a < held.from);
        let after = after.filter(|a| *a >= held.from).unwrap_or(held.from);
        let policy = match &held.policy {
            Some(p) if whole || p.seq > after => Some(p.clone()),
            Some(_) => None,
            None if whole => Some(FeedPolicy {
                seq: 0,
                text: RoutePolicy::default().to_lines(),
            }),
            None => None,
        };
        let mut events: Vec<FeedEvent> = held
            .events
            .iter()
            .map(|(e, _)| e)
            .filter(|e| e.seq > after)
            .take(MAX_PAGE + 1)
            .cloned()
            .collect();
        let more = events.len() > MAX_PAGE;
        events.truncate(MAX_PAGE);
        Ok(FeedPage {
            seq: if more {
                events.last().map_or(held.head, |e| e.seq)
            } else {
                held.head
            },
            from: held.from,
            window_seconds: self.window.as_secs(),
            events,
            more,
            age_ms,
            policy,
        })
    }

    /// How long ago (ms) the database was last read, while the feed is current.
    pub fn age_ms(&self) -> Result<u64, NotCurrent> {
        Self::current(&self.held.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn current(held: &Held) -> Result<u64, NotCurrent> {
        if !held.started {
            return Err(NotCurrent("not read since the start"));
        }
        let age_ms = now_ms() - held.read_ok_ms;
        if age_ms > STALE_AFTER.as_millis() as i64 {
            return Err(NotCurrent("the database has not been read for seconds"));
        }
        Ok(age_ms.max(0) as u64)
    }

    /// Reads what was committed since the last read, and forgets what left the window.
    /// How many events were read.
    pub async fn refresh(&self, store: &Store) -> Result<usize, Error> {
        let _one = self.reading.lock().await;
        let mut read = 0;
        let started = self.held.read().unwrap_or_else(|e| e.into_inner()).started;
        if !started {
            // Rows before the oldest one still stored were pruned: the feed is whole only
            // from there, or from where the numbers stood when none is stored (read
            // first: a commit between the two reads is then among the rows read next).
            let head = store.feed_head().await?;
            let oldest = store.feed_after(0, 1).await?;
            let start = oldest.first().map_or(head, |row| row.seq - 1);
            // Read after the head: a change committed before it is in this read (a later
            // one comes again with the rows, and is kept only if newer).
            let policy = store.current_policy().await?.map(|row| FeedPolicy {
                seq: row.feed_seq,
                text: row.lines,
            });
            let mut held = self.held.write().unwrap_or_else(|e| e.into_inner());
            held.head = start;
            held.from = start;
            held.policy = policy;
            held.started = true;
        }
        loop {
            let after = self.held.read().unwrap_or_else(|e| e.into_inner()).head;
            // What the read holds is every commit before it started.
            let asked = now_ms();
            let rows = store.feed_after(after, BATCH).await?;
            let n = rows.len();
            let received = now_ms();
            // Rows this reader never saw were pruned meanwhile: what it holds is no longer
            // whole, so it starts over from the rows there are — and the route policy may
            // have changed among those it missed: read again (a later change is in rows
            // still to come, and kept only if newer).
            let missed = rows.first().is_some_and(|row| row.seq != after + 1);
            let policy_now = if missed {
                Some(store.current_policy().await?.map(|row| FeedPolicy {
                    seq: row.feed_seq,
                    text: row.lines,
                }))
            } else {
                None
            };
            let mut held = self.held.write().unwrap_or_else(|e| e.into_inner());
            if let Some(policy) = policy_now {
                tracing::warn!(
                    held = held.head,
                    next = rows[0].seq,
                    "revocation feed: rows missed; starting over"
                );
                held.events.clear();
                held.from = rows[0].seq - 1;
                held.policy = policy;
            }
            for row in rows {
                held.head = row.seq;
                if row.key_hash == POLICY_FEED_HASH {
                    if held.policy.as_ref().is_none_or(|p| p.seq < row.seq) {
                        held.policy = row.record.map(|text| FeedPolicy { seq: row.seq, text });
                    }
                    continue;
                }
                let event = FeedEvent {
                    seq: row.seq,
                    hash: row.key_hash,
                    record: row.record.and_then(|r| serde_json::from_str(&r).ok()),
                    at: row.at_ms,
                };
                held.events.push_back((event, received));
            }
            read += n;
            if n < BATCH as usize {
                held.read_ok_ms = asked;
                break;
            }
        }
        self.forget_before(now_ms() - self.window.as_millis() as i64);
        Ok(read)
    }

    fn forget_before(&self, before_ms: i64) {
        let mut held = self.held.write().unwrap_or_else(|e| e.into_inner());
        while held
            .events
            .front()
            .is_some_and(|(_, received)| *received < before_ms)
        {
            let (gone, _) = held.events.pop_front().expect("checked");
            held.from = gone.seq;
        }
        if held.events.is_empty() {
            held.from = held.head;
        }
    }

    /// Keeps the feed current for as long as the process lives: on `wake` (this process's
    /// commits), on PostgreSQL `NOTIFY` (`database_url`: other replicas'), and every
    /// quarter second; deletes rows past twice the window once a minute.
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
            let woken_by = tokio::select! {
                _ = wake.notified() => "commit",
                _ = notified.notified() => "notify",
                _ = tokio::time::sleep(POLL) => "tick",
            };
            metrics::counter!("metlo_revocation_feed_reads_total", "woken_by" => woken_by)
                .increment(1);
        }
    }
}

/// Wakes `notified` on every PostgreSQL notification of the feed's channel (reconnecting
/// after a failure; the quarter-second poll covers the gap).
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
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
