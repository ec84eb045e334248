//! The rows the store reads and writes, one type per table shape. Apart from the
//! `impl Store` blocks (one file per aggregate) so that every file can use them and
//! they use nothing back.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use metlo_shared::credits::{Grant, Refill};
use metlo_shared::identity::NamedLimits;
use metlo_shared::{KeyRecord, KeyType, RateLimit, Role};

use crate::clock::{iso8601, unix_seconds};

/// A transaction on the store's pool.
pub type Tx = sqlx::Transaction<'static, sqlx::Any>;

/// Postgres channel the outbox writers notify, so every replica's drainer wakes at once.
pub const OUTBOX_CHANNEL: &str = "metlo_kv_outbox";
/// PostgreSQL channel notified when revocation-feed rows commit.
pub const FEED_CHANNEL: &str = "metlo_revocation_feed";

/// The columns of a [`StoredKey`], in `SELECT`s.
pub(super) const KEY_COLUMNS: &str =
    "id, name, key_hash, identifier, key_type, created_at_ms, expires_at_ms, last_used_ms, role, disabled_at_ms, meta, rate_limit_requests, rate_limit_period_seconds, permissions, credits_set, credits_to, credits_added, credits_refill, identity_id, identity_record";

/// [`KEY_COLUMNS`], each as `alias.column` (for joins).
pub(super) fn key_columns_of(alias: &str) -> String {
    KEY_COLUMNS
        .split(", ")
        .map(|c| format!("{alias}.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A stored key: everything but the secret. (Looked up by a rolled-away secret, it
/// carries that secret's hash and identifier, and expires when its overlap ends.)
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StoredKey {
    pub id: i64,
    pub name: String,
    pub key_hash: String,
    pub identifier: String,
    #[sqlx(try_from = "String")]
    pub key_type: KeyType,
    pub created_at_ms: i64,
    /// Whole seconds (in ms); `None`: never expires.
    pub expires_at_ms: Option<i64>,
    pub last_used_ms: Option<i64>,
    #[sqlx(try_from = "String")]
    pub role: Role,
    /// When the key was disabled; `None`: enabled.
    pub disabled_at_ms: Option<i64>,
    /// Compact JSON object, at most 1 KB.
    pub meta: Option<String>,
    /// The rate limit, both set or neither ([`StoredKey::rate_limit`]).
    pub rate_limit_requests: Option<i64>,
    pub rate_limit_period_seconds: Option<i64>,
    /// Space-separated, sorted, no duplicates ([`StoredKey::permissions`]); `None`: none.
    pub permissions: Option<String>,
    #[sqlx(flatten)]
    pub credits: CreditColumns,
    /// The identity the key belongs to; `None`: none.
    pub identity_id: Option<i64>,
    /// What of the identity the key's record carries ([`IdentityPart`] as JSON), kept in
    /// step with the identity.
    pub identity_record: Option<String>,
}

/// Credits as granted, as a key's or an identity's columns: the last set's number (only
/// grows), its value (`None`: unmetered), what was added since, the refill rule (JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct CreditColumns {
    pub credits_set: i64,
    pub credits_to: Option<i64>,
    pub credits_added: i64,
    pub credits_refill: Option<String>,
}

impl CreditColumns {
    /// The grant; `None`: unmetered. A refill stored unreadable (by hand) reads as none:
    /// the balance still only falls.
    pub fn grant(&self) -> Option<Grant> {
        let to = self.credits_to?;
        Some(Grant {
            set: u64::try_from(self.credits_set).unwrap_or(0).max(1),
            to: u64::try_from(to).unwrap_or(0),
            added: u64::try_from(self.credits_added).unwrap_or(0),
            refill: self
                .credits_refill
                .as_deref()
                .and_then(|r| serde_json::from_str(r).ok()),
        })
    }

    /// Sets the credits (a new set: the edge's balance becomes `remaining`), or removes
    /// them; either way what was added is forgotten.
    pub fn set(&mut self, credits: Option<(u64, Option<Refill>)>) {
        self.credits_added = 0;
        match credits {
            Some((remaining, refill)) => {
                // Unique for all time, not only for this row: a meter's Durable Object is
                // named after the key or identity and outlives a delete, so a key made
                // again under the same name must not look older than the one deleted.
                self.credits_set = (self.credits_set + 1).max(crate::clock::now_ms());
                self.credits_to = Some(i64::try_from(remaining).unwrap_or(i64::MAX));
                self.credits_refill =
                    refill.map(|r| serde_json::to_string(&r).expect("a refill always serializes"));
            }
            None => {
                self.credits_to = None;
                self.credits_refill = None;
            }
        }
    }

    /// Applies a change; a top-up of credits there are none of, or past the most a grant
    /// may hold, is refused.
    pub fn apply(&mut self, change: CreditsChange) -> Result<(), CreditsRefused> {
        match change {
            CreditsChange::Set(credits) => self.set(credits),
            CreditsChange::Add(n) => {
                let Some(to) = self.credits_to else {
                    return Err(CreditsRefused::NoCredits);
                };
                let added = self
                    .credits_added
                    .saturating_add(i64::try_from(n).unwrap_or(i64::MAX));
                if added.saturating_add(to) > metlo_shared::credits::MAX_CREDITS as i64 {
                    return Err(CreditsRefused::TooMany);
                }
                self.credits_added = added;
            }
        }
        Ok(())
    }
}

/// Why a credits change cannot apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreditsRefused {
    /// A top-up of credits there are none of.
    NoCredits,
    /// Past the most a grant may hold.
    TooMany,
}

/// The identity fields of a key's edge record.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityPart {
    pub identity: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_credits: Option<Grant>,
    #[serde(default, skip_serializing_if = "NamedLimits::is_empty")]
    pub identity_limits: NamedLimits,
}

