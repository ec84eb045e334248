//! The `keys` subcommands and their arguments, and the update body they share.

use clap::{Args, Subcommand};
use metlo_shared::RateLimit;
use serde_json::{json, Value};

use crate::cli::bulk;

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
        /// A permission the key carries (repeat, or separate with commas), e.g. orders:read.
        #[arg(long = "permission", value_delimiter = ',')]
        permissions: Vec<String>,
        /// Credits the key spends at the edge, one per request (429 once spent).
        #[arg(long)]
        credits: Option<u64>,
        /// The externalId of the identity the key belongs to.
        #[arg(long)]
        identity: Option<String>,
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
        /// The key's permissions, replacing all it had (repeat, or separate with commas).
        #[arg(
            long = "permission",
            value_delimiter = ',',
            conflicts_with = "no_permissions"
        )]
        permissions: Vec<String>,
        /// Remove all the key's permissions.
        #[arg(long)]
        no_permissions: bool,
        /// Set the key's credits anew (the edge's balance becomes this).
        #[arg(long, conflicts_with = "no_credits")]
        credits: Option<u64>,
        /// Remove the key's credits (unmetered).
        #[arg(long)]
        no_credits: bool,
        /// The externalId of the identity the key belongs to from now on.
        #[arg(long, conflicts_with = "no_identity")]
        identity: Option<String>,
        /// Take the key out of its identity.
        #[arg(long)]
        no_identity: bool,
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

/// A `--meta` argument as JSON (the service checks that it is an object of at most 1 KB).
pub(super) fn meta_arg(meta: &Option<String>) -> anyhow::Result<Option<Value>> {
    meta.as_deref()
        .map(|m| serde_json::from_str(m).map_err(|e| anyhow::anyhow!("--meta must be JSON: {e}")))
        .transpose()
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

/// The update body (the API's PATCH) for `keys update`, `disable` or `enable`.
pub(super) fn update_body(cmd: &KeysCommand) -> anyhow::Result<Value> {
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
            permissions,
            no_permissions,
            credits,
            no_credits,
            identity,
            no_identity,
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
            if !permissions.is_empty() {
                body.insert("permissions".into(), json!(permissions));
            } else if *no_permissions {
                body.insert("permissions".into(), json!([]));
            }
            if let Some(remaining) = credits {
                body.insert("credits".into(), json!({"remaining": remaining}));
            } else if *no_credits {
                body.insert("credits".into(), Value::Null);
            }
            if let Some(identity) = identity {
                body.insert("identity".into(), identity.clone().into());
            } else if *no_identity {
                body.insert("identity".into(), Value::Null);
            }
        }
        _ => unreachable!("only update, disable and enable have an update body"),
    }
    Ok(Value::Object(body))
}
