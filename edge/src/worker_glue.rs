//! The `fetch` handler: reads the request, calls KV (and, through `control_plane_glue`,
//! the control plane), and builds responses, following the decisions made in
//! [`crate::decision`].

use std::cell::RefCell;

use metlo_shared::{KeyHash, KeyRecord};
use wasm_bindgen::prelude::wasm_bindgen;
use wasm_bindgen::{JsCast, JsValue};
use worker::wasm_bindgen_futures::{self, JsFuture};
use worker::{console_error, Context, Env, Headers};

use crate::assertion::ASSERTION_HEADER;
use crate::assertion_glue;
use crate::config::Config;
use crate::control_plane_glue::{ask_control_plane, new_request, record_use};
use crate::decision::{self, Lookup, PlainResponse, Refusal};
use crate::feed_glue::{self, Consult, Unavailable};
use crate::isolate_cache::{Entry, IsolateCache};
use crate::limits;
use crate::meter_glue::{spend_all, Spent};
use crate::policy;
use crate::policy_glue;
use crate::revocations::Applied;
use crate::usage::Outcome;

thread_local! {
    // One isolate runs one request at a time on one thread; these live as long as it.
    static ISOLATE_CACHE: RefCell<Option<IsolateCache>> = const { RefCell::new(None) };
    // `[vars]` are fixed for an isolate's life: parse them once, not per request (each
    // read crosses the wasm/JS boundary).
    static CONFIG: RefCell<Option<std::rc::Rc<Config>>> = const { RefCell::new(None) };
    // A refusal's body and init (status, headers) are the same every time: made once per
    // isolate, so each refused request costs one JS call to answer.
    static REFUSALS: RefCell<Vec<((Refusal, &'static str), (JsValue, web_sys::ResponseInit))>> = const { RefCell::new(Vec::new()) };
    // Control-plane lookups this isolate has in flight.
    static LOOKUPS_IN_FLIGHT: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

fn config(env: &Env) -> Result<std::rc::Rc<Config>, crate::config::ConfigError> {
    if let Some(c) = CONFIG.with(|c| c.borrow().clone()) {
        return Ok(c);
    }
    let parsed = std::rc::Rc::new(Config::from_vars(|name| match name {
        // Secrets, never `[vars]` (which anyone with dashboard access reads).
        "ORIGIN_SECRET" | "ASSERTION_SIGNING_KEY" => env.secret(name).ok().map(|v| v.to_string()),
        _ => env.var(name).ok().map(|v| v.to_string()),
    })?);
    CONFIG.with(|c| *c.borrow_mut() = Some(parsed.clone()));
    Ok(parsed)
}

/// Where a decision came from, for the optional `X-Metlo-Edge-Source` diagnostics.
#[derive(Clone, Copy)]
enum Source {
    None,
    Isolate,
    Kv,
    ControlPlane,
    /// The revocation feed (a refusal it decided).
    Feed,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::None => "none",
            Source::Isolate => "isolate",
            Source::Kv => "kv",
            Source::ControlPlane => "control-plane",
            Source::Feed => "feed",
        }
    }
}

#[wasm_bindgen]
extern "C" {
    /// The runtime's `fetch`, called directly: `worker::Fetch` adds a `RequestInit` per
    /// call and rebuilds the response it gets.
    #[wasm_bindgen(js_name = fetch)]
    fn global_fetch(request: &web_sys::Request) -> js_sys::Promise;

    /// `new Response(body, init)` with a body already in JS (web_sys's constructors take
    /// a Rust string and copy it across each time).
    #[wasm_bindgen(js_name = Response)]
    type NewResponse;
    #[wasm_bindgen(constructor, js_class = "Response", catch)]
    fn new(body: &JsValue, init: &web_sys::ResponseInit) -> Result<NewResponse, JsValue>;
}

// `METHOD URL`, then a line with the methods the client's override headers name
// (policy::METHOD_OVERRIDE_HEADERS, comma-separated) if it sent any: one JS call (a URL
// holds no space or line break).
#[wasm_bindgen(inline_js = "export function request_line(r) { const h = r.headers; \
    const o = [h.get('x-http-method-override'), h.get('x-http-method'), \
      h.get('x-method-override')].filter((x) => x !== null); \
    return r.method + ' ' + r.url + (o.length ? '\\n' + o.join(',') : ''); }")]
