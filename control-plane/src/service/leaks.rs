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
        }),
    };
    tracing::warn!(name = %key.name, identifier = ?identifier, url = %alert.url, action, "leaked key reported by GitHub");
    if !revoke {
        store.append_audit(&[audit]).await?;
        return Ok(false);
    }
    let done = match owner {
        SecretOwner::Current(key) => delete_key_audited(store, cache, &key.name, false, &audit)
            .await?
            .is_some(),
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
}