/// An identity's row.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StoredIdentity {
    pub id: i64,
    pub external_id: String,
    /// Compact JSON object, at most 1 KB.
    pub meta: Option<String>,
    pub created_at_ms: i64,
    /// [`NamedLimits::encode`]d.
    pub rate_limits: String,
    #[sqlx(flatten)]
    pub credits: CreditColumns,
}

impl StoredIdentity {
    pub fn limits(&self) -> NamedLimits {
        NamedLimits::decode(&self.rate_limits).unwrap_or_default()
    }

    /// What its keys' records carry of it.
    pub fn part(&self) -> IdentityPart {
        IdentityPart {
            identity: self.external_id.clone(),
            identity_credits: self.credits.grant(),
            identity_limits: self.limits(),
        }
    }

    pub fn part_json(&self) -> String {
        serde_json::to_string(&self.part()).expect("an identity part always serializes")
    }
}

/// The columns of [`StoredIdentity`], in its order.
pub(super) const IDENTITY_COLUMNS: &str = "id, external_id, meta, created_at_ms, rate_limits, credits_set, credits_to, credits_added, credits_refill";

impl StoredKey {
    /// A new key's row for `secret`: enabled, never used, no expiry, meta or limit (its
    /// `id` is assigned by the database).
    pub fn new(
        secret: &metlo_shared::ApiKey,
        name: String,
        key_type: KeyType,
        role: Role,
        created_at_ms: i64,
    ) -> Self {
        StoredKey {
            id: 0,
            name,
            key_hash: secret.hash().to_hex(),
            identifier: secret.identifier(),
            key_type,
            created_at_ms,
            expires_at_ms: None,
            last_used_ms: None,
            role,
            disabled_at_ms: None,
            meta: None,
            rate_limit_requests: None,
            rate_limit_period_seconds: None,
            permissions: None,
            credits: CreditColumns::default(),
            identity_id: None,
            identity_record: None,
        }
    }

    /// The key's credits as granted; `None`: unmetered.
    pub fn credits(&self) -> Option<Grant> {
        self.credits.grant()
    }

