//! Changing a key without re-issuing it: enable / disable, expiry, metadata, rate limit. The change
//! reaches the edge through the KV outbox and this process's (and Redis's) cache at once.

use metlo_shared::permissions::normalize_permissions;
use metlo_shared::{KeyHash, RateLimit};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{json, Map, Value};
use utoipa::ToSchema;

use super::audit::Actor;
use super::credits::{Credits, TopUp};
use super::feed::Promise;
use super::keys::{normalize_name, parse_expires_at, KeyInfo};
use super::meta::{meta_value, validate_meta};
use super::Error;
use crate::cache::VerifyCache;
use crate::clock::{iso8601, now_ms};
use crate::db::rows::{CreditsChange, KeyChanges, StoredKey};
use crate::db::Store;

/// The body of an update: only the fields given change; `null` clears `expiresAt`,
/// `meta` and `rateLimit`. Unknown fields are refused (a misspelt field must not look applied).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateKeyRequest {
    /// False: the key is refused everywhere (401, as an unknown key) until set true again.
    #[serde(default, deserialize_with = "not_null")]
    #[schema(nullable = false)]
    pub enabled: Option<bool>,
    /// RFC 3339, in the future; null: never expires.
    #[serde(rename = "expiresAt", default, deserialize_with = "present")]
    #[schema(value_type = Option<String>, format = DateTime, example = "2030-01-01T00:00:00Z")]
    pub expires_at: Option<Option<String>>,
    /// A JSON object (at most 1 KB compact) forwarded to the origin; null: none.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<Object>, example = json!({"tenant": "acme"}))]
    pub meta: Option<Option<Value>>,
    /// At most `requests` per `periodSeconds`, at the edge and on `/api/v1/verify`;
    /// null: no limit. A new limit starts a new window.
    #[serde(rename = "rateLimit", default, deserialize_with = "present")]
    #[schema(value_type = Option<RateLimit>)]
    pub rate_limit: Option<Option<RateLimit>>,
    /// The key's permissions, replacing all it had (client keys only); null or `[]`: none.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<Vec<String>>, example = json!(["orders:read"]))]
    pub permissions: Option<Option<Vec<String>>>,
    /// Sets the key's credits anew (the balance at the edge becomes `remaining`; top-ups
    /// since the last set are forgotten); null: unmetered. Client keys only.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<Credits>)]
    pub credits: Option<Option<Credits>>,
    /// The `externalId` of the identity the key belongs to from now on; null: none.
    /// Client keys only.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>, example = "acme-corp")]
    pub identity: Option<Option<String>>,
}

/// A field that may be absent but, when present, not `null` (nothing to clear).
fn not_null<'de, T: Deserialize<'de>, D: Deserializer<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// A field that is present (`Some`, holding `None` for `null`), as opposed to absent.
pub(crate) fn present<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

impl UpdateKeyRequest {
    /// The changes asked for, with the identity named looked up, or what is wrong.
    pub async fn resolve(mut self, store: &Store, now_ms: i64) -> Result<KeyChanges, Error> {
        let identity = match self.identity.take() {
            None => None,
            Some(None) => Some(None),
            Some(Some(external_id)) => {
                Some(Some(store.identity(&external_id).await?.ok_or_else(
                    || Error::invalid("no identity with this externalId"),
                )?))
            }
        };
        let mut changes = self.validate_with(now_ms, identity.is_some())?;
        changes.identity = identity;
        Ok(changes)
    }

    /// The changes asked for, or what is wrong with them (an identity is not looked up:
    /// [`UpdateKeyRequest::resolve`]).
    pub fn validate(self, now_ms: i64) -> Result<KeyChanges, Error> {
        let identity = self.identity.is_some();
        self.validate_with(now_ms, identity)
    }

    fn validate_with(self, now_ms: i64, identity: bool) -> Result<KeyChanges, Error> {
        let changes = KeyChanges {
            enabled: self.enabled,
            expires_at_ms: self
                .expires_at
                .map(|e| e.map(|v| parse_expires_at(&v, now_ms)).transpose())
                .transpose()?,
            meta: self
                .meta
                .map(|m| validate_meta(m.unwrap_or_default()))
                .transpose()?,
            rate_limit: self.rate_limit,
            permissions: self
                .permissions
                .map(|p| normalize_permissions(p.unwrap_or_default()))
                .transpose()
                .map_err(|e| Error::invalid(e.to_string()))?,
            credits: self
                .credits
                .map(|c| c.map(Credits::validate).transpose())
                .transpose()?
                .map(CreditsChange::Set),
            identity: None,
        };
        if changes.is_empty() && !identity {
            return Err(Error::invalid(
                "nothing to change: give at least one of enabled, expiresAt, meta, rateLimit, permissions, credits, identity",
            ));
        }
        Ok(changes)
    }
}

/// A key as a PATCH left it.
#[derive(Debug, Serialize, ToSchema)]
pub struct UpdatedKey {
    #[serde(flatten)]
    pub info: KeyInfo,
    /// ISO 8601, when the change disables the key or sets its expiry: by when every edge
    /// location refuses it (its expiry, or the edge's revocation bound when later).
    #[serde(
        rename = "refusedEverywhereBy",
        skip_serializing_if = "Option::is_none"
    )]
    pub refused_everywhere_by: Option<String>,
}

