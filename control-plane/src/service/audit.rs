//! The audit log: who (the calling key's name) did what (create, delete, roll, failed
//! authentication), when, from which IP. Never a secret.
//!
//! Changes are recorded in the same transaction as the change itself. Failed
//! authentications are counted in memory per (network, reason, route) — an IPv4 /24 or
//! an IPv6 /64, with the first few addresses and key identifiers seen — and written once
//! a second, the busiest sources first, at most `AUDIT_FAILURE_ROWS_PER_MINUTE` rows a
//! minute per process (valid keys refused for their role, which name their caller, are
//! always itemised). What is not itemised — rows past that cap, and every failure from a source
//! that had spent its budget (a 429) — is counted in one summary row per minute and in
//! `metlo_audit_failures_not_itemised_total`. A flood of bad keys from any number of
//! addresses costs at most the cap plus one row a minute, not a write per request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;

use super::Error;
use crate::clock::{iso8601, now_ms};
use crate::db::rows::{AuditEntry, AuditFilter, AuditRow};
use crate::db::Store;
use metlo_shared::{KeyRecord, Role};

/// Most entries one page returns.
pub const MAX_PAGE: i64 = 1000;
pub const DEFAULT_PAGE: i64 = 50;
/// Distinct failure sources kept between flushes; beyond it, failures are only counted.
const MAX_PENDING_FAILURES: usize = 10_000;
/// Key identifiers (and client addresses) kept per failure row (the first ones seen).
const MAX_IDENTIFIERS: usize = 5;
/// Rows deleted per retention statement.
const PRUNE_BATCH: i64 = 5_000;
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Who is making a request: the verified key's name (when there is one) and the peer IP.
#[derive(Debug, Clone, Default)]
pub struct Actor {
    pub name: Option<String>,
    pub ip: Option<String>,
    /// The calling key's role; `None`: the local CLI (root on the database).
    pub role: Option<Role>,
    /// A console session that did not give its key again with this request: a stolen
    /// cookie alone must not mint a lasting admin or edge secret.
    pub unconfirmed_session: bool,
}

impl Actor {
    /// The local command line: no key, no IP.
    pub fn cli() -> Self {
        Actor::default()
    }

    /// Refused for a session that did not give its key again: making a new secret of
    /// this role (admin and edge secrets outlive the session).
    pub fn may_mint(&self, role: Role) -> Result<(), super::Error> {
        if self.unconfirmed_session && matches!(role, Role::Admin | Role::Edge | Role::Legacy) {
            return Err(super::Error::Forbidden(format!(
                "a new {role} secret from the console needs your admin key again: \
                 enter it to confirm (sent in X-Metlo-Confirm-Key)"
            )));
        }
        Ok(())
    }

    pub fn entry(&self, action: &'static str, target: &str, detail: Value) -> AuditEntry {
        AuditEntry {
            actor: self.name.clone(),
            action,
            target: Some(target.to_owned()),
            ip: self.ip.clone(),
            detail,
        }
    }
}

/// Why authentication failed, as recorded (the response is the same 401 for all).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureReason {
    Missing,
    /// Not a well-formed key (bad shape or checksum).
    Malformed,
    /// Well-formed, but unknown, deleted, expired or past its roll overlap.
    Invalid,
    /// A valid key whose role may not call the route (answered 403).
    Forbidden,
    /// Not looked up: the source had spent its failure budget (answered 429).
    Limited,
}

