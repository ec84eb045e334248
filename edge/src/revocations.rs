//! The isolate's view of the control plane's revocation feed (`GET /api/v1/revocations`,
//! issue 29): which secrets were refused, or given a new record, in the feed's window. A
//! key found in the isolate cache or in KV is admitted only if this view is young enough
//! and does not say otherwise, so a revocation reaches every location within the feed's
//! interval instead of KV's propagation. Time is passed in: tested natively.
//!
//! Ages are measured on the Worker's clock from when a page was asked for, less how old
//! the control plane said its own read was (`ageMs`), so the control plane's clock is never
//! compared with the Worker's (a page shared through the Cache API carries the time another
//! machine of the same location asked for it: NTP-close).
//!
//! The feed also carries the route policy (issue 30): a page names it when the reader has
//! not seen its latest change (and always when it starts over), so a policy change reaches
//! every isolate within the same bound as a revocation.

use std::collections::HashMap;
use std::rc::Rc;

use metlo_shared::policy::RoutePolicy;
use metlo_shared::{KeyHash, KeyRecord};
/// One page of the feed (`seq`, `from`, `windowSeconds`, `events`, `more`, `ageMs`).
#[derive(Debug, PartialEq, Eq)]
pub struct Page<'a> {
    pub seq: u64,
    pub from: u64,
    pub window_seconds: u64,
    pub events: Vec<Event<'a>>,
    pub more: bool,
    pub age_ms: u64,
    /// The route policy: the event that carried it (0: none was ever set) and its text
    /// with `|` for line breaks.
    pub policy: Option<(u64, &'a str)>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Event<'a> {
    pub seq: u64,
    pub hash: &'a str,
    /// The record's compact JSON; `None`: refused. Read per event: a record this Worker
    /// cannot read refuses its secret, not the whole page.
    pub record: Option<&'a str>,
}

impl<'a> Page<'a> {
    /// Reads the page in the lines the glue makes of the control plane's JSON with the
    /// runtime's `JSON.parse` (a JSON parser in the bundle costs kilobytes): first
    /// `seq from windowSeconds ageMs more(0|1)`, then per event `seq hash record` (the
    /// record's JSON; nothing after the hash: refused), and a `P seq policy` line when the
    /// page carries the route policy. `None`: not a page.
    pub fn from_lines(text: &'a str) -> Option<Page<'a>> {
        let mut lines = text.split('\n');
        let mut head = lines.next()?.split(' ');
        let mut number = || head.next()?.parse::<u64>().ok();
        let (seq, from, window, age, more) =
            (number()?, number()?, number()?, number()?, number()?);
        let mut events = Vec::new();
        let mut policy = None;
        for line in lines.filter(|l| !l.is_empty()) {
            if let Some(rest) = line.strip_prefix("P ") {
                let (seq, text) = rest.split_once(' ')?;
                policy = Some((seq.parse().ok()?, text));
                continue;
            }
            let mut parts = line.splitn(3, ' ');
            let seq = parts.next()?.parse().ok()?;
            let hash = parts.next()?;
            let record = parts.next().filter(|r| !r.is_empty());
            events.push(Event { seq, hash, record });
        }
        Some(Page {
            seq,
            from,
            window_seconds: window,
            events,
            more: more == 1,
            age_ms: age,
            policy,
        })
    }
}

/// How the view stands against the interval, for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Younger than the interval: use it.
    Fresh,
    /// Between one and two intervals old: use it, and refresh after the response.
    RefreshAfter,
    /// Never loaded, or older than two intervals: refresh before deciding.
    RefreshNow,
}

/// What applying a page changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// The view started over (first load, or events were missed): every key this isolate
    /// cached may be stale.
    pub reset: bool,
    /// Secrets whose state the page changed: their isolate-cache entries are stale.
    pub changed: Vec<KeyHash>,
    /// The page was full: ask again, after [`FeedView::after`], before the view is current.
    pub more: bool,
    /// The view is current now (as of this page's read).
    pub current: bool,
    /// The page was behind the view (a lagging replica, or a feed that went back: a
    /// restored database): ignored, and the view is no younger.
    pub behind: bool,
}

/// The route policy as an isolate holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyState {
    Known(Rc<RoutePolicy>),
    /// Sent, but this Worker cannot read it (a newer grammar): every request is refused
    /// (503) until one it can read arrives — never a guess at what it allows.
    Unreadable,
}