    /// The identity the key's record names, if any.
    pub fn identity(&self) -> Option<IdentityPart> {
        self.identity_record
            .as_deref()
            .and_then(|j| serde_json::from_str(j).ok())
    }

    /// The key's permissions, sorted (as stored).
    pub fn permissions(&self) -> Vec<String> {
        self.permissions
            .as_deref()
            .unwrap_or("")
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    }

    /// Sets the permissions column (`permissions` already normalised).
    pub fn set_permissions(&mut self, permissions: &[String]) {
        self.permissions = (!permissions.is_empty()).then(|| permissions.join(" "));
    }

    /// The key's rate limit. A stored pair out of range (written by hand) reads as the
    /// tightest limit, never as none.
    pub fn rate_limit(&self) -> Option<RateLimit> {
        match (self.rate_limit_requests, self.rate_limit_period_seconds) {
            (None, None) => None,
            (requests, period) => Some(
                requests
                    .zip(period)
                    .and_then(|(r, p)| RateLimit::new(r.try_into().ok()?, p.try_into().ok()?).ok())
                    .unwrap_or(RateLimit {
                        requests: 1,
                        period_seconds: metlo_shared::MAX_PERIOD_SECONDS,
                    }),
            ),
        }
    }

    /// Sets the two rate-limit columns.
    pub fn set_rate_limit(&mut self, limit: Option<RateLimit>) {
        self.rate_limit_requests = limit.map(|l| l.requests.into());
        self.rate_limit_period_seconds = limit.map(|l| l.period_seconds.into());
    }

    /// The record the edge caches in KV for this key.
    pub fn record(&self) -> KeyRecord {
        let mut record = KeyRecord {
            v: 0,
            rate_limit: self.rate_limit(),
            permissions: self.permissions(),
            credits: self.credits(),
            identity: None,
            identity_credits: None,
            identity_limits: NamedLimits::default(),
            name: self.name.clone(),
            key_type: self.key_type,
            identifier: self.identifier.clone(),
            created: iso8601(self.created_at_ms),
            expires: self.expires_at_ms.map(unix_seconds),
            role: self.role,
            meta: self.meta.as_deref().map(|m| URL_SAFE_NO_PAD.encode(m)),
        };
        if let Some(part) = self.identity() {
            record.identity = Some(part.identity);
            record.identity_credits = part.identity_credits;
            record.identity_limits = part.identity_limits;
        }
        record.v = record.min_version();
        record
    }

    /// Is this key's traffic let through (its role serves traffic and it is enabled)? Only
    /// such keys have records in KV.
    pub fn serves_traffic(&self) -> bool {
        self.role.serves_traffic() && self.disabled_at_ms.is_none()
    }

    /// The record of a secret a roll replaced: the key's, with that secret's identifier,
    /// expiring when its overlap ends (or the key expires, if sooner).
    pub fn retired_record(&self, identifier: &str, retires_at_ms: i64) -> KeyRecord {
        KeyRecord {
            identifier: identifier.to_owned(),
            expires: Some(unix_seconds(self.secret_end(retires_at_ms))),
            ..self.record()
        }
    }

    /// When a rolled-away secret retiring at `retires_at_ms` stops: then, or when the
    /// key expires if sooner.
    pub fn secret_end(&self, retires_at_ms: i64) -> i64 {
        self.expires_at_ms
            .map_or(retires_at_ms, |e| e.min(retires_at_ms))
    }
}

/// What an update of a key changes; `None`: left as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyChanges {
    pub enabled: Option<bool>,
    /// `Some(None)`: never expires.
    pub expires_at_ms: Option<Option<i64>>,
    /// `Some(None)`: no metadata.
    pub meta: Option<Option<String>>,
    /// `Some(None)`: no limit.
    pub rate_limit: Option<Option<RateLimit>>,
    /// Normalised; `Some(vec![])`: none.
    pub permissions: Option<Vec<String>>,
    pub credits: Option<CreditsChange>,
    /// `Some(None)`: no identity.
    pub identity: Option<Option<StoredIdentity>>,
}

