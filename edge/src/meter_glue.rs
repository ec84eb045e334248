//! Wasm glue for a request's meters ([`limits::meters`]): spends from this isolate's
//! leases, or asks the meter's Durable Object (one JS call) within the control-plane
//! timeout; keeps the leases it lends, renews busy ones ahead, and gives back what the
//! earlier meters spent when a later one refuses.

use std::cell::RefCell;
use std::time::Duration;

use futures_util::future::{select, Either};
use metlo_shared::{RateLimit, RateLimitOutcome};
use wasm_bindgen::prelude::wasm_bindgen;
use wasm_bindgen::JsValue;
use worker::wasm_bindgen_futures::JsFuture;
use worker::{Delay, Env};

use crate::config::Config;
use crate::decision::PlainResponse;
use crate::limits;
use crate::usage::Outcome;

thread_local! {
    // Leases of rate-limit requests and credits this isolate holds, by key name, with the
    // limit and grant they were lent under (`limits`).
    static LEASES: RefCell<std::collections::HashMap<String, Held>> = RefCell::new(Default::default());
}

/// What a lease was lent under: the key's limit and the `set` of its credit grant.
type LeaseTerms = (Option<RateLimit>, Option<u64>);

/// A lease this isolate holds for a meter.
struct Held {
    terms: LeaseTerms,
    lease: limits::Lease,
    /// When a renewal ahead was asked for (ms; 0: none in flight). One at a time; one
    /// older than [`RENEWAL_STALE_MS`] (its request cancelled) no longer counts.
    renewing_since: u64,
}

const RENEWAL_STALE_MS: u64 = 5_000;

// One ask of a key's Durable Object, its answer's text (or a throw for any other status).
// Called directly: the `worker` crate's stub builds its request through serde.
#[wasm_bindgen(inline_js = "export async function ask_limiter(env, name, url) { \
    const ns = env.KEY_LIMITER; const r = await ns.get(ns.idFromName(name)).fetch(url); \
    if (r.status !== 200) throw new Error('limiter answered ' + r.status); return r.text(); }")]
extern "C" {
    #[wasm_bindgen(catch)]
    fn ask_limiter(env: &JsValue, name: &str, url: &str) -> Result<js_sys::Promise, JsValue>;
}

/// Why [`spend`] did not admit.
pub(crate) enum Spent {
    /// Past the limit or out of credits: the 429 to send, and which.
    Refused(PlainResponse, Outcome),
    /// The object could not be asked (fails closed).
    Unavailable(String),
}

/// The most rate-limit leases an isolate holds; past it, such keys ask without a lease
/// (nothing held is ever dropped, and leases with credits are always kept: a dropped
/// lease's credits would be lost).
const MAX_LEASES: usize = 4096;

/// Spends one request costing `cost` on every meter of the key ([`limits::meters`]); if
/// one refuses, what the earlier ones spent goes back to this isolate's leases. Admitted:
/// the key's own outcome for the `RateLimit` headers (for a rate-limited key).
pub(crate) async fn spend_all(
    meters: &[limits::Meter],
    cost: u64,
    env: &Env,
    config: &Config,
) -> Result<Option<RateLimitOutcome>, Spent> {
    let mut outcome = None;
    let mut sources = Vec::with_capacity(meters.len());
    for meter in meters {
        match spend(meter, cost, env, config).await {
            Ok((o, source)) => {
                if meter.key {
                    outcome = Some(o);
                }
                sources.push(source);
            }
            Err(refused) => {
                for (done, source) in meters.iter().zip(sources) {
                    refund(done, cost, source);
                }
                return Err(refused);
            }
        }
    }
    Ok(outcome)
}

/// Spends one request costing `cost` of a meter: from this isolate's lease, or through
/// the meter's Durable Object (which gets back what is left of the lease and may lend a
/// new one), within the control-plane timeout. A busy lease running low is renewed ahead
/// by the request that notices (admitted already, it waits for the object; the others
/// go on spending what is left). Admitted: where the spend came from.
async fn spend(
    meter: &limits::Meter,
    cost: u64,
    env: &Env,
    config: &Config,
) -> Result<FromLease, Spent> {
    let now = now_ms();
    let (url, admitted_ahead) = match from_lease(meter, cost, now) {
        Ok((spent, None)) => return Ok(spent),
        Ok((spent, Some(ahead))) => (ahead.encode(), Some(spent)),
        Err(ask) => (ask.encode(), None),
    };
    let answer = ask_object(&meter.name, &url, env, config.control_plane_timeout_ms).await;
    match (admitted_ahead, answer) {
        // The renewal's lease, whole (the request the object counted with it is spent
        // later, here); refused or failed, nothing was taken.
        (Some(spent), answer) => {
            let lease = match answer.as_deref().map(limits::Answer::decode) {
                Ok(Some(limits::Answer::Admitted(lease))) => Some(lease),
                _ => None,
            };
            keep(meter, lease, true);
            Ok(spent)
        }
        (None, Ok(body)) => settle(meter, cost, now, &body),
        (None, Err(e)) => Err(Spent::Unavailable(e)),
    }
}

/// One ask of a meter's object, within `timeout_ms`: its answer's text.
async fn ask_object(name: &str, url: &str, env: &Env, timeout_ms: u64) -> Result<String, String> {
    let call = async {
        let text = JsFuture::from(ask_limiter(env.as_ref(), name, url)?).await?;
        text.as_string()
            .ok_or_else(|| JsValue::from_str("not text"))
    };
    let timeout = Delay::from(Duration::from_millis(timeout_ms));
    let raced = select(Box::pin(call), timeout).await;
    match raced {
        Either::Left((Ok(body), _)) => Ok(body),
        Either::Left((Err(e), _)) => Err(js_sys::Error::from(e)
            .message()
            .as_string()
            .unwrap_or_default()),
        Either::Right(_) => Err("limiter timed out".to_owned()),
    }
}

