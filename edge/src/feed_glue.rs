//! Wasm glue for the revocation feed: the isolate's [`FeedView`], kept current by reading
//! the control plane's feed — the whole window shared by every isolate of a location
//! through the Cache API for one interval — and consulted before a key from the isolate
//! cache or KV is admitted. What it decides is in [`crate::revocations`]; the reading
//! itself (JSON, `fetch` with its timeout, the Cache API) is a few lines of JS.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use metlo_shared::{KeyHash, KeyRecord};
use wasm_bindgen::prelude::wasm_bindgen;
use worker::wasm_bindgen_futures::JsFuture;
use worker::{console_error, Context, Delay, Env};

use crate::config::Config;
use crate::control_plane_glue::control_plane_key;
use crate::revocations::{
    admit_on_failure, Applied, FeedView, Freshness, Page, PolicyState, MAX_HELD,
};

thread_local! {
    static VIEW: RefCell<FeedView> = RefCell::new(FeedView::new());
    // When the refresh under way began (ms; 0: none). One at a time per isolate; others
    // wait on it. A start time, not a flag: a refresh whose request was cut off never
    // finishes (wasm futures are not dropped), so one past its deadline no longer counts.
    static REFRESHING: Cell<u64> = const { Cell::new(0) };
    // When the last refresh failed (ms; 0: it did not), and how many have in this isolate.
    static FAILED_AT: Cell<u64> = const { Cell::new(0) };
    static FAILURES: Cell<u64> = const { Cell::new(0) };
}

/// Most pages one refresh reads (each at most 10,000 events); past them the view is not
/// current, and the failure mode decides.
const MAX_PAGES: usize = 20;
/// Workers KV's propagation between locations, as Cloudflare documents it.
const KV_PROPAGATION_SECONDS: u64 = 60;

// One read of the feed, in JS (a JSON parser, `fetch` with a timeout and the Cache API
// cost the wasm nothing there): `asked\nlines` — when it was asked for (ms) and the page
// as `Page::from_lines` reads it —, or `!why`. `after` < 0: the whole window, first from
// the location's copy in the Cache API when that would make a view (`asOf`: the view's)
// younger and still fresh, else from the control plane, then shared for the others. (A
// shared copy's time is another machine's clock of the same location: NTP-close.) Cache
// API calls are bounded by the timeout too: a hung one is a miss.
#[wasm_bindgen(inline_js = "\
function lines(text) { \
  let p; try { p = JSON.parse(text); } catch (e) { return null; } \
  if (!p || !Array.isArray(p.events)) return null; \
  const out = [[p.seq, p.from, p.windowSeconds, p.ageMs, p.more ? 1 : 0].join(' ')]; \
  for (const e of p.events) { \
    if (!e || !Number.isSafeInteger(e.seq) || !/^[0-9a-f]{64}$/.test(e.hash)) return null; \
    out.push(e.seq + ' ' + e.hash + ' ' + (e.record == null ? '' : JSON.stringify(e.record))); } \
  const q = p.policy; \
  if (q) { if (!Number.isSafeInteger(q.seq) || typeof q.text !== 'string') return null; \
    out.push('P ' + q.seq + ' ' + q.text.replace(/\\n/g, '|')); } \
  return [out.join('\\n'), p.ageMs]; } \
function bounded(p, ms) { \
  return Promise.race([p.catch(() => null), new Promise((r) => setTimeout(r, ms, null))]); } \
export async function feed_read(base, key, after, timeoutMs, intervalMs, asOf, maxAge) { \
  const url = base + '/api/v1/revocations'; \
  try { \
    if (after < 0) { \
      const hit = await bounded(caches.default.match(url), timeoutMs); \
      if (hit) { \
        const asked = Number(hit.headers.get('x-metlo-asked-at')); \
        const shared = asked - Number(hit.headers.get('x-metlo-age-ms')); \
        if (Date.now() - shared < intervalMs && shared > asOf) return asked + '\\n' + await hit.text(); } } \
    const asked = Date.now(); \
    const r = await fetch(after < 0 ? url : url + '?after=' + after, { \
      headers: { authorization: 'Bearer ' + key }, redirect: 'manual', \
      signal: AbortSignal.timeout(timeoutMs) }); \
    if (r.status !== 200) return '!control plane answered ' + r.status; \
    const page = lines(await r.text()); \
    if (!page) return '!unreadable feed page'; \
    if (after < 0) await bounded(caches.default.put(url, new Response(page[0], { headers: { \
      'cache-control': 'max-age=' + maxAge, 'x-metlo-asked-at': String(asked), \
      'x-metlo-age-ms': String(page[1]) } })).catch((e) => \
      console.error('revocation feed not shared through the Cache API: ' + e)), timeoutMs); \
    return asked + '\\n' + page[0]; \
  } catch (e) { return '!control plane unreachable: ' + e; } }")]