extern "C" {
    fn request_line(request: &web_sys::Request) -> String;
}

// The request's `Authorization` in one JS call (web_sys takes two, and copies the header's
// name across each time): every request needs it, refused ones most of all.
#[wasm_bindgen(
    inline_js = "export function authorization(r) { return r.headers.get('Authorization'); }"
)]
extern "C" {
    fn authorization(request: &web_sys::Request) -> Option<String>;
}

// A KV write with the record's digest in its metadata, as the control plane writes it (a
// reconcile then sees the entry as current without reading it). Called directly: the
// `worker` crate's put builder goes through serde for its options (+2.7 KB gzip).
#[wasm_bindgen(inline_js = "export function kv_put(env, key, value, ttl, d) { \
    return env.KEYS.put(key, value, { expirationTtl: ttl, metadata: { d } }); }")]
extern "C" {
    #[wasm_bindgen(catch)]
    fn kv_put(
        env: &JsValue,
        key: &str,
        value: &str,
        ttl: u32,
        digest: &str,
    ) -> Result<js_sys::Promise, JsValue>;
}

#[inline(never)]
fn new_response(
    body: &JsValue,
    init: &web_sys::ResponseInit,
) -> Result<web_sys::Response, JsValue> {
    NewResponse::new(body, init).map(JsCast::unchecked_into)
}

/// The Worker's `fetch` handler, exported by hand rather than by `#[event(fetch)]`: what
/// is decided without I/O (no key, a malformed one, one this isolate knows is unknown)
/// is answered synchronously — no future, no promise, no conversion of the request —
/// and everything else returns a promise of the response.
#[wasm_bindgen]
pub fn fetch(req: web_sys::Request, env: Env, ctx: worker::worker_sys::Context) -> JsValue {
    let config = match config(&env) {
        Ok(c) => c,
        Err(e) => {
            console_error!("edge misconfigured: {e}");
            return respond(plain(
                decision::refusal_response(Refusal::Unavailable, 30),
                false,
                Source::None,
            ));
        }
    };
    let header = authorization(&req);
    let hash = match decision::check_header(header.as_deref()) {
        Ok(hash) => hash,
        Err(refusal) => return respond(refuse(refusal, &config, Source::None)),
    };
    let cached = match with_cache(&config, |c| c.get(&hash, now_ms())) {
        Some(Entry::Unknown) => return respond(refuse(Refusal::Invalid, &config, Source::Isolate)),
        Some(Entry::Valid(record)) => Some(record),
        None => None,
    };
    let ctx = Context::new(ctx);
    wasm_bindgen_futures::future_to_promise(async move {
        Ok(respond(
            handle(req, hash, cached, &env, &ctx, &config).await,
        ))
    })
    .into()
}

/// The response as the runtime takes it; an error (a JS call that threw) is a 500.
fn respond(response: worker::Result<web_sys::Response>) -> JsValue {
    match response {
        Ok(r) => r.into(),
        Err(e) => {
            console_error!("{e}");
            let init = web_sys::ResponseInit::new();
            init.set_status(500);
            web_sys::Response::new_with_opt_str_and_init(Some("internal error"), &init)
                .map_or_else(|e| e, JsValue::from)
        }
    }
}