impl FailureReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::Missing => "missing",
            FailureReason::Malformed => "malformed",
            FailureReason::Invalid => "invalid",
            FailureReason::Forbidden => "forbidden",
            FailureReason::Limited => "limited",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FailureSource {
    /// The client's network (`203.0.113.0/24`, `2001:db8:1:2::/64`).
    network: Option<String>,
    reason: FailureReason,
    route: Option<String>,
    /// For a 403: who called, with which role, and which roles the route needs.
    refused: Option<(String, Role, &'static [Role])>,
}

#[derive(Debug)]
struct FailureCount {
    count: u64,
    first_ms: i64,
    last_ms: i64,
    /// Public identifiers of the well-formed keys presented (up to [`MAX_IDENTIFIERS`]).
    identifiers: Vec<String>,
    /// Client addresses seen in the network (up to [`MAX_IDENTIFIERS`]).
    addresses: Vec<String>,
}

#[derive(Debug, Default)]
struct Pending {
    counts: HashMap<FailureSource, FailureCount>,
    /// The minute being written, and what it has cost so far.
    window: Window,
    /// Summaries of minutes that ended since the last flush.
    ended: Vec<AuditEntry>,
}

impl Pending {
    /// This minute's window (the last one's summary set aside when a new minute began).
    fn window(&mut self) -> &mut Window {
        let minute = now_ms().div_euclid(60_000);
        if self.window.minute != minute {
            let ended = std::mem::replace(
                &mut self.window,
                Window {
                    minute,
                    ..Window::default()
                },
            );
            self.ended.extend(ended.summary());
        }
        &mut self.window
    }
}

/// One minute of failure rows: how many were written, and what was not itemised.
#[derive(Debug, Default)]
struct Window {
    /// Minutes since the epoch.
    minute: i64,
    rows: usize,
    /// Failures from sources that had spent their budget (answered 429).
    past_budget: u64,
    /// Failures in rows past the minute's cap, or past [`MAX_PENDING_FAILURES`] sources.
    over_cap: u64,
    /// Rows folded for the cap (a source folded in several flushes counts each time;
    /// failures past [`MAX_PENDING_FAILURES`] sources are not told apart at all).
    sources: u64,
}

impl Window {
    /// The one row saying what the minute did not itemise (none if it itemised all).
    fn summary(&self) -> Option<AuditEntry> {
        let count = self.past_budget + self.over_cap;
        (count > 0).then(|| AuditEntry {
            actor: None,
            action: "auth.failed",
            target: None,
            ip: None,
            detail: json!({
                "reason": "not itemised",
                "count": count,
                "pastBudget": self.past_budget,
                "overCap": self.over_cap,
                "sources": self.sources,
                "first": iso8601(self.minute * 60_000),
                "last": iso8601(self.minute * 60_000 + 59_999),
            }),
        })
    }
}

/// Failed authentications waiting to be written.
#[derive(Debug)]
pub struct AuthFailures {
    /// Most failure rows per minute (plus one summary row).
    rows_per_minute: usize,
    pending: Mutex<Pending>,
}

impl AuthFailures {
    pub fn new(rows_per_minute: u32) -> Self {
        AuthFailures {
            rows_per_minute: rows_per_minute as usize,
            pending: Mutex::default(),
        }
    }

    /// A failed authentication (401).
    pub fn record(
        &self,
        ip: Option<String>,
        reason: FailureReason,
        identifier: Option<String>,
        route: Option<String>,
    ) {
        self.count(
            FailureSource {
                network: ip.as_deref().map(network_of),
                reason,
                route,
                refused: None,
            },
            ip,
            identifier,
        );
    }

    /// A failure from a source that had spent its budget (429): counted, never a row of
    /// its own — a source past its budget costs the log nothing more.
    pub fn record_past_budget(&self, reason: FailureReason) {
        metrics::counter!("metlo_auth_failures_total", "reason" => reason.as_str()).increment(1);
        metrics::counter!("metlo_audit_failures_not_itemised_total", "why" => "past_budget")
            .increment(1);
        self.pending.lock().unwrap().window().past_budget += 1;
    }

    /// A valid key refused for its role (403): counted like a failed authentication.
    pub fn record_forbidden(
        &self,
        ip: Option<String>,
        route: Option<String>,
        caller: &KeyRecord,
        required: &'static [Role],
    ) {
        self.count(
            FailureSource {
                network: ip.as_deref().map(network_of),
                reason: FailureReason::Forbidden,
                route,
                refused: Some((caller.name.clone(), caller.role, required)),
            },
            ip,
            Some(caller.identifier.clone()),
        );
    }

    fn count(&self, source: FailureSource, ip: Option<String>, identifier: Option<String>) {
        metrics::counter!("metlo_auth_failures_total", "reason" => source.reason.as_str())
            .increment(1);
        let now = now_ms();
        let mut pending = self.pending.lock().unwrap();
        let full = pending.counts.len() >= MAX_PENDING_FAILURES;
        let counted = match pending.counts.get_mut(&source) {
            Some(c) => c,
            None if full => {
                metrics::counter!("metlo_audit_failures_not_itemised_total", "why" => "over_cap")
                    .increment(1);
                pending.window().over_cap += 1;
                return;
            }
            None => pending.counts.entry(source).or_insert(FailureCount {
                count: 0,
                first_ms: now,
                last_ms: now,
                identifiers: Vec::new(),
                addresses: Vec::new(),
            }),
        };
        counted.count += 1;
        counted.last_ms = now;
        for (seen, list) in [
            (identifier, &mut counted.identifiers),
            (ip, &mut counted.addresses),
        ] {
            if let Some(seen) = seen {
                if list.len() < MAX_IDENTIFIERS && !list.contains(&seen) {
                    list.push(seen);
                }
            }
        }
    }

    /// The rows to write now: the busiest sources, as many as the minute has left of
    /// its cap (the rest folded into the minute's summary), and the summary of the
    /// minute before once it is over.
    fn take(&self) -> Vec<AuditEntry> {
        let mut pending = self.pending.lock().unwrap();
        pending.window();
        let mut entries = std::mem::take(&mut pending.ended);
        let counts = std::mem::take(&mut pending.counts);
        // A valid key refused for its role names its caller: always itemised (there are
        // only so many keys), outside the cap that bounds anonymous junk.
        let (mut sources, anonymous): (Vec<_>, Vec<_>) =
            counts.into_iter().partition(|(s, _)| s.refused.is_some());
        let mut anonymous: Vec<(FailureSource, FailureCount)> = anonymous;
        anonymous.sort_unstable_by_key(|s| std::cmp::Reverse(s.1.count));
        let window = pending.window();
        let room = self.rows_per_minute.saturating_sub(window.rows);
        let folded = anonymous.split_off(anonymous.len().min(room));
        window.rows += anonymous.len();
        sources.extend(anonymous);
        let folded_count: u64 = folded.iter().map(|(_, c)| c.count).sum();
        if folded_count > 0 {
            metrics::counter!("metlo_audit_failures_not_itemised_total", "why" => "over_cap")
                .increment(folded_count);
        }
        window.over_cap += folded_count;
        window.sources += folded.len() as u64;
        drop(pending);
        entries.extend(sources.into_iter().map(|(source, c)| {
            let mut detail = json!({
                "reason": source.reason.as_str(),
                "route": source.route,
                "count": c.count,
                "identifiers": c.identifiers,
                "addresses": c.addresses,
                "first": iso8601(c.first_ms),
                "last": iso8601(c.last_ms),
            });
            let actor = source.refused.map(|(name, role, required)| {
                detail["role"] = json!(role.as_str());
                detail["required"] = json!(required.iter().map(|r| r.as_str()).collect::<Vec<_>>());
                name
            });
            AuditEntry {
                actor,
                action: "auth.failed",
                target: None,
                ip: source.network,
                detail,
            }
        }));
        entries
    }
}

/// The network a failure is filed under: an IPv4 /24 or an IPv6 /64 (what one attacker
/// can hold), so rotating addresses within it does not make new rows.
fn network_of(ip: &str) -> String {
    let Ok(ip) = ip.parse::<std::net::IpAddr>() else {
        return ip.to_owned();
    };
    let ip = ip.to_canonical();
    let prefix = if ip.is_ipv4() { 24 } else { 64 };
    ipnet::IpNet::new(ip, prefix)
        .expect("prefix in range")
        .trunc()
        .to_string()
}

/// Writes failed authentications once a second (a failed write is retried with the
/// next), and deletes entries older than `retention` (zero: keeps everything) — checked
/// every quarter of the retention, at most hourly. Runs for as long as the process.
pub async fn flush_forever(store: Store, failures: Arc<AuthFailures>, retention: Duration) {
    let prune_every = (retention / 4).clamp(FLUSH_EVERY, Duration::from_secs(3600));
    let mut unwritten: Vec<AuditEntry> = Vec::new();
    let mut last_prune = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(FLUSH_EVERY).await;
        if !retention.is_zero() && last_prune.elapsed() >= prune_every {
            last_prune = tokio::time::Instant::now();
            let before = now_ms() - retention.as_millis() as i64;
            prune(&store, before).await;
        }
        unwritten.extend(failures.take());
        if unwritten.is_empty() {
            continue;
        }
        match store.append_audit(&unwritten).await {
            Ok(()) => unwritten.clear(),
            Err(e) => {
                tracing::warn!(error = %e, pending = unwritten.len(), "audit log write failed; will retry");
                // Bounded: keep the newest entries if the database stays away.
                let excess = unwritten.len().saturating_sub(MAX_PENDING_FAILURES);
                unwritten.drain(..excess);
            }
        }
    }
}