/// Applies `changes` to the key `name`; returns it as it is now.
pub async fn update_key(
    store: &Store,
    cache: &VerifyCache,
    name: &str,
    changes: &KeyChanges,
    actor: &Actor,
) -> Result<UpdatedKey, Error> {
    let name = &normalize_name(name);
    let now = now_ms();
    let promise = match (changes.enabled, changes.expires_at_ms) {
        (Some(false), _) => Some(Promise::before_commit(None)),
        (_, Some(Some(expires))) => Some(Promise::before_commit(Some(expires))),
        _ => None,
    };
    let (key, retired) = store
        .update_key(name, changes, now, |before, after| {
            let mut detail = changed_fields(before, after);
            if let (Some(promise), Some(fields)) = (&promise, detail.as_object_mut()) {
                fields.insert("refusedEverywhereBy".into(), json!(promise.in_audit()));
            }
            actor.entry("key.update", name, detail)
        })
        .await?
        .ok_or(Error::NotFound("no API key with this name"))?;
    // This process and (through Redis) every replica apply it at once: a disabled key's
    // secrets are refused for the cache TTL (then by the database), an enabled key's
    // records replace that. (A refusal the database gave meanwhile, cached like any
    // unknown key's, still runs out its TTL.)
    let mut all_written = true;
    let secrets = std::iter::once((&key.key_hash, None))
        .chain(retired.iter().map(|r| (&r.key_hash, Some(r))));
    for (hex, retired) in secrets {
        let Ok(hash) = KeyHash::from_hex(hex) else {
            continue;
        };
        all_written &= if key.disabled_at_ms.is_some() {
            cache.disable(&hash).await
        } else {
            let record = match retired {
                None => key.record(),
                Some(r) => key.retired_record(&r.identifier, r.retires_at_ms),
            };
            cache.replace(&hash, record).await
        };
    }
    if !all_written {
        tracing::warn!(
            name,
            "Redis unreachable: the key's cache entries are not updated yet"
        );
    }
    tracing::info!(name, enabled = key.disabled_at_ms.is_none(), "key updated");
    Ok(UpdatedKey {
        info: key.into(),
        refused_everywhere_by: promise.map(|p| p.answered()),
    })
}

/// The audit detail: each field that changed, before and after (never a secret).
fn changed_fields(before: &StoredKey, after: &StoredKey) -> Value {
    let (mut old, mut new) = (Map::new(), Map::new());
    let mut field = |name: &str, b: Value, a: Value| {
        if b != a {
            old.insert(name.into(), b);
            new.insert(name.into(), a);
        }
    };
    field(
        "enabled",
        json!(before.disabled_at_ms.is_none()),
        json!(after.disabled_at_ms.is_none()),
    );
    field(
        "expiresAt",
        json!(before.expires_at_ms.map(iso8601)),
        json!(after.expires_at_ms.map(iso8601)),
    );
    field(
        "meta",
        json!(meta_value(before.meta.as_deref())),
        json!(meta_value(after.meta.as_deref())),
    );
    field(
        "rateLimit",
        json!(before.rate_limit()),
        json!(after.rate_limit()),
    );
    field(
        "permissions",
        json!(before.permissions()),
        json!(after.permissions()),
    );
    // With the set's number: setting the same balance again is a change (the edge's
    // balance starts over).
    let credits = |k: &StoredKey| {
        json!(k.credits().map(|g| {
            let info = crate::service::credits::CreditsInfo::from(g);
            json!({"set": g.set, "granted": info.granted, "added": info.added, "refill": info.refill})
        }))
    };
    field("credits", credits(before), credits(after));
    field(
        "identity",
        json!(before.identity().map(|i| i.identity)),
        json!(after.identity().map(|i| i.identity)),
    );
    json!({"before": old, "after": new})
}

/// Adds `top_up.add` credits to the key `name`: one addition under the key's row lock, so
/// concurrent top-ups all count, once each; the edge adds the difference once however
/// often it reads the record. 409 for a key without credits.
pub async fn add_credits(
    store: &Store,
    cache: &VerifyCache,
    name: &str,
    top_up: TopUp,
    actor: &Actor,
) -> Result<UpdatedKey, Error> {
    let changes = KeyChanges {
        credits: Some(CreditsChange::Add(top_up.validate()?)),
        ..KeyChanges::default()
    };
    update_key(store, cache, name, &changes, actor).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<KeyChanges, Error> {
        serde_json::from_str::<UpdateKeyRequest>(body)
            .map_err(|e| Error::invalid(e.to_string()))?
            .validate(0)
    }

    #[test]
    fn absent_null_and_values_differ() {
        assert!(parse("{}").is_err(), "nothing to change");
        assert!(parse(r#"{"rateLimit":{}}"#).is_err(), "unknown field");
        assert!(parse(r#"{"enabled":"no"}"#).is_err());
        let c = parse(r#"{"enabled":false}"#).unwrap();
        assert_eq!(
            (c.enabled, &c.expires_at_ms, &c.meta),
            (Some(false), &None, &None)
        );
        let c = parse(r#"{"expiresAt":null,"meta":null}"#).unwrap();
        assert_eq!((c.expires_at_ms, c.meta), (Some(None), Some(None)));
        let c = parse(r#"{"expiresAt":"2030-01-01T00:00:00Z","meta":{"t":"a"}}"#).unwrap();
        assert_eq!(c.expires_at_ms, Some(Some(1_893_456_000_000)));
        assert_eq!(c.meta, Some(Some(r#"{"t":"a"}"#.into())));
        assert!(parse(r#"{"meta":[1]}"#).is_err());
        assert!(parse(r#"{"expiresAt":"tomorrow"}"#).is_err());
    }
}
