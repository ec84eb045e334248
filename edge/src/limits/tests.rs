//! The leases' rules, natively: what the object grants, what an isolate spends, what
//! travels between them, and simulations of several isolates.

use super::*;

fn limit(requests: u32, period: u32) -> RateLimit {
    RateLimit::new(requests, period).unwrap()
}

fn grant(to: u64) -> Grant {
    Grant {
        set: 1,
        to,
        added: 0,
        refill: None,
    }
}

fn ask(limit: Option<RateLimit>, credits: Option<Grant>, want: u32, back: Unused) -> Ask {
    Ask {
        limit,
        credits,
        cost: 1,
        want,
        back,
    }
}

use metlo_shared::credits::{Interval, Refill};

#[test]
fn asks_and_answers_travel_as_text() {
    let refill = Refill::new(7, Interval::Monthly, Some(31), None).unwrap();
    let a = Ask {
        limit: Some(limit(100, 60)),
        credits: Some(Grant {
            set: 3,
            to: 10,
            added: 5,
            refill: Some(refill),
        }),
        cost: 2,
        want: 9,
        back: Unused {
            window_start: 5,
            requests: 2,
            pool: (3, 4),
            credits: 6,
        },
    };
    assert_eq!(Ask::decode(&a.encode()), Some(a));
    let plain = ask(None, None, 0, Unused::default());
    assert_eq!(Ask::decode(&plain.encode()), Some(plain));
    assert!(a
        .encode()
        .starts_with("https://key-limiter/100/60/3/10/5/2/7/31/2/9/"));
    for bad in [
        "",
        "1/2",
        "0/5/0/0/0/0/0/0/1/0/0/0/0/0/0",
        "1/1/1/1/1/9/1/1/1/1/1/1/1/1/1",
        "1/1/1/1/1/0/0/0/1/1/1/1/1/1/-1",
    ] {
        assert_eq!(Ask::decode(&format!("{LIMITER_URL}{bad}")), None, "{bad}");
    }
    assert_eq!(
        Ask::decode("https://other/0/0/0/0/0/0/0/0/1/0/0/0/0/0/0"),
        None
    );
    let mut counter = Counter::default();
    for answer in [
        counter.serve(&a, 1_000),
        Answer::RateLimited(RateLimitOutcome {
            allowed: false,
            remaining: 0,
            reset_seconds: 4,
        }),
        Answer::CreditsExhausted { retry_after: None },
        Answer::CreditsExhausted {
            retry_after: Some(30),
        },
    ] {
        assert_eq!(Answer::decode(&answer.encode()), Some(answer));
    }
    for bad in ["", "A 1", "R 1", "C", "C x", "X 1 2", "A 1 2 3 4 5 6 7 8 9"] {
        assert_eq!(Answer::decode(bad), None, "{bad}");
    }
    assert_eq!(Counter::decode(&counter.encode()), counter);
    // A window stored before credits.
    let old = Counter::decode("1000:2:100:60");
    assert_eq!(
        old.window,
        Some((
            RateLimitWindow {
                start_ms: 1000,
                count: 2
            },
            limit(100, 60)
        ))
    );
    assert_eq!(Counter::decode("garbage").window, None);
}

/// A tiny deterministic generator for the simulations.
fn lcg(seed: &mut u64) -> u64 {
    *seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    *seed >> 33
}

/// Isolates asking one object in random order, each spending its lease locally and
/// giving back the rest on its next ask.
struct Isolate {
    lease: Option<Lease>,
    used: u32,
}

/// Serves one request in isolate `i`: from its lease, or through the object.
fn request(
    isolates: &mut [Isolate],
    i: usize,
    counter: &mut Counter,
    limit: Option<RateLimit>,
    credits: Option<Grant>,
    now: u64,
) -> Option<u64> {
    let iso = &mut isolates[i];
    if let Some(lease) = iso.lease.as_mut() {
        if lease.spend(1, now).is_some() {
            return Some(lease.window_start);
        }
    }
    let back = iso.lease.take().map(|l| l.unused(now)).unwrap_or_default();
    let used = iso.used;
    match counter.serve(&ask(limit, credits, next_want(used), back), now) {
        Answer::Admitted(mut lease) => {
            assert!(
                lease.spend(1, now).is_some(),
                "a grant covers its own request"
            );
            iso.used = lease.requests.min(MAX_LEASE + 1);
            let start = lease.window_start;
            iso.lease = Some(lease);
            Some(start)
        }
        _ => {
            iso.used = 0;
            None
        }
    }
}