extern "C" {
    fn feed_read(
        base: &str,
        key: &str,
        after: f64,
        timeout_ms: f64,
        interval_ms: f64,
        as_of: f64,
        max_age: u32,
    ) -> js_sys::Promise;
}

/// What the feed says of a key the isolate cache or KV has.
pub(crate) enum Consult {
    /// Their record stands.
    Stands,
    /// The feed gave the secret a new record: it replaces theirs.
    Record(KeyRecord),
    /// The feed refused the secret.
    Refused,
}

/// The feed cannot be read and the failure mode (`closed`) refuses.
pub(crate) struct Unavailable;

/// Makes the view fit to decide on: refreshed first when it is older than twice the
/// interval (or was never loaded), after the response when older than the interval.
/// `forget` drops what a refresh made stale from the isolate cache. `Ok(Some(age))`: the
/// feed could not be read and the request is decided on a view this old anyway (`open`,
/// or `closed` within its bound; never loaded: `u64::MAX`). Called after the request's
/// key was found; the caller keeps a control-plane answer in the isolate cache only then,
/// as a refresh may empty it.
pub(crate) async fn freshen(
    env: &Env,
    ctx: &Context,
    config: &Rc<Config>,
    forget: fn(&Applied),
) -> Result<Option<u64>, Unavailable> {
    let interval = config.revocation_feed_interval_ms;
    let now = now_ms();
    let mut stale_ms = None;
    match VIEW.with(|v| v.borrow().freshness(now, interval)) {
        Freshness::Fresh => {}
        Freshness::RefreshAfter => refresh_later(env, ctx, config, forget),
        Freshness::RefreshNow => {
            if refreshing(now, config) {
                wait_for_refresh(config).await;
            } else if FAILED_AT.get() > 0 {
                // Only the first request after a failure waits on the control plane; until
                // a refresh succeeds, the next tries are in the background, at most one an
                // interval.
                refresh_later(env, ctx, config, forget);
            } else {
                let _refreshing = Refreshing::start(now);
                let _ = refresh(env, config, forget).await;
            }
            let now = now_ms();
            if VIEW.with(|v| v.borrow().freshness(now, interval)) == Freshness::RefreshNow {
                let age = VIEW.with(|v| v.borrow().age_ms(now));
                if !admit_on_failure(
                    config.revocation_feed_on_failure,
                    age,
                    config.revocation_feed_max_staleness_ms,
                ) {
                    return Err(Unavailable);
                }
                stale_ms = Some(age.unwrap_or(u64::MAX));
            }
        }
    }
    Ok(stale_ms)
}

/// What the view (made fit by [`freshen`]) says of `hash`.
pub(crate) fn consult(hash: &KeyHash) -> Consult {
    VIEW.with(|v| match v.borrow().state(hash) {
        None => Consult::Stands,
        Some(None) => Consult::Refused,
        Some(Some(record)) => Consult::Record(record.clone()),
    })
}

fn recently_failed(now: u64, interval: u64) -> bool {
    let failed = FAILED_AT.get();
    failed > 0 && now.saturating_sub(failed) < interval
}

/// A refresh after the response (`waitUntil`), unless one is under way or the last one
/// failed less than an interval ago.
fn refresh_later(env: &Env, ctx: &Context, config: &Rc<Config>, forget: fn(&Applied)) {
    let now = now_ms();
    if refreshing(now, config) || recently_failed(now, config.revocation_feed_interval_ms) {
        return;
    }
    // Taken now, so the requests before the task runs do not start their own; given back
    // when the task ends.
    let refreshing = Refreshing::start(now);
    let (env, config) = (env.clone(), config.clone());
    ctx.wait_until(async move {
        let _refreshing = refreshing;
        let _ = refresh(&env, &config, forget).await;
    });
}

/// How long one refresh may take, all its pages included: past it, it fails, and no
/// request waits on it any more.
fn refresh_deadline_ms(config: &Config) -> u64 {
    config.control_plane_timeout_ms.saturating_mul(2)
}