/// Steps 2–7 for a well-formed key (`cached`: what the isolate cache had).
async fn handle(
    req: web_sys::Request,
    hash: KeyHash,
    cached: Option<KeyRecord>,
    env: &Env,
    ctx: &Context,
    config: &std::rc::Rc<Config>,
) -> worker::Result<web_sys::Response> {
    let found = match cached {
        Some(record) => Ok((record, Source::Isolate, None)),
        None => find(&hash, &req, env, config).await,
    };
    let (mut record, source, keep_ms) = match found {
        Ok(found) => found,
        Err((refusal, source)) => return refuse(refusal, config, source),
    };
    // The feed's view, fit to decide on (it also carries the route policy).
    let feed = config.revocation_feed_interval_ms > 0;
    let mut stale_ms = None;
    if feed {
        match feed_glue::freshen(env, ctx, config, forget).await {
            Ok(age) => stale_ms = age,
            Err(Unavailable) => return refuse(Refusal::Unavailable, config, Source::Feed),
        }
    }
    // The control plane's answer is kept in the isolate after the refresh (which may have
    // emptied the isolate cache).
    if let Some(keep_ms) = keep_ms {
        with_cache(config, |c| {
            c.put_for(hash, Entry::Valid(record.clone()), now_ms(), keep_ms)
        });
    }
    // What the isolate cache and KV hold may be older than a revocation: the feed says.
    // (The control plane's own answer is current.)
    if feed && !matches!(source, Source::ControlPlane) {
        match feed_glue::consult(&hash) {
            Consult::Stands => {}
            Consult::Record(newer) => record = newer,
            Consult::Refused => {
                record_use(hash, now_ms(), Some(Outcome::Disabled), env, ctx, config);
                return refuse(Refusal::Invalid, config, Source::Feed);
            }
        }
    }
    let now = now_ms();
    if let Err(refusal) = decision::admit(&record, now / 1000) {
        if record.is_expired(now / 1000) {
            record_use(hash, now, Some(Outcome::Expired), env, ctx, config);
        }
        return refuse(refusal, config, source);
    }
    // The route policy, before anything is counted or forwarded.
    // Method, URL and any method-override headers, in one JS call.
    let line = request_line(&req);
    let (request, overrides) = match line.split_once('\n') {
        Some((request, overrides)) => (request, Some(overrides)),
        None => (line.as_str(), None),
    };
    let (method, url) = request.split_once(' ').unwrap_or((request, ""));
    let (target, cost) = match policy_glue::route_policy(env, config, stale_ms.is_some()).await {
        Err(()) => return refuse(Refusal::Unavailable, config, source),
        Ok(policy) => {
            let decided =
                policy::authorize(policy.as_ref(), method, overrides, url, &record.permissions);
            match decided {
                Ok(admitted) => admitted,
                Err(refusal) => {
                    if let policy::PolicyRefusal::Forbidden(_) = refusal {
                        record_use(hash, now, Some(Outcome::Forbidden), env, ctx, config);
                    }
                    return plain(
                        policy::refusal_response(&refusal),
                        config.decision_header,
                        source,
                    );
                }
            }
        }
    };
    // The signed assertion: from this isolate's cache, or signed now (then kept for half
    // its lifetime). A configured key that cannot sign fails closed: the origin expects it.
    let assertion = match &config.assertion {
        None => None,
        Some(settings) => {
            match assertion_glue::assertion_for(&hash, &record, settings, config).await {
                Ok(token) => Some(token),
                Err(e) => {
                    console_error!("assertion not signed: {e}");
                    return refuse(Refusal::Unavailable, config, source);
                }
            }
        }
    };
    // Keys without a limit or credits pay nothing here: no I/O, no allocation. The
    // others spend from this isolate's lease, asking their object only when it is spent.
    let meters = limits::meters(&record);
    let limited = if meters.is_empty() {
        None
    } else {
        match spend_all(&meters, cost, env, config).await {
            Ok(outcome) => record.rate_limit.zip(outcome),
            Err(Spent::Refused(response, outcome)) => {
                record_use(hash, now, Some(outcome), env, ctx, config);
                return plain(response, config.decision_header, source);
            }
            Err(Spent::Unavailable(e)) => {
                // Fail closed: an uncounted request is not let through.
                console_error!("rate limit or credits not counted: {e}");
                return refuse(Refusal::Unavailable, config, source);
            }
        }
    };
    record_use(hash, now, None, env, ctx, config);
    match proxy(
        req,
        method,
        url,
        target,
        assertion.as_deref(),
        &record,
        config,
        source,
    )
    .await
    {
        Ok(response) => {
            let mut extra = match limited {
                None => vec![],
                Some((limit, outcome)) => outcome.headers(limit).to_vec(),
            };
            // Admitted on a view of the feed older than its interval because the feed
            // could not be read (`open`): how old, for whoever debugs it.
            if let (Some(age), true) = (stale_ms, config.decision_header) {
                let age = if age == u64::MAX {
                    "never".to_owned()
                } else {
                    age.to_string()
                };
                extra.push((FEED_STALE_HEADER, age));
                extra.push(("X-Metlo-Feed-Failures", feed_glue::failures().to_string()));
            }
            if extra.is_empty() {
                Ok(response)
            } else {
                with_headers(response, &extra)
            }
        }
        Err(e) => {
            console_error!("origin unreachable: {e}");
            refuse(Refusal::OriginUnreachable, config, source)
        }
    }
}

