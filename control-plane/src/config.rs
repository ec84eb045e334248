//! Configuration: every setting is an environment variable and a flag (shared by every
//! command), and how to open what the settings name (the store, the cache).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use ipnet::IpNet;

use crate::cache::{redis_client, RecordKey, VerifyCache};
use crate::db::Store;
use crate::kv_sync::client::KvTarget;
use crate::service::key_limits::KeyLimits;
use crate::telemetry::LogFormat;

#[derive(Debug, Args)]
pub struct Config {
    /// postgres://… or sqlite://…; unset: embedded SQLite under DATA_DIR.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,
    /// Where the embedded SQLite database lives when DATABASE_URL is unset.
    #[arg(long, env = "DATA_DIR", default_value = "./data", global = true)]
    pub data_dir: PathBuf,
    /// redis://… or rediss://… (TLS), with user:password@ for AUTH; unset: an in-process
    /// cache (one replica only).
    #[arg(long, env = "REDIS_URL", global = true, hide_env_values = true)]
    pub redis_url: Option<String>,
    /// PEM file of the CA that signed Redis's TLS certificate (rediss:// only); unset:
    /// the public roots.
    #[arg(long, env = "REDIS_CA_FILE", global = true)]
    pub redis_ca_file: Option<PathBuf>,
    /// Most keys the instance may hold.
    #[arg(long, env = "MAX_API_KEYS", default_value_t = 100, global = true)]
    pub max_api_keys: u64,
    /// Most keys a list answers as one plain array (Metlo's shape); past it, a list
    /// without `?limit=` is a 400 that says to page.
    #[arg(long, env = "LIST_UNPAGED_MAX", default_value_t = 1000, global = true)]
    pub list_unpaged_max: u64,
    /// What a GitHub secret-scanning report of one of our keys does: revoke it (and
    /// audit), notify (audit only), or off (no route).
    #[arg(
        long,
        env = "LEAK_REVOCATION",
        value_enum,
        default_value = "revoke",
        global = true
    )]
    pub leak_revocation: crate::service::leaks::LeakMode,
    /// Where GitHub's secret-scanning public keys are fetched from.
    #[arg(
        long,
        env = "GITHUB_KEYS_URL",
        default_value = crate::service::github_keys::GITHUB_KEYS_URL,
        global = true
    )]
    pub github_keys_url: String,
    /// How long a verification result is cached.
    #[arg(long, env = "CACHE_TTL_SECONDS", default_value_t = 5, global = true)]
    pub cache_ttl_seconds: u64,
    /// Record when each key was last used (`lastUsed`).
    #[arg(long, env = "TRACK_LAST_USED", default_value_t = true, action = clap::ArgAction::Set, global = true)]
    pub track_last_used: bool,
    /// How long audit-log entries are kept, e.g. `90d`, `12h` (`0s`: forever).
    #[arg(long, env = "AUDIT_RETENTION", default_value = "90d", value_parser = humantime::parse_duration, global = true)]
    pub audit_retention: Duration,
    /// How long per-key hourly request counts are kept, e.g. `90d` (`0s`: forever).
    #[arg(long, env = "USAGE_RETENTION", default_value = "90d", value_parser = humantime::parse_duration, global = true)]
    pub usage_retention: Duration,
    /// A console session ends after this long without a request (`30m`, `2h`, seconds).
    #[arg(long, env = "CONSOLE_IDLE_TIMEOUT", default_value = "30m", value_parser = parse_positive_interval, global = true)]
    pub console_idle_timeout: Duration,
    /// Mark the console's session cookie `Secure` even when the request did not arrive
    /// over TLS as far as this process can tell (TLS ended by a proxy not in
    /// `TRUSTED_PROXIES`). Requests with `X-Forwarded-Proto: https` from a trusted proxy
    /// get it anyway.
    #[arg(long, env = "CONSOLE_SECURE_COOKIE", default_value_t = false, action = clap::ArgAction::Set, global = true)]
    pub console_secure_cookie: bool,
    /// How often last-use times are written: at most one write per key per interval.
    #[arg(
        long,
        env = "LAST_USED_FLUSH_SECONDS",
        default_value_t = 60,
        global = true
    )]
    pub last_used_flush_seconds: u64,
    /// How long an SQLite write waits for the writer lock before it is answered 503.
    #[arg(
        long,
        env = "SQLITE_BUSY_TIMEOUT_MS",
        default_value_t = 10_000,
        global = true
    )]
    pub sqlite_busy_timeout_ms: u64,
    /// Failed authentications a source (an IPv4 address, an IPv6 /64) may cause per
    /// minute (also its burst) before it gets 429 instead of lookups (0: no limit).
    #[arg(
        long,
        env = "AUTH_FAILURES_PER_MINUTE",
        default_value_t = 60,
        global = true
    )]
    pub auth_failures_per_minute: u32,
    /// Most failed-authentication rows the audit log gets per minute (the busiest sources
    /// first), plus one row summing up what was not itemised.
    #[arg(
        long,
        env = "AUDIT_FAILURE_ROWS_PER_MINUTE",
        default_value_t = 60,
        global = true
    )]
    pub audit_failure_rows_per_minute: u32,
    /// How long the revocation feed keeps an event: at least the time Workers KV may serve
    /// a stale value (its read cache, 30 s, plus its propagation, 60 s, and the isolate's
    /// 0.5 s) — an isolate started later learns of the event from the window alone.
    #[arg(
        long,
        env = "REVOCATION_FEED_WINDOW_SECONDS",
        default_value_t = 120,
        value_parser = clap::value_parser!(u64).range(91..=86_400),
        global = true
    )]
    pub revocation_feed_window_seconds: u64,
    /// The edge Worker's `REVOCATION_FEED_INTERVAL_MS` (keep them equal): what revocation
    /// answers promise as `refusedEverywhereBy` (twice it after the answer); 0: the
    /// Worker does not read the feed, and the promise is KV's (90.5 s).
    #[arg(
        long,
        env = "EDGE_REVOCATION_FEED_INTERVAL_MS",
        default_value_t = 1000,
        value_parser = clap::value_parser!(u64).range(0..=60_000),
        global = true
    )]
    pub edge_revocation_feed_interval_ms: u64,
    /// Most database lookups of uncached keys at once; past it, 503 at once.
    #[arg(
        long,
        env = "MAX_CONCURRENT_LOOKUPS",
        default_value_t = 8,
        global = true
    )]
    pub max_concurrent_lookups: usize,
    /// Longest wait for a request's head (request line and headers), and for the next
    /// request on an idle connection, before it is closed: slow clients cannot hold
    /// connections.
    #[arg(
        long,
        env = "HEADER_READ_TIMEOUT_SECONDS",
        default_value_t = 10,
        global = true
    )]
    pub header_read_timeout_seconds: u64,
    /// Longest a request may take once its head is read (its body, and the work it asks
    /// for) before it is answered 408.
    #[arg(
        long,
        env = "REQUEST_TIMEOUT_SECONDS",
        default_value_t = 30,
        global = true
    )]
    pub request_timeout_seconds: u64,
    /// Open connections per process at most; past it, new ones wait to be accepted.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 4096, global = true)]
    pub max_connections: usize,
    /// Proxies (addresses or CIDR networks, comma-separated) whose `X-Forwarded-For` is
    /// believed; from any other peer it is ignored.
    #[arg(long, env = "TRUSTED_PROXIES", value_delimiter = ',', global = true)]
    pub trusted_proxies: Vec<TrustedProxy>,
    #[arg(
        long,
        env = "LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
    #[command(flatten)]
    pub kv: KvConfig,
}

