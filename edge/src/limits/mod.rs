//! Per-key rate limits and credits at the edge, with leases.
//!
//! One Durable Object per key name is the authority: it counts the key's fixed window
//! ([`metlo_shared::RateLimitWindow`]) and keeps its credit [`Balance`], so both are
//! exact across isolates and locations. So that most requests need no round trip, the
//! object hands an isolate a small *lease* — a few more requests of the window and
//! credits — that the isolate spends locally ([`Lease`]); what it grants counts as spent
//! at once, so the object never grants more than the limit or the balance. The isolate
//! gives the unused part back on its next call ([`Unused`]); rate tokens are worth
//! nothing past their window and credits nothing past a set or refill (they would be
//! counted twice), so those are dropped rather than given back. A lease grows with the
//! isolate's demand ([`next_want`], at most [`MAX_LEASE`]) and never beyond an eighth of
//! what is left, so a limit's last requests and a balance's last credits go one by one.
//!
//! This module holds the object's decision ([`Counter::serve`]), the isolate's
//! ([`Lease::spend`]), what they exchange (text, both ways) and the responses; the wasm
//! glue only moves them.

use metlo_shared::credits::{Balance, Grant};
use metlo_shared::{KeyRecord, RateLimit, RateLimitOutcome, RateLimitWindow};

use crate::decision::PlainResponse;

/// One counter a request must pass, in a Durable Object of its own: a key's (its limit
/// and credits), or an identity's (its credits, or one of its named limits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meter {
    /// The object's name: the key's name, or the identity's `externalId` after a byte no
    /// key name holds (`\u{1}`), and the limit's name after another.
    pub name: String,
    pub limit: Option<RateLimit>,
    pub credits: Option<Grant>,
    /// The key's own meter (its outcome makes the `RateLimit` headers).
    pub key: bool,
}

/// The meters of a request with `record`'s key, in the order they are spent: rate limits
/// before credits (a request a limit refuses spends no credit), the identity's credits
/// last. Empty for a key with no limit, no credits and no identity limits or credits.
pub fn meters(record: &KeyRecord) -> Vec<Meter> {
    let mut meters = Vec::new();
    if let Some(identity) = &record.identity {
        for named in &record.identity_limits.0 {
            meters.push(Meter {
                name: format!("\u{1}{identity}\u{1}{}", named.name),
                limit: Some(named.limit),
                credits: None,
                key: false,
            });
        }
    }
    if record.rate_limit.is_some() || record.credits.is_some() {
        meters.push(Meter {
            name: record.name.clone(),
            limit: record.rate_limit,
            credits: record.credits,
            key: true,
        });
    }
    if let (Some(identity), Some(grant)) = (&record.identity, record.identity_credits) {
        meters.push(Meter {
            name: format!("\u{1}{identity}"),
            limit: None,
            credits: Some(grant),
            key: false,
        });
    }
    meters
}

/// A lease serving this many requests is busy enough to be renewed ahead ([`Lease::wants_more`]).
pub const PREFETCH_AFTER: u32 = 8;
/// Renewed ahead once fewer than this many requests are left in it.
pub const PREFETCH_BELOW: u32 = 16;
/// How long before its window's (or its credits') end an isolate stops spending a lease on
/// its own: the object's clock, on another machine, may run that much ahead, and a token
/// spent after the object started a new window would count in none.
pub const CLOCK_MARGIN_MS: u64 = 50;
/// The most requests one lease covers besides the one that asked.
pub const MAX_LEASE: u32 = 64;
/// How long an isolate may spend leased credits (the unspent ones go back on its next ask).
pub const CREDIT_LEASE_MS: u64 = 10_000;

/// What an isolate asks its key's object: admit one request costing `cost` credits,
/// lease up to `want` more, and take back what is left of its previous lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask {
    pub limit: Option<RateLimit>,
    pub credits: Option<Grant>,
    pub cost: u64,
    pub want: u32,
    pub back: Unused,
}

/// What an isolate gives back: rate tokens of the window starting at `window_start`,
/// credits of the pool `pool` ([`Balance::pool`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Unused {
    pub window_start: u64,
    pub requests: u32,
    pub pool: (u64, u64),
    pub credits: u64,
}

