//! Keys: the rules a name, type, expiry and overlap must follow, and the operations on
//! keys — create, roll, delete, list, and verification through the cache — with the
//! shapes they return, which are Metlo's JSON (paths and field names exactly).

use std::time::Duration;

use metlo_shared::credits::Refill;
use metlo_shared::permissions::normalize_permissions;
use metlo_shared::{ApiKey, KeyHash, KeyType, RateLimit, Role};
use serde::{Deserialize, Serialize};
use serde_json::json;
use unicode_normalization::UnicodeNormalization;
use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};
use utoipa::ToSchema;

use super::audit::Actor;
use super::credits::{Credits, CreditsInfo};
use super::feed::Promise;
use super::meta::{meta_value, validate_meta};
use super::Error;
use crate::cache::VerifyCache;
use crate::clock::{iso8601, now_ms};
use crate::db::rows::{AuditEntry, Rolled, StoredKey};
use crate::db::Store;

/// Longest accepted key name, in characters.
pub const MAX_NAME_CHARS: usize = 128;
/// Longest overlap a roll may give the old secret: 7 days.
pub const MAX_OVERLAP_SECONDS: u64 = 7 * 24 * 3600;

/// The body of a create (Metlo's `{name, keyFor}`, plus `expiresAt`).
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct CreateKeyRequest {
    /// Unique name: 1–128 characters (after Unicode NFC normalisation), no control or
    /// format characters (bidi overrides, zero-width), no leading or trailing
    /// whitespace, not `.`, `..` or `by-hash`. (Deserialized as optional so a missing name
    /// gets our own 400.)
    #[schema(value_type = String, required = true, min_length = 1, max_length = 128,
        pattern = r"^(?!\.{1,2}$)(?!by-hash$)(?=\S)[^\x00-\x1f\x7f-\x9f\u00ad\u0600-\u0605\u061c\u06dd\u070f\u08e2\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb]*(?<=\S)$", example = "ingestor-prod")]
    pub name: Option<String>,
    /// Key type; `GENERIC` when omitted.
    #[serde(rename = "keyFor")]
    #[schema(value_type = Option<KeyType>, example = "GENERIC")]
    pub key_for: Option<String>,
    /// When the key stops working: RFC 3339 (ISO 8601 with a time zone), in the future,
    /// cut to whole seconds. Absent or null: never.
    #[serde(rename = "expiresAt")]
    #[schema(value_type = Option<String>, format = DateTime, example = "2030-01-01T00:00:00Z")]
    pub expires_at: Option<String>,
    /// What the key may do: `client` (the default: traffic at the edge and
    /// `/api/v1/verify`), `edge` (the Worker's own key) or `admin`.
    #[schema(value_type = Option<Role>, example = "client")]
    pub role: Option<String>,
    /// A JSON object (at most 1 KB as compact JSON) forwarded to the origin with every
    /// request this key makes through the edge (`X-Metlo-Key-Meta`, base64url JSON).
    #[schema(value_type = Option<Object>, example = json!({"tenant": "acme"}))]
    pub meta: Option<serde_json::Value>,
    /// At most `requests` per `periodSeconds` (a fixed window), at the edge and on
    /// `/api/v1/verify`; past it, 429. Absent or null: no limit.
    #[serde(rename = "rateLimit")]
    pub rate_limit: Option<RateLimit>,
    /// What the key may do past the edge's route policy and `/api/v1/verify?permission=`:
    /// up to 50 of 1–64 characters (`A-Z a-z 0-9 _ - . : /`, starting with a letter or
    /// digit). Only for keys whose role serves traffic. Absent: none.
    #[schema(value_type = Option<Vec<String>>, example = json!(["orders:read"]))]
    pub permissions: Option<Vec<String>>,
    /// A balance each request admitted at the edge spends, with an optional refill; past
    /// it, 429 `credits_exhausted`. Only for keys whose role serves traffic. Absent: none.
    pub credits: Option<Credits>,
    /// The `externalId` of the identity the key belongs to (it shares the identity's
    /// credits and named limits, and the edge forwards the `externalId`). Client keys only.
    #[schema(example = "acme-corp")]
    pub identity: Option<String>,
}

