//! Per-key rate limits on `/api/v1/verify` (Metlo's ingestors call it; the edge keeps
//! its own count). The same fixed window as the edge ([`metlo_shared::RateLimitWindow`]):
//! in this process when there is no Redis (exact per replica), in Redis when
//! `REDIS_URL` is set (exact across replicas: one `INCR` per request).
//!
//! Counted per key name, so a key's secrets share one limit through a roll's overlap, and
//! per limit, so a changed limit starts a new window. Fails closed: a Redis that does
//! not answer is a 503, never an uncounted request.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use metlo_shared::{RateLimit, RateLimitOutcome, RateLimitWindow};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::OnceCell;

use super::Error;

/// A Redis call slower than this fails the request (503).
const REDIS_TIMEOUT: Duration = Duration::from_millis(250);

/// One atomic step: count the request, start the window's expiry on its first, and say
/// how long the window has left.
const HIT_SCRIPT: &str = r"
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
local left = redis.call('PTTL', KEYS[1])
if left < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]); left = tonumber(ARGV[1]) end
return {count, left}
";

pub enum KeyLimits {
    /// Windows by counter name; an idle one is dropped after the longest period.
    Memory(moka::sync::Cache<String, Arc<Mutex<RateLimitWindow>>>),
    Redis {
        client: redis::Client,
        conn: OnceCell<ConnectionManager>,
    },
}

impl KeyLimits {
    pub fn memory() -> Self {
        KeyLimits::Memory(
            moka::sync::Cache::builder()
                .time_to_idle(Duration::from_secs(metlo_shared::MAX_PERIOD_SECONDS.into()))
                .build(),
        )
    }

    /// Does not connect yet (as the cache: the service starts while Redis is down).
    pub fn redis(client: redis::Client) -> Self {
        KeyLimits::Redis {
            client,
            conn: OnceCell::new(),
        }
    }

    /// Counts one request of the key `name` against `limit` at `now_ms`.
    pub async fn hit(
        &self,
        name: &str,
        limit: RateLimit,
        now_ms: u64,
    ) -> Result<RateLimitOutcome, Error> {
        let counter = format!("{}/{}:{name}", limit.requests, limit.period_seconds);
        match self {
            KeyLimits::Memory(windows) => {
                let window = windows.get_with(counter, Default::default);
                let mut window = window.lock().unwrap_or_else(|e| e.into_inner());
                Ok(window.hit(limit, now_ms))
            }
            // Boxed: the Redis round trip's future is kilobytes, and a future that size
            // inside `hit` would be moved with every `/verify` call, limited or not.
            KeyLimits::Redis { client, conn } => {
                Box::pin(Self::hit_redis(client, conn, &counter, limit)).await
            }
        }
    }

    async fn hit_redis(
        client: &redis::Client,
        conn: &OnceCell<ConnectionManager>,
        counter: &str,
        limit: RateLimit,
    ) -> Result<RateLimitOutcome, Error> {
        let counted = tokio::time::timeout(REDIS_TIMEOUT, async {
            let conn = conn
                .get_or_try_init(|| async {
                    let config = ConnectionManagerConfig::new()
                        .set_connection_timeout(REDIS_TIMEOUT)
                        .set_response_timeout(REDIS_TIMEOUT)
                        .set_number_of_retries(1);
                    ConnectionManager::new_with_config(client.clone(), config).await
                })
                .await?;
            // EVAL, not EVALSHA: the script is short, and a Redis restarted without it
            // cached needs no second round trip.
            redis::cmd("EVAL")
                .arg(HIT_SCRIPT)
                .arg(1)
                .arg(format!("metlo:rl:{counter}"))
                .arg(limit.period_ms())
                .query_async::<(u64, i64)>(&mut conn.clone())
                .await
        })
        .await;
        match counted {
            Ok(Ok((count, left_ms))) => Ok(RateLimitOutcome::from_count(
                limit,
                count,
                left_ms.max(0) as u64,
            )),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "rate limit not counted: Redis failed");
                Err(Error::LimiterUnavailable)
            }
            Err(_) => {
                tracing::warn!("rate limit not counted: Redis timed out");
                Err(Error::LimiterUnavailable)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_counts_per_key_and_per_limit() {
        let limits = KeyLimits::memory();
        let l = RateLimit::new(2, 60).unwrap();
        let now = 1_000_000;
        let hits: Vec<bool> =
            futures_util::future::join_all((0..3).map(|i| limits.hit("a", l, now + i)))
                .await
                .into_iter()
                .map(|o| o.unwrap().allowed)
                .collect();
        assert_eq!(hits, [true, true, false]);
        assert!(limits.hit("b", l, now).await.unwrap().allowed, "per key");
        let other = RateLimit::new(3, 60).unwrap();
        assert!(
            limits.hit("a", other, now).await.unwrap().allowed,
            "a new limit, a new window"
        );
        assert!(
            limits.hit("a", l, now + 60_000).await.unwrap().allowed,
            "next window"
        );
    }
}