/// The response header (with `DECISION_HEADER`) that says a request was admitted on a view
/// of the revocation feed older than its interval, and how old (ms; never loaded: the
/// largest number).
const FEED_STALE_HEADER: &str = "X-Metlo-Feed-Stale-Ms";

/// Drops from the isolate cache what a refresh of the feed made stale.
#[inline(never)]
fn forget(applied: &Applied) {
    ISOLATE_CACHE.with(|cell| {
        if let Some(cache) = cell.borrow_mut().as_mut() {
            if applied.reset {
                cache.clear();
            } else {
                for hash in &applied.changed {
                    cache.remove(hash);
                }
            }
        }
    });
}

/// Steps 3–4, for a key the isolate cache does not know: KV, then the control plane (with
/// how long the isolate may keep its answer, ms).
async fn find(
    hash: &KeyHash,
    req: &web_sys::Request,
    env: &Env,
    config: &Config,
) -> Result<(KeyRecord, Source, Option<u64>), (Refusal, Source)> {
    let now_ms = now_ms();
    let hex = hash.to_hex();
    let kv = env.kv("KEYS").map_err(|e| {
        console_error!("KV binding KEYS missing: {e}");
        (Refusal::Unavailable, Source::None)
    })?;
    match kv
        .get(&hex)
        .cache_ttl(config.kv_cache_ttl_seconds)
        .text()
        .await
    {
        Ok(Some(value)) => {
            if let Some(record) = decision::decode_kv(&value) {
                with_cache(config, |c| {
                    c.put(*hash, Entry::Valid(record.clone()), now_ms)
                });
                return Ok((record, Source::Kv, None));
            }
        }
        Ok(None) => {}
        // A KV failure is not a decision: ask the control plane instead.
        Err(e) => console_error!("KV read failed: {e}"),
    }
    // Past KV, a key costs a control-plane call: only within the client's budget of such
    // lookups and this isolate's bound on them in flight.
    if !within_miss_budget(req, env).await {
        return Err((Refusal::TooManyMisses, Source::None));
    }
    let Some(_slot) = LookupSlot::take(config.max_concurrent_lookups) else {
        return Err((Refusal::Busy, Source::None));
    };
    match ask_control_plane(&hex, env, config).await {
        Lookup::Found {
            record,
            json,
            keep_seconds,
        } => {
            let now = now_ms / 1000;
            let kv_ttl = config.kv_ttl_seconds.min(keep_seconds);
            if let Some(ttl) = decision::kv_ttl(&record, kv_ttl, now) {
                let digest = KeyRecord::digest(&json);
                let ttl = u32::try_from(ttl).unwrap_or(u32::MAX);
                let put = kv_put(env.as_ref(), &hex, &json, ttl, &digest);
                if let Err(e) = match put {
                    Ok(p) => JsFuture::from(p).await.map(drop),
                    Err(e) => Err(e),
                } {
                    console_error!("KV write failed: {e:?}");
                }
            }
            // Kept in the isolate cache by the caller, after the feed's refresh.
            Ok((
                record,
                Source::ControlPlane,
                Some(keep_seconds.saturating_mul(1000)),
            ))
        }
        Lookup::NotFound => {
            // Remembered in the isolate only: an attacker must never make us write KV.
            with_cache(config, |c| c.put(*hash, Entry::Unknown, now_ms));
            Err((Refusal::Invalid, Source::ControlPlane))
        }
        Lookup::Failed(why) => {
            console_error!("control plane lookup failed: {why}");
            Err((Refusal::Unavailable, Source::ControlPlane))
        }
    }
}

