//! The Durable Object class that counts one key's rate-limit window (wasm only). One
//! object per key name: the runtime runs each object's events one at a time in one
//! place, so the count is exact wherever the key's requests arrive. The window lives in
//! memory and, for an object evicted while idle, in the object's storage.

use std::cell::Cell;

use metlo_shared::{RateLimit, RateLimitWindow};
use worker::wasm_bindgen_futures::JsFuture;
use worker::{durable_object, DurableObject, Env, Request, Response, Result, State};

use crate::limits;

/// The storage key of the window.
const WINDOW_KEY: &str = "w";

#[durable_object(fetch)]
pub struct KeyLimiter {
    state: State,
    /// The window once read (with the limit it counts under).
    window: Cell<Option<(RateLimitWindow, RateLimit)>>,
}

impl DurableObject for KeyLimiter {
    fn new(state: State, _env: Env) -> Self {
        KeyLimiter {
            state,
            window: Cell::new(None),
        }
    }

    async fn fetch(&self, req: Request) -> Result<Response> {
        let Some(limit) = limits::parse_limiter_url(&req.inner().url()) else {
            return Response::error("not a limiter request", 400);
        };
        let mut window = match self.window.get() {
            Some((window, counted_under)) if counted_under == limit => window,
            Some(_) => RateLimitWindow::default(),
            // Storage reads hold the object's input gate: no other request of this key
            // runs before this one has its window.
            None => {
                let stored = JsFuture::from(self.state.storage().as_raw().get(WINDOW_KEY)?)
                    .await?
                    .as_string();
                stored.map_or_else(RateLimitWindow::default, |s| {
                    limits::decode_window(&s, limit)
                })
            }
        };
        let outcome = window.hit(limit, js_sys::Date::now() as u64);
        self.window.set(Some((window, limit)));
        if outcome.allowed {
            // Awaited: the answer leaves only once the count is durable (output gate).
            self.state
                .storage()
                .put_raw(WINDOW_KEY, limits::encode_window(window, limit))
                .await?;
        }
        Response::ok(limits::encode_outcome(outcome))
    }
}