impl PolicyState {
    /// Of two copies of the policy (the feed's view, KV's), the later: by version, one this
    /// Worker cannot read counting as the latest (it refuses, never guesses).
    pub fn later(self, other: Option<PolicyState>) -> PolicyState {
        let rank = |p: &PolicyState| match p {
            PolicyState::Known(p) => p.version,
            PolicyState::Unreadable => u64::MAX,
        };
        match other {
            Some(other) if rank(&other) > rank(&self) => other,
            _ => self,
        }
    }

    /// Reads a policy's text (`RoutePolicy::to_lines`, line breaks or `|`).
    pub fn read(text: &str) -> PolicyState {
        match RoutePolicy::from_lines(text) {
            Ok(policy) => PolicyState::Known(Rc::new(policy)),
            Err(_) => PolicyState::Unreadable,
        }
    }
}

/// Most secrets the view holds. The control plane's window bounds the events, this bounds
/// the isolate whatever it is sent: past it the view is not current (the failure mode
/// decides), never silently partial.
pub const MAX_HELD: usize = 200_000;

#[derive(Debug, Default)]
pub struct FeedView {
    /// The last event applied; `None` until the first page.
    seq: Option<u64>,
    /// Every event committed before this time (ms, this isolate's clock) is in the view.
    as_of_ms: Option<u64>,
    /// Each secret the window names: its new record, or `None` (refused), and when this
    /// isolate learned it (forgotten a window later, when KV has caught up).
    states: HashMap<KeyHash, (Option<KeyRecord>, u64)>,
    window_ms: u64,
    /// A page overflowed [`MAX_HELD`]: not current until a page fits.
    overflowed: bool,
    /// The route policy the feed last sent, and the event that carried it.
    policy: Option<(u64, PolicyState)>,
}

impl FeedView {
    pub fn new() -> Self {
        FeedView::default()
    }

    /// Every event committed before this time (ms, this isolate's clock) is in the view;
    /// `None` when it was never current.
    pub fn as_of_ms(&self) -> Option<u64> {
        self.as_of_ms
    }

    /// How old the view is at `now_ms`; `None` when it was never current.
    pub fn age_ms(&self, now_ms: u64) -> Option<u64> {
        self.as_of_ms.map(|t| now_ms.saturating_sub(t))
    }

    pub fn freshness(&self, now_ms: u64, interval_ms: u64) -> Freshness {
        match self.age_ms(now_ms) {
            Some(age) if age < interval_ms => Freshness::Fresh,
            Some(age) if age <= interval_ms.saturating_mul(2) => Freshness::RefreshAfter,
            _ => Freshness::RefreshNow,
        }
    }

    /// What the feed says of `hash`: `None`, nothing (KV's record stands);
    /// `Some(None)`, refused; `Some(Some(record))`, this record instead of KV's.
    pub fn state(&self, hash: &KeyHash) -> Option<Option<&KeyRecord>> {
        self.states.get(hash).map(|(record, _)| record.as_ref())
    }

    /// The number to ask after next; `None`: ask for the whole window.
    pub fn after(&self) -> Option<u64> {
        self.seq
    }

    /// The route policy the feed sent; `None`: no page has said yet.
    pub fn policy(&self) -> Option<&PolicyState> {
        self.policy.as_ref().map(|(_, p)| p)
    }

    /// Applies a page that was asked for at `asked_ms` (this isolate's clock); `now_ms`
    /// is when it arrived. Events already applied are skipped, so a page shared by
    /// several isolates (the whole window, from the Cache API) serves each of them.
    /// `keep_ms`: states are kept at least this long (KV's own staleness: a state
    /// forgotten sooner would let a stale KV record through), the feed's window if longer.
    pub fn apply(&mut self, page: Page, asked_ms: u64, now_ms: u64, keep_ms: u64) -> Applied {
        let mut applied = Applied {
            more: page.more,
            ..Applied::default()
        };
        self.window_ms = page.window_seconds.saturating_mul(1000).max(keep_ms);
        let start_over = match self.seq {
            None => true,
            // Events between ours and the page's first were missed (they left the
            // window before this isolate read them).
            Some(seq) => seq < page.from,
        };
        if start_over {
            // Not current until the new view is whole (its last page read).
            self.states.clear();
            self.as_of_ms = None;
            applied.reset = true;
        } else if page.seq < self.seq.unwrap_or(0) {
            // Behind what the view holds: a replica that has not read the latest events
            // yet, or a feed that went back. Dropping what the view knows could admit a
            // revoked key: ignored, and no younger.
            applied.behind = true;
            return applied;
        }
        if let Some((seq, text)) = page.policy {
            // A newer change, or any policy a whole window sends (a view starting over
            // takes what the control plane holds now, even if its number went back).
            if start_over || self.policy.as_ref().is_none_or(|(held, _)| seq > *held) {
                self.policy = Some((seq, PolicyState::read(text)));
            }
        }
        let after = if start_over { None } else { self.seq };
        for event in page
            .events
            .into_iter()
            .filter(|e| after.is_none_or(|a| e.seq > a))
        {
            let Ok(hash) = KeyHash::from_hex(event.hash) else {
                continue;
            };
            // A record this Worker cannot read (a newer version) refuses the secret:
            // never a guess at what it allows.
            let record = event
                .record
                .and_then(|json| KeyRecord::from_json(json.as_bytes()).ok());
            self.states.insert(hash, (record, now_ms));
            applied.changed.push(hash);
        }
        self.seq = Some(page.seq);
        self.forget_before(now_ms.saturating_sub(self.window_ms));
        self.overflowed = self.states.len() > MAX_HELD;
        if !page.more && !self.overflowed {
            let as_of = asked_ms.saturating_sub(page.age_ms);
            // Never younger than a page already applied said (pages may arrive out of
            // order when two refreshes overlap).
            self.as_of_ms = Some(self.as_of_ms.map_or(as_of, |t| t.max(as_of)));
            applied.current = true;
        }
        applied
    }

