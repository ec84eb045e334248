//! `metlo-control-plane keys …`: manage keys directly in the database (how the first key
//! is made), or through a running control plane's REST API with `--url` (the key from
//! `METLO_API_KEY`). Both paths give the same typed results, printed as a table by
//! default or as the API's JSON with `--json`.

use std::time::Duration;

use clap::{Args, Subcommand};
use comfy_table::{presets, Table};
use metlo_shared::{KeyType, RateLimit};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use super::bulk;
use crate::clock::now_ms;
use crate::config::Config;
use crate::db::rows::AuditFilter;
use crate::service::audit::{self, Actor, AuditPage};
use crate::service::key_lists::{self, KeyPage};
use crate::service::key_updates::{self, UpdateKeyRequest};
use crate::service::keys::{self, CreateKeyRequest, CreatedKey, KeyInfo, RolledKey};

#[derive(Debug, Args)]
pub struct KeysArgs {
    /// Manage the keys of a running control plane at this URL, through its REST API,
    /// instead of the database. The API key is read from METLO_API_KEY.
    #[arg(long, env = "METLO_URL", global = true)]
    pub url: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: KeysCommand,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key; prints the full key alone on stdout (shown only this once).
    Create {
        #[arg(long)]
        name: String,
        /// GENERIC, ONBOARDING, GCP or AWS.
        #[arg(long = "type", default_value = "GENERIC")]
        key_type: String,
        /// When the key stops working (RFC 3339, e.g. 2030-01-01T00:00:00Z).
        #[arg(long)]
        expires_at: Option<String>,
        /// client (traffic), edge (the Worker's own key) or admin (manages keys).
        #[arg(long, default_value = "client")]
        role: String,
        /// A JSON object forwarded to the origin with the key's requests (at most 1 KB).
        #[arg(long)]
        meta: Option<String>,
        /// At most REQUESTS per SECONDS, e.g. 100/60 (429 past it).
        #[arg(long, value_name = "REQUESTS/SECONDS", value_parser = parse_rate_limit)]
        rate_limit: Option<RateLimit>,
    },
    /// Change a key without re-issuing it (only what is given changes).
    Update {
        name: String,
        /// Accept the key again.
        #[arg(long, conflicts_with = "disable")]
        enable: bool,
        /// Refuse the key everywhere (like an unknown key) until enabled.
        #[arg(long)]
        disable: bool,
        /// When the key stops working (RFC 3339).
        #[arg(long, conflicts_with = "no_expiry")]
        expires_at: Option<String>,
        /// The key never expires.
        #[arg(long)]
        no_expiry: bool,
        /// A JSON object forwarded to the origin (replaces the key's meta).
        #[arg(long, conflicts_with = "no_meta")]
        meta: Option<String>,
        /// Remove the key's meta.
        #[arg(long)]
        no_meta: bool,
        /// At most REQUESTS per SECONDS, e.g. 100/60 (a new limit starts a new window).
        #[arg(long, value_name = "REQUESTS/SECONDS", value_parser = parse_rate_limit,
            conflicts_with = "no_rate_limit")]
        rate_limit: Option<RateLimit>,
        /// Remove the key's rate limit.
        #[arg(long)]
        no_rate_limit: bool,
    },
    /// Refuse a key everywhere until it is enabled again (`keys update NAME --disable`).
    Disable { name: String },
    /// Accept a disabled key again (`keys update NAME --enable`).
    Enable { name: String },
    /// List keys (metadata only), newest first.
    List {
        /// Only ONBOARDING keys.
        #[arg(long)]
        onboarding: bool,
        /// One page of this many keys (1–1000) instead of all of them.
        #[arg(long)]
        limit: Option<i64>,
        /// The page after this one (the previous page's next cursor).
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Delete a key by name.
    Delete { name: String },
    /// Give a key a new secret (printed alone on stdout, shown only this once); the old
    /// one keeps working for --overlap-seconds.
    Roll {
        name: String,
        #[arg(long, default_value_t = 0)]
        overlap_seconds: u64,
    },
    /// Give a legacy key (made before roles existed, with every power) its one role:
    /// client, edge or admin. A key's role is set once.
    SetRole { name: String, role: String },
    /// Store many new client keys at once (PREFIX-1 … PREFIX-COUNT), for benchmarks and
    /// load tests; the keys are written only to --keys-file.
    Seed(bulk::SeedArgs),
    /// Write every live key's record to Workers KV (a new, replaced or emptied
    /// namespace), in bulk calls of up to 10,000; an interrupted run resumes.
    KvResync(bulk::ResyncArgs),
    /// Compare what Workers KV holds with the database and fix it: delete strays, put
    /// what is missing, rewrite stale records.
    KvReconcile(bulk::ReconcileArgs),
    /// Read text on stdin (a log, a file, a paste) and say which key-shaped strings in it
    /// are keys of this instance: live, rolled away, revoked, or not ours.
    LeakedCheck,
    /// Show the audit log, newest first.
    Audit {
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// Only entries older than this id (the previous page's nextBefore).
        #[arg(long)]
        before: Option<i64>,
        /// Only entries of this action (`key.create`, `auth.failed`, …).
        #[arg(long)]
        action: Option<String>,
        /// Only entries by this actor (a key's name).
        #[arg(long)]
        actor: Option<String>,
    },
}

