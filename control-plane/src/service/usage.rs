//! When each key was last used and how many requests it made per hour, without a database
//! write per request: verifications here and reports from the edge only update an
//! in-memory map (latest time and per-hour counts per key), and a background task writes it
//! out every `LAST_USED_FLUSH_SECONDS` (default 60), 500 keys per transaction — at most one
//! write per key per interval, however busy the key. Edge reports are taken only for
//! hashes of existing keys, and the maps hold at most 3 × `MAX_API_KEYS` entries: made-up
//! hashes cannot grow them.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metlo_shared::KeyHash;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::Error;
use crate::clock::iso8601;
use crate::db::rows::{Uses, HOUR_MS};
use crate::db::usage::HourlyCounts;
use crate::db::usage::USAGE_BATCH;
use crate::db::Store;

type Pending = HashMap<KeyHash, Uses, foldhash::fast::RandomState>;

/// Most entries one usage report may carry.
pub const MAX_REPORT_ENTRIES: usize = 1000;

/// Pending maps, one per thread (up to this many): two workers verifying one busy key do
/// not take turns on one lock and pass its cache line back and forth.
const SHARDS: usize = 8;

/// Uses not yet written, by secret hash; at most `capacity` entries in all (uses of
/// other keys past it are dropped and counted in `metlo_usage_dropped_total`). Hashed
/// with foldhash (seeded per process): SipHash over 32 bytes was a measurable part of a
/// cached verification.
pub struct Usage {
    shards: [Mutex<Pending>; SHARDS],
    /// Entries in all shards (a key used from two threads is two until the flush merges
    /// them): touched only when an entry is added or taken, never per use.
    entries: AtomicUsize,
    enabled: bool,
    capacity: usize,
}

impl Usage {
    /// `capacity`: entries pending at most (the instance's key limit, with room for
    /// secrets in a roll's overlap and for a busy key seen by several threads, is enough).
    pub fn new(enabled: bool, capacity: usize) -> Self {
        Usage {
            shards: Default::default(),
            entries: AtomicUsize::new(0),
            enabled,
            capacity,
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// This thread's shard.
    fn shard(&self) -> &Mutex<Pending> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
        }
        &self.shards[SHARD.with(|s| *s)]
    }

    /// A successful verification at `now_ms` (the caller's clock reading: one per request).
    pub fn used(&self, hash: &KeyHash, now_ms: i64) {
        if self.enabled {
            self.used_at(&[(*hash, now_ms, 1)]);
        }
    }

    /// `count` uses, the last at `at_ms` (from the edge: counted in that hour).
    pub fn used_at(&self, uses: &[(KeyHash, i64, u64)]) {
        self.merge_in(uses.iter().map(|(hash, at_ms, count)| {
            let mut u = Uses::default();
            u.add(*at_ms, *count);
            (*hash, u)
        }));
    }

    /// Refused requests by [`crate::db::rows::OUTCOMES`] index, the last at `at_ms`.
    pub fn refused_at(&self, refused: &[(KeyHash, i64, [u64; 5])]) {
        self.merge_in(refused.iter().map(|(hash, at_ms, counts)| {
            let mut u = Uses::default();
            u.add_refused(*at_ms, *counts);
            (*hash, u)
        }));
    }

