//! `metlo-control-plane identities …`: identities, in the database or through a running
//! control plane's REST API with `--url` (the key from `METLO_API_KEY`). Prints the API's
//! JSON.

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::keys::remote::Api;
use crate::config::Config;
use crate::service::audit::Actor;
use crate::service::credits::TopUp;
use crate::service::identities::{
    self, CreateIdentityRequest, IdentityInfo, UpdateIdentityRequest,
};
use crate::service::keys::KeyInfo;

#[derive(Debug, Args)]
pub struct IdentitiesArgs {
    /// Manage the identities of a running control plane at this URL, through its REST
    /// API, instead of the database. The API key is read from METLO_API_KEY.
    #[arg(long, env = "METLO_URL", global = true)]
    pub url: Option<String>,
    #[command(subcommand)]
    pub command: IdentitiesCommand,
}

#[derive(Debug, Subcommand)]
pub enum IdentitiesCommand {
    /// Make an identity.
    Create {
        /// Your name for the customer (1–255 visible ASCII characters).
        external_id: String,
        /// Credits all its keys share.
        #[arg(long)]
        credits: Option<u64>,
        /// A JSON object, for you.
        #[arg(long)]
        meta: Option<String>,
    },
    /// Change an identity (only what is given changes).
    Update {
        external_id: String,
        /// A JSON object, for you (replaces its meta).
        #[arg(long, conflicts_with = "no_meta")]
        meta: Option<String>,
        #[arg(long)]
        no_meta: bool,
        /// Set its credits anew (the edge's shared balance becomes this).
        #[arg(long, conflicts_with = "no_credits")]
        credits: Option<u64>,
        #[arg(long)]
        no_credits: bool,
        /// A limit all its keys share, NAME=REQUESTS/SECONDS (repeat; replaces them all).
        #[arg(
            long = "limit",
            value_name = "NAME=REQUESTS/SECONDS",
            conflicts_with = "no_limits"
        )]
        limits: Vec<String>,
        #[arg(long)]
        no_limits: bool,
    },
    /// The identities (the first 1,000).
    List,
    /// One identity and its keys.
    Show { external_id: String },
    /// Add credits to an identity that has some.
    AddCredits { external_id: String, add: u64 },
    /// Delete an identity (with --cascade, its keys first).
    Delete {
        external_id: String,
        #[arg(long)]
        cascade: bool,
    },
}

