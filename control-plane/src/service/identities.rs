//! Identities (issue 31): a customer, named by an `externalId` the user chooses, that owns
//! keys and may carry meta, credits and named rate limits shared by all its keys. Made,
//! read, listed, changed, topped up and deleted by administrators; every change audited
//! and carried to the edge in its keys' records.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use metlo_shared::identity::{validate_external_id, NamedLimit, NamedLimits};
use metlo_shared::KeyHash;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;

use super::audit::Actor;
use super::credits::{Credits, CreditsInfo, TopUp};
use super::key_lists::{DEFAULT_LIST_PAGE, MAX_LIST_PAGE};
use super::key_updates::present;
use super::meta::{meta_value, validate_meta};
use super::Error;
use crate::cache::VerifyCache;
use crate::clock::{iso8601, now_ms};
use crate::db::identities::IdentityChanges;
use crate::db::rows::{CreditColumns, CreditsChange, RetiredSecret, StoredIdentity, StoredKey};
use crate::db::{Store, StoreError};

/// `POST /api/v1/identities`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreateIdentityRequest {
    /// Your name for the customer: 1–255 visible ASCII characters (inner spaces allowed),
    /// unique. (Deserialized as optional so a missing one gets our own 400.)
    #[schema(value_type = String, required = true, min_length = 1, max_length = 255,
        pattern = "^[!-~]([ -~]{0,253}[!-~])?$", example = "acme-corp")]
    pub external_id: Option<String>,
    /// A JSON object (at most 1 KB compact), for you.
    #[schema(value_type = Option<Object>)]
    pub meta: Option<Value>,
    /// Credits all the identity's keys spend from (besides any of their own).
    pub credits: Option<Credits>,
    /// Rate limits all its keys count against, each named (at most 5).
    #[schema(value_type = Option<Vec<shared_schema::NamedLimit>>)]
    pub rate_limits: Option<Vec<NamedLimit>>,
}

/// `PATCH /api/v1/identities/{externalId}`: only the fields given change.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UpdateIdentityRequest {
    /// null: none.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<Object>)]
    pub meta: Option<Option<Value>>,
    /// Sets the credits anew (the balance at the edge becomes `remaining`); null: none.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<Credits>)]
    pub credits: Option<Option<Credits>>,
    /// Replaces every named limit; null or `[]`: none.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<Vec<shared_schema::NamedLimit>>)]
    pub rate_limits: Option<Option<Vec<NamedLimit>>>,
}

/// The schema of a named limit, for the API document.
mod shared_schema {
    use utoipa::ToSchema;

    /// A rate limit every key of the identity counts against.
    #[derive(ToSchema)]
    #[allow(dead_code)]
    #[schema(rename_all = "camelCase")]
    pub struct NamedLimit {
        /// 1–32 of `a-z 0-9 _ -`, starting with a letter or digit; unique in the identity.
        #[schema(example = "requests")]
        name: String,
        /// 1 to 1,000,000,000.
        #[schema(minimum = 1, maximum = 1_000_000_000)]
        requests: u32,
        /// 1 to 86,400.
        #[schema(minimum = 1, maximum = 86_400)]
        period_seconds: u32,
    }
}

/// An identity as the API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct IdentityInfo {
    pub external_id: String,
    #[schema(value_type = Option<Object>)]
    pub meta: Option<Value>,
    /// ISO 8601.
    pub created: String,
    pub credits: Option<CreditsInfo>,
    #[schema(value_type = Vec<shared_schema::NamedLimit>)]
    pub rate_limits: Vec<NamedLimit>,
}

impl From<&StoredIdentity> for IdentityInfo {
    fn from(i: &StoredIdentity) -> Self {
        IdentityInfo {
            external_id: i.external_id.clone(),
            meta: meta_value(i.meta.as_deref()),
            created: iso8601(i.created_at_ms),
            credits: i.credits.grant().map(CreditsInfo::from),
            rate_limits: i.limits().0,
        }
    }
}

/// A page of identities, oldest first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct IdentityPage {
    pub identities: Vec<IdentityInfo>,
    /// Pass it as `cursor` for the next page; null: this page is the last.
    pub next_cursor: Option<String>,
}

fn limits_of(limits: Option<Vec<NamedLimit>>) -> Result<NamedLimits, Error> {
    NamedLimits::new(limits.unwrap_or_default()).map_err(|e| Error::invalid(e.to_string()))
}

fn meta_of(meta: Option<Value>) -> Result<Option<String>, Error> {
    validate_meta(meta.unwrap_or_default())
}

fn conflict_if_taken(e: StoreError) -> Error {
    match e {
        StoreError::DuplicateName => {
            Error::Conflict("an identity with this externalId already exists".into())
        }
        e => e.into(),
    }
}

pub async fn create(
    store: &Store,
    body: CreateIdentityRequest,
    actor: &Actor,
) -> Result<IdentityInfo, Error> {
    let external_id = body
        .external_id
        .ok_or_else(|| Error::invalid("externalId is required"))?;
    validate_external_id(&external_id).map_err(|e| Error::invalid(e.to_string()))?;
    let mut credits = CreditColumns::default();
    if let Some(c) = body.credits {
        credits.set(Some(c.validate()?));
    }
    let row = StoredIdentity {
        id: 0,
        external_id: external_id.clone(),
        meta: meta_of(body.meta)?,
        created_at_ms: now_ms(),
        rate_limits: limits_of(body.rate_limits)?.encode(),
        credits,
    };
    let info = IdentityInfo::from(&row);
    let audit = actor.entry("identity.create", &external_id, json!(info));
    let stored = store
        .insert_identity(&row, &audit)
        .await
        .map_err(conflict_if_taken)?;
    Ok(IdentityInfo::from(&stored))
}