#[test]
fn leases_never_exceed_a_window() {
    for seed in 0..20u64 {
        let mut rng = seed;
        let l = limit(
            1 + (lcg(&mut rng) % 300) as u32,
            1 + (lcg(&mut rng) % 3) as u32,
        );
        let mut isolates: Vec<_> = (0..1 + lcg(&mut rng) % 6)
            .map(|_| Isolate {
                lease: None,
                used: 0,
            })
            .collect();
        let mut counter = Counter::default();
        let mut per_window = std::collections::BTreeMap::<u64, u32>::new();
        let mut now = 1_700_000_000_000u64;
        for _ in 0..10_000 {
            now += lcg(&mut rng) % 3; // ~1,000 a second: above every limit here
            let i = (lcg(&mut rng) % isolates.len() as u64) as usize;
            if let Some(start) = request(&mut isolates, i, &mut counter, Some(l), None, now) {
                *per_window.entry(start).or_default() += 1;
            }
        }
        assert!(per_window.len() > 1, "several windows");
        for (start, n) in &per_window {
            assert!(
                *n <= l.requests,
                "seed {seed}: {n} in window {start} > {l:?}"
            );
        }
        // Demand above the limit fills most of each full window.
        let busy = per_window
            .values()
            .filter(|n| **n * 2 >= l.requests)
            .count();
        assert!(busy * 2 >= per_window.len(), "seed {seed}: {per_window:?}");
    }
}

#[test]
fn leased_credits_are_spent_exactly_once_settled() {
    for seed in 0..20u64 {
        let mut rng = seed;
        let total = 1 + lcg(&mut rng) % 3_000;
        let credits = Some(grant(total));
        let l = (seed % 2 == 0).then(|| limit(1_000_000, 60));
        let mut isolates: Vec<_> = (0..1 + lcg(&mut rng) % 8)
            .map(|_| Isolate {
                lease: None,
                used: 0,
            })
            .collect();
        let mut counter = Counter::default();
        let mut admitted = 0;
        let now = 1_700_000_000_000u64;
        for _ in 0..(total * 2) {
            let i = (lcg(&mut rng) % isolates.len() as u64) as usize;
            admitted +=
                u64::from(request(&mut isolates, i, &mut counter, l, credits, now).is_some());
        }
        // Settle: each isolate asks until refused (giving its lease back first).
        for i in 0..isolates.len() {
            while request(&mut isolates, i, &mut counter, l, credits, now).is_some() {
                admitted += 1;
            }
        }
        for i in 0..isolates.len() {
            while request(&mut isolates, i, &mut counter, l, credits, now).is_some() {
                admitted += 1;
            }
        }
        assert_eq!(admitted, total, "seed {seed}");
        assert_eq!(counter.balance.remaining, 0);
    }
}

#[test]
fn credits_refuse_without_taking_and_name_the_refill() {
    let rule = Refill::new(5, Interval::Seconds, None, Some(60)).unwrap();
    let g = Grant {
        set: 1,
        to: 2,
        added: 0,
        refill: Some(rule),
    };
    let l = limit(10, 60);
    let mut c = Counter::default();
    let t = 1_700_000_000_000; // 20 s into a minute
    let mut costly = ask(Some(l), Some(g), 0, Unused::default());
    costly.cost = 3;
    assert_eq!(
        c.serve(&costly, t),
        Answer::CreditsExhausted {
            retry_after: Some(40)
        }
    );
    assert!(matches!(
        c.serve(&ask(Some(l), Some(g), 0, Unused::default()), t),
        Answer::Admitted(_)
    ));
    assert_eq!(
        c.window.unwrap().0.count,
        1,
        "the refused request was not counted"
    );
    assert_eq!(c.balance.remaining, 1);
    // A top-up (a record with more `added`) counts once, however often it is seen.
    let topped = Grant { added: 10, ..g };
    for _ in 0..3 {
        let _ = c.serve(&ask(Some(l), Some(topped), 0, Unused::default()), t);
    }
    assert_eq!(c.balance.remaining, 11 - 3);
    // The next refill sets the balance to its amount.
    let _ = c.serve(
        &ask(Some(l), Some(topped), 0, Unused::default()),
        t + 40_000,
    );
    assert_eq!(c.balance.remaining, 4);
    // A rule larger than any refill: no Retry-After.
    costly.cost = 6;
    assert_eq!(
        c.serve(&costly, t + 40_000),
        Answer::CreditsExhausted { retry_after: None }
    );
}