pub async fn run(config: &Config, args: IdentitiesArgs) -> anyhow::Result<()> {
    let out = match &args.url {
        Some(url) => remote(url, &args.command).await?,
        None => local(config, &args.command).await?,
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// The API's body for a `create` (POST) or an `update` (PATCH), the same on the database
/// and through `--url`.
fn body(cmd: &IdentitiesCommand) -> anyhow::Result<Value> {
    let mut body = serde_json::Map::new();
    let (meta, no_meta, credits, no_credits, limits, no_limits): (_, _, _, _, &[String], _) =
        match cmd {
            IdentitiesCommand::Create {
                external_id,
                credits,
                meta,
            } => {
                body.insert("externalId".into(), json!(external_id));
                (meta, &false, credits, &false, &[], &false)
            }
            IdentitiesCommand::Update {
                meta,
                no_meta,
                credits,
                no_credits,
                limits,
                no_limits,
                ..
            } => (meta, no_meta, credits, no_credits, limits, no_limits),
            _ => unreachable!("only create and update have a body"),
        };
    if let Some(meta) = meta_of(meta)? {
        body.insert("meta".into(), meta);
    } else if *no_meta {
        body.insert("meta".into(), Value::Null);
    }
    if let Some(remaining) = credits {
        body.insert("credits".into(), json!({"remaining": remaining}));
    } else if *no_credits {
        body.insert("credits".into(), Value::Null);
    }
    if !limits.is_empty() || *no_limits {
        let parsed: Vec<Value> = limits
            .iter()
            .map(|l| {
                let (name, rest) = l.split_once('=').unwrap_or((l, ""));
                let (requests, period) = rest.split_once('/').unwrap_or((rest, ""));
                match (requests.parse::<u32>(), period.parse::<u32>()) {
                    (Ok(r), Ok(p)) => Ok(json!({"name": name, "requests": r, "periodSeconds": p})),
                    _ => anyhow::bail!(
                        "--limit must be NAME=REQUESTS/SECONDS, e.g. per-minute=600/60"
                    ),
                }
            })
            .collect::<anyhow::Result<_>>()?;
        body.insert("rateLimits".into(), json!(parsed));
    }
    Ok(Value::Object(body))
}

fn meta_of(meta: &Option<String>) -> anyhow::Result<Option<Value>> {
    meta.as_deref()
        .map(|m| serde_json::from_str(m).map_err(|e| anyhow::anyhow!("--meta must be JSON: {e}")))
        .transpose()
}

async fn local(config: &Config, cmd: &IdentitiesCommand) -> anyhow::Result<Value> {
    let store = config.open_store().await?;
    let cache = config.cache(&store).await?;
    let actor = Actor::cli();
    let result: anyhow::Result<Value> = async {
        Ok(match cmd {
            IdentitiesCommand::Create { .. } => {
                let request = serde_json::from_value::<CreateIdentityRequest>(body(cmd)?)?;
                serde_json::to_value(identities::create(&store, request, &actor).await?)?
            }
            IdentitiesCommand::Update { external_id, .. } => {
                let changes =
                    serde_json::from_value::<UpdateIdentityRequest>(body(cmd)?)?.validate()?;
                serde_json::to_value(
                    identities::update(&store, &cache, external_id, &changes, &actor).await?,
                )?
            }
            IdentitiesCommand::List => {
                serde_json::to_value(identities::list(&store, Some(1000), None).await?)?
            }
            IdentitiesCommand::Show { external_id } => {
                let identity = identities::get(&store, external_id).await?;
                let keys: Vec<KeyInfo> = store
                    .keys_of_identity(identity.id)
                    .await?
                    .into_iter()
                    .map(KeyInfo::from)
                    .collect();
                json!({"identity": IdentityInfo::from(&identity), "keys": keys})
            }
            IdentitiesCommand::AddCredits { external_id, add } => serde_json::to_value(
                identities::add_credits(&store, &cache, external_id, TopUp { add: *add }, &actor)
                    .await?,
            )?,
            IdentitiesCommand::Delete {
                external_id,
                cascade,
            } => {
                identities::delete(&store, &cache, external_id, *cascade, &actor).await?;
                json!({"status": "OK"})
            }
        })
    }
    .await;
    store.close().await;
    result
}

async fn remote(url: &str, cmd: &IdentitiesCommand) -> anyhow::Result<Value> {
    let api = Api::new(url)?;
    let get = reqwest::Method::GET;
    Ok(match cmd {
        IdentitiesCommand::Create { .. } => {
            api.send(
                reqwest::Method::POST,
                &["api", "v1", "identities"],
                Some(body(cmd)?),
            )
            .await?
        }
        IdentitiesCommand::Update { external_id, .. } => {
            api.send(
                reqwest::Method::PATCH,
                &["api", "v1", "identities", external_id],
                Some(body(cmd)?),
            )
            .await?
        }
        IdentitiesCommand::List => api.send(get, &["api", "v1", "identities"], None).await?,
        IdentitiesCommand::Show { external_id } => {
            let identity: Value = api
                .send(get.clone(), &["api", "v1", "identities", external_id], None)
                .await?;
            let keys: Value = api
                .send(get, &["api", "v1", "identities", external_id, "keys"], None)
                .await?;
            json!({"identity": identity, "keys": keys["keys"]})
        }
        IdentitiesCommand::AddCredits { external_id, add } => {
            api.send(
                reqwest::Method::POST,
                &["api", "v1", "identities", external_id, "credits"],
                Some(json!({"add": add})),
            )
            .await?
        }
        IdentitiesCommand::Delete {
            external_id,
            cascade,
        } => {
            let mut url = api.url(&["api", "v1", "identities", external_id]);
            url.query_pairs_mut()
                .append_pair("cascade", &cascade.to_string());
            api.send_to(reqwest::Method::DELETE, url, None).await?
        }
    })
}