/// A validated create request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewKey {
    pub name: String,
    pub key_type: KeyType,
    /// Whole seconds, in the future.
    pub expires_at_ms: Option<i64>,
    pub role: Role,
    /// Compact JSON object.
    pub meta: Option<String>,
    pub rate_limit: Option<RateLimit>,
    /// Normalised ([`metlo_shared::permissions::normalize_permissions`]).
    pub permissions: Vec<String>,
    pub credits: Option<(u64, Option<Refill>)>,
    /// An identity's `externalId` (checked to exist when the key is made).
    pub identity: Option<String>,
}

impl CreateKeyRequest {
    /// The key to make, or what is wrong with the request.
    pub fn validate(self, now_ms: i64) -> Result<NewKey, Error> {
        let role = parse_role(self.role.as_deref())?;
        Ok(NewKey {
            name: validate_name(self.name.as_deref())?,
            key_type: parse_key_type(self.key_for.as_deref())?,
            permissions: validate_permissions(self.permissions.unwrap_or_default(), role)?,
            role,
            expires_at_ms: self
                .expires_at
                .map(|v| parse_expires_at(&v, now_ms))
                .transpose()?,
            meta: validate_meta(self.meta.unwrap_or_default())?,
            rate_limit: self.rate_limit,
            credits: match self.credits {
                Some(_) if !role.serves_traffic() => {
                    return Err(Error::invalid(format!(
                        "credits are for client keys; a {role} key cannot carry them"
                    )))
                }
                c => c.map(Credits::validate).transpose()?,
            },
            identity: match self.identity {
                Some(_) if !role.serves_traffic() => {
                    return Err(Error::invalid(format!(
                        "identities are for client keys; a {role} key cannot belong to one"
                    )))
                }
                i => i,
            },
        })
    }
}

/// The body of a roll. Unknown fields are refused: a misspelt overlap must not silently
/// end the old secret.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollKeyRequest {
    /// How long the previous secret keeps working, in seconds (0–604800, i.e. up to 7
    /// days; default 0: it stops at once). The end is rounded up to a whole second.
    #[serde(rename = "overlapSeconds")]
    #[schema(value_type = Option<u64>, minimum = 0, maximum = 604800)]
    pub overlap_seconds: Option<serde_json::Number>,
}

impl RollKeyRequest {
    /// The overlap asked for, or what is wrong with it.
    pub fn overlap(&self) -> Result<Duration, Error> {
        // A whole number, also when written as one (`60.0` is an integer to JSON Schema).
        let seconds = match &self.overlap_seconds {
            None => 0,
            Some(n) => match (n.as_u64(), n.as_f64()) {
                (Some(s), _) => s,
                (None, Some(f))
                    if f.fract() == 0.0 && (0.0..=MAX_OVERLAP_SECONDS as f64).contains(&f) =>
                {
                    f as u64
                }
                _ => return Err(overlap_out_of_range()),
            },
        };
        overlap(seconds)
    }
}

/// An overlap of `seconds`, if within the rules.
pub fn overlap(seconds: u64) -> Result<Duration, Error> {
    if seconds > MAX_OVERLAP_SECONDS {
        return Err(overlap_out_of_range());
    }
    Ok(Duration::from_secs(seconds))
}

fn overlap_out_of_range() -> Error {
    Error::invalid(format!(
        "overlapSeconds must be a whole number of seconds from 0 to {MAX_OVERLAP_SECONDS} (7 days)"
    ))
}

/// Returned once, at creation: the only time the full key is ever shown.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedKey {
    #[serde(rename = "apiKey")]
    pub api_key: String,
    #[serde(flatten)]
    pub info: KeyInfo,
}