    /// Adds `items` to what is pending: a key already pending is merged; a new one takes
    /// a place if there is one (dropped and counted otherwise).
    fn merge_in(&self, items: impl Iterator<Item = (KeyHash, Uses)>) {
        if !self.enabled {
            return;
        }
        let mut dropped = 0;
        let mut pending = self.shard().lock().unwrap_or_else(|e| e.into_inner());
        for (hash, uses) in items {
            if let Some(u) = pending.get_mut(&hash) {
                u.merge(uses);
                continue;
            }
            // A new entry, if there is room (claimed before it is added, so two threads
            // cannot both take the last place).
            let claimed = self
                .entries
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    (n < self.capacity).then_some(n + 1)
                })
                .is_ok();
            if !claimed {
                dropped += 1;
                continue;
            }
            pending.insert(hash, uses);
        }
        drop(pending);
        if dropped > 0 {
            metrics::counter!("metlo_usage_dropped_total").increment(dropped);
        }
    }

    /// Uses that could not be written: back in, merged with any taken meanwhile (room or
    /// not: they were counted once already).
    fn put_back(&self, batch: Vec<(KeyHash, Uses)>) {
        let mut pending = self.shard().lock().unwrap_or_else(|e| e.into_inner());
        for (hash, uses) in batch {
            match pending.entry(hash) {
                Entry::Occupied(mut e) => e.get_mut().merge(uses),
                Entry::Vacant(e) => {
                    self.entries.fetch_add(1, Ordering::Relaxed);
                    e.insert(uses);
                }
            }
        }
    }

    /// Everything pending, each key once (a use recorded meanwhile lands in the next
    /// batch, never in neither).
    fn take(&self) -> Vec<(KeyHash, Uses)> {
        let mut all = Pending::default();
        for shard in &self.shards {
            let taken = std::mem::take(&mut *shard.lock().unwrap_or_else(|e| e.into_inner()));
            self.entries.fetch_sub(taken.len(), Ordering::Relaxed);
            for (hash, uses) in taken {
                all.entry(hash).or_default().merge(uses);
            }
        }
        all.into_iter().collect()
    }
}

/// Writes pending uses every `every`, for as long as the process runs, [`USAGE_BATCH`]
/// keys per transaction; a batch that fails is put back (with every batch after it) and
/// retried, and one that committed is never counted again.
pub async fn flush_forever(store: Store, usage: Arc<Usage>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        flush(&store, &usage).await;
    }
}

/// One flush, now: the rows written (each key's latest use and count since the last).
/// A batch the database cannot take because it is down is put back (with every batch
/// after it) and retried; one it refuses for any other reason is split until the rows
/// it refuses are found, and those are dropped with a log line — never retried forever.
pub async fn flush(store: &Store, usage: &Usage) -> usize {
    let mut written = 0;
    let mut batch = usage.take();
    // Hash order, so two replicas flushing at once rarely lock rows in opposite orders.
    batch.sort_unstable_by_key(|(h, _)| *h.as_bytes());
    let mut rest = batch.as_slice();
    while !rest.is_empty() {
        let (chunk, after) = rest.split_at(rest.len().min(USAGE_BATCH));
        let write = |part: Vec<(KeyHash, Uses)>| async move {
            let rows: Vec<(String, Uses)> =
                part.into_iter().map(|(h, u)| (h.to_hex(), u)).collect();
            store.record_usage(&rows).await
        };
        match write_around_refusals(chunk.to_vec(), write).await {
            Ok(n) => {
                metrics::counter!("metlo_last_used_writes_total").increment(n as u64);
                written += n;
            }
            Err((e, left)) => {
                tracing::warn!(error = %e, keys = rest.len(), "recording key use failed; will retry");
                let mut back = left;
                back.extend_from_slice(after);
                usage.put_back(back);
                return written;
            }
        }
        rest = after;
    }
    written
}

/// Writes `rows` with `write`, in halves around what it refuses for a reason other than
/// an outage (a row refused alone is dropped, counted and logged). `Err` with the rows
/// not written yet when the database is unavailable. `Ok`: how many were written.
async fn write_around_refusals<F, Fut>(
    rows: Vec<(KeyHash, Uses)>,
    write: F,
) -> Result<usize, (crate::db::StoreError, Vec<(KeyHash, Uses)>)>
where
    F: Fn(Vec<(KeyHash, Uses)>) -> Fut,
    Fut: std::future::Future<Output = Result<(), crate::db::StoreError>>,
{
    let mut written = 0;
    let mut parts = vec![rows];
    while let Some(mut part) = parts.pop() {
        match write(part.clone()).await {
            Ok(()) => written += part.len(),
            Err(e @ crate::db::StoreError::Unavailable(_)) => {
                for other in parts {
                    part.extend(other);
                }
                return Err((e, part));
            }
            Err(e) if part.len() == 1 => {
                metrics::counter!("metlo_usage_dropped_total").increment(1);
                tracing::warn!(error = %e, "the database refuses one key's use counts: dropped");
            }
            Err(_) => {
                let second = part.split_off(part.len() / 2);
                parts.push(second);
                parts.push(part);
            }
        }
    }
    Ok(written)
}

/// Longest window a usage query may cover: 31 days of hours.
pub const MAX_USAGE_HOURS: i64 = 31 * 24;

