//! `metlo-control-plane keys …`: manage keys directly in the database (how the first key
//! is made), or through a running control plane's REST API with `--url` (the key from
//! `METLO_API_KEY`). Both paths produce the API's JSON, printed as a table by default or
//! as-is with `--json`.

use std::time::Duration;

use clap::{Args, Subcommand};
use comfy_table::{presets, Table};
use serde_json::{json, Value};

use crate::audit::{self, Actor};
use crate::cli::Config;
use crate::keys::{
    self, parse_expires_at, parse_key_type, validate_name, CreatedKey, KeyInfo, NewKey, RolledKey,
    MAX_OVERLAP_SECONDS,
};
use metlo_shared::KeyType;

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
    },
    /// List keys (metadata only), newest first.
    List {
        /// Only ONBOARDING keys.
        #[arg(long)]
        onboarding: bool,
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
    /// Show the audit log, newest first.
    Audit {
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// Only entries older than this id (the previous page's nextBefore).
        #[arg(long)]
        before: Option<i64>,
    },
}

pub async fn run(config: &Config, args: KeysArgs) -> anyhow::Result<()> {
    let output = match &args.url {
        Some(url) => remote(url, &args.command).await?,
        None => local(config, &args.command).await?,
    };
    print(&args.command, &output, args.json)
}

/// Through the REST API.
async fn remote(url: &str, cmd: &KeysCommand) -> anyhow::Result<Value> {
    let key = std::env::var("METLO_API_KEY")
        .map_err(|_| anyhow::anyhow!("set METLO_API_KEY to the API key to use with --url"))?;
    let base = url.trim_end_matches('/');
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let name_url = |name: &str, action: &str| {
        format!(
            "{base}/api/v1/keys/{}/{action}",
            percent_encoding::utf8_percent_encode(name, percent_encoding::NON_ALPHANUMERIC)
        )
    };
    let request = match cmd {
        KeysCommand::Create {
            name,
            key_type,
            expires_at,
        } => http
            .post(format!("{base}/api/v1/keys/create"))
            .json(&json!({"name": name, "keyFor": key_type, "expiresAt": expires_at})),
        KeysCommand::List { onboarding } => http.get(format!(
            "{base}/api/v1/keys/{}",
            if *onboarding { "onboarding" } else { "list" }
        )),
        KeysCommand::Delete { name } => http.delete(name_url(name, "delete")),
        KeysCommand::Roll {
            name,
            overlap_seconds,
        } => http
            .post(name_url(name, "roll"))
            .json(&json!({"overlapSeconds": overlap_seconds})),
        KeysCommand::Audit { limit, before } => {
            let mut q = vec![("limit", limit.to_string())];
            if let Some(b) = before {
                q.push(("before", b.to_string()));
            }
            http.get(format!("{base}/api/v1/audit")).query(&q)
        }
    };
    let response = request
        .header("Authorization", format!("Bearer {key}"))
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach {base}: {}", e.without_url()))?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        let message = body["message"].as_str().unwrap_or("no details");
        anyhow::bail!("{base} answered {status}: {message}");
    }
    Ok(body)
}

/// Directly against the database (and the shared cache, when REDIS_URL is set).
async fn local(config: &Config, cmd: &KeysCommand) -> anyhow::Result<Value> {
    let store = config.store().await?;
    let actor = Actor::cli();
    let now = chrono::Utc::now().timestamp_millis();
    let result: anyhow::Result<Value> = async {
        Ok(match cmd {
            KeysCommand::Create {
                name,
                key_type,
                expires_at,
            } => {
                let new = NewKey {
                    name: validate_name(Some(name))?.to_owned(),
                    key_type: parse_key_type(Some(key_type))?,
                    expires_at_ms: expires_at
                        .as_deref()
                        .map(|v| parse_expires_at(v, now))
                        .transpose()?,
                };
                let (key, stored) =
                    keys::create_key(&store, &new, config.max_api_keys, &actor).await?;
                serde_json::to_value(CreatedKey {
                    api_key: key.expose_secret().to_owned(),
                    info: stored.into(),
                })?
            }
            KeysCommand::List { onboarding } => {
                let only = onboarding.then_some(KeyType::Onboarding);
                let keys: Vec<KeyInfo> = store
                    .list_keys(only)
                    .await?
                    .into_iter()
                    .map(Into::into)
                    .collect();
                serde_json::to_value(keys)?
            }
            KeysCommand::Delete { name } => {
                keys::delete_key(&store, &config.cache(false)?, name, &actor).await?;
                json!({"status": "OK"})
            }
            KeysCommand::Roll {
                name,
                overlap_seconds,
            } => {
                if *overlap_seconds > MAX_OVERLAP_SECONDS {
                    anyhow::bail!(
                        "--overlap-seconds must be at most {MAX_OVERLAP_SECONDS} (7 days)"
                    );
                }
                let overlap = Duration::from_secs(*overlap_seconds);
                let (key, rolled) =
                    keys::roll_key(&store, &config.cache(false)?, name, overlap, &actor).await?;
                serde_json::to_value(RolledKey::new(key, rolled))?
            }
            KeysCommand::Audit { limit, before } => {
                let (limit, before) = audit::check_page(*limit, *before)?;
                serde_json::to_value(audit::page(&store, limit, before).await?)?
            }
        })
    }
    .await;
    store.close().await;
    result
}

fn print(cmd: &KeysCommand, output: &Value, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        println!("{}", serde_json::to_string_pretty(output)?);
        return Ok(());
    }
    let text = |v: &Value| match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    match cmd {
        KeysCommand::Create { .. } | KeysCommand::Roll { .. } => {
            // The key alone on stdout, so `KEY=$(… keys create …)` works.
            eprintln!(
                "{} {} key {:?} ({}). It is shown only this once:",
                if matches!(cmd, KeysCommand::Roll { .. }) {
                    "Rolled"
                } else {
                    "Created"
                },
                text(&output["for"]),
                text(&output["name"]),
                text(&output["identifier"]),
            );
            if let Some(until) = output["previousValidUntil"].as_str() {
                eprintln!(
                    "The previous secret ({}) works until {until}.",
                    text(&output["previousIdentifier"])
                );
            }
            println!("{}", text(&output["apiKey"]));
        }
        KeysCommand::Delete { name } => eprintln!("Deleted key {name:?}"),
        KeysCommand::List { .. } => {
            let mut table = new_table(&[
                "NAME",
                "IDENTIFIER",
                "TYPE",
                "CREATED",
                "EXPIRES",
                "LAST USED",
            ]);
            for k in output.as_array().into_iter().flatten() {
                table.add_row(
                    [
                        "name",
                        "identifier",
                        "for",
                        "created",
                        "expiresAt",
                        "lastUsed",
                    ]
                    .map(|f| text(&k[f])),
                );
            }
            println!("{table}");
        }
        KeysCommand::Audit { .. } => {
            let mut table = new_table(&["ID", "AT", "ACTOR", "ACTION", "TARGET", "IP", "DETAIL"]);
            for e in output["entries"].as_array().into_iter().flatten() {
                table.add_row(
                    ["id", "at", "actor", "action", "target", "ip", "detail"].map(|f| text(&e[f])),
                );
            }
            println!("{table}");
            if let Some(next) = output["nextBefore"].as_i64() {
                eprintln!("More: --before {next}");
            }
        }
    }
    Ok(())
}

fn new_table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        .set_header(header.to_vec());
    table
}