/// Key metadata; never the key.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyInfo {
    pub name: String,
    pub identifier: String,
    /// ISO 8601.
    pub created: String,
    #[serde(rename = "for")]
    #[schema(example = "GENERIC")]
    pub key_for: KeyType,
    /// ISO 8601; null: never expires. An expired key is refused but still listed (and
    /// counts toward the limit) until deleted.
    #[serde(rename = "expiresAt")]
    pub expires_at: Option<String>,
    /// ISO 8601; null: never used. Updated at most once a minute.
    #[serde(rename = "lastUsed")]
    pub last_used: Option<String>,
    /// What the key may do.
    pub role: Role,
    /// False: disabled — refused everywhere like an unknown key, until enabled again.
    pub enabled: bool,
    /// The JSON object forwarded to the origin; null: none.
    #[schema(value_type = Option<Object>)]
    pub meta: Option<serde_json::Value>,
    /// The key's rate limit; null: none.
    #[serde(rename = "rateLimit")]
    pub rate_limit: Option<RateLimit>,
    /// The key's permissions, sorted; empty: none.
    #[serde(default)]
    pub permissions: Vec<String>,
    /// The key's credits as granted (what is left is counted at the edge); absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credits: Option<CreditsInfo>,
    /// The `externalId` of the identity the key belongs to; absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

/// Returned by a roll: the new key (shown only this once) and when the previous one stops.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RolledKey {
    #[serde(rename = "apiKey")]
    pub api_key: String,
    #[serde(flatten)]
    pub info: KeyInfo,
    /// The identifier of the secret this roll replaced.
    #[serde(rename = "previousIdentifier")]
    pub previous_identifier: String,
    /// ISO 8601: the previous secret is refused from this instant on.
    #[serde(rename = "previousValidUntil")]
    pub previous_valid_until: String,
    /// ISO 8601: by when every edge location refuses the previous secret (its end, or the
    /// edge's revocation bound after the roll when later).
    #[serde(rename = "refusedEverywhereBy")]
    pub refused_everywhere_by: String,
}

impl From<StoredKey> for KeyInfo {
    fn from(k: StoredKey) -> Self {
        KeyInfo {
            rate_limit: k.rate_limit(),
            permissions: k.permissions(),
            credits: k.credits().map(CreditsInfo::from),
            identity: k.identity().map(|i| i.identity),
            created: iso8601(k.created_at_ms),
            name: k.name,
            identifier: k.identifier,
            key_for: k.key_type,
            expires_at: k.expires_at_ms.map(iso8601),
            last_used: k.last_used_ms.map(iso8601),
            role: k.role,
            enabled: k.disabled_at_ms.is_none(),
            meta: meta_value(k.meta.as_deref()),
        }
    }
}

impl RolledKey {
    fn new(key: ApiKey, rolled: Rolled, promise: Promise) -> Self {
        let previous = &rolled.retired[0];
        // The previous secret stops at its overlap's end, or when the key expires if sooner.
        let until = rolled.key.secret_end(previous.retires_at_ms);
        RolledKey {
            api_key: key.expose_secret().to_owned(),
            previous_identifier: previous.identifier.clone(),
            previous_valid_until: iso8601(until),
            refused_everywhere_by: promise.until(until).answered(),
            info: rolled.key.into(),
        }
    }
}

/// Names the routes use as path segments under `/api/v1/keys/`: a key with such a name
/// could not be addressed by `…/{name}/delete`.
const RESERVED_NAMES: [&str; 1] = ["by-hash"];

