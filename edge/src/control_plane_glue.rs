//! Wasm glue for the Worker's calls to the control plane: key lookups by hash and usage
//! reports, each bounded by CONTROL_PLANE_TIMEOUT_MS and aborted past it; and the
//! `web_sys` request builder they and the proxy share.

use std::cell::RefCell;
use std::time::Duration;

use futures_util::future::{select, Either};
use metlo_shared::KeyHash;
use worker::{console_error, AbortController, Context, Delay, Env, Fetch, Headers, Request};

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
    let headers = Headers::new();
    if headers
        .set("Authorization", &format!("Bearer {key}"))
        .is_err()
    {
        return Lookup::Failed("CONTROL_PLANE_KEY is not a valid header value".into());
    }
    let url = format!("{}/api/v1/keys/by-hash/{hex}", config.control_plane_url);
    let request = match new_request(&url, "GET", &headers, None) {
        Ok(r) => r,
        Err(e) => return Lookup::Failed(format!("bad control-plane URL: {e}")),
    };
    match call_control_plane(request, config.control_plane_timeout_ms).await {
        Ok((status, keep, body)) => decision::interpret_lookup(status, &body, keep.as_deref()),
        Err(CallFailure::Failed(e)) => Lookup::Failed(format!("control plane unreachable: {e}")),
        Err(CallFailure::TimedOut) => Lookup::Failed("control plane timed out".into()),
    }
}

/// Why a call to the control plane brought no answer.
enum CallFailure {
    TimedOut,
    Failed(worker::Error),
}

/// Sends `request` and reads the whole answer (status, [`decision::KEEP_HEADER`], body)
/// within `timeout_ms`. On
/// timeout the fetch is aborted, which closes its connection: a fetch merely no longer
/// awaited would run on for as long as the invocation does (its `waitUntil` work included).
async fn call_control_plane(
    request: Request,
    timeout_ms: u64,
) -> Result<(u16, Option<String>, Vec<u8>), CallFailure> {
    let controller = AbortController::default();
    let signal = controller.signal();
    let call = async move {
        let mut response = Fetch::Request(request).send_with_signal(&signal).await?;
        let status = response.status_code();
        let keep = response.headers().get(decision::KEEP_HEADER)?;
        let body = response.bytes().await?;
        Ok::<_, worker::Error>((status, keep, body))
    };
    let timeout = Delay::from(Duration::from_millis(timeout_ms));
    match select(Box::pin(call), timeout).await {
        Either::Left((answer, _)) => answer.map_err(CallFailure::Failed),
        Either::Right(_) => {
            controller.abort();
            Err(CallFailure::TimedOut)
        }
    }
}

/// Step 6: notes the key's use; when this isolate's report is due, sends it after the
/// response. A failed report is kept for the next one.
pub(crate) fn record_use(hash: KeyHash, now: u64, env: &Env, ctx: &Context, config: &Config) {
    if config.usage_report_ms == 0 {
        return;
    }
    let due = USAGE.with(|cell| {
        let mut slot = cell.borrow_mut();
        // A new isolate reports its first use at once: isolates can be short-lived.
        let buffer = slot.get_or_insert_with(|| UsageBuffer::new(config.usage_report_ms, 0));
        buffer.seen(hash, now);
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
            if let Err(e) = send_usage(&url, &key, &batch, timeout_ms).await {
                console_error!("usage report failed: {e}");
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
async fn send_usage(
    url: &str,
    key: &str,
    batch: &[usage::Use],
    timeout_ms: u64,
) -> Result<(), String> {
    let headers = Headers::new();
    headers
        .set("Authorization", &format!("Bearer {key}"))
        .and_then(|_| headers.set("Content-Type", "application/json"))
        .map_err(|e| e.to_string())?;
    let body = wasm_bindgen::JsValue::from_str(&usage::report_body(batch));
    let request = new_request(url, "POST", &headers, Some(&body)).map_err(|e| e.to_string())?;
    match call_control_plane(request, timeout_ms).await {
        Ok((200..=299, _, _)) => Ok(()),
        Ok((status, _, _)) => Err(format!("control plane answered {status}")),
        Err(CallFailure::Failed(e)) => Err(e.to_string()),
        Err(CallFailure::TimedOut) => Err("control plane timed out".into()),
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