/// One key's requests per hour.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyUsage {
    pub name: String,
    #[serde(flatten)]
    pub usage: Hourly,
}

/// One identity's requests per hour: those of the keys that belong to it now.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct IdentityUsage {
    pub external_id: String,
    #[serde(flatten)]
    pub usage: Hourly,
}

/// Requests per hour by outcome.
#[derive(Debug, Serialize, ToSchema)]
pub struct Hourly {
    /// The first hour's start (RFC 3339).
    pub from: String,
    /// The last hour's end (RFC 3339).
    pub to: String,
    /// Requests admitted in the whole window.
    pub total: u64,
    /// Requests refused in the whole window, by why.
    pub refused: RefusedCounts,
    /// Every hour of the window, oldest first (hours without requests count 0).
    pub hours: Vec<HourUsage>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HourUsage {
    /// The hour's start (RFC 3339).
    pub start: String,
    /// Requests admitted (at the edge, and by `/api/v1/verify`).
    pub requests: u64,
    /// Requests the edge refused, by why.
    pub refused: RefusedCounts,
}

/// Refused requests by why: past a rate limit, out of credits, refused by the route
/// policy, disabled or revoked (the revocation feed), expired.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RefusedCounts {
    pub rate_limited: u64,
    pub credits_exhausted: u64,
    pub forbidden: u64,
    pub disabled: u64,
    pub expired: u64,
}

impl RefusedCounts {
    fn add(&mut self, outcome: &str, n: u64) {
        let slot = match outcome {
            "rateLimited" => &mut self.rate_limited,
            "creditsExhausted" => &mut self.credits_exhausted,
            "forbidden" => &mut self.forbidden,
            "disabled" => &mut self.disabled,
            "expired" => &mut self.expired,
            _ => return,
        };
        *slot += n;
    }

    fn sum(&mut self, other: &RefusedCounts) {
        self.rate_limited += other.rate_limited;
        self.credits_exhausted += other.credits_exhausted;
        self.forbidden += other.forbidden;
        self.disabled += other.disabled;
        self.expired += other.expired;
    }
}

/// Every hour from `first` to `last` with what was counted.
fn hourly(counted: HourlyCounts, first: i64, last: i64) -> Hourly {
    let admitted: HashMap<i64, i64> = counted.admitted.into_iter().collect();
    let mut refused: HashMap<i64, RefusedCounts> = HashMap::new();
    for (hour, outcome, n) in counted.refused {
        refused
            .entry(hour)
            .or_default()
            .add(&outcome, n.max(0) as u64);
    }
    let hours: Vec<HourUsage> = (first..=last)
        .map(|h| HourUsage {
            start: iso8601(h * HOUR_MS),
            requests: admitted.get(&h).copied().unwrap_or(0).max(0) as u64,
            refused: refused.get(&h).copied().unwrap_or_default(),
        })
        .collect();
    let mut total_refused = RefusedCounts::default();
    for h in &hours {
        total_refused.sum(&h.refused);
    }
    Hourly {
        from: iso8601(first * HOUR_MS),
        to: iso8601((last + 1) * HOUR_MS),
        total: hours.iter().map(|h| h.requests).sum(),
        refused: total_refused,
        hours,
    }
}

/// The hours a query covers (`from` and `to` RFC 3339, both optional: `to` is now, `from`
/// 24 hours before it): from the hour holding `from` to the one holding `to`.
pub fn usage_window(
    from: Option<&str>,
    to: Option<&str>,
    now_ms: i64,
) -> Result<(i64, i64), Error> {
    let parse = |name: &str, v: &str| -> Result<i64, Error> {
        chrono::DateTime::parse_from_rfc3339(v.trim())
            .map(|t| t.timestamp_millis())
            .map_err(|_| Error::invalid(format!("{name} must be an RFC 3339 date-time with a time zone, e.g. 2030-01-01T00:00:00Z")))
    };
    let to_ms = to.map(|v| parse("to", v)).transpose()?.unwrap_or(now_ms);
    let from_ms = from
        .map(|v| parse("from", v))
        .transpose()?
        .unwrap_or(to_ms - 23 * HOUR_MS);
    let (first, last) = (from_ms.div_euclid(HOUR_MS), to_ms.div_euclid(HOUR_MS));
    if first > last {
        return Err(Error::invalid("from must not be after to"));
    }
    if last - first + 1 > MAX_USAGE_HOURS {
        return Err(Error::invalid(format!(
            "at most {MAX_USAGE_HOURS} hours (31 days) per query"
        )));
    }
    Ok((first, last))
}

