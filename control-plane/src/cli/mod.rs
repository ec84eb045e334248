//! The command line: `serve`, `migrate`, and the `keys` and `identities` admin commands.

pub mod bulk;
pub mod identities;
pub mod keys;

use clap::{Parser, Subcommand};

use crate::config::Config;

#[derive(Debug, Parser)]
#[command(
    name = "metlo-control-plane",
    version,
    about = "Metlo-compatible API-key service"
)]
pub struct Cli {
    #[command(flatten)]
    pub config: Config,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP service (applies migrations first).
    Serve {
        #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:8080")]
        listen_addr: String,
        /// Where /readyz (with details) and /metrics are served: keep it off the network.
        #[arg(long, env = "OPS_LISTEN_ADDR", default_value = "127.0.0.1:9090")]
        ops_listen_addr: String,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// Manage keys: directly in the database (this is how the first key is made), or
    /// through a running control plane with --url.
    Keys(keys::KeysArgs),
    /// Manage identities (customers owning keys, with shared credits and limits): in the
    /// database, or through a running control plane with --url.
    Identities(identities::IdentitiesArgs),
}
