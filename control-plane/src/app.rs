//! The composition root: builds the store, the cache and the request state from the
//! configuration, and the background tasks beside them. [`build`] makes an [`App`]
//! without serving it (tests drive its router in process and run its periodic work on
//! demand with [`App::flush`]); [`serve`] runs one until SIGTERM / Ctrl-C. Nothing else
//! in the crate spawns a task or wires layers together.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;

use crate::cache::Task;
use crate::config::Config;
use crate::db::Store;
use crate::http::state::{AppState, Shared};
use crate::kv_sync::client::KvClient;
use crate::kv_sync::drainer::{self, SyncStatus};
use crate::kv_sync::reconcile::{self, ReconcileStatus};
use crate::service::abuse::{FailureLimiter, RecentlyValid};
use crate::service::audit::{self, AuthFailures};
use crate::service::console::SessionRules;
use crate::service::feed::RevocationFeed;
use crate::service::github_keys::GitHubKeys;
use crate::service::usage::{self, Usage};
use crate::service::verify::Lookups;
use crate::{http, telemetry};

/// The service, built and not yet serving.
pub struct App {
    /// What every handler shares.
    pub state: AppState,
    /// The API (`/api/v1/*`, the console, `/openapi.json`).
    pub router: Router,
    /// The ops port's routes (`/healthz`, `/readyz`, `/metrics`).
    pub ops_router: Router,
    /// The accept loop's bounds.
    pub limits: http::server::ConnectionLimits,
    /// The periodic work (flushes, the KV drainer, pruning); [`serve`] spawns them.
    pub tasks: Vec<Task>,
    /// The KV client, when KV sync is on (what [`App::flush`] drains the outbox to).
    kv_client: Option<KvClient>,
    /// How long audit entries are kept (`AUDIT_RETENTION`), for [`App::flush`]'s prune.
    audit_retention: Duration,
}

/// What one [`App::flush`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flushed {
    /// Audit rows of failed authentications.
    pub audit_rows: usize,
    /// Keys whose last use and counts were written.
    pub usage_rows: usize,
}

fn task(f: impl Future<Output = ()> + Send + 'static) -> Task {
    Box::pin(f)
}