/// Writes the failed authentications gathered so far, now (what [`flush_forever`] does
/// on its interval; `App::flush` for tests); the rows written. A failed write is logged.
pub async fn flush_failures(store: &Store, failures: &AuthFailures) -> usize {
    let entries = failures.take();
    if entries.is_empty() {
        return 0;
    }
    match store.append_audit(&entries).await {
        Ok(()) => entries.len(),
        Err(e) => {
            tracing::warn!(error = %e, pending = entries.len(), "audit log write failed");
            0
        }
    }
}

/// Deletes entries older than `retention` now (zero: none), as [`flush_forever`] does
/// every quarter of it.
pub async fn prune_past(store: &Store, retention: Duration) {
    if !retention.is_zero() {
        prune(store, now_ms() - retention.as_millis() as i64).await;
    }
}

/// Deletes what is past `before_ms`, a bounded batch at a time, letting other writers
/// in between.
async fn prune(store: &Store, before_ms: i64) {
    let mut deleted = 0;
    loop {
        match store.prune_audit(before_ms, PRUNE_BATCH).await {
            Ok(n) => {
                deleted += n;
                if n < PRUNE_BATCH as u64 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "audit retention: delete failed; will retry");
                break;
            }
        }
    }
    if deleted > 0 {
        tracing::info!(deleted, "audit entries past their retention deleted");
    }
}