/// The object's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Admitted: the lease covers `requests` requests (this one included) and `credits`
    /// credits (this one's cost included).
    Admitted(Lease),
    /// The window is spent: retry after `reset_seconds`.
    RateLimited(RateLimitOutcome),
    /// Not enough credits; `retry_after`: seconds until the next refill, if one comes.
    CreditsExhausted { retry_after: Option<u64> },
}

/// Where a spend came from: the lease's window (its start) and credit pool.
pub type Source = (u64, (u64, u64));

/// A lease as the isolate holds it (and the object sends it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Requests left (rate-limited keys; unlimited keys: `u32::MAX`).
    pub requests: u32,
    /// The window the requests belong to; they are worthless from `window_end` on.
    pub window_start: u64,
    pub window_end: u64,
    /// The object's remaining count after the grant (for `RateLimit` headers).
    pub window_remaining: u32,
    /// Credits left (metered keys; unmetered: `u64::MAX`), of `pool`, until `credits_end`.
    pub credits: u64,
    pub pool: (u64, u64),
    pub credits_end: u64,
    /// Requests served from this lease (sizes the next).
    pub used: u32,
}

/// The object's state: the window (with the limit it counts under) and the balance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counter {
    pub window: Option<(RateLimitWindow, RateLimit)>,
    pub balance: Balance,
}

impl Counter {
    /// Decides `ask` at `now_ms`: gives back the unused part, then admits (and leases)
    /// or refuses. A refusal takes nothing.
    pub fn serve(&mut self, ask: &Ask, now_ms: u64) -> Answer {
        let mut window = match (self.window, ask.limit) {
            (Some((w, under)), Some(limit)) if under == limit => w,
            _ => RateLimitWindow::default(),
        };
        if let Some(limit) = ask.limit {
            if window.start_ms == ask.back.window_start && window.start_ms != 0 {
                window.count = window.count.saturating_sub(ask.back.requests);
            }
            if now_ms >= window.start_ms.saturating_add(limit.period_ms())
                || now_ms < window.start_ms
                || window.count == 0
            {
                window = RateLimitWindow {
                    start_ms: now_ms,
                    count: 0,
                };
            }
        }
        if let Some(grant) = &ask.credits {
            self.balance.apply(grant, now_ms / 1000);
            if self.balance.pool() == ask.back.pool {
                self.balance.remaining = self.balance.remaining.saturating_add(ask.back.credits);
            }
        }
        // Rate first: a request refused by its limit spends no credit.
        let mut extra = ask.want.min(MAX_LEASE);
        let mut end = u64::MAX;
        if let Some(limit) = ask.limit {
            let left = limit.requests.saturating_sub(window.count);
            end = window.start_ms + limit.period_ms();
            if left == 0 {
                self.window = Some((window, limit));
                return Answer::RateLimited(RateLimitOutcome::new(
                    limit,
                    false,
                    window.count,
                    end - now_ms,
                ));
            }
            extra = extra.min((left - 1) / 8);
        }
        let mut credits_end = u64::MAX;
        let mut taken = u64::MAX;
        if let Some(grant) = &ask.credits {
            let remaining = self.balance.remaining;
            if remaining < ask.cost {
                // Nothing taken: the window keeps what was given back, not this request.
                if let Some(limit) = ask.limit {
                    self.window = Some((window, limit));
                }
                let refill = grant.refill.filter(|r| r.amount >= ask.cost);
                return Answer::CreditsExhausted {
                    retry_after: refill.map(|r| r.next(now_ms / 1000) - now_ms / 1000),
                };
            }
            let spare = (remaining - ask.cost) / 8;
            if let Some(covered) = spare.checked_div(ask.cost) {
                extra = extra.min(u32::try_from(covered).unwrap_or(u32::MAX));
            }
            taken = ask.cost + u64::from(extra) * ask.cost;
            self.balance.remaining -= taken;
            credits_end = now_ms + CREDIT_LEASE_MS;
            if let Some(refill) = grant.refill {
                credits_end = credits_end.min(refill.next(now_ms / 1000) * 1000);
            }
        }
        let mut window_remaining = u32::MAX;
        let mut requests = u32::MAX;
        if let Some(limit) = ask.limit {
            window.count += 1 + extra;
            window_remaining = limit.requests - window.count;
            requests = 1 + extra;
            self.window = Some((window, limit));
        }
        Answer::Admitted(Lease {
            requests,
            window_start: window.start_ms,
            window_end: end,
            window_remaining,
            credits: taken,
            pool: self.balance.pool(),
            credits_end,
            used: 0,
        })
    }

