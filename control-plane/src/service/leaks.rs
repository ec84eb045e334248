//! Leaked keys: GitHub's secret-scanning reports (the route checks the signature first,
//! `github_keys`) and the CLI's `keys leaked-check`. A reported token that is one of our
//! secrets is revoked — its key deleted (the delete path: outbox → KV → edge, cache
//! tombstones), or, for a secret a roll replaced, that secret ended — and audited as
//! `key.leaked`; with `LEAK_REVOCATION=notify` it is only audited.
//!
//! Why delete rather than disable: disabling can be undone, and enabling a key whose
//! secret is public would quietly bring that secret back. The audit entry keeps the key's
//! name and identifier so its owner can make a new one.

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use metlo_shared::{ApiKey, KeyHash};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use super::feed::Promise;
use super::keys::delete_key_audited;
use super::Error;
use crate::cache::VerifyCache;
use crate::db::rows::{AuditEntry, SecretOwner};
use crate::db::Store;

/// What a leak report does (`LEAK_REVOCATION`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LeakMode {
    /// No route: reports get 404.
    Off,
    /// Audit a reported key of ours, change nothing.
    Notify,
    /// Revoke a reported key of ours, and audit it.
    Revoke,
}

/// The scanner pattern published for the key format (README, *The key format*).
pub const KEY_PATTERN: &str = r"\bmetlo\.[0-9A-Za-z]{42}\b";

static KEY_REGEX: LazyLock<regex::Regex> =
    LazyLock::new(|| regex::Regex::new(KEY_PATTERN).expect("a valid pattern"));

/// One token GitHub found.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct LeakAlert {
    pub token: String,
    #[serde(rename = "type")]
    pub token_type: String,
    /// Where it was found.
    #[serde(default)]
    pub url: String,
    /// e.g. `content`, `commit`, `pull_request_description` (GitHub's docs write them in
    /// either case).
    #[serde(default)]
    pub source: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LeakLabel {
    TruePositive,
    FalsePositive,
}

/// GitHub's feedback for one token: `token_hash` is the SHA-256 (hex) of the token.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LeakFeedback {
    pub token_hash: String,
    pub token_type: String,
    pub label: LeakLabel,
}

/// A report's body: a JSON array of alerts (fields past these are ignored).
pub fn parse_report(body: &[u8]) -> Result<Vec<LeakAlert>, Error> {
    serde_json::from_slice(body).map_err(|e| {
        Error::invalid(format!(
            "a report is a JSON array of {{token, type, url, source}}: {e}"
        ))
    })
}

/// Handles a verified report in one pass: every token hashed, the well-formed ones looked
/// up together, each secret of ours revoked once. Feedback in the report's order.
pub async fn handle_report(
    store: &Store,
    cache: &VerifyCache,
    alerts: &[LeakAlert],
    mode: LeakMode,
    ip: Option<String>,
) -> Result<Vec<LeakFeedback>, Error> {
    let mut feedback = Vec::with_capacity(alerts.len());
    // (index, hash) of tokens that are well-formed keys (the checksum first: garbage
    // costs no lookup).
    let mut candidates = vec![];
    for (i, alert) in alerts.iter().enumerate() {
        let hash = KeyHash::of_text(&alert.token).to_hex();
        if ApiKey::parse(&alert.token).is_ok() {
            candidates.push((i, hash.clone()));
        }
        feedback.push(LeakFeedback {
            token_hash: hash,
            token_type: alert.token_type.clone(),
            label: LeakLabel::FalsePositive,
        });
    }
    let hashes: Vec<String> = candidates
        .iter()
        .map(|(_, h)| h.clone())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let owners = store.secret_owners(&hashes).await?;
    let mut acted: HashSet<&str> = HashSet::new();
    let mut revoked = 0u64;
    for (i, hash) in &candidates {
        let Some(owner) = owners.get(hash) else {
            continue;
        };
        feedback[*i].label = LeakLabel::TruePositive;
        if acted.insert(hash) {
            revoked += act(store, cache, owner, hash, &alerts[*i], mode, &ip).await? as u64;
        }
    }
    let true_positives = feedback
        .iter()
        .filter(|f| f.label == LeakLabel::TruePositive)
        .count();
    metrics::counter!("metlo_leak_tokens_total", "label" => "true_positive")
        .increment(true_positives as u64);
    metrics::counter!("metlo_leak_tokens_total", "label" => "false_positive")
        .increment((feedback.len() - true_positives) as u64);
    metrics::counter!("metlo_leak_revoked_total").increment(revoked);
    Ok(feedback)
}