/// The key `name`'s requests per hour in the window (counted up to the last flush).
pub async fn key_usage(
    store: &Store,
    name: &str,
    first: i64,
    last: i64,
) -> Result<KeyUsage, Error> {
    let counted = store
        .key_usage(name, first, last)
        .await?
        .ok_or(Error::NotFound("no API key with this name"))?;
    Ok(KeyUsage {
        name: name.to_owned(),
        usage: hourly(counted, first, last),
    })
}

/// The requests per hour of the keys that belong to the identity `external_id` now.
pub async fn identity_usage(
    store: &Store,
    external_id: &str,
    first: i64,
    last: i64,
) -> Result<IdentityUsage, Error> {
    let identity = store
        .identity(external_id)
        .await?
        .ok_or(Error::NotFound("no identity with this externalId"))?;
    let counted = store.identity_usage(identity.id, first, last).await?;
    Ok(IdentityUsage {
        external_id: external_id.to_owned(),
        usage: hourly(counted, first, last),
    })
}

/// Deletes hourly counts older than `retention`, every hour, for as long as the process
/// runs (0: kept forever).
pub async fn prune_forever(store: Store, retention: Duration) {
    if retention.is_zero() {
        return;
    }
    loop {
        let before = (crate::clock::now_ms() - retention.as_millis() as i64).div_euclid(HOUR_MS);
        loop {
            match store.prune_usage(before, 1000).await {
                Ok(1000) => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "pruning old usage counts failed; will retry");
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

/// How old a reported use may be: older ones are not counted (an edge that could not
/// report for two days has lost them anyway, and each hour a key is counted in is a row).
pub const MAX_REPORT_AGE: Duration = Duration::from_secs(48 * 3600);

/// Takes an edge report's uses of keys that exist (one query), within
/// [`MAX_REPORT_AGE`] of `now_ms`; returns how many were taken, how many named no key
/// and how many were too old.
pub async fn report(
    store: &Store,
    usage: &Usage,
    report: Reported,
    now_ms: i64,
) -> Result<(usize, usize, usize), Error> {
    let oldest = now_ms - MAX_REPORT_AGE.as_millis() as i64;
    let reported = report.used.len() + report.refused.len();
    let uses: Vec<(KeyHash, i64, u64)> = report
        .used
        .into_iter()
        .filter(|(_, at, _)| *at >= oldest)
        .collect();
    let refused: Vec<(KeyHash, i64, [u64; 5])> = report
        .refused
        .into_iter()
        .filter(|(_, at, _)| *at >= oldest)
        .collect();
    let fresh = uses.len() + refused.len();
    let hexes: Vec<String> = uses
        .iter()
        .map(|(h, _, _)| h.to_hex())
        .chain(refused.iter().map(|(h, _, _)| h.to_hex()))
        .collect();
    let known = store.known_hashes(&hexes).await?;
    let is_known = |h: &KeyHash| known.contains(&h.to_hex());
    let taken: Vec<(KeyHash, i64, u64)> = uses.into_iter().filter(|u| is_known(&u.0)).collect();
    let refused: Vec<(KeyHash, i64, [u64; 5])> =
        refused.into_iter().filter(|r| is_known(&r.0)).collect();
    usage.used_at(&taken);
    usage.refused_at(&refused);
    let accepted = taken.len() + refused.len();
    Ok((accepted, fresh - accepted, reported - fresh))
}

/// A report, checked: uses `(hash, last ms, requests)` and refusals `(hash, last ms,
/// counts by outcome)`.
#[derive(Debug, Default)]
pub struct Reported {
    pub used: Vec<(KeyHash, i64, u64)>,
    pub refused: Vec<(KeyHash, i64, [u64; 5])>,
}

/// A batch of key uses seen by an edge Worker.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UsageReport {
    /// SHA-256 (64 lowercase hex characters) of each key used → the last time it was
    /// used, in milliseconds since the epoch. At most 1,000 entries.
    #[schema(value_type = HashMap<String, u64>)]
    pub used: HashMap<String, i64>,
    /// How many requests each key made since the last report, counted in the hour of its
    /// last use (keys of `used` only; a key left out counts none — Workers from before
    /// counts send none).
    #[serde(default)]
    pub counts: HashMap<String, u64>,
    /// Requests of keys the edge refused since the last report, by why, counted in the hour
    /// of `at` (the latest refusal, ms). At most 1,000 entries.
    #[serde(default)]
    pub refused: HashMap<String, RefusedReport>,
}

/// A key's refused requests in a report.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RefusedReport {
    /// The latest refusal, in milliseconds since the epoch.
    #[schema(value_type = u64)]
    pub at: i64,
    #[serde(default)]
    pub rate_limited: u64,
    #[serde(default)]
    pub credits_exhausted: u64,
    #[serde(default)]
    pub forbidden: u64,
    #[serde(default)]
    pub disabled: u64,
    #[serde(default)]
    pub expired: u64,
}

/// Most requests one report may count for a key.
pub const MAX_REPORTED_COUNT: u64 = 1_000_000_000;

impl UsageReport {
    /// The uses reported, or what is wrong with the report: every hash well-formed,
    /// every time a non-negative integer (times in the future count as now).
    pub fn validate(mut self, now_ms: i64) -> Result<Reported, Error> {
        if self.used.len() > MAX_REPORT_ENTRIES || self.refused.len() > MAX_REPORT_ENTRIES {
            return Err(Error::invalid(format!(
                "at most {MAX_REPORT_ENTRIES} entries per report"
            )));
        }
        if let Some(stray) = self.counts.keys().find(|h| !self.used.contains_key(*h)) {
            return Err(Error::invalid(format!(
                "counts.{stray}: every key of `counts` must also be in `used`"
            )));
        }
        let used = self
            .used
            .into_iter()
            .map(|(hex, at)| {
                let (hash, at) = hash_and_time("used", &hex, at, now_ms)?;
                let count = self.counts.remove(&hex).unwrap_or(0);
                if count > MAX_REPORTED_COUNT {
                    return Err(Error::invalid(format!(
                        "counts: at most {MAX_REPORTED_COUNT} per key per report"
                    )));
                }
                Ok((hash, at, count))
            })
            .collect::<Result<_, _>>()?;
        let refused = self
            .refused
            .into_iter()
            .map(|(hex, r)| {
                let (hash, at) = hash_and_time("refused", &hex, r.at, now_ms)?;
                let counts = [
                    r.rate_limited,
                    r.credits_exhausted,
                    r.forbidden,
                    r.disabled,
                    r.expired,
                ];
                if counts.iter().any(|n| *n > MAX_REPORTED_COUNT) {
                    return Err(Error::invalid(format!(
                        "refused: at most {MAX_REPORTED_COUNT} per key and outcome per report"
                    )));
                }
                Ok((hash, at, counts))
            })
            .collect::<Result<_, _>>()?;
        Ok(Reported { used, refused })
    }
}

/// An entry of the report's `field`: its hash and time (the future counts as now), or
/// what is wrong with them.
fn hash_and_time(field: &str, hex: &str, at: i64, now_ms: i64) -> Result<(KeyHash, i64), Error> {
    let hash = KeyHash::from_hex(hex).map_err(|_| {
        Error::invalid(format!(
            "every key of `{field}` must be a SHA-256 in lowercase hex"
        ))
    })?;
    if at < 0 {
        return Err(Error::invalid("times must be milliseconds since the epoch"));
    }
    Ok((hash, at.min(now_ms)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use metlo_shared::ApiKey;

    /// A batch the database refuses (not an outage) is split until the refused rows are
    /// found; only they are dropped. An outage stops the writing and hands back the rest.
    #[tokio::test]
    async fn refused_rows_are_dropped_and_an_outage_hands_the_rest_back() {
        use crate::db::StoreError;
        let rows: Vec<(KeyHash, Uses)> = (0..37)
            .map(|_| (ApiKey::generate().unwrap().hash(), Uses::default()))
            .collect();
        let bad = [rows[3].0, rows[30].0];
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let written = write_around_refusals(rows.clone(), |part| {
            calls.fetch_add(1, Ordering::Relaxed);
            let refused = part.iter().any(|(h, _)| bad.contains(h));
            async move {
                match refused {
                    true => Err(StoreError::Other(sqlx::Error::Protocol("refused".into()))),
                    false => Ok(()),
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(written, 35, "all but the two refused rows");
        assert!(
            calls.load(Ordering::Relaxed) < 37,
            "found by halves, not one by one"
        );

        let down = write_around_refusals(rows.clone(), |_| async {
            Err(StoreError::Unavailable(sqlx::Error::PoolTimedOut))
        })
        .await;
        let Err((_, left)) = down else {
            panic!("an outage is an error")
        };
        assert_eq!(left.len(), 37, "nothing lost");
    }

    #[test]
    fn keeps_the_latest_use_counts_per_hour_and_takes_everything_once() {
        let usage = Usage::new(true, 10);
        let a = ApiKey::generate().unwrap().hash();
        let hour = 3_600_000;
        usage.used_at(&[(a, 20, 1), (a, 10, 2), (a, hour + 5, 4)]);
        let taken = usage.take();
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].1.last_ms, hour + 5);
        assert_eq!(taken[0].1.hours, vec![(0, 3), (1, 4)]);
        assert!(usage.take().is_empty());
        let off = Usage::new(false, 10);
        off.used(&a, 30);
        assert!(off.take().is_empty());
    }

    #[test]
    fn put_back_merges_with_uses_taken_meanwhile() {
        let usage = Usage::new(true, 10);
        let a = ApiKey::generate().unwrap().hash();
        usage.used(&a, 100);
        let failed = usage.take();
        usage.used(&a, 50);
        usage.put_back(failed);
        let again = usage.take();
        assert_eq!(again[0].1.last_ms, 100);
        assert_eq!(again[0].1.hours, vec![(0, 2)]);
    }

    #[test]
    fn bounded_keys_already_pending_still_move() {
        let usage = Usage::new(true, 2);
        let keys: Vec<KeyHash> = (0..3).map(|_| ApiKey::generate().unwrap().hash()).collect();
        usage.used_at(&[(keys[0], 1, 1), (keys[1], 1, 1), (keys[2], 1, 1)]);
        usage.used_at(&[(keys[0], 5, 1)]);
        let mut taken = usage.take();
        taken.sort_by_key(|(h, _)| *h != keys[0]);
        assert_eq!(taken.len(), 2, "the third was dropped");
        assert_eq!(taken[0].1.last_ms, 5);
        assert_eq!(taken[0].1.hours, vec![(0, 2)]);
    }

    #[test]
    fn uses_from_several_threads_are_taken_as_one_entry_per_key() {
        let usage = Arc::new(Usage::new(true, 3));
        let a = ApiKey::generate().unwrap().hash();
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let usage = usage.clone();
                std::thread::spawn(move || {
                    for n in 0..100 {
                        usage.used(&a, i * 1000 + n);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Four threads, three places: if each thread has its own shard, one's uses do
        // not fit; what was counted merges into one entry per key.
        let taken = usage.take();
        assert_eq!(taken.len(), 1);
        let counted: u64 = taken[0].1.hours.iter().map(|(_, n)| n).sum();
        assert!(counted == 300 || counted == 400, "{counted}");
        // Taking frees the places.
        usage.used(&a, 1);
        assert_eq!(usage.take()[0].1.hours, vec![(0, 1)]);
    }

    #[test]
    fn counts_name_keys_of_used_only() {
        let a = ApiKey::generate().unwrap().hash().to_hex();
        let b = ApiKey::generate().unwrap().hash().to_hex();
        let report = |counts: Vec<(&str, u64)>| UsageReport {
            used: HashMap::from([(a.clone(), 10)]),
            counts: counts.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            refused: HashMap::new(),
        };
        assert_eq!(report(vec![(&a, 7)]).validate(100).unwrap().used[0].2, 7);
        assert_eq!(report(vec![]).validate(100).unwrap().used[0].2, 0);
        assert!(report(vec![(&b, 1)]).validate(100).is_err());
        assert!(report(vec![(&a, MAX_REPORTED_COUNT + 1)])
            .validate(100)
            .is_err());
    }
}
