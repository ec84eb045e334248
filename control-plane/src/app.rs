//! The composition root: builds the store, the cache and the request state from the
//! configuration, spawns every background task, and runs `serve` or `migrate`.
//! Nothing else in the crate spawns a task or wires layers together.

use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::http::state::{AppState, Shared};
use crate::kv_sync::client::KvClient;
use crate::kv_sync::drainer::{self, SyncStatus};
use crate::kv_sync::reconcile::{self, ReconcileStatus};
use crate::service::abuse::{FailureLimiter, RecentlyValid};
use crate::service::audit::{self, AuthFailures};
use crate::service::console::SessionRules;
use crate::service::github_keys::GitHubKeys;
use crate::service::usage::{self, Usage};
use crate::service::verify::Lookups;
use crate::{http, telemetry};

/// The REST service with everything behind it, until SIGTERM / Ctrl-C.
pub async fn serve(config: Config, listen_addr: &str, ops_addr: &str) -> anyhow::Result<()> {
    let mut store = config.open_store().await?;
    let kv_sync = match config.kv.target()? {
        Some(target) => {
            let status = Arc::new(SyncStatus::default());
            store = store.with_outbox_wake(status.wake.clone());
            tracing::info!(api = %target.api_url, namespace = %target.namespace_id, "KV sync on");
            let client = KvClient::new(target)?;
            if let Some(url) = config
                .database_url
                .clone()
                .filter(|u| u.starts_with("postgres"))
            {
                tokio::spawn(drainer::listen(url, status.clone()));
            }
            tokio::spawn(drainer::drain_forever(
                store.clone(),
                client.clone(),
                status.clone(),
            ));
            let every = config.kv.kv_reconcile_interval;
            let reconcile = (!every.is_zero()).then(|| {
                let reconcile = Arc::new(ReconcileStatus::new(every));
                tokio::spawn(reconcile::reconcile_forever(
                    store.clone(),
                    client,
                    reconcile.clone(),
                ));
                reconcile
            });
            Some((status, reconcile))
        }
        None => {
            tracing::warn!(
                cache_ttl_seconds = config.cache_ttl_seconds,
                "KV sync is off (CLOUDFLARE_ACCOUNT_ID, KV_NAMESPACE_ID and CLOUDFLARE_API_TOKEN \
                 are not all set): the edge Worker is told to keep no record in KV, so every \
                 key it has not seen in the last few seconds costs a call here; set them to \
                 push key updates to Workers KV"
            );
            None
        }
    };
    // How long the edge may keep a record: while KV sync is on, as long as pushed records
    // live (deletes are pushed); while off, no longer than this process caches it.
    let edge_keep_seconds = match (&kv_sync, config.kv.kv_sync_ttl_seconds) {
        (Some(_), 0) => u64::from(u32::MAX),
        (Some(_), ttl) => ttl,
        (None, _) => config.cache_ttl_seconds,
    };
    // Every key, as many secrets again in a roll's overlap, and room for busy keys counted
    // by more than one worker thread until a flush merges them.
    let usage_capacity =
        usize::try_from(config.max_api_keys.saturating_mul(3)).unwrap_or(usize::MAX);
    let usage = Arc::new(Usage::new(config.track_last_used, usage_capacity.max(1000)));
    tokio::spawn(usage::prune_forever(store.clone(), config.usage_retention));
    if usage.enabled() {
        tokio::spawn(usage::flush_forever(
            store.clone(),
            usage.clone(),
            Duration::from_secs(config.last_used_flush_seconds.max(1)),
        ));
    }
    let auth_failures = Arc::new(AuthFailures::default());
    tokio::spawn(audit::flush_forever(
        store.clone(),
        auth_failures.clone(),
        config.audit_retention,
    ));
    let cache = config.cache()?;
    for task in cache.background_tasks() {
        tokio::spawn(task);
    }
    let metrics = telemetry::init_metrics()?;
    tokio::spawn(telemetry::upkeep_forever(metrics.clone()));
    let state = AppState::new(Shared {
        metrics,
        store: store.clone(),
        cache,
        max_api_keys: config.max_api_keys,
        kv_reconcile: kv_sync.as_ref().and_then(|(_, r)| r.clone()),
        kv_sync: kv_sync.map(|(s, _)| s),
        edge_keep_seconds,
        usage,
        auth_failures,
        failure_limiter: FailureLimiter::new(config.auth_failures_per_minute),
        recently_valid: RecentlyValid::default(),
        lookups: Lookups::new(config.max_concurrent_lookups),
        trusted_proxies: config.trusted_proxies.iter().map(|p| p.0).collect(),
        key_limits: config.key_limits()?,
        list_unpaged_max: config.list_unpaged_max,
        leak_mode: config.leak_revocation,
        github_keys: Arc::new(GitHubKeys::new(&config.github_keys_url)?),
        console: SessionRules {
            idle: config.console_idle_timeout,
            secure_cookie: config.console_secure_cookie,
        },
    });
    match store.count_legacy().await {
        Ok(0) => {}
        Ok(n) => tracing::warn!(
            keys = n,
            "keys made before roles have the legacy role (every power): give each one role \
             with `metlo-control-plane keys set-role NAME client|edge|admin`"
        ),
        Err(e) => tracing::warn!(error = %e, "could not count legacy keys"),
    }
    let limits = http::server::ConnectionLimits {
        header_read_timeout: Duration::from_secs(config.header_read_timeout_seconds.max(1)),
        max_connections: config.max_connections,
        request_timeout: Duration::from_secs(config.request_timeout_seconds.max(1)),
    };
    http::serve(listen_addr, ops_addr, limits, state).await?;
    store.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// Applies the migrations and exits.
pub async fn migrate(config: Config) -> anyhow::Result<()> {
    config.open_store().await?.close().await;
    tracing::info!("migrations applied");
    Ok(())
}