/// Where key updates are pushed (Workers KV). Sync is on when the namespace, account and
/// token are all set.
#[derive(Debug, Args)]
pub struct KvConfig {
    /// Cloudflare API base URL (a local target in development and tests).
    #[arg(
        long,
        env = "KV_API_URL",
        default_value = "https://api.cloudflare.com/client/v4",
        global = true
    )]
    pub kv_api_url: String,
    #[arg(long, env = "CLOUDFLARE_ACCOUNT_ID", global = true)]
    pub cloudflare_account_id: Option<String>,
    /// The id of the Workers KV namespace bound as KEYS in wrangler.toml.
    #[arg(long, env = "KV_NAMESPACE_ID", global = true)]
    pub kv_namespace_id: Option<String>,
    /// A Cloudflare API token with Workers KV Storage:Edit.
    #[arg(
        long,
        env = "CLOUDFLARE_API_TOKEN",
        global = true,
        hide_env_values = true
    )]
    pub cloudflare_api_token: Option<String>,
    /// expiration_ttl of pushed records (>= 60; 0: none, they live until deleted).
    #[arg(
        long,
        env = "KV_SYNC_TTL_SECONDS",
        default_value_t = 86_400,
        global = true
    )]
    pub kv_sync_ttl_seconds: u64,
    /// Longest wait for one KV API request before it counts as failed and is retried.
    #[arg(
        long,
        env = "KV_SYNC_TIMEOUT_MS",
        default_value_t = 10_000,
        global = true
    )]
    pub kv_sync_timeout_ms: u64,
    /// Every KV delete, and every put that changes a key's record, is sent again this
    /// long after the first: in case a put that timed out on our side was applied by the
    /// API later than the delete, or the edge wrote the record it had just looked up
    /// after our change (0: off).
    #[arg(
        long,
        env = "KV_SYNC_DELETE_ECHO_SECONDS",
        default_value_t = 60,
        global = true
    )]
    pub kv_sync_delete_echo_seconds: u64,
    /// Compare KV with the database this often and fix what drifted (e.g. 1h, 30m or
    /// seconds; 0: only on demand, with `keys kv-reconcile`). Each run lists the whole
    /// namespace: one KV API call per 1,000 keys.
    #[arg(
        long,
        env = "KV_RECONCILE_INTERVAL",
        default_value = "0",
        value_parser = parse_interval,
        global = true
    )]
    pub kv_reconcile_interval: Duration,
}

