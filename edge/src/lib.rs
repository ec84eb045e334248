//! The edge Worker: checks the Metlo API key of every request before it reaches the
//! origin (DESIGN §4).
//!
//! 1. `Authorization` missing, malformed or failing its checksum → 401, with no KV read
//!    and no control-plane call.
//! 2. Hash; look in a small in-isolate cache (hits ≤ 1 s, misses a few seconds).
//! 3. KV `get` of the hash (with `cacheTtl`). Hit → check expiry → allow.
//! 4. KV miss → ask the control plane by hash (with a timeout, using the Worker's own
//!    key). Found → write KV with `expirationTtl` and allow; not found → 401 (remembered
//!    in the isolate only, never in KV); control plane unreachable → 503 (fail closed).
//! 5. The isolate's view of the control plane's revocation feed ([`revocations`]) must be
//!    younger than `REVOCATION_FEED_INTERVAL_MS`: past the interval it is refreshed after
//!    the response; past twice (or never loaded), before. A key found in the isolate
//!    cache or KV is admitted only if the view does not refuse it or give it a newer
//!    record. A feed that cannot be read: `REVOCATION_FEED_ON_FAILURE` decides.
//! 6. The route policy ([`policy`]; carried by the feed, or read from KV without it):
//!    a request the key's permissions do not allow → 403 `insufficient_scope`; the origin
//!    is sent the normalised path that was checked.
//! 7. A key with a rate limit is counted in its Durable Object ([`limits`]): past the
//!    limit → 429 with `Retry-After` and `RateLimit-Policy` / `RateLimit`, no origin call.
//! 8. Allow → proxy to `ORIGIN_URL` with `X-Metlo-Key-*` headers, without `Authorization`.
//! 9. Key use is reported to the control plane in batches, after the response
//!    ([`usage`]), for each key's `lastUsed`.
//!
//! Everything that decides is plain Rust in [`decision`], [`config`], [`isolate_cache`],
//! [`revocations`], [`policy`], [`limits`] and [`usage`], unit-tested natively; the
//! wasm-only glue (`worker_glue`, `feed_glue` for the isolate's view of the feed,
//! `policy_glue` for the route policy's source, `assertion_glue` for signing,
//! `control_plane_glue` for its calls to the control plane, `meter_glue` for the meters'
//! leases and Durable Object calls, and `limiter_glue` for the Durable Object class) moves bytes between those functions and the Workers runtime.

pub mod assertion;
pub mod config;
pub mod decision;
pub mod isolate_cache;
pub mod limits;
pub mod policy;
pub mod revocations;
pub mod usage;

#[cfg(target_arch = "wasm32")]
mod assertion_glue;
#[cfg(target_arch = "wasm32")]
mod control_plane_glue;
#[cfg(target_arch = "wasm32")]
mod feed_glue;
#[cfg(target_arch = "wasm32")]
mod limiter_glue;
#[cfg(target_arch = "wasm32")]
mod meter_glue;
#[cfg(target_arch = "wasm32")]
mod policy_glue;
#[cfg(target_arch = "wasm32")]
mod worker_glue;