    /// Storage form: the window (`start:count:requests:period`, empty without one) and
    /// the balance ([`Balance::encode`]), joined by `|`.
    pub fn encode(&self) -> String {
        let window = self.window.map_or(String::new(), |(w, l)| {
            format!(
                "{}:{}:{}:{}",
                w.start_ms, w.count, l.requests, l.period_seconds
            )
        });
        format!("{window}|{}", self.balance.encode())
    }

    /// The stored state; what cannot be read starts afresh (a window written before
    /// credits, with no `|`, is still read).
    pub fn decode(stored: &str) -> Counter {
        let (window, balance) = stored.split_once('|').unwrap_or((stored, ""));
        let n: Option<Vec<u32>> = window.split(':').skip(2).map(|p| p.parse().ok()).collect();
        let mut parts = window.split(':').map(str::parse::<u64>);
        let window = match (parts.next(), parts.next(), n.as_deref()) {
            (Some(Ok(start_ms)), Some(Ok(count)), Some(&[requests, period])) => {
                RateLimit::new(requests, period).ok().map(|limit| {
                    let count = u32::try_from(count).unwrap_or(u32::MAX);
                    (RateLimitWindow { start_ms, count }, limit)
                })
            }
            _ => None,
        };
        Counter {
            window,
            balance: Balance::decode(balance),
        }
    }
}

impl Lease {
    /// Spends one request costing `cost` at `now_ms` if this lease still covers it (ending
    /// [`CLOCK_MARGIN_MS`] early); returns the `RateLimit` headers' remaining count.
    pub fn spend(&mut self, cost: u64, now_ms: u64) -> Option<u32> {
        let now = now_ms.saturating_add(CLOCK_MARGIN_MS);
        if self.requests == 0
            || now >= self.window_end
            || self.credits < cost
            || (self.credits != u64::MAX && now >= self.credits_end)
        {
            return None;
        }
        Some(self.take(cost))
    }

    /// Spends the request the object granted this lease for (counted there already, so
    /// whatever the clock says); the `RateLimit` headers' remaining count.
    pub fn take(&mut self, cost: u64) -> u32 {
        if self.requests != u32::MAX {
            self.requests = self.requests.saturating_sub(1);
        }
        if self.credits != u64::MAX {
            self.credits = self.credits.saturating_sub(cost);
        }
        self.used += 1;
        self.window_remaining.saturating_add(self.requests)
    }

    /// Should the isolate ask for the next lease now, while this one still serves? When a
    /// busy lease (used [`PREFETCH_AFTER`] times) has fewer than [`PREFETCH_BELOW`]
    /// requests, or credits for as many requests of `cost`, left: concurrent requests then
    /// keep spending locally instead of each asking the object once it runs out.
    pub fn wants_more(&self, cost: u64) -> bool {
        self.used >= PREFETCH_AFTER
            && (self.requests < PREFETCH_BELOW
                || (self.credits != u64::MAX
                    && self.credits < u64::from(PREFETCH_BELOW) * cost.max(1)))
    }

    /// The window and pool a spend from this lease now comes from.
    pub fn source(&self) -> Source {
        (self.window_start, self.pool)
    }

    /// Undoes one spend of `cost` from `source` (a later meter refused the request): only
    /// into the same window and pool — a newer one (this lease was replaced meanwhile)
    /// never lent that request or credit.
    pub fn refund(&mut self, cost: u64, source: Source) {
        if self.requests != u32::MAX && source.0 == self.window_start {
            self.requests += 1;
        }
        if self.credits != u64::MAX && source.1 == self.pool {
            self.credits += cost;
        }
        self.used = self.used.saturating_sub(1);
    }