/// Checks a name the way every entry point (HTTP and CLI) must, and returns it in the
/// form it is stored and looked up in (Unicode NFC), so names that look the same are
/// the same name.
pub fn validate_name(name: Option<&str>) -> Result<String, Error> {
    let raw = name.unwrap_or_default();
    if raw.trim().is_empty() {
        return Err(Error::invalid("name is required"));
    }
    // Format characters (bidi overrides, zero-width spaces, …) make a name look like
    // another; control characters break logs and tables.
    if raw.chars().any(char::is_control) {
        return Err(Error::invalid("name must not contain control characters"));
    }
    if raw
        .chars()
        .any(|c| c.general_category() == GeneralCategory::Format)
    {
        return Err(Error::invalid(
            "name must not contain invisible format characters (bidi controls, zero-width characters)",
        ));
    }
    // Line and paragraph separators end a line in logs; the Hangul fillers are letters
    // drawn as nothing, and variation selectors change nothing visible.
    if raw.chars().any(|c| {
        matches!(
            c.general_category(),
            GeneralCategory::LineSeparator | GeneralCategory::ParagraphSeparator
        ) || matches!(
            c,
            '\u{115f}'
                | '\u{1160}'
                | '\u{3164}'
                | '\u{ffa0}'
                | '\u{034f}'
                | '\u{180b}'..='\u{180f}'
                | '\u{fe00}'..='\u{fe0f}'
                | '\u{e0100}'..='\u{e01ef}'
        )
    }) {
        return Err(Error::invalid(
            "name must not contain line separators or characters drawn as nothing \
             (Hangul fillers, variation selectors)",
        ));
    }
    if raw.trim() != raw {
        return Err(Error::invalid("name must not start or end with whitespace"));
    }
    let name = normalize_name(raw);
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(Error::invalid(format!(
            "name must be at most {MAX_NAME_CHARS} characters"
        )));
    }
    // `.` and `..` are removed from URLs by clients, so DELETE could never address them.
    if name == "." || name == ".." {
        return Err(Error::invalid("name must not be \".\" or \"..\""));
    }
    if RESERVED_NAMES.contains(&name.as_str()) {
        return Err(Error::invalid(format!(
            "name must not be {name:?}: the API uses it as a path"
        )));
    }
    Ok(name)
}

/// A name as it is stored (NFC): what a path's name is looked up as.
pub fn normalize_name(name: &str) -> String {
    name.nfc().collect()
}

/// A role from a request (`client` when absent).
pub fn parse_role(role: Option<&str>) -> Result<Role, Error> {
    match role {
        None => Ok(Role::Client),
        // Legacy is what keys from before roles are; no new key is made one.
        Some("legacy") => Err(Error::invalid(metlo_shared::RoleError.to_string())),
        Some(s) => s
            .parse()
            .map_err(|e: metlo_shared::RoleError| Error::invalid(e.to_string())),
    }
}

pub fn parse_key_type(key_for: Option<&str>) -> Result<KeyType, Error> {
    match key_for {
        None => Ok(KeyType::Generic),
        Some(s) => s
            .parse()
            .map_err(|e: metlo_shared::KeyTypeError| Error::invalid(e.to_string())),
    }
}

/// An `expiresAt`: RFC 3339, cut to whole seconds, after `now_ms`.
pub fn parse_expires_at(value: &str, now_ms: i64) -> Result<i64, Error> {
    let at = chrono::DateTime::parse_from_rfc3339(value.trim()).map_err(|_| {
        Error::invalid(
            "expiresAt must be an RFC 3339 date-time with a time zone, e.g. 2030-01-01T00:00:00Z",
        )
    })?;
    let ms = at.timestamp().saturating_mul(1000);
    if ms <= now_ms {
        return Err(Error::invalid("expiresAt must be in the future"));
    }
    Ok(ms)
}

/// A key's permissions, normalised; only keys that serve traffic carry any (the edge and
/// `/api/v1/verify` are where they are checked).
pub fn validate_permissions(permissions: Vec<String>, role: Role) -> Result<Vec<String>, Error> {
    let permissions =
        normalize_permissions(permissions).map_err(|e| Error::invalid(e.to_string()))?;
    if !permissions.is_empty() && !role.serves_traffic() {
        return Err(Error::invalid(format!(
            "permissions are for client keys; a {role} key cannot carry them"
        )));
    }
    Ok(permissions)
}

fn generate_key() -> Result<ApiKey, Error> {
    ApiKey::generate().map_err(|e| Error::Internal(anyhow::anyhow!("no randomness: {e}")))
}

