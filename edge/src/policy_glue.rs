//! Wasm glue for the route policy's source: the revocation feed's view, or Workers KV's
//! copy (read at most once a second per isolate). What it decides is in [`crate::policy`].

use std::cell::RefCell;

use wasm_bindgen::prelude::wasm_bindgen;
use wasm_bindgen::JsValue;
use worker::wasm_bindgen_futures::JsFuture;
use worker::{console_error, Env};

use crate::config::Config;
use crate::feed_glue;
use crate::revocations::PolicyState;

thread_local! {
    // The route policy as KV holds it, and when it was read (ms): for a Worker without
    // the feed, or one whose feed has not said yet.
    static KV_POLICY: RefCell<(u64, Option<PolicyState>)> = const { RefCell::new((0, None)) };
}

// A KV read with `cacheTtl`, as text (`null` when absent); the `worker` crate's builder
// costs a copy of its future per caller.
#[wasm_bindgen(inline_js = "export function kv_text(env, key, ttl) { \
    return env.KEYS.get(key, { cacheTtl: ttl }); }")]
extern "C" {
    #[wasm_bindgen(catch)]
    fn kv_text(env: &JsValue, key: &str, ttl: u32) -> Result<js_sys::Promise, JsValue>;
}

/// The route policy in force: what the feed sent (or KV's copy, if later, while the feed
/// cannot be read), or else what KV holds. `Ok(None)`: none was ever set; `Err`: it cannot
/// be known (KV failed), so nothing may pass unchecked.
pub(crate) async fn route_policy(
    env: &Env,
    config: &Config,
    feed_stale: bool,
) -> Result<Option<PolicyState>, ()> {
    if config.revocation_feed_interval_ms > 0 {
        if let Some(policy) = feed_glue::policy() {
            if !feed_stale {
                return Ok(Some(policy));
            }
            // A view the feed could not refresh: KV's copy may be later (KV's own bound
            // then applies, as it does to revocations).
            return Ok(Some(policy.later(kv_policy(env, config).await?)));
        }
    }
    kv_policy(env, config).await
}

/// The route policy as KV holds it, read at most once a second per isolate.
async fn kv_policy(env: &Env, config: &Config) -> Result<Option<PolicyState>, ()> {
    let now = now_ms();
    if let Some(held) = KV_POLICY.with(|p| {
        let p = p.borrow();
        (p.0 > 0 && now.saturating_sub(p.0) < KV_POLICY_KEEP_MS).then(|| p.1.clone())
    }) {
        return Ok(held);
    }
    let read = kv_text(
        env.as_ref(),
        POLICY_KV_KEY,
        config.kv_cache_ttl_seconds as u32,
    )
    .map(JsFuture::from)
    .map_err(|e| console_error!("route policy not read from KV: {e:?}"))?
    .await
    .map_err(|e| console_error!("route policy not read from KV: {e:?}"))?;
    let policy = read.as_string().map(|text| PolicyState::read(&text));
    KV_POLICY.with(|p| *p.borrow_mut() = (now.max(1), policy.clone()));
    Ok(policy)
}

/// The route policy's KV key (the control plane's `db::policy::POLICY_KV_KEY`).
const POLICY_KV_KEY: &str = "policy";
/// How long an isolate uses the policy it read from KV before reading it again.
const KV_POLICY_KEEP_MS: u64 = 1000;

fn now_ms() -> u64 {
    js_sys::Date::now() as u64
}