    /// What can be given back at `now_ms` (nothing the object would drop anyway).
    pub fn unused(&self, now_ms: u64) -> Unused {
        let live = |left: bool| left && now_ms < self.window_end;
        Unused {
            window_start: self.window_start,
            requests: if live(self.requests != u32::MAX) {
                self.requests
            } else {
                0
            },
            pool: self.pool,
            // Unspent credits always go back (this isolate stopped spending them at
            // `credits_end`); the object takes them only into the pool they came from.
            credits: if self.credits != u64::MAX {
                self.credits
            } else {
                0
            },
        }
    }

    /// Another lease of the meter, lent under different terms (its record changed while
    /// both asks were in flight), takes this one's place — unless it is of an older credit
    /// pool (an answer arriving late): then it is dropped (false), as the object no longer
    /// lends from that pool. Credits of the same pool carry over (lent, spent nowhere);
    /// the displaced requests are given up (which only makes their window stricter).
    pub fn supersede(&mut self, other: Lease) -> bool {
        if other.pool < self.pool {
            return false;
        }
        let metered = self.credits != u64::MAX && other.credits != u64::MAX;
        let carried =
            (metered && other.pool == self.pool).then_some((self.credits, self.credits_end));
        *self = other;
        if let Some((credits, end)) = carried {
            self.credits = self.credits.saturating_add(credits);
            self.credits_end = self.credits_end.min(end);
        }
        true
    }

    /// Two leases of one key held at once (answers to concurrent asks): the later window's
    /// requests and pool's credits, summed when they are the same.
    pub fn merge(&mut self, other: Lease) {
        if other.window_start == self.window_start {
            self.requests = self.requests.saturating_add(other.requests);
        } else if other.window_start > self.window_start {
            self.requests = other.requests;
            self.window_start = other.window_start;
            self.window_end = other.window_end;
        }
        self.window_remaining = other.window_remaining;
        if other.pool == self.pool {
            self.credits = self.credits.saturating_add(other.credits);
            self.credits_end = self.credits_end.min(other.credits_end);
        } else if other.pool > self.pool {
            self.credits = other.credits;
            self.pool = other.pool;
            self.credits_end = other.credits_end;
        }
        self.used = self.used.max(other.used);
    }
}

/// The next lease's size from the last one's use: twice what was used, at most
/// [`MAX_LEASE`] — a key used once a minute asks for nothing extra.
pub fn next_want(used: u32) -> u32 {
    used.saturating_mul(2).min(MAX_LEASE)
}

/// The start of the object's URL ([`Ask::encode`]).
pub const LIMITER_URL: &str = "https://key-limiter/";

impl Ask {
    /// The object's URL with the ask in its path: numbers separated by `/`; 0 stands for
    /// "no limit" and "no credits" (a limit has at least 1 request, a grant's `set` is at
    /// least 1). The object needs no copy of the record, and a changed one applies at once.
    pub fn encode(&self) -> String {
        let (requests, period) = self
            .limit
            .map_or((0, 0), |l| (l.requests, l.period_seconds));
        let grant = self
            .credits
            .map_or("0/0/0/0/0/0".to_owned(), |g| g.encode());
        let b = &self.back;
        format!(
            "{LIMITER_URL}{requests}/{period}/{grant}/{}/{}/{}/{}/{}/{}/{}",
            self.cost, self.want, b.window_start, b.requests, b.pool.0, b.pool.1, b.credits
        )
    }

