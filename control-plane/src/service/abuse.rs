//! What made-up keys may cost. The checksum is a public CRC32, so anyone can mint keys
//! that pass it, and each new one would cost a database lookup. Two bounds, both off the
//! path of a valid key served from the cache:
//!
//! - [`FailureLimiter`]: each source (an IPv4 address, an IPv6 /64) has a budget of failed
//!   authentications, a token bucket refilled at `AUTH_FAILURES_PER_MINUTE`. A failure
//!   spends a token; a source with none left gets 429 instead of a lookup. Lookups of
//!   valid keys spend nothing, so many clients behind one NAT are not limited by their
//!   own traffic.
//! - [`LookupGate`]: at most `MAX_CONCURRENT_LOOKUPS` cache-missing lookups at once; one
//!   more waits up to 250 ms (a burst of valid keys on a cold cache gets through), then is
//!   refused, so a flood from many sources turns into quick 503s instead of a saturated
//!   pool.
//!
//! - [`RecentlyValid`]: hashes that were a valid key in the last 10 minutes skip the
//!   budget check, so a valid key whose cache entry expired still gets its lookup from a
//!   source that has spent its budget (many clients behind one NAT with an attacker).
//!   Only a real key's hash gets there, so this costs at most one lookup per such key per
//!   cache TTL.
//!
//! (`governor`, the usual rate-limiting crate, was weighed: its keyed limiter cannot tell
//! whether a source is limited without spending a token, which a valid lookup must not do.)

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use metlo_shared::KeyHash;
use tokio::sync::{Semaphore, SemaphorePermit};

use super::Error;
use crate::clock::instant;

/// Sources tracked at once (per generation); sources beyond that share one bucket (one
/// source's budget for all of them: a flood from more addresses than this is limited as
/// hard as one address, never not at all).
const MAX_SOURCES: usize = 100_000;

/// A bucket untouched this long has refilled (a whole budget comes back in a minute), so
/// forgetting it changes nothing.
const GENERATION: Duration = Duration::from_secs(60);