/// Makes a key and stores its hash. The response is the only time the key is shown.
pub async fn create_key(
    store: &Store,
    new: &NewKey,
    max_keys: u64,
    actor: &Actor,
) -> Result<CreatedKey, Error> {
    // Only an administrator mints keys with power over keys or over the edge's lookups
    // (the route already requires one; this holds whatever the entry point).
    if new.role != Role::Client && !actor.role.is_none_or(Role::administers) {
        return Err(Error::Forbidden(format!(
            "only an admin key can create {} keys",
            new.role
        )));
    }
    actor.may_mint(new.role)?;
    let key = generate_key()?;
    let mut stored = StoredKey {
        expires_at_ms: new.expires_at_ms,
        meta: new.meta.clone(),
        ..StoredKey::new(&key, new.name.clone(), new.key_type, new.role, now_ms())
    };
    stored.set_rate_limit(new.rate_limit);
    stored.set_permissions(&new.permissions);
    if new.credits.is_some() {
        stored.credits.set(new.credits);
    }
    if let Some(external_id) = &new.identity {
        let identity = store
            .identity(external_id)
            .await?
            .ok_or_else(|| Error::invalid("no identity with this externalId"))?;
        stored.identity_id = Some(identity.id);
        stored.identity_record = Some(identity.part_json());
    }
    let audit = actor.entry(
        "key.create",
        &new.name,
        json!({
            "identifier": stored.identifier,
            "type": new.key_type.as_str(),
            "role": new.role.as_str(),
            "expiresAt": new.expires_at_ms.map(iso8601),
            "meta": meta_value(new.meta.as_deref()),
            "rateLimit": new.rate_limit,
            "permissions": new.permissions,
            "credits": stored.credits().map(CreditsInfo::from),
            "identity": new.identity,
        }),
    );
    store.insert_key(&stored, max_keys, &audit).await?;
    tracing::info!(name = %new.name, identifier = %stored.identifier, key_type = %new.key_type, role = %new.role, "key created");
    Ok(CreatedKey {
        api_key: key.expose_secret().to_owned(),
        info: stored.into(),
    })
}

/// Gives a key a new secret; the previous one works for `overlap` more. Updates the
/// verification cache for every secret whose end moved.
pub async fn roll_key(
    store: &Store,
    cache: &VerifyCache,
    name: &str,
    overlap: Duration,
    actor: &Actor,
) -> Result<RolledKey, Error> {
    let name = &normalize_name(name);
    if actor.unconfirmed_session {
        // What the roll hands out is a secret of the key's role (a key's role is set
        // once, so reading it before the roll is reading it for the roll).
        let target = store
            .key_by_name(name)
            .await?
            .ok_or(Error::NotFound("no API key with this name"))?;
        actor.may_mint(target.role)?;
    }
    let key = generate_key()?;
    let promise = Promise::before_commit(Some(now_ms().saturating_add(overlap.as_millis() as i64)));
    let audit = actor.entry(
        "key.roll",
        name,
        json!({"identifier": key.identifier(), "overlapSeconds": overlap.as_secs(),
            "refusedEverywhereBy": promise.in_audit()}),
    );
    let rolled = store
        .roll_key(
            name,
            &key.hash().to_hex(),
            &key.identifier(),
            overlap,
            &audit,
        )
        .await?
        .ok_or(Error::NotFound("no API key with this name"))?;
    let now = now_ms();
    let mut all_written = true;
    for secret in &rolled.retired {
        let Ok(hash) = KeyHash::from_hex(&secret.key_hash) else {
            continue;
        };
        all_written &= if secret.retires_at_ms <= now {
            cache.revoke(&hash).await
        } else if rolled.key.disabled_at_ms.is_some() {
            // A disabled key's old secret stays refused through the overlap.
            cache.disable(&hash).await
        } else {
            let record = rolled
                .key
                .retired_record(&secret.identifier, secret.retires_at_ms);
            cache.replace(&hash, record).await
        };
    }
    if !all_written {
        // A server rewrites them when Redis answers (and answers from memory meanwhile).
        tracing::warn!(
            name,
            "Redis unreachable: the old secrets' cache entries are not updated yet"
        );
    }
    tracing::info!(name, identifier = %rolled.key.identifier, overlap_seconds = overlap.as_secs(), "key rolled");
    Ok(RolledKey::new(key, rolled, promise))
}

