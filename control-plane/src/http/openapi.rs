//! The OpenAPI document's frame: title, description and the API-key security scheme.
//! Paths and schemas are collected from the handlers by `utoipa-axum` as routes are added.

use utoipa::openapi::security::{ApiKey as ApiKeyScheme, ApiKeyValue, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(title = "Metlo API keys", description = "Metlo-compatible API-key control plane"),
    modifiers(&KeyAuth)
)]
pub struct ApiDoc;

struct KeyAuth;

impl Modify for KeyAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKeyScheme::Header(ApiKeyValue::with_description(
                "Authorization",
                "A Metlo API key, bare or as `Bearer <key>`",
            ))),
        );
    }
}
