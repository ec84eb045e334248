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

/// Every route behind the key check may answer 429 (the source's failed-authentication
/// budget is spent): said once here rather than on each handler. Run on the finished
/// document (the modifiers above run before the routes are merged in).
pub fn add_limit_responses(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
    let response = ResponseBuilder::new()
        .description(
            "Too many failed authentications from this address; `Retry-After` says when to retry",
        )
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build();
    for (path, item) in doc.paths.paths.iter_mut() {
        if !path.starts_with("/api/v1/") {
            continue;
        }
        for op in [
            &mut item.get,
            &mut item.post,
            &mut item.put,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            op.responses
                .responses
                .entry("429".into())
                .or_insert_with(|| RefOr::T(response.clone()));
        }
    }
}
