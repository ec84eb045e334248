//! The route policy (issue 30): read, and replaced as a whole by an administrator —
//! checked (`shared::policy`), versioned, audited, and carried to the edge by the
//! revocation feed (within its bound) and by KV (for a Worker that cannot read the feed).

use metlo_shared::policy::{Fallback, PolicyDocument, RoutePolicy, RuleDocument};
use serde::Serialize;
use serde_json::json;
use utoipa::ToSchema;

use super::audit::Actor;
use super::feed::Promise;
use super::Error;
use crate::clock::iso8601;
use crate::db::rows::PolicyRow;
use crate::db::Store;

/// A version of the policy, as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyAnswer {
    /// 0: no policy was ever set (any valid key reaches every route).
    pub version: i64,
    pub default: Fallback,
    pub rules: Vec<RuleDocument>,
    /// ISO 8601; null for version 0.
    pub updated_at: Option<String>,
    /// The key that set it; null for version 0 or the local CLI.
    pub updated_by: Option<String>,
    /// After a change: by when every edge location applies it (ISO 8601).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub applied_everywhere_by: Option<String>,
}

impl PolicyAnswer {
    fn none() -> Self {
        PolicyAnswer {
            version: 0,
            default: Fallback::Allow,
            rules: Vec::new(),
            updated_at: None,
            updated_by: None,
            applied_everywhere_by: None,
        }
    }

    fn from_row(row: PolicyRow) -> Result<Self, Error> {
        let doc: PolicyDocument = serde_json::from_str(&row.document)
            .map_err(|e| Error::Internal(anyhow::anyhow!("stored policy unreadable: {e}")))?;
        Ok(PolicyAnswer {
            version: row.version,
            default: doc.default,
            rules: doc.rules,
            updated_at: Some(iso8601(row.created_at_ms)),
            updated_by: row.actor,
            applied_everywhere_by: None,
        })
    }
}

/// The current policy (version 0 when none was ever set).
pub async fn current(store: &Store) -> Result<PolicyAnswer, Error> {
    match store.current_policy().await? {
        Some(row) => PolicyAnswer::from_row(row),
        None => Ok(PolicyAnswer::none()),
    }
}

/// One version of the policy.
pub async fn version(store: &Store, version: i64) -> Result<PolicyAnswer, Error> {
    if version == 0 {
        return Ok(PolicyAnswer::none());
    }
    let row = store
        .policy_version(version)
        .await?
        .ok_or(Error::NotFound("no such version of the route policy"))?;
    PolicyAnswer::from_row(row)
}

/// Why a replacement was not made.
#[derive(Debug, thiserror::Error)]
pub enum ReplaceError {
    /// `If-Match` named another version than the current one.
    #[error(
        "the route policy is at version {0}, not the one this change was made from: read it again"
    )]
    Conflict(i64),
    #[error(transparent)]
    Service(#[from] Error),
}

/// Replaces the policy with `doc` (checked first); `if_version`: only if the current
/// version is this one.
pub async fn replace(
    store: &Store,
    doc: &PolicyDocument,
    if_version: Option<i64>,
    actor: &Actor,
) -> Result<PolicyAnswer, ReplaceError> {
    // Checked with any version: only the text's validity matters here.
    RoutePolicy::from_document(1, doc).map_err(|e| Error::invalid(e.to_string()))?;
    // Without If-Match a concurrent change is no conflict: the last writer wins (retried).
    for _ in 0..5 {
        let before = store.current_policy().await.map_err(Error::from)?;
        let expected = before.as_ref().map_or(0, |r| r.version);
        if if_version.is_some_and(|v| v != expected) {
            return Err(ReplaceError::Conflict(expected));
        }
        let policy = RoutePolicy::from_document((expected + 1) as u64, doc)
            .map_err(|e| Error::invalid(e.to_string()))?;
        let canonical = policy.to_document();
        let document = serde_json::to_string(&canonical).expect("a policy serializes");
        let promise = Promise::before_commit(None);
        let audit = actor.entry(
            "policy.update",
            "route-policy",
            json!({
                "version": expected + 1,
                "before": before.as_ref().and_then(|r| serde_json::from_str::<serde_json::Value>(&r.document).ok()),
                "after": canonical,
                "appliedEverywhereBy": promise.in_audit(),
            }),
        );
        match store
            .replace_policy(expected, &document, &policy.to_lines(), &audit)
            .await
            .map_err(Error::from)?
        {
            Ok(row) => {
                tracing::info!(
                    version = row.version,
                    rules = policy.rules.len(),
                    "route policy replaced"
                );
                let mut answer = PolicyAnswer::from_row(row)?;
                answer.applied_everywhere_by = Some(promise.answered());
                return Ok(answer);
            }
            Err(current) if if_version.is_some() => return Err(ReplaceError::Conflict(current)),
            Err(_) => continue,
        }
    }
    Err(Error::Busy.into())
}
