//! `keys … --url`: run through a running control plane's REST API.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use super::args::{meta_arg, update_body, KeysCommand};
use super::output::{list_pages, Output};
use crate::service::key_lists::KeyPage;

/// Through the REST API.
pub(super) async fn remote(url: &str, cmd: &KeysCommand) -> anyhow::Result<Output> {
    let api = Api::new(url)?;
    Ok(match cmd {
        KeysCommand::Create {
            name,
            key_type,
            expires_at,
            role,
            meta,
            rate_limit,
            permissions,
            credits,
            identity,
        } => Output::Created(
            api.send(
                reqwest::Method::POST,
                &["api", "v1", "keys", "create"],
                Some(
                    json!({"name": name, "keyFor": key_type, "expiresAt": expires_at, "role": role,
                    "meta": meta_arg(meta)?, "rateLimit": rate_limit,
                    "permissions": permissions,
                    "credits": credits.map(|c| json!({"remaining": c})), "identity": identity}),
                ),
            )
            .await?,
        ),
        KeysCommand::Update { name, .. }
        | KeysCommand::Disable { name }
        | KeysCommand::Enable { name } => Output::Updated(
            api.send(
                reqwest::Method::PATCH,
                &["api", "v1", "keys", name],
                Some(update_body(cmd)?),
            )
            .await?,
        ),
        KeysCommand::Seed(_)
        | KeysCommand::KvResync(_)
        | KeysCommand::KvReconcile(_)
        | KeysCommand::LeakedCheck => {
            anyhow::bail!("this command runs on the database only (without --url)")
        }
        KeysCommand::SetRole { .. } => anyhow::bail!(
            "set-role runs on the database only (without --url): it changes what a key may do"
        ),
        KeysCommand::List {
            onboarding,
            limit,
            cursor,
        } => {
            let route = if *onboarding { "onboarding" } else { "list" };
            let page = |limit: i64, cursor: Option<String>| {
                let mut url = api.url(&["api", "v1", "keys", route]);
                url.query_pairs_mut()
                    .append_pair("limit", &limit.to_string());
                if let Some(c) = &cursor {
                    url.query_pairs_mut().append_pair("cursor", c);
                }
                api.send_to::<KeyPage>(reqwest::Method::GET, url, None)
            };
            list_pages(*limit, cursor.clone(), page).await?
        }
        KeysCommand::Delete { name } => {
            let _: Value = api
                .send(
                    reqwest::Method::DELETE,
                    &["api", "v1", "keys", name, "delete"],
                    None,
                )
                .await?;
            Output::Deleted(name.clone())
        }
        KeysCommand::Roll {
            name,
            overlap_seconds,
        } => Output::Rolled(
            api.send(
                reqwest::Method::POST,
                &["api", "v1", "keys", name, "roll"],
                Some(json!({"overlapSeconds": overlap_seconds})),
            )
            .await?,
        ),
        KeysCommand::Audit {
            limit,
            before,
            action,
            actor,
        } => {
            let mut api_audit = api.url(&["api", "v1", "audit"]);
            for (name, value) in [("action", action), ("actor", actor)] {
                if let Some(value) = value {
                    api_audit.query_pairs_mut().append_pair(name, value);
                }
            }
            api_audit
                .query_pairs_mut()
                .append_pair("limit", &limit.to_string());
            if let Some(b) = before {
                api_audit
                    .query_pairs_mut()
                    .append_pair("before", &b.to_string());
            }
            Output::Audit(api.send_to(reqwest::Method::GET, api_audit, None).await?)
        }
    })
}

/// A running control plane's REST API.
pub(crate) struct Api {
    http: reqwest::Client,
    /// Ends with `/`.
    base: reqwest::Url,
    key: String,
}

impl Api {
    /// The API at `url`, with the key from `METLO_API_KEY`.
    pub(crate) fn new(url: &str) -> anyhow::Result<Api> {
        let key = std::env::var("METLO_API_KEY")
            .map_err(|_| anyhow::anyhow!("set METLO_API_KEY to the API key to use with --url"))?;
        let base = url.trim_end_matches('/');
        let api = Api {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
            base: reqwest::Url::parse(&format!("{base}/"))
                .map_err(|e| anyhow::anyhow!("invalid --url {base}: {e}"))?,
            key,
        };
        if !matches!(api.base.scheme(), "http" | "https") || api.base.cannot_be_a_base() {
            anyhow::bail!("--url must be an http:// or https:// URL");
        }
        if api.base.scheme() == "http" && !is_loopback(&api.base) {
            eprintln!(
                "warning: {base} is plain http:// to another host: the admin key and every new \
             key cross the network unencrypted; use https://"
            );
        }
        Ok(api)
    }

    /// The URL of these path segments (each percent-encoded: names may hold `/`, `?`…).
    pub(crate) fn url(&self, segments: &[&str]) -> reqwest::Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("checked in `remote`: an http(s) URL has a path")
            .pop_if_empty()
            .extend(segments);
        url
    }

    pub(crate) async fn send<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        segments: &[&str],
        body: Option<Value>,
    ) -> anyhow::Result<T> {
        self.send_to(method, self.url(segments), body).await
    }

    pub(crate) async fn send_to<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        url: reqwest::Url,
        body: Option<Value>,
    ) -> anyhow::Result<T> {
        let base = self.base.as_str().trim_end_matches('/');
        let mut request = self
            .http
            .request(method, url)
            .header("Authorization", format!("Bearer {}", self.key));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach {base}: {}", e.without_url()))?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let message = body["message"].as_str().unwrap_or("no details");
            anyhow::bail!("{base} answered {status}: {message}");
        }
        serde_json::from_value(body)
            .map_err(|e| anyhow::anyhow!("{base} answered with an unexpected body: {e}"))
    }
}

/// Is the URL's host this machine?
fn is_loopback(url: &reqwest::Url) -> bool {
    let host = url.host_str().unwrap_or_default();
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}