/// What a command produced, whichever way it ran.
enum Output {
    Created(CreatedKey),
    Rolled(RolledKey),
    Deleted(String),
    RoleSet(KeyInfo),
    Updated(KeyInfo),
    Keys(Vec<KeyInfo>),
    /// One page, when only one was asked for.
    KeyPage(KeyPage),
    Audit(AuditPage),
}

pub async fn run(config: &Config, args: KeysArgs) -> anyhow::Result<()> {
    match (&args.command, &args.url) {
        (KeysCommand::Seed(a), None) => return bulk::seed(config, a, args.json).await,
        (KeysCommand::KvResync(a), None) => return bulk::kv_resync(config, a, args.json).await,
        (KeysCommand::KvReconcile(a), None) => {
            return bulk::kv_reconcile(config, a, args.json).await
        }
        (KeysCommand::LeakedCheck, None) => return bulk::leaked_check(config, args.json).await,
        (
            KeysCommand::Seed(_) | KeysCommand::KvResync(_) | KeysCommand::KvReconcile(_),
            Some(_),
        ) => {
            anyhow::bail!(
                "seed, kv-resync and kv-reconcile run on the database only (without --url)"
            )
        }
        _ => {}
    }
    let output = match &args.url {
        Some(url) => remote(url, &args.command).await?,
        None => local(config, &args.command).await?,
    };
    print(&output, args.json)
}