/// Keeps a lease the object lent (merged with one another request of the meter got
/// meanwhile); `renewed`: it answers this isolate's renewal ahead.
fn keep(meter: &limits::Meter, lease: Option<limits::Lease>, renewed: bool) {
    let terms = terms(meter);
    LEASES.with(|l| {
        let mut leases = l.borrow_mut();
        // A lease with credits is always kept (dropped, its credits would be lost; there
        // are at most as many as metered keys); the cap stops only rate-limit leases.
        let room = leases.len() < MAX_LEASES || lease.is_some_and(|l| l.credits != u64::MAX);
        match (leases.get_mut(&meter.name), lease) {
            (Some(held), lease) => {
                if renewed {
                    held.renewing_since = 0;
                }
                match lease {
                    Some(lease) if held.terms == terms => held.lease.merge(lease),
                    Some(lease) => {
                        if held.lease.supersede(lease) {
                            held.terms = terms;
                        }
                    }
                    None => {}
                }
            }
            (None, Some(lease)) if room => {
                leases.insert(
                    meter.name.clone(),
                    Held {
                        terms,
                        lease,
                        renewing_since: 0,
                    },
                );
            }
            (None, _) => {}
        }
    });
}

/// What a lease was lent under: the meter's limit and the `set` of its credit grant.
fn terms(meter: &limits::Meter) -> LeaseTerms {
    (meter.limit, meter.credits.map(|g| g.set))
}

/// The `RateLimit` outcome of a request admitted from `lease` with `remaining` left.
fn admitted(lease: &limits::Lease, remaining: u32, now: u64) -> RateLimitOutcome {
    RateLimitOutcome {
        allowed: true,
        remaining,
        reset_seconds: lease.window_end.saturating_sub(now).div_ceil(1000).max(1),
    }
}

/// A spend admitted: its `RateLimit` outcome and where it came from (see [`refund`]).
type FromLease = (RateLimitOutcome, limits::Source);

/// Spends from this isolate's lease of the meter (with the ask for a renewal ahead when it
/// is due); if it cannot, takes the lease out and returns the ask that gives its unused
/// part back.
fn from_lease(
    meter: &limits::Meter,
    cost: u64,
    now: u64,
) -> Result<(FromLease, Option<limits::Ask>), limits::Ask> {
    let terms = terms(meter);
    let ask = |want, back| limits::Ask {
        limit: meter.limit,
        credits: meter.credits,
        cost,
        want,
        back,
    };
    let held = LEASES.with(|l| {
        let mut leases = l.borrow_mut();
        let entry = leases.get_mut(&meter.name)?;
        if entry.terms == terms {
            let source = entry.lease.source();
            if let Some(remaining) = entry.lease.spend(cost, now) {
                let idle = now.saturating_sub(entry.renewing_since) > RENEWAL_STALE_MS;
                let ahead = (idle && entry.lease.wants_more(cost)).then(|| {
                    entry.renewing_since = now;
                    ask(
                        limits::next_want(entry.lease.used),
                        limits::Unused::default(),
                    )
                });
                let outcome = admitted(&entry.lease, remaining, now);
                return Some(Ok(((outcome, source), ahead)));
            }
        }
        leases.remove(&meter.name).map(|held| Err(held.lease))
    });
    match held {
        Some(Ok(spent)) => Ok(spent),
        Some(Err(lease)) => Err(ask(limits::next_want(lease.used), lease.unused(now))),
        None => Err(ask(0, limits::Unused::default())),
    }
}

/// Gives back one spend of `cost` from `source` to the meter's lease (if this isolate
/// still holds it: otherwise it stays counted, which only makes the meter stricter).
fn refund(meter: &limits::Meter, cost: u64, source: limits::Source) {
    LEASES.with(|l| {
        if let Some(held) = l.borrow_mut().get_mut(&meter.name) {
            if held.terms == terms(meter) {
                held.lease.refund(cost, source);
            }
        }
    });
}

/// The object's answer `body`: admitted (the new lease kept, merged with one another
/// request of the meter got meanwhile) or the refusal.
fn settle(meter: &limits::Meter, cost: u64, now: u64, body: &str) -> Result<FromLease, Spent> {
    let refused = |r, outcome| Err(Spent::Refused(r, outcome));
    match limits::Answer::decode(body) {
        Some(limits::Answer::Admitted(mut lease)) => {
            let remaining = lease.take(cost);
            let outcome = admitted(&lease, remaining, now);
            let source = lease.source();
            keep(meter, Some(lease), false);
            Ok((outcome, source))
        }
        Some(limits::Answer::RateLimited(outcome)) => match meter.limit {
            Some(limit) => refused(
                limits::rate_limited_response(limit, outcome),
                Outcome::RateLimited,
            ),
            None => Err(Spent::Unavailable(
                "rate limited without a limit".to_owned(),
            )),
        },
        Some(limits::Answer::CreditsExhausted { retry_after }) => refused(
            limits::credits_exhausted_response(retry_after),
            Outcome::CreditsExhausted,
        ),
        None => Err(Spent::Unavailable("garbled limiter answer".to_owned())),
    }
}

/// Milliseconds since the epoch, in one JS call (`Date.now()`).
fn now_ms() -> u64 {
    js_sys::Date::now() as u64
}