/// The unit a budget belongs to: one IPv4 address, or an IPv6 /64 (one subscriber's
/// network: a single host can use any address of it).
pub fn source_of(ip: IpAddr) -> IpNet {
    let (ip, prefix) = match ip.to_canonical() {
        v4 @ IpAddr::V4(_) => (v4, 32),
        v6 => (v6, 64),
    };
    IpNet::new(ip, prefix).expect("prefix in range").trunc()
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

type Sources = HashMap<IpNet, Bucket, foldhash::fast::RandomState>;

/// Buckets in two generations: those touched in this one, and in the one before. Every
/// `GENERATION` the older map is dropped whole — one free, no sweep over a hundred
/// thousand buckets holding up a worker (a flood from many addresses fills the map) —
/// and each map gets its full size on its first source, so it never grows (a rehash
/// of a large map would stall the same way).
struct Buckets {
    current: Sources,
    previous: Sources,
    since: Instant,
    /// The bucket every source shares once `current` is full.
    overflow: Bucket,
}

impl Buckets {
    fn rotate_if_due(&mut self, now: Instant) {
        if now.duration_since(self.since) >= GENERATION {
            self.previous = std::mem::take(&mut self.current);
            // Two generations without a failure: nothing in either is still spent.
            if now.duration_since(self.since) >= 2 * GENERATION {
                self.previous = Sources::default();
            }
            self.since = now;
        }
    }

    fn get(&self, source: &IpNet) -> Option<&Bucket> {
        self.current
            .get(source)
            .or_else(|| self.previous.get(source))
            .or_else(|| (self.current.len() >= MAX_SOURCES).then_some(&self.overflow))
    }

    /// The source's bucket in this generation (brought over from the last one, or new);
    /// the shared overflow bucket when this generation is full.
    fn touch(&mut self, source: IpNet, fresh: Bucket) -> &mut Bucket {
        if !self.current.contains_key(&source) {
            if self.current.len() >= MAX_SOURCES {
                return &mut self.overflow;
            }
            if self.current.capacity() == 0 {
                self.current.reserve(MAX_SOURCES);
            }
            let bucket = self.previous.remove(&source).unwrap_or(fresh);
            self.current.insert(source, bucket);
        }
        self.current.get_mut(&source).expect("inserted above")
    }
}

/// Failed authentications per source (see the module docs).
pub struct FailureLimiter {
    /// Tokens per second; also the bucket's size, per minute (0: off).
    per_minute: u32,
    buckets: Mutex<Buckets>,
}

impl FailureLimiter {
    pub fn new(per_minute: u32) -> Self {
        FailureLimiter {
            per_minute,
            buckets: Mutex::new(Buckets {
                current: Sources::default(),
                previous: Sources::default(),
                since: instant(),
                overflow: Bucket {
                    tokens: f64::from(per_minute),
                    at: instant(),
                },
            }),
        }
    }

    fn refilled(&self, bucket: &Bucket, now: Instant) -> f64 {
        let rate = f64::from(self.per_minute) / 60.0;
        (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * rate)
            .min(f64::from(self.per_minute))
    }

    /// How long until a token is back (whole seconds, at least 1).
    fn wait(&self, tokens: f64) -> Duration {
        let rate = f64::from(self.per_minute) / 60.0;
        Duration::from_secs(((1.0 - tokens) / rate).ceil().max(1.0) as u64)
    }

    /// `Err(retry after)` when `ip`'s source has no failure left to spend (spends nothing).
    pub fn check(&self, ip: Option<IpAddr>) -> Result<(), Error> {
        self.check_at(ip, instant())
    }

    fn check_at(&self, ip: Option<IpAddr>, now: Instant) -> Result<(), Error> {
        let (Some(ip), true) = (ip, self.per_minute > 0) else {
            return Ok(());
        };
        let buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        match buckets.get(&source_of(ip)) {
            Some(b) => {
                let tokens = self.refilled(b, now);
                if tokens < 1.0 {
                    return Err(self.limited(tokens));
                }
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// A failed authentication from `ip`: spends a token, or `Err(retry after)` when there
    /// was none (the caller answers 429 instead of 401).
    pub fn failed(&self, ip: Option<IpAddr>) -> Result<(), Error> {
        self.failed_at(ip, instant())
    }

    fn failed_at(&self, ip: Option<IpAddr>, now: Instant) -> Result<(), Error> {
        let (Some(ip), true) = (ip, self.per_minute > 0) else {
            return Ok(());
        };
        let full = Bucket {
            tokens: f64::from(self.per_minute),
            at: now,
        };
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        buckets.rotate_if_due(now);
        let bucket = buckets.touch(source_of(ip), full);
        let tokens = self.refilled(bucket, now);
        bucket.at = now;
        if tokens < 1.0 {
            bucket.tokens = tokens;
            return Err(self.limited(tokens));
        }
        bucket.tokens = tokens - 1.0;
        Ok(())
    }

    fn limited(&self, tokens: f64) -> Error {
        metrics::counter!("metlo_auth_limited_total").increment(1);
        Error::TooManyFailures(self.wait(tokens))
    }

    #[cfg(test)]
    fn sources(&self) -> usize {
        let buckets = self.buckets.lock().unwrap();
        buckets.current.len() + buckets.previous.len()
    }
}

/// Hashes found valid lately (bounded, 10 minutes each), exempt from the failure budget.
pub struct RecentlyValid(moka::sync::Cache<KeyHash, ()>);

impl Default for RecentlyValid {
    fn default() -> Self {
        RecentlyValid(
            moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(600))
                .build(),
        )
    }
}

impl RecentlyValid {
    pub fn saw(&self, hash: &KeyHash) {
        if !self.0.contains_key(hash) {
            self.0.insert(*hash, ());
        }
    }

    pub fn contains(&self, hash: &KeyHash) -> bool {
        self.0.contains_key(hash)
    }
}

/// Leak reports being read at once: their bodies are nobody's until read whole and their
/// signature checked, so they are bounded in number and per source. Small reports
/// (GitHub's usual) and large or unannounced ones have pools of their own, so uploads
/// trickling in large cannot hold up small reports; and a source (an IPv4 address, an
/// IPv6 /64) has one report read at a time.
pub struct ReportSlots {
    small: Semaphore,
    large: Semaphore,
    sources: Mutex<std::collections::HashSet<IpNet>>,
}

/// A report being read; its pool's permit and its source are given back when dropped.
pub struct ReportSlot<'a> {
    _permit: SemaphorePermit<'a>,
    slots: &'a ReportSlots,
    source: Option<IpNet>,
    pool: &'static str,
}

impl ReportSlots {
    pub fn new(small: usize, large: usize) -> Self {
        ReportSlots {
            small: Semaphore::new(small),
            large: Semaphore::new(large),
            sources: Mutex::default(),
        }
    }

    /// A slot for a report from `ip` in the small or the large pool; `None` when that
    /// pool is full or the source already has a report being read.
    pub fn take(&self, ip: Option<IpAddr>, large: bool) -> Option<ReportSlot<'_>> {
        let (pool, name) = if large {
            (&self.large, "large")
        } else {
            (&self.small, "small")
        };
        let permit = pool.try_acquire().ok()?;
        let source = ip.map(source_of);
        if let Some(source) = source {
            let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
            if !sources.insert(source) {
                return None;
            }
        }
        metrics::gauge!("metlo_leak_reports_reading", "pool" => name).increment(1.0);
        Some(ReportSlot {
            _permit: permit,
            slots: self,
            source,
            pool: name,
        })
    }
}

impl Drop for ReportSlot<'_> {
    fn drop(&mut self) {
        if let Some(source) = &self.source {
            let mut sources = self.slots.sources.lock().unwrap_or_else(|e| e.into_inner());
            sources.remove(source);
        }
        metrics::gauge!("metlo_leak_reports_reading", "pool" => self.pool).decrement(1.0);
    }
}