    fn forget_before(&mut self, before_ms: u64) {
        if self.window_ms > 0 {
            self.states.retain(|_, (_, learned)| *learned >= before_ms);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.states.len()
    }
}

/// What to do when the feed cannot be read (`REVOCATION_FEED_ON_FAILURE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// Keep admitting from the isolate cache and KV (logged; the staleness is shown in
    /// the decision header).
    Open,
    /// Refuse (503) once the view is older than the staleness bound.
    Closed,
}

/// Whether a request may be decided on a view of this age after a failed refresh
/// (`age`: `None` when the view was never current).
pub fn admit_on_failure(on_failure: OnFailure, age_ms: Option<u64>, max_staleness_ms: u64) -> bool {
    match on_failure {
        OnFailure::Open => true,
        OnFailure::Closed => age_ms.is_some_and(|age| age <= max_staleness_ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metlo_shared::ApiKey;

    fn hash() -> KeyHash {
        ApiKey::generate().unwrap().hash()
    }

    /// Applies with no minimum keep (the feed's window alone).
    fn apply(view: &mut FeedView, page: Page<'_>, asked_ms: u64, now_ms: u64) -> Applied {
        view.apply(page, asked_ms, now_ms, 0)
    }

    /// A page's lines, leaked so the borrowed page can outlive the helper.
    fn page(
        seq: u64,
        from: u64,
        events: &[(u64, KeyHash, Option<&str>)],
        more: bool,
    ) -> Page<'static> {
        let mut text = format!("{seq} {from} 120 0 {}", u8::from(more));
        for (seq, hash, record) in events {
            text.push_str(&format!(
                "\n{seq} {} {}",
                hash.to_hex(),
                record.unwrap_or("")
            ));
        }
        Page::from_lines(Box::leak(text.into_boxed_str())).expect("a page")
    }

    fn record_json(expires: u64) -> String {
        KeyRecord {
            expires: Some(expires),
            ..KeyRecord::sample()
        }
        .to_json()
    }

    #[test]
    fn a_view_is_fresh_for_one_interval_then_refreshed_after_then_before() {
        let mut view = FeedView::new();
        assert_eq!(
            view.freshness(0, 1000),
            Freshness::RefreshNow,
            "never loaded"
        );
        assert_eq!(view.age_ms(0), None);
        apply(&mut view, page(0, 0, &[], false), 10_000, 10_050);
        assert_eq!(view.freshness(10_999, 1000), Freshness::Fresh);
        assert_eq!(view.freshness(11_000, 1000), Freshness::RefreshAfter);
        assert_eq!(view.freshness(12_000, 1000), Freshness::RefreshAfter);
        assert_eq!(view.freshness(12_001, 1000), Freshness::RefreshNow);
    }

    #[test]
    fn the_age_counts_the_control_planes_own_read() {
        let mut view = FeedView::new();
        apply(
            &mut view,
            Page::from_lines("4 0 120 700 0").unwrap(),
            10_000,
            10_100,
        );
        assert_eq!(
            view.age_ms(10_100),
            Some(800),
            "asked at 10,000 for a read 700 ms old"
        );
    }

    #[test]
    fn events_carry_the_new_state_and_the_last_one_wins() {
        let (a, b) = (hash(), hash());
        let mut view = FeedView::new();
        let enabled = record_json(2_000_000_000);
        let applied = apply(
            &mut view,
            page(
                3,
                0,
                &[(1, a, None), (2, b, None), (3, a, Some(&enabled))],
                false,
            ),
            0,
            0,
        );
        assert!(applied.reset, "the first page starts the view");
        assert_eq!(applied.changed, vec![a, b, a]);
        assert_eq!(view.state(&b), Some(None), "refused");
        assert_eq!(
            view.state(&a).flatten().and_then(|r| r.expires),
            Some(2_000_000_000),
            "enabled again, with its record"
        );
        assert_eq!(view.state(&hash()), None, "not named: KV stands");
        assert_eq!(view.after(), Some(3));
    }

    #[test]
    fn a_shared_page_of_the_whole_window_applies_only_what_is_new() {
        let (a, b) = (hash(), hash());
        let mut view = FeedView::new();
        apply(&mut view, page(1, 0, &[(1, a, None)], false), 0, 0);
        // Enabled again, then the cached whole window (which still has event 1) comes.
        let enabled = record_json(2_000_000_000);
        apply(
            &mut view,
            page(2, 0, &[(2, a, Some(&enabled))], false),
            100,
            100,
        );
        let applied = apply(
            &mut view,
            page(
                3,
                0,
                &[(1, a, None), (2, a, Some(&enabled)), (3, b, None)],
                false,
            ),
            200,
            200,
        );
        assert!(!applied.reset);
        assert_eq!(
            applied.changed,
            vec![b],
            "events 1 and 2 were applied already"
        );
        assert!(
            view.state(&a).flatten().is_some(),
            "event 1 not applied again"
        );
        // An older copy changes nothing and does not make the view younger.
        let age = view.age_ms(300);
        let applied = apply(&mut view, page(2, 0, &[(1, a, None)], false), 250, 300);
        assert_eq!(
            applied,
            Applied {
                behind: true,
                ..Applied::default()
            },
            "a page behind the view is ignored (and the refresh is not a success)"
        );
        assert_eq!(view.age_ms(300), age);
    }

    #[test]
    fn missed_events_start_the_view_over() {
        let (a, b) = (hash(), hash());
        let mut view = FeedView::new();
        apply(&mut view, page(1, 0, &[(1, a, None)], false), 0, 0);
        // The page begins after 5: events 2–5 left the window unseen.
        let applied = apply(
            &mut view,
            page(7, 5, &[(6, b, None), (7, b, None)], false),
            10,
            10,
        );
        assert!(applied.reset, "the isolate cache must be cleared too");
        assert_eq!(view.state(&a), None, "what the view held is dropped");
        assert_eq!(view.state(&b), Some(None));
    }

    #[test]
    fn a_full_page_is_not_current_until_the_rest_is_read() {
        let a = hash();
        let mut view = FeedView::new();
        let applied = apply(&mut view, page(1, 0, &[(1, a, None)], true), 1000, 1000);
        assert!(applied.more);
        assert_eq!(view.age_ms(1000), None, "not current yet");
        assert_eq!(
            view.state(&a),
            Some(None),
            "but what it read counts already"
        );
        apply(&mut view, page(2, 0, &[(2, a, None)], false), 1100, 1100);
        assert_eq!(view.age_ms(1100), Some(0));
    }

    #[test]
    fn unreadable_records_refuse_their_secret_and_bad_hashes_are_skipped() {
        let a = hash();
        let mut view = FeedView::new();
        let newer = r#"{"v":99,"name":"n","for":"GENERIC","identifier":"i","created":"c"}"#;
        let text = format!("2 0 120 0 0\n1 zz \n2 {} {newer}", a.to_hex());
        apply(&mut view, Page::from_lines(&text).unwrap(), 0, 0);
        assert_eq!(
            view.state(&a),
            Some(None),
            "a version this Worker does not know"
        );
        for garbled in ["", "1 0 120 0", "1 0 -5 0 0", "1 0 120 0 0\nx y"] {
            assert!(
                Page::from_lines(garbled).is_none(),
                "{garbled:?} is a failure"
            );
        }
    }

    #[test]
    fn states_are_forgotten_a_window_after_they_were_learned() {
        let (a, b) = (hash(), hash());
        let mut view = FeedView::new();
        apply(&mut view, page(1, 0, &[(1, a, None)], false), 0, 0);
        apply(
            &mut view,
            page(2, 0, &[(2, b, None)], false),
            100_000,
            100_000,
        );
        apply(&mut view, page(2, 0, &[], false), 120_001, 120_001);
        assert_eq!(view.state(&a), None, "KV has caught up with it");
        assert_eq!(view.state(&b), Some(None));
    }

    #[test]
    fn starting_over_is_not_current_until_the_new_view_is_whole() {
        let (a, b) = (hash(), hash());
        let mut view = FeedView::new();
        apply(&mut view, page(1, 0, &[(1, a, None)], false), 0, 0);
        assert_eq!(view.age_ms(500), Some(500));
        // Events missed, and the new window comes in two pages.
        let applied = apply(&mut view, page(10, 5, &[(6, b, None)], true), 600, 600);
        assert!(applied.reset && !applied.current);
        assert_eq!(view.age_ms(700), None, "a half-read view is never fresh");
        let applied = apply(&mut view, page(12, 5, &[(12, a, None)], false), 800, 800);
        assert!(applied.current);
        assert_eq!(view.age_ms(900), Some(100));
    }

    #[test]
    fn states_are_kept_at_least_as_long_as_kv_may_be_stale() {
        let a = hash();
        let mut view = FeedView::new();
        view.apply(page(1, 0, &[(1, a, None)], false), 0, 0, 200_000);
        view.apply(page(1, 0, &[], false), 150_000, 150_000, 200_000);
        assert_eq!(
            view.state(&a),
            Some(None),
            "past the 120 s window, within KV's staleness"
        );
        view.apply(page(1, 0, &[], false), 200_001, 200_001, 200_000);
        assert_eq!(view.state(&a), None);
    }

    #[test]
    fn a_view_past_its_bound_is_current_again_once_it_fits() {
        let mut view = FeedView::new();
        let many: Vec<(u64, KeyHash, Option<&str>)> = (1..=MAX_HELD as u64 + 1)
            .map(|i| (i, hash(), None))
            .collect();
        let applied = apply(&mut view, page(many.len() as u64, 0, &many, false), 0, 0);
        assert!(
            !applied.current,
            "more secrets than a view holds: not current"
        );
        assert_eq!(view.age_ms(0), None);
        // A window later they are forgotten: the next page makes it current.
        let applied = apply(
            &mut view,
            page(many.len() as u64, 0, &[], false),
            120_001,
            120_001,
        );
        assert!(applied.current);
        assert_eq!(view.len(), 0);
    }

    #[test]
    fn the_failure_modes() {
        assert!(admit_on_failure(OnFailure::Open, None, 0));
        assert!(admit_on_failure(OnFailure::Closed, Some(5000), 5000));
        assert!(!admit_on_failure(OnFailure::Closed, Some(5001), 5000));
        assert!(
            !admit_on_failure(OnFailure::Closed, None, 5000),
            "never current: closed"
        );
    }

    fn policy_version(view: &FeedView) -> Option<u64> {
        match view.policy()? {
            PolicyState::Known(p) => Some(p.version),
            PolicyState::Unreadable => Some(u64::MAX),
        }
    }

    #[test]
    fn the_feed_carries_the_route_policy_newest_first() {
        let mut view = FeedView::new();
        assert_eq!(view.policy(), None, "nothing said yet");
        let first = "5 0 120 0 0\nP 4 1 deny|GET /v1/orders/* orders:read";
        apply(&mut view, Page::from_lines(first).unwrap(), 0, 0);
        assert_eq!(policy_version(&view), Some(1));
        let Some(PolicyState::Known(p)) = view.policy() else {
            panic!()
        };
        assert_eq!(p.rules.len(), 1);
        // An older change (a lagging replica's page) never replaces a newer one.
        let older = "6 0 120 0 0\nP 3 0 allow";
        apply(&mut view, Page::from_lines(older).unwrap(), 0, 0);
        assert_eq!(policy_version(&view), Some(1));
        // A page without one leaves it; a newer change replaces it.
        apply(&mut view, Page::from_lines("7 0 120 0 0").unwrap(), 0, 0);
        assert_eq!(policy_version(&view), Some(1));
        apply(
            &mut view,
            Page::from_lines("8 0 120 0 0\nP 8 2 allow").unwrap(),
            0,
            0,
        );
        assert_eq!(policy_version(&view), Some(2));
        // One this Worker cannot read is held as such (requests are refused), not dropped.
        apply(
            &mut view,
            Page::from_lines("9 0 120 0 0\nP 9 3 allow|GET /a a XOR b").unwrap(),
            0,
            0,
        );
        assert_eq!(view.policy(), Some(&PolicyState::Unreadable));
        // Starting over (events were missed) takes what the whole window says, even a
        // lower number (a database restored).
        apply(
            &mut view,
            Page::from_lines("30 20 120 0 0\nP 0 0 allow").unwrap(),
            0,
            0,
        );
        assert_eq!(policy_version(&view), Some(0));
        assert!(
            Page::from_lines("1 0 120 0 0\nP x 0 allow").is_none(),
            "unreadable page"
        );
    }
}
