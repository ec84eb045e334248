//! Wasm glue for the Worker's calls to the control plane: key lookups by hash and usage
//! reports, each bounded by CONTROL_PLANE_TIMEOUT_MS and aborted past it (one JS
//! function); and the `web_sys` request builder the proxy uses.

use std::cell::RefCell;

use metlo_shared::KeyHash;
use wasm_bindgen::prelude::wasm_bindgen;
use wasm_bindgen::JsValue;
use worker::wasm_bindgen_futures::JsFuture;
use worker::{console_error, Context, Env, Headers, Request};

use crate::config::Config;
use crate::decision::{self, Lookup};
use crate::usage::{self, UsageBuffer};

thread_local! {
    // Key use not yet reported to the control plane.
    static USAGE: RefCell<Option<UsageBuffer>> = const { RefCell::new(None) };
}

pub(crate) async fn ask_control_plane(hex: &str, env: &Env, config: &Config) -> Lookup {
    let Some(key) = control_plane_key(env) else {
        return Lookup::Failed("the CONTROL_PLANE_KEY secret is not set".into());
    };
    let url = format!("{}/api/v1/keys/by-hash/{hex}", config.control_plane_url);
    match call_control_plane(&url, &key, None, config.control_plane_timeout_ms).await {
        Ok((status, keep, body)) => decision::interpret_lookup(status, body, keep.as_deref()),
        Err(e) => Lookup::Failed(format!("control plane unreachable: {e}")),
    }
}

// A call to the control plane with the Worker's key: GET, or POST of a JSON `body`;
// redirects never followed (a redirect from the control plane is an answer it did not
// mean: a lookup or report that fails, not the Worker's key sent wherever it points);
// aborted past `ms` (a fetch merely no longer awaited would run on for as long as the
// invocation does, its `waitUntil` work included). Answers `[status, keep, text]`.
// One JS function: the `worker` crate's fetch, headers and body reading cost ~4 KB gzip.
// Error messages are fixed: none may quote the key.
#[wasm_bindgen(
    inline_js = "export async function call_control_plane(url, key, body, ms, keep) { \
    let headers; \
    try { headers = new Headers({ Authorization: 'Bearer ' + key }); } \
    catch { throw new Error('CONTROL_PLANE_KEY is not a valid header value'); } \
    if (body !== undefined) headers.set('Content-Type', 'application/json'); \
    const c = new AbortController(); const t = setTimeout(() => c.abort(), ms); \
    try { \
      const r = await fetch(url, { method: body === undefined ? 'GET' : 'POST', headers, body, \
        redirect: 'manual', signal: c.signal }); \
      return [r.status, r.headers.get(keep), await r.text()]; \
    } catch (e) { throw new Error(c.signal.aborted ? 'timed out' : String(e && e.message)); } \
    finally { clearTimeout(t); } }"
)]
extern "C" {
    #[wasm_bindgen(catch, js_name = call_control_plane)]
    fn call_control_plane_js(
        url: &str,
        key: &str,
        body: Option<String>,
        ms: f64,
        keep: &str,
    ) -> Result<js_sys::Promise, JsValue>;
}

/// Sends a request to the control plane and reads the whole answer (status,
/// [`decision::KEEP_HEADER`], body) within `timeout_ms`, or says why not.
async fn call_control_plane(
    url: &str,
    key: &str,
    body: Option<String>,
    timeout_ms: u64,
) -> Result<(u16, Option<String>, String), String> {
    let message = |e: JsValue| {
        js_sys::Error::from(e)
            .message()
            .as_string()
            .unwrap_or_default()
    };
    let promise = call_control_plane_js(url, key, body, timeout_ms as f64, decision::KEEP_HEADER)
        .map_err(message)?;
    let answer = js_sys::Array::from(&JsFuture::from(promise).await.map_err(message)?);
    let status = answer.get(0).as_f64().unwrap_or(0.0) as u16;
    Ok((
        status,
        answer.get(1).as_string(),
        answer.get(2).as_string().unwrap_or_default(),
    ))
}

/// Step 6: notes the key's use (`refused`: why it was refused); when this isolate's report
/// is due, sends it after the response. A failed report is kept for the next one.
pub(crate) fn record_use(
    hash: KeyHash,
    now: u64,
    refused: Option<usage::Outcome>,
    env: &Env,
    ctx: &Context,
    config: &Config,
) {
    if config.usage_report_ms == 0 {
        return;
    }
    let due = USAGE.with(|cell| {
        let mut slot = cell.borrow_mut();
        // A new isolate reports its first use at once: isolates can be short-lived.
        let buffer = slot.get_or_insert_with(|| UsageBuffer::new(config.usage_report_ms, 0));
        buffer.note(hash, now, refused);
        buffer.due(now)
    });
    let Some(batches) = due else { return };
    let Some(key) = control_plane_key(env) else {
        console_error!("usage not reported: the CONTROL_PLANE_KEY secret is not set");
        return;
    };
    let url = format!("{}/api/v1/usage", config.control_plane_url);
    let timeout_ms = config.control_plane_timeout_ms;
    ctx.wait_until(async move {
        for batch in batches {
            if let Err((e, retry)) = send_usage(&url, &key, &batch, timeout_ms).await {
                console_error!("usage report failed: {e}");
                // Refused as malformed or too large, it always would be: not kept (kept,
                // it would stop every later report of this isolate too).
                if !retry {
                    continue;
                }
                USAGE.with(|cell| {
                    if let Some(buffer) = cell.borrow_mut().as_mut() {
                        buffer.put_back(batch);
                    }
                });
            }
        }
    });
}

/// A report the control plane does not answer within `timeout_ms` fails (and its fetch is
/// aborted): left waiting, it would hold the `waitUntil` until the runtime cancels it, and
/// the batch with it.
/// Err: what failed, and whether the batch is worth sending again (not when the control
/// plane refused it as malformed or too large).
async fn send_usage(
    url: &str,
    key: &str,
    batch: &[usage::Use],
    timeout_ms: u64,
) -> Result<(), (String, bool)> {
    let body = usage::report_body(batch);
    match call_control_plane(url, key, Some(body), timeout_ms).await {
        Ok((200..=299, _, _)) => Ok(()),
        Ok((status, _, _)) => Err((
            format!("control plane answered {status}"),
            !matches!(status, 400 | 413),
        )),
        Err(e) => Err((e, true)),
    }
}

/// The Worker's own (edge-role) key: a secret (`wrangler secret put`, or `.dev.vars`
/// locally), never a `[vars]` entry.
pub(crate) fn control_plane_key(env: &Env) -> Option<String> {
    env.secret("CONTROL_PLANE_KEY").map(|s| s.to_string()).ok()
}

/// A request built on `web_sys` directly: `worker::Request::new_with_init` converts its
/// whole `RequestInit` (`cf` options through serde) and costs ~10 KB of the bundle.
pub(crate) fn new_request(
    url: &str,
    method: &str,
    headers: &Headers,
    body: Option<&wasm_bindgen::JsValue>,
) -> worker::Result<Request> {
    let init = web_sys::RequestInit::new();
    init.set_method(method);
    init.set_headers(&headers.0);
    if let Some(body) = body {
        init.set_body(body);
    }
    // Never followed: the origin's redirects go back to the client as they are, and a
    // redirect from the control plane is an answer it did not mean (a lookup or report
    // that fails, not a request sent, with the Worker's key, wherever it points).
    init.set_redirect(web_sys::RequestRedirect::Manual);
    Ok(web_sys::Request::new_with_str_and_init(url, &init)?.into())
}