/// Revokes (or, in notify mode, only audits) one reported secret of ours. True if it
/// revoked something.
async fn act(
    store: &Store,
    cache: &VerifyCache,
    owner: &SecretOwner,
    hash: &str,
    alert: &LeakAlert,
    mode: LeakMode,
    ip: &Option<String>,
) -> Result<bool, Error> {
    let (key, secret) = match owner {
        // Revoked before: nothing left to do (a replayed report changes nothing).
        SecretOwner::Revoked => return Ok(false),
        SecretOwner::Current(key) => (key, "current"),
        SecretOwner::RolledAway(key) => (key, "rolled-away"),
    };
    let revoke = mode == LeakMode::Revoke;
    let action = match (revoke, secret) {
        (false, _) => "notified",
        (true, "current") => "key deleted",
        (true, _) => "rolled-away secret ended",
    };
    // The token's own public identifier: which secret of the key it was.
    let identifier = ApiKey::parse(&alert.token).map(|k| k.identifier()).ok();
    let audit = AuditEntry {
        actor: Some("github-secret-scanning".into()),
        action: "key.leaked",
        target: Some(key.name.clone()),
        ip: ip.clone(),
        detail: json!({
            "identifier": identifier, "secret": secret, "action": action,
            "url": alert.url, "source": alert.source, "type": alert.token_type,
            // GitHub's answer has a fixed shape: the promise is kept here.
            "refusedEverywhereBy": revoke.then(|| Promise::before_commit(None).in_audit()),
        }),
    };
    tracing::warn!(name = %key.name, identifier = ?identifier, url = %alert.url, action, "leaked key reported by GitHub");
    if !revoke {
        // Audited once per secret: retries and replays of a report are only counted.
        store.note_leak(hash, &audit).await?;
        return Ok(false);
    }
    let done = match owner {
        SecretOwner::Current(key) => {
            let deleted = delete_key_audited(store, cache, &key.name, Some(hash), false, &audit)
                .await?
                .is_some();
            if !deleted {
                // Rolled, or deleted (and a key made again under its name) since it was
                // looked up: whatever the secret is now, it is handled as that.
                return Box::pin(again(store, cache, hash, alert, mode, ip)).await;
            }
            true
        }
        _ => {
            let ended = store.end_rolled_away_secret(hash, &audit).await?;
            if let Ok(h) = KeyHash::from_hex(hash) {
                cache.revoke(&h).await;
            }
            ended
        }
    };
    Ok(done)
}

/// [`act`] on what the secret `hash` is now (it changed after the report's lookup): a
/// rolled-away secret is ended, a revoked or unknown one left alone. A secret is a key's
/// current one at most once, so this does not come back here more than once.
async fn again(
    store: &Store,
    cache: &VerifyCache,
    hash: &str,
    alert: &LeakAlert,
    mode: LeakMode,
    ip: &Option<String>,
) -> Result<bool, Error> {
    let owners = store.secret_owners(&[hash.to_owned()]).await?;
    match owners.get(hash) {
        Some(owner) => act(store, cache, owner, hash, alert, mode, ip).await,
        None => Ok(false),
    }
}

/// What a key-shaped string found in some text is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FoundKey {
    /// Its public identifier (never the key).
    pub identifier: String,
    /// `live` (a key's current secret), `rolled-away` (a secret a roll replaced, still
    /// on record), `revoked` (a key since deleted), or `not-ours`.
    pub status: &'static str,
    /// The key it belongs to, when live or rolled away.
    pub name: Option<String>,
}

