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

/// Keys named `create`, `list` or `onboarding` (names Metlo allowed) are updated at their
/// fixed paths, which a fixed route wins over `{name}` for: the document lists those
/// PATCHes too (and `create`'s GET), as the `{name}` ones with the name fixed, so `Allow`
/// and the document agree.
/// And an update must change something: `{}` is a 400, said as `minProperties: 1`.
pub fn document_updates(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{RefOr, Schema};
    let Some(update) = doc
        .paths
        .paths
        .get("/api/v1/keys/{name}")
        .and_then(|item| item.patch.clone())
    else {
        return;
    };
    for name in ["create", "list", "onboarding"] {
        let mut op = update.clone();
        op.operation_id = Some(format!("update_key_named_{name}"));
        op.summary = Some(format!("Update the key named `{name}`"));
        op.parameters = None;
        if let Some(item) = doc.paths.paths.get_mut(&format!("/api/v1/keys/{name}")) {
            item.patch = Some(op);
        }
    }
    // And `create`'s GET: the key named `create` (the lists own GET of theirs).
    if let Some(mut show) = doc
        .paths
        .paths
        .get("/api/v1/keys/{name}")
        .and_then(|item| item.get.clone())
    {
        show.operation_id = Some("show_key_named_create".into());
        show.summary = Some("The key named `create`".into());
        show.parameters = None;
        if let Some(item) = doc.paths.paths.get_mut("/api/v1/keys/create") {
            item.get = Some(show);
        }
    }
    if let Some(RefOr::T(Schema::Object(object))) = doc
        .components
        .as_mut()
        .and_then(|c| c.schemas.get_mut("UpdateKeyRequest"))
    {
        object.min_properties = Some(1);
    }
}