/// Through the REST API.
async fn remote(url: &str, cmd: &KeysCommand) -> anyhow::Result<Output> {
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
    Ok(match cmd {
        KeysCommand::Create {
            name,
            key_type,
            expires_at,
            role,
            meta,
            rate_limit,
        } => Output::Created(
            api.send(
                reqwest::Method::POST,
                &["api", "v1", "keys", "create"],
                Some(
                    json!({"name": name, "keyFor": key_type, "expiresAt": expires_at, "role": role,
                    "meta": meta_arg(meta)?, "rateLimit": rate_limit}),
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
struct Api {
    http: reqwest::Client,
    /// Ends with `/`.
    base: reqwest::Url,
    key: String,
}

impl Api {
    /// The URL of these path segments (each percent-encoded: names may hold `/`, `?`…).
    fn url(&self, segments: &[&str]) -> reqwest::Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("checked in `remote`: an http(s) URL has a path")
            .pop_if_empty()
            .extend(segments);
        url
    }

    async fn send<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        segments: &[&str],
        body: Option<Value>,
    ) -> anyhow::Result<T> {
        self.send_to(method, self.url(segments), body).await
    }

    async fn send_to<T: DeserializeOwned>(
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

/// Directly against the database (and the shared cache, when REDIS_URL is set).
async fn local(config: &Config, cmd: &KeysCommand) -> anyhow::Result<Output> {
    let store = config.open_store().await?;
    let actor = Actor::cli();
    let result: anyhow::Result<Output> = async {
        Ok(match cmd {
            KeysCommand::Create {
                name,
                key_type,
                expires_at,
                role,
                meta,
                rate_limit,
            } => {
                let new = CreateKeyRequest {
                    name: Some(name.clone()),
                    key_for: Some(key_type.clone()),
                    expires_at: expires_at.clone(),
                    role: Some(role.clone()),
                    meta: meta_arg(meta)?,
                    rate_limit: *rate_limit,
                }
                .validate(now_ms())?;
                Output::Created(keys::create_key(&store, &new, config.max_api_keys, &actor).await?)
            }
            KeysCommand::List {
                onboarding,
                limit,
                cursor,
            } => {
                let only = onboarding.then_some(KeyType::Onboarding);
                let store = &store;
                let page = |limit: i64, cursor: Option<String>| async move {
                    Ok(key_lists::list_page(store, only, None, limit, cursor.as_deref()).await?)
                };
                list_pages(*limit, cursor.clone(), page).await?
            }
            KeysCommand::Delete { name } => {
                // The CLI on the database is root: it may delete the last admin key.
                keys::delete_key(&store, &config.cache()?, name, false, &actor).await?;
                Output::Deleted(name.clone())
            }
            KeysCommand::Update { name, .. }
            | KeysCommand::Disable { name }
            | KeysCommand::Enable { name } => {
                let changes = serde_json::from_value::<UpdateKeyRequest>(update_body(cmd)?)?
                    .validate(now_ms())?;
                Output::Updated(
                    key_updates::update_key(&store, &config.cache()?, name, &changes, &actor)
                        .await?,
                )
            }
            KeysCommand::SetRole { name, role } => {
                let role = keys::parse_role(Some(role))?;
                Output::RoleSet(keys::set_role(&store, &config.cache()?, name, role, &actor).await?)
            }
            KeysCommand::Roll {
                name,
                overlap_seconds,
            } => {
                let overlap = keys::overlap(*overlap_seconds)?;
                Output::Rolled(
                    keys::roll_key(&store, &config.cache()?, name, overlap, &actor).await?,
                )
            }
            KeysCommand::Seed(_)
            | KeysCommand::KvResync(_)
            | KeysCommand::KvReconcile(_)
            | KeysCommand::LeakedCheck => anyhow::bail!("bulk commands are run by `run`"),
            KeysCommand::Audit {
                limit,
                before,
                action,
                actor,
            } => {
                let (limit, before) = audit::check_page(*limit, *before)?;
                let filter = AuditFilter {
                    action: action.clone(),
                    actor: actor.clone(),
                };
                Output::Audit(audit::page(&store, limit, before, &filter).await?)
            }
        })
    }
    .await;
    store.close().await;
    result
}

fn print(output: &Output, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        let json = match output {
            Output::Created(k) => serde_json::to_value(k)?,
            Output::Rolled(k) => serde_json::to_value(k)?,
            Output::Deleted(_) => json!({"status": "OK"}),
            Output::RoleSet(k) | Output::Updated(k) => serde_json::to_value(k)?,
            Output::Keys(k) => serde_json::to_value(k)?,
            Output::KeyPage(p) => serde_json::to_value(p)?,
            Output::Audit(p) => serde_json::to_value(p)?,
        };
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    match output {
        // The key alone on stdout, so `KEY=$(… keys create …)` works.
        Output::Created(k) => {
            eprintln!(
                "Created {} key {:?} ({}, role {}). It is shown only this once:",
                k.info.key_for, k.info.name, k.info.identifier, k.info.role
            );
            println!("{}", k.api_key);
        }
        Output::Rolled(k) => {
            eprintln!(
                "Rolled {} key {:?} ({}). It is shown only this once:",
                k.info.key_for, k.info.name, k.info.identifier
            );
            eprintln!(
                "The previous secret ({}) works until {}.",
                k.previous_identifier, k.previous_valid_until
            );
            println!("{}", k.api_key);
        }
        Output::Deleted(name) => eprintln!("Deleted key {name:?}"),
        Output::RoleSet(k) => eprintln!("Key {:?} now has the role {}", k.name, k.role),
        Output::Updated(k) => eprintln!(
            "Key {:?} updated: {}, expires {}, meta {}, rate limit {}",
            k.name,
            if k.enabled { "enabled" } else { "disabled" },
            or_dash(&k.expires_at),
            k.meta.as_ref().map_or("-".to_owned(), Value::to_string),
            rate_limit_text(k.rate_limit),
        ),
        Output::Keys(keys) => print_keys(keys, None),
        Output::KeyPage(page) => print_keys(&page.keys, page.next_cursor.as_deref()),
        Output::Audit(page) => {
            let mut table = new_table(&["ID", "AT", "ACTOR", "ACTION", "TARGET", "IP", "DETAIL"]);
            for e in &page.entries {
                table.add_row([
                    e.id.to_string(),
                    e.at.clone(),
                    or_dash(&e.actor),
                    e.action.clone(),
                    or_dash(&e.target),
                    or_dash(&e.ip),
                    e.detail.to_string(),
                ]);
            }
            println!("{table}");
            if let Some(next) = page.next_before {
                eprintln!("More: --before {next}");
            }
        }
    }
    Ok(())
}

/// A `--meta` argument as JSON (the service checks that it is an object of at most 1 KB).
fn meta_arg(meta: &Option<String>) -> anyhow::Result<Option<Value>> {
    meta.as_deref()
        .map(|m| serde_json::from_str(m).map_err(|e| anyhow::anyhow!("--meta must be JSON: {e}")))
        .transpose()
}

fn or_dash(v: &Option<String>) -> String {
    v.clone().unwrap_or_else(|| "-".to_owned())
}

/// A table of keys; `next`: the cursor of the page after them.
fn print_keys(keys: &[KeyInfo], next: Option<&str>) {
    let mut table = new_table(&[
        "NAME",
        "IDENTIFIER",
        "TYPE",
        "ROLE",
        "CREATED",
        "EXPIRES",
        "LAST USED",
        "ENABLED",
        "RATE LIMIT",
    ]);
    for k in keys {
        table.add_row([
            k.name.clone(),
            k.identifier.clone(),
            k.key_for.to_string(),
            k.role.to_string(),
            k.created.clone(),
            or_dash(&k.expires_at),
            or_dash(&k.last_used),
            if k.enabled { "yes" } else { "no" }.to_owned(),
            rate_limit_text(k.rate_limit),
        ]);
    }
    println!("{table}");
    if let Some(next) = next {
        eprintln!("More: --cursor {next}");
    }
}

/// One page (`--limit` or `--cursor` given), or every key, a page of the most at a time.
async fn list_pages<F, Fut>(
    limit: Option<i64>,
    cursor: Option<String>,
    page: F,
) -> anyhow::Result<Output>
where
    F: Fn(i64, Option<String>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<KeyPage>>,
{
    if limit.is_some() || cursor.is_some() {
        let p = page(limit.unwrap_or(key_lists::DEFAULT_LIST_PAGE), cursor).await?;
        return Ok(Output::KeyPage(p));
    }
    let (mut all, mut cursor) = (Vec::new(), None);
    loop {
        let p = page(key_lists::MAX_LIST_PAGE, cursor).await?;
        all.extend(p.keys);
        match p.next_cursor {
            Some(next) => cursor = Some(next),
            None => return Ok(Output::Keys(all)),
        }
    }
}

/// `--rate-limit REQUESTS/SECONDS`.
fn parse_rate_limit(s: &str) -> Result<RateLimit, String> {
    let (requests, seconds) = s
        .split_once('/')
        .ok_or("expected REQUESTS/SECONDS, e.g. 100/60")?;
    let number = |v: &str, what: &str| {
        v.trim()
            .parse::<u32>()
            .map_err(|_| format!("{what} must be a whole number"))
    };
    RateLimit::new(
        number(requests, "REQUESTS")?,
        number(seconds.trim_end_matches('s'), "SECONDS")?,
    )
    .map_err(|e| e.to_string())
}

fn rate_limit_text(limit: Option<RateLimit>) -> String {
    limit.map_or("-".to_owned(), |l| {
        format!("{}/{}s", l.requests, l.period_seconds)
    })
}

/// The update body (the API's PATCH) for `keys update`, `disable` or `enable`.
fn update_body(cmd: &KeysCommand) -> anyhow::Result<Value> {
    let mut body = serde_json::Map::new();
    match cmd {
        KeysCommand::Disable { .. } => {
            body.insert("enabled".into(), false.into());
        }
        KeysCommand::Enable { .. } => {
            body.insert("enabled".into(), true.into());
        }
        KeysCommand::Update {
            enable,
            disable,
            expires_at,
            no_expiry,
            meta,
            no_meta,
            rate_limit,
            no_rate_limit,
            ..
        } => {
            if *enable || *disable {
                body.insert("enabled".into(), (*enable).into());
            }
            if let Some(at) = expires_at {
                body.insert("expiresAt".into(), at.clone().into());
            } else if *no_expiry {
                body.insert("expiresAt".into(), Value::Null);
            }
            if let Some(meta) = meta_arg(meta)? {
                body.insert("meta".into(), meta);
            } else if *no_meta {
                body.insert("meta".into(), Value::Null);
            }
            if let Some(limit) = rate_limit {
                body.insert("rateLimit".into(), json!(limit));
            } else if *no_rate_limit {
                body.insert("rateLimit".into(), Value::Null);
            }
        }
        _ => unreachable!("only update, disable and enable have an update body"),
    }
    Ok(Value::Object(body))
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

fn new_table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        .set_header(header.to_vec());
    table
}
