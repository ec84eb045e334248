//! The reconcile: lists what Workers KV holds and compares it with what it should hold
//! (from the database), both in hash order, page by page (memory stays flat however many
//! keys): deletes strays (entries of no live key), puts the missing, rewrites the stale
//! (whose metadata digest is not the current record's). On a KV that is right, it writes
//! nothing. Runs on demand (`keys kv-reconcile`) and every `KV_RECONCILE_INTERVAL`.
//!
//! The listing carries each entry's metadata, not its value: a value changed behind our
//! back with its metadata left alone looks right. `--verify-values` also reads every
//! entry whose digest matches (one API call each, a few at a time) and rewrites those
//! whose value is not the record.

use std::cmp::Ordering;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metlo_shared::KeyRecord;
use serde::Serialize;

use super::client::{KvClient, KvError, ListedKey, LIST_PAGE};
use super::writer::{write_checked, Sent, WriteError};
use crate::clock::now_ms;
use crate::db::rows::KvEntry;
use crate::db::Store;

/// Updates gathered before they are written.
const FLUSH_AT: usize = 1000;
/// Values read at once with `--verify-values`.
const VALUE_READS: usize = 8;

/// What differed between KV and the database.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Drift {
    /// Entries KV holds for no live key (deleted, disabled, expired, or not a key).
    pub strays: u64,
    /// Live keys KV has no entry for.
    pub missing: u64,
    /// Entries whose record is not the current one (or that carry no digest).
    pub stale: u64,
    /// Entries whose digest is right but whose value is not the record (only counted
    /// when values are read: `--verify-values`).
    pub wrong_values: u64,
}

impl Drift {
    pub fn total(&self) -> u64 {
        self.strays + self.missing + self.stale + self.wrong_values
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReconcileReport {
    /// Entries KV listed.
    pub listed: u64,
    /// Entries KV should hold.
    pub expected: u64,
    pub drift: Drift,
    /// Puts and deletes sent (0 on a dry run, or when nothing drifted).
    pub writes: u64,
    #[serde(skip)]
    pub sent: Sent,
    #[serde(skip)]
    pub elapsed: Duration,
}

/// Compares KV with the database and, unless `dry_run`, fixes every difference; with
/// `verify_values`, values too (not only their digests).
pub async fn reconcile(
    store: &Store,
    client: &KvClient,
    dry_run: bool,
    verify_values: bool,
) -> Result<ReconcileReport, WriteError> {
    let started = Instant::now();
    let mut kv = Pages::<ListedKey>::default();
    let mut db = Pages::<KvEntry>::default();
    let mut cursor: Option<String> = None;
    let mut after = String::new();
    let (mut listed, mut expected) = (0, 0);
    let mut drift = Drift::default();
    let (mut puts, mut deletes) = (vec![], vec![]);
    let mut to_read: Vec<KvEntry> = vec![];
    let mut sent = Sent::default();
    loop {
        while kv.items.is_empty() && !kv.done {
            let page = client.list_keys(cursor.as_deref()).await?;
            listed += page.keys.len() as u64;
            kv.items.extend(page.keys);
            cursor = page.cursor;
            kv.done = cursor.is_none();
        }
        if db.items.is_empty() && !db.done {
            let page = store.kv_entries_after(&after, LIST_PAGE as i64).await?;
            if let Some(last) = page.last() {
                after = last.key.clone();
            }
            db.done = page.len() < LIST_PAGE;
            expected += page.len() as u64;
            db.items.extend(page);
        }
        let order = match (kv.items.front(), db.items.front()) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some(k), Some(d)) => k.name.as_bytes().cmp(d.key.as_bytes()),
        };
        match order {
            Ordering::Less => {
                let stray = kv.items.pop_front().unwrap();
                drift.strays += 1;
                deletes.push(stray.name);
            }
            Ordering::Greater => {
                drift.missing += 1;
                puts.push(db.items.pop_front().unwrap());
            }
            Ordering::Equal => {
                let held = kv.items.pop_front().unwrap();
                let entry = db.items.pop_front().unwrap();
                let current = KeyRecord::digest(&entry.value);
                if held.metadata.is_none_or(|m| m.d != current) {
                    drift.stale += 1;
                    puts.push(entry);
                } else if verify_values {
                    to_read.push(entry);
                }
            }
        }
        if to_read.len() >= FLUSH_AT {
            check_values(client, std::mem::take(&mut to_read), &mut drift, &mut puts).await?;
        }
        if !dry_run && puts.len() + deletes.len() >= FLUSH_AT {
            add(
                &mut sent,
                write_checked(
                    store,
                    client,
                    std::mem::take(&mut puts),
                    std::mem::take(&mut deletes),
                )
                .await?,
            );
        }
    }
    check_values(client, to_read, &mut drift, &mut puts).await?;
    if !dry_run {
        add(
            &mut sent,
            write_checked(store, client, puts, deletes).await?,
        );
    }
    Ok(ReconcileReport {
        listed,
        expected,
        drift,
        writes: sent.puts + sent.deletes,
        sent,
        elapsed: started.elapsed(),
    })
}

