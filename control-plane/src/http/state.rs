//! What every request handler shares.

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;

use crate::cache::VerifyCache;
use crate::db::Store;
use crate::kv_sync::drainer::SyncStatus;
use crate::kv_sync::reconcile::ReconcileStatus;
use crate::service::github_keys::GitHubKeys;
use crate::service::leaks::LeakMode;
use ipnet::IpNet;

use crate::service::abuse::{FailureLimiter, RecentlyValid};
use crate::service::audit::AuthFailures;
use crate::service::console::SessionRules;
use crate::service::key_limits::KeyLimits;
use crate::service::usage::Usage;
use crate::service::verify::Lookups;

/// Cloned for every request (axum hands each extractor its own copy), so it is one
/// `Arc`: a clone is one atomic increment, not one per field.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> Self {
        AppState(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

pub struct Shared {
    pub store: Store,
    pub cache: VerifyCache,
    pub max_api_keys: u64,
    pub metrics: PrometheusHandle,
    /// The KV sync's status, when a KV target is configured.
    pub kv_sync: Option<Arc<SyncStatus>>,
    /// The periodic KV reconcile (`KV_RECONCILE_INTERVAL`), when on.
    pub kv_reconcile: Option<Arc<ReconcileStatus>>,
    /// How long the edge may keep a record it looked up (the `X-Metlo-Kv-Ttl-Seconds` of
    /// `by-hash`): long while the KV sync deletes what is revoked, the cache TTL without it.
    pub edge_keep_seconds: u64,
    /// Last-use times waiting to be written.
    pub usage: Arc<Usage>,
    /// Failed authentications waiting to be written to the audit log.
    pub auth_failures: Arc<AuthFailures>,
    /// Failed-authentication budget per source (429 past it).
    pub failure_limiter: FailureLimiter,
    /// Keys (and console session tokens) valid lately: their lookups skip the failure
    /// budget.
    pub recently_valid: RecentlyValid,
    /// Console cookies that named no session (by SHA-256): refused without a lookup.
    pub unknown_sessions: moka::sync::Cache<metlo_shared::KeyHash, ()>,
    /// Bound on concurrent lookups of uncached keys (503 past it).
    pub lookups: Lookups,
    /// The same bound, apart, for lookups public traffic cannot cause: the edge's
    /// `by-hash` and the authentication of keys valid lately. A flood of made-up keys
    /// fills `lookups` only, so it cannot turn every KV miss at the edge, or a real
    /// caller whose cache entry just expired, into a 503.
    pub trusted_lookups: Lookups,
    /// The revocation feed, as the edge reads it (held in memory).
    pub feed: Arc<crate::service::feed::RevocationFeed>,
    /// Slots for leak reports being read and handled (503 when none is free).
    pub leak_reports: Arc<crate::service::abuse::ReportSlots>,
    /// Peers whose `X-Forwarded-For` names the client (`TRUSTED_PROXIES`).
    pub trusted_proxies: Vec<IpNet>,
    /// Per-key rate limits of `/api/v1/verify`.
    pub key_limits: KeyLimits,
    /// Most keys a list answers without paging (`LIST_UNPAGED_MAX`).
    pub list_unpaged_max: u64,
    /// What a GitHub leak report does (`LEAK_REVOCATION`).
    pub leak_mode: LeakMode,
    /// GitHub's secret-scanning keys (`GITHUB_KEYS_URL`), fetched on first use.
    pub github_keys: Arc<GitHubKeys>,
    /// Console sessions' idle timeout and cookie (`CONSOLE_*`).
    pub console: SessionRules,
    /// The published assertion keys, as served.
    pub jwks: crate::service::assertion_keys::Jwks,
}