/// One audit entry.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditEntryOut {
    pub id: i64,
    /// ISO 8601.
    pub at: String,
    /// The calling key's name; null when unauthenticated or the local CLI.
    pub actor: Option<String>,
    /// `key.create`, `key.delete`, `key.roll` or `auth.failed`.
    pub action: String,
    /// The key acted on.
    pub target: Option<String>,
    pub ip: Option<String>,
    #[schema(value_type = Object)]
    pub detail: Value,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditPage {
    pub entries: Vec<AuditEntryOut>,
    /// Pass as `before` for the next (older) page; null on the last page.
    #[serde(rename = "nextBefore")]
    pub next_before: Option<i64>,
}

impl From<AuditRow> for AuditEntryOut {
    fn from(r: AuditRow) -> Self {
        AuditEntryOut {
            id: r.id,
            at: iso8601(r.at_ms),
            actor: r.actor,
            action: r.action,
            target: r.target,
            ip: r.ip,
            detail: serde_json::from_str(&r.detail).unwrap_or(Value::Null),
        }
    }
}

/// The page rules, for the route and the CLI alike.
pub fn check_page(limit: i64, before: Option<i64>) -> Result<(i64, Option<i64>), Error> {
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(Error::invalid(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    if before.is_some_and(|b| b < 1) {
        return Err(Error::invalid("before must be at least 1"));
    }
    Ok((limit, before))
}

/// One page of the audit log, newest first (shared by the route and the CLI).
pub async fn page(
    store: &Store,
    limit: i64,
    before: Option<i64>,
    filter: &AuditFilter,
) -> Result<AuditPage, Error> {
    // One row more than asked tells whether there is a next page.
    let rows = store.list_audit(limit + 1, before, filter).await?;
    let more = rows.len() as i64 > limit;
    let entries: Vec<AuditEntryOut> = rows
        .into_iter()
        .take(limit as usize)
        .map(Into::into)
        .collect();
    let next_before = more.then(|| entries.last().map(|e| e.id)).flatten();
    Ok(AuditPage {
        entries,
        next_before,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Anonymous junk gets the minute's cap; a valid key refused for its role (which
    /// names its caller) is itemised whatever the junk did.
    #[test]
    fn role_refusals_are_itemised_outside_the_cap() {
        let failures = AuthFailures::new(2);
        for i in 0..5 {
            let ip = format!("10.0.{i}.1");
            failures.record(Some(ip), FailureReason::Invalid, None, None);
        }
        let caller = KeyRecord::sample();
        failures.record_forbidden(Some("10.9.9.9".into()), None, &caller, &[Role::Admin]);
        let rows = failures.take();
        let refused: Vec<_> = rows.iter().filter(|r| r.actor.is_some()).collect();
        assert_eq!(refused.len(), 1, "{rows:?}");
        assert_eq!(refused[0].actor.as_deref(), Some(caller.name.as_str()));
        assert_eq!(
            rows.len(),
            3,
            "two anonymous rows (the cap) and the refusal"
        );
    }
}