/// Every key in `text` (the scanner pattern, then the checksum), once each, with what it
/// is here.
pub async fn check_text(store: &Store, text: &str) -> Result<Vec<FoundKey>, Error> {
    let mut seen = HashSet::new();
    let keys: Vec<ApiKey> = KEY_REGEX
        .find_iter(text)
        .filter_map(|m| ApiKey::parse(m.as_str()).ok())
        .filter(|k| seen.insert(k.hash()))
        .collect();
    let hashes: Vec<String> = keys.iter().map(|k| k.hash().to_hex()).collect();
    let owners: HashMap<String, SecretOwner> = store.secret_owners(&hashes).await?;
    Ok(keys
        .iter()
        .zip(&hashes)
        .map(|(key, hash)| {
            let (status, name) = match owners.get(hash) {
                Some(SecretOwner::Current(k)) => ("live", Some(k.name.clone())),
                Some(SecretOwner::RolledAway(k)) => ("rolled-away", Some(k.name.clone())),
                Some(SecretOwner::Revoked) => ("revoked", None),
                None => ("not-ours", None),
            };
            FoundKey {
                identifier: key.identifier(),
                status,
                name,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::Backend;
    use crate::test_util::{on_both_backends, TestApp};

    on_both_backends!(a_secret_reported_again_in_notify_mode_is_audited_once);

    /// Notify mode revokes nothing, so the same report can come again (GitHub's
    /// retries, a replay): the secret is audited once, the rest only counted, and
    /// promises nothing; revoked, its entry says by when the edge refuses it.
    async fn a_secret_reported_again_in_notify_mode_is_audited_once(backend: Backend) {
        let app = TestApp::on(backend).build().await;
        let key = app.create_key("k", "GENERIC").await;
        let state = &app.app().state;
        let alerts = [LeakAlert {
            token: key.clone(),
            token_type: "metlo_api_key".into(),
            url: "https://github.com/o/r/blob/main/.env".into(),
            source: "content".into(),
        }];
        for _ in 0..3 {
            let feedback =
                handle_report(&state.store, &state.cache, &alerts, LeakMode::Notify, None)
                    .await
                    .unwrap();
            assert_eq!(feedback[0].label, LeakLabel::TruePositive);
        }
        let page = app
            .as_admin()
            .get("/api/v1/audit?action=key.leaked")
            .await
            .json();
        let entries = page["entries"].as_array().unwrap();
        assert_eq!(entries.len(), 1, "{page}");
        assert_eq!(entries[0]["detail"]["action"], "notified");
        assert_eq!(
            entries[0]["detail"]["refusedEverywhereBy"],
            serde_json::Value::Null,
            "nothing revoked, nothing promised"
        );
        assert_eq!(
            app.verify(&key).await,
            axum::http::StatusCode::OK,
            "notify revokes nothing"
        );
        // The same report with revocation on: the entry carries the edge's promise.
        handle_report(&state.store, &state.cache, &alerts, LeakMode::Revoke, None)
            .await
            .unwrap();
        let page = app
            .as_admin()
            .get("/api/v1/audit?action=key.leaked")
            .await
            .json();
        let revoked = &page["entries"][0]["detail"];
        assert_eq!(revoked["action"], "key deleted", "{page}");
        assert!(revoked["refusedEverywhereBy"].is_string(), "{page}");
    }

    #[test]
    fn reports_parse_with_missing_optional_fields_and_refuse_other_shapes() {
        let alerts = parse_report(br#"[{"token":"t","type":"metlo_api_key","url":"u","source":"CONTENT","extra":1},{"token":"x","type":"y"}]"#).unwrap();
        assert_eq!(alerts.len(), 2);
        assert_eq!(alerts[0].source, "CONTENT");
        assert_eq!(alerts[1].url, "");
        for bad in [
            &b"{}"[..],
            b"[{\"type\":\"y\"}]",
            b"[1]",
            b"",
            b"[{\"token\":1,\"type\":\"y\"}]",
        ] {
            assert!(
                parse_report(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn the_pattern_finds_keys_in_text() {
        let key = ApiKey::generate().unwrap();
        let text = format!("export X={}\n", key.expose_secret());
        let found: Vec<&str> = KEY_REGEX.find_iter(&text).map(|m| m.as_str()).collect();
        assert_eq!(found, [key.expose_secret()]);
    }

    /// A report acts on the secret as it is when it acts, not when it was looked up: a
    /// key rolled in between keeps its new secret (the reported one, rolled away, is
    /// ended); a key deleted and made again under the same name is left alone.
    #[tokio::test]
    async fn a_key_changed_after_the_lookup_is_not_deleted_by_name() {
        use crate::db::keys::fixtures::{audit, roll};
        use metlo_shared::{KeyType, Role};
        let store = Store::memory().await;
        let cache = VerifyCache::memory(std::time::Duration::from_secs(5));
        let alert = |token: &str| LeakAlert {
            token: token.to_owned(),
            token_type: "metlo_api_key".into(),
            url: String::new(),
            source: String::new(),
        };
        // Revokes as a report would, with what the lookup found back then.
        let revoke = |owner: &SecretOwner, hash: &str, leaked: &ApiKey| {
            let (store, cache) = (&store, &cache);
            let (owner, hash, alert) = (
                owner.clone(),
                hash.to_owned(),
                alert(leaked.expose_secret()),
            );
            async move {
                act(store, cache, &owner, &hash, &alert, LeakMode::Revoke, &None)
                    .await
                    .unwrap()
            }
        };
        let make = |name: &str| {
            let secret = ApiKey::generate().unwrap();
            let row = crate::db::rows::StoredKey::new(
                &secret,
                name.to_owned(),
                KeyType::Generic,
                Role::Client,
                crate::clock::now_ms(),
            );
            (secret, row)
        };

        // Rolled between the lookup and the revocation.
        let (leaked, row) = make("rolled");
        store
            .insert_key(&row, 10, &audit("key.create", "rolled"))
            .await
            .unwrap();
        let hash = leaked.hash().to_hex();
        let owners = store
            .secret_owners(std::slice::from_ref(&hash))
            .await
            .unwrap();
        let (new, _) = roll(&store, "rolled", std::time::Duration::from_secs(3600)).await;
        let revoked = revoke(&owners[&hash], &hash, &leaked).await;
        assert!(
            revoked,
            "the reported secret, rolled away meanwhile, is ended"
        );
        let now = store
            .secret_owners(&[hash.clone(), new.hash().to_hex()])
            .await
            .unwrap();
        assert!(
            matches!(now.get(&hash), Some(SecretOwner::Revoked)),
            "the reported secret is revoked"
        );
        assert!(
            matches!(now.get(&new.hash().to_hex()), Some(SecretOwner::Current(_))),
            "the key and its new secret stay"
        );

        // Deleted and made again under the same name.
        let (leaked, row) = make("again");
        store
            .insert_key(&row, 10, &audit("key.create", "again"))
            .await
            .unwrap();
        let hash = leaked.hash().to_hex();
        let owners = store
            .secret_owners(std::slice::from_ref(&hash))
            .await
            .unwrap();
        store
            .delete_key("again", false, &audit("key.delete", "again"))
            .await
            .unwrap()
            .unwrap();
        let (other, row) = make("again");
        store
            .insert_key(&row, 10, &audit("key.create", "again"))
            .await
            .unwrap();
        let revoked = revoke(&owners[&hash], &hash, &leaked).await;
        assert!(!revoked);
        let now = store.secret_owners(&[other.hash().to_hex()]).await.unwrap();
        assert!(
            matches!(
                now.get(&other.hash().to_hex()),
                Some(SecretOwner::Current(_))
            ),
            "the new key is untouched"
        );
    }
}