/// How long a lookup waits for a free slot before it is refused.
const GATE_WAIT: Duration = Duration::from_millis(250);

/// At most so many database lookups of keys the cache does not know, at once.
pub struct LookupGate(Semaphore);

impl LookupGate {
    pub fn new(max_concurrent: usize) -> Self {
        LookupGate(Semaphore::new(max_concurrent.max(1)))
    }

    /// A permit for one lookup, or `Err(Busy)` when none frees up within 250 ms.
    pub async fn enter(&self) -> Result<SemaphorePermit<'_>, Error> {
        match tokio::time::timeout(GATE_WAIT, self.0.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => {
                metrics::counter!("metlo_lookups_refused_total").increment(1);
                Err(Error::Busy)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn sources_are_addresses_and_v6_networks() {
        assert_eq!(
            source_of("203.0.113.7".parse().unwrap()).to_string(),
            "203.0.113.7/32"
        );
        assert_eq!(
            source_of("2001:db8:1:2:aaaa::1".parse().unwrap()).to_string(),
            "2001:db8:1:2::/64"
        );
        assert_eq!(
            source_of("::ffff:203.0.113.7".parse().unwrap()).to_string(),
            "203.0.113.7/32",
            "a v4-mapped address is its v4 address"
        );
    }

    #[test]
    fn a_source_is_limited_after_its_budget_and_only_it() {
        let limiter = FailureLimiter::new(3);
        for _ in 0..3 {
            limiter.check(ip("10.0.0.1")).unwrap();
            limiter.failed(ip("10.0.0.1")).unwrap();
        }
        let Err(Error::TooManyFailures(wait)) = limiter.check(ip("10.0.0.1")) else {
            panic!("limited")
        };
        assert_eq!(wait, Duration::from_secs(20), "one token per 20 s at 3/min");
        assert!(limiter.failed(ip("10.0.0.1")).is_err());
        limiter.check(ip("10.0.0.2")).unwrap();
        // Another address of the same /64 shares the budget.
        for _ in 0..3 {
            limiter.failed(ip("2001:db8::1")).unwrap();
        }
        assert!(limiter.check(ip("2001:db8::ffff")).is_err());
        assert!(limiter.check(ip("2001:db8:0:1::1")).is_ok());
        // No address (no peer) and a limit of 0 are never limited.
        limiter.failed(None).unwrap();
        let off = FailureLimiter::new(0);
        for _ in 0..100 {
            off.failed(ip("10.0.0.1")).unwrap();
        }
        assert_eq!(off.sources(), 0);
    }

    #[test]
    fn spent_budgets_outlive_a_generation_and_refilled_ones_are_forgotten() {
        // Two failures a minute: a token every 30 s.
        let limiter = FailureLimiter::new(2);
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        limiter.failed_at(ip("10.0.0.1"), at(0)).unwrap();
        limiter.failed_at(ip("10.0.0.1"), at(0)).unwrap();
        assert!(limiter.failed_at(ip("10.0.0.1"), at(0)).is_err());
        // Near the generation's end it spends again (1.97 tokens back, 0.97 left).
        limiter.failed_at(ip("10.0.0.1"), at(59)).unwrap();
        // Another source opens the next generation; the first's bucket comes over from
        // the older map with what it has left (1.03), not as a fresh budget of 2.
        limiter.failed_at(ip("10.0.0.2"), at(61)).unwrap();
        limiter.failed_at(ip("10.0.0.1"), at(61)).unwrap();
        assert!(limiter.check_at(ip("10.0.0.1"), at(61)).is_err());
        assert!(limiter.failed_at(ip("10.0.0.1"), at(61)).is_err());
        // Two quiet generations later, both maps are gone.
        limiter.failed_at(ip("10.0.0.4"), at(200)).unwrap();
        assert_eq!(limiter.sources(), 1);
    }

    #[test]
    fn a_full_generation_puts_new_sources_in_one_shared_bucket() {
        let limiter = FailureLimiter::new(2);
        let now = Instant::now();
        for i in 0..MAX_SOURCES as u32 {
            let source = Some(IpAddr::from(i.to_be_bytes()));
            limiter.failed_at(source, now).unwrap();
        }
        limiter
            .failed_at(Some(IpAddr::from(0u32.to_be_bytes())), now)
            .unwrap();
        assert!(limiter
            .failed_at(Some(IpAddr::from(0u32.to_be_bytes())), now)
            .is_err());
        // Past the table's size, new sources share one budget of 2: the third failure
        // among them, from any of them, is refused.
        let new = |i: u32| Some(IpAddr::from((u32::MAX - i).to_be_bytes()));
        limiter.failed_at(new(0), now).unwrap();
        limiter.failed_at(new(1), now).unwrap();
        assert!(limiter.check_at(new(2), now).is_err(), "shared and spent");
        assert!(limiter.failed_at(new(3), now).is_err());
        assert_eq!(limiter.sources(), MAX_SOURCES);
    }

    #[test]
    fn tokens_come_back_over_time() {
        let limiter = FailureLimiter::new(60);
        let bucket = Bucket {
            tokens: 0.0,
            at: Instant::now() - Duration::from_millis(2500),
        };
        let tokens = limiter.refilled(&bucket, Instant::now());
        assert!((2.4..2.7).contains(&tokens), "{tokens}");
        let full = Bucket {
            tokens: 0.0,
            at: Instant::now() - Duration::from_secs(3600),
        };
        assert_eq!(limiter.refilled(&full, Instant::now()), 60.0, "capped");
    }

    #[tokio::test]
    async fn the_gate_refuses_past_its_size_and_reopens() {
        let gate = LookupGate::new(2);
        let a = gate.enter().await.unwrap();
        let _b = gate.enter().await.unwrap();
        let started = Instant::now();
        assert!(matches!(gate.enter().await, Err(Error::Busy)));
        assert!(started.elapsed() >= GATE_WAIT);
        drop(a);
        drop(gate.enter().await.unwrap());
    }

    #[test]
    fn report_slots_are_bounded_per_pool_and_per_source() {
        let slots = ReportSlots::new(2, 1);
        let a = slots
            .take(ip("192.0.2.1"), false)
            .expect("a free small slot");
        assert!(
            slots.take(ip("192.0.2.1"), false).is_none(),
            "one per source"
        );
        assert!(
            slots.take(ip("192.0.2.1"), true).is_none(),
            "in either pool"
        );
        let big = slots
            .take(ip("192.0.2.2"), true)
            .expect("the large pool is apart");
        assert!(
            slots.take(ip("192.0.2.3"), true).is_none(),
            "the large pool is full"
        );
        let b = slots
            .take(ip("2001:db8::1"), false)
            .expect("a second small slot");
        assert!(slots.take(ip("2001:db8::2"), false).is_none(), "same /64");
        assert!(
            slots.take(ip("192.0.2.4"), false).is_none(),
            "the small pool is full"
        );
        drop((a, big, b));
        assert!(slots.take(ip("192.0.2.1"), false).is_some(), "given back");
        assert!(slots.take(ip("192.0.2.3"), true).is_some(), "given back");
    }
}