/// Whether a refresh is under way (begun, and not past its deadline).
fn refreshing(now: u64, config: &Config) -> bool {
    let began = REFRESHING.get();
    began > 0 && now.saturating_sub(began) < refresh_deadline_ms(config)
}

/// Waits for the refresh another request started (at most until its deadline).
async fn wait_for_refresh(config: &Config) {
    while refreshing(now_ms(), config) {
        Delay::from(Duration::from_millis(5)).await;
    }
}

/// Marks a refresh under way ([`REFRESHING`]); given back when it ends, unless a later
/// refresh took the mark meanwhile.
struct Refreshing(u64);

impl Refreshing {
    fn start(now: u64) -> Self {
        let began = now.max(1);
        REFRESHING.set(began);
        Refreshing(began)
    }
}

impl Drop for Refreshing {
    fn drop(&mut self) {
        if REFRESHING.get() == self.0 {
            REFRESHING.set(0);
        }
    }
}

/// Brings the view up to date; a failure is logged, counted and remembered.
/// (The caller holds [`Refreshing`].)
async fn refresh(env: &Env, config: &Config, forget: fn(&Applied)) -> Result<(), String> {
    let result = read_pages(env, config, forget).await;
    match &result {
        Ok(()) => FAILED_AT.set(0),
        Err(why) => {
            let now = now_ms();
            FAILED_AT.set(now.max(1));
            FAILURES.set(FAILURES.get() + 1);
            let age = VIEW.with(|v| v.borrow().age_ms(now));
            console_error!(
                "revocation feed not read ({} failures in this isolate; view {} ms old): {why}",
                FAILURES.get(),
                age.map_or_else(|| "never".to_owned(), |a| a.to_string())
            );
        }
    }
    result
}

async fn read_pages(env: &Env, config: &Config, forget: fn(&Applied)) -> Result<(), String> {
    let key = control_plane_key(env).ok_or("the CONTROL_PLANE_KEY secret is not set")?;
    // A copy in the Cache API is kept a little past its use (never used past the interval).
    let max_age = (config.revocation_feed_interval_ms / 1000 + 2) as u32;
    // What the view must remember at least: as long as KV may serve a stale record (its
    // read cache, its propagation between locations, this isolate's cache).
    let keep_ms = config
        .kv_cache_ttl_seconds
        .saturating_add(KV_PROPAGATION_SECONDS)
        .saturating_mul(1000)
        .saturating_add(config.isolate_hit_ms);
    let deadline = now_ms().saturating_add(refresh_deadline_ms(config));
    let mut after = -1.0;
    for _ in 0..MAX_PAGES {
        if now_ms() >= deadline {
            return Err("the feed took longer than its deadline".into());
        }
        let as_of = VIEW
            .with(|v| v.borrow().as_of_ms())
            .map_or(-1.0, |t| t as f64);
        let read = feed_read(
            &config.control_plane_url,
            &key,
            after,
            config.control_plane_timeout_ms as f64,
            config.revocation_feed_interval_ms as f64,
            as_of,
            max_age,
        );
        let text = JsFuture::from(read).await.ok().and_then(|v| v.as_string());
        let text = text.ok_or("the feed's reader failed")?;
        if let Some(why) = text.strip_prefix('!') {
            return Err(why.to_owned());
        }
        let (asked, lines) = text.split_once('\n').ok_or("unreadable feed page")?;
        let page = asked
            .parse()
            .ok()
            .zip(Page::from_lines(lines))
            .ok_or("unreadable feed page")?;
        let applied = VIEW.with(|v| v.borrow_mut().apply(page.1, page.0, now_ms(), keep_ms));
        forget(&applied);
        if applied.behind {
            return Err(
                "the feed is behind this view (a replica lagging, or a database restored)".into(),
            );
        }
        if !applied.more {
            return if applied.current {
                Ok(())
            } else {
                Err(format!("more than {MAX_HELD} secrets in the feed's window"))
            };
        }
        after = VIEW.with(|v| v.borrow().after()).unwrap_or(0) as f64;
    }
    Err(format!("the feed has more than {MAX_PAGES} pages"))
}

/// The route policy the feed last sent this isolate; `None`: none yet (never read).
pub(crate) fn policy() -> Option<PolicyState> {
    VIEW.with(|v| v.borrow().policy().cloned())
}

/// How many refreshes failed in this isolate (shown with a stale decision).
pub(crate) fn failures() -> u64 {
    FAILURES.get()
}

fn now_ms() -> u64 {
    js_sys::Date::now() as u64
}