/// Reads the values of `entries` (a few at a time) and queues a put for each that is
/// not its record (or is gone).
async fn check_values(
    client: &KvClient,
    entries: Vec<KvEntry>,
    drift: &mut Drift,
    puts: &mut Vec<KvEntry>,
) -> Result<(), WriteError> {
    use futures_util::{StreamExt, TryStreamExt};
    let read: Vec<(KvEntry, Option<String>)> = futures_util::stream::iter(entries)
        .map(|entry| async move {
            let held = read_value(client, &entry.key).await?;
            Ok::<_, WriteError>((entry, held))
        })
        .buffered(VALUE_READS)
        .try_collect()
        .await?;
    for (entry, held) in read {
        match held {
            Some(value) if value == entry.value => {}
            Some(_) => {
                drift.wrong_values += 1;
                puts.push(entry);
            }
            None => {
                drift.missing += 1;
                puts.push(entry);
            }
        }
    }
    Ok(())
}

/// One value, waiting out a 429 (its `Retry-After`, or a second) a few times.
async fn read_value(client: &KvClient, key: &str) -> Result<Option<String>, KvError> {
    let mut attempt = 0;
    loop {
        match client.value(key).await {
            Err(KvError::RateLimited { retry_after }) if attempt < 5 => {
                attempt += 1;
                tokio::time::sleep(retry_after.unwrap_or(Duration::from_secs(1))).await;
            }
            read => return read,
        }
    }
}

fn add(total: &mut Sent, s: Sent) {
    total.puts += s.puts;
    total.deletes += s.deletes;
    total.rate_limited += s.rate_limited;
}

/// One side of the comparison: the page being read, and whether it was the last.
struct Pages<T> {
    items: VecDeque<T>,
    done: bool,
}

impl<T> Default for Pages<T> {
    fn default() -> Self {
        Pages {
            items: VecDeque::new(),
            done: false,
        }
    }
}

/// The periodic reconcile's interval and last run, for `/readyz`.
pub struct ReconcileStatus {
    pub interval: Duration,
    last: Mutex<Option<LastReconcile>>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LastReconcile {
    pub at_ms: i64,
    pub report: Option<ReconcileReport>,
    pub error: Option<String>,
}

impl ReconcileStatus {
    pub fn new(interval: Duration) -> Self {
        ReconcileStatus {
            interval,
            last: Mutex::new(None),
        }
    }

    pub fn last(&self) -> Option<LastReconcile> {
        self.last.lock().unwrap().clone()
    }
}

/// Reconciles every `interval` (±10 %, so replicas started together drift apart) for as
/// long as the process lives; the drift found goes to metrics and `/readyz`.
pub async fn reconcile_forever(store: Store, client: KvClient, status: Arc<ReconcileStatus>) {
    loop {
        tokio::time::sleep(status.interval.mul_f64(0.9 + fastrand::f64() * 0.2)).await;
        let result = reconcile(&store, &client, false, false).await;
        let last = match result {
            Ok(report) => {
                let d = report.drift;
                for (kind, n) in [
                    ("stray", d.strays),
                    ("missing", d.missing),
                    ("stale", d.stale),
                ] {
                    metrics::gauge!("metlo_kv_drift", "kind" => kind).set(n as f64);
                    metrics::counter!("metlo_kv_drift_fixed_total", "kind" => kind).increment(n);
                }
                metrics::counter!("metlo_kv_reconcile_runs_total", "result" => "ok").increment(1);
                if d.total() > 0 {
                    tracing::warn!(
                        strays = d.strays,
                        missing = d.missing,
                        stale = d.stale,
                        "KV drifted from the database; fixed"
                    );
                }
                LastReconcile {
                    at_ms: now_ms(),
                    report: Some(report),
                    error: None,
                }
            }
            Err(e) => {
                metrics::counter!("metlo_kv_reconcile_runs_total", "result" => "error")
                    .increment(1);
                tracing::warn!(error = %e, "KV reconcile failed; next run at the next interval");
                LastReconcile {
                    at_ms: now_ms(),
                    report: None,
                    error: Some(e.to_string()),
                }
            }
        };
        *status.last.lock().unwrap() = Some(last);
    }
}