/// Ends every console session opened with the key `name` (any of its secrets): "sign
/// out everywhere", for a key whose session cookie may have leaked. How many ended.
pub async fn end_sessions(store: &Store, name: &str, actor: &Actor) -> Result<u64, Error> {
    let name = &normalize_name(name);
    let audit = actor.entry("key.sessions_end", name, json!({}));
    let ended = store
        .end_sessions_of_key(name, &audit)
        .await?
        .ok_or(Error::NotFound("no API key with this name"))?;
    tracing::info!(name, ended, "console sessions of the key ended");
    Ok(ended)
}

/// Deletes a key and every secret of it still in a roll's overlap, and revokes them in
/// the verification cache.
/// `keep_last_admin`: refuse to delete the last key that can administer (the API
/// does; the CLI on the database may). Returns by when every edge location refuses it.
pub async fn delete_key(
    store: &Store,
    cache: &VerifyCache,
    name: &str,
    keep_last_admin: bool,
    actor: &Actor,
) -> Result<String, Error> {
    let name = &normalize_name(name);
    let promise = Promise::before_commit(None);
    let audit = actor.entry(
        "key.delete",
        name,
        json!({"refusedEverywhereBy": promise.in_audit()}),
    );
    delete_key_audited(store, cache, name, None, keep_last_admin, &audit)
        .await?
        .ok_or(Error::NotFound("no API key with this name"))?;
    Ok(promise.answered())
}

/// Deletes a key with `audit` as its audit entry (a leak report's, say) — with
/// `secret_hash`, only while that is its current secret; `None`: no such key (or not
/// with that secret). Its cache entries become tombstones.
pub(crate) async fn delete_key_audited(
    store: &Store,
    cache: &VerifyCache,
    name: &str,
    secret_hash: Option<&str>,
    keep_last_admin: bool,
    audit: &AuditEntry,
) -> Result<Option<()>, Error> {
    let Some((deleted, retired)) = store
        .delete_key_with(name, secret_hash, keep_last_admin, audit)
        .await?
    else {
        return Ok(None);
    };
    let mut all_revoked = true;
    for hex in std::iter::once(&deleted.key_hash).chain(&retired) {
        if let Ok(hash) = KeyHash::from_hex(hex) {
            all_revoked &= cache.revoke(&hash).await;
        }
    }
    if !all_revoked {
        // A server rewrites them when Redis answers (and refuses the key meanwhile); the
        // CLI can only warn.
        tracing::warn!(
            name,
            "Redis unreachable: the deleted key's cache entries are not overwritten yet"
        );
    }
    tracing::info!(name, identifier = %deleted.identifier, "key deleted");
    Ok(Some(()))
}

/// Gives a legacy key (made before roles) its one role; its cache entries are replaced
/// so this process (and, with Redis, every replica) applies it at once.
pub async fn set_role(
    store: &Store,
    cache: &VerifyCache,
    name: &str,
    role: Role,
    actor: &Actor,
) -> Result<KeyInfo, Error> {
    if role == Role::Legacy {
        return Err(Error::invalid(metlo_shared::RoleError.to_string()));
    }
    let name = &normalize_name(name);
    let audit = actor.entry("key.set_role", name, json!({"role": role.as_str()}));
    let (key, retired) = store
        .set_role(name, role, &audit)
        .await?
        .ok_or(Error::NotFound("no API key with this name"))?;
    // Rolled-away secrets still in overlap are dropped from the cache (they are looked up
    // again, with the new role); the current one gets its new record.
    let mut all_written = true;
    if let Ok(hash) = KeyHash::from_hex(&key.key_hash) {
        all_written &= cache.replace(&hash, key.record()).await;
    }
    for hex in &retired {
        if let Ok(hash) = KeyHash::from_hex(hex) {
            let record = store.find_by_hash(&hash).await?.map(|k| k.record());
            all_written &= match record {
                Some(r) => cache.replace(&hash, r).await,
                None => cache.revoke(&hash).await,
            };
        }
    }
    if !all_written {
        tracing::warn!(
            name,
            "Redis unreachable: the key's cache entries are not updated yet"
        );
    }
    tracing::info!(name, role = %role, "legacy key given a role");
    Ok(key.into())
}