/// Does the client (`CF-Connecting-IP`) still have budget for a lookup of a key KV does
/// not know? The `MISS_LIMITER` binding counts per location; a binding that is missing or
/// fails says no (fail closed: a flood must not reach the control plane unchecked).
async fn within_miss_budget(req: &web_sys::Request, env: &Env) -> bool {
    match miss_budget(env.as_ref(), req) {
        Ok(promise) => match JsFuture::from(promise).await {
            Ok(success) => success.as_bool() == Some(true),
            Err(e) => {
                console_error!("rate-limit binding {MISS_LIMITER} failed: {e:?}");
                false
            }
        },
        Err(e) => {
            console_error!("rate-limit binding {MISS_LIMITER} missing: {e:?}");
            false
        }
    }
}

// The client's lookup budget from the Rate Limiting binding, keyed by `CF-Connecting-IP`
// (set by Cloudflare on every request, and by `wrangler dev`): one JS call (the `worker`
// crate's binding goes through serde for its one option, +2 KB gzip).
#[wasm_bindgen(inline_js = "export async function miss_budget(env, r) { \
    const o = await env.MISS_LIMITER.limit({ key: r.headers.get('CF-Connecting-IP') || '' }); \
    return o.success === true; }")]
extern "C" {
    #[wasm_bindgen(catch)]
    fn miss_budget(env: &JsValue, request: &web_sys::Request) -> Result<js_sys::Promise, JsValue>;
}

/// The Rate Limiting binding that counts each client's lookups past KV.
const MISS_LIMITER: &str = "MISS_LIMITER";

/// One of this isolate's control-plane lookups in flight; given back when dropped (also
/// when the request is cancelled).
struct LookupSlot;

impl LookupSlot {
    fn take(max: u32) -> Option<LookupSlot> {
        LOOKUPS_IN_FLIGHT.with(|n| {
            (n.get() < max).then(|| {
                n.set(n.get() + 1);
                LookupSlot
            })
        })
    }
}

impl Drop for LookupSlot {
    fn drop(&mut self) {
        LOOKUPS_IN_FLIGHT.with(|n| n.set(n.get().saturating_sub(1)));
    }
}