/// A change to a key's or an identity's credits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreditsChange {
    /// A new balance and refill rule; `None`: unmetered.
    Set(Option<(u64, Option<Refill>)>),
    /// A top-up.
    Add(u64),
}

impl KeyChanges {
    pub fn is_empty(&self) -> bool {
        *self == KeyChanges::default()
    }

    /// `key` with these changes, disabled (if so) at `now_ms`.
    pub fn apply(&self, key: &StoredKey, now_ms: i64) -> StoredKey {
        let mut changed = StoredKey {
            disabled_at_ms: match self.enabled {
                None => key.disabled_at_ms,
                Some(true) => None,
                Some(false) => key.disabled_at_ms.or(Some(now_ms)),
            },
            expires_at_ms: self.expires_at_ms.unwrap_or(key.expires_at_ms),
            meta: self.meta.clone().unwrap_or_else(|| key.meta.clone()),
            ..key.clone()
        };
        if let Some(limit) = self.rate_limit {
            changed.set_rate_limit(limit);
        }
        if let Some(permissions) = &self.permissions {
            changed.set_permissions(permissions);
        }
        if let Some(change) = self.credits {
            // A refused top-up is caught by the store before it applies the changes.
            let _ = changed.credits.apply(change);
        }
        if let Some(identity) = &self.identity {
            changed.identity_id = identity.as_ref().map(|i| i.id);
            changed.identity_record = identity.as_ref().map(StoredIdentity::part_json);
        }
        changed
    }
}

/// A secret that a roll replaced, and when it stops working (ms; at or before the roll's
/// time: at once).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RetiredSecret {
    pub key_hash: String,
    pub identifier: String,
    pub retires_at_ms: i64,
}

/// The outcome of a roll: the key with its new secret's hash, and every older secret
/// whose end changed.
#[derive(Debug, Clone)]
pub struct Rolled {
    pub key: StoredKey,
    pub retired: Vec<RetiredSecret>,
}

/// One audit-log entry. Never holds a secret.
#[derive(Debug, Clone)]
pub struct AuditEntry {
    /// The calling key's name; `None`: unauthenticated, or the local CLI.
    pub actor: Option<String>,
    /// `key.create`, `key.delete`, `key.roll` or `auth.failed`.
    pub action: &'static str,
    /// The key acted on.
    pub target: Option<String>,
    pub ip: Option<String>,
    pub detail: serde_json::Value,
}

/// A stored audit-log row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AuditRow {
    pub id: i64,
    pub at_ms: i64,
    pub actor: Option<String>,
    pub action: String,
    pub target: Option<String>,
    pub ip: Option<String>,
    /// A JSON object.
    pub detail: String,
}

/// Which audit rows a page holds: all, or only one action's, or one actor's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    pub action: Option<String>,
    pub actor: Option<String>,
}

/// A stored console session (its token only as a hash).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SessionRow {
    /// The hash of the admin key the session acts as.
    pub key_hash: String,
    pub csrf_token: String,
    pub created_ms: i64,
    pub last_seen_ms: i64,
}

/// One revocation-feed event.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct FeedRow {
    pub seq: i64,
    pub key_hash: String,
    /// The secret's record from now on; `None`: refused.
    pub record: Option<String>,
    pub at_ms: i64,
}

/// The public half of a key the edge signs assertions with.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AssertionKeyRow {
    pub kid: String,
    /// `ES256`.
    pub alg: String,
    /// The public JWK (JSON).
    pub public_jwk: String,
    pub created_at_ms: i64,
    /// When it left the JWKS; `None`: published.
    pub retired_at_ms: Option<i64>,
}

/// One version of the route policy.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct PolicyRow {
    pub version: i64,
    /// Canonical JSON (`shared::policy::PolicyDocument`).
    pub document: String,
    /// What the edge reads (`RoutePolicy::to_lines`).
    pub lines: String,
    pub created_at_ms: i64,
    /// Who set it (a key's name); `None`: the local CLI.
    pub actor: Option<String>,
    pub feed_seq: i64,
}