/// A duration in seconds (`3600`) or humantime's form (`1h`, `30m`).
fn parse_interval(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let d = match s.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => humantime::parse_duration(s)
            .map_err(|e| format!("{s:?} is not a duration like 3600, 30m or 1h: {e}"))?,
    };
    Ok(d)
}

/// An interval of at least a second.
fn parse_positive_interval(s: &str) -> Result<Duration, String> {
    let d = parse_interval(s)?;
    if d < Duration::from_secs(1) {
        return Err(format!("{s:?} is too short: at least 1 second"));
    }
    Ok(d)
}

/// One `TRUSTED_PROXIES` entry: `10.0.0.0/8`, `203.0.113.7`, `2001:db8::/32`.
#[derive(Debug, Clone, Copy)]
pub struct TrustedProxy(pub IpNet);

impl std::str::FromStr for TrustedProxy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        s.parse::<IpNet>()
            .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
            .map(TrustedProxy)
            .map_err(|_| format!("{s:?} is not an IP address or a CIDR network"))
    }
}

impl KvConfig {
    pub fn target(&self) -> anyhow::Result<Option<KvTarget>> {
        let (Some(account), Some(namespace), Some(token)) = (
            &self.cloudflare_account_id,
            &self.kv_namespace_id,
            &self.cloudflare_api_token,
        ) else {
            return Ok(None);
        };
        if self.kv_sync_ttl_seconds != 0 && self.kv_sync_ttl_seconds < 60 {
            anyhow::bail!("KV_SYNC_TTL_SECONDS must be 0 or at least 60 (Workers KV's minimum)");
        }
        Ok(Some(KvTarget {
            api_url: self.kv_api_url.clone(),
            account_id: account.clone(),
            namespace_id: namespace.clone(),
            api_token: token.clone(),
            expiration_ttl: (self.kv_sync_ttl_seconds > 0).then_some(self.kv_sync_ttl_seconds),
            timeout: Duration::from_millis(self.kv_sync_timeout_ms.max(1)),
        }))
    }
}

impl Config {
    /// A client for `REDIS_URL` (with `REDIS_CA_FILE`), when it is set. Does not connect.
    fn redis_client(&self) -> anyhow::Result<Option<redis::Client>> {
        let Some(url) = &self.redis_url else {
            return Ok(None);
        };
        let ca = match &self.redis_ca_file {
            Some(path) => Some(std::fs::read(path).map_err(|e| {
                anyhow::anyhow!("cannot read REDIS_CA_FILE {}: {e}", path.display())
            })?),
            None => None,
        };
        Ok(Some(redis_client(url, ca.as_deref())?))
    }

    /// The verification cache: Redis when `REDIS_URL` is set, its records tagged with
    /// the instance's key from `store`. (A server also runs its background tasks; see
    /// `VerifyCache::background_tasks`.)
    pub async fn cache(&self, store: &Store) -> anyhow::Result<VerifyCache> {
        let ttl = Duration::from_secs(self.cache_ttl_seconds);
        match self.redis_client()? {
            Some(client) => Ok(VerifyCache::redis(client, ttl, record_key(store).await?)),
            None => Ok(VerifyCache::memory(ttl)),
        }
    }

    /// The per-key rate-limit counters: in Redis when `REDIS_URL` is set (shared by
    /// replicas), in this process otherwise.
    pub fn key_limits(&self) -> anyhow::Result<KeyLimits> {
        Ok(match self.redis_client()? {
            Some(client) => KeyLimits::redis(client),
            None => KeyLimits::memory(),
        })
    }

    /// The store, migrated, writing the outbox when a KV target is configured.
    pub async fn open_store(&self) -> anyhow::Result<Store> {
        let store = Store::connect(
            self.database_url.as_deref(),
            &self.data_dir,
            Duration::from_millis(self.sqlite_busy_timeout_ms),
        )
        .await?
        .with_outbox(
            self.kv.target()?.is_some(),
            Duration::from_secs(self.kv.kv_sync_delete_echo_seconds),
        );
        store.migrate().await?;
        Ok(store)
    }
}

/// The key that tags records in Redis: 256 random bits made by the first process that
/// needed them and kept in the database, so every replica has it and Redis never does.
async fn record_key(store: &Store) -> anyhow::Result<RecordKey> {
    let mut fresh = [0u8; 32];
    getrandom::fill(&mut fresh).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let stored = store
        .instance_secret("redis_record_key", &hex::encode(fresh))
        .await?;
    let mut key = [0u8; 32];
    hex::decode_to_slice(stored.trim(), &mut key)
        .map_err(|_| anyhow::anyhow!("the stored redis_record_key is not 64 hex digits"))?;
    Ok(RecordKey::new(key))
}
