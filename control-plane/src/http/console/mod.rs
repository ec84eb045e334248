//! The admin console at `/console`: its pages and assets (embedded in the binary), the
//! sign-in that exchanges an admin key for a session cookie, and the admin API again
//! under `/console/api/v1/*`, where the session stands in for the key.
//!
//! The cookie's `Path=/console` keeps it off `/api/v1/*`, so the public API never takes
//! a cookie; every change under `/console` needs the session's CSRF token in
//! `X-CSRF-Token` and, from a browser, a same-origin `Origin`.

mod assets;
mod session;
#[cfg(test)]
mod tests;

use axum::middleware::from_fn_with_state;
use axum::routing::{get, post};
use axum::Router;

use super::state::AppState;
use super::{audit, identities, keys, usage};

pub fn router(state: &AppState) -> Router<AppState> {
    // The same handlers as /api/v1: each still states who may call it (`Authorized`),
    // and a session always acts as an admin key.
    let (api, _) = keys::router()
        .merge(audit::router())
        .merge(usage::router())
        .merge(identities::router())
        .split_for_parts();
    let signed_in = Router::new()
        .nest("/console", api)
        .route("/console/session", get(session::current))
        .route("/console/sign-out", post(session::sign_out))
        .layer(from_fn_with_state(state.clone(), session::require_session));
    Router::new()
        .route("/console/sign-in", get(assets::page).post(session::sign_in))
        .route("/console", get(assets::page))
        .route("/console/keys", get(assets::page))
        .route("/console/keys/{name}", get(assets::page))
        .route("/console/identities", get(assets::page))
        .route("/console/identities/{external_id}", get(assets::page))
        .route("/console/audit", get(assets::page))
        .route("/console/assets/{file}", get(assets::asset))
        .merge(signed_in)
}