/// The origin's response with `extra` headers (its own headers are immutable: copied),
/// its body streamed through.
#[inline(never)]
fn with_headers(
    response: web_sys::Response,
    extra: &[(&'static str, String)],
) -> worker::Result<web_sys::Response> {
    let headers = web_sys::Headers::new_with_headers(&response.headers())?;
    for (name, value) in extra {
        headers.set(name, value)?;
    }
    let init = web_sys::ResponseInit::new();
    init.set_status(response.status());
    init.set_status_text(&response.status_text());
    init.set_headers(&headers);
    Ok(web_sys::Response::new_with_opt_readable_stream_and_init(
        response.body().as_ref(),
        &init,
    )?)
}

/// Step 5: forward to the origin, body streamed, and return its response unchanged.
/// `target`: the path and query the route policy checked (`None`: the request's own).
#[allow(clippy::too_many_arguments)]
async fn proxy(
    req: web_sys::Request,
    method: &str,
    request_url: &str,
    target: Option<String>,
    assertion: Option<&str>,
    record: &KeyRecord,
    config: &Config,
    source: Source,
) -> worker::Result<web_sys::Response> {
    let url = match target {
        Some(path) => format!("{}{path}", config.origin_url.trim_end_matches('/')),
        None => decision::origin_request_url(&config.origin_url, request_url),
    };
    let headers = Headers(web_sys::Headers::new_with_headers(&req.headers())?);
    let changes = decision::origin_headers(record, config.forward_authorization);
    for name in changes.remove {
        headers.delete(name)?;
    }
    // Every `X-Metlo-*` header the client sent goes: only this Worker speaks for it.
    let forged: Vec<String> = headers
        .keys()
        .filter(|name| decision::is_edge_header(name))
        .collect();
    for name in forged {
        headers.delete(&name)?;
    }
    for (name, value) in &changes.set {
        headers.set(name, value)?;
    }
    if config.decision_header {
        headers.set("X-Metlo-Edge-Source", source.as_str())?;
    }
    if let Some(secret) = &config.origin_secret {
        headers.set(decision::ORIGIN_SECRET_HEADER, secret)?;
    }
    if let Some(token) = assertion {
        headers.set(ASSERTION_HEADER, token)?;
    }
    let body = match method {
        "GET" | "HEAD" => None,
        _ => req.body().map(JsValue::from),
    };
    let forwarded = new_request(&url, method, &headers, body.as_ref())?;
    // The origin's response as it is: returned, not rebuilt.
    let response = JsFuture::from(global_fetch(forwarded.inner())).await?;
    Ok(response.unchecked_into())
}

/// Milliseconds since the epoch, in one JS call (`Date.now()`).
fn now_ms() -> u64 {
    js_sys::Date::now() as u64
}

#[inline(never)]
fn with_cache<T>(config: &Config, f: impl FnOnce(&mut IsolateCache) -> T) -> T {
    ISOLATE_CACHE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let cache = slot.get_or_insert_with(|| {
            IsolateCache::new(
                config.isolate_capacity,
                config.isolate_hit_ms,
                config.isolate_miss_ms,
            )
        });
        f(cache)
    })
}

#[inline(never)]
fn refuse(refusal: Refusal, config: &Config, source: Source) -> worker::Result<web_sys::Response> {
    let tag = if config.decision_header {
        source.as_str()
    } else {
        ""
    };
    REFUSALS.with(|cell| {
        let mut cache = cell.borrow_mut();
        if let Some((_, (body, init))) = cache.iter().find(|(k, _)| *k == (refusal, tag)) {
            // One JS call. (A Response itself cannot be kept: its body belongs to the
            // request that made it.)
            return Ok(new_response(body, init)?);
        }
        let retry_after = match refusal {
            Refusal::TooManyMisses => config.miss_retry_after_seconds,
            _ => config.retry_after_seconds,
        };
        let r = decision::refusal_response(refusal, retry_after);
        let headers = to_headers(&r, config.decision_header, source)?;
        let init = web_sys::ResponseInit::new();
        init.set_status(r.status);
        init.set_headers(&headers.0);
        let body = JsValue::from_str(r.body);
        let response = new_response(&body, &init)?;
        cache.push(((refusal, tag), (body, init)));
        Ok(response)
    })
}

#[inline(never)]
fn plain(
    r: PlainResponse,
    decision_header: bool,
    source: Source,
) -> worker::Result<web_sys::Response> {
    let headers = to_headers(&r, decision_header, source)?;
    let init = web_sys::ResponseInit::new();
    init.set_status(r.status);
    init.set_headers(&headers.0);
    Ok(web_sys::Response::new_with_opt_str_and_init(
        Some(r.body),
        &init,
    )?)
}

#[inline(never)]
fn to_headers(r: &PlainResponse, decision_header: bool, source: Source) -> worker::Result<Headers> {
    let headers = Headers::new();
    for (name, value) in &r.headers {
        headers.set(name, value)?;
    }
    if decision_header {
        headers.set("X-Metlo-Edge-Source", source.as_str())?;
    }
    Ok(headers)
}