/// Builds everything the configuration names, without serving or spawning anything.
pub async fn build(config: &Config) -> anyhow::Result<App> {
    let mut tasks: Vec<Task> = Vec::new();
    let mut store = config.open_store().await?;
    // The revocation feed's reader is woken by this process's commits (set before any
    // clone of the store is handed out).
    let feed = Arc::new(RevocationFeed::new(Duration::from_secs(
        config.revocation_feed_window_seconds,
    )));
    crate::service::feed::set_edge_interval(config.edge_revocation_feed_interval_ms);
    let feed_wake = Arc::new(tokio::sync::Notify::new());
    store = store.with_feed_wake(feed_wake.clone());
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
                tasks.push(task(drainer::listen(url, status.clone())));
            }
            tasks.push(task(drainer::drain_forever(
                store.clone(),
                client.clone(),
                status.clone(),
            )));
            let every = config.kv.kv_reconcile_interval;
            let reconcile = (!every.is_zero()).then(|| {
                let reconcile = Arc::new(ReconcileStatus::new(every));
                tasks.push(task(reconcile::reconcile_forever(
                    store.clone(),
                    client.clone(),
                    reconcile.clone(),
                )));
                reconcile
            });
            Some((status, reconcile, client))
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
    let postgres_url = config
        .database_url
        .clone()
        .filter(|u| u.starts_with("postgres"));
    tasks.push(task(feed.clone().run(
        store.clone(),
        feed_wake,
        postgres_url,
    )));
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
    tasks.push(task(usage::prune_forever(
        store.clone(),
        config.usage_retention,
    )));
    if usage.enabled() {
        tasks.push(task(usage::flush_forever(
            store.clone(),
            usage.clone(),
            Duration::from_secs(config.last_used_flush_seconds.max(1)),
        )));
    }
    let auth_failures = Arc::new(AuthFailures::new(config.audit_failure_rows_per_minute));
    tasks.push(task(audit::flush_forever(
        store.clone(),
        auth_failures.clone(),
        config.audit_retention,
    )));
    let cache = config.cache(&store).await?;
    tasks.extend(cache.background_tasks());
    let metrics = telemetry::init_metrics()?;
    tasks.push(task(telemetry::upkeep_forever(metrics.clone())));
    let kv_client = kv_sync.as_ref().map(|(_, _, client)| client.clone());
    let state = AppState::new(Shared {
        metrics,
        store: store.clone(),
        cache,
        max_api_keys: config.max_api_keys,
        kv_reconcile: kv_sync.as_ref().and_then(|(_, r, _)| r.clone()),
        kv_sync: kv_sync.map(|(s, _, _)| s),
        edge_keep_seconds,
        usage,
        auth_failures,
        failure_limiter: FailureLimiter::new(config.auth_failures_per_minute),
        recently_valid: RecentlyValid::default(),
        // Bounded, and forgotten after a while (a token is never valid later: a session's
        // token is made at sign-in and never reused).
        unknown_sessions: moka::sync::Cache::builder()
            .max_capacity(100_000)
            .time_to_live(std::time::Duration::from_secs(600))
            .build(),
        lookups: Lookups::new(config.max_concurrent_lookups),
        trusted_lookups: Lookups::new(config.max_concurrent_lookups),
        feed,
        leak_reports: Arc::new(crate::service::abuse::ReportSlots::new(
            crate::http::limits::SMALL_LEAK_REPORTS,
            crate::http::limits::LARGE_LEAK_REPORTS,
        )),
        trusted_proxies: config.trusted_proxies.iter().map(|p| p.0).collect(),
        key_limits: config.key_limits()?,
        list_unpaged_max: config.list_unpaged_max,
        leak_mode: config.leak_revocation,
        github_keys: Arc::new(GitHubKeys::new(&config.github_keys_url)?),
        console: SessionRules {
            idle: config.console_idle_timeout,
            secure_cookie: config.console_secure_cookie,
        },
        jwks: Default::default(),
    });
    let limits = http::server::ConnectionLimits {
        header_read_timeout: Duration::from_secs(config.header_read_timeout_seconds.max(1)),
        max_connections: config.max_connections,
        request_timeout: Duration::from_secs(config.request_timeout_seconds.max(1)),
    };
    Ok(App {
        router: http::app(state.clone()),
        ops_router: http::ops_app(state.clone()),
        state,
        limits,
        tasks,
        kv_client,
        audit_retention: config.audit_retention,
    })
}

impl App {
    /// Runs the periodic work tests wait on once, now, to completion: failed
    /// authentications into the audit log and entries past `AUDIT_RETENTION` out of it,
    /// pending key uses into the store, and the KV outbox to KV (when on). Not run here:
    /// the hourly usage prune, the KV reconcile, the Redis cache's tasks, metrics upkeep.
    pub async fn flush(&self) -> Flushed {
        let store = &self.state.store;
        let audit_rows = audit::flush_failures(store, &self.state.auth_failures).await;
        audit::prune_past(store, self.audit_retention).await;
        let usage_rows = usage::flush(store, &self.state.usage).await;
        if let Err(e) = self.state.feed.refresh(store).await {
            tracing::warn!(error = %e, "revocation feed: read failed");
        }
        if let Some(client) = &self.kv_client {
            drainer::drain_all(store, client).await;
        }
        Flushed {
            audit_rows,
            usage_rows,
        }
    }

    pub fn store(&self) -> &Store {
        &self.state.store
    }
}

/// The REST service with everything behind it, until SIGTERM / Ctrl-C.
pub async fn serve(config: Config, listen_addr: &str, ops_addr: &str) -> anyhow::Result<()> {
    let app = build(&config).await?;
    let store = app.state.store.clone();
    match store.count_legacy().await {
        Ok(0) => {}
        Ok(n) => tracing::warn!(
            keys = n,
            "keys made before roles have the legacy role (every power): give each one role \
             with `metlo-control-plane keys set-role NAME client|edge|admin`"
        ),
        Err(e) => tracing::warn!(error = %e, "could not count legacy keys"),
    }
    // The feed's first read before the first request: ready (and serving the feed) as
    // soon as it listens. A failure here is retried by the feed's own task.
    if let Err(e) = app.state.feed.refresh(&store).await {
        tracing::warn!(error = %e, "revocation feed: first read failed; not ready until it succeeds");
    }
    for task in app.tasks {
        tokio::spawn(task);
    }
    http::serve(
        listen_addr,
        ops_addr,
        app.limits,
        app.state,
        app.router,
        app.ops_router,
    )
    .await?;
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