#[test]
fn leases_are_spent_locally_and_merged() {
    let mut c = Counter::default();
    let l = limit(1_000, 60);
    let t = 1_700_000_000_000;
    let Answer::Admitted(mut lease) =
        c.serve(&ask(Some(l), Some(grant(10_000)), 64, Unused::default()), t)
    else {
        panic!()
    };
    assert_eq!((lease.requests, lease.credits), (65, 65));
    assert_eq!(lease.spend(1, t), Some(935 + 64));
    assert_eq!(
        lease.spend(1, t + CREDIT_LEASE_MS),
        None,
        "credits past their lease"
    );
    assert_eq!(
        lease.spend(1, t + CREDIT_LEASE_MS - CLOCK_MARGIN_MS),
        None,
        "nor within the margin for another machine's clock"
    );
    assert!(lease
        .spend(1, t + CREDIT_LEASE_MS - CLOCK_MARGIN_MS - 1)
        .is_some());
    assert_eq!(
        lease.unused(t + CREDIT_LEASE_MS).credits,
        63,
        "unspent credits go back, however late"
    );
    assert_eq!(lease.unused(t).credits, 63);
    let Answer::Admitted(other) =
        c.serve(&ask(Some(l), Some(grant(10_000)), 2, Unused::default()), t)
    else {
        panic!()
    };
    lease.merge(other);
    assert_eq!((lease.requests, lease.credits), (63 + 3, 63 + 3));
    // An unlimited, unmetered lease covers everything.
    let mut free = Counter::default();
    let Answer::Admitted(mut all) = free.serve(&ask(None, None, 64, Unused::default()), t) else {
        panic!()
    };
    assert!(all.spend(1, t).is_some() && all.spend(1_000, t + 1).is_some());
    assert_eq!(next_want(0), 0);
    assert_eq!(next_want(3), 6);
    assert_eq!(next_want(1_000), MAX_LEASE);
}

#[test]
fn busy_leases_ask_ahead() {
    let mut c = Counter::default();
    let t = 1_700_000_000_000;
    let Answer::Admitted(mut lease) = c.serve(
        &ask(Some(limit(10_000, 60)), None, 64, Unused::default()),
        t,
    ) else {
        panic!()
    };
    lease.take(1);
    assert!(!lease.wants_more(1), "a fresh lease");
    while lease.requests >= PREFETCH_BELOW {
        lease.spend(1, t).unwrap();
    }
    assert!(lease.wants_more(1), "busy and running low: {lease:?}");
    // A renewal's lease (its own request unspent) merges in: nothing lost.
    let Answer::Admitted(more) = c.serve(
        &ask(Some(limit(10_000, 60)), None, 64, Unused::default()),
        t,
    ) else {
        panic!()
    };
    let before = lease.requests;
    lease.merge(more);
    assert_eq!(lease.requests, before + 65);
    assert_eq!(
        c.window.unwrap().0.count,
        65 + 65,
        "the object counted both leases whole"
    );
    // A quiet key never asks ahead.
    let mut quiet = Counter::default();
    let Answer::Admitted(mut one) =
        quiet.serve(&ask(None, Some(grant(100)), 0, Unused::default()), t)
    else {
        panic!()
    };
    one.take(1);
    assert!(!one.wants_more(1));
}

#[test]
fn meters_go_limits_first_identity_credits_last() {
    let plain = KeyRecord::sample();
    assert!(meters(&plain).is_empty(), "an unmetered key pays nothing");
    let record = KeyRecord {
        name: "k".into(),
        rate_limit: Some(limit(10, 1)),
        identity: Some("acme".into()),
        identity_credits: Some(grant(5)),
        identity_limits: metlo_shared::identity::NamedLimits::decode("a=1/1,b=2/2").unwrap(),
        ..KeyRecord::sample()
    };
    let names: Vec<_> = meters(&record)
        .into_iter()
        .map(|m| (m.name, m.key))
        .collect();
    assert_eq!(
        names,
        [
            ("\u{1}acme\u{1}a".to_owned(), false),
            ("\u{1}acme\u{1}b".to_owned(), false),
            ("k".to_owned(), true),
            ("\u{1}acme".to_owned(), false),
        ]
    );
    let mut lease =
        match Counter::default().serve(&ask(None, Some(grant(10)), 0, Unused::default()), 1) {
            Answer::Admitted(l) => l,
            other => panic!("{other:?}"),
        };
    let source = lease.source();
    lease.take(1);
    assert!(lease.spend(1, 1).is_none());
    lease.refund(1, source);
    assert!(lease.spend(1, 1).is_some(), "a refund can be spent again");
}

