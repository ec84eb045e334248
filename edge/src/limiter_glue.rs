//! The Durable Object class that counts one key's rate-limit window and credit balance
//! (wasm only). One object per key name: the runtime runs each object's events one at a
//! time in one place, so the counts are exact wherever the key's requests arrive. The
//! decision is [`Counter::serve`]; the state lives in memory and, for an object
//! evicted while idle, in the object's storage.

use std::cell::Cell;

use worker::wasm_bindgen_futures::JsFuture;
use worker::{durable_object, DurableObject, Env, Request, Response, Result, State};

use crate::limits::{Ask, Counter};

/// The storage key of the state ([`Counter::encode`]; the name it had when it held only
/// the window, which it still reads).
const STATE_KEY: &str = "w";

#[durable_object(fetch)]
pub struct KeyLimiter {
    state: State,
    /// The state once read.
    counter: Cell<Option<Counter>>,
}

impl DurableObject for KeyLimiter {
    fn new(state: State, _env: Env) -> Self {
        KeyLimiter {
            state,
            counter: Cell::new(None),
        }
    }

    async fn fetch(&self, req: Request) -> Result<Response> {
        let Some(ask) = Ask::decode(&req.inner().url()) else {
            return Response::error("not a limiter request", 400);
        };
        let mut counter = match self.counter.get() {
            Some(counter) => counter,
            // Storage reads hold the object's input gate: no other request of this key
            // runs before this one has the state.
            None => JsFuture::from(self.state.storage().as_raw().get(STATE_KEY)?)
                .await?
                .as_string()
                .map_or_else(Counter::default, |s| Counter::decode(&s)),
        };
        let before = counter;
        let answer = counter.serve(&ask, js_sys::Date::now() as u64);
        self.counter.set(Some(counter));
        if counter != before {
            // Awaited: the answer leaves only once the count is durable (output gate).
            self.state
                .storage()
                .put_raw(STATE_KEY, counter.encode())
                .await?;
        }
        Response::ok(answer.encode())
    }
}