/// One pending KV update.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct OutboxRow {
    pub id: i64,
    pub kv_key: String,
    /// `Some(record JSON)`: put; `None`: delete.
    pub value: Option<String>,
}

/// Rows claimed by one drainer. On Postgres they stay locked (`FOR UPDATE SKIP LOCKED`)
/// until [`Store::finish_claim`], so no other replica sends them meanwhile.
pub struct Claim {
    pub(super) tx: Option<Tx>,
    pub rows: Vec<OutboxRow>,
}

/// What KV took of a claim.
pub enum Sent<'a> {
    /// Every update.
    All,
    /// None: the request failed.
    Failed(&'a str),
    /// All but the updates of these KV keys (the API's `unsuccessful_keys`).
    Partly {
        unsent: &'a std::collections::HashSet<&'a str>,
        error: &'a str,
    },
}

/// One entry KV should hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEntry {
    /// The secret's hash (hex): the KV key.
    pub key: String,
    /// The record's JSON: the KV value.
    pub value: String,
}

/// Where an interrupted resync stopped.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ResyncCheckpoint {
    /// Every entry up to this hash has been written.
    pub after_hash: String,
    pub done: i64,
    pub started_at_ms: i64,
}

/// Whose a secret's hash is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretOwner {
    /// A key's current secret (the key may be disabled or expired).
    Current(StoredKey),
    /// A secret a roll replaced, still on record (in or just past its overlap).
    RolledAway(StoredKey),
    /// A secret of a key since deleted, or revoked as leaked.
    Revoked,
}

/// Milliseconds in an hour: usage is counted per hour since the epoch.
pub const HOUR_MS: i64 = 3_600_000;

/// One key's uses since the last flush: its latest time (0: none, only refusals), requests
/// per hour, and refused requests per hour and [`OUTCOMES`] index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Uses {
    pub last_ms: i64,
    /// (hour since the epoch, requests); a flush a minute sees one or two hours.
    pub hours: Vec<(i64, u64)>,
    /// (hour, outcome, requests).
    pub refused: Vec<(i64, usize, u64)>,
}

/// Why the edge refused a request of a known key, as reports and queries name it.
pub const OUTCOMES: [&str; 5] = [
    "rateLimited",
    "creditsExhausted",
    "forbidden",
    "disabled",
    "expired",
];

impl Uses {
    /// `count` requests, the last at `at_ms`.
    pub fn add(&mut self, at_ms: i64, count: u64) {
        self.last_ms = self.last_ms.max(at_ms);
        if count == 0 {
            return;
        }
        let hour = at_ms.div_euclid(HOUR_MS);
        match self.hours.iter_mut().find(|(h, _)| *h == hour) {
            Some((_, n)) => *n += count,
            None => self.hours.push((hour, count)),
        }
    }

    /// Refused requests, `counts` by [`OUTCOMES`] index, the last at `at_ms`.
    pub fn add_refused(&mut self, at_ms: i64, counts: [u64; 5]) {
        let hour = at_ms.div_euclid(HOUR_MS);
        for (outcome, count) in counts.into_iter().enumerate().filter(|(_, c)| *c > 0) {
            match self
                .refused
                .iter_mut()
                .find(|(h, o, _)| *h == hour && *o == outcome)
            {
                Some((_, _, n)) => *n += count,
                None => self.refused.push((hour, outcome, count)),
            }
        }
    }

    pub fn merge(&mut self, other: Uses) {
        self.last_ms = self.last_ms.max(other.last_ms);
        for (hour, count) in other.hours {
            match self.hours.iter_mut().find(|(h, _)| *h == hour) {
                Some((_, n)) => *n += count,
                None => self.hours.push((hour, count)),
            }
        }
        for (hour, outcome, count) in other.refused {
            let mut counts = [0; 5];
            counts[outcome] = count;
            self.add_refused(hour * HOUR_MS, counts);
        }
    }
}