#[test]
fn a_refund_goes_only_into_the_window_and_pool_it_came_from() {
    let l = limit(4, 60);
    let lent = |counter: &mut Counter, now| match counter
        .serve(&ask(Some(l), Some(grant(100)), 4, Unused::default()), now)
    {
        Answer::Admitted(lease) => lease,
        other => panic!("{other:?}"),
    };
    let mut counter = Counter::default();
    let mut lease = lent(&mut counter, 1_000);
    let spent_from = lease.source();
    lease.take(1);
    // Another request replaced the lease with the next window's before this request's
    // later meter refused it.
    let next = lent(&mut counter, 61_000);
    assert!(next.window_start > lease.window_start);
    lease.merge(next);
    let before = lease;
    lease.refund(1, spent_from);
    assert_eq!(
        (lease.requests, lease.credits),
        (before.requests, before.credits + 1),
        "the request stays out of the new window; the credit (same pool) comes back"
    );
    // Into the same window and pool, both come back.
    let mut same = lent(&mut Counter::default(), 1_000);
    let source = same.source();
    let whole = same;
    same.take(1);
    same.refund(1, source);
    assert_eq!(
        (same.requests, same.credits),
        (whole.requests, whole.credits)
    );
}

#[test]
fn refusal_carries_retry_after_and_the_draft_headers() {
    let l = limit(5, 60);
    let o = RateLimitOutcome {
        allowed: false,
        remaining: 0,
        reset_seconds: 17,
    };
    let r = rate_limited_response(l, o);
    assert_eq!(r.status, 429);
    let get = |name: &str| {
        r.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(get("retry-after"), Some("17"));
    assert_eq!(get("ratelimit-policy"), Some(r#""key";q=5;w=60"#));
    assert_eq!(get("ratelimit"), Some(r#""key";r=0;t=17"#));
    assert!(r.body.contains("rate_limited"));
    let c = credits_exhausted_response(Some(0));
    assert_eq!((c.status, c.headers[1].1.as_str()), (429, "1"));
    assert!(c.body.contains("credits_exhausted"));
    assert_eq!(credits_exhausted_response(None).headers.len(), 1);
}

#[test]
fn a_lease_under_new_terms_keeps_its_pools_credits_and_a_late_older_one_is_dropped() {
    let lend = |counter: &mut Counter, limit: RateLimit, credits: Grant, now| match counter
        .serve(&ask(Some(limit), Some(credits), 64, Unused::default()), now)
    {
        Answer::Admitted(lease) => lease,
        other => panic!("{other:?}"),
    };
    // Two answers of one object, to asks under the key's old and new limit: the same pool.
    let mut counter = Counter::default();
    let mut held = lend(&mut counter, limit(1000, 60), grant(1000), 1_000);
    let answer = lend(&mut counter, limit(500, 60), grant(1000), 1_001);
    assert_eq!(held.pool, answer.pool);
    let (held_credits, answer_credits) = (held.credits, answer.credits);
    assert!(held_credits > 0 && answer_credits > 0);
    assert!(held.supersede(answer));
    assert_eq!(
        held.credits,
        held_credits + answer_credits,
        "the displaced lease's credits stay spendable"
    );
    // A new grant (set 2): its lease is not replaced by a late answer from the old pool.
    let newer = Grant {
        set: 2,
        ..grant(300)
    };
    let mut current = lend(&mut counter, limit(500, 60), newer, 1_002);
    let late = lend(&mut Counter::default(), limit(1000, 60), grant(1000), 1_000);
    assert!(late.pool < current.pool);
    let before = current;
    assert!(
        !current.supersede(late),
        "the older pool's answer is dropped"
    );
    assert_eq!(current, before);
}
