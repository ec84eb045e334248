//! `metlo-control-plane keys …`: manage keys directly in the database (how the first key
//! is made), or through a running control plane's REST API with `--url` (the key from
//! `METLO_API_KEY`). Both paths give the same typed results, printed as a table by
//! default or as the API's JSON with `--json`.

mod args;
mod local;
mod output;
pub(crate) mod remote;

pub use args::{KeysArgs, KeysCommand};

use super::bulk;
use crate::config::Config;

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
        Some(url) => remote::remote(url, &args.command).await?,
        None => local::local(config, &args.command).await?,
    };
    output::print(&output, args.json)
}