    /// The ask in an [`Ask::encode`]d URL; `None` for anything else.
    pub fn decode(url: &str) -> Option<Ask> {
        let parts: Vec<&str> = url.strip_prefix(LIMITER_URL)?.split('/').collect();
        let [requests, period, g0, g1, g2, g3, g4, g5, rest @ ..] = &parts[..] else {
            return None;
        };
        let n: Vec<u64> = [requests, period]
            .into_iter()
            .chain(rest)
            .map(|p| p.parse())
            .collect::<Result<_, _>>()
            .ok()?;
        let [requests, period, cost, want, ws, br, p0, p1, bc] = n[..] else {
            return None;
        };
        let u32_of = |v: u64| u32::try_from(v).ok();
        let limit = match (requests, period) {
            (0, 0) => None,
            (r, p) => Some(RateLimit::new(u32_of(r)?, u32_of(p)?).ok()?),
        };
        let grant = [*g0, g1, g2, g3, g4, g5].join("/");
        let credits = match grant.as_str() {
            "0/0/0/0/0/0" => None,
            text => Some(Grant::decode(text)?),
        };
        Some(Ask {
            limit,
            credits,
            cost,
            want: u32_of(want)?,
            back: Unused {
                window_start: ws,
                requests: u32_of(br)?,
                pool: (p0, p1),
                credits: bc,
            },
        })
    }
}

impl Answer {
    /// `A requests window_start window_end window_remaining credits pool.0 pool.1
    /// credits_end`, `R remaining reset_seconds` or `C retry_after` (`-`: none).
    pub fn encode(&self) -> String {
        match self {
            Answer::Admitted(l) => format!(
                "A {} {} {} {} {} {} {} {}",
                l.requests,
                l.window_start,
                l.window_end,
                l.window_remaining,
                l.credits,
                l.pool.0,
                l.pool.1,
                l.credits_end
            ),
            Answer::RateLimited(o) => format!("R {} {}", o.remaining, o.reset_seconds),
            Answer::CreditsExhausted { retry_after: None } => "C -".to_owned(),
            Answer::CreditsExhausted {
                retry_after: Some(s),
            } => format!("C {s}"),
        }
    }

    /// The answer in an object's body; `None` (the Worker fails closed) if garbled.
    pub fn decode(body: &str) -> Option<Answer> {
        let mut parts = body.split(' ');
        let kind = parts.next()?;
        let mut n = [0u64; 8];
        let mut len = 0;
        for part in parts {
            if len == n.len() {
                return None;
            }
            n[len] = match (kind, part) {
                ("C", "-") if len == 0 => u64::MAX,
                _ => part.parse().ok()?,
            };
            len += 1;
        }
        let u32_of = |v: u64| u32::try_from(v).ok();
        Some(match (kind, len) {
            ("A", 8) => Answer::Admitted(Lease {
                requests: u32_of(n[0])?,
                window_start: n[1],
                window_end: n[2],
                window_remaining: u32_of(n[3])?,
                credits: n[4],
                pool: (n[5], n[6]),
                credits_end: n[7],
                used: 0,
            }),
            ("R", 2) => Answer::RateLimited(RateLimitOutcome {
                allowed: false,
                remaining: u32_of(n[0])?,
                reset_seconds: n[1],
            }),
            ("C", 1) => Answer::CreditsExhausted {
                retry_after: (n[0] != u64::MAX).then_some(n[0]),
            },
            _ => return None,
        })
    }
}

/// 429 for a key past its limit: the origin is not called. The body is the control
/// plane's for the same case.
pub fn rate_limited_response(limit: RateLimit, outcome: RateLimitOutcome) -> PlainResponse {
    let mut headers = vec![
        ("Content-Type", "application/json".to_owned()),
        ("Retry-After", outcome.reset_seconds.to_string()),
    ];
    headers.extend(outcome.headers(limit));
    PlainResponse {
        status: 429,
        headers,
        body: r#"{"error":"rate_limited","message":"this key's rate limit is spent; retry after Retry-After seconds"}"#,
    }
}

/// 429 for a key whose credits cannot pay for the request: the origin is not called.
/// `Retry-After` until the next refill, when one comes.
pub fn credits_exhausted_response(retry_after: Option<u64>) -> PlainResponse {
    let mut headers = vec![("Content-Type", "application/json".to_owned())];
    if let Some(seconds) = retry_after {
        headers.push(("Retry-After", seconds.max(1).to_string()));
    }
    PlainResponse {
        status: 429,
        headers,
        body: r#"{"error":"credits_exhausted","message":"this key's credits are spent"}"#,
    }
}

#[cfg(test)]
mod tests;