pub async fn get(store: &Store, external_id: &str) -> Result<StoredIdentity, Error> {
    store
        .identity(external_id)
        .await?
        .ok_or(Error::NotFound("no identity with this externalId"))
}

pub async fn list(
    store: &Store,
    limit: Option<i64>,
    cursor: Option<&str>,
) -> Result<IdentityPage, Error> {
    let limit = limit.unwrap_or(DEFAULT_LIST_PAGE);
    if !(1..=MAX_LIST_PAGE).contains(&limit) {
        return Err(Error::invalid(format!(
            "limit must be a whole number from 1 to {MAX_LIST_PAGE}"
        )));
    }
    let after = cursor.map(decode_cursor).transpose()?;
    let mut rows = store.identities_page(after, limit + 1).await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    Ok(IdentityPage {
        next_cursor: rows
            .last()
            .filter(|_| more)
            .map(|i| URL_SAFE_NO_PAD.encode(format!("i1:{}:{}", i.created_at_ms, i.id))),
        identities: rows.iter().map(IdentityInfo::from).collect(),
    })
}

fn decode_cursor(cursor: &str) -> Result<(i64, i64), Error> {
    let invalid = || Error::invalid("invalid cursor: pass a page's nextCursor as it is");
    let raw = URL_SAFE_NO_PAD
        .decode(cursor.trim())
        .map_err(|_| invalid())?;
    let raw = String::from_utf8(raw).map_err(|_| invalid())?;
    let (at, id) = raw
        .strip_prefix("i1:")
        .and_then(|r| r.split_once(':'))
        .ok_or_else(invalid)?;
    Ok((
        at.parse().map_err(|_| invalid())?,
        id.parse().map_err(|_| invalid())?,
    ))
}

impl UpdateIdentityRequest {
    pub fn validate(self) -> Result<IdentityChanges, Error> {
        let changes = IdentityChanges {
            meta: self.meta.map(meta_of).transpose()?,
            limits: self.rate_limits.map(limits_of).transpose()?,
            credits: self
                .credits
                .map(|c| c.map(Credits::validate).transpose())
                .transpose()?
                .map(CreditsChange::Set),
        };
        if changes.is_empty() {
            return Err(Error::invalid(
                "nothing to change: give at least one of meta, credits, rateLimits",
            ));
        }
        Ok(changes)
    }
}

/// Applies `changes`; every key of the identity gets its new record at the edge (through
/// the outbox) and in this process's cache.
pub async fn update(
    store: &Store,
    cache: &VerifyCache,
    external_id: &str,
    changes: &IdentityChanges,
    actor: &Actor,
) -> Result<IdentityInfo, Error> {
    let (identity, keys) = store
        .update_identity(external_id, changes, |before, after| {
            actor.entry(
                "identity.update",
                external_id,
                json!({"before": IdentityInfo::from(before), "after": IdentityInfo::from(after)}),
            )
        })
        .await?
        .ok_or(Error::NotFound("no identity with this externalId"))?;
    refresh_cache(cache, &keys).await;
    Ok(IdentityInfo::from(&identity))
}

/// The keys' records in the verify cache, as they are now: each secret's, those still in
/// a roll's overlap included.
async fn refresh_cache(cache: &VerifyCache, keys: &[(StoredKey, Vec<RetiredSecret>)]) {
    for (key, retired) in keys.iter().filter(|(k, _)| k.serves_traffic()) {
        if let Ok(hash) = KeyHash::from_hex(&key.key_hash) {
            cache.replace(&hash, key.record()).await;
        }
        for secret in retired {
            if let Ok(hash) = KeyHash::from_hex(&secret.key_hash) {
                let record = key.retired_record(&secret.identifier, secret.retires_at_ms);
                cache.replace(&hash, record).await;
            }
        }
    }
}

/// A top-up of the identity's credits (409 without credits).
pub async fn add_credits(
    store: &Store,
    cache: &VerifyCache,
    external_id: &str,
    top_up: TopUp,
    actor: &Actor,
) -> Result<IdentityInfo, Error> {
    let changes = IdentityChanges {
        credits: Some(CreditsChange::Add(top_up.validate()?)),
        ..IdentityChanges::default()
    };
    update(store, cache, external_id, &changes, actor).await
}

/// Deletes the identity; with `cascade`, its keys first (each as `DELETE` of the key
/// would), else 409 while any key belongs to it.
pub async fn delete(
    store: &Store,
    cache: &VerifyCache,
    external_id: &str,
    cascade: bool,
    actor: &Actor,
) -> Result<(), Error> {
    let identity = get(store, external_id).await?;
    if cascade {
        for key in store.keys_of_identity(identity.id).await? {
            super::keys::delete_key(store, cache, &key.name, true, actor).await?;
        }
    }
    let audit = actor.entry("identity.delete", external_id, json!({"cascade": cascade}));
    store
        .delete_identity(external_id, &audit)
        .await?
        .ok_or(Error::NotFound("no identity with this externalId"))?;
    Ok(())
}
